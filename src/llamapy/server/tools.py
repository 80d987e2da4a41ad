"""Tool calling for /v1/chat/completions: OpenAI `tools` / `tool_choice` in, `tool_calls` out.

The model's tool-call format is chosen from its chat template by marker strings, in the
order of llama.cpp's `common_chat_templates_apply_jinja` (common/chat.cpp, before its
autoparser): `<tool_call>` -> Hermes 2 Pro / Qwen 2.5, `<|start_header_id|>ipython` ->
Llama 3.x, `[TOOL_CALLS]` -> Mistral Nemo, anything else -> the generic JSON format.

- Rendering: tools and the conversation's tool calls and results go through the template.
  What a template cannot show is polyfilled as minja (llama.cpp's former Jinja engine) did:
  the tools described in the system prompt, tool calls written as JSON content, tool
  results sent as user messages; a template without a system role gets the system text
  merged into the next message (llama.cpp's `system_message_not_supported`).
- Constraint: `tool_choice` "required" or a named function constrains decoding (a JSON
  schema, or a Lark grammar with the format's wrapper tokens); the generic format is
  constrained under "auto" too (as llama.cpp's generic format), with a `response` branch.
- Parsing: the whole output is either parsed into tool calls or, if any part of the tool
  region is malformed, returned as plain content (all or nothing); `ToolCallStreamer` gives
  the same result as OpenAI streaming deltas.
"""

from __future__ import annotations

import contextlib
import enum
import functools
import json
import re
import secrets
import string
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from llamapy.tokenizer import ChatTemplate, TemplateError

__all__ = [
    "ParsedMessage",
    "TemplateCaps",
    "ToolCallStreamer",
    "ToolChoice",
    "ToolError",
    "ToolFormat",
    "ToolPlan",
    "detect_tool_format",
    "parse_tool_calls",
    "parse_tool_choice",
    "template_caps",
    "validate_tools",
]

# OpenAI's rule for function names
_NAME_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
_ID_CHARS = string.ascii_letters + string.digits
# Tool calls are compact JSON (json.dumps' separators, no other whitespace): a small model
# may otherwise pad with newlines until max_tokens. A schema's "x-guidance" overrides the
# structured-output defaults (whose whitespace_pattern would win over whitespace_flexible).
_X_GUIDANCE = {
    "whitespace_flexible": False,
    "whitespace_pattern": None,
    "item_separator": ", ",
    "key_separator": ": ",
}

# The generic format's instructions (llama.cpp's common_chat_params_init_generic, minja's
# tools polyfill).
GENERIC_AUTO_PROMPT = (
    "Respond in JSON format, either with `tool_call` (a request to call tools) or with "
    "`response` reply to the user's request"
)
GENERIC_REQUIRED_PROMPT = "Respond in JSON format with `tool_call` (a request to call tools)"
TOOLS_PROMPT = "You can call any of the following tools to satisfy the user's requests: "


class ToolError(ValueError):
    """Malformed tools, tool_choice or tool messages: the client's mistake (a 400)."""

    def __init__(self, message: str, param: str) -> None:
        super().__init__(message)
        self.param = param


class ToolFormat(enum.StrEnum):
    HERMES = "hermes"  # <tool_call>{"name", "arguments"}</tool_call> (Hermes 2 Pro, Qwen 2.5)
    LLAMA3 = "llama3"  # {"name", "parameters"}, optionally after <|python_tag|>
    MISTRAL = "mistral"  # [TOOL_CALLS][{"name", "arguments", "id"}, ...]
    GENERIC = "generic"  # {"tool_call": ...} | {"tool_calls": [...]} | {"response": "..."}


def detect_tool_format(source: str) -> ToolFormat:
    """The tool-call format of a chat template, by llama.cpp's marker strings."""
    if "<tool_call>" in source:
        return ToolFormat.HERMES
    if "<|start_header_id|>" in source and "<function=" in source:
        return ToolFormat.GENERIC  # functionary v3.1: a format of its own, not implemented
    if "<|start_header_id|>ipython<|end_header_id|>" in source:
        return ToolFormat.LLAMA3
    if "[TOOL_CALLS]" in source:
        return ToolFormat.MISTRAL
    return ToolFormat.GENERIC


# --- request validation ----------------------------------------------------------------------


