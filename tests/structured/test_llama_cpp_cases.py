"""llama.cpp's grammar and JSON-schema tests, run against llamapy's grammar layer.

The cases come from tests/test-grammar-integration.cpp and tests/test-json-schema-to-grammar.cpp
(scripts/make_grammar_cases.py -> data/llama_cpp_grammar_cases.json). Each grammar or schema
is compiled as a request's would be (llamapy.structured.compile_constraint), and each string
is tokenized with SmolLM2's real tokenizer (`token(N)` pieces as the token id N) and fed
through an llguidance matcher: accepted iff every token is allowed and the grammar is
complete at the end, as llama.cpp's match_string. Where llguidance and llama.cpp differ by
design, the case is a strict xfail naming the difference.
"""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import numpy as np
import pytest

from llamapy.structured import ConstraintKind, GrammarError, compile_constraint
from llamapy.structured.matcher import GrammarMatcher
from llamapy.structured.tokenizer import build_ll_tokenizer
from llamapy.tokenizer import Tokenizer

pytestmark = pytest.mark.models

DATA = json.loads(
    (Path(__file__).parent / "data" / "llama_cpp_grammar_cases.json").read_text(encoding="utf-8")
)

_ADDITIONAL = (
    "JSON Schema's default additionalProperties is true (llguidance follows the spec); "
    "llama.cpp's converter makes it false for generation"
)
_LEFT_RECURSION = (
    "llguidance's Earley parser accepts left-recursive grammars; llama.cpp's stack-based "
    "matcher cannot, so it refuses to build them"
)
_DIGITS = (
    "llama.cpp caps JSON integers at 16 digits (json-schema-to-grammar's integral-part); "
    "JSON and llguidance do not"
)
_PREFIX_ITEMS = (
    "JSON Schema's prefixItems is an array of schemas; llguidance rejects an object there, "
    "llama.cpp's converter reads it as the schema of every item"
)
# integration cases and schema conversions (by name) where the two differ by design
# integration cases (by name) where the two differ by design: the reason, and the strings
# that differ (None: the whole case); the case's other strings are checked as usual
INTEGRATION_XFAIL: dict[str, tuple[str, list[str] | None]] = {
    "min 0": (_DIGITS, ["100000000000000000000000000000000"]),
    "min 2": (_DIGITS, ["12345678900000000"]),
    "object properties": (
        _ADDITIONAL,
        [
            '{ "number": 1600, "street_name": "Pennsylvania", "street_type":"Avenue", '
            '"direction":"NW"}'
        ],
    ),  # fmt: skip
    "min+max items": (
        "a schema with 'items' but no 'type' accepts non-arrays per JSON Schema (llguidance); "
        "llama.cpp's converter infers type array",
        ["1"],
    ),
    "segfault": (
        "llguidance's GBNF-to-Lark converter writes `( [x]* )*` as `/[x]/**`, which its Lark "
        "parser rejects",
        None,
    ),
}
SCHEMA_XFAIL: dict[str, str] = {
    "string array": _PREFIX_ITEMS,
    "nullable string array": _PREFIX_ITEMS,
    "array with empty items and prefixItems": _PREFIX_ITEMS,
    "unsupported regexp in a property": (
        "llguidance rejects regex lookaround ((?=...)) in a pattern; llama.cpp's converter "
        "degrades that property to any string"
    ),
}


@pytest.fixture(scope="module")
def tokenizer(smollm2_path: Path) -> Tokenizer:
    return Tokenizer.from_gguf(smollm2_path)


@pytest.fixture(scope="module")
def ll_tokenizer(tokenizer: Tokenizer):
    return build_ll_tokenizer(tokenizer)


def _ids(tokenizer: Tokenizer, pieces: list[str | int]) -> list[int]:
    ids: list[int] = []
    for p in pieces:
        ids += [p] if isinstance(p, int) else tokenizer.encode(p, add_special=False)
    return ids


def accepts(ll_tokenizer, tokenizer: Tokenizer, grammar: str, pieces: list[str | int]) -> bool:
    """llama.cpp's match_string: every token allowed, and the grammar complete at the end."""
    m = GrammarMatcher(ll_tokenizer, grammar)
    return all(m.advance(t) for t in _ids(tokenizer, pieces)) and m.is_accepting


def _show(pieces: list[str | int]) -> str:
    return "".join(p if isinstance(p, str) else f"<[{p}]>" for p in pieces)


def _param(case: dict, xfails: dict[str, str], key: str) -> pytest.param:
    marks = []
    if case[key] in xfails:
        marks.append(pytest.mark.xfail(reason=xfails[case[key]], strict=True))
    return pytest.param(case, marks=marks, id=f"{case.get('line', '')}-{case[key]}")


def _integration_params() -> list[pytest.param]:
    """Each case once, minus its known differences; those as a strict xfail of their own."""
    params = []
    for case in DATA["integration"]:
        reason, differ = INTEGRATION_XFAIL.get(case["name"], (None, []))
        xfail = pytest.mark.xfail(reason=reason, strict=True)
        name = f"{case['line']}-{case['name']}"
        if differ is None:
            params.append(pytest.param(case, marks=[xfail], id=name))
            continue
        split = {}
        for known in (False, True):
            split[known] = {
                **case,
                "passing": [x for x in case["passing"] if (_show(x) in differ) == known],
                "failing": [x for x in case["failing"] if (_show(x) in differ) == known],
            }
        params.append(pytest.param(split[False], id=name))
        if differ:
            params.append(pytest.param(split[True], marks=[xfail], id=name + "-differs"))
    return params


