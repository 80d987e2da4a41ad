"""Gated MLP activations (Triton kernels on CUDA, torch ops elsewhere)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def silu_and_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """SwiGLU [arXiv:2002.05202]: silu(gate) * up."""
    if gate.is_cuda:
        from llamapy.kernels.triton import activation

        return activation.silu_and_mul(gate, up)
    return F.silu(gate) * up


def gelu_tanh_and_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """GeGLU with the tanh approximation of GELU (Gemma)."""
    if gate.is_cuda:
        from llamapy.kernels.triton import activation

        return activation.gelu_tanh_and_mul(gate, up)
    from llamapy.kernels.cpu import ggml_numerics

    # LLAMAPY_CPU_KERNELS=ggml: ggml's fp16 GELU table (never compiled: models/cpu_compile.py
    # runs the fast kernels only, and torch.compile cannot trace a ContextVar)
    numerics = None if torch.compiler.is_compiling() else ggml_numerics.active()
    if numerics is not None and numerics.gelu_fp16_table:
        return ggml_numerics.gelu_tanh_and_mul_ggml(gate, up)
    return F.gelu(gate, approximate="tanh") * up
