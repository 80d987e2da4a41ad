"""Tool calling without a server: format detection, rendering through real chat templates
(against transformers' renderer), the parsers on hand-written outputs, streaming deltas
(rebuilt by the official openai client's accumulator), request validation, and the decoding
constraints (checked token by token with llguidance over SmolLM2's vocabulary)."""

from __future__ import annotations

import copy
import functools
import json
import string
from pathlib import Path
from typing import Any

import jsonschema
import numpy as np
import pytest
from tool_specs import TOOLS, WEATHER

from llamapy.server.tools import (
    GENERIC_AUTO_PROMPT,
    GENERIC_REQUIRED_PROMPT,
    TOOLS_PROMPT,
    ToolCallStreamer,
    ToolError,
    ToolFormat,
    ToolPlan,
    detect_tool_format,
    parse_tool_calls,
    parse_tool_choice,
    validate_tools,
)
from llamapy.tokenizer import ChatTemplate
from testdata import llama_cpp_sdist

BOS, EOS = "<s>", "</s>"

# llama.cpp's models/templates files, by the format their template selects
SDIST_TEMPLATES = {
    "hermes-2-pro": ("NousResearch-Hermes-2-Pro-Llama-3-8B-tool_use.jinja", ToolFormat.HERMES),
    "hermes-3": ("NousResearch-Hermes-3-Llama-3.1-8B-tool_use.jinja", ToolFormat.HERMES),
    "qwen2.5": ("Qwen-Qwen2.5-7B-Instruct.jinja", ToolFormat.HERMES),
    "llama-3.1": ("meta-llama-Llama-3.1-8B-Instruct.jinja", ToolFormat.LLAMA3),
    "llama-3.2": ("meta-llama-Llama-3.2-3B-Instruct.jinja", ToolFormat.LLAMA3),
    "llama-3.3": ("meta-llama-Llama-3.3-70B-Instruct.jinja", ToolFormat.LLAMA3),
    "mistral-nemo": ("mistralai-Mistral-Nemo-Instruct-2407.jinja", ToolFormat.MISTRAL),
    "gemma-2": ("google-gemma-2-2b-it.jinja", ToolFormat.GENERIC),
    "phi-3.5": ("microsoft-Phi-3.5-mini-instruct.jinja", ToolFormat.GENERIC),
    "functionary-3.1": ("meetkai-functionary-medium-v3.1.jinja", ToolFormat.GENERIC),
}
NATIVE = ["hermes-2-pro", "hermes-3", "qwen2.5", "llama-3.1", "llama-3.2", "mistral-nemo"]
SINGLE_CALL_ONLY = {"llama-3.1", "llama-3.2", "llama-3.3"}  # their templates refuse two calls

NAMES = ["get_weather", "add"]


@functools.cache
def sdist_template(key: str) -> ChatTemplate:
    name, _ = SDIST_TEMPLATES[key]
    source = (llama_cpp_sdist() / "models/templates" / name).read_text(encoding="utf-8")
    return ChatTemplate(source, bos_token=BOS, eos_token=EOS)


@pytest.fixture(scope="module")
def smollm2_template(smollm2_path: Path) -> ChatTemplate:
    from llamapy.formats import open_model_file

    source = open_model_file(smollm2_path).chat_template
    assert source is not None
    return ChatTemplate(source, bos_token="<|im_start|>", eos_token="<|im_end|>")


def hf_render(template: ChatTemplate, messages: list[dict[str, Any]], **kwargs: Any) -> str:
    """transformers' `apply_chat_template(messages, tokenize=False, ...)` for the template."""
    ctu = pytest.importorskip("transformers.utils.chat_template_utils")
    normalize = getattr(ctu, "_normalize_chat_messages", lambda chat: chat)
    rendered, _ = ctu.render_jinja_template(
        conversations=[normalize(copy.deepcopy(messages))],
        chat_template=template.source,
        bos_token=template.bos_token,
        eos_token=template.eos_token,
        **kwargs,
    )
    return rendered[0]


def render(plan: ToolPlan, template: ChatTemplate, messages: list[dict[str, Any]]) -> str:
    msgs, tools = plan.render_inputs(messages)
    return template.render(msgs, tools=tools, add_generation_prompt=True)


# --- random conversations --------------------------------------------------------------------


def random_text(rng: np.random.Generator, n: int = 8) -> str:
    alphabet = string.ascii_letters + "äöüßé 'çñ"
    return "".join(rng.choice(list(alphabet), size=n)).strip() or "x"


def random_id(rng: np.random.Generator) -> str:
    return "".join(rng.choice(list(string.ascii_letters + string.digits), size=9))


