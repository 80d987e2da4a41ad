"""Quantize float tensors to raw ggml blocks, as llama-quantize (`ggml_quantize_chunk`) does.

Legacy and float types (F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0) without an importance
matrix mirror gguf-py's numpy port of ggml's `quantize_row_*_ref` (ggml-quants.c) operation
by operation in float32, bit-exact with `gguf.quants.quantize`. (llama.cpp agrees with both
except on the sign of d in an all-zero Q4_0 / Q5_0 block of signed zeros: gguf-py, and so
llamapy, write +0, ggml -0.) The k-quants (`quantize_kquants`), IQ4_NL / IQ4_XS
(`quantize_iquants`) and the legacy 4/5-bit types with an imatrix (below) follow ggml's scale
searches (`quantize_search`) and are bit-exact with `ggml_quantize_chunk`. Details that matter
for bit-exactness on every device:

- Division by a constant uses a tensor divisor on the data's device: CUDA turns
  `tensor / python_scalar` into a multiplication by the rounded reciprocal.
- Rounding to the nearest integer is half away from zero (`roundf`, gguf-py's `np_roundf`),
  where torch.round would round half to even; ggml's searches use `nearest_int` instead.
- Sums run sequentially in float32, and square roots go through float64 (torch's float32
  sqrt on AVX CPUs is not correctly rounded).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from llamapy.quant import quantize_iquants as iq
from llamapy.quant import quantize_kquants as kq
from llamapy.quant.quantize_search import (
    div,
    fp16_bytes,
    make_qkx_quants,
    make_qx_quants,
    seq_sum_last,
    sqrtf,
)
from llamapy.quant.types import QuantType, block_size, type_size


def _div(x: torch.Tensor, divisor: float) -> torch.Tensor:
    """`x / divisor`, correctly rounded in float32 (see the module docstring)."""
    return x / torch.tensor(divisor, dtype=x.dtype, device=x.device)


def _inverse(d: torch.Tensor) -> torch.Tensor:
    """gguf-py's `id = np.where(d == 0, 0, 1 / d)`: 1/d, or 0 for an all-zero block."""
    return torch.where(d == 0, 0.0, torch.ones_like(d) / d)


def _roundf(x: torch.Tensor) -> torch.Tensor:
    """gguf-py's `np_roundf`: round half away from zero, like C's roundf."""
    a = x.abs()
    floored = a.floor()
    return x.sign() * (floored + (2 * (a - floored)).floor())


def _fp16_bytes(x: torch.Tensor) -> torch.Tensor:
    """float32 `(N, 1)` -> the little-endian fp16 bytes `(N, 2)` (rounded to nearest even)."""
    return x.to(torch.float16).view(torch.uint8)


def _absmax_signed(blocks: torch.Tensor) -> torch.Tensor:
    """The element of largest magnitude, with its sign; the first one on ties (argmax)."""
    return blocks.gather(-1, blocks.abs().argmax(dim=-1, keepdim=True))


def _finite_or_zero(x: torch.Tensor) -> torch.Tensor:
    """x, with inf and NaN replaced by 0, as numpy's float -> int casts give on x86.

    Only reachable for NaN inputs or when 1/d overflows (a block whose largest magnitude is
    below ~4e-37); torch's own casts of non-finite floats differ between CPU and CUDA.
    """
    return torch.where(x.isfinite(), x, 0.0)


def _truncate(x: torch.Tensor, top: int) -> torch.Tensor:
    """gguf-py's `np.trunc(x).astype(np.uint8).clip(0, top)`; finite x is in [0, top + 1.5]."""
    return _finite_or_zero(x.trunc()).clamp(0, top).to(torch.uint8)


def _pack_nibbles(q: torch.Tensor) -> torch.Tensor:
    """32 values per block -> 16 bytes: low nibble weight j, high nibble weight j + 16."""
    return (q[:, :16] & 0x0F) | (q[:, 16:] << 4)


def _pack_high_bits(q: torch.Tensor) -> torch.Tensor:
    """Bit 4 of 32 five-bit values -> little-endian u32 `qh` as 4 bytes (np.packbits 'little')."""
    bits = ((q >> 4) & 1).view(q.shape[0], 4, 8)
    weights = torch.tensor([1 << i for i in range(8)], dtype=torch.uint8, device=q.device)
    return (bits * weights).sum(dim=-1, dtype=torch.uint8)


