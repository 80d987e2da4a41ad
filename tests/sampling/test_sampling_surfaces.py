"""The new samplers through their surfaces: DryVocab on token texts, the CLI flags, the
server's request fields and completion_probabilities, and generation with a real model."""

from __future__ import annotations

import argparse
import math
import subprocess
import sys

import numpy as np
import pytest
import torch

from llamapy.cli.common import add_sampling_args, sampling_params
from llamapy.sampling import (
    DryVocab,
    Sampler,
    SamplerStage,
    SamplingParams,
    samplers_from_chars,
)
from llamapy.server.protocol import ChatCompletionRequest, NativeCompletionRequest

# --- DryVocab: breaker strings -> token sequences ----------------------------------------


def _overlapping_reference(texts: list[bytes], s: bytes, encode) -> set[tuple[int, tuple]]:
    """get_overlapping_token_sequences as written in llama.cpp (find loop over positions)."""
    out = set()
    for token, word in enumerate(texts):
        if s in word:
            out.add((token, ()))
            continue
        pos = word.find(s[:1])
        while pos != -1:
            i = 1
            match = True
            while i < len(s) and i + pos < len(word):
                if word[pos + i] != s[i]:
                    match = False
                    break
                i += 1
            if match:
                out.add((token, tuple(encode(s[i:].decode())[:20])))
            pos = word.find(s[:1], pos + 1)
    return out


def test_dry_vocab_breakers_match_llama_cpp_scan(rng):
    alphabet = list("ab:c\n")
    for _ in range(5):
        words = {"".join(rng.choice(alphabet, size=int(rng.integers(1, 4)))) for _ in range(60)}
        texts = sorted(words)
        raw = [t.encode() for t in texts]
        # a toy tokenizer: one token per character (ids of the one-character texts)
        single = {t: i for i, t in enumerate(texts) if len(t) == 1}

        def encode(s: str, single=single) -> list[int]:
            return [single.get(ch, 0) for ch in s]

        vocab = DryVocab(raw.__getitem__, encode, len(raw))
        breakers = ["ab:", "c", "\n:a", "b:c\nab"]
        got = vocab.breakers(breakers)
        expected: dict[int, set] = {}
        for s in breakers:
            for head, tail in _overlapping_reference(raw, s.encode(), encode):
                expected.setdefault(head, set()).add(tail)
        assert {h: set(t) for h, t in got.items()} == expected
        assert vocab.breakers(breakers) is got  # cached


def test_dry_vocab_of_a_real_tokenizer(smollm2_path):
    from llamapy.tokenizer import Tokenizer

    tok = Tokenizer.from_path(smollm2_path)
    vocab = DryVocab.from_tokenizer(tok)
    got = vocab.breakers(SamplingParams().dry_sequence_breakers)
    # one-byte breakers: exactly the tokens whose text contains one of them, alone
    expected = {
        t for t in range(tok.vocab_size) if any(c in tok.decode_bytes([t]) for c in b'\n:"*')
    }
    assert set(got) == expected and all(v == ((),) for v in got.values())
    assert tok.encode("\n", add_special=False)[0] in got
    # a longer breaker: heads are tokens ending with its start, tails tokenize the rest
    got = vocab.breakers(["Human:"])
    ids = tok.encode("Human:", add_special=False)
    assert got.get(ids[0]) != ((),)  # "Human" starts it; ":" follows as a tail
    assert tuple(ids[1:]) in got[ids[0]]


# --- CLI -------------------------------------------------------------------------------


def _cli(*argv: str) -> SamplingParams:
    p = argparse.ArgumentParser()
    add_sampling_args(p)
    return sampling_params(p.parse_args(list(argv)))


def test_cli_flags_map_to_params():
    p = _cli(
        "--dry-multiplier", "0.8", "--dry-base", "2", "--dry-allowed-length", "3",
        "--dry-penalty-last-n", "-1", "--dry-sequence-breaker", "\n", "--dry-sequence-breaker",
        "###", "--xtc-probability", "0.5", "--xtc-threshold", "0.2", "--top-nsigma", "1.5",
        "--dynatemp-range", "0.3", "--dynatemp-exp", "2", "--mirostat", "2", "--mirostat-lr",
        "0.2", "--mirostat-ent", "4", "--min-keep", "3", "--samplers", "top_k;temp;min-p",
    )  # fmt: skip
    assert (p.dry_multiplier, p.dry_base, p.dry_allowed_length, p.dry_penalty_last_n) == (
        0.8, 2.0, 3, -1,
    )  # fmt: skip
    assert p.dry_sequence_breakers == ("\n", "###")
    assert (p.xtc_probability, p.xtc_threshold, p.top_n_sigma) == (0.5, 0.2, 1.5)
    assert (p.dynatemp_range, p.dynatemp_exponent, p.min_keep) == (0.3, 2.0, 3)
    assert (p.mirostat, p.mirostat_eta, p.mirostat_tau) == (2, 0.2, 4.0)
    assert p.samplers == (SamplerStage.TOP_K, SamplerStage.TEMPERATURE, SamplerStage.MIN_P)
    assert _cli("--sampling-seq", "kt").samplers == samplers_from_chars("kt")
    assert _cli("--dry-sequence-breaker", "none").dry_sequence_breakers == ()
    assert _cli() == SamplingParams(max_tokens=None)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--dry-base", "0.5"], "dry_base"),
        (["--mirostat", "3"], "mirostat"),
        (["--xtc-probability", "2"], "xtc_probability"),
        (["--samplers", "top_k;bogus"], "unknown sampler 'bogus'"),
        (["--sampling-seq", "kq"], "unknown sampler letter 'q'"),
        (["--samplers", "top_k", "--sampling-seq", "k"], "one of --samplers and --sampling-seq"),
        (["--dry-allowed-length", "-1"], "dry_allowed_length"),
    ],
)
def test_cli_bad_flags_raise(args, message):
    with pytest.raises(ValueError, match=message):
        _cli(*args)


