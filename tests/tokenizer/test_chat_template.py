"""Chat templates against transformers' renderer (the oracle) and llama.cpp's expectations.

Templates come from the pinned llama-cpp-python sdist (tests/testdata.py): every
``models/templates/*.jinja`` must render our conversations exactly as transformers does, or
both must fail; the named fallbacks must match ``tests/test-chat-template.cpp``.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import json
import re
from pathlib import Path
from typing import Any

import pytest

from llamapy.tokenizer.chat_template import (
    ChatTemplate,
    TemplateError,
    detect_template_name,
    list_named_templates,
    resolve_chat_template,
)
from testdata import llama_cpp_sdist

BOS, EOS = "<s>", "</s>"

STANDARD = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "Hello, who are you?"},
    {"role": "assistant", "content": "I am a helpful assistant."},
    {"role": "user", "content": "What is 2 + 2? Answer in <10 words, \"quoted\" & 'plain'."},
]
WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather in a city, in °C.",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "description": "City name, e.g. Zürich"},
                "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
            },
            "required": ["city"],
        },
    },
}
TOOL_CALL = {
    "id": "call_0001",
    "type": "function",
    "function": {"name": "get_weather", "arguments": {"city": "Zürich", "unit": "celsius"}},
}
WITH_TOOLS = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "What is the weather in Zürich?"},
    {"role": "assistant", "content": None, "tool_calls": [TOOL_CALL]},
    {
        "role": "tool",
        "tool_call_id": "call_0001",
        "name": "get_weather",
        "content": '{"temperature": 21, "sky": "clear"}',
    },
    {"role": "assistant", "content": "It is 21 °C and clear in Zürich."},
    {"role": "user", "content": "Thanks!"},
]
WITH_REASONING = [
    {"role": "user", "content": "Is 17 prime?"},
    {
        "role": "assistant",
        "reasoning_content": "17 has no divisor between 2 and 4.",
        "content": "Yes, 17 is prime.",
    },
    {"role": "user", "content": "And 21?"},
]
# As the OpenAI API sends a call: empty content, arguments as a JSON string.
OPENAI_TOOL_CALL = {
    **TOOL_CALL,
    "function": {"name": "get_weather", "arguments": '{"city": "Zürich"}'},
}
WITH_OPENAI_TOOLS = [
    *WITH_TOOLS[:2],
    {"role": "assistant", "content": "", "tool_calls": [OPENAI_TOOL_CALL]},
    *WITH_TOOLS[3:],
]
COHERE_TOOL = {
    "name": "get_weather",
    "description": "Current weather in a city.",
    "parameter_definitions": {"city": {"description": "City", "type": "str", "required": True}},
}
DOCUMENTS = [
    {"title": "Tides", "text": "Tides are caused by the Moon's gravity."},
    {"title": "Moon", "text": "The Moon orbits Earth every 27.3 days."},
]

# (id, messages, render kwargs)
CASES: list[tuple[str, list[dict[str, Any]], dict[str, Any]]] = [
    ("standard", STANDARD, {"add_generation_prompt": True}),
    ("standard-no-gen", STANDARD, {"add_generation_prompt": False}),
    ("tools", WITH_TOOLS, {"add_generation_prompt": True, "tools": [WEATHER_TOOL]}),
    ("reasoning", WITH_REASONING, {"add_generation_prompt": True}),
    ("documents", STANDARD[1:2], {"add_generation_prompt": True, "documents": DOCUMENTS}),
    ("tools-openai", WITH_OPENAI_TOOLS, {"add_generation_prompt": True, "tools": [WEATHER_TOOL]}),
    ("tools-cohere", STANDARD, {"add_generation_prompt": True, "tools": [COHERE_TOOL]}),
    # extra variables, as firefunction-v2 reads them
    ("kwargs", STANDARD, {"add_generation_prompt": True, "functions": "[]", "datetime": "2024"}),
]


# --- the oracle ------------------------------------------------------------------------------


def hf_render(source: str, messages: list[dict[str, Any]], **kwargs: Any) -> str:
    """What ``tokenizer.apply_chat_template(messages, tokenize=False, ...)`` renders."""
    ctu = pytest.importorskip("transformers.utils.chat_template_utils")
    normalize = getattr(ctu, "_normalize_chat_messages", lambda chat: chat)
    kwargs = {"bos_token": BOS, "eos_token": EOS, **kwargs}
    rendered, _ = ctu.render_jinja_template(
        conversations=[normalize(copy.deepcopy(messages))], chat_template=source, **kwargs
    )
    return rendered[0]


@functools.cache
def compiled(source: str) -> ChatTemplate | TemplateError:
    try:
        return ChatTemplate(source, bos_token=BOS, eos_token=EOS)
    except TemplateError as exc:
        return exc


def assert_renders_as_transformers(
    source: str, messages: list[dict[str, Any]], **kwargs: Any
) -> None:
    """Same text as transformers, or both fail (we with a TemplateError)."""
    try:
        expected = hf_render(source, messages, **kwargs)
    except Exception as exc:  # any failure of transformers must be ours too
        template = compiled(source)
        if isinstance(template, TemplateError):
            return
        with pytest.raises(TemplateError):
            template.render(copy.deepcopy(messages), **kwargs)
        print(f"both fail; transformers: {type(exc).__name__}: {exc}")
        return
    template = compiled(source)
    if isinstance(template, TemplateError):
        pytest.fail(f"transformers renders the template but it does not compile here: {template}")
    assert template.render(copy.deepcopy(messages), **kwargs) == expected


# --- every template of llama.cpp's models/templates ------------------------------------------


@pytest.fixture(scope="session")
def llama_cpp_dir() -> Path:
    return llama_cpp_sdist()


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    # Parametrized by file name, so the sdist is fetched (once, cached) when this module is
    # collected; the session fixture then returns the same folder.
    if "sdist_template" in metafunc.fixturenames:
        names = sorted(p.name for p in (llama_cpp_sdist() / "models/templates").glob("*.jinja"))
        metafunc.parametrize("sdist_template", names)


@pytest.mark.parametrize(("messages", "kwargs"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_sdist_template_matches_transformers(
    llama_cpp_dir: Path, sdist_template: str, messages: list[dict[str, Any]], kwargs: dict
) -> None:
    source = (llama_cpp_dir / "models/templates" / sdist_template).read_text(encoding="utf-8")
    assert_renders_as_transformers(source, messages, **kwargs)


def test_sdist_template_renders_some_case(llama_cpp_dir: Path, sdist_template: str) -> None:
    # Guards the test above: "both raise" must not be all a template is ever checked on.
    source = (llama_cpp_dir / "models/templates" / sdist_template).read_text(encoding="utf-8")
    template = compiled(source)
    assert isinstance(template, ChatTemplate), template
    rendered = 0
    for _, messages, kwargs in CASES:
        with contextlib.suppress(TemplateError):
            rendered += bool(template.render(copy.deepcopy(messages), **kwargs))
    assert rendered > 0


def test_sdist_has_templates(llama_cpp_dir: Path) -> None:
    assert len(list((llama_cpp_dir / "models/templates").glob("*.jinja"))) >= 50


@pytest.mark.models
def test_smollm2_template_matches_transformers(smollm2_path: Path) -> None:
    from llamapy.formats import GGUFFile

    with GGUFFile(smollm2_path) as gguf:
        source = gguf.chat_template
        tokens = gguf.get("tokenizer.ggml.tokens")
        bos = tokens[gguf.get("tokenizer.ggml.bos_token_id")]
        eos = tokens[gguf.get("tokenizer.ggml.eos_token_id")]
    assert source is not None
    template = ChatTemplate(source, bos_token=bos, eos_token=eos)
    assert template.name == "chatml"
    for _, messages, kwargs in CASES:
        assert_renders_as_transformers(source, messages, bos_token=bos, eos_token=eos, **kwargs)
    assert template.render(STANDARD[1:2]) == (
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging "
        "Face<|im_end|>\n<|im_start|>user\nHello, who are you?<|im_end|>\n<|im_start|>assistant\n"
    )


# --- llama.cpp's tests/test-chat-template.cpp: named fallbacks and detection -----------------

# test-chat-template.cpp's conversation
LLAMA_CPP_CHAT = [
    {"role": "system", "content": "You are a helpful assistant"},
    {"role": "user", "content": "Hello"},
    {"role": "assistant", "content": "Hi there"},
    {"role": "user", "content": "Who are you"},
    {"role": "assistant", "content": "   I am an assistant   "},
    {"role": "user", "content": "Another question"},
]
_C_STRING = r'"(?:[^"\\]|\\.)*"'
_C_ESCAPES = {"n": "\n", "t": "\t", "r": "\r", '"': '"', "'": "'", "\\": "\\"}


def _c_string(literal: str) -> str:
    return re.sub(r"\\(.)", lambda m: _C_ESCAPES[m.group(1)], literal[1:-1])


def _parse_case(chunk: str) -> dict[str, Any]:
    case: dict[str, Any] = {"extra": []}
    value = rf"(?:U8C\(\s*|u8)?({_C_STRING})"
    for field, literal in re.findall(rf"/\*\s*\.(\w+)\s*=?\s*\*/\s*{value}", chunk):
        case[field] = _c_string(literal)
    extra = re.search(r"\.extra_conversation=\s*\*/\s*\{(.*)\}", chunk, re.S)
    if extra:
        pairs = re.findall(rf"\{{\s*({_C_STRING})\s*,\s*({_C_STRING})\s*\}}", extra.group(1))
        case["extra"] = [{"role": _c_string(r), "content": _c_string(c)} for r, c in pairs]
    return case


@functools.lru_cache(maxsize=1)
def llama_cpp_cases() -> list[dict[str, Any]]:
    """The test cases of test-chat-template.cpp's ``main_automated_tests``."""
    text = (llama_cpp_sdist() / "tests/test-chat-template.cpp").read_text(encoding="utf-8")
    block = text[text.index("std::vector<TestCase> test_cases {") : text.index("std::vector<char>")]
    chunks = re.split(r"\n\s*\{\s*\n(?=\s*/\*\s*\.name=)", block)[1:]
    return [_parse_case(chunk) for chunk in chunks]


