"""`llamapy pull [MODEL...]`: fetch models into the cache ahead of use."""

from __future__ import annotations

import argparse

from llamapy.hub import DEFAULT_MODEL, list_aliases, pull


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "pull",
        help="download models into the cache (aliases or hf:ORG/REPO)",
        description="Download models into the cache (LLAMAPY_CACHE, default ~/.cache/llamapy) "
        "verify their checksums, and print where they are. With --list, show the known aliases.",
    )
    p.add_argument("models", nargs="*", metavar="MODEL", help=f"default: {DEFAULT_MODEL}")
    p.add_argument("--list", action="store_true", help="list the model aliases and exit")
    p.add_argument("--force", action="store_true", help="download again even when cached")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if args.list:
        for alias in list_aliases():
            print(f"{alias.name:<16} {alias.description}")
        return 0
    for spec in args.models or [DEFAULT_MODEL]:
        resolved = pull(spec, force=args.force)
        print(f"{spec}\t{resolved.path}")
    return 0
