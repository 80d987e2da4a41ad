"""ggml blocks -> the operands of ATen's CPU int4 GEMM (`_weight_int4pack_mm_for_cpu`).

That op computes `x' @ W'.T` with `W'[n, k] = (v[n, k] - 8) * scale[g, n] + zero[g, n]`, `v`
in 0..15 and `g = k // group` (group 32, 64, 128 or 256; verified against float64 in the
tests). With bf16 `x'` it runs AVX512-BF16 code (~30x faster than fp32); scales and zeros must
then be bf16, so each block scale is rounded to bf16 (relative error <= 2^-8). The kernel
forms each weight `(v - 8) * scale + zero` in fp32 and multiplies it with x in fp32
(measured: its outputs are x_bf16 @ W_fp32 rounded once to bf16).

4-bit types map onto it directly (`x' = x`, K' = K). Types with more bits split each block's
integer quant q into two nibbles, stored one after the other along K' = 2K, and the
activation is fed as `x' = [x_b, c * x_b]` per block b (c = 8 or 16, exact in bf16):
  Q8_0, IQ4_NL, IQ4_XS   q (int8 code) = 16 h + l, h signed: [l, h + 8], c = 16, group 64,
         zero 8d/17 (the IQ4 types' codes are kvalues_iq4nl[nibble])
  Q5_0/1, Q5_K   q = 16 h + l:     [l, 2h + 7], c = 8, group 64 (8 (2h + 7 - 8) = 16 h - 8)
  Q6_K   q = 16 h + l, per 16:     [l, 2h + 5], c = 8, group 32 (8 (2h + 5 - 8) = 16 h - 24)
so one GEMM over 2K reads 1 byte per weight plus 4 bytes (bf16 scale and zero) per group.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from llamapy.quant.grids import table
from llamapy.quant.kquants import _k_scales
from llamapy.quant.legacy import _high_bits, fp16_field, unpack_bits
from llamapy.quant.types import QuantType, type_size

# Rows per packed tile of ATen's AVX512 layout; N must be a multiple of 16 (the tail tile).
TILE_N = 64
ROW_MULTIPLE = 16
SHIFTS_2 = torch.arange(0, 16, 2, dtype=torch.int32)


@dataclass(frozen=True, slots=True)
class Packed:
    """int4pack operands: nibbles (N, K'/2) uint8, bf16 scales and zeros (K'/group, N, 2),
    and, for split types, the per-block activation multipliers (2, 1) bf16 [1, c]."""

    packed: torch.Tensor
    sz: torch.Tensor
    group: int
    block: int  # weights per split block (x is viewed as (M, K/block, 1, block))
    xmul: torch.Tensor | None
    hi_mult: int = 0  # split types: c (the high plane's weight); 0 for 4-bit types


def pack_nibbles(v: torch.Tensor) -> torch.Tensor:
    """v (N, K') uint8 in 0..15 -> ATen's CPU int4 layout, as `_convert_weight_to_int4pack_for_cpu`
    builds it (AVX512 build): per tile of 64 rows, byte (k, d) = v[d, k] | v[d + 32, k] << 4,
    d < 32; a tail of t < 64 rows packs row pairs: byte (k, j) = v[2j, k] | v[2j + 1, k] << 4."""
    n, k2 = v.shape
    full = n - n % TILE_N
    out = torch.empty(n, k2 // 2, dtype=torch.uint8)
    if full:
        tiles = v[:full].view(full // TILE_N, 2, TILE_N // 2, k2)
        bytes_ = tiles[:, 0] | (tiles[:, 1] << 4)  # (tiles, 32, K')
        out[:full].view(full // TILE_N, k2, TILE_N // 2).copy_(bytes_.transpose(1, 2))
    tail = n - full
    if tail:
        pairs = v[full:].view(tail // 2, 2, k2)
        out[full:].view(k2, tail // 2).copy_((pairs[:, 0] | (pairs[:, 1] << 4)).T)
    return out


def _sz(scale: torch.Tensor, zero: torch.Tensor | float) -> torch.Tensor:
    """scale, zero (N, G) float32 (zero may be 0.0) -> (G, N, 2) bf16."""
    sz = torch.zeros(scale.shape[1], scale.shape[0], 2, dtype=torch.bfloat16)
    sz[..., 0] = scale.T
    if not isinstance(zero, float):
        sz[..., 1] = zero.T
    return sz


def _split(lo: torch.Tensor, hi: torch.Tensor, n: int) -> torch.Tensor:
    """lo, hi (N*blocks, b) uint8 -> (N, 2K): per block, b low-nibble values then b high."""
    return torch.stack([lo, hi], dim=1).view(n, -1)


def _xmul(c: float) -> torch.Tensor:
    return torch.tensor([[1.0], [c]], dtype=torch.bfloat16)


def pack_q4_0(data: torch.Tensor, n: int, k: int) -> Packed:
    blocks = data.reshape(-1, type_size(QuantType.Q4_0))  # (N*G, 18)
    d = fp16_field(blocks, 0).view(n, k // 32)
    v = unpack_bits(blocks[:, 2:], (0, 4), 0x0F).view(n, k)  # low nibbles: weights 0..15
    return Packed(pack_nibbles(v), _sz(d, 0.0), 32, 32, None)  # d * (q - 8)


def pack_q4_1(data: torch.Tensor, n: int, k: int) -> Packed:
    blocks = data.reshape(-1, type_size(QuantType.Q4_1))  # (N*G, 20)
    d = fp16_field(blocks, 0).view(n, k // 32)
    m = fp16_field(blocks, 2).view(n, k // 32)
    v = unpack_bits(blocks[:, 4:], (0, 4), 0x0F).view(n, k)
    return Packed(pack_nibbles(v), _sz(d, m + 8 * d), 32, 32, None)  # d (q - 8) + (m + 8d)


def pack_q4_k(data: torch.Tensor, n: int, k: int) -> Packed:
    blocks = data.reshape(-1, type_size(QuantType.Q4_K))  # (N*K/256, 144)
    dl, ml = _k_scales(blocks)  # (N*K/256, 8, 1) each: d * sc, dmin * m
    dl, ml = dl.view(n, k // 32), ml.view(n, k // 32)
    # 4 chunks of 32 bytes, each 64 weights: low nibbles first, then high nibbles
    v = unpack_bits(blocks[:, 16:].reshape(-1, 4, 32), (0, 4), 0x0F).view(n, k)
    return Packed(pack_nibbles(v), _sz(dl, 8 * dl - ml), 32, 32, None)  # dl (q - 8) + (8dl - ml)


def _pack_int8(u: torch.Tensor, scale: torch.Tensor, n: int) -> Packed:
    """u (N*G, 32) uint8 holding int8 codes q, w = scale * q with scale (N, G) float32."""
    v = _split(u & 0x0F, (u >> 4) ^ 0x08, n)  # q = 16 h + l, h = u >> 4 as signed 4-bit: l, h + 8
    # s (l - 8) + 16 s h + 17 z = s q  =>  z = 8s / 17
    return Packed(pack_nibbles(v), _sz(scale, scale * (8 / 17)), 64, 32, _xmul(16.0), 16)


def pack_q8_0(data: torch.Tensor, n: int, k: int) -> Packed:
    blocks = data.reshape(-1, type_size(QuantType.Q8_0))  # (N*G, 34)
    return _pack_int8(blocks[:, 2:], fp16_field(blocks, 0).view(n, k // 32), n)


def _iq4nl_codes(qs: torch.Tensor) -> torch.Tensor:
    """(..., 16) bytes of nibble indices -> (..., 32) uint8 int8 codes of kvalues_iq4nl."""
    kvalues = table("iq4nl", "cpu").to(torch.int8).view(torch.uint8)
    return kvalues[unpack_bits(qs, (0, 4), 0x0F).flatten(-2).long()]


def pack_iq4_nl(data: torch.Tensor, n: int, k: int) -> Packed:
    blocks = data.reshape(-1, type_size(QuantType.IQ4_NL))  # (N*G, 18)
    return _pack_int8(_iq4nl_codes(blocks[:, 2:]), fp16_field(blocks, 0).view(n, k // 32), n)


def pack_iq4_xs(data: torch.Tensor, n: int, k: int) -> Packed:
    blocks = data.reshape(-1, type_size(QuantType.IQ4_XS))  # (N*K/256, 136)
    nb = blocks.shape[0]
    d = fp16_field(blocks, 0)
    # 6-bit scales: low 4 bits from bytes 4..7 (nibbles), high 2 from the uint16 at 2..3
    sh = (blocks[:, 2:4].contiguous().view(torch.int16).to(torch.int32) >> SHIFTS_2) & 0x03
    sl = unpack_bits(blocks[:, 4:8], (0, 4), 0x0F).transpose(1, 2).reshape(nb, 8)
    dl = d * ((sl.to(torch.int32) | (sh << 4)) - 32).to(torch.float32)  # (nb, 8)
    codes = _iq4nl_codes(blocks[:, 8:].reshape(nb, 8, 16)).view(-1, 32)
    return _pack_int8(codes, dl.view(n, k // 32), n)


def _pack_5bit(
    lo: torch.Tensor, hi: torch.Tensor, n: int, scale: torch.Tensor, zero: torch.Tensor | float
) -> Packed:
    """q = lo + 16 hi per 32-weight block, w = scale * q + offset. The two nibbles give
    scale (l - 8) + 8 scale (2h - 1) + 9 zero = scale q - 16 scale + 9 zero, so the caller
    passes zero = (offset + 16 scale) / 9."""
    return Packed(pack_nibbles(_split(lo, 2 * hi + 7, n)), _sz(scale, zero), 64, 32, _xmul(8.0), 8)


def pack_q5_0(data: torch.Tensor, n: int, k: int) -> Packed:
    blocks = data.reshape(-1, type_size(QuantType.Q5_0))  # (N*G, 22): d, qh, qs
    d = fp16_field(blocks, 0).view(n, k // 32)
    lo = unpack_bits(blocks[:, 6:], (0, 4), 0x0F).view(-1, 32)
    hi = _high_bits(blocks[:, 2:6])
    return _pack_5bit(lo, hi, n, d, 0.0)  # d (q - 16): offset = -16 d


def pack_q5_1(data: torch.Tensor, n: int, k: int) -> Packed:
    blocks = data.reshape(-1, type_size(QuantType.Q5_1))  # (N*G, 24): d, m, qh, qs
    d = fp16_field(blocks, 0).view(n, k // 32)
    m = fp16_field(blocks, 2).view(n, k // 32)
    lo = unpack_bits(blocks[:, 8:], (0, 4), 0x0F).view(-1, 32)
    hi = _high_bits(blocks[:, 4:8])
    return _pack_5bit(lo, hi, n, d, (m + 16 * d) / 9)


def pack_q5_k(data: torch.Tensor, n: int, k: int) -> Packed:
    blocks = data.reshape(-1, type_size(QuantType.Q5_K))  # (N*K/256, 176)
    dl, ml = _k_scales(blocks)
    dl, ml = dl.view(n, k // 32), ml.view(n, k // 32)
    lo = unpack_bits(blocks[:, 48:].reshape(-1, 4, 32), (0, 4), 0x0F).view(-1, 32)
    hi = unpack_bits(blocks[:, 16:48], tuple(range(8)), 0x01).view(-1, 32)  # bit j: sub-block j
    return _pack_5bit(lo, hi, n, dl, (16 * dl - ml) / 9)


def pack_q6_k(data: torch.Tensor, n: int, k: int) -> Packed:
    blocks = data.reshape(-1, type_size(QuantType.Q6_K))  # (N*K/256, 210)
    nb = blocks.shape[0]
    d = fp16_field(blocks, 208)  # (nb, 1)
    dl = d * blocks[:, 192:208].contiguous().view(torch.int8).to(torch.float32)  # (nb, 16)
    # Per 128-weight half: ql's 64 bytes give low nibbles of weights 0..63 and high nibbles
    # of 64..127; qh's 32 bytes give 2 bits at shifts 0, 2, 4, 6 for runs of 32.
    lo = unpack_bits(blocks[:, :128].reshape(nb, 2, 64), (0, 4), 0x0F).view(-1, 16)
    hi = unpack_bits(blocks[:, 128:192].reshape(nb, 2, 32), (0, 2, 4, 6), 0x03).view(-1, 16)
    v = _split(lo, 2 * hi + 5, n)  # dl (l - 8) + 8 dl (2h + 5 - 8) = dl (q - 32)
    return Packed(pack_nibbles(v), _sz(dl.view(n, k // 16), 0.0), 32, 16, _xmul(8.0), 8)


PACKERS: dict[QuantType, Callable[[torch.Tensor, int, int], Packed]] = {
    QuantType.Q4_0: pack_q4_0,
    QuantType.Q4_1: pack_q4_1,
    QuantType.Q4_K: pack_q4_k,
    QuantType.Q8_0: pack_q8_0,
    QuantType.Q5_0: pack_q5_0,
    QuantType.Q5_1: pack_q5_1,
    QuantType.Q5_K: pack_q5_k,
    QuantType.Q6_K: pack_q6_k,
    QuantType.IQ4_NL: pack_iq4_nl,
    QuantType.IQ4_XS: pack_iq4_xs,
}


def int4pack_mm(x: torch.Tensor, p: Packed) -> torch.Tensor:
    """x (M, K) float32 -> (M, N) float32 (bf16 x' and output, fp32 sums)."""
    xb = x.to(torch.bfloat16)
    if p.xmul is not None:
        xb = (xb.view(x.shape[0], -1, 1, p.block) * p.xmul).view(x.shape[0], -1)
    y = torch.ops.aten._weight_int4pack_mm_for_cpu(xb, p.packed, p.group, p.sz)
    return y.to(torch.float32)


# --- Prefill: the packed weight dequantized to bf16 in row chunks, then a bf16 GEMM ---------
#
# At large M the int4 kernel runs at ~40% of a oneDNN bf16 GEMM (~20% for split types, which
# reduce over 2K). Dequantizing the packed nibbles costs ~0.3-0.5 ns per weight against
# ~2.3 ns per weight for the GEMM at M = 512, so for M >= a threshold (qmatmul.py) the weight
# is expanded chunk by chunk into scratch that stays a few MB, never whole.
#
# Weights: the kernel's fp32 weights rounded to nearest-even bf16 (one more rounding than
# the int4 kernel, <= 2^-8 relative per weight). 4-bit types: fp32 `v * s + (z - 8 s)` is the
# kernel's `(v - 8) * s + z` (exact products, one fp32 rounding of the same sum while z - 8 s
# is exact in fp32, i.e. unless z and s are 2^16 apart), so the bf16 weights are bit for bit
# the kernel's rounded. Split types combine the two planes first: with q' = lo + c * hi
# (0..255) and the group's shared s, z, the weight is s q' + (1 + c)(z - 8 s), formed in fp32
# and rounded to bf16 once.


class DequantScratch:
    """Flat buffers for chunks of up to `rows` rows of a (N, K) weight packed over K'
    columns, reused by every chunk of one `dequant_mm` call: the two nibble planes of the
    packed bytes (K' bytes per row), split types' combined quants (K bytes), fp32 and bf16
    weights (4 + 2 bytes per weight)."""

    def __init__(self, p: Packed, k: int, rows: int) -> None:
        k2 = p.packed.shape[1] * 2
        self.rows = rows
        self.nibbles = torch.empty(2, rows * k2 // 2, dtype=torch.uint8)
        self.quants = torch.empty(2, rows * k // 2 if p.hi_mult else 0, dtype=torch.uint8)
        self.w32 = torch.empty(rows * k, dtype=torch.float32)
        self.w16 = torch.empty(rows * k, dtype=torch.bfloat16)

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in (self.nibbles, self.quants, self.w32, self.w16))


def _nibbles(
    p: Packed, start: int, stop: int, out: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows start:stop's nibbles as two (T, K', C) uint8 planes in `out` (2, >= rows K'/2),
    low and high nibbles of the packed bytes. Full tiles (start, stop multiples of 64): T
    tiles, byte (k, d) holds rows d (low) and d + 32 (high) of its tile, C = 32. The tail
    (start = the last tile boundary, stop = N): T = 1, byte (k, j) holds rows 2j and 2j + 1,
    C = rows / 2."""
    k2 = p.packed.shape[1] * 2
    rows = stop - start
    t, c = (rows // TILE_N, TILE_N // 2) if rows % TILE_N == 0 else (1, rows // 2)
    b = p.packed[start:stop].view(t, k2, c)
    lo, hi = (plane[: t * k2 * c].view(t, k2, c) for plane in out)
    torch.bitwise_and(b, 0x0F, out=lo)
    torch.bitwise_right_shift(b, 4, out=hi)
    return lo, hi


def _combine_planes(u: torch.Tensor, p: Packed, out: torch.Tensor) -> torch.Tensor:
    """Split types: (T, K', C) nibbles -> (T, K, C) q' = lo + c * hi (0..255) in `out`'s
    memory; each block of `block` weights is `block` low-plane K' rows, then `block`
    high-plane rows."""
    t, k2, c = u.shape
    planes = u.view(t, k2 // (2 * p.block), 2, p.block * c)
    q = out[: t * k2 // 2 * c].view(t, k2 // (2 * p.block), p.block * c)
    torch.bitwise_left_shift(planes[:, :, 1], p.hi_mult.bit_length() - 1, out=q)  # c * hi
    q.add_(planes[:, :, 0])  # lo + c * hi <= 255
    return q.view(t, k2 // 2, c)


def dequantize_rows_bf16(
    p: Packed, start: int, stop: int, scratch: DequantScratch | None = None
) -> torch.Tensor:
    """Rows start:stop of the weight, transposed: (K, stop - start) bf16, the weight values
    described above. start and stop are tile boundaries (multiples of 64) or stop = N; the
    result lives in `scratch` (fresh buffers if None) until its next use."""
    rows = stop - start
    k = p.packed.shape[1] * 2 // (2 if p.hi_mult else 1)
    if scratch is None:
        scratch = DequantScratch(p, k, rows)
    if rows > scratch.rows:
        raise ValueError(f"{rows} rows do not fit scratch for {scratch.rows}")
    lo, hi = _nibbles(p, start, stop, scratch.nibbles)
    if p.hi_mult:
        lo, hi = (_combine_planes(u, p, q) for u, q in zip((lo, hi), scratch.quants, strict=True))
    t, _, c = lo.shape
    w = scratch.w32[: k * rows]
    if rows % TILE_N == 0:  # row 64 t + 32 h + d from plane h
        dst = w.view(k, t, 2, c)
        dst_lo, dst_hi = dst[:, :, 0], dst[:, :, 1]
    else:  # the tail: row 2 j + h from plane h
        dst = w.view(k, 1, c, 2)
        dst_lo, dst_hi = dst[..., 0], dst[..., 1]
    dst_lo.copy_(lo.transpose(0, 1))  # (K, T, C) uint8 -> fp32
    dst_hi.copy_(hi.transpose(0, 1))
    groups = p.sz.shape[0]  # K' / group
    sz = torch.empty(2, groups, rows, dtype=torch.float32)  # contiguous planes: vectorized fma
    sz.copy_(p.sz[:, start:stop].permute(2, 0, 1))
    scale = sz[0].unsqueeze(1)  # (groups, 1, rows)
    zero = torch.add(sz[1], sz[0], alpha=-8.0).unsqueeze(1)  # z - 8 s: exact
    if p.hi_mult:
        zero.mul_(1 + p.hi_mult)
    wg = w.view(groups, k // groups, rows)
    torch.addcmul(zero, wg, scale, out=wg)  # s v + (z - 8 s), one fp32 rounding
    w16 = scratch.w16[: k * rows].view(k, rows)
    w16.copy_(w.view(k, rows))  # round to nearest even
    return w16


def dequant_mm(x: torch.Tensor, p: Packed, n: int, chunk_rows: int) -> torch.Tensor:
    """x (M, K) float32 -> (M, N) float32 through bf16 chunks of at most `chunk_rows` rows
    (a multiple of 64): x and the weights are bf16, sums fp32, the output rounded to bf16
    (oneDNN writes bf16, as the int4 kernel does) and returned as float32."""
    if chunk_rows % TILE_N:
        raise ValueError(f"chunk_rows must be a multiple of {TILE_N}, got {chunk_rows}")
    m, k = x.shape
    xb = x.to(torch.bfloat16)
    y = torch.empty(m, n, dtype=torch.float32)
    full = n - n % TILE_N
    bounds = [(s, min(s + chunk_rows, full)) for s in range(0, full, chunk_rows)]
    if full < n:
        bounds.append((full, n))
    rows = max(stop - start for start, stop in bounds)
    scratch = DequantScratch(p, k, rows)
    yb = torch.empty(m * rows, dtype=torch.bfloat16)
    for start, stop in bounds:
        part = yb[: m * (stop - start)].view(m, stop - start)
        torch.mm(xb, dequantize_rows_bf16(p, start, stop, scratch), out=part)
        y[:, start:stop].copy_(part)
    return y
