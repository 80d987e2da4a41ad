"""`llamapy rerank -m MODEL --query Q DOC...`: documents by relevance to a query."""

from __future__ import annotations

import argparse
import json
import sys

from llamapy.cli.common import add_model_args
from llamapy.cli.embed import load_embedding_llm
from llamapy.errors import UsageError


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "rerank",
        help="score documents by relevance to a query (cross-encoders, Qwen3-Reranker style)",
        description="Print each DOC's relevance score for the query, best first: "
        "score, index, document (tab-separated), or JSON with --json. A cross-encoder's score "
        "is its raw logit (as llama.cpp's); a decoder's is p(yes) of its yes/no answer.",
    )
    p.add_argument("-q", "--query", required=True, help="the query")
    p.add_argument("documents", metavar="DOC", nargs="*", help="documents to rank")
    p.add_argument("-f", "--file", metavar="FILE", help="rank each non-empty line of FILE too")
    p.add_argument("--top-n", type=int, default=None, metavar="N", help="print the best N only")
    p.add_argument("--json", action="store_true", help="print the /v1/rerank response shape")
    p.add_argument("--truncate", action="store_true", help="cut pairs the model cannot take")
    add_model_args(
        p,
        ctx_help="longest query + document in tokens (default: the model's)",
        compile_default=None,
    )
    p.set_defaults(func=run, pooling="rank")


def _documents(args: argparse.Namespace) -> list[str]:
    docs = list(args.documents)
    if args.file is not None:
        try:
            with open(args.file, encoding="utf-8") as f:
                docs += [line.rstrip("\n") for line in f if line.strip()]
        except (OSError, UnicodeDecodeError) as e:
            raise UsageError(f"--file: cannot read {args.file}: {e}") from None
    if not docs:
        raise UsageError("give at least one DOC (or --file)")
    return docs


def run(args: argparse.Namespace) -> int:
    if args.top_n is not None and args.top_n < 1:
        raise UsageError(f"--top-n must be >= 1, got {args.top_n}")
    docs = _documents(args)
    llm = load_embedding_llm(args)
    results = llm.rerank(args.query, docs, top_n=args.top_n, truncate=args.truncate)
    if args.json:
        items = [
            {"index": r.index, "relevance_score": r.score, "document": {"text": r.document}}
            for r in results
        ]
        sys.stdout.write(json.dumps({"object": "list", "results": items}) + "\n")
        return 0
    for r in results:
        sys.stdout.write(f"{r.score:.6f}\t{r.index}\t{r.document}\n")
    return 0
