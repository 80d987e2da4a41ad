"""The decode GEMVs' fused forms (`qmatmul(..., norm_weight=, eps=)`, `act=`, `residual=`)
against the float64 reference of the unfused sequence (`qmatmul_reference` with the same
keywords: norm / activation references, product, residual add), on fresh random blocks and
inputs each run (the `rng` fixture prints the seed).

Tolerances: the GEMV computes the prologue in float32 from x's exact values and sums in
float32, so the error is the one rounding of the result to x's dtype (u, relative to the
result) plus float32 arithmetic (ACC, relative to the product's size, which a residual can
dwarf). The fallback for GEMM-sized batches runs the norm / activation kernel first, whose
output is rounded to x's dtype (u more), then the GEMM (its own operand roundings).

Without a GPU the kernels run in Triton's interpreter at small shapes (K not a multiple of
the K step, N not of the row tile); with one, at the model shapes as well.
"""

from __future__ import annotations

import dataclasses
import logging

import numpy as np
import pytest
import torch

import llamapy.kernels.triton as kt
from llamapy.kernels.triton import qmatmul as qm
from llamapy.quant.types import QuantType

pytestmark = [
    pytest.mark.skipif(not kt.HAS_TRITON, reason="triton is not installed"),
    # the interpreter's sigmoid: exp(-g) overflows to inf for very negative g (gives 0, right)
    pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning"),
]

if kt.HAS_TRITON:
    from llamapy.kernels.triton import qmatmul_kquants as qk

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
T = QuantType
F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16
U = {F32: 2.0**-24, F16: 2.0**-11, BF16: 2.0**-8}  # unit roundoff
ACC = 1e-5  # float32 prologue and accumulation, relative to the product
LEGACY = [T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q8_0, T.F16, T.BF16, T.F32]
KQUANTS = [T.Q2_K, T.Q3_K, T.Q4_K, T.Q5_K, T.Q6_K, T.IQ4_NL, T.IQ4_XS]
FLOAT_W = {T.F16: F16, T.BF16: BF16, T.F32: F32}
# fp16 scale fields per block (byte offsets): random bytes elsewhere are valid quants
FP16_AT = {
    T.Q4_0: (0,), T.Q4_1: (0, 2), T.Q5_0: (0,), T.Q5_1: (0, 2), T.Q8_0: (0,),
    T.Q2_K: (80, 82), T.Q3_K: (108,), T.Q4_K: (0, 2), T.Q5_K: (0, 2), T.Q6_K: (208,),
    T.IQ4_NL: (0,), T.IQ4_XS: (0,),
}  # fmt: skip

# (M, fused form, x dtype): decode rows; the forms the decode step uses (norm: QKV and
# gate_up; act + residual: down; residual: o_proj) and the others the API allows.
FORMS = [
    (1, "norm", F32),
    (3, "silu+res", BF16),
    (2, "gelu_tanh", F16),
    (4, "norm+res", F32),
    (1, "res", F16),
]


# --------------------------------------------------------------------------- data


def k_small(qtype: QuantType) -> int:
    """K with a partial K step: 9 legacy blocks, 3 super-blocks, 9 IQ4_NL blocks."""
    return 768 if qtype in KQUANTS and qtype != T.IQ4_NL else 288


def random_weight(rng: np.random.Generator, qtype: QuantType, n: int, k: int) -> torch.Tensor:
    """(n, row_bytes) uint8: random quants, fp16 scales of a trained model's size."""
    if qtype in FLOAT_W:
        w = torch.from_numpy(rng.standard_normal((n, k), dtype=np.float32) * 0.1)
        return w.to(FLOAT_W[qtype]).view(torch.uint8).reshape(n, -1).to(DEVICE)
    from llamapy.quant.types import block_size, type_size

    nb = n * k // block_size(qtype)
    blocks = rng.integers(0, 256, (nb, type_size(qtype)), dtype=np.uint8)
    for off in FP16_AT[qtype]:
        d = (rng.standard_normal(nb) * 10.0 ** rng.uniform(-3, -1.5, nb)).astype(np.float16)
        blocks[:, off : off + 2] = d.view(np.uint8).reshape(nb, 2)
    return torch.from_numpy(blocks.reshape(n, -1)).to(DEVICE)


def randn(rng: np.random.Generator, *shape: int, dtype=F32, scale: float = 1.0) -> torch.Tensor:
    x = rng.standard_normal(shape, dtype=np.float32) * scale
    return torch.from_numpy(x).to(DEVICE, dtype)


@dataclasses.dataclass
class Case:
    """One fused call's inputs; `kwargs()` are qmatmul's keywords (a fresh residual copy)."""

    x: torch.Tensor
    norm_weight: torch.Tensor | None
    eps: float | None
    act: str | None
    residual: torch.Tensor | None

    def kwargs(self) -> dict:
        res = None if self.residual is None else self.residual.clone()
        return dict(norm_weight=self.norm_weight, eps=self.eps, act=self.act, residual=res)


