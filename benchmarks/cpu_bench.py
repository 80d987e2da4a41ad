#!/usr/bin/env python
"""Prefill and decode speed on the CPU, llamapy against llama.cpp (llama-cpp-python), or
against transformers.

    python benchmarks/cpu_bench.py [MODEL ...] [--threads 2] [--repeat 3] [-p 512] [-n 128]
        [-d DEPTH] [-ctk f32|f16|bf16] [--baseline llama.cpp|transformers]

Both engines read the same GGUF, with the same thread count, in one process, alternately
(so both see the same machine load), measured as llama-bench measures: `ppP` is the prefill
of P random tokens on an empty context, `tgN` is N tokens decoded one at a time after a
1-token prompt; a warm-up run first. llamapy runs through `llamapy bench`'s engine driver
(`EngineBench`: the real engine, prefix caching off, greedy); llama.cpp through
`Llama.eval` with n_batch = n_ubatch = 512. Reported: mean ± sd tokens/s over --repeat runs
and the ratio of the means (> 1: llamapy is faster). `-d D` (llama.cpp only): each test
after D tokens of context, processed untimed first (`ppP @ dD`, `tgN @ dD`, as llama-bench's
-d; llamapy as `llamapy bench -d`: the depth through its prefix cache for pp, the N decode
steps after the depth's prefill for tg).

`--baseline transformers`: transformers in float32 (the GGUF dequantized through
`from_pretrained(..., gguf_file=)`, as shared/tools/cpu/README.md measures it), eager, at
the same torch thread count; its tgN is one `generate` of N new tokens after a 1-token
prompt (greedy, KV cache on), its ppP one forward over P tokens.
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from llamapy.cli.bench import BenchSettings, BenchTest, EngineBench


class LlamaCpp:
    """llama.cpp through llama-cpp-python, timed like llama-bench's test_prompt / test_gen."""

    def __init__(self, path: str, threads: int, n_ctx: int, n_batch: int) -> None:
        import llama_cpp

        self.lm = llama_cpp.Llama(
            model_path=path,
            n_ctx=n_ctx,
            n_batch=n_batch,
            n_ubatch=n_batch,
            n_threads=threads,
            n_threads_batch=threads,
            verbose=False,
        )

    def prefill(self, ids: list[int], depth: list[int] | None = None) -> float:
        """Seconds to evaluate `ids` after `depth` (evaluated first, untimed)."""
        self.lm.reset()
        if depth:
            self.lm.eval(depth)
        t0 = time.perf_counter()
        self.lm.eval(ids)
        return time.perf_counter() - t0

    def generate(self, ids: list[int], depth: list[int] | None = None) -> float:
        """Decode `ids` one token at a time after `depth` (evaluated first, untimed; an
        empty context without it); llama-bench draws the tokens at random too."""
        self.lm.reset()
        if depth:
            self.lm.eval(depth)
        t0 = time.perf_counter()
        for tok in ids:
            self.lm.eval([tok])
        return time.perf_counter() - t0


class Transformers:
    """transformers, float32 weights from the GGUF, timed as `LlamaCpp`."""

    def __init__(self, path: str, threads: int) -> None:
        import torch
        from transformers import AutoModelForCausalLM

        torch.set_num_threads(threads)
        p = Path(path)
        self.model = AutoModelForCausalLM.from_pretrained(
            p.parent, gguf_file=p.name, dtype=torch.float32
        ).eval()

    def prefill(self, ids: list[int]) -> float:
        import torch

        with torch.inference_mode():
            t0 = time.perf_counter()
            self.model(torch.tensor([ids]))
            return time.perf_counter() - t0

    def generate(self, ids: list[int]) -> float:
        """len(ids) new tokens after the first of `ids`."""
        import torch

        n = len(ids)
        with torch.inference_mode():
            t0 = time.perf_counter()
            self.model.generate(
                torch.tensor([ids[:1]]), max_new_tokens=n, min_new_tokens=n, do_sample=False
            )
            return time.perf_counter() - t0


def _rates(n_tokens: int, seconds: list[float]) -> tuple[float, float]:
    rates = [n_tokens / s for s in seconds]
    return statistics.fmean(rates), statistics.stdev(rates) if len(rates) > 1 else 0.0


def _measure(
    ours: Callable[[int], float], ref: Callable[[int], float], n: int, n_warmup: int, repeat: int
) -> tuple[list[float], list[float]]:
    ours(n_warmup), ref(n_warmup)  # warm-up, as llama-bench: the prompt, or 1 decode
    t_ours, t_ref = [], []
    for _ in range(repeat):  # alternate, so both see the same machine load
        t_ours.append(ours(n))
        t_ref.append(ref(n))
    return t_ours, t_ref


