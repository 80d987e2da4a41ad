"""Paged attention over llamapy's block tables: varlen flash-attention prefill and split-KV
flash-decoding, with the semantics of `llamapy.layers.attention.paged_attention` (the torch
reference and test oracle).

Caches are `(num_blocks, block_size, n_kv, d)`; a sequence's token `p` sits in block
`block_tables[b, p // block_size]` at offset `p % block_size`. Queries of sequence `b` are
its last `q_len` positions; causal masking keeps the cached prefix visible; GQA maps query
head `h` to KV head `h // (n_heads // n_kv)`; the sliding window is llama.cpp's standard SWA
(key visible while `q_pos - k_pos < window`); the soft-cap `tanh(s / c) * c` applies to the
scaled logits before masking. As in the reference, K and V are cast to q's dtype, both dots
accumulate in fp32 and the probabilities are cast to q's dtype for the second dot (fp32
dots run in IEEE precision, not TF32).

The decode path is CUDA-graph safe: its grid, workspace and every host argument depend on
tensor shapes only; sequence lengths are read on the device.
"""

from __future__ import annotations

import functools
import logging
import os

import torch
import triton
import triton.language as tl

from llamapy.kernels.triton import INTERPRET, pdl, rotary, rounding
from llamapy.kernels.triton.decode_splits import DecodeSplits
from llamapy.layers.attention import AttentionMetadata, check_paged_shapes
from llamapy.switches import OFF_VALUES, switched_off

_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
logger = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------
# Kernels
# --------------------------------------------------------------------------------------------

# fmt: off


@triton.jit
def _tanh(x):
    # tanh from exp of a non-positive argument: no overflow, exact sign
    e = tl.exp(-2.0 * tl.abs(x))
    t = (1.0 - e) / (1.0 + e)
    return tl.where(x >= 0, t, -t)


@triton.jit
def _dot(a, b, DOT_PRECISION: tl.constexpr):
    """a @ b accumulated in fp32. "bf16-as-fp32" is for the interpreter, whose bf16 dot
    multiplies the raw bits: bf16 products are exact in fp32, so the result is the same."""
    if DOT_PRECISION == "bf16-as-fp32":
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    else:
        return tl.dot(a, b, input_precision=DOT_PRECISION)


@triton.jit
def _logits_log2(qk, scale, softcap, USE_SOFTCAP: tl.constexpr):
    """Scaled (and soft-capped) logits in log2 units, for exp2."""
    if USE_SOFTCAP:
        s = softcap * _tanh(qk * (scale / softcap))
        return s * 1.4426950408889634
    else:
        return qk * (scale * 1.4426950408889634)


