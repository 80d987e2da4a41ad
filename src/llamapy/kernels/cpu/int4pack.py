"""ggml blocks -> the operands of ATen's CPU int4 GEMM (`_weight_int4pack_mm_for_cpu`).

That op computes `x @ W.T` with `W[n, k] = (q[n, k] - 8) * scale[g, n] + zero[g, n]`, `q` in
0..15 and `g = k // 32` (verified against a float64 reference in the tests). With bf16 `x` it
runs AVX512-BF16 code (~30x faster than fp32); scales and zeros must then be bf16 too, so each
fp16 block scale is rounded to bf16 (relative error <= 2^-9). Packed: K/2 bytes per row plus 4
bytes of scale and zero per group of 32.
"""

from __future__ import annotations

import torch

from llamapy.quant.kquants import _k_scales
from llamapy.quant.legacy import fp16_field
from llamapy.quant.types import QuantType, type_size

GROUP = 32


def _nibbles(qs: torch.Tensor) -> torch.Tensor:
    """(..., 16) bytes -> (..., 32) int32: low nibbles are weights 0..15, high 16..31."""
    return torch.cat([qs & 0x0F, qs >> 4], dim=-1).to(torch.int32)


def _pack(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """q (N, K) int32 0..15; scale, zero (N, K/32) float32 -> (packed, scales_and_zeros)."""
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.contiguous(), 1)  # (N, K/2)
    sz = torch.stack([scale.T, zero.T], dim=-1).to(torch.bfloat16).contiguous()  # (K/32, N, 2)
    return packed, sz


def pack_q4_0(data: torch.Tensor, n: int, k: int) -> tuple[torch.Tensor, ...]:
    blocks = data.reshape(-1, type_size(QuantType.Q4_0))  # (N*G, 18)
    d = fp16_field(blocks, 0).view(n, k // GROUP)
    q = _nibbles(blocks[:, 2:]).view(n, k)
    return _pack(q, d, torch.zeros_like(d))  # d * (q - 8)


def pack_q4_1(data: torch.Tensor, n: int, k: int) -> tuple[torch.Tensor, ...]:
    blocks = data.reshape(-1, type_size(QuantType.Q4_1))  # (N*G, 20)
    d = fp16_field(blocks, 0).view(n, k // GROUP)
    m = fp16_field(blocks, 2).view(n, k // GROUP)
    q = _nibbles(blocks[:, 4:]).view(n, k)
    return _pack(q, d, m + 8 * d)  # d * q + m = d * (q - 8) + (m + 8d)


def pack_q4_k(data: torch.Tensor, n: int, k: int) -> tuple[torch.Tensor, ...]:
    blocks = data.reshape(-1, type_size(QuantType.Q4_K))  # (N*K/256, 144)
    dl, ml = _k_scales(blocks)  # (N*K/256, 8, 1) each: d * sc, dmin * m
    dl, ml = dl.view(n, k // GROUP), ml.view(n, k // GROUP)
    # 4 chunks of 32 bytes, each 64 weights: low nibbles first, then high nibbles
    qs = blocks[:, 16:].reshape(-1, 4, 1, 32)
    q = torch.cat([qs & 0x0F, qs >> 4], dim=2).to(torch.int32).view(n, k)
    return _pack(q, dl, 8 * dl - ml)  # dl * q - ml = dl * (q - 8) + (8 dl - ml)


def pack_q8_0(data: torch.Tensor, n: int, k: int) -> tuple[torch.Tensor, ...]:
    """Q8_0 as two int4 halves along K: q = 16 * hi + lo, hi = q >> 4 in -8..7, lo in 0..15.

    The packed weight is (N, 2K): columns [0, K) hold hi + 8 with scale 16d, zero 0; columns
    [K, 2K) hold lo with scale d, zero 8d; the activation is fed as [x, x].
    """
    blocks = data.reshape(-1, type_size(QuantType.Q8_0))  # (N*G, 34)
    d = fp16_field(blocks, 0).view(n, k // GROUP)
    q = blocks[:, 2:].contiguous().view(torch.int8).view(n, k).to(torch.int32)
    hi, lo = (q >> 4) + 8, q & 0x0F
    scale = torch.cat([16 * d, d], dim=1)  # (N, 2G)
    zero = torch.cat([torch.zeros_like(d), 8 * d], dim=1)
    return _pack(torch.cat([hi, lo], dim=1), scale, zero)


PACKERS = {
    QuantType.Q4_0: pack_q4_0,
    QuantType.Q4_1: pack_q4_1,
    QuantType.Q4_K: pack_q4_k,
    QuantType.Q8_0: pack_q8_0,
}


def int4pack_mm(x: torch.Tensor, packed: torch.Tensor, sz: torch.Tensor) -> torch.Tensor:
    """x (M, K') bf16 -> (M, N) bf16 with the packed weight."""
    return torch.ops.aten._weight_int4pack_mm_for_cpu(x, packed, GROUP, sz)
