"""Dequantizers of the legacy 32-weight block types: Q4_0, Q4_1, Q5_0, Q5_1, Q8_0.

Each mirrors ggml's `dequantize_row_*` (ggml-quants.c) as ported to numpy by gguf-py
(`gguf.quants`), keeping the float32 operations and their order, so the results are
bit-identical: fp16 fields are widened to float32, then `d * q` (plus `m` for the `_1` types)
is computed in float32 with one rounding per operation.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch

from llamapy.quant.types import QuantType, type_size


def fp16_field(blocks: torch.Tensor, offset: int) -> torch.Tensor:
    """The little-endian fp16 at byte `offset` of each block, as float32 `(N, 1)`."""
    return blocks[:, offset : offset + 2].contiguous().view(torch.float16).to(torch.float32)


def unpack_bits(data: torch.Tensor, shifts: tuple[int, ...], mask: int) -> torch.Tensor:
    """`(data[..., None, :] >> shift) & mask` for each shift: `(..., len(shifts), L)` uint8.

    This is numpy's `x.reshape(..., 1, L) >> np.array(shifts).reshape(1, S, 1)` in gguf-py.
    """
    return (data.unsqueeze(-2) >> _shift_column(shifts, data.device)) & mask


@functools.cache
def _shift_column(shifts: tuple[int, ...], device: torch.device) -> torch.Tensor:
    # cached per device: no host-to-device copy per call (CUDA-graph capture forbids one)
    return torch.tensor(shifts, dtype=torch.uint8, device=device).view(-1, 1)


def _nibbles(qs: torch.Tensor) -> torch.Tensor:
    """16 bytes -> 32 values: low nibbles are weights 0..15, high nibbles weights 16..31."""
    return unpack_bits(qs, (0, 4), 0x0F).flatten(-2)


def _high_bits(qh: torch.Tensor) -> torch.Tensor:
    """The 32-bit little-endian `qh` field -> bit j of it for weight j, as (N, 32) uint8."""
    return unpack_bits(qh, tuple(range(8)), 1).transpose(-1, -2).flatten(-2)


def dequant_q4_0(blocks: torch.Tensor) -> torch.Tensor:
    """block_q4_0 {fp16 d; u8 qs[16]}: x = d * (q - 8) (dequantize_row_q4_0)."""
    d = fp16_field(blocks, 0)
    q = _nibbles(blocks[:, 2:]).to(torch.int8) - 8
    return d * q.to(torch.float32)


def dequant_q4_1(blocks: torch.Tensor) -> torch.Tensor:
    """block_q4_1 {fp16 d, m; u8 qs[16]}: x = d * q + m (dequantize_row_q4_1)."""
    d, m = fp16_field(blocks, 0), fp16_field(blocks, 2)
    q = _nibbles(blocks[:, 4:]).to(torch.float32)
    return d * q + m


def dequant_q5_0(blocks: torch.Tensor) -> torch.Tensor:
    """block_q5_0 {fp16 d; u32 qh; u8 qs[16]}: x = d * (q - 16) (dequantize_row_q5_0)."""
    d = fp16_field(blocks, 0)
    q = _nibbles(blocks[:, 6:]) | (_high_bits(blocks[:, 2:6]) << 4)
    return d * (q.to(torch.int8) - 16).to(torch.float32)


def dequant_q5_1(blocks: torch.Tensor) -> torch.Tensor:
    """block_q5_1 {fp16 d, m; u32 qh; u8 qs[16]}: x = d * q + m (dequantize_row_q5_1)."""
    d, m = fp16_field(blocks, 0), fp16_field(blocks, 2)
    q = _nibbles(blocks[:, 8:]) | (_high_bits(blocks[:, 4:8]) << 4)
    return d * q.to(torch.float32) + m


def dequant_q8_0(blocks: torch.Tensor) -> torch.Tensor:
    """block_q8_0 {fp16 d; i8 qs[32]}: x = q * d (dequantize_row_q8_0)."""
    d = fp16_field(blocks, 0)
    q = blocks[:, 2:].contiguous().view(torch.int8).to(torch.float32)
    return q * d


DEQUANTIZERS: dict[QuantType, Callable[[torch.Tensor], torch.Tensor]] = {
    QuantType.Q4_0: dequant_q4_0,
    QuantType.Q4_1: dequant_q4_1,
    QuantType.Q5_0: dequant_q5_0,
    QuantType.Q5_1: dequant_q5_1,
    QuantType.Q8_0: dequant_q8_0,
}


# Q4_0 and Q5_0 blocks hold x = d * (q - 8) and d * (q - 16) with a 4- or 5-bit q and an
# fp16 d; Q8_0 holds x = q * d with an int8 q and the same fp16 d over the same 32 weights,
# so each of their blocks has an exact Q8_0 twin (same d, q - 8 / q - 16 as int8).
WIDENS_TO_Q8_0 = frozenset({QuantType.Q4_0, QuantType.Q5_0, QuantType.Q8_0})


def widen_to_q8_0(data: torch.Tensor, qtype: QuantType) -> torch.Tensor:
    """ggml blocks (N, row bytes) uint8 of `qtype` (WIDENS_TO_Q8_0) -> the same rows as Q8_0
    blocks (N, row weights / 32 * 34) uint8, dequantizing to bit-identical values."""
    if qtype not in WIDENS_TO_Q8_0:
        raise ValueError(f"{qtype.name} blocks have no exact Q8_0 form")
    if qtype == QuantType.Q8_0:
        return data
    width = type_size(qtype)
    if data.dtype != torch.uint8 or data.dim() != 2 or data.shape[1] % width:
        raise ValueError(
            f"expected (N, whole {qtype.name} blocks) uint8, got {data.dtype} {tuple(data.shape)}"
        )
    n, nb = data.shape[0], data.shape[1] // width
    blocks = data.reshape(n * nb, width)
    if qtype == QuantType.Q4_0:
        q = _nibbles(blocks[:, 2:]).to(torch.int8) - 8
    else:
        q = (_nibbles(blocks[:, 6:]) | (_high_bits(blocks[:, 2:6]) << 4)).to(torch.int8) - 16
    out = torch.cat([blocks[:, :2], q.view(torch.uint8)], dim=1)  # {fp16 d; i8 qs[32]}
    return out.reshape(n, nb * type_size(QuantType.Q8_0))
