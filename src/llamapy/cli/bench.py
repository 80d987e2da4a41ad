"""`llamapy bench`: prompt and generation speed, measured as llama.cpp's llama-bench does.

Method (llama-bench's): random token ids (no special tokens), a fresh sequence per
repetition with prefix caching off, a warm-up run first (not counted). `ppP`: the prefill of
a P-token prompt, tokens / seconds of its forward passes (the one token sampled after it is
greedy argmax). `tgN`: N tokens generated one at a time after a 1-token prompt (N forward
passes). `--batch B` measures as llama-batched-bench: B prompts of P tokens prefilled
together (`ppP @ B=..`, S_PP = B*P / time), then N decode steps of all B sequences
(`tgN @ B=..`, S_TG = B*N / time). `-d D`: each test with D tokens already in the
sequence's context (`ppP @ dD`, `tgN @ dD`, as llama-bench's --n-depth): a D-token prompt
is processed first, untimed (for pp through the prefix cache, so that only the P new tokens
are computed in the timed pass, besides D's last partial cache block when D is not a
multiple of it; for tg its N decode steps are timed). Everything runs through the real
engine (`LLM`), greedy, end of generation ignored.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import datetime
import io
import json
import platform
import random
import re
import statistics
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from llamapy import __version__
from llamapy.cli.common import add_cache_type_args, kv_cache_dtype_from_args
from llamapy.errors import UsageError
from llamapy.hub import DEFAULT_MODEL

DEFAULT_N_BATCH = 2048
DEFAULT_N_UBATCH = 512
OUTPUT_FORMATS = ("md", "json", "jsonl", "csv")
DEVICE_PATTERN = re.compile(r"cpu|cuda(:\d+)?")


# -- what to measure -------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class BenchTest:
    """One test: a prefill (`n_gen == 0`), a generation (`n_prompt == 0`), each after
    `n_depth` tokens of context, or, with `batched`, B prompts of `n_prompt` then `n_gen`
    decode steps (two result rows)."""

    n_prompt: int
    n_gen: int
    n_parallel: int = 1
    batched: bool = False
    n_depth: int = 0

    def row_names(self) -> list[str]:
        if not self.batched:
            name = f"pp{self.n_prompt}" if self.n_prompt else f"tg{self.n_gen}"
            return [name + (f" @ d{self.n_depth}" if self.n_depth else "")]
        b = f" @ B={self.n_parallel}"
        names = [f"pp{self.n_prompt}{b}"] if self.n_prompt else []
        return names + ([f"tg{self.n_gen}{b}"] if self.n_gen else [])


def make_tests(
    prompts: Sequence[int],
    gens: Sequence[int],
    batches: Sequence[int] = (),
    depths: Sequence[int] = (0,),
) -> list[BenchTest]:
    """llama-bench's tests (each pp, then each tg, each at every depth), or
    llama-batched-bench's (each B, P, N)."""
    if batches:
        return [
            BenchTest(p, n, b, batched=True)
            for b in batches
            for p in prompts
            for n in gens
            if p or n
        ]
    pp = [BenchTest(p, 0, n_depth=d) for p in prompts if p for d in depths]
    return pp + [BenchTest(0, n, n_depth=d) for n in gens if n for d in depths]


@dataclass(frozen=True, slots=True)
class ModelInfo:
    filename: str
    type: str  # llama-bench's model_type, e.g. "llama 1B Q4_0"
    size: int  # bytes of the file (or folder)
    n_params: int  # elements of all tensors


