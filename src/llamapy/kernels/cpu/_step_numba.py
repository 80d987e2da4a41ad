"""numba code of models/cpu_step.py (imported only where numba is): a decode step of the llama
family as one call, interpreting a table of operations.

Each row of the table is one operation (`OP_*`) and its arguments: addresses of float32
buffers, row strides in bytes, sizes, float32 constants as their bits. The quantized
matmuls are the VNNI kernels' workers (`_vnni_numba._launch`, run on torch's OpenMP team),
the attention `_attention_numba.decode`; the operations between them (RMSNorm, bias, rotary
embedding, the KV-cache write, the gated activation, the residual add) are single-threaded
loops over a few thousand floats, vectorized by LLVM (typed pointers and `fastmath`
reassociation, as in `_attention_numba`). Everything a step changes (the batch's rows, the
block tables, sequence lengths, slots, rotary angles) comes in `dyn` (`DYN_*`).

numba's disk cache keys a function by its own file only: `executor` closes over a digest of
the two kernel files it calls into, so an edit there recompiles it instead of reusing
stale code.
"""

from __future__ import annotations

import functools
import hashlib
import pathlib

import numpy as np
from numba import njit, types

from llamapy.kernels.cpu import _attention_numba, _vnni_numba
from llamapy.kernels.cpu._attention_numba import _exp_le0, _f2h, _u16_ptr
from llamapy.kernels.cpu._vnni_numba import _bits_f32, _cast_intrinsic, _f32_ptr, _i32_ptr, _launch

_FAST = {"reassoc", "contract"}
_i64_ptr = _cast_intrinsic(types.int64, types.CPointer(types.int64))

# operations (column 0 of a table row) and their arguments (columns 1..)
OP_NORM = 1  # src, src row stride, dst, dst row stride, weight (0: none), groups, width, eps
OP_MATMUL = 2  # worker, tiles, tile count, x, K, y (rows of x: K floats; y: 16 * tiles)
OP_BIAS = 3  # y, y row stride, bias, width
OP_ROPE = 4  # src, src stride, dst, dst stride, heads, head dim, rotated dims, interleaved,
#              rotary table (its angles at DYN_COS + 2 table)
OP_KV = 5  # k, k stride, v, v stride, k cache, v cache, k row floats, v row floats, the
#            caches' slot count (slots at or past it: ERR_SLOT; negative: a padding row),
#            the caches' element bytes (4 float32, 2 float16)
OP_ATTN = 6  # q, k cache, v cache, out, heads, kv heads, head dim, blocks, block size,
#              scale, window (0: none), softcap (0: none), worker, the caches' element bytes
OP_ACT = 7  # gate, gate stride, up, up stride, dst, width, kind (ACT_*)
OP_ADD = 8  # dst, dst stride, src, src stride, width
ROW = 16  # columns of a table row

ACT_SILU, ACT_GELU_TANH = 0, 1

# dyn: what changes between steps
DYN_ROWS = 0  # rows of the batch (one per sequence)
DYN_THREADS = 1  # matmul threads
DYN_ATTN_MIN_KEYS = 2  # attention over fewer visible keys runs on one thread
DYN_TABLES = 3  # block tables (rows, width) int32
DYN_WIDTH = 4
DYN_SEQ_LENS = 5  # (rows,) int32
DYN_SLOTS = 6  # (rows,) int64
DYN_COS = 7  # per rotary table t: cos at DYN_COS + 2 t, sin after it, (rows, rot / 2) float32
DYN_SIZE = 11

# what run returns besides 0 (ok): 16 * (failing row + 1) + ERR_*
ERR_SEQ_LEN, ERR_BLOCK, ERR_SLOT = 1, 2, 3


@njit(inline="always", fastmath=_FAST)
def _norm(a, rows):  # pragma: no cover - compiled by numba
    src, src_rs, dst, dst_rs, w, groups, width = a[1], a[2], a[3], a[4], a[5], a[6], a[7]
    eps = _bits_f32(np.int32(a[8]))
    for r in range(rows):
        for g in range(groups):
            x = _f32_ptr(src + r * src_rs + 4 * g * width)
            y = _f32_ptr(dst + r * dst_rs + 4 * g * width)
            ss = np.float64(0.0)  # as ggml's rms_norm: the sum in double, the rest float
            for i in range(width):
                v = np.float64(x[i])
                ss += v * v
            mean = np.float32(ss / width)
            scale = np.float32(1.0) / np.sqrt(mean + eps)
            if w != 0:
                wp = _f32_ptr(w)
                for i in range(width):
                    y[i] = x[i] * scale * wp[i]
            else:
                for i in range(width):
                    y[i] = x[i] * scale


