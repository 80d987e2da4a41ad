"""A Hugging Face `tokenizer.json` as GGUF `tokenizer.*` metadata, as llama.cpp reads it.

Three tokenizer kinds, by `tokenizer.json`'s model:

- byte-level BPE (GPT-2, Llama 3, Qwen, SmolLM): `tokenizer.ggml.model = "gpt2"`, the
  tokens, merges and the pre-tokenizer name llama.cpp keys its split regexes on;
- SentencePiece (a BPE with byte fallback, as Llama 2 / Gemma fast tokenizers, or a
  Unigram): `"llama"`, tokens with scores (a BPE token's score is minus the rank of the
  merge that makes it, so llama.cpp's score-ordered merging replays the merge order) and
  types (`<0xXX>` bytes, control, user-defined);
- WordPiece (BERT): `"bert"`, tokens in llama.cpp's phantom-space form (`##ing` -> `ing`,
  `word` -> `▁word`).

Special token ids, the add-BOS/EOS flags, merges of other files and the chat template come
from gguf-py's `SpecialVocab` (the format library's reading of the HF files).
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import Any

import gguf
from gguf import Keys, TokenType

from llamapy.errors import ModelFormatError, UnsupportedError

logger = logging.getLogger(__name__)

# Split regexes of tokenizer.json pre-tokenizers -> llama.cpp's `tokenizer.ggml.pre` names.
_CONTRACTIONS_I = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)"
_SPLIT_PRE = {
    _CONTRACTIONS_I + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+": "llama-bpe",
    _CONTRACTIONS_I + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+": "qwen2",
}
_SPECIAL_KEYS = {
    "bos": Keys.Tokenizer.BOS_ID,
    "eos": Keys.Tokenizer.EOS_ID,
    "unk": Keys.Tokenizer.UNK_ID,
    "sep": Keys.Tokenizer.SEP_ID,
    "pad": Keys.Tokenizer.PAD_ID,
    "mask": Keys.Tokenizer.MASK_ID,
}
_ADD_KEYS = {
    "bos": Keys.Tokenizer.ADD_BOS,
    "eos": Keys.Tokenizer.ADD_EOS,
    "sep": Keys.Tokenizer.ADD_SEP,
}
_BYTE_TOKEN = re.compile(r"<0x[0-9A-Fa-f]{2}>")


def _read(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ModelFormatError(f"cannot read {path}: {e}") from None


def _looks_special(text: str) -> bool:
    """convert_hf_to_gguf's does_token_look_special: <|...|>, <...> control-like tokens."""
    return (text.startswith("<|") and text.endswith("|>")) or text in (
        "<s>",
        "</s>",
        "<unk>",
        "<pad>",
        "<mask>",
        "<bos>",
        "<eos>",
    )


def _pieces(data: dict[str, Any]) -> tuple[dict[int, str], dict[int, dict[str, Any]]]:
    """id -> token text of the model vocab, and id -> added-token record."""
    model = data["model"]
    vocab = model.get("vocab")
    if isinstance(vocab, dict):
        base = {int(i): str(t) for t, i in vocab.items()}
    elif isinstance(vocab, list):  # Unigram: [[piece, score], ...]
        base = {i: str(entry[0]) for i, entry in enumerate(vocab)}
    else:
        raise ModelFormatError("tokenizer.json has no model vocab")
    added = {int(t["id"]): t for t in data.get("added_tokens") or []}
    return base, added


def _token_table(
    data: dict[str, Any], n_vocab: int
) -> tuple[list[str], list[int], dict[int, dict[str, Any]]]:
    """Tokens and types for ids 0..n-1 (unused ids padded as `[PAD{i}]`, as the converter)."""
    base, added = _pieces(data)
    n = max(n_vocab, max(base, default=-1) + 1, max(added, default=-1) + 1)
    tokens, types = [], []
    for i in range(n):
        if i in added:
            rec = added[i]
            text = str(rec["content"])
            special = rec.get("special") or _looks_special(text)
            tokens.append(text)
            types.append(TokenType.CONTROL if special else TokenType.USER_DEFINED)
        elif i in base:
            tokens.append(base[i])
            types.append(TokenType.NORMAL)
        else:
            tokens.append(f"[PAD{i}]")
            types.append(TokenType.UNUSED)
    return tokens, [int(t) for t in types], added


