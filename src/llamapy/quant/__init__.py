"""ggml quant types: raw-block tensors, dequantizers, quantizers."""

from llamapy.quant.qtensor import QTensor
from llamapy.quant.types import QuantType, block_size, row_nbytes, type_size

__all__ = ["QTensor", "QuantType", "block_size", "row_nbytes", "type_size"]