@triton.jit
def _load_kv_tile(
    cache_ptr, page, slot, mask_n, offs_d, kv_head, stride_b, stride_t, stride_h,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """(BLOCK_N, BLOCK_D): the rows of one KV head at (page, slot) of the cache."""
    row = page * stride_b + slot * stride_t + kv_head * stride_h
    ptrs = cache_ptr + row[:, None] + offs_d[None, :]
    if HEAD_DIM == BLOCK_D:  # row-only mask: whole rows load as wide vectors
        return tl.load(ptrs, mask=mask_n[:, None], other=0.0)
    else:
        return tl.load(ptrs, mask=mask_n[:, None] & (offs_d[None, :] < HEAD_DIM), other=0.0)


@triton.jit
def _tile_pages(block_table_row, tile_start, hi, BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr):
    """The cache block of each key of the tile [tile_start, tile_start + BLOCK_N) (0 from hi
    on: nothing is read there)."""
    offs_n = tile_start + tl.arange(0, BLOCK_N)
    return tl.load(block_table_row + offs_n // BLOCK_SIZE, mask=offs_n < hi, other=0).to(tl.int64)


@triton.jit
def _tile_kv(
    cache_ptr, page, tile_start, hi, offs_d, kv_head, stride_b, stride_t, stride_h,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """(BLOCK_N, BLOCK_D): the cached rows of keys [tile_start, +BLOCK_N) of one KV head in
    blocks `page` (`_tile_pages`), zero from hi on."""
    offs_n = tile_start + tl.arange(0, BLOCK_N)
    return _load_kv_tile(
        cache_ptr, page, offs_n % BLOCK_SIZE, offs_n < hi, offs_d, kv_head, stride_b, stride_t,
        stride_h, HEAD_DIM, BLOCK_D,
    )


@triton.jit
def _scores(
    q, q_pos, m_i, l_i, k, tile_start, hi, scale, softcap, window, BLOCK_N: tl.constexpr,
    IS_CAUSAL: tl.constexpr, USE_WINDOW: tl.constexpr, USE_SOFTCAP: tl.constexpr,
    DOT_PRECISION: tl.constexpr, USE_DOT: tl.constexpr,
):
    """The online softmax's first half for a tile of keys k (BLOCK_N, BLOCK_D) starting at
    tile_start: (m_new, l_new, p, alpha), p the tile's probabilities against m_new, alpha the
    factor that rescales what the earlier tiles summed."""
    offs_n = tile_start + tl.arange(0, BLOCK_N)
    if USE_DOT:
        qk = _dot(q, tl.trans(k.to(q.dtype)), DOT_PRECISION)  # (M, N)
    else:
        qk = tl.sum(q.to(tl.float32)[:, None, :] * k.to(q.dtype).to(tl.float32)[None, :, :], 2)
    s = _logits_log2(qk, scale, softcap, USE_SOFTCAP)
    visible = (offs_n < hi)[None, :]
    if IS_CAUSAL:
        visible = visible & (offs_n[None, :] <= q_pos[:, None])
    if USE_WINDOW:
        visible = visible & (q_pos[:, None] - offs_n[None, :] < window)
    s = tl.where(visible, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    # Rows that have seen no visible key yet keep m = -inf: subtract 0 instead (no NaN).
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp2(m_i - m_safe)
    p = tl.exp2(s - m_safe[:, None])
    return m_new, l_i * alpha + tl.sum(p, 1), p, alpha


@triton.jit
def _accumulate(acc, alpha, p, v, dtype, DOT_PRECISION: tl.constexpr, USE_DOT: tl.constexpr):
    """The online softmax's second half: acc rescaled by alpha plus p @ v (p and v rounded
    to q's `dtype` as the dot takes them, summed in float32)."""
    acc = acc * alpha[:, None]
    if USE_DOT:
        acc += _dot(p.to(dtype), v.to(dtype), DOT_PRECISION)
    else:
        pv = p.to(dtype).to(tl.float32)[:, :, None] * v.to(dtype).to(tl.float32)[None, :, :]
        acc += tl.sum(pv, 1)
    return acc


@triton.jit
def _attend_tile(
    q, q_pos, m_i, l_i, acc, tile_start, hi, k_ptr, v_ptr, block_table_row, kv_head, offs_d,
    stride_kb, stride_kt, stride_kh, stride_vb, stride_vt, stride_vh, scale, softcap, window,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr,
    IS_CAUSAL: tl.constexpr, USE_WINDOW: tl.constexpr, USE_SOFTCAP: tl.constexpr,
    DOT_PRECISION: tl.constexpr, EARLY_V: tl.constexpr = False, USE_DOT: tl.constexpr = True,
):
    """Online-softmax update of rows `q` (queries at `q_pos`) with keys
    [tile_start, min(tile_start + BLOCK_N, hi)). EARLY_V: V's tile is loaded with K's,
    before the scores (its latency overlaps theirs). USE_DOT False: both products as
    broadcast multiplies and sums in float32 (operands rounded to q's dtype as `tl.dot`
    takes them), for the few rows of a decode program: no padding to 16 rows, no operand
    layout conversions."""
    page = _tile_pages(block_table_row, tile_start, hi, BLOCK_SIZE, BLOCK_N)
    k = _tile_kv(k_ptr, page, tile_start, hi, offs_d, kv_head, stride_kb, stride_kt, stride_kh,
                 HEAD_DIM, BLOCK_D, BLOCK_SIZE, BLOCK_N)
    if EARLY_V:
        v = _tile_kv(v_ptr, page, tile_start, hi, offs_d, kv_head, stride_vb, stride_vt,
                     stride_vh, HEAD_DIM, BLOCK_D, BLOCK_SIZE, BLOCK_N)
    m_new, l_i, p, alpha = _scores(q, q_pos, m_i, l_i, k, tile_start, hi, scale, softcap, window,
                                   BLOCK_N, IS_CAUSAL, USE_WINDOW, USE_SOFTCAP, DOT_PRECISION,
                                   USE_DOT)
    if not EARLY_V:
        v = _tile_kv(v_ptr, page, tile_start, hi, offs_d, kv_head, stride_vb, stride_vt,
                     stride_vh, HEAD_DIM, BLOCK_D, BLOCK_SIZE, BLOCK_N)
    return m_new, l_i, _accumulate(acc, alpha, p, v, q.dtype, DOT_PRECISION, USE_DOT)


@triton.jit
def _attend_range(
    q, q_pos, m_i, l_i, acc, lo, hi, k_ptr, v_ptr, block_table_row, kv_head, offs_d, stride_kb,
    stride_kt, stride_kh, stride_vb, stride_vt, stride_vh, scale, softcap, window,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr,
    IS_CAUSAL: tl.constexpr, USE_WINDOW: tl.constexpr, USE_SOFTCAP: tl.constexpr,
    DOT_PRECISION: tl.constexpr, LOOP_WHILE: tl.constexpr, EARLY_V: tl.constexpr = False,
    USE_DOT: tl.constexpr = True,
):
    """Keys [lo, hi) in BLOCK_N tiles. The compiled kernel runs a `for` loop (software
    pipelined); the interpreter a `while` loop, because with numpy >= 2.4 it cannot turn
    its (1,)-shaped scalars into `range` bounds."""
    if LOOP_WHILE:
        tile_start = lo
        while tile_start < hi:
            m_i, l_i, acc = _attend_tile(
                q, q_pos, m_i, l_i, acc, tile_start, hi, k_ptr, v_ptr, block_table_row, kv_head,
                offs_d, stride_kb, stride_kt, stride_kh, stride_vb, stride_vt, stride_vh, scale,
                softcap, window, HEAD_DIM, BLOCK_D, BLOCK_SIZE, BLOCK_N, IS_CAUSAL, USE_WINDOW,
                USE_SOFTCAP, DOT_PRECISION, EARLY_V, USE_DOT,
            )
            tile_start += BLOCK_N
    else:
        for tile_start in range(lo, hi, BLOCK_N):
            m_i, l_i, acc = _attend_tile(
                q, q_pos, m_i, l_i, acc, tile_start, hi, k_ptr, v_ptr, block_table_row, kv_head,
                offs_d, stride_kb, stride_kt, stride_kh, stride_vb, stride_vt, stride_vh, scale,
                softcap, window, HEAD_DIM, BLOCK_D, BLOCK_SIZE, BLOCK_N, IS_CAUSAL, USE_WINDOW,
                USE_SOFTCAP, DOT_PRECISION, EARLY_V, USE_DOT,
            )
    return m_i, l_i, acc


# float32 -> dtype, rounded to nearest even (one definition: rounding.py)
_round_to = rounding.round_to


@triton.jit
def _rope_factors(cos_ptr, sin_ptr, offs_d, ROT_HALF: tl.constexpr, INTERLEAVED: tl.constexpr):
    """(cos, sin) of the token for each feature offs_d (BLOCK_D,) as `_rotated` applies them
    (1 and 0 past rot_dim)."""
    rot = offs_d < 2 * ROT_HALF
    if INTERLEAVED:  # noqa: SIM108 (a constexpr branch, as the kernels write them)
        c = offs_d // 2
    else:
        c = tl.where(offs_d < ROT_HALF, offs_d, offs_d - ROT_HALF)
    cos = tl.load(cos_ptr + c, mask=rot, other=1.0).to(tl.float32)
    sin = tl.load(sin_ptr + c, mask=rot, other=0.0).to(tl.float32)
    return cos, sin


@triton.jit
def _rotated(ptr, offs_d, mask, cos, sin, ROT_HALF: tl.constexpr, INTERLEAVED: tl.constexpr):
    """Rows at `ptr` (+ offs_d) rotated by the token's `_rope_factors` (broadcast against
    offs_d) in float32, as `rotary._rope_heads` rotates them: pairs (x[i], x[i + rot/2]), or
    (x[2i], x[2i + 1]) when INTERLEAVED; features past rot_dim pass through."""
    rot = offs_d < 2 * ROT_HALF
    if INTERLEAVED:
        partner = offs_d ^ 1
        sign = tl.where(offs_d % 2 == 0, -1.0, 1.0)
    else:
        partner = tl.where(offs_d < ROT_HALF, offs_d + ROT_HALF, offs_d - ROT_HALF)
        sign = tl.where(offs_d < ROT_HALF, -1.0, 1.0)
    x = tl.load(ptr + offs_d, mask=mask, other=0.0).to(tl.float32)
    xp = tl.load(ptr + partner, mask=mask & rot, other=0.0).to(tl.float32)
    return x * cos + sign * (xp * sin)


@triton.jit
def _new_key(
    b, kv_head, offs_d, mask_d, new_k_ptr, new_v_ptr, cos, sin, k_ptr, v_ptr, stride_nkb,
    stride_nkh, stride_nvb, stride_nvh, ROT_HALF: tl.constexpr, INTERLEAVED: tl.constexpr,
    INTERP: tl.constexpr,
):
    """The new key (rotated) and value of a fused decode step (`_decode_kernel`'s NEW_KV),
    rounded to the cache's types as the cache would return them. Loaded with q: one wait
    for all of them."""
    row_k = new_k_ptr + b.to(tl.int64) * stride_nkb + kv_head * stride_nkh
    row_v = new_v_ptr + b.to(tl.int64) * stride_nvb + kv_head * stride_nvh
    v = tl.load(row_v + offs_d, mask=mask_d, other=0.0).to(tl.float32)
    k = _rotated(row_k, offs_d, mask_d, cos, sin, ROT_HALF, INTERLEAVED)
    k = _round_to(k, k_ptr.dtype.element_ty, INTERP)
    v = _round_to(v, v_ptr.dtype.element_ty, INTERP)
    return k, v


@triton.jit
def _decode_query(
    q_rows, b, kv_head, offs_d, mask_d, mask_gd, q_ptr, k_ptr, v_ptr, new_k_ptr, new_v_ptr, cos,
    sin, stride_nkb, stride_nkh, stride_nvb, stride_nvh, NEW_KV: tl.constexpr,
    ROUND_Q: tl.constexpr, ROT_HALF: tl.constexpr, INTERLEAVED: tl.constexpr,
    INTERP: tl.constexpr,
):
    """What a decode program reads of the kernel before (the QKV product): its query rows
    (BLOCK_G, BLOCK_D), rotated and rounded as the rotary kernel stores them when NEW_KV,
    then to the cache's type when ROUND_Q; with NEW_KV the new key and value (`_new_key`),
    else zeros."""
    if NEW_KV:
        new_k, new_v = _new_key(
            b, kv_head, offs_d, mask_d, new_k_ptr, new_v_ptr, cos, sin, k_ptr, v_ptr,
            stride_nkb, stride_nkh, stride_nvb, stride_nvh, ROT_HALF, INTERLEAVED, INTERP,
        )
        q = _rotated(q_rows, offs_d[None, :], mask_gd, cos[None, :], sin[None, :], ROT_HALF,
                     INTERLEAVED)
        q = _round_to(q, q_ptr.dtype.element_ty, INTERP)
    else:
        q = tl.load(q_rows + offs_d[None, :], mask=mask_gd, other=0.0)
        new_k = tl.zeros(offs_d.shape, tl.float32)
        new_v = new_k
    if ROUND_Q:
        q = q.to(k_ptr.dtype.element_ty)
    return q, new_k, new_v


@triton.jit
def _store_new_key(
    owner, k, v, slot, kv_head, offs_d, mask_d, k_ptr, v_ptr, stride_kb, stride_kt, stride_kh,
    stride_vb, stride_vt, stride_vh, BLOCK_SIZE: tl.constexpr,
):
    """The split that owns position seq_len - 1 stores the new key and value at their slot
    (no other program reads it; a slot < 0 stores nothing)."""
    store = owner & (slot >= 0) & mask_d
    page, off = slot // BLOCK_SIZE, slot % BLOCK_SIZE
    tl.store(k_ptr + page * stride_kb + off * stride_kt + kv_head * stride_kh + offs_d, k,
             mask=store)
    tl.store(v_ptr + page * stride_vb + off * stride_vt + kv_head * stride_vh + offs_d, v,
             mask=store)


@triton.jit
def _attend_new_key(q, m_i, l_i, acc, owner, k, v, scale, softcap, USE_SOFTCAP: tl.constexpr):
    """Online-softmax update of the owner split's rows with the new key k and value v (as
    `_new_key` returns them); a no-op in the other splits."""
    dtype = q.dtype
    qk = tl.sum(q.to(tl.float32) * k.to(dtype).to(tl.float32)[None, :], 1)  # (BLOCK_G,)
    s = _logits_log2(qk, scale, softcap, USE_SOFTCAP)
    s = tl.where(owner, s, float("-inf"))
    m_new = tl.maximum(m_i, s)
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp2(m_i - m_safe)
    p = tl.exp2(s - m_safe)
    l_i = l_i * alpha + p
    pv = p.to(dtype).to(tl.float32)[:, None] * v.to(dtype).to(tl.float32)[None, :]
    acc = acc * alpha[:, None] + pv
    return m_new, l_i, acc


@triton.jit
def _step_inputs(
    seq_lens_ptr, slot_ptr, cos_ptr, sin_ptr, b, offs_d, stride_cb, stride_sb,
    NEW_KV: tl.constexpr, ROT_HALF: tl.constexpr, INTERLEAVED: tl.constexpr,
):
    """Sequence b's length and, with NEW_KV, the new key's cache slot and the rotation's
    `_rope_factors` (else -1, ones and zeros)."""
    seq_len = tl.load(seq_lens_ptr + b)
    new_slot = tl.full([], -1, tl.int64)
    cos = tl.full(offs_d.shape, 1.0, tl.float32)
    sin = tl.zeros(offs_d.shape, tl.float32)
    if NEW_KV:
        new_slot = tl.load(slot_ptr + b).to(tl.int64)
        cos, sin = _rope_factors(cos_ptr + b.to(tl.int64) * stride_cb,
                                 sin_ptr + b.to(tl.int64) * stride_sb, offs_d, ROT_HALF,
                                 INTERLEAVED)
    return seq_len, new_slot, cos, sin


@triton.jit
def _split_keys(seq_len, split, window, NUM_SPLITS: tl.constexpr, BLOCK_N: tl.constexpr,
                USE_WINDOW: tl.constexpr, NEW_KV: tl.constexpr):
    """A decode program's keys: the query sits at last = seq_len - 1; visible keys are
    [start, seq_len), cut into NUM_SPLITS runs of whole BLOCK_N tiles (trailing splits may
    be empty) -> (lo, hi_cached, last, owner): split `split` reads the cached keys [lo,
    hi_cached); owner: its run ends with the query's own position, whose key (NEW_KV) is not
    in the cache yet (so hi_cached stops before it)."""
    start = 0
    if USE_WINDOW:
        start = tl.maximum(seq_len - window, 0)
    num_tiles = tl.cdiv(seq_len - start, BLOCK_N)
    tiles_per_split = tl.cdiv(num_tiles, NUM_SPLITS)
    lo = start + split * tiles_per_split * BLOCK_N
    hi = tl.minimum(lo + tiles_per_split * BLOCK_N, seq_len)
    last = seq_len - 1
    owner = (lo <= last) & (last < hi)
    hi_cached = hi
    if NEW_KV:
        hi_cached = tl.where(owner, last, hi)
    return lo, hi_cached, last, owner


@triton.jit
def _decode_kernel(
    q_ptr,  # (B, n_heads, d)
    k_ptr,  # (num_blocks, block_size, n_kv, d)
    v_ptr,
    block_tables_ptr,  # (B, max_blocks) int32
    seq_lens_ptr,  # (B,) int32
    out_ptr,  # (B, n_heads, d), written when NUM_SPLITS == 1
    part_o_ptr,  # (B, n_heads, NUM_SPLITS, d) fp32: each split's normalized output
    part_lse_ptr,  # (B, n_heads, NUM_SPLITS) fp32: each split's log2-sum-exp2
    scale,
    softcap,
    window,
    stride_qb,
    stride_qh,
    stride_kb,
    stride_kt,
    stride_kh,
    stride_vb,
    stride_vt,
    stride_vh,
    stride_ob,
    stride_oh,
    stride_bt,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    GROUP: tl.constexpr,
    BLOCK_G: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    BLOCK_N: tl.constexpr,
    NUM_SPLITS: tl.constexpr,
    USE_WINDOW: tl.constexpr,
    USE_SOFTCAP: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    LOOP_WHILE: tl.constexpr,
    ROUND_Q: tl.constexpr = False,
    PDL: tl.constexpr = False,
    new_k_ptr=None,  # NEW_KV: (B, n_kv, d) this step's keys, not rotated yet
    new_v_ptr=None,  # (B, n_kv, d) its values
    cos_ptr=None,  # (B, rot_dim / 2)
    sin_ptr=None,
    slot_ptr=None,  # (B,) the cache slot of each new key (< 0: not stored)
    stride_nkb=0,
    stride_nkh=0,
    stride_nvb=0,
    stride_nvh=0,
    stride_cb=0,
    stride_sb=0,
    NEW_KV: tl.constexpr = False,
    ROT_HALF: tl.constexpr = 0,
    INTERLEAVED: tl.constexpr = False,
    EARLY_V: tl.constexpr = False,
    USE_DOT: tl.constexpr = True,
    EARLY_TILE: tl.constexpr = False,
    HEADS: tl.constexpr = 0,
):
    """One (sequence, KV head, split): all GROUP query heads of the KV head as rows of one
    tile, over the split's share of the visible keys. ROUND_Q: q is rounded to the cache's
    16-bit type, so both dots run on tensor cores in that type (probabilities rounded to it
    too), sums in float32. PDL: see `pdl` (everything read here comes from earlier kernels).
    NEW_KV: rotary embedding and cache write fused in (`rope_cache_attention_decode`): q
    and this step's key arrive unrotated, the key and value of position seq_len - 1 are not
    in the cache yet; the split that owns that position takes them from registers and
    stores them at their slot (no other program reads it).
    EARLY_TILE (with NEW_KV, for launches whose splits hold one key tile each, as the decode
    graphs cut by length give them): the split's first tile of cached K / V rows, its block
    numbers, the length, the slot and the rotation's cos / sin are read before the PDL wait.
    None of them is written by this step's kernels before this one (the cache's rows before
    seq_len - 1 by earlier steps, the rest before the step's first kernel; this kernel
    writes the new row itself), so only q and the new key and value, the QKV product's,
    wait for the kernel before. Further tiles, if any, are read after it.
    HEADS (a divisor of GROUP, <= BLOCK_G): a program takes HEADS query heads instead, axis
    1 the GROUP // HEADS parts of each KV head, whose rows each part reads; its first part
    stores the new key."""
    EARLY: tl.constexpr = EARLY_TILE and NEW_KV
    b = tl.program_id(0)
    split = tl.program_id(2)
    if HEADS:
        PARTS: tl.constexpr = GROUP // HEADS
        kv_head = tl.program_id(1) // PARTS
        first_head = tl.program_id(1) * HEADS
        n_heads = HEADS * tl.num_programs(1)
        stores_key = tl.program_id(1) % PARTS == 0
    else:
        kv_head = tl.program_id(1)
        first_head = kv_head * GROUP
        n_heads = GROUP * tl.num_programs(1)
        stores_key = True

    offs_g = tl.arange(0, BLOCK_G)
    offs_d = tl.arange(0, BLOCK_D)
    mask_g = offs_g < (HEADS if HEADS else GROUP)
    mask_d = offs_d < HEAD_DIM
    heads = first_head + offs_g
    q_rows = q_ptr + b.to(tl.int64) * stride_qb + heads[:, None] * stride_qh
    mask_gd = mask_g[:, None] & mask_d[None, :]
    block_table_row = block_tables_ptr + b.to(tl.int64) * stride_bt
    if EARLY:
        seq_len, new_slot, cos, sin = _step_inputs(
            seq_lens_ptr, slot_ptr, cos_ptr, sin_ptr, b, offs_d, stride_cb, stride_sb, NEW_KV,
            ROT_HALF, INTERLEAVED,
        )
        lo, hi_cached, last, owner = _split_keys(seq_len, split, window, NUM_SPLITS, BLOCK_N,
                                                 USE_WINDOW, NEW_KV)
        page = _tile_pages(block_table_row, lo, hi_cached, BLOCK_SIZE, BLOCK_N)
        k = _tile_kv(k_ptr, page, lo, hi_cached, offs_d, kv_head, stride_kb, stride_kt,
                     stride_kh, HEAD_DIM, BLOCK_D, BLOCK_SIZE, BLOCK_N)
        v = _tile_kv(v_ptr, page, lo, hi_cached, offs_d, kv_head, stride_vb, stride_vt,
                     stride_vh, HEAD_DIM, BLOCK_D, BLOCK_SIZE, BLOCK_N)
    pdl.wait(PDL)
    pdl.launch_dependents(PDL)
    # Every load that does not hang on another one goes out before any result is used: the
    # sequence length, this step's key and value (NEW_KV), q (H200, B=1, SmolLM2 heads at
    # 64 keys: the new key's program 3.08 -> 2.87 us, empty splits 1.16 -> 0.98; tg128
    # SmolLM2 Q4_0 1605 -> 1623 t/s). (LOOP_WHILE: set under the interpreter only.)
    if not EARLY:
        seq_len, new_slot, cos, sin = _step_inputs(
            seq_lens_ptr, slot_ptr, cos_ptr, sin_ptr, b, offs_d, stride_cb, stride_sb, NEW_KV,
            ROT_HALF, INTERLEAVED,
        )
    q, new_k, new_v = _decode_query(
        q_rows, b, kv_head, offs_d, mask_d, mask_gd, q_ptr, k_ptr, v_ptr, new_k_ptr, new_v_ptr,
        cos, sin, stride_nkb, stride_nkh, stride_nvb, stride_nvh, NEW_KV, ROUND_Q, ROT_HALF,
        INTERLEAVED, LOOP_WHILE,
    )
    if not EARLY:
        lo, hi_cached, last, owner = _split_keys(seq_len, split, window, NUM_SPLITS, BLOCK_N,
                                                 USE_WINDOW, NEW_KV)

    m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
    if NEW_KV:
        _store_new_key(
            owner & stores_key, new_k, new_v, new_slot, kv_head, offs_d, mask_d, k_ptr, v_ptr,
            stride_kb, stride_kt, stride_kh, stride_vb, stride_vt, stride_vh, BLOCK_SIZE,
        )
    first = lo  # the first tile that is read here
    if EARLY:  # the tile read before the wait (no causal or window mask: q_pos unused)
        m_i, l_i, p, alpha = _scores(q, lo, m_i, l_i, k, lo, hi_cached, scale, softcap, window,
                                     BLOCK_N, False, False, USE_SOFTCAP, DOT_PRECISION, USE_DOT)
        acc = _accumulate(acc, alpha, p, v, q.dtype, DOT_PRECISION, USE_DOT)
        first = lo + BLOCK_N
    m_i, l_i, acc = _attend_range(
        q, last, m_i, l_i, acc, first, hi_cached, k_ptr, v_ptr, block_table_row, kv_head, offs_d,
        stride_kb, stride_kt, stride_kh, stride_vb, stride_vt, stride_vh, scale, softcap, window,
        HEAD_DIM, BLOCK_D, BLOCK_SIZE, BLOCK_N, False, False, USE_SOFTCAP, DOT_PRECISION,
        LOOP_WHILE, EARLY_V, USE_DOT,
    )
    if NEW_KV:
        m_i, l_i, acc = _attend_new_key(
            q, m_i, l_i, acc, owner, new_k, new_v, scale, softcap, USE_SOFTCAP
        )

    # An empty split (or sequence) has l_i == 0: output 0, log-sum-exp -inf.
    l_safe = tl.where(l_i > 0, l_i, 1.0)
    o = acc / l_safe[:, None]
    if NUM_SPLITS == 1:
        out = out_ptr + b.to(tl.int64) * stride_ob + heads[:, None] * stride_oh + offs_d[None, :]
        tl.store(out, o.to(out_ptr.dtype.element_ty), mask=mask_gd)
    else:
        row = (b.to(tl.int64) * n_heads + heads) * NUM_SPLITS + split
        tl.store(part_o_ptr + row[:, None] * HEAD_DIM + offs_d[None, :], o, mask=mask_gd)
        lse = tl.where(l_i > 0, m_i + tl.log2(l_safe), float("-inf"))
        tl.store(part_lse_ptr + row, lse, mask=mask_g)


@triton.jit
def _combine_kernel(
    part_o_ptr,  # (B, n_heads, NUM_SPLITS, d) fp32
    part_lse_ptr,  # (B, n_heads, NUM_SPLITS) fp32
    out_ptr,  # (B, n_heads, d)
    stride_ob,
    stride_oh,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    NUM_SPLITS: tl.constexpr,
    BLOCK_S: tl.constexpr,
    PDL: tl.constexpr = False,
):
    """Merge the splits of one (sequence, head) by their log-sum-exp (flash-decoding)."""
    pdl.wait(PDL)
    pdl.launch_dependents(PDL)
    b = tl.program_id(0)
    h = tl.program_id(1)
    row = b.to(tl.int64) * tl.num_programs(1) + h
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, BLOCK_D)
    mask_s = offs_s < NUM_SPLITS
    mask_d = offs_d < HEAD_DIM
    lse = tl.load(part_lse_ptr + row * NUM_SPLITS + offs_s, mask=mask_s, other=float("-inf"))
    m = tl.max(lse, 0)
    m = tl.where(m == float("-inf"), 0.0, m)  # every split empty: weights 0, output 0
    w = tl.exp2(lse - m)
    o = tl.load(
        part_o_ptr + (row * NUM_SPLITS + offs_s)[:, None] * HEAD_DIM + offs_d[None, :],
        mask=mask_s[:, None] & mask_d[None, :],
        other=0.0,
    )
    total = tl.sum(w, 0)
    o = tl.sum(o * w[:, None], 0) / tl.where(total > 0, total, 1.0)
    out = out_ptr + b.to(tl.int64) * stride_ob + h * stride_oh + offs_d
    tl.store(out, o.to(out_ptr.dtype.element_ty), mask=mask_d)


@triton.jit
def _prefill_kernel(
    q_ptr,  # (T, n_heads, d)
    k_ptr,  # (num_blocks, block_size, n_kv, d)
    v_ptr,
    block_tables_ptr,  # (B, max_blocks) int32
    seq_lens_ptr,  # (B,) int32
    query_start_ptr,  # (B + 1,) int32
    out_ptr,  # (T, n_heads, d)
    scale,
    softcap,
    window,
    stride_qt,
    stride_qh,
    stride_kb,
    stride_kt,
    stride_kh,
    stride_vb,
    stride_vt,
    stride_vh,
    stride_ot,
    stride_oh,
    stride_bt,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    GROUP: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    IS_CAUSAL: tl.constexpr,
    USE_WINDOW: tl.constexpr,
    USE_SOFTCAP: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    LOOP_WHILE: tl.constexpr,
    ROUND_Q: tl.constexpr = False,
):
    """One (query tile, sequence, head): online-softmax flash attention over the keys that
    any row of the tile can see (ROUND_Q: as in `_decode_kernel`)."""
    tile = tl.program_id(0)
    b = tl.program_id(1)
    head = tl.program_id(2)
    kv_head = head // GROUP

    q_start = tl.load(query_start_ptr + b)
    q_len = tl.load(query_start_ptr + b + 1) - q_start
    if tile * BLOCK_M >= q_len:
        return
    seq_len = tl.load(seq_lens_ptr + b)
    offs_m = tile * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mask_m = offs_m < q_len
    mask_d = offs_d < HEAD_DIM
    rows = (q_start + offs_m).to(tl.int64)
    q = tl.load(
        q_ptr + rows[:, None] * stride_qt + head * stride_qh + offs_d[None, :],
        mask=mask_m[:, None] & mask_d[None, :],
        other=0.0,
    )
    if ROUND_Q:
        q = q.to(k_ptr.dtype.element_ty)
    q_pos = seq_len - q_len + offs_m  # queries are the last q_len positions

    # Keys any valid row of the tile can see: [lo, hi).
    first_pos = seq_len - q_len + tile * BLOCK_M
    last_pos = seq_len - q_len + tl.minimum(tile * BLOCK_M + BLOCK_M, q_len) - 1
    hi = seq_len
    if IS_CAUSAL:
        hi = last_pos + 1
    lo = 0
    if USE_WINDOW:
        lo = tl.maximum(first_pos - window + 1, 0)

    block_table_row = block_tables_ptr + b.to(tl.int64) * stride_bt
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    m_i, l_i, acc = _attend_range(
        q, q_pos, m_i, l_i, acc, lo, hi, k_ptr, v_ptr, block_table_row, kv_head, offs_d, stride_kb,
        stride_kt, stride_kh, stride_vb, stride_vt, stride_vh, scale, softcap, window, HEAD_DIM,
        BLOCK_D, BLOCK_SIZE, BLOCK_N, IS_CAUSAL, USE_WINDOW, USE_SOFTCAP, DOT_PRECISION, LOOP_WHILE,
    )

    o = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    out = out_ptr + rows[:, None] * stride_ot + head * stride_oh + offs_d[None, :]
    tl.store(out, o.to(out_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_d[None, :])


# fmt: on


# --------------------------------------------------------------------------------------------
# Launchers
# --------------------------------------------------------------------------------------------


def _check_inputs(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    sliding_window: int | None,
) -> None:
    if q.device.type != "cuda" and not INTERPRET:
        raise ValueError(f"Triton attention needs CUDA tensors (or TRITON_INTERPRET=1): {q.device}")
    for t in (k_cache, v_cache, block_tables, seq_lens):
        if t.device != q.device:
            raise ValueError(f"all tensors must be on q's device {q.device}, got {t.device}")
    check_paged_shapes(q, k_cache, v_cache, block_tables, seq_lens)
    if q.dtype not in _DTYPES or k_cache.dtype not in _DTYPES or v_cache.dtype not in _DTYPES:
        raise ValueError(f"unsupported dtypes {q.dtype}, {k_cache.dtype}, {v_cache.dtype}")
    if q.stride(2) != 1 or k_cache.stride(3) != 1 or v_cache.stride(3) != 1:
        raise ValueError("q and the caches need a contiguous last (head_dim) dimension")
    if block_tables.stride(1) != 1 or seq_lens.stride(0) != 1:
        raise ValueError("block_tables need contiguous rows and seq_lens a contiguous vector")
    if sliding_window is not None and sliding_window < 1:
        raise ValueError(f"sliding_window must be >= 1 or None, got {sliding_window}")


def _check_out(out: torch.Tensor | None, q: torch.Tensor) -> torch.Tensor:
    if out is None:
        return torch.empty_like(q, memory_format=torch.contiguous_format)
    if out.shape != q.shape or out.dtype != q.dtype or out.device != q.device or out.stride(2) != 1:
        raise ValueError(
            f"out must be {tuple(q.shape)} {q.dtype} on {q.device} with contiguous rows, "
            f"got {tuple(out.shape)} {out.dtype}"
        )
    return out


def _dot_precision(dtype: torch.dtype) -> str:
    # fp32 must match the reference to ~1e-6; TF32 would round operands to 10 mantissa bits
    if dtype == torch.float32:
        return "ieee"
    return "bf16-as-fp32" if INTERPRET and dtype == torch.bfloat16 else "tf32"


@functools.cache
def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4  # interpreter: a few splits, so that tests exercise the merge


# Keys a tile of the decode kernel at 16 or more splits when the caller gives no tile (the
# graphs at their split cap: one sequence past 2048 keys, batches past 512; eager decode):
# 16, from an H100 sweep at short contexts, where a split holds about one tile; where a split
# walks many (four sequences after 4096 tokens, ~8 tiles a split) 32- and 64-key tiles were
# no faster (0.961x, 0.998x; benchmarks/RESULTS.md, thirty-fourth session).
SPLIT_TILE = 16


def _decode_block_n(head_dim: int, num_splits: int = 1) -> int:
    """Keys per tile of the decode kernel. H100 sweep (benchmarks/kernels/tune_decode.py, one
    query, 128-2048 keys): with many splits, 16-key tiles (about one per split at short
    contexts) are best (`SPLIT_TILE`); head dims over 128 take 16 always (32 was 11-30x
    slower for Gemma's 256); few splits (large batches) walk long runs of keys in 64-key
    tiles."""
    if INTERPRET or head_dim > 128:
        return 16  # (the interpreter: small tests still cross tiles and splits)
    return SPLIT_TILE if num_splits >= 16 else 64


def decode_tiles(block_n: int | None) -> tuple[int, int, int] | None:
    """The decode kernel's (BLOCK_N, num_warps, num_stages) for a tile of `block_n` keys
    (`AttentionMetadata.decode_tile`), None for the kernel's own rule. Four warps: with two /
    one the graphs' one-tile splits ran slower (H200, tg128, `gpu_ab.py`: 1B Q4_0 0.962x /
    0.968x, SmolLM2 Q4_0 0.935x / 0.951x; thirty-fifth session, a lab setting since removed)."""
    return None if block_n is None else (block_n, 4, 1)


# The decode kernel loads each tile's V with its K (`_attend_tile`'s EARLY_V). H200, fused
# decode attention at 32 splits of 16 keys, B=1 (.gpu/earlyv_sweep.py): SmolLM2 heads
# 6.03 -> 5.87-5.93 us a call at 64-256 keys, Llama-3.2-1B heads 6.38-6.54 -> 6.13-6.19;
# SmolLM2 Q4_0 tg128 1470 / 1468 -> 1497 / 1494 t/s.
DECODE_EARLY_V = True

# In a fused decode step whose splits hold one key tile each (`rope_cache_attention_decode`'s
# one_tile: the decode graphs cut by length), the kernel reads that tile, the length, the
# slot and the rotation before its PDL wait (`_decode_kernel`'s EARLY_TILE): only q and the
# new key and value wait for the QKV product. H200, tg128 from one token (`gpu_ab.py`,
# three rounds): Llama-3.2-1B shape Q4_0 1805.2 -> 1862.4 t/s (1.032x), Q4_1 1786.7 -> 1834.7
# (1.027x), SmolLM2-135M shape Q4_0 2146.1 -> 2296.3 (1.070x); benchmarks/RESULTS.md,
# thirty-third session.
# `LLAMAPY_GPU_DECODE_EARLY_TILE=0` reads everything after the wait, for A/B.
DECODE_EARLY_TILE = not switched_off("LLAMAPY_GPU_DECODE_EARLY_TILE")


# A decode program's query heads (GROUP of them, the rows of its tiles) take both products as
# broadcast multiplies and sums (`_attend_tile`'s USE_DOT False) when a product's
# BLOCK_G x BLOCK_N x BLOCK_D elements are at most this many and q stays float32 (small
# batches): `tl.dot` pads the rows to 16 and moves its operands through shared memory, which
# at one 16-key tile a split is most of a program's latency. H200, B=1, 32 splits (per-program
# %globaltimer stamps, `.gpu/attn_timing.py`): the program holding the new key at 64 keys
# 3.17 -> 3.06 us (SmolLM2 heads), 3.47 -> 3.22 (Llama-3.2-1B); at 512 keys 3.24 -> 3.15,
# 4.98 -> 4.04; tg128 SmolLM2 Q4_0 1582 / 1585 -> 1602 / 1600 t/s, 1B Q4_0 1225 -> 1229 /
# 1230. 0 turns it off.
DECODE_FMA_MAX = 8192


def _decode_rows(group: int, block_n: int, block_d: int, round_q: bool) -> tuple[int, bool]:
    """(BLOCK_G, USE_DOT) of the decode kernel: the query heads a program takes, padded to
    a power of two (to 16 for `tl.dot`)."""
    rows = triton.next_power_of_2(group)
    if not round_q and rows * block_n * block_d <= DECODE_FMA_MAX:
        return rows, False
    return max(16, rows), True


# A decode program's query heads and warps by the model's group (query heads a KV head),
# where its products are multiplies and sums (small batches); other groups, one program a
# KV head (its GROUP heads the rows of one tile, four warps). H200, tg128 from one token
# (`gpu_ab.py`, two rounds; benchmarks/RESULTS.md, thirty-sixth session): SmolLM2 (group 3,
# padded to 4 rows) with a program a head on one warp 2262.0 -> 2402.1 t/s (1.062x; 1.063x
# in an earlier call); Llama-3.2-1B (group 4) with two heads on one warp 1874.5 -> 1905.9
# (1.017x; in the step's profile at 64 keys the attention's link 5.65 -> 4.59 us), a head on
# one warp 0.948x / 0.940x (its link 9.17 us), two heads on two warps 1.006x. What made one
# head a program lose on the 1B (256 one-warp programs at 8 splits) is not known: capping
# QKV's registers at 128 (154: three of its programs fill an SM's registers; capped, each SM
# has room for the attention's programs beside them under PDL) made the link longer still
# (7.88 us with two heads a program; tg128 0.944x, removed).
DECODE_HEADS_DEFAULT: dict[int, tuple[int, int]] = {3: (1, 1), 4: (2, 1)}
# The default applies to heads this wide at most (both models measured have 64; a 128-wide
# head on one warp holds twice the tile a thread, unmeasured).
DECODE_HEADS_MAX_DIM = 64


def _decode_heads(env: str | None) -> dict[int, tuple[int, int]] | tuple[int, int]:
    """LLAMAPY_GPU_DECODE_HEADS (a lab setting): unset, `DECODE_HEADS_DEFAULT`; off, none
    ({}); "HEADS,WARPS" (1, 2 or 4 each), those for every group they divide; anything else
    keeps the default, said once."""
    value = (env or "").strip().lower()
    if value in OFF_VALUES:
        return {}
    parts = [v.strip() for v in value.split(",")]
    if len(parts) == 2 and all(v in ("1", "2", "4") for v in parts):
        return int(parts[0]), int(parts[1])
    if value:
        logger.warning("LLAMAPY_GPU_DECODE_HEADS=%r is neither off nor 'HEADS,WARPS' (1, 2 or "
                       "4 each): the default", env)  # fmt: skip
    return dict(DECODE_HEADS_DEFAULT)


DECODE_HEADS = _decode_heads(os.environ.get("LLAMAPY_GPU_DECODE_HEADS"))


def _program_heads(group: int, head_dim: int) -> tuple[int, int] | None:
    """(query heads, warps) of a decode program of the FMA path for a model's group and head
    dim, or None for one program a KV head (`DECODE_HEADS`; its default up to
    `DECODE_HEADS_MAX_DIM`)."""
    if isinstance(DECODE_HEADS, dict):
        heads = DECODE_HEADS.get(group) if head_dim <= DECODE_HEADS_MAX_DIM else None
    else:
        heads = DECODE_HEADS
    if heads is None or heads[0] >= group or group % heads[0]:
        return None
    return heads


def _merge_in_gemv_max(env: str | None, default: int = 8) -> int:
    value = (env or "").strip().lower()
    if value in OFF_VALUES:
        return 0
    if value.isdigit():
        return int(value)
    if value:  # anything else keeps the default, said once
        logger.warning("LLAMAPY_GPU_MERGE_IN_GEMV=%r is neither off nor a split count: "
                       "the default %d", env, default)  # fmt: skip
    return default


# A decode step whose attention has at most this many key splits leaves them unmerged for
# the output projection's GEMV, which merges them while loading its x (`DecodeSplits`,
# `qmatmul`'s merge prologue): no merge launch a layer. `LLAMAPY_GPU_MERGE_IN_GEMV=0` merges
# in the attention's own launch always; a number sets the bound. See benchmarks/RESULTS.md
# (thirty-first session).
MERGE_IN_GEMV_MAX_SPLITS = _merge_in_gemv_max(os.environ.get("LLAMAPY_GPU_MERGE_IN_GEMV"))


def combine_splits(part_o: torch.Tensor, part_lse: torch.Tensor, out: torch.Tensor) -> None:
    """Merge a decode's key splits (`DecodeSplits`) into out (B, n_heads, d)."""
    batch, n_heads, num_splits, d = part_o.shape
    block_d = triton.next_power_of_2(d)
    pdl_on = pdl.pdl_enabled(out.device)
    _combine_kernel[(batch, n_heads)](
        part_o, part_lse, out, out.stride(0), out.stride(1),
        HEAD_DIM=d, BLOCK_D=block_d, NUM_SPLITS=num_splits,
        BLOCK_S=triton.next_power_of_2(num_splits), **pdl.launch_options(pdl_on),
        num_warps=4 if block_d <= 128 else 8,
    )  # fmt: skip


def default_num_splits(
    batch: int, n_kv: int, max_blocks: int, block_size: int, head_dim: int, device: torch.device
) -> int:
    """Splits per (sequence, KV head) for decode, from shapes only (CUDA-graph safe): enough
    programs for about two waves over the GPU, no more splits than key tiles in the
    block-table capacity."""
    programs = batch * n_kv
    wanted = triton.cdiv(2 * _num_sms(device), programs)
    capacity_tiles = triton.cdiv(max_blocks * block_size, _decode_block_n(head_dim))
    return max(1, min(wanted, capacity_tiles, 64))


def paged_attention_decode(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    *,
    scale: float,
    sliding_window: int | None = None,
    softcap: float | None = None,
    num_splits: int | None = None,
    out: torch.Tensor | None = None,
    tiles: tuple[int, int, int] | None = None,
    round_q: bool = False,
) -> torch.Tensor:
    """Flash-decoding: q (B, n_heads, d), one query per sequence at position seq_lens[b] - 1,
    -> (B, n_heads, d) in q's dtype. Graph-capturable: launches depend on shapes only.
    tiles: (BLOCK_N, num_warps, num_stages) of the split kernel (the tuner's hook).
    round_q: a float32 q over a 16-bit cache is rounded to the cache's type for the dots
    (tensor cores instead of float32 FMA dots; `_decode_kernel`)."""
    _check_inputs(q, k_cache, v_cache, block_tables, seq_lens, sliding_window)
    return _decode(q, k_cache, v_cache, block_tables, seq_lens, scale, sliding_window, softcap,
                   num_splits, out, tiles, round_q, {}, False, False)  # fmt: skip


def rope_cache_attention_decode(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    slot_mapping: torch.Tensor,
    *,
    interleaved: bool,
    scale: float,
    sliding_window: int | None = None,
    softcap: float | None = None,
    num_splits: int | None = None,
    out: torch.Tensor | None = None,
    tiles: tuple[int, int, int] | None = None,
    round_q: bool = False,
    defer_merge: bool = False,
    one_tile: bool = False,
) -> torch.Tensor | DecodeSplits:
    """A decode step's attention in one kernel (two with split merging): the result of
    `rotary.rotary_and_cache(q, k, v, cos, sin, k_cache, v_cache, slot_mapping)` followed by
    `paged_attention_decode` over the rotated q, without the rotary launch. q (B, n_heads,
    d), k (B, n_kv, d), v (B, n_kv, d): this step's projections, one token per sequence at
    position seq_lens[b] - 1, whose slot is slot_mapping[b] (< 0: not stored; a sequence of
    length 0 stores nothing). The caches are written as the rotary kernel writes them.
    defer_merge: with 2 to MERGE_IN_GEMV_MAX_SPLITS key splits, return them unmerged
    (`DecodeSplits`, for a GEMV that merges them as it loads x). one_tile: a hint that each
    split holds at most one tile of keys (the decode graphs cut by length: `tiles` given);
    the kernel then reads that tile before its PDL wait (correct either way)."""
    op = "rope_cache_attention_decode"
    _check_inputs(q, k_cache, v_cache, block_tables, seq_lens, sliding_window)
    rot_dim = rotary.check_rope(op, q, k, cos, sin)
    rotary.check_cache(op, k, v, k_cache, v_cache, slot_mapping)
    if k.shape[0] != block_tables.shape[0] or v.shape[-1] != q.shape[-1]:
        raise ValueError(
            f"{op}: k {tuple(k.shape)} and v {tuple(v.shape)} need one row per sequence "
            f"({block_tables.shape[0]}) and q's head dim ({q.shape[-1]})"
        )
    new_kv = dict(
        new_k_ptr=k, new_v_ptr=v, cos_ptr=cos, sin_ptr=sin, slot_ptr=slot_mapping,
        stride_nkb=k.stride(0), stride_nkh=k.stride(1), stride_nvb=v.stride(0),
        stride_nvh=v.stride(1), stride_cb=cos.stride(0), stride_sb=sin.stride(0),
        NEW_KV=True, ROT_HALF=rot_dim // 2, INTERLEAVED=interleaved,
    )  # fmt: skip
    return _decode(q, k_cache, v_cache, block_tables, seq_lens, scale, sliding_window, softcap,
                   num_splits, out, tiles, round_q, new_kv, defer_merge, one_tile)  # fmt: skip


def _decode(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    sliding_window: int | None,
    softcap: float | None,
    num_splits: int | None,
    out: torch.Tensor | None,
    tiles: tuple[int, int, int] | None,
    round_q: bool,
    new_kv: dict,
    defer_merge: bool,
    one_tile: bool,
) -> torch.Tensor | DecodeSplits:
    if q.shape[0] != block_tables.shape[0]:
        raise ValueError(
            f"decode takes one query per sequence: q has {q.shape[0]} rows, "
            f"block_tables {block_tables.shape[0]}"
        )
    out = _check_out(out, q)
    batch, n_heads, d = q.shape
    n_kv, block_size = k_cache.shape[2], k_cache.shape[1]
    group = n_heads // n_kv
    if num_splits is None:
        num_splits = default_num_splits(batch, n_kv, block_tables.shape[1], block_size, d, q.device)
    if num_splits < 1:
        raise ValueError(f"num_splits must be >= 1, got {num_splits}")
    block_d = triton.next_power_of_2(d)
    if batch == 0:
        return out
    round_q = _rounds_q(round_q, q, k_cache)
    block_n, warps, stages = tiles or (_decode_block_n(d, num_splits), 4, 1)
    block_g, use_dot = _decode_rows(group, block_n, block_d, round_q)
    heads = 0
    program_heads = None if use_dot else _program_heads(group, d)
    if program_heads is not None:
        heads, warps = program_heads
        block_g = heads
    # Workspace from shapes only; unused (never read) when there is a single split.
    ws_splits = num_splits if num_splits > 1 else 0
    part_o = torch.empty(batch, n_heads, ws_splits, d, dtype=torch.float32, device=q.device)
    part_lse = torch.empty(batch, n_heads, ws_splits, dtype=torch.float32, device=q.device)
    pdl_on = pdl.pdl_enabled(q.device)
    # fmt: off
    _decode_kernel[(batch, n_heads // heads if heads else n_kv, num_splits)](
        q, k_cache, v_cache, block_tables, seq_lens, out, part_o, part_lse,
        float(scale), float(softcap or 1.0), int(sliding_window or 0),
        q.stride(0), q.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        out.stride(0), out.stride(1), block_tables.stride(0),
        HEAD_DIM=d, BLOCK_D=block_d, GROUP=group, BLOCK_G=block_g,
        BLOCK_SIZE=block_size, BLOCK_N=block_n, NUM_SPLITS=num_splits,
        USE_WINDOW=sliding_window is not None, USE_SOFTCAP=bool(softcap),
        DOT_PRECISION=_dot_precision(k_cache.dtype if round_q else q.dtype),
        LOOP_WHILE=INTERPRET, ROUND_Q=round_q, **pdl.launch_options(pdl_on), **new_kv,
        EARLY_V=DECODE_EARLY_V, USE_DOT=use_dot,
        EARLY_TILE=bool(new_kv) and one_tile and DECODE_EARLY_TILE, HEADS=heads,
        num_warps=warps, num_stages=stages,
    )
    # fmt: on
    if num_splits > 1:
        splits = DecodeSplits(part_o, part_lse, out)
        if defer_merge and num_splits <= MERGE_IN_GEMV_MAX_SPLITS:
            return splits
        splits.merged()
    return out


def _prefill_config(head_dim: int, dtype: torch.dtype) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages): H100 tiles as Triton's fused-attention
    tutorial picks them, that compile without register spills (checked with ptxas)."""
    if INTERPRET:
        return 16, 16, 4, 1
    if dtype == torch.float32:  # IEEE fp32 dots run on FMA units: small tiles
        return 32, 32, 8, 2
    if head_dim <= 64:
        return 128, 64, 4, 3
    if head_dim <= 128:
        return 128, 64, 8, 3
    return 64, 32, 8, 2


# A decode batch of this many sequences rounds float32 queries to the cache's 16-bit type:
# the float32 FMA dots are compute-bound there (Llama-3.2-1B shape at 64 sequences: 85 us
# per layer on an H200, a third of the step); a single sequence is latency-bound either way.
ROUND_Q_MIN_BATCH = 16
# Prefill rounds float32 queries too: its float32 tiles are small FMA dots (`_prefill_config`).
ROUND_Q_PREFILL = True


def _rounds_q(round_q: bool, q: torch.Tensor, k_cache: torch.Tensor) -> bool:
    """Whether `round_q` applies: a float32 q over a float16 / bfloat16 cache."""
    return round_q and q.dtype == torch.float32 and k_cache.dtype in (torch.float16, torch.bfloat16)


def paged_attention_prefill(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    query_start_loc: torch.Tensor,
    max_query_len: int,
    *,
    scale: float,
    sliding_window: int | None = None,
    softcap: float | None = None,
    causal: bool = True,
    out: torch.Tensor | None = None,
    round_q: bool = False,
) -> torch.Tensor:
    """Varlen flash attention: q (T, n_heads, d), sequence b's queries at rows
    query_start_loc[b]:query_start_loc[b+1] and positions seq_len - q_len .. seq_len - 1,
    -> (T, n_heads, d) in q's dtype. `max_query_len` (host int) bounds every q_len.
    round_q: as in `paged_attention_decode`."""
    _check_inputs(q, k_cache, v_cache, block_tables, seq_lens, sliding_window)
    batch = block_tables.shape[0]
    if query_start_loc.shape != (batch + 1,) or query_start_loc.dtype != torch.int32:
        raise ValueError(
            f"query_start_loc must be ({batch + 1},) int32, got "
            f"{tuple(query_start_loc.shape)} {query_start_loc.dtype}"
        )
    out = _check_out(out, q)
    n_heads, d = q.shape[1], q.shape[2]
    if batch == 0 or q.shape[0] == 0 or max_query_len <= 0:
        return out
    round_q = _rounds_q(round_q, q, k_cache)
    dot_dtype = k_cache.dtype if round_q else q.dtype
    block_m, block_n, num_warps, num_stages = _prefill_config(d, dot_dtype)
    grid = (triton.cdiv(max_query_len, block_m), batch, n_heads)
    # fmt: off
    _prefill_kernel[grid](
        q, k_cache, v_cache, block_tables, seq_lens, query_start_loc.contiguous(), out,
        float(scale), float(softcap or 1.0), int(sliding_window or 0),
        q.stride(0), q.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        out.stride(0), out.stride(1), block_tables.stride(0),
        HEAD_DIM=d, BLOCK_D=triton.next_power_of_2(d), GROUP=n_heads // k_cache.shape[2],
        BLOCK_SIZE=k_cache.shape[1], BLOCK_M=block_m, BLOCK_N=block_n,
        IS_CAUSAL=causal, USE_WINDOW=sliding_window is not None, USE_SOFTCAP=bool(softcap),
        DOT_PRECISION=_dot_precision(dot_dtype), LOOP_WHILE=INTERPRET, ROUND_Q=round_q,
        num_warps=num_warps, num_stages=num_stages,
    )
    # fmt: on
    return out


def paged_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    meta: AttentionMetadata,
    *,
    scale: float,
    sliding_window: int | None = None,
    softcap: float | None = None,
    causal: bool = True,
) -> torch.Tensor:
    """Same signature and result as `llamapy.layers.attention.paged_attention`: decode kernel
    when every sequence brings one query (host values only), varlen prefill otherwise."""
    is_decode = meta.max_query_len == 1 and q.shape[0] == meta.block_tables.shape[0]
    if is_decode:
        # One query at the last position sees the same keys causal or not.
        return paged_attention_decode(
            q,
            k_cache,
            v_cache,
            meta.block_tables,
            meta.seq_lens,
            scale=scale,
            sliding_window=sliding_window,
            softcap=softcap,
            num_splits=meta.decode_splits,
            tiles=decode_tiles(meta.decode_tile),
            round_q=q.shape[0] >= ROUND_Q_MIN_BATCH,
        )
    return paged_attention_prefill(
        q,
        k_cache,
        v_cache,
        meta.block_tables,
        meta.seq_lens,
        meta.query_start_loc,
        meta.max_query_len,
        scale=scale,
        sliding_window=sliding_window,
        softcap=softcap,
        causal=causal,
        round_q=ROUND_Q_PREFILL,
    )


__all__ = [
    "default_num_splits",
    "paged_attention",
    "paged_attention_decode",
    "paged_attention_prefill",
    "rope_cache_attention_decode",
]
