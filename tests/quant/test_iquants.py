"""i-quant, ternary and FP4 dequantizers against gguf-py (the reference), bit for bit.

Every run draws fresh random blocks; the seed is in each failure message, and setting
LLAMAPY_TEST_SEED to it replays the run.
"""

from __future__ import annotations

import os
import secrets

import gguf
import numpy as np
import pytest
import torch

from llamapy.quant.dequant import DEQUANTIZERS, dequantize
from llamapy.quant.grids import table
from llamapy.quant.types import QuantType, block_size, type_size

QTYPES = [
    QuantType.IQ1_S,
    QuantType.IQ1_M,
    QuantType.IQ2_XXS,
    QuantType.IQ2_XS,
    QuantType.IQ2_S,
    QuantType.IQ3_XXS,
    QuantType.IQ3_S,
    QuantType.IQ4_NL,
    QuantType.IQ4_XS,
    QuantType.TQ1_0,
    QuantType.TQ2_0,
    QuantType.MXFP4,
    QuantType.NVFP4,
]

# Byte offset of the fp16 block scale d (IQ1_M, MXFP4 and NVFP4 have none; see _random_blocks).
F16_OFFSET = {
    QuantType.IQ1_S: 0,
    QuantType.IQ2_XXS: 0,
    QuantType.IQ2_XS: 0,
    QuantType.IQ2_S: 0,
    QuantType.IQ3_XXS: 0,
    QuantType.IQ3_S: 0,
    QuantType.IQ4_NL: 0,
    QuantType.IQ4_XS: 0,
    QuantType.TQ1_0: 52,
    QuantType.TQ2_0: 64,
}

N_BLOCKS = 3000


@pytest.fixture
def seed() -> int:
    env = os.environ.get("LLAMAPY_TEST_SEED")
    return int(env) if env else secrets.randbits(63)


def _finite_f16_bits(rng: np.random.Generator, n: int) -> np.ndarray:
    """n random finite fp16 bit patterns: 80% normals (any exponent), 10% +-0, 10% subnormals."""
    sign = rng.integers(0, 2, n, dtype=np.uint16) << 15
    exp = rng.integers(1, 31, n, dtype=np.uint16)  # 31 would be inf / NaN
    man = rng.integers(0, 1024, n, dtype=np.uint16)
    kind = rng.random(n)
    exp = np.where(kind < 0.2, 0, exp).astype(np.uint16)
    man = np.where(kind < 0.1, 0, np.where(kind < 0.2, np.maximum(man, 1), man))
    return (sign | (exp << 10) | man.astype(np.uint16)).astype(np.uint16)


def _random_blocks(rng: np.random.Generator, qtype: QuantType, n: int) -> np.ndarray:
    """(n, type_size) random bytes whose scale fields decode to finite values."""
    blocks = rng.integers(0, 256, (n, type_size(qtype)), dtype=np.uint8)
    if qtype in F16_OFFSET:
        off = F16_OFFSET[qtype]
        blocks[:, off : off + 2] = _finite_f16_bits(rng, n).view(np.uint8).reshape(n, 2)
    elif qtype == QuantType.IQ1_M:
        # d's 16 bits are the top nibbles of the 4 little-endian uint16 scale words (bytes
        # 48..55): nibble i (bits 4i..4i+3) is the high nibble of byte 49 + 2i.
        d = _finite_f16_bits(rng, n)
        for i in range(4):
            nib = ((d >> (4 * i)) & 0xF).astype(np.uint8)
            blocks[:, 49 + 2 * i] = (blocks[:, 49 + 2 * i] & 0x0F) | (nib << 4)
    elif qtype == QuantType.MXFP4:
        # Every E8M0 exponent 0..255; the top few make 2**(e - 128) * 12 overflow to inf,
        # in gguf-py too, which the bitwise comparison checks as well.
        blocks[: min(n, 256), 0] = np.arange(min(n, 256), dtype=np.uint8)
    elif qtype == QuantType.NVFP4:
        k = min(n, 64)  # all 256 UE4M3 scale bytes in the first 64 blocks, random elsewhere
        blocks[:k, :4] = np.arange(4 * k, dtype=np.uint8).reshape(k, 4)
    return blocks


