"""Tool calling end to end with the real SmolLM2-135M: the official openai client against the
live server on 127.0.0.1 (SmolLM2's own template: the generic JSON format), and llama.cpp's
Qwen 2.5 (Hermes `<tool_call>`), Llama 3.2 (JSON) and Mistral Nemo (`[TOOL_CALLS]`) templates
in process. With tool_choice "required" or a named function, every sampled output must parse
into valid calls (arguments checked with jsonschema, the oracle)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import jsonschema
import numpy as np
import openai
import pytest
import torch
from live_server import Server
from tool_specs import TOOLS

from llamapy.api import LLM
from llamapy.sampling.params import SamplingParams
from llamapy.server.tools import ToolFormat, ToolPlan, parse_tool_calls, special_token_lookup
from llamapy.tokenizer import ChatTemplate
from testdata import llama_cpp_sdist

pytestmark = pytest.mark.models

SCHEMAS = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
ASK = [{"role": "user", "content": "What is the weather in Paris? Also, what is 17 + 25?"}]
MAX_TOKENS = 160  # a call of these tools takes ~30 tokens; room for a long city name


@pytest.fixture(scope="module")
def client(server: Server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", timeout=300)


@pytest.fixture(scope="module")
def model(server: Server) -> str:
    return server.model_name()


@pytest.fixture
def seed(rng: np.random.Generator) -> int:
    return int(rng.integers(0, 2**31))


def assert_valid_calls(message: Any, names: set[str], *, at_most_one: bool = True) -> None:
    calls = message.tool_calls or []
    assert calls, f"no tool call parsed from {message.content!r}"
    if at_most_one:
        assert len(calls) == 1
    assert len({c.id for c in calls}) == len(calls)
    for call in calls:
        assert call.type == "function" and call.id
        assert call.function.name in names
        jsonschema.validate(json.loads(call.function.arguments), SCHEMAS[call.function.name])


def assert_forced_choices(choices: list[Any], names: set[str], *, at_most_one: bool = True):
    """Every choice that ended by itself is a valid call: the grammar guarantees it. A string
    argument has no length bound, and this 135M model sampled at temperature 1 now and then
    loops inside one until max_tokens (4 of 1152 samples over the four formats); a call
    cut short is no call, so such a choice comes back as text with finish_reason "length".
    At most one of a request's choices may end so, and it must have followed the grammar."""
    truncated = 0
    for choice in choices:
        if choice.finish_reason == "length":
            truncated += 1
            assert not choice.message.tool_calls
            assert choice.message.content.startswith('{"tool_call'), choice.message.content
            continue
        assert choice.finish_reason == "tool_calls"
        assert choice.message.content is None
        assert_valid_calls(choice.message, names, at_most_one=at_most_one)
    assert truncated <= 1, [c.message.content for c in choices]


# --- the model's own template: the generic JSON format -----------------------------------------


@pytest.mark.parametrize(
    ("tool_choice", "names"),
    [
        ("required", {"get_weather", "add"}),
        ({"type": "function", "function": {"name": "add"}}, {"add"}),
    ],
    ids=["required", "named-add"],
)
def test_forced_tool_choice_always_gives_a_valid_call(client, model, seed, tool_choice, names):
    r = client.chat.completions.create(
        model=model,
        messages=ASK,
        tools=TOOLS,
        tool_choice=tool_choice,
        n=5,
        temperature=1.0,
        seed=seed,
        max_tokens=MAX_TOKENS,
    )
    assert len(r.choices) == 5
    assert_forced_choices(r.choices, names)


def test_parallel_calls(client, model, seed):
    r = client.chat.completions.create(
        model=model,
        messages=ASK,
        tools=TOOLS,
        tool_choice="required",
        parallel_tool_calls=True,
        n=4,
        temperature=1.0,
        seed=seed,
        max_tokens=2 * MAX_TOKENS,
    )
    assert_forced_choices(r.choices, {"get_weather", "add"}, at_most_one=False)


