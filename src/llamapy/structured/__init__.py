"""Structured output: grammar-, schema-, regex- and choice-constrained decoding (llguidance)."""

from llamapy.structured.grammar import (
    ANY_JSON_OBJECT,
    ConstraintKind,
    GrammarError,
    check_constraint,
    compile_constraint,
    schema_text,
)
from llamapy.structured.matcher import GrammarCompiler, GrammarMatcher, MaskFuture, MaskWorker

__all__ = [
    "ANY_JSON_OBJECT",
    "ConstraintKind",
    "GrammarCompiler",
    "GrammarError",
    "GrammarMatcher",
    "MaskFuture",
    "MaskWorker",
    "check_constraint",
    "compile_constraint",
    "schema_text",
]
