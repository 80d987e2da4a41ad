"""The vocabulary as llama.cpp sees it: tokens, attributes, special ids and flags.

`vocab_from_gguf` mirrors `llama_vocab::impl::load` (llama.cpp src/llama-vocab.cpp): the
defaults per tokenizer model, the per-pre-tokenizer overrides, the metadata overrides, the
EOG set and the attribute fix-ups, in the same order.
"""

from __future__ import annotations

import enum
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from llamapy.errors import ModelFormatError, UnsupportedError
from llamapy.tokenizer.pretokenizers import PreTokenizer, pre_tokenizer_for

log = logging.getLogger(__name__)


class TokenAttr(enum.IntFlag):
    """`llama_token_attr`: a token's kind, as bits."""

    UNDEFINED = 0
    UNKNOWN = 1 << 0
    UNUSED = 1 << 1
    NORMAL = 1 << 2
    CONTROL = 1 << 3
    USER_DEFINED = 1 << 4
    BYTE = 1 << 5
    NORMALIZED = 1 << 6
    LSTRIP = 1 << 7
    RSTRIP = 1 << 8
    SINGLE_WORD = 1 << 9


# GGUF `tokenizer.ggml.token_type` values (`llama_token_type`) -> attributes.
_TYPE_TO_ATTR = {
    0: TokenAttr.UNDEFINED,
    1: TokenAttr.NORMAL,
    2: TokenAttr.UNKNOWN,
    3: TokenAttr.CONTROL,
    4: TokenAttr.USER_DEFINED,
    5: TokenAttr.UNUSED,
    6: TokenAttr.BYTE,
}

# Tokenizer models llamapy implements, and the llama.cpp vocab type each one is.
_MODEL_KINDS = {"llama": "spm", "gpt2": "bpe", "gemma4": "bpe", "bert": "wpm"}

# Default special ids per vocab type (`llama_vocab::impl::load`); None is LLAMA_TOKEN_NULL.
_DEFAULT_IDS: dict[str, dict[str, int | None]] = {
    "spm": {"bos": 1, "eos": 2, "unk": 0},
    "wpm": {"bos": 101, "unk": 100, "sep": 102, "pad": 0, "mask": 103},
    "bpe": {"bos": 11, "eos": 11},
}
_GEMMA4_DEFAULT_IDS: dict[str, int | None] = {}

_ID_KEYS = (
    ("bos", "bos_token_id"),
    ("eos", "eos_token_id"),
    ("eot", "eot_token_id"),
    ("eom", "eom_token_id"),
    ("unk", "unknown_token_id"),
    ("sep", "seperator_token_id"),  # sic: the GGUF key is spelled this way
    ("pad", "padding_token_id"),
    ("mask", "mask_token_id"),
    ("fim_pre", "fim_pre_token_id"),
    ("fim_suf", "fim_suf_token_id"),
    ("fim_mid", "fim_mid_token_id"),
    ("fim_pad", "fim_pad_token_id"),
    ("fim_rep", "fim_rep_token_id"),
    ("fim_sep", "fim_sep_token_id"),
    ("fim_pre", "prefix_token_id"),
    ("fim_suf", "suffix_token_id"),
    ("fim_mid", "middle_token_id"),
)

