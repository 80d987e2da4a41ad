"""Logits -> tokens: llama.cpp's sampler chain, batched on device tensors."""

from llamapy.sampling.params import DEFAULT_CHAIN, SamplerStage, SamplingParams
from llamapy.sampling.sampler import Sampler, SamplerOutput, make_generator

__all__ = [
    "DEFAULT_CHAIN",
    "Sampler",
    "SamplerOutput",
    "SamplerStage",
    "SamplingParams",
    "make_generator",
]