def bench(
    model: str,
    threads: int,
    repeat: int,
    n_prompt: int,
    n_gen: int,
    baseline: str = "llama.cpp",
    depth: int = 0,
    cache_type: str | None = None,
) -> Iterator[tuple]:
    """Rows (test, ours mean, ours sd, baseline mean, baseline sd) for one model."""
    settings = BenchSettings(n_threads=threads, repetitions=repeat, kv_cache_dtype=cache_type)
    tests = [BenchTest(n_prompt, 0, n_depth=depth), BenchTest(0, n_gen, n_depth=depth)]
    ours = EngineBench(model, settings, tests)
    path = str(ours.llm.resolved.path)
    ref: LlamaCpp | Transformers
    if baseline == "transformers":
        ref = Transformers(path, threads)
    else:
        n_ctx = depth + max(n_prompt, n_gen) + 16
        ref = LlamaCpp(path, threads, n_ctx, settings.tokens_per_step)
    if depth:
        yield from _at_depth(ours, ref, depth, n_prompt, n_gen, repeat)
        ours.close()
        return
    if n_prompt:
        t_ours, t_ref = _measure(
            ours.prefill, lambda n: ref.prefill(ours.random_prompt(n)), n_prompt, n_prompt, repeat
        )
        yield (f"pp{n_prompt}", *_rates(n_prompt, t_ours), *_rates(n_prompt, t_ref))
    if n_gen:
        t_ours, t_ref = _measure(
            ours.generate, lambda n: ref.generate(ours.random_prompt(n)), n_gen, 2, repeat
        )
        yield (f"tg{n_gen}", *_rates(n_gen, t_ours), *_rates(n_gen, t_ref))
    ours.close()


def _at_depth(
    ours: EngineBench, ref: LlamaCpp, depth: int, n_prompt: int, n_gen: int, repeat: int
) -> Iterator[tuple]:
    """`bench`'s rows after `depth` tokens of context (a fresh random depth each run)."""

    def fresh(n: int) -> list[int]:  # random ids, no BOS: they follow the depth's
        return ours.rng.choices(ours.pool, k=n)

    if n_prompt:
        t_ours, t_ref = _measure(
            lambda n: ours.prefill_at_depth(n, depth),
            lambda n: ref.prefill(fresh(n), ours.random_prompt(depth)),
            n_prompt, n_prompt, repeat,
        )  # fmt: skip
        yield (f"pp{n_prompt} @ d{depth}", *_rates(n_prompt, t_ours), *_rates(n_prompt, t_ref))
    if n_gen:
        t_ours, t_ref = _measure(
            lambda n: ours.decode_steps(BenchTest(depth, n, 1, batched=True)),
            lambda n: ref.generate(fresh(n), ours.random_prompt(depth)),
            n_gen, 1, repeat,
        )  # fmt: skip
        yield (f"tg{n_gen} @ d{depth}", *_rates(n_gen, t_ours), *_rates(n_gen, t_ref))


def host_cpu() -> str:
    """The CPU's model name and the features the CPU paths (and llama.cpp) choose by: the
    figures move with them (benchmarks/RESULTS.md names each sitting's host)."""
    try:
        with open("/proc/cpuinfo") as f:
            info = f.read()
    except OSError:
        return "unknown CPU"
    pairs = (line.split(":", 1) for line in info.splitlines()[:40] if ":" in line)
    fields = {key.strip(): value for key, value in pairs}
    name = fields.get("model name", "unknown CPU").strip()
    flags = set(fields.get("flags", "").split())
    wanted = ("avx512_vnni", "avx512_bf16", "amx_bf16", "amx_int8")
    return f"{name}; " + ", ".join(f"{f} {'yes' if f in flags else 'no'}" for f in wanted)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("models", nargs="*", default=["smollm2-135m", "gemma3-270m"])
    p.add_argument("--threads", "-t", type=int, default=2)
    p.add_argument("--repeat", "-r", type=int, default=3)
    p.add_argument("-p", "--n-prompt", type=int, default=512)
    p.add_argument("-n", "--n-gen", type=int, default=128)
    p.add_argument("-d", "--depth", type=int, default=0, help="tokens of context first")
    p.add_argument("--baseline", choices=["llama.cpp", "transformers"], default="llama.cpp")
    p.add_argument(
        "-ctk", "--cache-type", default=None, choices=["f32", "f16", "bf16"],
        help="llamapy's KV cache type (default f16, as llama.cpp's, which keeps its default)",
    )  # fmt: skip
    args = p.parse_args(argv)
    if args.threads < 1 or args.repeat < 1 or min(args.n_prompt, args.n_gen, args.depth) < 0:
        p.error("--threads and --repeat must be >= 1, -p, -n and -d >= 0")
    if args.depth and args.baseline != "llama.cpp":
        p.error("-d takes the llama.cpp baseline")
    needs = {  # module -> package; transformers' GGUF loader needs accelerate
        "llama.cpp": {"llama_cpp": "llama-cpp-python"},
        "transformers": {"transformers": "transformers", "accelerate": "accelerate"},
    }[args.baseline]
    missing = [pkg for mod, pkg in needs.items() if importlib.util.find_spec(mod) is None]
    if missing:
        p.error(f"the {args.baseline} baseline needs: pip install {' '.join(missing)}")
    cache = args.cache_type or "f16 (the default)"
    print(f"host: {host_cpu()}; llamapy's KV cache {cache}, llama.cpp's f16")
    print(
        f"threads {args.threads}, mean ± sd of {args.repeat} runs, tokens/s; "
        f"ratio = llamapy / {args.baseline}"
    )
    print(f"| model | test | llamapy t/s | {args.baseline} t/s | ratio |")
    print("| --- | --- | ---: | ---: | ---: |")
    for model in args.models:
        for test, ours, ours_sd, ref, ref_sd in bench(
            model, args.threads, args.repeat, args.n_prompt, args.n_gen, args.baseline,
            args.depth, args.cache_type,
        ):  # fmt: skip
            print(
                f"| {model} | {test} | {ours:.1f} ± {ours_sd:.1f} | {ref:.1f} ± {ref_sd:.1f} "
                f"| {ours / ref:.3f} |",
                flush=True,
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