# Token texts that llama.cpp takes as EOT / EOM / FIM when the metadata does not say.
_EOT_TEXTS = (
    "<|eot_id|>", "<|im_end|>", "<|end|>", "<end_of_turn>", "<|endoftext|>",
    "<|end_of_text|>", "<EOT>", "_<EOT>", "[EOT]", "<｜end▁of▁sentence｜>",
    "<end_of_utterance>",
)  # fmt: skip
_EOM_TEXTS = ("<|eom_id|>",)
_FIM_TEXTS = {
    "fim_pre": ("<|fim_prefix|>", "<fim-prefix>", "<fim_prefix>", "<｜fim▁begin｜>", "<PRE>",
                "▁<PRE>", "<|code_prefix|>", "<|prefix|>"),
    "fim_suf": ("<|fim_suffix|>", "<fim-suffix>", "<fim_suffix>", "<｜fim▁hole｜>", "<SUF>",
                "▁<SUF>", "<|code_suffix|>", "<|suffix|>"),
    "fim_mid": ("<|fim_middle|>", "<fim-middle>", "<fim_middle>", "<｜fim▁end｜>", "<MID>",
                "▁<MID>", "<|code_middle|>", "<|middle|>"),
    "fim_pad": ("<|fim_pad|>", "<fim-pad>", "<fim_pad>", "<PAD>", "[PAD]"),
    "fim_rep": ("<|fim_repo|>", "<|repo_name|>", "<fim-repo>", "<REPO>", "<reponame>"),
    "fim_sep": ("<|file_sep|>",),
}  # fmt: skip
_EOG_TEXTS = frozenset((
    "<|eot_id|>", "<|im_end|>", "<|end|>", "<|return|>", "<|call|>", "<|flush|>", "<|calls|>",
    "<end_of_turn>", "<|endoftext|>", "</s>", "<|eom_id|>", "<EOT>", "_<EOT>", "[EOT]", "[EOS]",
    "<|end_of_text|>", "<end_of_utterance>", "<eos>", "<turn|>", "<|tool_response>",
    "<｜end▁of▁sentence｜>", "[e~[",
))  # fmt: skip


@dataclass(slots=True)
class Vocab:
    """Everything the tokenizer needs from the model file, resolved as llama.cpp does."""

    model: str  # tokenizer.ggml.model: "llama", "gpt2", "gemma4", "bert"
    kind: str  # llama.cpp vocab type: "spm", "bpe", "wpm"
    pre: PreTokenizer | None  # BPE only
    tokens: list[str]
    attrs: list[int]
    scores: np.ndarray | None
    merges: list[str]
    ids: dict[str, int | None]
    add_bos: bool = False
    add_eos: bool = False
    add_sep: bool = False
    add_space_prefix: bool = False
    escape_whitespaces: bool = False
    clean_spaces: bool = False
    ignore_merges: bool = False
    lowercase: bool = True  # llama_vocab::normalizer_options defaults (WPM only)
    strip_accents: bool = True
    eog_ids: frozenset[int] = frozenset()
    token_to_id: dict[str, int] = field(default_factory=dict)
    # what NORMAL tokens decode from, when not `tokens` (HF WordPiece's "##" convention)
    display: list[str] | None = None

    @property
    def size(self) -> int:
        return len(self.tokens)

    def special_ids(self) -> list[int]:
        """Control, user-defined and unknown tokens, longest text first (cache_special_tokens)."""
        # a plain int mask: an int & an IntFlag calls the flag's Python __rand__ per token
        mask = int(TokenAttr.CONTROL | TokenAttr.USER_DEFINED | TokenAttr.UNKNOWN)
        ids = [i for i, a in enumerate(self.attrs) if a & mask]
        # llama.cpp's std::sort is not stable; ties (same length) cannot overlap at the same
        # position, so any order among them gives the same partition in practice.
        ids.sort(key=lambda i: -len(self.tokens[i].encode()))
        return ids


def _get(md: Mapping[str, Any], key: str, default: Any = None) -> Any:
    return md.get(f"tokenizer.ggml.{key}", default)


def vocab_from_gguf(md: Mapping[str, Any]) -> Vocab:
    """Build a `Vocab` from GGUF metadata, as `llama_vocab::impl::load` does."""
    model = _get(md, "model")
    if model is None:
        raise ModelFormatError("the GGUF file has no tokenizer (tokenizer.ggml.model is missing)")
    if model not in _MODEL_KINDS:
        raise UnsupportedError(f"tokenizer model '{model}' is not supported")
    kind = _MODEL_KINDS[model]
    tokens = _get(md, "tokens")
    if not isinstance(tokens, list) or not tokens:
        raise ModelFormatError("the GGUF file has no token list (tokenizer.ggml.tokens)")
    vocab = Vocab(
        model=model, kind=kind, pre=None, tokens=list(tokens), attrs=_attrs(md, len(tokens)),
        scores=_scores(md, len(tokens)), merges=list(_get(md, "merges", []) or []),
        ids=dict(_GEMMA4_DEFAULT_IDS if model == "gemma4" else _DEFAULT_IDS[kind]),
    )  # fmt: skip
    if kind in ("bpe",) and not vocab.merges:
        raise ModelFormatError("the GGUF BPE tokenizer has no merges (tokenizer.ggml.merges)")
    _apply_type_defaults(vocab, md)
    _fix_empty_tokens(vocab)
    vocab.token_to_id = {t: i for i, t in enumerate(vocab.tokens)}
    if len(vocab.token_to_id) != len(vocab.tokens):
        raise ModelFormatError("the GGUF token list holds the same token text twice")
    _apply_special_ids(vocab, md)
    _apply_flags(vocab, md)
    _guess_special_ids(vocab)
    _mark_unused(vocab)
    vocab.eog_ids = frozenset(_eog_ids(vocab))
    _model_specific_attrs(vocab, md)
    return vocab


