"""Fused dequantize-matmul kernels (`kernels/triton/qmatmul.py`) against a float64 torch
reference, on fresh random blocks each run (the seed is printed).

Tolerances are relative Frobenius errors against the exact (float64) product, from the
arithmetic: u is the unit roundoff of the output dtype (2^-8 bf16, 2^-11 fp16, 2^-24 fp32).
- GEMV: the weights are exact in float32 and sums are float32, so the error is the final
  rounding (<= u per element) plus float32 accumulation (ACC).
- GEMM: each weight is also rounded to the operand type before `tl.dot` (x's 16-bit type, or
  TF32 for float32 x, whose operands the tensor cores may truncate: 2^-10 each, x and W). The
  rounding errors are independent across k, so their relative size in the sum is about
  u_op / sqrt(3); the bound allows 2 u_op per rounded operand.
Under TRITON_INTERPRET=1 the shapes are small (N=40, K=288: neither a multiple of a tile);
on CUDA the model shapes run as well.
"""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

import llamapy.kernels.triton as kt
from llamapy.kernels.triton import qmatmul as qm
from llamapy.kernels.triton.packed import PackedWeight
from llamapy.quant.dequant import dequantize
from llamapy.quant.types import QuantType, row_nbytes, type_size

pytestmark = pytest.mark.skipif(not kt.HAS_TRITON, reason="triton is not installed")

ON_GPU = torch.cuda.is_available()
DEVICE = "cuda" if ON_GPU else "cpu"
T = QuantType
OWN_TYPES = [T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q8_0, T.F16, T.BF16, T.F32]
FP16_FIELDS = {T.Q4_0: (0,), T.Q4_1: (0, 2), T.Q5_0: (0,), T.Q5_1: (0, 2), T.Q8_0: (0,)}
FLOAT_DTYPES = {T.F16: torch.float16, T.BF16: torch.bfloat16, T.F32: torch.float32}
X_DTYPES = [torch.float32, torch.float16, torch.bfloat16]
UNIT_ROUNDOFF = {torch.float32: 2.0**-24, torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8}
ACC = 1e-5  # float32 accumulation over K <= 8192, relative to the result's norm
N_SMALL, K_SMALL = 40, 288  # 9 blocks: a full and a partial 8-block GEMV step


def tolerance(dtype: torch.dtype, path: str, qtype: QuantType | None = None) -> float:
    u = UNIT_ROUNDOFF[dtype]
    if path == "gemv":
        return u + ACC
    if path in ("dequant", "f16"):  # x, W rounded to float16 (x scaled per row); BF16 W: bf16
        if qtype == T.BF16 or dtype == torch.bfloat16:
            return u + 2.0**-8 + 2.0**-11 + ACC
        return u + 2 * 2.0**-11 + ACC
    if dtype == torch.float32:
        return u + 2 * 2 * 2.0**-10 + ACC  # TF32: x and W truncated to 10 mantissa bits
    return u + 2 * u + ACC  # W rounded to x's 16-bit type


# --------------------------------------------------------------------------- data


