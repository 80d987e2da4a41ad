"""A generation request's state as the scheduler sees it: token ids and KV blocks, no torch."""

from __future__ import annotations

import enum
import itertools
from dataclasses import dataclass, field
from typing import Any


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


class FinishReason(enum.Enum):
    STOP = "stop"  # an end-of-generation token or a stop string
    LENGTH = "length"  # max tokens or the context limit
    ABORT = "abort"  # cancelled by the caller


_seq_ids = itertools.count()

# A sampled token still on the device: with async scheduling a decode step is launched before
# the previous step's tokens reach the host; its slot in `output_token_ids` holds PENDING
# until the engine reads the token back (the step after).
PENDING = -1


@dataclass(eq=False)
class Sequence:
    """One sequence: prompt + generated tokens, how many are in the KV cache, which blocks.

    `params` is opaque here (the sampling parameters); the scheduler reads only
    `max_tokens`, through `max_new_tokens`.
    """

    prompt_token_ids: list[int]
    max_new_tokens: int
    params: Any = None
    seq_id: int = field(default_factory=lambda: next(_seq_ids))
    output_token_ids: list[int] = field(default_factory=list)
    status: SequenceStatus = SequenceStatus.WAITING
    finish_reason: FinishReason | None = None
    num_computed_tokens: int = 0  # tokens whose K/V are in the cache
    num_cached_tokens: int = 0  # of those, reused from the prefix cache at admission
    block_table: list[int] = field(default_factory=list)
    arrival_time: float = 0.0
    # structured output: the grammar matcher (llamapy.structured.GrammarMatcher), advanced
    # with each generated token; it never sees the prompt, so recompute leaves it valid
    grammar: Any = None

    @property
    def token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    def __len__(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    @property
    def num_uncomputed_tokens(self) -> int:
        return len(self) - self.num_computed_tokens

    @property
    def is_finished(self) -> bool:
        return self.status == SequenceStatus.FINISHED

    @property
    def last_token_pending(self) -> bool:
        return bool(self.output_token_ids) and self.output_token_ids[-1] == PENDING

    def token_at(self, i: int) -> int:
        n = len(self.prompt_token_ids)
        return self.prompt_token_ids[i] if i < n else self.output_token_ids[i - n]

    def tokens_between(self, start: int, end: int) -> list[int]:
        n = len(self.prompt_token_ids)
        if end <= n:
            return self.prompt_token_ids[start:end]
        if start >= n:
            return self.output_token_ids[start - n : end - n]
        return self.prompt_token_ids[start:] + self.output_token_ids[: end - n]
