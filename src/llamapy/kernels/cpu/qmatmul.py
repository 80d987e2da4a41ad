"""Quantized matmul on the CPU: y = x @ W.T (+ b) with W kept as (repacked) ggml blocks.

Methods, per weight type (chosen by measurement, see benchmarks/kernels/CPU_NOTES.md):
  vnni            Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K where AVX512-VNNI and numba are
                  (vnni.py): the blocks repacked into 16-row tiles, x quantized to 8 bits
                  per 32-block and integer dot products, as llama.cpp's CPU matmul; every M
                  (decode and prefill).
  int4pack        Q4_0, Q4_1, Q4_K directly; Q8_0, Q5_0, Q5_1, Q5_K, Q6_K, IQ4_NL, IQ4_XS
                  with each quant split into two nibbles (see int4pack.py): ATen's
                  AVX512-BF16 int4 GEMM. x is rounded to bf16, scales/zeros are bf16, sums
                  are fp32, the output is rounded to bf16 and returned as float32.
                  From `prefill_min_m` rows of x on, the packed weight is instead
                  dequantized to bf16 in row chunks for oneDNN's bf16 GEMM (2-4x faster at
                  M = 512; the weights are also rounded to bf16 there).
  dense           F32, F16, BF16: the weight as it is, `x @ W.T` in float32; F16/BF16 from
                  PREFILL_MIN_M rows of x on: a bf16 GEMM.
  dequant-chunks  everything else (and N not a multiple of 16): rows dequantized to float32
                  in chunks (QLinear's path).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from llamapy.kernels.cpu import int4pack, vnni
from llamapy.quant.dequant import dequantize
from llamapy.quant.types import QuantType, row_nbytes

# Rows dequantized at once by the fallback: bounds its float scratch to a few MB.
CHUNK_ROWS = 2048
# From this many rows of x on (prefill), int4pack weights are dequantized to bf16 in row
# chunks of about DEQUANT_CHUNK_WEIGHTS weights (scratch: 7-9 bytes each) and multiplied by
# oneDNN's bf16 GEMM; split types (the int4 kernel reduces over 2K) switch earlier.
# Measured crossovers: benchmarks/kernels/CPU_NOTES.md.
PREFILL_MIN_M = 160
PREFILL_MIN_M_SPLIT = 80
DEQUANT_CHUNK_WEIGHTS = 1 << 20
DENSE_TYPES = frozenset({QuantType.F32, QuantType.F16, QuantType.BF16})


@dataclass(frozen=True, slots=True)
class CpuWeight:
    """A weight in the form `qmatmul_cpu` reads; `method` names the kernel."""

    qtype: QuantType
    n: int
    k: int
    method: str  # "vnni", "int4pack", "dense" or "dequant-chunks"
    tensors: tuple[torch.Tensor, ...]  # int4pack: (nibbles, scales_and_zeros); vnni: (tiles,)
    int4: int4pack.Packed | None = None

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.tensors)


def pack_weight_cpu(data: torch.Tensor, qtype: QuantType, shape: tuple[int, int]) -> CpuWeight:
    """Repack ggml blocks `data` (N, row_bytes) uint8 of a (N, K) weight, once, at load."""
    n, k = shape
    if data.dtype != torch.uint8 or tuple(data.shape) != (n, row_nbytes(qtype, k)):
        raise ValueError(
            f"expected uint8 blocks of shape ({n}, {row_nbytes(qtype, k)}) for a {qtype.name} "
            f"({n}, {k}) weight, got {data.dtype} {tuple(data.shape)}"
        )
    if vnni.supported(qtype):
        return CpuWeight(qtype, n, k, "vnni", (_pack_vnni_in_chunks(data, qtype, n, k),))
    if qtype in int4pack.PACKERS and n % int4pack.ROW_MULTIPLE == 0:
        packed = _pack_int4_in_chunks(data, qtype, n, k)
        return CpuWeight(qtype, n, k, "int4pack", (packed.packed, packed.sz), packed)
    if qtype in DENSE_TYPES:
        w = data.view(torch.float32 if qtype == QuantType.F32 else _float_dtype(qtype))
        return CpuWeight(qtype, n, k, "dense", (w.view(n, k),))
    return CpuWeight(qtype, n, k, "dequant-chunks", (data,))


# Rows packed at once: bounds the packers' temporaries (several bytes per weight) for large
# matrices such as a 262144-row output; a multiple of the int4 layout's 64-row tile, so the
# chunks' bytes are the whole matrix's.
PACK_CHUNK_ROWS = 16384


def _pack_int4_in_chunks(
    data: torch.Tensor, qtype: QuantType, n: int, k: int, chunk: int = PACK_CHUNK_ROWS
) -> int4pack.Packed:
    pack = int4pack.PACKERS[qtype]
    if n <= chunk:
        return pack(data, n, k)
    assert chunk % int4pack.TILE_N == 0
    first = pack(data[:chunk], chunk, k)
    packed = torch.empty(n, first.packed.shape[1], dtype=first.packed.dtype)
    sz = torch.empty(first.sz.shape[0], n, 2, dtype=first.sz.dtype)
    packed[:chunk], sz[:, :chunk] = first.packed, first.sz
    for start in range(chunk, n, chunk):
        rows = min(chunk, n - start)
        part = pack(data[start : start + rows], rows, k)
        packed[start : start + rows] = part.packed
        sz[:, start : start + rows] = part.sz
    return int4pack.Packed(packed, sz, first.group, first.block, first.xmul, first.hi_mult)


def _pack_vnni_in_chunks(
    data: torch.Tensor, qtype: QuantType, n: int, k: int, chunk: int = PACK_CHUNK_ROWS
) -> torch.Tensor:
    """vnni.pack over row chunks (a multiple of its 16-row tiles): bounded temporaries."""
    if n <= chunk:
        return vnni.pack(data, qtype, n, k)
    assert chunk % vnni.TILE_N == 0
    tiles = torch.empty(-(-n // vnni.TILE_N), vnni.tile_row_bytes(qtype, k), dtype=torch.uint8)
    for start in range(0, n, chunk):
        rows = min(chunk, n - start)
        first = start // vnni.TILE_N
        part = vnni.pack(data[start : start + rows], qtype, rows, k)
        tiles[first : first + part.shape[0]] = part
    return tiles


def _float_dtype(qtype: QuantType) -> torch.dtype:
    return torch.float16 if qtype == QuantType.F16 else torch.bfloat16


def qmatmul_cpu(x: torch.Tensor, w: CpuWeight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x (M, K) float32 -> (M, N) float32."""
    if x.dim() != 2 or x.shape[1] != w.k:
        raise ValueError(f"expected x of shape (M, {w.k}), got {tuple(x.shape)}")
    x = x.to(torch.float32)
    if w.method == "vnni":
        y = vnni.vnni_mm(x, w.tensors[0], w.qtype, w.n)
    elif w.int4 is not None and x.shape[0] >= prefill_min_m(w):
        y = int4pack.dequant_mm(x, w.int4, w.n, dequant_chunk_rows(w.k))
    elif w.int4 is not None:
        y = int4pack.int4pack_mm(x, w.int4)
    elif w.method == "dense":
        y = _dense_mm(x, w)
    else:
        y = _dequant_chunks(x, w)
    if bias is not None:
        y += bias
    return y


