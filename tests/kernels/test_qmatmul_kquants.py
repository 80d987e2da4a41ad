"""Fused dequantize-matmul of the k-quants and IQ4 types (`qmatmul_kquants`).

Oracles: `quant.dequant.dequantize` (bit-exact with gguf-py) for the repacked layout, and a
float64 product `x.double() @ dequantize(W).double().T` for the kernels. Blocks are fresh random
bytes each run with valid fp16 scales; the `rng` fixture prints its seed. Without a GPU the
kernels run in Triton's interpreter on small shapes; with one, also at model shapes.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from llamapy.kernels.triton import HAS_TRITON
from llamapy.quant.dequant import dequantize
from llamapy.quant.types import QuantType, block_size, type_size

pytestmark = pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")

if HAS_TRITON:
    from llamapy.kernels.triton import qmatmul_kquants as qk

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"

# Byte offsets of the fp16 scale fields of each block (ggml's block_* structs).
FP16_FIELDS = {
    QuantType.Q2_K: (80, 82),
    QuantType.Q3_K: (108,),
    QuantType.Q4_K: (0, 2),
    QuantType.Q5_K: (0, 2),
    QuantType.Q6_K: (208,),
    QuantType.IQ4_NL: (0,),
    QuantType.IQ4_XS: (0,),
}
TYPES = sorted(FP16_FIELDS, key=int)
F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16

# Normwise relative error bounds, 4x the unit roundoff of the coarsest rounding on the path:
# float32 accumulation (measured ~1e-7); fp16 / bf16 results (and GEMM operands) u = 2**-11 /
# 2**-8; a float32 GEMM on the GPU multiplies in TF32 (u = 2**-11; the interpreter in float32).
TOL = {F32: 1e-5, F16: 2e-3, BF16: 1.6e-2}
TOL_GEMM_F32 = 2e-3 if CUDA else 1e-5


def random_fp16(rng: np.random.Generator, n: int, wide: bool) -> np.ndarray:
    """n finite fp16 scales. wide: any exponent, subnormals, signed zeros (bit-exactness
    tests); otherwise magnitudes like a trained model's (1e-3 .. 3e-2), so fp16 GEMM operands
    cannot overflow."""
    if not wide:
        return (rng.standard_normal(n) * 10.0 ** rng.uniform(-3, -1.5, n)).astype(np.float16)
    sign = rng.integers(0, 2, n, dtype=np.uint16) << 15
    exp = rng.integers(0, 31, n, dtype=np.uint16)  # 31 would be inf / NaN
    man = rng.integers(0, 1024, n, dtype=np.uint16)
    man = np.where(rng.random(n) < 0.05, 0, man).astype(np.uint16)
    return (sign | (exp << 10) | man).view(np.float16)


def random_weight(
    rng: np.random.Generator, qtype: QuantType, n: int, k: int, wide: bool = False
) -> torch.Tensor:
    """(n, row_bytes) uint8 ggml blocks: random bytes, valid fp16 scale fields."""
    nb = n * k // block_size(qtype)
    blocks = rng.integers(0, 256, (nb, type_size(qtype)), dtype=np.uint8)
    for off in FP16_FIELDS[qtype]:
        blocks[:, off : off + 2] = random_fp16(rng, nb, wide).view(np.uint8).reshape(nb, 2)
    return torch.from_numpy(blocks.reshape(n, -1)).to(DEVICE)


def k_tail(qtype: QuantType) -> int:
    """A K whose units do not fill the GEMV's K step (3 super-blocks; 9 IQ4_NL blocks)."""
    return 288 if qtype == QuantType.IQ4_NL else 768


def rel_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.double() - ref).norm() / ref.norm().clamp_min(1e-300)).item()


