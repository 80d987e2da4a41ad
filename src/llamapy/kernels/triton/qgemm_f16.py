"""Fused dequantize-GEMM for batched decode that keeps the weight side in fp16 (Q4_0, Q4_1,
Q8_0, Q4_K, Q6_K), with split-K. `qmatmul` routes 16..64-row products of large-K weights of the
legacy types here on CUDA (`qmatmul.F16_GEMM_*`; the K-quants only through path="f16"
until measured); its sweep and timings: benchmarks/kernels/gemm_f16_lab.py.

`qmatmul._gemm_kernel` converts every weight through float32 (`_exact_f32`, float32 FMAs,
TF32 dots for float32 x); the dequant path (`qmatmul._dequant_mm`) writes a 16-bit copy of W
that cuBLAS then reads again. This kernel reads the ggml blocks once and builds fp16 tiles
with fp16 arithmetic only, for fp16 tensor cores with float32 sums:

- 4-bit: nibble q -> fp16 1024 + q by the magic number (0x6400 | q is 1024 + q exactly),
  minus 1032 (Q4_0: q - 8) or 1024 (Q4_1), exact; times d (fp16). Q4_1 adds m in one fp16
  FMA (d q + m rounded once), where ggml rounds d q + m to float32 first and the dequant path
  then to fp16: the two can differ by one fp16 ulp, rarely (double rounding). Q4_0 and Q8_0
  tiles are bit-identical to the dequant path's (d (q - 8) is one correctly rounded product).
- Q8_0: int8 q -> fp16 q by the same trick on q + 128 (exact), times d.
- Q4_K: the K loop steps over 64-weight units (32 bytes of qs in ggml's order: low nibbles
  weights 0..31 of the unit, sub-block 2u; high nibbles 32..63, sub-block 2u + 1); per
  sub-block D = d sc and M = dmin mn in float32 (as ggml) rounded to fp16, then one fp16 FMA
  q D - M per weight. Up to about two fp16 ulps of (|w| + |M|) from ggml's float32 value
  (the tests' bound), where the dequant path rounds once.
- Q6_K: 128-weight units (a half super-block: 64 bytes of ql, 32 of qh), four runs of 32
  weights each; 6-bit q -> 1024 + q by the magic number, minus 1056 (q - 32, exact), times
  fp16(d sc) per 16 weights: within two fp16 ulps of ggml's value.
- x rows are scaled into fp16 by powers of two (`qmatmul._scale_rows_kernel`: x = s y,
  |y| <= 2^14) and the sums are multiplied by s at the end, so no row overflows.

Weights must fit fp16 (|w| <= 65504), as on the dequant path. Like `_gemm_step`, the 4-bit
tiles take x in ggml's nibble order: two dots per K step, x[32 b + j] against the low
nibbles and x[32 b + 16 + j] against the high ones.

Split-K (config SPLIT_K > 1): a 2048-wide output is only 16-32 tiles at M <= 256, for 132
SMs; SPLIT_K programs per tile each sum a contiguous range of whole K steps into a float32
workspace, and a second kernel adds the splits in order (deterministic, no atomics). The
rule aims at about 2 x 132 programs.
"""

from __future__ import annotations

import math

import torch

from llamapy.kernels.triton import HAS_TRITON, INTERPRET, pdl
from llamapy.kernels.triton import qmatmul as qm
from llamapy.kernels.triton.packed import PackedWeight
from llamapy.quant.types import QuantType

if HAS_TRITON:
    import triton
    import triton.language as tl

TYPES: dict[QuantType, int] = {
    QuantType.Q4_0: 0,
    QuantType.Q4_1: 1,
    QuantType.Q8_0: 2,
    QuantType.Q4_K: 3,
    QuantType.Q6_K: 4,
}


def unit(qtype: QuantType) -> int:
    """Weights per block unit of the kernel's K loop (BLOCK_B units a K step): a 32-weight
    block of the legacy types, a 64-weight run of Q4_K (32 bytes: two sub-blocks), a
    128-weight half super-block of Q6_K (64 bytes of ql, 32 of qh)."""
    return {QuantType.Q4_K: 64, QuantType.Q6_K: 128}.get(qtype, 32)


