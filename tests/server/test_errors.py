"""Errors in OpenAI's JSON shape with the right status; a client's mistake is never a 500."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator

import httpx
import pytest
from live_server import Server, free_port, serve

pytestmark = pytest.mark.models

KEY = "sk-test-123"
MSG = [{"role": "user", "content": "Hi"}]
PART_NO_TEXT = [{"type": "text", "text": 5}]  # was a 500
IMAGE = [{"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}]
CONTENT = "messages.0.content"

# (path, raw body, param the error should name or None)
BAD_REQUESTS = [
    ("/v1/chat/completions", {"messages": MSG, "temperature": -1}, "temperature"),
    ("/v1/chat/completions", {"messages": MSG, "temperature": "hot"}, "temperature"),
    ("/v1/chat/completions", {"messages": MSG, "n": 0}, "n"),
    ("/v1/chat/completions", {"messages": []}, "messages"),
    ("/v1/chat/completions", {"messages": "Hi"}, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "robot", "content": "x"}]}, None),
    ("/v1/chat/completions", {"messages": [{"role": "user"}]}, "messages.0"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": [5]}]}, None),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": PART_NO_TEXT}]}, CONTENT),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": IMAGE}]}, CONTENT),
    ("/v1/chat/completions", {"messages": MSG, "logit_bias": {"abc": 1}}, "logit_bias"),
    ("/v1/chat/completions", {"messages": MSG, "logit_bias": {"99999999": 1}}, "logit_bias"),
    ("/v1/chat/completions", {"messages": MSG, "logit_bias": {"5": "x"}}, None),
    ("/v1/chat/completions", {"messages": MSG, "top_p": 2}, "top_p"),
    ("/v1/chat/completions", {"messages": MSG, "seed": -1}, "seed"),
    ("/v1/chat/completions", {"messages": MSG, "max_tokens": -1}, "max_tokens"),
    ("/v1/chat/completions", {"messages": MSG, "stop": 5}, None),
    ("/v1/chat/completions", {"messages": MSG, "top_logprobs": 99}, "top_logprobs"),
    ("/v1/chat/completions", "{not json", None),
    ("/v1/chat/completions", "", None),
    ("/v1/chat/completions", "[1, 2]", None),
    ("/v1/chat/completions", "null", None),
    ("/v1/completions", {"prompt": ""}, None),
    ("/v1/completions", {"prompt": [99999999]}, None),
    ("/v1/completions", {"prompt": [-1]}, None),
    ("/v1/completions", {"prompt": ["a", "b"]}, "prompt"),
    ("/v1/completions", {"prompt": "x", "logprobs": 50}, "logprobs"),
    ("/v1/completions", {}, "prompt"),
    ("/completion", {"prompt": "x", "n_predict": -5}, "n_predict"),
    ("/completion", {"prompt": {"a": 1}}, None),
    ("/completion", {"prompt": "x", "min_p": 7, "stream": True}, "min_p"),
    ("/tokenize", {"content": 5}, "content"),
    ("/detokenize", {"tokens": [99999999]}, "tokens"),
    ("/detokenize", {"tokens": ["a"]}, None),
    ("/apply-template", {"messages": []}, "messages"),
]


def _post(c: httpx.Client, path: str, body) -> httpx.Response:
    raw = body if isinstance(body, str) else json.dumps(body)
    return c.post(path, content=raw, headers={"content-type": "application/json"})


def _assert_openai_error(r: httpx.Response, status: int) -> dict:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert isinstance(err["message"], str) and err["message"]
    assert {"type", "param", "code"} <= set(err)
    return err


@pytest.mark.parametrize(("path", "body", "param"), BAD_REQUESTS)
def test_bad_request_is_400(server, path, body, param):
    with server.client() as c:
        err = _assert_openai_error(_post(c, path, body), 400)
    if param is not None:
        assert err["param"] == param


def test_no_client_mistake_is_a_500(server):
    """Every malformed body at every endpoint: a 4xx, and the server still works after."""
    bodies = [b for _, b, _ in BAD_REQUESTS] + [{"prompt": None}, {"messages": None}, "123"]
    # a body that happens to be valid elsewhere must not generate a whole context
    short = {"max_tokens": 2, "n_predict": 2}
    bodies = [{**short, **b} if isinstance(b, dict) else b for b in bodies]
    paths = sorted({p for p, _, _ in BAD_REQUESTS})
    with server.client() as c:
        for path in paths:
            for body in bodies:
                r = _post(c, path, body)
                assert r.status_code < 500, (path, body, r.text)
        ok = c.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 2})
        assert ok.status_code == 200 and c.get("/health").status_code == 200


def test_unknown_route_and_model_are_404(server):
    with server.client() as c:
        _assert_openai_error(c.get("/v1/nothing-here"), 404)
        body = {"model": "no-such-model", "messages": MSG}
        err = _assert_openai_error(c.post("/v1/chat/completions", json=body), 404)
    assert err["param"] == "model"


def test_max_tokens_zero_is_answered(server):
    with server.client() as c:
        r = c.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 0}).json()
        assert r["choices"][0]["text"] == "" and r["usage"]["completion_tokens"] == 0
        assert c.get("/health").status_code == 200


@pytest.fixture(scope="module")
def strict(smollm2_path, tmp_path_factory) -> Iterator[Server]:
    """An API key, a 64-token context, one request at a time."""
    args = ("--api-key", KEY, "-c", "64", "--max-queued", "1", "-np", "1")
    with serve(smollm2_path, *args, log_dir=tmp_path_factory.mktemp("strict")) as s:
        yield s


def test_api_key(strict):
    body = {"prompt": "Hi", "max_tokens": 1}
    with strict.client() as c:
        _assert_openai_error(c.post("/v1/completions", json=body), 401)
        wrong = {"authorization": "Bearer nope"}
        _assert_openai_error(c.post("/v1/completions", json=body, headers=wrong), 401)
        assert c.get("/health").status_code == 200  # open, for load balancers
        good = {"authorization": f"Bearer {KEY}"}
        assert c.post("/v1/completions", json=body, headers=good).status_code == 200


def test_prompt_over_the_context_is_400(strict):
    body = {"prompt": "word " * 200, "max_tokens": 1}
    with strict.client(headers={"authorization": f"Bearer {KEY}"}) as c:
        err = _assert_openai_error(c.post("/v1/completions", json=body), 400)
    assert err["code"] == "context_length_exceeded" and "context" in err["message"]


def test_full_queue_is_503(strict):
    auth = {"authorization": f"Bearer {KEY}"}
    long = {"prompt": "Hi", "max_tokens": 50, "ignore_eos": True, "stream": True}
    with strict.client(headers=auth) as c, c.stream("POST", "/v1/completions", json=long) as r:
        assert r.status_code == 200
        lines = r.iter_lines()  # kept: dropping the iterator closes the connection
        next(lines)  # the first request is generating
        second = c.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 1})
        _assert_openai_error(second, 503)


def test_prompt_plus_max_tokens_over_the_context_is_400(strict):
    body = {"prompt": "word " * 20, "max_tokens": 60}  # the prompt fits -c 64; the sum does not
    with strict.client(headers={"authorization": f"Bearer {KEY}"}) as c:
        err = _assert_openai_error(c.post("/v1/completions", json=body), 400)
        assert err["code"] == "context_length_exceeded" and err["param"] == "max_tokens"
        assert "to generate" in err["message"]
        # Without max_tokens the same prompt is served and stops at the context limit.
        ok = c.post("/v1/completions", json={"prompt": "word " * 20, "max_tokens": None})
        assert ok.status_code == 200


def test_a_model_that_cannot_load_ends_the_server(tmp_path):
    """As llama-server: no model, no server (it used to answer 503 forever)."""
    bad = tmp_path / "notes.gguf"
    bad.write_text("not a model")
    argv = [sys.executable, "-m", "llamapy", "serve", "-m", str(bad), "--port", str(free_port())]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("llamapy serve: error: model failed to load:"), proc.stderr
    assert "is not a GGUF file" in last and "Traceback" not in proc.stderr