def test_cli_bad_flag_is_one_line_exit_2():
    proc = subprocess.run(
        [sys.executable, "-m", "llamapy", "run", "hi", "--samplers", "top_k;bogus"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    assert "unknown sampler 'bogus'" in lines[0]


# --- server request fields ---------------------------------------------------------------


def test_request_fields_map_to_params():
    body = NativeCompletionRequest(
        prompt="x", dry_multiplier=0.8, dry_base=0.5, dry_allowed_length=1,
        dry_penalty_last_n=32, dry_sequence_breakers=["\n", "END"], xtc_probability=0.4,
        xtc_threshold=0.2, top_n_sigma=2.0, dynatemp_range=0.5, dynatemp_exponent=1.5,
        mirostat=1, mirostat_tau=3.0, mirostat_eta=0.05, samplers="kmt", min_keep=2,
        n_probs=5, post_sampling_probs=True,
    )  # fmt: skip
    p = body.sampling_params(None, body.n_probs)
    assert p.dry_base == SamplingParams().dry_base  # < 1: the default, as llama-server
    assert (p.dry_multiplier, p.dry_allowed_length, p.dry_penalty_last_n) == (0.8, 1, 32)
    assert p.dry_sequence_breakers == ("\n", "END")
    assert (p.xtc_probability, p.xtc_threshold, p.top_n_sigma) == (0.4, 0.2, 2.0)
    assert (p.dynatemp_range, p.dynatemp_exponent, p.min_keep) == (0.5, 1.5, 2)
    assert (p.mirostat, p.mirostat_tau, p.mirostat_eta) == (1, 3.0, 0.05)
    assert p.samplers == samplers_from_chars("kmt")
    assert p.n_probs == 5 and p.post_sampling_probs
    chat = ChatCompletionRequest(messages=[{"role": "user", "content": "x"}],
                                 samplers=["top_k", "temperature"], dry_base=2.5)  # fmt: skip
    q = chat.sampling_params(None)
    assert q.samplers == (SamplerStage.TOP_K, SamplerStage.TEMPERATURE) and q.dry_base == 2.5


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"dry_sequence_breakers": []}, "dry_sequence_breakers"),
        ({"samplers": ["top_k", "nope"]}, "samplers"),
        ({"samplers": "kz"}, "samplers"),
        ({"mirostat": 5}, "mirostat"),
        ({"xtc_threshold": -1}, "xtc_threshold"),
        ({"min_keep": -2}, "min_keep"),
    ],
)
def test_bad_request_fields_raise_naming_them(fields, message):
    with pytest.raises(ValueError, match=message):
        NativeCompletionRequest(prompt="x", **fields).sampling_params(None)


@pytest.fixture(scope="module")
def client(smollm2_path):
    from fastapi.testclient import TestClient

    from llamapy.server.app import ServerConfig, create_app, load_model

    app = create_app(ServerConfig(model=str(smollm2_path), n_ctx=512), load=False)
    load_model(app.state.llamapy)
    with TestClient(app) as c:
        yield c


def test_server_completion_probabilities(client):
    body = {"prompt": "The capital of France is", "n_predict": 4, "n_probs": 3, "seed": 7,
            "temperature": 0.7, "top_k": 20}  # fmt: skip
    before = client.post("/completion", json=body).json()
    after = client.post("/completion", json={**body, "post_sampling_probs": True}).json()
    assert before["tokens"] == after["tokens"]  # the same seed draws the same tokens
    for b, a, t in zip(before["completion_probabilities"], after["completion_probabilities"],
                       before["tokens"], strict=True):  # fmt: skip
        assert b["id"] == a["id"] == t
        assert len(b["top_logprobs"]) == 3 and b["logprob"] <= 0
        assert 1 <= len(a["top_probs"]) <= 3 and 0 < a["prob"] <= 1
        probs = [e["prob"] for e in a["top_probs"]]
        assert probs == sorted(probs, reverse=True) and sum(probs) <= 1 + 1e-6
        # after sampling (top-k 20, temperature 0.7) the top token is likelier than before
        assert a["top_probs"][0]["prob"] >= math.exp(b["top_logprobs"][0]["logprob"]) - 1e-6
    streamed = []
    with client.stream("POST", "/completion", json={**body, "stream": True,
                                                    "post_sampling_probs": True}) as r:  # fmt: skip
        for line in r.iter_lines():
            if line.startswith("data: "):
                import json

                streamed += json.loads(line[6:]).get("completion_probabilities", [])
    assert streamed == after["completion_probabilities"]


