"""QTensor: a weight kept as raw ggml blocks, with its type and logical shape."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from llamapy.quant.types import QuantType, block_size, row_nbytes


@dataclass(frozen=True, slots=True)
class QTensor:
    """Raw ggml blocks of a tensor.

    `data` is uint8 of shape `(*shape[:-1], row_nbytes)`: each row of the logical tensor is
    a run of whole blocks, exactly as it lies in a GGUF file (often a view of the mmapped
    file). `shape` is the logical shape in torch order (GGUF's `ne` reversed).
    """

    data: torch.Tensor
    qtype: QuantType
    shape: tuple[int, ...]

    def __post_init__(self) -> None:
        if self.data.dtype != torch.uint8:
            raise ValueError(f"QTensor data must be uint8 blocks, got {self.data.dtype}")
        if not self.shape:
            raise ValueError("QTensor shape must have at least one dimension")
        expected = (*self.shape[:-1], row_nbytes(self.qtype, self.shape[-1]))
        if tuple(self.data.shape) != expected:
            raise ValueError(
                f"QTensor data shape {tuple(self.data.shape)} does not match "
                f"{self.qtype.name} blocks of logical shape {self.shape} (expected {expected})"
            )

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n

    @property
    def nbytes(self) -> int:
        return self.data.numel()

    @property
    def device(self) -> torch.device:
        return self.data.device

    @property
    def block_size(self) -> int:
        return block_size(self.qtype)

    def to(self, device: torch.device | str) -> QTensor:
        return QTensor(self.data.to(device), self.qtype, self.shape)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The float tensor of logical `shape` (a fallback, not the fast path)."""
        from llamapy.quant.dequant import dequantize

        return dequantize(self.data, self.qtype, dtype=dtype).view(self.shape)

    def __repr__(self) -> str:
        return f"QTensor({self.qtype.name}, shape={self.shape}, device={self.device})"
