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

The workers (`_worker(qtype)`, one cfunc per type, `_tile(qtype, mt, ...)` their
intrinsic) split a matrix's tiles over torch's OpenMP threads; given float x (the
decode-size op) they first quantize it, each thread its rows, as vnni.quantize_x does, bit
for bit (`_quantize_rows`). Compiled code is cached on disk by numba (next to this file, or
in NUMBA_CACHE_DIR): a new process loads a type's kernels in milliseconds.
"""

from __future__ import annotations

import ctypes
import functools

import numpy as np
from llvmlite import binding as llvm
from llvmlite import ir
from numba import carray, cfunc, njit, types
from numba.core.errors import TypingError
from numba.core.extending import intrinsic

from llamapy.kernels.cpu.vnni import (
    GOMP_PATH,
    LAYOUTS,
    OFFSETS,
    Q4K_TILE,
    Q6K_OFFSET,
    Q6K_TILE,
    TILE_M,
    TILE_N,
    tile_layout,
)
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


# Each tile-block's loop iteration prefetches the tile's bytes this far ahead: on a
# Sapphire-Rapids-class VM (2 threads) a decode sweep streamed 13.3 -> 15.5 GB/s and the 1B
# Q4_0 decode went 23.6-25.5 -> 27.8-28.8 t/s (512: 27.3, 2048: 26.7); on an EPYC (Zen 4)
# host earlier, prefetching changed nothing measurable.
PREFETCH_AHEAD = 1024


class _Emit:
    """IR helpers for a tile kernel's body: addresses, loads, splats, the VNNI dot."""

    def __init__(self, builder: ir.IRBuilder) -> None:
        self.b = builder
        v16 = _vec(_I32, 16)
        self._dpbusd = _declare(builder.module, "llvm.x86.avx512.vpdpbusd.512", v16, [v16] * 3)
        f16 = _vec(_F32, 16)
        self._fma = _declare(builder.module, "llvm.fma.v16f32", f16, [f16] * 3)
        p8 = ir.PointerType(_I8)
        self._prefetch = _declare(
            builder.module, "llvm.prefetch.p0", ir.VoidType(), [p8, *[_I32] * 3]
        )

    @staticmethod
    def i64(v: int) -> ir.Constant:
        return ir.Constant(_I64, v)

    def addr(self, base: ir.Value, off: int | ir.Value) -> ir.Value:
        return self.b.add(base, self.i64(off) if isinstance(off, int) else off)

    def load(self, base: ir.Value, off: int | ir.Value, ty: ir.Type, align: int = 1):
        return self.b.load(self.b.inttoptr(self.addr(base, off), ty.as_pointer()), align=align)

    def prefetch(self, base: ir.Value, off: int) -> None:
        """A read prefetch of the cache line at base + off into all cache levels (a hint:
        past the end of the tiles it reads nothing and cannot fault)."""
        ptr = self.b.inttoptr(self.addr(base, off), ir.PointerType(_I8))
        self.b.call(
            self._prefetch, [ptr, ir.Constant(_I32, 0), ir.Constant(_I32, 3), ir.Constant(_I32, 1)]
        )

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


def _tile_codegen(tb: int, block: int, mt: int, body):
    """Codegen of `_tile` (w, kb, x, xs, sc, ss, y, ys; addresses and strides in bytes):
    the tile at w (kb tile-blocks of tb bytes, `block` weights of K each) against mt rows of
    x (int8 quants at x, xs apart; their per-32-block float32 dx, int32 bias and float32 cx
    planes at sc, ss apart); the 16 outputs of x row t are stored as float32 at y + t * ys.
    `body(e, base, xts, sts, kb32, accs)` emits one tile-block (base: its address; xts /
    sts: x row t's quants and scales at the block) and returns the new accumulators."""

    def codegen(context, builder, signature, args):
        w, kb, x, xs, sc, ss, y, ys = args[2:]
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
        for line in range(0, tb, 64):  # the stream ahead: see PREFETCH_AHEAD
            e.prefetch(base, PREFETCH_AHEAD + line)
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

    return codegen


