"""Vocab loading rules (llama_vocab::impl::load) on small synthetic metadata."""

from __future__ import annotations

import numpy as np
import pytest

from llamapy.errors import ModelFormatError, UnsupportedError
from llamapy.tokenizer import TokenIdError, Tokenizer
from llamapy.tokenizer.pretokenizers import pre_tokenizer_for, supported_names

BYTES = [chr(c) for c in range(0x21, 0x7F)] + ["Ġ", "Ċ"]


def _bpe_md(pre: str = "gpt-2", extra_tokens: tuple[str, ...] = (), **kw: object) -> dict:
    tokens = [*BYTES, "he", "hel", "hell", "hello", *extra_tokens]
    types = np.ones(len(tokens), dtype=np.int32)
    for k, t in enumerate(tokens):
        if t.startswith("<"):
            types[k] = 3
    md = {
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": pre,
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.token_type": types,
        "tokenizer.ggml.merges": ["h e", "he l", "hel l", "hell o"],
    }
    md.update({f"tokenizer.ggml.{k}": v for k, v in kw.items()})
    return md


def test_unknown_model_is_named() -> None:
    md = _bpe_md()
    md["tokenizer.ggml.model"] = "rwkv"
    with pytest.raises(UnsupportedError, match="'rwkv'"):
        Tokenizer.from_metadata(md)


def test_unknown_pre_tokenizer_is_named() -> None:
    with pytest.raises(UnsupportedError, match="'no-such-pre'"):
        Tokenizer.from_metadata(_bpe_md(pre="no-such-pre"))


def test_missing_tokenizer() -> None:
    with pytest.raises(ModelFormatError):
        Tokenizer.from_metadata({"general.architecture": "llama"})


@pytest.mark.parametrize("name", supported_names())
def test_every_pre_tokenizer_compiles(name: str) -> None:
    tok = Tokenizer.from_metadata(_bpe_md(pre=name))
    assert tok.vocab.pre == pre_tokenizer_for(name)
    assert tok.encode("hello", add_special=False) == [tok.piece_to_id("hello")]


def test_bos_eos_and_eog() -> None:
    md = _bpe_md(
        pre="llama-bpe", extra_tokens=("<|im_end|>", "<|eot_id|>", "<s>", "</s>"),
        bos_token_id=len(BYTES) + 6, eos_token_id=len(BYTES) + 7, add_eos_token=True,
    )  # fmt: skip
    tok = Tokenizer.from_metadata(md)
    assert tok.add_bos  # llama-bpe sets it
    bos, eos = tok.bos_id, tok.eos_id
    ids = tok.encode("hello")
    assert ids[0] == bos and ids[-1] == eos
    assert tok.eog_ids == {eos, tok.piece_to_id("<|im_end|>"), tok.piece_to_id("<|eot_id|>")}
    assert tok.vocab.ids["eot"] in tok.eog_ids


def test_decode_out_of_range() -> None:
    tok = Tokenizer.from_metadata(_bpe_md())
    with pytest.raises(TokenIdError, match="outside the vocabulary"):
        tok.decode([0, tok.vocab_size])
    with pytest.raises(TokenIdError):
        tok.id_to_piece(-1)