@njit(inline="always", fastmath=_FAST)
def _rope(a, rows, dyn):  # pragma: no cover - compiled by numba
    src, src_rs, dst, dst_rs = a[1], a[2], a[3], a[4]
    heads, d, rot, interleaved, table = a[5], a[6], a[7], a[8], a[9]
    half = rot // 2
    for r in range(rows):
        cos = _f32_ptr(dyn[DYN_COS + 2 * table] + 4 * r * half)
        sin = _f32_ptr(dyn[DYN_COS + 2 * table + 1] + 4 * r * half)
        for h in range(heads):
            x = _f32_ptr(src + r * src_rs + 4 * h * d)
            y = _f32_ptr(dst + r * dst_rs + 4 * h * d)
            if interleaved:
                for i in range(half):
                    x0, x1 = x[2 * i], x[2 * i + 1]
                    y[2 * i] = x0 * cos[i] - x1 * sin[i]
                    y[2 * i + 1] = x0 * sin[i] + x1 * cos[i]
            else:
                for i in range(half):
                    x0, x1 = x[i], x[i + half]
                    y[i] = x0 * cos[i] - x1 * sin[i]
                    y[i + half] = x0 * sin[i] + x1 * cos[i]
            if dst != src:
                for i in range(rot, d):
                    y[i] = x[i]


@njit(inline="always", fastmath=_FAST)
def _kv(a, rows, dyn):  # pragma: no cover - compiled by numba
    k, k_rs, v, v_rs, k_cache, v_cache, kn, vn, n_slots, es = (
        a[1], a[2], a[3], a[4], a[5], a[6], a[7], a[8], a[9], a[10],
    )  # fmt: skip
    slots = _i64_ptr(dyn[DYN_SLOTS])
    for r in range(rows):
        s = slots[r]
        if s >= n_slots:
            return ERR_SLOT
        if s < 0:  # a padding row
            continue
        ks, vs = _f32_ptr(k + r * k_rs), _f32_ptr(v + r * v_rs)
        if es == 4:
            kd, vd = _f32_ptr(k_cache + 4 * s * kn), _f32_ptr(v_cache + 4 * s * vn)
            for i in range(kn):
                kd[i] = ks[i]
            for i in range(vn):
                vd[i] = vs[i]
        else:  # float16 caches: rounded to nearest even, as torch's cast
            kh, vh = _u16_ptr(k_cache + 2 * s * kn), _u16_ptr(v_cache + 2 * s * vn)
            for i in range(kn):
                kh[i] = _f2h(ks[i])
            for i in range(vn):
                vh[i] = _f2h(vs[i])
    return 0


@njit(inline="always", fastmath=_FAST)
def _act(a, rows):  # pragma: no cover - compiled by numba
    gate, gate_rs, up, up_rs, dst, width, kind = a[1], a[2], a[3], a[4], a[5], a[6], a[7]
    one, half = np.float32(1.0), np.float32(0.5)
    for r in range(rows):
        g, u = _f32_ptr(gate + r * gate_rs), _f32_ptr(up + r * up_rs)
        y = _f32_ptr(dst + 4 * r * width)
        if kind == ACT_SILU:  # x sigmoid(x), from exp(-|x|) <= 1
            for i in range(width):
                x = g[i]
                e = _exp_le0(-abs(x))
                s = (one if x >= 0 else e) / (one + e)
                y[i] = x * s * u[i]
        else:  # 0.5 x (1 + tanh(sqrt(2 / pi) (x + 0.044715 x^3)))
            for i in range(width):
                x = g[i]
                z = np.float32(0.7978845608028654) * (x + np.float32(0.044715) * x * x * x)
                e = _exp_le0(np.float32(-2.0) * abs(z))
                t = (one - e) / (one + e)
                t = t if z >= 0 else -t
                y[i] = half * x * (one + t) * u[i]