def _tile_kernel(qtype: QuantType, mt: int):
    """The legacy types' tile kernel (`_tile_codegen` over 32-blocks)."""
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

    return _tile_codegen(tb, 32, mt, body)


def _q4k_tile_kernel(mt: int):
    """The Q4_K tile kernel (`_tile_codegen` over 256-weight super-blocks). Per sub-block
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

    return _tile_codegen(tb, 256, mt, body)


def _q6k_tile_kernel(mt: int):
    """The Q6_K tile kernel (`_tile_codegen` over 256-weight super-blocks). Per half of 128
    weights and pair p of its quads: the 6-bit codes are ql's nibbles OR-ed with their high
    bits from the pair's word (see vnni.q6k_high_words); low nibbles are weights 8p.. and
    8p + 4.. (group p // 2 of 16 weights), high nibbles the same + 64 (group 4 + p // 2).
    Each 16-weight group's dots start at x's -32 sum(q) of that 16 (the 32-block's bias
    plane for its first 16, cx for its second), then times the rows' d * scale and dx."""
    tb, d_off, sc_off, pair_off = Q6K_TILE

    def body(e: _Emit, base, xts, sts, kb32, accs):
        b = e.b
        d = b.fpext(e.load(base, d_off, _vec(_F16, 16), align=2), _vec(_F32, 16))
        low = ir.Constant(_vec(_I8, 64), [0x0F] * 64)
        four = ir.Constant(_vec(_I8, 64), [4] * 64)
        mask = ir.Constant(_vec(_I32, 16), [0x30303030] * 16)

        def shifted(word, n: int):  # each byte's bits 4 - n, 5 - n at bits 4-5
            count = ir.Constant(_vec(_I32, 16), [abs(n)] * 16)
            w = b.shl(word, count) if n > 0 else b.lshr(word, count) if n < 0 else word
            return b.bitcast(b.and_(w, mask), _vec(_I8, 64))

        bias_plane, cx_plane = b.mul(kb32, e.i64(4)), b.mul(kb32, e.i64(8))
        for h in range(2):
            for gg in range(4):  # groups gg (low nibbles) and 4 + gg (high) of half h
                lo, hi = [], []
                for p in (2 * gg, 2 * gg + 1):
                    off = pair_off + 192 * (8 * h + p)
                    word = e.load(base, off, _vec(_I32, 16))
                    v0 = e.load(base, off + 64, _vec(_I8, 64))
                    v1 = e.load(base, off + 128, _vec(_I8, 64))
                    lo += [b.or_(b.and_(v0, low), shifted(word, 4))]
                    hi += [b.or_(b.lshr(v0, four), shifted(word, 2))]
                    lo += [b.or_(b.and_(v1, low), shifted(word, 0))]
                    hi += [b.or_(b.lshr(v1, four), shifted(word, -2))]
                for g, codes in ((gg, lo), (4 + gg, hi)):
                    group = 8 * h + g  # of the super-block's 16
                    sc = b.sitofp(e.load(base, sc_off + 16 * group, _vec(_I8, 16)), _vec(_F32, 16))
                    scale = b.fmul(d, sc)
                    x_off = 16 * group
                    offsets = [x_off + 4 * j for j in range(4)]
                    blk = 4 * (group // 2)  # byte offset of its 32-block in each plane
                    for t in range(len(accs)):
                        if group % 2 == 0:
                            init = e.load(e.addr(sts[t], bias_plane), blk, _I32, align=4)
                        else:
                            cx = e.load(e.addr(sts[t], cx_plane), blk, _F32, align=4)
                            init = b.fptosi(cx, _I32)
                        isum = e.dot(e.splat(init, _I32), codes, xts[t], offsets)
                        dx = e.load(sts[t], blk, _F32, align=4)
                        accs[t] = e.fma(isum, b.fmul(scale, e.splat(dx, _F32)), accs[t])
        return accs

    return _tile_codegen(tb, 256, mt, body)


@functools.cache
def _tile_kernel_of(qtype: int, mt: int):
    if qtype == QuantType.Q4_K:
        return _q4k_tile_kernel(mt)
    if qtype == QuantType.Q6_K:
        return _q6k_tile_kernel(mt)
    return _tile_kernel(QuantType(qtype), mt)


@intrinsic(prefer_literal=True)
def _tile(typingctx, qt, mt, w, kb, x, xs, sc, ss, y, ys):
    """_tile(qtype, mt, w, kb, x, xs, sc, ss, y, ys): one tile's dots with mt rows of x (see
    `_tile_codegen`); qtype and mt are compile-time constants."""
    if not (isinstance(qt, types.IntegerLiteral) and isinstance(mt, types.IntegerLiteral)):
        raise TypingError(f"_tile takes a constant qtype and row count, not {qt}, {mt}")
    sig = types.none(qt, mt, *([types.int64] * 8))
    return sig, _tile_kernel_of(qt.literal_value, mt.literal_value)


@intrinsic(prefer_literal=True)
def _params(typingctx, qt):
    """(bytes per tile-block, weights of K per tile-block, x's offset term, how x is
    quantized: 0 per 32 with the offset term, 1 per 32 with cx (`_quantize_rows`), 2 as
    Q8_K for Q6_K (`_quantize_rows_q8_k`)) of the constant qtype."""
    if not isinstance(qt, types.IntegerLiteral):
        raise TypingError(f"_params takes a constant qtype, not {qt}")
    qtype = QuantType(qt.literal_value)
    if qtype == QuantType.Q6_K:
        values = (Q6K_TILE[0], 256, Q6K_OFFSET, 2)
    elif qtype == QuantType.Q4_K:
        values = (Q4K_TILE[0], 256, 0, 1)
    else:
        values = (tile_layout(qtype)[0], 32, OFFSETS.get(qtype, 0), int(qtype not in OFFSETS))
    ret = types.UniTuple(types.int64, 4)

    def codegen(context, builder, signature, args):
        return context.make_tuple(builder, ret, [ir.Constant(_I64, v) for v in values])

    return ret(qt), codegen


# -- workers: run inside torch's OpenMP thread pool ----------------------------------------
#
# numba's own parallel loops start a second OpenMP runtime (the system's libgomp) beside the
# one torch ships: after every torch kernel torch's threads spin while numba's run, and two
# cores then carry four busy threads (a SmolLM2 decode step measured 10.1 -> 14.7 ms). So the
# kernels are numba `cfunc`s launched with torch's libgomp's own `GOMP_parallel` (the call a
# `#pragma omp parallel` compiles to): the same threads as torch's kernels, one pool.
#
# The runtime's entry points are called by name (llamapy_GOMP_parallel, ...), names that
# llvmlite's symbol table maps to torch's libgomp when this module is imported: no
# process-specific address is compiled in, so numba caches the compiled kernels on disk
# (cache=True) and a new process loads them instead of compiling (~0.6-1.1 s a type).

_GOMP = ctypes.CDLL(GOMP_PATH)
_GOMP_SYMBOLS = {  # name -> (return type, argument types)
    "GOMP_parallel": (ir.VoidType(), [_I64, _I64, _I32, _I32]),  # fn, data, threads, flags
    "GOMP_barrier": (ir.VoidType(), []),
    "omp_get_thread_num": (_I32, []),
    "omp_get_num_threads": (_I32, []),
}
for _name in _GOMP_SYMBOLS:
    llvm.add_symbol("llamapy_" + _name, ctypes.cast(_GOMP[_name], ctypes.c_void_p).value)


def _gomp_codegen(name: str):
    """Codegen of a call of torch's libgomp's `name` (see above), int64 arguments."""
    ret, params = _GOMP_SYMBOLS[name]

    def codegen(context, builder, signature, args):
        fn = _declare(builder.module, "llamapy_" + name, ret, params)
        pairs = zip(args, params, strict=True)
        out = builder.call(fn, [a if p == _I64 else builder.trunc(a, p) for a, p in pairs])
        return context.get_dummy_value() if isinstance(ret, ir.VoidType) else out

    return codegen


@intrinsic
def _gomp_parallel(typingctx, fn, data, threads, flags):
    return types.none(*([types.int64] * 4)), _gomp_codegen("GOMP_parallel")


@intrinsic
def _barrier(typingctx):
    return types.none(), _gomp_codegen("GOMP_barrier")


@intrinsic
def _thread_num(typingctx):
    return types.int32(), _gomp_codegen("omp_get_thread_num")


@intrinsic
def _num_threads(typingctx):
    return types.int32(), _gomp_codegen("omp_get_num_threads")


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
def _row_planes(x, q, s, r, k):  # pragma: no cover - compiled by numba
    """Row r's float32 x, its int8 quants, and its dx, bias and cx planes (K / 32 each)."""
    kb = k // 32
    base = s + r * 12 * kb
    return (
        carray(_f32_ptr(x + r * k * 4), (k,)),
        carray(_i8_ptr(q + r * k), (k,)),
        carray(_f32_ptr(base), (kb,)),
        carray(_i32_ptr(base + 4 * kb), (kb,)),
        carray(_f32_ptr(base + 8 * kb), (kb,)),
    )


@njit(inline="always")
def _quantize_rows(x, q, s, m0, m1, k, offset, with_min):  # pragma: no cover - numba
    """Rows m0:m1 of x (float32 at address x, K wide) as vnni.quantize_x quantizes them for
    the legacy types: int8 quants at q, per row (dx, bias, cx) per 32-block at s (the same
    bits)."""
    kb = k // 32
    for r in range(m0, m1):
        xr, qr, dx_row, bias_row, cx_row = _row_planes(x, q, s, r, k)
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


@njit(inline="always")
def _quantize_rows_q8_k(x, q, s, m0, m1, k):  # pragma: no cover - numba
    """Rows m0:m1 of x as vnni.quantize_x quantizes them for Q6_K (llama.cpp's Q8_K, per
    256; see vnni._quantize_x_q8_k), the same bits: d in each 32-block's dx, bias and cx
    -32 sum(q) of the 32-block's two 16s."""
    for r in range(m0, m1):
        xr, qr, dx_row, bias_row, cx_row = _row_planes(x, q, s, r, k)
        for sb in range(k // 256):
            amax = np.float32(0.0)
            mx = np.float32(0.0)  # the first element of largest magnitude, signed
            for i in range(256 * sb, 256 * sb + 256):
                a = abs(xr[i])
                if a > amax:
                    amax = a
                    mx = xr[i]
            iscale = np.float32(-127.0) / mx if mx != np.float32(0.0) else np.float32(0.0)
            d = np.float32(1.0) / iscale if mx != np.float32(0.0) else np.float32(0.0)
            for b in range(8 * sb, 8 * sb + 8):
                lo = 0
                hi = 0
                for i in range(32 * b, 32 * b + 32):
                    v = min(np.rint(xr[i] * iscale), np.float32(127.0))
                    qr[i] = np.int8(v)
                    if i < 32 * b + 16:
                        lo += np.int32(v)
                    else:
                        hi += np.int32(v)
                dx_row[b] = d
                bias_row[b] = np.int32(Q6K_OFFSET * lo)
                cx_row[b] = np.float32(Q6K_OFFSET * hi)


@njit(nogil=True, cache=True)
def _launch(worker, w, tiles, q, m, k, s, y, x, threads):  # pragma: no cover - numba
    """Runs `worker` (a `_worker` cfunc's address) on torch's threads: one numba call (~1 us
    in all) where building the arguments and calling GOMP_parallel from Python costs ~3.5.
    x = 0: q and s hold x's quantization; else x is float32 x's address, and q, s 0:
    scratch for its quantization is allocated here."""
    a = np.empty(8, np.int64)
    qbuf = np.empty(m * k if x != 0 else 0, np.int8)
    sbuf = np.empty(m * 3 * (k // 32) if x != 0 else 0, np.float32)
    if x != 0:
        q, s = qbuf.ctypes.data, sbuf.ctypes.data
    a[0], a[1], a[2], a[3], a[4], a[5], a[6], a[7] = w, tiles, q, m, k, s, y, x
    _gomp_parallel(worker, a.ctypes.data, threads, 0)
    return qbuf.size + sbuf.size  # keeps the scratch alive through the call


@njit(inline="always")
def _work(a, qt):  # pragma: no cover - compiled by numba
    """One thread's share of a matmul of the constant qtype qt (see `_worker`)."""
    tb, block, offset, mode = _params(qt)  # mode: x's quantization (`_params`)
    w, tiles, q, m, k, s, y, x = a[0], a[1], a[2], a[3], a[4], a[5], a[6], a[7]
    kb = k // block  # tile-blocks per tile
    ss = 12 * (k // 32)
    ys = tiles * TILE_N * 4
    tid, nt = _thread_num(), _num_threads()
    if x != 0:  # float x given: quantize it first, each thread its rows
        m0, m1 = m * tid // nt, m * (tid + 1) // nt
        if mode == 2:
            _quantize_rows_q8_k(x, q, s, m0, m1, k)
        else:
            _quantize_rows(x, q, s, m0, m1, k, offset, mode == 1)
        _barrier()
    for tile in range(tiles * tid // nt, tiles * (tid + 1) // nt):
        wt = w + tile * kb * tb
        for m0 in range(0, m, TILE_M):
            mt = min(TILE_M, m - m0)
            xq, sc = q + m0 * k, s + m0 * ss
            yp = y + (m0 * tiles + tile) * TILE_N * 4
            if mt == 4:
                _tile(qt, 4, wt, kb, xq, k, sc, ss, yp, ys)
            elif mt == 3:
                _tile(qt, 3, wt, kb, xq, k, sc, ss, yp, ys)
            elif mt == 2:
                _tile(qt, 2, wt, kb, xq, k, sc, ss, yp, ys)
            else:
                _tile(qt, 1, wt, kb, xq, k, sc, ss, yp, ys)


# What the compiled kernels depend on outside this file (vnni.py's layout constants): a
# cached kernel is reused only while this file is unchanged (numba's rule) and this key,
# part of each worker's cache key, equals the one it was compiled with.
_LAYOUT_KEY = (
    tuple((int(t), tile_layout(t)) for t in LAYOUTS),
    Q4K_TILE,
    Q6K_TILE,
    Q6K_OFFSET,
    tuple((int(t), o) for t, o in OFFSETS.items()),
    TILE_M,
    TILE_N,
)


@functools.cache
def _worker(qtype: int) -> int:
    """The address of qtype's worker: a cfunc (a[8]) -> None, a = (w, tiles, q, m, k, s, y,
    x), that splits the tiles over the calling OpenMP team (and, given float x, quantizes
    it first, each thread its rows, as vnni.quantize_x does, bit for bit). Loaded from
    numba's disk cache, else compiled (~0.6-1.1 s)."""
    qt, key = int(qtype), _LAYOUT_KEY

    @cfunc(_ARGS, nopython=True, cache=True)
    def work(a):  # pragma: no cover - compiled by numba
        if key:  # a closure variable: part of numba's cache key
            _work(a, qt)

    return work.address


@functools.cache
def runner(qtype: int):
    """`qtype`'s matmul launcher: runner(qtype)(w, tiles, q, m, k, s, y, x, threads) (see
    `_launch`)."""
    return functools.partial(_launch, _worker(qtype))