def test_llama_cpp_cases_parsed() -> None:
    cases = llama_cpp_cases()
    assert len(cases) >= 30
    for case in cases:
        assert {"name", "template_str", "expected_output"} <= set(case), case.get("name")


def test_named_templates_match_llama_cpp() -> None:
    """Each case's template is detected as llama.cpp does, and our fallback of that name
    renders what llm_chat_apply_template renders (``expected_output``)."""
    failures = []
    for case in llama_cpp_cases():
        name = detect_template_name(case["template_str"])
        if name is None:
            failures.append(f"{case['name']}: not detected")
            continue
        template = resolve_chat_template(name, model_template=None, bos_token=BOS, eos_token=EOS)
        assert template is not None
        got = template.render(LLAMA_CPP_CHAT + case["extra"])
        if got != case["expected_output"]:
            failures.append(
                f"{case['name']} ({name}):\n  got      {got!r}\n  expected "
                f"{case['expected_output']!r}"
            )
    assert not failures, "\n".join(failures)


def test_llama_cpp_case_templates_match_transformers() -> None:
    for case in llama_cpp_cases():
        kwargs = {"bos_token": case.get("bos_token", ""), "eos_token": case.get("eos_token", "")}
        source = case["template_str"]
        messages = LLAMA_CPP_CHAT + case["extra"]
        assert_renders_as_transformers(source, messages, add_generation_prompt=True, **kwargs)


