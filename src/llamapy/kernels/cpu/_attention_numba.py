"""numba code of kernels/cpu/attention.py (imported only where numba is): decode attention
over the paged float32 or float16 KV cache, one new query per sequence.

Per sequence, each thread of torch's OpenMP team (launched as the vnni kernels are, through
`GOMP_parallel`) takes a contiguous share of the visible keys (`_part`): the scores of every
query head (each key row, all KV heads, read once), their maximum and exp-sum, and the
exp-weighted sum of the value rows (each read once); after a barrier each thread merges its
share of the query heads over the threads' parts by their maxima (`_merge`). The dot
products and the row updates are loops over head_dim that LLVM vectorizes; reassociating
the sums (`fastmath` reassoc / contract only: no infinity or NaN assumptions) is what lets
it, and so does reading memory through typed pointers (numba's array indexing wraps
negative indices). Arguments are addresses (int64) and sizes, not arrays: numba unboxes an
array argument in ~1 us, and a decode step makes one call a layer.
"""

from __future__ import annotations

import functools

import numpy as np
from llvmlite import ir
from numba import carray, cfunc, njit, types
from numba.core.extending import intrinsic

from llamapy.kernels.cpu._vnni_numba import (
    _ARGS,
    _barrier,
    _bits_f32,
    _cast_intrinsic,
    _f32_bits,
    _f32_ptr,
    _gomp_parallel,
    _i32_ptr,
    _num_threads,
    _thread_num,
)

_FAST = {"reassoc", "contract"}
_u16_ptr = _cast_intrinsic(types.int64, types.CPointer(types.uint16))


@intrinsic
def _h2f(typingctx, bits):
    """The float32 value of IEEE half-precision bits (uint16): fpext, which LLVM turns into
    vcvtph2ps over a vectorized loop (numba has no float16 arithmetic on the CPU)."""

    def codegen(context, builder, signature, args):
        return builder.fpext(builder.bitcast(args[0], ir.HalfType()), ir.FloatType())

    return types.float32(types.uint16), codegen


@intrinsic
def _f2h(typingctx, value):
    """float32 -> IEEE half-precision bits (uint16), rounded to nearest even (fptrunc; as
    torch's and numpy's float16 casts: overflow to infinity, NaN kept)."""

    def codegen(context, builder, signature, args):
        return builder.bitcast(builder.fptrunc(args[0], ir.HalfType()), ir.IntType(16))

    return types.uint16(types.float32), codegen


@njit(inline="always", fastmath=_FAST)
def _dot(qp, row, d, es):  # pragma: no cover - compiled by numba
    """sum_j q[j] k[j] over a cache row at address `row` of float32 (es 4) or float16 (es 2)
    values."""
    s = np.float32(0.0)
    if es == 4:
        kp = _f32_ptr(row)
        for j in range(d):
            s += qp[j] * kp[j]
    else:
        hp = _u16_ptr(row)
        for j in range(d):
            s += qp[j] * _h2f(hp[j])
    return s


@njit(inline="always", fastmath=_FAST)
def _axpy(acc, w, row, d, es):  # pragma: no cover - compiled by numba
    """acc[j] += w v[j] for a cache row at address `row` of float32 (es 4) or float16 (es 2)."""
    if es == 4:
        vp = _f32_ptr(row)
        for j in range(d):
            acc[j] += w * vp[j]
    else:
        hp = _u16_ptr(row)
        for j in range(d):
            acc[j] += w * _h2f(hp[j])


_LOG2E = np.float32(1.4426950408889634)
# 2^f on [-1/2, 1/2]: Taylor coefficients of exp(f ln 2), degree 7 (relative error < 1e-8)
_C = tuple(np.float32(c) for c in (1.0, 0.6931472, 0.2402265, 0.05550411, 0.009618129,
                                    0.001333356, 1.540353e-4, 1.525273e-5))  # fmt: skip


@njit(inline="always", fastmath=_FAST)
def _exp_le0(x):  # pragma: no cover - compiled by numba
    """exp(x) for float32 x <= 0 in arithmetic that vectorizes (libm's expf is a scalar
    call): 2^n 2^f with t = x log2(e) = n + f, n an integer, |f| <= 1/2, 2^n put into the
    exponent bits; below -87.3 (where float32 turns subnormal) 0. Within a few units in the
    last place of expf."""
    t = max(x, np.float32(-87.3)) * _LOG2E
    n = np.floor(t + np.float32(0.5))
    f = t - n
    p = _C[7]
    p = p * f + _C[6]
    p = p * f + _C[5]
    p = p * f + _C[4]
    p = p * f + _C[3]
    p = p * f + _C[2]
    p = p * f + _C[1]
    p = p * f + _C[0]
    two_n = _bits_f32((np.int32(n) + np.int32(127)) << np.int32(23))
    return np.float32(0.0) if x < np.float32(-87.3) else p * two_n


