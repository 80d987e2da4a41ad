#!/usr/bin/env python
"""Extract llama.cpp's grammar and JSON-schema test cases into tests/structured/data/.

Reads, from the pinned llama-cpp-python sdist (tests/testdata.py fetches it):
- tests/test-grammar-integration.cpp: every `test_grammar(...)` and `test_schema(...)` call
  (a GBNF grammar or a JSON schema, its passing and its failing strings; a string is a list
  of text pieces and token ids, from `token(N)`), and the grammars of the `test_failure_*`
  and custom-root checks (grammars llama.cpp refuses to build, with the root it asks for);
- tests/test-json-schema-to-grammar.cpp: every `test({STATUS, name, schema, grammar})`
  (whether the schema converts, and llama.cpp's GBNF for it).

    python scripts/make_grammar_cases.py            # writes llama_cpp_grammar_cases.json

The C++ is read with a small lexer for the literals these files use: "..." strings with
escapes, R"delim(...)delim" raw strings, adjacent-literal concatenation and `a + token(N)`.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
OUT = ROOT / "tests" / "structured" / "data" / "llama_cpp_grammar_cases.json"

_TOKEN = re.compile(
    r"""
    (?P<ws>\s+|//[^\n]*|/\*.*?\*/)
  | (?P<raw>R"(?P<delim>[^(\s]*)\()
  | (?P<str>"(?:[^"\\\n]|\\.)*")
  | (?P<name>[A-Za-z_][A-Za-z_0-9:]*)
  | (?P<num>\d+)
  | (?P<punct>[{}(),+;=&<>\[\].*-])
    """,
    re.S | re.X,
)
_ESCAPES = {"n": "\n", "t": "\t", "r": "\r", "\\": "\\", '"': '"', "'": "'", "0": "\0"}


def _unescape(body: str) -> str:
    out, i = [], 0
    while i < len(body):
        c = body[i]
        if c != "\\":
            out.append(c)
            i += 1
            continue
        e = body[i + 1]
        if e == "x":
            m = re.match(r"[0-9a-fA-F]+", body[i + 2 :])
            out.append(chr(int(m.group(0), 16)))
            i += 2 + len(m.group(0))
        elif e == "u":
            out.append(chr(int(body[i + 2 : i + 6], 16)))
            i += 6
        else:
            out.append(_ESCAPES[e])
            i += 2
    return "".join(out)


def lex(src: str, offsets: list[int] | None = None) -> list[tuple[str, object]]:
    """(kind, value) tokens: str (a literal's text), name, num, punct; comments dropped.
    Each token's source offset is appended to `offsets` when given."""
    toks: list[tuple[str, object]] = []
    offsets = offsets if offsets is not None else []
    pos = 0
    while pos < len(src):
        m = _TOKEN.match(src, pos)
        if m is None:
            pos += 1  # preprocessor lines, characters we never need
            continue
        pos = m.end()
        if m.group("ws"):
            continue
        offsets.append(m.start())
        if m.group("raw"):
            end = src.index(")" + m.group("delim") + '"', pos)
            toks.append(("str", src[pos:end]))
            pos = end + len(m.group("delim")) + 2
        elif m.group("str"):
            toks.append(("str", _unescape(m.group("str")[1:-1])))
        elif m.group("name"):
            toks.append(("name", m.group("name")))
        elif m.group("num"):
            toks.append(("num", int(m.group("num"))))
        else:
            toks.append(("punct", m.group("punct")))
    return toks


class _Parser:
    def __init__(self, toks: list[tuple[str, object]], pos: int) -> None:
        self.toks, self.pos = toks, pos

    def peek(self) -> tuple[str, object]:
        return self.toks[self.pos]

    def expect(self, value: object) -> None:
        kind, got = self.toks[self.pos]
        if got != value:
            raise ValueError(f"expected {value!r} at token {self.pos}, got {kind} {got!r}")
        self.pos += 1

    def string(self) -> str:
        """Adjacent literals, concatenated."""
        parts = []
        while self.peek()[0] == "str":
            parts.append(self.toks[self.pos][1])
            self.pos += 1
        if not parts:
            raise ValueError(f"expected a string literal at token {self.pos}: {self.peek()}")
        return "".join(parts)  # type: ignore[arg-type]

    def pieces(self) -> list[str | int]:
        """`"text" + token(N) + ...` -> text pieces and token ids."""
        out: list[str | int] = []
        while True:
            if self.peek() == ("name", "token"):
                self.pos += 1
                self.expect("(")
                out.append(self.toks[self.pos][1])  # type: ignore[arg-type]
                self.pos += 1
                self.expect(")")
            else:
                out.append(self.string())
            if self.peek() != ("punct", "+"):
                return out
            self.pos += 1

    def string_list(self) -> list[list[str | int]]:
        self.expect("{")
        items = []
        while self.peek() != ("punct", "}"):
            items.append(self.pieces())
            if self.peek() == ("punct", ","):
                self.pos += 1
        self.expect("}")
        return items


def _calls(toks: list[tuple[str, object]], name: str) -> list[int]:
    """Token positions just after `name(` where it is called (not declared)."""
    found = []
    for i in range(1, len(toks) - 1):
        declared = toks[i - 1] in (("name", "void"), ("name", "bool"))
        if toks[i] == ("name", name) and toks[i + 1] == ("punct", "(") and not declared:
            found.append(i + 2)
    return found


def integration_cases(src: str) -> list[dict]:
    offsets: list[int] = []
    toks = lex(src, offsets)
    cases = []
    for kind in ("test_grammar", "test_schema"):
        for pos in _calls(toks, kind):
            p = _Parser(toks, pos)
            desc = p.string()
            p.expect(",")
            text = p.string()
            p.expect(",")
            passing = p.string_list()
            p.expect(",")
            failing = p.string_list()
            p.expect(")")
            cases.append({
                "kind": "grammar" if kind == "test_grammar" else "json_schema",
                "name": desc,
                "text": text,
                "passing": passing,
                "failing": failing,
                "line": src.count("\n", 0, offsets[pos]) + 1,
            })  # fmt: skip
    cases.sort(key=lambda c: c["line"])
    return cases


def _function_bodies(src: str) -> dict[str, str]:
    bodies = {}
    for m in re.finditer(r"static (?:void|bool) (test_\w+)\([^)]*\) \{\n", src):
        end = src.index("\n}\n", m.end())
        bodies[m.group(1)] = src[m.end() : end]
    return bodies


def build_failure_cases(src: str) -> list[dict]:
    """Grammars llama.cpp refuses to build: missing root / reference, left recursion, a
    root symbol that is not there; and the custom-root check's grammar under each root."""
    cases = []
    bodies = _function_bodies(src)
    for fn, body in bodies.items():
        if not (fn.startswith("test_failure_") or fn == "test_custom_root_symbol_check"):
            continue
        toks = lex(body)
        grammars: dict[str, str] = {}
        for i in range(len(toks) - 3):
            if toks[i] == ("name", "std::string") and toks[i + 2] == ("punct", "="):
                grammars[toks[i + 1][1]] = _Parser(toks, i + 3).string()  # type: ignore[index]
        roots = re.findall(r"build_grammar_with_root\((\w+), \"(\w+)\"\);\n\s*assert\((\w+)", body)
        if roots:
            for var, root, result in roots:
                ok = f"assert({result} != nullptr)" in body
                cases.append({"function": fn, "grammar": grammars[var], "root": root,
                              "builds": ok})  # fmt: skip
        else:
            for var in grammars:
                cases.append({"function": fn, "grammar": grammars[var], "root": "root",
                              "builds": False})  # fmt: skip
    return cases


def schema_conversion_cases(src: str) -> list[dict]:
    toks = lex(src)
    cases = []
    for i in range(len(toks) - 2):
        if (
            toks[i] == ("name", "test")
            and toks[i + 1] == ("punct", "(")
            and toks[i + 2]
            == (
                "punct",
                "{",
            )
        ):
            p = _Parser(toks, i + 3)
            status = p.peek()[1]
            p.pos += 1
            p.expect(",")
            name = p.string()
            p.expect(",")
            schema = p.string()
            p.expect(",")
            grammar = p.string()
            cases.append({"name": name, "converts": status == "SUCCESS", "schema": schema,
                          "grammar": grammar.strip()})  # fmt: skip
    return cases


def main() -> None:
    from testdata import LLAMA_CPP_PYTHON_VERSION, llama_cpp_sdist

    tests = llama_cpp_sdist() / "tests"
    integration = (tests / "test-grammar-integration.cpp").read_text(encoding="utf-8")
    conversion = (tests / "test-json-schema-to-grammar.cpp").read_text(encoding="utf-8")
    data = {
        "source": f"llama-cpp-python {LLAMA_CPP_PYTHON_VERSION} sdist, vendor/llama.cpp/tests",
        "integration": integration_cases(integration),
        "build_failures": build_failure_cases(integration),
        "schema_conversion": schema_conversion_cases(conversion),
    }
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(data, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    n_strings = sum(len(c["passing"]) + len(c["failing"]) for c in data["integration"])
    print(
        f"{OUT.relative_to(ROOT)}: {len(data['integration'])} integration cases "
        f"({n_strings} strings), {len(data['build_failures'])} build failures, "
        f"{len(data['schema_conversion'])} schema conversions"
    )


if __name__ == "__main__":
    main()
