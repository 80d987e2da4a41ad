"""`llamapy embed -m MODEL TEXT...`: sentence embeddings, as llama.cpp's llama-embedding."""

from __future__ import annotations

import argparse
import json
import os
import sys

from llamapy.cli.common import add_model_args, check_model_args, device_from_args
from llamapy.errors import UsageError


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "embed",
        help="embed texts (BERT / sentence-transformers models, or any decoder)",
        description="Print the embedding of each TEXT: one line of numbers per text, or "
        "OpenAI-shaped JSON with --json. Many texts share one forward pass.",
    )
    p.add_argument("texts", metavar="TEXT", nargs="*", help="texts to embed ('-': standard input)")
    p.add_argument("-f", "--file", metavar="FILE", help="embed each non-empty line of FILE")
    norm = p.add_mutually_exclusive_group()
    norm.add_argument(
        "--normalize",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="L2-normalise the vectors (default: the model's own; a sentence-transformers "
        "folder without a Normalize module: no)",
    )
    norm.add_argument(
        "--embd-normalize",
        type=int,
        default=None,
        metavar="N",
        help="llama.cpp's normalisation: -1 none, 0 max-absolute (int16 range), 2 L2, p > 0 p-norm",
    )
    add_pooling_arg(p)
    p.add_argument("--json", action="store_true", help="print OpenAI-shaped JSON")
    p.add_argument("--truncate", action="store_true", help="cut texts the model cannot take")
    add_model_args(
        p, ctx_help="longest input in tokens (default: the model's)", compile_default=None
    )
    p.set_defaults(func=run)


def add_pooling_arg(p: argparse.ArgumentParser) -> None:
    from llamapy.embedding.pooling import POOLING_TYPES

    p.add_argument(
        "--pooling",
        choices=POOLING_TYPES,
        default=None,
        help="pooling of the token vectors (default: the model's own)",
    )


def load_embedding_llm(args: argparse.Namespace):
    """An LLM loaded for embeddings only, from the shared model flags."""
    from llamapy.api import LLM
    from llamapy.layers.linear import CPU_KERNELS

    kernels = os.environ.get("LLAMAPY_CPU_KERNELS")
    if kernels is not None and kernels not in CPU_KERNELS:
        raise UsageError(f"LLAMAPY_CPU_KERNELS must be one of {CPU_KERNELS}, got {kernels!r}")
    if getattr(args, "quantize", None) is not None:
        raise UsageError(f"--quantize is not supported by `llamapy {args.command}`")
    check_model_args(args)  # -c 0: the model's context, as its default
    return LLM(
        args.model,
        n_ctx=args.ctx_size,
        n_threads=args.threads,
        device=device_from_args(args),
        embedding=True,
        pooling=args.pooling,
    )


def _texts(args: argparse.Namespace) -> list[str]:
    texts = [sys.stdin.read() if t == "-" else t for t in args.texts]
    if args.file is not None:
        try:
            with open(args.file, encoding="utf-8") as f:
                texts += [line.rstrip("\n") for line in f if line.strip()]
        except (OSError, UnicodeDecodeError) as e:
            raise UsageError(f"--file: cannot read {args.file}: {e}") from None
    if not texts:
        raise UsageError("give at least one TEXT (or --file)")
    return texts


def run(args: argparse.Namespace) -> int:
    if args.embd_normalize is not None and args.embd_normalize < -1:
        raise UsageError(
            f"--embd-normalize must be -1, 0 or a positive p, got {args.embd_normalize}"
        )
    texts = _texts(args)
    llm = load_embedding_llm(args)
    normalize = args.normalize if args.embd_normalize is None else args.embd_normalize
    vectors = llm.embed(texts, normalize=normalize, truncate=args.truncate)
    rows = [v.tolist() for v in vectors]
    if args.json:
        n_tokens = sum(len(llm.embedder.text_input(t, truncate=args.truncate)) for t in texts)
        data = [{"object": "embedding", "index": i, "embedding": row} for i, row in enumerate(rows)]
        name = llm.resolved.alias or llm.resolved.path.name
        usage = {"prompt_tokens": n_tokens, "total_tokens": n_tokens}
        out = {"object": "list", "data": data, "model": name, "usage": usage}
        sys.stdout.write(json.dumps(out) + "\n")
        return 0
    for i, row in enumerate(rows):
        if i:
            sys.stdout.write("\n" if isinstance(row[0], list) else "")
        for line in row if isinstance(row[0], list) else [row]:  # pooling none: every token
            sys.stdout.write(" ".join(f"{x:.6f}" for x in line) + "\n")
    return 0
