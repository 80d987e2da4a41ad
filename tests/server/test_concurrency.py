"""Concurrent requests, cancelled streams and the prefix cache, seen from the outside."""

from __future__ import annotations

import asyncio
import time
import uuid

import httpx
import pytest

pytestmark = pytest.mark.models

PROMPTS = [f"Write a short sentence about the number {i}." for i in range(16)]


def _chat(prompt: str, max_tokens: int = 5) -> dict:
    msgs = [{"role": "user", "content": prompt}]
    return {"messages": msgs, "temperature": 0, "max_tokens": max_tokens}


def _long_prompt(n_words: int = 50) -> str:
    """Fresh text each run, so nothing of it is cached before the test."""
    words = [uuid.uuid4().hex[:6] for _ in range(n_words)]
    return "Summarize these codes: " + " ".join(words)


def test_concurrent_greedy_equals_sequential(server):
    with server.client() as c:
        sequential = [
            c.post("/v1/chat/completions", json=_chat(p)).json()["choices"][0]["message"]
            for p in PROMPTS
        ]

    async def all_at_once() -> list[dict]:
        async with httpx.AsyncClient(base_url=server.url, timeout=300) as ac:
            rs = await asyncio.gather(
                *(ac.post("/v1/chat/completions", json=_chat(p)) for p in PROMPTS)
            )
        return [r.json()["choices"][0]["message"] for r in rs]

    concurrent = asyncio.run(all_at_once())
    diffs = [(p, s, c) for p, s, c in zip(PROMPTS, sequential, concurrent, strict=True) if s != c]
    assert not diffs, f"batched greedy output differs from one-at-a-time: {diffs}"


def _wait_idle(server, free_blocks: float, timeout: float = 20.0) -> dict[str, float]:
    deadline = time.monotonic() + timeout
    while True:
        m = server.metrics()
        idle = m["llamacpp:requests_processing"] == 0 and m["llamacpp:requests_deferred"] == 0
        if (idle and m["llamapy:kv_free_blocks"] == free_blocks) or time.monotonic() > deadline:
            return m
        time.sleep(0.2)


def test_cancelled_stream_frees_its_blocks(server):
    start = server.metrics()
    free = start["llamapy:kv_free_blocks"]
    body = {**_chat("Tell me a long story.", 400), "ignore_eos": True, "stream": True}
    with server.client() as c, c.stream("POST", "/v1/chat/completions", json=body) as r:
        chunks, lines = 0, r.iter_lines()  # kept: dropping it would close the connection
        for line in lines:
            chunks += line.startswith("data: ")
            if chunks >= 4:
                break
        busy = server.metrics()
        assert busy["llamapy:kv_free_blocks"] < free  # the stream holds blocks
    # the client hung up after a few tokens: the request must stop long before its 400
    after = _wait_idle(server, free)
    assert after["llamapy:kv_free_blocks"] == free
    assert after["llamacpp:requests_processing"] == 0
    produced = after["llamacpp:tokens_predicted_total"] - start["llamacpp:tokens_predicted_total"]
    assert produced < 100, f"the cancelled request went on to {produced} tokens"


def test_client_gone_before_a_plain_reply_stops_it(server):
    start = server.metrics()
    max_tokens = 1000  # the context is 1024: far more than a second of decoding makes
    body = {"prompt": "Hi", "max_tokens": max_tokens, "ignore_eos": True}
    with server.client(timeout=1.0) as c, pytest.raises(httpx.ReadTimeout):
        c.post("/v1/completions", json=body)  # hangs up after 1 s, before the reply
    at_hangup = server.metrics()["llamacpp:tokens_predicted_total"]  # counted per step
    after = _wait_idle(server, start["llamapy:kv_free_blocks"])
    assert after["llamapy:kv_free_blocks"] == start["llamapy:kv_free_blocks"]
    late = after["llamacpp:tokens_predicted_total"] - at_hangup
    produced = after["llamacpp:tokens_predicted_total"] - start["llamacpp:tokens_predicted_total"]
    # the server notices the hang-up within a few steps, whatever the decoding speed
    assert late < 100, f"the abandoned request went on for {late} tokens after the hang-up"
    assert produced < max_tokens, f"the abandoned request ran to the end ({produced} tokens)"


def test_prefix_cache_reports_cached_tokens(server):
    body = {"prompt": _long_prompt(), "max_tokens": 1, "temperature": 0}
    before = server.metrics()
    with server.client() as c:
        first = c.post("/v1/completions", json=body).json()["usage"]
        second = c.post("/v1/completions", json=body).json()["usage"]
    after = server.metrics()
    assert first["prompt_tokens_details"]["cached_tokens"] == 0
    n = second["prompt_tokens"]
    cached = second["prompt_tokens_details"]["cached_tokens"]
    block = 16
    assert cached == (n - 1) // block * block  # every full block but the last token's
    hits = after["llamapy:prefix_cache_hits_tokens_total"]
    assert hits - before["llamapy:prefix_cache_hits_tokens_total"] == cached


def test_n_choices_share_the_prompt_blocks(server):
    body = {"prompt": _long_prompt(), "max_tokens": 2, "n": 3, "temperature": 1.0, "seed": 3}
    before = server.metrics()
    with server.client() as c:
        usage = c.post("/v1/completions", json=body).json()["usage"]
    after = server.metrics()
    n = usage["prompt_tokens"]
    # choices 1 and 2 reuse choice 0's full prompt blocks instead of computing them
    hits = after["llamapy:prefix_cache_hits_tokens_total"]
    assert hits - before["llamapy:prefix_cache_hits_tokens_total"] == 2 * ((n - 1) // 16 * 16)
    assert usage["prompt_tokens_details"]["cached_tokens"] == (n - 1) // 16 * 16
