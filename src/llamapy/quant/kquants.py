"""Dequantizers of the k-quants (256-weight super-blocks): Q2_K, Q3_K, Q4_K, Q5_K, Q6_K.

Each mirrors ggml's `dequantize_row_q*_K` (ggml-quants.c) as ported to numpy by gguf-py
(`gguf.quants`): the sub-block scales are formed first in float32 (`d * sc`, `dmin * m`),
then applied to the quants with one float32 rounding per operation, so results are
bit-identical. Q8_K is left out: gguf-py cannot dequantize it either (it only ever holds
activations inside ggml's dot products, never weights in a file).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from llamapy.quant.legacy import fp16_field, unpack_bits
from llamapy.quant.types import QuantType

QK_K = 256
K_SCALE_SIZE = 12


def dequant_q2_k(blocks: torch.Tensor) -> torch.Tensor:
    """block_q2_K {u8 scales[16]; u8 qs[64]; fp16 d, dmin} (dequantize_row_q2_K).

    16 sub-blocks of 16: x = (d * (sc & 15)) * q - dmin * (sc >> 4), q in 0..3.
    """
    n = blocks.shape[0]
    scales, qs = blocks[:, :16], blocks[:, 16:80]
    d, dmin = fp16_field(blocks, 80), fp16_field(blocks, 82)
    dl = (d * (scales & 0x0F).to(torch.float32)).view(n, 16, 1)
    ml = (dmin * (scales >> 4).to(torch.float32)).view(n, 16, 1)
    # Each 32-byte half holds 128 weights: 2 bits at shift 0, 2, 4, 6 for 4 runs of 32.
    q = unpack_bits(qs.reshape(n, 2, 32), (0, 2, 4, 6), 0x03).reshape(n, 16, 16)
    return (dl * q.to(torch.float32) - ml).reshape(n, QK_K)


def _q3_k_scales(scales: torch.Tensor) -> torch.Tensor:
    """12 bytes -> 16 signed 6-bit scales: low 4 bits from bytes 0..7, high 2 from 8..11."""
    n = scales.shape[0]
    low = unpack_bits(scales[:, :8], (0, 4), 0x0F).reshape(n, 16)
    high = unpack_bits(scales[:, 8:], (0, 2, 4, 6), 0x03).reshape(n, 16)
    return ((low | (high << 4)).to(torch.int8) - 32).to(torch.float32)


def dequant_q3_k(blocks: torch.Tensor) -> torch.Tensor:
    """block_q3_K {u8 hmask[32]; u8 qs[64]; u8 scales[12]; fp16 d} (dequantize_row_q3_K).

    16 sub-blocks of 16: x = (d * (sc - 32)) * (q - (hbit ? 0 : 4)), q in 0..3.
    """
    n = blocks.shape[0]
    hmask, qs, scales = blocks[:, :32], blocks[:, 32:96], blocks[:, 96:108]
    d = fp16_field(blocks, 108)
    dl = (d * _q3_k_scales(scales)).view(n, 16, 1)
    ql = unpack_bits(qs.reshape(n, 2, 32), (0, 2, 4, 6), 0x03).reshape(n, 16, 16)
    qh = unpack_bits(hmask, tuple(range(8)), 0x01).reshape(n, 16, 16)
    # The high bit *removes* an offset of 4: it is set when the weight is non-negative.
    q = ql.to(torch.int8) - ((qh ^ 1) << 2).to(torch.int8)
    return (dl * q.to(torch.float32)).reshape(n, QK_K)


def _k_scale_min(scales: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """12 bytes -> 8 six-bit scales and 8 six-bit mins (get_scale_min_k4 in ggml-quants.c)."""
    n = scales.shape[0]
    d, m, m_d = scales[:, 0:4], scales[:, 4:8], scales[:, 8:12]
    sc = torch.cat([d & 0x3F, (m_d & 0x0F) | ((d >> 2) & 0x30)], dim=-1)
    mn = torch.cat([m & 0x3F, (m_d >> 4) | ((m >> 2) & 0x30)], dim=-1)
    return sc.reshape(n, 8), mn.reshape(n, 8)


def _k_scales(blocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Q4_K/Q5_K header {fp16 d, dmin; u8 scales[12]} -> d * sc and dmin * m, `(N, 8, 1)`."""
    n = blocks.shape[0]
    d, dmin = fp16_field(blocks, 0), fp16_field(blocks, 2)
    sc, mn = _k_scale_min(blocks[:, 4:16])
    dl = (d * sc.to(torch.float32)).view(n, 8, 1)
    ml = (dmin * mn.to(torch.float32)).view(n, 8, 1)
    return dl, ml


