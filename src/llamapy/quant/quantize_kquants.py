"""Float -> k-quant blocks (Q2_K ... Q6_K), bit-exact with llama.cpp's `ggml_quantize_chunk`.

What llama-quantize writes: without an importance matrix, `quantize_q*_K` runs
`quantize_row_q*_K_ref`; with one, `quantize_row_q*_K_impl` (ggml-quants.c). Both are
followed here operation by operation in float32 (see `quantize_search`). Every function takes
super-blocks `x` `(N, 256)` float32 and, for the imatrix path, the matching importance
weights `qw` `(N, 256)` (None without an imatrix), and returns the blocks `(N, type_size)`.
"""

from __future__ import annotations

import torch

from llamapy.quant.quantize_search import (
    F32,
    GROUP_MAX_EPS,
    div,
    first_absmax,
    fp16_bytes,
    fp16_round,
    make_q3_quants,
    make_qkx_quants,
    make_qp_quants,
    make_qx_quants,
    nearest_int,
    positive_max,
    seq_sum_last,
    sqrtf,
)

QK_K = 256


def _sigma2(x: torch.Tensor, factor: int) -> torch.Tensor:
    """factor * sum(x^2) / QK_K over each super-block (sequential sum), shape (N, 1)."""
    s = seq_sum_last(x * x)
    if factor != 1:
        s = factor * s
    return div(s, torch.full_like(s, float(QK_K)))[:, None]


def _imatrix_weights(x: torch.Tensor, qw: torch.Tensor, sigma2: torch.Tensor) -> torch.Tensor:
    """qw[l] * sqrtf(sigma2 + x[l]*x[l])."""
    return qw * sqrtf(sigma2 + x * x)


def _requantize(
    x: torch.Tensor, L: torch.Tensor, d: torch.Tensor, dm: torch.Tensor | None, lo: int, hi: int
) -> torch.Tensor:
    """L = clamp(nearest_int((x + dm) / d), lo, hi) per sub-block where d != 0, else kept.

    x, L: (N, nsub, sub); d, dm: (N, nsub) float32 (the fp16 scales times the 6-bit ones).
    """
    v = x if dm is None else x + dm[..., None]
    new = nearest_int(v / d[..., None]).clamp(lo, hi)
    return torch.where((d != 0)[..., None], new, L).contiguous()


def _pack_2bit(L: torch.Tensor) -> torch.Tensor:
    """(N, 256) values 0..3 -> (N, 64): qs[32c + l] = L[128c + l + 32k] << 2k, k = 0..3."""
    q = L.to(torch.uint8).view(-1, 2, 4, 32)
    return (q[:, :, 0] | (q[:, :, 1] << 2) | (q[:, :, 2] << 4) | (q[:, :, 3] << 6)).view(-1, 64)


def _pack_scales_k4(ls: torch.Tensor, lm: torch.Tensor) -> torch.Tensor:
    """Q4_K/Q5_K: eight 6-bit scales and mins (N, 8) -> the 12 `scales` bytes."""
    ls, lm = ls.to(torch.uint8), lm.to(torch.uint8)
    top = torch.cat([ls[:, 4:], lm[:, 4:]], dim=1) >> 4  # bits 4-5 of scales/mins 4..7
    lo = torch.cat([ls[:, :4], lm[:, :4]], dim=1) | (top << 6)
    hi = (ls[:, 4:] & 0xF) | ((lm[:, 4:] & 0xF) << 4)
    return torch.cat([lo, hi], dim=1)