def validate_tools(tools: Any) -> list[dict[str, Any]]:
    """Check OpenAI `tools` (function tools with a name and an object parameters schema);
    returns them with `parameters` filled in. Raises ToolError naming the bad field."""
    if not isinstance(tools, list):
        raise ToolError("tools must be a list of tool objects", "tools")
    out, seen = [], set()
    for i, tool in enumerate(tools):
        where = f"tools[{i}]"
        if not isinstance(tool, Mapping):
            raise ToolError(f"{where} must be an object", where)
        if tool.get("type", "function") != "function":
            raise ToolError(
                f"{where}.type must be 'function' (the only tool type supported), "
                f"got {tool.get('type')!r}",
                f"{where}.type",
            )
        function = tool.get("function")
        if not isinstance(function, Mapping):
            raise ToolError(f"{where}.function must be an object with a 'name'", where)
        name = function.get("name")
        if not isinstance(name, str) or not _NAME_RE.match(name):
            raise ToolError(
                f"{where}.function.name must be 1-64 letters, digits, '_' or '-', got {name!r}",
                f"{where}.function.name",
            )
        if name in seen:
            raise ToolError(f"{where}: two tools are named {name!r}", f"{where}.function.name")
        seen.add(name)
        params = function.get("parameters", {"type": "object", "properties": {}})
        _check_parameters(params, f"{where}.function.parameters")
        out.append({**tool, "type": "function", "function": {**function, "parameters": params}})
    return out


def _check_parameters(params: Any, where: str) -> None:
    if not isinstance(params, Mapping):
        raise ToolError(f"{where} must be a JSON Schema object", where)
    kind = params.get("type", "object")
    if kind != "object":
        raise ToolError(f"{where} must describe an object (type 'object'), got {kind!r}", where)
    from llamapy.structured import GrammarError, check_constraint

    try:
        check_constraint(dict(params), None, None, None)
    except GrammarError as e:
        raise ToolError(f"{where} is not a usable JSON Schema: {e}", where) from None


@dataclass(frozen=True, slots=True)
class ToolChoice:
    mode: str  # "auto", "none", "required" or "function"
    name: str | None = None  # the function when mode == "function"

    @property
    def forced(self) -> bool:
        return self.mode in ("required", "function")


def parse_tool_choice(tool_choice: Any, tools: Sequence[Mapping[str, Any]] | None) -> ToolChoice:
    """OpenAI `tool_choice` -> ToolChoice (default "auto" with tools, "none" without)."""
    names = [t["function"]["name"] for t in tools or ()]
    if tool_choice is None:
        return ToolChoice("auto" if names else "none")
    if tool_choice in ("auto", "none", "required"):
        if tool_choice == "required" and not names:
            raise ToolError("tool_choice 'required' needs tools", "tool_choice")
        return ToolChoice(tool_choice)
    if isinstance(tool_choice, str):
        raise ToolError(
            f"tool_choice must be 'auto', 'none', 'required' or "
            f'{{"type": "function", "function": {{"name": ...}}}}, got {tool_choice!r}',
            "tool_choice",
        )
    if not isinstance(tool_choice, Mapping):
        tool_choice = {"type": None}
    function = tool_choice.get("function")
    name = function.get("name") if isinstance(function, Mapping) else None
    if tool_choice.get("type", "function") != "function" or not isinstance(name, str):
        raise ToolError(
            'tool_choice must name a function as {"type": "function", "function": {"name": ...}}',
            "tool_choice",
        )
    if name not in names:
        known = ", ".join(repr(n) for n in names) or "no tools were given"
        raise ToolError(f"tool_choice names the unknown function {name!r} ({known})", "tool_choice")
    return ToolChoice("function", name)


# --- what a template can show -----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class TemplateCaps:
    """What a chat template renders, found by rendering probes (as minja's capabilities)."""

    system_role: bool
    tools: bool
    tool_calls: bool
    tool_responses: bool
    object_arguments: bool  # tool call arguments are rendered from a dict (not a JSON string)


_PROBE_TOOL = "probe_tool_fn"
_PROBE_KEY = "probe_arg_key"
_PROBE_ID = "call00001"  # 9 characters: Mistral's templates insist
_PROBE_TOOL_SPEC = {
    "type": "function",
    "function": {
        "name": _PROBE_TOOL,
        "description": "Probe.",
        "parameters": {
            "type": "object",
            "properties": {_PROBE_KEY: {"type": "string", "description": "Probe."}},
            "required": [_PROBE_KEY],
        },
    },
}


def _probe_call(arguments: Any) -> dict[str, Any]:
    function = {"name": _PROBE_TOOL, "arguments": arguments}
    return {"id": _PROBE_ID, "type": "function", "function": function}