@dataclass(slots=True)
class BenchResult:
    """One row: a test's samples (ns per repetition) and the settings it ran with."""

    model: ModelInfo
    test: str
    n_prompt: int
    n_gen: int
    n_depth: int  # tokens already in each sequence's context (-d; batched tg: its prompt)
    n_parallel: int
    n_tokens: int  # tokens per repetition (t/s = n_tokens / seconds)
    backend: str
    device: str
    n_threads: int
    n_gpu_layers: int
    n_batch: int
    n_ubatch: int
    test_time: str
    samples_ns: list[int] = field(default_factory=list)
    type_kv: str = "f16"  # the KV cache type (-ctk / -ctv: one for both here)

    @property
    def samples_ts(self) -> list[float]:
        return [self.n_tokens * 1e9 / ns for ns in self.samples_ns]

    @property
    def avg_ts(self) -> float:
        return statistics.fmean(self.samples_ts)

    @property
    def stddev_ts(self) -> float:  # sample standard deviation, as llama-bench's stdev
        return statistics.stdev(self.samples_ts) if len(self.samples_ns) > 1 else 0.0

    def record(self) -> dict[str, Any]:
        """llama-bench's field names (json / jsonl / csv), plus n_parallel, test, device."""
        ns = self.samples_ns
        return {
            "build_commit": f"llamapy-{__version__}",
            "build_number": 0,
            "cpu_info": _cpu_info(),
            "gpu_info": _gpu_info(self.device),
            "backends": self.backend,
            "model_filename": self.model.filename,
            "model_type": self.model.type,
            "model_size": self.model.size,
            "model_n_params": self.model.n_params,
            "n_batch": self.n_batch,
            "n_ubatch": self.n_ubatch,
            "n_threads": self.n_threads,
            "n_gpu_layers": self.n_gpu_layers,
            "type_k": self.type_kv,
            "type_v": self.type_kv,
            "device": self.device,
            "n_prompt": self.n_prompt,
            "n_gen": self.n_gen,
            "n_depth": self.n_depth,
            "n_parallel": self.n_parallel,
            "test": self.test,
            "test_time": self.test_time,
            "avg_ns": int(statistics.fmean(ns)),
            "stddev_ns": int(statistics.stdev(ns)) if len(ns) > 1 else 0,
            "avg_ts": self.avg_ts,
            "stddev_ts": self.stddev_ts,
            "samples_ns": list(ns),
            "samples_ts": self.samples_ts,
        }


def _cpu_info() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _gpu_info(device: str) -> str:
    if device == "cpu":
        return ""
    import torch

    return torch.cuda.get_device_name(device) if torch.cuda.is_available() else ""


