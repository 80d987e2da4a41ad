"""Every case of llama.cpp's tokenizer test vectors (models/ggml-vocab-*.gguf.inp/.out).

Each expected line is `llama_tokenize(text, add_special=false, parse_special=false)`.
"""

from __future__ import annotations

import functools

import pytest
from vocab_data import VOCABS, load_cases, vocab_dir, vocab_path

from llamapy.tokenizer import Tokenizer

# (vocab, case index) -> reason, for cases llamapy is known to get wrong. Empty: all pass.
XFAIL: dict[tuple[str, int], str] = {}


@functools.cache
def _tokenizer(vocab: str) -> Tokenizer:
    return Tokenizer.from_gguf(vocab_path(vocab))


@functools.cache
def _cases(vocab: str) -> list[tuple[str, list[int]]]:
    return load_cases(vocab)


def _params() -> list:
    params = []
    for vocab in VOCABS:
        for i in range(len(_cases(vocab))):
            marks = []
            if (vocab, i) in XFAIL:
                marks.append(pytest.mark.xfail(strict=True, reason=XFAIL[vocab, i]))
            params.append(pytest.param(vocab, i, marks=marks, id=f"{vocab}-{i}"))
    return params


@pytest.mark.parametrize(("vocab", "index"), _params())
def test_vocab_case(vocab: str, index: int) -> None:
    text, expected = _cases(vocab)[index]
    assert _tokenizer(vocab).encode(text, add_special=False, parse_special=False) == expected


def test_vocab_list_is_complete() -> None:
    """Every vocab with test files in the sdist is in VOCABS, and has cases."""
    found = sorted(
        p.name[len("ggml-vocab-") : -len(".gguf.inp")] for p in vocab_dir().glob("*.gguf.inp")
    )
    assert found == sorted(VOCABS)
    for vocab in VOCABS:
        assert len(_cases(vocab)) >= 40


@pytest.mark.parametrize("vocab", ["gpt-2", "llama-spm", "bert-bge", "gemma-4"])
def test_vocab_round_trip(vocab: str) -> None:
    """decode(encode(x)) gives x back for plain text (up to each vocab's normalization)."""
    tok = _tokenizer(vocab)
    text = "Hello world, this is a test of 12345 things."
    ids = tok.encode(text, add_special=False)
    decoded = tok.decode(ids)
    if vocab == "bert-bge":  # lower-cased, punctuation split off, leading space
        assert decoded.strip() == "hello world, this is a test of 12345 things."
    else:
        assert decoded == text
