"""llama.cpp's CPU numerics, step for step, in torch (`LLAMAPY_CPU_KERNELS=ggml`).

llamapy computes the float function a GGUF file defines; llama.cpp's CPU backend rounds
intermediate values on the way. This module reproduces those roundings, so that llamapy
gives llama.cpp's logits (to float32 summation order) rather than the exact ones. What
llama.cpp (ggml-cpu, as built by llama-cpp-python 0.3.36 for x86-64 with AVX2/AVX-512 and
`flash_attn=False`, its default) rounds, and where:

  matmul inputs   every `ggml_mul_mat` with a quantized weight first converts its float32
                  input to the weight type's `vec_dot_type` (ggml-cpu.c `type_traits_cpu`):
                  Q8_0 for Q4_0 / Q5_0 / Q8_0 / IQ4_NL / MXFP4, Q8_1 for Q4_1 / Q5_1, Q8_K for
                  the K-quants, IQ2/IQ3/IQ1 and IQ4_XS; F16 for F16 weights, BF16 for BF16.
                  The integer dot products are exact, so quantize-dequantize the input, then
                  a float32 matmul with the dequantized weight, gives the same sums up to
                  their order, except Q8_1's `s = d * sum(q)`, an fp16 that the Q4_1 / Q5_1
                  dot adds times the weight's `m`: emulated as stored (`_q8_1_matmul`).
                  The repacked Q4_K path (repack.cpp, AVX2: Q8_Kx4 rows) and llamafile's
                  tinyBLAS quantize to the same values.
  attention       K and V are cached as F16; `kq = mul_mat(k, q)` converts Q to F16;
                  `soft_max_ext` is float32 with a double sum; `kqv = mul_mat(v, kq)` converts
                  the probabilities to F16 (llama-graph.cpp `build_attn_mha`, non-flash).
  GELU            `ggml_vec_geglu_f32` reads a 65536-entry table of GELU at every fp16
                  input, itself rounded to fp16 (vec.h `GGML_GELU_FP16`).

Every emulated step was checked against llama.cpp's own intermediate tensors (its eval
callback) and its compiled quantizers, dot products and GELU table: equal to float32
summation order. SiLU, norms and rope are float32 in both; their remaining differences (a
double sum in `rms_norm`, a float32 running product for rope angles, FMA contraction,
ggml's own expf) are not emulated.

What this does not give: bit-identical logits. Quantizing activations is discontinuous, so a
last-bit difference in any float32 sum (ggml's SIMD lane order is not torch's) flips an 8-bit
rounding now and then, and through attention the flip reaches every later token; the result
disagrees with llama.cpp about as much as llama.cpp disagrees with itself when only its
summation order changes (n_batch 512 vs 1). Figures: benchmarks/kernels/CPU_NOTES.md.

`GgmlNumerics` switches each emulated rounding on or off (all on by default; the others are
for measuring what each one contributes). The mode is the matmul kernel `QLinear.prepare`
chose (`pack_weight_ggml`) plus, for attention and GELU, the numerics `install(model)`
makes active during the model's forward pass (`active()`; layers/attention.py and
layers/activation.py consult it on the CPU).
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass

import torch

from llamapy.layers.attention import AttentionMetadata
from llamapy.quant.dequant import dequantize
from llamapy.quant.types import QuantType, row_nbytes, type_size

Q8_0, Q8_1, Q8_K = QuantType.Q8_0, QuantType.Q8_1, QuantType.Q8_K
F32, F16, BF16 = QuantType.F32, QuantType.F16, QuantType.BF16

# The activation type of each weight type's dot product (ggml-cpu.c `type_traits_cpu`).
VEC_DOT_TYPE: dict[QuantType, QuantType] = {
    F32: F32,
    F16: F16,
    BF16: BF16,
    **dict.fromkeys(
        [QuantType.Q4_0, QuantType.Q5_0, QuantType.Q8_0, QuantType.IQ4_NL, QuantType.MXFP4], Q8_0
    ),
    **dict.fromkeys([QuantType.Q4_1, QuantType.Q5_1], Q8_1),
    **dict.fromkeys(
        [
            QuantType.Q2_K,
            QuantType.Q3_K,
            QuantType.Q4_K,
            QuantType.Q5_K,
            QuantType.Q6_K,
            QuantType.IQ2_XXS,
            QuantType.IQ2_XS,
            QuantType.IQ2_S,
            QuantType.IQ3_XXS,
            QuantType.IQ3_S,
            QuantType.IQ1_S,
            QuantType.IQ1_M,
            QuantType.IQ4_XS,
            QuantType.TQ1_0,
            QuantType.TQ2_0,
        ],
        Q8_K,
    ),
}
# Byte offset of the fp16 `m` of the types whose dot with Q8_1 adds m * s.
_MIN_OFFSET = {QuantType.Q4_1: 2, QuantType.Q5_1: 2}


@dataclass(frozen=True, slots=True)
class GgmlNumerics:
    """Which of llama.cpp's CPU roundings to emulate (all of them unless measuring)."""

    activations: bool = True  # matmul inputs through the weight type's vec_dot_type
    q8_1_sum_fp16: bool = True  # Q8_1's s = d * sum(q) as its fp16 (else the exact d * sum)
    kv_f16: bool = True  # K and V cached as F16
    q_f16: bool = True  # Q converted to F16 for the K.Q product
    probs_f16: bool = True  # softmax output converted to F16 for the V product
    gelu_fp16_table: bool = True  # GELU through ggml's fp16 table