def make_case(rng, form: str, m: int, n: int, k: int, dtype: torch.dtype) -> Case:
    act = next((a for a in qm.ACTIVATIONS if form.startswith(a)), None)
    norm = form.startswith("norm")
    # an RMS far from 1 (x ~ 3): the 1/rms scale is not a no-op; "norm+res": x ~ 0.01, its
    # mean square (1e-4) near eps, which must then count
    scale = 0.01 if form == "norm+res" else 3.0
    x = randn(rng, m, 2 * k if act else k, dtype=dtype, scale=scale)
    g = randn(rng, k, scale=0.5) + 1.0 if norm else None
    eps = float(10.0 ** rng.uniform(-6, -4)) if norm else None
    res = randn(rng, m, n, dtype=dtype) if form.endswith("res") else None
    return Case(x, g, eps, act, res)


def check(y, case: Case, data, qtype, n, k, tol_u: float, what: str) -> None:
    """y against the float64 reference: |y - exact| <= tol_u |exact| + ACC |product|."""
    m = case.x.shape[0]
    assert y.shape == (m, n) and y.dtype == case.x.dtype, what
    assert not y.isnan().any(), f"{what}: NaN in the output"
    kw = dict(norm_weight=case.norm_weight, eps=case.eps, act=case.act)
    x64 = case.x.double()
    prod = qm.qmatmul_reference(x64, data, qtype, (n, k), **kw)
    exact = prod if case.residual is None else prod + case.residual.double()
    err = (y.double() - exact).norm().item()
    bound = tol_u * exact.norm().item() + ACC * prod.norm().item()
    assert err <= bound, f"{what}: error {err:.3g} > {bound:.3g} ({err / exact.norm():.3g} rel)"


@pytest.fixture(autouse=True)
def float32_gemv(monkeypatch: pytest.MonkeyPatch) -> None:
    """These tests hold the GEMV to float32 activations (their tolerances are float32's)
    whatever LLAMAPY_GEMV_INT8_X says, and keep large one-row Q4_0 / Q4_1 products off the int8
    codes of x (`xcodes`); those have test_gemv_q8x.py and test_xcodes.py."""
    monkeypatch.setattr(qm, "GEMV_INT8_X", False)
    monkeypatch.setenv("LLAMAPY_GPU_X_CODES", "0")


def fused_call(w, case: Case, **extra) -> torch.Tensor:
    kw = case.kwargs()
    y = qm.qmatmul_with(case.x, w, **kw, **extra)
    if kw["residual"] is not None:
        assert y is kw["residual"], "the residual is updated in place and returned"
    return y


# --------------------------------------------------------------------------- GEMV


@pytest.mark.parametrize("qtype", LEGACY + KQUANTS, ids=lambda t: t.name)
def test_fused_gemv_matches_reference(qtype, rng, poisoned):
    """Every GEMV type, every fused form (rotated over types in the interpreter)."""
    n, k = 40, k_small(qtype)
    data = random_weight(rng, qtype, n, k)
    w = qm.pack_weight(data, qtype, (n, k))
    turn = (LEGACY + KQUANTS).index(qtype)
    forms = FORMS if CUDA else [FORMS[(turn + i) % len(FORMS)] for i in range(2)]
    for m, form, dtype in forms:
        case = make_case(rng, form, m, n, k, dtype)
        bias = randn(rng, n, dtype=dtype) if form == "norm" and qtype in LEGACY else None
        kw = case.kwargs()
        y = qm.qmatmul(case.x, w, bias, **kw)
        if bias is not None:  # the bias is added after the (normed) product
            case.residual = bias.expand(m, n)
        check(y, case, data, qtype, n, k, U[dtype], f"{qtype.name} {form} M={m} {dtype}")


@pytest.mark.parametrize("chunk_max", [256, 4096])
def test_norm_prologue_in_one_chunk_or_several(chunk_max, rng, poisoned, monkeypatch):
    """The RMSNorm's sum of squares over the row in one chunk (`qm.RMS_CHUNK_MAX` 4096: the
    default) or in several with a partial last one (256, the chunk before): the same
    reference, at one row and at four."""
    monkeypatch.setattr(qm, "RMS_CHUNK_MAX", chunk_max)
    n, k = 24, 1056  # 33 blocks: 256-wide chunks leave a partial fifth
    assert qm.rms_chunk(k, 1) == (2048 if chunk_max == 4096 else 256)
    data = random_weight(rng, T.Q4_0, n, k)
    w = qm.pack_weight(data, T.Q4_0, (n, k))
    for m in (1, 4):
        case = make_case(rng, "norm", m, n, k, F32)
        y = qm.qmatmul(case.x, w, **case.kwargs())
        check(y, case, data, T.Q4_0, n, k, U[F32], f"norm M={m} chunks of {chunk_max}")