def _scale_q_symmetric(blocks: torch.Tensor, nlevels: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Q4_0/Q5_0: d = max / -(nlevels/2) (max signed), q = trunc(x / d + nlevels/2 + 0.5)."""
    half = nlevels // 2
    d = _div(_absmax_signed(blocks), -half)
    q = _truncate(blocks * _inverse(d) + (half + 0.5), nlevels - 1)
    return d, q


def _scale_q_affine(
    blocks: torch.Tensor, nlevels: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Q4_1/Q5_1: d = (max - min) / (nlevels - 1), q = trunc((x - min) / d + 0.5)."""
    # The first min / max, as ggml's scan keeps them (decides the sign of a zero d or m)
    mn = blocks.gather(-1, blocks.argmin(dim=-1, keepdim=True))
    mx = blocks.gather(-1, blocks.argmax(dim=-1, keepdim=True))
    d = _div(mx - mn, nlevels - 1)
    q = _truncate((blocks - mn) * _inverse(d) + 0.5, nlevels - 1)
    return d, mn, q


def quantize_q4_0(blocks: torch.Tensor) -> torch.Tensor:
    """quantize_row_q4_0_ref: {fp16 d; u8 qs[16]}."""
    d, q = _scale_q_symmetric(blocks, 16)
    return torch.cat([_fp16_bytes(d), _pack_nibbles(q)], dim=-1)


def quantize_q4_1(blocks: torch.Tensor) -> torch.Tensor:
    """quantize_row_q4_1_ref: {fp16 d, m; u8 qs[16]}."""
    d, mn, q = _scale_q_affine(blocks, 16)
    return torch.cat([_fp16_bytes(d), _fp16_bytes(mn), _pack_nibbles(q)], dim=-1)


def quantize_q5_0(blocks: torch.Tensor) -> torch.Tensor:
    """quantize_row_q5_0_ref: {fp16 d; u32 qh; u8 qs[16]}."""
    d, q = _scale_q_symmetric(blocks, 32)
    return torch.cat([_fp16_bytes(d), _pack_high_bits(q), _pack_nibbles(q)], dim=-1)


def quantize_q5_1(blocks: torch.Tensor) -> torch.Tensor:
    """quantize_row_q5_1_ref: {fp16 d, m; u32 qh; u8 qs[16]}."""
    d, mn, q = _scale_q_affine(blocks, 32)
    parts = [_fp16_bytes(d), _fp16_bytes(mn), _pack_high_bits(q), _pack_nibbles(q)]
    return torch.cat(parts, dim=-1)


def quantize_q8_0(blocks: torch.Tensor) -> torch.Tensor:
    """quantize_row_q8_0_ref: {fp16 d; i8 qs[32]}, d = amax / 127, q = roundf(x / d)."""
    d = _div(blocks.abs().amax(dim=-1, keepdim=True), 127)
    q = _finite_or_zero(_roundf(blocks * _inverse(d))).to(torch.int8).view(torch.uint8)
    return torch.cat([_fp16_bytes(d), q], dim=-1)


def _u16_bytes(h: torch.Tensor) -> torch.Tensor:
    """Integers in [0, 0xFFFF] `(N, 1)` -> their little-endian bytes `(N, 2)` uint8."""
    return torch.stack([h & 0xFF, h >> 8], dim=-1).to(torch.uint8).view(h.shape[0], 2)


def _f32_bits(blocks: torch.Tensor) -> torch.Tensor:
    """The IEEE bits of float32 values, as non-negative int64."""
    return blocks.contiguous().view(torch.int32).to(torch.int64) & 0xFFFFFFFF


def quantize_bf16(blocks: torch.Tensor) -> torch.Tensor:
    """ggml_compute_fp32_to_bf16: round to nearest even; NaNs are kept, made quiet."""
    n = _f32_bits(blocks)
    is_nan = (n & 0x7FFFFFFF) > 0x7F800000
    n = torch.where(is_nan, (n & 0xFFFF0000) | (64 << 16), n)
    return _u16_bytes((n + (0x7FFF + ((n >> 16) & 1))) >> 16)


def quantize_f16(blocks: torch.Tensor) -> torch.Tensor:
    """numpy's float32 -> float16 (`npy_floatbits_to_halfbits`): round to nearest even.

    torch agrees except on NaN payloads, where numpy keeps the top 10 payload bits as they
    are (a signaling NaN stays signaling; an all-zero result becomes 1) and torch quiets them.
    """
    n = _f32_bits(blocks)
    h = blocks.to(torch.float16).view(torch.int16).to(torch.int64) & 0xFFFF
    nan_h = ((n >> 16) & 0x8000) | 0x7C00 | ((n & 0x7FFFFF) >> 13).clamp(min=1)
    return _u16_bytes(torch.where(blocks.isnan(), nan_h, h))


def quantize_f32(blocks: torch.Tensor) -> torch.Tensor:
    """The float32 bytes themselves (gguf-py returns the float32 array)."""
    return blocks.contiguous().view(torch.uint8)


QUANTIZERS: dict[QuantType, Callable[[torch.Tensor], torch.Tensor]] = {
    QuantType.F32: quantize_f32,
    QuantType.F16: quantize_f16,
    QuantType.BF16: quantize_bf16,
    QuantType.Q4_0: quantize_q4_0,
    QuantType.Q4_1: quantize_q4_1,
    QuantType.Q5_0: quantize_q5_0,
    QuantType.Q5_1: quantize_q5_1,
    QuantType.Q8_0: quantize_q8_0,
}
"""Block quantizers without an imatrix, `(N, block_size)` float32 -> `(N, type_size)`."""

# --- legacy types with an importance matrix (quantize_row_q4_0_impl ... q5_1_impl) ---


def _legacy_weights(rows: torch.Tensor, imatrix: torch.Tensor) -> torch.Tensor:
    """weight = qw * sqrtf(sigma2 + x^2), sigma2 = sum(x^2) / n_per_row over the whole row."""
    num_rows, n = rows.shape
    sigma2 = div(seq_sum_last(rows * rows), torch.full((num_rows,), float(n), device=rows.device))
    return imatrix[None, :] * sqrtf(sigma2[:, None] + rows * rows)


def _q4_0_w(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    d, L = make_qx_quants(x, 8, w)
    return torch.cat([fp16_bytes(d), _pack_nibbles(L.to(torch.uint8))], dim=-1)


def _q5_0_w(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    d, L = make_qx_quants(x, 16, w)
    q = L.to(torch.uint8)
    return torch.cat([fp16_bytes(d), _pack_high_bits(q), _pack_nibbles(q)], dim=-1)


def _q4_1_w(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    d, the_min, L = make_qkx_quants(x, w, 15, -0.9, 0.05, 36, False)
    q = L.to(torch.uint8)
    return torch.cat([fp16_bytes(d), fp16_bytes(-the_min), _pack_nibbles(q)], dim=-1)


def _q5_1_w(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    d, the_min, L = make_qkx_quants(x, w, 31, -0.9, 0.05, 36, False)
    q = L.to(torch.uint8)
    parts = [fp16_bytes(d), fp16_bytes(-the_min), _pack_high_bits(q), _pack_nibbles(q)]
    return torch.cat(parts, dim=-1)


_LEGACY_IMATRIX: dict[QuantType, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    QuantType.Q4_0: _q4_0_w,
    QuantType.Q4_1: _q4_1_w,
    QuantType.Q5_0: _q5_0_w,
    QuantType.Q5_1: _q5_1_w,
}

# Types quantized per super-block (or IQ4_NL block) by ggml's search routines; with an
# imatrix, `fn(x, qw)` gets the block's importances, else None.
_SEARCHED: dict[QuantType, Callable[[torch.Tensor, torch.Tensor | None], torch.Tensor]] = {
    QuantType.Q2_K: kq.quantize_q2_k,
    QuantType.Q3_K: kq.quantize_q3_k,
    QuantType.Q4_K: kq.quantize_q4_k,
    QuantType.Q5_K: kq.quantize_q5_k,
    QuantType.Q6_K: kq.quantize_q6_k,
    QuantType.IQ4_NL: iq.quantize_iq4_nl,
    QuantType.IQ4_XS: iq.quantize_iq4_xs,
}

SUPPORTED_TYPES: frozenset[QuantType] = frozenset(QUANTIZERS) | frozenset(_SEARCHED)
"""Every type `quantize` can make."""

# Types that read an importance matrix (llama.cpp ignores it for Q8_0 and the float types).
IMATRIX_TYPES: frozenset[QuantType] = frozenset(_LEGACY_IMATRIX) | frozenset(_SEARCHED)

# Weights per call of a searched quantizer: its (32, blocks) intermediates stay ~1 MB each.
_CHUNK_WEIGHTS = 1 << 18


def quantize_supported(qtype: QuantType) -> bool:
    """Whether `quantize` can make `qtype` blocks."""
    return qtype in SUPPORTED_TYPES


def _quantize_rows(
    rows: torch.Tensor, qtype: QuantType, imatrix: torch.Tensor | None
) -> torch.Tensor:
    """float32 rows `(R, n)` -> `(R, n // bs * ts)` uint8."""
    num_rows, n = rows.shape
    bs = block_size(qtype)
    if qtype in QUANTIZERS and (imatrix is None or qtype not in _LEGACY_IMATRIX):
        return QUANTIZERS[qtype](rows.reshape(-1, bs)).reshape(num_rows, -1)
    step = max(1, _CHUNK_WEIGHTS // n)
    parts = []
    for start in range(0, num_rows, step):  # bounds memory; each call is vectorized
        chunk = rows[start : start + step]
        parts.append(_quantize_chunk(chunk, qtype, imatrix).reshape(chunk.shape[0], -1))
    return torch.cat(parts) if len(parts) > 1 else parts[0]


def _quantize_chunk(
    rows: torch.Tensor, qtype: QuantType, imatrix: torch.Tensor | None
) -> torch.Tensor:
    """A searched type (or a legacy one with an imatrix) for rows `(R, n)`."""
    num_rows, n = rows.shape
    bs = block_size(qtype)
    blocks = rows.reshape(-1, bs)
    if qtype in _LEGACY_IMATRIX:
        assert imatrix is not None
        return _LEGACY_IMATRIX[qtype](blocks, _legacy_weights(rows, imatrix).reshape(-1, bs))
    qw = None
    if imatrix is not None:
        qw = imatrix.view(1, n // bs, bs).expand(num_rows, -1, -1).reshape(-1, bs)
    return _SEARCHED[qtype](blocks, qw)


def quantize(
    x: torch.Tensor, qtype: QuantType, imatrix: torch.Tensor | None = None
) -> torch.Tensor:
    """Floats `(..., n)` -> raw `qtype` blocks `(..., n // block_size * type_size)` (uint8).

    The blocks are those of llama.cpp's `ggml_quantize_chunk` (what llama-quantize writes),
    and for the types gguf-py can quantize, bit-identical with `gguf.quants.quantize`.

    Args:
        x: the weights, converted to float32 first (as gguf-py and llama-quantize do).
        qtype: one of `SUPPORTED_TYPES`.
        imatrix: per-column importances `(n,)` (llama-imatrix's mean squared activations),
            or None. Used as llama.cpp uses it: by the k-quants, IQ4_NL / IQ4_XS and
            Q4_0 / Q4_1 / Q5_0 / Q5_1; ignored for Q8_0 and the float types, as in llama.cpp.

    Raises:
        ValueError: a type without a quantizer here, `n` not a whole number of blocks, or an
            imatrix of the wrong shape or with non-finite or negative values.
    """
    if qtype not in SUPPORTED_TYPES:
        names = ", ".join(t.name for t in sorted(SUPPORTED_TYPES, key=lambda t: t.value))
        raise ValueError(f"quantizing to {qtype.name} is not supported (supported: {names})")
    if x.dim() == 0:
        raise ValueError("cannot quantize a 0-dimensional tensor; give it a last dimension")
    bs, ts = block_size(qtype), type_size(qtype)
    n = x.shape[-1]
    if n % bs:
        raise ValueError(
            f"last dimension {n} is not a multiple of the {qtype.name} block size {bs}"
        )
    lead = x.shape[:-1]
    rows = x.to(torch.float32).reshape(-1, n)
    qw = _check_imatrix(imatrix, n, x.device) if qtype in IMATRIX_TYPES else None
    if rows.shape[0] == 0:
        return torch.empty(*lead, n // bs * ts, dtype=torch.uint8, device=x.device)
    return _quantize_rows(rows, qtype, qw).reshape(*lead, n // bs * ts)


def _check_imatrix(
    imatrix: torch.Tensor | None, n: int, device: torch.device
) -> torch.Tensor | None:
    if imatrix is None:
        return None
    if imatrix.shape != (n,):
        raise ValueError(
            f"imatrix has shape {tuple(imatrix.shape)}; expected ({n},), one value per column"
        )
    qw = imatrix.to(device=device, dtype=torch.float32).contiguous()
    if not bool(torch.isfinite(qw).all()) or bool((qw < 0).any()):
        raise ValueError("imatrix values must be finite and non-negative")
    return qw