def random_blocks(
    rng: np.random.Generator, qtype: QuantType, n: int, k: int, wild: bool = False
) -> torch.Tensor:
    """(n, row_bytes) uint8 weight of `qtype`: random quants; scales moderate (|w| ~ 0.1, as
    in real models) or, with `wild`, any finite fp16 (subnormals, zeros, 65504)."""
    if qtype in FLOAT_DTYPES:
        w = torch.from_numpy(rng.standard_normal((n, k), dtype=np.float32) * 0.1)
        return w.to(FLOAT_DTYPES[qtype]).view(torch.uint8).reshape(n, -1).to(DEVICE)
    ts = type_size(qtype)
    blocks = rng.integers(0, 256, (n * k // 32, ts), dtype=np.uint8)
    for off in FP16_FIELDS[qtype]:
        if wild:
            bits = rng.integers(0, 1 << 16, blocks.shape[0], dtype=np.uint16)
            vals = np.where((bits & 0x7C00) == 0x7C00, bits & 0x83FF, bits).view(np.float16)
        else:
            vals = (rng.standard_normal(blocks.shape[0]) * 0.01).astype(np.float16)
        blocks[:, off : off + 2] = vals.view(np.uint8).reshape(-1, 2)
    return torch.from_numpy(blocks.reshape(n, -1)).to(DEVICE)


def random_x(rng: np.random.Generator, m: int, k: int, dtype: torch.dtype) -> torch.Tensor:
    return torch.from_numpy(rng.standard_normal((m, k), dtype=np.float32)).to(DEVICE, dtype)


def random_bias(rng: np.random.Generator, n: int, dtype: torch.dtype) -> torch.Tensor:
    return torch.from_numpy(rng.standard_normal(n, dtype=np.float32)).to(DEVICE, dtype)


@pytest.fixture(autouse=True)
def float32_gemv(monkeypatch: pytest.MonkeyPatch) -> None:
    """These tests hold the GEMV to float32 activations (their tolerances are float32's)
    whatever LLAMAPY_GEMV_INT8_X says, and keep large one-row Q4_0 / Q4_1 products off the int8
    codes of x (`xcodes`); those have test_gemv_q8x.py and test_xcodes.py."""
    monkeypatch.setattr(qm, "GEMV_INT8_X", False)
    monkeypatch.setenv("LLAMAPY_GPU_X_CODES", "0")


def relative_error(y: torch.Tensor, exact: torch.Tensor) -> float:
    return ((y.double() - exact).norm() / exact.norm()).item()


def check(
    x: torch.Tensor,
    data: torch.Tensor,
    qtype: QuantType,
    shape: tuple[int, int],
    bias: torch.Tensor | None,
    y: torch.Tensor,
    tol: float,
    what: str,
) -> None:
    assert y.shape == (x.shape[0], shape[0]) and y.dtype == x.dtype, what
    assert not y.isnan().any(), f"{what}: NaN in the output"
    exact = qm.qmatmul_reference(x.double(), data, qtype, shape, bias)  # float64, unrounded
    err = relative_error(y, exact)
    assert err <= tol, f"{what}: relative error {err:.3g} > {tol:.3g}"


# --------------------------------------------------------------------------- matmul

# (path, M, bias): both kernels at decode and prefill-like M, with and without bias
CASES = [
    ("gemv", 1, True),
    ("gemv", 3, False),
    ("gemm", 1, False),
    ("gemm", 3, True),
    ("gemm", 17, True),
    ("dequant", 3, True),
    ("dequant", 17, False),
]


@pytest.mark.parametrize(
    "case", CASES, ids=lambda c: f"{c[0]}-M{c[1]}-{'bias' if c[2] else 'nobias'}"
)
@pytest.mark.parametrize("dtype", X_DTYPES, ids=str)
@pytest.mark.parametrize("qtype", OWN_TYPES, ids=lambda t: t.name)
def test_matches_reference(qtype, dtype, case, rng, poisoned):
    path, m, with_bias = case
    n, k = N_SMALL, K_SMALL
    data = random_blocks(rng, qtype, n, k)
    w = qm.pack_weight(data, qtype, (n, k))
    x = random_x(rng, m, k, dtype)
    bias = random_bias(rng, n, dtype) if with_bias else None
    out = torch.full((m, n), float("nan"), dtype=dtype, device=DEVICE)
    y = qm.qmatmul_with(x, w, bias, path=path, out=out)
    assert y is out
    tol = tolerance(dtype, path, qtype)
    check(x, data, qtype, (n, k), bias, y, tol, f"{qtype.name} {path}")


@pytest.mark.parametrize("qtype", [T.Q4_0, T.Q5_1, T.Q8_0, T.BF16], ids=lambda t: t.name)
def test_dequant_path_in_row_chunks(qtype, rng, poisoned, monkeypatch):
    """The dequantize + 16-bit GEMM path over several scratch chunks (the last one partial),
    rows of very different magnitudes (the per-row float16 scaling), and what `auto` picks."""
    monkeypatch.setattr(qm, "DEQUANT_SCRATCH", 1)  # one 32-row tile per chunk: 40 = 32 + 8
    n, k = N_SMALL, K_SMALL
    data = random_blocks(rng, qtype, n, k)
    w = qm.pack_weight(data, qtype, (n, k))
    x = random_x(rng, 5, k, torch.float32)
    x[1] *= 1e5  # would overflow float16 unscaled
    x[2] *= 1e-6
    bias = random_bias(rng, n, torch.float32)
    y = qm.qmatmul_with(x, w, bias, path="dequant")
    tol = tolerance(torch.float32, "dequant", qtype)
    for r in range(5):  # each row to its own scale
        row = slice(r, r + 1)
        check(x[row], data, qtype, (n, k), bias, y[row], tol, f"{qtype.name} dequant row {r}")
    big = torch.zeros(qm.DEQUANT_MM_MIN_M, k, device=DEVICE)
    assert qm._dequant_pays(big, w) == (ON_GPU and qtype != T.F32)
    assert not qm._dequant_pays(big[:-1], w)


@pytest.mark.parametrize("dtype", X_DTYPES, ids=str)
@pytest.mark.parametrize("qtype", [T.Q4_0, T.Q4_1, T.Q8_0], ids=lambda t: t.name)
def test_f16_path(qtype, dtype, rng, poisoned):
    """The fp16-tile split-K GEMM through qmatmul_with: bias, the output buffer in x's dtype,
    rows of very different magnitude (per-row float16 scaling)."""
    n, k, m = N_SMALL, 256, 17
    data = random_blocks(rng, qtype, n, k)
    w = qm.pack_weight(data, qtype, (n, k))
    x = random_x(rng, m, k, dtype)
    big = 16.0 if dtype == torch.float16 else 1e4  # a float16 output holds <= 65504
    x[1] *= big
    x[2] /= big
    bias = random_bias(rng, n, dtype)
    out = torch.full((m, n), float("nan"), dtype=dtype, device=DEVICE)
    y = qm.qmatmul_with(x, w, bias, path="f16", out=out)
    assert y is out
    for r in range(m):
        row = slice(r, r + 1)
        tol = tolerance(dtype, "f16", qtype)
        check(x[row], data, qtype, (n, k), bias, y[row], tol, f"{qtype.name} f16 row {r}")
    with pytest.raises(ValueError, match="path 'f16' takes"):
        qm.qmatmul_with(x, qm.pack_weight(random_blocks(rng, T.Q5_0, n, k), T.Q5_0, (n, k)),
                        path="f16")  # fmt: skip


@pytest.mark.parametrize("k", [576, 2048, qm.SCALE_ROWS_ONE_PASS + 64])
def test_scale_rows_f16(k, rng):
    """x -> (y, s): s a power of two per row, the smallest with max |x| <= 2^14 s, y = x / s
    rounded once to float16; one load per row up to SCALE_ROWS_ONE_PASS elements, two passes
    beyond (the last case), rows of very different magnitude and an all-zero row."""
    m = 5
    x = random_x(rng, m, k, torch.float32)
    x[1] *= 3e5  # float16 alone would overflow
    x[2] *= 1e-6
    x[3] = 0.0
    y = torch.full((m, k), float("nan"), dtype=torch.float16, device=DEVICE)
    s = torch.full((m, 1), float("nan"), dtype=torch.float32, device=DEVICE)
    qm.scale_rows_f16(x, y, s, pdl_on=False)
    top = x.abs().amax(dim=1, keepdim=True).double()
    mant, _ = torch.frexp(s)
    assert (mant == 0.5).all(), f"scales not powers of two: {s.flatten().tolist()}"
    live = top > 0
    assert (top <= 2.0**14 * s)[live].all() and (top > 2.0**13 * s)[live].all()
    expect = (x.double() / s.double()).to(torch.float16)
    assert torch.equal(y, expect), "y is not x / s rounded once to float16"


def test_split_sum_block_rule():
    from llamapy.kernels.triton import qgemm_f16

    # about four programs an SM: a 64 x 2048 output in 256-element programs (512 of them)
    assert qgemm_f16.sum_block(64 * 2048, sms=132) == 256
    assert qgemm_f16.sum_block(64 * 16384, sms=132) == 1024  # capped
    assert qgemm_f16.sum_block(16 * 576, sms=132) == 128  # floor: one warp of 4 floats each
    assert qgemm_f16.sum_block(1, sms=132) == 128


def test_f16_gemm_dispatch_rule():
    pays = qm.f16_gemm_pays
    assert pays("cuda", T.Q4_0, 64, 3072, 2048) and pays("cuda", T.Q8_0, 16, 2048, 8192)
    assert not pays("cpu", T.Q4_0, 64, 3072, 2048)  # the interpreter keeps the old paths
    assert pays("cuda", T.Q4_1, 32, 16384, 2048)
    assert not pays("cuda", T.Q5_0, 64, 3072, 2048)  # no fp16-tile kernel
    assert not pays("cuda", T.Q4_0, 15, 3072, 2048) and not pays("cuda", T.Q4_0, 65, 3072, 2048)
    assert not pays("cuda", T.Q4_0, 64, 960, 576)  # small K: a wash
    assert pays("cuda", T.Q4_0, 64, 128256, 2048)  # the vocabulary-sized output too
    assert pays("cuda", T.Q6_K, 64, 128256, 2048) and not pays("cuda", T.Q6_K, 32, 128256, 2048)


def test_gemv_tile_rule():
    """One row of x: Q4_0 / Q4_1 at K >= 2048 take the fused-form sweep's 8 x 64 tiles,
    except the wide-N class (gate_up) and the vocabulary-sized output, Q8_0 below 8192 rows
    its per-shape tiles; the Q5 types and batches of rows keep the old rules."""

    def tiles(qtype, n, k):
        cfg = qm._gemv_config(qtype, 1, n, k, 132)
        return cfg["BLOCK_N"], cfg["BLOCK_B"], cfg.get("num_warps", 4)

    assert tiles(T.Q4_0, 3072, 2048) == tiles(T.Q4_0, 2048, 8192) == (8, 64, 4)
    assert tiles(T.Q4_0, 16384, 2048) == (16, 32, 4)  # gate_up
    assert tiles(T.Q4_0, 128256, 2048) == (32, 8, 4)  # the output matrix
    # SmolLM2's output matrix: the vocabulary tiles for Q4_0 / Q4_1 / Q5_0, not Q5_1
    assert tiles(T.Q5_1, 49152, 576) == (16, 32, 4)
    assert tiles(T.Q4_0, 49152, 576) == tiles(T.Q4_1, 49152, 576) == (32, 8, 4)
    assert tiles(T.Q5_0, 49152, 576) == (32, 8, 4)
    # short K (SmolLM2's o, qkv, gate_up, down): the H200 sweep's tiles for Q4_0 / Q4_1
    assert tiles(T.Q4_0, 960, 576) == (8, 32, 4) and tiles(T.Q4_1, 960, 576) == (4, 32, 4)
    assert tiles(T.Q4_0, 576, 576) == tiles(T.Q4_1, 576, 576) == (8, 32, 8)
    assert tiles(T.Q4_0, 3072, 576) == tiles(T.Q4_1, 3072, 576) == (8, 32, 4)
    assert tiles(T.Q4_0, 576, 1536) == (8, 64, 4) and tiles(T.Q4_1, 576, 1536) == (4, 64, 4)
    assert tiles(T.Q5_1, 576, 1536) == (8, 32, 4)  # not swept: the old rule
    # Q5_0 below K = 2048 (SmolLM2 Q4_K_M's q / k / o / gate_up): 4 x 32 on four warps
    assert tiles(T.Q5_0, 576, 1536) == tiles(T.Q5_0, 192, 576) == (4, 32, 4)
    # Q4_1 at the 1B shapes, its own sweep: qkv / o 8 x 32 (o on eight warps), gate_up
    # 32 x 16, the output 16 x 16; down keeps 8 x 64
    assert tiles(T.Q4_1, 3072, 2048) == (8, 32, 4) and tiles(T.Q4_1, 2048, 2048) == (8, 32, 8)
    assert tiles(T.Q4_1, 16384, 2048) == (32, 16, 4) and tiles(T.Q4_1, 2048, 8192) == (8, 64, 4)
    assert tiles(T.Q4_1, 128256, 2048) == (16, 16, 4)
    assert tiles(T.Q5_0, 2048, 2048) == (4, 32, 4)  # not swept: the old rule
    assert tiles(T.Q8_0, 3072, 2048) == (8, 32, 4) and tiles(T.Q8_0, 2048, 2048) == (2, 64, 4)
    assert qm._gemv_config(T.Q8_0, 1, 2048, 8192, 132)["SPLIT"] == 2
    assert tiles(T.Q8_0, 16384, 2048) == (16, 8, 4)  # gate_up: the general rule
    # Q8_0 below K = 2048: the SmolLM2 sweep's tiles (o, qkv, gate_up, down)
    assert tiles(T.Q8_0, 576, 576) == (1, 32, 1) and tiles(T.Q8_0, 960, 576) == (8, 32, 8)
    assert tiles(T.Q8_0, 192, 576) == (4, 32, 4)  # V alone
    assert tiles(T.Q8_0, 3072, 576) == (8, 32, 4) and tiles(T.Q8_0, 576, 1536) == (4, 64, 4)
    assert tiles(T.Q8_0, 49152, 576) == (16, 8, 4)  # the output matrix: the general rule
    for qtype in (T.Q4_0, T.Q8_0):  # measured with one row of x; batches keep the old rule
        assert qm._gemv_config(qtype, 4, 3072, 2048, 132)["BLOCK_N"] in (4, 16)


@pytest.mark.parametrize("k", [2048, 4096])
@pytest.mark.parametrize("qtype", [T.Q4_0, T.Q4_1, T.Q8_0], ids=lambda t: t.name)
def test_gemv_long_k_tiles(qtype, k, rng, poisoned):
    """The swept default tiles at K >= 2048 (Q4_0 / Q4_1 8 rows x 64 blocks a step; Q8_0
    2 x 64, or 8 x 32 split in two at K >= 4096), fused norm prologue and residual forms
    included, against float64."""
    n = 16 if DEVICE == "cpu" else 1024  # (1024 x 4096: under the wide-N class's 4 MiB)
    cfg = qm._gemv_config(qtype, 1, n, k, 132)
    if qtype == T.Q8_0:
        assert (cfg["BLOCK_B"], cfg["SPLIT"]) == ((32, 2) if k >= 4096 else (64, 1))
    else:
        assert cfg["BLOCK_B"] == (32 if qtype == T.Q4_1 and k < 4096 else 64)
    _check_plain_and_fused(qtype, n, k, rng)


@pytest.mark.parametrize(
    ("n", "k", "tiles"),
    [
        (16, 576, (4, 32, 4)),
        (300, 576, (1, 32, 1)),
        (704, 576, (8, 32, 8)),
        (1040, 64, (8, 32, 4)),
        (16, 1536, (4, 64, 4)),
    ],
)
def test_gemv_short_k_q8_tiles(n, k, tiles, rng, poisoned):
    """Q8_0's tiles below K = 2048 (each branch of the rule; a step past K masked), plain
    and with the fused norm prologue and residual add, against float64."""
    _check_short_k_tiles(T.Q8_0, n, k, tiles, rng)


@pytest.mark.parametrize(
    ("qtype", "n", "k", "tiles"),
    [
        (T.Q4_0, 16, 1536, (8, 64, 4)),
        (T.Q4_1, 16, 1536, (4, 64, 4)),
        (T.Q4_0, 16, 576, (8, 32, 8)),
        (T.Q4_1, 704, 576, (4, 32, 4)),
        (T.Q4_0, 1040, 64, (8, 32, 4)),
        (T.Q5_0, 18, 576, (4, 32, 4)),
    ],
    ids=lambda v: getattr(v, "name", str(v)),
)
def test_gemv_short_k_q4_tiles(qtype, n, k, tiles, rng, poisoned):
    """Q4_0 / Q4_1 / Q5_0's tiles below K = 2048, each branch, against float64 (as the Q8_0
    test)."""
    _check_short_k_tiles(qtype, n, k, tiles, rng)


@pytest.mark.parametrize(
    ("qtype", "shape", "k", "tiles"),
    [
        (T.Q4_0, (49152, 576), 576, (32, 8)),  # SmolLM2's output: vocabulary tiles
        (T.Q4_1, (49152, 576), 576, (32, 8)),
        (T.Q4_1, (16384, 2048), 2048, (32, 16)),  # the 1B shape's gate_up
        (T.Q4_1, (128256, 2048), 2048, (16, 16)),  # and output
    ],
    ids=lambda v: getattr(v, "name", str(v)),
)
def test_gemv_large_n_tiles_on_few_rows(qtype, shape, k, tiles, rng, poisoned):
    """The tiles the rule gives a large matrix, run on 40 rows (a partial row tile; at K =
    576 the last step past K masked), against float64."""
    n = 40
    cfg = {key: v for key, v in qm._gemv_config(qtype, 1, *shape, 132).items() if key != "BLOCK_M"}
    assert (cfg["BLOCK_N"], cfg["BLOCK_B"]) == tiles
    data = random_blocks(rng, qtype, n, k)
    w = qm.pack_weight(data, qtype, (n, k))
    x = random_x(rng, 1, k, torch.float32)
    out = torch.full((1, n), float("nan"), device=DEVICE)
    y = qm.qmatmul_with(x, w, out=out, gemv_config=cfg)
    check(x, data, qtype, (n, k), None, y, tolerance(torch.float32, "gemv", qtype), "large n")


def _check_short_k_tiles(qtype, n, k, tiles, rng):
    cfg = qm._gemv_config(qtype, 1, n, k, 132)
    assert (cfg["BLOCK_N"], cfg["BLOCK_B"], cfg["num_warps"]) == tiles
    _check_plain_and_fused(qtype, n, k, rng)


def _check_plain_and_fused(qtype, n, k, rng):
    """One row of x through the default tiles: plain, then with the norm prologue and the
    residual add, against float64."""
    data = random_blocks(rng, qtype, n, k)
    w = qm.pack_weight(data, qtype, (n, k))
    x = random_x(rng, 1, k, torch.float32)
    y = qm.qmatmul_with(x, w, out=torch.full((1, n), float("nan"), device=DEVICE))
    check(x, data, qtype, (n, k), None, y, tolerance(torch.float32, "gemv", qtype), "plain")
    g = torch.rand(k, device=DEVICE) + 0.5
    res = random_x(rng, 1, n, torch.float32)
    got = qm.qmatmul(x, w, norm_weight=g, eps=1e-5, residual=res.clone())
    normed = x.double() * torch.rsqrt(x.double().pow(2).mean(-1, keepdim=True) + 1e-5) * g.double()
    exact = res.double() + qm.qmatmul_reference(normed, data, qtype, (n, k), None)
    err = relative_error(got, exact)
    assert err <= tolerance(torch.float32, "gemv", qtype), f"norm + residual: {err:.3g}"


@pytest.mark.parametrize("qtype", [T.Q4_1, T.Q5_0, T.Q8_0, T.BF16], ids=lambda t: t.name)
def test_gemv_split_k_and_row_groups(qtype, rng, poisoned):
    """Forced GEMV over several row groups (M=17) and K splits, one of which is empty (2
    steps over 3 splits): the float32 partials are reduced in order, deterministically."""
    n, k, m = N_SMALL, K_SMALL, 17
    data = random_blocks(rng, qtype, n, k)
    w = qm.pack_weight(data, qtype, (n, k))
    x = random_x(rng, m, k, torch.bfloat16)
    bias = random_bias(rng, n, torch.float32)
    y = qm.qmatmul_with(x, w, bias, path="gemv", split_k=3)
    check(x, data, qtype, (n, k), bias, y, tolerance(x.dtype, "gemv"), f"{qtype.name} split")
    again = qm.qmatmul_with(x, w, bias, path="gemv", split_k=3)
    assert torch.equal(y, again), "split-K GEMV is not deterministic"
    one = qm.qmatmul_with(x[:1], w, bias, path="gemv", split_k=1)
    check(x[:1], data, qtype, (n, k), bias, one, tolerance(x.dtype, "gemv"), "split 1")


def test_auto_path_and_strided_rows(rng, poisoned):
    """qmatmul picks a kernel by M; x rows may sit in a wider buffer (row stride > K)."""
    n, k, qtype = N_SMALL, K_SMALL, T.Q4_0
    data = random_blocks(rng, qtype, n, k)
    w = qm.pack_weight(data, qtype, (n, k))
    wide = random_x(rng, 17, k + 64, torch.float16)
    for m in (qm.GEMV_MAX_M, 17):
        x = wide[:m, 32 : 32 + k]
        path = "gemv" if m <= qm.GEMV_MAX_M else "gemm"
        check(x, data, qtype, (n, k), None, qm.qmatmul(x, w), tolerance(x.dtype, path), path)
    assert qm.qmatmul(wide[:0, :k], w).shape == (0, n)


# --------------------------------------------------------------------------- packing


def unpack(w: PackedWeight) -> torch.Tensor:
    """The packed arrays -> float32 (N, K), the torch way (the layout's specification)."""
    t, n, nb = w.tensors, w.n, w.k // 32
    if w.qtype in FLOAT_DTYPES:
        return t["w"].to(torch.float32)
    d = t["d"].to(torch.float32).reshape(n, nb, 1)
    if w.qtype == T.Q8_0:
        return (t["qs"].reshape(n, nb, 32).to(torch.float32) * d).reshape(n, -1)
    qs = t["qs"].reshape(n, nb, 16)
    q = torch.cat([qs & 0xF, qs >> 4], dim=-1).to(torch.int32)  # weights j, then 16 + j
    if "qh" in t:
        bit = torch.arange(32, device=qs.device, dtype=torch.int32)
        q = q | (((t["qh"].reshape(n, nb, 1) >> bit) & 1) << 4)
    if "m" in t:
        return (d * q.to(torch.float32) + t["m"].to(torch.float32).reshape(n, nb, 1)).reshape(n, -1)
    offset = 8 if w.qtype in (T.Q4_0,) else 16
    return (d * (q - offset).to(torch.float32)).reshape(n, -1)


PACKED_LAYOUT = {  # name: (dtype, columns per K)
    T.Q4_0: {"qs": (torch.uint8, 1 / 2), "d": (torch.float16, 1 / 32)},
    T.Q4_1: {
        "qs": (torch.uint8, 1 / 2),
        "d": (torch.float16, 1 / 32),
        "m": (torch.float16, 1 / 32),
    },
    T.Q5_0: {"qs": (torch.uint8, 1 / 2), "qh": (torch.int32, 1 / 32), "d": (torch.float16, 1 / 32)},
    T.Q5_1: {
        "qs": (torch.uint8, 1 / 2),
        "qh": (torch.int32, 1 / 32),
        "d": (torch.float16, 1 / 32),
        "m": (torch.float16, 1 / 32),
    },
    T.Q8_0: {"qs": (torch.int8, 1), "d": (torch.float16, 1 / 32)},
    T.F16: {"w": (torch.float16, 1)},
    T.BF16: {"w": (torch.bfloat16, 1)},
    T.F32: {"w": (torch.float32, 1)},
}


@pytest.mark.parametrize("qtype", OWN_TYPES, ids=lambda t: t.name)
def test_pack_round_trip(qtype, rng):
    """Unpacking the packed arrays gives `dequantize`'s float32 values bit for bit (any
    finite fp16 scale, subnormals and zeros included)."""
    n, k = 24, 256
    data = random_blocks(rng, qtype, n, k, wild=True)
    w = qm.pack_weight(data, qtype, (n, k))
    assert (w.qtype, w.n, w.k, w.device) == (qtype, n, k, data.device)
    layout = {name: (t.dtype, t.shape[1] / k) for name, t in w.tensors.items()}
    assert layout == PACKED_LAYOUT[qtype]
    assert all(t.is_contiguous() and t.shape[0] == n for t in w.tensors.values())
    assert w.nbytes == data.numel()
    ref = dequantize(data, qtype)
    got = unpack(w)
    bad = (got.view(torch.int32) != ref.view(torch.int32)).sum().item()
    assert bad == 0, f"{qtype.name}: {bad} of {ref.numel()} weights differ from dequantize"


def tq1_0_blocks(rng: np.random.Generator, n: int, k: int) -> torch.Tensor:
    """TQ1_0 (no fused kernel): random trits, a moderate fp16 d at byte 52 of each block."""
    blocks = rng.integers(0, 256, (n * k // 256, type_size(T.TQ1_0)), dtype=np.uint8)
    d = (np.abs(rng.standard_normal(blocks.shape[0])) * 0.05).astype(np.float16)
    blocks[:, 52:54] = d.view(np.uint8).reshape(-1, 2)
    return torch.from_numpy(blocks.reshape(n, -1)).to(DEVICE)


def test_unsupported_type_falls_back_to_bf16(rng, caplog, poisoned):
    """A type without a fused kernel is dequantized to bfloat16 once (one log line naming
    it, however many weights) and runs through the BF16 kernels."""
    assert T.TQ1_0 not in qm.SUPPORTED_TYPES
    n, k = N_SMALL, 256
    data = tq1_0_blocks(rng, n, k)
    qm._log_fallback.cache_clear()
    with caplog.at_level(logging.INFO, logger=qm.__name__):
        w = qm.pack_weight(data, T.TQ1_0, (n, k))
        qm.pack_weight(data, T.TQ1_0, (n, k))
    lines = [r.getMessage() for r in caplog.records if r.name == qm.__name__]
    assert len(lines) == 1 and "TQ1_0" in lines[0], lines
    assert w.qtype == T.BF16 and set(w.tensors) == {"w"}
    assert torch.equal(w.tensors["w"], dequantize(data, T.TQ1_0, torch.bfloat16))
    x = random_x(rng, 3, k, torch.bfloat16)
    y = qm.qmatmul(x, w)
    # the weights themselves were rounded to bfloat16: 2 u more, as a GEMM operand
    check(x, data, T.TQ1_0, (n, k), None, y, tolerance(x.dtype, "gemm"), "TQ1_0 fallback")


class _FakeKQuants:
    """Stands in for `qmatmul_kquants` (its contract): exact torch matmul of Q4_K blocks."""

    TYPES = frozenset({T.Q4_K})
    calls: list[str] = []

    @classmethod
    def pack(cls, data, qtype, n, k):
        cls.calls.append("pack")
        return {"raw": data.clone()}

    @classmethod
    def matmul(cls, x, tensors, qtype, n, k, out):
        cls.calls.append("matmul")
        out.copy_(x.double() @ dequantize(tensors["raw"], qtype, torch.float64).T)


def test_delegates_kquants_and_adds_bias(rng, monkeypatch):
    """K-quant types go to the K-quant module's pack / matmul; the bias is added here."""
    monkeypatch.setattr(qm, "_kquants", _FakeKQuants)
    monkeypatch.setattr(qm, "_KQUANT_TYPES", _FakeKQuants.TYPES)
    n, k = 8, 256
    blocks = rng.integers(0, 256, (n, row_nbytes(T.Q4_K, k)), dtype=np.uint8)
    blocks.reshape(-1, type_size(T.Q4_K))[:, :4] = (
        (rng.standard_normal((n * k // 256, 2)) * 0.01).astype(np.float16).view(np.uint8)
    )
    data = torch.from_numpy(blocks).to(DEVICE)
    w = qm.pack_weight(data, T.Q4_K, (n, k))
    assert w.qtype == T.Q4_K and set(w.tensors) == {"raw"}
    x, bias = random_x(rng, 2, k, torch.float32), random_bias(rng, n, torch.float32)
    y = qm.qmatmul(x, w, bias)
    assert _FakeKQuants.calls[-2:] == ["pack", "matmul"]
    check(x, data, T.Q4_K, (n, k), bias, y, 1e-6, "delegated")


def test_real_kquant_module_is_listed():
    try:
        from llamapy.kernels.triton import qmatmul_kquants
    except ImportError:
        pytest.skip("the K-quant kernels are not present")
    assert qmatmul_kquants.TYPES <= qm.SUPPORTED_TYPES
    assert set(OWN_TYPES) <= qm.SUPPORTED_TYPES


# --------------------------------------------------------------------------- errors


def test_launcher_errors(rng, monkeypatch):
    n, k = 16, 64
    data = random_blocks(rng, T.Q8_0, n, k)
    w = qm.pack_weight(data, T.Q8_0, (n, k))
    x = random_x(rng, 2, k, torch.float32)
    with pytest.raises(ValueError, match="K=32"):
        qm.qmatmul(x[:, :32], w)
    with pytest.raises(ValueError, match="float16, bfloat16 or float32"):
        qm.qmatmul(x.double(), w)
    with pytest.raises(ValueError, match="contiguous"):
        qm.qmatmul(random_x(rng, k, 4, torch.float32).T, w)
    with pytest.raises(ValueError, match="2-D"):
        qm.qmatmul(x[0], w)
    with pytest.raises(ValueError, match="bias"):
        qm.qmatmul(x, w, torch.zeros(n + 1, device=DEVICE))
    with pytest.raises(ValueError, match="path"):
        qm.qmatmul_with(x, w, path="fast")
    with pytest.raises(ValueError, match="out"):
        qm.qmatmul_with(x, w, out=torch.empty(2, n, dtype=torch.float16, device=DEVICE))
    with pytest.raises(ValueError, match="PackedWeight"):
        qm.qmatmul(x, data)
    with pytest.raises(ValueError, match="shape"):
        qm.pack_weight(data[:, :-2], T.Q8_0, (n, k))
    with pytest.raises(ValueError, match="uint8"):
        qm.pack_weight(data.view(torch.int8), T.Q8_0, (n, k))
    with pytest.raises(ValueError, match="multiple of 32"):
        f16 = torch.zeros(n, 48 * 2, dtype=torch.uint8, device=DEVICE)
        qm.pack_weight(f16, T.F16, (n, 48))
    # CPU tensors only run under the interpreter
    cpu_w = qm.pack_weight(data.cpu(), T.Q8_0, (n, k))
    monkeypatch.setattr(kt, "INTERPRET", False)
    with pytest.raises(ValueError, match="CUDA"):
        qm.qmatmul(x.cpu(), cpu_w)


# --------------------------------------------------------------------------- CUDA only

REAL_SHAPES = [(576, 576), (1536, 576), (576, 1536), (2048, 2048), (8192, 2048), (2048, 8192)]


@pytest.mark.skipif(not ON_GPU, reason="model shapes need a GPU")
@pytest.mark.parametrize("m", [1, 16, 256])
@pytest.mark.parametrize("shape", REAL_SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("qtype", OWN_TYPES, ids=lambda t: t.name)
def test_model_shapes_cuda(qtype, shape, m, rng, poisoned):
    n, k = shape
    data = random_blocks(rng, qtype, n, k)
    w = qm.pack_weight(data, qtype, shape)
    for dtype in (torch.bfloat16, torch.float16) if m != 16 else X_DTYPES:
        x = random_x(rng, m, k, dtype)
        bias = random_bias(rng, n, dtype)
        if m <= qm.GEMV_MAX_M:
            path = "gemv"
        elif qm.f16_gemm_pays("cuda", qtype, m, n, k):
            path = "f16"
        else:
            path = "dequant" if qm._dequant_pays(x, w) else "gemm"
        y = qm.qmatmul(x, w, bias)
        tol = tolerance(dtype, path, qtype)
        check(x, data, qtype, shape, bias, y, tol, f"{qtype.name} {dtype} {path}")


@pytest.mark.skipif(not ON_GPU, reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("m", [1, 16])
def test_cuda_graph_capture(m, rng):
    """The launchers can be captured (split-K workspace included) and replayed."""
    n, k = 576, 1536
    data = random_blocks(rng, T.Q4_0, n, k)
    w = qm.pack_weight(data, T.Q4_0, (n, k))
    x = random_x(rng, m, k, torch.bfloat16)
    bias = random_bias(rng, n, torch.bfloat16)
    expected = qm.qmatmul(x, w, bias)  # also compiles the kernels before capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = qm.qmatmul(x, w, bias)
    x.copy_(random_x(rng, m, k, torch.bfloat16))
    expected = qm.qmatmul(x, w, bias)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(y, expected)
