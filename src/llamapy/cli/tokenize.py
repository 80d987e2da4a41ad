"""`llamapy tokenize MODEL TEXT` and `llamapy detokenize MODEL ID...`."""

from __future__ import annotations

import argparse
import json
import sys

from llamapy.errors import UsageError
from llamapy.hub import resolve_model
from llamapy.tokenizer import Tokenizer


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "tokenize",
        help="show the token ids (and pieces) of a text",
        description="Tokenize TEXT with MODEL's tokenizer, as llama.cpp's llama_tokenize does. "
        "MODEL is a .gguf path, a Hugging Face folder or an alias.",
    )
    p.add_argument("model", metavar="MODEL")
    p.add_argument("text", metavar="TEXT", help="the text; '-' reads standard input")
    p.add_argument("--ids", action="store_true", help="print only the ids, as a JSON list")
    p.add_argument("--pieces", action="store_true", help="print only the pieces, one a line")
    p.add_argument("--no-bos", action="store_true", help="do not add BOS/EOS tokens")
    p.add_argument(
        "--parse-special", action="store_true", help="turn special-token text into special tokens"
    )
    p.set_defaults(func=run_tokenize)

    d = subparsers.add_parser(
        "detokenize",
        help="turn token ids back into text",
        description="Decode token ids with MODEL's tokenizer, as llama.cpp's llama_detokenize.",
    )
    d.add_argument("model", metavar="MODEL")
    d.add_argument("ids", metavar="ID", nargs="+", help="token ids (commas and brackets allowed)")
    d.add_argument("--skip-special", action="store_true", help="leave out control tokens")
    d.set_defaults(func=run_detokenize)


def _load(model: str) -> Tokenizer:
    return Tokenizer.from_path(resolve_model(model).path)


def run_tokenize(args: argparse.Namespace) -> int:
    text = sys.stdin.read() if args.text == "-" else args.text
    tok = _load(args.model)
    ids = tok.encode(text, add_special=not args.no_bos, parse_special=args.parse_special)
    if args.ids:
        sys.stdout.write(json.dumps(ids) + "\n")
    elif args.pieces:
        sys.stdout.write("".join(f"{tok.id_to_piece(i)!r}\n" for i in ids))
    else:
        for i in ids:
            text_piece = tok.token_bytes(i).decode("utf-8", errors="backslashreplace")
            sys.stdout.write(f"{i:>8} {tok.id_to_piece(i)!r:<24} {text_piece!r}\n")
    return 0


def parse_ids(words: list[str]) -> list[int]:
    """Ids from arguments like `1 2 3`, `1,2,3` or `[1, 2, 3]`."""
    ids: list[int] = []
    for word in words:
        for item in word.replace("[", " ").replace("]", " ").replace(",", " ").split():
            try:
                ids.append(int(item))
            except ValueError:
                raise UsageError(f"'{item}' is not a token id (an integer)") from None
    return ids


def run_detokenize(args: argparse.Namespace) -> int:
    ids = parse_ids(args.ids)
    tok = _load(args.model)
    sys.stdout.write(tok.decode(ids, skip_special=args.skip_special) + "\n")
    return 0
