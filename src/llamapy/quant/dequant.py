"""Dequantize raw ggml blocks to float tensors, for every type gguf-py can dequantize.

Each type's dequantizer maps uint8 blocks `(N, type_size)` to float32 `(N, block_size)` with
torch ops only (no loop over blocks), so the same code runs on CPU and CUDA tensors. The
arithmetic follows ggml's reference `dequantize_row_*` (and gguf-py's numpy port) step for
step so results are bit-exact with gguf-py in float32.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from llamapy.errors import UnsupportedError
from llamapy.quant import fp4, iquants, kquants, legacy, tquants
from llamapy.quant.types import QuantType, block_size, type_size

BlockDequantizer = Callable[[torch.Tensor], torch.Tensor]


def _float_view(dtype: torch.dtype) -> BlockDequantizer:
    def dequant(blocks: torch.Tensor) -> torch.Tensor:
        return blocks.contiguous().view(dtype).to(torch.float32)

    return dequant


DEQUANTIZERS: dict[QuantType, BlockDequantizer] = {
    QuantType.F32: _float_view(torch.float32),
    QuantType.F16: _float_view(torch.float16),
    QuantType.BF16: _float_view(torch.bfloat16),
    **legacy.DEQUANTIZERS,
    **kquants.DEQUANTIZERS,
    **iquants.DEQUANTIZERS,
    **tquants.DEQUANTIZERS,
    **fp4.DEQUANTIZERS,
}


def dequantize(
    data: torch.Tensor, qtype: QuantType, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """Raw blocks `(..., nbytes)` (uint8) -> floats `(..., n)` of `dtype`."""
    fn = DEQUANTIZERS.get(qtype)
    if fn is None:
        raise UnsupportedError(f"dequantizing {qtype.name} is not supported")
    if data.dtype != torch.uint8:
        raise ValueError(f"expected uint8 blocks, got {data.dtype}")
    ts, bs = type_size(qtype), block_size(qtype)
    nbytes = data.shape[-1]
    if nbytes % ts:
        raise ValueError(f"{nbytes} bytes is not a whole number of {qtype.name} blocks of {ts}")
    lead = data.shape[:-1]
    out = fn(data.reshape(-1, ts))  # (N, bs) float32
    return out.reshape(*lead, nbytes // ts * bs).to(dtype)
