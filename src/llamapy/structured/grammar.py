"""Constraint specs -> llguidance grammars, validated before any decoding starts.

A request constrains its output with exactly one of: a GBNF grammar (llama.cpp's dialect;
a Lark grammar in llguidance's syntax is accepted too), a JSON Schema, a regular expression
or a fixed list of choices. "Any JSON object" is the schema `{"type": "object"}`
(`ANY_JSON_OBJECT`). Each is compiled into llguidance's grammar JSON (the text an
`LLMatcher` takes) and checked with `LLMatcher.validate_grammar`, so a malformed grammar or
schema is a `GrammarError` (a ValueError: a 400 on the server, one line on the CLI) at
request time, never a matcher in an error state halfway through a generation.
"""

from __future__ import annotations

import enum
import functools
import json
from collections.abc import Mapping
from typing import Any

from llguidance import LLMatcher

from llamapy.structured.gbnf import GbnfError, gbnf_to_lark

# "any JSON object" (OpenAI's response_format json_object)
ANY_JSON_OBJECT = '{"type": "object"}'

# Whitespace between JSON tokens as llama.cpp's json-schema-to-grammar allows it (its
# `space ::= | " " | "\n"{1,2} [ \t]{0,20}`): bounded, so a model cannot pad forever as it
# could under llguidance's default `[\x20\x0A\x0D\x09]+`. A schema's "x-guidance" options
# override these.
JSON_DEFAULTS: dict[str, Any] = {
    "whitespace_flexible": True,
    "whitespace_pattern": r"(?: |\n{1,2}[ \t]{0,20})?",
    "lenient": True,  # ignore keywords it cannot enforce (uniqueItems, ...), as llama.cpp
}


class GrammarError(ValueError):
    """A grammar, schema, regex or choice list that cannot constrain decoding."""


class ConstraintKind(enum.StrEnum):
    GRAMMAR = "grammar"  # GBNF (llama.cpp) or Lark (llguidance)
    JSON_SCHEMA = "json_schema"
    REGEX = "regex"
    CHOICE = "choice"


def schema_text(schema: str | Mapping[str, Any] | bool) -> str:
    """A JSON Schema as JSON text (key order kept: it is the order properties come out)."""
    if isinstance(schema, str):
        try:
            value = json.loads(schema)
        except json.JSONDecodeError as e:
            raise GrammarError(f"json_schema is not valid JSON: {e}") from e
    else:
        value = schema
    if isinstance(value, bool):  # JSON Schema's true / false schemas
        value = {} if value else {"not": {}}
    if not isinstance(value, Mapping):
        raise GrammarError(f"json_schema must be a JSON object, got {type(value).__name__}")
    try:
        return json.dumps(value, ensure_ascii=False)
    except (TypeError, ValueError) as e:
        raise GrammarError(f"json_schema is not JSON-serializable: {e}") from e


def _to_llguidance(kind: ConstraintKind, spec: str | tuple[str, ...]) -> str:
    if kind is ConstraintKind.JSON_SCHEMA:
        try:
            return LLMatcher.grammar_from_json_schema(spec, defaults=JSON_DEFAULTS)  # type: ignore[arg-type]
        except ValueError as e:
            raise GrammarError(f"invalid json_schema: {e}") from e
    if kind is ConstraintKind.REGEX:
        return LLMatcher.grammar_from_regex(spec)  # type: ignore[arg-type]
    if kind is ConstraintKind.CHOICE:
        # Lark string literals take JSON's escapes
        alts = " | ".join(json.dumps(c, ensure_ascii=False) for c in spec)
        return LLMatcher.grammar_from_lark(f"start: {alts}")
    try:
        return LLMatcher.grammar_from_lark(gbnf_to_lark(spec))  # type: ignore[arg-type]
    except GbnfError as e:
        raise GrammarError(f"invalid grammar: {e}") from e


@functools.lru_cache(maxsize=256)
def compile_constraint(kind: ConstraintKind, spec: str | tuple[str, ...]) -> str:
    """The llguidance grammar for a constraint (`spec`: text, or the choices), validated.

    Raises:
        GrammarError: the spec does not compile; the message says why (llguidance's words).
    """
    if kind is ConstraintKind.CHOICE:
        if not spec or not all(isinstance(c, str) and c for c in spec):
            raise GrammarError("choice must be a non-empty list of non-empty strings")
    elif not isinstance(spec, str) or not spec.strip():
        raise GrammarError(f"{kind.value} must be a non-empty string")
    grammar = _to_llguidance(kind, spec)
    is_error, messages = LLMatcher.validate_grammar_with_warnings(grammar)
    if is_error:
        raise GrammarError(f"invalid {kind.value}: {_first_lines(messages[0])}")
    return grammar


def _first_lines(message: str, limit: int = 3) -> str:
    """The first lines of llguidance's message, and its `error:` line (the reason)."""
    lines = [ln.strip() for ln in message.strip().splitlines() if ln.strip()]
    keep = lines[:limit] + [ln for ln in lines[limit:] if ln.startswith("error:")]
    return " | ".join(keep)


def check_constraint(
    json_schema: str | Mapping[str, Any] | bool | None,
    grammar: str | None,
    regex: str | None,
    choice: Any,
) -> tuple[ConstraintKind, str | tuple[str, ...]] | None:
    """SamplingParams' constraint fields -> (kind, normalized spec), compiled and validated.

    At most one may be set. The schema comes back as JSON text, the choices as a tuple.
    """
    given = {
        ConstraintKind.JSON_SCHEMA: json_schema,
        ConstraintKind.GRAMMAR: grammar,
        ConstraintKind.REGEX: regex,
        ConstraintKind.CHOICE: choice,
    }
    given = {k: v for k, v in given.items() if v is not None}
    if not given:
        return None
    if len(given) > 1:
        names = ", ".join(k.value for k in given)
        raise GrammarError(f"at most one of json_schema, grammar, regex, choice; got {names}")
    kind, value = next(iter(given.items()))
    if kind is ConstraintKind.JSON_SCHEMA:
        spec: str | tuple[str, ...] = schema_text(value)
    elif kind is ConstraintKind.CHOICE:
        if isinstance(value, str | bytes) or not hasattr(value, "__iter__"):
            raise GrammarError("choice must be a list of strings")
        spec = tuple(value)
    elif isinstance(value, str):
        spec = value
    else:
        raise GrammarError(f"{kind.value} must be a string, got {type(value).__name__}")
    compile_constraint(kind, spec)
    return kind, spec