# Names that test-chat-template.cpp has no case for, written from llama-chat.cpp by hand.
HANDWRITTEN = {
    "alpaca": "You are a helpful assistant\n\n### Instruction:\nHello\n\n### Response:\n"
    "Hi there</s>\n\n### Instruction:\nWho are you\n\n### Response:\n   I am an assistant   "
    "</s>\n\n### Instruction:\nAnother question\n\n### Response:\n",
    "bailing2": "<role>SYSTEM</role>You are a helpful assistant<|role_end|><role>HUMAN</role>"
    "Hello<|role_end|><role>ASSISTANT</role>Hi there<|role_end|><role>HUMAN</role>Who are you"
    "<|role_end|><role>ASSISTANT</role>   I am an assistant   <|role_end|><role>HUMAN</role>"
    "Another question<|role_end|><role>ASSISTANT</role>",
    "bailing-think": "<role>SYSTEM</role>You are a helpful assistant<role>HUMAN</role>Hello"
    "<role>ASSISTANT</role>Hi there<role>HUMAN</role>Who are you<role>ASSISTANT</role>   I am "
    "an assistant   <role>HUMAN</role>Another question<role>ASSISTANT</role><think>",
    "deepseek-ocr": "You are a helpful assistantHelloHi thereWho are you   I am an assistant   "
    "Another question",
    "dots1": "<|system|>You are a helpful assistant<|endofsystem|><|userprompt|>Hello"
    "<|endofuserprompt|><|response|>Hi there<|endofresponse|><|userprompt|>Who are you"
    "<|endofuserprompt|><|response|>   I am an assistant   <|endofresponse|><|userprompt|>"
    "Another question<|endofuserprompt|><|response|>",
    "deepseek3": "You are a helpful assistant\n\n<｜User｜>Hello<｜Assistant｜>Hi there"
    "<｜end▁of▁sentence｜><｜User｜>Who are you<｜Assistant｜>   I am an assistant   "
    "<｜end▁of▁sentence｜><｜User｜>Another question<｜Assistant｜>",
    "exaone3": "[|system|]You are a helpful assistant[|endofturn|]\n[|user|]Hello\n[|assistant|]"
    "Hi there[|endofturn|]\n[|user|]Who are you\n[|assistant|]I am an assistant[|endofturn|]\n"
    "[|user|]Another question\n[|assistant|]",
    "exaone4": "[|system|]You are a helpful assistant[|endofturn|]\n[|user|]Hello\n[|assistant|]"
    "Hi there[|endofturn|]\n[|user|]Who are you\n[|assistant|]I am an assistant[|endofturn|]\n"
    "[|user|]Another question\n[|assistant|]",
    "falcon3": "<|system|>\nYou are a helpful assistant\n<|user|>\nHello\n<|assistant|>\nHi there"
    "\n<|user|>\nWho are you\n<|assistant|>\n   I am an assistant   \n<|user|>\nAnother "
    "question\n<|assistant|>\n",
    "llama2-sys": "[INST] <<SYS>>\nYou are a helpful assistant\n<</SYS>>\n\nHello [/INST]Hi there"
    "</s>[INST] Who are you [/INST]   I am an assistant   </s>[INST] Another question [/INST]",
    "mistral-v7-tekken": "[SYSTEM_PROMPT]You are a helpful assistant[/SYSTEM_PROMPT][INST]Hello"
    "[/INST]Hi there</s>[INST]Who are you[/INST]   I am an assistant   </s>[INST]Another "
    "question[/INST]",
    "zephyr": "<|system|>\nYou are a helpful assistant<|endoftext|>\n<|user|>\nHello<|endoftext|>"
    "\n<|assistant|>\nHi there<|endoftext|>\n<|user|>\nWho are you<|endoftext|>\n<|assistant|>"
    "\n   I am an assistant   <|endoftext|>\n<|user|>\nAnother question<|endoftext|>\n"
    "<|assistant|>\n",
    "exaone-moe": "<|system|>\nYou are a helpful assistant<|endofturn|>\n<|user|>\nHello"
    "<|endofturn|>\n<|assistant|>\nHi there<|endofturn|>\n<|user|>\nWho are you<|endofturn|>\n"
    "<|assistant|>\nI am an assistant<|endofturn|>\n<|user|>\nAnother question<|endofturn|>\n"
    "<|assistant|>\n",
    "gpt-oss": "<|start|>system<|message|>You are a helpful assistant<|end|><|start|>user"
    "<|message|>Hello<|end|><|start|>assistant<|message|>Hi there<|return|><|start|>user"
    "<|message|>Who are you<|end|><|start|>assistant<|message|>   I am an assistant   <|return|>"
    "<|start|>user<|message|>Another question<|end|><|start|>assistant",
    "grok-2": "System: You are a helpful assistant<|separator|>\n\nHuman: Hello<|separator|>\n\n"
    "Assistant: Hi there<|separator|>\n\nHuman: Who are you<|separator|>\n\nAssistant:    I am "
    "an assistant   <|separator|>\n\nHuman: Another question<|separator|>\n\nAssistant:",
    "hunyuan-dense": "You are a helpful assistant<｜hy_place▁holder▁no▁3｜><｜hy_User｜>Hello"
    "<｜hy_Assistant｜><｜hy_Assistant｜>Hi there<｜hy_place▁holder▁no▁2｜><｜hy_User｜>Who are you"
    "<｜hy_Assistant｜><｜hy_Assistant｜>   I am an assistant   <｜hy_place▁holder▁no▁2｜>"
    "<｜hy_User｜>Another question<｜hy_Assistant｜>",
    "hunyuan-moe": "<|startoftext|>You are a helpful assistant<|extra_4|><|startoftext|>Hello"
    "<|extra_0|>Hi there<|eos|><|startoftext|>Who are you<|extra_0|>   I am an assistant   "
    "<|eos|><|startoftext|>Another question<|extra_0|>",
    "hunyuan-vl": "<｜hy_begin▁of▁sentence｜>You are a helpful assistant<｜hy_place▁holder▁no▁3｜>"
    "Hello<｜hy_User｜>Hi there<｜hy_Assistant｜>Who are you<｜hy_User｜>   I am an assistant   "
    "<｜hy_Assistant｜>Another question<｜hy_User｜>",
    "kimi-k2": "<|im_system|>system<|im_middle|>You are a helpful assistant<|im_end|><|im_user|>"
    "user<|im_middle|>Hello<|im_end|><|im_assistant|>assistant<|im_middle|>Hi there<|im_end|>"
    "<|im_user|>user<|im_middle|>Who are you<|im_end|><|im_assistant|>assistant<|im_middle|>   "
    "I am an assistant   <|im_end|><|im_user|>user<|im_middle|>Another question<|im_end|>"
    "<|im_assistant|>assistant<|im_middle|>",
    "llama4": "<|header_start|>system<|header_end|>\n\nYou are a helpful assistant<|eot|>"
    "<|header_start|>user<|header_end|>\n\nHello<|eot|><|header_start|>assistant<|header_end|>"
    "\n\nHi there<|eot|><|header_start|>user<|header_end|>\n\nWho are you<|eot|><|header_start|>"
    "assistant<|header_end|>\n\nI am an assistant<|eot|><|header_start|>user<|header_end|>\n\n"
    "Another question<|eot|><|header_start|>assistant<|header_end|>\n\n",
    "pangu-embedded": "[unused9]系统：You are a helpful assistant[unused10][unused9]用户：Hello"
    "[unused10][unused9]助手：Hi there[unused10][unused9]用户：Who are you[unused10][unused9]助手："
    "   I am an assistant   [unused10][unused9]用户：Another question[unused10][unused9]助手：",
    "rwkv-world": "System: You are a helpful assistant\n\nUser: Hello\n\nAssistant: Hi there\n\n"
    "User: Who are you\n\nAssistant: I am an assistant\n\nUser: Another question\n\nAssistant:",
    "smolvlm": "<|im_start|>You are a helpful assistant\n\nUser: Hello<end_of_utterance>\n"
    "Assistant: Hi there<end_of_utterance>\nUser: Who are you<end_of_utterance>\nAssistant:    "
    "I am an assistant   <end_of_utterance>\nUser: Another question<end_of_utterance>\n"
    "Assistant:",
    "solar-open": "<|begin|>system<|content|>You are a helpful assistant<|end|><|begin|>user"
    "<|content|>Hello<|end|><|begin|>assistant<|content|>Hi there<|end|><|begin|>user<|content|>"
    "Who are you<|end|><|begin|>assistant<|content|>   I am an assistant   <|end|><|begin|>user"
    "<|content|>Another question<|end|><|begin|>assistant",
}


