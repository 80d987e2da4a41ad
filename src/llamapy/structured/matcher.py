"""Per-sequence grammar state and batched token masks, computed beside the forward pass.

Each constrained sequence owns a `GrammarMatcher` (an llguidance `LLMatcher` over its
generated tokens only: the prompt never enters it, so preemption by recompute and prefix
caching leave it valid). A step's masks are computed by `GrammarMasks.submit` in a worker
thread while the model runs (llguidance releases the GIL, as torch does), then
`MaskFuture.apply` copies the packed bitmask to the device once and sets the logits of
disallowed tokens to -inf before the sampler chain (vLLM's and llama.cpp's llguidance path).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor

import llguidance
import torch

from llamapy.structured.grammar import ConstraintKind, compile_constraint
from llamapy.structured.tokenizer import build_ll_tokenizer
from llamapy.tokenizer import Tokenizer

logger = logging.getLogger(__name__)


class GrammarMatcher:
    """One sequence's position in its grammar; advanced with each generated token."""

    def __init__(self, ll_tokenizer: llguidance.LLTokenizer, grammar: str) -> None:
        self._matcher = llguidance.LLMatcher(ll_tokenizer, grammar, log_level=0)
        if self._matcher.is_error():  # compile_constraint validated it: should not happen
            raise ValueError(f"grammar rejected: {self._matcher.get_error()}")

    def advance(self, token_id: int) -> bool:
        """Consume a generated token; False if the grammar does not allow it (an error)."""
        return self._matcher.consume_token(token_id)

    @property
    def is_stopped(self) -> bool:
        """The grammar is complete: nothing but end-of-generation can follow."""
        return self._matcher.is_stopped()

    @property
    def is_accepting(self) -> bool:
        return self._matcher.is_accepting()

    @property
    def error(self) -> str:
        return self._matcher.get_error()

    def bitmask(self) -> bytes:
        """The allowed tokens now, bit t of little-endian word t // 32."""
        return self._matcher.compute_bitmask()

    def fill_mask(self, row: torch.Tensor) -> None:
        """Write the allowed-token bitmask (bit t of word t // 32) into an int32 CPU row."""
        self._matcher.unsafe_compute_mask_ptr(row.data_ptr(), row.numel() * row.element_size())


class MaskFuture:
    """Masks being computed for some rows of the coming logits."""

    def __init__(self, future: Future[torch.Tensor], rows: list[int], n_vocab: int) -> None:
        self._future, self.rows, self._n_vocab = future, rows, n_vocab

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        """Logits (B, V) with disallowed tokens at -inf in the masked rows (a new tensor)."""
        words = self._future.result()  # (R, W) int32, packed bits
        words = words.to(logits.device, non_blocking=True)
        shifts = torch.arange(32, dtype=torch.int32, device=logits.device)
        bits = (words.unsqueeze(-1) >> shifts) & 1  # (R, W, 32)
        allowed = bits.view(len(self.rows), -1)[:, : logits.shape[1]].bool()  # (R, V)
        if allowed.shape[1] < logits.shape[1]:  # ids past the matcher's vocabulary
            pad = logits.shape[1] - allowed.shape[1]
            allowed = torch.nn.functional.pad(allowed, (0, pad), value=False)
        rows = torch.tensor(self.rows, device=logits.device)
        out = logits.clone()
        out[rows] = logits[rows].masked_fill(~allowed, float("-inf"))
        return out


class GrammarCompiler:
    """Makes matchers for one tokenizer over the model's `n_vocab` output ids.

    The llguidance tokenizer (every token's bytes; ~0.3 s for a 49k vocabulary, ~1.5 s for
    262k) is built on the first constrained request.
    """

    def __init__(self, tokenizer: Tokenizer, n_vocab: int) -> None:
        self.tokenizer = tokenizer
        self.n_vocab = n_vocab
        self._ll_tokenizer: llguidance.LLTokenizer | None = None
        self._lock = threading.Lock()

    @property
    def ll_tokenizer(self) -> llguidance.LLTokenizer:
        with self._lock:
            if self._ll_tokenizer is None:
                self._ll_tokenizer = build_ll_tokenizer(self.tokenizer, self.n_vocab)
            return self._ll_tokenizer

    def matcher(self, kind: ConstraintKind, spec: str | tuple[str, ...]) -> GrammarMatcher:
        return GrammarMatcher(self.ll_tokenizer, compile_constraint(kind, spec))


class MaskWorker:
    """Computes a step's masks in one worker thread (started on first use)."""

    def __init__(self, n_vocab: int) -> None:
        self.n_vocab = n_vocab
        self.words = -(-n_vocab // 32)
        self._pool: ThreadPoolExecutor | None = None
        self._pin = torch.cuda.is_available()

    def submit(self, matchers: Sequence[GrammarMatcher | None]) -> MaskFuture | None:
        """Start computing masks for the rows with a matcher; None if there are none."""
        rows = [i for i, m in enumerate(matchers) if m is not None]
        if not rows:
            return None
        todo = [matchers[i] for i in rows]
        if self._pool is None:
            self._pool = ThreadPoolExecutor(1, thread_name_prefix="llamapy-grammar")
        future = self._pool.submit(self._compute, todo)
        return MaskFuture(future, rows, self.n_vocab)

    def _compute(self, matchers: list[GrammarMatcher]) -> torch.Tensor:
        words = torch.empty((len(matchers), self.words), dtype=torch.int32, pin_memory=self._pin)
        for row, m in zip(words, matchers, strict=True):
            m.fill_mask(row)
        return words