def _attrs(md: Mapping[str, Any], n: int) -> list[int]:
    types = _get(md, "token_type")
    if types is None:
        return [int(TokenAttr.NORMAL)] * n
    if len(types) < n:
        raise ModelFormatError(f"tokenizer.ggml.token_type has {len(types)} entries for {n} tokens")
    return [int(_TYPE_TO_ATTR.get(int(t), TokenAttr.UNDEFINED)) for t in np.asarray(types)[:n]]


def _scores(md: Mapping[str, Any], n: int) -> np.ndarray | None:
    scores = _get(md, "scores")
    if scores is None:
        return None
    if len(scores) < n:
        raise ModelFormatError(f"tokenizer.ggml.scores has {len(scores)} entries for {n} tokens")
    return np.asarray(scores, dtype=np.float32)[:n]


def _fix_empty_tokens(vocab: Vocab) -> None:
    for i, t in enumerate(vocab.tokens):
        if not t:  # as llama.cpp: "[EMPTY_<id>]"
            vocab.tokens[i] = f"[EMPTY_{i}]"


def _apply_type_defaults(vocab: Vocab, md: Mapping[str, Any]) -> None:
    """Per vocab type defaults, then the pre-tokenizer's overrides (BPE only)."""
    if vocab.kind == "bpe":
        vocab.clean_spaces = True
        pre_name = "gemma4" if vocab.model == "gemma4" else _get(md, "pre")
        if not pre_name:
            log.warning("missing pre-tokenizer type, using 'default' (as llama.cpp)")
            pre_name = "default"
        pre = pre_tokenizer_for(pre_name)
        vocab.pre = pre
        for key, value in pre.overrides.items():
            if key == "bos_null":
                vocab.ids["bos"] = None
            else:
                setattr(vocab, key, value)
    elif vocab.kind == "spm":
        vocab.add_space_prefix, vocab.add_bos = True, True
    elif vocab.kind == "wpm":
        vocab.clean_spaces, vocab.add_bos, vocab.add_sep = True, True, True
    vocab.add_space_prefix = bool(_get(md, "add_space_prefix", vocab.add_space_prefix))


def _apply_special_ids(vocab: Vocab, md: Mapping[str, Any]) -> None:
    n = vocab.size
    for name, value in list(vocab.ids.items()):
        if value is not None and value >= n:
            vocab.ids[name] = None  # "default special token out of vocab range, disabling"
    for name, key in _ID_KEYS:
        value = _get(md, key)
        if value is None:
            continue
        if 0 <= int(value) < n:
            vocab.ids[name] = int(value)
        else:
            log.warning("bad special token %s = %s, using default", key, value)


def _apply_flags(vocab: Vocab, md: Mapping[str, Any]) -> None:
    for attr, key in (("add_bos", "add_bos_token"), ("add_eos", "add_eos_token"),
                      ("add_sep", "add_sep_token")):  # fmt: skip
        value = _get(md, key)
        if value is not None:
            setattr(vocab, attr, bool(value))
    if vocab.pre is not None and vocab.pre.name == "gemma4":
        vocab.add_bos = True  # llama.cpp forces BOS for Gemma 4
    vocab.lowercase = bool(md.get("tokenizer.ggml.normalizer.lowercase", vocab.lowercase))
    vocab.strip_accents = bool(md.get("tokenizer.ggml.normalizer.strip_accents", vocab.lowercase))