@njit(inline="always", fastmath=_FAST)
def _part(a, b, t, nt, sp, ap, mp, d, es):  # pragma: no cover - compiled by numba
    """Thread t's share of sequence b: keys [lo, hi) of its visible range; per query head
    its scores (scratch at sp), their maximum and exp-sum (mp) and the exp-weighted sum of
    the value rows (ap), not yet normalized. es: the caches' element bytes (4 float32, 2
    float16)."""
    q_ptr, k_ptr, v_ptr, tables_ptr, seq_lens_ptr = a[0], a[1], a[2], a[3], a[4]
    n_heads, n_kv, block_size, width = a[7], a[8], a[11], a[12]
    scale, window, cap = _bits_f32(np.int32(a[13])), a[14], _bits_f32(np.int32(a[15]))
    group = n_heads // n_kv
    row_bytes = es * n_kv * d
    end = _i32_ptr(seq_lens_ptr)[b]
    start = max(end - window, 0) if window > 0 else 0
    chunk = (end - start + nt - 1) // nt
    lo = start + t * chunk
    hi = min(lo + chunk, end)
    n = max(hi - lo, 0)
    table = _i32_ptr(tables_ptr + 4 * b * width)
    q0 = q_ptr + 4 * b * n_heads * d
    for i in range(n):  # scores: key rows in order, each (all KV heads) read once
        p = lo + i
        row = (table[p // block_size] * block_size + p % block_size) * row_bytes
        for hq in range(n_heads):
            s = _dot(_f32_ptr(q0 + 4 * hq * d), k_ptr + row + es * (hq // group) * d, d, es)
            s *= scale
            if cap > 0:
                s = cap * np.tanh(s / cap)
            _f32_ptr(sp)[hq * n + i] = s
    for hq in range(n_heads):
        sg = _f32_ptr(sp + 4 * hq * n)
        m = np.float32(-np.inf)
        for i in range(n):
            m = max(m, sg[i])
        total = np.float32(0.0)
        for i in range(n):
            e = _exp_le0(sg[i] - m)
            sg[i] = e
            total += e
        _f32_ptr(mp)[2 * hq] = m
        _f32_ptr(mp)[2 * hq + 1] = total
        acc = _f32_ptr(ap + 4 * hq * d)
        for j in range(d):
            acc[j] = 0.0
    for i in range(n):  # the weighted sum: value rows in order, each read once
        p = lo + i
        row = (table[p // block_size] * block_size + p % block_size) * row_bytes
        for hq in range(n_heads):
            w = _f32_ptr(sp)[hq * n + i]
            _axpy(_f32_ptr(ap + 4 * hq * d), w, v_ptr + row + es * (hq // group) * d, d, es)


@njit(inline="always", fastmath=_FAST)
def _merge(a, b, t, nt, acc_ptr, ml_ptr, acc_stride, ml_stride, d):  # pragma: no cover - numba
    """Thread t's query heads of sequence b (every nt-th): the threads' parts combined by
    their maxima (flash-decoding's merge) into out."""
    out_ptr, n_heads = a[5], a[7]
    for hq in range(t, n_heads, nt):
        big = np.float32(-np.inf)
        for u in range(nt):
            if _f32_ptr(ml_ptr + u * ml_stride)[2 * hq + 1] > 0:
                big = max(big, _f32_ptr(ml_ptr + u * ml_stride)[2 * hq])
        op = _f32_ptr(out_ptr + 4 * (b * n_heads + hq) * d)
        for j in range(d):
            op[j] = 0.0
        total = np.float32(0.0)
        for u in range(nt):
            m = _f32_ptr(ml_ptr + u * ml_stride)[2 * hq]
            part = _f32_ptr(ml_ptr + u * ml_stride)[2 * hq + 1]
            if part > 0:
                f = _exp_le0(m - big)
                total += part * f
                acc = _f32_ptr(acc_ptr + u * acc_stride + 4 * hq * d)
                for j in range(d):
                    op[j] += f * acc[j]
        inv = np.float32(1.0) / total if total > 0 else np.float32(0.0)
        for j in range(d):
            op[j] *= inv


@functools.cache
def worker_for(head_dim: int, elem_bytes: int = 4) -> int:
    """The address of `decode`'s worker for heads of `head_dim` over caches of `elem_bytes`
    (4 float32, 2 float16) values: a cfunc (a[22]) -> None,
    one thread's share of every sequence's keys, then (after every thread's) its share of
    the query heads' merge. The head width is a constant of the compiled code (its loops
    unrolled, no remainder: 13.4 -> 11.1 us a call at 128 keys, 107 -> 85 at 1024, SmolLM2
    heads on one thread); one per width, loaded from numba's disk cache or compiled
    (~0.5 s). A call whose a[9] is another width, or a[21] other element bytes, does
    nothing."""
    d, es = int(head_dim), int(elem_bytes)
    if es not in (2, 4):
        raise ValueError(f"the caches' elements must be 2 or 4 bytes, got {elem_bytes}")

    @cfunc(_ARGS, nopython=True, cache=True, fastmath=_FAST)
    def work(ap):  # pragma: no cover - compiled by numba
        a = carray(ap, (22,))
        if a[9] != d or a[21] != es:  # closure constants, part of numba's cache key
            return
        n_seqs = a[6]
        scores, accs, mls = a[16], a[17], a[18]
        s_stride, acc_stride, ml_stride = a[19], a[20], 8 * a[7]
        t, nt = np.int64(_thread_num()), np.int64(_num_threads())
        for b in range(n_seqs):
            _part(a, b, t, nt, scores + t * s_stride, accs + t * acc_stride, mls + t * ml_stride, d,
                  es)  # fmt: skip
            _barrier()
            _merge(a, b, t, nt, accs, mls, acc_stride, ml_stride, d)
            _barrier()

    return work.address


@njit(nogil=True, cache=True)
def decode(
    q_ptr, k_ptr, v_ptr, tables_ptr, seq_lens_ptr, out_ptr,
    n_seqs, n_heads, n_kv, head_dim, n_blocks, block_size, width, scale, window, softcap,
    elem_bytes, threads, worker,
):  # fmt: skip  # pragma: no cover - compiled by numba
    """out (B, n_heads, d) <- attention of q (B, n_heads, d) over the keys [start, seq_len)
    of each sequence (start = seq_len - window with a window, else 0), read through its
    block-table row (B, width) from the caches (n_blocks, block_size, n_kv, d) of
    `elem_bytes` values (4 float32, 2 float16); q and out float32, all contiguous, tables
    and seq_lens int32. softcap > 0: tanh(s / c) * c on the scaled
    scores. A sequence with no visible key gets zeros. On `threads` of torch's OpenMP team
    (as the matmuls, `_vnni_numba`), each a contiguous share of every sequence's keys, merged
    by their maxima; `worker`: `worker_for(head_dim, elem_bytes)`. Returns 0; 1 when a
    seq_len lies outside [0, width * block_size], 2 when a visible key's block number lies
    outside [0, n_blocks) (nothing written for either).

    Memory is read through typed pointers, not arrays: numba's array indexing wraps
    negative indices, a select in every access that kept the loops scalar (4x slower)."""
    seq_lens = _i32_ptr(seq_lens_ptr)
    longest = 0
    for b in range(n_seqs):
        end = seq_lens[b]
        if end < 0 or end > width * block_size:
            return 1
        start = max(end - window, 0) if window > 0 else 0
        table = _i32_ptr(tables_ptr + 4 * b * width)
        for p in range(start // block_size, (end + block_size - 1) // block_size):
            if table[p] < 0 or table[p] >= n_blocks:
                return 2
        longest = max(longest, end - start)
    nt = max(threads, 1)
    s_len = n_heads * ((longest + nt - 1) // nt + 1)
    scores = np.empty(nt * s_len, np.float32)
    accs = np.empty(nt * n_heads * head_dim, np.float32)
    mls = np.empty(nt * 2 * n_heads, np.float32)
    a = np.empty(22, np.int64)
    a[0], a[1], a[2], a[3], a[4], a[5] = q_ptr, k_ptr, v_ptr, tables_ptr, seq_lens_ptr, out_ptr
    a[6], a[7], a[8], a[9], a[10] = n_seqs, n_heads, n_kv, head_dim, n_blocks
    a[11], a[12], a[14] = block_size, width, window
    a[13], a[15] = _f32_bits(np.float32(scale)), _f32_bits(np.float32(softcap))
    a[16], a[17], a[18] = scores.ctypes.data, accs.ctypes.data, mls.ctypes.data
    a[19], a[20], a[21] = 4 * s_len, 4 * n_heads * head_dim, elem_bytes
    _gomp_parallel(worker, a.ctypes.data, nt, 0)
    return 0 * (scores.size + accs.size + mls.size)  # (keeps the scratch alive until here)
