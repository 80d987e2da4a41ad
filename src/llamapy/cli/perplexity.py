"""`llamapy perplexity -f FILE`: perplexity of a text, computed as llama.cpp's
`llama-perplexity` does (tools/perplexity/perplexity.cpp, `perplexity()`).

The whole file is tokenized (with BOS when the model adds one) and cut into chunks of n_ctx
tokens; each chunk is evaluated on an empty KV cache with its first token replaced by BOS,
and only its second half is scored (positions n_ctx/2 .. n_ctx-2 predict the next token), so
every scored token has at least n_ctx/2 tokens of context.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from llamapy.cli.common import add_model_args, load_llm
from llamapy.engine.scoring import PerplexityStats, perplexity
from llamapy.errors import UsageError

DEFAULT_CTX = 512  # llama-perplexity's default -c
DEFAULT_BATCH = 512
MIN_CTX = 4  # a chunk must score at least two tokens for the standard error


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "perplexity",
        help="perplexity of a text file (llama.cpp's llama-perplexity method)",
        description="Perplexity of the text in FILE, as llama.cpp's llama-perplexity computes "
        "it: chunks of -c tokens, each scored on its second half. Prints the running "
        "estimate per chunk and the final `PPL = x +/- stderr`.",
    )
    p.add_argument("-f", "--file", required=True, metavar="FILE", help="the text to score")
    p.add_argument(
        "-b",
        "--batch-size",
        type=int,
        default=DEFAULT_BATCH,
        metavar="N",
        help=f"tokens per forward pass while prefilling a chunk (default {DEFAULT_BATCH})",
    )
    p.add_argument(
        "--chunks",
        type=int,
        default=-1,
        metavar="N",
        help="score at most N chunks (default -1: every whole chunk of the file)",
    )
    p.add_argument("--json", action="store_true", help="print one JSON object instead")
    # -c is the chunk size here, as in llama-perplexity
    add_model_args(p, ctx_default=DEFAULT_CTX, ctx_help=f"tokens per chunk (default {DEFAULT_CTX})")
    p.set_defaults(func=run)


def _check_args(args: argparse.Namespace) -> None:
    if args.ctx_size < MIN_CTX:
        raise UsageError(f"--ctx-size must be >= {MIN_CTX}, got {args.ctx_size}")
    if args.batch_size <= 0:
        raise UsageError(f"--batch-size must be > 0, got {args.batch_size}")
    if args.chunks == 0 or args.chunks < -1:
        raise UsageError(f"--chunks must be -1 or > 0, got {args.chunks}")


def _read_text(path: str) -> str:
    try:
        return Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise UsageError(f"cannot read {path}: {e}") from None


def run(args: argparse.Namespace) -> int:
    _check_args(args)
    text = _read_text(args.file)
    llm = load_llm(args)
    n_ctx = args.ctx_size
    tokens = llm.tokenize(text)  # common_tokenize(ctx, prompt, add_special=true)
    if len(tokens) < 2 * n_ctx:
        raise UsageError(
            f"you need at least {2 * n_ctx} tokens to evaluate perplexity with a context of "
            f"{n_ctx}; {args.file} tokenizes to only {len(tokens)} tokens"
        )
    n_chunks = len(tokens) // n_ctx
    if args.chunks > 0:
        n_chunks = min(n_chunks, args.chunks)
    batch_size = min(args.batch_size, n_ctx)
    print(
        f"perplexity: calculating perplexity over {n_chunks} chunks, n_ctx={n_ctx}, "
        f"batch_size={batch_size}",
        file=sys.stderr,
    )
    running: list[float] = []
    t0 = time.perf_counter()

    def on_chunk(i: int, stats: PerplexityStats) -> None:
        running.append(stats.ppl)
        if i == 0:
            print(f"perplexity: {time.perf_counter() - t0:.2f} seconds per pass", file=sys.stderr)
        if not args.json:
            print(f"[{i + 1}]{stats.ppl:.4f},", end="", flush=True)

    bos_id = llm.tokenizer.bos_id if llm.tokenizer.add_bos else None
    stats = perplexity(
        llm,
        tokens,
        n_ctx=n_ctx,
        n_chunks=n_chunks,
        bos_id=bos_id,
        batch_size=batch_size,
        on_chunk=on_chunk,
    )
    if args.json:
        print(json.dumps(_summary(args, llm, stats, len(tokens), n_chunks, batch_size, running)))
    else:
        print(f"\nFinal estimate: PPL = {stats.ppl:.4f} +/- {stats.ppl_stderr:.5f}")
    return 0


def _summary(
    args: argparse.Namespace,
    llm,
    stats: PerplexityStats,
    n_tokens: int,
    n_chunks: int,
    batch_size: int,
    running: Sequence[float],
) -> dict:
    return {
        "ppl": stats.ppl,
        "ppl_stderr": stats.ppl_stderr,
        "nll_mean": stats.nll_mean,
        "n_chunks": n_chunks,
        "n_ctx": args.ctx_size,
        "n_batch": batch_size,
        "n_tokens": n_tokens,
        "n_tokens_scored": stats.count,
        "chunk_ppl": list(running),  # the running estimate after each chunk
        "model": str(llm.resolved.path),
        "file": args.file,
    }
