"""Byte-level pieces (`pieces._decode_byte_level`, llama.cpp's `llama_decode_text`) against a
character-by-character map, on whole vocabularies and on strings mixing mapped and unmapped
characters."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from vocab_data import vocab_path

from llamapy.tokenizer import Tokenizer
from llamapy.tokenizer.pieces import UNICODE_TO_BYTE, _decode_byte_level, piece_table
from llamapy.tokenizer.vocab import TokenAttr, Vocab


def _raw(text: str) -> bytes:
    """UTF-8, lone surrogates as the bytes they stand for (U+DC80..U+DCFF: the undecodable
    bytes of a GGUF string) or in their 3-byte form (others)."""
    return b"".join(
        bytes([ord(c) - 0xDC00])
        if 0xDC80 <= ord(c) <= 0xDCFF
        else c.encode("utf-8", "surrogatepass")
        for c in text
    )


def _by_character(text: str) -> bytes:
    """The definition, one character at a time: its byte, or llama.cpp's marker."""
    out = b""
    for c in text:
        if c in UNICODE_TO_BYTE:
            out += bytes([UNICODE_TO_BYTE[c]])
        else:
            out += b"[UNK_BYTE_0x" + _raw(c).hex().encode() + _raw(text) + b"]"
    return out


@pytest.mark.parametrize("vocab", ["gpt-2", "llama-bpe", "qwen2"])
def test_every_token_of_byte_level_vocabularies(vocab: str) -> None:
    tok = Tokenizer.from_gguf(vocab_path(vocab))
    texts = tok.vocab.display or tok.vocab.tokens
    for text in texts:
        assert _decode_byte_level(text) == _by_character(text), text
    # and the table built from them: a normal token's piece is its decoded text
    table = piece_table(tok.vocab, byte_level=True)
    normal = [i for i, a in enumerate(tok.vocab.attrs) if a & TokenAttr.NORMAL]
    assert len(normal) > 0.9 * len(texts)
    assert all(table[i] == _by_character(texts[i]) for i in normal)


MAPPED = sorted(UNICODE_TO_BYTE)


SURROGATES = st.characters(min_codepoint=0xD800, max_codepoint=0xDFFF)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.one_of(st.sampled_from(MAPPED), st.characters(), SURROGATES), max_size=12))
def test_mixed_strings(chars: list[str]) -> None:
    """Including lone surrogates: a GGUF string's undecodable bytes arrive as U+DC80..U+DCFF
    (`surrogateescape`) and must come back as those bytes, never as an error."""
    text = "".join(chars)
    assert _decode_byte_level(text) == _by_character(text)


def test_undecodable_bytes_of_any_token_kind_come_back() -> None:
    """A GGUF token text holding bytes that are not UTF-8 (read as U+DC80..U+DCFF): its
    piece carries those bytes, for control, SPM-normal and byte-level-normal tokens alike."""
    tokens = ["<c\udcff>", "\u2581a\udc80", "\udc81b"]
    attrs = [int(TokenAttr.CONTROL), int(TokenAttr.NORMAL), int(TokenAttr.NORMAL)]
    vocab = Vocab(
        model="llama", kind="spm", pre=None, tokens=tokens, attrs=attrs, scores=None, merges=[],
        ids={},
    )  # fmt: skip
    assert piece_table(vocab, byte_level=False) == [b"<c\xff>", b" a\x80", b"\x81b"]
    assert piece_table(vocab, byte_level=True)[2] == b"[UNK_BYTE_0x81\x81b]b"  # as llama.cpp
