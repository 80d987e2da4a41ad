"""SamplingParams: one request's sampling settings, with llama.cpp's names and defaults.

Defaults are those of llama.cpp's `common_params_sampling` (common/common.h). The chain is
logit bias, then `samplers` in order (default `DEFAULT_SAMPLERS`: penalties -> dry ->
top_n_sigma -> top_k -> typ_p -> top_p -> min_p -> xtc -> temperature), then the draw; with
`mirostat` 1 or 2 it is logit bias -> temperature -> mirostat, as common_sampler_init.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from llamapy.sampling.stages import DEFAULT_SAMPLERS, SamplerStage, samplers_from_names
from llamapy.structured.grammar import ConstraintKind, check_constraint

_SEED_LIMIT = 2**64  # torch.Generator.manual_seed takes 64-bit seeds


def _check(ok: bool, name: str, allowed: str, value: object) -> None:
    if not ok:
        raise ValueError(f"{name} must be {allowed}, got {value!r}")


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_real(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _in_range(value: object, lo: float, hi: float) -> bool:
    return _is_real(value) and lo <= value <= hi  # type: ignore[operator]


def _finite(value: object, lo: float = -math.inf) -> bool:
    return _is_real(value) and math.isfinite(value) and value >= lo  # type: ignore[arg-type]


@dataclass(frozen=True, slots=True)
class SamplingParams:
    """How to pick the next token of one sequence (llama.cpp semantics, see the module)."""

    temperature: float = 0.8  # <= 0 keeps only the most likely token (greedy)
    top_k: int = 40  # <= 0 disables
    top_p: float = 0.95  # 1.0 disables
    min_p: float = 0.05  # 0.0 disables
    typical_p: float = 1.0  # 1.0 disables
    repeat_penalty: float = 1.0  # 1.0 disables
    repeat_last_n: int = 64  # tokens of history penalized; -1 = all of it, 0 disables
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    # -inf bans a token; left out of the hash (a mapping is not hashable), kept in ==
    logit_bias: Mapping[int, float] = field(default_factory=dict, hash=False)
    seed: int | None = None  # None: a random seed
    max_tokens: int | None = None  # None: until a stop condition or the context ends
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False  # bans end-of-generation tokens (a -inf logit bias)
    min_keep: int = 0  # top-p / min-p / typical keep at least this many tokens
    n_probs: int = 0  # top log-probabilities to report per token
    post_sampling_probs: bool = False  # n_probs of the final distribution, not the raw logits
    # DRY [github.com/oobabooga/text-generation-webui/pull/5677]: a token that would extend a
    # repeat of more than dry_allowed_length tokens loses multiplier * base^(len - allowed)
    dry_multiplier: float = 0.0  # 0 disables
    dry_base: float = 1.75
    dry_allowed_length: int = 2
    dry_penalty_last_n: int = 64  # tokens of history scanned; -1 = all of it, 0 disables
    dry_sequence_breakers: tuple[str, ...] = ("\n", ":", '"', "*")
    xtc_probability: float = 0.0  # XTC: chance per token of removing the top choices; 0 disables
    xtc_threshold: float = 0.1  # ... those with p >= threshold but the last; > 0.5 disables
    top_n_sigma: float = -1.0  # keep logits >= max - n * std; <= 0 disables
    dynatemp_range: float = 0.0  # temperature in [temp - range, temp + range] by entropy
    dynatemp_exponent: float = 1.0
    mirostat: int = 0  # 1 or 2 replaces the chain with temperature -> mirostat (v1 / v2)
    mirostat_tau: float = 5.0  # target surprise (entropy)
    mirostat_eta: float = 0.1  # learning rate
    samplers: tuple[SamplerStage, ...] = DEFAULT_SAMPLERS  # names or aliases are accepted
    # Structured output (llamapy.structured), at most one; checked here, so a malformed one
    # fails before decoding. json_schema is kept as JSON text ('{"type": "object"}': any
    # JSON object); grammar is GBNF (llama.cpp) or Lark (llguidance); choice: the strings.
    json_schema: str | Mapping[str, Any] | None = None
    grammar: str | None = None
    regex: str | None = None
    choice: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        self._check_filters()
        self._check_penalties()
        self._check_request()
        self._check_extra_samplers()
        constraint = check_constraint(self.json_schema, self.grammar, self.regex, self.choice)
        if constraint is not None:  # normalized: schema as JSON text, choices as a tuple
            object.__setattr__(self, constraint[0].value, constraint[1])
        # Freeze the mutable inputs so the object really is immutable.
        bias = {int(k): float(v) for k, v in self.logit_bias.items()}
        object.__setattr__(self, "logit_bias", MappingProxyType(bias))
        object.__setattr__(self, "stop", tuple(self.stop))
        object.__setattr__(self, "dry_sequence_breakers", tuple(self.dry_sequence_breakers))
        object.__setattr__(self, "samplers", samplers_from_names(self.samplers))

    def _check_filters(self) -> None:
        t = self.temperature
        _check(_is_real(t) and math.isfinite(t) and t >= 0, "temperature", "a number >= 0", t)
        _check(_is_int(self.top_k), "top_k", "an integer (<= 0 disables)", self.top_k)
        _check(_in_range(self.top_p, 0.0, 1.0), "top_p", "in [0, 1]", self.top_p)
        _check(_in_range(self.min_p, 0.0, 1.0), "min_p", "in [0, 1]", self.min_p)
        _check(_in_range(self.typical_p, 0.0, 1.0), "typical_p", "in [0, 1]", self.typical_p)
        _check(_is_int(self.min_keep) and self.min_keep >= 0, "min_keep", ">= 0", self.min_keep)

    def _check_penalties(self) -> None:
        r = self.repeat_penalty
        _check(_is_real(r) and math.isfinite(r) and r > 0, "repeat_penalty", "> 0", r)
        n = self.repeat_last_n
        _check(_is_int(n) and n >= -1, "repeat_last_n", ">= -1 (-1 = all, 0 = off)", n)
        for name in ("presence_penalty", "frequency_penalty"):
            v = getattr(self, name)
            _check(_is_real(v) and math.isfinite(v), name, "a finite number", v)
        for token, bias in self.logit_bias.items():
            _check(_is_int(token) and token >= 0, "logit_bias key", "a token id >= 0", token)
            ok = _is_real(bias) and not math.isnan(bias) and bias != math.inf
            _check(ok, f"logit_bias[{token}]", "a number or -inf", bias)

    def _check_request(self) -> None:
        s = self.seed
        ok = s is None or (_is_int(s) and 0 <= s < _SEED_LIMIT)
        _check(ok, "seed", f"None or an integer in [0, {_SEED_LIMIT})", s)
        m = self.max_tokens
        _check(m is None or (_is_int(m) and m >= 0), "max_tokens", "None or >= 0", m)
        ok = not isinstance(self.stop, str) and all(isinstance(x, str) and x for x in self.stop)
        _check(ok, "stop", "a sequence of non-empty strings", self.stop)
        _check(isinstance(self.ignore_eos, bool), "ignore_eos", "a bool", self.ignore_eos)
        _check(_is_int(self.n_probs) and self.n_probs >= 0, "n_probs", ">= 0", self.n_probs)

    def _check_extra_samplers(self) -> None:
        _check(_finite(self.dry_multiplier, 0.0), "dry_multiplier", ">= 0", self.dry_multiplier)
        _check(_finite(self.dry_base, 1.0), "dry_base", ">= 1", self.dry_base)
        n = self.dry_allowed_length
        _check(_is_int(n) and n >= 0, "dry_allowed_length", ">= 0", n)
        n = self.dry_penalty_last_n
        _check(_is_int(n) and n >= -1, "dry_penalty_last_n", ">= -1 (-1 = all, 0 = off)", n)
        b = self.dry_sequence_breakers
        ok = isinstance(b, Sequence) and not isinstance(b, str)
        ok = ok and all(isinstance(x, str) and x for x in b)
        _check(ok, "dry_sequence_breakers", "a sequence of non-empty strings", b)
        p, t = self.xtc_probability, self.xtc_threshold
        _check(_in_range(p, 0.0, 1.0), "xtc_probability", "in [0, 1]", p)
        _check(_in_range(t, 0.0, 1.0), "xtc_threshold", "in [0, 1] (> 0.5 disables)", t)
        _check(_finite(self.top_n_sigma), "top_n_sigma", "a finite number", self.top_n_sigma)
        r, e = self.dynatemp_range, self.dynatemp_exponent
        _check(_finite(r, 0.0), "dynatemp_range", ">= 0", r)
        _check(_finite(e, 0.0), "dynatemp_exponent", ">= 0", e)
        m = self.mirostat
        _check(_is_int(m) and m in (0, 1, 2), "mirostat", "0 (off), 1 or 2", m)
        _check(_finite(self.mirostat_tau, 0.0), "mirostat_tau", ">= 0", self.mirostat_tau)
        _check(_finite(self.mirostat_eta, 0.0), "mirostat_eta", ">= 0", self.mirostat_eta)
        ok = isinstance(self.post_sampling_probs, bool)
        _check(ok, "post_sampling_probs", "a bool", self.post_sampling_probs)

    @classmethod
    def greedy(cls, **overrides: object) -> SamplingParams:
        """Always the most likely token (after bias and penalties), as llama.cpp's temp 0."""
        return cls(**{"temperature": 0.0, **overrides})  # type: ignore[arg-type]

    @property
    def is_greedy(self) -> bool:
        """The chain ends on the most likely token left: temperature <= 0 in the chain, with
        no dynamic range (as llama_sampler_temp_ext_apply), or under mirostat."""
        if self.temperature > 0.0:
            return False
        if self.mirostat:
            return True
        return self.dynatemp_range <= 0.0 and SamplerStage.TEMPERATURE in self.samplers

    @property
    def picks_argmax(self) -> bool:
        """The token is the argmax of the logits after bias, penalties and DRY: greedy, the
        default order, and no sampler that may drop the most likely token (typical, XTC)."""
        return (
            self.is_greedy
            and not self.mirostat
            and self.samplers == DEFAULT_SAMPLERS
            and self.typical_p >= 1.0
            and not self.has_xtc
        )

    @property
    def has_dry(self) -> bool:
        # as llama_sampler_init_dry's dry_enabled (dry_base >= 1 is checked above)
        return self.dry_multiplier != 0.0 and self.dry_penalty_last_n != 0

    @property
    def has_xtc(self) -> bool:
        """XTC runs (and draws its number each token): as llama_sampler_init_xtc's is_empty."""
        return (
            self.xtc_probability > 0.0
            and self.xtc_threshold <= 0.5
            and not self.mirostat
            and SamplerStage.XTC in self.samplers
        )

    @property
    def constraint(self) -> tuple[ConstraintKind, str | tuple[str, ...]] | None:
        """The structured-output constraint (kind, spec), or None."""
        for kind in ConstraintKind:
            spec = getattr(self, kind.value)
            if spec is not None:
                return kind, spec
        return None

    @property
    def has_penalties(self) -> bool:
        # as llama_sampler_penalties_apply's early return
        neutral = (
            self.repeat_penalty == 1.0
            and self.frequency_penalty == 0.0
            and self.presence_penalty == 0.0
        )
        return self.repeat_last_n != 0 and not neutral
