"""The CPU decode-attention kernel (kernels/cpu/attention.py, numba) against the float64
paged-attention reference, and its refusals of bad input."""

from __future__ import annotations

import pytest
import torch

from llamapy.kernels.cpu import attention as cpu_attention
from llamapy.layers.attention import AttentionMetadata, paged_attention_reference
from paged_tables import shuffled_block_tables

pytestmark = pytest.mark.skipif(
    not cpu_attention.available(), reason="numba is not installed (or LLAMAPY_CPU_ATTENTION=0)"
)


def _case(rng, seq_lens, n_heads, n_kv, d, block_size=16, spare_blocks=3):
    """Caches of random rows, each sequence's blocks drawn in a shuffled order (the pool's
    order), one padding column in the tables."""
    n_blocks = sum(-(-n // block_size) for n in seq_lens) + spare_blocks
    width = max(-(-n // block_size) for n in seq_lens) + 1
    tables = shuffled_block_tables(rng, seq_lens, block_size, n_blocks, width)
    gen = torch.Generator().manual_seed(int(rng.integers(2**31)))
    k_cache = torch.randn(n_blocks, block_size, n_kv, d, generator=gen)
    v_cache = torch.randn(n_blocks, block_size, n_kv, d, generator=gen)
    q = torch.randn(len(seq_lens), n_heads, d, generator=gen)
    return q, k_cache, v_cache, tables, torch.tensor(seq_lens, dtype=torch.int32)


def _reference(q, k_cache, v_cache, tables, seq_lens, scale, window, softcap):
    b = q.shape[0]
    lens = tuple(int(n) for n in seq_lens)
    meta = AttentionMetadata(
        slot_mapping=torch.zeros(b, dtype=torch.int64),
        block_tables=tables,
        seq_lens=seq_lens,
        query_start_loc=torch.arange(b + 1, dtype=torch.int32),
        max_query_len=1,
        max_seq_len=max(lens),
        seq_lens_host=lens,
        query_start_loc_host=tuple(range(b + 1)),
    )
    return paged_attention_reference(
        q.double(), k_cache.double(), v_cache.double(), meta,
        scale=scale, sliding_window=window, softcap=softcap,
    )  # fmt: skip


def _bound(q, k_cache, v_cache, tables, seq_lens, scale, window, softcap, want):
    """What float32 arithmetic may err by, element by element: each logit's dot of d
    products errs by ~sqrt(d) units of rounding of its largest possible size L (scale *
    sum |q_j k_j|, bounded over every cached key), which moves the softmax weights relatively
    by twice that; the exponentials, sums and the division add a few units; the output
    moves by that relative error times sum p |v| + |o| (`_reference` on |v|)."""
    b, n_heads, d = q.shape
    n_kv = k_cache.shape[2]
    qa = q.double().abs().view(b, n_kv, n_heads // n_kv, d)
    ka = k_cache.double().abs().reshape(-1, n_kv, d)
    big = scale * torch.einsum("bhgd,nhd->bhgn", qa, ka).amax(dim=-1).reshape(b, n_heads, 1)
    spread = _reference(q, k_cache, v_cache.abs(), tables, seq_lens, scale, window, softcap)
    return 2 * 2.0**-24 * (d**0.5 * big + 8) * (spread + want.abs())


@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize(
    ("n_heads", "n_kv", "d", "window", "softcap"),
    [
        (9, 3, 64, None, None),  # SmolLM2's heads
        (4, 1, 256, 7, None),  # Gemma 3 270M's, a sliding layer
        (8, 8, 32, None, 20.0),
        (6, 2, 80, 40, 5.0),
    ],
)
@pytest.mark.parametrize("cache_dtype", [torch.float32, torch.float16])
def test_matches_float64_reference(rng, threads, n_heads, n_kv, d, window, softcap, cache_dtype):
    """float32 or float16 caches (`-ctk f16`: the reference reads the same float16 values,
    exact in float64)."""
    # lengths across block boundaries, shorter than the threads' share, and one of 1
    seq_lens = [int(rng.integers(100, 300)), 1, int(rng.integers(2, 16)), 16]
    q, k_cache, v_cache, tables, lens = _case(rng, seq_lens, n_heads, n_kv, d)
    k_cache, v_cache = k_cache.to(cache_dtype), v_cache.to(cache_dtype)
    scale = float(rng.uniform(0.05, 0.2))
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        got = cpu_attention.decode_attention(
            q, k_cache, v_cache, tables, lens, scale=scale, sliding_window=window, softcap=softcap
        )
    finally:
        torch.set_num_threads(before)
    want = _reference(q, k_cache, v_cache, tables, lens, scale, window, softcap)
    assert got.dtype == torch.float32 and got.shape == q.shape
    assert torch.isfinite(got).all()
    err = (got.double() - want).abs()
    bound = _bound(q, k_cache, v_cache, tables, lens, scale, window, softcap, want)
    assert (err <= bound).all(), f"worst {(err / bound).max():.3g} of the bound"


def test_empty_sequence_gives_zeros(rng):
    q, k_cache, v_cache, tables, lens = _case(rng, [0, 5], 4, 2, 64)
    out = cpu_attention.decode_attention(q, k_cache, v_cache, tables, lens, scale=0.1)
    assert out[0].abs().max().item() == 0.0
    want = _reference(q[1:], k_cache, v_cache, tables[1:], lens[1:], 0.1, None, None)
    bound = _bound(q[1:], k_cache, v_cache, tables[1:], lens[1:], 0.1, None, None, want)
    assert ((out[1].double() - want[0]).abs() <= bound[0]).all()


def test_bad_input_raises_naming_it(rng):
    q, k_cache, v_cache, tables, lens = _case(rng, [20, 5], 4, 2, 64)
    width = tables.shape[1] * k_cache.shape[1]
    with pytest.raises(ValueError, match="seq_lens must lie in"):
        cpu_attention.decode_attention(
            q, k_cache, v_cache, tables, torch.tensor([20, width + 1], dtype=torch.int32), scale=1.0
        )
    bad = tables.clone()
    bad[0, 0] = k_cache.shape[0]  # one past the last block
    with pytest.raises(ValueError, match="block outside"):
        cpu_attention.decode_attention(q, k_cache, v_cache, bad, lens, scale=1.0)
    with pytest.raises(ValueError, match="float32"):
        cpu_attention.decode_attention(q.double(), k_cache, v_cache, tables, lens, scale=1.0)
    with pytest.raises(ValueError, match="float32 or float16"):
        cpu_attention.decode_attention(q, k_cache.bfloat16(), v_cache, tables, lens, scale=1.0)
    with pytest.raises(ValueError, match="dtypes differ"):
        cpu_attention.decode_attention(q, k_cache.half(), v_cache, tables, lens, scale=1.0)
    with pytest.raises(ValueError, match="int32"):
        cpu_attention.decode_attention(q, k_cache, v_cache, tables.long(), lens, scale=1.0)
    with pytest.raises(ValueError, match="head dims"):
        cpu_attention.decode_attention(q[..., :32], k_cache, v_cache, tables, lens, scale=1.0)
    with pytest.raises(ValueError, match="sliding_window"):
        cpu_attention.decode_attention(
            q, k_cache, v_cache, tables, lens, scale=1.0, sliding_window=0
        )