@pytest.mark.parametrize("case", _integration_params())
def test_integration_case(case: dict, tokenizer: Tokenizer, ll_tokenizer) -> None:
    grammar = compile_constraint(ConstraintKind(case["kind"]), case["text"])
    wrong = [
        f"should accept {_show(s)!r}"
        for s in case["passing"]
        if not accepts(ll_tokenizer, tokenizer, grammar, s)
    ]
    wrong += [
        f"should reject {_show(s)!r}"
        for s in case["failing"]
        if accepts(ll_tokenizer, tokenizer, grammar, s)
    ]
    assert not wrong, "; ".join(wrong)


def _build_param(case: dict) -> pytest.param:
    marks = []
    if case["root"] != "root":
        marks.append(pytest.mark.skip(reason="llamapy's GBNF root is always 'root' (no option)"))
    elif case["function"] == "test_failure_left_recursion":
        marks.append(pytest.mark.xfail(reason=_LEFT_RECURSION, strict=True))
    return pytest.param(case, marks=marks, id=f"{case['function']}-{case['root']}")


@pytest.mark.parametrize("case", [_build_param(c) for c in DATA["build_failures"]])
def test_build_failure(case: dict) -> None:
    """Grammars llama.cpp refuses (no root rule, a missing rule, ...) are a GrammarError."""
    if case["builds"]:
        compile_constraint(ConstraintKind.GRAMMAR, case["grammar"])
    else:
        with pytest.raises(GrammarError):
            compile_constraint(ConstraintKind.GRAMMAR, case["grammar"])


def _random_walk(ll_tokenizer, grammar: str, rng: np.random.Generator, limit: int = 300):
    """Token ids of one random string of the grammar; None if not complete within `limit`.

    Draws uniformly among allowed tokens, but half of the time among the allowed ones that
    end things (a quote, a bracket, a digit, EOS), so strings and objects close quickly.
    """
    m = GrammarMatcher(ll_tokenizer, grammar)
    n = ll_tokenizer.vocab_size
    eos = np.zeros(n, dtype=bool)
    eos[ll_tokenizer.eos_tokens] = True
    enders = _enders(ll_tokenizer) | eos
    out: list[int] = []
    for _ in range(limit):
        if m.is_stopped:
            return out
        bits = np.unpackbits(np.frombuffer(m.bitmask(), dtype=np.uint8), bitorder="little")
        allowed = bits[:n].astype(bool)
        short = np.flatnonzero(allowed & enders)
        pool = short if short.size and rng.random() < 0.5 else np.flatnonzero(allowed)
        pick = int(rng.choice(pool))
        if eos[pick]:
            return out
        assert m.advance(pick), m.error
        out.append(pick)
    return None


_ENDERS: dict[int, np.ndarray] = {}


def _enders(ll_tokenizer) -> np.ndarray:
    key = id(ll_tokenizer)
    if key not in _ENDERS:
        ends = {b'"', b"}", b"]", b"0", b"1", b"7", b"null", b"true", b"a"}
        n = ll_tokenizer.vocab_size
        _ENDERS[key] = np.array([ll_tokenizer.decode_bytes([t]) in ends for t in range(n)])
    return _ENDERS[key]


def _validator(schema: dict) -> jsonschema.protocols.Validator:
    """The schema's draft (2020-12 by default; draft 7 for the old tuple form of items)."""
    cls = jsonschema.validators.validator_for(schema, default=jsonschema.Draft202012Validator)
    try:
        cls.check_schema(schema)
    except jsonschema.SchemaError:
        cls = jsonschema.Draft7Validator
        cls.check_schema(schema)
    return cls(schema)


def _schema_param(case: dict) -> pytest.param:
    return _param(case, SCHEMA_XFAIL, "name")


@pytest.mark.parametrize("case", [_schema_param(c) for c in DATA["schema_conversion"]])
def test_schema_conversion(case: dict, tokenizer: Tokenizer, ll_tokenizer) -> None:
    """Schemas llama.cpp converts compile here too (and those it refuses do not); llama.cpp's
    own GBNF for the schema compiles through llamapy's GBNF path; random strings of the
    schema's grammar parse and validate against the schema (jsonschema: the oracle)."""
    if not case["converts"]:
        with pytest.raises(GrammarError):
            compile_constraint(ConstraintKind.JSON_SCHEMA, case["schema"])
        return
    grammar = compile_constraint(ConstraintKind.JSON_SCHEMA, case["schema"])
    compile_constraint(ConstraintKind.GRAMMAR, case["grammar"])
    schema = json.loads(case["schema"])
    seed = int(np.random.SeedSequence().entropy % 2**32)
    rng = np.random.default_rng(seed)
    done = 0
    for _ in range(3):
        ids = _random_walk(ll_tokenizer, grammar, rng)
        if ids is None:
            continue
        text = tokenizer.decode(ids)
        value = json.loads(text)
        _validator(schema).validate(value)  # raises with the reason
        done += 1
    assert done > 0, f"no random string completed (seed {seed})"
