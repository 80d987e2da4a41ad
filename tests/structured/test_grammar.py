"""Constraint specs: compile and validation errors, the GBNF pre-pass, request fields, masks."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from llamapy.sampling.params import SamplingParams
from llamapy.structured import ANY_JSON_OBJECT, ConstraintKind, GrammarError, compile_constraint
from llamapy.structured.gbnf import gbnf_to_lark
from llamapy.structured.matcher import GrammarMatcher, MaskWorker
from llamapy.structured.requests import constraint_kwargs
from llamapy.structured.tokenizer import build_ll_tokenizer
from llamapy.tokenizer import Tokenizer

BAD = [
    ({"json_schema": '{"type": "kaboom"}'}, "kaboom"),
    ({"json_schema": "{not json"}, "not valid JSON"),
    ({"json_schema": "[1, 2]"}, "must be a JSON object"),
    ({"grammar": "root ::= missing"}, "missing"),
    ({"grammar": 'root ::= "a'}, "invalid grammar"),
    ({"grammar": "   "}, "non-empty"),
    ({"regex": "a[b"}, "unclosed character class"),
    ({"regex": "(?=a)a"}, "look-around"),
    ({"choice": []}, "non-empty list"),
    ({"choice": "ab"}, "list of strings"),
    ({"choice": ["a", 3]}, "list of non-empty strings"),
    ({"regex": "a", "grammar": 'root ::= "a"'}, "at most one"),
]


@pytest.mark.parametrize(("kwargs", "words"), BAD)
def test_bad_constraints_fail_at_construction(kwargs: dict, words: str) -> None:
    with pytest.raises(GrammarError, match=words.replace("(", r"\(").replace("[", r"\[")):
        SamplingParams(**kwargs)


def test_params_normalize_and_hash() -> None:
    schema = {"type": "object", "properties": {"b": {}, "a": {}}}
    p = SamplingParams(json_schema=schema)
    assert json.loads(p.json_schema) == schema
    assert list(json.loads(p.json_schema)["properties"]) == ["b", "a"]  # key order kept
    assert p.constraint == (ConstraintKind.JSON_SCHEMA, p.json_schema)
    assert hash(p) == hash(SamplingParams(json_schema=dict(schema)))
    assert SamplingParams(choice=["x", "y"]).choice == ("x", "y")
    assert SamplingParams().constraint is None


def test_gbnf_token_references_and_escapes() -> None:
    lark = gbnf_to_lark('root ::= <[10]> body <[11]> "\\\\-" [a-z\\-]\nbody ::= (!<[11]>)*')
    assert "<[10]>" in lark and "<[11]>" in lark and "<[^11]>*" in lark
    assert "body_r" in lark  # a rule, not a byte-level terminal
    assert "\\x2D" in lark and '"\\\\-"' in lark  # only the real \- escape was rewritten
    assert gbnf_to_lark("start: /a+/") == "start: /a+/"  # Lark passes through
    lark = gbnf_to_lark('root ::= "NUM" num\nnum ::= [0-9]+ ws\nws ::= [ ]*')
    assert 'start: "NUM" num_r' in lark and "num_r: /[0-9]/+ ws_r" in lark
    with pytest.raises(ValueError, match="use its id"):
        gbnf_to_lark("root ::= !<|im_end|>")


def test_request_fields() -> None:
    rf = {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "integer"}}}
    assert constraint_kwargs(response_format=rf) == {"json_schema": {"type": "integer"}}
    assert constraint_kwargs(response_format={"type": "json_object"}) == {
        "json_schema": ANY_JSON_OBJECT
    }
    assert constraint_kwargs(response_format={"type": "text"}) == {}
    assert constraint_kwargs(grammar="") == {}
    assert constraint_kwargs(guided_choice=["a", "b"]) == {"choice": ["a", "b"]}
    assert constraint_kwargs(structured_outputs={"regex": "a+"}) == {"regex": "a+"}
    assert constraint_kwargs(structured_outputs={"json_object": True}) == {
        "json_schema": ANY_JSON_OBJECT
    }
    with pytest.raises(ValueError, match="response_format, grammar"):
        constraint_kwargs(response_format={"type": "json_object"}, grammar='root ::= "a"')
    with pytest.raises(ValueError, match="response_format.type"):
        constraint_kwargs(response_format={"type": "yaml"})
    with pytest.raises(ValueError, match="schema is required"):
        constraint_kwargs(response_format={"type": "json_schema", "json_schema": {}})


@pytest.mark.models
def test_llama_cpp_grammars_folder(smollm2_path: Path) -> None:
    """Every grammar of llama.cpp's grammars/ compiles; json.gbnf accepts real JSON and
    rejects broken JSON through SmolLM2's tokens."""
    from testdata import llama_cpp_sdist

    folder = llama_cpp_sdist() / "grammars"
    files = sorted(folder.glob("*.gbnf"))
    assert len(files) >= 8
    compiled = {f.stem: compile_constraint(ConstraintKind.GRAMMAR, f.read_text()) for f in files}
    tok = Tokenizer.from_gguf(smollm2_path)
    ll = build_ll_tokenizer(tok)

    def accepts(name: str, text: str) -> bool:
        m = GrammarMatcher(ll, compiled[name])
        return all(m.advance(t) for t in tok.encode(text, add_special=False)) and m.is_accepting

    value = {"a": [1, 2.5, -3e4], "b": {"c": None, "d": True}, "s": 'x"y \u00e9'}
    assert accepts("json", json.dumps(value))
    assert accepts("json_arr", "[\n" + ",\n".join([json.dumps(value)] * 2) + "]")
    assert not accepts("json_arr", json.dumps([value, value]))  # it wants a newline after [
    assert not accepts("json", '{"a": [1, 2,]}')
    assert accepts("arithmetic", "(1+2)*x3-4/5= 7\ny=2\n")
    assert not accepts("arithmetic", "(1+2=3\n")


def test_mask_applies_on_a_copy(rng) -> None:
    """MaskFuture.apply: bit t of word t // 32 allows token t; others become -inf; rows
    without a matcher, and the input logits, are untouched (oracle: numpy bit unpacking)."""
    import numpy as np

    n_vocab = 100

    class Fake:
        def __init__(self, bits: np.ndarray) -> None:
            self.words = np.packbits(bits, bitorder="little").view(np.int32)

        def fill_mask(self, row: torch.Tensor) -> None:
            row.copy_(torch.from_numpy(self.words[: row.numel()].copy()))

    bits = rng.random((2, 128)) < 0.3
    worker = MaskWorker(n_vocab)
    logits = torch.from_numpy(rng.standard_normal((3, n_vocab)).astype(np.float32))
    before = logits.clone()
    out = worker.submit([Fake(bits[0]), None, Fake(bits[1])]).apply(logits)
    assert torch.equal(logits, before)
    assert torch.equal(out[1], logits[1])
    for row, b in ((0, bits[0]), (2, bits[1])):
        keep = torch.from_numpy(b[:n_vocab])
        assert torch.equal(out[row][keep], logits[row][keep])
        assert torch.isneginf(out[row][~keep]).all()
    assert worker.submit([None, None]) is None