# -- the engine under test -------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class BenchSettings:
    device: str = "cpu"
    n_threads: int | None = None  # None: torch's default (all cores)
    n_batch: int = DEFAULT_N_BATCH
    n_ubatch: int = DEFAULT_N_UBATCH
    n_gpu_layers: int = 0
    repetitions: int = 5
    kv_cache_dtype: str | None = None  # -ctk / -ctv; None: the engine's default

    @property
    def tokens_per_step(self) -> int:
        """The engine's token budget per forward pass (llama.cpp's physical batch)."""
        return min(self.n_batch, self.n_ubatch)


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def _prefill_steps_bound(test: BenchTest, budget: int) -> int:
    """At most how many steps the prefill of a batched test takes: each step gives the
    waiting prompts what the decoding sequences (at most B - 1) leave of the budget."""
    return -(-test.n_parallel * max(test.n_prompt, 1) // (budget - test.n_parallel + 1)) + 1


def kv_tokens_needed(tests: Sequence[BenchTest], budget: int, block_size: int) -> int:
    """KV cache tokens the tests need at once (B sequences of prompt + generated tokens)."""
    need = block_size
    for t in tests:
        per_seq = t.n_depth + max(t.n_prompt, 1) + t.n_gen + 1
        if t.batched:
            per_seq += _prefill_steps_bound(t, budget)
        need = max(need, t.n_parallel * _round_up(per_seq, block_size) + block_size)
    return need


class EngineBench:
    """A model loaded in llamapy's engine, measured the way llama-bench measures."""

    def __init__(self, model: str, settings: BenchSettings, tests: Sequence[BenchTest]) -> None:
        from llamapy.api import LLM
        from llamapy.engine.kv_cache import DEFAULT_BLOCK_SIZE

        self.settings = settings
        budget = settings.tokens_per_step
        # LLM sizes the KV pool by n_ctx: it must hold every sequence of a batched test.
        n_ctx = kv_tokens_needed(tests, budget, DEFAULT_BLOCK_SIZE)
        try:
            self.llm = LLM(
                model,
                n_ctx=n_ctx,
                max_num_seqs=max(t.n_parallel for t in tests),
                max_num_batched_tokens=budget,
                n_threads=settings.n_threads,
                device=settings.device,
                kv_cache_dtype=settings.kv_cache_dtype,
                # only a test at a depth reuses cached blocks (its depth's, on purpose)
                enable_prefix_caching=any(t.n_depth for t in tests),
            )
        except ValueError as e:  # e.g. a device this build cannot use
            raise UsageError(str(e)) from None
        self.info = model_info(self.llm)
        self.type_kv = _cache_type_name(self.llm)
        tok = self.llm.tokenizer
        n_vocab = min(tok.vocab_size, self.llm.config.vocab_size)
        self.pool = [i for i in range(n_vocab) if not tok.is_special(i)] or list(range(n_vocab))
        self.rng = random.Random(0)

    def random_prompt(self, n: int) -> list[int]:
        """n random non-special ids; BOS first where the model adds one (as llama-bench)."""
        ids = self.rng.choices(self.pool, k=n)
        tok = self.llm.tokenizer
        if tok.add_bos and tok.bos_id is not None and n > 0:
            ids[0] = tok.bos_id
        return ids

    def _generate(self, prompts: list[list[int]], n_new: int) -> float:
        from llamapy.sampling.params import SamplingParams

        params = SamplingParams.greedy(max_tokens=n_new, ignore_eos=True)
        t0 = time.perf_counter()
        outs = self.llm.generate(prompts, params)
        elapsed = time.perf_counter() - t0
        counts = {len(o.token_ids) for o in outs}
        if counts != {n_new}:
            raise RuntimeError(f"the engine generated {sorted(counts)} tokens, not {n_new}")
        return elapsed

    def prefill(self, n_prompt: int, n_parallel: int = 1) -> float:
        """Seconds to prefill `n_parallel` fresh prompts of `n_prompt` tokens (1 sampled)."""
        return self._generate([self.random_prompt(n_prompt) for _ in range(n_parallel)], 1)

    def prefill_at_depth(self, n_prompt: int, n_depth: int) -> float:
        """Seconds to prefill `n_prompt` fresh tokens after `n_depth` tokens of context: the
        depth's prompt runs first (untimed) and leaves its full blocks in the prefix cache,
        then the timed request (depth + prompt) computes only what the cache does not hold."""
        depth = self.random_prompt(n_depth)
        self._generate([depth], 1)
        return self._generate([depth + self.rng.choices(self.pool, k=n_prompt)], 1)

    def generate(self, n_gen: int) -> float:
        """Seconds for `n_gen` tokens one at a time after a 1-token prompt."""
        return self._generate([self.random_prompt(1)], n_gen)

    def decode_steps(self, test: BenchTest) -> float:
        """Seconds of `test.n_gen` engine steps that each decode all B sequences, once all
        B prompts are prefilled (the prefill itself is not timed)."""
        from llamapy.sampling.params import SamplingParams

        engine = self.llm.engine
        slack = _prefill_steps_bound(test, self.settings.tokens_per_step)
        params = SamplingParams.greedy(max_tokens=test.n_gen + slack + 1, ignore_eos=True)
        prompts = [self.random_prompt(max(test.n_prompt, 1)) for _ in range(test.n_parallel)]
        rids = [engine.add_request(p, params) for p in prompts]
        try:
            started: set[str] = set()
            while len(started) < len(rids):
                if not engine.has_unfinished_requests():
                    raise RuntimeError("the engine finished before every prompt was prefilled")
                started.update(o.request_id for o in engine.step())
            # with async scheduling a step returns the tokens of the step before it: count
            # tokens, not steps (a step yields every sequence's token or, the first, none)
            t0 = time.perf_counter()
            produced = 0
            while produced < test.n_gen * len(rids):
                n = len(engine.step())
                if n != len(rids) and (n or produced):
                    raise RuntimeError("a decode step did not advance every sequence")
                produced += n
            return time.perf_counter() - t0
        finally:
            for r in rids:
                engine.abort_request(r)

    def close(self) -> None:
        close = getattr(self.llm.model_file, "close", None)
        if close is not None:
            close()


def model_info(llm: Any) -> ModelInfo:
    """llama-bench's model columns from a loaded `LLM`."""
    mf = llm.model_file
    n_params = sum(info.numel for info in mf.tensor_infos.values())
    return ModelInfo(
        filename=str(mf.path),
        type=f"{llm.config.arch} {_size_label(n_params)} {_type_name(mf)}",
        size=int(mf.file_size),
        n_params=n_params,
    )


def _cache_type_name(llm: Any) -> str:
    """The engine's KV cache type by llama.cpp's name (f32 / f16 / bf16)."""
    from llamapy.engine.kv_cache import KV_CACHE_TYPES

    dtype = llm.engine.runner.kv_caches[0][0].dtype
    return next((name for name, d in KV_CACHE_TYPES.items() if d == dtype), str(dtype))


def _size_label(n_params: int) -> str:
    for unit, scale in (("B", 1e9), ("M", 1e6)):
        if n_params >= scale:
            return f"{n_params / scale:.0f}{unit}"
    return f"{n_params / 1e3:.0f}K"


def _type_name(model_file: Any) -> str:
    """The file type (general.file_type), else the type holding most weights."""
    from gguf import Keys, LlamaFileType

    ftype = getattr(model_file, "metadata", {}).get(Keys.General.FILE_TYPE)
    try:
        name = LlamaFileType(int(ftype)).name
        return "F32" if name == "ALL_F32" else name.removeprefix("MOSTLY_")
    except (TypeError, ValueError):
        pass
    weights: dict[str, int] = {}
    for info in model_file.tensor_infos.values():
        weights[info.qtype.name] = weights.get(info.qtype.name, 0) + info.numel
    return max(weights, key=weights.__getitem__) if weights else "?"


# -- running the tests -----------------------------------------------------------------------

Progress = Callable[[str], None]


def _samples(
    run: Callable[[], float], warmup: Callable[[], float], reps: int, what: str, log: Progress
) -> list[int]:
    log(f"warmup {what} run")
    warmup()
    out = []
    for i in range(reps):
        log(f"{what} run {i + 1}/{reps}")
        out.append(max(1, round(run() * 1e9)))
    return out


def run_test(bench: EngineBench, test: BenchTest, log: Progress) -> list[BenchResult]:
    """The result rows of one test (two for a batched test with prompt and generation)."""
    s = bench.settings
    reps = s.repetitions

    def row(name: str, n_prompt: int, n_gen: int, n_depth: int, samples: list[int]):
        n_tokens = test.n_parallel * (n_prompt or n_gen)
        return BenchResult(
            bench.info, name, n_prompt, n_gen, n_depth, test.n_parallel, n_tokens,
            "CPU" if s.device == "cpu" else "CUDA", s.device, _threads(s), s.n_gpu_layers,
            s.n_batch, s.n_ubatch, stamp, samples, type_kv=bench.type_kv,
        )  # fmt: skip

    stamp = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    p, n, b = test.n_prompt, test.n_gen, test.n_parallel
    names = iter(test.row_names())
    d = test.n_depth
    if not test.batched and d:
        if p:
            pp = lambda: bench.prefill_at_depth(p, d)  # noqa: E731
            return [row(next(names), p, 0, d, _samples(pp, pp, reps, "prompt", log))]
        tg = BenchTest(d, n, 1, batched=True)  # n decode steps after a d-token prompt
        warm = lambda: bench.decode_steps(BenchTest(d, 1, 1, batched=True))  # noqa: E731
        samples = _samples(lambda: bench.decode_steps(tg), warm, reps, "gen", log)
        return [row(next(names), 0, n, d, samples)]
    if not test.batched:
        if p:
            samples = _samples(
                lambda: bench.prefill(p), lambda: bench.prefill(p), reps, "prompt", log
            )
            return [row(next(names), p, 0, 0, samples)]
        # one decode step after the 1-token prompt pass (llama-bench warms up with 1 decode)
        samples = _samples(lambda: bench.generate(n), lambda: bench.generate(2), reps, "gen", log)
        return [row(next(names), 0, n, 0, samples)]
    rows = []
    if p:
        warm = lambda: bench.prefill(p, b)  # noqa: E731
        rows.append(row(next(names), p, 0, 0, _samples(warm, warm, reps, "prompt", log)))
    if n:
        warm = lambda: bench.decode_steps(BenchTest(p, 1, b, batched=True))  # noqa: E731
        samples = _samples(lambda: bench.decode_steps(test), warm, reps, "gen", log)
        rows.append(row(next(names), 0, n, p, samples))
    return rows


def _threads(s: BenchSettings) -> int:
    import torch

    return s.n_threads or torch.get_num_threads()


def _progress_log(progress: Progress | None, prefix: str) -> Progress:
    return (lambda m: progress(prefix + m)) if progress else (lambda m: None)


def run_bench(
    models: Sequence[str],
    tests: Sequence[BenchTest],
    settings: BenchSettings,
    *,
    progress: Progress | None = None,
) -> Iterator[BenchResult]:
    """Every test on every model, one model loaded at a time; rows as they complete."""
    total = len(models) * len(tests)
    count = 0
    for model in models:
        bench = EngineBench(model, settings, tests)
        try:
            for test in tests:
                count += 1
                log = _progress_log(progress, f"llamapy bench: benchmark {count}/{total}: ")
                log("starting")
                yield from run_test(bench, test, log)
        finally:
            bench.close()


# -- output ----------------------------------------------------------------------------------


def _size_text(n: int) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.2f} MiB"