def random_calls(rng: np.random.Generator, parallel: bool) -> list[dict[str, Any]]:
    """Calls as dicts (name, arguments as objects) with random argument values."""
    calls = [{"id": random_id(rng), "name": "get_weather", "arguments": {"city": random_text(rng)}}]
    if parallel:
        a, b = (int(x) for x in rng.integers(-1000, 1000, size=2))
        calls.append({"id": random_id(rng), "name": "add", "arguments": {"a": a, "b": b}})
    return calls


def openai_conversation(calls: list[dict[str, Any]], rng: np.random.Generator) -> list[dict]:
    """A conversation as an OpenAI client sends it: content None beside the calls,
    arguments as JSON strings, tool results with tool_call_id and name."""
    assistant_calls = [
        {
            "id": c["id"],
            "type": "function",
            "function": {"name": c["name"], "arguments": json.dumps(c["arguments"])},
        }
        for c in calls
    ]
    results = [
        {
            "role": "tool",
            "tool_call_id": c["id"],
            "name": c["name"],
            "content": json.dumps({"result": random_text(rng)}, ensure_ascii=False),
        }
        for c in calls
    ]
    return [
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": f"Weather in {calls[0]['arguments']['city']}?"},
        {"role": "assistant", "content": None, "tool_calls": assistant_calls},
        *results,
        {"role": "assistant", "content": f"It is {random_text(rng)}."},
        {"role": "user", "content": "Thanks! And tomorrow?"},
    ]


