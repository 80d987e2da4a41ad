"""Q5_0, Q5_1 and Q6_K as bit planes, read by `torch.compile`d (Inductor C++) dequant kernels.

Layout, chosen so the compiled loops vectorize over output rows `n` (contiguous innermost)
with a constant shift per weight index `k`:
  nib (K/2, N) uint8   low nibble of row r = weight r, high nibble = weight r + K/2
  hib (K/8, N) uint8   5-bit types: bit j of row s = fifth bit of weight s + j*K/8
      (K/4, N) uint8   Q6_K: bits 2j..2j+1 of row s = bits 4..5 of weight s + j*K/4
plus the block fields, transposed: fp16 `d` (and `m`) per 32 weights, or Q6_K's int8 `sc`
per 16 and fp16 `d` per 256. Same bytes as the ggml blocks (Q5_0 stores d per block: equal).
Values are formed as ggml does in float32 (`d * (q - 16)`, `d * q + m`, `(d * sc) * (q - 32)`).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from llamapy.quant.dequant import dequantize
from llamapy.quant.types import QuantType, type_size


@dataclass(frozen=True, slots=True)
class Planes:
    nib: torch.Tensor
    hib: torch.Tensor
    fields: tuple[torch.Tensor, ...]  # Q5_0: (d,); Q5_1: (d, m); Q6_K: (sc, d)


def _to_planes(q: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """q (N, K) int 0..2^bits-1 -> nib (K/2, N), hib (K*(bits-4)/8, N) uint8."""
    qt = q.T.to(torch.uint8)  # (K, N)
    k = qt.shape[0]
    nib = (qt[: k // 2] & 0x0F) | ((qt[k // 2 :] & 0x0F) << 4)
    hbits = bits - 4
    per_byte = 8 // hbits
    high = (qt >> 4).view(per_byte, k // per_byte, -1)  # (j, s, N): weight s + j*K/per_byte
    hib = torch.zeros_like(high[0])
    for j in range(per_byte):
        hib |= high[j] << (j * hbits)
    return nib.contiguous(), hib.contiguous()


def pack_planes(data: torch.Tensor, qtype: QuantType, n: int, k: int) -> Planes:
    blocks = data.reshape(-1, type_size(qtype))
    q = _integer_quants(blocks, qtype).view(n, k)
    if qtype == QuantType.Q6_K:
        nib, hib = _to_planes(q, 6)
        sc = blocks[:, 192:208].contiguous().view(torch.int8).reshape(n, k // 16)
        d = blocks[:, 208:210].contiguous().view(torch.float16).reshape(n, k // 256)
        return Planes(nib, hib, (sc.T.contiguous(), d.T.contiguous()))
    nib, hib = _to_planes(q, 5)
    fields = [blocks[:, 0:2]] + ([blocks[:, 2:4]] if qtype == QuantType.Q5_1 else [])
    fields = [f.contiguous().view(torch.float16).reshape(n, k // 32).T.contiguous() for f in fields]
    return Planes(nib, hib, tuple(fields))


def _integer_quants(blocks: torch.Tensor, qtype: QuantType) -> torch.Tensor:
    """The unsigned integer quants of each block, (rows, block_size) int32, via dequantize.

    Blocks are dequantized with d = 1 (and m = 0, sc = 1) written into a copy, so q comes from
    the same bit unpacking the dequantizers use.
    """
    unit = blocks.clone()
    one = torch.tensor([1.0], dtype=torch.float16).view(torch.uint8)
    if qtype == QuantType.Q6_K:
        unit[:, 208:210] = one
        unit[:, 192:208] = 1
        return dequantize(unit, qtype).to(torch.int32) + 32
    unit[:, 0:2] = one
    if qtype == QuantType.Q5_1:
        unit[:, 2:4] = 0
        return dequantize(unit, qtype).to(torch.int32)
    return dequantize(unit, qtype).to(torch.int32) + 16


def _quants(nib: torch.Tensor, hib: torch.Tensor, bits: int) -> torch.Tensor:
    """Planes -> q (K, N) int32 in natural weight order."""
    hbits = bits - 4
    mask = (1 << hbits) - 1
    lo = torch.cat([nib & 0x0F, nib >> 4], dim=0).to(torch.int32)
    hi = torch.cat([(hib >> (j * hbits)) & mask for j in range(8 // hbits)], dim=0)
    return lo | (hi.to(torch.int32) << 4)


def _weights_q5_0(nib, hib, d):
    q = _quants(nib, hib, 5)  # (K, N)
    k, n = q.shape
    w = (q - 16).to(torch.float32).view(k // 32, 32, n) * d.to(torch.float32).unsqueeze(1)
    return w.view(k, n)


def _weights_q5_1(nib, hib, d, m):
    q = _quants(nib, hib, 5)
    k, n = q.shape
    w = d.to(torch.float32).unsqueeze(1) * q.to(torch.float32).view(k // 32, 32, n)
    return (w + m.to(torch.float32).unsqueeze(1)).view(k, n)


def _weights_q6_k(nib, hib, sc, d):
    q = _quants(nib, hib, 6)
    k, n = q.shape
    dl = d.to(torch.float32).unsqueeze(1) * sc.to(torch.float32).view(k // 256, 16, n)
    w = dl.view(k // 16, 1, n) * (q - 32).to(torch.float32).view(k // 16, 16, n)
    return w.view(k, n)


WEIGHTS = {
    QuantType.Q5_0: _weights_q5_0,
    QuantType.Q5_1: _weights_q5_1,
    QuantType.Q6_K: _weights_q6_k,
}


def _gemv(weights):
    def gemv(x: torch.Tensor, nib, hib, *fields) -> torch.Tensor:
        w = weights(nib, hib, *fields)  # (K, N) float32, never materialized once compiled
        return (x.unsqueeze(-1) * w).sum(dim=-2)  # (M, K, 1) * (K, N) -> (M, N)

    return gemv


def _dequant_bf16(weights):
    def dequant(nib, hib, *fields) -> torch.Tensor:
        return weights(nib, hib, *fields).to(torch.bfloat16)

    return dequant


@functools.cache
def _compiled(qtype: QuantType, kind: str):
    """Compiled lazily, once per (type, kind) and per weight shape (static shapes: symbolic
    ones made the GEMV ~8x slower, measured); the GEMV is only ever called with M = 1."""
    make = _gemv if kind == "gemv" else _dequant_bf16
    return torch.compile(make(WEIGHTS[qtype]), dynamic=False)


def planar_gemv(x: torch.Tensor, qtype: QuantType, planes: Planes) -> torch.Tensor:
    """x (M, K) float32 -> (M, N) float32; fp32 products and sums (small M: row by row)."""
    gemv = _compiled(qtype, "gemv")
    rows = [gemv(x[i : i + 1], planes.nib, planes.hib, *planes.fields) for i in range(len(x))]
    return rows[0] if len(rows) == 1 else torch.cat(rows)


def planar_dequant_bf16(qtype: QuantType, planes: Planes) -> torch.Tensor:
    """The (K, N) weight in bf16 (for a bf16 GEMM at large M)."""
    return _compiled(qtype, "dequant")(planes.nib, planes.hib, *planes.fields)


def planes_nbytes(planes: Planes) -> int:
    return sum(t.nbytes for t in (planes.nib, planes.hib, *planes.fields))
