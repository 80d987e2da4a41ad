"""Flags shared by the generating commands (run, chat, serve), with llama.cpp's names."""

from __future__ import annotations

import argparse
import os

from llamapy.errors import UsageError
from llamapy.hub import DEFAULT_MODEL
from llamapy.sampling.params import SamplingParams
from llamapy.sampling.stages import samplers_from_chars, samplers_from_names, samplers_to_chars


def add_model_args(
    p: argparse.ArgumentParser,
    *,
    ctx_default: int | None = None,
    ctx_help: str = "context size in tokens (default: min(4096, the model's); 0: the model's)",
    threads_help: str = "CPU threads (default: all cores)",
    compile_default: bool | None = False,
) -> None:
    """The model flags. `compile_default`: whether the command compiles the CPU decode step
    with torch.compile unless told `--enforce-eager` (long-running ones: serve); one-shot
    commands (run, chat, perplexity) do not unless told `--compile`, since the compile costs
    seconds at every start. (Both take the native decode step, models/cpu_step.py, where it
    runs: a numba function cached on disk, no such cost.) None: no generation engine, no
    such flags (embed, rerank)."""
    p.add_argument(
        "-m",
        "--model",
        default=None,
        metavar="MODEL",
        help=f"a .gguf path, Hugging Face folder, alias or hf:ORG/REPO (default {DEFAULT_MODEL})",
    )
    p.add_argument(
        "-c",
        "--ctx-size",
        type=int,
        default=ctx_default,
        metavar="N",
        help=ctx_help,
    )
    p.add_argument(
        "-t",
        "--threads",
        type=int,
        default=None,
        metavar="N",
        help=threads_help,
    )
    p.add_argument(
        "--device",
        default=None,
        metavar="DEV",
        help="cpu (default) or cuda[:N]: the GPU runs Triton kernels and CUDA-graph decoding",
    )
    p.add_argument(
        "-ngl",
        "--n-gpu-layers",
        type=int,
        default=None,
        metavar="N",
        help="llama.cpp's offload flag: N > 0 runs the whole model on the GPU (as --device "
        "cuda; partial offload is not supported), 0 keeps it on the CPU",
    )
    p.add_argument(
        "--chat-template",
        default=None,
        metavar="NAME|FILE",
        help="a named template (chatml, llama3, gemma, ...) or a Jinja file",
    )
    p.add_argument(
        "--quantize",
        default=None,
        metavar="TYPE",
        help="quantize the weights as they load (Q4_0, Q8_0, Q4_K_M, ...: the types of "
        "`llamapy quantize`); no file is written",
    )
    if compile_default is None:
        return
    add_cache_type_args(p)
    p.add_argument(
        "--enforce-eager",
        action="store_true",
        help="run every step eagerly: no native or torch.compile'd CPU decode step, no CUDA "
        "graphs (as vLLM's flag)",
    )
    p.add_argument(
        "--no-async-scheduling",
        dest="async_scheduling",
        action="store_false",
        default=None,
        help="GPU: read each decode step's tokens back before launching the next (default: "
        "the next step launches first, the host's work overlapping the GPU's)",
    )
    if not compile_default:
        p.add_argument(
            "--compile",
            action="store_true",
            help="CPU, models the native decode step cannot run (weights without VNNI "
            "kernels): compile the decode step with torch.compile (~1.6x faster decoding; a "
            "few seconds more at each start, ~20 s the first time for a model, then cached)",
        )


def add_cache_type_args(p: argparse.ArgumentParser) -> None:
    """llama.cpp's -ctk / -ctv (one type for K and V here)."""
    for short, long, which in (("-ctk", "--cache-type-k", "K"), ("-ctv", "--cache-type-v", "V")):
        p.add_argument(
            short,
            long,
            default=None,
            metavar="TYPE",
            help=f"KV cache type for {which}: f16 (default; CUDA's only one), f32 (CPU: "
            "twice the memory, slower at long contexts), bf16 (CPU); K and V share one type "
            "here, so either flag sets both",
        )


def kv_cache_dtype_from_args(args: argparse.Namespace, device: str = "cpu") -> str | None:
    """-ctk / -ctv, checked: the one type both name (either alone sets both), None for the
    default; two different types or an unknown one are usage errors."""
    from llamapy.engine.kv_cache import kv_cache_dtype

    k, v = getattr(args, "cache_type_k", None), getattr(args, "cache_type_v", None)
    given = [t for t in (k, v) if t is not None]
    if not given:
        return None
    try:
        dtypes = {kv_cache_dtype(t, device) for t in given}
    except ValueError as e:
        raise UsageError(f"-ctk / -ctv: {e}") from None
    if len(dtypes) > 1:
        raise UsageError(f"llamapy keeps K and V in one cache type: -ctk {k} and -ctv {v} differ")
    return given[0]