CONFIG_KEYS = (
    "BLOCK_M", "BLOCK_N", "BLOCK_B", "GROUP_M", "SWAP_AB", "num_warps", "num_stages", "SPLIT_K"
)  # fmt: skip
SMS = 132  # an H100 / H200 SXM: the rule's split-K aims at 2 SMS programs
MAX_SPLIT = 65535  # the grid's axis 1
_X_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


# --------------------------------------------------------------------------- kernel

if HAS_TRITON:

    @triton.jit
    def _magic_f16(u):
        """Integers u in [0, 1024) -> fp16 1024 + u, exactly (the bits of 1024 + u are
        0x6400 | u), without an int -> float convert."""
        return (u.to(tl.uint16) | 0x6400).to(tl.float16, bitcast=True)

    @triton.jit
    def _scale_f16(v, d, m, OFFSET: tl.constexpr, QT: tl.constexpr, INTERP: tl.constexpr):
        """fp16 tile v = OFFSET + q (BN, BB, W) -> fp16 weights d q (+ m for Q4_1), with d and
        m (BN, BB) fp16 per 32-block, or float32 (a K-quant's legacy twin: `qmatmul.
        LEGACY_TWINS`; d q + m in float32, rounded once)."""
        q = v - OFFSET  # exact: |q| < 2^11
        if d.dtype == tl.float32:
            w = q.to(tl.float32) * d[:, :, None]
            if QT == 1:
                w += m[:, :, None]
            w = w.to(tl.float16)
        elif QT == 1:
            if INTERP:  # numpy's fp16 fma rounds twice: float32 d q + m, rounded once
                w = q.to(tl.float32) * d[:, :, None].to(tl.float32) + m[:, :, None].to(tl.float32)
                w = w.to(tl.float16)
            else:
                w = tl.fma(q, d[:, :, None], m[:, :, None])
        else:
            w = q * d[:, :, None]
        tl.static_assert(w.dtype == tl.float16)
        return w

    @triton.jit
    def _dot16(a, b, acc, INTERP: tl.constexpr):
        """acc + a @ b for fp16 a, b. The interpreter's 16-bit dot multiplies raw bits in some
        Triton versions, so there both go to float32 first (fp16 products are exact in
        float32: the same sums), as `qmatmul._dot`."""
        if INTERP:
            return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
        else:
            return tl.dot(a, b, acc)

    @triton.jit
    def _mma(acc, x, w, SWAP_AB: tl.constexpr, INTERP: tl.constexpr):
        """acc + x @ w^T (BM, BN) for tiles x (BM, BB, W) and w (BN, BB, W) (their units
        flattened into one K range), or with SWAP_AB acc^T + w @ x^T (BN, BM): the weight tile
        as the MMA's A operand (its M side is BLOCK_N, so a 16-row x tile still fills a
        64-row Hopper wgmma)."""
        x = tl.reshape(x, (x.shape[0], x.shape[1] * x.shape[2]))
        w = tl.reshape(w, (w.shape[0], w.shape[1] * w.shape[2]))
        if SWAP_AB:
            return _dot16(w, tl.trans(x), acc, INTERP)
        else:
            return _dot16(x, tl.trans(w), acc, INTERP)

    # SPLIT is SPLIT_K > 1 and steps_per_split is not specialized: one binary serves every
    # SPLIT_K > 1 (the count is the grid's axis 1), which halves the sweep's compiles
    @triton.jit(do_not_specialize=["steps_per_split"])
    def _gemm_f16_kernel(
        x_ptr, s_ptr, qs_ptr, d_ptr, m_ptr, sc_ptr, mn_ptr, out_ptr,
        M, N, K, stride_xm, stride_qs, stride_d, stride_m, stride_sc, steps_per_split,
        QT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
        BLOCK_B: tl.constexpr, GROUP_M: tl.constexpr, SWAP_AB: tl.constexpr,
        SPLIT: tl.constexpr, INTERP: tl.constexpr, PDL: tl.constexpr,
    ):  # fmt: skip
        """out (M, N) float32 = (x16 @ W^T) * s[:, None] for fp16 x16 (M, K), float32 s (M,),
        W (N, K) as PackedWeight tensors (QT 0 Q4_0, 1 Q4_1: qs (N, K/2) uint8; 2 Q8_0: qs
        (N, K) int8; d, m (N, K/32) fp16; 3 Q4_K: qs (N, K/2) uint8 in ggml's order, sc, mn
        (N, K/32) uint8 sub-block scales and mins, d, dmin (N, K/256) fp16 as d_ptr, m_ptr;
        4 Q6_K: ql (N, K/2) as qs_ptr, qh (N, K/4) uint8 as m_ptr, sc (N, K/16) int8, d (N,
        K/256) fp16). K is a multiple of BLOCK_B units (`unit`: 32 weights, 64 for Q4_K, 128
        for Q6_K). Edge rows of x and W are clamped to the last row (loads stay in bounds,
        no masks in the loop); the store is masked.

        SPLIT (SPLIT_K > 1 programs on axis 1): program (tile, k) sums the K steps (BLOCK_B
        blocks each) [k steps_per_split, (k + 1) steps_per_split) cut at K, so the last splits
        may be short or empty (an empty one stores zeros), and stores its partial tile, times
        s as the whole sum would be, into out as a (SPLIT_K, M, N) float32 workspace
        (`_sum_splits_kernel` adds them up). s is a power of two: the scaled partials add up
        to the scaled sum."""
        pdl.wait(PDL)
        pdl.launch_dependents(PDL)
        pid_m, pid_n = qm._grouped_tile(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)

        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        x_rows = tl.minimum(offs_m, M - 1).to(tl.int64)
        w_rows = tl.minimum(offs_n, N - 1).to(tl.int64)
        W: tl.constexpr = 16 if QT < 2 else 32  # weights per unit in one dot's K range
        UNIT: tl.constexpr = 64 if QT == 3 else 128 if QT == 4 else 32  # weights per unit
        QB: tl.constexpr = 16 if QT < 2 else 64 if QT == 4 else 32  # qs bytes per unit
        blk = tl.arange(0, BLOCK_B)
        j = tl.arange(0, W)
        # (rows, BB, W) pointers at K step 0; step b0 adds b0 * UNIT (x), b0 * QB (qs), b0 (d, m)
        x_base = x_ptr + x_rows[:, None, None] * stride_xm + blk[None, :, None] * UNIT + j
        qs_base = qs_ptr + w_rows[:, None, None] * stride_qs + blk[None, :, None] * QB + j
        d_base = w_rows[:, None] * stride_d + blk[None, :]  # (BN, BB) element offsets
        h_base = qs_base  # Q6_K's qh (unused otherwise)
        if QT == 3:  # Q4_K: unit u holds sub-blocks 2u, 2u + 1 of super-block u // 4
            d_base = w_rows[:, None] * stride_d  # (BN, 1); the step adds (b0 + blk) // 4
            sc_base = w_rows[:, None] * stride_sc + 2 * blk[None, :]
        elif QT == 4:  # Q6_K: unit u is half u % 2 of super-block u // 2, scales 8u..8u+7
            d_base = w_rows[:, None] * stride_d
            sc_base = w_rows[:, None] * stride_sc + 8 * blk[None, :]
            h_base = m_ptr + w_rows[:, None, None] * stride_m + blk[None, :, None] * 32 + j
        else:
            sc_base = d_base
        acc = tl.zeros((BLOCK_N, BLOCK_M) if SWAP_AB else (BLOCK_M, BLOCK_N), tl.float32)
        nb = K // UNIT
        if not SPLIT:
            b_start = 0
            b_end = nb
            o_rows = offs_m.to(tl.int64)
        else:  # this split's blocks, whole K steps; its rows of the (SPLIT_K, M, N) workspace
            pid_k = tl.program_id(1)
            b_start = pid_k * steps_per_split * BLOCK_B
            b_end = tl.minimum(b_start + steps_per_split * BLOCK_B, nb)
            o_rows = (pid_k * M + offs_m).to(tl.int64)
        if INTERP:  # numpy >= 2.4 cannot make the interpreter's scalars `range` bounds
            b0 = b_start
            while b0 < b_end:
                acc = _gemm_f16_step(acc, x_base, qs_base, h_base, d_ptr, m_ptr, sc_ptr, mn_ptr,
                                     d_base, sc_base, b0, QT, BLOCK_B, SWAP_AB,
                                     INTERP)  # fmt: skip
                b0 += BLOCK_B
        else:
            for b0 in range(b_start, b_end, BLOCK_B):
                acc = _gemm_f16_step(acc, x_base, qs_base, h_base, d_ptr, m_ptr, sc_ptr, mn_ptr,
                                     d_base, sc_base, b0, QT, BLOCK_B, SWAP_AB,
                                     INTERP)  # fmt: skip
        s = tl.load(s_ptr + x_rows)  # (BM,) the rows' powers of two: exact products
        o_mask = (offs_m < M)[:, None] & (offs_n < N)[None, :]
        o_ptr = out_ptr + o_rows[:, None] * N + offs_n[None, :]
        if SWAP_AB:
            tl.store(o_ptr, tl.trans(acc * s[None, :]), mask=o_mask)
        else:
            tl.store(o_ptr, acc * s[:, None], mask=o_mask)

    @triton.jit
    def _k_scale(d, sc):
        """fp16 d * sc (or dmin * mn) of a Q4_K sub-block: the float32 product ggml's
        dequantizer uses, rounded once."""
        return (d.to(tl.float32) * sc.to(tl.float32)).to(tl.float16)

    @triton.jit
    def _q6_k_step(
        acc, x_base, qs_base, h_base, d_ptr, sc_ptr, d_base, sc_base, b0,
        BLOCK_B: tl.constexpr, SWAP_AB: tl.constexpr, INTERP: tl.constexpr,
    ):  # fmt: skip
        """Q6_K units b0..b0+BB: unit u (128 weights) is ql[64u..64u+64), qh[32u..32u+32);
        its run r = 0..3 is weights 128u + 32r + l (ggml's q1..q4: low / high nibbles of
        ql[l] / ql[32 + l], bits 2r, 2r + 1 of qh[l]), scale sc[8u + 2r + l // 16]. w = (q - 32)
        times fp16(d sc): one fp16 product."""
        sb = ((b0 + tl.arange(0, BLOCK_B)) // 2)[None, :]  # the units' super-blocks
        d = tl.load(d_ptr + d_base + sb).to(tl.float32)[:, :, None]  # (BN, BB, 1)
        ql_a = tl.load(qs_base + b0 * 64)  # (BN, BB, 32): ql[64u + l]
        ql_b = tl.load(qs_base + b0 * 64 + 32)  # ql[64u + 32 + l]
        qh = tl.load(h_base + b0 * 32)  # qh[32u + l]
        half = (tl.arange(0, 32) // 16)[None, None, :]
        for r in tl.static_range(4):
            ql = ql_a if r % 2 == 0 else ql_b
            low = ql & 0xF if r < 2 else ql >> 4
            q = low | (((qh >> (2 * r)) & 3) << 4)  # 0..63
            sc = tl.load(sc_ptr + sc_base[:, :, None] + 8 * b0 + 2 * r + half)  # (BN, BB, 32)
            scale = (d * sc.to(tl.float32)).to(tl.float16)  # ggml's float32 d sc, rounded
            w = (_magic_f16(q) - 1056.0) * scale  # q - 32 exactly, then one fp16 rounding
            xt = tl.load(x_base + b0 * 128 + 32 * r)  # (BM, BB, 32)
            acc = _mma(acc, xt, w, SWAP_AB, INTERP)
        return acc

    @triton.jit
    def _q4_k_step(
        acc, x_base, qs_base, d_ptr, m_ptr, sc_ptr, mn_ptr, d_base, sc_base, b0,
        BLOCK_B: tl.constexpr, SWAP_AB: tl.constexpr, INTERP: tl.constexpr,
    ):  # fmt: skip
        """Q4_K units b0..b0+BB: unit u (32 bytes) holds weights 64u + j in its low nibbles
        (sub-block 2u) and 64u + 32 + j in its high ones (2u + 1); w = d sc q - dmin mn as
        one fp16 FMA of the rounded d sc and dmin mn."""
        sb = ((b0 + tl.arange(0, BLOCK_B)) // 4)[None, :]  # the units' super-blocks
        d = tl.load(d_ptr + d_base + sb)  # (BN, BB) fp16
        dmin = tl.load(m_ptr + d_base + sb)
        sc_lo = tl.load(sc_ptr + sc_base + 2 * b0)
        sc_hi = tl.load(sc_ptr + sc_base + 2 * b0 + 1)
        mn_lo = tl.load(mn_ptr + sc_base + 2 * b0)
        mn_hi = tl.load(mn_ptr + sc_base + 2 * b0 + 1)
        qs = tl.load(qs_base + b0 * 32)  # (BN, BB, 32)
        wl = _scale_f16(_magic_f16(qs & 0xF), _k_scale(d, sc_lo), -_k_scale(dmin, mn_lo),
                        1024.0, 1, INTERP)  # fmt: skip
        wh = _scale_f16(_magic_f16(qs >> 4), _k_scale(d, sc_hi), -_k_scale(dmin, mn_hi),
                        1024.0, 1, INTERP)  # fmt: skip
        xl = tl.load(x_base + b0 * 64)  # (BM, BB, 32): x[64 u + j]
        xh = tl.load(x_base + b0 * 64 + 32)  # x[64 u + 32 + j]
        acc = _mma(acc, xl, wl, SWAP_AB, INTERP)
        acc = _mma(acc, xh, wh, SWAP_AB, INTERP)
        return acc

    @triton.jit
    def _legacy_step(
        acc, x_base, qs_base, d_ptr, m_ptr, d_base, b0,
        QT: tl.constexpr, SWAP_AB: tl.constexpr, INTERP: tl.constexpr,
    ):  # fmt: skip
        """Q4_0 / Q4_1 / Q8_0 blocks b0..b0+BB."""
        d = tl.load(d_ptr + d_base + b0)  # (BN, BB) fp16
        m = d
        if QT == 1:
            m = tl.load(m_ptr + d_base + b0)
        qs = tl.load(qs_base + b0 * (16 if QT < 2 else 32))  # (BN, BB, W)
        if QT < 2:
            off: tl.constexpr = 1032.0 if QT == 0 else 1024.0  # Q4_0: q - 8
            wl = _scale_f16(_magic_f16(qs & 0xF), d, m, off, QT, INTERP)
            wh = _scale_f16(_magic_f16(qs >> 4), d, m, off, QT, INTERP)
            xl = tl.load(x_base + b0 * 32)  # (BM, BB, 16): x[32 b + j]
            xh = tl.load(x_base + b0 * 32 + 16)  # x[32 b + 16 + j]
            acc = _mma(acc, xl, wl, SWAP_AB, INTERP)
            acc = _mma(acc, xh, wh, SWAP_AB, INTERP)
        else:
            # int8 q -> q + 128 in [0, 256) by flipping the sign bit, then 1152 + q
            w = _scale_f16(_magic_f16(qs.to(tl.uint8, bitcast=True) ^ 0x80), d, m, 1152.0, QT,
                           INTERP)  # fmt: skip
            xt = tl.load(x_base + b0 * 32)  # (BM, BB, 32)
            acc = _mma(acc, xt, w, SWAP_AB, INTERP)
        return acc

    @triton.jit
    def _gemm_f16_step(
        acc, x_base, qs_base, h_base, d_ptr, m_ptr, sc_ptr, mn_ptr, d_base, sc_base, b0,
        QT: tl.constexpr, BLOCK_B: tl.constexpr, SWAP_AB: tl.constexpr,
        INTERP: tl.constexpr,
    ):  # fmt: skip
        """acc + x[:, units b0..b0+BB) @ W[:, same]^T, the W tile built in fp16."""
        if QT == 4:
            acc = _q6_k_step(acc, x_base, qs_base, h_base, d_ptr, sc_ptr, d_base, sc_base, b0,
                             BLOCK_B, SWAP_AB, INTERP)  # fmt: skip
        elif QT == 3:
            acc = _q4_k_step(acc, x_base, qs_base, d_ptr, m_ptr, sc_ptr, mn_ptr, d_base, sc_base,
                             b0, BLOCK_B, SWAP_AB, INTERP)  # fmt: skip
        else:
            acc = _legacy_step(acc, x_base, qs_base, d_ptr, m_ptr, d_base, b0, QT, SWAP_AB,
                               INTERP)  # fmt: skip
        return acc

    @triton.jit
    def _sum_splits_kernel(ws_ptr, out_ptr, MN, SPLIT_K: tl.constexpr, BLOCK: tl.constexpr,
                           PDL: tl.constexpr):  # fmt: skip
        """out (M N,) = ws[0] + ws[1] + ... + ws[SPLIT_K - 1] for a (SPLIT_K, M N) float32
        workspace, added in that order (deterministic: no atomics)."""
        pdl.wait(PDL)
        pdl.launch_dependents(PDL)
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < MN
        ptr = ws_ptr + offs
        y = tl.load(ptr, mask=mask, other=0.0)
        for _ in tl.static_range(SPLIT_K - 1):
            ptr += MN
            y += tl.load(ptr, mask=mask, other=0.0)
        tl.store(out_ptr + offs, y, mask=mask)


# --------------------------------------------------------------------------- launcher


def default_config(m: int, k: int, n: int, unit_size: int = 32) -> dict[str, int]:
    """The rule: row tiles follow M (16..128), 128 weight rows by 128 weights per K step
    (4 legacy blocks, 2 Q4_K units, 1 Q6_K unit; fewer where K is not a multiple: a 128 x 256
    fp16 tile in 3 stages overflows the SM's shared memory), 8 warps for 128-row tiles;
    SPLIT_K from `rule_split`."""
    block_m = min(128, max(16, 1 << (m - 1).bit_length()))
    block_b = max(1, 128 // unit_size)
    while block_b > 1 and k % (block_b * unit_size):
        block_b //= 2
    cfg = {"BLOCK_M": block_m, "BLOCK_N": 128, "BLOCK_B": block_b, "GROUP_M": 8,
           "SWAP_AB": 0, "num_warps": 8 if block_m >= 128 else 4, "num_stages": 3}  # fmt: skip
    cfg["SPLIT_K"] = rule_split(m, n, k, cfg, unit_size=unit_size)
    return cfg


def tiles(m: int, n: int, cfg: dict[str, int]) -> int:
    """Output tiles of an (m, n) product under cfg: the grid without split-K."""
    return -(-m // cfg["BLOCK_M"]) * -(-n // cfg["BLOCK_N"])


def used_splits(k: int, cfg: dict[str, int], split: int, unit_size: int = 32) -> int:
    """How many of `split` splits get K steps (cfg's BLOCK_B units each); the rest are
    empty."""
    steps = k // (unit_size * cfg["BLOCK_B"])
    return -(-steps // -(-steps // split)) if steps else 0


def rule_split(
    m: int, n: int, k: int, cfg: dict[str, int], sms: int = SMS, unit_size: int = 32
) -> int:
    """SPLIT_K for cfg's tiles: the power of two nearest (in log2) 2 SMS / tiles, so that
    tiles * SPLIT_K is about two programs per SM; then no more splits than K steps, and
    none empty (9 steps in 8 splits of 2 each would leave 3 empty: 5 splits)."""
    if m == 0 or n == 0:
        return 1
    split = 1 << max(0, round(math.log2(2 * sms / tiles(m, n, cfg))))
    steps = k // (unit_size * cfg["BLOCK_B"])
    return max(1, used_splits(k, cfg, min(split, steps), unit_size))


def sum_block(mn: int, sms: int = SMS) -> int:
    """Elements per program of the split sum: about four programs per SM (128..1024, a power
    of two), each thread loading 4 floats of every split. The sum reads SPLIT_K partials of
    (M, N) from L2; at 1024 a program, a 64 x 2048 output is 128 programs, one an SM, and its
    loads wait on each other's latency."""
    return max(128, min(1024, triton.next_power_of_2(max(1, mn // (4 * sms)))))


def _check(x: torch.Tensor, w: PackedWeight) -> None:
    """The weight's type, then qmatmul's checks of x against the weight."""
    if isinstance(w, PackedWeight) and w.qtype not in TYPES:
        names = ", ".join(t.name for t in TYPES)
        raise ValueError(f"gemm_f16 takes {names} weights, got {w.qtype.name}")
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"x must be a 2-D (M, K) tensor, got {type(x).__name__}")
    qm._check_inputs(x, w, None)


def _resolve(
    config: dict[str, int] | None, m: int, n: int, k: int, unit_size: int = 32
) -> dict[str, int]:
    cfg = default_config(m, k, n, unit_size)
    if config is not None:
        unknown = set(config) - set(CONFIG_KEYS)
        if unknown:
            raise ValueError(f"config takes {list(CONFIG_KEYS)}, got {sorted(unknown)}")
        cfg.update(config)
    for key in ("BLOCK_M", "BLOCK_N", "BLOCK_B", "num_warps"):
        v = cfg[key]
        if not (isinstance(v, int) and v >= 1 and v & (v - 1) == 0):
            raise ValueError(f"config {key} must be a power of two >= 1, got {v!r}")
    if cfg["BLOCK_M"] < 16 or cfg["BLOCK_N"] < 16:
        raise ValueError(f"BLOCK_M and BLOCK_N must be >= 16 (tl.dot), got {cfg}")
    if cfg["GROUP_M"] < 1 or cfg["num_stages"] < 1 or cfg["SWAP_AB"] not in (0, 1):
        raise ValueError(f"GROUP_M, num_stages must be >= 1 and SWAP_AB 0 or 1, got {cfg}")
    if k % (unit_size * cfg["BLOCK_B"]):
        raise ValueError(
            f"K={k} must be a multiple of {unit_size} * BLOCK_B = {unit_size * cfg['BLOCK_B']}"
        )
    if config is not None and "SPLIT_K" not in config:  # the rule's split for these tiles
        cfg["SPLIT_K"] = rule_split(m, n, k, cfg, unit_size=unit_size)
    v = cfg["SPLIT_K"]
    if not (isinstance(v, int) and 1 <= v <= MAX_SPLIT):
        raise ValueError(f"config SPLIT_K must be an integer in [1, {MAX_SPLIT}], got {v!r}")
    return cfg


def decode_config(m: int, n: int, k: int, sms: int = SMS, unit_size: int = 32) -> dict[str, int]:
    """Tiles for 16..64 rows: what the sweep of an H200 picked at the Llama-3.2-1B shapes
    (benchmarks/RESULTS.md, sixth session): BLOCK_M follows M up to 64, 128 weight rows a
    tile, 2 blocks per K step (4 for 16-row tiles), the weight as tl.dot's wide operand
    (SWAP_AB) from 32 rows, and `rule_split` for `sms` SMs."""
    block_m = min(64, max(16, 1 << (m - 1).bit_length()))
    cfg = {
        "BLOCK_M": block_m,
        "BLOCK_N": 128,
        "BLOCK_B": 4 if block_m == 16 and k % (4 * unit_size) == 0 else 2,
        "GROUP_M": 8,
        "SWAP_AB": int(block_m > 16),
        "num_warps": 4,
        "num_stages": 4 if block_m == 32 else 3,
    }
    cfg["SPLIT_K"] = rule_split(m, n, k, cfg, sms, unit_size)
    return cfg


def gemm_f16(
    x: torch.Tensor,
    w: PackedWeight,
    config: dict[str, int] | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """x (M, K) @ W^T -> (M, N) float32, W a Q4_0 / Q4_1 / Q8_0 / Q4_K / Q6_K PackedWeight.

    x is rounded to fp16 after a per-row power-of-two scaling, W's tiles are built in fp16
    (see the module docstring), products are summed in float32. config overrides
    `default_config`'s BLOCK_M, BLOCK_N, BLOCK_B, GROUP_M, SWAP_AB, num_warps, num_stages,
    SPLIT_K (a config without SPLIT_K gets `rule_split` for its tiles). out: where to write
    (contiguous (M, N) float32), else a new tensor.

    SPLIT_K > 1 cuts K into SPLIT_K ranges of whole K steps (ceil(steps / SPLIT_K) each, the
    last ones shorter or empty), run as separate programs that write float32 partials to a
    (SPLIT_K, M, N) workspace, summed in split order by a second kernel (deterministic).
    The workspace is allocated on every call (a lab: no caching; under CUDA graphs it comes
    from the graph's pool).
    """
    _check(x, w)
    m, n, k = x.shape[0], w.n, w.k
    cfg = _resolve(config, m, n, k, unit(w.qtype))
    if out is None:
        out = torch.empty(m, n, dtype=torch.float32, device=x.device)
    elif (
        out.shape != (m, n)
        or out.dtype != torch.float32
        or out.device != x.device
        or not out.is_contiguous()
    ):
        raise ValueError(
            f"out must be a contiguous ({m}, {n}) float32 tensor on {x.device}, got "
            f"{tuple(out.shape)} {out.dtype} on {out.device}"
        )
    if m == 0:
        return out
    x16 = torch.empty(m, k, dtype=torch.float16, device=x.device)  # x = s x16, |x16| <= 2^14
    s = torch.empty(m, dtype=torch.float32, device=x.device)
    pdl_on = pdl.pdl_enabled(x.device, w.nbytes)
    qm.scale_rows_f16(x, x16, s, pdl_on)
    t = w.tensors
    qs, d = t.get("qs", t.get("ql")), t["d"]
    aux = t.get("m", t.get("dmin", t.get("qh", d)))  # Q4_1's m, Q4_K's dmin, Q6_K's qh
    sc, mn = t.get("sc", d), t.get("mn", d)  # the K-quants' sub-block scales (and mins)
    num_warps, num_stages = cfg.pop("num_warps"), cfg.pop("num_stages")
    split = cfg.pop("SPLIT_K")
    steps = k // (unit(w.qtype) * cfg["BLOCK_B"])
    dest = out if split == 1 else torch.empty(split, m, n, dtype=torch.float32, device=x.device)
    grid = (tiles(m, n, cfg), split)
    _gemm_f16_kernel[grid](
        x16, s, qs, d, aux, sc, mn, dest, m, n, k, x16.stride(0), qs.stride(0),
        d.stride(0), aux.stride(0), sc.stride(0), triton.cdiv(steps, split), QT=TYPES[w.qtype],
        SPLIT=split > 1, INTERP=INTERPRET,
        **cfg, **pdl.launch_options(pdl_on), num_warps=num_warps, num_stages=num_stages,
    )  # fmt: skip
    if split > 1:
        block = sum_block(m * n)
        _sum_splits_kernel[(triton.cdiv(m * n, block),)](
            dest, out, m * n, SPLIT_K=split, BLOCK=block, **pdl.launch_options(pdl_on),
            num_warps=max(1, min(4, block // 128)),
        )  # fmt: skip
    return out
