"""Fetch the test models (every alias, or those named) into llamapy's cache; print their paths.

CI runs this before the tests so that tests marked ``models`` find them cached:

    python scripts/fetch_test_models.py            # all aliases
    python scripts/fetch_test_models.py --verify   # also rehash what is cached
"""

from __future__ import annotations

import argparse
import logging
import sys

from llamapy.errors import LlamapyError
from llamapy.hub import list_aliases, pull, resolve_model


def main(argv: list[str] | None = None) -> int:
    names = [alias.name for alias in list_aliases()]
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("aliases", nargs="*", metavar="ALIAS", help=f"of {', '.join(names)}")
    parser.add_argument("--verify", action="store_true", help="hash every cached file again")
    args = parser.parse_args(argv)
    unknown = sorted(set(args.aliases) - set(names))
    if unknown:
        parser.error(f"unknown alias {', '.join(unknown)}; known: {', '.join(names)}")
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    for name in args.aliases or names:
        try:
            model = pull(name) if args.verify else resolve_model(name)
        except LlamapyError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
        print(f"{name}\t{model.path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