def run(x, tensors, qtype, n, k, config=None) -> torch.Tensor:
    """The kernel into a NaN-poisoned output; checks every element was written."""
    out = torch.full((x.shape[0], n), float("nan"), dtype=x.dtype, device=x.device)
    if config is None:
        qk.matmul(x, tensors, qtype, n, k, out)
    else:
        qk.launch(x, tensors, qtype, n, k, out, config)
    assert not out.isnan().any(), f"{qtype.name}: output not fully written ({config})"
    return out


def config(path: str, qtype: QuantType, m: int, n: int, k: int) -> qk.KernelConfig:
    """The launch `matmul` would pick for this path; in the interpreter (CPU time per program)
    the GEMV takes 64 rows per program, one tile for the small N here, still masked."""
    choose = qk.gemv_config if path == "gemv" else qk.gemm_config
    cfg = choose(qtype, m, n, k, qk._num_sms(torch.device(DEVICE)))
    return cfg if CUDA or path == "gemm" else dataclasses.replace(cfg, block_n=64)


# --------------------------------------------------------------------------- packing


@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
def test_pack_is_lossless(qtype: QuantType, rng: np.random.Generator) -> None:
    for n, k in [(3, 256), (5, 1024), (2, 32 * 9 if qtype == QuantType.IQ4_NL else 512)]:
        data = random_weight(rng, qtype, n, k, wide=True)
        tensors = qk.pack(data, qtype, n, k)
        assert all(t.device == data.device and t.is_contiguous() for t in tensors.values())
        got = qk.dequantize_packed(tensors, qtype, n, k)
        ref = dequantize(data, qtype)
        assert got.shape == ref.shape == (n, k)
        same = got.view(torch.int32) == ref.view(torch.int32)
        if not same.all():
            i = tuple(int(v) for v in (~same).nonzero()[0])
            pytest.fail(f"{qtype.name} {n}x{k}: {int((~same).sum())} weights differ; first at {i}")


