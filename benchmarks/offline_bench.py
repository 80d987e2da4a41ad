"""Offline throughput on the Python API, in the style of nano-vllm's bench.py: many random
token-id prompts with random lengths, exact output lengths (ignore_eos), one generate() call.

    python benchmarks/offline_bench.py                       # 256 seqs, 100..1024 in and out
    python benchmarks/offline_bench.py --num-seqs 4 --input-len 16:32 --output-len 8:16 -t 2
"""

from __future__ import annotations

import argparse
import json
import random
import time

from bench_args import token_range

from llamapy import LLM, SamplingParams


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("-m", "--model", default="smollm2-135m")
    p.add_argument("--num-seqs", type=int, default=256)
    p.add_argument("--input-len", type=token_range, default=(100, 1024), metavar="A:B")
    p.add_argument("--output-len", type=token_range, default=(100, 1024), metavar="A:B")
    p.add_argument("--max-num-seqs", type=int, default=16, help="sequences batched together")
    p.add_argument("--max-num-batched-tokens", type=int, default=512)
    p.add_argument("-t", "--threads", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help="print one JSON line too")
    args = p.parse_args()

    rng = random.Random(args.seed)
    prompts = [
        [rng.randint(0, 10000) for _ in range(rng.randint(*args.input_len))]
        for _ in range(args.num_seqs)
    ]
    params = [
        SamplingParams(temperature=0.6, ignore_eos=True, max_tokens=rng.randint(*args.output_len))
        for _ in range(args.num_seqs)
    ]
    llm = LLM(
        args.model,
        n_ctx=args.input_len[1] + args.output_len[1],
        max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens,
        n_threads=args.threads,
    )
    llm.generate("Benchmark: ", SamplingParams(max_tokens=4))  # warm-up

    t = time.perf_counter()
    outs = llm.generate(prompts, params)
    t = time.perf_counter() - t
    out_tokens = sum(len(o.token_ids) for o in outs)
    in_tokens = sum(len(x) for x in prompts)
    assert out_tokens == sum(sp.max_tokens for sp in params), "ignore_eos lengths not met"
    print(
        f"Total: {out_tokens}tok, Time: {t:.2f}s, Throughput: {out_tokens / t:.2f}tok/s "
        f"(prompt {in_tokens}tok, {(in_tokens + out_tokens) / t:.2f}tok/s all tokens, "
        f"{llm.engine.scheduler.num_preemptions} preemptions)"
    )
    if args.json:
        result = {
            "num_seqs": args.num_seqs,
            "prompt_tokens": in_tokens,
            "output_tokens": out_tokens,
            "seconds": t,
            "output_tokens_per_s": out_tokens / t,
            "total_tokens_per_s": (in_tokens + out_tokens) / t,
            "preemptions": llm.engine.scheduler.num_preemptions,
        }
        print(json.dumps(result))


if __name__ == "__main__":
    main()
