"""numba code of kernels/cpu/vnni.py (imported only where numba and AVX512-VNNI are; see
there for the arithmetic).

`_row_dot(qtype, mt)` builds the one-weight-row kernel as an LLVM IR loop over 64-weight
steps (two 32-blocks): load the two blocks' quants as 64 unsigned bytes (4-bit types: low
nibbles of both blocks, then high nibbles; Q8_0: both blocks' bytes + 128), then for each of
`mt` rows of x: one `vpdpbusd` (16 int32 lanes: lanes 0-7 block a, 8-15 block b for Q8_0;
0-3 a, 4-7 b, 8-11 a, 12-15 b for the nibbles), int -> float, times the lane's
dw * dx, into 16 float32 accumulators; cw * cx of both blocks into two more. The row's
outputs are the accumulators' sums, stored at y, y + ys, ... .
"""

from __future__ import annotations

import ctypes

import numpy as np
from llvmlite import ir
from numba import cfunc, types
from numba.core.extending import intrinsic

from llamapy.kernels.cpu.vnni import BLOCK_N, GOMP_PATH, LAYOUTS, TILE_M
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


def _at(builder: ir.IRBuilder, base: ir.Value, offset: ir.Value, ty: ir.Type) -> ir.Value:
    """A `ty*` pointer to the address base + offset (both i64 byte addresses)."""
    return builder.inttoptr(builder.add(base, offset), ty.as_pointer())


def _tree_sum(builder: ir.IRBuilder, v: ir.Value) -> ir.Value:
    """The sum of a float vector's lanes by halving (log2 n vector adds; LLVM's ordered
    `vector.reduce.fadd` is n dependent scalar adds)."""
    n = v.type.count
    while n > 1:
        n //= 2
        lo = builder.shuffle_vector(v, v, ir.Constant(_vec(_I32, n), list(range(n))))
        hi = builder.shuffle_vector(v, v, ir.Constant(_vec(_I32, n), list(range(n, 2 * n))))
        v = builder.fadd(lo, hi)
    return builder.extract_element(v, ir.Constant(_I32, 0))


