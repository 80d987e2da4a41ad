"""GPU check and speed of llamapy on GGUF files: logits against the CPU reference, then
pp / tg / batched decode through the engine (CUDA graphs), like llama-bench and
llama-batched-bench. Run on the GPU machine, in the same call as llama.cpp's baselines.

usage: python benchmarks/gpu_bench.py MODEL.gguf [MODEL.gguf ...] [--check-tokens 256]
           [--cpu-kernels reference,fast] [--pp 512] [--tg 128] [--depth D] [--batch 1,16,64,256]
           [--no-graphs] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from llamapy.engine.llm_engine import EngineConfig, LLMEngine  # noqa: E402
from llamapy.engine.scoring import score_tokens  # noqa: E402
from llamapy.formats import open_model_file  # noqa: E402
from llamapy.layers.linear import CPU_KERNELS  # noqa: E402
from llamapy.models import build_causal_lm  # noqa: E402
from llamapy.sampling.params import SamplingParams  # noqa: E402
from llamapy.tokenizer import Tokenizer  # noqa: E402


def random_tokens(n: int, vocab: int, rng: random.Random) -> list[int]:
    return [rng.randrange(100, vocab - 100) for _ in range(n)]


def check_logits(
    path: Path, n_tokens: int, rng: random.Random, cpu_kernels: tuple[str, ...] = ("reference",)
) -> dict:
    """Teacher-forced logits of the GPU model vs the CPU's, once per CPU path in
    `cpu_kernels`: "reference" (dequantize + float32 matmul, the oracle) and "fast" (the
    default CPU path: on AVX512-VNNI CPUs llama.cpp's int8 activations, as its CUDA backend
    computes them too). Keys: b512 / b1 (GPU prefill / one token at a time) for the
    reference, b512@fast / b1@fast for the fast path."""
    mf = open_model_file(path)
    ids = random_tokens(n_tokens, mf.config.vocab_size, rng)
    refs = {}
    for kernels in cpu_kernels:
        cpu = build_causal_lm(open_model_file(path))
        cpu.prepare("cpu", cpu_kernels=kernels)
        refs[kernels] = score_tokens(cpu, ids).double()
        del cpu
    gpu = build_causal_lm(open_model_file(path))
    gpu.prepare("cuda")
    out = {}
    for batch in (512, 1):  # prefill GEMM path, and one token at a time (GEMV path)
        got = score_tokens(gpu, ids, batch_size=batch, kv_dtype=torch.float16).double()
        lq = got.log_softmax(-1)
        for kernels, ref in refs.items():
            rel = ((got - ref).norm() / ref.norm()).item()
            top1 = (got.argmax(-1) == ref.argmax(-1)).double().mean().item()
            lp = ref.log_softmax(-1)
            kl = (lp.exp() * (lp - lq)).sum(-1).mean().item()
            key = f"b{batch}" if kernels == "reference" else f"b{batch}@{kernels}"
            out[key] = {"rel_err": rel, "top1": top1, "kl": kl, "nan": bool(got.isnan().any()),
                        "margin": mismatch_margin(got, ref)}  # fmt: skip
    return out


def mismatch_margin(got: torch.Tensor, ref: torch.Tensor) -> float:
    """The largest reference logit margin a top-1 mismatch overturned: at each position where
    the argmaxes differ, ref[its top] - ref[got's top] (>= 0); 0 without mismatches. Margins
    the size of the logits' own error are near-ties of random weights, not wrong tokens."""
    gt = got.argmax(-1)
    rt = ref.argmax(-1)
    rows = (gt != rt).nonzero().flatten()
    if rows.numel() == 0:
        return 0.0
    return (ref[rows, rt[rows]] - ref[rows, gt[rows]]).max().item()


def engine_for(
    path: Path,
    *,
    max_seqs: int,
    ctx: int,
    graphs: bool,
    batch_tokens: int,
    async_scheduling: bool = True,
):
    mf = open_model_file(path)
    cfg = EngineConfig(
        max_model_len=ctx,
        max_num_seqs=max_seqs,
        max_num_batched_tokens=batch_tokens,
        kv_cache_tokens=max_seqs * ctx,
        enable_prefix_caching=False,
        device="cuda",
        cuda_graphs=graphs,
        async_scheduling=async_scheduling,
    )
    return LLMEngine(mf, Tokenizer.from_path(path), cfg), mf.config.vocab_size


def run_requests(engine: LLMEngine, prompts: list[list[int]], n_gen: int) -> tuple[float, float]:
    """(prefill seconds, decode seconds) for these prompts generating n_gen tokens each."""
    params = SamplingParams.greedy(max_tokens=n_gen, ignore_eos=True)
    for p in prompts:
        engine.add_request(p, params)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    t_first = None
    while engine.has_unfinished_requests():
        engine.step()
        if t_first is None and all(r.seq.num_output_tokens >= 1 for r in engine.requests.values()):
            torch.cuda.synchronize()
            t_first = time.perf_counter()
    torch.cuda.synchronize()
    t1 = time.perf_counter()
    t_first = t_first or t1
    return t_first - t0, t1 - t_first


def bench(path: Path, args, rng: random.Random) -> list[dict]:
    rows = []
    engine, vocab = engine_for(
        path,
        max_seqs=1,
        ctx=max(args.pp, args.depth) + args.tg + 16,
        graphs=not args.no_graphs,
        batch_tokens=max(args.pp, 512),
        async_scheduling=not args.no_async,
    )
    run_requests(engine, [random_tokens(args.pp, vocab, rng)], 4)  # warm-up, graph capture
    pp = [
        args.pp / run_requests(engine, [random_tokens(args.pp, vocab, rng)], 1)[0]
        for _ in range(args.reps)
    ]
    # warm-up at the tg lengths: the decode graphs of each split count they take (a split
    # count a context length, engine.model_runner.graph_decode_splits) captured before timing
    depth = max(args.depth, 1)  # the tg prompt: one token, or the depth's (untimed prefill)
    run_requests(engine, [random_tokens(depth, vocab, rng)], args.tg)
    tg = [
        (args.tg - 1) / run_requests(engine, [random_tokens(depth, vocab, rng)], args.tg)[1]
        for _ in range(args.reps)
    ]
    tg_name = f"tg{args.tg}" + (f" @ d{args.depth}" if args.depth else "")
    rows.append({"test": f"pp{args.pp}", "ts": statistics.mean(pp), "sd": statistics.pstdev(pp)})
    rows.append({"test": tg_name, "ts": statistics.mean(tg), "sd": statistics.pstdev(tg)})
    del engine
    torch.cuda.empty_cache()
    for b in args.batch:
        engine, vocab = engine_for(
            path,
            max_seqs=b,
            ctx=args.batch_prompt + 128 + 16,
            graphs=not args.no_graphs,
            batch_tokens=8192,
            async_scheduling=not args.no_async,
        )
        # a whole run first: kernels specialised on the growing context lengths compile here
        prompt = args.batch_prompt
        run_requests(engine, [random_tokens(prompt, vocab, rng) for _ in range(b)], 128)
        runs = [
            run_requests(engine, [random_tokens(prompt, vocab, rng) for _ in range(b)], 128)
            for _ in range(args.reps)
        ]
        s_tg = [b * 127 / dec for _, dec in runs]
        name = f"batched B={b}" + (f" prompt {prompt}" if prompt != 128 else "")
        rows.append(
            {"test": name, "ts": statistics.mean(s_tg), "sd": statistics.pstdev(s_tg),
             "pp_ts": statistics.mean(b * prompt / pre for pre, _ in runs)}
        )  # fmt: skip
        del engine
        torch.cuda.empty_cache()
    return rows


def print_timeline(prof, replays: int, head: int = 24) -> None:
    """One replay's kernels in launch order (the last of `replays`): its span, the first
    `head` kernels with their start, duration and the gap after the kernel before (negative:
    they overlap, as with PDL), and every kernel name's count and summed duration."""
    kernels = sorted(
        (e for e in prof.events() if e.device_type.name == "CUDA"),
        key=lambda e: e.time_range.start,
    )
    if not kernels or len(kernels) % replays:
        print(f"timeline: {len(kernels)} kernels over {replays} replays, not split", flush=True)
        return
    one = kernels[-len(kernels) // replays :]
    t0 = one[0].time_range.start
    span = one[-1].time_range.end - t0
    print(f"one replay: {len(one)} kernels over {span:.1f} us", flush=True)
    print("| # | kernel | start us | us | gap us |\n| ---: | --- | ---: | ---: | ---: |")
    prev_end = t0
    for i, e in enumerate(one[:head]):
        start, end = e.time_range.start, e.time_range.end
        print(f"| {i} | {e.name[:48]} | {start - t0:.2f} | {end - start:.2f} | "
              f"{start - prev_end:.2f} |")  # fmt: skip
        prev_end = end
    totals: dict[str, list[float]] = {}
    for e in one:
        totals.setdefault(e.name[:48], []).append(e.time_range.end - e.time_range.start)
    print("| kernel | count | us in all | us each |\n| --- | ---: | ---: | ---: |")
    for name, ts in sorted(totals.items(), key=lambda kv: -sum(kv[1])):
        print(f"| {name} | {len(ts)} | {sum(ts):.1f} | {sum(ts) / len(ts):.2f} |")
    print(flush=True)


def profile(
    path: Path,
    rng: random.Random,
    batch: int = 1,
    async_scheduling: bool = True,
    prompt: int = 256,
    head: int = 24,
) -> None:
    """Where a decode step of `batch` sequences of `prompt` tokens goes: graph replay alone,
    the whole engine step, and the kernels of one replay (its first `head` in order)."""
    engine, vocab = engine_for(
        path,
        max_seqs=batch,
        ctx=1024,
        graphs=True,
        batch_tokens=max(512, 256 * batch),
        async_scheduling=async_scheduling,
    )
    for _ in range(batch):
        engine.add_request(
            random_tokens(prompt, vocab, rng),
            SamplingParams.greedy(max_tokens=600, ignore_eos=True),
        )
    for _ in range(20):
        engine.step()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(100):
        engine.step()
    step_ms = (time.perf_counter() - t) * 10
    graph, _, _ = next(iter(engine.runner.graphs.graphs.values()))
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(100):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    replay_ms = start.elapsed_time(end) / 100
    print(
        f"{path.name}: engine step {step_ms:.3f} ms, graph replay {replay_ms:.3f} ms "
        f"(host overhead {step_ms - replay_ms:.3f} ms)",
        flush=True,
    )
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as tprofile

    with tprofile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(10):
            graph.replay()
        torch.cuda.synchronize()
    print(
        prof.key_averages().table(
            sort_by="cuda_time_total", row_limit=14, max_name_column_width=60
        ),
        flush=True,
    )
    print_timeline(prof, replays=10, head=head)
    with tprofile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(10):
            engine.step()
    print(
        prof.key_averages().table(sort_by="cpu_time_total", row_limit=25, max_name_column_width=60),
        flush=True,
    )


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("models", nargs="+", type=Path)
    ap.add_argument("--check-tokens", type=int, default=256)
    ap.add_argument("--pp", type=int, default=512)
    ap.add_argument("--tg", type=int, default=128)
    ap.add_argument(
        "--depth", type=int, default=0,
        help="tg after a prompt of this many tokens (its prefill untimed; llama-bench's -d)",
    )  # fmt: skip
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--batch", type=lambda s: [int(x) for x in s.split(",") if x], default=[])
    ap.add_argument(
        "--batch-prompt",
        type=int,
        default=128,
        help="prompt tokens a sequence in the batched rows (128 new tokens each)",
    )
    ap.add_argument("--no-graphs", action="store_true")
    ap.add_argument(
        "--no-async", action="store_true", help="read each step's tokens back before the next"
    )
    ap.add_argument("--no-check", action="store_true")
    ap.add_argument("--no-bench", action="store_true", help="only check the logits")
    ap.add_argument(
        "--cpu-kernels",
        default="reference",
        help="CPU paths the GPU logits are checked against, comma-separated: reference, fast",
    )
    ap.add_argument("--json", type=Path)
    ap.add_argument("--profile", action="store_true", help="only profile a decode step")
    ap.add_argument("--profile-batch", type=int, default=1, help="sequences in that step")
    ap.add_argument("--profile-prompt", type=int, default=256, help="their prompts' tokens")
    ap.add_argument("--profile-head", type=int, default=24, help="kernels listed in order")
    args = ap.parse_args()
    if args.profile_batch < 1 or args.profile_prompt < 1 or args.profile_head < 0:
        ap.error("--profile-batch and --profile-prompt must be >= 1, --profile-head >= 0")
    if args.batch_prompt < 1:
        ap.error("--batch-prompt must be >= 1")
    if args.depth < 0:
        ap.error("--depth must be >= 0")
    kernels = tuple(k for k in args.cpu_kernels.split(",") if k)
    if not kernels or any(k not in CPU_KERNELS for k in kernels):
        ap.error(f"--cpu-kernels takes a comma-separated list of {', '.join(CPU_KERNELS)}")
    rng = random.Random()
    if args.profile:
        for path in args.models:
            profile(path, rng, args.profile_batch, not args.no_async, args.profile_prompt,
                    args.profile_head)  # fmt: skip
        return
    results = {}
    for path in args.models:
        res = {}
        if not args.no_check:
            res["check"] = check_logits(path, args.check_tokens, rng, kernels)
            print(path.name, "check", json.dumps(res["check"]), flush=True)
        res["bench"] = [] if args.no_bench else bench(path, args, rng)
        for row in res["bench"]:
            print(path.name, json.dumps(row), flush=True)
        results[path.name] = res
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    print(
        f"\n| model | test | llamapy t/s | ({torch.cuda.get_device_name()}, graphs "
        f"{'off' if args.no_graphs else 'on'}, async scheduling {'off' if args.no_async else 'on'})"
    )
    print("| --- | --- | ---: |")
    for name, res in results.items():
        for row in res["bench"]:
            print(f"| {name} | {row['test']} | {row['ts']:.1f} ± {row['sd']:.1f} |")
        for k, v in res.get("check", {}).items():
            print(
                f"| {name} | check {k} | top1 {v['top1']:.4f} kl {v['kl']:.2e} "
                f"rel {v['rel_err']:.2e} max mismatch margin {v['margin']:.2e} |"
            )


if __name__ == "__main__":
    main()