@pytest.mark.parametrize("name", sorted(HANDWRITTEN))
def test_named_template_handwritten(name: str) -> None:
    template = resolve_chat_template(name, model_template=None, bos_token=BOS, eos_token=EOS)
    assert template is not None and template.name == name
    assert template.render(LLAMA_CPP_CHAT) == HANDWRITTEN[name]


TOOL_CHAT = [
    {"role": "user", "content": "Weather?"},
    {"role": "assistant", "content": "Calling."},
    {"role": "tool", "content": "  21 C  "},
]
TOOL_ROLE_EXPECTED = {
    "exaone4": "[|user|]Weather?\n[|assistant|]Calling.[|endofturn|]\n[|tool|]21 C[|endofturn|]\n"
    "[|assistant|]",
    "exaone-moe": "<|user|>\nWeather?<|endofturn|>\n<|assistant|>\nCalling.<|endofturn|>\n<|tool|>"
    "\n21 C<|endofturn|>\n<|assistant|>\n",
    "kimi-k2": "<|im_user|>user<|im_middle|>Weather?<|im_end|><|im_assistant|>assistant"
    "<|im_middle|>Calling.<|im_end|><|im_system|>tool<|im_middle|>  21 C  <|im_end|>"
    "<|im_assistant|>assistant<|im_middle|>",
    "pangu-embedded": "[unused9]系统：[unused10][unused9]用户：Weather?[unused10][unused9]助手："
    "Calling.[unused10][unused9]工具：  21 C  [unused10][unused9]助手：",
}


