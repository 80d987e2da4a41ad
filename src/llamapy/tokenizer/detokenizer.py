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


def _safe_cut(raw: bytes | bytearray, c: int) -> bool:
    """True if clean_spaces(raw) == clean_spaces(raw[:c]) + clean_spaces(raw[c:]).

    Every clean_spaces pattern is at most 4 bytes and holds a space or quote within two
    bytes of any point it spans, so no pattern crosses a cut with none of those nearby.
    """
    if c < 2 or c + 2 > len(raw) or 0x80 <= raw[c] < 0xC0:
        return False
    return not any(b in _TOUCHY for b in raw[c - 2 : c + 2])


class IncrementalDetokenizer:
    """Feed token ids one by one with `add`; call `flush` at the end of the stream.

    Bytes go through one incremental UTF-8 decoder (it holds an unfinished character back).
    With clean_spaces, only the tail after the last safe cut waits (`_safe_cut`: no pattern
    spans it); the two bytes before the tail stay as context for the next cut. The cost of a
    token does not grow with the text (the host's per-token work of a large decode batch).
    """

    def __init__(self, tokenizer: Tokenizer, skip_special: bool = False) -> None:
        self._tok = tokenizer
        self._skip = skip_special
        self._clean = tokenizer.vocab.clean_spaces
        self._tail = b""  # bytes not final yet (clean_spaces: after the last safe cut)
        self._ctx = b""  # the last (up to) 2 final bytes: the left side of the next cut
        self._utf8 = codecs.getincrementaldecoder("utf-8")("replace")
        self._count = 0  # tokens seen
        self._remove_space = tokenizer.vocab.add_space_prefix
        self.ids: list[int] = []

    def add(self, token_id: int) -> str:
        """Append one token; returns the newly final text (possibly "")."""
        piece = self._piece(token_id)
        self.ids.append(token_id)
        self._count += 1
        if not self._clean:
            return self._utf8.decode(piece)
        raw = self._ctx + self._tail + piece
        cut = self._stable_cut(raw, len(self._ctx))
        stable = raw[len(self._ctx) : cut]
        self._tail = raw[cut:]
        if not stable:
            return ""
        self._ctx = raw[max(0, cut - 2) : cut]
        return self._utf8.decode(clean_spaces(stable))

    def flush(self) -> str:
        """The rest of the text (an unfinished UTF-8 sequence becomes U+FFFD)."""
        rest, self._tail, self._ctx = self._tail, b"", b""
        return self._utf8.decode(clean_spaces(rest) if self._clean else rest, final=True)

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

    @staticmethod
    def _stable_cut(raw: bytes, lo: int) -> int:
        """How many leading bytes of `raw` no later token can change: all of them when its
        end holds no space or quote, else the last safe cut at or after `lo` (`lo`: the
        context bytes, already final)."""
        if not any(b in _TOUCHY for b in raw[-4:]):
            return len(raw)
        for c in range(len(raw) - 2, max(lo, 2) - 1, -1):
            if _safe_cut(raw, c):
                return c
        return lo