def _k4_scales_from_max(
    scales: torch.Tensor, mins: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """quantize_row_q4_K_ref / q5_K_ref: 6-bit ls, lm against the block's largest scale/min.

    Returns (ls, lm) (N, 8) int and the fp16-rounded d, dmin (N,).
    """
    max_scale = positive_max(scales)
    max_min = positive_max(mins)
    inv_scale = torch.where(max_scale > 0, div(63.0, max_scale), 0.0)
    inv_min = torch.where(max_min > 0, div(63.0, max_min), 0.0)
    ls = (nearest_int(inv_scale[:, None] * scales) & 0xFF).clamp(max=63)  # uint8_t, MIN 63
    lm = (nearest_int(inv_min[:, None] * mins) & 0xFF).clamp(max=63)
    d = fp16_round(div(max_scale, torch.full_like(max_scale, 63.0)))
    dmin = fp16_round(div(max_min, torch.full_like(max_min, 63.0)))
    return ls, lm, d, dmin


def _k4_search(
    x: torch.Tensor, qw: torch.Tensor | None, nmax: int, ref: tuple[float, float, int]
) -> tuple[torch.Tensor, ...]:
    """Q4_K / Q5_K: per sub-block of 32 scale, min, L; then the 6-bit scales and d, dmin."""
    n = x.shape[0]
    xs = x.view(n, 8, 32)
    if qw is None:  # quantize_row_q*_K_ref
        sum_x2 = seq_sum_last(xs * xs)
        av_x = sqrtf(div(sum_x2, torch.full_like(sum_x2, 32.0)))
        weights = av_x[..., None] + xs.abs()
        rmin, rdelta, nstep = ref
        scales, mins, L = make_qkx_quants(
            xs.reshape(-1, 32), weights.reshape(-1, 32), nmax, rmin, rdelta, nstep, False
        )
        scales, mins = scales.view(n, 8), mins.view(n, 8)
        ls, lm, d, dmin = _k4_scales_from_max(scales, mins)
    else:  # quantize_row_q*_K_impl
        weights = _imatrix_weights(x, qw, _sigma2(x, 2)).view(n, 8, 32)
        sw = seq_sum_last(weights)  # (n, 8)
        scales, mins, L = make_qkx_quants(
            xs.reshape(-1, 32), weights.reshape(-1, 32), nmax, -0.9, 0.05, 36, False
        )
        scales, mins = scales.view(n, 8), mins.view(n, 8)
        d_block, ls = make_qp_quants(scales, 63, sw)
        m_block, lm = make_qp_quants(mins, 63, sw)
        d, dmin = fp16_round(d_block), fp16_round(m_block)
    dl = d[:, None] * ls.to(F32)
    ml = dmin[:, None] * lm.to(F32)
    L = _requantize(xs, L.reshape(n, 8, 32), dl, ml, 0, nmax).view(n, QK_K)
    return L, ls, lm, d, dmin


def quantize_q4_k(x: torch.Tensor, qw: torch.Tensor | None) -> torch.Tensor:
    """block_q4_K {fp16 d, dmin; u8 scales[12]; u8 qs[128]}."""
    L, ls, lm, d, dmin = _k4_search(x, qw, 15, (-1.0, 0.1, 20))
    q = L.to(torch.uint8).view(-1, 4, 2, 32)
    qs = (q[:, :, 0] | (q[:, :, 1] << 4)).view(-1, 128)
    return torch.cat([fp16_bytes(d), fp16_bytes(dmin), _pack_scales_k4(ls, lm), qs], dim=1)


def quantize_q5_k(x: torch.Tensor, qw: torch.Tensor | None) -> torch.Tensor:
    """block_q5_K {fp16 d, dmin; u8 scales[12]; u8 qh[32]; u8 qs[128]}."""
    L, ls, lm, d, dmin = _k4_search(x, qw, 31, (-0.5, 0.1, 15))
    q = L.to(torch.uint8).view(-1, 4, 2, 32)  # (n, chunk of 64, half, 32)
    qs = ((q[:, :, 0] & 0xF) | ((q[:, :, 1] & 0xF) << 4)).view(-1, 128)
    bits = (q >> 4).view(-1, 8, 32)  # bit 2c + half of qh[j]
    shifts = torch.arange(8, device=x.device, dtype=torch.uint8)[None, :, None]
    qh = (bits << shifts).sum(dim=1, dtype=torch.uint8)
    return torch.cat([fp16_bytes(d), fp16_bytes(dmin), _pack_scales_k4(ls, lm), qh, qs], dim=1)


def quantize_q6_k(x: torch.Tensor, qw: torch.Tensor | None) -> torch.Tensor:
    """block_q6_K {u8 ql[128]; u8 qh[64]; i8 scales[16]; fp16 d} (quantize_row_q6_K_ref/_impl).

    The imatrix path weights make_qx_quants by the imatrix alone (no sigma2 term).
    """
    n = x.shape[0]
    xs = x.view(n, 16, 16)
    w = None if qw is None else qw.reshape(-1, 16)
    scales, L = make_qx_quants(xs.reshape(-1, 16), 32, w)
    scales, L = scales.view(n, 16), L.reshape(n, 16, 16)
    amax, max_scale = first_absmax(scales)
    zero = amax < GROUP_MAX_EPS
    iscale = div(-128.0, max_scale)
    d = fp16_round(div(1.0, iscale))
    sc = nearest_int(iscale[:, None] * scales).clamp(max=127)  # int8, >= -128 here
    dl = d[:, None] * sc.to(F32)
    L = (_requantize(xs, L - 32, dl, None, -32, 31) + 32).view(n, QK_K)
    q = L.to(torch.uint8).view(n, 2, 4, 32)  # (n, half of 128, quarter, 32)
    ql = ((q[:, :, 0:2] & 0xF) | ((q[:, :, 2:4] & 0xF) << 4)).view(n, 128)
    hi = q >> 4
    qh = (hi[:, :, 0] | (hi[:, :, 1] << 2) | (hi[:, :, 2] << 4) | (hi[:, :, 3] << 6)).view(n, 64)
    out = torch.cat([ql, qh, sc.to(torch.int8).view(torch.uint8), fp16_bytes(d)], dim=1)
    return torch.where(zero[:, None], 0, out).to(torch.uint8)


def _pack_scales_q3(l6: torch.Tensor) -> torch.Tensor:
    """Q3_K: sixteen 6-bit values (N, 16) -> the 12 `scales` bytes."""
    l6 = l6.to(torch.uint8)
    low = (l6[:, :8] & 0xF) | ((l6[:, 8:] & 0xF) << 4)
    hi = (l6 >> 4).view(-1, 4, 4)  # hi[:, j // 4, j % 4]
    high = hi[:, 0] | (hi[:, 1] << 2) | (hi[:, 2] << 4) | (hi[:, 3] << 6)
    return torch.cat([low, high], dim=1)


def quantize_q3_k(x: torch.Tensor, qw: torch.Tensor | None) -> torch.Tensor:
    """block_q3_K {u8 hmask[32]; u8 qs[64]; u8 scales[12]; fp16 d}."""
    n = x.shape[0]
    xs = x.view(n, 16, 16)
    if qw is None:  # quantize_row_q3_K_ref
        scales, L = make_q3_quants(xs.reshape(-1, 16), 4)
        scales = scales.view(n, 16)
        _, max_scale = first_absmax(scales)
        iscale = div(-32.0, max_scale)
        l = nearest_int(iscale[:, None] * scales)
        l = ((l + 128) & 0xFF) - 128  # int8_t
        l6 = l.clamp(-32, 31) + 32
        nonzero = max_scale != 0
        l6 = torch.where(nonzero[:, None], l6, 0)
        d = fp16_round(torch.where(nonzero, div(1.0, iscale), 0.0))
    else:  # quantize_row_q3_K_impl
        weights = _imatrix_weights(x, qw, _sigma2(x, 2)).view(n, 16, 16)
        sw = seq_sum_last(weights)
        scales, L = make_qx_quants(xs.reshape(-1, 16), 4, weights.reshape(-1, 16))
        d_block, l6 = make_qx_quants(scales.view(n, 16), 32, sw)
        d = fp16_round(d_block)
    dl = d[:, None] * (l6 - 32).to(F32)
    L = _requantize(xs, L.reshape(n, 16, 16) - 4, dl, None, -4, 3).view(n, QK_K) + 4
    hmask = (
        (L > 3).to(torch.uint8).view(n, 8, 32)
        << torch.arange(8, device=x.device, dtype=torch.uint8)[None, :, None]
    ).sum(dim=1, dtype=torch.uint8)
    qs = _pack_2bit(torch.where(L > 3, L - 4, L))
    return torch.cat([hmask, qs, _pack_scales_q3(l6), fp16_bytes(d)], dim=1)


def quantize_q2_k(x: torch.Tensor, qw: torch.Tensor | None) -> torch.Tensor:
    """block_q2_K {u8 scales[16]; u8 qs[64]; fp16 d, dmin}."""
    n = x.shape[0]
    xs = x.view(n, 16, 16)
    if qw is None:  # quantize_row_q2_K_ref
        scales, mins, L = make_qkx_quants(
            xs.reshape(-1, 16), xs.abs().reshape(-1, 16), 3, -0.5, 0.1, 15, True
        )
        scales, mins = scales.view(n, 16), mins.view(n, 16)
        max_scale = positive_max(scales)
        max_min = positive_max(mins)
        has_s, has_m = max_scale > 0, max_min > 0
        ls = nearest_int(torch.where(has_s, div(15.0, max_scale), 0.0)[:, None] * scales)
        lm = nearest_int(torch.where(has_m, div(15.0, max_min), 0.0)[:, None] * mins)
        ls = torch.where(has_s[:, None], ls, 0)
        lm = torch.where(has_m[:, None], lm, 0)
        sc = (ls | (lm << 4)) & 0xFF
        fifteen = torch.full_like(max_scale, 15.0)
        d = fp16_round(torch.where(has_s, div(max_scale, fifteen), 0.0))
        dmin = fp16_round(torch.where(has_m, div(max_min, fifteen), 0.0))
    else:  # quantize_row_q2_K_impl
        weights = _imatrix_weights(x, qw, _sigma2(x, 1)).view(n, 16, 16)
        sw = seq_sum_last(weights)
        scales, mins, L = make_qkx_quants(
            xs.reshape(-1, 16), weights.reshape(-1, 16), 3, -0.9, 0.05, 36, False
        )
        dm, ls = make_qp_quants(scales.view(n, 16), 15, sw)
        mm, lm = make_qp_quants(mins.view(n, 16), 15, sw)
        sc = (ls | (lm << 4)) & 0xFF
        d, dmin = fp16_round(dm), fp16_round(mm)
    dl = d[:, None] * (sc & 0xF).to(F32)
    ml = dmin[:, None] * (sc >> 4).to(F32)
    L = _requantize(xs, L.reshape(n, 16, 16), dl, ml, 0, 3).view(n, QK_K)
    return torch.cat([sc.to(torch.uint8), _pack_2bit(L), fp16_bytes(d), fp16_bytes(dmin)], dim=1)