def add_sampling_args(p: argparse.ArgumentParser) -> None:
    d = SamplingParams()
    g = p.add_argument_group("sampling (llama.cpp's names and defaults)")
    g.add_argument(
        "-n",
        "--n-predict",
        type=int,
        default=-1,
        metavar="N",
        help="tokens to generate (-1: until end of text or the context is full)",
    )
    g.add_argument("--temp", type=float, default=d.temperature, help="temperature; 0 = greedy")
    g.add_argument("--top-k", type=int, default=d.top_k, help="top-k (<= 0 disables)")
    g.add_argument("--top-p", type=float, default=d.top_p, help="top-p (1.0 disables)")
    g.add_argument("--min-p", type=float, default=d.min_p, help="min-p (0.0 disables)")
    g.add_argument("--typical", type=float, default=d.typical_p, help="typical-p (1.0 disables)")
    g.add_argument("--repeat-penalty", type=float, default=d.repeat_penalty)
    g.add_argument(
        "--repeat-last-n",
        type=int,
        default=d.repeat_last_n,
        help="tokens the penalties look at (-1 = whole context, 0 = off)",
    )
    g.add_argument("--presence-penalty", type=float, default=d.presence_penalty)
    g.add_argument("--frequency-penalty", type=float, default=d.frequency_penalty)
    g.add_argument("-s", "--seed", type=int, default=None, help="random seed (default: random)")
    g.add_argument("--ignore-eos", action="store_true", help="keep generating past end of text")
    add_more_sampling_args(p, d)
    add_structured_args(p)


def add_more_sampling_args(p: argparse.ArgumentParser, d: SamplingParams) -> None:
    """DRY, XTC, top-n-sigma, dynamic temperature, mirostat and the chain's order."""
    g = p.add_argument_group("more samplers (llama.cpp's names and defaults)")
    g.add_argument("--min-keep", type=int, default=d.min_keep, help="filters keep at least N")
    g.add_argument("--dry-multiplier", type=float, default=d.dry_multiplier, help="0 = off")
    g.add_argument("--dry-base", type=float, default=d.dry_base)
    g.add_argument("--dry-allowed-length", type=int, default=d.dry_allowed_length)
    g.add_argument(
        "--dry-penalty-last-n",
        type=int,
        default=d.dry_penalty_last_n,
        help="tokens DRY scans (-1 = whole context, 0 = off)",
    )
    g.add_argument(
        "--dry-sequence-breaker",
        action="append",
        default=None,
        metavar="STRING",
        help="a DRY sequence breaker (repeatable; replaces the defaults '\\n' ':' '\"' '*'; "
        "'none' for none)",
    )
    g.add_argument("--xtc-probability", type=float, default=d.xtc_probability, help="0 = off")
    g.add_argument("--xtc-threshold", type=float, default=d.xtc_threshold, help="> 0.5 = off")
    g.add_argument(
        "--top-n-sigma", "--top-nsigma", type=float, default=d.top_n_sigma, help="<= 0 = off"
    )
    g.add_argument("--dynatemp-range", type=float, default=d.dynatemp_range, help="0 = off")
    g.add_argument("--dynatemp-exp", type=float, default=d.dynatemp_exponent)
    g.add_argument("--mirostat", type=int, default=d.mirostat, help="0 = off, 1, or 2 (v2)")
    g.add_argument("--mirostat-lr", type=float, default=d.mirostat_eta, help="eta")
    g.add_argument("--mirostat-ent", type=float, default=d.mirostat_tau, help="tau")
    g.add_argument(
        "--samplers",
        default=None,
        metavar="NAMES",
        help="the chain's order, ';'-separated (default: "
        + ";".join(s.value for s in d.samplers)
        + ")",
    )
    g.add_argument(
        "--sampling-seq",
        "--sampler-seq",
        default=None,
        metavar="LETTERS",
        help=f"the chain's order as letters (default: {samplers_to_chars(d.samplers)})",
    )


def _more_sampling_kwargs(args: argparse.Namespace) -> dict[str, object]:
    breakers = args.dry_sequence_breaker
    if breakers is not None:
        breakers = [] if "none" in breakers else breakers
    if args.samplers is not None and args.sampling_seq is not None:
        raise ValueError("give one of --samplers and --sampling-seq")
    samplers = None
    if args.samplers is not None:
        samplers = samplers_from_names([n for n in args.samplers.split(";") if n])
    elif args.sampling_seq is not None:
        samplers = samplers_from_chars(args.sampling_seq)
    kwargs: dict[str, object] = dict(
        min_keep=args.min_keep,
        dry_multiplier=args.dry_multiplier,
        dry_base=args.dry_base,
        dry_allowed_length=args.dry_allowed_length,
        dry_penalty_last_n=args.dry_penalty_last_n,
        xtc_probability=args.xtc_probability,
        xtc_threshold=args.xtc_threshold,
        top_n_sigma=args.top_n_sigma,
        dynatemp_range=args.dynatemp_range,
        dynatemp_exponent=args.dynatemp_exp,
        mirostat=args.mirostat,
        mirostat_eta=args.mirostat_lr,
        mirostat_tau=args.mirostat_ent,
    )
    if breakers is not None:
        kwargs["dry_sequence_breakers"] = tuple(breakers)
    if samplers is not None:
        kwargs["samplers"] = samplers
    return kwargs


