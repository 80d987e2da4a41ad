"""Chat templates: Jinja templates rendered exactly as Hugging Face transformers renders them.

A model's template (GGUF ``tokenizer.chat_template`` or HF ``chat_template``) is untrusted
code, so it runs in jinja2's immutable sandbox with the same globals, filters and input
clean-up as transformers' ``render_jinja_template`` (transformers/utils/chat_template_utils.py).
Models without a template can use a named fallback that produces what llama.cpp's
``llm_chat_apply_template`` (src/llama-chat.cpp) produces for that name.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import jinja2
import jinja2.ext
import jinja2.nodes
import jinja2.utils
import numpy as np
from jinja2.sandbox import ImmutableSandboxedEnvironment

from llamapy.errors import LlamapyError

__all__ = [
    "ChatTemplate",
    "TemplateError",
    "detect_template_name",
    "list_named_templates",
    "resolve_chat_template",
]

# Names a message's reasoning is passed under; the first is the one templates read.
_REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")
_CONTINUE_TAG = "CONTINUE_FINAL_MESSAGE_TAG "


class TemplateError(LlamapyError):
    """A chat template is malformed, or failed (or refused) to render the given messages."""


def list_named_templates() -> list[str]:
    """Names accepted by ``resolve_chat_template`` for models without a template of their own."""
    return sorted(_NAMED_TEMPLATES)


class ChatTemplate:
    """A compiled chat template; ``render`` turns messages into the prompt text."""

    def __init__(
        self, source: str, *, bos_token: str = "", eos_token: str = "", name: str | None = None
    ) -> None:
        self.source = source
        self.bos_token = bos_token
        self.eos_token = eos_token
        self.name = name if name is not None else detect_template_name(source)
        self._template = _compile(source)

    def __repr__(self) -> str:
        return f"ChatTemplate(name={self.name!r}, {len(self.source)} chars)"

    def render(
        self,
        messages: Sequence[Mapping[str, Any]],
        *,
        add_generation_prompt: bool = True,
        tools: Sequence[Mapping[str, Any]] | None = None,
        documents: Sequence[Mapping[str, Any]] | None = None,
        continue_final_message: bool = False,
        **kwargs: Any,
    ) -> str:
        """Render a conversation as transformers' ``apply_chat_template(..., tokenize=False)``.

        Args:
            messages: dicts (or dataclasses / pydantic models) with ``role``, ``content`` and
                optional ``tool_calls``, ``reasoning_content``, ...; keys set to None are dropped.
            add_generation_prompt: end with the header of an assistant turn.
            tools: JSON schemas of the tools the model may call.
            documents: RAG documents (dicts, usually with ``title`` and ``text``).
            continue_final_message: leave the last message open so the model continues it
                (assistant prefill); needs ``add_generation_prompt=False``.
            **kwargs: extra template variables; they override ``bos_token`` / ``eos_token``.

        Raises:
            TemplateError: the template raised (``raise_exception``, a sandbox violation or any
                other error while rendering) or dropped the message to continue.
        """
        if continue_final_message and add_generation_prompt:
            raise ValueError(
                "continue_final_message=True needs add_generation_prompt=False: a conversation "
                "either continues its last message or starts a new assistant turn"
            )
        chat = _clean_messages(messages)
        final_content = self._tag_final_message(chat) if continue_final_message else None
        variables = _plain_data(
            {"bos_token": self.bos_token, "eos_token": self.eos_token, **kwargs}
        )
        text = self._render(
            messages=chat,
            tools=_clean_tools(tools),
            documents=_clean_documents(documents),
            add_generation_prompt=add_generation_prompt,
            **variables,
        )
        return text if final_content is None else _cut_at_tag(text, final_content)

    def _render(self, **variables: Any) -> str:
        try:
            return self._template.render(**variables)
        except jinja2.TemplateError as exc:
            raise TemplateError(f"chat template {self._label()} failed: {exc}") from exc
        except Exception as exc:  # the template is foreign code: any failure is the template's
            raise TemplateError(
                f"chat template {self._label()} failed: {type(exc).__name__}: {exc}"
            ) from exc

    def _label(self) -> str:
        return repr(self.name) if self.name else "(unnamed)"

    def _tag_final_message(self, chat: list[dict[str, Any]]) -> str:
        # As transformers: mark the end of the final message, render, then cut at the mark.
        if not chat:
            raise TemplateError("continue_final_message is set but the conversation is empty")
        final = chat[-1].get("content")
        if final is None:
            raise TemplateError("continue_final_message is set but the last message has no content")
        if "content" not in self.source:
            raise TemplateError(
                f"chat template {self._label()} never reads 'content', so it cannot continue "
                "the last message"
            )
        if isinstance(final, list | tuple):
            for block in reversed(final):
                if "text" in block:
                    final_text = block["text"]
                    block["text"] = final_text + _CONTINUE_TAG
                    return final_text
            raise TemplateError("continue_final_message is set but the last message has no text")
        chat[-1]["content"] = final + _CONTINUE_TAG
        return final


def _cut_at_tag(text: str, final_content: str) -> str:
    if final_content.strip() not in text or _CONTINUE_TAG.strip() not in text:
        raise TemplateError(
            "continue_final_message is set but the chat template dropped (part of) the last "
            "message, so it cannot be continued"
        )
    tag_at = text.rindex(_CONTINUE_TAG.strip())
    if text[tag_at : tag_at + len(_CONTINUE_TAG)] == _CONTINUE_TAG:
        return text[:tag_at]
    return text[:tag_at].rstrip()  # the template trimmed the message's trailing space


def resolve_chat_template(
    spec: str | None,
    *,
    model_template: str | None,
    bos_token: str = "",
    eos_token: str = "",
) -> ChatTemplate | None:
    """The chat template to use for ``--chat-template SPEC``.

    Args:
        spec: None (use the model's template), a name from ``list_named_templates()``, a
            file (``.jinja`` text, or a ``.json`` such as tokenizer_config.json with a
            ``chat_template`` key), or a template itself (text containing ``{{`` or ``{%``).
        model_template: the model file's own template, if any.

    Returns:
        The template, or None if spec is None and the model has none (llama.cpp then falls
        back to chatml; the caller decides).

    Raises:
        TemplateError: spec names no template or file, or the template does not compile.
    """
    tokens = {"bos_token": bos_token, "eos_token": eos_token}
    if spec is None:
        if model_template is None:
            return None
        return ChatTemplate(model_template, **tokens)
    if spec in _NAMED_TEMPLATES:
        return ChatTemplate(_NAMED_TEMPLATES[spec], name=spec, **tokens)
    if "{{" in spec or "{%" in spec:
        return ChatTemplate(spec, **tokens)
    path = Path(spec).expanduser()
    if path.is_file():
        return ChatTemplate(_read_template_file(path), **tokens)
    raise TemplateError(
        f"unknown chat template {spec!r}: it is neither a file nor one of the named templates "
        f"({', '.join(list_named_templates())})"
    )


def _read_template_file(path: Path) -> str:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise TemplateError(f"cannot read chat template file {path}: {exc}") from exc
    if path.suffix != ".json":
        return text
    try:
        template = json.loads(text).get("chat_template")
    except (json.JSONDecodeError, AttributeError) as exc:
        raise TemplateError(f"{path} is not a JSON object: {exc}") from exc
    if isinstance(template, list):  # named templates: [{"name": ..., "template": ...}]
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    if not isinstance(template, str):
        raise TemplateError(f"{path} has no 'chat_template' string (or 'default' entry)")
    return template


# --- the sandbox, as transformers' _cached_compile_jinja_template ----------------------------


class _GenerationTag(jinja2.ext.Extension):
    """``{% generation %}...{% endgeneration %}`` renders its body (transformers uses it to
    find assistant tokens; here it must only parse)."""

    tags = {"generation"}

    def parse(self, parser: Any) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

    def _body(self, caller: Callable[[], str]) -> str:
        return caller()


class _TemplateDict:
    # `dict` for templates without the class itself, so no attribute of it leads outside.
    def __call__(self, *args: Any, **kwargs: Any) -> dict[Any, Any]:
        return dict(*args, **kwargs)

    def fromkeys(self, *args: Any, **kwargs: Any) -> dict[Any, Any]:
        return dict.fromkeys(*args, **kwargs)


class _TemplateNamespace(jinja2.utils.Namespace):
    # Namespaces refuse underscore names, which could reach CPython internals.
    def __init__(*args: Any, **kwargs: Any) -> None:  # no `self`: jinja allows namespace(self=...)
        self, args = args[0], args[1:]
        attrs = dict(*args, **kwargs)
        for name in attrs:
            _TemplateNamespace._check_name(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name: str, value: Any) -> None:
        _TemplateNamespace._check_name(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check_name(name: Any) -> None:
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(
                f"chat templates cannot store underscore names on a namespace, got {name!r}"
            )


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(
    x: Any,
    ensure_ascii: bool = False,
    indent: int | str | None = None,
    separators: tuple[str, str] | None = None,
    sort_keys: bool = False,
) -> str:
    # transformers' filter: jinja's own escapes HTML characters, which templates do not want.
    return json.dumps(
        x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


def _strftime_now(format: str) -> str:
    return datetime.now().strftime(format)


def _jinja_version_ok() -> bool:
    # Versions before 3.1.6 have known sandbox escapes (as transformers refuses them).
    parts = tuple(int(p) for p in jinja2.__version__.split(".")[:3] if p.isdigit())
    return parts >= (3, 1, 6)


def _compile(source: str) -> jinja2.Template:
    if not isinstance(source, str):
        raise TypeError(f"a chat template is a str, not {type(source).__name__}")
    if not _jinja_version_ok():
        raise TemplateError(
            f"jinja2 {jinja2.__version__} has known sandbox escapes; install jinja2>=3.1.6"
        )
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationTag, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    env.globals["dict"] = _TemplateDict()
    env.globals["namespace"] = _TemplateNamespace
    try:
        return env.from_string(source)
    except jinja2.TemplateSyntaxError as exc:
        raise TemplateError(f"chat template does not compile: line {exc.lineno}: {exc}") from exc
    except jinja2.TemplateError as exc:
        raise TemplateError(f"chat template does not compile: {exc}") from exc


# --- inputs, as transformers' _normalize_chat_messages and _plain_template_data --------------


def _plain_data(value: Any) -> Any:
    """Rebuild a value from plain JSON types: the sandbox does not know which methods of
    rich objects (arrays, images, enums) are dangerous, so templates never see them."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, str):
        return str.__str__(value)
    if isinstance(value, int):
        return int.__int__(value)
    if isinstance(value, float):
        return float.__float__(value)
    if isinstance(value, Mapping):
        return {_plain_data(k): _plain_data(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain_data(item) for item in value]
    if isinstance(value, tuple):
        return tuple(_plain_data(item) for item in value)
    if isinstance(value, np.generic):
        return _plain_data(value.item())
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        fields = dataclasses.fields(value)
        return {f.name: _plain_data(getattr(value, f.name)) for f in fields}
    if callable(getattr(value, "model_dump", None)):  # pydantic models (OpenAI SDK messages)
        return _plain_data(value.model_dump())
    return f"<{type(value).__name__}>"  # templates test media keys, never read their values


def _clean_messages(messages: Sequence[Any]) -> list[dict[str, Any]]:
    chat = []
    for message in _plain_data(list(messages)):
        if not isinstance(message, dict):
            raise TypeError(f"chat messages are dicts, dataclasses or pydantic models: {message!r}")
        # Templates handle a missing key but not `content: None` (OpenAI sends it with tool calls).
        chat.append(_alias_reasoning({k: v for k, v in message.items() if v is not None}))
    return chat


def _alias_reasoning(message: dict[str, Any]) -> dict[str, Any]:
    # `reasoning_content` is the standard name; gpt-oss templates read `thinking`.
    reasoning = next((message[k] for k in _REASONING_FIELDS if message.get(k) is not None), None)
    if reasoning is None:
        return message
    return {"thinking": reasoning, **message, "reasoning_content": reasoning}


def _clean_tools(tools: Sequence[Mapping[str, Any]] | None) -> list[Any] | None:
    if tools is None:
        return None
    for tool in tools:
        if not isinstance(tool, Mapping):
            raise TypeError(f"tools are JSON schemas (dicts), not {type(tool).__name__}")
    return _plain_data(list(tools))


def _clean_documents(documents: Sequence[Mapping[str, Any]] | None) -> list[Any] | None:
    if documents is None:
        return None
    for document in documents:
        if not isinstance(document, Mapping):
            raise TypeError("documents are dicts, usually with 'title' and 'text' keys")
    return _plain_data(list(documents))


# --- named fallbacks, as llama.cpp's llm_chat_apply_template ----------------------------------
# Each renders what llama.cpp renders for the name: no BOS (llama.cpp's tokenizer adds it),
# "</s>" and other end tokens written literally, `trim` where llama.cpp calls trim(). Content
# parts are joined as common_chat_templates_apply_legacy joins them (text parts, "\n" between);
# tool calls are not written, as llama.cpp's C++ templates have no place for them.


def _lit(text: str) -> str:
    """A Jinja string literal (Python's repr is one: same quotes and escapes)."""
    return repr(text)


def _emit(*parts: str) -> str:
    """Output the concatenation of Jinja expressions."""
    return "{{ " + " + ".join(parts) + " }}"


def _template(
    by_role: Mapping[str, str] | None = None,
    *,
    other: str = "",
    head: str = "",
    over: str = "messages",
    before: str = "",
    after: str = "",
    gen: str = "",
) -> str:
    """Write ``head``, then for each message of ``over``: ``before``, ``by_role[role]`` (Jinja
    text; ``other`` for roles not listed), ``after``; then ``gen`` if add_generation_prompt."""
    branches = ""
    for i, (role, body) in enumerate((by_role or {}).items()):
        branches += "{%- " + ("if" if i == 0 else "elif") + f" role == {_lit(role)} %}}" + body
    if branches:
        branches += ("{%- else %}" + other if other else "") + "{%- endif %}"
    else:
        branches = other
    loop = (
        f"{{%- for message in {over} %}}{{%- set role = message['role'] %}}"
        "{%- set content = message['content'] if message['content'] is string else "
        "message['content']|selectattr('type', 'equalto', 'text')|map(attribute='text')"
        "|join('\\n') %}"
    )
    tail = "{%- if add_generation_prompt %}" + _emit(_lit(gen)) + "{%- endif %}" if gen else ""
    return head + loop + before + branches + after + "{%- endfor %}" + tail


def _each(
    prefix: str, middle: str, suffix: str, *, trim: bool = False, head: str = "", gen: str = ""
) -> str:
    """Every role as ``prefix + role + middle + content + suffix``, after text ``head``."""
    content = "content|trim" if trim else "content"
    turn = _emit(_lit(prefix), "role", _lit(middle), content, _lit(suffix))
    return _template(other=turn, head=_emit(_lit(head)) if head else "", gen=gen)


def _llama2(*, system: bool, bos_inside: bool = False, strip: bool = False) -> str:
    content = "{%- set content = content|trim %}" if strip else ""
    reopen = "<s>[INST] " if bos_inside else "[INST] "
    sys_body = (
        _emit(_lit("<<SYS>>\n"), "content", _lit("\n<</SYS>>\n\n"))
        if system
        else _emit("content", _lit("\n"))  # no system support: the text joins the first turn
    )
    return _template(
        {
            "system": content + sys_body,
            "user": content + _emit("content", _lit(" [/INST]")),
        },
        other=content + _emit("content", _lit("</s>")) + "{%- set ns.inside = false %}",
        head="{%- set ns = namespace(inside=true) %}" + _emit(_lit("[INST] ")),
        before="{%- if not ns.inside %}{%- set ns.inside = true %}"
        + _emit(_lit(reopen))
        + "{%- endif %}",
    )


def _mistral(*, leading: str, trailing: str, trim_assistant: bool) -> str:
    assistant = "content|trim" if trim_assistant else "content"
    return _template(
        {
            "system": _emit("content", _lit("\n\n")),
            "user": _emit("content", _lit(leading + "[/INST]")),
        },
        other=_emit(_lit(trailing), assistant, _lit("</s>")) + "{%- set ns.inside = false %}",
        head="{%- set ns = namespace(inside=false) %}",
        before="{%- if not ns.inside %}{%- set ns.inside = true %}"
        + _emit(_lit(leading + "[INST]" + trailing))
        + "{%- endif %}",
    )


def _mistral_v7(space: str) -> str:
    return _template(
        {
            "system": _emit(_lit("[SYSTEM_PROMPT]" + space), "content", _lit("[/SYSTEM_PROMPT]")),
            "user": _emit(_lit("[INST]" + space), "content", _lit("[/INST]")),
        },
        other=_emit(_lit(space), "content", _lit("</s>")),
    )


def _gemma() -> str:
    # Gemma has no system turn: llama.cpp prepends the system text to the next user turn.
    return _template(
        {"system": "{%- set ns.system = ns.system + content|trim %}"},
        other=(
            "{%- set turn_role = 'model' if role == 'assistant' else role %}"
            + _emit(_lit("<start_of_turn>"), "turn_role", _lit("\n"))
            + "{%- if ns.system and turn_role != 'model' %}"
            + _emit("ns.system", _lit("\n\n"))
            + "{%- set ns.system = '' %}{%- endif %}"
            + _emit("content|trim", _lit("<end_of_turn>\n"))
        ),
        head="{%- set ns = namespace(system='') %}",
        gen="<start_of_turn>model\n",
    )


def _orion() -> str:
    return _template(
        {
            "system": "{%- set ns.system = ns.system + content %}",
            "user": (
                _emit(_lit("Human: "))
                + "{%- if ns.system %}"
                + _emit("ns.system", _lit("\n\n"))
                + "{%- set ns.system = '' %}{%- endif %}"
                + _emit("content", _lit("\n\nAssistant: </s>"))
            ),
        },
        other=_emit("content", _lit("</s>")),
        head="{%- set ns = namespace(system='') %}",
    )


def _vicuna(*, orca: bool) -> str:
    system = (
        _emit(_lit("SYSTEM: "), "content", _lit("\n")) if orca else _emit("content", _lit("\n\n"))
    )
    return _template(
        {
            "system": system,
            "user": _emit(_lit("USER: "), "content", _lit("\n")),
            "assistant": _emit(_lit("ASSISTANT: "), "content", _lit("</s>\n")),
        },
        gen="ASSISTANT:",
    )


def _roles(turns: Mapping[str, tuple[str, str]], *, trim: bool = False, gen: str = "") -> str:
    """Roles written as ``prefix + content + suffix``; roles not listed are skipped."""
    content = "content|trim" if trim else "content"
    by_role = {r: _emit(_lit(pre), content, _lit(post)) for r, (pre, post) in turns.items()}
    return _template(by_role, gen=gen)


def _exaone(*, tool: bool) -> str:
    turns = {
        "system": ("[|system|]", "[|endofturn|]\n"),
        "user": ("[|user|]", "\n"),
        "assistant": ("[|assistant|]", "[|endofturn|]\n"),
    }
    if tool:
        turns["tool"] = ("[|tool|]", "[|endofturn|]\n")
    return _roles(turns, trim=True, gen="[|assistant|]")


def _granite(*, tool_role_as_assistant: bool) -> str:
    if tool_role_as_assistant:  # granite 4.x writes the call as an assistant turn
        header = (
            "{%- if role == 'assistant_tool_call' %}"
            + _emit(_lit("<|start_of_role|>assistant<|end_of_role|><|tool_call|>"))
            + "{%- else %}"
            + _emit(_lit("<|start_of_role|>"), "role", _lit("<|end_of_role|>"))
            + "{%- endif %}"
        )
    else:
        header = (
            _emit(_lit("<|start_of_role|>"), "role", _lit("<|end_of_role|>"))
            + "{%- if role == 'assistant_tool_call' %}"
            + _emit(_lit("<|tool_call|>"))
            + "{%- endif %}"
        )
    return _template(
        other=header + _emit("content", _lit("<|end_of_text|>\n")),
        gen="<|start_of_role|>assistant<|end_of_role|>",
    )


_HAS_SYSTEM = "messages and messages[0]['role'] == 'system'"


def _gigachat() -> str:
    head = (
        f"{{%- set has_system = {_HAS_SYSTEM} %}}"
        + _emit(_lit("<s>"))
        + "{%- if has_system %}"
        + _emit("messages[0]['content']", _lit("<|message_sep|>"))
        + "{%- endif %}"
    )
    user_end = "<|message_sep|>available functions<|role_sep|>[]<|message_sep|>"
    return _template(
        {
            "user": _emit(_lit("user<|role_sep|>"), "content", _lit(user_end)),
            "assistant": _emit(_lit("assistant<|role_sep|>"), "content", _lit("<|message_sep|>")),
        },
        head=head,
        over="(messages[1:] if has_system else messages)",
        gen="assistant<|role_sep|>",
    )


def _bailing(*, think: bool = False, v2: bool = False) -> str:
    upper = "{%- set tag = 'HUMAN' if role == 'user' else role|upper %}"
    end = _lit("<|role_end|>") if v2 else "''"
    head = ""
    if v2:
        head = (
            f"{{%- if not ({_HAS_SYSTEM}) %}}"
            + _emit(_lit("<role>SYSTEM</role>detailed thinking off<|role_end|>"))
            + "{%- endif %}"
        )
    return _template(
        other=upper + _emit(_lit("<role>"), "tag", _lit("</role>"), "content", end),
        head=head,
        gen="<role>ASSISTANT</role>" + ("<think>" if think else ""),
    )


_FIRST_SYSTEM = (  # hunyuan: only a leading system message is written
    "{%- if loop.first and role == 'system' %}"
    + _emit("content", _lit("<｜hy_place▁holder▁no▁3｜>"))
    + "{%- endif %}"
)


def _hunyuan_dense() -> str:
    return _template(
        {
            "assistant": _emit(
                _lit("<｜hy_Assistant｜>"), "content", _lit("<｜hy_place▁holder▁no▁2｜>")
            ),
            "user": _emit(_lit("<｜hy_User｜>"), "content", _lit("<｜hy_Assistant｜>")),
        },
        before=_FIRST_SYSTEM,
    )


def _hunyuan_vl() -> str:
    return _template(
        {
            "user": _emit("content", _lit("<｜hy_User｜>")),
            "assistant": _emit("content", _lit("<｜hy_Assistant｜>")),
        },
        head=_emit(_lit("<｜hy_begin▁of▁sentence｜>")),
        before=_FIRST_SYSTEM,
    )


def _pangu() -> str:
    names = {
        "system": "系统",
        "user": "用户",
        "assistant": "助手",
        "tool": "工具",
        "function": "方法",
    }
    return _template(
        {
            r: _emit(_lit(f"[unused9]{n}："), "content", _lit("[unused10]"))
            for r, n in names.items()
        },
        before="{%- if loop.first and role != 'system' %}"
        + _emit(_lit("[unused9]系统：[unused10]"))
        + "{%- endif %}",
        gen="[unused9]助手：",
    )


def _rwkv_world() -> str:
    return _template(
        {
            "system": _emit(_lit("System: "), "content|trim", _lit("\n\n")),
            "user": _emit(_lit("User: "), "content|trim", _lit("\n\n"))
            + "{%- if loop.last %}"
            + _emit(_lit("Assistant:"))
            + "{%- endif %}",
            "assistant": _emit(_lit("Assistant: "), "content|trim", _lit("\n\n")),
        }
    )


def _alpaca() -> str:
    # Not in llama.cpp: Stanford Alpaca's prompt, with its preamble when there is no system turn.
    preamble = (
        "Below is an instruction that describes a task. "
        "Write a response that appropriately completes the request."
    )
    return _template(
        {
            "system": _emit("content", _lit("\n\n")),
            "user": _emit(_lit("### Instruction:\n"), "content", _lit("\n\n")),
            "assistant": _emit(_lit("### Response:\n"), "content", "eos_token", _lit("\n\n")),
        },
        head=f"{{%- if not ({_HAS_SYSTEM}) %}}" + _emit(_lit(preamble + "\n\n")) + "{%- endif %}",
        gen="### Response:\n",
    )


_NAMED_TEMPLATES: dict[str, str] = {
    "alpaca": _alpaca(),
    "bailing": _bailing(),
    "bailing-think": _bailing(think=True),
    "bailing2": _bailing(v2=True),
    "chatglm3": _each("<|", "|>\n ", "", head="[gMASK]sop", gen="<|assistant|>"),
    "chatglm4": _each("<|", "|>\n", "", head="[gMASK]<sop>", gen="<|assistant|>\n"),
    "chatml": _each("<|im_start|>", "\n", "<|im_end|>\n", gen="<|im_start|>assistant\n"),
    "command-r": _roles(
        {
            "system": ("<|START_OF_TURN_TOKEN|><|SYSTEM_TOKEN|>", "<|END_OF_TURN_TOKEN|>"),
            "user": ("<|START_OF_TURN_TOKEN|><|USER_TOKEN|>", "<|END_OF_TURN_TOKEN|>"),
            "assistant": ("<|START_OF_TURN_TOKEN|><|CHATBOT_TOKEN|>", "<|END_OF_TURN_TOKEN|>"),
        },
        trim=True,
        gen="<|START_OF_TURN_TOKEN|><|CHATBOT_TOKEN|>",
    ),
    "deepseek": _roles(
        {
            "system": ("", ""),
            "user": ("### Instruction:\n", "\n"),
            "assistant": ("### Response:\n", "\n<|EOT|>\n"),
        },
        gen="### Response:\n",
    ),
    "deepseek2": _roles(
        {
            "system": ("", "\n\n"),
            "user": ("User: ", "\n\n"),
            "assistant": ("Assistant: ", "<｜end▁of▁sentence｜>"),
        },
        gen="Assistant:",
    ),
    "deepseek3": _roles(
        {
            "system": ("", "\n\n"),
            "user": ("<｜User｜>", ""),
            "assistant": ("<｜Assistant｜>", "<｜end▁of▁sentence｜>"),
        },
        gen="<｜Assistant｜>",
    ),
    "deepseek-ocr": _template(other=_emit("content")),
    "dots1": _template(
        {
            "system": _emit(_lit("<|system|>"), "content", _lit("<|endofsystem|>")),
            "user": _emit(_lit("<|userprompt|>"), "content", _lit("<|endofuserprompt|>")),
        },
        other=_emit(_lit("<|response|>"), "content", _lit("<|endofresponse|>")),
        gen="<|response|>",
    ),
    "exaone3": _exaone(tool=False),
    "exaone4": _exaone(tool=True),
    "exaone-moe": _roles(
        {r: (f"<|{r}|>\n", "<|endofturn|>\n") for r in ("system", "user", "assistant", "tool")},
        trim=True,
        gen="<|assistant|>\n",
    ),
    "falcon3": _each("<|", "|>\n", "\n", gen="<|assistant|>\n"),
    "gemma": _gemma(),
    "gigachat": _gigachat(),
    "glmedge": _each("<|", "|>\n", "", gen="<|assistant|>"),
    "gpt-oss": _template(
        other=_emit(
            _lit("<|start|>"),
            "role",
            _lit("<|message|>"),
            "content",
            "('<|return|>' if role == 'assistant' else '<|end|>')",
        ),
        gen="<|start|>assistant",
    ),
    "granite": _granite(tool_role_as_assistant=False),
    "granite-4.0": _granite(tool_role_as_assistant=True),
    "granite-4.1": _granite(tool_role_as_assistant=True),
    "grok-2": _template(
        {
            "system": _emit(_lit("System: "), "content|trim", _lit("<|separator|>\n\n")),
            "user": _emit(_lit("Human: "), "content|trim", _lit("<|separator|>\n\n")),
            "assistant": _emit(_lit("Assistant: "), "content", _lit("<|separator|>\n\n")),
        },
        gen="Assistant:",
    ),
    "hunyuan-dense": _hunyuan_dense(),
    "hunyuan-moe": _template(
        {
            "system": _emit(_lit("<|startoftext|>"), "content", _lit("<|extra_4|>")),
            "assistant": _emit("content", _lit("<|eos|>")),
        },
        other=_emit(_lit("<|startoftext|>"), "content", _lit("<|extra_0|>")),
    ),
    "hunyuan-vl": _hunyuan_vl(),
    "kimi-k2": _template(
        {
            "system": _emit(_lit("<|im_system|>system<|im_middle|>")),
            "user": _emit(_lit("<|im_user|>user<|im_middle|>")),
            "assistant": _emit(_lit("<|im_assistant|>assistant<|im_middle|>")),
            "tool": _emit(_lit("<|im_system|>tool<|im_middle|>")),
        },
        after=_emit("content", _lit("<|im_end|>")),
        gen="<|im_assistant|>assistant<|im_middle|>",
    ),
    "llama2": _llama2(system=False),
    "llama2-sys": _llama2(system=True),
    "llama2-sys-bos": _llama2(system=True, bos_inside=True),
    "llama2-sys-strip": _llama2(system=True, strip=True),
    "llama3": _each(
        "<|start_header_id|>",
        "<|end_header_id|>\n\n",
        "<|eot_id|>",
        trim=True,
        gen="<|start_header_id|>assistant<|end_header_id|>\n\n",
    ),
    "llama4": _each(
        "<|header_start|>",
        "<|header_end|>\n\n",
        "<|eot|>",
        trim=True,
        gen="<|header_start|>assistant<|header_end|>\n\n",
    ),
    "megrez": _each(
        "<|role_start|>", "<|role_end|>", "<|turn_end|>", gen="<|role_start|>assistant<|role_end|>"
    ),
    "minicpm": _template(
        {"user": _emit(_lit("<用户>"), "content|trim", _lit("<AI>"))}, other=_emit("content|trim")
    ),
    "mistral-v1": _mistral(leading=" ", trailing=" ", trim_assistant=False),
    "mistral-v3": _mistral(leading="", trailing=" ", trim_assistant=True),
    "mistral-v3-tekken": _mistral(leading="", trailing="", trim_assistant=False),
    "mistral-v7": _mistral_v7(" "),
    "mistral-v7-tekken": _mistral_v7(""),
    "monarch": _template(
        other=_emit("('' if loop.first else '<s>')", "role", _lit("\n"), "content", _lit("</s>\n")),
        gen="<s>assistant\n",
    ),
    "openchat": _template(
        {"system": _emit("content", _lit("<|end_of_turn|>"))},
        other=_emit(
            _lit("GPT4 Correct "),
            "role[:1]|upper",
            "role[1:]",
            _lit(": "),
            "content",
            _lit("<|end_of_turn|>"),
        ),
        gen="GPT4 Correct Assistant:",
    ),
    "orion": _orion(),
    "pangu-embedded": _pangu(),
    "phi3": _each("<|", "|>\n", "<|end|>\n", gen="<|assistant|>\n"),
    "phi4": _each(
        "<|im_start|>", "<|im_sep|>", "<|im_end|>", gen="<|im_start|>assistant<|im_sep|>"
    ),
    "rwkv-world": _rwkv_world(),
    "seed_oss": _template(
        other=_emit(
            _lit("<seed:bos>"),
            "role",
            _lit("\n"),
            "(content|trim if role == 'assistant' else content)",
            _lit("<seed:eos>"),
        ),
        gen="<seed:bos>assistant\n",
    ),
    "smolvlm": _template(
        {
            "system": _emit("content", _lit("\n\n")),
            "user": _emit(_lit("User: "), "content", _lit("<end_of_utterance>\n")),
        },
        other=_emit(_lit("Assistant: "), "content", _lit("<end_of_utterance>\n")),
        head=_emit(_lit("<|im_start|>")),
        gen="Assistant:",
    ),
    "solar-open": _each("<|begin|>", "<|content|>", "<|end|>", gen="<|begin|>assistant"),
    "vicuna": _vicuna(orca=False),
    "vicuna-orca": _vicuna(orca=True),
    "yandex": _roles(
        {"user": (" Пользователь: ", "\n\n"), "assistant": (" Ассистент: ", "\n\n")},
        gen=" Ассистент:[SEP]",
    ),
    "zephyr": _each("<|", "|>\n", "<|endoftext|>\n", gen="<|assistant|>\n"),
}


def detect_template_name(source: str) -> str | None:
    """The llama.cpp name of a template's format, guessed from marker strings as
    ``llm_chat_detect_template`` does; None if no marker matches."""
    if source in _NAMED_TEMPLATES:
        return source
    for name, test in _DETECTION_ORDER:
        if test(source):
            return name if isinstance(name, str) else name(source)
    return None


def _all(*needles: str) -> Callable[[str], bool]:
    return lambda t: all(n in t for n in needles)


def _detect_chatml(t: str) -> str:
    if "<|im_sep|>" in t:
        return "phi4"
    return "smolvlm" if "<end_of_utterance>" in t else "chatml"


def _detect_inst(t: str) -> str:
    # llama.cpp's mistral / llama2 family, told apart by fragments of the official templates.
    if "[SYSTEM_PROMPT]" in t:
        return "mistral-v7"
    if "' [INST] ' + system_message" in t or "[AVAILABLE_TOOLS]" in t:
        if " [INST]" in t:
            return "mistral-v1"
        return "mistral-v3-tekken" if '"[INST]"' in t else "mistral-v3"
    if "content.strip()" in t:
        return "llama2-sys-strip"
    if "bos_token + '[INST]" in t:
        return "llama2-sys-bos"
    return "llama2-sys" if "<<SYS>>" in t else "llama2"


def _detect_granite(t: str) -> str:
    if "<tool_call>" in t or "<tools>" in t:
        return "granite-4.0" if "g4_default_system_message" in t else "granite-4.1"
    return "granite"


# (name or a function of the template giving it, test), in llm_chat_detect_template's order.
_DETECTION_ORDER: list[tuple[str | Callable[[str], str], Callable[[str], bool]]] = [
    (_detect_chatml, _all("<|im_start|>")),
    (_detect_inst, lambda t: t.startswith("mistral") or "[INST]" in t),
    ("phi3", _all("<|assistant|>", "<|end|>")),
    ("chatglm4", _all("[gMASK]<sop>")),
    ("exaone-moe", _all("<|assistant|>", "<|user|>", "<|tool_declare|>")),
    ("falcon3", _all("<|assistant|>", "<|user|>", "</s>")),
    ("glmedge", _all("<|assistant|>", "<|user|>")),
    ("glmedge", _all("<|{{ item['role'] }}|>", "<|begin_of_image|>")),
    ("zephyr", _all("<|user|>", "<|endoftext|>")),
    ("monarch", _all("bos_token + message['role']")),
    ("gemma", _all("<start_of_turn>")),
    ("orion", _all("'\\n\\nAssistant: ' + eos_token")),
    ("openchat", _all("GPT4 Correct ")),
    ("vicuna-orca", _all("USER: ", "ASSISTANT: ", "SYSTEM: ")),
    ("vicuna", _all("USER: ", "ASSISTANT: ")),
    ("deepseek", _all("### Instruction:", "<|EOT|>")),
    ("command-r", _all("<|START_OF_TURN_TOKEN|>", "<|USER_TOKEN|>")),
    ("llama3", _all("<|start_header_id|>", "<|end_header_id|>")),
    ("chatglm3", _all("[gMASK]sop")),
    ("minicpm", _all("<用户>")),
    ("deepseek2", _all("'Assistant: ' + message['content'] + eos_token")),
    ("deepseek3", _all("<｜Assistant｜>", "<｜User｜>", "<｜end▁of▁sentence｜>")),
    ("exaone4", _all("[|system|]", "[|assistant|]", "[|endofturn|]", "[|tool|]")),
    ("exaone3", _all("[|system|]", "[|assistant|]", "[|endofturn|]")),
    (
        "rwkv-world",
        lambda t: "rwkv-world" in t or "{{- 'User: ' + message['content']|trim + '\\n\\n' -}}" in t,
    ),
    (_detect_granite, _all("<|start_of_role|>")),
    (
        "gigachat",
        _all(
            "message['role'] + additional_special_tokens[0] + message['content'] "
            "+ additional_special_tokens[1]"
        ),
    ),
    ("megrez", _all("<|role_start|>")),
    ("yandex", _all(" Ассистент:")),
    ("bailing", _all("<role>ASSISTANT</role>", "'HUMAN'")),
    ("bailing-think", _all("<role>ASSISTANT</role>", '"HUMAN"', "<think>")),
    ("bailing2", _all("<role>ASSISTANT</role>", "<role>HUMAN</role>", "<|role_end|>")),
    ("llama4", _all("<|header_start|>", "<|header_end|>")),
    ("dots1", _all("<|endofuserprompt|>")),
    ("hunyuan-moe", _all("<|extra_0|>", "<|extra_4|>")),
    ("gpt-oss", _all("<|start|>", "<|channel|>")),
    ("hunyuan-vl", _all("<｜hy_Assistant｜>", "<｜hy_begin▁of▁sentence｜>")),
    ("hunyuan-dense", _all("<｜hy_Assistant｜>", "<｜hy_place▁holder▁no▁3｜>")),
    ("kimi-k2", _all("<|im_assistant|>assistant<|im_middle|>")),
    ("seed_oss", _all("<seed:bos>")),
    ("grok-2", _all("'Assistant: '  + message['content'] + '<|separator|>")),
    ("pangu-embedded", _all("[unused9]系统：[unused10]")),
    ("solar-open", _all("<|begin|>", "<|end|>", "<|content|>")),
]
