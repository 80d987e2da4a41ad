"""Fused elementwise Triton kernels (RMSNorm (+ residual add), rotary (+ KV-cache write),
SiLU / GELU-tanh and-mul) against their torch references and a float64 computation.

Fresh random inputs each run; outputs the launchers allocate come out of a NaN-poisoned
`torch.empty`, caches start as NaN. Real shapes on CUDA, small ones under TRITON_INTERPRET=1.

Error bounds, elementwise: the kernels compute in float32 and round once, so
|kernel - exact| <= u_out * |exact| + (float32 error of the arithmetic), u = unit roundoff
of the output dtype. The references round in the input dtype a few times more, so kernel vs
reference is allowed the sum of both errors.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from llamapy.kernels.triton import INTERPRET, activation, norm, rotary
from llamapy.layers import activation as layers_activation
from llamapy.layers.attention import write_kv
from llamapy.layers.norm import rms_norm as layers_rms_norm
from llamapy.layers.rotary import RotaryEmbedding

ON_GPU = torch.cuda.is_available()
DEVICE = "cuda" if ON_GPU else "cpu"
pytestmark = [
    pytest.mark.skipif(not (ON_GPU or INTERPRET), reason="needs CUDA or TRITON_INTERPRET=1"),
    # the interpreter's numpy exp overflows to inf on purpose (sigmoid of large negatives)
    pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning"),
]

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
UNIT_ROUNDOFF = {torch.float32: 2.0**-24, torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8}
U32 = UNIT_ROUNDOFF[torch.float32]
# Triton 3.6's interpreter truncates float32 -> bfloat16 (cast_impl passes no rounding mode);
# GPUs round to nearest. Truncation errs by up to one ulp, twice the unit roundoff.
KERNEL_ROUNDOFF = {**UNIT_ROUNDOFF, torch.bfloat16: 2.0**-8 * (2 if INTERPRET else 1)}


def underflow(dtype: torch.dtype) -> float:
    """Absolute rounding error of a result in dtype's subnormal range (one spacing there is
    2u * smallest normal)."""
    return KERNEL_ROUNDOFF[dtype] * torch.finfo(dtype).tiny


NUM_TOKENS = 256 if ON_GPU else 3  # rows / tokens per test


@pytest.fixture
def gen(rng: np.random.Generator) -> torch.Generator:
    return torch.Generator().manual_seed(int(rng.integers(2**62)))


@pytest.fixture(autouse=True)
def _poisoned(poisoned: None) -> None:
    """Every test here runs with conftest's NaN-poisoned torch.empty."""


def randn(gen: torch.Generator, *shape: int, dtype=torch.float32, scale: float = 1.0):
    return (torch.randn(shape, generator=gen) * scale).to(dtype).to(DEVICE)


def assert_within(name: str, got: torch.Tensor, want: torch.Tensor, bound: torch.Tensor):
    """|got - want| <= bound elementwise, no NaN in got."""
    assert got.shape == want.shape, f"{name}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    assert not got.isnan().any(), f"{name}: {int(got.isnan().sum())} NaN (unwritten?)"
    err = (got.double() - want.double()).abs()
    bad = err > bound
    if bad.any():
        i = int((err - bound).flatten().argmax())
        pytest.fail(
            f"{name}: {int(bad.sum())}/{bad.numel()} elements beyond bound; worst at flat {i}: "
            f"got {got.flatten()[i].item()!r} want {want.flatten()[i].item()!r} "
            f"err {err.flatten()[i].item():.3g} bound {bound.flatten()[i].item():.3g}"
        )


def assert_rounded(name: str, got: torch.Tensor, exact: torch.Tensor):
    """got is `exact` rounded once to got.dtype: bit for bit where the kernel rounds to
    nearest, within an ulp where the interpreter truncates."""
    dtype = got.dtype
    if KERNEL_ROUNDOFF[dtype] == UNIT_ROUNDOFF[dtype]:
        assert torch.equal(got, exact.to(dtype)), f"{name}: not the exact value rounded once"
    else:
        bound = KERNEL_ROUNDOFF[dtype] * exact.double().abs() + underflow(dtype)
        assert_within(name, got, exact, bound)


