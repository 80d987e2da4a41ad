"""QLinear: y = x W^T (+ b) with W kept as ggml blocks."""

from __future__ import annotations

import torch

from llamapy.quant.dequant import dequantize
from llamapy.quant.qtensor import QTensor


class QLinear(torch.nn.Module):
    """A linear layer whose weight stays quantized in memory.

    The weight is dequantized in row chunks at each call, so at no time does the whole
    float matrix exist (the CPU reference path; fused kernels replace it on the GPU).
    """

    # Rows dequantized at once: bounds the float scratch to a few MB per call.
    CHUNK_ROWS = 2048

    def __init__(self, weight: QTensor, bias: torch.Tensor | None = None) -> None:
        super().__init__()
        if len(weight.shape) != 2:
            raise ValueError(f"QLinear needs a 2-D weight, got shape {weight.shape}")
        self.weight = weight
        self.bias = bias
        self.out_features, self.in_features = weight.shape

    def dense_weight(
        self, rows: slice | None = None, dtype: torch.dtype = torch.float32
    ) -> torch.Tensor:
        data = self.weight.data if rows is None else self.weight.data[rows]
        return dequantize(data, self.weight.qtype, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # (T, in) @ (in, out) in row chunks of W
        n = self.out_features
        if n <= self.CHUNK_ROWS:
            y = x @ self.dense_weight(dtype=x.dtype).T
        else:
            y = torch.empty(*x.shape[:-1], n, dtype=x.dtype, device=x.device)
            for start in range(0, n, self.CHUNK_ROWS):
                rows = slice(start, min(start + self.CHUNK_ROWS, n))
                torch.matmul(x, self.dense_weight(rows, x.dtype).T, out=y[..., rows])
        if self.bias is not None:
            y = y + self.bias
        return y

    def extra_repr(self) -> str:
        return f"{self.in_features} -> {self.out_features}, {self.weight.qtype.name}"


def embedding_lookup(weight: QTensor, ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Rows `ids` of a (vocab, dim) quantized table: only the looked-up rows are dequantized."""
    return dequantize(weight.data[ids], weight.qtype, dtype)
