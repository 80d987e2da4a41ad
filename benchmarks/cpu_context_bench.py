#!/usr/bin/env python
"""Decode time per token as the context grows, on the CPU: one sequence, greedy, the engine's
steps timed over consecutive ranges of context.

    python benchmarks/cpu_context_bench.py [MODEL] [--ranges 128,128,256,512] [-t 2]

Prints one line: the mean ms per step over each range (the first range starts after a
4-token prompt and 4 warm-up steps). Compare two checkouts by running it with each on the
PYTHONPATH in turn, alternating (the machine's load drifts).
"""

from __future__ import annotations

import argparse
import time

from bench_args import positive_int_list

from llamapy.api import LLM
from llamapy.sampling.params import SamplingParams


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model", nargs="?", default="smollm2-135m")
    p.add_argument(
        "--ranges",
        type=positive_int_list,
        default=[128, 128, 256, 512],
        help="steps in each timed range",
    )
    p.add_argument("--threads", "-t", type=int, default=2)
    args = p.parse_args(argv)
    ranges = args.ranges
    if args.threads < 1:
        p.error("--threads must be >= 1")
    prompt, warmup = 4, 4
    total = prompt + warmup + sum(ranges)
    llm = LLM(
        args.model,
        n_ctx=total + 16,
        max_num_seqs=1,
        n_threads=args.threads,
        enable_prefix_caching=False,
    )
    engine = llm.engine
    engine.add_request(
        list(range(1, prompt + 1)), SamplingParams.greedy(max_tokens=total, ignore_eos=True)
    )
    for _ in range(warmup):
        engine.step()
    start, cols = prompt + warmup, []
    for n in ranges:
        t0 = time.perf_counter()
        for _ in range(n):
            engine.step()
        cols.append(f"{start}-{start + n}: {(time.perf_counter() - t0) / n * 1e3:.2f}")
        start += n
    head = f"{args.model}, {args.threads} threads, ms per decode step by context: "
    print(head + ", ".join(cols))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