def dequant_q4_k(blocks: torch.Tensor) -> torch.Tensor:
    """block_q4_K {fp16 d, dmin; u8 scales[12]; u8 qs[128]} (dequantize_row_q4_K).

    8 sub-blocks of 32: x = (d * sc) * q - dmin * m, q in 0..15.
    """
    n = blocks.shape[0]
    dl, ml = _k_scales(blocks)
    # Each 32-byte chunk holds 64 weights: low nibbles first, then high nibbles.
    q = unpack_bits(blocks[:, 16:].reshape(n, 4, 32), (0, 4), 0x0F).reshape(n, 8, 32)
    return (dl * q.to(torch.float32) - ml).reshape(n, QK_K)


def dequant_q5_k(blocks: torch.Tensor) -> torch.Tensor:
    """block_q5_K {fp16 d, dmin; u8 scales[12]; u8 qh[32]; u8 qs[128]} (dequantize_row_q5_K).

    8 sub-blocks of 32: x = (d * sc) * q - dmin * m, q in 0..31; bit j of each qh byte is the
    fifth bit of sub-block j.
    """
    n = blocks.shape[0]
    dl, ml = _k_scales(blocks)
    qh, qs = blocks[:, 16:48], blocks[:, 48:]
    ql = unpack_bits(qs.reshape(n, 4, 32), (0, 4), 0x0F).reshape(n, 8, 32)
    hi = unpack_bits(qh, tuple(range(8)), 0x01)  # (n, 8, 32)
    q = ql | (hi << 4)
    return (dl * q.to(torch.float32) - ml).reshape(n, QK_K)


def dequant_q6_k(blocks: torch.Tensor) -> torch.Tensor:
    """block_q6_K {u8 ql[128]; u8 qh[64]; i8 scales[16]; fp16 d} (dequantize_row_q6_K).

    16 sub-blocks of 16: x = (d * sc) * (q - 32), q in 0..63.
    """
    n = blocks.shape[0]
    ql, qh, scales = blocks[:, :128], blocks[:, 128:192], blocks[:, 192:208]
    d = fp16_field(blocks, 208)
    dl = (d * scales.contiguous().view(torch.int8).to(torch.float32)).view(n, 16, 1)
    # Per 128-weight half: ql's 64 bytes give low nibbles of weights 0..63 and high nibbles
    # of 64..127; qh's 32 bytes give 2 bits at shifts 0, 2, 4, 6 for runs of 32.
    lo = unpack_bits(ql.reshape(n, 2, 64), (0, 4), 0x0F).reshape(n, 8, 32)
    hi = unpack_bits(qh.reshape(n, 2, 32), (0, 2, 4, 6), 0x03).reshape(n, 8, 32)
    q = ((lo | (hi << 4)).to(torch.int8) - 32).reshape(n, 16, 16)
    return (dl * q.to(torch.float32)).reshape(n, QK_K)


DEQUANTIZERS: dict[QuantType, Callable[[torch.Tensor], torch.Tensor]] = {
    QuantType.Q2_K: dequant_q2_k,
    QuantType.Q3_K: dequant_q3_k,
    QuantType.Q4_K: dequant_q4_k,
    QuantType.Q5_K: dequant_q5_k,
    QuantType.Q6_K: dequant_q6_k,
}
