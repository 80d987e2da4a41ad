"""Gated MLP activations, act(gate) * up, in one pass: SwiGLU [arXiv:2002.05202] and GeGLU with
the tanh approximation of GELU (Gemma). float32 math, one rounding to the output dtype (the
torch references round act(gate) first, so fp16/bf16 results differ by an ulp or so).

gate and up may be views with any row strides (e.g. halves of one projection output); the
last dim must be contiguous. The `_fused` variants take that output (..., 2F) directly,
gate first (as llama.cpp's fused ffn_up for Phi-3). Outputs are new contiguous tensors.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from llamapy.kernels.triton import HAS_TRITON, pdl
from llamapy.kernels.triton.norm import check_device, check_float, row_strides

if HAS_TRITON:
    import triton
    import triton.language as tl

_SILU, _GELU_TANH = 0, 1
_SQRT_2_OVER_PI = tl.constexpr(math.sqrt(2.0 / math.pi)) if HAS_TRITON else None


def silu_and_mul_reference(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up, as layers.activation.silu_and_mul."""
    return F.silu(gate) * up


def gelu_tanh_and_mul_reference(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """gelu_tanh(gate) * up, as layers.activation.gelu_tanh_and_mul."""
    return F.gelu(gate, approximate="tanh") * up


def silu_and_mul_fused_reference(x: torch.Tensor) -> torch.Tensor:
    """x (..., 2F) -> silu(x[..., :F]) * x[..., F:]."""
    return silu_and_mul_reference(*x.chunk(2, dim=-1))


def gelu_tanh_and_mul_fused_reference(x: torch.Tensor) -> torch.Tensor:
    """x (..., 2F) -> gelu_tanh(x[..., :F]) * x[..., F:]."""
    return gelu_tanh_and_mul_reference(*x.chunk(2, dim=-1))


def silu_and_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up for gate, up (..., F) of one float dtype."""
    return _act_and_mul("silu_and_mul", gate, up, _SILU)


def gelu_tanh_and_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """gelu_tanh(gate) * up for gate, up (..., F) of one float dtype."""
    return _act_and_mul("gelu_tanh_and_mul", gate, up, _GELU_TANH)


def silu_and_mul_fused(x: torch.Tensor) -> torch.Tensor:
    """x (..., 2F) -> silu(x[..., :F]) * x[..., F:] (..., F)."""
    return _act_and_mul("silu_and_mul_fused", *_halves("silu_and_mul_fused", x), _SILU)


def gelu_tanh_and_mul_fused(x: torch.Tensor) -> torch.Tensor:
    """x (..., 2F) -> gelu_tanh(x[..., :F]) * x[..., F:] (..., F)."""
    op = "gelu_tanh_and_mul_fused"
    return _act_and_mul(op, *_halves(op, x), _GELU_TANH)


def _halves(op: str, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if x.dim() == 0 or x.shape[-1] % 2:
        raise ValueError(f"{op}: last dim must be even (gate | up), got shape {tuple(x.shape)}")
    return x.chunk(2, dim=-1)  # views: the kernel reads them through their strides


def _act_and_mul(op: str, gate: torch.Tensor, up: torch.Tensor, act: int) -> torch.Tensor:
    check_device(op, gate, up)
    check_float(op, "gate", gate)
    if up.dtype != gate.dtype or up.shape != gate.shape:
        raise ValueError(
            f"{op}: gate {gate.dtype} {tuple(gate.shape)} and up {up.dtype} {tuple(up.shape)} "
            "must match in dtype and shape"
        )
    g_inner, sga, sgb = row_strides(op, "gate", gate)
    u_inner, sua, sub = row_strides(op, "up", up)
    out = torch.empty(gate.shape, dtype=gate.dtype, device=gate.device)
    n = gate.shape[-1]
    n_rows = gate.numel() // n if n else 0
    if n_rows == 0:
        return out
    block = min(1024, triton.next_power_of_2(n))
    _act_and_mul_kernel[(n_rows, triton.cdiv(n, block))](
        gate, up, out, n, g_inner, sga, sgb, u_inner, sua, sub,
        ACT=act, BLOCK=block, **pdl.launch_options(pdl.pdl_enabled(gate.device)), num_warps=4,
    )  # fmt: skip
    return out


if HAS_TRITON:

    @triton.jit
    def _act_and_mul_kernel(
        gate_ptr, up_ptr, out_ptr, N, g_inner, sga, sgb, u_inner, sua, sub,
        ACT: tl.constexpr, BLOCK: tl.constexpr, PDL: tl.constexpr,
    ):  # fmt: skip
        pdl.wait(PDL)
        pdl.launch_dependents(PDL)
        row = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = cols < N
        g_row = (row // g_inner) * sga + (row % g_inner) * sgb
        u_row = (row // u_inner) * sua + (row % u_inner) * sub
        g = tl.load(gate_ptr + g_row + cols, mask=mask, other=0.0).to(tl.float32)
        u = tl.load(up_ptr + u_row + cols, mask=mask, other=0.0).to(tl.float32)
        if ACT == 0:  # silu(g) = g * sigmoid(g)
            a = g * tl.sigmoid(g)
        else:
            # 0.5 * g * (1 + tanh(z)) == g * sigmoid(2z): no cancellation for large negative z
            z = _SQRT_2_OVER_PI * (g + 0.044715 * g * g * g)
            a = g * tl.sigmoid(2.0 * z)
        tl.store(out_ptr + row * N + cols, (a * u).to(out_ptr.dtype.element_ty), mask=mask)
