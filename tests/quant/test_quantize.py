"""`llamapy.quant.quantize.quantize` against `gguf.quants.quantize`, byte for byte.

Inputs are fresh random floats on every run. A failure message names the seed; rerun with
LLAMAPY_TEST_SEED=<seed> to repeat it.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Callable

import gguf.quants
import numpy as np
import pytest
import torch

from llamapy.quant.dequant import dequantize
from llamapy.quant.quantize import quantize
from llamapy.quant.types import QuantType, block_size, type_size

BLOCK_TYPES = [QuantType.Q4_0, QuantType.Q4_1, QuantType.Q5_0, QuantType.Q5_1, QuantType.Q8_0]
FLOAT_TYPES = [QuantType.F32, QuantType.F16, QuantType.BF16]
ALL_TYPES = BLOCK_TYPES + FLOAT_TYPES
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
ROW = 256  # weights per row: 8 blocks of 32


@pytest.fixture
def seed() -> int:
    return int(os.environ.get("LLAMAPY_TEST_SEED") or secrets.randbits(32))


def _ties(rng: np.random.Generator, n: int) -> np.ndarray:
    """Each block of 32 has +m and -m as its largest magnitudes, in random order."""
    x = rng.standard_normal(n)
    blocks = x.reshape(-1, 32)
    m = 2 * np.abs(blocks).max(axis=1)
    pos = np.stack([rng.permutation(32)[:2] for _ in range(len(blocks))])
    rows = np.arange(len(blocks))
    blocks[rows, pos[:, 0]], blocks[rows, pos[:, 1]] = m, -m
    return x


def _half_steps(rng: np.random.Generator, n: int) -> np.ndarray:
    """Blocks whose amax is 127 and other values k + 0.5: Q8_0 rounds exact halves."""
    x = rng.integers(-127, 127, n) + 0.5
    x[::32] = 127 * rng.choice([-1, 1], n // 32)
    return x


ROW_KINDS: list[Callable[[np.random.Generator, int], np.ndarray]] = [
    lambda rng, n: rng.standard_normal(n) * 10.0 ** rng.uniform(-3, 3),
    lambda rng, n: rng.standard_normal(n) * (rng.random(n) < 0.75),  # some zeros
    lambda rng, n: np.zeros(n),
    lambda rng, n: np.full(n, rng.standard_normal() * 10.0 ** rng.uniform(-3, 3)),
    lambda rng, n: rng.standard_normal(n) * 10.0 ** rng.uniform(4, 7),  # fp16 d may overflow
    lambda rng, n: rng.standard_normal(n) * 10.0 ** rng.uniform(-9, -5),  # fp16 d subnormal
    lambda rng, n: rng.standard_normal(n) * 10.0 ** rng.uniform(-44, -36),  # f32 subnormal
    lambda rng, n: rng.standard_normal(n) * np.where(rng.random(n) < 0.05, 1e3, 1.0),
    _ties,
    _half_steps,
]


def random_rows(rng: np.random.Generator, rows: int, kinds: list[int] | None = None) -> np.ndarray:
    kinds = kinds if kinds is not None else list(range(len(ROW_KINDS)))
    picks = rng.choice(kinds, size=rows)
    return np.stack([ROW_KINDS[k](rng, ROW) for k in picks]).astype(np.float32)


def random_float_bits(rng: np.random.Generator, n: int) -> np.ndarray:
    """float32 values of every kind: any bit pattern (NaNs, infs, subnormals) and rounding
    ties of bf16 (low 16 bits 0x8000) and of fp16 (midpoints of neighbouring halves)."""
    bits = rng.integers(0, 1 << 32, n, dtype=np.uint32).view(np.float32)
    bf16_tie = ((rng.integers(0, 1 << 16, n, dtype=np.uint32) << 16) | 0x8000).view(np.float32)
    h = rng.integers(0, 0x7BFF, n, dtype=np.uint16)
    lo = h.view(np.float16).astype(np.float32)
    hi = (h + 1).view(np.float16).astype(np.float32)
    fp16_tie = (lo + hi) / 2 * rng.choice(np.float32([-1, 1]), n)
    moderate = (rng.standard_normal(n) * 10.0 ** rng.uniform(-9, 6, n)).astype(np.float32)
    return np.concatenate([bits, bf16_tie, fp16_tie, moderate])


def gguf_quantize(x: np.ndarray, qtype: QuantType) -> np.ndarray:
    with np.errstate(all="ignore"):
        return gguf.quants.quantize(x, qtype).view(np.uint8)


def assert_same_bytes(out: torch.Tensor, ref: np.ndarray, what: str) -> None:
    assert out.dtype == torch.uint8, f"{what}: dtype {out.dtype}"
    got = out.cpu().numpy()
    assert got.shape == ref.shape, f"{what}: shapes {got.shape} != {ref.shape}"
    bad = np.argwhere(got != ref)
    if bad.size:
        row = tuple(bad[0][:-1])
        pytest.fail(
            f"{what}: {len(bad)} bytes differ; first row {row}:\n"
            f" got      {got[row].tolist()}\n gguf-py  {ref[row].tolist()}"
        )


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("qtype", ALL_TYPES, ids=lambda t: t.name)
def test_quantize_matches_gguf(qtype: QuantType, device: str, seed: int) -> None:
    x = random_rows(np.random.default_rng(seed), 256)
    out = quantize(torch.from_numpy(x).to(device), qtype)
    assert out.device.type == device
    assert_same_bytes(out, gguf_quantize(x, qtype), f"{qtype.name} on {device}, seed={seed}")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("qtype", [QuantType.F16, QuantType.BF16], ids=lambda t: t.name)
def test_float_conversion_of_every_kind_of_value(qtype: QuantType, device: str, seed: int) -> None:
    x = random_float_bits(np.random.default_rng(seed), 4096).reshape(16, -1)
    out = quantize(torch.from_numpy(x).to(device), qtype)
    assert_same_bytes(out, gguf_quantize(x, qtype), f"{qtype.name} on {device}, seed={seed}")


def _clear_zero_signs(blocks: np.ndarray, qtype: QuantType) -> np.ndarray:
    """Make fp16 fields holding -0.0 read +0.0 (bytes 00 80 -> 00 00)."""
    blocks = blocks.reshape(-1, type_size(qtype)).copy()
    for off in (0, 2) if qtype in (QuantType.Q4_1, QuantType.Q5_1) else (0,):
        neg_zero = (blocks[:, off] == 0) & (blocks[:, off + 1] == 0x80)
        blocks[neg_zero, off + 1] = 0
    return blocks


@pytest.mark.parametrize("qtype", ALL_TYPES, ids=lambda t: t.name)
def test_signed_zeros(qtype: QuantType, seed: int) -> None:
    rng = np.random.default_rng(seed)
    x = random_rows(rng, 64, kinds=[1, 2, 3])
    x[rng.random(x.shape) < 0.3] = -0.0
    x[::4] = np.where(rng.random(ROW) < 0.5, np.float32(0.0), np.float32(-0.0))
    out = quantize(torch.from_numpy(x), qtype)
    ref = gguf_quantize(x, qtype)
    what = f"{qtype.name} with signed zeros, seed={seed}"
    if qtype in (QuantType.Q4_1, QuantType.Q5_1):
        # Which zero min()/max() return when both signs are present is up to the reduction
        # order of numpy or torch; only the sign bit of a zero d or m may differ.
        ref = _clear_zero_signs(ref, qtype)
        out = torch.from_numpy(_clear_zero_signs(out.numpy(), qtype))
    assert_same_bytes(out, ref.reshape(out.shape), what)


@pytest.mark.parametrize("qtype", ALL_TYPES, ids=lambda t: t.name)
def test_shapes_and_input_dtypes(qtype: QuantType, seed: int) -> None:
    rng = np.random.default_rng(seed)
    x = torch.from_numpy(rng.standard_normal((2, 3, 64)))  # float64
    nbytes = 64 // block_size(qtype) * type_size(qtype)
    for xt in (x, x.to(torch.float16), x.to(torch.bfloat16), x.transpose(0, 1)):
        out = quantize(xt, qtype)
        assert out.shape == (*xt.shape[:-1], nbytes)
        ref = gguf_quantize(xt.float().numpy(), qtype)
        assert_same_bytes(out, ref, f"{qtype.name} from {xt.dtype} {tuple(xt.shape)}, seed={seed}")


def fp16_error(v: np.ndarray) -> np.ndarray:
    """Largest error of storing v as fp16: half an ulp, relative or (subnormal) absolute."""
    return np.maximum(np.abs(v) * 2.0**-11, 2.0**-25)


# type -> (d = span / divisor, largest |q| that multiplies d, rounding error in steps)
STEPS = {
    QuantType.Q4_0: (8, 8, 1.0),  # a full step: the top level (+8) is clipped to 7
    QuantType.Q5_0: (16, 16, 1.0),
    QuantType.Q8_0: (127, 127, 0.5),
    QuantType.Q4_1: (15, 15, 0.5),
    QuantType.Q5_1: (31, 31, 0.5),
}


def roundtrip_tolerance(qtype: QuantType, x: np.ndarray) -> np.ndarray:
    """Largest |dequant(quant(x)) - x| allowed, per weight, from the type's step size d.

    Rounding q costs half a step (or a full one); storing d and m as fp16 costs
    |q| * fp16_error(d) + fp16_error(m); float32 arithmetic a few ulps of the block's amax.
    """
    if qtype == QuantType.F32:
        return np.zeros_like(x, dtype=np.float64)
    if qtype == QuantType.F16:
        return fp16_error(x)
    if qtype == QuantType.BF16:
        return np.abs(x) * 2.0**-8
    b = x.astype(np.float64).reshape(-1, block_size(qtype))
    amax = np.abs(b).max(axis=1, keepdims=True)
    mn, mx = b.min(axis=1, keepdims=True), b.max(axis=1, keepdims=True)
    affine = qtype in (QuantType.Q4_1, QuantType.Q5_1)
    divisor, qmax, steps = STEPS[qtype]
    d = (mx - mn if affine else amax) / divisor
    tol = steps * d + qmax * fp16_error(d) + amax * 2.0**-21
    if affine:
        tol = tol + fp16_error(mn)
    return np.broadcast_to(tol, b.shape).reshape(x.shape)


@pytest.mark.parametrize("qtype", ALL_TYPES, ids=lambda t: t.name)
def test_roundtrip_error_within_step(qtype: QuantType, seed: int) -> None:
    rng = np.random.default_rng(seed)
    # Each row's largest magnitude in [1e-4, 1e4]: inside fp16's range, which bounds d and m
    # (and F16 weights), down to where d is an fp16 subnormal.
    x = random_rows(rng, 64, kinds=[1, 2, 3, 8])
    amax = np.abs(x).max(axis=1, keepdims=True)
    x = x / np.where(amax > 0, amax, 1) * 10.0 ** rng.uniform(-4, 4, (64, 1))
    x = x.astype(np.float32)
    y = dequantize(quantize(torch.from_numpy(x), qtype), qtype).numpy()
    err = np.abs(y.astype(np.float64) - x)
    excess = err - roundtrip_tolerance(qtype, x)
    worst = np.unravel_index(np.argmax(excess), x.shape)
    assert excess[worst] <= 0, (
        f"{qtype.name}: |error| {err[worst]:.3g} at {worst} (x={x[worst]!r}, y={y[worst]!r}) "
        f"exceeds the step-derived tolerance by {excess[worst]:.3g}; seed={seed}"
    )


def test_q8_0_rounds_half_away_from_zero() -> None:
    # amax 127 gives d = 1 exactly, so q = roundf(x): 0.5 -> 1, -2.5 -> -3 (not to even).
    x = torch.zeros(32)
    x[:7] = torch.tensor([127.0, 0.5, 1.5, 2.5, -0.5, -1.5, -2.5])
    out = quantize(x, QuantType.Q8_0)
    expected_q = [127, 1, 2, 3, -1, -2, -3] + [0] * 25
    assert out[:2].tolist() == list(np.float16(1.0).tobytes())
    assert out[2:].view(torch.int8).tolist() == expected_q
    assert out.tolist() == gguf_quantize(x.numpy(), QuantType.Q8_0).tolist()


def test_q4_0_known_block() -> None:
    # max (largest magnitude, signed) -8 -> d = 1, q = trunc(x + 8.5) clipped to 15.
    x = torch.tensor([-8.0, 7.0, 8.0, 0.4, 0.5, -0.6] + [0.0] * 26)
    out = quantize(x, QuantType.Q4_0)
    q = [0, 15, 15, 8, 9, 7] + [8] * 26
    packed = [q[j] | (q[j + 16] << 4) for j in range(16)]
    assert out.tolist() == list(np.float16(1.0).tobytes()) + packed


@pytest.mark.parametrize(
    "qtype", [QuantType.TQ1_0, QuantType.TQ2_0, QuantType.IQ1_S, QuantType.MXFP4]
)
def test_unsupported_type_raises(qtype: QuantType) -> None:
    with pytest.raises(ValueError, match=f"{qtype.name} is not supported"):
        quantize(torch.zeros(256), qtype)


@pytest.mark.parametrize("qtype", BLOCK_TYPES, ids=lambda t: t.name)
def test_partial_block_raises(qtype: QuantType) -> None:
    with pytest.raises(ValueError, match="not a multiple of"):
        quantize(torch.zeros(2, 48), qtype)
    with pytest.raises(ValueError, match="0-dimensional"):
        quantize(torch.tensor(1.0), qtype)
