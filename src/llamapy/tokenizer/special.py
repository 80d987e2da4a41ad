"""Splitting special tokens out of the text before tokenization.

Mirrors `llama_vocab::impl::tokenizer_st_partition`: special tokens are taken longest first;
each one splits every remaining raw fragment at its leftmost non-overlapping occurrences.
User-defined tokens are always split out; control and unknown ones only with parse_special.

llama.cpp scans the whole text once per special token (thousands for Gemma). Here one
regex over a trie of all special texts finds, at every position, the longest special token
starting there; every special token that occurs at all is a prefix of one of those, so the
exact longest-first algorithm then runs over just the tokens present.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from llamapy.tokenizer.vocab import TokenAttr, Vocab

Fragment = str | int  # raw text, or a token id
_C_SPACE = " \t\n\v\f\r"  # C isspace() in the "C" locale


def _trie_regex(texts: Sequence[str]) -> re.Pattern[str] | None:
    """A regex matching the longest of `texts` that starts at a position."""
    if not texts:
        return None
    trie: dict = {}
    for text in texts:
        node = trie
        for ch in text:
            node = node.setdefault(ch, {})
        node[""] = True

    def build(node: dict) -> str:
        terminal = "" in node
        alts = [re.escape(ch) + build(child) for ch, child in sorted(node.items()) if ch]
        if not alts:
            return ""
        body = alts[0] if len(alts) == 1 else "(?:" + "|".join(alts) + ")"
        if terminal:
            body = "(?:" + body + ")?"  # greedy: the longer token wins when both match
        return body

    return re.compile(build(trie), re.DOTALL)


class _Table:
    """The special tokens of one mode (with or without control tokens)."""

    def __init__(self, vocab: Vocab, ids: list[int]) -> None:
        self.order = {i: k for k, i in enumerate(ids)}  # longest first
        self.text = {i: vocab.tokens[i] for i in ids}
        self.attr = {i: vocab.attrs[i] for i in ids}
        by_text = {vocab.tokens[i]: i for i in ids}
        self.pattern = _trie_regex(list(by_text))
        # every special token that is a prefix of a special token (itself included)
        self.prefixes: dict[str, list[int]] = {}
        for text in by_text:
            self.prefixes[text] = [by_text[text[:n]] for n in range(1, len(text) + 1)
                                   if text[:n] in by_text]  # fmt: skip

    def present(self, text: str) -> list[int]:
        """The special tokens occurring in `text`, in llama.cpp's processing order."""
        if self.pattern is None:
            return []
        found: set[int] = set()
        seen: set[str] = set()
        search = self.pattern.search
        m = search(text)
        while m is not None:
            s = m.group()
            if s and s not in seen:
                seen.add(s)
                found.update(self.prefixes[s])
            m = search(text, m.start() + 1)
        return sorted(found, key=self.order.__getitem__)


class SpecialSplitter:
    """`split(text, parse_special)` -> raw text fragments and special token ids."""

    def __init__(self, vocab: Vocab) -> None:
        ids = vocab.special_ids()
        user = [i for i in ids if not vocab.attrs[i] & (TokenAttr.CONTROL | TokenAttr.UNKNOWN)]
        self._tables = {True: _Table(vocab, ids), False: _Table(vocab, user)}

    def split(self, text: str, parse_special: bool) -> list[Fragment]:
        if not text:
            return []
        table = self._tables[parse_special]
        fragments: list[Fragment] = [text]
        for token_id in table.present(text):
            fragments = _split_one(fragments, table.text[token_id], token_id, table.attr[token_id])
        return fragments


def _split_one(fragments: list[Fragment], text: str, token_id: int, attr: int) -> list[Fragment]:
    out: list[Fragment] = []
    strip = attr & (TokenAttr.LSTRIP | TokenAttr.RSTRIP)
    for frag in fragments:
        if isinstance(frag, int) or text not in frag:
            out.append(frag)
        elif strip:
            out.extend(_split_stripping(frag, text, token_id, attr))
        else:
            pieces = frag.split(text)
            for k, piece in enumerate(pieces):
                if k:
                    out.append(token_id)
                if piece:
                    out.append(piece)
    return out


def _split_stripping(frag: str, text: str, token_id: int, attr: int) -> list[Fragment]:
    """The literal loop of tokenizer_st_partition, for tokens with LSTRIP / RSTRIP."""
    out: list[Fragment] = []
    base, end = 0, len(frag)
    while True:
        match = frag.find(text, base, end)
        if match < 0:
            if base < end:
                out.append(frag[base:end])
            return out
        left = frag[base:match]
        if attr & TokenAttr.LSTRIP:
            left = left.rstrip(_C_SPACE)
        if left:
            out.append(left)
        out.append(token_id)
        base = match + len(text)
        if attr & TokenAttr.RSTRIP:
            while base < end and frag[base] in _C_SPACE:
                base += 1
        if base >= end:
            return out
