"""Dequantizers of ggml's ternary types TQ1_0 and TQ2_0, bit-exact with gguf-py.

Mirrors ggml's `dequantize_row_tq1_0` / `dequantize_row_tq2_0` (ggml-quants.c) in the layout
of gguf-py's numpy port: trits in {-1, 0, 1} times the fp16 block scale, in float32.
Blocks are `(N, type_size)` uint8, results `(N, 256)` float32.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from llamapy.quant.grids import f16, spread
from llamapy.quant.types import QuantType

QK_K = 256


def _trits(b: torch.Tensor, powers: list[int]) -> torch.Tensor:
    """(n, k) base-3 packed bytes -> (n, len(powers) * k) trits in {-1, 0, 1}.

    Trit i of byte q is `((uint8)(q * 3**i) * 3) >> 8` (the uint8 product wraps, as in ggml).
    """
    w = b.to(torch.int32)
    q = torch.stack([(w * p) & 0xFF for p in powers], dim=-2)  # (n, len(powers), k)
    return (((q * 3) >> 8) - 1).reshape(b.shape[0], len(powers) * b.shape[1])


def dequant_tq1_0(blocks: torch.Tensor) -> torch.Tensor:
    """TQ1_0 (54 B): 48 bytes of 5 trits, 4 bytes of 4 trits, fp16 d (dequantize_row_tq1_0)."""
    pow5, pow4 = [1, 3, 9, 27, 81], [1, 3, 9, 27]
    d = f16(blocks[:, 52:54])
    q = torch.cat(
        [
            _trits(blocks[:, :32], pow5),  # 160 weights
            _trits(blocks[:, 32:48], pow5),  # 80 weights
            _trits(blocks[:, 48:52], pow4),  # 16 weights
        ],
        dim=-1,
    )
    return d * q.to(torch.float32)


def dequant_tq2_0(blocks: torch.Tensor) -> torch.Tensor:
    """TQ2_0 (66 B): 64 bytes of four 2-bit values (minus 1), fp16 d (dequantize_row_tq2_0)."""
    n = blocks.shape[0]
    d = f16(blocks[:, 64:66])
    qs = blocks[:, :64].reshape(n, 2, 32).to(torch.int32)
    q = (spread(qs, [0, 2, 4, 6], dim=-2) & 0x03) - 1  # (n, 2, 4, 32)
    return d * q.reshape(n, QK_K).to(torch.float32)


DEQUANTIZERS: dict[QuantType, Callable[[torch.Tensor], torch.Tensor]] = {
    QuantType.TQ1_0: dequant_tq1_0,
    QuantType.TQ2_0: dequant_tq2_0,
}
