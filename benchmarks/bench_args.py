"""Argument types shared by the benchmark scripts (run them from the repository root)."""

from __future__ import annotations

import argparse


def token_range(text: str) -> tuple[int, int]:
    """`A:B` (or `A`) -> (A, B), a length range drawn from uniformly."""
    lo, _, hi = text.partition(":")
    try:
        a, b = int(lo), int(hi or lo)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected A:B with integers, got {text!r}") from None
    if not 0 < a <= b:
        raise argparse.ArgumentTypeError(f"expected A:B with 0 < A <= B, got {text!r}")
    return a, b


def positive_int_list(text: str) -> list[int]:
    """`64,256` -> [64, 256]: comma-separated positive integers."""
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected integers like 64,256, got {text!r}") from None
    if not values or min(values) <= 0:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values
