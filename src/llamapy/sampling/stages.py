"""The samplers of llama.cpp's chain by name, and its `--samplers` / `--sampling-seq` syntax.

llama.cpp's common_sampler_init builds: logit bias, then `samplers` in the given order (any
order, repeats allowed), then the draw (dist). Mirostat, when on, replaces `samplers` with
temperature -> mirostat (v1 or v2), which draws itself.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable


class SamplerStage(enum.StrEnum):
    """One reorderable sampler, valued by its llama.cpp name (common_sampler_type_to_str)."""

    PENALTIES = "penalties"
    DRY = "dry"
    TOP_N_SIGMA = "top_n_sigma"
    TOP_K = "top_k"
    TYPICAL_P = "typ_p"
    TOP_P = "top_p"
    MIN_P = "min_p"
    XTC = "xtc"
    TEMPERATURE = "temperature"


# common_params_sampling::samplers
DEFAULT_SAMPLERS: tuple[SamplerStage, ...] = (
    SamplerStage.PENALTIES,
    SamplerStage.DRY,
    SamplerStage.TOP_N_SIGMA,
    SamplerStage.TOP_K,
    SamplerStage.TYPICAL_P,
    SamplerStage.TOP_P,
    SamplerStage.MIN_P,
    SamplerStage.XTC,
    SamplerStage.TEMPERATURE,
)

# common_sampler_type_to_chr
_CHARS: dict[str, SamplerStage] = {
    "e": SamplerStage.PENALTIES,
    "d": SamplerStage.DRY,
    "s": SamplerStage.TOP_N_SIGMA,
    "k": SamplerStage.TOP_K,
    "y": SamplerStage.TYPICAL_P,
    "p": SamplerStage.TOP_P,
    "m": SamplerStage.MIN_P,
    "x": SamplerStage.XTC,
    "t": SamplerStage.TEMPERATURE,
}
# llama.cpp samplers this project does not implement
_UNSUPPORTED = {"infill": "i", "adaptive_p": "a"}


def _aliases() -> dict[str, str]:
    """Every spelling common_sampler_types_from_names accepts -> the canonical name."""
    names = {s.value: s.value for s in SamplerStage} | {n: n for n in _UNSUPPORTED}
    out = dict(names)
    for canonical in names:
        if "_" in canonical:
            out[canonical.replace("_", "-")] = canonical  # "top-k"
            out[canonical.replace("_", "")] = canonical  # "topk"
    out |= {"nucleus": "top_p", "temp": "temperature", "typ": "typ_p"}
    return out


_ALIASES = _aliases()


def samplers_from_names(names: Iterable[str | SamplerStage]) -> tuple[SamplerStage, ...]:
    """Stages from llama.cpp names or aliases ("top_k", "top-k", "topk", "temp", ...),
    case-insensitive; ValueError names an unknown or unsupported one."""
    if isinstance(names, str):
        raise ValueError(f"samplers must be a list of sampler names, got the string {names!r}")
    out = []
    for name in names:
        if isinstance(name, SamplerStage):
            out.append(name)
            continue
        if not isinstance(name, str):
            raise ValueError(f"samplers must hold sampler names, got {name!r}")
        canonical = _ALIASES.get(name.strip().lower())
        if canonical is None:
            known = ", ".join(s.value for s in SamplerStage)
            raise ValueError(f"samplers: unknown sampler {name!r} (known: {known})")
        if canonical in _UNSUPPORTED:
            raise ValueError(f"samplers: the {canonical!r} sampler is not supported")
        out.append(SamplerStage(canonical))
    return tuple(out)


def samplers_from_chars(chars: str) -> tuple[SamplerStage, ...]:
    """Stages from llama.cpp's one-letter sequence (`--sampling-seq`, e.g. "edskypmxt")."""
    out = []
    for c in chars:
        if c in _UNSUPPORTED.values():
            name = next(n for n, ch in _UNSUPPORTED.items() if ch == c)
            raise ValueError(f"samplers: the {name!r} sampler ({c!r}) is not supported")
        if c not in _CHARS:
            raise ValueError(f"samplers: unknown sampler letter {c!r} (known: {''.join(_CHARS)})")
        out.append(_CHARS[c])
    return tuple(out)


def samplers_to_chars(stages: Iterable[SamplerStage]) -> str:
    by_stage = {s: c for c, s in _CHARS.items()}
    return "".join(by_stage[s] for s in stages)
