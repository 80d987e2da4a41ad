"""numba code of kernels/cpu/vnni.py (imported only where numba and AVX512-VNNI are; the
arithmetic and the weight layout are described there).

`_tile_kernel(qtype, mt)` builds, as an LLVM IR loop over the 32-blocks of K, the dots of
one 16-row weight tile with `mt` rows of x. Per block: the tile's quants are 64-byte
vectors, one per 4-byte quad of the block (lane i: row i's four quants), each `vpdpbusd`ed
with x's matching four int8 quants broadcast to all lanes, into int32 lanes that start at
the block's offset term (`bias`); two chains (even and odd quads) for latency. Then
int -> float, times the rows' fp16 scales (one 32-byte load) times dx, into 16 float32
accumulators (Q4_1 / Q5_1: plus the rows' fp16 mins times cx; Q5_0 / Q5_1: each quad's
fifth bits OR-ed in from the rows' high-bit words). The 16 lanes are the tile's 16 outputs:
no horizontal sums. `_q4k_tile_kernel(mt)` is the same over Q4_K's 256-weight super-blocks,
scaled per 32-weight sub-block.

The workers (`_matmul_worker`) split a matrix's tiles over torch's OpenMP threads; given
float x (the decode-size op) they first quantize it, each thread its rows, as
vnni.quantize_x does, bit for bit (`_quantize_rows`).
"""

from __future__ import annotations

import ctypes
import functools

import numpy as np
from llvmlite import ir
from numba import carray, cfunc, njit, types
from numba.core.extending import intrinsic

from llamapy.kernels.cpu.vnni import GOMP_PATH, OFFSETS, Q4K_TILE, TILE_M, TILE_N, tile_layout
from llamapy.quant.types import QuantType

_I8, _I16, _I32, _I64 = ir.IntType(8), ir.IntType(16), ir.IntType(32), ir.IntType(64)
_F16, _F32 = ir.HalfType(), ir.FloatType()


def _vec(t: ir.Type, n: int) -> ir.VectorType:
    return ir.VectorType(t, n)


def _declare(module: ir.Module, name: str, ret: ir.Type, args: list[ir.Type]) -> ir.Function:
    try:
        return module.get_global(name)
    except KeyError:
        return ir.Function(module, ir.FunctionType(ret, args), name=name)


class _Emit:
    """IR helpers for a tile kernel's body: addresses, loads, splats, the VNNI dot."""

    def __init__(self, builder: ir.IRBuilder) -> None:
        self.b = builder
        v16 = _vec(_I32, 16)
        self._dpbusd = _declare(builder.module, "llvm.x86.avx512.vpdpbusd.512", v16, [v16] * 3)
        f16 = _vec(_F32, 16)
        self._fma = _declare(builder.module, "llvm.fma.v16f32", f16, [f16] * 3)

    @staticmethod
    def i64(v: int) -> ir.Constant:
        return ir.Constant(_I64, v)

    def addr(self, base: ir.Value, off: int | ir.Value) -> ir.Value:
        return self.b.add(base, self.i64(off) if isinstance(off, int) else off)

    def load(self, base: ir.Value, off: int | ir.Value, ty: ir.Type, align: int = 1):
        return self.b.load(self.b.inttoptr(self.addr(base, off), ty.as_pointer()), align=align)

    def splat(self, value: ir.Value, ty: ir.Type) -> ir.Value:
        one = self.b.insert_element(ir.Constant(_vec(ty, 1), None), value, self.i64(0))
        return self.b.shuffle_vector(one, one, ir.Constant(_vec(_I32, 16), [0] * 16))

    def fma(self, a: ir.Value, b: ir.Value, c: ir.Value) -> ir.Value:
        return self.b.call(self._fma, [a, b, c])

    def dot(self, init: ir.Value, codes: list, xt: ir.Value, offsets: list[int]) -> ir.Value:
        """float32 <16>: init (int32 lanes) + the codes' (64 unsigned bytes each) dots with
        x's int8 quads at xt + offset, broadcast to every lane; two chains for latency."""
        chains = [init, ir.Constant(_vec(_I32, 16), None)]
        for i, (u, off) in enumerate(zip(codes, offsets, strict=True)):
            xq = self.splat(self.load(xt, off, _I32), _I32)
            u32 = self.b.bitcast(u, _vec(_I32, 16))
            chains[i % 2] = self.b.call(self._dpbusd, [chains[i % 2], u32, xq])
        return self.b.sitofp(self.b.add(chains[0], chains[1]), _vec(_F32, 16))