def _control(vocab: Vocab, token_id: int) -> None:
    attr = vocab.attrs[token_id]
    if not attr & TokenAttr.CONTROL:
        log.debug("control-looking token %d %r was not control-type; overriding",
                    token_id, vocab.tokens[token_id])  # fmt: skip
        vocab.attrs[token_id] = attr | TokenAttr.CONTROL


def _guess_special_ids(vocab: Vocab) -> None:
    """EOT, EOM and FIM ids from well-known token texts when the metadata gives none."""
    guesses = {"eot": _EOT_TEXTS, "eom": _EOM_TEXTS, **_FIM_TEXTS}
    for name, texts in guesses.items():
        if vocab.ids.get(name) is not None:
            continue
        for text in texts:
            token_id = vocab.token_to_id.get(text)
            if token_id is not None:
                vocab.ids[name] = token_id
                _control(vocab, token_id)
                break


def _mark_unused(vocab: Vocab) -> None:
    control, unused = int(TokenAttr.CONTROL), int(TokenAttr.UNUSED)  # plain ints: see above
    for i, attr in enumerate(vocab.attrs):
        if attr & control and "unused" in vocab.tokens[i]:
            vocab.attrs[i] = int(attr) | unused


def _eog_ids(vocab: Vocab) -> set[int]:
    """`special_eog_ids` as `llama_vocab::impl::load` builds it."""
    eog = {vocab.ids[k] for k in ("fim_pad", "fim_rep", "fim_sep") if vocab.ids.get(k) is not None}
    for text in _EOG_TEXTS:
        token_id = vocab.token_to_id.get(text)
        if token_id is not None:
            eog.add(token_id)
            _control(vocab, token_id)
    for text in ("<|channel|>", "<|message|>", "<|start|>", "<|constrain|>"):
        token_id = vocab.token_to_id.get(text)
        if token_id is not None:
            vocab.attrs[token_id] = int(TokenAttr.USER_DEFINED)
    for name in ("eos", "eot", "eom"):
        if vocab.ids.get(name) is not None:
            eog.add(vocab.ids[name])
    texts = {vocab.tokens[i]: i for i in eog}
    has_call = "<|call|>" in texts or "<|calls|>" in texts
    if has_call and ("<|return|>" in texts or "<|flush|>" in texts) and "<|end|>" in texts:
        # gpt-oss / solar-open: <|end|> ends a message, not the generation
        end_id = texts["<|end|>"]
        eog.discard(end_id)
        vocab.attrs[end_id] = int(TokenAttr.USER_DEFINED)
    if ("<|tool_response>" in texts or "<|plamo:eos|>" in texts) and "</s>" in texts:
        eog.discard(texts["</s>"])
        vocab.attrs[texts["</s>"]] = int(TokenAttr.NORMAL)
    return eog


def _model_specific_attrs(vocab: Vocab, md: Mapping[str, Any]) -> None:
    """LSTRIP / RSTRIP fix-ups keyed on model name (end of `llama_vocab::impl::load`)."""
    name = str(md.get("general.name", "")).lower()
    pre = str(_get(md, "pre", ""))
    arch = str(md.get("general.architecture", ""))
    t2i = vocab.token_to_id
    if any(s in pre for s in ("jina-v2-de", "jina-v2-es", "jina-v2-code")) or any(
        s in arch for s in ("nomic-bert-moe", "jina-bert-v3")
    ):
        if "<mask>" in t2i:
            vocab.attrs[t2i["<mask>"]] |= TokenAttr.LSTRIP
    elif "phi-3" in name or "phi3" in name:
        for i in vocab.special_ids():
            vocab.attrs[i] |= TokenAttr.RSTRIP
        if "</s>" in t2i:
            vocab.attrs[t2i["</s>"]] |= TokenAttr.RSTRIP
        for text in ("<unk>", "<s>", "<|endoftext|>"):
            if text in t2i:
                vocab.attrs[t2i[text]] &= ~TokenAttr.RSTRIP
    elif "modern-bert" in name and "[MASK]" in t2i:
        vocab.attrs[t2i["[MASK]"]] |= TokenAttr.LSTRIP
