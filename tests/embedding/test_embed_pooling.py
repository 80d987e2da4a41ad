"""Pooling, normalisation, batching and encoder attention against direct float64 definitions
(no model files needed)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from llamapy.embedding import normalize, rank
from llamapy.embedding.batch import EncoderInput, flatten, scratch_kv_cache, split_batches
from llamapy.embedding.pooling import pool, split_tokens
from llamapy.layers.attention import paged_attention_reference, write_kv
from llamapy.models.bert import encoder_attention


def _random_lens(rng: np.random.Generator, n: int, hi: int = 40) -> list[int]:
    return [int(x) for x in rng.integers(1, hi, n)]


@pytest.mark.parametrize("pooling", ["mean", "cls", "last"])
def test_pool_equals_the_definition(rng, pooling):
    lens = _random_lens(rng, 7)
    hidden = torch.from_numpy(rng.standard_normal((sum(lens), 16)).astype(np.float32))
    got = pool(hidden, lens, pooling)
    starts = np.cumsum([0, *lens])
    h = hidden.double().numpy()
    for b, n in enumerate(lens):
        seq = h[starts[b] : starts[b] + n]
        want = {"mean": seq.mean(0), "cls": seq[0], "last": seq[-1]}[pooling]
        np.testing.assert_allclose(got[b].numpy(), want, rtol=1e-5, atol=1e-6)
    parts = split_tokens(hidden, lens)
    assert [p.shape[0] for p in parts] == lens


def test_pool_rejects_an_unknown_type():
    with pytest.raises(ValueError, match="pooling"):
        pool(torch.zeros(3, 2), [3], "max")


@pytest.mark.parametrize("p", [-1, 0, 1, 2, 3])
def test_normalize_is_llama_cpp_common_embd_normalize(rng, p):
    x = rng.standard_normal((5, 12)).astype(np.float32)
    x[2] = 0.0  # a zero vector stays zero
    got = normalize(torch.from_numpy(x), p).numpy()
    x64 = x.astype(np.float64)
    if p == -1:
        norm = np.ones((5, 1))
    elif p == 0:
        norm = np.abs(x64).max(1, keepdims=True) / 32760.0
    else:
        norm = (np.abs(x64) ** p).sum(1, keepdims=True) ** (1.0 / p)
    want = np.where(norm > 0, x64 / np.where(norm > 0, norm, 1.0), 0.0)
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)
    with pytest.raises(ValueError, match="embd_normalize"):
        normalize(torch.ones(3), -2)


def test_flatten_gives_each_sequence_its_own_scratch_slots(rng):
    lens = _random_lens(rng, 6, hi=50)
    inputs = [EncoderInput(list(rng.integers(0, 100, n))) for n in lens]
    batch = flatten(inputs, torch.device("cpu"), block_size=16)
    assert batch.seq_lens == tuple(lens) and batch.num_tokens == sum(lens)
    starts = np.cumsum([0, *lens])
    slots = batch.meta.slot_mapping.numpy()
    assert len(set(slots.tolist())) == sum(lens)  # no two tokens share a slot
    for b, n in enumerate(lens):
        assert batch.positions[starts[b] : starts[b] + n].tolist() == list(range(n))
        table = batch.meta.block_tables[b].numpy()
        for j in range(n):  # token j of sequence b sits where its block table says
            assert slots[starts[b] + j] == table[j // 16] * 16 + j % 16
    assert batch.num_blocks == sum(-(-n // 16) for n in lens)
    with pytest.raises(ValueError, match="at least one token"):
        flatten([EncoderInput([])], torch.device("cpu"))


def _attention_float64(q, k, v, lens, scale):
    out = torch.empty_like(q, dtype=torch.float64)
    s = 0
    for n in lens:
        qs, ks, vs = (t[s : s + n].double().transpose(0, 1) for t in (q, k, v))  # (h, n, d)
        probs = torch.softmax(qs @ ks.transpose(1, 2) * scale, dim=-1)
        out[s : s + n] = (probs @ vs).transpose(0, 1)
        s += n
    return out


def test_encoder_attention_is_bidirectional_within_each_sequence(rng):
    """The CPU path (SDPA per sequence) and the scratch-cache path the GPU takes (here through
    the torch reference of the paged kernels, causal=False) both equal the definition."""
    lens = _random_lens(rng, 5, hi=30)
    T, heads, d = sum(lens), 4, 8
    q, k, v = (
        torch.from_numpy(rng.standard_normal((T, heads, d)).astype(np.float32)) for _ in "qkv"
    )
    batch = flatten([EncoderInput([0] * n) for n in lens], torch.device("cpu"))
    want = _attention_float64(q, k, v, lens, 0.3)
    got = encoder_attention(q, k, v, batch.meta, None, scale=0.3)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)
    kv = scratch_kv_cache(batch.num_blocks, heads, d, d, torch.float32, torch.device("cpu"))
    write_kv(*kv, k, v, batch.meta.slot_mapping)
    paged = paged_attention_reference(q, *kv, batch.meta, scale=0.3, causal=False)
    torch.testing.assert_close(paged.double(), want, rtol=1e-5, atol=1e-5)


def test_split_batches_respects_the_budget_and_order(rng):
    lens = _random_lens(rng, 40, hi=60) + [200]
    rng.shuffle(lens)
    inputs = [EncoderInput([1] * n) for n in lens]
    batches = split_batches(inputs, max_tokens=128, max_seqs=5)
    assert [i for b in batches for i in b] == list(range(len(lens)))
    for b in batches:
        assert len(b) <= 5
        assert len(b) == 1 or sum(lens[i] for i in b) <= 128


def test_rank_sorts_best_first_keeps_tied_order_and_cuts_top_n():
    scores = [0.1, 0.9, 0.5, 0.9, -1.0]
    results = rank(scores, ["a", "b", "c", "d", "e"])
    assert [r.index for r in results] == [1, 3, 2, 0, 4]
    assert [r.document for r in results[:2]] == ["b", "d"]
    assert [r.index for r in rank(scores, None, top_n=2)] == [1, 3]
    assert len(rank(scores, None, top_n=99)) == 5
    with pytest.raises(ValueError, match="top_n"):
        rank(scores, None, top_n=-1)
