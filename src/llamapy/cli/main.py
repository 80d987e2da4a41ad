"""`llamapy` console entry point: subcommands, logging, and one-line errors."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from llamapy import __version__
from llamapy.cli import (
    bench,
    chat,
    convert,
    embed,
    info,
    mkmodel,
    perplexity,
    pull,
    quantize,
    rerank,
    run,
    serve,
    tokenize,
)
from llamapy.errors import LlamapyError

# Each subcommand module offers `register(subparsers)`, which sets `func` on its parser.
COMMANDS = (
    run,
    chat,
    serve,
    perplexity,
    info,
    pull,
    tokenize,
    bench,
    mkmodel,
    quantize,
    convert,
    embed,
    rerank,
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="llamapy",
        description="LLM inference in Python: GGUF and Hugging Face models on CPUs and GPUs.",
    )
    parser.add_argument("--version", action="version", version=f"llamapy {__version__}")
    parser.add_argument(
        "--log-level",
        default="WARNING",
        choices=["DEBUG", "INFO", "WARNING", "ERROR"],
        help="logging verbosity on stderr (default: WARNING)",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for command in COMMANDS:
        command.register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(levelname)s %(name)s: %(message)s")
    if args.command is None:
        parser.print_help(sys.stderr)
        return 2
    try:
        return int(args.func(args) or 0)
    except LlamapyError as e:
        print(f"llamapy {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"llamapy {args.command}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # e.g. `llamapy info ... | head`: the reader left; that is not an error.
        sys.stderr.close()
        return 0


if __name__ == "__main__":
    raise SystemExit(main())