def _tile_dot(qtype: QuantType, rows: int, mt: int):
    """numba intrinsic (w, ws, x, xs, scales, ss, npairs, y, ys) -> None: the dots of `rows`
    weight rows (from address w, ws bytes apart) with `mt` rows of x (int8 quants, xs bytes
    apart; their scales: per row dx then cx, K/32 float32 each, ss bytes apart), stored at
    y + t * ys + r * 4. Each weight step is unpacked once for the mt rows of x, each x step
    loaded once for the `rows` weight rows."""
    bs, d_off, m_off, q_off = LAYOUTS[qtype]
    nibbles = qtype != QuantType.Q8_0
    lane_block = [0] * 4 + [1] * 4 + [0] * 4 + [1] * 4 if nibbles else [0] * 8 + [1] * 8
    sig = types.none(*([types.int64] * 9))

    def codegen(context, builder, signature, args):
        w, ws, x, xs, sc, ss, npairs, y, ys = args
        module = builder.module
        dpbusd = _declare(
            module, "llvm.x86.avx512.vpdpbusd.512", _vec(_I32, 16), [_vec(_I32, 16)] * 3
        )
        fma16 = _declare(module, "llvm.fma.v16f32", _vec(_F32, 16), [_vec(_F32, 16)] * 3)
        fma2 = _declare(module, "llvm.fma.v2f32", _vec(_F32, 2), [_vec(_F32, 2)] * 3)
        i64 = lambda v: ir.Constant(_I64, v)  # noqa: E731
        kb4 = builder.mul(npairs, i64(8))  # bytes of one row's dx (K/32 float32)
        lanes = ir.Constant(_vec(_I32, 16), lane_block)
        zero_i = ir.Constant(_vec(_I32, 16), None)

        def half_pair(base: ir.Value, off: int) -> ir.Value:
            """<2 x float> of the fp16 at `off` in the blocks a, b at `base`."""
            pair = ir.Constant(_vec(_F32, 2), None)
            for lane, block in enumerate((0, bs)):
                h = builder.load(_at(builder, base, i64(block + off), _I16), align=1)
                f = builder.fpext(builder.bitcast(h, _F16), _F32)
                pair = builder.insert_element(pair, f, ir.Constant(_I32, lane))
            return pair

        def unpack(base: ir.Value) -> ir.Value:
            """The 64 unsigned quants of blocks a, b at `base`, as <16 x i32>."""
            if nibbles:
                a = builder.load(_at(builder, base, i64(q_off), _vec(_I8, 16)), align=1)
                b = builder.load(
                    _at(builder, base, i64(bs + q_off), _vec(_I8, 16)), align=1
                )
                ab = builder.shuffle_vector(a, b, ir.Constant(_vec(_I32, 32), list(range(32))))
                lo = builder.and_(ab, ir.Constant(_vec(_I8, 32), [0x0F] * 32))
                hi = builder.lshr(ab, ir.Constant(_vec(_I8, 32), [4] * 32))
                u = builder.shuffle_vector(lo, hi, ir.Constant(_vec(_I32, 64), list(range(64))))
            else:
                a = builder.load(_at(builder, base, i64(q_off), _vec(_I8, 32)), align=1)
                b = builder.load(
                    _at(builder, base, i64(bs + q_off), _vec(_I8, 32)), align=1
                )
                ab = builder.shuffle_vector(a, b, ir.Constant(_vec(_I32, 64), list(range(64))))
                u = builder.xor(ab, ir.Constant(_vec(_I8, 64), [0x80] * 64))
            return builder.bitcast(u, _vec(_I32, 16))

        entry = builder.block
        loop = builder.append_basic_block("vnni.loop")
        done = builder.append_basic_block("vnni.done")
        builder.branch(loop)
        builder.position_at_end(loop)
        j = builder.phi(_I64)
        j.add_incoming(i64(0), entry)
        acc = {}
        for key in [(r, t) for r in range(rows) for t in range(mt)]:
            acc[key] = (builder.phi(_vec(_F32, 16)), builder.phi(_vec(_F32, 2)))
            acc[key][0].add_incoming(ir.Constant(_vec(_F32, 16), None), entry)
            acc[key][1].add_incoming(ir.Constant(_vec(_F32, 2), None), entry)

        x_step, s_step = builder.mul(j, i64(64)), builder.mul(j, i64(8))
        xv, dx, cx = [], [], []
        for t in range(mt):
            xt = builder.add(builder.add(x, builder.mul(xs, i64(t))), x_step)
            xv.append(builder.load(builder.inttoptr(xt, _vec(_I32, 16).as_pointer()), align=1))
            st = builder.add(builder.add(sc, builder.mul(ss, i64(t))), s_step)
            dx.append(builder.load(builder.inttoptr(st, _vec(_F32, 2).as_pointer()), align=4))
            cx.append(builder.load(_at(builder, st, kb4, _vec(_F32, 2)), align=4))
        w_step = builder.mul(j, i64(2 * bs))
        new = {}
        for r in range(rows):
            base = builder.add(builder.add(w, builder.mul(ws, i64(r))), w_step)
            u = unpack(base)
            dw = half_pair(base, d_off)
            cw = half_pair(base, m_off) if m_off >= 0 else dw
            for t in range(mt):
                isum = builder.call(dpbusd, [zero_i, u, xv[t]])
                scale = builder.shuffle_vector(builder.fmul(dw, dx[t]), dx[t], lanes)
                a, c = acc[r, t]
                new[r, t] = (
                    builder.call(fma16, [builder.sitofp(isum, _vec(_F32, 16)), scale, a]),
                    builder.call(fma2, [cw, cx[t], c]),
                )
        j_next = builder.add(j, i64(1))
        j.add_incoming(j_next, builder.block)
        for key, (a, c) in acc.items():
            a.add_incoming(new[key][0], builder.block)
            c.add_incoming(new[key][1], builder.block)
        builder.cbranch(builder.icmp_signed("<", j_next, npairs), loop, done)

        builder.position_at_end(done)
        for (r, t), (a, c) in new.items():
            total = builder.fadd(_tree_sum(builder, a), _tree_sum(builder, c))
            yt = builder.add(builder.add(y, builder.mul(ys, i64(t))), i64(4 * r))
            builder.store(total, builder.inttoptr(yt, _F32.as_pointer()), align=4)
        return context.get_dummy_value()

    def typer(typingctx, w, ws, x, xs, sc, ss, npairs, y, ys):
        return sig, codegen

    return intrinsic(typer)


