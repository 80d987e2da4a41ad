"""Continuous batching with chunked prefill and preemption by recompute. No torch.

Each step the scheduler picks, under a token budget, how many new tokens every sequence
computes: running sequences first (a decode is one token; an unfinished prefill continues
with the next chunk), then waiting ones in arrival order. When the KV cache has no block
for a running sequence, the most recently admitted one is preempted: its blocks are freed
and it waits again, to be recomputed from its tokens (its prefix may still be cached).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from llamapy.engine.block_manager import BlockManager
from llamapy.engine.sequence import FinishReason, Sequence, SequenceStatus


@dataclass(frozen=True, slots=True)
class SchedulerConfig:
    max_num_seqs: int = 16
    max_num_batched_tokens: int = 2048
    max_model_len: int = 4096

    def __post_init__(self) -> None:
        for name in ("max_num_seqs", "max_num_batched_tokens", "max_model_len"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")


@dataclass(frozen=True, slots=True)
class ScheduledSeq:
    seq: Sequence
    num_new_tokens: int  # tokens computed this step, from seq.num_computed_tokens on

    @property
    def needs_sample(self) -> bool:
        """Whether this step reaches the sequence's last token (so it yields a new token)."""
        return self.seq.num_computed_tokens + self.num_new_tokens == len(self.seq)


class Scheduler:
    def __init__(self, config: SchedulerConfig, block_manager: BlockManager) -> None:
        self.config = config
        self.block_manager = block_manager
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        blocks = -(
            -min(len(seq) + seq.max_new_tokens, self.config.max_model_len)
            // self.block_manager.block_size
        )
        if blocks > self.block_manager.num_blocks:
            raise ValueError(
                f"a sequence of {len(seq)} prompt tokens needs {blocks} KV blocks; the cache "
                f"has {self.block_manager.num_blocks}"
            )
        self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def abort(self, seq: Sequence) -> None:
        """Stop a sequence now and free its blocks."""
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self._finish(seq, FinishReason.ABORT)

    def _finish(self, seq: Sequence, reason: FinishReason) -> None:
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = reason
        self.block_manager.free(seq)

    # -- scheduling ----------------------------------------------------------------------

    def schedule(self) -> list[ScheduledSeq]:
        budget = self.config.max_num_batched_tokens
        scheduled: list[ScheduledSeq] = []
        for seq in list(self.running):
            if seq.status is not SequenceStatus.RUNNING:  # preempted below for an earlier one
                continue
            if seq.num_output_tokens >= seq.max_new_tokens:
                continue  # its last token is still pending (async scheduling): no more
            n = min(seq.num_uncomputed_tokens, budget)
            if n <= 0:
                continue
            if not self._reserve(seq, n):
                continue  # seq itself was preempted
            scheduled.append(ScheduledSeq(seq, n))
            budget -= n
        while self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs:
            seq = self.waiting[0]
            if not seq.block_table:
                self.block_manager.admit(seq)
            n = min(seq.num_uncomputed_tokens, budget)
            if not self.block_manager.can_allocate(seq, seq.num_computed_tokens + n):
                self.block_manager.free(seq)  # give back its cached blocks; retry next step
                break
            self.block_manager.allocate(seq, seq.num_computed_tokens + n)
            self.waiting.popleft()
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            scheduled.append(ScheduledSeq(seq, n))
            budget -= n
        return scheduled

    def _reserve(self, seq: Sequence, n: int) -> bool:
        """Blocks for `n` more tokens of running `seq`, preempting others (latest first)."""
        total = seq.num_computed_tokens + n
        if self.block_manager.blocks_needed(seq, total) == 0:  # most decode steps
            return True
        while not self.block_manager.can_allocate(seq, total):
            victim = self.running[-1]
            self._preempt(victim)
            if victim is seq:
                return False
        self.block_manager.allocate(seq, total)
        return True

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.block_manager.free(seq)
        seq.status = SequenceStatus.WAITING
        self.waiting.appendleft(seq)
        self.num_preemptions += 1

    # -- after the model ran ---------------------------------------------------------------

    def postprocess(self, batch: list[ScheduledSeq], sampled: dict[int, int]) -> None:
        """Advance computed counts, append sampled tokens (`seq_id -> token`, PENDING for
        one still on the device), cache full blocks. Finishing on stop conditions is the
        caller's: it calls `finish`; sequences it finished while the step ran are skipped."""
        for item in batch:
            seq = item.seq
            if seq.is_finished:
                continue
            seq.num_computed_tokens += item.num_new_tokens
            self.block_manager.cache_computed_blocks(seq)
            token = sampled.get(seq.seq_id)
            if token is not None:
                seq.output_token_ids.append(token)

    def finish(self, seq: Sequence, reason: FinishReason) -> None:
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:  # e.g. max_tokens=0: done before it ever ran
            self.waiting.remove(seq)
        self._finish(seq, reason)