def add_structured_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("structured output (one of these; llguidance)")
    g.add_argument("--grammar", metavar="TEXT", help="a GBNF grammar (llama.cpp's dialect) or Lark")
    g.add_argument("--grammar-file", metavar="FILE", help="read the grammar from FILE")
    g.add_argument("--json-schema", metavar="JSON|@FILE", help="a JSON Schema, or @FILE")
    g.add_argument("--regex", metavar="REGEX", help="a regular expression the output must match")


def _read_text(path: str, flag: str) -> str:
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"{flag}: cannot read {path}: {e}") from None


def structured_kwargs(args: argparse.Namespace) -> dict[str, str]:
    """SamplingParams' constraint fields from the flags (files read here)."""
    names = ("grammar", "grammar_file", "json_schema", "regex")
    given = [f for f in names if getattr(args, f, None) is not None]
    if len(given) > 1:
        flags = ", ".join("--" + f.replace("_", "-") for f in given)
        raise ValueError(f"give one of --grammar, --grammar-file, --json-schema, --regex: {flags}")
    if not given:
        return {}
    name, value = given[0], getattr(args, given[0])
    if name == "grammar_file":
        return {"grammar": _read_text(value, "--grammar-file")}
    if name == "json_schema" and value.startswith("@"):
        return {"json_schema": _read_text(value[1:], "--json-schema")}
    return {name: value}


def sampling_params(args: argparse.Namespace, stop: tuple[str, ...] = ()) -> SamplingParams:
    """SamplingParams from the parsed flags; invalid values raise ValueError naming the field."""
    if args.n_predict < -1:
        raise ValueError(f"--n-predict must be -1 or >= 0, got {args.n_predict}")
    return SamplingParams(
        temperature=args.temp,
        top_k=args.top_k,
        top_p=args.top_p,
        min_p=args.min_p,
        typical_p=args.typical,
        repeat_penalty=args.repeat_penalty,
        repeat_last_n=args.repeat_last_n,
        presence_penalty=args.presence_penalty,
        frequency_penalty=args.frequency_penalty,
        seed=args.seed,
        max_tokens=None if args.n_predict < 0 else args.n_predict,
        stop=stop,
        ignore_eos=args.ignore_eos,
        **_more_sampling_kwargs(args),
        **structured_kwargs(args),
    )


def device_from_args(args: argparse.Namespace) -> str:
    """--device, or llama.cpp's -ngl (N > 0: the GPU); conflicting values are a usage error."""
    ngl = getattr(args, "n_gpu_layers", None)
    device = getattr(args, "device", None)
    if ngl is not None and ngl < 0:
        raise UsageError(f"-ngl must be >= 0, got {ngl}")
    from_ngl = None if ngl is None else ("cuda" if ngl > 0 else "cpu")
    if device is not None and from_ngl is not None and device.split(":")[0] != from_ngl:
        raise UsageError(f"--device {device} contradicts -ngl {ngl}")
    device = device or from_ngl or "cpu"
    from llamapy.engine.llm_engine import check_device

    try:
        check_device(device)
    except ValueError as e:
        raise UsageError(str(e)) from None
    return device


def check_model_args(args: argparse.Namespace) -> None:
    """-t must be positive; -c non-negative (0: the model's context, as llama.cpp's)."""
    threads, ctx = getattr(args, "threads", None), getattr(args, "ctx_size", None)
    if threads is not None and threads <= 0:
        raise UsageError(f"--threads must be positive, got {threads}")
    if ctx is not None and ctx < 0:
        raise UsageError(f"--ctx-size must be >= 0 (0: the model's context length), got {ctx}")


def load_llm(args: argparse.Namespace):
    from llamapy.api import LLM
    from llamapy.layers.linear import CPU_KERNELS

    check_model_args(args)
    kernels = os.environ.get("LLAMAPY_CPU_KERNELS")
    if kernels is not None and kernels not in CPU_KERNELS:
        raise UsageError(f"LLAMAPY_CPU_KERNELS must be one of {CPU_KERNELS}, got {kernels!r}")
    device = device_from_args(args)
    if kernels == "ggml" and device != "cpu":
        raise UsageError(
            "LLAMAPY_CPU_KERNELS=ggml emulates llama.cpp's CPU numerics and runs on the CPU "
            f"only; got device {device}"
        )

    return LLM(
        args.model,
        n_ctx=args.ctx_size,
        n_threads=args.threads,
        chat_template=args.chat_template,
        device=device,
        quantize=quantize_from_args(args),
        enforce_eager=args.enforce_eager,
        cpu_compile=getattr(args, "compile", False) and not args.enforce_eager,
        async_scheduling=getattr(args, "async_scheduling", None),
        kv_cache_dtype=kv_cache_dtype_from_args(args, device),
    )


def quantize_from_args(args: argparse.Namespace) -> str | None:
    """--quantize, checked: an unknown type is a usage error."""
    name = getattr(args, "quantize", None)
    if name is not None:
        from llamapy.quant.presets import parse_preset

        try:
            parse_preset(name)
        except ValueError as e:
            raise UsageError(f"--quantize: {e}") from None
    return name
