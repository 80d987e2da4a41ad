"""IncrementalDetokenizer: streamed text equals decode(all ids) and is never broken UTF-8."""

from __future__ import annotations

import functools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from vocab_data import vocab_path

from llamapy.tokenizer import IncrementalDetokenizer, Tokenizer

# byte-level BPE with clean_spaces, SPM with byte fallback and a space prefix, WordPiece;
# byte-level BPE without clean_spaces (qwen2: the incremental UTF-8 decoder's path, as
# llama-spm)
VOCABS = ("gpt-2", "llama-spm", "bert-bge", "llama-bpe", "qwen2")
TRICKY = "😀👍🏽👨‍👩‍👧 日本語の中文한국어 café e\u0301 ' 's 're ?!., ' \n\t  x"


@functools.cache
def _tok(vocab: str) -> Tokenizer:
    return Tokenizer.from_gguf(vocab_path(vocab))


@functools.cache
def _tricky_ids(vocab: str) -> tuple[int, ...]:
    """Ids that split multi-byte characters or trigger clean_spaces."""
    tok = _tok(vocab)
    return tuple(sorted(set(tok.encode(TRICKY, add_special=False))))


def _ids(vocab: str) -> st.SearchStrategy[list[int]]:
    tok = _tok(vocab)
    any_id = st.integers(0, tok.vocab_size - 1)
    return st.lists(st.one_of(any_id, st.sampled_from(_tricky_ids(vocab))), max_size=40)


def _stream(tok: Tokenizer, ids: list[int], skip_special: bool) -> list[str]:
    detok = IncrementalDetokenizer(tok, skip_special=skip_special)
    return [detok.add(i) for i in ids] + [detok.flush()]


@pytest.mark.parametrize("vocab", VOCABS)
@settings(max_examples=150, deadline=None)
@given(data=st.data(), skip_special=st.booleans())
def test_stream_equals_decode(vocab: str, data: st.DataObject, skip_special: bool) -> None:
    tok = _tok(vocab)
    ids = data.draw(_ids(vocab))
    parts = _stream(tok, ids, skip_special)
    assert "".join(parts) == tok.decode(ids, skip_special=skip_special)
    for part in parts[:-1]:  # only the final flush may hold U+FFFD of an unfinished char
        assert "\ufffd" not in part or "\ufffd" in tok.decode(ids, skip_special=skip_special)


@pytest.mark.parametrize("vocab", VOCABS)
def test_emoji_bytes_wait_for_the_whole_character(vocab: str) -> None:
    tok = _tok(vocab)
    text = "ok 😀 日本"
    ids = tok.encode(text, add_special=False)
    parts = _stream(tok, ids, skip_special=False)
    assert "".join(parts) == tok.decode(ids)
    assert all("\ufffd" not in p for p in parts)


def test_long_stream() -> None:
    tok = _tok("gpt-2")
    text = ("It's a test, isn't it? Yes ' it is. " * 200) + "😀"
    ids = tok.encode(text, add_special=False)
    assert "".join(_stream(tok, ids, False)) == tok.decode(ids)