def test_stream_rebuilds_the_calls(client, model):
    kwargs = {
        "model": model,
        "messages": ASK,
        "tools": TOOLS,
        "tool_choice": "required",
        "parallel_tool_calls": True,
        "temperature": 0.0,
        "max_tokens": 2 * MAX_TOKENS,
    }
    whole = client.chat.completions.create(**kwargs).choices[0]
    with client.chat.completions.stream(**kwargs) as stream:
        events = [e.type for e in stream]
        streamed = stream.get_final_completion().choices[0]
    assert streamed.finish_reason == whole.finish_reason == "tool_calls"
    got = [(c.function.name, c.function.arguments) for c in streamed.message.tool_calls]
    want = [(c.function.name, c.function.arguments) for c in whole.message.tool_calls]
    assert got == want
    assert "tool_calls.function.arguments.done" in events
    assert not streamed.message.content


def test_auto_gives_a_call_or_a_reply(client, model, seed):
    r = client.chat.completions.create(
        model=model,
        messages=ASK,
        tools=TOOLS,
        n=4,
        temperature=1.0,
        seed=seed,
        max_tokens=MAX_TOKENS,
    )
    for choice in r.choices:
        if choice.message.tool_calls:
            assert choice.finish_reason == "tool_calls"
            assert_valid_calls(choice.message, {"get_weather", "add"})
        else:
            assert choice.finish_reason in ("stop", "length")
            assert isinstance(choice.message.content, str)


def test_tool_choice_none_answers_in_text(client, model, seed):
    r = client.chat.completions.create(
        model=model, messages=ASK, tools=TOOLS, tool_choice="none", seed=seed, max_tokens=24
    )
    choice = r.choices[0]
    assert not choice.message.tool_calls and choice.message.content
    assert choice.finish_reason in ("stop", "length")


def test_history_with_calls_and_results(client, model, seed):
    answer = client.chat.completions.create(
        model=model,
        messages=ASK,
        tools=TOOLS,
        tool_choice={"type": "function", "function": {"name": "add"}},
        temperature=0.0,
        max_tokens=MAX_TOKENS,
    )
    first = answer.choices[0]
    call = first.message.tool_calls[0]
    args = json.loads(call.function.arguments)
    history = [
        *ASK,
        first.message.model_dump(exclude_none=True),  # as a client sends it back
        {"role": "tool", "tool_call_id": call.id, "content": str(args["a"] + args["b"])},
    ]
    r = client.chat.completions.create(
        model=model, messages=history, tools=TOOLS, seed=seed, max_tokens=MAX_TOKENS
    )
    assert r.choices[0].finish_reason in ("stop", "length", "tool_calls")
    # the call and its result are in the prompt
    assert r.usage.prompt_tokens > answer.usage.prompt_tokens + answer.usage.completion_tokens


# --- bad requests: 400 in OpenAI's error JSON, naming the problem --------------------------------

BAD = [
    ({"tools": [{"type": "function", "function": {"description": "x"}}]},
     "tools[0].function.name", "tools[0].function.name"),
    ({"tools": [{"type": "code_interpreter"}]},
     "tools[0].type must be 'function'", "tools[0].type"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {"x": {"type": "bogus"}}}}}]},
     "tools[0].function.parameters is not a usable JSON Schema", "tools[0].function.parameters"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": [1]}}]},
     "tools[0].function.parameters must be a JSON Schema object", "tools[0].function.parameters"),
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "fly"}}},
     "unknown function 'fly'", "tool_choice"),
    ({"tools": TOOLS, "tool_choice": "always"}, "tool_choice must be 'auto'", "tool_choice"),
    ({"tool_choice": "required"}, "tool_choice 'required' needs tools", "tool_choice"),
    ({"tools": TOOLS, "tool_choice": "required",
      "response_format": {"type": "json_object"}}, "cannot be combined with tools", "tool_choice"),
    ({"tools": TOOLS, "messages": [*ASK, {"role": "assistant", "tool_calls": [{"id": "1"}]}]},
     "messages[1].tool_calls[0].function must be an object", "messages[1].tool_calls[0]"),
]  # fmt: skip


@pytest.mark.parametrize(("extra", "message", "param"), BAD)
def test_bad_tools_are_a_400(server: Server, model: str, extra: dict, message: str, param: str):
    body = {"model": model, "messages": ASK, "max_tokens": 4, **extra}
    r = httpx.post(f"{server.url}/v1/chat/completions", json=body, timeout=60)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert message in error["message"] and error["type"] == "invalid_request_error"
    assert error["param"] == param


