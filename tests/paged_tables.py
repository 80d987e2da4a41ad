"""Random paged-KV block tables for attention tests."""

from __future__ import annotations

import numpy as np
import torch


def shuffled_block_tables(
    rng: np.random.Generator,
    seq_lens: list[int],
    block_size: int,
    n_blocks: int,
    width: int | None = None,
) -> torch.Tensor:
    """(B, width) int32: each sequence's ceil(n / block_size) blocks drawn without
    replacement from a shuffled pool of n_blocks (the order the block manager hands them
    out in), zero padded on the right; width defaults to the longest sequence's blocks."""
    counts = [-(-n // block_size) for n in seq_lens]
    if sum(counts) > n_blocks:
        raise ValueError(f"{sum(counts)} blocks needed, the pool has {n_blocks}")
    width = max(counts, default=0) if width is None else width
    perm = rng.permutation(n_blocks)
    tables = np.zeros((len(seq_lens), width), dtype=np.int32)
    used = 0
    for b, k in enumerate(counts):
        tables[b, :k] = perm[used : used + k]
        used += k
    return torch.from_numpy(tables)
