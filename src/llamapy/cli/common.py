"""Flags shared by the generating commands (run, chat, serve), with llama.cpp's names."""

from __future__ import annotations

import argparse
import os

from llamapy.errors import UsageError
from llamapy.hub import DEFAULT_MODEL
from llamapy.sampling.params import SamplingParams


def add_model_args(
    p: argparse.ArgumentParser,
    *,
    ctx_default: int | None = None,
    ctx_help: str = "context size in tokens (default: min(4096, the model's))",
    threads_help: str = "CPU threads (default: all cores)",
) -> None:
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


def load_llm(args: argparse.Namespace):
    from llamapy.api import LLM
    from llamapy.layers.linear import CPU_KERNELS

    kernels = os.environ.get("LLAMAPY_CPU_KERNELS")
    if kernels is not None and kernels not in CPU_KERNELS:
        raise UsageError(f"LLAMAPY_CPU_KERNELS must be one of {CPU_KERNELS}, got {kernels!r}")

    return LLM(
        args.model,
        n_ctx=args.ctx_size,
        n_threads=args.threads,
        chat_template=args.chat_template,
        device=device_from_args(args),
    )
