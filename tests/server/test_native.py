"""llama.cpp's native endpoints over raw HTTP: /completion, /tokenize, /detokenize,
/apply-template, /health, /props, /slots, /metrics."""

from __future__ import annotations

import json

import pytest

pytestmark = pytest.mark.models

LLAMACPP_METRICS = (
    "llamacpp:prompt_tokens_total",
    "llamacpp:tokens_predicted_total",
    "llamacpp:n_decode_total",
    "llamacpp:requests_processing",
    "llamacpp:requests_deferred",
    "llamacpp:kv_cache_usage_ratio",
    "llamacpp:kv_cache_tokens",
)


def test_health_was_503_while_loading(server):
    if server.health_statuses == [200]:
        pytest.skip("the model loaded before the first /health poll")
    assert set(server.health_statuses[:-1]) == {503}


def test_completion_streamed_equals_not_streamed(server):
    body = {"prompt": "The sky is", "n_predict": 6, "temperature": 0, "ignore_eos": True}
    with server.client() as c:
        whole = c.post("/completion", json=body).json()
        assert whole["tokens_predicted"] == 6 and whole["stop_type"] == "limit"
        assert len(whole["tokens"]) == 6 and whole["content"]
        events = []
        with c.stream("POST", "/completion", json={**body, "stream": True}) as r:
            assert r.headers["content-type"].startswith("text/event-stream")
            for line in r.iter_lines():
                if line.startswith("data: "):
                    events.append(json.loads(line[6:]))
    assert "".join(e["content"] for e in events) == whole["content"]
    assert [t for e in events for t in e["tokens"]] == whole["tokens"]
    assert events[-1]["stop"] and not any(e["stop"] for e in events[:-1])


def test_tokenize_detokenize_round_trip(server):
    text = "Hello, wörld! 123"
    with server.client() as c:
        ids = c.post("/tokenize", json={"content": text}).json()["tokens"]
        assert ids and all(isinstance(i, int) for i in ids)
        assert c.post("/detokenize", json={"tokens": ids}).json()["content"] == text
        ascii_text = "Hello, world! 123"
        body = {"content": ascii_text, "with_pieces": True}
        pieces = c.post("/tokenize", json=body).json()["tokens"]
    assert "".join(p["piece"] for p in pieces) == ascii_text


def test_apply_template(server):
    msgs = [{"role": "user", "content": "Hi there"}]
    with server.client() as c:
        prompt = c.post("/apply-template", json={"messages": msgs}).json()["prompt"]
    assert "Hi there" in prompt and prompt.rstrip().endswith("assistant")


def test_health_props_slots(server):
    with server.client() as c:
        assert c.get("/health").json() == {"status": "ok"}
        props = c.get("/props").json()
        assert props["n_ctx"] == 1024 and props["total_slots"] == 16
        slots = c.get("/slots").json()
    assert len(slots) == 16 and all(s["n_ctx"] == 1024 for s in slots)


def test_metrics_have_llamacpp_names(server):
    before = server.metrics()
    for name in LLAMACPP_METRICS:
        assert name in before, name
    with server.client() as c:
        c.post("/completion", json={"prompt": "Hi", "n_predict": 3, "ignore_eos": True})
    after = server.metrics()
    assert after["llamacpp:tokens_predicted_total"] - before["llamacpp:tokens_predicted_total"] >= 3
    assert after["llamacpp:requests_processing"] == 0
    assert 0 < after["llamapy:kv_free_blocks"] <= after["llamapy:kv_blocks"]
