"""SamplingParams: one request's sampling settings, with llama.cpp's names and defaults.

Defaults are those of llama.cpp's `common_params_sampling` (common/common.h); the order in
which the samplers run is `DEFAULT_CHAIN`, llama.cpp's default `samplers` list (DRY, XTC and
top-n-sigma, off by default there, are not implemented here).
"""

from __future__ import annotations

import enum
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

_SEED_LIMIT = 2**64  # torch.Generator.manual_seed takes 64-bit seeds


class SamplerStage(enum.StrEnum):
    """One step of the sampler chain, named as llama.cpp names its samplers."""

    LOGIT_BIAS = "logit-bias"
    PENALTIES = "penalties"
    TOP_K = "top-k"
    TYPICAL_P = "typical"
    TOP_P = "top-p"
    MIN_P = "min-p"
    TEMPERATURE = "temp"
    DIST = "dist"


# common_sampler_init: logit bias first, then common_params_sampling::samplers, then dist.
DEFAULT_CHAIN: tuple[SamplerStage, ...] = (
    SamplerStage.LOGIT_BIAS,
    SamplerStage.PENALTIES,
    SamplerStage.TOP_K,
    SamplerStage.TYPICAL_P,
    SamplerStage.TOP_P,
    SamplerStage.MIN_P,
    SamplerStage.TEMPERATURE,
    SamplerStage.DIST,
)


def _check(ok: bool, name: str, allowed: str, value: object) -> None:
    if not ok:
        raise ValueError(f"{name} must be {allowed}, got {value!r}")


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_real(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _in_range(value: object, lo: float, hi: float) -> bool:
    return _is_real(value) and lo <= value <= hi  # type: ignore[operator]


@dataclass(frozen=True, slots=True)
class SamplingParams:
    """How to pick the next token of one sequence (llama.cpp semantics, see DEFAULT_CHAIN)."""

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

    def __post_init__(self) -> None:
        self._check_filters()
        self._check_penalties()
        self._check_request()
        # Freeze the mutable inputs so the object really is immutable.
        bias = {int(k): float(v) for k, v in self.logit_bias.items()}
        object.__setattr__(self, "logit_bias", MappingProxyType(bias))
        object.__setattr__(self, "stop", tuple(self.stop))

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

    @classmethod
    def greedy(cls, **overrides: object) -> SamplingParams:
        """Always the most likely token (after bias and penalties), as llama.cpp's temp 0."""
        return cls(**{"temperature": 0.0, **overrides})  # type: ignore[arg-type]

    @property
    def is_greedy(self) -> bool:
        return self.temperature <= 0.0

    @property
    def has_penalties(self) -> bool:
        # as llama_sampler_penalties_apply's early return
        neutral = (
            self.repeat_penalty == 1.0
            and self.frequency_penalty == 0.0
            and self.presence_penalty == 0.0
        )
        return self.repeat_last_n != 0 and not neutral
