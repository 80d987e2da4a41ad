"""A flattened, padding-free batch of whole sequences for one encoder (or embedding) pass.

The sequences' tokens are concatenated; `AttentionMetadata` says where each one starts. Every
sequence is computed whole in one pass, so K/V need no cache across steps: a scratch cache
with each sequence in its own contiguous blocks is enough, and every layer reuses it (layer
i's keys are read before layer i+1 writes its own).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from llamapy.layers.attention import AttentionMetadata

SCRATCH_BLOCK_SIZE = 16


@dataclass(frozen=True, slots=True)
class EncoderInput:
    """One sequence to encode: token ids and, for a sentence pair, BERT token types."""

    token_ids: list[int]
    token_type_ids: list[int] | None = None

    def __len__(self) -> int:
        return len(self.token_ids)


@dataclass(frozen=True, slots=True)
class FlatBatch:
    input_ids: torch.Tensor  # (T,) int64
    positions: torch.Tensor  # (T,) int64, 0-based within each sequence
    token_type_ids: torch.Tensor | None  # (T,) int64, or None: all type 0
    meta: AttentionMetadata
    seq_lens: tuple[int, ...]
    num_blocks: int  # scratch cache blocks the batch needs

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.shape[0])


def flatten(
    inputs: Sequence[EncoderInput],
    device: torch.device,
    block_size: int = SCRATCH_BLOCK_SIZE,
) -> FlatBatch:
    """Concatenate whole sequences; sequence b's tokens go to scratch blocks of its own."""
    lens = [len(x) for x in inputs]
    if not lens or min(lens) == 0:
        raise ValueError("every sequence of a batch needs at least one token")
    lens_t = torch.tensor(lens, dtype=torch.long)
    starts = torch.cumsum(lens_t, 0) - lens_t
    seq_of_token = torch.repeat_interleave(torch.arange(len(lens)), lens_t)
    positions = torch.arange(int(lens_t.sum())) - starts[seq_of_token]
    blocks_per_seq = (lens_t + block_size - 1) // block_size
    first_block = torch.cumsum(blocks_per_seq, 0) - blocks_per_seq
    slot_mapping = first_block[seq_of_token] * block_size + positions
    max_blocks = int(blocks_per_seq.max())
    block_tables = first_block[:, None] + torch.arange(max_blocks)[None, :]
    # rows past a sequence's own blocks are never read; keep them in range
    num_blocks = int(blocks_per_seq.sum())
    block_tables = block_tables.clamp(max=num_blocks - 1)
    qsl = [0, *torch.cumsum(lens_t, 0).tolist()]
    ids = torch.tensor([t for x in inputs for t in x.token_ids], dtype=torch.long)
    types = None
    if any(x.token_type_ids is not None for x in inputs):
        types = torch.tensor(
            [t for x in inputs for t in (x.token_type_ids or [0] * len(x))], dtype=torch.long
        )
    meta = AttentionMetadata(
        slot_mapping=slot_mapping.to(device),
        block_tables=block_tables.to(device, torch.int32),
        seq_lens=lens_t.to(device, torch.int32),
        query_start_loc=torch.tensor(qsl, dtype=torch.int32, device=device),
        max_query_len=max(lens),
        max_seq_len=max(lens),
        seq_lens_host=tuple(lens),
        query_start_loc_host=tuple(qsl),
    )
    return FlatBatch(
        input_ids=ids.to(device),
        positions=positions.to(device),
        token_type_ids=None if types is None else types.to(device),
        meta=meta,
        seq_lens=tuple(lens),
        num_blocks=num_blocks,
    )


def split_batches(
    inputs: Sequence[EncoderInput], max_tokens: int, max_seqs: int
) -> list[list[int]]:
    """Indices of `inputs` grouped into batches of at most `max_tokens` tokens and `max_seqs`
    sequences (a sequence longer than `max_tokens` goes alone), in order."""
    batches: list[list[int]] = []
    current: list[int] = []
    tokens = 0
    for i, x in enumerate(inputs):
        if current and (tokens + len(x) > max_tokens or len(current) >= max_seqs):
            batches.append(current)
            current, tokens = [], 0
        current.append(i)
        tokens += len(x)
    if current:
        batches.append(current)
    return batches


def scratch_kv_cache(
    num_blocks: int,
    num_kv_heads: int,
    head_dim: int,
    v_head_dim: int,
    dtype: torch.dtype,
    device: torch.device,
    block_size: int = SCRATCH_BLOCK_SIZE,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One (K, V) pair of (num_blocks, block_size, n_kv, d) for every layer of one pass."""
    shape = (num_blocks, block_size, num_kv_heads)
    return (
        torch.zeros(*shape, head_dim, dtype=dtype, device=device),
        torch.zeros(*shape, v_head_dim, dtype=dtype, device=device),
    )