def _row_to_bf16(qtype: QuantType):
    """numba intrinsic: (w_row, kb, out) -> None: the row's kb 32-blocks dequantized as
    float32 ((u - 8) d, d u + m, d q: exact products, Q4_1's + m rounded once, as
    `quant.dequant`) and rounded to nearest-even bf16, stored at `out` (2 bytes a weight)."""
    bs, d_off, m_off, q_off = LAYOUTS[qtype]
    nibbles = qtype != QuantType.Q8_0
    sig = types.none(types.int64, types.int64, types.int64)

    def codegen(context, builder, signature, args):
        w, kb, out = args
        i64 = lambda v: ir.Constant(_I64, v)  # noqa: E731
        v32 = lambda t, v: ir.Constant(_vec(t, 32), [v] * 32)  # noqa: E731

        def splat(f: ir.Value) -> ir.Value:
            one = builder.insert_element(ir.Constant(_vec(_F32, 1), None), f, ir.Constant(_I32, 0))
            return builder.shuffle_vector(one, one, ir.Constant(_vec(_I32, 32), [0] * 32))

        def half(base: ir.Value, off: int) -> ir.Value:
            h = builder.load(_at(builder, base, i64(off), _I16), align=1)
            return builder.fpext(builder.bitcast(h, _F16), _F32)

        entry = builder.block
        loop = builder.append_basic_block("bf16.loop")
        done = builder.append_basic_block("bf16.done")
        builder.branch(loop)
        builder.position_at_end(loop)
        b = builder.phi(_I64)
        b.add_incoming(i64(0), entry)
        base = builder.add(w, builder.mul(b, i64(bs)))
        d = splat(half(base, d_off))
        if nibbles:
            qs = builder.load(_at(builder, base, i64(q_off), _vec(_I8, 16)), align=1)
            lo = builder.and_(qs, ir.Constant(_vec(_I8, 16), [0x0F] * 16))
            hi = builder.lshr(qs, ir.Constant(_vec(_I8, 16), [4] * 16))
            u = builder.uitofp(
                builder.shuffle_vector(lo, hi, ir.Constant(_vec(_I32, 32), list(range(32)))),
                _vec(_F32, 32),
            )
            if m_off >= 0:
                wf = builder.fadd(builder.fmul(u, d), splat(half(base, m_off)))
            else:
                wf = builder.fmul(builder.fsub(u, v32(_F32, 8.0)), d)
        else:
            qs = builder.load(_at(builder, base, i64(q_off), _vec(_I8, 32)), align=1)
            wf = builder.fmul(builder.sitofp(qs, _vec(_F32, 32)), d)
        bits = builder.bitcast(wf, _vec(_I32, 32))
        odd = builder.and_(builder.lshr(bits, v32(_I32, 16)), v32(_I32, 1))
        rounded = builder.add(builder.add(bits, v32(_I32, 0x7FFF)), odd)
        bf = builder.trunc(builder.lshr(rounded, v32(_I32, 16)), _vec(_I16, 32))
        dst = builder.add(out, builder.mul(b, i64(64)))
        builder.store(bf, builder.inttoptr(dst, _vec(_I16, 32).as_pointer()), align=2)
        b_next = builder.add(b, i64(1))
        b.add_incoming(b_next, builder.block)
        builder.cbranch(builder.icmp_signed("<", b_next, kb), loop, done)
        builder.position_at_end(done)
        return context.get_dummy_value()

    def typer(typingctx, w, kb, out):
        return sig, codegen

    return intrinsic(typer)


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
_parallel = _GOMP.GOMP_parallel
_parallel.restype = None
_parallel.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_uint, ctypes.c_uint]
_ARGS = types.void(types.CPointer(types.int64))


def launch(worker, args: np.ndarray, threads: int) -> None:
    """Run `worker(args)` on `threads` threads of torch's OpenMP pool (args: int64 array)."""
    _parallel(worker.address, args.ctypes.data, threads, 0)


def _matmul_worker(qtype: QuantType):
    # One weight row per tile, against up to TILE_M rows of x. Tiles of several weight rows
    # share each x load but read the rows as interleaved streams, which measured slower
    # (SmolLM2's layer shapes, one row of x, 2 threads: Q4_0 17.6 -> 14.2 GB/s with two rows,
    # Q8_0 24.1 -> 12.0; benchmarks/kernels/CPU_NOTES.md).
    dots = [_tile_dot(qtype, 1, mt) for mt in range(1, TILE_M + 1)]
    d1, d2, d3, d4 = dots

    @cfunc(_ARGS, nopython=True)
    def work(a):  # pragma: no cover - compiled by numba
        w, ws, n, q, m, k, s, y = a[0], a[1], a[2], a[3], a[4], a[5], a[6], a[7]
        kb = k // 32
        npairs = kb // 2
        ss = 2 * kb * 4
        ys = n * 4
        tasks = (n + BLOCK_N - 1) // BLOCK_N
        tid, nt = _thread_num(), _num_threads()
        for task in range(tasks * tid // nt, tasks * (tid + 1) // nt):
            r0 = task * BLOCK_N
            r1 = min(r0 + BLOCK_N, n)
            for m0 in range(0, m, TILE_M):
                mt = min(TILE_M, m - m0)
                xq = q + m0 * k
                sc = s + m0 * ss
                for r in range(r0, r1):
                    wr, yp = w + r * ws, y + (m0 * n + r) * 4
                    if mt == 4:
                        d4(wr, ws, xq, k, sc, ss, npairs, yp, ys)
                    elif mt == 3:
                        d3(wr, ws, xq, k, sc, ss, npairs, yp, ys)
                    elif mt == 2:
                        d2(wr, ws, xq, k, sc, ss, npairs, yp, ys)
                    else:
                        d1(wr, ws, xq, k, sc, ss, npairs, yp, ys)

    return work


def _dequant_worker(row_to_bf16):
    @cfunc(_ARGS, nopython=True)
    def work(a):  # pragma: no cover - compiled by numba
        w, ws, r0, r1, k, out = a[0], a[1], a[2], a[3], a[4], a[5]
        kb = k // 32
        rows = r1 - r0
        tid, nt = _thread_num(), _num_threads()
        for r in range(r0 + rows * tid // nt, r0 + rows * (tid + 1) // nt):
            row_to_bf16(w + r * ws, kb, out + (r - r0) * k * 2)

    return work


MATMUL = {qtype: _matmul_worker(qtype) for qtype in LAYOUTS}
DEQUANT = {qtype: _dequant_worker(_row_to_bf16(qtype)) for qtype in LAYOUTS}
