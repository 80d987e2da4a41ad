"""Rotary position embedding [arXiv:2104.09864] in ggml's two layouts."""

from __future__ import annotations

import math

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
        if kind not in ("none", "linear", "llama3"):
            raise UnsupportedError(f"rope scaling type {kind!r} is not implemented")
        if kind == "linear":
            self.position_scale = 1.0 / scaling.factor
        # theta_i = base^(-2i/d), computed in float64 and rounded once
        exponents = torch.arange(0, rot_dim, 2, dtype=torch.float64) / rot_dim
        inv_freq = base**-exponents
        # llama3 scaling: GGUFs carry the factors as rope_freqs.weight; HF configs give the
        # parameters they are computed from.
        if kind == "llama3" and freq_factors is None:
            freq_factors = llama3_freq_factors(inv_freq, scaling)
        if freq_factors is not None:
            inv_freq = inv_freq / freq_factors.to(torch.float64)
        self.inv_freq = inv_freq
        # (n, 2, rot_dim/2) float32: cos and sin of positions 0..n-1 (`build_table`), or None
        self.table: torch.Tensor | None = None

    def cos_sin(
        self, positions: torch.Tensor, bound: int | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(cos, sin) (T, rot_dim/2) float32 at `positions`. `bound`: the caller's promise
        that every position is below it; where the table of `build_table` covers it, the
        rows are gathered from there (one launch, bit-identical) instead of computed."""
        table = self.table
        if (
            table is not None
            and bound is not None
            and bound <= table.shape[0]
            and positions.device == table.device
        ):
            rows = table.index_select(0, positions)  # (T, 2, rot_dim/2)
            return rows[:, 0], rows[:, 1]
        angles = positions.to(torch.float64)[:, None] * self.position_scale * self.inv_freq
        return angles.cos().float(), angles.sin().float()  # (T, rot_dim/2)

    def build_table(self, n: int, device: torch.device | str) -> None:
        """Keep cos and sin of positions [0, n) on `device`, computed as `cos_sin` computes
        them, for `cos_sin` to gather: a decode step on the GPU then takes one launch for them
        instead of seven float64 elementwise kernels (~1.4 us each)."""
        positions = torch.arange(n, device=self.inv_freq.device)
        cos, sin = self.cos_sin(positions)
        self.table = torch.stack((cos, sin), dim=1).to(device)

    def apply_pair(
        self, q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Rotate q and k at the same positions. Float32 pairs (NORM layout, whole heads)
        rotate as complex numbers, (x0 + i x1) * (cos + i sin): a single op per tensor in
        place of a dozen, the same products and sums."""
        if (
            self.interleaved
            and not torch.compiler.is_compiling()  # Inductor has no complex codegen
            and q.dtype == k.dtype == torch.float32
            and self.rot_dim == q.shape[-1] == k.shape[-1]
            and q.stride(-1) == k.stride(-1) == 1
        ):
            cis = torch.complex(cos, sin)[:, None, :]  # (T, 1, rot_dim / 2)
            return _rotate_complex(q, cis), _rotate_complex(k, cis)
        return self(q, cos, sin), self(k, cos, sin)

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


def _rotate_complex(x: torch.Tensor, cis: torch.Tensor) -> torch.Tensor:
    pairs = torch.view_as_complex(x.unflatten(-1, (-1, 2)))  # (T, heads, d / 2)
    return torch.view_as_real(pairs * cis).flatten(-2)


def llama3_freq_factors(inv_freq: torch.Tensor, scaling: RopeScaling) -> torch.Tensor:
    """Per-frequency divisors of Llama 3.1 rope scaling: long wavelengths are slowed by
    `factor`, short ones kept, the band between interpolated (as convert_hf_to_gguf.py's
    LlamaModel.generate_extra_tensors and transformers' _compute_llama3_parameters)."""
    factor = scaling.factor
    low, high = scaling.low_freq_factor or 1.0, scaling.high_freq_factor or 4.0
    old_ctx = scaling.original_context_length or 8192
    wavelen = 2 * math.pi / inv_freq
    smooth = ((old_ctx / wavelen - low) / (high - low)).clamp(0.0, 1.0)
    # smooth = 0 past old_ctx / low (long waves: factor), 1 under old_ctx / high (kept)
    return 1.0 / ((1 - smooth) / factor + smooth)
