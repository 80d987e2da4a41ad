"""Lab: a fused dequantize-GEMM for batched decode that keeps the weight side in fp16.

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
- x rows are scaled into fp16 by powers of two (`qmatmul._scale_rows_kernel`: x = s y,
  |y| <= 2^14) and the sums are multiplied by s at the end, so no row overflows.

Weights must fit fp16 (|w| <= 65504), as on the dequant path. Like `_gemm_step`, the 4-bit
tiles take x in ggml's nibble order: two dots per K step, x[32 b + j] against the low
nibbles and x[32 b + 16 + j] against the high ones.

Split-K (config SPLIT_K > 1): a 2048-wide output is only 16-32 tiles at M <= 256, for 132
SMs; SPLIT_K programs per tile each sum a contiguous range of whole K steps into a float32
workspace, and a second kernel adds the splits in order (deterministic, no atomics). The
rule aims at about 2 x 132 programs.

GPU benchmark (checks against the dequant path, sweeps tiles and splits at M = 64, carries
the best 5 to the other M, prints a markdown table):

    PYTHONPATH=src python benchmarks/kernels/gemm_f16_lab.py [--types Q4_0,Q8_0,Q4_1]
        [--m 16,32,64,128,256] [--split 1,2,4,8,16] [--quick] [--workers 14]
        [--budget-s 220]
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import itertools
import math
import multiprocessing
import os
import sys
import time

import torch

from llamapy.kernels.triton import HAS_TRITON, INTERPRET, triton_usable
from llamapy.kernels.triton import qmatmul as qm
from llamapy.kernels.triton.packed import PackedWeight
from llamapy.quant.types import QuantType, row_nbytes

if HAS_TRITON:
    import triton
    import triton.language as tl

TYPES: dict[QuantType, int] = {QuantType.Q4_0: 0, QuantType.Q4_1: 1, QuantType.Q8_0: 2}
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
        m (BN, BB) fp16 per 32-block."""
        q = v - OFFSET  # exact: |q| < 2^11
        if QT == 1:
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
        """acc + x @ w^T (BM, BN), or with SWAP_AB acc^T + w @ x^T (BN, BM): the weight tile
        as the MMA's A operand (its M side is BLOCK_N, so a 16-row x tile still fills a
        64-row Hopper wgmma)."""
        if SWAP_AB:
            return _dot16(w, tl.trans(x), acc, INTERP)
        else:
            return _dot16(x, tl.trans(w), acc, INTERP)

    # SPLIT is SPLIT_K > 1 and steps_per_split is not specialized: one binary serves every
    # SPLIT_K > 1 (the count is the grid's axis 1), which halves the sweep's compiles
    @triton.jit(do_not_specialize=["steps_per_split"])
    def _gemm_f16_kernel(
        x_ptr, s_ptr, qs_ptr, d_ptr, m_ptr, out_ptr,
        M, N, K, stride_xm, stride_qs, stride_d, steps_per_split,
        QT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
        BLOCK_B: tl.constexpr, GROUP_M: tl.constexpr, SWAP_AB: tl.constexpr,
        SPLIT: tl.constexpr, INTERP: tl.constexpr,
    ):  # fmt: skip
        """out (M, N) float32 = (x16 @ W^T) * s[:, None] for fp16 x16 (M, K), float32 s (M,),
        W (N, K) as PackedWeight tensors (QT 0 Q4_0, 1 Q4_1: qs (N, K/2) uint8; 2 Q8_0: qs
        (N, K) int8; d, m (N, K/32) fp16). K is a multiple of 32 BLOCK_B. Edge rows of x and
        W are clamped to the last row (loads stay in bounds, no masks in the loop); the
        store is masked.

        SPLIT (SPLIT_K > 1 programs on axis 1): program (tile, k) sums the K steps (BLOCK_B
        blocks each) [k steps_per_split, (k + 1) steps_per_split) cut at K, so the last splits
        may be short or empty (an empty one stores zeros), and stores its partial tile, times
        s as the whole sum would be, into out as a (SPLIT_K, M, N) float32 workspace
        (`_sum_splits_kernel` adds them up). s is a power of two: the scaled partials add up
        to the scaled sum."""
        # grouped tile order (as qmatmul._gemm_kernel): GROUP_M row tiles share a W tile in L2
        pid = tl.program_id(0)
        num_m = tl.cdiv(M, BLOCK_M)
        num_n = tl.cdiv(N, BLOCK_N)
        first_m = pid // (GROUP_M * num_n) * GROUP_M
        group_size = tl.minimum(num_m - first_m, GROUP_M)
        pid_m = first_m + (pid % (GROUP_M * num_n)) % group_size
        pid_n = (pid % (GROUP_M * num_n)) // group_size

        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        x_rows = tl.minimum(offs_m, M - 1).to(tl.int64)
        w_rows = tl.minimum(offs_n, N - 1).to(tl.int64)
        W: tl.constexpr = 16 if QT < 2 else 32  # weights per block in one dot's K range
        blk = tl.arange(0, BLOCK_B)
        j = tl.arange(0, W)
        # (rows, BB, W) pointers at K step 0; step b0 adds b0 * 32 (x), b0 * W (qs), b0 (d, m)
        x_base = x_ptr + x_rows[:, None, None] * stride_xm + blk[None, :, None] * 32 + j
        qs_base = qs_ptr + w_rows[:, None, None] * stride_qs + blk[None, :, None] * W + j
        d_base = w_rows[:, None] * stride_d + blk[None, :]  # (BN, BB) element offsets
        acc = tl.zeros((BLOCK_N, BLOCK_M) if SWAP_AB else (BLOCK_M, BLOCK_N), tl.float32)
        nb = K // 32
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
                acc = _gemm_f16_step(acc, x_base, qs_base, d_ptr, m_ptr, d_base, b0, QT,
                                     BLOCK_M, BLOCK_N, BLOCK_B, SWAP_AB, INTERP)  # fmt: skip
                b0 += BLOCK_B
        else:
            for b0 in range(b_start, b_end, BLOCK_B):
                acc = _gemm_f16_step(acc, x_base, qs_base, d_ptr, m_ptr, d_base, b0, QT,
                                     BLOCK_M, BLOCK_N, BLOCK_B, SWAP_AB, INTERP)  # fmt: skip
        s = tl.load(s_ptr + x_rows)  # (BM,) the rows' powers of two: exact products
        o_mask = (offs_m < M)[:, None] & (offs_n < N)[None, :]
        o_ptr = out_ptr + o_rows[:, None] * N + offs_n[None, :]
        if SWAP_AB:
            tl.store(o_ptr, tl.trans(acc * s[None, :]), mask=o_mask)
        else:
            tl.store(o_ptr, acc * s[:, None], mask=o_mask)

    @triton.jit
    def _gemm_f16_step(
        acc, x_base, qs_base, d_ptr, m_ptr, d_base, b0,
        QT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
        BLOCK_B: tl.constexpr, SWAP_AB: tl.constexpr, INTERP: tl.constexpr,
    ):  # fmt: skip
        """acc + x[:, blocks b0..b0+BB) @ W[:, same]^T, the W tile built in fp16."""
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
            acc = _mma(acc, tl.reshape(xl, (BLOCK_M, BLOCK_B * 16)),
                       tl.reshape(wl, (BLOCK_N, BLOCK_B * 16)), SWAP_AB, INTERP)  # fmt: skip
            acc = _mma(acc, tl.reshape(xh, (BLOCK_M, BLOCK_B * 16)),
                       tl.reshape(wh, (BLOCK_N, BLOCK_B * 16)), SWAP_AB, INTERP)  # fmt: skip
        else:
            # int8 q -> q + 128 in [0, 256) by flipping the sign bit, then 1152 + q
            w = _scale_f16(_magic_f16(qs.to(tl.uint8, bitcast=True) ^ 0x80), d, m, 1152.0, QT,
                           INTERP)  # fmt: skip
            xt = tl.load(x_base + b0 * 32)  # (BM, BB, 32)
            acc = _mma(acc, tl.reshape(xt, (BLOCK_M, BLOCK_B * 32)),
                       tl.reshape(w, (BLOCK_N, BLOCK_B * 32)), SWAP_AB, INTERP)  # fmt: skip
        return acc

    @triton.jit
    def _sum_splits_kernel(ws_ptr, out_ptr, MN, SPLIT_K: tl.constexpr, BLOCK: tl.constexpr):
        """out (M N,) = ws[0] + ws[1] + ... + ws[SPLIT_K - 1] for a (SPLIT_K, M N) float32
        workspace, added in that order (deterministic: no atomics)."""
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < MN
        ptr = ws_ptr + offs
        y = tl.load(ptr, mask=mask, other=0.0)
        for _ in tl.static_range(SPLIT_K - 1):
            ptr += MN
            y += tl.load(ptr, mask=mask, other=0.0)
        tl.store(out_ptr + offs, y, mask=mask)


