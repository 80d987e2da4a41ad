"""Integer dot-product matmuls on x86 CPUs with AVX512-VNNI, compiled by numba from Python.

llama.cpp's CPU matmul quantizes each row of x to 8 bits per 32-block (its `vec_dot_type`,
Q8_0 or Q8_1) and multiplies the weight's integer quants with it in integer arithmetic:
`vpdpbusd` takes 64 unsigned-by-signed byte products per instruction, 4x the float32 FMAs
ATen's int4 kernel converts every weight into. This module does the same, reading the GGUF
blocks where they lie (the memory-mapped file; no repacked copy):

    y[m, n] = sum_b  dw[n, b] * dx[m, b] * isum[m, n, b]  +  cw[n, b] * cx[m, b]

with `isum` the exact integer dot of block b's unsigned quants u with x's int8 quants q,
and the second term folding each type's offset into one float per block:

    type   u (weight codes, unsigned)   cw   cx (per x block)
    Q4_0   nibble (w = d (u - 8))       d    -8 * dx * sum(q)
    Q4_1   nibble (w = d u + m)         m    fp16(d_x * sum(q))  (llama.cpp's Q8_1 `s`)
    Q8_0   q + 128 (w = d q)            d    -128 * dx * sum(q)

x is quantized as llama.cpp's x86 `quantize_row_q8_0` / `quantize_row_q8_1` do
(kernels/cpu/ggml_numerics.py, which checks them against llama.cpp's own quantizers):
dx = fp16(amax / 127), q = round-half-even(x * 127 / amax). So the matmul is llama.cpp's,
up to float32 summation order: each 64-byte step is two blocks' integer dots as 16 int32
lanes, scaled per lane in float32 and accumulated in 16 float32 lanes.

The kernel of one weight row against up to 4 rows of x is written in LLVM IR through
numba's `intrinsic` (the x86 VNNI intrinsic has no Python spelling; everything else is
numba-compiled Python): 4 rows of x share each unpacked 64-byte weight step. Weight rows
run in parallel on torch's own OpenMP threads (as many as `torch.get_num_threads()`).

Available where numba imports and the host CPU has AVX512-VNNI, -BW and -VL
(`available()`); `LLAMAPY_CPU_VNNI=0` turns it off. Weights whose K is not a multiple of
64 (an odd number of 32-blocks) keep the int4pack path (`supported`).
"""

from __future__ import annotations

import functools
import os

import numpy as np
import torch

from llamapy.quant.types import QuantType

# Weight types this module multiplies, with their block layout: bytes per 32-block, the
# offsets of the fp16 scale d, of the second fp16 (Q4_1's m; -1: none) and of the quants.
LAYOUTS: dict[QuantType, tuple[int, int, int, int]] = {
    QuantType.Q4_0: (18, 0, -1, 2),
    QuantType.Q4_1: (20, 0, 2, 4),
    QuantType.Q8_0: (34, 0, -1, 2),
}
TILE_M = 4  # rows of x per weight-row step
BLOCK_N = 16  # weight rows per parallel task of a many-row x (they stay in L1 across x tiles)
_OFF_VALUES = ("0", "false", "no", "off")
# torch's own OpenMP runtime: the kernels run on its thread pool (see _vnni_numba.py).
GOMP_PATH = os.path.join(os.path.dirname(torch.__file__), "lib", "libgomp.so.1")


def _switched_on() -> bool:
    return os.environ.get("LLAMAPY_CPU_VNNI", "1").strip().lower() not in _OFF_VALUES


@functools.cache
def _host_has_vnni() -> bool:
    try:
        import llvmlite.binding as llvm
    except ImportError:
        return False
    features = llvm.get_host_cpu_features()
    return all(features.get(f, False) for f in ("avx512vnni", "avx512bw", "avx512vl"))


@functools.cache
def _numba_imports() -> bool:
    try:
        import numba  # noqa: F401
    except ImportError:
        return False
    return True


def available() -> bool:
    """Whether the VNNI kernels can run here (numba, AVX512-VNNI, torch's libgomp, not
    switched off)."""
    return (
        _switched_on() and os.path.exists(GOMP_PATH) and _numba_imports() and _host_has_vnni()
    )


def supported(qtype: QuantType, k: int) -> bool:
    """Whether a (N, k) weight of `qtype` can take these kernels (here, now)."""
    return qtype in LAYOUTS and k % 64 == 0 and available()


# -- x: llama.cpp's Q8_0 / Q8_1 activations ----------------------------------------------