def _tile_intrinsic(tb: int, block: int, mt: int, body):
    """numba intrinsic (w, kb, x, xs, sc, ss, y, ys) -> None, addresses and strides in
    bytes: the tile at w (kb tile-blocks of tb bytes, `block` weights of K each) against mt
    rows of x (int8 quants at x, xs apart; their per-32-block float32 dx, int32 bias and
    float32 cx planes at sc, ss apart); the 16 outputs of x row t are stored as float32 at
    y + t * ys. `body(e, base, xts, sts, kb32, accs)` emits one tile-block (base: its
    address; xts / sts: x row t's quants and scales at the block) and returns the new
    accumulators."""
    sig = types.none(*([types.int64] * 8))

    def codegen(context, builder, signature, args):
        w, kb, x, xs, sc, ss, y, ys = args
        e = _Emit(builder)
        entry = builder.block
        loop = builder.append_basic_block("tile.loop")
        done = builder.append_basic_block("tile.done")
        builder.branch(loop)
        builder.position_at_end(loop)
        blk = builder.phi(_I64)
        blk.add_incoming(e.i64(0), entry)
        accs = []
        for _ in range(mt):
            acc = builder.phi(_vec(_F32, 16))
            acc.add_incoming(ir.Constant(_vec(_F32, 16), None), entry)
            accs.append(acc)
        base = e.addr(w, builder.mul(blk, e.i64(tb)))
        x_blk = builder.mul(blk, e.i64(block))
        s_blk = builder.mul(blk, e.i64(block // 32 * 4))
        xts = [e.addr(e.addr(x, builder.mul(xs, e.i64(t))), x_blk) for t in range(mt)]
        sts = [e.addr(e.addr(sc, builder.mul(ss, e.i64(t))), s_blk) for t in range(mt)]
        kb32 = builder.mul(kb, e.i64(block // 32))
        new = body(e, base, xts, sts, kb32, list(accs))
        blk_next = builder.add(blk, e.i64(1))
        blk.add_incoming(blk_next, builder.block)
        for acc, value in zip(accs, new, strict=True):
            acc.add_incoming(value, builder.block)
        builder.cbranch(builder.icmp_signed("<", blk_next, kb), loop, done)

        builder.position_at_end(done)
        for t, value in enumerate(new):
            yt = builder.add(y, builder.mul(ys, e.i64(t)))
            builder.store(value, builder.inttoptr(yt, _vec(_F32, 16).as_pointer()), align=4)
        return context.get_dummy_value()

    def typer(typingctx, w, kb, x, xs, sc, ss, y, ys):
        return sig, codegen

    return intrinsic(typer)


def _tile_kernel(qtype: QuantType, mt: int):
    """The legacy types' tile kernel (`_tile_intrinsic` over 32-blocks)."""
    tb, d_off, m_off, h_off, q_off, quads = tile_layout(qtype)
    nibbles = qtype != QuantType.Q8_0

    def body(e: _Emit, base, xts, sts, kb32, accs):
        b = e.b
        c8 = lambda v: ir.Constant(_vec(_I8, 64), [v] * 64)  # noqa: E731
        codes, offsets = [], []  # the tile-block's quants and the x offset of their quads
        if h_off >= 0:
            words = e.load(base, h_off, _vec(_I32, 16))
            bit4 = ir.Constant(_vec(_I32, 16), [0x10101010] * 16)
        for q in range(quads):
            v = e.load(base, q_off + 64 * q, _vec(_I8, 64))
            if nibbles:
                lo, hi = b.and_(v, c8(0x0F)), b.lshr(v, c8(4))
                if h_off >= 0:  # fifth bits: see vnni.high_bit_words
                    shl = b.shl(words, ir.Constant(_vec(_I32, 16), [4 - q] * 16))
                    shr = b.lshr(words, ir.Constant(_vec(_I32, 16), [q] * 16))
                    lo = b.or_(lo, b.bitcast(b.and_(shl, bit4), _vec(_I8, 64)))
                    hi = b.or_(hi, b.bitcast(b.and_(shr, bit4), _vec(_I8, 64)))
                codes += [lo, hi]
                offsets += [4 * q, 16 + 4 * q]
            else:
                codes.append(b.xor(v, c8(0x80)))
                offsets.append(4 * q)
        d = b.fpext(e.load(base, d_off, _vec(_F16, 16), align=2), _vec(_F32, 16))
        if m_off >= 0:
            mins = b.fpext(e.load(base, m_off, _vec(_F16, 16), align=2), _vec(_F32, 16))
        bias_off, cx_off = b.mul(kb32, e.i64(4)), b.mul(kb32, e.i64(8))
        for t in range(len(accs)):
            dx = e.load(sts[t], 0, _F32, align=4)
            bias = e.splat(e.load(sts[t], bias_off, _I32, align=4), _I32)
            isum = e.dot(bias, codes, xts[t], offsets)
            accs[t] = e.fma(isum, b.fmul(d, e.splat(dx, _F32)), accs[t])
            if m_off >= 0:
                cx = e.load(sts[t], cx_off, _F32, align=4)
                accs[t] = e.fma(mins, e.splat(cx, _F32), accs[t])
        return accs

    return _tile_intrinsic(tb, 32, mt, body)


def _q4k_tile_kernel(mt: int):
    """The Q4_K tile kernel (`_tile_intrinsic` over 256-weight super-blocks). Per sub-block
    j of 32 weights: its 8 quads' dots with x (dx and cx per 32-block of x, as the legacy
    types), times the rows' d * sc_j and dx_j, minus the rows' dmin * m_j times cx_j."""
    tb, d_off, dmin_off, sc_off, m_off, q_off = Q4K_TILE

    def body(e: _Emit, base, xts, sts, kb32, accs):
        b = e.b
        halves = lambda off: b.fpext(e.load(base, off, _vec(_F16, 16), align=2), _vec(_F32, 16))  # noqa: E731
        bytes16 = lambda off: b.uitofp(e.load(base, off, _vec(_I8, 16)), _vec(_F32, 16))  # noqa: E731
        d, dmin = halves(d_off), halves(dmin_off)
        scale = [b.fmul(d, bytes16(sc_off + 16 * j)) for j in range(8)]
        mins = [b.fneg(b.fmul(dmin, bytes16(m_off + 16 * j))) for j in range(8)]
        low = ir.Constant(_vec(_I8, 64), [0x0F] * 64)
        four = ir.Constant(_vec(_I8, 64), [4] * 64)
        zero = ir.Constant(_vec(_I32, 16), None)
        cx_plane = b.mul(kb32, e.i64(8))
        # chunk by chunk (its 8 quads: sub-blocks 2c and 2c + 1), so that 16 unpacked quad
        # vectors are live at a time, not the super-block's 64 (register spills at 4 rows)
        for c in range(4):
            quads = [e.load(base, q_off + 64 * (8 * c + q), _vec(_I8, 64)) for q in range(8)]
            codes = {
                2 * c: [b.and_(v, low) for v in quads],
                2 * c + 1: [b.lshr(v, four) for v in quads],
            }
            for t in range(len(accs)):
                for j, vectors in codes.items():
                    isum = e.dot(zero, vectors, xts[t], [32 * j + 4 * q for q in range(8)])
                    dx = e.load(sts[t], 4 * j, _F32, align=4)
                    cx = e.load(e.addr(sts[t], cx_plane), 4 * j, _F32, align=4)
                    accs[t] = e.fma(isum, b.fmul(scale[j], e.splat(dx, _F32)), accs[t])
                    accs[t] = e.fma(mins[j], e.splat(cx, _F32), accs[t])
        return accs

    return _tile_intrinsic(tb, 256, mt, body)


# -- workers: run inside torch's OpenMP thread pool ----------------------------------------
#
# numba's own parallel loops start a second OpenMP runtime (the system's libgomp) beside the
# one torch ships: after every torch kernel torch's threads spin while numba's run, and two
# cores then carry four busy threads (a SmolLM2 decode step measured 10.1 -> 14.7 ms). So the
# kernels are numba `cfunc`s launched with torch's libgomp's own `GOMP_parallel` (the call a
# `#pragma omp parallel` compiles to): the same threads as torch's kernels, one pool.

_GOMP = ctypes.CDLL(GOMP_PATH)
_thread_num = _GOMP.omp_get_thread_num
_thread_num.restype, _thread_num.argtypes = ctypes.c_int, []
_num_threads = _GOMP.omp_get_num_threads
_num_threads.restype, _num_threads.argtypes = ctypes.c_int, []
# GOMP_parallel(fn, data, num_threads, flags), addresses as integers for calls from numba
_parallel_int = _GOMP["GOMP_parallel"]
_parallel_int.restype = None
_parallel_int.argtypes = [ctypes.c_int64, ctypes.c_int64, ctypes.c_uint, ctypes.c_uint]
_barrier = _GOMP["GOMP_barrier"]
_barrier.restype, _barrier.argtypes = None, []
_ARGS = types.void(types.CPointer(types.int64))


# -- x's 8-bit quantization inside the op (one-row decode: see vnni.vnni_mm) ---------------


def _cast_intrinsic(src, dst):
    """numba intrinsic: an address (int64) as a typed pointer, or a scalar's bits."""
    sig = dst(src)

    def codegen(context, builder, signature, args):
        ty = context.get_value_type(dst)
        if isinstance(dst, types.CPointer):
            return builder.inttoptr(args[0], ty)
        return builder.bitcast(args[0], ty)

    def typer(typingctx, value):
        return sig, codegen

    return intrinsic(typer)


_f32_ptr = _cast_intrinsic(types.int64, types.CPointer(types.float32))
_i32_ptr = _cast_intrinsic(types.int64, types.CPointer(types.int32))
_i8_ptr = _cast_intrinsic(types.int64, types.CPointer(types.int8))
_f32_bits = _cast_intrinsic(types.float32, types.int32)
_bits_f32 = _cast_intrinsic(types.int32, types.float32)


@njit(inline="always")
def _round_fp16(v):  # pragma: no cover - compiled by numba
    """float32 v >= 0 rounded to the nearest fp16 value (ties to even), as float32: what
    `v.to(torch.float16).float()` gives (fp16 subnormals below 2^-14, inf from 65520)."""
    if v >= np.float32(65520.0):
        return np.float32(np.inf)
    if v < np.float32(2.0**-14):
        return np.rint(v * np.float32(2.0**24)) * np.float32(2.0**-24)
    b = _f32_bits(v)
    b = (b + np.int32(0xFFF) + ((b >> np.int32(13)) & np.int32(1))) & np.int32(-8192)
    return _bits_f32(b)


@njit(inline="always")
def _quantize_rows(x, q, s, m0, m1, k, offset, with_min):  # pragma: no cover - numba
    """Rows m0:m1 of x (float32 at address x, K wide) as vnni.quantize_x quantizes them:
    int8 quants at q, per row (dx, bias, cx) per 32-block at s (the same bits)."""
    kb = k // 32
    for r in range(m0, m1):
        xr = carray(_f32_ptr(x + r * k * 4), (k,))
        qr = carray(_i8_ptr(q + r * k), (k,))
        dx_row = carray(_f32_ptr(s + r * 12 * kb), (kb,))
        bias_row = carray(_i32_ptr(s + r * 12 * kb + 4 * kb), (kb,))
        cx_row = carray(_f32_ptr(s + r * 12 * kb + 8 * kb), (kb,))
        for b in range(kb):
            amax = np.float32(0.0)
            for i in range(32 * b, 32 * b + 32):
                a = abs(xr[i])
                if a > amax:
                    amax = a
            inv = np.float32(127.0) / amax if amax != np.float32(0.0) else np.float32(0.0)
            qsum = 0
            for i in range(32 * b, 32 * b + 32):
                v = np.rint(xr[i] * inv)
                qr[i] = np.int8(v)
                qsum += np.int32(v)
            dx = _round_fp16(amax / np.float32(127.0))
            dx_row[b] = dx
            bias_row[b] = np.int32(offset * qsum)
            cx_row[b] = dx * np.float32(qsum) if with_min else np.float32(0.0)


def _launcher(worker):
    """An njit function (w, tiles, q, m, k, s, y, threads) that runs `worker` on them: one
    numba call (~1 us in all) where building the arguments and calling GOMP_parallel
    through ctypes from Python costs ~3.5 us."""
    address = worker.address

    @njit(nogil=True)
    def run(w, tiles, q, m, k, s, y, x, threads):  # pragma: no cover - compiled by numba
        """x = 0: q and s hold x's quantization; else x is float32 x's address, and q, s
        0: scratch for its quantization is allocated here."""
        a = np.empty(8, np.int64)
        qbuf = np.empty(m * k if x != 0 else 0, np.int8)
        sbuf = np.empty(m * 3 * (k // 32) if x != 0 else 0, np.float32)
        if x != 0:
            q, s = qbuf.ctypes.data, sbuf.ctypes.data
        a[0], a[1], a[2], a[3], a[4], a[5], a[6], a[7] = w, tiles, q, m, k, s, y, x
        _parallel_int(address, a.ctypes.data, threads, 0)
        return qbuf.size + sbuf.size  # keeps the scratch alive through the call

    return run


def _matmul_worker(qtype: QuantType):
    if qtype == QuantType.Q4_K:
        k1, k2, k3, k4 = (_q4k_tile_kernel(mt) for mt in range(1, TILE_M + 1))
        tb, block = Q4K_TILE[0], 256
    else:
        k1, k2, k3, k4 = (_tile_kernel(qtype, mt) for mt in range(1, TILE_M + 1))
        tb, block = tile_layout(qtype)[0], 32

    offset = OFFSETS.get(qtype, 0)
    with_min = qtype not in OFFSETS

    @cfunc(_ARGS, nopython=True)
    def work(a):  # pragma: no cover - compiled by numba
        w, tiles, q, m, k, s, y, x = a[0], a[1], a[2], a[3], a[4], a[5], a[6], a[7]
        kb = k // block  # tile-blocks per tile
        ss = 12 * (k // 32)
        ys = tiles * TILE_N * 4
        tid, nt = _thread_num(), _num_threads()
        if x != 0:  # float x given: quantize it first, each thread its rows
            _quantize_rows(x, q, s, m * tid // nt, m * (tid + 1) // nt, k, offset, with_min)
            _barrier()
        for tile in range(tiles * tid // nt, tiles * (tid + 1) // nt):
            wt = w + tile * kb * tb
            for m0 in range(0, m, TILE_M):
                mt = min(TILE_M, m - m0)
                xq, sc = q + m0 * k, s + m0 * ss
                yp = y + (m0 * tiles + tile) * TILE_N * 4
                if mt == 4:
                    k4(wt, kb, xq, k, sc, ss, yp, ys)
                elif mt == 3:
                    k3(wt, kb, xq, k, sc, ss, yp, ys)
                elif mt == 2:
                    k2(wt, kb, xq, k, sc, ss, yp, ys)
                else:
                    k1(wt, kb, xq, k, sc, ss, yp, ys)

    return work


@functools.cache
def runner(qtype: int):
    """The njit launcher of `qtype`'s matmul (see `_launcher`), compiled on first use:
    ~0.3 s a type, so a model compiles only the types it has."""
    return _launcher(_matmul_worker(QuantType(qtype)))
