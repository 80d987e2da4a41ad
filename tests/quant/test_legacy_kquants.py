"""Dequantizers of the legacy and k-quant types against gguf-py (`gguf.quants`), bit for bit.

Blocks are fresh random bytes on every run, with each fp16 scale field overwritten by a finite
fp16 value. A failure message names the seed; rerun with LLAMAPY_TEST_SEED=<seed> to repeat it.
"""

from __future__ import annotations

import os
import secrets

import gguf.quants
import numpy as np
import pytest
import torch

from ggml_blocks import FP16_FIELDS, random_blocks
from llamapy.quant.dequant import DEQUANTIZERS, dequantize
from llamapy.quant.types import QuantType, block_size, type_size

TYPES = list(FP16_FIELDS)
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.fixture
def seed() -> int:
    return int(os.environ.get("LLAMAPY_TEST_SEED") or secrets.randbits(32))


def assert_same_bits(out: np.ndarray, ref: np.ndarray, what: str) -> None:
    assert out.dtype == ref.dtype == np.float32, f"{what}: dtypes {out.dtype}, {ref.dtype}"
    assert out.shape == ref.shape, f"{what}: shapes {out.shape} != {ref.shape}"
    bad = np.flatnonzero(out.view(np.uint32) != ref.view(np.uint32))
    if bad.size:
        i = np.unravel_index(bad[0], out.shape)
        pytest.fail(
            f"{what}: {bad.size} of {out.size} values differ; first at {i}: "
            f"got {out[i]!r}, gguf-py {ref[i]!r}"
        )


def gguf_dequantize(blocks: np.ndarray, qtype: QuantType) -> np.ndarray:
    with np.errstate(all="ignore"):
        return gguf.quants.dequantize(blocks, qtype)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
def test_block_dequantizer_matches_gguf(qtype: QuantType, device: str, seed: int) -> None:
    rng = np.random.default_rng(seed)
    blocks = random_blocks(rng, qtype, (3000,))
    ref = gguf_dequantize(blocks, qtype)
    assert np.isfinite(ref).all(), f"finite scales must give finite weights (seed={seed})"
    out = DEQUANTIZERS[qtype](torch.from_numpy(blocks).to(device))
    assert out.dtype == torch.float32 and out.device.type == device
    assert_same_bits(out.cpu().numpy(), ref, f"{qtype.name} on {device}, seed={seed}")


@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
def test_dequantize_multi_row_shapes(qtype: QuantType, seed: int) -> None:
    rng = np.random.default_rng(seed)
    blocks = random_blocks(rng, qtype, (3, 5, 4))
    data = blocks.reshape(3, 5, 4 * type_size(qtype))
    ref = gguf_dequantize(data, qtype)
    assert ref.shape == (3, 5, 4 * block_size(qtype))
    # A transposed copy is a non-contiguous view of the same values.
    strided = torch.from_numpy(data).transpose(0, 1).contiguous().transpose(0, 1)
    assert not strided.is_contiguous()
    out = dequantize(strided, qtype)
    assert_same_bits(out.numpy(), ref, f"{qtype.name} (3, 5, nbytes), seed={seed}")
    half = dequantize(torch.from_numpy(data), qtype, dtype=torch.float16)
    assert half.dtype == torch.float16
    with np.errstate(over="ignore"):  # both sides round values past 65504 to inf
        assert np.array_equal(half.numpy(), ref.astype(np.float16)), f"seed={seed}"


def fp16_bytes(value: float) -> list[int]:
    return list(np.array([value], dtype=np.float16).view(np.uint8))


def test_known_values_q4_0() -> None:
    # d = 0.5; byte j holds weight j (low nibble) and weight j + 16 (high nibble).
    qs = [(j & 0x0F) | ((15 - j) << 4) for j in range(16)]
    block = torch.tensor([fp16_bytes(0.5) + qs], dtype=torch.uint8)
    low = [0.5 * (j - 8) for j in range(16)]
    high = [0.5 * (15 - j - 8) for j in range(16)]
    assert DEQUANTIZERS[QuantType.Q4_0](block).tolist() == [low + high]


def test_known_values_q5_0() -> None:
    # qh bit j is the fifth bit of weight j: set it for weights 0 and 31 only.
    qh = [0x01, 0x00, 0x00, 0x80]
    block = torch.tensor([fp16_bytes(2.0) + qh + [0x00] * 16], dtype=torch.uint8)
    expected = [2.0 * (0 - 16)] * 32
    expected[0] = expected[31] = 2.0 * (16 - 16)
    assert DEQUANTIZERS[QuantType.Q5_0](block).tolist() == [expected]


def test_known_values_q8_0() -> None:
    qs = list(np.arange(-16, 16, dtype=np.int8).view(np.uint8))
    block = torch.tensor([fp16_bytes(0.25) + qs], dtype=torch.uint8)
    assert DEQUANTIZERS[QuantType.Q8_0](block).tolist() == [[0.25 * q for q in range(-16, 16)]]


def test_known_values_q6_k() -> None:
    # All 6-bit quants 63 (ql nibbles 15, qh pairs 3), scale j for sub-block j, d = 1.
    block = [0xFF] * 128 + [0xFF] * 64 + list(range(16)) + fp16_bytes(1.0)
    out = DEQUANTIZERS[QuantType.Q6_K](torch.tensor([block], dtype=torch.uint8))
    expected = [float(j * (63 - 32)) for j in range(16) for _ in range(16)]
    assert out.tolist() == [expected]


def test_empty_input() -> None:
    for qtype in TYPES:
        out = DEQUANTIZERS[qtype](torch.empty(0, type_size(qtype), dtype=torch.uint8))
        assert out.shape == (0, block_size(qtype)), qtype.name


def test_q8_k_is_not_dequantized_by_gguf() -> None:
    # Q8_K is only an activation format inside ggml; gguf-py has no reference for it, so
    # llamapy does not register it. If gguf-py gains one, this test says to add it.
    blocks = np.zeros((1, type_size(QuantType.Q8_K)), dtype=np.uint8)
    with pytest.raises(NotImplementedError):
        gguf.quants.dequantize(blocks, QuantType.Q8_K)
    assert QuantType.Q8_K not in DEQUANTIZERS


@pytest.mark.parametrize("qtype", [QuantType.Q4_0, QuantType.Q5_0, QuantType.Q8_0], ids=str)
def test_widen_to_q8_0_is_exact(qtype: QuantType, seed: int) -> None:
    """Q4_0 / Q5_0 rows rewritten as Q8_0 blocks (the GPU's fused Q, K, V of mixed types)
    dequantize, by gguf-py, to the same float32 bits as the originals."""
    from llamapy.quant.legacy import widen_to_q8_0

    rng = np.random.default_rng(seed)
    rows = random_blocks(rng, qtype, (7, 12)).reshape(7, 12 * type_size(qtype))
    wide = widen_to_q8_0(torch.from_numpy(rows), qtype)
    assert wide.dtype == torch.uint8 and wide.shape == (7, 12 * type_size(QuantType.Q8_0))
    ref = gguf_dequantize(rows, qtype)
    got = gguf_dequantize(wide.numpy(), QuantType.Q8_0)
    assert_same_bits(got, ref, f"{qtype.name} widened to Q8_0, seed={seed}")
    with pytest.raises(ValueError, match="no exact Q8_0 form"):
        widen_to_q8_0(torch.from_numpy(rows), QuantType.Q4_1)
    with pytest.raises(ValueError, match="whole"):  # 19 bytes: no whole Q4_0 block
        widen_to_q8_0(torch.zeros(2, 19, dtype=torch.uint8), QuantType.Q4_0)
