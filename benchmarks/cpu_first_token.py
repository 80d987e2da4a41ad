#!/usr/bin/env python
"""Time to the first token of a prompt on the CPU: one sequence, a warm engine, prompts of
several lengths, each a fresh one (prefix caching off), `generate` of one greedy token.

    python benchmarks/cpu_first_token.py [MODEL] [--lengths 8,36,100] [--reps 5] [-t 2]

Prints one line: min / median ms per prompt length (after one untimed prompt that pays the
first call's one-time costs). Compare two checkouts by running it with each on the
PYTHONPATH in turn, alternating (the machine's load drifts).
"""

from __future__ import annotations

import argparse
import statistics
import time

from bench_args import positive_int_list

from llamapy.api import LLM
from llamapy.sampling.params import SamplingParams


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model", nargs="?", default="smollm2-135m")
    p.add_argument(
        "--lengths", type=positive_int_list, default=[8, 36, 100], help="prompt lengths in tokens"
    )
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--threads", "-t", type=int, default=2)
    args = p.parse_args(argv)
    lengths = args.lengths
    if args.reps < 1 or args.threads < 1:
        p.error("--reps and --threads must be >= 1")
    llm = LLM(
        args.model,
        n_ctx=max(lengths) + 16,
        max_num_seqs=1,
        n_threads=args.threads,
        enable_prefix_caching=False,
    )
    params = SamplingParams(max_tokens=1, temperature=0.0)
    first = 1000
    llm.generate([list(range(first, first + max(lengths)))], params)  # one-time costs
    cols = []
    for n in lengths:
        times = []
        for _ in range(args.reps):
            first += n
            t0 = time.perf_counter()
            llm.generate([list(range(first, first + n))], params)
            times.append((time.perf_counter() - t0) * 1e3)
        cols.append(f"{n}: {min(times):.1f} / {statistics.median(times):.1f}")
    print(f"{args.model}, {args.threads} threads, ms to the first token (min / median): "
          + " | ".join(cols))  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
