"""The decode GEMV with int8 activations (`qmatmul_with(..., gemv_config={"Q8X": 1})`): each
32-block of x becomes codes c = rint(x * 127 / a) and a scale s = a / 127 (a the block's
max |x|, at least 2^-60), and the block sums are integer dot products with the quants; with
two levels ({"Q8X": 2}) the residual x - s c is quantized the same way and added.

Two oracles, on fresh random blocks and inputs each run (the `rng` fixture prints the seed):
- an emulation in torch of the same quantization (float32 max, 127 / a and product, as the
  kernel computes them; x~ = s c) with the product x~ @ W^T in float64: the kernel may differ
  from it by float32 arithmetic on the block sums and by one code where x * 127 / a lies
  within float32 error of a rounding tie (the GPU's division need not round as torch's);
- float64 x @ W^T: the error is x's quantization, at most s / 2 per element (the sum over
  blocks of s_b / 2 * sum_j |w_bj|), plus the same float32 arithmetic.
Fused forms (RMSNorm prologue, gated activation, residual) and the split-K / row-group
launches go through the same checks. Without a GPU the kernel runs in Triton's interpreter
(dp4a emulated with shifts); with one, also at the model shapes.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

import llamapy.kernels.triton as kt
from llamapy.kernels.triton import qmatmul as qm
from llamapy.quant.dequant import dequantize
from llamapy.quant.types import QuantType, type_size

pytestmark = [
    pytest.mark.skipif(not kt.HAS_TRITON, reason="triton is not installed"),
    pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning"),
]

ON_GPU = torch.cuda.is_available() and not kt.INTERPRET
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
T = QuantType
TYPES = [T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q8_0]
FP16_FIELDS = {T.Q4_0: (0,), T.Q4_1: (0, 2), T.Q5_0: (0,), T.Q5_1: (0, 2), T.Q8_0: (0,)}
U32 = 2.0**-24
FLOOR = 2.0**-60  # the smallest block max the kernel divides by
# |x * 127 / a| where the kernel's float32 value may round to the other integer than torch's:
# within this relative distance of a tie (the GPU's approximate division: a few ulp; the
# activation prologue's exp: a few more)
TIE_WINDOW = 2.0**-16


def random_blocks(rng: np.random.Generator, qtype: QuantType, n: int, k: int) -> torch.Tensor:
    """(n, row_bytes) uint8: random quants (and Q5 high bits), fp16 scales ~0.01."""
    blocks = rng.integers(0, 256, (n * k // 32, type_size(qtype)), dtype=np.uint8)
    for off in FP16_FIELDS[qtype]:
        vals = (rng.standard_normal(blocks.shape[0]) * 0.01).astype(np.float16)
        blocks[:, off : off + 2] = vals.view(np.uint8).reshape(-1, 2)
    return torch.from_numpy(blocks.reshape(n, -1)).to(DEVICE)


def block_codes(xb: torch.Tensor, rel_window: float, abs_window: float = 0.0):
    """(M, nb, 32) float32 -> codes (float32), the scale (M, nb, 1) float32 and the elements
    within rel_window * max(|v|, 1) + abs_window of a rounding tie (v = x * 127 / a, in code
    units), computed as the kernel does."""
    amax = xb.abs().amax(-1, keepdim=True).clamp_min(FLOOR)
    v = xb * (127.0 / amax)  # float32, as the kernel
    codes = torch.round(v)  # ties to even, as the kernel's 1.5 * 2^23 addition
    window = rel_window * v.abs().clamp_min(1.0) + abs_window
    near_tie = ((v - v.floor()) - 0.5).abs() <= window
    return codes, amax / 127.0, near_tie


def quantized(x32: torch.Tensor, levels: int = 1):
    """float32 (M, K) -> (x~ float64, the last level's scale per element, the allowed
    difference per element between the kernel's x~ and this emulation's), as the kernel
    quantizes x: codes c = rint(x * 127 / a) per 32-block, x~ = s c; level 2 adds the
    residual x - s c quantized the same way.

    Where the GPU may round a code the other way (near a tie: its division is not torch's;
    its residual may come from an FMA), the emulation allows one code step; at level 2 a
    first-level flip moves that element's residual by s (and its second code by ~254: the
    two x~ stay within ~2 s2 of each other), and a second scale off by a few ulp moves every
    second code by < 2^-6."""
    m, k = x32.shape
    xb = x32.reshape(m, k // 32, 32)
    c1, s1, tie1 = block_codes(xb, TIE_WINDOW)
    x_q = s1.double() * c1.double()
    if levels == 1:
        allow = tie1 * s1.double()
        step = s1.double().expand(m, k // 32, 32)
    else:
        r = xb - c1 * s1  # float32, as the kernel (an FMA there: within the windows below)
        c2, s2, tie2 = block_codes(r, TIE_WINDOW, 2.0**-7)
        x_q = x_q + s2.double() * c2.double()
        s2d = s2.double().expand(m, k // 32, 32)
        allow = tie1 * 2.05 * s2d + tie2 * s2d + s2d * 2.0**-6
        step = s2d * (1.0 + 2.0**-5)  # + the kernel's residual rounding (< s2 / 64)
    return x_q.reshape(m, k), step.reshape(m, k), allow.reshape(m, k)


def check(
    y: torch.Tensor,
    x_in: torch.Tensor,
    wt: Weight,
    what: str,
    rel: float = 0.0,
    out_scale: torch.Tensor | None = None,
    base: torch.Tensor | None = None,
    levels: int = 1,
) -> None:
    """y against both oracles. x_in: the float32 values the kernel quantizes (after its
    prologue); out_scale: a per-row factor of the sums (the norm's 1 / rms); base: what is
    added to the product (bias, residual), float64. rel: extra relative error of x_in
    against the kernel's own prologue values. levels: the kernel's int8 levels."""
    assert not y.isnan().any(), f"{what}: NaN in the output"
    m, k = x_in.shape
    x_q, step, allow = quantized(x_in.cpu(), levels)
    x64, w64, aw = x_in.cpu().double(), wt.w64, wt.w64.abs()
    f = torch.ones(m, 1, dtype=torch.float64) if out_scale is None else out_scale.reshape(m, 1)
    b = torch.zeros(m, w64.shape[0], dtype=torch.float64) if base is None else base
    y64 = y.cpu().double()
    # the float32 terms per block: d s sum(q c) and m s sum(c) may each exceed the block's
    # sum of |w x~| by |m| sum |x~| (they cancel in part); level 2 doubles them (smaller)
    mag = (x_q.abs() @ (aw + 2 * wt.offsets).T) * f
    arith = mag * ((k // 32 + 12) * U32 + rel) + b.abs() * 2 * U32 + out_rounding(y)
    err = (y64 - ((x_q @ w64.T) * f + b)).abs()
    bound = arith + (allow @ aw.T) * f
    worst = int(torch.argmax(err - bound))
    assert bool((err <= bound).all()), (
        f"{what} vs emulation: error {err.flatten()[worst]:.3g} > {bound.flatten()[worst]:.3g}"
    )
    quant = ((step * (0.5 + 2.0**-10)) @ aw.T) * f  # x's rounding, <= a step / 2 an element
    err = (y64 - ((x64 @ w64.T) * f + b)).abs()
    bound = quant + arith + (x64.abs() @ aw.T) * f * rel
    worst = int(torch.argmax(err - bound))
    assert bool((err <= bound).all()), (
        f"{what} vs float64: error {err.flatten()[worst]:.3g} > {bound.flatten()[worst]:.3g}"
    )


def out_rounding(y: torch.Tensor) -> torch.Tensor:
    """The one rounding of the float32 result to y's dtype."""
    u = {torch.float32: U32, torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8}[y.dtype]
    return u * y.cpu().double().abs() * (1.0 + 2.0**-10)


@dataclasses.dataclass
class Weight:
    packed: qm.PackedWeight
    w64: torch.Tensor  # (N, K) float64, ggml's values
    offsets: torch.Tensor  # (N, K) float64: |m| of each weight's block (Q4_1, Q5_1), else 0


def setup(rng, qtype, m, n, k, dtype=torch.float32, scale=1.0) -> tuple[Weight, torch.Tensor]:
    blocks = random_blocks(rng, qtype, n, k)
    w64 = dequantize(blocks, qtype, torch.float64).cpu().reshape(n, k)
    offsets = torch.zeros(n, k, dtype=torch.float64)
    if qtype in (T.Q4_1, T.Q5_1):
        m16 = blocks.cpu().reshape(n * k // 32, -1)[:, 2:4].contiguous().view(torch.float16)
        offsets = m16.double().abs().reshape(n, k // 32, 1).expand(n, k // 32, 32).reshape(n, k)
    wt = Weight(qm.pack_weight(blocks, qtype, (n, k)), w64, offsets)
    x = torch.from_numpy(rng.standard_normal((m, k), dtype=np.float32) * scale).to(DEVICE, dtype)
    return wt, x


@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
@pytest.mark.parametrize(
    ("m", "n", "k", "config"),
    [
        (1, 8, 64, {}),
        (3, 5, 96, {"BLOCK_B": 2}),  # K not a multiple of the step, N of the row tile
        (4, 9, 128, {"SPLIT": 2, "BLOCK_B": 1}),  # split-K partials
        (2, 4, 64, {"BLOCK_N": 2, "num_warps": 1}),
    ],
    ids=["m1", "ragged", "split", "narrow"],
)
@pytest.mark.parametrize("levels", [1, 2])
def test_matches_both_oracles(qtype, m, n, k, config, levels, rng):
    wt, x = setup(rng, qtype, m, n, k)
    y = qm.qmatmul_with(x, wt.packed, path="gemv", gemv_config={"Q8X": levels, **config})
    check(y, x.float(), wt, f"{qtype.name} M={m} levels={levels}", levels=levels)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_16_bit_x_bias_and_row_groups(dtype, rng):
    """x of a 16-bit dtype (exact in float32), a bias, and more rows than one row group."""
    wt, x = setup(rng, T.Q4_1, 6, 7, 64, dtype)
    bias = torch.from_numpy(rng.standard_normal(7, dtype=np.float32)).to(DEVICE, dtype)
    y = qm.qmatmul_with(x, wt.packed, bias, path="gemv", gemv_config={"Q8X": 1})
    assert y.dtype == dtype
    base = bias.cpu().double()[None, :].expand(6, 7)
    check(y, x.float(), wt, f"{dtype} + bias", base=base)


@pytest.mark.parametrize("levels", [1, 2])
@pytest.mark.parametrize("magnitude", [1e4, 1e-3, 1e-25])
def test_block_scales_follow_x(magnitude, levels, rng):
    """Large, small and tiny activations: the codes always span the block (no overflow, no
    flush); an all-zero row gives exact zeros."""
    wt, x = setup(rng, T.Q8_0, 3, 6, 64, scale=magnitude)
    x[1] = 0.0
    y = qm.qmatmul_with(x, wt.packed, path="gemv", gemv_config={"Q8X": levels})
    check(y, x.float(), wt, f"|x| ~ {magnitude:g}", levels=levels)
    assert bool((y[1] == 0).all())


@pytest.mark.parametrize("levels", [1, 2])
def test_fused_norm_prologue(levels, rng):
    """RMSNorm in the prologue: x * g is quantized, the sums take 1 / rms."""
    m, n, k, eps = 2, 6, 96, 1e-6
    wt, x = setup(rng, T.Q4_0, m, n, k)
    g = torch.from_numpy(rng.standard_normal(k, dtype=np.float32)).to(DEVICE)
    cfg = {"Q8X": levels}
    y = qm.qmatmul_with(x, wt.packed, path="gemv", norm_weight=g, eps=eps, gemv_config=cfg)
    x64 = x.cpu().double()
    inv_rms = 1.0 / torch.sqrt((x64 * x64).mean(-1) + eps)
    # the kernel's 1 / rms in float32: a few roundings over the K squares
    check(y, x.cpu() * g.cpu(), wt, "norm", rel=(k + 8) * U32, out_scale=inv_rms, levels=levels)


@pytest.mark.parametrize(("act", "levels"), [("silu", 1), ("gelu_tanh", 1), ("silu", 2)])
def test_fused_activation_and_residual(act, levels, rng):
    """The down projection's form: act(gate) * up quantized, the product added to out."""
    m, n, k = 3, 5, 64
    wt, _ = setup(rng, T.Q5_1, m, n, k)
    gu = torch.from_numpy(rng.standard_normal((m, 2 * k), dtype=np.float32) * 2).to(DEVICE)
    res = torch.from_numpy(rng.standard_normal((m, n), dtype=np.float32)).to(DEVICE)
    base = res.cpu().double()
    cfg = {"Q8X": levels}
    y = qm.qmatmul_with(gu, wt.packed, path="gemv", act=act, residual=res, gemv_config=cfg)
    assert y is res
    g64, u64 = gu.cpu().double()[:, :k], gu.cpu().double()[:, k:]
    if act == "silu":
        a = g64 / (1.0 + torch.exp(-g64))
    else:
        a = 0.5 * g64 * (1 + torch.tanh(0.7978845608028654 * (g64 + 0.044715 * g64**3)))
    # the kernel's float32 activation against float64: a few ulp of exp / tanh
    check(y, (a * u64).float(), wt, act, rel=2.0**-17, base=base, levels=levels)


@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
def test_default_path_unchanged_without_q8x(qtype, rng):
    """Q8X off keeps the float32 GEMV (its own tests' tolerance: float32 accumulation)."""
    wt, x = setup(rng, qtype, 2, 4, 64)
    y = qm.qmatmul_with(x, wt.packed, path="gemv", gemv_config={"Q8X": 0}).cpu().double()
    x64 = x.cpu().double()
    bound = (x64.abs() @ (wt.w64.abs() + 2 * wt.offsets).T) * (64 + 8) * U32
    assert bool(((y - x64 @ wt.w64.T).abs() <= bound).all())


@pytest.mark.skipif(not ON_GPU, reason="model shapes need a GPU (the interpreter is too slow)")
@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
@pytest.mark.parametrize(("n", "k"), [(3072, 2048), (2048, 8192), (960, 576)])
@pytest.mark.parametrize(("m", "levels"), [(1, 1), (4, 1), (1, 2)])
def test_model_shapes_on_gpu(qtype, n, k, m, levels, rng):
    wt, x = setup(rng, qtype, m, n, k)
    y = qm.qmatmul_with(x, wt.packed, path="gemv", gemv_config={"Q8X": levels})
    check(y, x.float(), wt, f"{qtype.name} {n}x{k} M={m} levels={levels}", levels=levels)


def test_tile_rule_and_default() -> None:
    """The int8 GEMV's tiles per type and shape class (the sweeps' winners), K steps clamped
    to K's blocks."""
    rule = qm._q8x_config
    assert rule(T.Q4_0, 128256, 2048, 1) == {
        "BLOCK_M": 1, "Q8X": 1, "BLOCK_N": 4, "BLOCK_B": 32, "num_warps": 1, "SPLIT": 1
    }  # fmt: skip
    down = rule(T.Q4_0, 2048, 8192, 1)
    assert (down["BLOCK_N"], down["BLOCK_B"], down["num_warps"]) == (8, 256, 4)
    assert rule(T.Q5_1, 16384, 2048, 1)["BLOCK_B"] == 64
    assert rule(T.Q4_0, 3072, 2048, 4)["BLOCK_M"] == 4
    assert rule(T.Q4_0, 960, 576, 1)["BLOCK_B"] == 32  # 18 blocks: one masked step
    assert rule(T.Q4_0, 5, 96, 1)["BLOCK_B"] == 4
    assert rule(T.Q8_0, 2048, 8192, 1)["SPLIT"] == 2 and rule(T.Q8_0, 2048, 2048, 1)["SPLIT"] == 1
    assert rule(T.Q8_0, 2048, 2048, 1)["BLOCK_N"] == 2
    assert qm._gemv_config(T.Q8_0, 1, 960, 576, 132, q8x=True)["Q8X"] == 1
    assert "Q8X" not in qm._gemv_config(T.F16, 1, 960, 576, 132, q8x=True)
    assert not qm.gemv_int8_x(torch.device("cpu"), T.Q4_0)


def test_default_switch(monkeypatch) -> None:
    """Unset, the types in _Q8X_DEFAULT_TYPES only (none today: the fidelity bar); set,
    every legacy type; never a float type, never off CUDA (the interpreter included)."""
    cuda = torch.device("cuda")
    if kt.INTERPRET:  # the interpreter never defaults to it; the rule itself is device-free
        monkeypatch.setattr(qm, "INTERPRET", False)
    monkeypatch.setattr(qm, "GEMV_INT8_X", None)
    assert not qm.gemv_int8_x(cuda, T.Q4_0) and not qm.gemv_int8_x(cuda, T.Q8_0)
    monkeypatch.setattr(qm, "_Q8X_DEFAULT_TYPES", frozenset({T.Q4_1}))
    assert qm.gemv_int8_x(cuda, T.Q4_1) and not qm.gemv_int8_x(cuda, T.Q4_0)
    assert not qm.gemv_int8_x(torch.device("cpu"), T.Q4_1)
    monkeypatch.setattr(qm, "GEMV_INT8_X", True)
    assert qm.gemv_int8_x(cuda, T.Q8_0) and qm.gemv_int8_x(cuda, T.Q5_1)
    assert not qm.gemv_int8_x(cuda, T.F16)
    monkeypatch.setattr(qm, "GEMV_INT8_X", False)
    assert not qm.gemv_int8_x(cuda, T.Q4_1)


@pytest.mark.parametrize(
    ("value", "expected"),
    [("", None), ("1", 1), ("on", 1), ("2", 2), ("0", 0), (" False ", 0), ("maybe", None)],
)
def test_environment_switch(value, expected, monkeypatch, caplog) -> None:
    """LLAMAPY_GEMV_INT8_X: levels and on / off words, unset, a typo ignored with a
    warning."""
    monkeypatch.setenv("LLAMAPY_GEMV_INT8_X", value)
    with caplog.at_level("WARNING", logger=qm.logger.name):
        assert qm._level_from_env("LLAMAPY_GEMV_INT8_X") == expected
    assert ("is not 0, 1 or 2" in caplog.text) == (value == "maybe")


def test_bad_level_is_refused_and_float_weights_ignore_it(rng) -> None:
    wt, x = setup(rng, T.Q4_0, 1, 4, 64)
    with pytest.raises(ValueError, match="Q8X must be 0, 1 or 2"):
        qm.qmatmul_with(x, wt.packed, path="gemv", gemv_config={"Q8X": 3})
    w16 = torch.from_numpy(rng.standard_normal((4, 64), dtype=np.float32)).half().to(DEVICE)
    packed = qm.pack_weight(w16.view(torch.uint8), T.F16, (4, 64))
    y = qm.qmatmul_with(x, packed, path="gemv", gemv_config={"Q8X": 1})  # float32 x: exact
    exact = x.cpu().double() @ w16.cpu().double().T
    bound = (x.cpu().double().abs() @ w16.cpu().double().abs().T) * (64 + 8) * U32
    assert bool(((y.cpu().double() - exact).abs() <= bound).all())