@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
def test_packed_size(qtype: QuantType, rng: np.random.Generator) -> None:
    # Same bytes as ggml, plus one byte per 6-bit scale (and per 6-bit min) it unpacks.
    n, k = 4, 512
    data = random_weight(rng, qtype, n, k)
    nbytes = sum(t.numel() * t.element_size() for t in qk.pack(data, qtype, n, k).values())
    extra_per_256 = {QuantType.Q3_K: 4, QuantType.Q4_K: 4, QuantType.Q5_K: 4, QuantType.IQ4_XS: 2}
    extra = extra_per_256.get(qtype, 0)
    table = 64 if qtype in (QuantType.IQ4_NL, QuantType.IQ4_XS) else 0
    expected = data.numel() + n * (k // 256) * extra + table
    assert nbytes == expected, f"{qtype.name}: {nbytes} bytes packed, expected {expected}"


def test_pack_rejects_bad_input(rng: np.random.Generator) -> None:
    q = QuantType.Q4_K
    data = random_weight(rng, q, 2, 256)
    with pytest.raises(ValueError, match="not a k-quant kernel type"):
        qk.pack(data, QuantType.Q4_0, 2, 256)
    with pytest.raises(ValueError, match="multiple of 256"):
        qk.pack(data, q, 2, 200)
    with pytest.raises(ValueError, match="uint8"):
        qk.pack(data[:, :100], q, 2, 256)
    with pytest.raises(ValueError, match="uint8"):
        qk.pack(data.to(torch.int16), q, 2, 256)


# --------------------------------------------------------------------------- kernels


@pytest.mark.parametrize("path", ["gemv", "gemm"])
@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
def test_matmul_matches_float64(qtype: QuantType, path: str, rng: np.random.Generator) -> None:
    # N never a multiple of the row tile; the last K leaves units of the K step masked.
    shapes = [(1, 40, 256), (3, 24, 512), (17, 40, k_tail(qtype))]
    dtypes = [F32, F16, BF16]
    if CUDA:  # every shape in every dtype
        cases = [(*shape, dtype) for shape in shapes for dtype in dtypes]
    else:  # the interpreter is slow: each shape once, dtypes rotated over shapes and types
        turn = TYPES.index(qtype)
        cases = [(*shape, dtypes[(i + turn) % 3]) for i, shape in enumerate(shapes)]
    for m, n, k, dtype in cases:
        data = random_weight(rng, qtype, n, k)
        tensors = qk.pack(data, qtype, n, k)
        x = torch.from_numpy(rng.standard_normal((m, k), dtype=np.float32)).to(DEVICE, dtype)
        cfg = config(path, qtype, m, n, k)
        out = run(x, tensors, qtype, n, k, cfg)
        ref = x.double() @ dequantize(data, qtype).double().T
        tol = TOL_GEMM_F32 if (path, dtype) == ("gemm", F32) else TOL[dtype]
        err = rel_error(out, ref)
        assert err < tol, f"{qtype.name} {path} {dtype} M={m} {n}x{k} {cfg}: error {err:.2e}"


@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
def test_matmul_dispatch(qtype: QuantType, rng: np.random.Generator) -> None:
    # matmul = GEMV up to GEMV_MAX_M rows, GEMM above, bit for bit (same tiles, same order).
    n, k = 24, 256
    tensors = qk.pack(random_weight(rng, qtype, n, k), qtype, n, k)
    sms = qk._num_sms(torch.device(DEVICE))
    for m, choose in [(qk.GEMV_MAX_M, qk.gemv_config), (qk.GEMV_MAX_M + 1, qk.gemm_config)]:
        x = torch.randn(m, k, device=DEVICE, dtype=F16)
        forced = run(x, tensors, qtype, n, k, choose(qtype, m, n, k, sms))
        assert torch.equal(run(x, tensors, qtype, n, k), forced), f"{qtype.name} M={m}"


@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
def test_gemv_weights_are_bit_exact(qtype: QuantType, rng: np.random.Generator) -> None:
    # One-hot float32 rows pick single columns: every product but one is an exact 0, so the
    # GEMV returns the dequantized weights it computed, which must be ggml's values (the sum
    # turns a -0.0 weight into +0.0, so values are compared, not bits).
    n, k = 40, 512
    data = random_weight(rng, qtype, n, k, wide=True)
    w = dequantize(data, qtype)
    cols = torch.from_numpy(rng.choice(k, 4, replace=False)).to(DEVICE)
    x = torch.zeros(4, k, device=DEVICE)
    x[torch.arange(4, device=DEVICE), cols] = 1.0
    out = run(x, qk.pack(data, qtype, n, k), qtype, n, k, config("gemv", qtype, 4, n, k))
    assert torch.equal(out, w[:, cols].T), f"{qtype.name}: columns {cols.tolist()} differ"


@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
def test_split_k(qtype: QuantType, rng: np.random.Generator) -> None:
    # K split over programs: float32 partials, summed in a fixed order (same bits each run).
    n, k = 24, k_tail(qtype)
    units = k // block_size(qtype)
    data = random_weight(rng, qtype, n, k)
    tensors = qk.pack(data, qtype, n, k)
    ref = None
    for cfg, m in [
        (qk.KernelConfig(False, 4, 32, 1, 3, 1), 3),  # 3 splits of units // 3 units
        (qk.KernelConfig(True, 16, 32, 1, 2, 4), 3),  # uneven: ceil(units/2), then the rest
    ]:
        x = torch.from_numpy(rng.standard_normal((m, k), dtype=np.float32)).to(DEVICE)
        ref = x.double() @ dequantize(data, qtype).double().T
        out = run(x, tensors, qtype, n, k, cfg)
        tol = TOL_GEMM_F32 if cfg.gemm else TOL[F32]
        assert rel_error(out, ref) < tol, f"{qtype.name} {cfg} ({units} units)"
        assert torch.equal(out, run(x, tensors, qtype, n, k, cfg)), "split-K is not repeatable"


def test_output_rows_may_be_strided(rng: np.random.Generator) -> None:
    # out may be a column slice of a wider buffer: only its (M, N) block is written.
    q, m, n, k = QuantType.Q4_K, 3, 24, 256
    data = random_weight(rng, q, n, k)
    tensors = qk.pack(data, q, n, k)
    x = torch.randn(m, k, device=DEVICE)
    ref = x.double() @ dequantize(data, q).double().T
    for path in ("gemv", "gemm"):
        buf = torch.full((m, n + 8), float("nan"), device=DEVICE)
        qk.launch(x, tensors, q, n, k, buf[:, 4 : 4 + n], config(path, q, m, n, k))
        assert buf[:, :4].isnan().all() and buf[:, 4 + n :].isnan().all(), path
        tol = TOL_GEMM_F32 if path == "gemm" else TOL[F32]
        assert rel_error(buf[:, 4 : 4 + n], ref) < tol, path


def test_empty_batch_is_a_no_op(rng: np.random.Generator) -> None:
    q = QuantType.Q6_K
    tensors = qk.pack(random_weight(rng, q, 8, 256), q, 8, 256)
    out = torch.empty(0, 8, device=DEVICE)
    qk.matmul(torch.empty(0, 256, device=DEVICE), tensors, q, 8, 256, out)


def test_launcher_rejects_bad_arguments(rng: np.random.Generator) -> None:
    q, n, k = QuantType.Q5_K, 8, 256
    tensors = qk.pack(random_weight(rng, q, n, k), q, n, k)
    x = torch.randn(2, k, device=DEVICE)
    out = torch.empty(2, n, device=DEVICE)

    def bad(match: str, **change) -> None:
        args = dict(x=x, tensors=tensors, qtype=q, n=n, k=k, out=out) | change
        with pytest.raises(ValueError, match=match):
            qk.matmul(**args)

    bad("float16, bfloat16 or float32", x=x.to(torch.float64))
    bad("float16, bfloat16 or float32", x=torch.randn(2, 512, device=DEVICE))
    bad("rows must be contiguous", x=torch.randn(k, 2, device=DEVICE).T)
    bad("out must be", out=torch.empty(2, n, device=DEVICE, dtype=F16))
    bad("out must be", out=torch.empty(3, n, device=DEVICE))
    bad("out rows must be contiguous", out=torch.empty(n, 2, device=DEVICE).T)
    bad("not a k-quant kernel type", qtype=QuantType.Q8_0)
    bad("field 'qh'", tensors={kk: v for kk, v in tensors.items() if kk != "qh"})
    bad("field 'sc'", tensors=tensors | {"sc": tensors["sc"][:, :4]})
    bad("field 'd'", tensors=tensors | {"d": tensors["d"].float()})
    bad("field 'qs'", n=16, out=torch.empty(2, 16, device=DEVICE))
    bad("multiple of 256", k=200)


def test_cpu_tensors_need_the_interpreter(rng: np.random.Generator, monkeypatch) -> None:
    import llamapy.kernels.triton as kt

    monkeypatch.setattr(kt, "INTERPRET", False)
    q = QuantType.Q4_K
    tensors = qk.pack(random_weight(rng, q, 8, 256).cpu(), q, 8, 256)
    with pytest.raises(ValueError, match="CUDA tensors"):
        qk.matmul(torch.randn(1, 256), tensors, q, 8, 256, torch.empty(1, 8))


def test_configs_are_valid_launches() -> None:
    # Real shapes on an H100 (132 SMs): powers of two, enough programs, whole K steps.
    for qtype in TYPES:
        for n, k in [(576, 1536), (2048, 2048), (512, 2048), (2048, 8192), (8192, 2048)]:
            for m in (1, 2, 4, 16, 256):
                choose = qk.gemv_config if m <= qk.GEMV_MAX_M else qk.gemm_config
                c = choose(qtype, m, n, k, 132)
                for v in (c.block_m, c.block_n, c.nsb):
                    assert v & (v - 1) == 0, (qtype.name, m, n, k, c)
                assert 1 <= c.num_warps <= 8 and 1 <= c.split <= k // block_size(qtype)
                assert c.gemm == (m > qk.GEMV_MAX_M)


@pytest.mark.parametrize("qtype", [QuantType.Q4_K, QuantType.Q6_K], ids=lambda t: t.name)
def test_measured_gemv_tiles(qtype: QuantType, rng: np.random.Generator) -> None:
    # H200 sweeps, one row of x (other batches keep the general rules): the 2048-row
    # matrices of the 1B shape read 8 super-blocks a step on two warps; Q6_K's vocabulary-
    # sized output 4 rows x 4 super-blocks on one warp; 4-7 super-blocks a row (SmolLM2's
    # down) one row on one warp, 4 a step; each against float64 (24 rows).
    cfg = qk.KernelConfig
    assert qk.gemv_config(qtype, 1, 2048, 8192, 132) == cfg(False, 1, 1, 8, 1, 2)
    assert qk.gemv_config(qtype, 1, 2048, 2048, 132).nsb == 8
    assert qk.gemv_config(qtype, 4, 2048, 8192, 132) != cfg(False, 4, 1, 8, 1, 2)  # measured at M=1
    assert qk.gemv_config(qtype, 1, 576, 1536, 132) == cfg(False, 1, 1, 4, 1, 1)
    if qtype == QuantType.Q4_K:  # the others keep one warp and 4 super-blocks
        assert qk.gemv_config(qtype, 1, 3072, 2048, 132) == cfg(False, 1, 1, 4, 1, 1)
    else:
        assert qk.gemv_config(qtype, 4, 576, 1536, 132) != cfg(False, 4, 1, 4, 1, 1)
        assert qk.gemv_config(qtype, 1, 128256, 2048, 132) == cfg(False, 1, 4, 4, 1, 1)
        assert qk.gemv_config(qtype, 2, 128256, 2048, 132) != cfg(False, 2, 4, 4, 1, 1)
    n, k = 24, 2048
    data = random_weight(rng, qtype, n, k)
    tensors = qk.pack(data, qtype, n, k)
    x = torch.from_numpy(rng.standard_normal((1, k), dtype=np.float32)).to(DEVICE)
    ref = x.double() @ dequantize(data, qtype).double().T
    for measured in (qk.gemv_config(qtype, 1, 2048, k, 132), cfg(False, 1, 4, 4, 1, 1)):
        err = rel_error(run(x, tensors, qtype, n, k, measured), ref)
        assert err < TOL[F32], f"{measured}: error {err:.2e}"
    k = 1536  # 6 super-blocks: the second step half past K
    data = random_weight(rng, qtype, n, k)
    tensors = qk.pack(data, qtype, n, k)
    x = torch.from_numpy(rng.standard_normal((1, k), dtype=np.float32)).to(DEVICE)
    ref = x.double() @ dequantize(data, qtype).double().T
    measured = qk.gemv_config(qtype, 1, 576, k, 132)
    err = rel_error(run(x, tensors, qtype, n, k, measured), ref)
    assert err < TOL[F32], f"{measured}: error {err:.2e}"


# --------------------------------------------------------------------------- model shapes

REAL_SHAPES = [(576, 576), (1536, 576), (576, 1536), (2048, 8192), (8192, 2048)]


@pytest.mark.skipif(not CUDA, reason="model shapes need a GPU")
@pytest.mark.parametrize("m", [1, 16, 256])
@pytest.mark.parametrize("shape", REAL_SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
def test_model_shapes_on_gpu(
    qtype: QuantType, shape: tuple[int, int], m: int, rng: np.random.Generator
) -> None:
    n, k = shape
    if k % block_size(qtype):
        pytest.skip(f"K={k} is not a whole number of {qtype.name} blocks")
    data = random_weight(rng, qtype, n, k)
    tensors = qk.pack(data, qtype, n, k)
    w = dequantize(data, qtype).double()
    dtype = {1: BF16, 16: F16, 256: BF16}[m]  # float32 x: the small shapes above
    x = torch.randn(m, k, device=DEVICE).to(dtype)
    out = run(x, tensors, qtype, n, k)
    err = rel_error(out, x.double() @ w.T)
    assert err < TOL[dtype], f"{qtype.name} M={m} {n}x{k} {dtype}: error {err:.2e}"


@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
def test_dequantize_rows_are_ggml_values(qtype: QuantType, rng: np.random.Generator) -> None:
    """The dequantize + 16-bit GEMM path's weights: a row range of float32 output equals
    ggml's dequantized values exactly (any fp16 scale, subnormals included)."""
    n, k = 40, k_tail(qtype)
    data = random_weight(rng, qtype, n, k, wide=True)
    tensors = qk.pack(data, qtype, n, k)
    first, rows = 5, 33
    out = torch.full((rows, k), float("nan"), device=DEVICE)
    qk.dequantize_rows(tensors, qtype, k, first, out)
    assert torch.equal(out, dequantize(data, qtype)[first : first + rows]), qtype.name
    half = torch.empty(rows, k, dtype=F16, device=DEVICE)
    small = random_weight(rng, qtype, n, k)  # moderate scales: fp16 cannot overflow
    qk.dequantize_rows(qk.pack(small, qtype, n, k), qtype, k, first, half)
    assert torch.equal(half, dequantize(small, qtype)[first : first + rows].to(F16))


@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
def test_dequant_path_matches_float64(
    qtype: QuantType, rng: np.random.Generator, monkeypatch
) -> None:
    """qmatmul's path for many rows (dequantize to float16 in row chunks, then a 16-bit GEMM
    with float32 sums): float32 x of very different row magnitudes, bias, chunked scratch."""
    from llamapy.kernels.triton import qmatmul as qm

    monkeypatch.setattr(qm, "DEQUANT_SCRATCH", 1)  # 32-row chunks: 40 = 32 + 8
    n, k = 40, k_tail(qtype)
    data = random_weight(rng, qtype, n, k)
    w = qm.pack_weight(data, qtype, (n, k))
    x = torch.from_numpy(rng.standard_normal((5, k), dtype=np.float32)).to(DEVICE)
    x[1] *= 1e5
    x[2] *= 1e-6
    bias = torch.from_numpy(rng.standard_normal(n, dtype=np.float32)).to(DEVICE)
    out = qm.qmatmul_with(x, w, bias, path="dequant")
    ref = x.double() @ dequantize(data, qtype).double().T + bias.double()
    for r in range(5):
        err = rel_error(out[r], ref[r])
        assert err < TOL[F16], f"{qtype.name} row {r}: error {err:.2e}"


@pytest.mark.parametrize("path", ["dequant", "gemm"])
def test_forced_paths_run_fused_forms_unfused(path: str, rng: np.random.Generator) -> None:
    """A decode-sized batch (M <= GEMV_MAX_M) forced onto another path still gets the fused
    forms: residual += x W^T (not out = x W^T), the norm and activation prologues."""
    from llamapy.kernels.triton import qmatmul as qm

    qtype, n, k = QuantType.Q4_K, 40, 256
    data = random_weight(rng, qtype, n, k)
    w = qm.pack_weight(data, qtype, (n, k))
    x = torch.from_numpy(rng.standard_normal((2, k), dtype=np.float32)).to(DEVICE)
    residual = torch.from_numpy(rng.standard_normal((2, n), dtype=np.float32)).to(DEVICE)
    plain = qm.qmatmul_with(x, w, path=path)
    got = qm.qmatmul_with(x, w, path=path, residual=residual.clone())
    assert torch.equal(got, residual + plain)
    g = torch.from_numpy(rng.uniform(0.5, 1.5, k).astype(np.float32)).to(DEVICE)
    normed = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * g
    got = qm.qmatmul_with(x, w, path=path, norm_weight=g, eps=1e-6)
    assert rel_error(got, qm.qmatmul_with(normed, w, path=path)) < TOL[F32] * 10
