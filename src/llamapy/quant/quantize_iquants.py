"""Float -> IQ4_NL / IQ4_XS blocks, bit-exact with llama.cpp's `ggml_quantize_chunk`.

Both follow `quantize_row_iq4_nl_impl` (ggml-quants.c) as `quantize_iq4_nl` /
`quantize_iq4_xs` call it (ntry = 7, with or without an importance matrix): per sub-block of
32, a scale search over the non-linear grid `kvalues_iq4nl`, then (IQ4_XS) 6-bit sub-block
scales against a super-block fp16 scale. Float32 arithmetic in C's order; see
`quantize_search`.
"""

from __future__ import annotations

import numpy as np
import torch

from llamapy.quant.grids import table
from llamapy.quant.quantize_search import (
    F32,
    GROUP_MAX_EPS,
    div,
    first_absmax,
    fp16_bytes,
    nearest_int,
    recip,
    scalar,
    seq_sum,
    seq_sum_last,
    sqrtf,
)

NTRY = 7


def best_index(values: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """best_index_int8(16, values, v): the nearest grid index, the upper one on ties.

    C bisects to val[mu-1] <= v < val[mu] and keeps mu-1 when v - val[mu-1] < val[mu] - v.
    """
    mu = torch.searchsorted(values, v.contiguous(), right=True).clamp(1, len(values) - 1)
    lower = (v - values[mu - 1]) < (values[mu] - v)
    idx = mu - lower.to(mu.dtype)
    idx = torch.where(v <= values[0], 0, idx)
    return torch.where(v >= values[-1], len(values) - 1, idx)


def _subblock_scales(x: torch.Tensor, w: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """The scale search of quantize_row_iq4_nl_impl for blocks of 32: d (B,), 0 if all ~0.

    From d = -max / values[0], then id = (itry + values[0]) / max for itry in -7..7 in turn,
    keeping the weighted least-squares d of each grid fit that beats the best so far.
    """
    amax, mx = first_absmax(x)
    xt, wt = x.t().contiguous(), w.t().contiguous()  # (32, B)

    def sums(inv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        q = values[best_index(values, inv * xt)]
        wq = wt * q
        both = seq_sum(torch.stack([wq * xt, wq * q], dim=1))  # (2, B)
        return both[0], both[1]

    v0 = float(values[0].item())
    sumqx, sumq2 = sums(recip(div(-mx, scalar(v0, x))))  # ntry > 0: d = -max / values[0]
    d = torch.where(sumq2 > 0, sumqx / sumq2, 0.0)
    best = d * sumqx
    for itry in range(-NTRY, NTRY + 1):
        sqx, sq2 = sums(div(np.float32(itry + v0), mx))
        better = (sq2 > 0) & (sqx * sqx > best * sq2)
        new_d = sqx / sq2
        d = torch.where(better, new_d, d)
        best = torch.where(better, new_d * sqx, best)
    return torch.where(amax < GROUP_MAX_EPS, 0.0, d)


def _weights(x: torch.Tensor, qw: torch.Tensor | None, super_size: int) -> torch.Tensor:
    """weight[j] = qw[j] * sqrtf(sigma2 + x^2), sigma2 = 2/super * sum x^2; or x^2 without qw."""
    if qw is None:
        return x * x
    sigma2 = seq_sum_last(x * x) * scalar(2.0 / super_size, x)
    return qw * sqrtf(sigma2[:, None] + x * x)


def _pack_nibbles(L: torch.Tensor) -> torch.Tensor:
    """(N, 32k) indices -> (N, 16k) bytes: q4[16i + j] = L[32i + j] | L[32i + 16 + j] << 4."""
    q = L.to(torch.uint8).view(L.shape[0], -1, 2, 16)
    return (q[:, :, 0] | (q[:, :, 1] << 4)).view(L.shape[0], -1)


def quantize_iq4_nl(x: torch.Tensor, qw: torch.Tensor | None) -> torch.Tensor:
    """block_iq4_nl {fp16 d; u8 qs[16]}: x (N, 32)."""
    values = table("iq4nl", x.device)
    d = _subblock_scales(x, _weights(x, qw, 32), values)
    idl = torch.where(d != 0, recip(d), 0.0)
    L = best_index(values, idl[:, None] * x)
    return torch.cat([fp16_bytes(d), _pack_nibbles(L)], dim=1)


def quantize_iq4_xs(x: torch.Tensor, qw: torch.Tensor | None) -> torch.Tensor:
    """block_iq4_xs {fp16 d; u16 scales_h; u8 scales_l[4]; u8 qs[128]}: x (N, 256)."""
    n = x.shape[0]
    values = table("iq4nl", x.device)
    w = _weights(x, qw, 256)
    scales = _subblock_scales(x.view(-1, 32), w.view(-1, 32), values).view(n, 8)
    _, max_scale = first_absmax(scales)
    d = div(-max_scale, scalar(32.0, x))
    inv = torch.where(d != 0, recip(d), 0.0)
    l = nearest_int(inv[:, None] * scales).clamp(-32, 31)  # (n, 8)
    dl = d[:, None] * l.to(F32)
    idl = torch.where(dl != 0, recip(dl), 0.0)
    L = best_index(values, idl[..., None] * x.view(n, 8, 32)).view(n, 256)
    l6 = l + 32
    scales_l = ((l6[:, 0::2] & 0xF) | ((l6[:, 1::2] & 0xF) << 4)).to(torch.uint8)
    shifts = torch.arange(0, 16, 2, device=x.device, dtype=torch.int32)
    scales_h = ((l6 >> 4) << shifts).sum(dim=1, keepdim=True)
    h_bytes = torch.cat([scales_h & 0xFF, scales_h >> 8], dim=1).to(torch.uint8)
    return torch.cat([fp16_bytes(d), h_bytes, scales_l, _pack_nibbles(L)], dim=1)
