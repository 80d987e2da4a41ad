"""`llamapy serve`: the OpenAI- and llama.cpp-compatible HTTP server."""

from __future__ import annotations

import argparse
import contextlib
import logging
import os

from llamapy.cli.common import (
    add_model_args,
    check_model_args,
    device_from_args,
    kv_cache_dtype_from_args,
    quantize_from_args,
)
from llamapy.errors import LlamapyError, UsageError


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "serve",
        help="serve a model over HTTP (OpenAI and llama.cpp APIs)",
        description="Serve a model over HTTP: OpenAI's /v1/chat/completions, /v1/completions, "
        "/v1/models and llama.cpp's /completion, /tokenize, /detokenize, /apply-template, "
        "/health, /props, /slots, /metrics.",
    )
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8080)
    p.add_argument(
        "-np",
        "--parallel",
        "--max-num-seqs",
        dest="parallel",
        type=int,
        default=4,
        metavar="N",
        help="sequences decoded together (default 4)",
    )
    p.add_argument("--api-key", default=None, metavar="KEY", help="require this bearer key")
    p.add_argument("--metrics", action="store_true", help="enable the /metrics endpoint")
    p.add_argument("--alias", default=None, metavar="NAME", help="model name the API reports")
    add_model_args(
        p,
        ctx_help="context size of one sequence (default: min(4096, the model's); 0: the model's)",
        threads_help="torch CPU threads (default: all cores but one, which the HTTP loop needs: "
        "on 2 cores, 1 thread decoded 2.4x faster than 2 behind the server)",
        compile_default=True,
    )
    p.add_argument(
        "--max-queued",
        type=int,
        default=64,
        metavar="N",
        help="requests held at once before answering 503 (default 64)",
    )
    _add_embedding_args(p)
    p.set_defaults(func=run)


def _add_embedding_args(p: argparse.ArgumentParser) -> None:
    from llamapy.embedding.pooling import POOLING_TYPES

    g = p.add_argument_group("embeddings and reranking (llama-server's flags)")
    g.add_argument(
        "--embedding",
        "--embeddings",
        action="store_true",
        help="serve embeddings only: /v1/embeddings, /embedding; no text generation "
        "(encoder models such as BERT always are)",
    )
    g.add_argument(
        "--reranking",
        "--rerank",
        action="store_true",
        help="serve reranking (/v1/rerank, /rerank) and embeddings only: pooling rank",
    )
    g.add_argument(
        "--pooling",
        choices=POOLING_TYPES,
        default=None,
        help="pooling of the embeddings (default: the model's own)",
    )


def run(args: argparse.Namespace) -> int:
    if not 0 < args.port < 65536:
        raise UsageError(f"--port must be in 1..65535, got {args.port}")
    for flag, value in (("--parallel", args.parallel), ("--max-queued", args.max_queued)):
        if value <= 0:
            raise UsageError(f"{flag} must be positive, got {value}")
    check_model_args(args)
    if args.reranking and args.pooling not in (None, "rank"):
        raise UsageError(f"--reranking uses pooling rank, not {args.pooling}")
    import uvicorn

    from llamapy.server.app import ModelServer, ServerConfig, create_app

    device = device_from_args(args)
    config = ServerConfig(
        model=args.model,
        alias=args.alias,
        n_ctx=args.ctx_size,
        max_num_seqs=args.parallel,
        api_key=args.api_key,
        chat_template=args.chat_template,
        enable_metrics=args.metrics,
        max_queued=args.max_queued,
        n_threads=args.threads or max(1, (os.cpu_count() or 2) - 1),
        device=device,
        embedding=args.embedding,
        reranking=args.reranking,
        pooling=args.pooling,
        quantize=quantize_from_args(args),
        enforce_eager=args.enforce_eager,
        async_scheduling=args.async_scheduling,
        kv_cache_dtype=kv_cache_dtype_from_args(args, device),
    )
    app = create_app(config, load=False)
    logging.getLogger("llamapy").setLevel(logging.INFO)
    uv_config = uvicorn.Config(app, host=args.host, port=args.port, log_level="info")
    server = ModelServer(uv_config, app.state.llamapy)
    with contextlib.suppress(KeyboardInterrupt):  # Ctrl-C: uvicorn has shut down cleanly
        server.run()  # a port in use: uvicorn logs why and exits with its code 3
    if server.state.load_error is not None:
        raise LlamapyError(f"model failed to load: {server.state.load_error}")
    return 0