def canonical_conversation(openai_msgs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The same conversation as transformers' docs write it: arguments as dicts, content ""."""
    out = copy.deepcopy(openai_msgs)
    for m in out:
        if m.get("tool_calls"):
            m["content"] = ""
            for c in m["tool_calls"]:
                c["function"]["arguments"] = json.loads(c["function"]["arguments"])
    return out


# --- format detection ------------------------------------------------------------------------


@pytest.mark.parametrize("key", sorted(SDIST_TEMPLATES))
def test_detect_format(key: str) -> None:
    assert detect_tool_format(sdist_template(key).source) is SDIST_TEMPLATES[key][1]


def test_smollm2_template_is_generic_without_tool_support(smollm2_template) -> None:
    plan = ToolPlan.build(TOOLS, None, smollm2_template)
    assert plan is not None and plan.format is ToolFormat.GENERIC
    assert not plan.caps.tools and not plan.caps.tool_calls and plan.caps.system_role


# --- rendering: native templates against transformers ----------------------------------------


@pytest.mark.parametrize(
    ("key", "parallel"),
    [
        (key, parallel)
        for key in NATIVE
        for parallel in (False, True)
        if not (parallel and key in SINGLE_CALL_ONLY)
    ],  # fmt: skip
)
def test_native_template_renders_as_transformers(
    key: str, parallel: bool, rng: np.random.Generator
) -> None:
    template = sdist_template(key)
    plan = ToolPlan.build(TOOLS, "auto", template, parallel)
    assert plan is not None and plan.caps.tools and plan.caps.tool_calls
    msgs = openai_conversation(random_calls(rng, parallel), rng)
    ours = render(plan, template, msgs)
    expected = hf_render(
        template, canonical_conversation(msgs), tools=TOOLS, add_generation_prompt=True
    )
    assert ours == expected
    for m in msgs[2:4]:  # the calls and results are in the prompt
        for call in m.get("tool_calls", []):
            assert call["function"]["name"] in ours
        if m["role"] == "tool":
            assert json.loads(m["content"])["result"] in ours


@pytest.mark.parametrize("key", NATIVE)
def test_tool_choice_none_renders_tools_but_parses_nothing(key: str) -> None:
    template = sdist_template(key)
    plan = ToolPlan.build(TOOLS, "none", template)
    assert plan is not None and not plan.parses and plan.constraint() == {}
    msgs = [{"role": "user", "content": "Hi"}]
    assert render(plan, template, msgs) == hf_render(
        template, msgs, tools=TOOLS, add_generation_prompt=True
    )


# --- rendering: templates without tool support (the generic polyfill) -------------------------


def polyfilled_system(plan_parallel: bool, forced: bool) -> str:
    """The system text of the generic format, written out (minja's and llama.cpp's words)."""
    example = (
        '{"tool_calls": [{"name": "tool_name", "arguments": {"arg1": "some_value"}}]}'
        if plan_parallel
        else '{"tool_call": {"name": "tool_name", "arguments": {"arg1": "some_value"}}}'
    )
    rule = (
        "Respond in JSON format with `tool_call` (a request to call tools)"
        if forced
        else "Respond in JSON format, either with `tool_call` (a request to call tools) or "
        "with `response` reply to the user's request"
    )
    tools = json.dumps(TOOLS, ensure_ascii=False, indent=2)
    return (
        f"You can call any of the following tools to satisfy the user's requests: {tools}"
        f"\n\nExample tool call syntax:\n\n{example}\n\n{rule}"
    )


def polyfilled_conversation(
    msgs: list[dict[str, Any]], calls: list[dict[str, Any]], parallel: bool
) -> list[dict[str, Any]]:
    """What a template without tool support is given, written by hand: the system text
    extended, the calls as JSON content, the results as user messages."""
    entries = [{"name": c["name"], "arguments": c["arguments"]} for c in calls]
    body = {"tool_calls": entries} if parallel else {"tool_call": entries[0]}
    responses = [
        {"tool": m["name"], "content": m["content"], "tool_call_id": m["tool_call_id"]}
        for m in msgs
        if m["role"] == "tool"
    ]
    # the results of one turn's calls are one user message
    text = "\n".join(
        json.dumps({"tool_response": r}, ensure_ascii=False, indent=2) for r in responses
    )
    results = [{"role": "user", "content": text}]
    system = msgs[0]["content"] + "\n\n" + polyfilled_system(parallel, forced=False)
    return [
        {"role": "system", "content": system},
        msgs[1],
        {"role": "assistant", "content": json.dumps(body, ensure_ascii=False)},
        *results,
        *msgs[2 + 1 + len(calls) :],
    ]


@pytest.mark.parametrize("parallel", [False, True], ids=["one-call", "two-calls"])
def test_smollm2_polyfill_renders_as_transformers(
    smollm2_template: ChatTemplate, parallel: bool, rng: np.random.Generator
) -> None:
    plan = ToolPlan.build(TOOLS, "auto", smollm2_template, parallel)
    calls = random_calls(rng, parallel)
    msgs = openai_conversation(calls, rng)
    expected_msgs = polyfilled_conversation(msgs, calls, parallel)
    # SmolLM2's template shows the "tool" role as is: results stay tool messages
    expected_msgs = [
        m for m in expected_msgs if m["role"] != "user" or "tool_response" not in m["content"]
    ]  # noqa: E501
    at = next(i for i, m in enumerate(expected_msgs) if m["role"] == "assistant") + 1
    expected_msgs[at:at] = [m for m in msgs if m["role"] == "tool"]
    ours = render(plan, smollm2_template, msgs)
    assert ours == hf_render(smollm2_template, expected_msgs, add_generation_prompt=True)
    assert "get_weather" in ours and "Respond in JSON format" in ours


@pytest.mark.parametrize("parallel", [False, True], ids=["one-call", "two-calls"])
def test_gemma_polyfill_renders_as_transformers(parallel: bool, rng: np.random.Generator) -> None:
    # Gemma's template has no system role and no tool role: both polyfilled
    template = sdist_template("gemma-2")
    plan = ToolPlan.build(TOOLS, "auto", template, parallel)
    assert plan is not None and not plan.caps.system_role and not plan.caps.tool_responses
    calls = random_calls(rng, parallel)
    msgs = openai_conversation(calls, rng)
    expected_msgs = polyfilled_conversation(msgs, calls, parallel)
    system = expected_msgs.pop(0)["content"]
    expected_msgs[0] = {**expected_msgs[0], "content": system + "\n" + msgs[1]["content"]}
    ours = render(plan, template, msgs)
    assert ours == hf_render(template, expected_msgs, add_generation_prompt=True)


def test_generic_forced_prompt_asks_for_a_call(smollm2_template: ChatTemplate) -> None:
    plan = ToolPlan.build(TOOLS, "required", smollm2_template)
    msgs, tools = plan.render_inputs([{"role": "user", "content": "Hi"}])
    assert tools is None and msgs[0]["role"] == "system"
    assert msgs[0]["content"] == polyfilled_system(False, forced=True)
    assert GENERIC_REQUIRED_PROMPT in msgs[0]["content"]
    assert GENERIC_AUTO_PROMPT not in msgs[0]["content"] and TOOLS_PROMPT in msgs[0]["content"]


# --- parsers -----------------------------------------------------------------------------------

GOOD = {
    ToolFormat.HERMES: [
        ('<tool_call>\n{"name": "add", "arguments": {"a": 1, "b": 2}}\n</tool_call>', None,
         [("add", {"a": 1, "b": 2})]),
        ('Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Zürich"}}'
         '\n</tool_call>\n<tool_call>\n{"name": "add", "arguments": {"a": 3, "b": 4}}\n'
         "</tool_call>", "Let me check.",
         [("get_weather", {"city": "Zürich"}), ("add", {"a": 3, "b": 4})]),
        ('<tool_call>{"name": "add", "arguments": "{\\"a\\": 5, \\"b\\": 6}"}', None,
         [("add", {"a": 5, "b": 6})]),  # arguments as a string; no closing tag at the end
        ("Just text, no call.", "Just text, no call.", []),
        # the tags are control tokens in some vocabularies, so not in the text
        ('{"name": "add", "arguments": {"a": 1, "b": 2}}\n{"name": "add", "arguments": '
         '{"a": 2, "b": 1}}', None, [("add", {"a": 1, "b": 2}), ("add", {"a": 2, "b": 1})]),
        ('{"answer": 42}', '{"answer": 42}', []),
    ],
    ToolFormat.LLAMA3: [
        ('{"name": "add", "parameters": {"a": 1, "b": 2}}', None, [("add", {"a": 1, "b": 2})]),
        ('<|python_tag|>{"type": "function", "name": "get_weather", "parameters": '
         '{"city": "Oslo"}}', None, [("get_weather", {"city": "Oslo"})]),
        ('Sure: {"name": "add", "parameters": {"a": 1, "b": 2}}; {"name": "add", '
         '"arguments": {"a": 3, "b": 4}}', "Sure:", [("add", {"a": 1, "b": 2}),
                                                      ("add", {"a": 3, "b": 4})]),
        ("The set {1, 2} has two elements.", "The set {1, 2} has two elements.", []),
    ],
    ToolFormat.MISTRAL: [
        ('[TOOL_CALLS][{"name": "add", "arguments": {"a": 1, "b": 2}, "id": "abcDEF123"}]',
         None, [("add", {"a": 1, "b": 2})]),
        ('[{"name": "get_weather", "arguments": {"city": "Rome"}}, {"name": "add", '
         '"arguments": {"a": 0, "b": 0}}]', None,  # [TOOL_CALLS] is a control token: hidden
         [("get_weather", {"city": "Rome"}), ("add", {"a": 0, "b": 0})]),
        ("[1, 2, 3] is a list.", "[1, 2, 3] is a list.", []),
    ],
    ToolFormat.GENERIC: [
        ('{"tool_call": {"name": "add", "arguments": {"a": 1, "b": 2}}}', None,
         [("add", {"a": 1, "b": 2})]),
        ('{"tool_calls": [{"name": "add", "arguments": {"a": 1, "b": 2}, "id": "x1y2"}, '
         '{"name": "get_weather", "arguments": {"city": "Lima"}}]}', None,
         [("add", {"a": 1, "b": 2}), ("get_weather", {"city": "Lima"})]),
        ('```json\n{"tool_call": {"name": "get_weather", "arguments": {"city": "Kyiv"}}}\n```',
         None, [("get_weather", {"city": "Kyiv"})]),
        ('{"response": "Hello there!"}', "Hello there!", []),
        ('{"response": "Cut short by max_tok', "Cut short by max_tok", []),
        ('{"response": "Smile \\ud83d\\ude00 \\u00e4\\n\\"q\\""}', 'Smile 😀 ä\n"q"', []),
        ('{"response": "lone \\ud83d half"}', "lone \ufffd half", []),  # must encode as UTF-8
        ("Plain words.", "Plain words.", []),
    ],
}  # fmt: skip

MALFORMED = {
    ToolFormat.HERMES: [
        '<tool_call>\n{"name": "add", "arguments": {"a": 1,}}\n</tool_call>',  # bad JSON
        '<tool_call>\n{"name": "rm_rf", "arguments": {}}\n</tool_call>',  # unknown function
        '<tool_call>\n{"arguments": {"a": 1}}\n</tool_call>',  # no name
        '<tool_call>\n{"name": "add", "arguments": [1, 2]}\n</tool_call>',  # not an object
        '<tool_call>\n{"name": "add", "arguments": {"a": 1}}\n</tool_call> and then text',
        '<tool_call>\n{"name": "add", "arguments": {"a": 1}} trailing\n</tool_call>',
        "<tool_call>\n",
        '{"name": "add", "arguments": {"a": 1, "b": 2}} and words',
    ],
    ToolFormat.LLAMA3: [
        '{"name": "add", "parameters": {"a": 1, "b": 2}',  # unclosed
        '{"name": "nope", "parameters": {}}',
        '<|python_tag|>print("hi")',
        '{"name": "add", "parameters": {"a": 1}} extra words',
    ],
    ToolFormat.MISTRAL: [
        '[TOOL_CALLS][{"name": "add", "arguments": {"a": 1}',
        '[TOOL_CALLS]{"name": "add", "arguments": {"a": 1}}',  # not a list
        "[TOOL_CALLS][]",
        '[{"name": "unknown", "arguments": {}}]',
    ],
    ToolFormat.GENERIC: [
        '{"tool_call": {"name": "unknown", "arguments": {}}}',
        '{"tool_call": {"name": "add", "arguments": "not json"}}',
        '{"tool_calls": []}',
        '{"tool_call": "add"}',
    ],
}


def assert_calls(parsed, expected: list[tuple[str, dict]]) -> None:
    got = [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in parsed]
    assert got == expected
    for c in parsed:
        assert c["type"] == "function" and isinstance(c["id"], str) and c["id"]
        assert isinstance(c["function"]["arguments"], str)
    assert len({c["id"] for c in parsed}) == len(parsed)


@pytest.mark.parametrize(
    ("fmt", "text", "content", "calls"),
    [(fmt, *case) for fmt, cases in GOOD.items() for case in cases],
)
def test_parse(fmt: ToolFormat, text: str, content: str | None, calls: list) -> None:
    parsed = parse_tool_calls(text, fmt, NAMES)
    assert parsed.content == content
    assert_calls(parsed.tool_calls, calls)


@pytest.mark.parametrize(
    ("fmt", "text"), [(fmt, text) for fmt, texts in MALFORMED.items() for text in texts]
)
def test_malformed_output_is_content(fmt: ToolFormat, text: str) -> None:
    parsed = parse_tool_calls(text, fmt, NAMES)
    assert parsed.tool_calls == [] and parsed.content == text


def test_model_given_ids_are_kept_and_new_ids_follow_the_format() -> None:
    text = '[TOOL_CALLS][{"name": "add", "arguments": {"a": 1, "b": 2}, "id": "abcDEF123"}]'
    assert parse_tool_calls(text, ToolFormat.MISTRAL, NAMES).tool_calls[0]["id"] == "abcDEF123"
    plan = ToolPlan.build(TOOLS, None, sdist_template("mistral-nemo"))
    text = '[TOOL_CALLS][{"name": "add", "arguments": {"a": 1, "b": 2}}]'
    new = parse_tool_calls(text, plan.format, plan.names, plan.new_id).tool_calls[0]["id"]
    assert len(new) == 9 and new.isalnum()  # Mistral's templates insist on 9 alphanumerics
    hermes = ToolPlan.build(TOOLS, None, sdist_template("qwen2.5"))
    assert hermes.new_id().startswith("call_")


# --- streaming ---------------------------------------------------------------------------------


def random_pieces(text: str, rng: np.random.Generator) -> list[str]:
    cuts = sorted(set(int(x) for x in rng.integers(0, len(text) + 1, size=len(text) // 3 + 1)))
    bounds = [0, *cuts, len(text)]
    return [text[a:b] for a, b in zip(bounds, bounds[1:], strict=False)]


def stream_chunks(
    plan: ToolPlan, pieces: list[str]
) -> tuple[list[dict], ToolCallStreamer, list[dict]]:
    """The chat.completion.chunk bodies a streamed choice gets (as the server sends them)."""
    streamer = ToolCallStreamer(plan)
    base = {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 0, "model": "m"}
    chunks = [{**base, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]}]
    live = []
    for i, piece in enumerate(pieces):
        deltas = streamer.feed(piece)
        live += deltas
        if i == len(pieces) - 1:
            deltas += streamer.finish()
        chunks += [{**base, "choices": [{"index": 0, "delta": d}]} for d in deltas]
    reason = "tool_calls" if streamer.has_calls else "stop"
    chunks.append({**base, "choices": [{"index": 0, "delta": {}, "finish_reason": reason}]})
    return chunks, streamer, live


def openai_accumulate(chunks: list[dict]) -> Any:
    """The official client's stream accumulation (what `client.chat.completions.stream`
    builds the final completion with)."""
    from openai.lib.streaming.chat import ChatCompletionStreamState
    from openai.types.chat import ChatCompletionChunk

    state = ChatCompletionStreamState()
    for chunk in chunks:
        state.handle_chunk(ChatCompletionChunk.model_validate(chunk))
    return state.get_final_completion().choices[0]


FORMAT_TEMPLATE = {
    ToolFormat.HERMES: "qwen2.5",
    ToolFormat.LLAMA3: "llama-3.2",
    ToolFormat.MISTRAL: "mistral-nemo",
    ToolFormat.GENERIC: "gemma-2",
}


@pytest.mark.parametrize(
    ("fmt", "text"),
    [(fmt, case[0]) for fmt, cases in GOOD.items() for case in cases]
    + [(fmt, text) for fmt, texts in MALFORMED.items() for text in texts],
)
def test_stream_rebuilds_the_message(fmt: ToolFormat, text: str, rng: np.random.Generator):
    plan = ToolPlan.build(TOOLS, "auto", sdist_template(FORMAT_TEMPLATE[fmt]), True)
    assert plan.format is fmt
    chunks, streamer, live = stream_chunks(plan, random_pieces(text, rng))
    whole = parse_tool_calls(text, fmt, NAMES)
    choice = openai_accumulate(chunks)
    assert (choice.message.content or None) == (whole.content or None)
    got = [(c.function.name, c.function.arguments) for c in choice.message.tool_calls or []]
    want = [(c["function"]["name"], c["function"]["arguments"]) for c in whole.tool_calls]
    assert got == want
    assert choice.finish_reason == ("tool_calls" if want else "stop")
    # OpenAI's shape: per call, a delta with index, id, type and name, then its arguments
    call_deltas = [c["choices"][0]["delta"]["tool_calls"][0] for c in chunks
                   if "tool_calls" in c["choices"][0]["delta"]]  # fmt: skip
    for index in range(len(want)):
        first, *rest = [d for d in call_deltas if d["index"] == index]
        assert first["id"] and first["type"] == "function"
        assert first["function"]["name"] == want[index][0]
        assert all("name" not in d["function"] and "id" not in d for d in rest)
    # content before the calls streams before the end
    if whole.tool_calls and whole.content:
        assert "".join(d.get("content", "") for d in live) == whole.content


def test_generic_reply_streams_as_it_is_written() -> None:
    plan = ToolPlan.build(TOOLS, "auto", sdist_template("gemma-2"))
    streamer = ToolCallStreamer(plan)
    assert streamer.feed('{"resp') == []  # may still be a call
    assert streamer.feed('onse": "Hi \\u00') == [{"content": "Hi "}]  # half an escape held
    assert streamer.feed("e4 \\ud83d") == [{"content": "ä "}]  # half a surrogate pair held
    assert streamer.feed('\\ude00!"}') == [{"content": "😀!"}]
    assert streamer.finish() == [] and streamer.parsed.content == "Hi ä 😀!"


def test_stream_holds_a_partial_marker(rng: np.random.Generator) -> None:
    plan = ToolPlan.build(TOOLS, "auto", sdist_template("qwen2.5"))
    streamer = ToolCallStreamer(plan)
    assert streamer.feed("Checking <tool") == [{"content": "Checking"}]
    assert streamer.feed("_ca") == []
    assert streamer.feed("r is not a tag") == [{"content": " <tool_car is not a tag"}]
    assert streamer.finish() == [] and not streamer.has_calls


# --- request validation ------------------------------------------------------------------------

BAD_TOOLS = [
    ({"type": "function"}, "tools must be a list"),
    (["get_weather"], "tools[0] must be an object"),
    ([{"type": "retrieval"}], "tools[0].type must be 'function'"),
    ([{"type": "function"}], "tools[0].function must be an object with a 'name'"),
    ([{"type": "function", "function": {"description": "no name"}}], "tools[0].function.name"),
    ([{"type": "function", "function": {"name": "has space"}}], "tools[0].function.name"),
    ([{"type": "function", "function": {"name": "x" * 65}}], "tools[0].function.name"),
    ([WEATHER, WEATHER], "two tools are named 'get_weather'"),
    ([{"type": "function", "function": {"name": "f", "parameters": "a string"}}],
     "tools[0].function.parameters must be a JSON Schema object"),
    ([{"type": "function", "function": {"name": "f", "parameters": {"type": "array"}}}],
     "must describe an object"),
    ([{"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {"a": {"type": "no-such-type"}}}}}],
     "tools[0].function.parameters is not a usable JSON Schema"),
    ([{"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {"a": {"$ref": "#/$defs/missing"}}}}}],
     "tools[0].function.parameters is not a usable JSON Schema"),
]  # fmt: skip


@pytest.mark.parametrize(("tools", "message"), BAD_TOOLS)
def test_malformed_tools_are_refused(tools: Any, message: str) -> None:
    with pytest.raises(ToolError, match=None) as e:
        validate_tools(tools)
    assert message in str(e.value)
    assert e.value.param.startswith("tools")


@pytest.mark.parametrize(
    ("choice", "tools", "message"),
    [
        ({"type": "function", "function": {"name": "nope"}}, TOOLS, "unknown function 'nope'"),
        ("sometimes", TOOLS, "tool_choice must be 'auto', 'none', 'required'"),
        ({"type": "function"}, TOOLS, "tool_choice must name a function"),
        ({"type": "retrieval", "function": {"name": "add"}}, TOOLS, "must name a function"),
        ("required", [], "tool_choice 'required' needs tools"),
        ({"type": "function", "function": {"name": "add"}}, [], "no tools were given"),
    ],
)
def test_bad_tool_choice_is_refused(choice: Any, tools: list, message: str) -> None:
    with pytest.raises(ToolError) as e:
        parse_tool_choice(choice, validate_tools(tools))
    assert message in str(e.value) and e.value.param == "tool_choice"


def test_tool_choice_defaults() -> None:
    assert parse_tool_choice(None, validate_tools(TOOLS)).mode == "auto"
    assert parse_tool_choice(None, []).mode == "none"
    named = parse_tool_choice({"type": "function", "function": {"name": "add"}}, TOOLS)
    assert named.mode == "function" and named.name == "add" and named.forced


@pytest.mark.parametrize("choice", [None, "auto", "none"])
def test_history_renders_without_tools(smollm2_template: ChatTemplate, choice, rng) -> None:
    # a client may leave the tools out of a later turn; the calls in the history still render
    msgs = openai_conversation(random_calls(rng, False), rng)
    assert ToolPlan.build(None, choice, smollm2_template) is None
    plan = ToolPlan.build(None, choice, smollm2_template, messages=msgs)
    assert plan is not None and not plan.parses and plan.constraint() == {}
    rendered, tools = plan.render_inputs(msgs)
    assert not tools and "You can call" not in rendered[0]["content"]
    call = json.loads(rendered[2]["content"])["tool_call"]
    assert call == {"name": "get_weather", "arguments": json.loads(
        msgs[2]["tool_calls"][0]["function"]["arguments"])}  # fmt: skip
    assert "get_weather" in smollm2_template.render(rendered)


def test_malformed_history_is_refused() -> None:
    plan = ToolPlan.build(TOOLS, None, sdist_template("qwen2.5"))
    bad = [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "tool_calls": [{"type": "function", "function": {"x": 1}}]},
    ]
    with pytest.raises(ToolError, match=r"messages\[1\]\.tool_calls\[0\]\.function"):
        plan.render_inputs(bad)


# --- decoding constraints, checked with llguidance over a real vocabulary --------------------


@pytest.fixture(scope="module")
def compiler(smollm2_path: Path):
    from llamapy.structured.matcher import GrammarCompiler
    from llamapy.tokenizer import Tokenizer

    tokenizer = Tokenizer.from_path(smollm2_path)
    return GrammarCompiler(tokenizer, tokenizer.vocab_size)


def accepts(compiler, constraint: dict[str, Any], text: str) -> bool:
    """Whether the constraint lets `text` be generated in full and then end."""
    from llamapy.sampling.params import SamplingParams

    kind, spec = SamplingParams(**constraint).constraint
    matcher = compiler.matcher(kind, spec)
    ids = compiler.tokenizer.encode(text, add_special=False, parse_special=False)
    return all(matcher.advance(t) for t in ids) and matcher.is_accepting


def call_text(fmt: ToolFormat, calls: list[tuple[str, dict]], ids: bool = False) -> str:
    """The output a constrained model writes for these calls (compact JSON)."""
    if fmt is ToolFormat.HERMES:
        return "\n".join(
            f"<tool_call>\n{json.dumps({'name': n, 'arguments': a}, ensure_ascii=False)}"
            "\n</tool_call>"
            for n, a in calls
        )
    if fmt is ToolFormat.LLAMA3:
        return "; ".join(
            json.dumps({"name": n, "parameters": a}, ensure_ascii=False) for n, a in calls
        )
    if fmt is ToolFormat.MISTRAL:
        items = [{"name": n, "arguments": a, "id": "Ab3456789"} for n, a in calls]
        return "[TOOL_CALLS]" + json.dumps(items, ensure_ascii=False)
    if len(calls) == 1 and not ids:
        n, a = calls[0]
        return json.dumps({"tool_call": {"name": n, "arguments": a}}, ensure_ascii=False)
    return json.dumps(
        {"tool_calls": [{"name": n, "arguments": a} for n, a in calls]}, ensure_ascii=False
    )


@pytest.mark.parametrize("fmt", list(ToolFormat))
def test_required_constraint_accepts_exactly_valid_calls(
    fmt: ToolFormat, compiler, rng: np.random.Generator
) -> None:
    plan = ToolPlan.build(TOOLS, "required", sdist_template(FORMAT_TEMPLATE[fmt]))
    constraint = plan.constraint()
    assert constraint
    a, b = (int(x) for x in rng.integers(-(10**6), 10**6, size=2))
    city = random_text(rng)
    for calls in ([("add", {"a": a, "b": b})], [("get_weather", {"city": city})]):
        text = call_text(fmt, calls)
        assert accepts(compiler, constraint, text), text
        parsed = parse_tool_calls(text, fmt, NAMES)
        assert_calls(parsed.tool_calls, calls)
    bad = [
        [("add", {"a": a})],  # a required argument missing
        [("add", {"a": str(a), "b": b})],  # wrong type
        [("delete_all", {})],  # not a tool
        [("add", {"a": a, "b": b, "c": 0})],  # an argument the function does not declare
        [("add", {"a": a, "b": b}), ("add", {"a": b, "b": a})],  # two calls, parallel off
    ]
    for calls in bad:
        text = call_text(fmt, calls, ids=True)
        assert not accepts(compiler, constraint, text), text
    assert not accepts(compiler, constraint, "I cannot call tools.")
    # compact JSON only: a small model must not pad with whitespace until max_tokens
    compact = call_text(fmt, [("add", {"a": a, "b": b})])
    assert accepts(compiler, constraint, compact)
    at = compact.index("{") + 1
    for pad in (" ", "\n", "\n  "):
        assert not accepts(compiler, constraint, compact[:at] + pad + compact[at:])


@pytest.mark.parametrize("fmt", [ToolFormat.HERMES, ToolFormat.MISTRAL, ToolFormat.GENERIC])
def test_parallel_constraint_accepts_several_calls(fmt: ToolFormat, compiler) -> None:
    plan = ToolPlan.build(TOOLS, "required", sdist_template(FORMAT_TEMPLATE[fmt]), True)
    calls = [("add", {"a": 1, "b": 2}), ("get_weather", {"city": "Bern", "unit": "celsius"})]
    text = call_text(fmt, calls, ids=True)
    assert accepts(compiler, plan.constraint(), text), text
    assert_calls(parse_tool_calls(text, fmt, NAMES).tool_calls, calls)


@pytest.mark.parametrize("fmt", list(ToolFormat))
def test_named_constraint_allows_only_that_function(fmt: ToolFormat, compiler) -> None:
    choice = {"type": "function", "function": {"name": "get_weather"}}
    plan = ToolPlan.build(TOOLS, choice, sdist_template(FORMAT_TEMPLATE[fmt]))
    constraint = plan.constraint()
    assert accepts(compiler, constraint, call_text(fmt, [("get_weather", {"city": "Graz"})]))
    assert not accepts(compiler, constraint, call_text(fmt, [("add", {"a": 1, "b": 2})]))


def test_generic_auto_constraint_allows_a_reply(compiler, smollm2_template) -> None:
    plan = ToolPlan.build(TOOLS, "auto", smollm2_template)
    constraint = plan.constraint()
    assert accepts(compiler, constraint, '{"response": "Hello!"}')
    assert accepts(compiler, constraint, call_text(ToolFormat.GENERIC, [("add", {"a": 1, "b": 2})]))
    assert not accepts(compiler, constraint, "Hello!")
    assert not accepts(compiler, constraint, '{\n  "response": "Hello!"}')
    assert not accepts(compiler, constraint, '{"response": "Hi", "tool_call": "x"}')
    schema = constraint["json_schema"]
    jsonschema.validate({"response": "x"}, schema)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({"tool_call": {"name": "add", "arguments": {"a": 1}}}, schema)


def test_native_auto_is_unconstrained_and_none_parses_nothing() -> None:
    for key in ("qwen2.5", "llama-3.2", "mistral-nemo"):
        assert ToolPlan.build(TOOLS, "auto", sdist_template(key)).constraint() == {}
        plan = ToolPlan.build(TOOLS, "none", sdist_template(key))
        assert not plan.parses and plan.constraint() == {}


def test_special_wrapper_tokens_are_referenced_by_id() -> None:
    plan = ToolPlan.build(TOOLS, "required", sdist_template("qwen2.5"))
    ids = {"<tool_call>": 151657, "</tool_call>": 151658}
    grammar = plan.constraint(ids.get)["grammar"]
    assert "<[151657]>" in grammar and "<[151658]>" in grammar and '"<tool_call>"' not in grammar
