"""Dequantizers of ggml's i-quants (IQ1_S ... IQ4_XS), bit-exact with gguf-py.

Each function mirrors ggml's `dequantize_row_iq*` (ggml-quants.c) in the vectorized shape of
gguf-py's numpy port (gguf/quants.py), keeping its float32 arithmetic in the same order: the
block scale is fp16 -> float32, sub-block scales are computed in float32 exactly as gguf-py
writes them, then `scale * grid * sign` left to right. Grid and sign lookups come from
`grids.table` (cached per device). Blocks are `(N, type_size)` uint8, results `(N, 256)`
float32 (`(N, 32)` for IQ4_NL).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from llamapy.quant.grids import f16, nibbles, spread, table, u16, u32
from llamapy.quant.types import QuantType

QK_K = 256


def _signs_and_scale(aux: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """IQ2_XXS / IQ3_XXS sub-block word (N, 8) -> (ksigns indices (N, 8, 4), scale (N, 8)).

    The low 28 bits are four 7-bit indices into ksigns_iq2xs, the top 4 bits the scale.
    """
    return spread(aux, [0, 7, 14, 21]) & 0x7F, (aux >> 28).to(torch.float32)


def dequant_iq2_xxs(blocks: torch.Tensor) -> torch.Tensor:
    """IQ2_XXS (66 B): dequantize_row_iq2_xxs. Per 32 weights: 4 grid bytes + a uint32 aux."""
    n, dev = blocks.shape[0], blocks.device
    d = f16(blocks[:, :2])  # (n, 1)
    qs = blocks[:, 2:].reshape(n, 8, 8)
    sidx, sc = _signs_and_scale(u32(qs[..., 4:]).reshape(n, 8))
    db = d * (0.5 + sc) * 0.25  # float32, as gguf-py
    signs = table("ksigns", dev)[sidx]  # (n, 8, 4, 8)
    grid = table("iq2xxs", dev)[qs[..., :4].long()]  # (n, 8, 4, 8)
    return (db[..., None, None] * grid * signs).reshape(n, QK_K)


def dequant_iq2_xs(blocks: torch.Tensor) -> torch.Tensor:
    """IQ2_XS (74 B): dequantize_row_iq2_xs. uint16 codes = 9-bit grid index | ksigns << 9."""
    n, dev = blocks.shape[0], blocks.device
    d = f16(blocks[:, :2])
    qs = u16(blocks[:, 2:66]).long()  # (n, 32)
    sc = (spread(blocks[:, 66:74], [0, 4]) & 0x0F).reshape(n, 16)  # one scale per 16
    db = d * (0.5 + sc.to(torch.float32)) * 0.25
    signs = table("ksigns", dev)[qs >> 9].reshape(n, 16, 2, 8)
    grid = table("iq2xs", dev)[qs & 511].reshape(n, 16, 2, 8)
    return (db[..., None, None] * grid * signs).reshape(n, QK_K)


def dequant_iq2_s(blocks: torch.Tensor) -> torch.Tensor:
    """IQ2_S (82 B): dequantize_row_iq2_s. 10-bit grid index (qs | 2 bits of qh), sign bytes."""
    n, dev = blocks.shape[0], blocks.device
    d = f16(blocks[:, :2])
    qs, sgn = blocks[:, 2:34].long(), blocks[:, 34:66].long()
    qh = blocks[:, 66:74].long()
    sc = (spread(blocks[:, 74:82], [0, 4]) & 0x0F).reshape(n, 16)
    db = d * (0.5 + sc.to(torch.float32)) * 0.25
    signs = table("bits", dev)[sgn].reshape(n, 16, 2, 8)
    idx = qs | ((spread(qh, [0, 2, 4, 6]) & 0x03) << 8).reshape(n, 32)
    grid = table("iq2s", dev)[idx].reshape(n, 16, 2, 8)
    return (db[..., None, None] * grid * signs).reshape(n, QK_K)


def dequant_iq3_xxs(blocks: torch.Tensor) -> torch.Tensor:
    """IQ3_XXS (98 B): dequantize_row_iq3_xxs. 64 grid bytes (4 weights each), 8 uint32 aux."""
    n, dev = blocks.shape[0], blocks.device
    d = f16(blocks[:, :2])
    sidx, sc = _signs_and_scale(u32(blocks[:, 66:98]))
    db = d * (0.5 + sc) * 0.5
    signs = table("ksigns", dev)[sidx]  # (n, 8, 4, 8)
    grid = table("iq3xxs", dev)[blocks[:, 2:66].long()].reshape(n, 8, 4, 8)
    return (db[..., None, None] * grid * signs).reshape(n, QK_K)


def dequant_iq3_s(blocks: torch.Tensor) -> torch.Tensor:
    """IQ3_S (110 B): dequantize_row_iq3_s. 9-bit grid index (qs | 1 bit of qh), sign bytes."""
    n, dev = blocks.shape[0], blocks.device
    d = f16(blocks[:, :2])
    qs, qh = blocks[:, 2:66].long(), blocks[:, 66:74].long()
    sgn = blocks[:, 74:106].long()
    sc = (spread(blocks[:, 106:110], [0, 4]) & 0x0F).reshape(n, 8)
    db = d * (1 + 2 * sc).to(torch.float32)  # gguf-py: float32 d times the integer 1 + 2 s
    signs = table("bits", dev)[sgn].reshape(n, 8, 4, 8)
    idx = qs | ((spread(qh, list(range(8))) & 0x01) << 8).reshape(n, 64)
    grid = table("iq3s", dev)[idx].reshape(n, 8, 4, 8)
    return (db[..., None, None] * grid * signs).reshape(n, QK_K)


def _iq1_delta(bit: torch.Tensor) -> torch.Tensor:
    """IQ1_DELTA (0.125) with the sign bit applied: bit 0 -> +0.125, 1 -> -0.125 (exact)."""
    return (0.125 - 0.25 * bit).to(torch.float32)


def dequant_iq1_s(blocks: torch.Tensor) -> torch.Tensor:
    """IQ1_S (50 B): dequantize_row_iq1_s. qh word: 4x3 high index bits, 3-bit scale, sign."""
    n, dev = blocks.shape[0], blocks.device
    d = f16(blocks[:, :2])
    qs = blocks[:, 2:34].long()
    qh = u16(blocks[:, 34:50]).long()  # (n, 8)
    dl = d * (2 * ((qh >> 12) & 7) + 1).to(torch.float32)
    delta = _iq1_delta((qh >> 15) & 1)
    idx = qs | ((spread(qh, [0, 3, 6, 9]) & 7) << 8).reshape(n, 32)
    grid = table("iq1s", dev)[idx].reshape(n, 8, 4, 8)
    return (dl[..., None, None] * (grid + delta[..., None, None])).reshape(n, QK_K)


def _iq1_m_d(sc: torch.Tensor) -> torch.Tensor:
    """(n, 4) scale words -> (n, 1) float32: the fp16 d is spread over their top nibbles."""
    bits = (
        ((sc[:, 0] >> 12) & 0x000F)
        | ((sc[:, 1] >> 8) & 0x00F0)
        | ((sc[:, 2] >> 4) & 0x0F00)
        | (sc[:, 3] & 0xF000)
    )
    signed = bits - ((bits & 0x8000) << 1)  # as int16, so the cast below cannot overflow
    return signed.to(torch.int16).view(torch.float16).to(torch.float32).reshape(-1, 1)


def dequant_iq1_m(blocks: torch.Tensor) -> torch.Tensor:
    """IQ1_M (56 B): dequantize_row_iq1_m. 3-bit scale per 16 weights, delta sign per 8."""
    n, dev = blocks.shape[0], blocks.device
    qs, qh = blocks[:, :32].long(), blocks[:, 32:48].long()
    sc = u16(blocks[:, 48:56])  # (n, 4)
    d = _iq1_m_d(sc)
    s3 = (spread(sc, [0, 3, 6, 9]) & 7).reshape(n, 16)
    dl = (d * (2 * s3 + 1).to(torch.float32)).reshape(n, 8, 2, 1, 1)
    qh = spread(qh, [0, 4])  # (n, 16, 2): one nibble per 8 weights
    idx = qs | ((qh & 7) << 8).reshape(n, 32)
    delta = _iq1_delta((qh >> 3) & 1).reshape(n, 8, 2, 2, 1)
    grid = table("iq1s", dev)[idx].reshape(n, 8, 2, 2, 8)
    return (dl * (grid + delta)).reshape(n, QK_K)


def dequant_iq4_nl(blocks: torch.Tensor) -> torch.Tensor:
    """IQ4_NL (18 B, 32 weights): dequantize_row_iq4_nl. Nibbles index kvalues_iq4nl."""
    n = blocks.shape[0]
    d = f16(blocks[:, :2])
    q = nibbles(blocks[:, 2:18]).reshape(n, 32)  # 16 low nibbles, then 16 high
    return d * table("iq4nl", blocks.device)[q]


def dequant_iq4_xs(blocks: torch.Tensor) -> torch.Tensor:
    """IQ4_XS (136 B): dequantize_row_iq4_xs. 6-bit scales (low 4 + high 2 bits) minus 32."""
    n = blocks.shape[0]
    d = f16(blocks[:, :2])
    sh = spread(u16(blocks[:, 2:4]), list(range(0, 16, 2))).reshape(n, 8) & 0x03
    sl = (spread(blocks[:, 4:8].to(torch.int32), [0, 4]) & 0x0F).reshape(n, 8)
    dl = d * ((sl | (sh << 4)) - 32).to(torch.float32)  # (n, 8)
    q = nibbles(blocks[:, 8:].reshape(n, 8, 16)).reshape(n, 8, 32)
    return (dl[..., None] * table("iq4nl", blocks.device)[q]).reshape(n, QK_K)


DEQUANTIZERS: dict[QuantType, Callable[[torch.Tensor], torch.Tensor]] = {
    QuantType.IQ1_S: dequant_iq1_s,
    QuantType.IQ1_M: dequant_iq1_m,
    QuantType.IQ2_XXS: dequant_iq2_xxs,
    QuantType.IQ2_XS: dequant_iq2_xs,
    QuantType.IQ2_S: dequant_iq2_s,
    QuantType.IQ3_XXS: dequant_iq3_xxs,
    QuantType.IQ3_S: dequant_iq3_s,
    QuantType.IQ4_NL: dequant_iq4_nl,
    QuantType.IQ4_XS: dequant_iq4_xs,
}