def test_rms_chunk_setting_parses_or_names_the_variable() -> None:
    assert qm._rms_chunk_max(None) == 4096 and qm._rms_chunk_max("256") == 256
    for bad in ("300", "x", "0", "-256"):
        with pytest.raises(ValueError, match="LLAMAPY_GPU_RMS_CHUNK"):
            qm._rms_chunk_max(bad)


@pytest.mark.parametrize("qtype", [T.Q4_1, T.Q8_0, T.Q5_K], ids=lambda t: t.name)
def test_split_k_adds_the_residual_once(qtype, rng, poisoned):
    """K split over programs: the 1/rms scale on every partial, the residual (and bias)
    added once by the reduction; the result is the same bits each run."""
    n, k, m = 24, k_small(qtype), 3
    data = random_weight(rng, qtype, n, k)
    w = qm.pack_weight(data, qtype, (n, k))
    for form in ("norm+res", "silu+res"):
        case = make_case(rng, form, m, n, k, F32)
        if qtype in LEGACY:
            y = fused_call(w, case, path="gemv", split_k=3)
            again = fused_call(w, case, path="gemv", split_k=3)
        else:
            cfg = qk.KernelConfig(False, 4, 32, 1, 3, 1)  # 3 splits of one super-block
            kw = case.kwargs()
            y, again = kw.pop("residual"), case.residual.clone()
            for out in (y, again):
                qk.launch(
                    case.x, w.tensors, qtype, n, k, out, cfg, accumulate=True,
                    norm_weight=kw["norm_weight"], eps=kw["eps"] or 0.0, act=kw["act"],
                )  # fmt: skip
        check(y, case, data, qtype, n, k, U[F32], f"{qtype.name} split {form}")
        assert torch.equal(y, again), "split-K fused GEMV is not deterministic"


