"""BPE pre-tokenizers: the regex lists of llama.cpp's `llm_tokenizer_bpe` constructor.

Each regex splits every piece the previous one left ("isolated": matches and the text
between matches both become pieces), exactly like `unicode_regex_split`. The names are the
`tokenizer.ggml.pre` values `llama_vocab::impl::load` accepts, with its per-name overrides.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from llamapy.errors import UnsupportedError

_CONTRACTIONS = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])"
_GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
_LLAMA3 = (
    _CONTRACTIONS
    + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2 = (
    _CONTRACTIONS
    + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN35 = (
    _CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_GPT4O = (
    r"[^\r\n\p{L}\p{N}]?((?=[\p{L}])([^a-z]))*((?=[\p{L}])([^A-Z]))+" + _CONTRACTIONS + "?"
    r"|[^\r\n\p{L}\p{N}]?((?=[\p{L}])([^a-z]))+((?=[\p{L}])([^A-Z]))*" + _CONTRACTIONS + "?"
    r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_DEEPSEEK3 = (
    r"\p{N}{1,3}",
    r"[一-龥぀-ゟ゠-ヿ]+",
    r"[!\"#$%&'()*+,\-./:;<=>?@\[\\\]^_`{|}~][A-Za-z]+|[^\r\n\p{L}\p{P}\p{S}]?[\p{L}\p{M}]+"
    r"| ?[\p{P}\p{S}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+",
)
_DEEPSEEK_LLM_LETTERS = (  # written as escapes: editors NFC-normalize some of these letters
    r"\s?[A-Za-z\x{00b5}\x{00c0}-\x{00d6}\x{00d8}-\x{00f6}\x{00f8}-\x{01ba}\x{01bc}-\x{01bf}\x{01c4}-\x{0293}"
    r"\x{0295}-\x{02af}\x{0370}-\x{0373}\x{0376}\x{0377}\x{037b}-\x{037d}\x{037f}\x{0386}\x{0388}-\x{038a}\x{038c}"
    r"\x{038e}-\x{03a1}\x{03a3}-\x{03f5}\x{03f7}-\x{0481}\x{048a}-\x{052f}\x{0531}-\x{0556}\x{10a0}-\x{10c5}"
    r"\x{13a0}-\x{13f5}\x{13f8}-\x{13fd}\x{1c90}-\x{1cba}\x{1cbd}-\x{1cbf}\x{1d00}-\x{1d2b}\x{1d6b}-\x{1d77}"
    r"\x{1d79}-\x{1d9a}\x{1e00}-\x{1f15}\x{1f18}-\x{1f1d}\x{1f20}-\x{1f45}\x{1f48}-\x{1f4d}\x{1f50}-\x{1f57}\x{1f59}"
    r"\x{1f5b}\x{1f5d}\x{1f5f}-\x{1f7d}\x{1f80}-\x{1fb4}\x{1fb6}-\x{1fbc}\x{1fbe}\x{1fc2}-\x{1fc4}\x{1fc6}-\x{1fcc}"
    r"\x{1fd0}-\x{1fd3}\x{1fd6}-\x{1fdb}\x{1fe0}-\x{1fec}\x{1ff2}-\x{1ff4}\x{1ff6}-\x{1ffc}\x{2102}\x{2107}"
    r"\x{210a}-\x{2113}\x{2115}\x{2119}-\x{211d}\x{2124}\x{2126}\x{2128}\x{212a}-\x{212d}\x{212f}-\x{2134}\x{2139}"
    r"\x{213c}-\x{213f}\x{2145}-\x{2149}\x{214e}\x{2183}\x{2184}\x{2c00}-\x{2c7b}\x{2c7e}-\x{2ce4}\x{2ceb}-\x{2cee}"
    r"\x{2cf2}\x{2cf3}\x{a640}-\x{a66d}\x{a680}-\x{a69b}\x{a722}-\x{a76f}\x{a771}-\x{a787}\x{a78b}-\x{a78e}"
    r"\x{ab70}-\x{abbf}\x{fb00}-\x{fb06}\x{fb13}-\x{fb17}\x{ff21}-\x{ff3a}\x{ff41}-\x{ff5a}"
    r"\x{10400}-\x{1044f}\x{104b0}-\x{104d3}\x{104d8}-\x{104fb}\x{10c80}-\x{10cb2}"
    r"\x{10cc0}-\x{10cf2}\x{118a0}-\x{118df}\x{1e900}-\x{1e943}]+"
)

# llama.cpp LLAMA_VOCAB_PRE_TYPE_* -> regex list (llm_tokenizer_bpe constructor).
_REGEXES: dict[str, tuple[str, ...]] = {
    "default": (
        r"[\p{P}\$\+<=>\^~\|]+",
        _GPT2,
        r"\p{N}+",
        r"[0-9][0-9][0-9]",
    ),
    "llama3": (_LLAMA3,),
    "dbrx": (_LLAMA3,),
    "chatglm4": (_LLAMA3,),
    "jais2": (
        _CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
        r"|\s*[\r\n]+|\s{512}(?!\S)|\s{256}(?!\S)|\s{128}(?!\S)|\s{64}(?!\S)|\s{32}(?!\S)"
        r"|\s{16}(?!\S)|\s{8}(?!\S)|\s{4}(?!\S)|\s{1,2}(?!\S)|\s{1}",
    ),
    "deepseek-llm": (
        r"[\r\n]",
        _DEEPSEEK_LLM_LETTERS,
        r"\s?[!-/:-~！-／：-～‘-‟　-。]+",
        r"\s+$",
        r"[一-龥ࠀ-一가-퟿]+",
        r"\p{N}+",
    ),
    "deepseek3": _DEEPSEEK3,
    "deepseek-coder": (
        r"[\r\n]",
        r"\s?\p{L}+",
        r"\s?\p{P}+",
        r"[一-龥ࠀ-一가-퟿]+",
        r"\p{N}",
    ),
    "falcon": (
        r"[\p{P}\$\+<=>\^~\|`]+",
        _GPT2,
        r"[0-9][0-9][0-9]",
    ),
    "starcoder": (r"\p{N}", _GPT2),
    "gpt2": (_GPT2,),
    "qwen2": (_QWEN2,),
    "qwen35": (_QWEN35,),
    "poro": (r" ?[^(\s|.,!?…。，、।۔،)]+",),
    "viking": (r" ?[^(\s|.,!?…。，、।۔،)]+", r"\p{N}"),
    "tekken": (
        r"[^\r\n\p{L}\p{N}]?((?=[\p{L}])([^a-z]))*((?=[\p{L}])([^A-Z]))+"
        r"|[^\r\n\p{L}\p{N}]?((?=[\p{L}])([^a-z]))+((?=[\p{L}])([^A-Z]))*"
        r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+",
    ),
    "chameleon": (
        r"<sentinel:[0-9]+>",
        r"(IMGIMG)((A|B|C|D|E|F|G|H|I){1,4})Z",
        r"([\t\n]|    |  )",
        r"\p{N}",
        r"[\p{P}!-/:-@\[-`{-~]",
        _GPT2,
    ),
    "gpt4o": (_GPT4O,),
    "bailingmoe": (
        r"'(?:[sSdDmMtT]|[lL][lL]|[vV][eE]|[rR][eE])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
        r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+",
    ),
    "seed-coder": (
        _CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1}| ?[^\s\p{L}\p{N}\r\n]+"
        r"|\s*[\r\n]+|\s+(?!\S)|\s+",
    ),
    "ufakzeka": (
        r"[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+",
    ),
    "laguna": (r"[^\n]+|[\n]+", _QWEN2),
    "exaone-moe": (
        _CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?(?:\p{L}\p{M}*(?: \p{L}\p{M}*)*)+|\p{N}"
        r"| ?[^\s\p{L}\p{N}]+[\r\n/]?|\s*[\r\n]|\s+(?!\S)|\s+",
    ),
    "minicpm5": (
        r"\p{N}{1,3}",
        _CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}+| ?[^\s\p{L}\p{N}]+[\r\n]*"
        r"|\s*[\r\n]+|\s+(?!\S)|\s+",
    ),
    "gemma4": (r"[^\n]+|[\n]+",),
}


@dataclass(frozen=True, slots=True)
class PreTokenizer:
    """A named pre-tokenizer: its regexes and the vocab flags llama.cpp sets with it."""

    name: str  # the llama.cpp pre type (lower case, e.g. "llama3")
    regexes: tuple[str, ...]
    byte_encode: bool = True  # GPT-2 byte-to-unicode mapping of each piece
    overrides: dict[str, Any] = field(default_factory=dict)


_NO_CLEAN = {"clean_spaces": False}
# tokenizer.ggml.pre -> (pre type, overrides); from `llama_vocab::impl::load`.
_NAMES: dict[str, tuple[str, dict[str, Any]]] = {
    "default": ("default", {}),
    "minicpm5": ("minicpm5", {"ignore_merges": True}),
    **{
        n: ("llama3", {"ignore_merges": True, "add_bos": True})
        for n in ("llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral",
                  "midm-2.0", "lfm2", "jina-v5-nano")
    },
    "deepseek-llm": ("deepseek-llm", _NO_CLEAN),
    "deepseek-coder": ("deepseek-coder", _NO_CLEAN),
    "deepseek-v3": ("deepseek3", _NO_CLEAN),
    "falcon": ("falcon", {}),
    "mpt": ("gpt2", {}),
    "starcoder": ("starcoder", {}),
    **{
        n: ("gpt2", {})
        for n in ("gpt-2", "phi-2", "jina-es", "jina-de", "gigachat", "jina-v2-es",
                  "jina-v2-de", "a.x-4.0", "mellum", "modern-bert", "exaone4", "olmo", "jais")
    },
    "jais-2": ("jais2", {}),
    "gemma4": ("gemma4", {"escape_whitespaces": True}),
    "granite-embed-multi-311m": ("gemma4", {"escape_whitespaces": True}),
    **{n: ("gpt2", {"add_sep": True}) for n in ("jina-v1-en", "jina-v2-code", "roberta-bpe")},
    "refact": ("starcoder", {}),
    "command-r": ("starcoder", _NO_CLEAN),
    **{n: ("qwen2", _NO_CLEAN) for n in ("qwen2", "deepseek-r1-qwen", "kormo", "f2llmv2")},
    "qwen35": ("qwen35", _NO_CLEAN),
    "stablelm2": ("qwen2", {}),
    "megrez": ("qwen2", {}),
    "dbrx": ("dbrx", {}),
    "smaug-bpe": ("dbrx", {}),
    "poro-chat": ("poro", _NO_CLEAN),
    "chatglm-bpe": ("chatglm4", {"bos_null": True}),
    "glm4": ("chatglm4", {"bos_null": True, "ignore_merges": True}),
    "glm5": ("chatglm4", {"bos_null": True, "ignore_merges": True}),
    "viking": ("viking", _NO_CLEAN),
    "tekken": ("tekken", {"clean_spaces": False, "ignore_merges": True, "add_bos": True}),
    "smollm": ("starcoder", _NO_CLEAN),
    "codeshell": ("starcoder", {}),
    "bloom": ("poro", {}),
    "gpt3-finnish": ("poro", {}),
    "exaone": ("starcoder", {}),
    "exaone-moe": ("exaone-moe", {}),
    "chameleon": ("chameleon", {"add_bos": True, "clean_spaces": False}),
    "minerva-7b": ("starcoder", {}),
    **{n: ("gpt4o", _NO_CLEAN) for n in ("gpt-4o", "llama4", "kanana2", "talkie", "minimax-m2")},
    "trillion": ("gpt2", _NO_CLEAN),
    "granite-docling": ("gpt2", _NO_CLEAN),
    **{n: ("bailingmoe", _NO_CLEAN) for n in ("bailingmoe", "bailingmoe2", "llada-moe")},
    "seed-coder": ("seed-coder", _NO_CLEAN),
    "hunyuan": ("qwen2", _NO_CLEAN),
    **{n: ("deepseek3", _NO_CLEAN) for n in ("hunyuan-dense", "hy_v4", "joyai-llm")},
    "ufakzeka": ("ufakzeka", _NO_CLEAN),
    "grok-2": ("qwen2", _NO_CLEAN),
    "laguna": ("laguna", _NO_CLEAN),
    "solar-open": ("qwen2", _NO_CLEAN),
    "mellum2": ("starcoder", {}),
}  # fmt: skip


def pre_tokenizer_for(name: str) -> PreTokenizer:
    """The pre-tokenizer llama.cpp uses for `tokenizer.ggml.pre == name`."""
    if name not in _NAMES:
        raise UnsupportedError(f"pre-tokenizer '{name}' (tokenizer.ggml.pre) is not supported")
    pre_type, overrides = _NAMES[name]
    return PreTokenizer(
        name=pre_type,
        regexes=_REGEXES[pre_type],
        byte_encode=pre_type != "gemma4",
        overrides=dict(overrides),
    )


def supported_names() -> list[str]:
    return sorted(_NAMES)