def _pre_tokenizers(data: dict[str, Any]) -> list[dict[str, Any]]:
    pre = data.get("pre_tokenizer") or {}
    if pre.get("type") == "Sequence":
        return list(pre.get("pretokenizers") or [])
    return [pre] if pre else []


def bpe_pre_name(data: dict[str, Any]) -> str:
    """llama.cpp's pre-tokenizer name for a byte-level BPE `tokenizer.json`.

    Raises:
        UnsupportedError: a pre-tokenizer llamapy does not recognize.
    """
    steps = _pre_tokenizers(data)
    kinds = [s.get("type") for s in steps]
    if kinds == ["ByteLevel"] and steps[0].get("use_regex", True):
        return "gpt-2"
    if kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits"):
        return "smollm"  # SmolLM / StarCoder: digits one by one, then GPT-2's regex
    if kinds and kinds[0] == "Split" and kinds[-1] == "ByteLevel":
        pattern = (steps[0].get("pattern") or {}).get("Regex")
        name = _SPLIT_PRE.get(pattern or "")
        if name is not None and len(steps) == 2:
            return name
    raise UnsupportedError(
        f"the BPE pre-tokenizer {json.dumps(data.get('pre_tokenizer'))[:200]} is not "
        "recognized; llama.cpp needs its name (tokenizer.ggml.pre)"
    )


def _is_byte_level(data: dict[str, Any]) -> bool:
    return any(s.get("type") == "ByteLevel" for s in _pre_tokenizers(data)) or (
        (data.get("decoder") or {}).get("type") == "ByteLevel"
    )


def _merges(model: dict[str, Any]) -> list[str]:
    return [m if isinstance(m, str) else " ".join(m) for m in model.get("merges") or []]


def _gpt2(data: dict[str, Any], n_vocab: int) -> dict[str, Any]:
    tokens, types, _ = _token_table(data, n_vocab)
    return {
        Keys.Tokenizer.MODEL: "gpt2",
        Keys.Tokenizer.PRE: bpe_pre_name(data),
        Keys.Tokenizer.LIST: tokens,
        Keys.Tokenizer.TOKEN_TYPE: types,
        Keys.Tokenizer.MERGES: _merges(data["model"]),
    }


def _add_space_prefix(data: dict[str, Any]) -> bool:
    """SentencePiece's add_dummy_prefix as tokenizer.json spells it (a Metaspace that
    prepends, or a normalizer that prepends '▁')."""
    for step in _pre_tokenizers(data):
        if step.get("type") == "Metaspace":
            return step.get("prepend_scheme", "always") != "never" and step.get(
                "add_prefix_space", True
            )
    norm = data.get("normalizer") or {}
    steps = norm.get("normalizers") if norm.get("type") == "Sequence" else [norm]
    return any(s.get("type") == "Prepend" for s in steps or [] if s)


def _spm(data: dict[str, Any], n_vocab: int) -> dict[str, Any]:
    model = data["model"]
    tokens, types, added = _token_table(data, n_vocab)
    scores = [0.0] * len(tokens)
    if model["type"] == "Unigram":
        for i, entry in enumerate(model["vocab"]):
            scores[i] = float(entry[1])
    else:  # BPE: minus the rank of the merge that makes each token
        index = {t: i for i, t in enumerate(tokens)}
        for rank, merge in enumerate(_merges(model)):
            i = index.get(merge.replace(" ", "", 1))
            if i is not None and scores[i] == 0.0:
                scores[i] = -float(rank + 1)
    unk = model.get("unk_token")
    if isinstance(unk, str):
        unk = next((i for i, t in enumerate(tokens) if t == unk), None)
    elif model.get("unk_id") is not None:
        unk = int(model["unk_id"])
    for i, text in enumerate(tokens):
        if _BYTE_TOKEN.fullmatch(text):  # byte fallback pieces, wherever they were listed
            types[i] = int(TokenType.BYTE)
        if i == unk:
            types[i] = int(TokenType.UNKNOWN)
        if i in added and types[i] == TokenType.USER_DEFINED:
            tokens[i] = text.replace("\u2581", " ")
    return {
        Keys.Tokenizer.MODEL: "llama",
        Keys.Tokenizer.PRE: "default",
        Keys.Tokenizer.LIST: tokens,
        Keys.Tokenizer.SCORES: scores,
        Keys.Tokenizer.TOKEN_TYPE: types,
        Keys.Tokenizer.ADD_PREFIX: _add_space_prefix(data),
    }


