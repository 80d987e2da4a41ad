"""Quantize float tensors to raw ggml blocks, bit-exact with `gguf.quants.quantize`.

Supported: F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0. Each quantizer mirrors gguf-py's numpy
port of ggml's `quantize_row_*_ref` (ggml-quants.c) operation by operation in float32. Two
details matter for bit-exactness on every device:

- Division by a constant uses a tensor divisor on the data's device: CUDA turns
  `tensor / python_scalar` into a multiplication by the rounded reciprocal.
- Rounding to the nearest integer is half away from zero (`roundf`, gguf-py's `np_roundf`),
  where torch.round would round half to even.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

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
    mn = blocks.amin(dim=-1, keepdim=True)
    mx = blocks.amax(dim=-1, keepdim=True)
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


def quantize(x: torch.Tensor, qtype: QuantType) -> torch.Tensor:
    """Floats `(..., n)` -> raw `qtype` blocks `(..., n // block_size * type_size)` (uint8).

    The input is first converted to float32, as gguf-py does. Raises ValueError for a type
    without a quantizer here, or when `n` is not a whole number of blocks.
    """
    fn = QUANTIZERS.get(qtype)
    if fn is None:
        names = ", ".join(t.name for t in QUANTIZERS)
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
    blocks = x.to(torch.float32).reshape(x.numel() // bs, bs)
    return fn(blocks).reshape(*lead, n // bs * ts)
