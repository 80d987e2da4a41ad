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
from llamapy.tokenizer.vocab import TokenAttr


def _by_character(text: str) -> bytes:
    """The definition, one character at a time: its byte, or llama.cpp's marker."""
    out = b""
    for c in text:
        if c in UNICODE_TO_BYTE:
            out += bytes([UNICODE_TO_BYTE[c]])
        else:
            out += b"[UNK_BYTE_0x" + c.encode().hex().encode() + text.encode() + b"]"
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


@settings(max_examples=300, deadline=None)
@given(st.lists(st.one_of(st.sampled_from(MAPPED), st.characters()), max_size=12))
def test_mixed_strings(chars: list[str]) -> None:
    text = "".join(chars)
    assert _decode_byte_level(text) == _by_character(text)
