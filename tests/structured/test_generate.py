"""Constrained generation end to end on the default model (SmolLM2-135M) through LLM.generate."""

from __future__ import annotations

import json
from collections.abc import Iterator

import jsonschema
import pytest
import torch

from llamapy.api import LLM
from llamapy.engine.llm_engine import EngineConfig, LLMEngine
from llamapy.engine.scoring import score_tokens
from llamapy.formats import open_model_file
from llamapy.sampling.params import SamplingParams
from llamapy.tokenizer import Tokenizer

pytestmark = pytest.mark.models

# nested objects, arrays, enums, required fields; small, so that 100 records are quick
PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "minLength": 1, "maxLength": 12},
        "role": {"enum": ["admin", "editor", "viewer"]},
        "home": {
            "type": "object",
            "properties": {"country": {"enum": ["FR", "DE", "US", "JP"]}},
            "required": ["country"],
            "additionalProperties": False,
        },
        "skills": {
            "type": "array",
            "items": {"enum": ["python", "rust", "sql"]},
            "minItems": 1,
            "maxItems": 2,
        },
    },
    "required": ["name", "role", "home", "skills"],
    "additionalProperties": False,
}
ASK = (
    "Invent a person. Reply in JSON: name, role (admin, editor or viewer), home "
    "(country: FR, DE, US or JP), skills (python, rust or sql)."
)


@pytest.fixture(scope="module")
def llm(smollm2_path) -> Iterator[LLM]:
    # The KV pool is n_ctx tokens: room for 50 sequences at once, no preemption thrash. One
    # torch thread: a batch-50 decode step is thousands of tiny attention ops, and on a shared
    # machine two threads meeting at each op's barrier made steps up to 100x slower.
    threads = torch.get_num_threads()
    yield LLM(smollm2_path, n_ctx=8192, max_num_seqs=50, max_num_batched_tokens=2048, n_threads=1)
    torch.set_num_threads(threads)


def _prompt(llm: LLM) -> list[int]:
    return llm.apply_chat_template([{"role": "user", "content": ASK}])


@pytest.mark.slow  # ~1 min on 2 cores
def test_100_generations_parse_and_validate(llm: LLM) -> None:
    """Done-when test: all 100 complete (finish "stop", well under max_tokens) and validate."""
    seeds = torch.randint(0, 2**62, (100,)).tolist()  # fresh each run
    # llama.cpp's default sampling (temp 0.8, top-k 40, top-p 0.95, min-p 0.05). Budget: a
    # record takes 48 tokens (median of 1000 runs, max 83), but llama.cpp's whitespace rule
    # (up to 20 spaces / tabs after each separator's newline) lets a sampled run wander: one
    # CI run had a record still open at 128 tokens, so 256 (a generation that loops still
    # fails: finish "length").
    params = [SamplingParams(json_schema=PERSON, max_tokens=256, seed=s) for s in seeds]
    outs = llm.generate([_prompt(llm)] * 100, params)
    validator = jsonschema.Draft202012Validator(PERSON)
    bad = []
    for seed, o in zip(seeds, outs, strict=True):
        try:
            assert o.finish_reason == "stop", f"finish {o.finish_reason}"
            validator.validate(json.loads(o.text))
        except (AssertionError, ValueError, jsonschema.ValidationError) as e:
            bad.append(f"seed {seed}: {e}: {o.text!r}")
    assert not bad, f"{len(bad)}/100 failed:\n" + "\n".join(bad[:5])
    assert len({o.text for o in outs}) > 20  # sampled, not one answer 100 times


@pytest.mark.parametrize(
    ("kwargs", "check"),
    [
        ({"regex": r"[0-9]{3}-[0-9]{4}"}, lambda t: len(t) == 8 and t[3] == "-"),
        ({"choice": ["red", "green", "blue"]}, lambda t: t in ("red", "green", "blue")),
        ({"grammar": 'root ::= "(" [a-z]+ ")"'}, lambda t: t[0] == "(" and t[-1] == ")"),
        ({"json_schema": '{"type": "object"}'}, lambda t: isinstance(json.loads(t), dict)),
    ],
)
def test_each_kind_completes_with_stop(llm: LLM, kwargs: dict, check) -> None:
    ask = 'What color is the sky? Reply with this JSON object only: {"sky": "<color>"}'
    prompt = llm.apply_chat_template([{"role": "user", "content": ask}])
    out = llm.generate(prompt, SamplingParams.greedy(max_tokens=60, **kwargs))[0]
    assert out.finish_reason == "stop", out.text
    assert check(out.text), out.text


def test_greedy_choice_takes_the_best_allowed_token(llm: LLM) -> None:
    """Greedy under a choice list takes, as first token, the most likely token among those
    whose bytes start some choice (the oracle: the raw next-token logits and token bytes)."""
    prompt = llm.apply_chat_template([{"role": "user", "content": "Name a color."}])
    choices = ["red", "green", "blue", "yellow"]
    logits = score_tokens(llm, prompt)[-1]  # (V,) the prediction after the prompt
    pieces = llm.tokenizer.pieces
    allowed = [
        t for t, b in enumerate(pieces) if b and any(c.encode().startswith(b) for c in choices)
    ]
    best = max(allowed, key=lambda t: float(logits[t]))
    out = llm.generate(prompt, SamplingParams.greedy(choice=choices, max_tokens=10))[0]
    assert out.token_ids[0] == best
    assert out.text in choices and out.finish_reason == "stop"


def test_survives_preemption(smollm2_path) -> None:
    """A KV cache too small for every sequence at once forces preemption by recompute; the
    matchers (which only see generated tokens) keep every output valid."""
    model_file = open_model_file(smollm2_path)
    tok = Tokenizer.from_gguf(smollm2_path)
    config = EngineConfig(max_model_len=128, kv_cache_tokens=128, max_num_seqs=6, block_size=16)
    engine = LLMEngine(model_file, tok, config)
    schema = {
        "type": "object",
        "properties": {"n": {"type": "integer"}, "w": {"type": "string", "maxLength": 30}},
        "required": ["n", "w"],
        "additionalProperties": False,
    }
    text = "Here is a JSON object with a number n and a word w, as a web API would return it:"
    prompt = tok.encode(text * 2, add_special=False)  # ~40 tokens: 6 of them overflow the pool
    ids = [
        engine.add_request(prompt, SamplingParams(json_schema=schema, max_tokens=60, seed=i))
        for i in range(6)
    ]
    texts = dict.fromkeys(ids, "")
    reasons = {}
    while engine.has_unfinished_requests():
        for o in engine.step():
            texts[o.request_id] += o.text
            if o.finished:
                reasons[o.request_id] = o.finish_reason
    assert engine.scheduler.num_preemptions > 0
    for rid in ids:
        assert reasons[rid] == "stop", texts[rid]
        jsonschema.validate(json.loads(texts[rid]), schema)
