"""A quantized weight repacked once at load into the layout the Triton matmuls read."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from llamapy.quant.types import QuantType


@dataclass(slots=True)
class PackedWeight:
    """(N, K) weight of `qtype`, as tensors named by the type's packer (for instance
    `qs` (N, K // 2) uint8 nibbles and `d` (N, K // 32) float16 scales for Q4_0).

    Packers split ggml's array-of-structs blocks into separate, aligned arrays so that the
    kernels issue wide, coalesced loads; values are the blocks' own (no requantization), so
    the dequantized weight is bit-identical to ggml's.
    """

    qtype: QuantType
    n: int  # output features (rows)
    k: int  # input features (columns)
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def device(self) -> torch.device:
        return next(iter(self.tensors.values())).device

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors.values())
