"""Request bodies of the HTTP API (OpenAI and llama.cpp field names), validated by pydantic.

A body that fails validation is the client's mistake: the app answers 400 with OpenAI's
error JSON, naming the field.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from llamapy.sampling.params import SamplingParams
from llamapy.sampling.stages import samplers_from_chars, samplers_from_names
from llamapy.structured.requests import constraint_kwargs


class _Body(BaseModel):
    # Unknown fields are ignored, as OpenAI and llama.cpp do (clients send extras).
    model_config = ConfigDict(extra="ignore", populate_by_name=True)


class StreamOptions(_Body):
    include_usage: bool = False


class SamplingFields(_Body):
    """Sampling fields both APIs share (OpenAI names, llama.cpp extras)."""

    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    typical_p: float | None = None
    repeat_penalty: float | None = None
    repeat_last_n: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    seed: int | None = None
    logit_bias: dict[str, float] | None = None
    ignore_eos: bool = False
    stop: str | list[str] | None = None
    # the rest of llama.cpp's samplers, by its server's names (extra fields on OpenAI routes)
    min_keep: int | None = None
    dry_multiplier: float | None = None
    dry_base: float | None = None  # < 1 means the default, as llama-server
    dry_allowed_length: int | None = None
    dry_penalty_last_n: int | None = None
    dry_sequence_breakers: list[str] | None = None
    xtc_probability: float | None = None
    xtc_threshold: float | None = None
    top_n_sigma: float | None = None
    dynatemp_range: float | None = None
    dynatemp_exponent: float | None = None
    mirostat: int | None = None
    mirostat_tau: float | None = None
    mirostat_eta: float | None = None
    samplers: list[str] | str | None = None  # names, or a string of letters ("kpt")
    post_sampling_probs: bool = False  # probabilities after the chain, not of the raw logits
    # structured output, checked by llamapy.structured.requests.constraint_kwargs (OpenAI,
    # llama.cpp and vLLM spellings)
    response_format: Any = None
    grammar: Any = None
    json_schema: Any = None
    structured_outputs: Any = None
    guided_json: Any = None
    guided_regex: Any = None
    guided_choice: Any = None
    guided_grammar: Any = None

    @field_validator("stop")
    @classmethod
    def _stops(cls, v: str | list[str] | None) -> list[str] | None:
        if v is None:
            return None
        stops = [v] if isinstance(v, str) else v
        if len(stops) > 16:
            raise ValueError("at most 16 stop strings")
        return [s for s in stops if s]

    def sampling_params(self, max_tokens: int | None, n_probs: int = 0) -> SamplingParams:
        """SamplingParams from the given fields (defaults: llama.cpp's); ValueError names the
        bad field."""
        given: dict[str, Any] = {
            "temperature": self.temperature,
            "top_p": self.top_p,
            "top_k": self.top_k,
            "min_p": self.min_p,
            "typical_p": self.typical_p,
            "repeat_penalty": self.repeat_penalty,
            "repeat_last_n": self.repeat_last_n,
            "presence_penalty": self.presence_penalty,
            "frequency_penalty": self.frequency_penalty,
            "seed": self.seed,
        }
        kwargs = {k: v for k, v in given.items() if v is not None}
        kwargs.update(self._more_sampling())
        bias = {}
        for key, value in (self.logit_bias or {}).items():
            try:
                bias[int(key)] = float(value)
            except ValueError:
                raise ValueError(f"logit_bias keys must be token ids, got {key!r}") from None
        return SamplingParams(
            **kwargs,
            logit_bias=bias,
            max_tokens=max_tokens,
            stop=tuple(self.stop or ()),
            ignore_eos=self.ignore_eos,
            n_probs=n_probs,
            post_sampling_probs=self.post_sampling_probs,
            **constraint_kwargs(
                response_format=self.response_format,
                grammar=self.grammar,
                json_schema=self.json_schema,
                structured_outputs=self.structured_outputs,
                guided_json=self.guided_json,
                guided_regex=self.guided_regex,
                guided_choice=self.guided_choice,
                guided_grammar=self.guided_grammar,
            ),
        )

    def _more_sampling(self) -> dict[str, Any]:
        names = (
            "min_keep", "dry_multiplier", "dry_allowed_length", "dry_penalty_last_n",
            "xtc_probability", "xtc_threshold", "top_n_sigma", "dynatemp_range",
            "dynatemp_exponent", "mirostat", "mirostat_tau", "mirostat_eta",
        )  # fmt: skip
        out = {n: getattr(self, n) for n in names if getattr(self, n) is not None}
        if self.dry_base is not None and self.dry_base >= 1.0:
            out["dry_base"] = self.dry_base
        if self.dry_sequence_breakers is not None:
            if not self.dry_sequence_breakers:
                raise ValueError("dry_sequence_breakers must be a non-empty array of strings")
            out["dry_sequence_breakers"] = tuple(self.dry_sequence_breakers)
        if isinstance(self.samplers, str):
            out["samplers"] = samplers_from_chars(self.samplers)
        elif self.samplers is not None:
            out["samplers"] = samplers_from_names(self.samplers)
        return out


class CompletionRequest(SamplingFields):
    """POST /v1/completions."""

    model: str | None = None
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = Field(default=16, ge=0)
    n: int = Field(default=1, ge=1, le=16)
    best_of: int | None = Field(default=None, ge=1, le=16)
    stream: bool = False
    stream_options: StreamOptions | None = None
    logprobs: int | None = Field(default=None, ge=0, le=20)
    echo: bool = False
    user: str | None = None


class ChatMessage(_Body):
    model_config = ConfigDict(extra="allow")
    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: str | list[dict[str, Any]] | None = None

    @field_validator("content")
    @classmethod
    def _text_parts(cls, v: str | list[dict[str, Any]] | None) -> Any:
        """OpenAI's content parts: text ones only (the models served read no images or
        audio, and llama-server refuses them too without a multimodal projector)."""
        for i, part in enumerate(v if isinstance(v, list) else ()):
            if part.get("type") != "text":
                raise ValueError(
                    f"part {i} has type {part.get('type')!r}; only 'text' is supported"
                )
            if not isinstance(part.get("text"), str):
                raise ValueError(f"part {i} (type 'text') needs a string 'text'")
        return v

    @model_validator(mode="after")
    def _has_content(self) -> ChatMessage:
        # only an assistant turn may leave it out (one that makes tool calls)
        if self.content is None and self.role != "assistant":
            raise ValueError(f"a {self.role} message needs 'content'")
        return self


class ChatCompletionRequest(SamplingFields):
    """POST /v1/chat/completions."""

    model: str | None = None
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=0)
    max_completion_tokens: int | None = Field(default=None, ge=0)
    n: int = Field(default=1, ge=1, le=16)
    stream: bool = False
    stream_options: StreamOptions | None = None
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=20)
    tools: list[dict[str, Any]] | None = None
    # "auto" | "none" | "required" | {"type": "function", "function": {"name": ...}};
    # checked by llamapy.server.tools (a 400 naming the problem)
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None  # None: one call per turn, as llama-server
    user: str | None = None

    @property
    def max_new_tokens(self) -> int | None:
        return (
            self.max_completion_tokens
            if self.max_completion_tokens is not None
            else self.max_tokens
        )


class NativeCompletionRequest(SamplingFields):
    """POST /completion (llama.cpp's server names)."""

    prompt: str | list[int] | list[str | int]
    n_predict: int = Field(default=-1, ge=-1)
    stream: bool = False
    cache_prompt: bool = True
    n_probs: int = Field(default=0, ge=0, le=20)
    temperature: float | None = Field(default=None, alias="temperature")


class TokenizeRequest(_Body):
    content: str
    add_special: bool = False
    parse_special: bool = True
    with_pieces: bool = False


class DetokenizeRequest(_Body):
    tokens: list[int]


class ApplyTemplateRequest(_Body):
    messages: list[ChatMessage] = Field(min_length=1)
