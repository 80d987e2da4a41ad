"""BlockManager as plain Python: allocation, ref counts, prefix caching, LRU eviction."""

from __future__ import annotations

import random

import pytest

from llamapy.engine.block_manager import BlockManager
from llamapy.engine.sequence import Sequence


def _seq(tokens: list[int], max_new: int = 8) -> Sequence:
    return Sequence(list(tokens), max_new)


def _compute(bm: BlockManager, seq: Sequence, n: int | None = None) -> None:
    """Pretend the model computed the next `n` (default: all remaining) tokens."""
    n = seq.num_uncomputed_tokens if n is None else n
    bm.allocate(seq, seq.num_computed_tokens + n)
    seq.num_computed_tokens += n
    bm.cache_computed_blocks(seq)


def test_allocate_and_free_return_every_block() -> None:
    bm = BlockManager(10, 4)
    s = _seq(list(range(9)))
    bm.admit(s)
    _compute(bm, s)
    assert len(s.block_table) == 3
    assert bm.num_free_blocks == 7
    bm.free(s)
    assert bm.num_free_blocks == 10
    assert s.block_table == [] and s.num_computed_tokens == 0


def test_slots_follow_block_table() -> None:
    bm = BlockManager(8, 4)
    s = _seq(list(range(6)))
    bm.admit(s)
    _compute(bm, s)
    slots = [bm.slot(s, p) for p in range(6)]
    assert slots[:4] == [s.block_table[0] * 4 + i for i in range(4)]
    assert slots[4:] == [s.block_table[1] * 4 + i for i in range(2)]


def test_prefix_cache_hit_shares_full_blocks_only() -> None:
    bm = BlockManager(16, 4)
    prompt = [random.randrange(1000) for _ in range(10)]
    a = _seq(prompt)
    bm.admit(a)
    _compute(bm, a)
    b = _seq(prompt[:9] + [prompt[9] + 1])  # same first 2 full blocks
    bm.admit(b)
    assert b.num_cached_tokens == 8
    assert b.block_table == a.block_table[:2]
    assert all(bm.ref_counts[i] == 2 for i in b.block_table)


def test_whole_prompt_cached_still_computes_last_token() -> None:
    bm = BlockManager(16, 4)
    prompt = list(range(8))
    a = _seq(prompt)
    bm.admit(a)
    _compute(bm, a)
    b = _seq(prompt)
    bm.admit(b)
    assert b.num_cached_tokens == 4  # the block holding the last token is recomputed
    assert b.num_uncomputed_tokens == 4


def test_freed_blocks_stay_cached_until_reused() -> None:
    bm = BlockManager(4, 4)
    prompt = list(range(100, 112))
    a = _seq(prompt)
    bm.admit(a)
    _compute(bm, a)
    bm.free(a)
    b = _seq(prompt + [1])
    bm.admit(b)
    assert b.num_cached_tokens == 12
    bm.free(b)
    # A different sequence needing all 4 blocks evicts every cached one.
    c = _seq(list(range(16)))
    bm.admit(c)
    _compute(bm, c)
    bm.free(c)
    d = _seq(prompt + [1])
    bm.admit(d)
    assert d.num_cached_tokens == 0


def test_lru_eviction_keeps_recently_freed_prefix() -> None:
    bm = BlockManager(6, 2)
    old, new = _seq([1, 2, 3, 4, 5]), _seq([7, 8, 9, 10, 11])
    for s in (old, new):
        bm.admit(s)
        _compute(bm, s)
    bm.free(old)
    bm.free(new)  # freed last: evicted last
    filler = _seq([50, 51, 52])  # takes 2 blocks: the least recently freed ones
    bm.admit(filler)
    _compute(bm, filler)
    probe_new = _seq([7, 8, 9, 10, 11])
    bm.admit(probe_new)
    assert probe_new.num_cached_tokens == 4
    probe_old = _seq([1, 2, 3, 4, 5])
    bm.admit(probe_old)
    assert probe_old.num_cached_tokens < 4


def test_out_of_blocks_raises() -> None:
    bm = BlockManager(2, 4)
    s = _seq(list(range(12)))
    bm.admit(s)
    assert not bm.can_allocate(s, 12)
    with pytest.raises(RuntimeError, match="out of KV blocks"):
        bm.allocate(s, 12)


def test_prefix_caching_off() -> None:
    bm = BlockManager(8, 2, enable_prefix_caching=False)
    a, b = _seq([1, 2, 3, 4, 5]), _seq([1, 2, 3, 4, 5])
    for s in (a, b):
        bm.admit(s)
        _compute(bm, s)
    assert b.num_cached_tokens == 0
    assert set(a.block_table).isdisjoint(b.block_table)


def test_random_workload_conserves_blocks() -> None:
    rng = random.Random()
    bm = BlockManager(64, 4)
    live: list[Sequence] = []
    for _ in range(500):
        if live and rng.random() < 0.4:
            bm.free(live.pop(rng.randrange(len(live))))
            continue
        s = _seq([rng.randrange(4) for _ in range(rng.randrange(1, 20))])
        bm.admit(s)
        if not bm.can_allocate(s, len(s)):
            bm.free(s)
            continue
        _compute(bm, s)
        live.append(s)
        held = {b for x in live for b in x.block_table}
        assert bm.num_free_blocks == 64 - len(held)
        for b in held:
            assert bm.ref_counts[b] == sum(x.block_table.count(b) for x in live)
    for s in live:
        bm.free(s)
    assert bm.num_free_blocks == 64 and not any(bm.ref_counts)
