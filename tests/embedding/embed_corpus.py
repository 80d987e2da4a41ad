"""Real English text for the embedding tests: CPython's own documentation.

Passages are the paragraphs of `pydoc_data/topics.py` (the language reference topics that
`help()` shows; shipped with CPython under the PSF License), whitespace-collapsed and
deduplicated; sentences add the first lines of stdlib docstrings (same license).
"""

from __future__ import annotations

import importlib
import inspect
import re
from functools import cache

import numpy as np

_DOC_MODULES = ("os", "json", "re", "pathlib", "collections", "itertools", "textwrap", "string")
# Inputs that stress the tokenizer and the model: empty, accents, CJK, emoji, digits, code.
EDGE_CASES = (
    "",
    "   ",
    "a",
    "Ça va? Très bien, merci — et toi?",
    "東京タワーは日本の電波塔です。",
    "I ❤️ Python 🐍!!",
    "3.14159 2.71828 1e-12 0xDEADBEEF",
    "def f(x):\n    return x ** 2  # square",
    "UPPER lower MiXeD",
    "naïve café résumé coöperate",
)


@cache
def passages(min_words: int = 12) -> tuple[str, ...]:
    from pydoc_data.topics import topics

    seen: dict[str, None] = {}
    for text in topics.values():
        for para in re.split(r"\n\s*\n", text):
            para = " ".join(para.split())
            if len(para.split()) >= min_words and not para.startswith((">>>", "***")):
                seen.setdefault(para, None)
    return tuple(seen)


@cache
def docstring_lines() -> tuple[str, ...]:
    lines: dict[str, None] = {}
    for name in _DOC_MODULES:
        module = importlib.import_module(name)
        for _, obj in inspect.getmembers(module):
            doc = inspect.getdoc(obj) if callable(obj) else None
            if doc:
                first = doc.strip().splitlines()[0].strip()
                if len(first.split()) >= 3:
                    lines.setdefault(first, None)
    return tuple(lines)


def varied_sentences(rng: np.random.Generator, n: int) -> list[str]:
    """`n` texts drawn at random from the edge cases, three very long texts (past the
    model's 256 tokens), docstring lines and passages; every edge case when n >= 50."""
    long_texts = [" ".join(rng.choice(passages(), 12)) for _ in range(3)]
    pool_p, pool_d = passages(), docstring_lines()
    rest = max(n, 50) - len(EDGE_CASES) - len(long_texts)
    k_doc = rest // 2
    docs = [pool_d[i] for i in rng.choice(len(pool_d), k_doc, replace=False)]
    paras = [pool_p[i] for i in rng.choice(len(pool_p), rest - k_doc, replace=False)]
    fixed = [*EDGE_CASES, *long_texts]
    drawn = [*docs, *paras]
    texts = fixed + drawn if n >= 50 else [*fixed, *drawn][:: max(1, 50 // n)]
    texts = [texts[i] for i in rng.permutation(len(texts))][:n]
    return texts