# --------------------------------------------------------------------------- launcher


def default_config(m: int, k: int, n: int) -> dict[str, int]:
    """The rule: row tiles follow M (16..128), 128 weight rows by 4 blocks (128 weights) per
    K step, halved to 2 blocks when K is not a multiple of 128, 8 warps for 128-row tiles;
    SPLIT_K from `rule_split`."""
    block_m = min(128, max(16, 1 << (m - 1).bit_length()))
    block_b = 4 if k % 128 == 0 else 2 if k % 64 == 0 else 1
    cfg = {"BLOCK_M": block_m, "BLOCK_N": 128, "BLOCK_B": block_b, "GROUP_M": 8,
           "SWAP_AB": 0, "num_warps": 8 if block_m >= 128 else 4, "num_stages": 3}  # fmt: skip
    cfg["SPLIT_K"] = rule_split(m, n, k, cfg)
    return cfg


def tiles(m: int, n: int, cfg: dict[str, int]) -> int:
    """Output tiles of an (m, n) product under cfg: the grid without split-K."""
    return -(-m // cfg["BLOCK_M"]) * -(-n // cfg["BLOCK_N"])


def used_splits(k: int, cfg: dict[str, int], split: int) -> int:
    """How many of `split` splits get K steps (cfg's BLOCK_B blocks each); the rest are
    empty."""
    steps = k // (32 * cfg["BLOCK_B"])
    return -(-steps // -(-steps // split)) if steps else 0


def rule_split(m: int, n: int, k: int, cfg: dict[str, int]) -> int:
    """SPLIT_K for cfg's tiles: the power of two nearest (in log2) 2 SMS / tiles, so that
    tiles * SPLIT_K is about two programs per SM; then no more splits than K steps, and
    none empty (9 steps in 8 splits of 2 each would leave 3 empty: 5 splits)."""
    if m == 0 or n == 0:
        return 1
    split = 1 << max(0, round(math.log2(2 * SMS / tiles(m, n, cfg))))
    steps = k // (32 * cfg["BLOCK_B"])
    return max(1, used_splits(k, cfg, min(split, steps)))


def _check(x: torch.Tensor, w: PackedWeight) -> None:
    if not isinstance(w, PackedWeight):
        raise ValueError(f"expected a PackedWeight (see qmatmul.pack_weight), got {type(w)}")
    if w.qtype not in TYPES:
        names = ", ".join(t.name for t in TYPES)
        raise ValueError(f"gemm_f16 takes {names} weights, got {w.qtype.name}")
    if not isinstance(x, torch.Tensor) or x.dim() != 2:
        got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"x must be a 2-D (M, K) tensor, got {got}")
    if x.shape[1] != w.k:
        raise ValueError(f"x has K={x.shape[1]} columns but the weight is {w.n}x{w.k}")
    if x.dtype not in _X_DTYPES:
        raise ValueError(f"x must be float16, bfloat16 or float32, got {x.dtype}")
    if x.stride(1) != 1 or (x.shape[0] > 1 and x.stride(0) < x.shape[1]):
        raise ValueError(f"x rows must be contiguous, got strides {x.stride()}")
    if x.device != w.device:
        raise ValueError(f"x is on {x.device} but the weight is on {w.device}")
    if not triton_usable(x.device):
        raise ValueError(f"gemm_f16 runs on CUDA (CPU with TRITON_INTERPRET=1), x on {x.device}")


def _resolve(config: dict[str, int] | None, m: int, n: int, k: int) -> dict[str, int]:
    cfg = default_config(m, k, n)
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
    if k % (32 * cfg["BLOCK_B"]):
        raise ValueError(f"K={k} must be a multiple of 32 * BLOCK_B = {32 * cfg['BLOCK_B']}")
    if config is not None and "SPLIT_K" not in config:  # the rule's split for these tiles
        cfg["SPLIT_K"] = rule_split(m, n, k, cfg)
    v = cfg["SPLIT_K"]
    if not (isinstance(v, int) and 1 <= v <= MAX_SPLIT):
        raise ValueError(f"config SPLIT_K must be an integer in [1, {MAX_SPLIT}], got {v!r}")
    return cfg


def gemm_f16(
    x: torch.Tensor, w: PackedWeight, config: dict[str, int] | None = None
) -> torch.Tensor:
    """x (M, K) @ W^T -> (M, N) float32, W a Q4_0 / Q4_1 / Q8_0 PackedWeight.

    x is rounded to fp16 after a per-row power-of-two scaling, W's tiles are built in fp16
    (see the module docstring), products are summed in float32. config overrides
    `default_config`'s BLOCK_M, BLOCK_N, BLOCK_B, GROUP_M, SWAP_AB, num_warps, num_stages,
    SPLIT_K (a config without SPLIT_K gets `rule_split` for its tiles).

    SPLIT_K > 1 cuts K into SPLIT_K ranges of whole K steps (ceil(steps / SPLIT_K) each, the
    last ones shorter or empty), run as separate programs that write float32 partials to a
    (SPLIT_K, M, N) workspace, summed in split order by a second kernel (deterministic).
    The workspace is allocated on every call (a lab: no caching; under CUDA graphs it comes
    from the graph's pool).
    """
    _check(x, w)
    m, n, k = x.shape[0], w.n, w.k
    cfg = _resolve(config, m, n, k)
    out = torch.empty(m, n, dtype=torch.float32, device=x.device)
    if m == 0:
        return out
    x16 = torch.empty(m, k, dtype=torch.float16, device=x.device)  # x = s x16, |x16| <= 2^14
    s = torch.empty(m, dtype=torch.float32, device=x.device)
    qm._scale_rows_kernel[(m,)](x, x16, s, x.stride(0), K=k, BLOCK_K=1024, num_warps=4)
    t = w.tensors
    qs, d = t["qs"], t["d"]
    num_warps, num_stages = cfg.pop("num_warps"), cfg.pop("num_stages")
    split = cfg.pop("SPLIT_K")
    steps = k // (32 * cfg["BLOCK_B"])
    dest = out if split == 1 else torch.empty(split, m, n, dtype=torch.float32, device=x.device)
    grid = (tiles(m, n, cfg), split)
    _gemm_f16_kernel[grid](
        x16, s, qs, d, t.get("m", d), dest, m, n, k, x16.stride(0), qs.stride(0), d.stride(0),
        triton.cdiv(steps, split), QT=TYPES[w.qtype], SPLIT=split > 1, INTERP=INTERPRET,
        **cfg, num_warps=num_warps, num_stages=num_stages,
    )  # fmt: skip
    if split > 1:
        block = 1024
        _sum_splits_kernel[(triton.cdiv(m * n, block),)](
            dest, out, m * n, SPLIT_K=split, BLOCK=block, num_warps=4
        )
    return out


# --------------------------------------------------------------------------- benchmark

SHAPES = [  # (name, N, K): Llama-3.2-1B, then SmolLM2-135M (QKV and gate/up fused)
    ("1b qkv", 3072, 2048),
    ("1b o", 2048, 2048),
    ("1b gate_up", 16384, 2048),
    ("1b down", 2048, 8192),
    ("smol qkv", 960, 576),
    ("smol o", 576, 576),
    ("smol gate_up", 3072, 576),
    ("smol down", 576, 1536),
]
SWEEP_M = 64  # the full sweep runs at this M; other M try its best TOP configs and the rule
TOP = 5
SPLITS = (1, 2, 4, 8, 16)  # SPLIT_K values the sweep picks from (--split)
MAX_REL_ERR = 1e-2  # against the dequant path (both round x and W to fp16: ~1e-3 expected)
ROTATE_BYTES = 80 << 20  # weight bytes per timed graph: more than an H100's 50 MB L2
MAX_COPIES = 512  # calls per graph (SmolLM2's 576x576 Q4_0 needs 440)


def sweep_tiles(m: int) -> list[dict[str, int]]:
    """Tiles for M rows (SPLIT_K 1): BLOCK_M <= M's power of two (>= 16), BLOCK_N 64 or 128,
    BLOCK_B 2, 4 or 8, 3 or 4 stages, either operand order; the fewer warps (4, else 8) that
    keep at most 128 fp16 weights (64 registers) and 128 accumulators per thread, and at
    least 8 accumulators."""
    top_m = max(16, 1 << (m - 1).bit_length())
    out = []
    for bm, bn, bb, stages, swap in itertools.product(
        (16, 32, 64, 128), (64, 128), (2, 4, 8), (3, 4), (0, 1)
    ):
        if bm > top_m:
            continue
        for warps in (4, 8):
            threads = 32 * warps
            if bn * bb * 32 <= 128 * threads and 8 * threads <= bm * bn <= 128 * threads:
                out.append({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_B": bb, "GROUP_M": 8,
                            "SWAP_AB": swap, "num_warps": warps, "num_stages": stages,
                            "SPLIT_K": 1})  # fmt: skip
                break
    return out


def sweep_grid(
    m: int, n: int, k: int, splits: tuple[int, ...] | list[int] = SPLITS
) -> list[dict[str, int]]:
    """Configs for an (M, N, K) product: each of `sweep_tiles` whose K step divides K, at
    SPLIT_K 1 (if in splits) and at the value of splits nearest (in log2) to 2 SMS / tiles,
    the rule's target, if that is not 1. Values that would leave a split empty (more splits
    than K steps, or 8 splits of 9 steps: 2 steps each, 5 used) are not tried. One split per
    tile keeps the sweep to about twice the tiles."""
    out = []
    for tile in sweep_tiles(m):
        if not fits(tile, k):
            continue
        cands = [v for v in splits if used_splits(k, tile, v) == v]
        if not cands:
            continue
        target = 2 * SMS / tiles(m, n, tile)
        best = min(cands, key=lambda v: (abs(math.log2(v / target)), v))
        out += [{**tile, "SPLIT_K": v} for v in sorted({best} | ({1} & set(cands)))]
    return out


def label(cfg: dict[str, int]) -> str:
    return "/".join(str(cfg[k]) for k in CONFIG_KEYS if k != "GROUP_M")


def binary(cfg: dict[str, int]) -> dict[str, int]:
    """cfg with SPLIT_K 2 for any SPLIT_K > 1: the config that builds the same GEMM binary
    (the kernel sees only whether K is split)."""
    return {**cfg, "SPLIT_K": min(cfg["SPLIT_K"], 2)}


def _random_packed(qtype: QuantType, n: int, k: int, device: str) -> PackedWeight:
    """A packed weight quantized from N(0, 0.05^2) floats (a trained layer's scale)."""
    from llamapy.quant.quantize import quantize

    blocks = quantize(torch.randn(n, k) * 0.05, qtype)
    return qm.pack_weight(blocks.to(device), qtype, (n, k))


def _copy(w: PackedWeight) -> PackedWeight:
    """The same weight in new memory (a rotating copy for the timings)."""
    return PackedWeight(w.qtype, w.n, w.k, {name: t.clone() for name, t in w.tensors.items()})


def fits(cfg: dict[str, int], k: int) -> bool:
    """Whether cfg's K step divides K (SmolLM2's K = 576 = 18 blocks takes BLOCK_B <= 2);
    any SPLIT_K runs (splits past the last K step are empty)."""
    return k % (32 * cfg["BLOCK_B"]) == 0


def _warm(qtype_name: str, cfg: dict[str, int]) -> tuple[str, dict[str, int], str]:
    """Worker: compile cfg's kernels by one run per specialization the shapes need (Triton
    specializes integers on divisibility by 16: K = 576 makes the scales' row stride 18),
    which fills Triton's disk cache for the timing process -> (type, cfg, "ok" or why not)."""
    try:
        qtype = QuantType[qtype_name]
        for k in (1024, 576):
            if fits(cfg, k):
                gemm_f16(torch.randn(64, k, device="cuda"), _random_packed(qtype, 256, k, "cuda"),
                         cfg)  # fmt: skip
        torch.cuda.synchronize()
    except Exception as exc:  # out of shared memory, compile errors: the config is skipped
        return qtype_name, cfg, f"{type(exc).__name__}: {str(exc).splitlines()[0][:100]}"
    return qtype_name, cfg, "ok"


def precompile(todo: list[tuple[str, dict[str, int]]], workers: int) -> dict[tuple, str]:
    """Compile every (type, config) on a pool of spawned processes -> status by
    (type name, label)."""
    if workers <= 0:
        return {(q, label(c)): _warm(q, c)[2] for q, c in todo}
    ctx = multiprocessing.get_context("spawn")
    with cf.ProcessPoolExecutor(workers, mp_context=ctx) as pool:
        done = [f.result() for f in [pool.submit(_warm, q, c) for q, c in todo]]
    return {(q, label(c)): status for q, c, status in done}


def _timed(graph_time, ws: list[PackedWeight], fn) -> float:
    """us per call of fn(w), w rotating over ws, from CUDA-graph replays (at least ~500
    calls in all); inf if it fails."""
    try:
        return graph_time([lambda w=w: fn(w) for w in ws], reps=max(2, min(20, 512 // len(ws))))
    except Exception:  # a config that does not launch (resources): skipped
        torch.cuda.synchronize()
        return math.inf


def _rel_err(x: torch.Tensor, w: PackedWeight, cfg: dict[str, int] | None) -> float:
    """gemm_f16's relative (Frobenius) difference from the dequant path; raises above
    MAX_REL_ERR."""
    ref = qm.qmatmul_with(x, w, path="dequant").double()
    rel = float((gemm_f16(x, w, cfg).double() - ref).norm() / ref.norm())
    if not rel <= MAX_REL_ERR:
        raise RuntimeError(
            f"{w.qtype.name} {w.n}x{w.k} M={x.shape[0]} config {cfg}: relative error "
            f"{rel:.2e} against the dequant path (> {MAX_REL_ERR})"
        )
    return rel


def bench_cell(
    graph_time, ws: list[PackedWeight], m: int, configs: list[dict[str, int]]
) -> tuple[list[tuple[float, dict[str, int]]], float, float, float]:
    """At M rows: checks gemm_f16 (rule) against the dequant path, times `configs` and both
    current paths, checks the fastest config too -> ((us, cfg) fastest first, dequant us,
    fused gemm us, the larger relative error)."""
    x = torch.randn(m, ws[0].k, device="cuda")
    rel = _rel_err(x, ws[0], None)
    times = []
    for cfg in configs:
        t = _timed(graph_time, ws, lambda w, cfg=cfg: gemm_f16(x, w, cfg))
        if math.isfinite(t):
            times.append((t, cfg))
    times.sort(key=lambda p: p[0])
    if times:
        rel = max(rel, _rel_err(x, ws[0], times[0][1]))
    dq = _timed(graph_time, ws, lambda w: qm.qmatmul_with(x, w, path="dequant"))
    old = _timed(graph_time, ws, lambda w: qm.qmatmul_with(x, w, path="gemm"))
    return times, dq, old, rel


def _parse(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--types", default="Q4_0,Q8_0,Q4_1", help="of Q4_0, Q4_1, Q8_0")
    ap.add_argument("--m", default="16,32,64,128,256", help="rows of x, comma-separated")
    ap.add_argument("--quick", action="store_true", help="time the rule's config only")
    ap.add_argument("--workers", type=int, default=min(14, os.cpu_count() or 1),
                    help="compile processes (0: compile in this one)")  # fmt: skip
    ap.add_argument("--budget-s", type=float, default=220.0,
                    help="after this many seconds, time only the top configs")  # fmt: skip
    ap.add_argument("--split", default=",".join(map(str, SPLITS)),
                    help="SPLIT_K values the sweep picks from, comma-separated (the rule's "
                         "config keeps its own)")  # fmt: skip
    args = ap.parse_args(argv)
    try:
        args.types = [QuantType[name] for name in args.types.split(",")]
    except KeyError as exc:
        ap.error(f"--types takes ggml type names among Q4_0,Q4_1,Q8_0, got {exc}")
    bad = [t.name for t in args.types if t not in TYPES]
    if bad:
        ap.error(f"--types: no gemm_f16 kernel for {','.join(bad)} (Q4_0, Q4_1, Q8_0 only)")
    try:
        args.m = [int(v) for v in args.m.split(",")]
    except ValueError:
        ap.error(f"--m takes integers like 16,64, got {args.m!r}")
    if min(args.m) < 1:
        ap.error("--m values must be >= 1")
    try:
        args.split = sorted({int(v) for v in args.split.split(",")})
    except ValueError:
        ap.error(f"--split takes integers like 1,4,16, got {args.split!r}")
    if not 1 <= min(args.split) <= max(args.split) <= MAX_SPLIT:
        ap.error(f"--split values must be in [1, {MAX_SPLIT}]")
    if args.workers < 0 or not args.budget_s > 0:
        ap.error("--workers must be >= 0 and --budget-s > 0")
    return args


def planned(args: argparse.Namespace, m: int, n: int, k: int) -> list[dict[str, int]]:
    """Configs timed at (M, N, K) before the sweep's top ones join: the rule's first, then
    (unless --quick) the sweep grid at SWEEP_M with --split's values."""
    rule = default_config(m, k, n)
    grid = [] if args.quick or m != SWEEP_M else sweep_grid(m, n, k, args.split)
    return [rule] + [c for c in grid if c != rule]


def main(argv: list[str] | None = None) -> None:
    args = _parse(argv)
    if not torch.cuda.is_available() or INTERPRET:
        sys.exit("gemm_f16_lab: the benchmark needs a CUDA GPU (and TRITON_INTERPRET unset)")
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from tune_decode import graph_time  # CUDA-graph replays of a list of calls

    t0 = time.time()
    plans = {(m, n, k): planned(args, m, n, k) for m in args.m for _, n, k in SHAPES}
    todo = {(q.name, label(binary(c))): (q.name, binary(c)) for q in args.types
            for cfgs in plans.values() for c in cfgs}  # fmt: skip
    status = precompile(list(todo.values()), args.workers)  # by binary: SPLIT_K 1 or 2
    failed = sum(s != "ok" for s in status.values())
    print(f"{torch.cuda.get_device_name()}: {len(status) - failed}/{len(status)} kernels built, "
          f"{failed} failed to compile or run ({time.time() - t0:.0f} s)")  # fmt: skip
    print("config: BLOCK_M/BLOCK_N/BLOCK_B/SWAP_AB/num_warps/num_stages/SPLIT_K; speedup: the "
          "better of dequant and gemm over f16\n")  # fmt: skip
    print("| type | N x K | M | best config | f16 us | dequant us | gemm us | speedup | rel err |")
    print("| --- | --- | ---: | --- | ---: | ---: | ---: | ---: | ---: |")
    for qtype in args.types:
        for _, n, k in SHAPES:
            copies = min(MAX_COPIES, math.ceil(ROTATE_BYTES / (n * row_nbytes(qtype, k))))
            w = _random_packed(qtype, n, k, "cuda")
            ws = [w] + [_copy(w) for _ in range(copies - 1)]
            rows = {}
            ranking: list[dict[str, int]] = []  # the sweep's configs, fastest first
            for m in sorted(args.m, key=lambda v: v != SWEEP_M):  # the sweep first
                configs = [c for c in plans[(m, n, k)]
                           if status[(qtype.name, label(binary(c)))] == "ok"]  # fmt: skip
                if time.time() - t0 > args.budget_s:
                    configs = configs[:1]  # out of time: the rule's config (and the top ones)
                top_m = max(16, 1 << (m - 1).bit_length())
                top = [c for c in ranking if c["BLOCK_M"] <= top_m][:TOP]
                configs += [c for c in top if c not in configs]
                times, dq, old, rel = bench_cell(graph_time, ws, m, configs)
                if m == SWEEP_M:
                    ranking = [c for _, c in times]
                best_t, best = times[0] if times else (math.inf, None)
                rows[m] = (f"| {qtype.name} | {n}x{k} | {m} | {label(best) if best else '-'} | "
                           f"{best_t:.1f} | {dq:.1f} | {old:.1f} | "
                           f"{min(dq, old) / best_t:.2f}x | {rel:.1e} |")  # fmt: skip
            print("\n".join(rows[m] for m in sorted(rows)), flush=True)
            del w, ws
    print(f"\n({time.time() - t0:.0f} s; {failed} configs skipped: they did not compile)")


if __name__ == "__main__":
    main()