def quantize_x(x: torch.Tensor, qtype: QuantType) -> tuple[torch.Tensor, torch.Tensor]:
    """x (M, K) float32 -> (q (M, K) int8 in the kernel's order, scales (M, 2, K/32) float32:
    dx and cx of every 32-block, see the module docstring).

    Order: Q8_0 keeps x's; the 4-bit types take per pair of blocks (a, b) the quants
    [a[0:16], b[0:16], a[16:32], b[16:32]], the order the kernel unpacks the two blocks'
    low and high nibbles in."""
    m, k = x.shape
    xb = x.reshape(m, k // 32, 32).float()
    amax = xb.abs().amax(-1)
    inv = torch.where(amax != 0, torch.full_like(amax, 127.0) / amax, torch.zeros_like(amax))
    q = torch.round(xb * inv[..., None])  # half to even, as _mm256_round_ps
    d = amax / 127.0
    dx = d.to(torch.float16).float()
    qsum = q.sum(-1)  # exact in float32: |sum| <= 32 * 127
    if qtype == QuantType.Q4_1:
        cx = (d * qsum).to(torch.float16).float()
    else:
        cx = (-8.0 if qtype == QuantType.Q4_0 else -128.0) * dx * qsum
    q8 = q.to(torch.int8)
    if qtype != QuantType.Q8_0:
        q8 = q8.view(m, k // 64, 2, 2, 16).transpose(2, 3)
    return q8.reshape(m, k), torch.stack([dx, cx], dim=1)


def vnni_mm(x: torch.Tensor, data: torch.Tensor, qtype: QuantType, n: int) -> torch.Tensor:
    """x (M, K) float32 @ W.T for W's ggml blocks `data` (N, row bytes) uint8 -> (M, N)
    float32: llama.cpp's quantized dot products (see the module docstring)."""
    q, scales = quantize_x(x, qtype)
    return torch.ops.llamapy.vnni_mm(q, scales, data, int(qtype), n)


def dequantize_rows_bf16(
    data: torch.Tensor, qtype: QuantType, start: int, stop: int, out: torch.Tensor
) -> torch.Tensor:
    """Rows start:stop of W's ggml blocks `data` as bf16 into `out` (at least (stop - start)
    * K elements, contiguous): the float32 weights `quant.dequant` gives, rounded to
    nearest-even bf16. Returns the (stop - start, K) view."""
    k = data.shape[1] // LAYOUTS[qtype][0] * 32
    rows = stop - start
    if out.dtype != torch.bfloat16 or not out.is_contiguous() or out.numel() < rows * k:
        raise ValueError(f"out must be contiguous bf16 with >= {rows * k} elements")
    if not 0 <= start <= stop <= data.shape[0]:
        raise ValueError(f"rows {start}:{stop} out of range for {data.shape[0]} rows")
    if rows:
        nb = _numba()
        args = np.array([data.data_ptr(), data.stride(0), start, stop, k, out.data_ptr()])
        nb.launch(nb.DEQUANT[qtype], args, torch.get_num_threads())
    return out[: rows * k].view(rows, k)


def dequant_mm(
    x: torch.Tensor, data: torch.Tensor, qtype: QuantType, n: int, chunk_rows: int
) -> torch.Tensor:
    """x (M, K) float32 @ W.T through bf16 chunks of W (at most `chunk_rows` rows) and
    oneDNN's bf16 GEMM (the prefill path, as int4pack.dequant_mm): x and W rounded to bf16,
    sums in float32, the output rounded to bf16 and returned as float32."""
    m, k = x.shape
    xb = x.to(torch.bfloat16)
    y = torch.empty(m, n, dtype=torch.float32)
    rows = min(chunk_rows, n)
    scratch = torch.empty(rows * k, dtype=torch.bfloat16)
    yb = torch.empty(m * rows, dtype=torch.bfloat16)
    for start in range(0, n, rows):
        stop = min(start + rows, n)
        part = yb[: m * (stop - start)].view(m, stop - start)
        w = dequantize_rows_bf16(data, qtype, start, stop, scratch)
        torch.mm(xb, w.T, out=part)
        y[:, start:stop].copy_(part)
    return y


# A plain library op, not `torch.library.custom_op`: its dispatch costs ~3 us a call instead
# of ~10 (measured), which counts at ~120 matmuls a decoded token.
_LIB = torch.library.Library("llamapy", "FRAGMENT")
_LIB.define("vnni_mm(Tensor q, Tensor scales, Tensor data, int qtype, int n) -> Tensor")


def _vnni_mm_cpu(
    q: torch.Tensor, scales: torch.Tensor, data: torch.Tensor, qtype: int, n: int
) -> torch.Tensor:
    m, k = q.shape
    y = torch.empty(m, n, dtype=torch.float32)
    if m == 0 or n == 0:
        return y
    q, scales = q.contiguous(), scales.contiguous()
    nb = _numba()
    args = np.array(
        [data.data_ptr(), data.stride(0), n, q.data_ptr(), m, k, scales.data_ptr(), y.data_ptr()]
    )
    nb.launch(nb.MATMUL[QuantType(qtype)], args, torch.get_num_threads())
    return y


def _vnni_mm_fake(
    q: torch.Tensor, scales: torch.Tensor, data: torch.Tensor, qtype: int, n: int
) -> torch.Tensor:
    return q.new_empty(q.shape[0], n, dtype=torch.float32)


_LIB.impl("vnni_mm", _vnni_mm_cpu, "CPU")
torch.library.register_fake("llamapy::vnni_mm", _vnni_mm_fake, lib=_LIB)


# -- the kernels ---------------------------------------------------------------------------


@functools.cache
def _numba():
    """The numba kernels (kernels/cpu/_vnni_numba.py), compiled on first use."""
    if not available():
        raise RuntimeError(
            "the VNNI CPU kernels need numba, torch's bundled libgomp and a CPU with "
            "AVX512-VNNI (and LLAMAPY_CPU_VNNI not 0)"
        )
    from llamapy.kernels.cpu import _vnni_numba

    return _vnni_numba