ALL = GgmlNumerics()
_ACTIVE: ContextVar[GgmlNumerics | None] = ContextVar("llamapy_ggml_numerics", default=None)


def active() -> GgmlNumerics | None:
    """The numerics to emulate in the forward pass now running; None outside ggml mode."""
    return _ACTIVE.get()


@contextmanager
def emulating(numerics: GgmlNumerics = ALL) -> Iterator[None]:
    """Make `numerics` active for this thread (an outer call wins over `install`'s hooks)."""
    token = _ACTIVE.set(numerics)
    try:
        yield
    finally:
        _ACTIVE.reset(token)


def install(model: torch.nn.Module, numerics: GgmlNumerics = ALL) -> None:
    """Emulate llama.cpp's attention and GELU roundings in every forward pass of `model`
    (its matmuls follow from `QLinear.prepare(..., "ggml")`)."""
    tokens = []

    def enter(module, args):
        tokens.append(_ACTIVE.set(_ACTIVE.get() or numerics))

    def leave(module, args, output):
        _ACTIVE.reset(tokens.pop())

    model.register_forward_pre_hook(enter)
    model.register_forward_hook(leave, always_call=True)


# -- activation quantizers (ggml-cpu/arch/x86/quants.c, ggml-quants.c) --------------------


def quantize_q8_0(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x (..., K) float32 -> (q (N, 32) int8, d (N,) float16) as x86 `quantize_row_q8_0`:
    d = amax / 127 stored as fp16, q = round-half-even(x * (127 / amax))."""
    q, d = _q8_legacy(x)
    return q.to(torch.int8), d.to(torch.float16)


def quantize_q8_1(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x (..., K) -> (q (N, 32) int8, d (N,) float16, s (N,) float16) as x86
    `quantize_row_q8_1`: q and d as Q8_0, s = fp16(d * sum(q)) with d before its rounding."""
    q, d = _q8_legacy(x)
    s = d * q.sum(-1)  # the int32 sum is exact in float32 (|sum| <= 32 * 127)
    return q.to(torch.int8), d.to(torch.float16), s.to(torch.float16)


def _q8_legacy(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(q as float32 (N, 32), d float32 (N,)) of 32-blocks: the AVX path's arithmetic."""
    xb = x.reshape(-1, 32).float()
    amax = xb.abs().amax(-1)
    d = amax / 127.0
    inv = torch.where(amax != 0, _rdiv(127.0, amax), torch.zeros_like(amax))
    return torch.round(xb * inv[:, None]), d  # _mm256_round_ps: half to even


def quantize_q8_K(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x (..., K) -> (q (N, 256) int8, d (N,) float32, bsums (N, 16) int16) as
    `quantize_row_q8_K_ref` (x86 uses it as is): the element of largest magnitude (the first
    one) maps to -127, iscale = -127 / max, q = min(127, nearest_int(iscale * x)),
    d = 1 / iscale. (The repacked Q4_K path's Q8_Kx4 differs only when a block's largest
    magnitude occurs with both signs: it then takes the positive one.)"""
    xb = x.reshape(-1, 256).float()
    idx = xb.abs().argmax(-1, keepdim=True)  # the first largest, as the C loop's `>`
    mx = xb.gather(-1, idx)[:, 0]
    nonzero = mx != 0
    iscale = torch.where(nonzero, _rdiv(-127.0, mx), torch.zeros_like(mx))
    q = torch.round(xb * iscale[:, None]).clamp_max(127)  # nearest_int: half to even
    d = torch.where(nonzero, _rdiv(1.0, iscale), torch.zeros_like(mx))
    bsums = q.view(-1, 16, 16).sum(-1)
    return q.to(torch.int8), d, bsums.to(torch.int16)


def _rdiv(a: float, t: torch.Tensor) -> torch.Tensor:
    """a / t rounded once, as C divides (torch computes `a / t` as `a * (1 / t)`)."""
    return torch.full_like(t, a) / t


def fake_quantize(x: torch.Tensor, act_type: QuantType) -> torch.Tensor:
    """x (T, K) float32 -> the values the dot product sees: x through `act_type` and back."""
    if act_type == F32:
        return x.float()
    if act_type in (F16, BF16):
        return x.to(torch.float16 if act_type == F16 else torch.bfloat16).float()
    if act_type in (Q8_0, Q8_1):
        q, d = quantize_q8_0(x)
        return (q.float() * d.float()[:, None]).view(x.shape)
    if act_type == Q8_K:
        q, d, _ = quantize_q8_K(x)
        return (q.float() * d[:, None]).view(x.shape)
    raise ValueError(f"no activation quantizer for {act_type.name}")


# -- matmul -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class GgmlWeight:
    """A weight as the ggml-numerics matmul reads it.

    `dense` is the dequantized weight (N, K) float32; for the types whose dot with Q8_1 adds
    `m * s` (Q4_1, Q5_1) it holds only the `d * q` part and `mins` (N, K / 32) the `m`s.
    """

    qtype: QuantType
    act_type: QuantType
    dense: torch.Tensor
    mins: torch.Tensor | None = None

    @property
    def nbytes(self) -> int:
        return self.dense.nbytes + (0 if self.mins is None else self.mins.nbytes)


def pack_weight_ggml(data: torch.Tensor, qtype: QuantType, shape: tuple[int, int]) -> GgmlWeight:
    """ggml blocks `data` (N, row_bytes) uint8 of a (N, K) weight -> `GgmlWeight` (once)."""
    n, k = shape
    if data.dtype != torch.uint8 or tuple(data.shape) != (n, row_nbytes(qtype, k)):
        raise ValueError(
            f"expected uint8 blocks of shape ({n}, {row_nbytes(qtype, k)}) for a {qtype.name} "
            f"({n}, {k}) weight, got {data.dtype} {tuple(data.shape)}"
        )
    act_type = VEC_DOT_TYPE.get(qtype)
    if act_type is None:
        raise ValueError(f"ggml numerics: no CPU dot product for {qtype.name} weights")
    offset = _MIN_OFFSET.get(qtype)
    if offset is None:
        return GgmlWeight(qtype, act_type, dequantize(data, qtype))
    blocks = data.reshape(n, -1, type_size(qtype))  # (N, K / 32, bytes)
    mins = blocks[..., offset : offset + 2].contiguous().view(torch.float16).float()[..., 0]
    no_min = blocks.clone()
    no_min[..., offset : offset + 2] = 0  # d * q + 0 is d * q exactly
    return GgmlWeight(qtype, act_type, dequantize(no_min.view(n, -1), qtype), mins)


def ggml_matmul(
    x: torch.Tensor, w: GgmlWeight, bias: torch.Tensor | None, numerics: GgmlNumerics = ALL
) -> torch.Tensor:
    """y = x W^T (+ b) as ggml-cpu's `mul_mat` computes it: x (..., K) float32."""
    lead, k = x.shape[:-1], x.shape[-1]
    x2 = x.reshape(-1, k).float()
    if w.mins is not None:
        y = _q8_1_matmul(x2, w, numerics)
    else:
        xq = fake_quantize(x2, w.act_type) if numerics.activations else x2
        y = xq @ w.dense.T
    if bias is not None:
        y = y + bias
    return y.view(*lead, -1)


def _q8_1_matmul(x: torch.Tensor, w: GgmlWeight, numerics: GgmlNumerics) -> torch.Tensor:
    """Q4_1 / Q5_1 against Q8_1: sum over blocks of d_w d_x sum(q_w q_x) + m_w s_x, with
    s_x = fp16(d_x * sum(q_x)) (ggml_vec_dot_q4_1_q8_1)."""
    if not numerics.activations:
        return x @ w.dense.T + x.view(x.shape[0], -1, 32).sum(-1) @ w.mins.T
    q, d, s = quantize_q8_1(x)
    xq = (q.float() * d.float()[:, None]).view(x.shape)
    if not numerics.q8_1_sum_fp16:  # what the fp16 s stands for: d_x * sum(q_x) exactly
        s = xq.view(-1, 32).sum(-1)
    return xq @ w.dense.T + s.float().view(x.shape[0], -1) @ w.mins.T


# -- attention (llama-graph.cpp build_attn_mha, flash_attn off; ops.cpp soft_max_f32) ------


def paged_attention_ggml(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    meta: AttentionMetadata,
    *,
    scale: float,
    sliding_window: int | None = None,
    softcap: float | None = None,
    causal: bool = True,
    numerics: GgmlNumerics = ALL,
) -> torch.Tensor:
    """`paged_attention_reference` with llama.cpp's roundings: K, V as F16 (whatever the
    cache's dtype), Q as F16, float32 scores, softmax with a double sum and one float32
    reciprocal, probabilities as F16, float32 sums. The scale multiplies the scores (ggml's
    soft_max_ext: exact for power-of-two scales, which models that pre-scale Q use)."""
    n_heads, n_kv = q.shape[1], k_cache.shape[2]
    group = n_heads // n_kv
    block_size = k_cache.shape[1]
    out = torch.empty(q.shape[0], n_heads, v_cache.shape[-1], dtype=torch.float32)
    starts = meta.query_start_loc_host
    q = _round(q.float(), torch.float16, numerics.q_f16)
    for b, seq_len in enumerate(meta.seq_lens_host):
        qs, qe = starts[b], starts[b + 1]
        blocks = meta.block_tables[b, : -(-seq_len // block_size)].long()
        k = _round(k_cache[blocks].flatten(0, 1)[:seq_len], torch.float16, numerics.kv_f16)
        v = _round(v_cache[blocks].flatten(0, 1)[:seq_len], torch.float16, numerics.kv_f16)
        qb = q[qs:qe].view(qe - qs, n_kv, group, -1)  # (Tq, n_kv, g, d)
        scores = torch.einsum("qhgd,khd->hgqk", qb, k) * scale  # (n_kv, g, Tq, L)
        if softcap:
            scores = torch.tanh(scores * (1.0 / softcap)) * softcap
        q_pos = torch.arange(seq_len - (qe - qs), seq_len)[:, None]
        k_pos = torch.arange(seq_len)[None, :]
        visible = k_pos <= q_pos if causal else torch.ones_like(k_pos <= q_pos)
        if sliding_window is not None:
            visible = visible & (q_pos - k_pos < sliding_window)
        probs = _softmax(scores.masked_fill(~visible, float("-inf")))
        probs = _round(probs, torch.float16, numerics.probs_f16)
        out[qs:qe] = torch.einsum("hgqk,khd->qhgd", probs, v).reshape(qe - qs, n_heads, -1)
    return out.to(q.dtype)


def _softmax(scores: torch.Tensor) -> torch.Tensor:
    """ggml_vec_soft_max_f32: exp(x - max) in float32, summed in double, times the float32
    of 1 / sum."""
    e = torch.exp(scores - scores.amax(-1, keepdim=True))
    inv = _rdiv(1.0, e.double().sum(-1, keepdim=True)).float()
    return e * inv


def _round(x: torch.Tensor, dtype: torch.dtype, enabled: bool) -> torch.Tensor:
    """x through `dtype` (round to nearest even) and back to float32, when enabled."""
    return x.to(dtype).float() if enabled else x.float()


# -- GELU (vec.h GGML_GELU_FP16) -----------------------------------------------------------

GELU_COEF_A = 0.044715
SQRT_2_OVER_PI = 0.79788456080286535587989211986876


@functools.cache
def gelu_fp16_table() -> torch.Tensor:
    """ggml_table_gelu_f16 as float32 (65536,): entry i is fp16(ggml_gelu_f32(x)) for the
    fp16 x whose bits are i; ggml_gelu_f32 = 0.5x(1 + tanh(sqrt(2/pi) x (1 + 0.044715 x^2)))
    in float32, as the compiler built it: `1 + (a x) x` fused into one FMA, tanhf correctly
    rounded (this reproduces llama-cpp-python 0.3.36's table bit for bit)."""
    x = torch.arange(65536, dtype=torch.int32).to(torch.int16).view(torch.float16).float()
    ax = GELU_COEF_A * x
    poly = (ax.double() * x.double() + 1.0).float()  # fmaf(a x, x, 1): one rounding
    inner = (SQRT_2_OVER_PI * x) * poly
    y = (0.5 * x) * (1.0 + torch.tanh(inner.double()).float())
    return y.to(torch.float16).float()


def gelu_tanh_and_mul_ggml(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """ggml_vec_geglu_f32: 0 for gate <= -10, gate * up for gate >= 10, else the table's
    GELU at fp16(gate), times up."""
    gate, up = gate.float(), up.float()
    bits = gate.to(torch.float16).view(torch.int16).long() & 0xFFFF
    gelu = gelu_fp16_table()[bits]
    gelu = torch.where(gate >= 10.0, gate, gelu)
    return torch.where(gate <= -10.0, torch.zeros_like(gate), gelu * up)