@pytest.mark.parametrize("name", sorted(TOOL_ROLE_EXPECTED))
def test_named_template_tool_role(name: str) -> None:
    template = resolve_chat_template(name, model_template=None)
    assert template is not None
    assert template.render(TOOL_CHAT) == TOOL_ROLE_EXPECTED[name]


def test_every_named_template_is_checked() -> None:
    detected = {detect_template_name(c["template_str"]) for c in llama_cpp_cases()}
    assert set(list_named_templates()) <= detected | set(HANDWRITTEN)


@pytest.mark.parametrize("name", list_named_templates())
def test_named_template_generation_prompt_is_the_only_difference(name: str) -> None:
    template = resolve_chat_template(name, model_template=None)
    assert template is not None
    with_prompt = template.render(LLAMA_CPP_CHAT, add_generation_prompt=True)
    without = template.render(LLAMA_CPP_CHAT, add_generation_prompt=False)
    assert with_prompt.startswith(without)
    assert detect_template_name(name) == name


def test_named_template_joins_text_parts() -> None:
    # as llama.cpp's common_chat_templates_apply_legacy: text parts joined by "\n"
    parts = [
        {"type": "text", "text": "Describe"},
        {"type": "image_url", "image_url": {"url": "data:,"}},
        {"type": "text", "text": "this."},
    ]
    template = resolve_chat_template("chatml", model_template=None)
    assert template is not None
    assert template.render([{"role": "user", "content": parts}]) == (
        "<|im_start|>user\nDescribe\nthis.<|im_end|>\n<|im_start|>assistant\n"
    )


