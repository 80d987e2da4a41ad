#!/usr/bin/env python
"""Write llama.cpp's tokenizations of the test corpus to tests/tokenizer/data/.

CI compares llamapy against these files, so it does not need llama.cpp. Regenerate with
llama-cpp-python installed (`pip install llama-cpp-python`):

    python scripts/make_tokenizer_refs.py smollm2-135m gemma3-270m

Each file holds the ids of every hard string (add_special x parse_special) and, for the
real-text corpus, per-chunk token counts and id digests (the ids would be too large).
"""

from __future__ import annotations

import argparse
import gzip
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests" / "tokenizer"))

from corpus import (  # noqa: E402
    CORPUS_FILES,
    HARD_STRINGS,
    corpus_chunks,
    corpus_text,
    ids_digest,
    sha256,
)

DATA = ROOT / "tests" / "tokenizer" / "data"


def reference(alias: str) -> dict:
    import llama_cpp

    from llamapy.hub import resolve_model

    path = resolve_model(alias).path
    llm = llama_cpp.Llama(model_path=str(path), vocab_only=True, verbose=False)

    def tokenize(text: str, add_special: bool, parse_special: bool) -> list[int]:
        return llm.tokenize(text.encode(), add_bos=add_special, special=parse_special)

    hard = [
        [text, add, parse, tokenize(text, add, parse)]
        for text in HARD_STRINGS
        for add in (False, True)
        for parse in (False, True)
    ]
    text = corpus_text()
    chunks = [[len(ids), ids_digest(ids)] for ids in
              (tokenize(c, False, False) for c in corpus_chunks(text))]  # fmt: skip
    return {
        "model": alias,
        "llama_cpp_python": llama_cpp.__version__,
        "hard": hard,
        "corpus": {"files": list(CORPUS_FILES), "sha256": sha256(text), "chunks": chunks},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="+", help="model aliases, e.g. smollm2-135m")
    args = parser.parse_args()
    DATA.mkdir(parents=True, exist_ok=True)
    for alias in args.models:
        out = DATA / f"refs-{alias}.json.gz"
        data = json.dumps(reference(alias), ensure_ascii=False, separators=(",", ":"))
        out.write_bytes(gzip.compress(data.encode(), mtime=0))
        print(f"{out.relative_to(ROOT)}: {out.stat().st_size} bytes")


if __name__ == "__main__":
    main()
