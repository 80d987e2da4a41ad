"""The CPU attention path (torch SDPA over the gathered visible keys) against the torch
reference over block tables, on fresh random batches: mixed prefill / decode / cached
prefixes, GQA, sliding windows, non-causal."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from llamapy.layers.attention import (
    AttentionMetadata,
    paged_attention_reference,
    paged_attention_sdpa,
)
from paged_tables import shuffled_block_tables


def _case(rng: np.random.Generator):
    bs, n_kv = int(rng.choice([4, 16])), int(rng.integers(1, 4))
    group, d = int(rng.choice([1, 3, 4])), int(rng.choice([16, 64]))
    num_blocks = 96  # room for 3 sequences of < 100 tokens in blocks of 4
    k_cache = torch.randn(num_blocks, bs, n_kv, d, dtype=torch.float64)
    v_cache = torch.randn(num_blocks, bs, n_kv, d, dtype=torch.float64)
    seq_lens = [int(rng.integers(1, 100)) for _ in range(int(rng.integers(1, 4)))]
    q_lens = [int(rng.choice([1, n, rng.integers(1, n + 1)])) for n in seq_lens]
    tables = shuffled_block_tables(rng, seq_lens, bs, num_blocks)
    starts = np.concatenate([[0], np.cumsum(q_lens)]).tolist()
    q = torch.randn(starts[-1], n_kv * group, d, dtype=torch.float64)
    meta = AttentionMetadata(
        slot_mapping=torch.zeros(starts[-1], dtype=torch.int64),
        block_tables=tables,
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32),
        query_start_loc=torch.tensor(starts, dtype=torch.int32),
        max_query_len=max(q_lens),
        max_seq_len=max(seq_lens),
        seq_lens_host=tuple(seq_lens),
        query_start_loc_host=tuple(starts),
    )
    return q, k_cache, v_cache, meta


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_sdpa_path_matches_reference(rng: np.random.Generator, dtype: torch.dtype) -> None:
    """float32 takes torch's fused (flash) CPU kernel, float64 its math path."""
    torch.manual_seed(int(rng.integers(1 << 31)))
    for _ in range(60):
        q, k_cache, v_cache, meta = _case(rng)
        q, k_cache, v_cache = q.to(dtype), k_cache.to(dtype), v_cache.to(dtype)
        window = [None, None, 5, 30][int(rng.integers(4))]
        causal = bool(rng.random() < 0.85)
        kw = {"scale": float(rng.uniform(0.1, 0.5)), "sliding_window": window, "causal": causal}
        got = paged_attention_sdpa(q, k_cache, v_cache, meta, **kw).double()
        want = paged_attention_reference(q.double(), k_cache.double(), v_cache.double(), meta, **kw)
        # float64 inputs, but the reference takes its softmax in float32 (as ggml): the
        # difference is float32 rounding of the probabilities, ~1e-7 relative
        err = ((got - want).abs().max() / want.abs().max()).item()
        assert err < 1e-5, (err, window, causal, meta)
