"""Turning sampled tokens into text: streaming detokenization, stop strings, finish reasons."""

from __future__ import annotations

from llamapy.engine.sequence import FinishReason
from llamapy.sampling.params import SamplingParams
from llamapy.tokenizer import IncrementalDetokenizer, Tokenizer


class TextStream:
    """Per request: new token -> (text that is final now, finish reason or None).

    Stop strings are found even when split across tokens: the last `len(longest stop) - 1`
    characters are held back until it is clear they do not start a stop string. The stop
    string itself is never returned (as llama.cpp and OpenAI).
    """

    def __init__(self, tokenizer: Tokenizer, params: SamplingParams) -> None:
        self.tokenizer = tokenizer
        self.params = params
        self.detok = IncrementalDetokenizer(tokenizer, skip_special=True)
        self.stops = tuple(params.stop)
        self.holdback = max((len(s) for s in self.stops), default=1) - 1
        self.pending = ""
        self.text = ""  # everything returned so far

    def add(self, token_id: int) -> tuple[str, FinishReason | None]:
        if self.tokenizer.is_eog(token_id) and not self.params.ignore_eos:
            return self._finish(FinishReason.STOP, flush=True)
        if not self.stops:  # nothing held back: the new text is final as it comes
            return self._emit(self.detok.add(token_id)), None
        buf = self.pending + self.detok.add(token_id)
        hit = self._find_stop(buf)
        if hit is not None:
            self.pending = ""
            return self._emit(buf[:hit]), FinishReason.STOP
        cut = len(buf) - self.holdback if self.stops else len(buf)
        self.pending = buf[max(cut, 0) :]
        return self._emit(buf[: max(cut, 0)]), None

    def finish(self, reason: FinishReason) -> tuple[str, FinishReason]:
        """End the stream for another reason (length, abort): release what was held."""
        return self._finish(reason, flush=True)

    def _finish(self, reason: FinishReason, *, flush: bool) -> tuple[str, FinishReason]:
        buf = self.pending + (self.detok.flush() if flush else "")
        self.pending = ""
        hit = self._find_stop(buf)
        if hit is not None:
            return self._emit(buf[:hit]), FinishReason.STOP
        return self._emit(buf), reason

    def _find_stop(self, buf: str) -> int | None:
        hits = [i for i in (buf.find(s) for s in self.stops) if i >= 0]
        return min(hits) if hits else None

    def _emit(self, text: str) -> str:
        self.text += text
        return text
