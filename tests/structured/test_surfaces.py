"""Structured output through the server (OpenAI, llama.cpp and vLLM spellings) and the CLI."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import jsonschema
import openai
import pytest

sys.path.insert(0, str(Path(__file__).parent.parent / "server"))
from live_server import Server, serve  # noqa: E402

pytestmark = pytest.mark.models

SCHEMA = {
    "type": "object",
    "properties": {
        "color": {"enum": ["red", "green", "blue"]},
        "count": {"type": "integer", "minimum": 0, "maximum": 9},
    },
    "required": ["color", "count"],
    "additionalProperties": False,
}
CHAT = [{"role": "user", "content": "Give a color and a count as JSON."}]


@pytest.fixture(scope="module")
def server(smollm2_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    with serve(smollm2_path, "-c", "512", log_dir=tmp_path_factory.mktemp("srv")) as s:
        yield s


@pytest.fixture(scope="module")
def client(server: Server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", timeout=120)


@pytest.fixture(scope="module")
def model(server: Server) -> str:
    return server.model_name()


def test_openai_response_format_json_schema(client: openai.OpenAI, model: str) -> None:
    fmt = {"type": "json_schema", "json_schema": {"name": "x", "schema": SCHEMA, "strict": True}}
    r = client.chat.completions.create(
        model=model, messages=CHAT, response_format=fmt, max_tokens=40, temperature=0.7
    )
    choice = r.choices[0]
    assert choice.finish_reason == "stop", choice.message.content
    jsonschema.validate(json.loads(choice.message.content), SCHEMA)


def test_openai_json_object_and_vllm_extras(client: openai.OpenAI, model: str) -> None:
    r = client.chat.completions.create(
        model=model, messages=CHAT, response_format={"type": "json_object"}, max_tokens=60,
        temperature=0,
    )  # fmt: skip
    if r.choices[0].finish_reason == "stop":  # a free-form object may run past max_tokens
        assert isinstance(json.loads(r.choices[0].message.content), dict)
    else:
        assert r.choices[0].message.content.startswith("{")
    r = client.completions.create(
        model=model, prompt="My favourite animal is the", max_tokens=10,
        extra_body={"guided_choice": ["cat", "dog"]},
    )  # fmt: skip
    assert r.choices[0].text in ("cat", "dog") and r.choices[0].finish_reason == "stop"
    r = client.completions.create(
        model=model, prompt="Phone:", max_tokens=20,
        extra_body={"structured_outputs": {"regex": "[0-9]{3}-[0-9]{4}"}},
    )  # fmt: skip
    text = r.choices[0].text
    assert len(text) == 8 and text[3] == "-" and text.replace("-", "").isdigit(), text


def test_llama_cpp_completion_fields(server: Server) -> None:
    with server.client() as c:
        r = c.post("/completion", json={"prompt": "Answer:", "grammar": 'root ::= "yes" | "no"'})
        assert r.status_code == 200 and r.json()["content"] in ("yes", "no")
        r = c.post("/completion", json={"prompt": "JSON:", "json_schema": SCHEMA, "n_predict": 40})
        assert r.status_code == 200
        jsonschema.validate(json.loads(r.json()["content"]), SCHEMA)


@pytest.mark.parametrize(
    ("body", "words"),
    [
        ({"json_schema": {"type": "kaboom"}}, "kaboom"),
        ({"grammar": "root ::= nothing"}, "nothing"),
        ({"response_format": {"type": "yaml"}}, "response_format"),
        ({"guided_regex": "a[b"}, "regex"),
        ({"guided_choice": "ab"}, "list of strings"),
        ({"guided_regex": "a", "guided_json": {"type": "object"}}, "guided_json, guided_regex"),
    ],
)
def test_bad_constraint_is_400(server: Server, body: dict, words: str) -> None:
    with server.client() as c:
        r = c.post("/v1/chat/completions", json={"messages": CHAT, **body})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["type"] == "invalid_request_error" and words in err["message"]


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    argv = [sys.executable, "-m", "llamapy", "run", *args]
    return subprocess.run(argv, capture_output=True, text=True, timeout=300)


def test_cli_json_schema_file(smollm2_path: Path, tmp_path: Path) -> None:
    path = tmp_path / "s.json"
    path.write_text(json.dumps(SCHEMA))
    proc = _run("-m", str(smollm2_path), "--json-schema", f"@{path}", "-n", "40", "A color:")
    assert proc.returncode == 0, proc.stderr
    jsonschema.validate(json.loads(proc.stdout), SCHEMA)


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["--json-schema", "{bad"], "not valid JSON"),
        (["--grammar-file", "/nonexistent.gbnf"], "cannot read"),
        (["--regex", "a", "--grammar", 'root ::= "a"'], "give one of"),
        (["--grammar", "root ::= missing"], "missing"),
    ],
)
def test_cli_bad_constraint_is_one_line_exit_2(smollm2_path: Path, args, words) -> None:
    proc = _run("-m", str(smollm2_path), *args, "hi")
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and words in lines[0], proc.stderr
