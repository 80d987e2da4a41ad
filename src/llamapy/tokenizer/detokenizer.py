"""Streaming detokenization that never emits broken UTF-8.

The concatenation of everything `add` and `flush` return equals `Tokenizer.decode(all_ids)`.
Text is emitted only once no later token can change it: an incomplete UTF-8 sequence at
the end waits for its continuation bytes, and with llama.cpp's `clean_spaces` (which drops
a space before `?!.,` and around `'`) bytes near a space or quote wait for what follows.
"""

from __future__ import annotations

import codecs

from llamapy.tokenizer.pieces import clean_spaces
from llamapy.tokenizer.tokenizer import Tokenizer

_TOUCHY = b" '"  # the bytes clean_spaces patterns are built around
_WINDOW = 256  # bytes kept before trying to move the window forward


def _safe_cut(raw: bytes | bytearray, c: int) -> bool:
    """True if clean_spaces(raw) == clean_spaces(raw[:c]) + clean_spaces(raw[c:]).

    Every clean_spaces pattern is at most 4 bytes and holds a space or quote within two
    bytes of any point it spans, so no pattern crosses a cut with none of those nearby.
    """
    if c < 2 or c + 2 > len(raw) or 0x80 <= raw[c] < 0xC0:
        return False
    return not any(b in _TOUCHY for b in raw[c - 2 : c + 2])


class IncrementalDetokenizer:
    """Feed token ids one by one with `add`; call `flush` at the end of the stream."""

    def __init__(self, tokenizer: Tokenizer, skip_special: bool = False) -> None:
        self._tok = tokenizer
        self._skip = skip_special
        self._clean = tokenizer.vocab.clean_spaces
        self._raw = bytearray()  # pieces since the window start
        self._emitted = 0  # characters of the window's text already returned
        self._count = 0  # tokens seen
        self._remove_space = tokenizer.vocab.add_space_prefix
        self.ids: list[int] = []
        # Without clean_spaces no later byte changes earlier text but an unfinished UTF-8
        # sequence: one incremental decoder does it all, at a cost per token that does not
        # grow with the window (the host's per-token work of a large decode batch).
        self._utf8 = None if self._clean else codecs.getincrementaldecoder("utf-8")("replace")

    def add(self, token_id: int) -> str:
        """Append one token; returns the newly final text (possibly "")."""
        piece = self._piece(token_id)
        self.ids.append(token_id)
        self._count += 1
        if self._utf8 is not None:
            return self._utf8.decode(piece)
        self._raw += piece
        return self._emit(final=False)

    def flush(self) -> str:
        """The rest of the text (an unfinished UTF-8 sequence becomes U+FFFD)."""
        if self._utf8 is not None:
            return self._utf8.decode(b"", final=True)
        return self._emit(final=True)

    def _piece(self, token_id: int) -> bytes:
        """The token's bytes as llama_detokenize adds them (BOS removal, first-space strip)."""
        tok, vocab = self._tok, self._tok.vocab
        first = self._count == 0
        if first and self._skip and vocab.add_bos and token_id == vocab.ids.get("bos"):
            self._remove_space = False  # the BOS is dropped; the next token keeps its space
            return b""
        piece = tok.token_bytes(token_id, special=not self._skip)
        if first:
            if self._remove_space and piece[:1] == b" ":
                piece = piece[1:]
            self._remove_space = False
        return piece

    def _emit(self, final: bool) -> str:
        raw = bytes(self._raw)
        if final or not self._clean:
            stable, complete = raw, final
        else:
            cut = self._stable_cut(raw)
            stable, complete = raw[:cut], cut < len(raw)
        data = clean_spaces(stable) if self._clean else stable
        text = self._decode(data, complete)
        new = text[self._emitted :]
        self._emitted = max(self._emitted, len(text))
        if final:
            self._raw.clear()
            self._emitted = 0
        elif len(raw) > _WINDOW:
            self._slide(raw)
        return new

    def _stable_cut(self, raw: bytes) -> int:
        """How many leading bytes of `raw` no later token can change (clean_spaces on)."""
        if not any(b in _TOUCHY for b in raw[-4:]):
            return len(raw)
        for c in range(len(raw) - 2, 1, -1):
            if _safe_cut(raw, c):
                return c
        return 0

    @staticmethod
    def _decode(data: bytes, complete: bool) -> str:
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        return decoder.decode(data, final=complete)

    def _slide(self, raw: bytes) -> None:
        """Drop an already emitted head of the window, at a cut that cannot change."""
        for c in range(len(raw) - _WINDOW // 2, 1, -1):
            boundary = not 0x80 <= raw[c] < 0xC0
            if _safe_cut(raw, c) if self._clean else boundary:
                head = clean_spaces(raw[:c]) if self._clean else raw[:c]
                head_len = len(self._decode(head, True))
                if head_len <= self._emitted:
                    del self._raw[:c]
                    self._emitted -= head_len
                return
