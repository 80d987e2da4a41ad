"""Dequantizers of the 4-bit float types MXFP4 and NVFP4, bit-exact with gguf-py.

Both store E2M1 nibbles, decoded through ggml's kvalues_mxfp4 (the E2M1 values doubled), so
the block scale carries a compensating factor 0.5: MXFP4 an E8M0 exponent byte per 32 weights
(ggml_e8m0_to_fp32_half, dequantize_row_mxfp4), NVFP4 an unsigned E4M3 byte per 16 weights
(gguf-py's NVFP4.ue4m3_to_fp32). Scales are looked up in 256-entry float32 tables holding the
exact values gguf-py computes; the product is one float32 multiply as in gguf-py.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from llamapy.quant.grids import nibbles, table
from llamapy.quant.types import QuantType


def dequant_mxfp4(blocks: torch.Tensor) -> torch.Tensor:
    """MXFP4 (17 B, 32 weights): E8M0 byte, then 16 bytes: 16 low nibbles, 16 high."""
    n, dev = blocks.shape[0], blocks.device
    d = table("e8m0_half", dev)[blocks[:, :1].long()]  # (n, 1): 2**(e - 128)
    q = nibbles(blocks[:, 1:17]).reshape(n, 32)
    return d * table("fp4", dev)[q]


def dequant_nvfp4(blocks: torch.Tensor) -> torch.Tensor:
    """NVFP4 (36 B, 64 weights): 4 UE4M3 bytes, then 4 x 8 bytes, one group per 16 weights."""
    n, dev = blocks.shape[0], blocks.device
    d = table("ue4m3_half", dev)[blocks[:, :4].long()].reshape(n, 4, 1)
    q = nibbles(blocks[:, 4:36].reshape(n, 4, 8)).reshape(n, 4, 16)  # 8 low, then 8 high
    return (d * table("fp4", dev)[q]).reshape(n, 64)


DEQUANTIZERS: dict[QuantType, Callable[[torch.Tensor], torch.Tensor]] = {
    QuantType.MXFP4: dequant_mxfp4,
    QuantType.NVFP4: dequant_nvfp4,
}