def test_openai_client_sees_the_400(client, model):
    with pytest.raises(openai.BadRequestError, match="unknown function 'fly'"):
        client.chat.completions.create(
            model=model,
            messages=ASK,
            tools=TOOLS,
            tool_choice={"type": "function", "function": {"name": "fly"}},
        )


# --- llama.cpp's templates of tool-calling models: their own formats ---------------------------
# In process (LLM.generate), as the server runs a request: a server per template would cost a
# model load each. The wrappers (<tool_call>, [TOOL_CALLS]) are plain text to SmolLM2's
# tokenizer, so the grammar spells them out.

NATIVE = {
    ToolFormat.HERMES: "Qwen-Qwen2.5-7B-Instruct.jinja",
    ToolFormat.LLAMA3: "meta-llama-Llama-3.2-3B-Instruct.jinja",
    ToolFormat.MISTRAL: "mistralai-Mistral-Nemo-Instruct-2407.jinja",
}


OPENING = {ToolFormat.HERMES: "<tool_call>\n{", ToolFormat.LLAMA3: '{"name": "',
           ToolFormat.MISTRAL: '[TOOL_CALLS][{"name": "'}  # fmt: skip


@pytest.fixture(scope="module")
def llm(smollm2_path: Path) -> Iterator[LLM]:
    threads = torch.get_num_threads()
    # one thread, as the test server: CI machines are shared, and threads fight there
    yield LLM(str(smollm2_path), n_ctx=1024, max_num_seqs=8, n_threads=1)
    torch.set_num_threads(threads)


def generate_calls(llm: LLM, fmt: ToolFormat, tool_choice: Any, n: int, seed: int):
    """What /v1/chat/completions does with the template of `fmt`, for n samples at
    llama.cpp's default temperature (0.8: these templates are foreign to SmolLM2, which
    loops inside a string argument more often under them, ~1 in 60 samples at 1.0)."""
    source = (llama_cpp_sdist() / "models/templates" / NATIVE[fmt]).read_text(encoding="utf-8")
    template = ChatTemplate(source, bos_token="<|im_start|>", eos_token="<|im_end|>")
    plan = ToolPlan.build(TOOLS, tool_choice, template)
    assert plan.format is fmt
    msgs, tools = plan.render_inputs(ASK)
    text = template.render(msgs, tools=tools, add_generation_prompt=True)
    ids = llm.tokenizer.encode(text, add_special=False, parse_special=True)
    constraint = plan.constraint(special_token_lookup(llm.tokenizer))
    params = [
        SamplingParams(temperature=0.8, seed=seed + i, max_tokens=MAX_TOKENS, **constraint)
        for i in range(n)
    ]
    outs = llm.generate([ids] * n, params)
    return plan, [(o, parse_tool_calls(o.text, fmt, plan.names, plan.new_id)) for o in outs]


@pytest.mark.parametrize("fmt", list(NATIVE))
def test_native_format_forced_calls_are_valid(llm: LLM, fmt: ToolFormat, seed: int):
    for tool_choice, names in (
        ("required", {"get_weather", "add"}),
        ({"type": "function", "function": {"name": "get_weather"}}, {"get_weather"}),
    ):
        plan, results = generate_calls(llm, fmt, tool_choice, 4, seed)
        assert plan.constraint()  # the grammar with the format's wrapper
        truncated = [out.text for out, _ in results if out.finish_reason == "length"]
        assert len(truncated) <= 1, truncated  # as assert_forced_choices, for the same reason
        for out, parsed in results:
            if out.finish_reason == "length":
                assert not parsed.tool_calls and parsed.content == out.text
                assert out.text.startswith(OPENING[fmt]), out.text  # the grammar held
                continue
            assert out.finish_reason == "stop", out.text  # the grammar completed
            calls = parsed.tool_calls
            assert len(calls) == 1, out.text
            assert calls[0]["function"]["name"] in names
            args = json.loads(calls[0]["function"]["arguments"])
            jsonschema.validate(args, SCHEMAS[calls[0]["function"]["name"]])
            if fmt is ToolFormat.MISTRAL:  # the model writes the 9-character ids it needs
                assert len(calls[0]["id"]) == 9 and calls[0]["id"] in out.text
