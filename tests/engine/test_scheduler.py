"""Scheduler as plain Python: continuous batching, chunked prefill, preemption, abort."""

from __future__ import annotations

import pytest

from llamapy.engine.block_manager import BlockManager
from llamapy.engine.scheduler import Scheduler, SchedulerConfig
from llamapy.engine.sequence import FinishReason, Sequence, SequenceStatus


def _sched(num_blocks=32, block_size=4, **kw) -> Scheduler:
    return Scheduler(SchedulerConfig(**kw), BlockManager(num_blocks, block_size))


def _step(s: Scheduler, token: int = 7) -> list:
    batch = s.schedule()
    s.postprocess(batch, {b.seq.seq_id: token for b in batch if b.needs_sample})
    return batch


def test_decode_one_token_per_step_after_prefill() -> None:
    s = _sched()
    a = Sequence(list(range(10)), 5)
    s.add(a)
    first = _step(s)
    assert [(b.seq, b.num_new_tokens) for b in first] == [(a, 10)]
    assert a.output_token_ids == [7]
    second = _step(s)
    assert [b.num_new_tokens for b in second] == [1]
    assert a.num_computed_tokens == 11


def test_chunked_prefill_under_token_budget() -> None:
    s = _sched(max_num_batched_tokens=8)
    long, short = Sequence(list(range(20)), 4), Sequence([1, 2, 3], 4)
    s.add(long)
    s.add(short)
    b1 = _step(s)
    assert [(b.seq, b.num_new_tokens) for b in b1] == [(long, 8)]
    assert long.output_token_ids == []  # no sample until the prompt is done
    b2 = _step(s)
    assert [(b.seq, b.num_new_tokens) for b in b2] == [(long, 8)]
    b3 = _step(s)
    assert [(b.seq, b.num_new_tokens) for b in b3] == [(long, 4), (short, 3)]
    assert long.output_token_ids == [7] and short.output_token_ids == [7]
    b4 = _step(s)
    assert sorted(b.num_new_tokens for b in b4) == [1, 1]


def test_max_num_seqs_limits_running() -> None:
    s = _sched(max_num_seqs=2)
    seqs = [Sequence([i, i + 1], 4) for i in range(3)]
    for q in seqs:
        s.add(q)
    _step(s)
    assert len(s.running) == 2 and s.waiting[0] is seqs[2]
    s.finish(seqs[0], FinishReason.STOP)
    _step(s)
    assert seqs[2] in s.running


def test_preemption_by_recompute_when_blocks_run_out() -> None:
    s = _sched(num_blocks=4, block_size=2)
    a, b = Sequence([1, 2, 3], 5), Sequence([4, 5, 6], 5)
    s.add(a)
    s.add(b)
    _step(s)  # both prefilled: 2 blocks each, all 4 used
    assert s.block_manager.num_free_blocks == 0
    _step(s)  # both decode a 4th token: still within 2 blocks each
    assert s.num_preemptions == 0
    _step(s)  # a needs a 3rd block for its 5th token -> b (latest admitted) is preempted
    assert b.status == SequenceStatus.WAITING and b.block_table == []
    assert s.num_preemptions == 1
    assert a.num_computed_tokens == 5
    # b keeps its output so far and is recomputed later from all its tokens.
    assert b.output_token_ids == [7, 7] and b.num_computed_tokens == 0


def test_abort_frees_blocks_at_once() -> None:
    s = _sched()
    a = Sequence(list(range(9)), 8)
    s.add(a)
    _step(s)
    free_before = s.block_manager.num_free_blocks
    s.abort(a)
    assert a.finish_reason == FinishReason.ABORT
    assert s.block_manager.num_free_blocks == free_before + 3
    assert not s.has_unfinished()


def test_request_that_can_never_fit_is_refused() -> None:
    s = _sched(num_blocks=2, block_size=4)
    with pytest.raises(ValueError, match="KV blocks"):
        s.add(Sequence(list(range(12)), 4))


def test_prefix_cache_skips_computed_tokens() -> None:
    s = _sched(block_size=4)
    a = Sequence(list(range(13)), 1)
    s.add(a)
    _step(s)
    s.finish(a, FinishReason.LENGTH)
    b = Sequence(list(range(13)) + [99], 1)
    s.add(b)
    batch = _step(s)
    assert b.num_cached_tokens == 12
    assert [x.num_new_tokens for x in batch] == [2]


def test_config_validation() -> None:
    with pytest.raises(ValueError, match="max_num_seqs"):
        SchedulerConfig(max_num_seqs=0)


def test_finish_a_waiting_sequence() -> None:
    s = _sched()
    a = Sequence([1, 2, 3], 0)
    s.add(a)
    s.finish(a, FinishReason.LENGTH)
    assert not s.has_unfinished() and a.is_finished
    assert s.schedule() == []