def test_q4_1_byte_twin(rng, poisoned):
    """Q4_1 packed with its quants also one a byte (`pack_weight(byte_twin=True)`): the
    bytes are the nibbles in weight order, the decode GEMV reads them (every fused form, a K
    split, several row groups) within the float32 GEMV's bounds, and the other paths (a
    GEMM-sized batch) still read the nibbles."""
    n, k = 40, k_small(T.Q4_1)
    data = random_weight(rng, T.Q4_1, n, k)
    w = qm.pack_weight(data, T.Q4_1, (n, k), byte_twin=True)
    plain = qm.pack_weight(data, T.Q4_1, (n, k))
    assert set(w.tensors) == set(plain.tensors) | {"q8"}
    blocks = data.view(n, k // 32, 20)[:, :, 4:].long()  # qs after d, m (fp16 each)
    want = torch.cat([blocks & 0xF, blocks >> 4], dim=2).reshape(n, k)
    assert torch.equal(w.tensors["q8"].long(), want)
    for m, form, dtype in FORMS:
        case = make_case(rng, form, m, n, k, dtype)
        y = fused_call(w, case)
        check(y, case, data, T.Q4_1, n, k, U[dtype], f"Q4_1 bytes {form} M={m} {dtype}")
    case = make_case(rng, "silu+res", 3, n, k, F32)
    y = fused_call(w, case, path="gemv", split_k=3)
    check(y, case, data, T.Q4_1, n, k, U[F32], "Q4_1 bytes split")
    assert torch.equal(y, fused_call(w, case, path="gemv", split_k=3)), "not deterministic"
    case = make_case(rng, "res", 17, n, k, F32)  # forced GEMV over row groups
    check(fused_call(w, case, path="gemv"), case, data, T.Q4_1, n, k, U[F32], "Q4_1 bytes M=17")
    x = randn(rng, 17, k)
    assert torch.equal(qm.qmatmul_with(x, w, path="gemm"), qm.qmatmul_with(x, plain, path="gemm"))
    # the GEMV reads the bytes, not the nibbles: zeroed bytes change its result
    zeroed = dataclasses.replace(w, tensors={**w.tensors, "q8": torch.zeros_like(w.tensors["q8"])})
    x = randn(rng, 1, k)
    assert not torch.equal(
        qm.qmatmul_with(x, zeroed, path="gemv"), qm.qmatmul_with(x, w, path="gemv")
    )


@pytest.mark.parametrize("qtype", [T.Q4_K, T.Q5_K], ids=lambda t: t.name)
def test_kquant_legacy_twin(qtype, rng, poisoned):
    """A Q4_K / Q5_K weight held as the Q4_1 / Q5_1 blocks of its sub-blocks
    (`pack_weight(legacy_twin=True)`, float32 scales and offsets): the legacy dequantizer
    gives gguf-py's values of the K-quant blocks exactly; the decode GEMV (fused forms, a K
    split, the byte twin), the GEMM, the dequantize path and (Q4_1) the fp16-tile GEMM are
    within their bounds of the K-quant blocks' float64 product."""
    import gguf

    n, k = 40, k_small(qtype)
    data = random_weight(rng, qtype, n, k)
    w = qm.pack_weight(data, qtype, (n, k), legacy_twin=True)
    legacy = qm.LEGACY_TWINS[qtype]
    assert w.qtype == legacy and w.tensors["d"].dtype == w.tensors["m"].dtype == F32
    assert w.nbytes == n * k * (6 if qtype == T.Q4_K else 7) // 8
    got = torch.empty(n, k, dtype=F32, device=DEVICE)  # NaN-poisoned: every element written
    grid = (-(-n // 32), -(-k // 32 // 8))
    qm._dequant_kernel[grid](*qm._operands(w), got, n, k, 0, QT=qm._CODES[legacy], BLOCK_N=32,
                             BLOCK_B=8, INTERP=qm.INTERPRET, num_warps=4)  # fmt: skip
    want = gguf.quants.dequantize(data.cpu().numpy(), gguf.GGMLQuantizationType[qtype.name])
    assert np.array_equal(got.cpu().numpy(), want.reshape(n, k)), f"{qtype.name} twin values"
    turn = [T.Q4_K, T.Q5_K].index(qtype)
    forms = FORMS if CUDA else [FORMS[(turn + i) % len(FORMS)] for i in range(3)]
    for m, form, dtype in forms:
        case = make_case(rng, form, m, n, k, dtype)
        y = fused_call(w, case)
        check(y, case, data, qtype, n, k, U[dtype], f"{qtype.name} twin {form} M={m} {dtype}")
    case = make_case(rng, "silu+res", 3, n, k, F32)
    y = fused_call(w, case, path="gemv", split_k=3)
    check(y, case, data, qtype, n, k, U[F32], f"{qtype.name} twin split")
    if legacy in qm.BYTE_TWIN_TYPES:
        b = qm.pack_weight(data, qtype, (n, k), byte_twin=True, legacy_twin=True)
        assert "q8" in b.tensors
        case = make_case(rng, "norm", 1, n, k, F32)
        check(fused_call(b, case), case, data, qtype, n, k, U[F32], f"{qtype.name} twin bytes")
    case = Case(randn(rng, 17, k), None, None, None, None)
    # bounds of the batch paths: TF32 operands on CUDA (10 mantissa bits); x and W in fp16
    paths = {"gemm": 4 * 2.0**-10, "dequant": 2 * 2.0**-11}
    if legacy in (T.Q4_1,):
        paths["f16"] = 2 * 2.0**-11
    for path, tol in paths.items():
        y = qm.qmatmul_with(case.x, w, path=path)
        check(y, case, data, qtype, n, k, tol + U[F32], f"{qtype.name} twin {path}")


def test_gpu_kquant_twins_switch(caplog):
    from llamapy.models import llama

    assert llama.gpu_kquant_twins("0") is False and llama.gpu_kquant_twins("1") is True
    assert llama.gpu_kquant_twins(None) is llama.gpu_kquant_twins("") is llama.KQUANT_TWINS
    with caplog.at_level(logging.WARNING, logger="llamapy.models.llama"):
        assert llama.gpu_kquant_twins("yes") is llama.KQUANT_TWINS
    assert "LLAMAPY_GPU_KQUANT_TWINS='yes' is not 0 or 1: ignored" in caplog.text
    assert set(qm.LEGACY_TWINS) == {T.Q4_K, T.Q5_K}
    # a K-quant without the flag, and other types with it, pack as before
    plain = qm.pack_weight(torch.zeros(2, 144, dtype=torch.uint8), T.Q4_K, (2, 256))
    assert plain.qtype == T.Q4_K
    q6 = qm.pack_weight(torch.zeros(2, 210, dtype=torch.uint8), T.Q6_K, (2, 256), legacy_twin=True)
    assert q6.qtype == T.Q6_K


@pytest.mark.parametrize("qtype", [T.Q4_K, T.Q5_K])
def test_legacy_twin_bytes(qtype, rng):
    """`legacy_twin_nbytes` (what the GPU's twin policy counts) is what the twin's packed
    tensors take; `QLinear.legacy_twin_extra_nbytes` is that less the blocks' bytes, for a
    fused layer too, and 0 for a K-quant without a twin."""
    from llamapy.layers.linear import QLinear
    from llamapy.quant.qtensor import QTensor

    n, k = 6, 512
    data = random_weight(rng, qtype, n, k)
    twin = qm.pack_weight(data, qtype, (n, k), legacy_twin=True)
    assert sum(t.nbytes for t in twin.tensors.values()) == qm.legacy_twin_nbytes(qtype, n, k)
    per_weight = {T.Q4_K: 0.75 - 144 / 256, T.Q5_K: 0.875 - 176 / 256}[qtype]
    halves = [QTensor(data[:3], qtype, (3, k)), QTensor(data[3:], qtype, (3, k))]
    fused = QLinear.fused(halves, [None, None])
    assert (
        fused.legacy_twin_extra_nbytes()
        == QLinear(QTensor(data, qtype, (n, k))).legacy_twin_extra_nbytes()
    )
    assert fused.legacy_twin_extra_nbytes() == n * k * per_weight
    q6 = random_weight(rng, T.Q6_K, n, k)
    assert QLinear(QTensor(q6, T.Q6_K, (n, k))).legacy_twin_extra_nbytes() == 0


def test_row_groups_and_strided_rows(rng, poisoned):
    """A forced GEMV over several row groups (M=17, rows beyond the group masked), x rows
    inside a wider buffer (the norm's statistic reads only the row's K elements)."""
    qtype, n, k, m = T.Q4_0, 40, 288, 17
    data = random_weight(rng, qtype, n, k)
    w = qm.pack_weight(data, qtype, (n, k))
    wide = randn(rng, m, k + 64, scale=3.0)
    wide[:, :32] = wide[:, 32 + k :] = 1e4  # outside the rows: would show in the RMS
    case = make_case(rng, "norm+res", m, n, k, F32)
    case.x = wide[:, 32 : 32 + k]
    y = fused_call(w, case, path="gemv")
    check(y, case, data, qtype, n, k, U[F32], "Q4_0 M=17 strided")


def test_kquant_fused_modes_need_a_gemv(rng):
    q, n, k = T.Q4_K, 8, 256
    tensors = qk.pack(random_weight(rng, q, n, k), q, n, k)
    x, out = randn(rng, 8, k), torch.empty(8, n, device=DEVICE)
    with pytest.raises(ValueError, match="GEMV"):
        qk.matmul(x, tensors, q, n, k, out, accumulate=True)
    cfg = qk.gemm_config(q, 8, n, k, 1)
    with pytest.raises(ValueError, match="GEMV"):
        qk.launch(x, tensors, q, n, k, out, cfg, norm_weight=torch.ones(k, device=DEVICE))
    with pytest.raises(ValueError, match="act must be"):
        qk.launch(x[:1], tensors, q, n, k, out[:1], cfg, act="relu")
    with pytest.raises(ValueError, match=r"shape \(M, 512\)"):
        qk.matmul(x[:1], tensors, q, n, k, out[:1], act="silu")


# --------------------------------------------------------------------------- key splits


def random_splits(rng, m: int, heads: int, splits: int, d: int, dtype=F32):
    """A decode attention's unmerged output (`DecodeSplits`): random partial outputs and
    log-sum-exps spread over ~2^6, some splits empty (lse -inf, output 0, as the kernel
    writes them) and one head with every split empty (merged: zeros)."""
    from llamapy.kernels.triton.decode_splits import DecodeSplits

    part_o = randn(rng, m, heads, splits, d)
    lse = randn(rng, m, heads, splits, scale=6.0)
    empty = torch.from_numpy(rng.random((m, heads, splits)) < 0.3).to(DEVICE)
    empty[0, heads - 1] = True
    lse[empty] = float("-inf")
    part_o[empty] = 0.0
    out = torch.full((m, heads, d), float("nan"), dtype=dtype, device=DEVICE)
    return DecodeSplits(part_o, lse, out)


def merged64(splits) -> torch.Tensor:
    """The merge in float64, (M, heads * d)."""
    lse = splits.part_lse.double()
    top = lse.amax(-1, keepdim=True)
    w = torch.exp2(lse - top.nan_to_num(0.0, neginf=0.0)).nan_to_num(0.0)
    total = w.sum(-1, keepdim=True)
    x = (w[..., None] * splits.part_o.double()).sum(-2) / total.clamp_min(1e-300)
    return x.reshape(splits.shape)


@pytest.fixture
def merge_anywhere(monkeypatch: pytest.MonkeyPatch) -> None:
    """The GEMV merges key splits at the interpreter's small K and for every GEMV row count
    too (`qm.MERGE_MIN_K`, `qm.MERGE_MAX_ROWS`: the engine's bounds are one row of the 1B's
    o, where it was measured)."""
    monkeypatch.setattr(qm, "MERGE_MIN_K", 0)
    monkeypatch.setattr(qm, "MERGE_MAX_ROWS", qm.GEMV_MAX_M)


# (M, splits, heads, head dim, out dtype): the 1B's o over 2-8 splits at small shapes (heads
# of 32 and 64: one and two 32-blocks, a partial K step of the 8-block tiles)
SPLIT_CASES = [(1, 2, 9, 32, F32), (3, 8, 3, 64, F16), (1, 5, 4, 64, F32), (4, 3, 5, 32, BF16)]
if CUDA:  # the 1B's o (its Q8_0 tile: `qm.MERGE_MIN_TILE`)
    SPLIT_CASES += [(1, 4, 32, 64, F32), (1, 8, 32, 64, F32)]


@pytest.mark.parametrize("qtype", LEGACY + [T.Q4_K], ids=lambda t: t.name)
@pytest.mark.usefixtures("merge_anywhere")
def test_gemv_merges_decode_splits(qtype, rng, poisoned):
    """x given as a decode attention's key splits: the GEMV merges them as it loads x (no
    merge kernel: `out` stays unwritten) and adds into the residual; float64 reference of
    the merge and the product. A Q4_K weight held as its Q4_1 twin takes the same GEMV."""
    turn = (LEGACY + [T.Q4_K]).index(qtype)
    cases = SPLIT_CASES if CUDA else [SPLIT_CASES[turn % len(SPLIT_CASES)]]
    if qtype == T.Q4_K:  # K of whole 256-weight super-blocks
        cases = [(1, 4, 4, 64, F32), (3, 8, 8, 32, F16)][: 2 if CUDA else 1]
    for m, s, heads, d, dtype in cases:
        n, k = 40, heads * d
        data = random_weight(rng, qtype, n, k)
        w = qm.pack_weight(data, qtype, (n, k), legacy_twin=qtype == T.Q4_K)
        splits = random_splits(rng, m, heads, s, d, dtype)
        x64 = merged64(splits)
        bias = randn(rng, n, dtype=dtype) if turn % 2 else None
        res = randn(rng, m, n, dtype=dtype)
        prod = qm.qmatmul_reference(x64, data, qtype, (n, k))
        if bias is not None:
            prod += bias.double()
        want = prod + res.double()
        y = qm.qmatmul(splits, w, bias, residual=res.clone())
        assert splits.out.isnan().all(), "the merge kernel did not run"
        err = (y.double() - want).norm().item()
        bound = U[dtype] * want.norm().item() + ACC * prod.norm().item()
        what = f"{qtype.name} M={m} S={s} {heads}x{d} {dtype}"
        assert err <= bound, f"{what}: error {err:.3g} > {bound:.3g}"
        # the merge kernel, then the GEMV: the same sums
        plain = qm.qmatmul(splits.merged().reshape(splits.shape), w, bias, residual=res)
        torch.testing.assert_close(y, plain, rtol=0, atol=bound, msg=what)


@pytest.mark.parametrize(
    "why", ["gemm rows", "kquant", "head dim 16", "int8 x", "short k", "two rows"]
)
def test_decode_splits_other_kernels_merge_first(why, rng, poisoned, monkeypatch):
    """Where the GEMV does not merge (GEMM-sized batches, the K-quant GEMV, heads of half a
    32-block, int8 x, K under MERGE_MIN_K, rows over MERGE_MAX_ROWS) the merge kernel runs
    first and the product follows: the same result within the kernels' own bounds."""
    m, s, heads, d, qtype = 2, 4, 4, 64, T.Q8_0
    tol, extra = U[F32], {}
    if why != "short k":
        monkeypatch.setattr(qm, "MERGE_MIN_K", 0)
    if why not in ("two rows", "short k"):
        monkeypatch.setattr(qm, "MERGE_MAX_ROWS", qm.GEMV_MAX_M)
    if why == "gemm rows":
        m = 17
        tol = U[F32] + 4 * (2.0**-10 if CUDA else U[F32])  # the GEMM's TF32 on the GPU
    elif why == "kquant":
        qtype = T.Q4_K
    elif why == "head dim 16":
        heads, d = 16, 16
    elif why == "int8 x":
        extra = {"gemv_config": {"Q8X": 1}}
        tol = 2.0**-7  # x in 8-bit codes (test_gemv_q8x.py holds its bound)
    n, k = 24, heads * d
    data = random_weight(rng, qtype, n, k)
    w = qm.pack_weight(data, qtype, (n, k))
    splits = random_splits(rng, m, heads, s, d)
    want = qm.qmatmul_reference(merged64(splits), data, qtype, (n, k))
    y = qm.qmatmul_with(splits, w, **extra)
    assert not splits.out.isnan().any(), "the merge kernel wrote x"
    err = (y.double() - want).norm().item()
    assert err <= (tol + ACC) * want.norm().item(), f"{why}: error {err:.3g}"


@pytest.mark.usefixtures("merge_anywhere")
def test_decode_splits_argument_errors(rng):
    n, heads, d = 16, 2, 32
    k = heads * d
    w = qm.pack_weight(random_weight(rng, T.Q8_0, n, k), T.Q8_0, (n, k))
    splits = random_splits(rng, 2, heads, 3, d)
    with pytest.raises(ValueError, match="no norm or activation"):
        qm.qmatmul(splits, w, norm_weight=torch.ones(k, device=DEVICE), eps=1e-6)
    with pytest.raises(ValueError, match="residual must be"):
        qm.qmatmul(splits, w, residual=torch.zeros(3, n, device=DEVICE))
    w_wide = qm.pack_weight(random_weight(rng, T.Q8_0, n, 2 * k), T.Q8_0, (n, 2 * k))
    with pytest.raises(ValueError, match="K=64 columns"):
        qm.qmatmul(splits, w_wide)
    with pytest.raises(ValueError, match="share memory"):
        qm.qmatmul(splits, w, residual=splits.part_o.view(-1)[: 2 * n].view(2, n))


def test_qlinear_merges_decode_splits_for_any_kernel(rng):
    """A QLinear that does not run the Triton GEMV (here the reference) merges first."""
    from llamapy.layers.linear import QLinear
    from llamapy.quant.qtensor import QTensor

    n, heads, d = 16, 2, 32
    data = random_weight(rng, T.Q8_0, n, heads * d)
    layer = QLinear(QTensor(data, T.Q8_0, (n, heads * d)))  # on x's device, unprepared
    splits = random_splits(rng, 1, heads, 2, d)
    want = qm.qmatmul_reference(merged64(splits), data, T.Q8_0, (n, heads * d))
    y = layer(splits)
    assert layer.kernel == "reference" and not splits.out.isnan().any()
    assert (y.double() - want).norm() <= (U[F32] + ACC) * want.norm()


# --------------------------------------------------------------------------- fallback


@pytest.mark.parametrize("qtype", [T.Q4_0, T.BF16, T.Q4_K], ids=lambda t: t.name)
def test_gemm_batches_run_unfused(qtype, rng, poisoned):
    """Beyond the GEMV's rows: norm / activation kernel, GEMM, residual add: the same
    results within the GEMM's roundings (operands in x's 16-bit type or TF32, the normed or
    gated x rounded to x's dtype)."""
    n, k, m = 40, k_small(qtype), 17
    data = random_weight(rng, qtype, n, k)
    w = qm.pack_weight(data, qtype, (n, k))
    for form, dtype in [("norm+res", BF16), ("gelu_tanh+res", F32), ("silu", F16)]:
        case = make_case(rng, form, m, n, k, dtype)
        y = fused_call(w, case)
        op = 2.0**-10 if dtype == F32 and CUDA else U[dtype]  # TF32 on the GPU
        tol = U[dtype] + U[dtype] + 2 * 2 * op
        check(y, case, data, qtype, n, k, tol, f"{qtype.name} GEMM {form} {dtype}")
    case = make_case(rng, "norm", 2, n, k, F32)  # a forced GEMM at decode M
    y = fused_call(w, case, path="gemm")
    check(y, case, data, qtype, n, k, U[F32] + 4 * (2.0**-10 if CUDA else U[F32]), "gemm M=2")


def test_empty_batch(rng):
    n, k = 16, 64
    w = qm.pack_weight(random_weight(rng, T.Q8_0, n, k), T.Q8_0, (n, k))
    res = torch.empty(0, n, device=DEVICE)
    assert qm.qmatmul(torch.empty(0, k, device=DEVICE), w, residual=res) is res
    g = torch.ones(k, device=DEVICE)
    y = qm.qmatmul(torch.empty(0, k, device=DEVICE), w, norm_weight=g, eps=1e-6)
    assert y.shape == (0, n)


# --------------------------------------------------------------------------- errors


def test_fused_argument_errors(rng):
    n, k = 16, 64
    w = qm.pack_weight(random_weight(rng, T.Q8_0, n, k), T.Q8_0, (n, k))
    x = randn(rng, 2, k)
    g = torch.ones(k, device=DEVICE)
    res = torch.zeros(2, n, device=DEVICE)

    def bad(match: str, xx=x, **kw) -> None:
        with pytest.raises(ValueError, match=match):
            qm.qmatmul_with(xx, w, **kw)

    bad("cannot be fused", norm_weight=g, eps=1e-6, act="silu", xx=randn(rng, 2, 2 * k))
    bad("needs eps", norm_weight=g)
    bad("needs eps", norm_weight=g, eps=-1.0)
    bad("pass it with norm_weight", eps=1e-6)
    bad("norm_weight must be", norm_weight=torch.ones(k + 1, device=DEVICE), eps=1e-6)
    bad("norm_weight must be", norm_weight=torch.ones(k, dtype=torch.int32), eps=1e-6)
    bad("norm_weight must be", norm_weight=torch.ones(k, 2, device=DEVICE)[:, 0], eps=1e-6)
    bad("act must be one of", act="relu", xx=randn(rng, 2, 2 * k))
    bad(r"\[gate \| up\]: 128 columns", act="silu")
    bad("residual must be", residual=torch.zeros(2, n, dtype=F16, device=DEVICE))
    bad("residual must be", residual=torch.zeros(3, n, device=DEVICE))
    bad("residual must be", residual=torch.zeros(n, 2, device=DEVICE).T)
    bad("out or residual", residual=res, out=torch.empty(2, n, device=DEVICE))
    w_square = qm.pack_weight(random_weight(rng, T.Q8_0, k, k), T.Q8_0, (k, k))
    buf = torch.zeros(4 * k, device=DEVICE)  # x and the residual overlapping in one buffer
    for x_at, res_at in [(0, 0), (0, k), (k, 0)]:
        xx = buf[x_at : x_at + 2 * k].view(2, k)
        with pytest.raises(ValueError, match="share memory"):
            qm.qmatmul(xx, w_square, residual=buf[res_at : res_at + 2 * k].view(2, k))
    qm.qmatmul(buf[: 2 * k].view(2, k), w_square, residual=buf[2 * k :].view(2, k))  # apart


def test_qlinear_passes_the_fused_forms_to_triton_only(rng):
    from llamapy.layers.linear import QLinear
    from llamapy.quant.qtensor import QTensor

    n, k = 16, 64
    data = random_weight(rng, T.Q8_0, n, k)
    layer = QLinear(QTensor(data.cpu(), T.Q8_0, (n, k)))
    x = randn(rng, 1, k).cpu()
    with pytest.raises(ValueError, match="need the Triton kernels; this layer runs reference"):
        layer(x, residual=torch.zeros(1, n))
    layer.packed, layer.kernel = qm.pack_weight(data, T.Q8_0, (n, k)), "triton"
    res = randn(rng, 1, n)
    expected = qm.qmatmul_reference(x.to(DEVICE).double(), data, T.Q8_0, (n, k)) + res.double()
    y = layer(x.to(DEVICE), residual=res)
    assert y is res
    assert (y.double() - expected).norm() <= (U[F32] + ACC) * expected.norm()


# --------------------------------------------------------------------------- model shapes

# (N, K) of Llama-3.2-1B and SmolLM2's decode matrices: QKV / gate_up take the norm, down
# the activation, o_proj and down the residual
REAL = [("qkv", 3072, 2048), ("gate_up", 16384, 2048), ("o", 2048, 2048), ("down", 2048, 8192),
        ("smol down", 576, 1536)]  # fmt: skip
REAL_FORM = {
    "qkv": "norm", "gate_up": "norm", "o": "res", "down": "silu+res", "smol down": "gelu_tanh+res"
}  # fmt: skip


@pytest.mark.skipif(not CUDA, reason="model shapes need a GPU (the interpreter: small shapes)")
@pytest.mark.parametrize("m", [1, 4])
@pytest.mark.parametrize("shape", REAL, ids=lambda s: s[0])
@pytest.mark.parametrize("qtype", [T.Q4_0, T.Q4_1, T.Q8_0, T.BF16, T.Q4_K, T.Q6_K, T.IQ4_XS],
                         ids=lambda t: t.name)  # fmt: skip
def test_model_shapes_cuda(qtype, shape, m, rng, poisoned):
    name, n, k = shape
    data = random_weight(rng, qtype, n, k)
    forms = [("", {})]
    if qtype in qm.BYTE_TWIN_TYPES:
        forms.append((" bytes", dict(byte_twin=True)))
    if qtype in qm.LEGACY_TWINS:
        forms.append((" twin", dict(legacy_twin=True)))
    for label, options in forms:
        w = qm.pack_weight(data, qtype, (n, k), **options)
        for dtype in (F32, BF16):
            case = make_case(rng, REAL_FORM[name], m, n, k, dtype)
            y = fused_call(w, case)
            what = f"{qtype.name}{label} {name} M={m} {dtype}"
            check(y, case, data, qtype, n, k, U[dtype], what)


@pytest.mark.skipif(not CUDA, reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("qtype", [T.Q4_0, T.Q8_0, T.Q4_K, T.Q6_K], ids=lambda t: t.name)
def test_cuda_graph_capture(qtype, rng):
    """The fused calls are captured (split-K workspace included) and replayed; the residual
    updated in place by each replay."""
    n, k = 2048, 8192
    data = random_weight(rng, qtype, n, k)
    w = qm.pack_weight(data, qtype, (n, k))
    gu = randn(rng, 1, 2 * k)
    res = randn(rng, 1, n)
    qm.qmatmul(gu, w, act="silu", residual=res.clone())  # compiles before capture
    graph = torch.cuda.CUDAGraph()
    static = res.clone()
    with torch.cuda.graph(graph):
        qm.qmatmul(gu, w, act="silu", residual=static)
    gu.copy_(randn(rng, 1, 2 * k))
    start = randn(rng, 1, n)
    static.copy_(start)
    graph.replay()
    expected = qm.qmatmul(gu, w, act="silu", residual=start.clone())
    torch.cuda.synchronize()
    assert torch.equal(static, expected)
