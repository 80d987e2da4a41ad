"""Text for comparing tokenizers with llama.cpp: hard strings and real text.

Real text: Python's own documentation as shipped with CPython (`pydoc_data/topics.py`, the
text of the language reference topics) and CPython's `LICENSE.txt`, read from the running
interpreter's standard library. Reference files record the text's sha256, so a different
Python build (different text) skips instead of failing.
"""

from __future__ import annotations

import hashlib
import sysconfig
from pathlib import Path

CORPUS_FILES = ("LICENSE.txt", "pydoc_data/topics.py")
CORPUS_MAX_CHARS = 300_000
CHUNK_CHARS = 4_000

HARD_STRINGS: tuple[str, ...] = (
    "",
    " ",
    "  ",
    "Hello world",
    " Hello world",
    "Hello  world   with    runs",
    "\t\ttabs\tand\n\nnewlines\r\n\r\nCRLF",
    "\n" * 33,
    " " * 40 + "x" + " " * 3,
    "\t" * 35,
    "trailing spaces   ",
    "日本語のテキストです。中文文本，标点！한국어 텍스트",
    "emoji 😀👍🏽 👨‍👩‍👧‍👦 🇺🇸🇩🇪 ❤️ ✨",
    "café naïve résumé Ångström Ωmega Kelvin \u212a ﬁligature",
    "e\u0301 (decomposed) vs \u00e9 (composed); A\u030a vs \u00c5",
    "Ünïcödé\u00a0nbsp\u2009thin\u3000ideographic\u2028linesep",
    "zero\u200bwidth\u200djoiner\u2060word joiner\ufeffbom",
    "control\x00chars\x01\x1f\x7f\x85",
    "def f(x):\n    return x ** 2  # square\n\nclass A:\n\tpass\n",
    "for (int i = 0; i < n; ++i) { s += a[i]; }",
    "1234567890 3.14159 1,000,000 0x1F 1e-9 -42",
    "I'm you're it's we've they'll I'd DON'T WON'T",
    "<|im_start|>user\nhi there<|im_end|>\n<|im_start|>assistant\n",
    "<start_of_turn>user\nhi<end_of_turn>\n<start_of_turn>model\n",
    "<bos><eos><unk><pad><mask> <s></s>",
    "<table><tr><td>cell</td></tr></table><b>bold</b>",
    "<|endoftext|>text after<|endoftext|>",
    "mixed\tws \n \t\n  end",
    "URL: https://example.com/path?q=1&r=2#frag",
    "Ελληνικά, русский текст, עברית, العربية, हिन्दी, ไทย",
    "\u00e9" * 20 + "\u3042" * 20,
    "🤖" * 10,
    "a" * 500,
    "The quick brown fox jumps over the lazy dog. " * 5,
)


def corpus_text() -> str:
    """The real-text corpus from this interpreter's standard library."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    parts = [(stdlib / name).read_text(encoding="utf-8") for name in CORPUS_FILES]
    return "\n".join(parts)[:CORPUS_MAX_CHARS]


def corpus_chunks(text: str) -> list[str]:
    """The corpus cut at line ends into chunks of about CHUNK_CHARS characters."""
    chunks: list[str] = []
    start = 0
    while start < len(text):
        end = text.find("\n", start + CHUNK_CHARS)
        end = len(text) if end < 0 else end + 1
        chunks.append(text[start:end])
        start = end
    return chunks


def sha256(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def ids_digest(ids: list[int]) -> str:
    """A short digest of a token id list (stored instead of the ids for the large corpus)."""
    data = b"".join(i.to_bytes(4, "little") for i in ids)
    return hashlib.sha256(data).hexdigest()[:16]