def _renders(template: ChatTemplate, messages: list[dict[str, Any]], **kwargs: Any) -> str:
    """The rendered probe, "" if it fails; templates made for tool use only (they iterate
    `tools` unguarded) are given the probe tool."""
    for tools in [kwargs.pop("tools")] if "tools" in kwargs else [None, [_PROBE_TOOL_SPEC]]:
        try:
            return template.render(messages, add_generation_prompt=False, tools=tools, **kwargs)
        except (TemplateError, TypeError, ValueError):
            continue
    return ""


@functools.lru_cache(maxsize=32)
def _caps(source: str, bos: str, eos: str) -> TemplateCaps:
    t = ChatTemplate(source, bos_token=bos, eos_token=eos)
    user = {"role": "user", "content": "Hey"}
    system = _renders(t, [{"role": "system", "content": "probe system needle"}, user])
    with_tools = _renders(t, [user], tools=[_PROBE_TOOL_SPEC])
    object_args, as_object = _call_renders(t, user, {_PROBE_KEY: "v"})
    string_args, _ = _call_renders(t, user, json.dumps({_PROBE_KEY: "v"}))
    tool_calls = object_args or string_args
    return TemplateCaps(
        system_role="probe system needle" in system,
        tools=_PROBE_TOOL in with_tools,
        tool_calls=bool(tool_calls),
        tool_responses=_tool_response_renders(t, user, {_PROBE_KEY: "v"} if as_object else "{}"),
        object_arguments=as_object,
    )


def _call_renders(t: ChatTemplate, user: dict[str, Any], arguments: Any) -> tuple[bool, bool]:
    """(the call's name shows, its dict arguments show as JSON) for one assistant call."""
    for content in ("", None):
        call = {"role": "assistant", "content": content, "tool_calls": [_probe_call(arguments)]}
        text = _renders(t, [user, call])
        if _PROBE_TOOL in text:
            # a dict written out (as JSON, or as XML-like tags), not as its Python repr
            as_object = _PROBE_KEY in text and f"'{_PROBE_KEY}'" not in text
            return True, isinstance(arguments, dict) and as_object
    return False, False


def _tool_response_renders(t: ChatTemplate, user: dict[str, Any], arguments: Any) -> bool:
    call = {"role": "assistant", "content": "", "tool_calls": [_probe_call(arguments)]}
    result = {"role": "tool", "tool_call_id": _PROBE_ID, "name": _PROBE_TOOL, "content": "N33dle"}
    return "N33dle" in _renders(t, [user, call, result])


def template_caps(template: ChatTemplate) -> TemplateCaps:
    return _caps(template.source, template.bos_token, template.eos_token)


# --- the request's plan: rendering and constraint ---------------------------------------------


