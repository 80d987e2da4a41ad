"""Tokenizers from a Hugging Face folder: tokenizer.json (+ tokenizer_config.json).

The folder's own pipeline (normalizer, pre-tokenizer, model) encodes raw text; special
tokens, BOS/EOS, EOG ids and decoding follow the same llama.cpp rules as for GGUF files.
Added tokens marked special are control tokens; the others are user-defined.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer as _Backend

from llamapy.errors import ModelFormatError, UnsupportedError
from llamapy.tokenizer.pretokenizers import PreTokenizer
from llamapy.tokenizer.vocab import (
    TokenAttr,
    Vocab,
    _eog_ids,
    _guess_special_ids,
    _mark_unused,
)

_KINDS = {"BPE": "bpe", "WordPiece": "wpm", "Unigram": "spm"}


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ModelFormatError(f"cannot read {path}: {e}") from e


def _content(value: Any) -> str | None:
    return value.get("content") if isinstance(value, dict) else value


def vocab_and_backend_from_hf(folder: Path) -> tuple[Vocab, _Backend]:
    path = folder / "tokenizer.json"
    if not path.is_file():
        raise UnsupportedError(f"{folder} has no tokenizer.json (only that format is supported)")
    data = _read_json(path)
    config = _read_json(folder / "tokenizer_config.json") if (
        folder / "tokenizer_config.json").is_file() else {}  # fmt: skip
    model_type = data.get("model", {}).get("type")
    if model_type not in _KINDS:
        raise UnsupportedError(f"tokenizer model '{model_type}' in {path} is not supported")
    backend = _Backend.from_file(str(path))
    backend.encode_special_tokens = True  # control tokens are split out by llamapy
    backend.no_padding()
    backend.no_truncation()
    vocab = _vocab(data, config, backend, _KINDS[model_type])
    return vocab, backend


def _vocab(data: dict, config: dict, backend: _Backend, kind: str) -> Vocab:
    t2i = backend.get_vocab(with_added_tokens=True)
    tokens = [""] * (max(t2i.values()) + 1)
    for text, i in t2i.items():
        tokens[i] = text
    attrs = [int(TokenAttr.NORMAL)] * len(tokens)
    if data["model"].get("byte_fallback"):
        for i, t in enumerate(tokens):
            if len(t) == 6 and t.startswith("<0x") and t.endswith(">"):
                attrs[i] = int(TokenAttr.BYTE)
    for added in data.get("added_tokens", []):
        attrs[added["id"]] = int(TokenAttr.CONTROL if added["special"] else TokenAttr.USER_DEFINED)
    decoder = json.dumps(data.get("decoder"))
    byte_level = kind == "bpe" and "ByteLevel" in decoder
    vocab = Vocab(
        model=f"hf-{kind}", kind=kind if kind != "bpe" or byte_level else "spm",
        pre=PreTokenizer("tokenizer.json", (), byte_encode=byte_level) if byte_level else None,
        tokens=tokens, attrs=attrs, scores=None, merges=[], ids={}, token_to_id=dict(t2i),
        clean_spaces=bool(config.get("clean_up_tokenization_spaces", kind == "wpm")),
        add_space_prefix="Metaspace" in decoder or '"Strip"' in decoder,
    )  # fmt: skip
    if kind == "wpm":
        vocab.display = [t[2:] if t.startswith("##") else "▁" + t for t in tokens]
    _special_ids(vocab, data, config)
    _guess_special_ids(vocab)
    _mark_unused(vocab)
    vocab.eog_ids = frozenset(_eog_ids(vocab))
    return vocab


def _special_ids(vocab: Vocab, data: dict, config: dict) -> None:
    t2i = vocab.token_to_id
    names = {"bos": "bos_token", "eos": "eos_token", "unk": "unk_token", "pad": "pad_token",
             "sep": "sep_token", "mask": "mask_token"}  # fmt: skip
    for name, key in names.items():
        text = _content(config.get(key))
        vocab.ids[name] = t2i.get(text) if text else None
    if vocab.kind == "wpm":
        cls = _content(config.get("cls_token"))
        vocab.ids["bos"] = t2i.get(cls) if cls else vocab.ids["bos"]
    single = (data.get("post_processor") or {}).get("single") or []
    first = single[0].get("SpecialToken", {}).get("id") if single else None
    last = single[-1].get("SpecialToken", {}).get("id") if single else None
    bos = vocab.tokens[vocab.ids["bos"]] if vocab.ids.get("bos") is not None else None
    eos = vocab.tokens[vocab.ids["eos"]] if vocab.ids.get("eos") is not None else None
    vocab.add_bos = bool(config.get("add_bos_token", first is not None and first == bos))
    vocab.add_eos = bool(config.get("add_eos_token", last is not None and last == eos))
