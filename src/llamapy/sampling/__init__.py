"""Logits -> tokens: llama.cpp's sampler chain, batched on device tensors."""

from llamapy.sampling.dry import DryVocab
from llamapy.sampling.params import SamplingParams
from llamapy.sampling.sampler import (
    Sampler,
    SamplerOutput,
    SamplerState,
    make_generator,
    make_state,
)
from llamapy.sampling.stages import (
    DEFAULT_SAMPLERS,
    SamplerStage,
    samplers_from_chars,
    samplers_from_names,
)

__all__ = [
    "DEFAULT_SAMPLERS",
    "DryVocab",
    "Sampler",
    "SamplerOutput",
    "SamplerStage",
    "SamplerState",
    "SamplingParams",
    "make_generator",
    "make_state",
    "samplers_from_chars",
    "samplers_from_names",
]
