#!/usr/bin/env python
"""Prefill and decode speed on the CPU, llamapy against llama.cpp (llama-cpp-python).

    python benchmarks/cpu_bench.py [smollm2-135m gemma3-270m] [--threads 2] [--repeat 3]

pp512: one 512-token prompt on an empty cache (llamapy: the engine's prefill of a request
with max_tokens=1, prefix caching off; llama.cpp: one llama_decode of 512). tg32: 32 decode
steps of one token after a 1-token prompt (argmax; llama.cpp reads the last row's logits).
Both run with the same thread count in the same process, alternately; the best of --repeat
runs is reported, with llamapy / llama.cpp ratios (> 1: llamapy is faster).
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

N_PROMPT = 512
N_GEN = 32


def _best(fn, repeat: int) -> float:
    best = float("inf")
    for _ in range(repeat):
        best = min(best, fn())
    return best


class LlamaPy:
    def __init__(self, path, threads: int) -> None:
        from llamapy.api import LLM

        self.llm = LLM(
            str(path),
            n_ctx=2 * N_PROMPT,
            n_threads=threads,
            max_num_batched_tokens=N_PROMPT,
            enable_prefix_caching=False,
        )

    def prefill(self, ids: list[int]) -> float:
        from llamapy.sampling.params import SamplingParams

        t0 = time.perf_counter()
        self.llm.generate([ids], SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True))
        return time.perf_counter() - t0

    def decode(self, first: int) -> float:
        from llamapy.sampling.params import SamplingParams

        params = SamplingParams(temperature=0.0, max_tokens=N_GEN + 1, ignore_eos=True)
        t_first = None
        for _ in self.llm.stream([first], params):
            t_first = t_first or time.perf_counter()  # the prompt pass gives the first token
        return time.perf_counter() - t_first


class LlamaCpp:
    def __init__(self, path, threads: int) -> None:
        import llama_cpp

        self.lm = llama_cpp.Llama(
            model_path=str(path),
            n_ctx=2 * N_PROMPT,
            n_batch=N_PROMPT,
            n_threads=threads,
            n_threads_batch=threads,
            verbose=False,
        )
        self.n_vocab = self.lm.n_vocab()

    def _argmax(self) -> int:
        return int(
            np.argmax(np.ctypeslib.as_array(self.lm._ctx.get_logits_ith(-1), shape=(self.n_vocab,)))
        )

    def prefill(self, ids: list[int]) -> float:
        self.lm.reset()
        t0 = time.perf_counter()
        self.lm.eval(ids)
        self._argmax()
        return time.perf_counter() - t0

    def decode(self, first: int) -> float:
        self.lm.reset()
        self.lm.eval([first])
        tok = self._argmax()
        t0 = time.perf_counter()
        for _ in range(N_GEN):
            self.lm.eval([tok])
            tok = self._argmax()
        return time.perf_counter() - t0


def bench(alias: str, threads: int, repeat: int) -> dict[str, float]:
    from llamapy.hub import resolve_model

    path = resolve_model(alias).path
    ours, ref = LlamaPy(path, threads), LlamaCpp(path, threads)
    rng = np.random.default_rng(0)
    vocab = ours.llm.config.vocab_size
    ids = rng.integers(100, min(vocab, 30_000), N_PROMPT).tolist()
    first = ids[0]
    ours.prefill(ids[:16])  # warm-up
    ref.prefill(ids[:16])
    times: dict[str, list[float]] = {k: [] for k in ("pp_ours", "pp_ref", "tg_ours", "tg_ref")}
    for _ in range(repeat):  # alternate, so both see the same machine load
        times["pp_ours"].append(ours.prefill(ids))
        times["pp_ref"].append(ref.prefill(ids))
        times["tg_ours"].append(ours.decode(first))
        times["tg_ref"].append(ref.decode(first))
    best = {k: min(v) for k, v in times.items()}
    return {
        "pp_ours": N_PROMPT / best["pp_ours"],
        "pp_ref": N_PROMPT / best["pp_ref"],
        "tg_ours": N_GEN / best["tg_ours"],
        "tg_ref": N_GEN / best["tg_ref"],
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("models", nargs="*", default=["smollm2-135m", "gemma3-270m"])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeat", type=int, default=3)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(f"threads {args.threads}, best of {args.repeat}; tokens/s (ratio = llamapy / llama.cpp)")
    print(
        f"| model | pp{N_PROMPT} llamapy | pp{N_PROMPT} llama.cpp | ratio "
        f"| tg{N_GEN} llamapy | tg{N_GEN} llama.cpp | ratio |"
    )
    print("|" + " --- |" * 7)
    for alias in args.models:
        r = bench(alias, args.threads, args.repeat)
        pp_ratio, tg_ratio = r["pp_ours"] / r["pp_ref"], r["tg_ours"] / r["tg_ref"]
        print(
            f"| {alias} | {r['pp_ours']:.1f} | {r['pp_ref']:.1f} | {pp_ratio:.3f} "
            f"| {r['tg_ours']:.1f} | {r['tg_ref']:.1f} | {tg_ratio:.3f} |",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