def _params_text(n: int) -> str:
    return f"{n / 1e9:.2f} B" if n >= 1e9 else f"{n / 1e6:.2f} M"


class MarkdownPrinter:
    """llama-bench's table: the settings columns that matter, then test and t/s."""

    def __init__(self, out: io.TextIOBase, settings: BenchSettings) -> None:
        self.out = out
        cols = [("model", 30, "<"), ("size", 10, ">"), ("params", 10, ">"), ("backend", 7, "<")]
        cols.append(("threads", 7, ">") if settings.device == "cpu" else ("ngl", 3, ">"))
        if settings.n_batch != DEFAULT_N_BATCH:
            cols.append(("n_batch", 7, ">"))
        if settings.n_ubatch != DEFAULT_N_UBATCH:
            cols.append(("n_ubatch", 8, ">"))
        if settings.kv_cache_dtype is not None:
            cols += [("type_k", 6, ">"), ("type_v", 6, ">")]
        self.cols = cols + [("test", 15, ">"), ("t/s", 20, ">")]
        self.started = False

    def _line(self, values: list[str]) -> None:
        cells = [f"{v:{a}{w}}" for v, (_, w, a) in zip(values, self.cols, strict=True)]
        self.out.write("| " + " | ".join(cells) + " |\n")

    def add(self, r: BenchResult) -> None:
        if not self.started:
            self._line([name for name, _, _ in self.cols])
            rules = ["-" * (w - 1) + (":" if a == ">" else "-") for _, w, a in self.cols]
            self.out.write("| " + " | ".join(rules) + " |\n")
            self.started = True
        by_name = {
            "model": r.model.type,
            "size": _size_text(r.model.size),
            "params": _params_text(r.model.n_params),
            "backend": r.backend,
            "ngl": str(r.n_gpu_layers),
            "threads": str(r.n_threads),
            "n_batch": str(r.n_batch),
            "n_ubatch": str(r.n_ubatch),
            "type_k": r.type_kv,
            "type_v": r.type_kv,
            "test": r.test,
            "t/s": f"{r.avg_ts:.2f} ± {r.stddev_ts:.2f}",
        }
        self._line([by_name[name] for name, _, _ in self.cols])
        self.out.flush()

    def end(self) -> None:
        pass