def prefill_min_m(w: CpuWeight) -> int:
    """Rows of x from which `qmatmul_cpu` takes the bf16-dequant path for an int4pack weight."""
    return PREFILL_MIN_M_SPLIT if w.int4 is not None and w.int4.hi_mult else PREFILL_MIN_M


def dequant_chunk_rows(k: int) -> int:
    """Rows per bf16 chunk for a K-wide weight: a multiple of the 64-row tile."""
    tiles = max(1, DEQUANT_CHUNK_WEIGHTS // (k * int4pack.TILE_N))
    return tiles * int4pack.TILE_N


def _dense_mm(x: torch.Tensor, w: CpuWeight) -> torch.Tensor:
    """F32: fp32 GEMM. F16/BF16 from PREFILL_MIN_M rows on: a bf16 GEMM (2x the fp32 one;
    x, F16 weights and the output rounded to bf16), F16 rows converted in chunks."""
    (weight,) = w.tensors
    if w.qtype == QuantType.F32 or x.shape[0] < PREFILL_MIN_M:
        return x @ weight.to(torch.float32).T
    xb = x.to(torch.bfloat16)
    if w.qtype == QuantType.BF16:
        return torch.mm(xb, weight.T).to(torch.float32)
    y = torch.empty(x.shape[0], w.n, dtype=torch.float32)
    step = dequant_chunk_rows(w.k)
    for start in range(0, w.n, step):
        rows = slice(start, min(start + step, w.n))
        y[:, rows].copy_(torch.mm(xb, weight[rows].to(torch.bfloat16).T))
    return y


def _dequant_chunks(x: torch.Tensor, w: CpuWeight) -> torch.Tensor:
    (data,) = w.tensors
    y = torch.empty(x.shape[0], w.n, dtype=torch.float32)
    for start in range(0, w.n, CHUNK_ROWS):
        rows = slice(start, min(start + CHUNK_ROWS, w.n))
        torch.matmul(x, dequantize(data[rows], w.qtype).T, out=y[:, rows])
    return y


def qmatmul_cpu_reference(
    x: torch.Tensor,
    data: torch.Tensor,
    qtype: QuantType,
    shape: tuple[int, int],
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """x @ dequantize(data).T computed in float64, returned as float32: the oracle."""
    w = dequantize(data, qtype).to(torch.float64).view(shape)
    y = x.to(torch.float64) @ w.T
    if bias is not None:
        y = y + bias.to(torch.float64)
    return y.to(torch.float32)