@njit(inline="always", fastmath=_FAST)
def _add(a, rows):  # pragma: no cover - compiled by numba
    dst, dst_rs, src, src_rs, width = a[1], a[2], a[3], a[4], a[5]
    for r in range(rows):
        y, x = _f32_ptr(dst + r * dst_rs), _f32_ptr(src + r * src_rs)
        for i in range(width):
            y[i] += x[i]


@njit(inline="always", fastmath=_FAST)
def _bias(a, rows):  # pragma: no cover - compiled by numba
    y0, y_rs, b, width = a[1], a[2], a[3], a[4]
    bp = _f32_ptr(b)
    for r in range(rows):
        y = _f32_ptr(y0 + r * y_rs)
        for i in range(width):
            y[i] += bp[i]


@njit(inline="always")
def _attend(a, rows, dyn):  # pragma: no cover - compiled by numba
    """Each sequence on its own (its result depends on nothing else in the batch): on one
    thread below DYN_ATTN_MIN_KEYS visible keys, else on DYN_THREADS."""
    q, k_cache, v_cache, out, heads, n_kv, d, n_blocks, block_size = (
        a[1], a[2], a[3], a[4], a[5], a[6], a[7], a[8], a[9],
    )  # fmt: skip
    scale, window, softcap = _bits_f32(np.int32(a[10])), a[11], _bits_f32(np.int32(a[12]))
    width, tables, seq_lens = dyn[DYN_WIDTH], dyn[DYN_TABLES], dyn[DYN_SEQ_LENS]
    lens = _i32_ptr(seq_lens)
    for r in range(rows):
        keys = lens[r] if window <= 0 else min(lens[r], window)
        threads = dyn[DYN_THREADS] if keys >= dyn[DYN_ATTN_MIN_KEYS] else 1
        err = _attention_numba.decode(
            q + 4 * r * heads * d, k_cache, v_cache, tables + 4 * r * width, seq_lens + 4 * r,
            out + 4 * r * heads * d, 1, heads, n_kv, d, n_blocks, block_size, width, scale,
            window, softcap, a[14], threads, a[13],
        )  # fmt: skip
        if err != 0:
            return err
    return 0


@njit(inline="always")
def _run(ops, dyn):  # pragma: no cover - compiled by numba
    """Runs the rows of `ops` in order; 0, or 16 * (row + 1) + ERR_* at the first failure."""
    rows, threads = dyn[DYN_ROWS], dyn[DYN_THREADS]
    for i in range(ops.shape[0]):
        a = ops[i]
        op = a[0]
        err = 0
        if op == OP_MATMUL:
            _launch(a[1], a[2], a[3], 0, rows, a[5], 0, a[6], a[4], threads)
        elif op == OP_NORM:
            _norm(a, rows)
        elif op == OP_ADD:
            _add(a, rows)
        elif op == OP_ROPE:
            _rope(a, rows, dyn)
        elif op == OP_KV:
            err = _kv(a, rows, dyn)
        elif op == OP_ATTN:
            err = _attend(a, rows, dyn)
        elif op == OP_ACT:
            _act(a, rows)
        elif op == OP_BIAS:
            _bias(a, rows)
        if err != 0:
            return 16 * (i + 1) + err
    return 0


def _dependency_key() -> str:
    """A digest of the kernel files `_run` compiles in (numba checks only this one's)."""
    h = hashlib.blake2b(digest_size=16)
    for mod in (_vnni_numba, _attention_numba):
        h.update(pathlib.Path(mod.__file__).read_bytes())
    return h.hexdigest()


@functools.cache
def executor():
    """`run(ops (n, ROW) int64, dyn (DYN_SIZE,) int64) -> int`: loaded from numba's disk
    cache, else compiled (a few seconds, once)."""
    key = _dependency_key()

    # error_model="numpy": a float division yields inf / nan instead of testing its divisor
    # for ZeroDivisionError, a branch per element that kept the activation's loop scalar
    # (SiLU over 1536 floats 7.4 -> ~0.5 us)
    @njit(nogil=True, cache=True, error_model="numpy")
    def run(ops, dyn):  # pragma: no cover - compiled by numba
        if len(key):  # a closure variable: part of numba's cache key
            return _run(ops, dyn)
        return -1

    return run
