"""llama.cpp's GBNF dialect -> llguidance Lark, through llguidance's own converter.

llguidance.gbnf_to_lark covers GBNF's rules, literals, classes and repetitions; this module
adds what it lacks, by rewriting before and after it:
- its terminals (rules made only of literals) become rules again (see _terminals_to_rules);
- token references (llama-grammar.cpp's parse_token): `<[123]>` (a token id), `!<[123]>`
  (any one token but that one) and `<name>` (a token by its text, e.g. `<|im_end|>`) become
  Lark's `<[123]>`, `<[^123]>` and `<name>`;
- `\\-` inside literals and classes (llama.cpp's json-schema-to-grammar writes `[a-z\\-]`)
  becomes `\\x2D`, an escape the converter knows.
A token reference rides through the converter as a string literal of private-use
characters, and is swapped for Lark's token syntax afterwards.
"""

from __future__ import annotations

import re

from llguidance.gbnf_to_lark import any_to_lark, is_lark_syntax

_TOKEN_REF = re.compile(r"(!?)<(?:\[(\d+)\]|([^\s<>\[\]\"]+))>")
_DEF = re.compile(r"(?m)^([A-Za-z_][A-Za-z_0-9]*)\s*:")
_TOKEN_ID = re.compile(r"<\[\d+\]>")
_ESCAPE = re.compile(r"\\(.)", re.S)
_MARK = re.compile('"\ue000(!?)(\\d+|[^"\ue001]+)\ue001"')


class GbnfError(ValueError):
    pass


def _scan(text: str) -> list[tuple[str, str]]:
    """Split GBNF into ('code' | 'str' | 'class' | 'comment', text) runs."""
    out: list[tuple[str, str]] = []
    i, start, n = 0, 0, len(text)
    while i < n:
        c = text[i]
        if (m := _TOKEN_ID.match(text, i)) is not None:
            i = m.end()  # a token reference, not a character class
        elif c in '"[#':
            out.append(("code", text[start:i]))
            if c == "#":
                end = text.find("\n", i)
                end = n if end < 0 else end
                kind = "comment"
            else:
                close = '"' if c == '"' else "]"
                end = i + 1
                while end < n and text[end] != close:
                    end += 2 if text[end] == "\\" else 1
                end = min(end + 1, n)
                kind = "str" if c == '"' else "class"
            out.append((kind, text[i:end]))
            i = start = end
        else:
            i += 1
    out.append(("code", text[start:]))
    return out


def _code(run: str) -> str:
    def mark(m: re.Match[str]) -> str:
        neg, token_id, name = m.group(1), m.group(2), m.group(3)
        if neg and name is not None:
            raise GbnfError(f"negated token by name {m.group(0)!r}: use its id, !<[ID]>")
        return f'"\ue000{neg}{token_id or name}\ue001"'

    return _TOKEN_REF.sub(mark, run)


def _terminals_to_rules(lark: str) -> str:
    """Every UPPERCASE terminal the converter made becomes a lowercase rule.

    Lark lexes terminals greedily (longest match), GBNF matches rules nondeterministically:
    as terminals, `num ::= [0-9]+ ws` and `ws ::= [ \t\n]*` would let `ws` swallow the
    "\n" a later literal needs (llama.cpp's grammars/arithmetic.gbnf then accepts nothing).
    As rules, only literals and character classes are lexemes, and the Earley parser keeps
    every split, as llama.cpp's stacks do. Token references (not bytes) need rules too.
    """
    names = {m.group(1) for m in _DEF.finditer(lark) if m.group(1).isupper()}
    if not names:
        return lark
    alts = "|".join(sorted(names, key=len, reverse=True))
    # literals, regexes and comments are kept as they are; names outside them are renamed
    pattern = rf'("(?:[^"\\]|\\.)*"|/(?:[^/\\\n]|\\.)+/[a-z]*|//[^\n]*)|\b({alts})\b'

    def rename(m: re.Match[str]) -> str:
        return m.group(1) if m.group(1) is not None else f"{m.group(2).lower()}_r"

    return re.sub(pattern, rename, lark)


def _unmark(lark: str) -> str:
    def token(m: re.Match[str]) -> str:
        neg, ref = m.group(1), m.group(2)
        if ref.isdigit():
            return f"<[^{ref}]>" if neg else f"<[{ref}]>"
        return f"<{ref}>"

    out = _MARK.sub(token, lark)
    if "\ue000" in out:
        raise GbnfError("a token reference (<[ID]> or <name>) inside a repeated character run")
    return out


def gbnf_to_lark(text: str) -> str:
    """Lark for a GBNF grammar (or the text itself if it is Lark already).

    Raises:
        GbnfError: the grammar does not convert (message from the converter, or ours).
    """
    if is_lark_syntax(text):
        return text
    runs = []
    for kind, run in _scan(text):
        if kind == "code":
            run = _code(run)
        elif kind in ("str", "class"):
            run = _ESCAPE.sub(lambda m: "\\x2D" if m.group(1) == "-" else m.group(0), run)
        runs.append(run)
    try:
        lark = any_to_lark("".join(runs))
    except Exception as e:  # the converter raises bare Exceptions for undefined rules
        raise GbnfError(str(e)) from e
    return _unmark(_terminals_to_rules(lark))
