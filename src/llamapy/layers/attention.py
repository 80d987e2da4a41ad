"""Attention over a paged KV cache: metadata, cache writes, and the torch reference op."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from llamapy.kernels.triton.decode_splits import DecodeSplits
    from llamapy.layers.rotary import RotaryEmbedding


@dataclass(frozen=True, slots=True)
class AttentionMetadata:
    """Where a flattened batch's tokens sit in the paged KV cache.

    The batch holds `B` sequences whose new tokens are concatenated: sequence `b` owns
    tokens `query_start_loc[b]:query_start_loc[b+1]` and, after this step, `seq_lens[b]`
    tokens in total, the first `seq_lens[b] - query_len` of them already cached.
    """

    slot_mapping: torch.Tensor  # (T,) int64: block * block_size + offset of each new token
    block_tables: torch.Tensor  # (B, max_blocks) int32
    seq_lens: torch.Tensor  # (B,) int32
    query_start_loc: torch.Tensor  # (B + 1,) int32, cu_seqlens_q
    max_query_len: int
    max_seq_len: int
    # Host copies for loops in the CPU reference path (no device sync needed).
    seq_lens_host: tuple[int, ...] = ()
    query_start_loc_host: tuple[int, ...] = ()
    # Key splits of the CUDA decode kernel (None: from shapes); a captured decode step
    # fixes it per graph from the batch's longest sequence.
    decode_splits: int | None = None
    # Keys a tile of the CUDA decode kernel (None: its rule from the split count); a
    # captured step of a small batch whose splits its longest sequence cut sets it
    # (`engine.model_runner.graph_decode_tile`).
    decode_tile: int | None = None
    # One query per sequence, attended by `decode_attention_dense` from the tensors alone
    # (the CPU's compiled decode step: models/cpu_compile.py).
    dense_decode: bool = False

    @property
    def num_seqs(self) -> int:
        return len(self.seq_lens_host)


def check_paged_shapes(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    batch: int | None = None,
) -> None:
    """The shape rules every paged attention kernel shares (each adds its own device, dtype
    and layout rules): q (T, n_heads, d), caches (blocks, block_size, n_kv, d) of one shape,
    n_heads a multiple of n_kv, block_tables (B, width) int32, seq_lens (B,) int32; `batch`:
    B must be that."""
    if q.dim() != 3 or k_cache.dim() != 4 or k_cache.shape != v_cache.shape:
        raise ValueError(
            f"expected q (T, n_heads, d) and caches (blocks, block_size, n_kv, d), got "
            f"{tuple(q.shape)}, {tuple(k_cache.shape)}, {tuple(v_cache.shape)}"
        )
    if k_cache.shape[3] != q.shape[2]:
        raise ValueError(f"head dims differ: q {q.shape[2]}, caches {k_cache.shape[3]}")
    if q.shape[1] % k_cache.shape[2]:
        raise ValueError(f"n_heads {q.shape[1]} is not a multiple of n_kv {k_cache.shape[2]}")
    b = block_tables.shape[0] if batch is None else batch
    if block_tables.dim() != 2 or block_tables.shape[0] != b or block_tables.dtype != torch.int32:
        raise ValueError(
            f"block_tables must be ({b}, max_blocks) int32, got {tuple(block_tables.shape)} "
            f"{block_tables.dtype}"
        )
    if seq_lens.shape != (b,) or seq_lens.dtype != torch.int32:
        raise ValueError(
            f"seq_lens must be ({b},) int32, got {tuple(seq_lens.shape)} {seq_lens.dtype}"
        )


def write_kv(
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    """Store new keys/values (T, n_kv, d) at their slots of the (blocks, block_size, n_kv, d)
    caches."""
    k_cache.view(-1, *k_cache.shape[2:])[slot_mapping] = k.to(k_cache.dtype)
    v_cache.view(-1, *v_cache.shape[2:])[slot_mapping] = v.to(v_cache.dtype)


def rope_and_write_kv(
    rope: RotaryEmbedding,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cos_sin: tuple[torch.Tensor, torch.Tensor],
    kv_cache: tuple[torch.Tensor, torch.Tensor],
    slot_mapping: torch.Tensor,
) -> torch.Tensor:
    """Rotate q and k by `rope`, store k and v at their cache slots; return the rotated q.
    One fused kernel on CUDA."""
    if q.is_cuda:
        from llamapy.kernels.triton.rotary import rotary_and_cache

        return rotary_and_cache(
            q, k, v, *cos_sin, *kv_cache, slot_mapping, interleaved=rope.interleaved
        )
    q, k = rope.apply_pair(q, k, *cos_sin)
    write_kv(*kv_cache, k, v, slot_mapping)
    return q


# CUDA decode fuses the rotary embedding and the cache write into the attention kernel
# (`rope_kv_attention`); tests and benchmarks switch it off to compare.
FUSED_ROPE_DECODE = True
# That kernel takes CUDA tensors; model tests set this to run it on the CPU too, in Triton's
# interpreter (TRITON_INTERPRET=1), so that CI checks the CUDA decode step's wiring.
TRITON_DECODE_ON_CPU = False


def rope_kv_attention(
    rope: RotaryEmbedding,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cos_sin: tuple[torch.Tensor, torch.Tensor],
    kv_cache: tuple[torch.Tensor, torch.Tensor],
    meta: AttentionMetadata,
    *,
    scale: float,
    sliding_window: int | None = None,
    softcap: float | None = None,
    defer_merge: bool = False,
) -> torch.Tensor | DecodeSplits:
    """`rope_and_write_kv` then `paged_attention` (causal): q (T, n_heads, d), k and v (T,
    n_kv, d) -> (T, n_heads, d). A CUDA decode batch (one new token per sequence) runs it as
    one Triton kernel with the rotation and the cache write inside (`rope_cache_attention_
    decode`: a launch less a layer); everything else takes the two steps. defer_merge: that
    kernel's key splits may come back unmerged (`DecodeSplits`, for the output projection's
    GEMV to merge)."""
    is_decode = meta.max_query_len == 1 and q.shape[0] == meta.block_tables.shape[0]
    d = q.shape[-1]
    on_triton = q.is_cuda or TRITON_DECODE_ON_CPU
    if FUSED_ROPE_DECODE and on_triton and is_decode and d >= 16 and v.shape[-1] == d:
        from llamapy.kernels.triton import attention

        return attention.rope_cache_attention_decode(
            q, k, v, *cos_sin, *kv_cache, meta.block_tables, meta.seq_lens, meta.slot_mapping,
            interleaved=rope.interleaved, scale=scale, sliding_window=sliding_window,
            softcap=softcap, num_splits=meta.decode_splits,
            tiles=attention.decode_tiles(meta.decode_tile),
            round_q=q.shape[0] >= attention.ROUND_Q_MIN_BATCH, defer_merge=defer_merge,
            one_tile=meta.decode_tile is not None,
        )  # fmt: skip
    q = rope_and_write_kv(rope, q, k, v, cos_sin, kv_cache, meta.slot_mapping)
    return paged_attention(
        q, *kv_cache, meta, scale=scale, sliding_window=sliding_window, softcap=softcap
    )


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
    """q (T, n_heads, d) -> (T, n_heads, d_v) through the block tables: the Triton kernels on
    CUDA, the torch reference elsewhere (and for heads narrower than tl.dot's 16, which no
    real model has)."""
    if q.is_cuda and q.shape[-1] >= 16:
        from llamapy.kernels.triton import attention

        return attention.paged_attention(
            q,
            k_cache,
            v_cache,
            meta,
            scale=scale,
            sliding_window=sliding_window,
            softcap=softcap,
            causal=causal,
        )
    from llamapy.kernels.cpu import ggml_numerics

    if (numerics := ggml_numerics.active()) is not None:  # LLAMAPY_CPU_KERNELS=ggml
        return ggml_numerics.paged_attention_ggml(
            q,
            k_cache,
            v_cache,
            meta,
            scale=scale,
            sliding_window=sliding_window,
            softcap=softcap,
            causal=causal,
            numerics=numerics,
        )
    if softcap is None:
        return paged_attention_sdpa(
            q, k_cache, v_cache, meta, scale=scale, sliding_window=sliding_window, causal=causal
        )
    return paged_attention_reference(
        q,
        k_cache,
        v_cache,
        meta,
        scale=scale,
        sliding_window=sliding_window,
        softcap=softcap,
        causal=causal,
    )


def decode_attention_dense(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    meta: AttentionMetadata,
    *,
    scale: float,
    sliding_window: int | None = None,
    softcap: float | None = None,
) -> torch.Tensor:
    """One new token per sequence: store k, v (B, n_kv, d) at their slots, then attend q (B,
    n_heads, d) over every key of each sequence's block table row, the keys past `seq_lens`
    (and, with a window, those out of it) masked. Written in shape-static torch ops, with
    the host copies of the metadata unused, so that `torch.compile` can trace a decode step
    whose only varying size is the block tables' width (`models/cpu_compile.py`).

    The two products are written as broadcast multiplies and sums, not matmuls: Inductor
    turns them into C++ loops that read the cache blocks in place, where two `bmm` calls
    need the gathered keys and values materialized first (SmolLM2-135M, one compiled decode
    step, `benchmarks/kernels/bench_cpu_decode_step.py`: 9.60 -> 8.39 ms at 128 keys,
    15.9 -> 11.3 at 1024, 89.8 -> 19.8 at 4096). Past 256 tokens of context (block tables of
    `cpu_attention.MIN_BLOCKS` columns or more), where numba is (float32 CPU tensors), the
    attention after the write is one opaque op instead (kernels/cpu/attention.py), which
    reads each key and value row once for all the query heads that share it."""
    n_seqs, n_heads, d = q.shape
    n_kv = k_cache.shape[2]
    write_kv(k_cache, v_cache, k, v, meta.slot_mapping)
    from llamapy.kernels.cpu import attention as cpu_attention

    # long contexts: one opaque op (kernels/cpu/attention.py)
    if cpu_attention.supports(q, k_cache, v_cache, meta.block_tables):
        return cpu_attention.decode_attention(
            q,
            k_cache,
            v_cache,
            meta.block_tables,
            meta.seq_lens,
            scale=scale,
            sliding_window=sliding_window,
            softcap=softcap,
        )
    tables = meta.block_tables.long()
    keys = k_cache[tables].flatten(1, 2).to(q.dtype)  # (B, W * block_size, n_kv, d)
    values = v_cache[tables].flatten(1, 2).to(q.dtype)
    pos = torch.arange(keys.shape[1], device=q.device)[None, :]
    seq_lens = meta.seq_lens.long()[:, None]
    visible = pos < seq_lens  # (B, L)
    if sliding_window is not None:  # the query sits at seq_len - 1
        visible = visible & (pos > seq_lens - 1 - sliding_window)
    qg = q.view(n_seqs, n_kv, n_heads // n_kv, 1, d)
    keys = keys.permute(0, 2, 1, 3)[:, :, None]  # (B, n_kv, 1, L, d)
    scores = (qg * keys).sum(-1) * scale  # (B, n_kv, g, L)
    if softcap:
        scores = torch.tanh(scores / softcap) * softcap
    scores = scores.masked_fill(~visible[:, None, None, :], float("-inf"))
    probs = torch.softmax(scores.float(), dim=-1).to(q.dtype)
    out = (probs[..., None] * values.permute(0, 2, 1, 3)[:, :, None]).sum(-2)  # (B, n_kv, g, d)
    return out.reshape(n_seqs, n_heads, values.shape[-1])


def paged_attention_sdpa(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    meta: AttentionMetadata,
    *,
    scale: float,
    sliding_window: int | None = None,
    causal: bool = True,
) -> torch.Tensor:
    """The reference's result through torch's fused CPU attention (SDPA), one sequence at a
    time, with few ops: a decode step reads only the visible keys and needs no mask."""
    n_heads, n_kv = q.shape[1], k_cache.shape[2]
    block_size = k_cache.shape[1]
    out = torch.empty(q.shape[0], n_heads, v_cache.shape[-1], dtype=q.dtype, device=q.device)
    starts = meta.query_start_loc_host
    for b, seq_len in enumerate(meta.seq_lens_host):
        qs, qe = starts[b], starts[b + 1]
        n_q = qe - qs
        first = 0  # first key any query of this sequence can see
        if sliding_window is not None and causal:
            first = max(0, seq_len - n_q - sliding_window + 1)
        blocks = meta.block_tables[b, first // block_size : -(-seq_len // block_size)].long()
        lo = first - first // block_size * block_size
        n_k = seq_len - first
        k = k_cache[blocks].flatten(0, 1)[lo : lo + n_k].to(q.dtype)  # (L, n_kv, d)
        v = v_cache[blocks].flatten(0, 1)[lo : lo + n_k].to(q.dtype)
        if n_q == 1 and causal:  # decode: every gathered key is visible; grouped bmm
            qg = q[qs].view(n_kv, n_heads // n_kv, -1)  # (n_kv, g, d)
            scores = torch.bmm(qg, k.permute(1, 2, 0)) * scale  # (n_kv, g, L)
            probs = torch.softmax(scores.float(), dim=-1).to(q.dtype)
            out[qs] = torch.bmm(probs, v.transpose(0, 1)).view(n_heads, -1)
            continue
        # 4-D inputs take torch's fused CPU kernel (3-D ones the math path: 3-5x slower at
        # 512 tokens); the square causal case needs no mask tensor at all
        mask, is_causal = None, False
        if causal and sliding_window is None and n_k == n_q:
            is_causal = True
        elif causal or sliding_window is not None:
            q_pos = torch.arange(seq_len - n_q, seq_len, device=q.device)[:, None]
            k_pos = torch.arange(first, seq_len, device=q.device)[None, :]
            mask = k_pos <= q_pos if causal else torch.ones_like(k_pos <= q_pos)
            if sliding_window is not None:
                mask = mask & (q_pos - k_pos < sliding_window)
        o = torch.nn.functional.scaled_dot_product_attention(
            q[None, qs:qe].transpose(1, 2),  # (1, n_heads, Tq, d)
            k[None].transpose(1, 2),
            v[None].transpose(1, 2),
            attn_mask=mask,
            is_causal=is_causal,
            scale=scale,
            enable_gqa=n_heads != n_kv,
        )
        out[qs:qe] = o[0].transpose(0, 1)
    return out


def paged_attention_reference(
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
    """Torch reference: q (T, n_heads, d) -> (T, n_heads, d_v), reading K/V through block
    tables. Causal (with the cached prefix visible), GQA, optional sliding window as
    llama.cpp's LLAMA_SWA_TYPE_STANDARD (key visible while q_pos - k_pos < window), optional
    logit soft-capping (tanh(s / c) * c)."""
    n_heads, n_kv = q.shape[1], k_cache.shape[2]
    group = n_heads // n_kv
    block_size = k_cache.shape[1]
    out = torch.empty(q.shape[0], n_heads, v_cache.shape[-1], dtype=q.dtype, device=q.device)
    starts = meta.query_start_loc_host
    for b, seq_len in enumerate(meta.seq_lens_host):
        qs, qe = starts[b], starts[b + 1]
        n_blocks = -(-seq_len // block_size)
        blocks = meta.block_tables[b, :n_blocks].long()
        k = k_cache[blocks].flatten(0, 1)[:seq_len].to(q.dtype)  # (L, n_kv, d)
        v = v_cache[blocks].flatten(0, 1)[:seq_len].to(q.dtype)
        qb = q[qs:qe].view(qe - qs, n_kv, group, -1)  # (Tq, n_kv, g, d)
        scores = torch.einsum("qhgd,khd->hgqk", qb, k) * scale  # (n_kv, g, Tq, L)
        if softcap:
            scores = torch.tanh(scores / softcap) * softcap
        q_pos = torch.arange(seq_len - (qe - qs), seq_len, device=q.device)[:, None]
        k_pos = torch.arange(seq_len, device=q.device)[None, :]
        visible = k_pos <= q_pos if causal else torch.ones_like(k_pos <= q_pos)
        if sliding_window is not None:
            visible = visible & (q_pos - k_pos < sliding_window)
        scores = scores.masked_fill(~visible, float("-inf"))
        probs = torch.softmax(scores.float(), dim=-1).to(q.dtype)
        out[qs:qe] = torch.einsum("hgqk,khd->qhgd", probs, v).reshape(qe - qs, n_heads, -1)
    return out
