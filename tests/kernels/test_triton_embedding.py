"""Embedding rows from raw ggml blocks in one Triton launch (kernels/triton/embedding.py)
against gguf-py's dequantizer (`gguf.quants`), bit for bit, and the torch path.

Fresh random blocks each run (tests/ggml_blocks.py: every quant byte pattern, finite fp16
scale fields), random ids with repeats; the output comes out of a NaN-poisoned
`torch.empty`. Real sizes on CUDA, small ones under TRITON_INTERPRET=1.
"""

from __future__ import annotations

import math

import gguf.quants
import numpy as np
import pytest
import torch

from ggml_blocks import FP16_FIELDS, random_blocks
from llamapy.kernels.triton import INTERPRET, embedding
from llamapy.layers.linear import embedding_lookup
from llamapy.quant.qtensor import QTensor
from llamapy.quant.types import QuantType, block_size

ON_GPU = torch.cuda.is_available()
DEVICE = "cuda" if ON_GPU else "cpu"
pytestmark = pytest.mark.skipif(
    not (ON_GPU or INTERPRET), reason="needs CUDA or TRITON_INTERPRET=1"
)

# the block types the kernel reads (ggml_blocks.FP16_FIELDS has the K-quants it does not)
BLOCK_TYPES = [t for t in FP16_FIELDS if t in embedding.SUPPORTED]
FLOATS = {QuantType.F16: np.float16, QuantType.F32: np.float32, QuantType.BF16: None}
VOCAB, DIM = (4096, 2048) if ON_GPU else (64, 512)  # DIM: whole 256-blocks


@pytest.fixture(autouse=True)
def _poisoned(poisoned: None) -> None:
    """Every test here runs with conftest's NaN-poisoned torch.empty."""


def random_table(rng: np.random.Generator, qtype: QuantType) -> np.ndarray:
    """(VOCAB, row_bytes) uint8: random quant bytes, finite fp16 fields (or float values)."""
    if qtype == QuantType.BF16:  # numpy has no bfloat16: its bits, the high half of float32
        values = rng.standard_normal((VOCAB, DIM)).astype(np.float32)
        return (values.view(np.uint32) >> 16).astype(np.uint16).view(np.uint8).reshape(VOCAB, -1)
    if qtype in FLOATS:
        values = rng.standard_normal((VOCAB, DIM)).astype(FLOATS[qtype])
        return values.view(np.uint8).reshape(VOCAB, -1)
    return random_blocks(rng, qtype, (VOCAB, DIM // block_size(qtype))).reshape(VOCAB, -1)


def gguf_rows(table: np.ndarray, qtype: QuantType, ids: np.ndarray) -> np.ndarray:
    if qtype == QuantType.BF16:  # bfloat16 -> float32 is exact: the bits shifted up
        return (table[ids].view(np.uint16).astype(np.uint32) << 16).view(np.float32)
    if qtype in FLOATS:
        return table[ids].view(FLOATS[qtype]).astype(np.float32)
    with np.errstate(all="ignore"):
        return gguf.quants.dequantize(table[ids], qtype).astype(np.float32)


@pytest.mark.parametrize("qtype", [*BLOCK_TYPES, *FLOATS], ids=lambda t: t.name)
def test_rows_equal_gguf_py_bit_for_bit(rng: np.random.Generator, qtype: QuantType) -> None:
    table = random_table(rng, qtype)
    ids = rng.integers(0, VOCAB, 9)
    ids[-1] = ids[0]  # a repeated id
    ids[1] = VOCAB - 1  # the last row
    data = torch.from_numpy(table).to(DEVICE)
    ids_t = torch.from_numpy(ids).to(DEVICE)
    got = embedding.embedding_rows(data, qtype, ids_t).cpu().numpy()
    want = gguf_rows(table, qtype, ids)
    assert got.shape == want.shape == (9, DIM)
    np.testing.assert_array_equal(got.view(np.uint32), want.view(np.uint32))
    ref = embedding.embedding_rows_reference(data, qtype, ids_t).cpu().numpy()
    np.testing.assert_array_equal(ref.view(np.uint32), want.view(np.uint32))


def test_scale_and_layer_entry_point(rng: np.random.Generator) -> None:
    """embedding_lookup (the models' entry) with Gemma's scale: float32 rows times the
    float32 scale, as the torch path computes them."""
    qtype = QuantType.Q4_1
    table = random_table(rng, qtype)
    ids = rng.integers(0, VOCAB, 5).astype(np.int32)
    scale = math.sqrt(640)
    weight = QTensor(torch.from_numpy(table).to(DEVICE), qtype, (VOCAB, DIM))
    got = embedding_lookup(weight, torch.from_numpy(ids).to(DEVICE), torch.float32, scale)
    want = torch.from_numpy(gguf_rows(table, qtype, ids)) * scale
    assert torch.equal(got.cpu(), want)


def test_bad_inputs_are_refused() -> None:
    data = torch.zeros(4, 18, dtype=torch.uint8, device=DEVICE)
    ids = torch.zeros(2, dtype=torch.int64, device=DEVICE)
    with pytest.raises(ValueError, match="no kernel for Q5_K"):
        embedding.embedding_rows(data, QuantType.Q5_K, ids)
    with pytest.raises(ValueError, match="whole number"):
        embedding.embedding_rows(data[:, :17].contiguous(), QuantType.Q4_0, ids)
    with pytest.raises(ValueError, match="uint8"):
        embedding.embedding_rows(data.float(), QuantType.Q4_0, ids)
    with pytest.raises(ValueError, match="ids must be"):
        embedding.embedding_rows(data, QuantType.Q4_0, ids.float())