def test_detect_unknown_template() -> None:
    assert detect_template_name("{{ messages[0]['content'] }}") is None


# --- the sandbox -----------------------------------------------------------------------------

# Unsafe attributes (underscore names, mutating methods) are refused: using them raises.
ESCAPES = [
    "{{ ''.__class__.__mro__ }}",
    "{{ ''.__class__.__mro__[1].__subclasses__() }}",
    "{{ strftime_now.__globals__['__builtins__'] }}",
    "{{ namespace.__init__.__globals__ }}",
    "{{ dict.__call__.__globals__ }}",
    "{{ cycler.__init__.__globals__.os.popen('id').read() }}",
    "{{ joiner.__init__.__globals__ }}",
    "{{ tojson.__globals__.json }}",
    "{{ messages.append({'role': 'x'}) }}",
    "{{ messages[0].update({'role': 'x'}) }}",
    "{{ messages[0].pop('role') }}",
    "{{ messages[0].__setitem__('role', 'x') }}",
    "{% set ns = namespace(__class__=1) %}",
    "{% set ns = namespace() %}{% set ns._x = 1 %}",
    "{{ range(10**9)|list|length }}",
    "{% include 'etc/passwd' %}",
    "{% import 'os' as os %}",
    "{{ (messages|attr('__class__')).__base__ }}",
]
# Reading one unsafe attribute gives an undefined value, rendered as "" (as transformers).
BLOCKED_READS = [
    "{{ messages.__class__ }}",
    "{{ raise_exception.__globals__ }}",
    "{{ lipsum.__globals__ }}",
    "{{ '{0.__class__}'.format(messages) }}",
    "{{ '{0[0].__class__}'.format(messages) }}",
    "{{ self._TemplateReference__context }}",
    "{{ messages|attr('__class__') }}",
    "{{ messages.__class__ is defined }}",
]