@dataclass(frozen=True)
class ToolPlan:
    """How one chat request uses tools: its format, choice, and what the template shows."""

    tools: list[dict[str, Any]]
    choice: ToolChoice
    format: ToolFormat
    caps: TemplateCaps
    parallel: bool = False

    @classmethod
    def build(
        cls,
        tools: Any,
        tool_choice: Any,
        template: ChatTemplate,
        parallel_tool_calls: bool | None = None,
        messages: Sequence[Mapping[str, Any]] = (),
    ) -> ToolPlan | None:
        """The plan; None when the request has no tools and its `messages` no tool calls or
        results to render (a tool_choice other than none/auto without tools: ToolError)."""
        fmt = detect_tool_format(template.source)
        if tools is None or tools == []:
            parse_tool_choice(tool_choice, [])  # "required" or a function without tools: 400
            if not any(m.get("tool_calls") or m.get("role") == "tool" for m in messages):
                return None
            # nothing to call: the plan only renders the history's calls and results
            return cls([], ToolChoice("none"), fmt, template_caps(template))
        checked = validate_tools(tools)
        choice = parse_tool_choice(tool_choice, checked)
        # llama.cpp's default: one call per turn unless the client asks for parallel calls
        parallel = bool(parallel_tool_calls) and fmt is not ToolFormat.LLAMA3
        return cls(checked, choice, fmt, template_caps(template), parallel)

    @property
    def names(self) -> list[str]:
        return [t["function"]["name"] for t in self.tools]

    @property
    def parses(self) -> bool:
        """Whether the output is parsed for tool calls."""
        return self.choice.mode != "none"

    def new_id(self) -> str:
        if self.format is ToolFormat.MISTRAL:  # Mistral's templates take 9 alphanumerics
            return "".join(secrets.choice(_ID_CHARS) for _ in range(9))
        return "call_" + "".join(secrets.choice(_ID_CHARS) for _ in range(24))

    # rendering

    def render_inputs(
        self, messages: Sequence[Mapping[str, Any]]
    ) -> tuple[list[dict[str, Any]], list[dict[str, Any]] | None]:
        """(messages, tools) to give the chat template."""
        msgs = [dict(m) for m in messages]
        _check_history(msgs)
        caps = self.caps
        out: list[dict[str, Any]] = []
        for m in msgs:
            if m.get("tool_calls"):
                m = self._render_calls(m)
            elif m.get("role") == "tool" and not caps.tool_responses:
                m = _tool_response_as_user(m)
                if out and out[-1].get("is_tool_response"):  # results of parallel calls:
                    m = {**m, "content": out.pop()["content"] + "\n" + m["content"]}  # one turn
            out.append(m)
        out = [{k: v for k, v in m.items() if k != "is_tool_response"} for m in out]
        prompt = self._system_prompt() if self.parses else ""
        if prompt:
            out = _add_system(out, prompt)
        if not caps.system_role:
            out = _merge_system(out)
        return out, self.tools if caps.tools else None

    def _render_calls(self, message: dict[str, Any]) -> dict[str, Any]:
        caps = self.caps
        if not caps.tool_calls:
            return self._calls_as_content(message)
        calls = []
        for call in message["tool_calls"]:
            function = dict(call["function"])
            if caps.object_arguments:
                function["arguments"] = _arguments_object(function.get("arguments"))
            calls.append({**call, "function": function})
        # some templates need a content string beside the calls (llama.cpp's
        # requires_non_null_content)
        return {**message, "content": message.get("content") or "", "tool_calls": calls}

    def _calls_as_content(self, message: dict[str, Any]) -> dict[str, Any]:
        # minja's tool_calls polyfill, written as the constrained model writes calls
        # (compact JSON, no ids: the server gives the ids)
        calls = []
        for call in message["tool_calls"]:
            function = call["function"]
            args = function.get("arguments", {})
            if isinstance(args, str):
                with contextlib.suppress(json.JSONDecodeError):
                    args = json.loads(args)
            calls.append({"name": function["name"], "arguments": args})
        if self.parallel or len(calls) > 1:
            body: dict[str, Any] = {"tool_calls": calls}
        else:
            body = {"tool_call": calls[0]}
        if message.get("content"):
            body["content"] = message["content"]
        out = {k: v for k, v in message.items() if k != "tool_calls"}
        return {**out, "content": json.dumps(body, ensure_ascii=False)}

    def _system_prompt(self) -> str:
        """What the system prompt must add: the tools, if the template cannot show them
        (minja's polyfill), and the generic format's rule (llama.cpp's generic format)."""
        parts = []
        if not self.caps.tools:
            described = TOOLS_PROMPT + json.dumps(self.tools, ensure_ascii=False, indent=2)
            parts.append(f"{described}\n\nExample tool call syntax:\n\n{self._example()}")
        if self.format is ToolFormat.GENERIC:
            parts.append(GENERIC_REQUIRED_PROMPT if self.choice.forced else GENERIC_AUTO_PROMPT)
        return "\n\n".join(parts)

    def _example(self) -> str:
        call = {"name": "tool_name", "arguments": {"arg1": "some_value"}}
        if self.format is ToolFormat.HERMES:
            return f"<tool_call>\n{json.dumps(call)}\n</tool_call>"
        if self.format is ToolFormat.LLAMA3:
            return json.dumps({"name": "tool_name", "parameters": call["arguments"]})
        if self.format is ToolFormat.MISTRAL:
            return "[TOOL_CALLS]" + json.dumps([{**call, "id": "a1b2c3d4e"}])
        if self.parallel:
            return json.dumps({"tool_calls": [call]})
        return json.dumps({"tool_call": call})

    # the decoding constraint

    def constraint(self, special_token: Callable[[str], int | None] = lambda _: None) -> dict:
        """SamplingParams fields that constrain this request's output ({} if none):
        `json_schema` for the generic format, a Lark `grammar` with the format's wrapper
        otherwise. `special_token(text)` gives the id of a single special token (its text
        cannot be reached through plain bytes under llguidance), or None."""
        if not self.parses:
            return {}
        if self.format is ToolFormat.GENERIC:
            return {"json_schema": self.generic_schema()}
        if not self.choice.forced:
            return {}  # native formats: the model writes content or calls freely
        return {"grammar": self.native_grammar(special_token)}

    def _allowed(self) -> list[dict[str, Any]]:
        if self.choice.mode == "function":
            return [t for t in self.tools if t["function"]["name"] == self.choice.name]
        return self.tools

    def call_schema(self, args_key: str = "arguments", with_id: bool = False) -> dict[str, Any]:
        """A JSON schema of one call of an allowed tool: {"name": ..., args_key: ...}."""
        alternatives = []
        for tool in self._allowed():
            function = tool["function"]
            props: dict[str, Any] = {
                "name": {"type": "string", "const": function["name"]},
                args_key: _closed(function["parameters"]),
            }
            required = ["name", args_key]
            if with_id:
                props["id"] = {"type": "string", "pattern": "^[a-zA-Z0-9]{9}$"}
                required.append("id")
            alternatives.append(_object(props, required))
        return alternatives[0] if len(alternatives) == 1 else {"anyOf": alternatives}

    def generic_schema(self) -> dict[str, Any]:
        """llama.cpp's generic format: a call (or a list of them) or, under "auto", a reply."""
        call = self.call_schema()
        if self.parallel:
            calls = {"type": "array", "items": call, "minItems": 1}
            schema = _object({"tool_calls": calls}, ["tool_calls"])
        else:
            schema = _object({"tool_call": call}, ["tool_call"])
        if self.choice.forced:
            return {**schema, "x-guidance": _X_GUIDANCE}
        response = _object({"response": {"type": "string"}}, ["response"])
        return {"anyOf": [schema, response], "x-guidance": _X_GUIDANCE}

    def native_grammar(self, special_token: Callable[[str], int | None]) -> str:
        """A Lark grammar (llguidance) for one or more calls in the format's own wrapper."""

        def lit(text: str) -> str:
            token = special_token(text)
            return f"<[{token}]>" if token is not None else json.dumps(text)

        def schema(s: dict[str, Any]) -> str:
            return json.dumps({**s, "x-guidance": _X_GUIDANCE}, ensure_ascii=False)

        if self.format is ToolFormat.HERMES:
            call = f'{lit("<tool_call>")} "\\n" json "\\n" {lit("</tool_call>")}'
            start = 'call ("\\n" call)*' if self.parallel else "call"
            return f"start: {start}\ncall: {call}\njson: %json {schema(self.call_schema())}"
        if self.format is ToolFormat.LLAMA3:
            return f"start: %json {schema(self.call_schema('parameters'))}"
        calls = {"type": "array", "items": self.call_schema(with_id=True), "minItems": 1}
        if not self.parallel:
            calls["maxItems"] = 1
        return f"start: {lit('[TOOL_CALLS]')} json\njson: %json {schema(calls)}"


