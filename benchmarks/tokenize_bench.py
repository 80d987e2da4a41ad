#!/usr/bin/env python
"""Tokenize 1 MB of text with llamapy and with llama.cpp (llama-cpp-python), side by side.

    python benchmarks/tokenize_bench.py [smollm2-135m gemma3-270m] [--mb 1] [--repeat 3]

Text: Python's documentation as shipped with CPython (pydoc_data/topics.py) and LICENSE.txt,
repeated to the size asked. Both tokenize the whole text in one call, add_special=False,
parse_special=False; the best of --repeat runs is reported, and checked to give equal ids.
"""

from __future__ import annotations

import argparse
import sysconfig
import time
from pathlib import Path


def _text(mb: float) -> str:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    base = "\n".join(
        (stdlib / name).read_text(encoding="utf-8")
        for name in ("pydoc_data/topics.py", "LICENSE.txt")
    )
    size = int(mb * 1_000_000)
    return (base * (size // len(base) + 1))[:size]


def _best(fn, repeat: int) -> tuple[float, list[int]]:
    best, out = float("inf"), []
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return best, out


def bench(alias: str, text: str, repeat: int) -> None:
    import llama_cpp

    from llamapy.hub import resolve_model
    from llamapy.tokenizer import Tokenizer

    path = resolve_model(alias).path
    t0 = time.perf_counter()
    tok = Tokenizer.from_gguf(path)
    load = time.perf_counter() - t0
    llm = llama_cpp.Llama(model_path=str(path), vocab_only=True, verbose=False)
    data = text.encode()
    ours, ids = _best(lambda: tok.encode(text, add_special=False), repeat)
    ref, ref_ids = _best(lambda: llm.tokenize(data, add_bos=False, special=False), repeat)
    same = "equal ids" if ids == ref_ids else "IDS DIFFER"
    print(
        f"{alias:<14} {len(data) / 1e6:.2f} MB -> {len(ids)} tokens | llamapy {ours:.3f} s "
        f"(load {load:.2f} s) | llama.cpp {ref:.3f} s | speed ratio llamapy/llama.cpp "
        f"{ref / ours:.2f}x | {same}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="*", default=["smollm2-135m", "gemma3-270m"])
    parser.add_argument("--mb", type=float, default=1.0)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    text = _text(args.mb)
    for alias in args.models:
        bench(alias, text, args.repeat)


if __name__ == "__main__":
    main()
