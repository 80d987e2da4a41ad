"""Lookup tables and byte-field readers shared by the i-quant, ternary and FP4 dequantizers.

The grids are ggml's iq2xxs_grid, iq2xs_grid, iq2s_grid, iq3xxs_grid, iq3s_grid and iq1s_grid
(ggml-common.h). They are decoded from gguf-py's own quant classes (``grid_hex`` through their
``init_grid()``), so every value is exactly the float32 the reference multiplies with. Tables
are built once on the host at import and copied to each device once (``table(name, device)``),
so CUDA callers do not re-upload them on every call.
"""

from __future__ import annotations

import functools

import numpy as np
import torch
from gguf import quants as gq


def _grid(cls: type) -> np.ndarray:
    cls.init_grid()  # gguf decodes grid_hex lazily into cls.grid (1, 1, K, W) float32
    return np.ascontiguousarray(cls.grid, dtype=np.float32).reshape(cls.grid_shape)


def _bits_pm(codes: np.ndarray) -> np.ndarray:
    """(K,) uint8 -> (K, 8) float32: -1 where bit j of the code is set, else +1.

    gguf-py does `np.where(bit == 0, 1, -1)` on the unpacked bits; the table holds the same.
    """
    bits = (codes.astype(np.uint8)[:, None] >> np.arange(8, dtype=np.uint8)) & 1
    return np.where(bits == 0, np.float32(1), np.float32(-1))


def _e8m0_half() -> np.ndarray:
    """256 -> float32 of ggml_e8m0_to_fp32_half (ggml-impl.h), i.e. 2**(e - 128), via its bits."""
    bits = [(0x00200000 << e) if e < 2 else ((e - 1) << 23) for e in range(256)]
    return np.array(bits, dtype=np.uint32).view(np.float32)


def _ue4m3_half() -> np.ndarray:
    """256 -> float32 of gguf-py's NVFP4.ue4m3_to_fp32: unsigned E4M3 (bias 7) times 0.5.

    Bit 7 is ignored except that bytes 0x00 and 0x7F decode to 0 (as in gguf-py). Every value
    is a small dyadic rational, exact in float64 and float32, so Python floats give the same
    bits as gguf-py's float32 arithmetic.
    """
    out = []
    for x in range(256):
        exp, man = (x >> 3) & 0xF, x & 0x7
        raw = man * 2.0**-9 if exp == 0 else (1.0 + man / 8.0) * 2.0 ** (exp - 7)
        out.append(0.0 if x in (0x00, 0x7F) else raw * 0.5)
    return np.array(out, dtype=np.float32)


_HOST: dict[str, np.ndarray] = {
    "iq2xxs": _grid(gq.IQ2_XXS),  # (256, 8)
    "iq2xs": _grid(gq.IQ2_XS),  # (512, 8)
    "iq2s": _grid(gq.IQ2_S),  # (1024, 8)
    "iq3xxs": _grid(gq.IQ3_XXS),  # (256, 4)
    "iq3s": _grid(gq.IQ3_S),  # (512, 4)
    "iq1s": _grid(gq.IQ1_S),  # (2048, 8), shared by IQ1_M
    # ksigns_iq2xs: 7 stored sign bits -> 8 signs (even parity); as +-1 per position.
    "ksigns": _bits_pm(np.frombuffer(gq.IQ2_XXS.ksigns, dtype=np.uint8)),  # (128, 8)
    "bits": _bits_pm(np.arange(256)),  # (256, 8): plain sign bytes of IQ2_S / IQ3_S
    "iq4nl": np.array(gq.IQ4_NL.kvalues, dtype=np.float32),  # kvalues_iq4nl (16,)
    "fp4": np.array(gq.MXFP4.kvalues, dtype=np.float32),  # kvalues_mxfp4, doubled e2m1 (16,)
    "e8m0_half": _e8m0_half(),  # (256,)
    "ue4m3_half": _ue4m3_half(),  # (256,)
}


@functools.cache
def _table(name: str, device: torch.device) -> torch.Tensor:
    return torch.from_numpy(_HOST[name]).to(device)


def table(name: str, device: torch.device | str) -> torch.Tensor:
    """The float32 lookup table `name` on `device` (copied there once, then cached)."""
    return _table(name, torch.device(device))


# --- byte-field readers: (N, k) uint8 slices -> integer or float tensors, little-endian ---


def f16(b: torch.Tensor) -> torch.Tensor:
    """(N, 2) bytes of one fp16 -> (N, 1) float32 (exact, like `view(float16).astype(float32)`)."""
    return b.contiguous().view(torch.float16).to(torch.float32)


def u16(b: torch.Tensor) -> torch.Tensor:
    """(..., 2k) bytes -> (..., k) int32 holding the little-endian uint16 words."""
    w = b.reshape(*b.shape[:-1], b.shape[-1] // 2, 2).to(torch.int32)
    return w[..., 0] | (w[..., 1] << 8)


def u32(b: torch.Tensor) -> torch.Tensor:
    """(..., 4k) bytes -> (..., k) int64 holding the little-endian uint32 words."""
    w = b.reshape(*b.shape[:-1], b.shape[-1] // 4, 4).to(torch.int64)
    return w[..., 0] | (w[..., 1] << 8) | (w[..., 2] << 16) | (w[..., 3] << 24)


def spread(w: torch.Tensor, amounts: list[int], dim: int = -1) -> torch.Tensor:
    """Stack `w >> s` for each shift `s` along a new axis `dim` (Python-int shifts, so no
    small index tensor has to be made on the device)."""
    return torch.stack([w >> s for s in amounts], dim=dim)


def nibbles(b: torch.Tensor) -> torch.Tensor:
    """(..., k) bytes -> (..., 2, k) int64: all low nibbles, then all high nibbles."""
    return spread(b.to(torch.int64), [0, 4], dim=-2) & 0x0F
