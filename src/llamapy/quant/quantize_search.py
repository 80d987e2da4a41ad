"""ggml's scale searches (ggml-quants.c) vectorized over blocks, float32 step for step.

The k-quant, i-quant and imatrix-weighted legacy quantizers all pick their scales with a few
small search routines: `make_qx_quants`, `make_q3_quants`, `make_qkx2_quants` /
`make_qkx3_quants` and `make_qp_quants`. Each is ported here for a batch of blocks
`(B, n)`, with the same float32 operations in the same order as the C code, so that the
scales and quants are bit-identical with llama.cpp's:

- Sums are sequential (`s += t[i]` from i = 0), never torch's pairwise reductions
  (`seq_sum`); products keep C's left-to-right grouping (`w*x[i]*l` is `(w*x)*l`).
- `nearest_int` is ggml's bit trick (add 1.5 * 2^23, read the mantissa), i.e. rounding half
  to even, with the same result as C even outside its asserted range.
- The grid of trial scales (`0.1f*is`, `rmin + rdelta*is + nmax`) is formed in numpy float32
  as C forms it, and every division has a float32 tensor on both sides (CUDA turns a division
  by a Python scalar into a multiplication by its reciprocal).
- A search that keeps the first candidate improving on the best so far (`if (err < best)`)
  runs its candidates in order, as C does: in make_qkx2/3_quants a kept min shifts the later
  trials, so the candidates cannot be formed all at once.
- Coordinate-descent loops (`make_q3_quants`, `make_qp_quants`) run all their passes: a pass
  that changes nothing leaves the state as it was, so C's early `break` changes no result.
- Blocks are held as columns `(n, B)` inside a search, so each sequential step reads one
  contiguous row.

Loops here run over grid points and weights within a block (at most 37 x 32), never over
blocks.
"""

from __future__ import annotations

import numpy as np
import torch

F32 = torch.float32
GROUP_MAX_EPS = float(np.float32(1e-15))


def scalar(value: float | np.floating, like: torch.Tensor) -> torch.Tensor:
    """A 0-dim float32 tensor on `like`'s device holding float32(value)."""
    return torch.tensor(np.float32(value), dtype=F32, device=like.device)


def div(num: float | np.floating | torch.Tensor, den: torch.Tensor) -> torch.Tensor:
    """num / den in float32, correctly rounded on every device (both sides tensors)."""
    if not isinstance(num, torch.Tensor):
        num = scalar(num, den)
    return num / den


def recip(x: torch.Tensor) -> torch.Tensor:
    """1 / x, correctly rounded (torch's `1 / t` is `t.reciprocal()`, fine on CPU only)."""
    return torch.ones_like(x) / x


def sqrtf(x: torch.Tensor) -> torch.Tensor:
    """C's sqrtf, correctly rounded: torch's float32 sqrt on AVX CPUs is not (1 ulp off for
    ~15% of inputs); the float64 root rounded to float32 is exact (53 >= 2 * 24 + 2 bits)."""
    return torch.sqrt(x.to(torch.float64)).to(F32)


def nearest_int(v: torch.Tensor) -> torch.Tensor:
    """ggml's `nearest_int`: float32 -> int32, `bits(v + 12582912.f) & 0x7fffff - 0x400000`."""
    val = v + scalar(12582912.0, v)
    return (val.view(torch.int32) & 0x7FFFFF) - 0x400000


def fp16_round(x: torch.Tensor) -> torch.Tensor:
    """GGML_FP16_TO_FP32(GGML_FP32_TO_FP16(x)): round to fp16 (nearest even), back to f32."""
    return x.to(torch.float16).to(F32)


def fp16_bytes(x: torch.Tensor) -> torch.Tensor:
    """float32 `(N,)` -> little-endian fp16 bytes `(N, 2)` uint8."""
    return x.to(torch.float16).reshape(-1, 1).view(torch.uint8)


def seq_sum(t: torch.Tensor, start: torch.Tensor | None = None) -> torch.Tensor:
    """Sum over the first dim as C's `float s = 0; for (i) s += t[i];` (or from `start`).

    The searches keep blocks in columns, `(n, B)`, so that each t[i] is contiguous.
    """
    acc = torch.zeros_like(t[0]) if start is None else start.clone()
    for row in t:
        acc += row
    return acc


def seq_sum_last(t: torch.Tensor) -> torch.Tensor:
    """seq_sum over the last dim (copies it to the front first)."""
    return seq_sum(t.movedim(-1, 0).contiguous())


def positive_max(x: torch.Tensor) -> torch.Tensor:
    """C's `float m = 0; for (i) if (x[i] > m) m = x[i];` over the last dim: +0 if none > 0."""
    m = x.amax(dim=-1)
    return torch.where(m > 0, m, 0.0)