def _object(properties: dict[str, Any], required: list[str]) -> dict[str, Any]:
    """A JSON object schema with exactly these keys allowed."""
    return {
        "type": "object",
        "properties": properties,
        "required": required,
        "additionalProperties": False,
    }


def _closed(parameters: dict[str, Any]) -> dict[str, Any]:
    """A function's parameters schema without undeclared arguments, unless it allows them
    (a model constrained by an open schema invents arguments the function does not take)."""
    if "properties" in parameters and "additionalProperties" not in parameters:
        return {**parameters, "additionalProperties": False}
    return parameters


def _check_history(messages: list[dict[str, Any]]) -> None:
    for i, m in enumerate(messages):
        calls = m.get("tool_calls")
        if calls is None:
            continue
        if not isinstance(calls, list):
            raise ToolError(f"messages[{i}].tool_calls must be a list", f"messages[{i}]")
        for j, call in enumerate(calls):
            where = f"messages[{i}].tool_calls[{j}]"
            function = call.get("function") if isinstance(call, Mapping) else None
            if not isinstance(function, Mapping) or not isinstance(function.get("name"), str):
                raise ToolError(f"{where}.function must be an object with a 'name'", where)
            args = function.get("arguments", "{}")
            if not isinstance(args, str | Mapping):
                raise ToolError(f"{where}.function.arguments must be a JSON string", where)


def _arguments_object(args: Any) -> Any:
    # llama.cpp's func_args_not_string: templates that write arguments with tojson want a dict
    if not isinstance(args, str):
        return args if args is not None else {}
    try:
        return json.loads(args)
    except json.JSONDecodeError:
        return args


