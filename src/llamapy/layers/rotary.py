"""Rotary position embedding [arXiv:2104.09864] in ggml's two layouts."""

from __future__ import annotations

import torch

from llamapy.config import RopeScaling
from llamapy.errors import UnsupportedError


class RotaryEmbedding:
    """Rotates the first `rot_dim` features of each head by position-dependent angles.

    `interleaved=True` rotates pairs (x[2i], x[2i+1]) (ggml's GGML_ROPE_TYPE_NORM, used by
    llama GGUFs, whose converter permutes Q/K rows); False rotates (x[i], x[i + d/2])
    (GGML_ROPE_TYPE_NEOX: Qwen, Gemma, Phi-3, and HF llama checkpoints as stored).
    """

    def __init__(
        self,
        rot_dim: int,
        base: float,
        *,
        interleaved: bool,
        scaling: RopeScaling | None = None,
        freq_factors: torch.Tensor | None = None,
    ) -> None:
        if rot_dim % 2:
            raise ValueError(f"rope dimension must be even, got {rot_dim}")
        self.rot_dim = rot_dim
        self.interleaved = interleaved
        self.position_scale = 1.0
        kind = scaling.type if scaling is not None else "none"
        # llama3 scaling is honoured through the rope_freqs.weight factors llama.cpp stores.
        if kind not in ("none", "linear") and not (kind == "llama3" and freq_factors is not None):
            raise UnsupportedError(f"rope scaling type {kind!r} is not implemented")
        if scaling is not None and scaling.type == "linear":
            self.position_scale = 1.0 / scaling.factor
        # theta_i = base^(-2i/d), computed in float64 and rounded once
        exponents = torch.arange(0, rot_dim, 2, dtype=torch.float64) / rot_dim
        inv_freq = base**-exponents
        if freq_factors is not None:  # llama3-style scaling baked into rope_freqs.weight
            inv_freq = inv_freq / freq_factors.to(torch.float64)
        self.inv_freq = inv_freq

    def cos_sin(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        angles = positions.to(torch.float64)[:, None] * self.position_scale * self.inv_freq
        return angles.cos().float(), angles.sin().float()  # (T, rot_dim/2)

    def __call__(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """x: (T, n_heads, head_dim); cos/sin from `cos_sin(positions)`."""
        rot, rest = x[..., : self.rot_dim], x[..., self.rot_dim :]
        cos, sin = cos[:, None, :].to(x.dtype), sin[:, None, :].to(x.dtype)
        if self.interleaved:
            x1, x2 = rot[..., 0::2], rot[..., 1::2]
            out = torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1).flatten(-2)
        else:
            x1, x2 = rot.chunk(2, dim=-1)
            out = torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)
        return torch.cat((out, rest), dim=-1) if rest.numel() else out