def _reference(data: np.ndarray, qtype: QuantType) -> np.ndarray:
    with np.errstate(over="ignore"):  # MXFP4's largest exponents overflow on purpose
        return gguf.quants.dequantize(data, qtype)


def _assert_bits_equal(out: torch.Tensor, ref: np.ndarray, qtype: QuantType, seed: int) -> None:
    got = out.detach().cpu().numpy()
    where = f"{qtype.name}, seed={seed} (LLAMAPY_TEST_SEED={seed} replays)"
    assert got.dtype == np.float32 and ref.dtype == np.float32, where
    assert got.shape == ref.shape, f"{where}: shape {got.shape} != {ref.shape}"
    a, b = got.view(np.uint32), ref.view(np.uint32)
    if not np.array_equal(a, b):
        bad = np.argwhere(a != b)
        i = tuple(int(k) for k in bad[0])
        pytest.fail(
            f"{where}: {len(bad)} of {a.size} values differ; first at {i}: "
            f"{got[i]!r} (0x{a[i]:08x}) != gguf {ref[i]!r} (0x{b[i]:08x})"
        )


def test_every_type_is_registered() -> None:
    assert all(q in DEQUANTIZERS for q in QTYPES)


@pytest.mark.parametrize("qtype", QTYPES, ids=lambda q: q.name)
def test_blocks_match_gguf(qtype: QuantType, seed: int) -> None:
    rng = np.random.default_rng(seed)
    blocks = _random_blocks(rng, qtype, N_BLOCKS)
    ref = _reference(blocks, qtype)
    if qtype != QuantType.MXFP4:  # guards the placement of the scale fields above
        assert np.isfinite(ref).all(), f"{qtype.name}: test scales not finite, seed={seed}"
    out = DEQUANTIZERS[qtype](torch.from_numpy(blocks))
    _assert_bits_equal(out, ref, qtype, seed)


@pytest.mark.parametrize("qtype", QTYPES, ids=lambda q: q.name)
def test_rows_match_gguf(qtype: QuantType, seed: int) -> None:
    """Multi-dimensional rows of several blocks through the public `dequantize`."""
    rng = np.random.default_rng(seed)
    lead, per_row = (3, 4), 5
    blocks = _random_blocks(rng, qtype, int(np.prod(lead)) * per_row)
    data = blocks.reshape(*lead, per_row * type_size(qtype))
    ref = _reference(data, qtype)
    out = dequantize(torch.from_numpy(data), qtype)
    assert out.shape == (*lead, per_row * block_size(qtype))
    _assert_bits_equal(out, ref, qtype, seed)


@pytest.mark.parametrize("qtype", QTYPES, ids=lambda q: q.name)
def test_no_blocks(qtype: QuantType) -> None:
    out = dequantize(torch.zeros((2, 0), dtype=torch.uint8), qtype)
    assert out.shape == (2, 0) and out.dtype == torch.float32


def test_tables_are_cached_per_device() -> None:
    cpu = torch.device("cpu")
    assert table("iq2xxs", cpu) is table("iq2xxs", "cpu")
    assert table("iq1s", cpu).shape == (2048, 8)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("qtype", QTYPES, ids=lambda q: q.name)
def test_cuda_matches_gguf(qtype: QuantType, seed: int) -> None:
    rng = np.random.default_rng(seed)
    blocks = _random_blocks(rng, qtype, N_BLOCKS)
    out = dequantize(torch.from_numpy(blocks).cuda(), qtype)
    assert out.device.type == "cuda"
    _assert_bits_equal(out.reshape(N_BLOCKS, -1), _reference(blocks, qtype), qtype, seed)