def _tool_response_as_user(message: dict[str, Any]) -> dict[str, Any]:
    # minja's tool_responses polyfill
    response: dict[str, Any] = {}
    if message.get("name"):
        response["tool"] = message["name"]
    response["content"] = message.get("content", "")
    if message.get("tool_call_id"):
        response["tool_call_id"] = message["tool_call_id"]
    body = json.dumps({"tool_response": response}, ensure_ascii=False, indent=2)
    return {"role": "user", "content": body, "is_tool_response": True}


def _add_system(messages: list[dict[str, Any]], text: str) -> list[dict[str, Any]]:
    # minja's add_system: appended to the system message, or a new one first
    if messages and messages[0].get("role") == "system":
        first = messages[0]
        return [{**first, "content": f"{first.get('content') or ''}\n\n{text}"}, *messages[1:]]
    return [{"role": "system", "content": text}, *messages]


def _merge_system(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    # llama.cpp's system_message_not_supported
    if not messages or messages[0].get("role") != "system":
        return messages
    if len(messages) == 1:
        return []
    system, nxt = messages[0], messages[1]
    merged = f"{system.get('content') or ''}\n{nxt.get('content') or ''}"
    return [{**nxt, "content": merged}, *messages[2:]]


# --- parsing the output -----------------------------------------------------------------------


@dataclass
class ParsedMessage:
    """The assistant message: content (None if empty and there are calls) and tool calls in
    OpenAI's shape ({"id", "type": "function", "function": {"name", "arguments": str}})."""

    content: str | None
    tool_calls: list[dict[str, Any]] = field(default_factory=list)


class _Malformed(Exception):
    pass


def parse_tool_calls(
    text: str,
    fmt: ToolFormat,
    names: Sequence[str],
    new_id: Callable[[], str] | None = None,
) -> ParsedMessage:
    """Parse a whole model output. A malformed tool region (bad JSON, an unknown function,
    text after the calls) means no calls: the text is returned as content."""
    new_id = new_id or (lambda: "call_" + "".join(secrets.choice(_ID_CHARS) for _ in range(24)))
    try:
        content, raw_calls = _PARSERS[fmt](text)
        calls = [_openai_call(c, names, new_id) for c in raw_calls]
    except _Malformed:
        return ParsedMessage(text)
    if not calls:
        return ParsedMessage(_valid_unicode(content) if fmt is ToolFormat.GENERIC else text)
    seen: set[str] = set()
    for call in calls:  # ids must be unique within a message; a model may repeat one
        if call["id"] in seen:
            call["id"] = new_id()
        seen.add(call["id"])
    return ParsedMessage(_valid_unicode(content).rstrip() or None, calls)


def _openai_call(
    raw: tuple[Any, str], names: Sequence[str], new_id: Callable[[], str]
) -> dict[str, Any]:
    obj, args_key = raw
    if not isinstance(obj, dict) or obj.get("name") not in names:
        raise _Malformed
    args = obj.get(args_key, obj.get("arguments", {}))
    if isinstance(args, str):
        try:
            args = json.loads(args)
        except json.JSONDecodeError:
            raise _Malformed from None
    if not isinstance(args, dict):
        raise _Malformed
    call_id = obj.get("id")
    if not isinstance(call_id, str) or not call_id:
        call_id = new_id()
    arguments = _valid_unicode(json.dumps(args, ensure_ascii=False))
    function = {"name": obj["name"], "arguments": arguments}
    return {"id": call_id, "type": "function", "function": function}


_DECODER = json.JSONDecoder()


def _json_at(text: str, i: int) -> tuple[Any, int]:
    """The JSON value starting at text[i] (after whitespace) and the index after it."""
    i = _skip_ws(text, i)
    try:
        return _DECODER.raw_decode(text, i)
    except json.JSONDecodeError:
        raise _Malformed from None


def _skip_ws(text: str, i: int) -> int:
    while i < len(text) and text[i].isspace():
        i += 1
    return i


def _parse_hermes(text: str) -> tuple[str, list[tuple[Any, str]]]:
    start = text.find("<tool_call>")
    if start < 0:
        if _BARE_CALL.match(text):  # the tags are control tokens in some vocabularies: hidden
            return "", _bare_calls(text)
        return text, []
    calls, i = [], start
    while i < len(text):
        if not text.startswith("<tool_call>", i):
            raise _Malformed  # text after the calls
        obj, i = _json_at(text, i + len("<tool_call>"))
        calls.append((obj, "arguments"))
        i = _skip_ws(text, i)
        if text.startswith("</tool_call>", i):
            i = _skip_ws(text, i + len("</tool_call>"))
        elif i < len(text):  # only the last call may lack its closing tag (end of generation)
            raise _Malformed
    return text[:start], calls


_LLAMA3_CALL = re.compile(r'\{\s*(?:"type"\s*:\s*"function"\s*,\s*)?"name"\s*:')
_BARE_CALL = re.compile(r'\s*\{\s*"name"\s*:')


def _bare_calls(text: str) -> list[tuple[Any, str]]:
    """Calls written as JSON objects one after the other, nothing else."""
    calls, i = [], 0
    while _skip_ws(text, i) < len(text):
        obj, i = _json_at(text, i)
        calls.append((obj, "arguments"))
    return calls


def _parse_llama3(text: str) -> tuple[str, list[tuple[Any, str]]]:
    tag = text.find("<|python_tag|>")
    found = _LLAMA3_CALL.search(text)
    if found is None:
        if tag >= 0:
            raise _Malformed
        return text, []
    start = found.start()
    before = text[:start]
    if tag >= 0:
        if tag > start or before[tag + len("<|python_tag|>") :].strip():
            raise _Malformed
        before = text[:tag]
    calls, i = [], start
    while i < len(text):
        obj, i = _json_at(text, i)
        calls.append((obj, "parameters"))
        i = _skip_ws(text, i)
        if text.startswith(";", i):
            i = _skip_ws(text, i + 1)
    return before, calls


def _parse_mistral(text: str) -> tuple[str, list[tuple[Any, str]]]:
    marker = text.find("[TOOL_CALLS]")
    if marker >= 0:
        before, i = text[:marker], marker + len("[TOOL_CALLS]")
    elif text.lstrip().startswith("[{"):  # [TOOL_CALLS] is a control token: often not in text
        before, i = "", 0
    else:
        return text, []
    value, i = _json_at(text, i)
    if not isinstance(value, list) or not value or _skip_ws(text, i) < len(text):
        raise _Malformed
    return before, [(obj, "arguments") for obj in value]


def _parse_generic(text: str) -> tuple[str, list[tuple[Any, str]]]:
    body = text.strip()
    fenced = re.fullmatch(r"```(?:json)?\s*(.*?)\s*```", body, re.S)
    if fenced:
        body = fenced.group(1)
    try:
        value = json.loads(body)
    except json.JSONDecodeError:
        reply = _GENERIC_REPLY.match(body)  # cut short (max_tokens): the reply so far
        return (_partial_json_string(body[reply.end() :]) if reply else text), []
    if not isinstance(value, dict):
        return text, []
    if "tool_calls" in value:
        calls = value["tool_calls"]
        if not isinstance(calls, list) or not calls:
            raise _Malformed
        return _generic_content(value), [(c, "arguments") for c in calls]
    if "tool_call" in value:
        return _generic_content(value), [(value["tool_call"], "arguments")]
    if "response" in value:
        response = value["response"]
        return response if isinstance(response, str) else json.dumps(response), []
    return text, []


_GENERIC_REPLY = re.compile(r'\{\s*"response"\s*:\s*"')


def _partial_json_string(body: str) -> str:
    """The text of a JSON string whose opening quote came just before `body`: up to its
    closing quote, or as much as is complete (an escape cut in half is left out)."""
    end, escaped = len(body), False
    for i, c in enumerate(body):
        if escaped:
            escaped = False
        elif c == "\\":
            escaped = True
        elif c == '"':
            end = i
            break
    for cut in range(end, max(end - 12, -1), -1):  # the longest escape is \uXXXX\uXXXX
        try:
            text = json.loads('"' + body[:cut] + '"')
        except json.JSONDecodeError:
            continue
        unclosed = cut < end or end == len(body)
        if unclosed and text and "\ud800" <= text[-1] <= "\udbff":
            continue  # the first half of a surrogate pair: its second may follow
        return _valid_unicode(text)
    return ""


def _valid_unicode(text: str) -> str:
    """`text` with lone surrogates (JSON escapes such as a "\\ud83d" alone) as U+FFFD: the
    answer must encode as UTF-8."""
    return text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")


def _generic_content(value: dict[str, Any]) -> str:
    content = value.get("content", "")
    return content if isinstance(content, str) else ""


_PARSERS: dict[ToolFormat, Callable[[str], tuple[str, list[tuple[Any, str]]]]] = {
    ToolFormat.HERMES: _parse_hermes,
    ToolFormat.LLAMA3: _parse_llama3,
    ToolFormat.MISTRAL: _parse_mistral,
    ToolFormat.GENERIC: _parse_generic,
}


# --- streaming ---------------------------------------------------------------------------------

_MARKERS: dict[ToolFormat, tuple[str, ...]] = {
    ToolFormat.HERMES: ("<tool_call>",),
    ToolFormat.LLAMA3: ("<|python_tag|>", "{"),
    ToolFormat.MISTRAL: ("[TOOL_CALLS]",),
    ToolFormat.GENERIC: (),
}


class ToolCallStreamer:
    """One choice's stream: text pieces in, OpenAI chat-completion deltas out.

    Content before a possible tool-call region streams at once (trailing whitespace and a
    partial marker are held back); the region itself is held until the end, then parsed
    exactly as `parse_tool_calls` parses the whole text, so a streamed answer rebuilds the
    non-streamed one: the calls come as OpenAI sends them, per call a delta with its index,
    id, type and name (arguments ""), then deltas with the arguments.
    """

    def __init__(self, plan: ToolPlan) -> None:
        self.plan = plan
        self.text = ""
        self.sent = ""  # content already streamed
        self.parsed: ParsedMessage | None = None

    def feed(self, piece: str) -> list[dict[str, Any]]:
        self.text += piece
        safe = self._safe_prefix()
        if len(safe) <= len(self.sent):
            return []
        new, self.sent = safe[len(self.sent) :], safe
        return [{"content": new}]

    def _safe_prefix(self) -> str:
        """The longest prefix of the text that is content whatever comes next."""
        fmt, text = self.plan.format, self.text
        if fmt is ToolFormat.GENERIC:
            body = text.lstrip()
            reply = _GENERIC_REPLY.match(body)
            if reply:  # {"response": "...": the reply streams as it is written
                return _partial_json_string(body[reply.end() :])
            if not body or body[0] in "{`":
                return ""  # may be the JSON answer
            return text
        hidden_start = {ToolFormat.MISTRAL: "[", ToolFormat.HERMES: "{"}.get(fmt)
        if hidden_start and text.lstrip()[:1] in ("", hidden_start):
            return ""  # may be a call whose opening control token is not in the text
        end = len(text)
        for marker in _MARKERS[fmt]:
            at = text.find(marker)
            if at >= 0:
                end = min(end, at)
            end = min(end, _partial_marker_at(text, marker))
        return text[:end].rstrip()

    def finish(self) -> list[dict[str, Any]]:
        """Deltas for what was held back, once the generation ended."""
        plan = self.plan
        self.parsed = parse_tool_calls(self.text, plan.format, plan.names, plan.new_id)
        content = self.parsed.content or ""
        deltas: list[dict[str, Any]] = []
        if content.startswith(self.sent) and len(content) > len(self.sent):
            deltas.append({"content": content[len(self.sent) :]})
        for index, call in enumerate(self.parsed.tool_calls):
            head = {"name": call["function"]["name"], "arguments": ""}
            first = {"index": index, "id": call["id"], "type": "function", "function": head}
            args = {"index": index, "function": {"arguments": call["function"]["arguments"]}}
            deltas += [{"tool_calls": [first]}, {"tool_calls": [args]}]
        return deltas

    @property
    def has_calls(self) -> bool:
        return bool(self.parsed and self.parsed.tool_calls)


def _partial_marker_at(text: str, marker: str) -> int:
    """Where a proper prefix of `marker` ends the text (len(text) if none)."""
    for n in range(min(len(marker) - 1, len(text)), 0, -1):
        if text.endswith(marker[:n]):
            return len(text) - n
    return len(text)


def finish_reason(engine_reason: str | None, has_calls: bool) -> str | None:
    """OpenAI's finish reason: "tool_calls" when the message has calls (as llama-server)."""
    return "tool_calls" if has_calls else engine_reason


def special_token_lookup(tokenizer: Any) -> Callable[[str], int | None]:
    """text -> id of the single special token spelling it (control or `<...>` user-defined
    tokens, which llguidance reaches only by id), else None."""
    from llamapy.tokenizer import TokenAttr

    def lookup(text: str) -> int | None:
        ids = tokenizer.encode(text, add_special=False, parse_special=True)
        if len(ids) != 1:
            return None
        attr = tokenizer.vocab.attrs[ids[0]]
        looks_special = text.startswith("<") and text.endswith(">")
        if attr & TokenAttr.CONTROL or (attr & TokenAttr.USER_DEFINED and looks_special):
            return ids[0]
        return None

    return lookup
