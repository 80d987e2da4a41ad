"""SmolLM2 and Gemma 3 tokenization against llama.cpp's, from committed reference files.

The files come from scripts/make_tokenizer_refs.py (llama-cpp-python, vocab_only=True).
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest
from corpus import corpus_chunks, corpus_text, ids_digest, sha256

from llamapy.tokenizer import Tokenizer

DATA = Path(__file__).parent / "data"
pytestmark = pytest.mark.models


def _refs(alias: str) -> dict:
    return json.loads(gzip.decompress((DATA / f"refs-{alias}.json.gz").read_bytes()))


@pytest.fixture(scope="module")
def smollm2(smollm2_path: Path) -> Tokenizer:
    return Tokenizer.from_gguf(smollm2_path)


@pytest.fixture(scope="module")
def gemma3(gemma3_path: Path) -> Tokenizer:
    return Tokenizer.from_gguf(gemma3_path)


def _check_hard(tok: Tokenizer, refs: dict) -> None:
    wrong = [
        (text, add, parse, expected, tok.encode(text, add, parse))
        for text, add, parse, expected in refs["hard"]
        if tok.encode(text, add, parse) != expected
    ]
    assert not wrong, f"{len(wrong)} of {len(refs['hard'])} differ, first: {wrong[0]}"


def _check_corpus(tok: Tokenizer, refs: dict) -> None:
    text = corpus_text()
    if sha256(text) != refs["corpus"]["sha256"]:
        pytest.skip("this Python's standard library text differs from the reference corpus")
    chunks = corpus_chunks(text)
    expected = refs["corpus"]["chunks"]
    assert len(chunks) == len(expected)
    encoded = [tok.encode(c, add_special=False) for c in chunks]
    wrong = [k for k, (ids, exp) in enumerate(zip(encoded, expected, strict=True))
             if [len(ids), ids_digest(ids)] != exp]  # fmt: skip
    assert not wrong, f"{len(wrong)} of {len(chunks)} chunks differ (first: {wrong[0]})"


def test_smollm2_hard_strings(smollm2: Tokenizer) -> None:
    _check_hard(smollm2, _refs("smollm2-135m"))


def test_gemma3_hard_strings(gemma3: Tokenizer) -> None:
    _check_hard(gemma3, _refs("gemma3-270m"))


@pytest.mark.slow
def test_smollm2_corpus(smollm2: Tokenizer) -> None:
    _check_corpus(smollm2, _refs("smollm2-135m"))


@pytest.mark.slow
def test_gemma3_corpus(gemma3: Tokenizer) -> None:
    _check_corpus(gemma3, _refs("gemma3-270m"))


def test_smollm2_specials(smollm2: Tokenizer) -> None:
    assert smollm2.bos_id == 1 and smollm2.eos_id == 2
    assert {0, 2} <= smollm2.eog_ids  # <|endoftext|>, <|im_end|>
    assert not smollm2.add_bos
    text = "<|im_start|>user\nhi<|im_end|>"
    assert smollm2.encode(text, parse_special=True)[0] == 1
    assert 1 not in smollm2.encode(text, parse_special=False)


def test_gemma3_specials(gemma3: Tokenizer) -> None:
    assert gemma3.bos_id == 2 and gemma3.eos_id == 1 and gemma3.add_bos
    assert gemma3.piece_to_id("<end_of_turn>") in gemma3.eog_ids
    assert gemma3.encode("hi")[0] == 2
    assert gemma3.vocab_size == 262144
    ids = gemma3.encode("<start_of_turn>user\nhi<end_of_turn>", parse_special=True)
    assert gemma3.decode(ids) == "<bos><start_of_turn>user\nhi<end_of_turn>"
    assert gemma3.decode(ids, skip_special=True) == "user\nhi"
