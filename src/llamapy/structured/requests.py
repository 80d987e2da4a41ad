"""HTTP request fields that ask for structured output -> SamplingParams' constraint fields.

The spellings of three APIs, all accepted on every generating route:
- OpenAI: `response_format` {"type": "text" | "json_object" | "json_schema",
  "json_schema": {"name", "schema", "strict"}}; llama.cpp's server also takes
  {"type": "json_object", "schema": {...}}.
- llama.cpp /completion: `grammar` (GBNF), `json_schema`.
- vLLM (extra_body): `structured_outputs` {"json", "regex", "choice", "grammar",
  "json_object"}, and the older `guided_json`, `guided_regex`, `guided_choice`,
  `guided_grammar`.
At most one may be given; a second is a ValueError naming both (a 400).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from llamapy.structured.grammar import ANY_JSON_OBJECT

# vLLM's structured_outputs keys -> SamplingParams fields
_VLLM_KEYS = {"json": "json_schema", "regex": "regex", "choice": "choice", "grammar": "grammar"}


def _response_format(value: Any) -> tuple[str, Any] | None:
    if not isinstance(value, Mapping):
        raise ValueError("response_format must be an object with a 'type'")
    kind = value.get("type")
    if kind == "text":
        return None
    if kind == "json_object":
        schema = value.get("schema")  # llama.cpp's extension
        return "json_schema", ANY_JSON_OBJECT if schema is None else schema
    if kind == "json_schema":
        spec = value.get("json_schema")
        if not isinstance(spec, Mapping):
            raise ValueError("response_format.json_schema must be an object with a 'schema'")
        schema = spec.get("schema")
        if schema is None:
            raise ValueError("response_format.json_schema.schema is required")
        strict = spec.get("strict")
        if strict is not None and not isinstance(strict, bool):
            raise ValueError("response_format.json_schema.strict must be a boolean")
        # strict or not, the schema is enforced exactly (tokens outside it are masked)
        return "json_schema", schema
    raise ValueError(
        f"response_format.type must be 'text', 'json_object' or 'json_schema', got {kind!r}"
    )


def _structured_outputs(value: Any) -> list[tuple[str, str, Any]]:
    if not isinstance(value, Mapping):
        raise ValueError("structured_outputs must be an object")
    found = []
    for key, item in value.items():
        if item is None or item is False:
            continue
        if key == "json_object":
            found.append((f"structured_outputs.{key}", "json_schema", ANY_JSON_OBJECT))
        elif key in _VLLM_KEYS:
            found.append((f"structured_outputs.{key}", _VLLM_KEYS[key], item))
    return found


def constraint_kwargs(
    *,
    response_format: Any = None,
    grammar: Any = None,
    json_schema: Any = None,
    structured_outputs: Any = None,
    guided_json: Any = None,
    guided_regex: Any = None,
    guided_choice: Any = None,
    guided_grammar: Any = None,
) -> dict[str, Any]:
    """SamplingParams keyword arguments (json_schema / grammar / regex / choice, or none)."""
    found: list[tuple[str, str, Any]] = []  # (request field, SamplingParams field, value)
    if response_format is not None:
        rf = _response_format(response_format)
        if rf is not None:
            found.append(("response_format", *rf))
    plain = {
        "grammar": ("grammar", grammar),
        "json_schema": ("json_schema", json_schema),
        "guided_json": ("json_schema", guided_json),
        "guided_regex": ("regex", guided_regex),
        "guided_choice": ("choice", guided_choice),
        "guided_grammar": ("grammar", guided_grammar),
    }
    # an empty grammar string is no grammar (llama.cpp's web UI sends "")
    found += [(name, field, v) for name, (field, v) in plain.items() if v not in (None, "")]
    if structured_outputs is not None:
        found += _structured_outputs(structured_outputs)
    if len(found) > 1:
        names = ", ".join(name for name, _, _ in found)
        raise ValueError(f"give one structured-output constraint, got {names}")
    if not found:
        return {}
    _, field, value = found[0]
    if field == "choice" and (isinstance(value, str) or not isinstance(value, list)):
        raise ValueError("guided_choice / structured_outputs.choice must be a list of strings")
    return {field: value}