def test_server_extra_samplers_and_errors(client):
    base = {"prompt": "1, 2, 3, 1, 2, 3, 1, 2, 3,", "n_predict": 6, "temperature": 0}
    plain = client.post("/completion", json=base).json()
    dry = client.post("/completion", json={**base, "dry_multiplier": 5.0,
                                           "dry_allowed_length": 1}).json()  # fmt: skip
    assert plain["tokens"] != dry["tokens"]  # greedy repeats the pattern; DRY breaks it
    for extra in ({"mirostat": 2}, {"xtc_probability": 1.0, "xtc_threshold": 0.01},
                  {"top_n_sigma": 1.0, "dynatemp_range": 0.5, "samplers": "edst"}):  # fmt: skip
        # seeded, and not stopped by an end-of-generation draw (one CI run drew <|im_end|>
        # fourth: 4 tokens where 6 were asked)
        body = {**base, "temperature": 0.8, "seed": 11, "ignore_eos": True, **extra}
        r = client.post("/completion", json=body)
        assert r.status_code == 200 and len(r.json()["tokens"]) == 6
    r = client.post("/completion", json={**base, "samplers": ["top_k", "bogus"]})
    assert r.status_code == 400 and r.json()["error"]["param"] == "samplers"
    r = client.post("/v1/chat/completions", json={
        "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3, "mirostat": 2,
        "dry_multiplier": 0.8, "logprobs": True, "top_logprobs": 2, "post_sampling_probs": True,
    })  # fmt: skip
    assert r.status_code == 200
    content = r.json()["choices"][0]["logprobs"]["content"]
    assert all(c["logprob"] <= 0 and 1 <= len(c["top_logprobs"]) <= 2 for c in content)
    props = client.get("/props").json()["default_generation_settings"]["params"]
    assert props["samplers"][0] == "penalties" and props["dry_base"] == 1.75


# --- generation with a real model -------------------------------------------------------


def test_generation_with_every_sampler(smollm2_path):
    """Each new sampler in the engine, batched with plain rows (same tokens as alone)."""
    from llamapy import LLM

    llm = LLM(smollm2_path, n_ctx=256, max_num_seqs=4)
    prompt = "one two three one two three one two three one two"
    params = [
        SamplingParams(max_tokens=8, seed=1, dry_multiplier=1.0, dry_allowed_length=1),
        SamplingParams(max_tokens=8, seed=2, mirostat=2, mirostat_tau=3.0),
        SamplingParams(max_tokens=8, seed=3, xtc_probability=0.5, top_n_sigma=1.0,
                       dynatemp_range=0.3, samplers=["dry", "top_k", "xtc", "temperature"]),
        SamplingParams.greedy(max_tokens=8),
    ]  # fmt: skip
    together = llm.generate([prompt] * 4, params)
    for p, out in zip(params, together, strict=True):
        assert out.token_ids == llm.generate([prompt], [p])[0].token_ids
    greedy, dry = (
        together[3].token_ids,
        llm.generate(
            [prompt],
            [SamplingParams.greedy(max_tokens=8, dry_multiplier=3.0, dry_allowed_length=1)],
        )[0].token_ids,
    )
    assert greedy != dry


def test_dry_penalty_on_real_logits_equals_the_oracle(smollm2_path, rng):
    """Sampler with the model's DryVocab vs the oracle over the same breakers."""
    from sampling_reference import reference

    from llamapy.tokenizer import Tokenizer

    tok = Tokenizer.from_path(smollm2_path)
    vocab = DryVocab.from_tokenizer(tok)
    text = "Q: the cat sat on the mat, the cat sat on the"  # no breaker after "Q:"
    hist = tok.encode(text, add_special=False)
    p = SamplingParams(dry_multiplier=0.8, dry_allowed_length=2, temperature=1.0, top_k=0,
                       top_p=1.0, min_p=0.0)  # fmt: skip
    x = (rng.standard_normal(tok.vocab_size) * 3).astype(np.float32)
    sampler = Sampler(dry_vocab=vocab)
    got = sampler.process_logits(torch.from_numpy(x)[None], [p], [hist])[0].numpy()
    _, expected, _ = reference(x, p, hist, breakers=vocab.breakers(p.dry_sequence_breakers))
    np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-6)
    # " mat" would extend a repeat of 5 tokens: 0.8 * 1.75^(5 - 2)
    mat = tok.encode(" mat", add_special=False)[0]
    assert x[mat] - got[mat] == pytest.approx(0.8 * 1.75**3, rel=1e-5)
    # the latest ":" leaves 2 tokens (" on the") to repeat: 0.8 * 1.75^0
    cut = tok.encode("Q: the cat sat: on the mat, the cat sat: on the", add_special=False)
    got = sampler.process_logits(torch.from_numpy(x)[None], [p], [cut])[0].numpy()
    assert x[mat] - got[mat] == pytest.approx(0.8, rel=1e-5)