class RecordPrinter:
    """json (one array at the end), jsonl (a line per row) or csv (a header, then rows)."""

    def __init__(self, out: io.TextIOBase, fmt: str) -> None:
        self.out, self.fmt = out, fmt
        self.records: list[dict[str, Any]] = []
        self.writer: csv.DictWriter | None = None

    def add(self, r: BenchResult) -> None:
        rec = r.record()
        if self.fmt == "json":
            self.records.append(rec)
            return
        if self.fmt == "jsonl":
            self.out.write(json.dumps(rec) + "\n")
        else:
            if self.writer is None:
                self.writer = csv.DictWriter(self.out, fieldnames=list(rec), lineterminator="\n")
                self.writer.writeheader()
            samples = {k: " ".join(str(x) for x in rec[k]) for k in ("samples_ns", "samples_ts")}
            self.writer.writerow(rec | samples)
        self.out.flush()

    def end(self) -> None:
        if self.fmt == "json":
            self.out.write(json.dumps(self.records, indent=2) + "\n")


# -- command line ----------------------------------------------------------------------------


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "bench",
        help="measure prompt and generation speed (llama-bench compatible)",
        description=__doc__.split("\n\n")[1] if __doc__ else None,
    )
    p.add_argument(
        "-m",
        "--model",
        action="append",
        default=None,
        metavar="MODEL[,MODEL...]",
        help=f"GGUF files, folders or aliases (repeatable; default {DEFAULT_MODEL})",
    )
    p.add_argument("-p", "--n-prompt", default="512", metavar="N[,N...]", help="prompt sizes")
    p.add_argument("-n", "--n-gen", default="128", metavar="N[,N...]", help="generation lengths")
    p.add_argument(
        "-d", "--n-depth", default="0", metavar="N[,N...]",
        help="tokens of context before each test (its prompt processed first, untimed)",
    )  # fmt: skip
    p.add_argument("-r", "--repetitions", default="5", metavar="N", help="runs of each test")
    p.add_argument("-b", "--batch-size", default=str(DEFAULT_N_BATCH), metavar="N")
    p.add_argument(
        "-ub",
        "--ubatch-size",
        default=str(DEFAULT_N_UBATCH),
        metavar="N",
        help="tokens per forward pass at most (with -b: the smaller of the two)",
    )
    p.add_argument("-t", "--threads", default=None, metavar="N[,N...]", help="CPU threads")
    p.add_argument("-ngl", "--n-gpu-layers", default="0", metavar="N", help="N > 0: run on the GPU")
    p.add_argument(
        "--device", default=None, help="cpu, cuda or cuda:N (default cpu; cuda with -ngl N > 0)"
    )
    add_cache_type_args(p)
    p.add_argument("-o", "--output", default="md", help="md, json, jsonl or csv (default md)")
    p.add_argument(
        "--batch",
        default=None,
        metavar="B[,B...]",
        help="parallel sequences: aggregate throughput as llama-batched-bench",
    )
    p.add_argument("--progress", action="store_true", help="print progress to stderr")
    p.set_defaults(func=run)