def first_absmax(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(amax, max): the largest |x[i]| and that x[i], the first one on ties, over the last dim.

    As C's `if (fabsf(x[i]) > amax) { amax = fabsf(x[i]); max = x[i]; }` from amax = 0.
    """
    idx = x.abs().argmax(dim=-1, keepdim=True)
    mx = x.gather(-1, idx).squeeze(-1)
    mx = torch.where(mx != 0, mx, 0.0)  # C's max stays +0 when no |x[i]| exceeds 0
    return mx.abs(), mx


def grid(values: list[float]) -> np.ndarray:
    return np.array(values, dtype=np.float32)


# The searches below take blocks as rows, `(B, n)`, and work on columns `xt` `(n, B)`.


def _cols(*ts: torch.Tensor) -> list[torch.Tensor]:
    return [t.t().contiguous() for t in ts]


# --- make_qx_quants: symmetric scale for signed quants in [-nmax, nmax - 1] ---


def make_qx_quants(
    x: torch.Tensor, nmax: int, qw: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """make_qx_quants(n, nmax, x, L, rmse_type=1, qw): (scale (B,), L (B, n) in [0, 2*nmax)).

    Weights are qw, or x*x when None. Tries iscale = -(nmax + 0.1*is)/max for is in -9..9
    in turn and keeps the least-squares scale of each that fits better than the best so far.
    """
    amax, mx = first_absmax(x)
    (xt,) = _cols(x)
    wt = xt * xt if qw is None else _cols(qw)[0]
    wx = wt * xt

    def sums(iscale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        lf = nearest_int(iscale * xt).clamp(-nmax, nmax - 1).to(F32)
        both = seq_sum(torch.stack([wx * lf, wt * lf * lf], dim=1))  # (2, B)
        return both[0], both[1]

    best_iscale = div(float(-nmax), mx)
    sumlx, suml2 = sums(best_iscale)
    scale = torch.where(suml2 != 0, sumlx / suml2, 0.0)
    best = scale * sumlx
    for step in [i for i in range(-9, 10) if i != 0]:
        iscale = div(-(np.float32(nmax) + np.float32(0.1) * np.float32(step)), mx)
        slx, sl2 = sums(iscale)
        better = (sl2 > 0) & (slx * slx > best * sl2)
        new_scale = slx / sl2
        scale = torch.where(better, new_scale, scale)
        best = torch.where(better, new_scale * slx, best)
        best_iscale = torch.where(better, iscale, best_iscale)
    L = nearest_int(best_iscale[:, None] * x).clamp(-nmax, nmax - 1) + nmax
    zero = amax < GROUP_MAX_EPS
    return torch.where(zero, 0.0, scale), torch.where(zero[:, None], 0, L)


def _descend(
    xt: torch.Tensor,
    wt: torch.Tensor,
    L: torch.Tensor,
    lo: int | None,
    hi: int,
    check_sl2: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The 5 coordinate-descent passes of make_q3_quants / make_qp_quants, in place on L.

    L (n, B) int32; weights wt. Each weight in turn moves to nearest_int(x * sl2 / slx)
    (clamped to [lo, hi]) when that raises sumlx^2 / suml2. Returns (sumlx, suml2).
    """
    wx = wt * xt
    lf = L.to(F32)
    sumlx = seq_sum(wx * lf)
    suml2 = seq_sum(wt * lf * lf)
    for _ in range(5):
        for i in range(xt.shape[0]):
            wi, wxi, li = wt[i], wx[i], L[i].to(F32)
            slx = sumlx - wxi * li
            sl2 = suml2 - wi * li * li
            new_l = nearest_int(xt[i] * sl2 / slx).clamp(lo, hi)
            nl = new_l.to(F32)
            slx2 = slx + wxi * nl
            sl22 = sl2 + wi * nl * nl
            ok = (slx > 0) & (new_l != L[i])
            ok &= (sl2 > 0) if check_sl2 else (sl22 > 0)
            ok &= slx2 * slx2 * suml2 > sumlx * sumlx * sl22
            L[i] = torch.where(ok, new_l, L[i])
            sumlx = torch.where(ok, slx2, sumlx)
            suml2 = torch.where(ok, sl22, suml2)
    return sumlx, suml2


# --- make_q3_quants(do_rmse=true): Q3_K without imatrix ---


def make_q3_quants(x: torch.Tensor, nmax: int) -> tuple[torch.Tensor, torch.Tensor]:
    """make_q3_quants(n, nmax, x, L, do_rmse=true): (scale (B,), L (B, n) in [0, 2*nmax)).

    Starts from iscale = -nmax/max, then up to 5 passes of coordinate descent with weights
    x*x, each weight moved to the level that least-squares fits the others.
    """
    amax, mx = first_absmax(x)
    (xt,) = _cols(x)
    L = nearest_int(div(float(-nmax), mx) * xt).clamp(-nmax, nmax - 1)
    sumlx, suml2 = _descend(xt, xt * xt, L, -nmax, nmax - 1, check_sl2=False)
    scale = torch.where(suml2 > 0, sumlx / suml2, 0.0)
    zero = amax < GROUP_MAX_EPS
    return torch.where(zero, 0.0, scale), torch.where(zero[:, None], 0, L.t() + nmax).contiguous()


# --- make_qkx2_quants / make_qkx3_quants: affine scale and min for quants in [0, nmax] ---


def make_qkx_quants(
    x: torch.Tensor,
    w: torch.Tensor,
    nmax: int,
    rmin: float,
    rdelta: float,
    nstep: int,
    use_mad: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """make_qkx2_quants / make_qkx3_quants (identical with weights given): scale, the_min, L.

    Returns (scale (B,), the_min (B,) = -min >= 0, L (B, n) in [0, nmax]), where
    x ~ scale * L - the_min. For is = 0..nstep in turn, tries iscale =
    (rmin + rdelta*is + nmax) / (max - min), refits scale and min by weighted least squares
    and keeps them when the weighted error (|diff| when use_mad, else diff^2) drops below
    the best so far. The steps are sequential: a kept min shifts the later trials.
    """
    mn = x.gather(1, x.argmin(dim=1, keepdim=True)).squeeze(1)  # first min, as C's scan
    mx = x.gather(1, x.argmax(dim=1, keepdim=True)).squeeze(1)
    xt, wt = _cols(x, w)
    sum_w = seq_sum(wt[1:], start=wt[0])
    sum_x = seq_sum(wt[1:] * xt[1:], start=wt[0] * xt[0])
    mn = torch.where(mn > 0, 0.0, mn)
    flat = mx == mn
    flat_min = mn

    def error(scale: torch.Tensor, lf: torch.Tensor, off: torch.Tensor) -> torch.Tensor:
        diff = scale * lf + off - xt
        return seq_sum(wt * (diff.abs() if use_mad else diff * diff))

    iscale = div(float(nmax), mx - mn)
    scale = recip(iscale)
    L = nearest_int(iscale * (xt - mn)).clamp(0, nmax)
    best = error(scale, L.to(F32), mn)
    num = np.float32(rmin) + np.float32(rdelta) * grid(list(range(nstep + 1))) + np.float32(nmax)
    for step in num if nstep >= 1 else []:
        laux = nearest_int(div(step, mx - mn) * (xt - mn)).clamp(0, nmax)
        lf = laux.to(F32)
        wl = wt * lf
        sums = seq_sum(torch.stack([wl, wl * lf, wl * xt], dim=1))  # (3, B)
        sum_l, sum_l2, sum_xl = sums[0], sums[1], sums[2]
        D = sum_w * sum_l2 - sum_l * sum_l
        this_scale = (sum_w * sum_xl - sum_x * sum_l) / D
        this_min = (sum_l2 * sum_x - sum_l * sum_xl) / D
        pos = this_min > 0
        this_min = torch.where(pos, 0.0, this_min)
        this_scale = torch.where(pos, sum_xl / sum_l2, this_scale)
        cur = error(this_scale, lf, this_min)
        better = (D > 0) & (cur < best)
        best = torch.where(better, cur, best)
        scale = torch.where(better, this_scale, scale)
        mn = torch.where(better, this_min, mn)
        L = torch.where(better, laux, L)
    scale = torch.where(flat, 0.0, scale)
    L = torch.where(flat[:, None], 0, L.t()).contiguous()
    return scale, -torch.where(flat, flat_min, mn), L


# --- make_qp_quants: positive scales (of sub-block scales) on [0, nmax] ---


def make_qp_quants(
    x: torch.Tensor, nmax: int, qw: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """make_qp_quants(n, nmax, x, L, qw) for x >= 0: (scale (B,), L (B, n) in [0, nmax]).

    Picks iscale among (nmax + 0.1*is)/max, is in -4..4, by weighted squared error, then up
    to 5 passes of weighted least-squares coordinate descent.
    """
    mx = positive_max(x)
    zero = mx < GROUP_MAX_EPS
    xt, wt = _cols(x, qw)

    def mse(iscale: torch.Tensor, clamp: bool) -> torch.Tensor:
        l = nearest_int(iscale * xt)
        diff = xt - recip(iscale) * (l.clamp(max=nmax) if clamp else l).to(F32)
        return seq_sum(wt * diff * diff)

    iscale = div(float(nmax), mx)
    best = mse(iscale, clamp=False)
    for i in [-4, -3, -2, -1, 1, 2, 3, 4]:
        iscale_i = div(np.float32(0.1) * np.float32(i) + np.float32(nmax), mx)
        err = mse(iscale_i, clamp=True)
        better = err < best
        best = torch.where(better, err, best)
        iscale = torch.where(better, iscale_i, iscale)
    L = nearest_int(iscale * xt).clamp(max=nmax)
    sumlx, suml2 = _descend(xt, wt, L, None, nmax, check_sl2=True)
    scale = torch.where(suml2 > 0, sumlx / suml2, 0.0)
    return torch.where(zero, 0.0, scale), torch.where(zero[:, None], 0, L.t()).contiguous()
