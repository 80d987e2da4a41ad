"""CPU quantized matmul (llamapy.kernels.cpu) against a float64 reference, on fresh blocks.

Legacy blocks come from `quantize` of random floats; k-quant and IQ4 blocks are random bytes
with moderate fp16 super-block scales. Tolerances (relative Frobenius error vs float64):
  int4pack (every M): x, each weight (v - 8) * scale + zero (formed by the kernel from bf16
  scale and zero) and the output are each rounded to bf16: relative error <= 2^-8 each, about
  2^-8 / sqrt(3) rms for random operands; fp32 sums; x * 8 or x * 16 is exact. Three such
  roundings give ~4e-3 rms (measured 2-4e-3), so 2^-7 (7.8e-3) is the Frobenius bound;
  fp32 paths (dense, dequant-chunks): fp32 products and sums over K <= 512 terms -> 1e-5.
  From PREFILL_MIN_M rows of x on (prefill), int4pack weights are dequantized to bf16 for a
  bf16 GEMM, and F16/BF16 weights multiply in bf16: the same four bf16 roundings at most
  (x, the weight, its bf16 scale / zero where it has them, the output), the same bound.

Where the AVX512-VNNI kernels run, Q4_0 / Q4_1 / Q8_0 take them instead (tested in
test_cpu_vnni.py); this file switches them off to test the int4pack path those types take
elsewhere.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from llamapy.kernels.cpu import pack_weight_cpu, qmatmul_cpu, qmatmul_cpu_reference
from llamapy.kernels.cpu.int4pack import pack_nibbles
from llamapy.quant.dequant import dequantize
from llamapy.quant.quantize import quantize
from llamapy.quant.types import QuantType, block_size, row_nbytes, type_size


@pytest.fixture(autouse=True)
def _int4pack_path(monkeypatch) -> None:
    monkeypatch.setenv("LLAMAPY_CPU_VNNI", "0")


SHAPES = [(96, 512), (80, 256)]  # N % 64 = 32 and 16: full 64-row tiles plus each tail kind
FP32_TOL = 1e-5
LEGACY = {QuantType.Q4_0, QuantType.Q4_1, QuantType.Q5_0, QuantType.Q5_1, QuantType.Q8_0}
# Byte offsets of the fp16 (super-)block scales of the types tested with random bytes.
FP16_FIELDS = {
    QuantType.Q3_K: (108,),
    QuantType.Q4_K: (0, 2),
    QuantType.Q5_K: (0, 2),
    QuantType.Q6_K: (208,),
    QuantType.IQ4_NL: (0,),
    QuantType.IQ4_XS: (0,),
}
# (type, method, packed bytes / block bytes bound): int4pack stores 1 nibble per weight (4-bit
# types) or 2 (split types), plus bf16 scale and zero per group (32 or 64 nibbles).
CASES = [
    (QuantType.Q4_0, "int4pack", 20 / 18),
    (QuantType.Q4_1, "int4pack", 20 / 20),
    (QuantType.Q4_K, "int4pack", 160 / 144),
    (QuantType.Q8_0, "int4pack", 36 / 34),
    (QuantType.Q5_0, "int4pack", 36 / 22),
    (QuantType.Q5_1, "int4pack", 36 / 24),
    (QuantType.Q5_K, "int4pack", 288 / 176),
    (QuantType.Q6_K, "int4pack", 320 / 210),
    (QuantType.IQ4_NL, "int4pack", 36 / 18),
    (QuantType.IQ4_XS, "int4pack", 288 / 136),
    (QuantType.Q3_K, "dequant-chunks", 1.0),
    (QuantType.F16, "dense", 1.0),
    (QuantType.BF16, "dense", 1.0),
]


def random_weight(rng: np.random.Generator, qtype: QuantType, n: int, k: int) -> torch.Tensor:
    """Valid (N, row_bytes) uint8 blocks of a (N, K) weight."""
    if qtype in LEGACY or qtype in (QuantType.F16, QuantType.BF16):
        scale = 10.0 ** rng.uniform(-3, 0, (n, 1))  # rows of different magnitudes
        w = torch.from_numpy(rng.standard_normal((n, k)) * scale).to(torch.float32)
        return quantize(w, qtype).view(n, row_nbytes(qtype, k))
    blocks = rng.integers(0, 256, (n * k // block_size(qtype), type_size(qtype)), dtype=np.uint8)
    for off in FP16_FIELDS[qtype]:
        d = (rng.standard_normal(blocks.shape[0]) * 1e-2).astype(np.float16)
        blocks[:, off : off + 2] = d.view(np.uint8).reshape(-1, 2)
    return torch.from_numpy(blocks).view(n, row_nbytes(qtype, k))


def rel_error(y: torch.Tensor, ref: torch.Tensor) -> float:
    return ((y.double() - ref.double()).norm() / ref.double().norm()).item()


@pytest.mark.parametrize(
    ("qtype", "method", "max_ratio"), CASES, ids=[f"{c[0].name}-{c[1]}" for c in CASES]
)
@pytest.mark.parametrize(("n", "k"), SHAPES)
def test_qmatmul_matches_float64(rng, qtype, method, max_ratio, n, k) -> None:
    """M = 1, 5 (with a bias), 64 and PREFILL_MIN_M: int4pack weights (split types already
    at 64) and dense F16/BF16 take the prefill paths (bf16 GEMMs) there, bound as the int4
    kernel; fp32 paths to 1e-5."""
    from llamapy.kernels.cpu import qmatmul

    data = random_weight(rng, qtype, n, k)
    w = pack_weight_cpu(data, qtype, (n, k))
    assert (w.qtype, w.n, w.k, w.method) == (qtype, n, k, method)
    assert w.nbytes <= max_ratio * data.nbytes, f"packed {w.nbytes} B, blocks {data.nbytes} B"
    for m in (1, 5, 64, qmatmul.PREFILL_MIN_M):
        x = torch.from_numpy(rng.standard_normal((m, k))).to(torch.float32)
        bias = torch.from_numpy(rng.standard_normal(n)).to(torch.float32) if m == 5 else None
        y = qmatmul_cpu(x, w, bias)
        ref = qmatmul_cpu_reference(x, data, qtype, (n, k), bias)
        assert y.shape == (m, n) and y.dtype == torch.float32
        assert torch.isfinite(y).all(), f"M={m}: non-finite outputs"
        if w.method == "int4pack" or (w.method == "dense" and m >= qmatmul.PREFILL_MIN_M):
            assert_within_bf16_bound(y, x, data, qtype, bias, f"M={m}")
        else:
            err = rel_error(y, ref)
            assert err <= FP32_TOL, f"M={m}: relative error {err:.3g}"


def assert_within_bf16_bound(y, x, data, qtype, bias, what: str) -> None:
    """Componentwise: each output within c*u*(|x| @ |W|^T + |bias|) + u*|y| of the float64
    result, u = 2^-8 (bf16's unit roundoff). The int4 kernel rounds x, each weight it
    builds ((q - 8) * scale + zero: a product and a sum) and its scales to bf16: c = 4 covers
    those roundings of every term; fp32 sums add nothing at this size. A wrong nibble, scale
    or zero moves outputs by a sizeable fraction of |x| @ |W|^T, far past the bound.
    (A Frobenius bound of 2^-7 on the whole output was flaky: random-sign sums can cancel.)"""
    w = dequantize(data, qtype).double()
    exact = x.double() @ w.T
    scale = x.double().abs() @ w.abs().T
    if bias is not None:
        exact = exact + bias.double()
        scale = scale + bias.double().abs()
    u = 2.0**-8
    bound = 4 * u * scale + u * exact.abs()
    excess = ((y.double() - exact).abs() - bound).max().item()
    assert excess <= 0, f"{what}: an output is {excess:.3g} past its bf16 bound"


@pytest.mark.parametrize("n", [64, 80, 96, 112, 176, 16])
def test_pack_nibbles_matches_aten(n) -> None:
    """Our packer writes the bytes ATen's `_convert_weight_to_int4pack_for_cpu` writes."""
    v = torch.randint(0, 16, (n, 128), dtype=torch.int32)
    ref = torch.ops.aten._convert_weight_to_int4pack_for_cpu(v, 1)
    assert torch.equal(pack_nibbles(v.to(torch.uint8)), ref)


def test_rows_not_multiple_of_16_fall_back(rng) -> None:
    n, k = 40, 256
    data = random_weight(rng, QuantType.Q5_0, n, k)
    w = pack_weight_cpu(data, QuantType.Q5_0, (n, k))
    assert w.method == "dequant-chunks"
    x = torch.from_numpy(rng.standard_normal((3, k))).to(torch.float32)
    ref = qmatmul_cpu_reference(x, data, QuantType.Q5_0, (n, k))
    assert rel_error(qmatmul_cpu(x, w), ref) <= FP32_TOL


def test_reference_is_float64_dequantized_matmul(rng) -> None:
    """The oracle itself: x @ W.T with W dequantized by hand from Q4_0 blocks (d * (q - 8))."""
    n, k = SHAPES[0]
    data = random_weight(rng, QuantType.Q4_0, n, k)
    blocks = data.reshape(-1, 18)
    d = blocks[:, :2].contiguous().view(torch.float16).double()  # (N*K/32, 1)
    qs = blocks[:, 2:].long()
    q = torch.cat([qs & 15, qs >> 4], dim=1) - 8  # (N*K/32, 32)
    w = (d * q).view(n, k)
    x = torch.randn(3, k)
    ref = qmatmul_cpu_reference(x, data, QuantType.Q4_0, (n, k))
    torch.testing.assert_close(ref, (x.double() @ w.T).float(), rtol=1e-6, atol=1e-6)


def test_pack_rejects_wrong_block_shape() -> None:
    n, k = SHAPES[0]
    data = torch.zeros(n, row_nbytes(QuantType.Q4_0, k) - 18, dtype=torch.uint8)
    with pytest.raises(ValueError, match="uint8 blocks"):
        pack_weight_cpu(data, QuantType.Q4_0, (n, k))


# Byte offset of the fp16 block scale and, for Q6_K, of the int8 sub-block scales.
SCALE_OFFSET = {QuantType.Q4_0: 0, QuantType.Q5_0: 0, QuantType.Q6_K: 208}


@pytest.mark.parametrize("qtype", list(SCALE_OFFSET), ids=lambda q: q.name)
def test_int4pack_exact_with_bf16_operands(rng, qtype) -> None:
    """Types with zero 0. The kernel forms each weight (v - 8) * scale in bf16 and multiplies
    bf16 pairs; with x bf16-exact and scales of <= 5 significant bits (4 for Q6_K's d * sc),
    every weight is bf16-exact too, so the only rounding left is the bf16 output (<= 2^-8
    relative per element: 8 significant bits) plus fp32 sums: each element is checked."""
    n, k = SHAPES[0]
    data = random_weight(rng, qtype, n, k).clone()
    blocks = data.view(-1, type_size(qtype))
    off = SCALE_OFFSET[qtype]
    d = blocks[:, off : off + 2].contiguous().view(torch.int16)
    keep = 0xFE00 if qtype == QuantType.Q6_K else 0xFFC0  # 2 or 5 significant bits
    blocks[:, off : off + 2] = (d & torch.tensor(keep - 0x10000, dtype=torch.int16)).view(
        torch.uint8
    )
    if qtype == QuantType.Q6_K:
        blocks[:, 192:208] = (blocks[:, 192:208] & 0x07).view(torch.int8).sub(4).view(torch.uint8)
    w = pack_weight_cpu(data, qtype, (n, k))
    x = torch.from_numpy(rng.standard_normal((4, k))).to(torch.bfloat16).to(torch.float32)
    y = qmatmul_cpu(x, w)
    ref = qmatmul_cpu_reference(x, data, qtype, (n, k)).double()
    wf = qmatmul_cpu_reference(torch.eye(k), data, qtype, (n, k)).double()  # W.T
    scale = x.double().abs() @ wf.abs()
    assert (y.double() - ref).abs().le(2.0**-8 * ref.abs() + 1e-6 * scale).all()


@pytest.mark.parametrize("qtype", [QuantType.Q8_0, QuantType.Q4_1, QuantType.Q5_0])
def test_packing_in_row_chunks_gives_the_same_bytes(qtype, rng) -> None:
    """Large matrices are packed in row chunks (bounded temporaries); the result must be the
    one-shot packing's, including a last chunk shorter than the others."""
    from llamapy.kernels.cpu import int4pack
    from llamapy.kernels.cpu.qmatmul import _pack_int4_in_chunks

    n, k = 64 * 5 + 16, 256
    data = quantize(torch.from_numpy(rng.standard_normal((n, k), dtype=np.float32)), qtype)
    whole = int4pack.PACKERS[qtype](data, n, k)
    chunked = _pack_int4_in_chunks(data, qtype, n, k, chunk=128)
    assert torch.equal(whole.packed, chunked.packed) and torch.equal(whole.sz, chunked.sz)
    assert chunked.group == whole.group and chunked.block == whole.block


# --- Prefill: the packed weight dequantized to bf16 in row chunks + a bf16 GEMM -------------
INT4_TYPES = [c[0] for c in CASES if c[1] == "int4pack"]


@pytest.mark.parametrize("qtype", INT4_TYPES, ids=lambda q: q.name)
@pytest.mark.parametrize(("n", "k"), [*SHAPES, (208, 256)])  # + 3 tiles and a 16-row tail
def test_prefill_path_matches_float64(rng, qtype, n, k) -> None:
    """M >= prefill_min_m: within the same bf16 bound as the int4 kernel (x, scales/zeros,
    each weight and the output rounded to bf16), in one chunk and in 64-row chunks."""
    from llamapy.kernels.cpu import int4pack, qmatmul

    data = random_weight(rng, qtype, n, k)
    w = pack_weight_cpu(data, qtype, (n, k))
    m = qmatmul.prefill_min_m(w)
    x = torch.from_numpy(rng.standard_normal((m, k))).to(torch.float32)
    bias = torch.from_numpy(rng.standard_normal(n)).to(torch.float32)
    y = qmatmul_cpu(x, w, bias)
    assert y.shape == (m, n) and y.dtype == torch.float32 and torch.isfinite(y).all()
    assert_within_bf16_bound(y, x, data, qtype, bias, f"M={m}, default chunks")
    y64 = int4pack.dequant_mm(x, w.int4, n, chunk_rows=64)
    assert_within_bf16_bound(y64, x, data, qtype, None, f"M={m}, 64-row chunks")


def _int4_kernel_weights(w) -> torch.Tensor:
    """(K', N) weights as the int4 kernel forms them (fp32), rounded to bf16: its output for
    x = the identity (one product 1 * w, plus zeros, rounded once)."""
    p = w.int4
    eye = torch.eye(p.packed.shape[1] * 2, dtype=torch.bfloat16)
    return torch.ops.aten._weight_int4pack_mm_for_cpu(eye, p.packed, p.group, p.sz)


def _dequant_all(w) -> torch.Tensor:
    from llamapy.kernels.cpu import int4pack

    full = w.n - w.n % int4pack.TILE_N
    parts = [
        int4pack.dequantize_rows_bf16(w.int4, s, min(s + 128, full)) for s in range(0, full, 128)
    ]
    if full < w.n:
        parts.append(int4pack.dequantize_rows_bf16(w.int4, full, w.n))
    return torch.cat(parts, dim=1)  # (K, N) bf16


@pytest.mark.parametrize("qtype", INT4_TYPES, ids=lambda q: q.name)
def test_dequantized_weights_are_the_int4_kernels(rng, qtype) -> None:
    """4-bit types: bit for bit the kernel's (fp32) weights rounded to bf16. Split types: the
    two planes combined in fp32 and rounded once, so within bf16 rounding of the kernel's
    planes lo' + c hi' (each of those rounded to bf16 here too)."""
    n, k = 208, 256
    data = random_weight(rng, qtype, n, k)
    w = pack_weight_cpu(data, qtype, (n, k))
    ours = _dequant_all(w)  # (K, N)
    kernel = _int4_kernel_weights(w)  # (K', N)
    if not w.int4.hi_mult:
        assert torch.equal(ours, kernel)
        return
    b, c = w.int4.block, w.int4.hi_mult
    planes = kernel.double().view(k // b, 2, b, n)
    lo, hi = planes[:, 0].reshape(k, n), planes[:, 1].reshape(k, n)
    combined = lo + c * hi
    u = 2.0**-8
    bound = u * (lo.abs() + c * hi.abs() + ours.double().abs())
    assert ((ours.double() - combined).abs() <= bound).all()


def test_prefill_threshold_picks_the_path(rng, monkeypatch) -> None:
    """Below prefill_min_m rows the int4 kernel runs, from it on the dequant path."""
    from llamapy.kernels.cpu import int4pack, qmatmul

    calls = []
    monkeypatch.setattr(int4pack, "int4pack_mm", lambda x, p: calls.append("int4") or x)
    monkeypatch.setattr(int4pack, "dequant_mm", lambda x, p, n, r: calls.append("deq") or x)
    for qtype in (QuantType.Q4_0, QuantType.Q5_0):
        n, k = 64, 64
        w = pack_weight_cpu(random_weight(rng, qtype, n, k), qtype, (n, k))
        m = qmatmul.prefill_min_m(w)
        calls.clear()
        for rows in (1, m - 1, m, 512):
            qmatmul_cpu(torch.zeros(rows, k), w)
        assert calls == ["int4", "int4", "deq", "deq"], qtype.name
    assert qmatmul.PREFILL_MIN_M_SPLIT <= qmatmul.PREFILL_MIN_M


def test_dequant_scratch_is_bounded(rng, monkeypatch) -> None:
    """The bf16 path never expands more than one chunk of rows: every dequantized block of
    rows fits `dequant_chunk_rows(K)` (a multiple of 64, about DEQUANT_CHUNK_WEIGHTS
    weights), and the scratch of a call is a few bytes per weight of one chunk."""
    from llamapy.kernels.cpu import int4pack, qmatmul

    monkeypatch.setattr(qmatmul, "DEQUANT_CHUNK_WEIGHTS", 64 * 512)
    n, k = 64 * 9 + 48, 512
    for qtype in (QuantType.Q4_0, QuantType.Q8_0):
        data = random_weight(rng, qtype, n, k)
        w = pack_weight_cpu(data, qtype, (n, k))
        seen = []
        real = int4pack.dequantize_rows_bf16

        def spy(p, start, stop, scratch=None, real=real, seen=seen):
            out = real(p, start, stop, scratch)
            seen.append((stop - start, scratch.nbytes, out.shape))
            return out

        monkeypatch.setattr(int4pack, "dequantize_rows_bf16", spy)
        x = torch.from_numpy(rng.standard_normal((qmatmul.PREFILL_MIN_M, k))).float()
        y = qmatmul_cpu(x, w)
        monkeypatch.setattr(int4pack, "dequantize_rows_bf16", real)
        assert_within_bf16_bound(y, x, data, qtype, None, qtype.name)
        chunk = qmatmul.dequant_chunk_rows(k)
        assert chunk == 64
        assert sum(rows for rows, _, _ in seen) == n and len(seen) == 10  # 9 tiles + the tail
        assert all(rows <= chunk and shape == (k, rows) for rows, _, shape in seen)
        k2 = w.int4.packed.shape[1] * 2
        bound = chunk * (k2 + k + 4 * k + 2 * k)  # nibbles, split quants, fp32, bf16
        assert all(nbytes <= bound for _, nbytes, _ in seen)
    for k in (576, 640, 2048, 8192):
        assert qmatmul.dequant_chunk_rows(k) % 64 == 0
        assert qmatmul.dequant_chunk_rows(k) * k <= max(qmatmul.DEQUANT_CHUNK_WEIGHTS, 64 * k)


def test_dequant_mm_rejects_bad_chunks(rng) -> None:
    from llamapy.kernels.cpu import int4pack

    n, k = SHAPES[0]
    w = pack_weight_cpu(random_weight(rng, QuantType.Q4_0, n, k), QuantType.Q4_0, (n, k))
    with pytest.raises(ValueError, match="multiple of 64"):
        int4pack.dequant_mm(torch.zeros(4, k), w.int4, n, chunk_rows=96)
    with pytest.raises(ValueError, match="do not fit"):
        scratch = int4pack.DequantScratch(w.int4, k, 32)
        int4pack.dequantize_rows_bf16(w.int4, 0, 64, scratch)