def int_list(text: str, flag: str, *, minimum: int = 0) -> list[int]:
    """`A,B,C` -> [A, B, C], each an integer >= minimum; otherwise a UsageError."""
    try:
        values = [int(x) for x in text.split(",")]
    except ValueError:
        raise UsageError(f"{flag} expects integers separated by commas, got {text!r}") from None
    bad = [v for v in values if v < minimum]
    if bad:
        raise UsageError(f"{flag} values must be >= {minimum}, got {bad[0]}")
    return values


def _one_int(text: str, flag: str, *, minimum: int) -> int:
    values = int_list(text, flag, minimum=minimum)
    if len(values) != 1:
        raise UsageError(f"{flag} takes one value, got {text!r}")
    return values[0]


def parse_settings(args: argparse.Namespace) -> tuple[list[str], list[BenchTest], BenchSettings]:
    """Models, tests and settings from the flags; bad values raise UsageError."""
    if args.output not in OUTPUT_FORMATS:
        raise UsageError(f"-o must be one of {', '.join(OUTPUT_FORMATS)}, got {args.output!r}")
    ngl = _one_int(args.n_gpu_layers, "-ngl", minimum=0)
    device = args.device or ("cuda" if ngl > 0 else "cpu")
    if not DEVICE_PATTERN.fullmatch(device):
        raise UsageError(f"--device must be cpu, cuda or cuda:N, got {device!r}")
    if device == "cpu" and ngl > 0:
        raise UsageError("-ngl > 0 runs on the GPU; it conflicts with --device cpu")
    settings = BenchSettings(
        device=device,
        n_batch=_one_int(args.batch_size, "-b", minimum=1),
        n_ubatch=_one_int(args.ubatch_size, "-ub", minimum=1),
        n_gpu_layers=ngl,
        repetitions=_one_int(args.repetitions, "-r", minimum=1),
        kv_cache_dtype=kv_cache_dtype_from_args(args, device),
    )
    batches = int_list(args.batch, "--batch", minimum=1) if args.batch else []
    too_big = [b for b in batches if b > settings.tokens_per_step]
    if too_big:
        raise UsageError(
            f"--batch {too_big[0]} exceeds the {settings.tokens_per_step} tokens of one forward "
            f"pass (-b / -ub): every sequence must decode in each step"
        )
    depths = int_list(args.n_depth, "-d")
    if batches and any(depths):
        raise UsageError("-d applies to llama-bench's tests, not to --batch (its -p is the depth)")
    tests = make_tests(
        int_list(args.n_prompt, "-p"), int_list(args.n_gen, "-n"), sorted(set(batches)), depths
    )
    if not tests:
        raise UsageError("nothing to measure: -p and -n are both 0")
    models = [m for arg in args.model or [DEFAULT_MODEL] for m in arg.split(",") if m]
    if not models:
        raise UsageError("-m names no model")
    return models, tests, settings


def run(args: argparse.Namespace) -> int:
    models, tests, settings = parse_settings(args)
    threads = int_list(args.threads, "-t", minimum=1) if args.threads else [None]
    out = sys.stdout
    printer = (
        MarkdownPrinter(out, settings) if args.output == "md" else RecordPrinter(out, args.output)
    )
    progress = (lambda m: print(m, file=sys.stderr, flush=True)) if args.progress else None
    for n_threads in threads:
        s = dataclasses.replace(settings, n_threads=n_threads)
        for result in run_bench(models, tests, s, progress=progress):
            printer.add(result)
    printer.end()
    return 0
