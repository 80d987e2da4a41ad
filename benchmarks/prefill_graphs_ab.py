"""Prefill speed with the prefill CUDA graphs off and on, alternating, in one engine
(`engine/prefill_graphs.py`): ppP = one P-token prompt to its first token, as
`gpu_bench.py` measures it. GPU only.

    python benchmarks/prefill_graphs_ab.py MODEL.gguf [--reps 5] [--pp 512,128]
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from gpu_bench import engine_for, random_tokens, run_requests  # noqa: E402

from llamapy.engine.prefill_graphs import PrefillGraphs  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", type=Path)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--pp", default="512,128")
    args = ap.parse_args()
    try:
        lengths = [int(v) for v in args.pp.split(",")]
    except ValueError:
        ap.error(f"--pp takes comma-separated prompt lengths, got {args.pp!r}")
    if args.reps < 1 or min(lengths) < 1:
        ap.error("--reps and the --pp lengths must be >= 1")
    rng = random.Random(0)
    fits = PrefillGraphs.fits
    modes = {"eager": lambda self, batch: False, "graphs": fits}
    print("| model | test | graphs off t/s | graphs on t/s | speedup |")
    print("| --- | --- | ---: | ---: | ---: |")
    for pp in lengths:
        engine, vocab = engine_for(
            args.model, max_seqs=1, ctx=pp + 144, graphs=True, batch_tokens=max(pp, 512)
        )
        rates: dict[str, list[float]] = {mode: [] for mode in modes}
        try:
            for rep in range(args.reps + 1):  # the first round warms up (compile, capture)
                for mode, rule in modes.items():
                    PrefillGraphs.fits = rule
                    seconds = run_requests(engine, [random_tokens(pp, vocab, rng)], 1)[0]
                    if rep:
                        rates[mode].append(pp / seconds)
        finally:
            PrefillGraphs.fits = fits
        off, on = (statistics.median(rates[m]) for m in modes)
        print(f"| {args.model.name} | pp{pp} | {off:,.0f} | {on:,.0f} | {on / off:.2f} |")
        del engine
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
