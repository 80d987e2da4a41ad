#!/usr/bin/env python
"""Embeddings per second: llamapy beside sentence-transformers, same model, same sitting.

    python benchmarks/embed_bench.py [--model minilm-l6] [--texts 512] [--batch 1 8 32 128]
                                     [--repeat 3] [--threads N]

Texts: paragraphs of CPython's documentation (pydoc_data/topics.py, PSF License), drawn
with a fixed seed; both cut them at the folder's max_seq_length. For each batch size both
libraries embed every text, `batch` texts per call (llamapy: one padding-free forward pass
per call; sentence-transformers: encode(batch_size=batch), which pads to the longest
text of each batch); the runs alternate, best of --repeat, and the vectors are checked to
agree (minimum cosine).
"""

from __future__ import annotations

import argparse
import random
import re
import time


def _texts(n: int, seed: int = 0) -> list[str]:
    from pydoc_data.topics import topics

    paras = {
        " ".join(p.split()): None
        for text in topics.values()
        for p in re.split(r"\n\s*\n", text)
        if len(p.split()) >= 5
    }
    pool = list(paras)
    random.Random(seed).shuffle(pool)
    return (pool * (n // len(pool) + 1))[:n]


def _best(fn, repeat: int) -> tuple[float, object]:
    best, out = float("inf"), None
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return best, out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="minilm-l6")
    parser.add_argument("--texts", type=int, default=512)
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8, 32, 128])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()

    import torch
    from sentence_transformers import SentenceTransformer

    from llamapy.api import LLM
    from llamapy.hub import resolve_model

    if args.threads:
        torch.set_num_threads(args.threads)
    path = resolve_model(args.model).path
    texts = _texts(args.texts)
    llm = LLM(path)
    st = SentenceTransformer(str(path), device="cpu")
    n_tokens = sum(len(llm.embedder.text_input(t, truncate=True)) for t in texts)
    print(
        f"model {args.model} | {len(texts)} texts, {n_tokens} tokens | torch threads "
        f"{torch.get_num_threads()} | torch {torch.__version__}"
    )
    print("| batch | llamapy emb/s | sentence-transformers emb/s | ratio | min cosine |")
    print("| ---: | ---: | ---: | ---: | ---: |")
    for batch in args.batch:

        def ours(batch: int = batch) -> torch.Tensor:
            parts = [
                llm.embed(texts[i : i + batch], truncate=True) for i in range(0, len(texts), batch)
            ]
            return torch.cat(parts)

        def theirs(batch: int = batch) -> torch.Tensor:
            return torch.from_numpy(st.encode(texts, batch_size=batch))

        ours(), theirs()  # warm up
        t_ours = t_st = float("inf")
        for _ in range(args.repeat):  # alternate, so both see the same machine load
            t, a = _best(ours, 1)
            t_ours = min(t_ours, t)
            t, b = _best(theirs, 1)
            t_st = min(t_st, t)
        cos = torch.nn.functional.cosine_similarity(a.double(), b.double(), dim=-1).min()
        print(
            f"| {batch} | {len(texts) / t_ours:.1f} | {len(texts) / t_st:.1f} | "
            f"{t_st / t_ours:.2f}x | {cos:.7f} |"
        )


if __name__ == "__main__":
    main()