# ---------------------------------------------------------------- RMSNorm


EPS = 1e-6


def rms_norm64(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    x = x.double()
    return x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + EPS) * weight.double()


# float32 error of the norm, relative: tree sum (log2 D terms), rsqrt (a few ulp), 2 products
NORM_F32_REL = 32 * U32


def norm_bounds(dtype: torch.dtype, exact: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(kernel vs exact, kernel vs reference) bounds: both compute in float32 and round once
    to `dtype`, so they differ by at most the two errors added."""
    kernel = (KERNEL_ROUNDOFF[dtype] + NORM_F32_REL) * exact.abs() + underflow(dtype)
    return kernel, 2 * kernel


def norm_input(gen, shape, dtype, layout: str) -> torch.Tensor:
    """Rows of magnitudes 10^-3.5 .. 10 (so that eps matters in some: mean(x^2) ~ 1e-7);
    `layout` "contiguous", or "qkv": (T, heads, d) viewed out of a wider fused row."""
    if layout == "qkv":
        t, heads, d = shape
        wide = norm_input(gen, (t, heads + 3, d), dtype, "contiguous")
        return wide.view(t, -1)[:, d : d + heads * d].view(t, heads, d)  # row stride (heads+3)*d
    row_scale = 10.0 ** (torch.rand(*shape[:-1], 1, generator=gen) * 4.5 - 3.5)
    return (torch.randn(shape, generator=gen) * row_scale).to(dtype).to(DEVICE)


NORM_CASES = [
    ((NUM_TOKENS, 576), "contiguous"),
    ((2, NUM_TOKENS, 640), "contiguous"),
    ((NUM_TOKENS, 2048), "contiguous"),
    ((NUM_TOKENS, 16, 64), "qkv"),  # per-head q norm of Qwen3
    ((NUM_TOKENS, 4, 256), "qkv"),  # Gemma 3's head_dim
    ((1, 1000), "contiguous"),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(("shape", "layout"), NORM_CASES, ids=str)
def test_rms_norm(gen, dtype, shape, layout):
    x = norm_input(gen, shape, dtype, layout)
    weight = randn(gen, shape[-1]) + 1.0  # Gemma-style 1 + w values
    before = x.clone()
    out = norm.rms_norm(x, weight, EPS)
    assert out.dtype == dtype and out.is_contiguous()
    assert torch.equal(x, before), "input modified"
    exact = rms_norm64(x, weight)
    to_exact, to_ref = norm_bounds(dtype, exact)
    assert_within("kernel vs float64", out, exact, to_exact)
    assert_within("kernel vs reference", out, norm.rms_norm_reference(x, weight, EPS), to_ref)


def test_rms_norm_without_weight(gen):
    x = randn(gen, NUM_TOKENS, 640, dtype=torch.bfloat16)
    exact = rms_norm64(x, torch.ones(640, device=DEVICE))
    assert_within("no weight", norm.rms_norm(x, None, EPS), exact, norm_bounds(x.dtype, exact)[0])


@pytest.mark.parametrize(
    ("x_dtype", "res_dtype"),
    [
        (torch.float32, torch.float32),
        (torch.bfloat16, torch.float32),
        (torch.float16, torch.float32),
        (torch.bfloat16, torch.bfloat16),
    ],
    ids=str,
)
@pytest.mark.parametrize("d", [576, 2048])
def test_fused_add_rms_norm(gen, x_dtype, res_dtype, d):
    x = randn(gen, NUM_TOKENS, d, dtype=x_dtype)
    residual = randn(gen, NUM_TOKENS, d, dtype=res_dtype, scale=3.0)
    weight = randn(gen, d) + 1.0
    residual0, ref_residual = residual.clone(), residual.clone()

    out, new_residual = norm.fused_add_rms_norm(x, residual, weight, EPS)
    assert new_residual is residual, "residual is updated in place"
    assert_rounded("residual", residual, residual0.double() + x.double())
    assert out.dtype == x_dtype
    exact = rms_norm64(residual, weight)  # the norm reads the residual as stored
    to_exact, to_ref = norm_bounds(x_dtype, exact)
    assert_within("kernel vs float64", out, exact, to_exact)
    ref_out = norm.rms_norm_reference(residual, weight, EPS).to(x_dtype)
    assert_within("kernel vs reference", out, ref_out, to_ref)

    # the fused reference itself: the sum rounded once, then its norm
    ref_out, _ = norm.fused_add_rms_norm_reference(x, ref_residual, weight, EPS)
    want_residual = (residual0.double() + x.double()).to(res_dtype)
    assert torch.equal(ref_residual, want_residual), "reference residual != round(residual + x)"
    assert_within("reference vs float64", ref_out, rms_norm64(want_residual, weight), to_ref)


def test_fused_add_rms_norm_strided_views(gen):
    """x a strided view (a head slice of a wider row); residual its own layout."""
    wide = randn(gen, NUM_TOKENS, 3 * 576, dtype=torch.bfloat16)
    x = wide[:, 576 : 2 * 576]
    residual = randn(gen, NUM_TOKENS, 576)
    weight = randn(gen, 576)
    want_residual = (residual.double() + x.double()).float()
    out, _ = norm.fused_add_rms_norm(x, residual, weight, EPS)
    assert_rounded("residual", residual, want_residual)
    exact = rms_norm64(want_residual, weight)
    assert_within("strided", out, exact, norm_bounds(x.dtype, exact)[0])


def test_rms_norm_reference_is_the_layer(gen):
    x, w = randn(gen, NUM_TOKENS, 5, 64, dtype=torch.bfloat16).cpu(), randn(gen, 64).cpu()
    # on the CPU: layers.norm dispatches to the kernel for CUDA tensors
    assert torch.equal(norm.rms_norm_reference(x, w, EPS), layers_rms_norm(x, w, EPS))


# ---------------------------------------------------------------- rotary


def rope64(
    x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact rotation of x (T, h, d) (pairs gathered by index, not the reference's stack /
    chunk), and each output's magnitude |x1| + |x2| (0 past rot_dim: copied exactly)."""
    half = cos.shape[1]
    i = torch.arange(half, device=x.device)
    i1, i2 = (2 * i, 2 * i + 1) if interleaved else (i, i + half)
    x = x.double()
    x1, x2 = x[..., i1], x[..., i2]
    c, s = cos.double()[:, None, :], sin.double()[:, None, :]
    out, mag = x.clone(), torch.zeros_like(x)
    out[..., i1], out[..., i2] = x1 * c - x2 * s, x1 * s + x2 * c
    mag[..., i1] = mag[..., i2] = x1.abs() + x2.abs()
    return out, mag


def rope_bounds(dtype, exact, mag) -> tuple[torch.Tensor, torch.Tensor]:
    """Kernel: float32 products and sum (3 roundings of terms <= mag), one final rounding.
    Reference: cos/sin, both products and the sum rounded in `dtype` (4u * mag) plus its
    own final rounding."""
    u = UNIT_ROUNDOFF[dtype]
    kernel = KERNEL_ROUNDOFF[dtype] * exact.abs() + 4 * U32 * mag + underflow(dtype)
    return kernel, kernel + u * exact.abs() + 4 * u * mag


def rope_tables(gen, num_tokens, rot_dim, interleaved):
    """cos/sin of unsorted, distinct positions from RotaryEmbedding itself."""
    rope = RotaryEmbedding(rot_dim, 10_000.0, interleaved=interleaved)
    positions = torch.randperm(8192, generator=gen)[:num_tokens]
    return rope, *(t.to(DEVICE) for t in rope.cos_sin(positions))


def qkv_split(gen, num_tokens, nh, nkv, d, dv, dtype, fused: bool):
    """q (T, nh, d), k (T, nkv, d), v (T, nkv, dv): views of one fused projection output,
    or three contiguous tensors."""
    if fused:
        qkv = randn(gen, num_tokens, nh * d + nkv * d + nkv * dv, dtype=dtype)
        q, k, v = qkv.split([nh * d, nkv * d, nkv * dv], dim=-1)
    else:
        q, k, v = (
            randn(gen, num_tokens, h * e, dtype=dtype) for h, e in ((nh, d), (nkv, d), (nkv, dv))
        )
    return q.view(num_tokens, nh, d), k.view(num_tokens, nkv, d), v.view(num_tokens, nkv, dv)


# (num_heads, num_kv, head_dim, rot_dim)
ROPE_CASES = [
    (16, 4, 64, 64),  # llama 3.2 1B / SmolLM2
    (4, 1, 256, 256),  # Gemma 3
    (8, 2, 64, 32),  # partial rotary
    (6, 2, 80, 48),  # non power-of-two head_dim and rot_dim / 2
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("interleaved", [True, False], ids=["norm", "neox"])
@pytest.mark.parametrize(("nh", "nkv", "d", "rot"), ROPE_CASES, ids=str)
def test_apply_rotary(gen, dtype, interleaved, nh, nkv, d, rot):
    _, cos, sin = rope_tables(gen, NUM_TOKENS + 2, rot, interleaved)
    # views of a fused qkv output, or (partial rotary cases) contiguous tensors
    q, k, _ = qkv_split(gen, NUM_TOKENS + 2, nh, nkv, d, d, dtype, fused=rot == d)
    q0, k0 = q.clone(), k.clone()
    q_ref, k_ref = rotary.apply_rotary_reference(
        q0.clone(), k0.clone(), cos, sin, interleaved=interleaved
    )

    q_out, k_out = rotary.apply_rotary(q, k, cos, sin, interleaved=interleaved)
    assert q_out is q and k_out is k, "rotated in place"
    for name, got, x0, ref in (("q", q, q0, q_ref), ("k", k, k0, k_ref)):
        exact, mag = rope64(x0, cos, sin, interleaved)
        to_exact, to_ref = rope_bounds(dtype, exact, mag)
        assert_within(f"{name} kernel vs float64", got, exact, to_exact)
        assert_within(f"{name} kernel vs reference", got, ref, to_ref)
        assert torch.equal(got[..., rot:], x0[..., rot:]), f"{name} past rot_dim changed"


@pytest.mark.parametrize("interleaved", [True, False], ids=["norm", "neox"])
def test_apply_rotary_reference_is_the_layer(gen, interleaved):
    rope, cos, sin = rope_tables(gen, NUM_TOKENS, 32, interleaved)
    q, k, _ = qkv_split(gen, NUM_TOKENS, 4, 2, 64, 64, torch.bfloat16, fused=False)
    want_q, want_k = rope(q, cos, sin), rope(k, cos, sin)
    got_q, got_k = rotary.apply_rotary_reference(q, k, cos, sin, interleaved=interleaved)
    assert torch.equal(got_q, want_q) and torch.equal(got_k, want_k)


def nan_caches(num_blocks, block_size, nkv, d, dv, dtype):
    k_cache = torch.full((num_blocks, block_size, nkv, d), math.nan, dtype=dtype, device=DEVICE)
    v_cache = torch.full((num_blocks, block_size, nkv, dv), math.nan, dtype=dtype, device=DEVICE)
    return k_cache, v_cache


# (dtype of q/k/v, cache dtype, num_heads, num_kv, head_dim, v_head_dim, rot_dim)
CACHE_CASES = [
    (torch.float32, torch.float32, 8, 2, 64, 64, 64),
    (torch.float16, torch.float16, 4, 1, 256, 256, 256),
    (torch.bfloat16, torch.bfloat16, 8, 2, 64, 64, 32),
    (torch.float32, torch.bfloat16, 6, 2, 80, 80, 48),
    (torch.bfloat16, torch.bfloat16, 4, 2, 64, 32, 64),  # v_head_dim != head_dim
]


@pytest.mark.parametrize("interleaved", [True, False], ids=["norm", "neox"])
@pytest.mark.parametrize(
    ("dtype", "cache_dtype", "nh", "nkv", "d", "dv", "rot"), CACHE_CASES, ids=str
)
def test_rotary_and_cache(gen, interleaved, dtype, cache_dtype, nh, nkv, d, dv, rot):
    num_tokens, num_blocks, block_size = NUM_TOKENS + 3, (64 if ON_GPU else 4), 16
    _, cos, sin = rope_tables(gen, num_tokens, rot, interleaved)
    q, k, v = qkv_split(gen, num_tokens, nh, nkv, d, dv, dtype, fused=d == dv)
    inputs = [t.clone() for t in (q, k, v)]
    slot_mapping = torch.randperm(num_blocks * block_size, generator=gen)[:num_tokens]
    slot_mapping[1] = -1  # a padding token: stored nowhere
    slot_mapping = slot_mapping.to(DEVICE)
    k_cache, v_cache = nan_caches(num_blocks, block_size, nkv, d, dv, cache_dtype)
    k_ref, v_ref = k_cache.clone(), v_cache.clone()
    args = (cos, sin, k_cache, v_cache, slot_mapping)
    q_ref = rotary.rotary_and_cache_reference(
        q, k, v, cos, sin, k_ref, v_ref, slot_mapping, interleaved=interleaved
    )

    q_out = rotary.rotary_and_cache(q, k, v, *args, interleaved=interleaved)
    for x, x0 in zip((q, k, v), inputs, strict=True):
        assert torch.equal(x, x0), "inputs are left unchanged"
    assert q_out.is_contiguous() and q_out.dtype == dtype
    exact, mag = rope64(q, cos, sin, interleaved)
    to_exact, to_ref = rope_bounds(dtype, exact, mag)
    assert_within("q kernel vs float64", q_out, exact, to_exact)
    assert_within("q kernel vs reference", q_out, q_ref, to_ref)

    # only the mapped slots changed, all of them fully written
    keep = slot_mapping.cpu() >= 0
    written = torch.zeros(num_blocks * block_size, dtype=torch.bool)
    written[slot_mapping.cpu()[keep]] = True
    k_flat, v_flat = k_cache.flatten(0, 1).cpu(), v_cache.flatten(0, 1).cpu()
    assert k_flat[~written].isnan().all() and v_flat[~written].isnan().all(), "stray writes"
    slots = slot_mapping[keep.to(DEVICE)]
    exact_k, mag_k = rope64(
        k[keep.to(DEVICE)], cos[keep.to(DEVICE)], sin[keep.to(DEVICE)], interleaved
    )
    # rotated in float32, rounded once to the cache dtype; the reference rotates in k.dtype
    # and is rounded to the cache dtype on its own (near a rounding midpoint the two can land
    # one cache ulp apart: both bounds to the exact value add up)
    to_exact, _ = rope_bounds(cache_dtype, exact_k, mag_k)
    _, ref_in_dtype = rope_bounds(dtype, exact_k, mag_k)
    ref_to_exact = ref_in_dtype + UNIT_ROUNDOFF[cache_dtype] * (exact_k.abs() + ref_in_dtype)
    k_got = k_cache.flatten(0, 1)[slots]
    assert_within("k cache vs float64", k_got, exact_k, to_exact)
    k_ref_got = k_ref.flatten(0, 1)[slots]
    assert_within("k cache vs reference", k_got, k_ref_got, to_exact + ref_to_exact)
    assert_rounded("v cache", v_cache.flatten(0, 1)[slots], v[keep.to(DEVICE)])
    assert torch.equal(v_ref.flatten(0, 1)[slots], v[keep.to(DEVICE)].to(cache_dtype))


def test_rotary_and_cache_reference_is_the_layer(gen):
    """Without padding tokens the reference is RotaryEmbedding + attention.write_kv."""
    rope, cos, sin = rope_tables(gen, NUM_TOKENS, 64, True)
    q, k, v = qkv_split(gen, NUM_TOKENS, 4, 2, 64, 64, torch.float16, fused=True)
    blocks = -(-2 * NUM_TOKENS // 16)  # room for every token (NUM_TOKENS is larger on GPUs)
    slot_mapping = torch.randperm(blocks * 16, generator=gen)[:NUM_TOKENS].to(DEVICE)
    caches = nan_caches(blocks, 16, 2, 64, 64, torch.float16)
    want = [c.clone() for c in caches]
    write_kv(*want, rope(k, cos, sin), v, slot_mapping)
    q_out = rotary.rotary_and_cache_reference(
        q, k, v, cos, sin, *caches, slot_mapping, interleaved=True
    )
    assert torch.equal(q_out, rope(q, cos, sin))
    for got, exp in zip(caches, want, strict=True):
        assert torch.equal(got.nan_to_num(7.0), exp.nan_to_num(7.0))


def test_rotary_and_cache_int32_slots(gen):
    _, cos, sin = rope_tables(gen, NUM_TOKENS, 64, False)
    q, k, v = qkv_split(gen, NUM_TOKENS, 4, 2, 64, 64, torch.bfloat16, fused=True)
    blocks = -(-2 * NUM_TOKENS // 16)
    slot_mapping = torch.randperm(blocks * 16, generator=gen)[:NUM_TOKENS].to(DEVICE)
    caches, want = (
        nan_caches(blocks, 16, 2, 64, 64, torch.bfloat16),
        nan_caches(blocks, 16, 2, 64, 64, torch.bfloat16),
    )
    rotary.rotary_and_cache(q, k, v, cos, sin, *caches, slot_mapping.int(), interleaved=False)
    rotary.rotary_and_cache(q, k, v, cos, sin, *want, slot_mapping, interleaved=False)
    for got, exp in zip(caches, want, strict=True):
        assert torch.equal(got.nan_to_num(7.0), exp.nan_to_num(7.0))


# ---------------------------------------------------------------- activations


def silu64(g: torch.Tensor) -> torch.Tensor:
    return g / (1.0 + torch.exp(-g))


def gelu_tanh64(g: torch.Tensor) -> torch.Tensor:
    """0.5 g (1 + tanh z) written as g * sigmoid(2z) (the same number): 1 + tanh z cancels
    for large negative z, even in float64."""
    z = math.sqrt(2.0 / math.pi) * (g + 0.044715 * g**3)
    return g / (1.0 + torch.exp(-2.0 * z))


def act_bounds(dtype, exact, exp_arg, g_up, up) -> tuple[torch.Tensor, torch.Tensor]:
    """Kernel: float32 exp(arg) carries |arg| * u32 relative error from rounding its argument,
    plus a few ulp (ex2.approx) and 3 products; where exp overflows (arg > 88.7) the
    activation underflows to 0, an error under smallest-normal * |gate * up|.
    Reference: torch computes 0.5 g (1 + tanh z) in float32, which cancels for large negative
    z (absolute error ~ u32 * |gate * up|), rounds act(g) to dtype (absolutely, in the
    subnormal range: very negative gates, then scaled by |up|), then the product."""
    u = UNIT_ROUNDOFF[dtype]
    tiny = torch.finfo(torch.float32).tiny
    kernel = (KERNEL_ROUNDOFF[dtype] + 4 * U32 * (exp_arg.abs() + 8)) * exact.abs()
    kernel += tiny * (1 + g_up.abs()) + underflow(dtype)
    reference = 2 * u * exact.abs() + 4 * U32 * g_up.abs() + underflow(dtype) * (1 + up.abs())
    return kernel, kernel + reference


ACTS = {
    "silu": (
        activation.silu_and_mul,
        activation.silu_and_mul_fused,
        activation.silu_and_mul_reference,
        layers_activation.silu_and_mul,
        silu64,
        lambda g: g,
    ),
    "gelu_tanh": (
        activation.gelu_tanh_and_mul,
        activation.gelu_tanh_and_mul_fused,
        activation.gelu_tanh_and_mul_reference,
        layers_activation.gelu_tanh_and_mul,
        gelu_tanh64,
        lambda g: 2 * math.sqrt(2 / math.pi) * (g + 0.044715 * g**3),
    ),
}


@pytest.mark.parametrize("act", list(ACTS))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(
    ("shape", "fused"),
    [
        ((NUM_TOKENS, 1536), True),
        ((2, NUM_TOKENS, 640), False),
        ((1, 2048), True),
        ((NUM_TOKENS, 1000), False),
    ],
    ids=str,
)
def test_act_and_mul(gen, act, dtype, shape, fused):
    op, op_fused, reference, layer, exact_act, exp_arg = ACTS[act]
    f = shape[-1]
    x = randn(gen, *shape[:-1], 2 * f, dtype=dtype, scale=3.0)  # one projection output
    gate, up = x[..., :f], x[..., f:]  # strided views
    before = x.clone()
    out = op_fused(x) if fused else op(gate, up)
    assert torch.equal(x, before), "input modified"
    assert out.shape == gate.shape and out.dtype == dtype and out.is_contiguous()
    exact = exact_act(gate.double()) * up.double()
    to_exact, to_ref = act_bounds(
        dtype, exact, exp_arg(gate.double()), gate.double() * up, up.double()
    )
    assert_within("kernel vs float64", out, exact, to_exact)
    ref = reference(gate, up)
    # layers.activation dispatches to the kernel on CUDA: compare the torch paths on the CPU
    assert torch.equal(reference(gate.cpu(), up.cpu()), layer(gate.cpu(), up.cpu())), (
        "reference != layers.activation"
    )
    assert_within("kernel vs reference", out, ref, to_ref)


def test_empty_inputs():
    """No tokens: nothing launched, empty results of the right shapes."""
    x = torch.randn(0, 64, device=DEVICE)
    assert norm.rms_norm(x, None, EPS).shape == (0, 64)
    assert activation.silu_and_mul_fused(torch.randn(0, 128, device=DEVICE)).shape == (0, 64)
    q, k, v = (torch.randn(0, h, 64, device=DEVICE) for h in (4, 2, 2))
    cos = sin = torch.randn(0, 32, device=DEVICE)
    caches = nan_caches(1, 16, 2, 64, 64, torch.float32)
    slots = torch.zeros(0, dtype=torch.int64, device=DEVICE)
    q_out = rotary.rotary_and_cache(q, k, v, cos, sin, *caches, slots, interleaved=True)
    assert q_out.shape == (0, 4, 64) and caches[0].isnan().all()


# ---------------------------------------------------------------- launcher errors


def test_launcher_errors():
    x = torch.randn(4, 64, device=DEVICE)
    w = torch.ones(64, device=DEVICE)
    with pytest.raises(ValueError, match="float32, float16 or bfloat16"):
        norm.rms_norm(x.to(torch.int32), w, EPS)
    with pytest.raises(ValueError, match="last dim must be contiguous"):
        norm.rms_norm(torch.randn(64, 4, device=DEVICE).t(), w, EPS)
    with pytest.raises(ValueError, match="weight must be a contiguous"):
        norm.rms_norm(x, torch.ones(32, device=DEVICE), EPS)
    with pytest.raises(ValueError, match="do not collapse"):
        norm.rms_norm(torch.randn(4, 6, 5, 64, device=DEVICE)[:, :3], w, EPS)
    with pytest.raises(ValueError, match="residual shape"):
        norm.fused_add_rms_norm(x, torch.randn(3, 64, device=DEVICE), w, EPS)
    with pytest.raises(ValueError, match="must match in dtype and shape"):
        activation.silu_and_mul(x, x.half())
    with pytest.raises(ValueError, match="last dim must be even"):
        activation.gelu_tanh_and_mul_fused(torch.randn(4, 63, device=DEVICE))


def test_rotary_launcher_errors():
    q, k, v = (torch.randn(3, h, 64, device=DEVICE) for h in (4, 2, 2))
    cos = sin = torch.randn(3, 32, device=DEVICE)
    kc = vc = torch.zeros(2, 16, 2, 64, device=DEVICE)
    slots = torch.arange(3, device=DEVICE)
    with pytest.raises(ValueError, match="rot_dim 160"):
        rotary.apply_rotary(q, k, torch.randn(3, 80), torch.randn(3, 80), interleaved=True)
    with pytest.raises(ValueError, match=r"cos must be \(T=3"):
        rotary.apply_rotary(q, k, cos[:2], sin[:2], interleaved=True)
    with pytest.raises(ValueError, match="share T and head_dim"):
        rotary.apply_rotary(q, k[:, :, :32], cos, sin, interleaved=True)
    with pytest.raises(ValueError, match=r"\(T, heads, head_dim\)"):
        rotary.apply_rotary(q.flatten(1), k, cos, sin, interleaved=True)
    with pytest.raises(ValueError, match="k_cache must be"):
        rotary.rotary_and_cache(q, k, v, cos, sin, kc[:, :, :1], vc, slots, interleaved=True)
    with pytest.raises(ValueError, match="slot_mapping must be int64 or int32"):
        rotary.rotary_and_cache(q, k, v, cos, sin, kc, vc, slots.float(), interleaved=True)
    with pytest.raises(ValueError, match="slot_mapping must be"):
        rotary.rotary_and_cache(q, k, v, cos, sin, kc, vc, slots[:2], interleaved=True)


def test_launcher_refuses_device(monkeypatch):
    """CPU tensors are refused unless the interpreter is on (patched off here)."""
    monkeypatch.setattr(norm, "triton_usable", lambda device: False)
    x = torch.randn(2, 64, device=DEVICE)
    with pytest.raises(ValueError, match=r"needs CUDA tensors \(or TRITON_INTERPRET=1\)"):
        norm.rms_norm(x, None, EPS)
    with pytest.raises(ValueError, match="needs CUDA"):
        activation.silu_and_mul(x, x)


@pytest.mark.skipif(not ON_GPU, reason="CUDA only")
def test_launcher_mixed_devices():
    x = torch.randn(2, 64, device="cuda")
    with pytest.raises(ValueError, match="different devices"):
        norm.rms_norm(x, torch.ones(64), EPS)


# ---------------------------------------------------------------- CUDA graphs


@pytest.mark.skipif(not ON_GPU, reason="CUDA graphs need a GPU")
def test_cuda_graph_replay(gen):
    """Capture norm -> rope + cache write -> activation once, replay on new inputs: the
    replay matches the same kernels run eagerly, bit for bit."""
    t, nh, nkv, d = 8, 8, 2, 64
    x = randn(gen, t, 576, dtype=torch.bfloat16)
    residual, weight = randn(gen, t, 576), randn(gen, 576)
    q, k, v = qkv_split(gen, t, nh, nkv, d, d, torch.bfloat16, fused=True)
    _, cos, sin = rope_tables(gen, t, d, False)
    slots = torch.randperm(64, generator=gen)[:t].to(DEVICE)
    gate_up = randn(gen, t, 2 * 1536, dtype=torch.bfloat16)

    def step(residual, caches):
        h, _ = norm.fused_add_rms_norm(x, residual, weight, EPS)
        q_rot = rotary.rotary_and_cache(q, k, v, cos, sin, *caches, slots, interleaved=False)
        return h, q_rot, activation.silu_and_mul_fused(gate_up)

    caches = nan_caches(4, 16, nkv, d, d, torch.bfloat16)
    step(residual, caches)  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outs = step(residual, caches)
    for src in (x, residual, q, k, v, cos, sin, gate_up):
        src.copy_(torch.randn(src.shape, generator=gen).to(src.dtype))
    slots.copy_(torch.randperm(64, generator=gen)[:t])
    eager_residual, eager_caches = residual.clone(), nan_caches(4, 16, nkv, d, d, torch.bfloat16)
    graph.replay()
    eager = step(eager_residual, eager_caches)
    torch.cuda.synchronize()
    assert torch.equal(residual, eager_residual)
    for got, want in zip(outs, eager, strict=True):
        assert torch.equal(got, want)
    for got, want in zip(caches, eager_caches, strict=True):
        assert torch.equal(got.flatten(0, 1)[slots], want.flatten(0, 1)[slots])
