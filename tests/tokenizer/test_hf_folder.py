"""Tokenizers from Hugging Face folders (tokenizer.json), checked against `tokenizers` itself."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from tokenizers import Tokenizer as HFTokenizer

from llamapy.errors import UnsupportedError
from llamapy.tokenizer import Tokenizer

TEXTS = ["Hello world! Café 日本 x", "It's a test, isn't it?", "  spaces\tand\nlines  "]


@pytest.mark.models
def test_minilm_matches_tokenizers(minilm_path: Path) -> None:
    tok = Tokenizer.from_path(minilm_path)
    ref = HFTokenizer.from_file(str(minilm_path / "tokenizer.json"))
    ref.no_padding()
    for text in TEXTS:
        assert tok.encode(text) == ref.encode(text).ids
        assert tok.encode(text, add_special=False) == ref.encode(text).ids[1:-1]
    assert tok.bos_id == 101 and tok.vocab.ids["sep"] == 102
    # special-token text stays text unless parse_special (llama_tokenize semantics)
    assert 102 not in tok.encode("a [SEP] b", add_special=False)
    assert 102 in tok.encode("a [SEP] b", add_special=False, parse_special=True)
    ids = tok.encode("hello world")
    assert tok.decode(ids, skip_special=True).strip() == "hello world"


def test_byte_level_bpe_folder(tmp_path: Path) -> None:
    """A small byte-level BPE tokenizer.json with an added special token."""
    from tokenizers import decoders, models, pre_tokenizers, trainers

    hf = HFTokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<|end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )  # fmt: skip
    hf.train_from_iterator(["hello world, hello tokens 😀 日本"] * 20, trainer)
    hf.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|end|>"}))
    tok = Tokenizer.from_path(tmp_path)
    end = tok.piece_to_id("<|end|>")
    assert tok.eos_id == end and end in tok.eog_ids
    text = "hello 😀 world<|end|>"
    assert end not in tok.encode(text)
    ids = tok.encode(text, parse_special=True)
    assert ids[-1] == end and ids[:-1] == hf.encode("hello 😀 world").ids
    assert tok.decode(ids) == text
    assert tok.decode(ids, skip_special=True) == "hello 😀 world"


def test_folder_without_tokenizer_json(tmp_path: Path) -> None:
    with pytest.raises(UnsupportedError, match="tokenizer.json"):
        Tokenizer.from_path(tmp_path)