def _wordpiece(data: dict[str, Any], n_vocab: int) -> dict[str, Any]:
    tokens, types, _ = _token_table(data, n_vocab)
    prefix = data["model"].get("continuing_subword_prefix") or "##"
    for i, text in enumerate(tokens):
        if types[i] in (TokenType.CONTROL, TokenType.UNUSED):
            continue
        tokens[i] = text[len(prefix) :] if text.startswith(prefix) else "\u2581" + text
    norm = data.get("normalizer") or {}
    return {
        Keys.Tokenizer.MODEL: "bert",
        Keys.Tokenizer.PRE: "default",
        Keys.Tokenizer.LIST: tokens,
        Keys.Tokenizer.TOKEN_TYPE: types,
        "tokenizer.ggml.normalizer.lowercase": bool(norm.get("lowercase", True)),
    }


def tokenizer_metadata(folder: Path, n_vocab: int) -> dict[str, Any]:
    """The `tokenizer.*` keys of a HF folder's tokenizer; `n_vocab` pads the token list to the
    model's embedding rows (0: no padding).

    Raises:
        UnsupportedError: no tokenizer.json, or a tokenizer kind llama.cpp cannot run.
    """
    path = folder / "tokenizer.json"
    if not path.is_file():
        raise UnsupportedError(
            f"{folder} has no tokenizer.json (only tokenizer.json tokenizers are converted); "
            "use --no-vocab to write the model without one"
        )
    data = _read(path)
    kind = (data.get("model") or {}).get("type")
    if kind == "WordPiece":
        md = _wordpiece(data, n_vocab)
    elif kind == "BPE" and _is_byte_level(data):
        md = _gpt2(data, n_vocab)
    elif kind == "Unigram" or (kind == "BPE" and data["model"].get("byte_fallback")):
        md = _spm(data, n_vocab)
    else:
        raise UnsupportedError(
            f"tokenizer.json model {kind!r} cannot be written to GGUF (llama.cpp runs BPE, "
            "SentencePiece and WordPiece); use --no-vocab to write the model without it"
        )
    md.update(_special_metadata(folder, len(md[Keys.Tokenizer.LIST]), md[Keys.Tokenizer.MODEL]))
    return md


def _special_metadata(folder: Path, n_tokens: int, model: str) -> dict[str, Any]:
    special = gguf.SpecialVocab(folder, load_merges=False, n_vocab=n_tokens)
    md: dict[str, Any] = {}
    for typ, tid in special.special_token_ids.items():
        if typ in _SPECIAL_KEYS:
            md[_SPECIAL_KEYS[typ]] = int(tid)
    for typ, value in special.add_special_token.items():
        if typ in _ADD_KEYS:
            md[_ADD_KEYS[typ]] = bool(value)
    if model == "bert":  # llama.cpp's WPM adds [CLS] ... [SEP]
        md.setdefault(Keys.Tokenizer.ADD_BOS, True)
        md.setdefault(Keys.Tokenizer.ADD_EOS, True)
    template = special.chat_template
    if isinstance(template, str):
        md[Keys.Tokenizer.CHAT_TEMPLATE] = template
    elif isinstance(template, list):  # named templates
        for entry in template:
            name, text = entry.get("name"), entry.get("template")
            if name == "default":
                md[Keys.Tokenizer.CHAT_TEMPLATE] = text
            elif name and text:
                md[Keys.Tokenizer.CHAT_TEMPLATE_N.format(name=name)] = text
    elif (folder / "chat_template.jinja").is_file():
        md[Keys.Tokenizer.CHAT_TEMPLATE] = (folder / "chat_template.jinja").read_text("utf-8")
    return md