@pytest.mark.parametrize("source", ESCAPES)
def test_sandbox_refuses(source: str) -> None:
    with pytest.raises(TemplateError):
        ChatTemplate(source).render(copy.deepcopy(STANDARD))


@pytest.mark.parametrize("source", BLOCKED_READS)
def test_sandbox_hides(source: str) -> None:
    assert ChatTemplate(source).render(copy.deepcopy(STANDARD)) in ("", "False")


def test_sandbox_behaves_as_transformers() -> None:
    for source in ESCAPES + BLOCKED_READS:
        assert_renders_as_transformers(source, STANDARD, add_generation_prompt=True)


# --- the API ---------------------------------------------------------------------------------

TOJSON = (
    "{{ tools|tojson }}|{{ tools|tojson(indent=2) }}|{{ tools|tojson(sort_keys=true) }}|"
    "{{ tools|tojson(separators=(',', ':')) }}|{{ tools|tojson(ensure_ascii=true) }}|"
    "{{ '<&>'|tojson }}|{{ messages[0]|tojson }}"
)
FEATURES = (
    "{% for m in messages %}{% if loop.index0 == 1 %}{% continue %}{% endif %}{{ m.role }}"
    "{% if loop.index0 == 2 %}{% break %}{% endif %}{% endfor %}|{{ bos_token }}{{ eos_token }}"
    "|{{ extra }}|{{ dict(a=1, b=[2]) }}|{{ dict.fromkeys(['x'], 0) }}"
    "{% set ns = namespace(n=0) %}{% for m in messages %}{% set ns.n = ns.n + 1 %}{% endfor %}"
    "|{{ ns.n }}|{% generation %}gen{% endgeneration %}\n  {% if true %}\n  x\n  {% endif %}\n"
    "|{{ strftime_now('%Y') }}|{{ documents|length }}|{{ add_generation_prompt }}"
)


@pytest.mark.parametrize("source", [TOJSON, FEATURES], ids=["tojson", "features"])
def test_globals_and_filters_match_transformers(source: str) -> None:
    assert_renders_as_transformers(
        source,
        STANDARD,
        add_generation_prompt=True,
        tools=[WEATHER_TOOL],
        documents=DOCUMENTS,
        extra={"k": [1, "é"]},
    )


def test_kwargs_override_special_tokens() -> None:
    template = ChatTemplate("{{ bos_token }}|{{ eos_token }}", bos_token="<s>", eos_token="</s>")
    assert template.render([]) == "<s>|</s>"
    assert template.render([], bos_token="[B]") == "[B]|</s>"


def test_none_values_are_dropped_and_reasoning_aliased() -> None:
    source = (
        "{% for m in messages %}{{ m.content is defined }} {{ m.thinking }} "
        "{{ m.reasoning_content }};{% endfor %}"
    )
    messages = [{"role": "assistant", "content": None, "reasoning": "r"}]
    assert_renders_as_transformers(source, messages, add_generation_prompt=True)
    assert ChatTemplate(source).render(messages) == "False r r;"


def test_raise_exception_message_reaches_the_user() -> None:
    template = ChatTemplate("{{ raise_exception('Only user and assistant roles!') }}")
    with pytest.raises(TemplateError, match="Only user and assistant roles!"):
        template.render(STANDARD)


def test_syntax_error_is_a_template_error() -> None:
    with pytest.raises(TemplateError, match="does not compile"):
        ChatTemplate("{% for m in messages %}{{ m.content }}")


def test_error_inside_template_is_a_template_error() -> None:
    with pytest.raises(TemplateError, match="TypeError"):
        ChatTemplate("{{ messages[0]['content'] + 1 }}").render(STANDARD)


@pytest.mark.parametrize("name", ["chatml", "llama3", "gemma"])
def test_continue_final_message_matches_transformers(name: str) -> None:
    source = resolve_chat_template(name, model_template=None).source
    messages = [*STANDARD, {"role": "assistant", "content": "The answer is "}]
    expected = hf_render(source, messages, continue_final_message=True)
    template = ChatTemplate(source, bos_token=BOS, eos_token=EOS)
    assert template.render(messages, add_generation_prompt=False, continue_final_message=True) == (
        expected
    )
    with pytest.raises(ValueError, match="add_generation_prompt"):
        template.render(messages, continue_final_message=True)


def test_resolve(tmp_path: Path) -> None:
    model = "{{ 'model' }}"
    assert resolve_chat_template(None, model_template=None) is None
    assert resolve_chat_template(None, model_template=model).render([]) == "model"
    assert resolve_chat_template("chatml", model_template=model).name == "chatml"
    assert resolve_chat_template("{{ 'inline' }}", model_template=None).render([]) == "inline"
    jinja = tmp_path / "t.jinja"
    jinja.write_text("{{ 'file' }}", encoding="utf-8")
    assert resolve_chat_template(str(jinja), model_template=model).render([]) == "file"
    config = tmp_path / "tokenizer_config.json"
    named = [{"name": "tool_use", "template": "x"}, {"name": "default", "template": "{{ 'd' }}"}]
    config.write_text(json.dumps({"chat_template": named}), encoding="utf-8")
    assert resolve_chat_template(str(config), model_template=None).render([]) == "d"
    with pytest.raises(TemplateError, match="chatml"):
        resolve_chat_template("no-such-template", model_template=model)


def test_list_named_templates() -> None:
    names = list_named_templates()
    assert names == sorted(names)
    for required in [
        "chatml",
        "llama2",
        "llama3",
        "gemma",
        "mistral-v1",
        "mistral-v3",
        "mistral-v7",
        "phi3",
        "zephyr",
        "vicuna",
        "deepseek",
        "command-r",
        "alpaca",
    ]:
        assert required in names
