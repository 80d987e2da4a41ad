"""Fused dequantize-matmul: y = x W^T (+ b) with W read as packed ggml blocks.

The weight is repacked once at load (`pack_weight`) into struct-of-arrays tensors (quants,
scales, offsets, high bits as separate, row-contiguous arrays) and never expanded to float in
memory: each kernel dequantizes tiles in registers. Two kernels per type:

- GEMV (decode, M <= GEMV_MAX_M): each program owns BLOCK_N output rows and walks K reading
  whole 32-weight blocks; the block sums use the factored form
  `sum_j (d q_j + c) x_j = d * sum_j q_j x_j + c * sum_j x_j` (c = m, or -8d / -16d for the
  `_0` types), in float32 from the exact float32 weights; or (CUDA, opt-in: GEMV_INT8_X)
  with x quantized to int8 per block in the prologue and the block sums taken as integer dot
  products (dp4a), as llama.cpp's CUDA kernels do. Small-N, large-K shapes split K
  over programs that write float32 partials to a workspace; a second tiny kernel adds them
  in a fixed order (deterministic, no atomics). One float32 row against a large Q4_0 / Q4_1
  weight goes instead to `xcodes`: x (with the prologue) quantized once into two levels of
  int8 codes, then a dp4a GEMV over x-stationary tiles.
- GEMM (prefill): the dequantized tile (bit-identical to `dequantize` in float32) is rounded
  to x's 16-bit dtype and fed to `tl.dot` with float32 accumulation. For float32 x the tiles
  stay float32 and the dot runs in TF32 (10-bit mantissa, float32 range), so large scales
  cannot overflow as they could in fp16.

4- and 5-bit blocks keep ggml's nibble order (byte j holds weights j and j + 16); rather than
reorder the weights, the kernels read x in the same order (x[32b + j] with the low nibbles,
x[32b + 16 + j] with the high ones), which a dot product does not mind.

Kernels take every size from tensor shapes (no host sync, no data-dependent allocation), so
they can be captured in CUDA graphs. Types the K-quant module (`qmatmul_kquants`) covers are
delegated to it; any other type is dequantized once to bfloat16 at pack time.
"""

from __future__ import annotations

import functools
import logging
import os

import torch

from llamapy.kernels.triton import HAS_TRITON, INTERPRET, pdl, rounding, triton_usable
from llamapy.kernels.triton.decode_splits import DecodeSplits
from llamapy.kernels.triton.packed import PackedWeight
from llamapy.quant.dequant import dequantize
from llamapy.quant.types import QuantType, block_size, row_nbytes

try:  # the K-quant kernels live in their own module; this one stands alone without it
    from llamapy.kernels.triton import qmatmul_kquants as _kquants
except ImportError:
    _kquants = None

if HAS_TRITON:
    import triton
    import triton.language as tl

logger = logging.getLogger(__name__)


def _level_from_env(name: str) -> int | None:
    """An int8-activation switch from the environment: unset or empty None; 0/false/off/no
    0; 1/true/on/yes 1; 2 (two levels); anything else is ignored with a warning naming it
    (an import must not fail on a typo)."""
    value = os.environ.get(name, "").strip().lower()
    levels = {"0": 0, "false": 0, "off": 0, "no": 0, "1": 1, "true": 1, "on": 1, "yes": 1, "2": 2}
    if value in levels:
        return levels[value]
    if value:
        logger.warning("%s=%r is not 0, 1 or 2: ignored", name, os.environ[name])
    return None


QK = 32  # weights per block of the legacy types (and the unit the float kernels step by)

# Kernel type codes (constexpr); the nibble types come first.
_Q4_0, _Q4_1, _Q5_0, _Q5_1, _Q8_0, _FLOAT, _Q4_1_BYTES = range(7)
_CODES: dict[QuantType, int] = {
    QuantType.Q4_0: _Q4_0,
    QuantType.Q4_1: _Q4_1,
    QuantType.Q5_0: _Q5_0,
    QuantType.Q5_1: _Q5_1,
    QuantType.Q8_0: _Q8_0,
    QuantType.F16: _FLOAT,
    QuantType.BF16: _FLOAT,
    QuantType.F32: _FLOAT,
}
_KQUANT_TYPES: frozenset[QuantType] = _kquants.TYPES if _kquants is not None else frozenset()
SUPPORTED_TYPES: frozenset[QuantType] = frozenset(_CODES) | _KQUANT_TYPES

# Decode batches up to this many rows take the GEMV kernel. Its per-row cost is two fp32 FMAs
# per weight on CUDA cores: at 4 rows that is ~4 FMA per weight byte of Q4_0, about what an
# H100 issues while streaming ~3 TB/s; beyond it `tl.dot` (tensor cores, tile dequantized
# once for 16 rows) is cheaper. `benchmarks/kernels/bench_qmatmul.py --crossover` checks it.
GEMV_MAX_M = 4
# The decode GEMV of the legacy quantized types can quantize x to int8 per 32-block on the
# fly (scale amax / 127, as llama.cpp's q8_1 activations) and take integer dot products (one
# dp4a per four weights) instead of converting every weight to float32: fewer ALU operations
# per weight byte. Its results differ from the float32 path by x's rounding (|x - x~| <=
# amax / 254 per element), as llama.cpp's CUDA decode kernels' do. Measured (H200,
# Llama-3.2-1B shape, tg128): Q4_0 1068 -> 1243 t/s, Q4_1 1044 -> 1191, Q8_0 1089 -> 1088;
# but decoding then agrees with the CPU's float32 logits on top-1 for only 85-94% of the
# tokens of a random-weight 1B model (KL ~9e-4; float32 x: 100%, KL 3e-7), under issue 6's
# 99% bar, so no type takes it by default (benchmarks/RESULTS.md, eighth session). Level 2
# also quantizes the residual x - s c (x's error ~254 times smaller, twice the integer work;
# not measured on a GPU yet). LLAMAPY_GEMV_INT8_X=1 / 2 / 0 turns it on (levels) / off for
# every legacy type on CUDA (unset: the types in _Q8X_DEFAULT_TYPES, level 1);
# gemv_config={"Q8X": 0 / 1 / 2} sets it per call.
GEMV_INT8_X: int | None = _level_from_env("LLAMAPY_GEMV_INT8_X")
_Q8X_DEFAULT_TYPES: frozenset[QuantType] = frozenset()
_Q8X_TYPES = frozenset({QuantType.Q4_0, QuantType.Q4_1, QuantType.Q5_0, QuantType.Q5_1,
                        QuantType.Q8_0})  # fmt: skip
# From this many rows of x on (prefill, large decode batches), a quantized or F16/BF16
# weight is dequantized to a 16-bit scratch (at most DEQUANT_SCRATCH weights at a time) and
# multiplied by cuBLAS: the fused GEMM dequantizes every weight tile once per row tile and
# is ALU-bound on it (benchmarks/RESULTS.md, issue 6). x goes in as float16 scaled per row
# by a power of two (no overflow; bf16 x and W for BF16 weights), products summed in float32.
DEQUANT_MM_MIN_M = 64
DEQUANT_SCRATCH = 1 << 25
# Between these row counts, Q4_0 / Q4_1 / Q8_0 weights with K >= F16_GEMM_MIN_K (not vocabulary-
# sized) take the fp16-tile GEMM with split-K (`qgemm_f16`): it reads the blocks once, where
# dequant + cuBLAS writes and re-reads a 16-bit copy and the TF32 GEMM is ALU-bound. H200,
# Llama-3.2-1B shapes (benchmarks/kernels/gemm_f16_lab.py): 1.1-1.6x over the better of the
# two at M = 64, 1.2-1.7x at M = 16-32; slower from M = 128, and a wash at K = 576. The
# vocabulary-sized output too (its fp16 copy alone is 525 MB at the 1B shape): a 1B file's
# batched decode, S_TG (H200, gpu_bench.py --batch 16,32,64, one lease), Q4_0 B=16 10,344 ->
# 10,536, B=32 18,279 -> 19,053, B=64 26,758 -> 29,383; Q8_0 B=64 27,117 -> 30,198; Q4_1
# B=64 25,211 -> 27,384; Q4_K_M (its Q6_K output, 64 rows) 22,471 -> 23,293.
F16_GEMM_MIN_M, F16_GEMM_MAX_M, F16_GEMM_MIN_K = 16, 64, 1536
_F16_GEMM_TYPES = frozenset({QuantType.Q4_0, QuantType.Q4_1, QuantType.Q8_0})
# Q4_K / Q6_K have tiles too (path="f16") and are routed there at F16_GEMM_MAX_M rows only:
# H200, a 1B Q4_K_M file's batched decode (S_TG, one call, `gpu_bench.py --batch`): B = 64
# 19.8k -> 21.7k t/s, but B = 16 7.7k -> 6.3k and B = 32 13.8k -> 12.6k (the dequantize
# path wins there).
_F16_KQUANT_TYPES = frozenset({QuantType.Q4_K, QuantType.Q6_K})
_F16_KERNEL_TYPES = _F16_GEMM_TYPES | _F16_KQUANT_TYPES

_X_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_FALLBACK_CHUNK_ROWS = 4096  # rows dequantized at once on the fallback path (bounds scratch)


# --------------------------------------------------------------------------- packing


def _split_blocks(data: torch.Tensor, n: int, nb: int, fields: dict[str, tuple[int, int]]):
    """ggml blocks (N, nb * type_size) -> {name: (N, nb, width) uint8} byte ranges per field."""
    blocks = data.reshape(n, nb, -1)  # (N, nb, type_size)
    return {name: blocks[:, :, a:b] for name, (a, b) in fields.items()}


def _as(field: torch.Tensor, dtype: torch.dtype, n: int) -> torch.Tensor:
    """(N, nb, width) bytes -> (N, nb * width / itemsize) of `dtype`, contiguous."""
    return field.contiguous().view(dtype).reshape(n, -1)


# Byte ranges of the fields of each legacy block (the ggml block_* structs).
_LEGACY_FIELDS: dict[QuantType, dict[str, tuple[int, int]]] = {
    QuantType.Q4_0: {"d": (0, 2), "qs": (2, 18)},
    QuantType.Q4_1: {"d": (0, 2), "m": (2, 4), "qs": (4, 20)},
    QuantType.Q5_0: {"d": (0, 2), "qh": (2, 6), "qs": (6, 22)},
    QuantType.Q5_1: {"d": (0, 2), "m": (2, 4), "qh": (4, 8), "qs": (8, 24)},
    QuantType.Q8_0: {"d": (0, 2), "qs": (2, 34)},
}
_FIELD_DTYPES = {"d": torch.float16, "m": torch.float16, "qh": torch.int32}
_FLOAT_DTYPES = {
    QuantType.F16: torch.float16,
    QuantType.BF16: torch.bfloat16,
    QuantType.F32: torch.float32,
}


def _pack_legacy(data: torch.Tensor, qtype: QuantType, n: int, k: int) -> dict[str, torch.Tensor]:
    """Q4_0 -> qs (N, K/2) uint8, d (N, K/32) fp16; `_1` types add m; Q5 types add qh
    (N, K/32) int32 (bit j = high bit of weight j); Q8_0 -> qs (N, K) int8, d."""
    fields = _split_blocks(data, n, k // QK, _LEGACY_FIELDS[qtype])
    qs_dtype = torch.int8 if qtype == QuantType.Q8_0 else torch.uint8
    return {
        name: _as(f, qs_dtype if name == "qs" else _FIELD_DTYPES[name], n)
        for name, f in fields.items()
    }


def _pack_fallback(data: torch.Tensor, qtype: QuantType, n: int, k: int) -> PackedWeight:
    """Dequantize to bfloat16 once, in row chunks (the float32 scratch stays small)."""
    _log_fallback(qtype)
    w = torch.empty(n, k, dtype=torch.bfloat16, device=data.device)
    for start in range(0, n, _FALLBACK_CHUNK_ROWS):
        rows = slice(start, min(start + _FALLBACK_CHUNK_ROWS, n))
        w[rows] = dequantize(data[rows], qtype, torch.bfloat16)
    return PackedWeight(QuantType.BF16, n, k, {"w": w})


@functools.cache
def _log_fallback(qtype: QuantType) -> None:
    logger.warning(
        "no fused matmul kernel for %s weights: dequantizing them to bfloat16 (%.2f -> 16 bits "
        "per weight)",
        qtype.name,
        8 * row_nbytes(qtype, block_size(qtype)) / block_size(qtype),
    )


# Q4_1 weights can also carry their quants one a byte (`pack_weight(byte_twin=True)`, field
# "q8": weight j of a block at byte j, 0..15): the decode GEMV then reads them as the Q8_0
# GEMV reads its bytes (no nibble unpacking), plus the offset term m sum x; the other paths
# keep the nibbles. Q4_1 has no exact Q8_0 form (its offset m is not a multiple of d), so
# small models keep both (`models.llama.gpu_widening`).
BYTE_TWIN_TYPES = frozenset({QuantType.Q4_1})

# Q4_K and Q5_K can be held as the legacy blocks their 32-weight sub-blocks are
# (`pack_weight(legacy_twin=True)`): sub-block j of a Q4_K super-block holds
# w = (d sc_j) q - (dmin m_j) with q a nibble, which is a Q4_1 block whose scale d sc_j and
# offset -dmin m_j are float32 (exact: an fp16 times a 6-bit integer has at most 17
# significant bits); Q5_K's are Q5_1 blocks the same way. Every legacy kernel then reads
# them (the decode GEMV with its fused norm / activation prologues, the fp16-tile GEMM, the
# dequantizer), at 6 (Q4_K: 4.5) and 7 (Q5_K: 5.5) bits a weight.
LEGACY_TWINS: dict[QuantType, QuantType] = {
    QuantType.Q4_K: QuantType.Q4_1,
    QuantType.Q5_K: QuantType.Q5_1,
}


def legacy_twin_nbytes(qtype: QuantType, n: int, k: int) -> int:
    """Bytes of an (N, K) Q4_K / Q5_K weight held as its legacy twin (`_legacy_twin`): a
    32-weight block's 16 bytes of nibbles, float32 d and m, and Q5_1's 4 bytes of fifth bits."""
    return n * (k // QK) * (24 + 4 * (LEGACY_TWINS[qtype] == QuantType.Q5_1))


def _legacy_twin(data: torch.Tensor, qtype: QuantType, n: int, k: int) -> dict[str, torch.Tensor]:
    """Q4_K / Q5_K blocks (N, row_bytes) -> the tensors `_pack_legacy` gives a Q4_1 / Q5_1
    weight of the same values: qs (N, K/2) nibbles (byte j of a block: weights j, 16 + j),
    float32 d and m (N, K/32), and for Q5_1 qh (N, K/32) int32 (bit j: weight j's fifth)."""
    t = _kquants.pack(data, qtype, n, k)
    sub = k // QK
    d = t["d"].to(torch.float32).repeat_interleave(8, dim=1) * t["sc"].to(torch.float32)
    m = t["dmin"].to(torch.float32).repeat_interleave(8, dim=1) * t["mn"].to(torch.float32)
    # a 32-byte run c of qs: low nibbles are sub-block 2c, high nibbles sub-block 2c + 1
    runs = t["qs"].reshape(n, -1, 1, 32)
    q = torch.cat([runs & 0xF, runs >> 4], dim=2).reshape(n, sub, QK)  # weight order
    tensors = {"qs": (q[:, :, :16] | (q[:, :, 16:] << 4)).reshape(n, k // 2), "d": d, "m": -m}
    if "qh" in t:  # bit s of qh byte j of a super-block: weight j of its sub-block s
        qh = t["qh"].reshape(n, -1, 1, 32).to(torch.int64)
        bits = (qh >> torch.arange(8, device=qh.device)[None, None, :, None]) & 1
        word = (bits.reshape(n, sub, QK) << torch.arange(QK, device=qh.device)).sum(dim=2)
        tensors["qh"] = torch.where(word >= 1 << 31, word - (1 << 32), word).to(torch.int32)
    return tensors


def pack_weight(
    data: torch.Tensor,
    qtype: QuantType,
    shape: tuple[int, int],
    byte_twin: bool = False,
    legacy_twin: bool = False,
) -> PackedWeight:
    """Repack ggml blocks `data` (N, row_bytes) uint8 of an (N, K) weight for the kernels.

    Values are unchanged; the result is on `data`'s device. Types without a fused kernel are
    dequantized to bfloat16 (logged once per type) and run through the BF16 kernel.
    byte_twin (BYTE_TWIN_TYPES only, else ignored): also the quants one a byte, for the
    decode GEMV. legacy_twin (LEGACY_TWINS only, else ignored): a Q4_K / Q5_K weight as
    the Q4_1 / Q5_1 blocks of its sub-blocks, with float32 scales and offsets (the
    result's qtype is then the legacy one).
    """
    if len(shape) != 2:
        raise ValueError(f"expected a 2-D weight shape (N, K), got {tuple(shape)}")
    n, k = (int(s) for s in shape)
    if n <= 0 or k <= 0:
        raise ValueError(f"weight shape must be positive, got {(n, k)}")
    if data.dtype != torch.uint8:
        raise ValueError(f"expected uint8 blocks, got {data.dtype}")
    expected = (n, row_nbytes(qtype, k))
    if tuple(data.shape) != expected:
        raise ValueError(
            f"{qtype.name} blocks of a {n}x{k} weight have shape {expected}, "
            f"got {tuple(data.shape)}"
        )
    if qtype in _KQUANT_TYPES and not (legacy_twin and qtype in LEGACY_TWINS):
        return PackedWeight(qtype, n, k, _kquants.pack(data, qtype, n, k))
    if k % QK:
        raise ValueError(f"the fused kernels need K to be a multiple of {QK}, got K={k}")
    if qtype in _LEGACY_FIELDS or qtype in LEGACY_TWINS:
        if qtype in LEGACY_TWINS:
            tensors, qtype = _legacy_twin(data, qtype, n, k), LEGACY_TWINS[qtype]
        else:
            tensors = _pack_legacy(data, qtype, n, k)
        if byte_twin and qtype in BYTE_TWIN_TYPES:
            qs = tensors["qs"].view(n, k // QK, QK // 2)
            tensors["q8"] = torch.cat([qs & 0xF, qs >> 4], dim=2).view(n, k)
        return PackedWeight(qtype, n, k, tensors)
    if qtype in _FLOAT_DTYPES:
        return PackedWeight(qtype, n, k, {"w": _as(data, _FLOAT_DTYPES[qtype], n)})
    return _pack_fallback(data, qtype, n, k)


# --------------------------------------------------------------------------- reference


def qmatmul_reference(
    x: torch.Tensor,
    data: torch.Tensor,
    qtype: QuantType,
    shape: tuple[int, int],
    bias: torch.Tensor | None = None,
    *,
    norm_weight: torch.Tensor | None = None,
    eps: float | None = None,
    act: str | None = None,
    residual: torch.Tensor | None = None,
) -> torch.Tensor:
    """x @ dequantize(W).T (+ bias) in float64, rounded once to x.dtype (the tests' oracle).

    The fused forms of `qmatmul`, composed from the kernels' references in float64:
    norm_weight: x is RMS-normed first (`norm.rms_norm_reference`'s formula); act: x is
    (M, 2K) [gate | up] and act(gate) * up is the input (`activation`'s references);
    residual: returns residual + the product (a new tensor; `qmatmul` adds in place)."""
    n, k = shape
    x64 = _prologue_reference(x.to(torch.float64), norm_weight, eps, act)
    w = dequantize(data.reshape(n, -1), qtype, torch.float64)  # (N, K)
    y = x64 @ w.T
    if bias is not None:
        y = y + bias.to(torch.float64)
    if residual is not None:
        y = y + residual.to(torch.float64)
    return y.to(x.dtype)


def _prologue_reference(
    x: torch.Tensor, norm_weight: torch.Tensor | None, eps: float | None, act: str | None
) -> torch.Tensor:
    """x after the fused prologue, in x's dtype (float64 in the oracle)."""
    from llamapy.kernels.triton import activation, norm

    if norm_weight is not None:
        x = norm._rms_norm_f32(x, norm_weight.to(x.dtype), eps).to(x.dtype)
    if act == "silu":
        x = activation.silu_and_mul_fused_reference(x)
    elif act == "gelu_tanh":
        x = activation.gelu_tanh_and_mul_fused_reference(x)
    return x


# --------------------------------------------------------------------------- launchers


def _check_inputs(
    x: torch.Tensor, w: PackedWeight, bias: torch.Tensor | None, act: str | None = None
) -> None:
    if not isinstance(w, PackedWeight):
        raise ValueError(f"expected a PackedWeight (see pack_weight), got {type(w).__name__}")
    if x.dim() != 2:
        raise ValueError(f"x must be 2-D (M, K), got shape {tuple(x.shape)}")
    if act is not None and x.shape[1] != 2 * w.k:
        raise ValueError(
            f"with act={act!r} x is (M, 2K) [gate | up]: {2 * w.k} columns for the {w.n}x{w.k} "
            f"weight, got {x.shape[1]}"
        )
    if act is None and x.shape[1] != w.k:
        raise ValueError(f"x has K={x.shape[1]} columns but the weight is {w.n}x{w.k}")
    if x.dtype not in _X_DTYPES:
        raise ValueError(f"x must be float16, bfloat16 or float32, got {x.dtype}")
    if x.stride(1) != 1 or (x.shape[0] > 1 and x.stride(0) < x.shape[1]):
        raise ValueError(f"x rows must be contiguous, got strides {x.stride()}")
    if x.device != w.device:
        raise ValueError(f"x is on {x.device} but the weight is on {w.device}")
    if not triton_usable(x.device):
        raise ValueError(
            f"the Triton matmul runs on CUDA tensors (CPU only with TRITON_INTERPRET=1), got "
            f"x on {x.device}"
        )
    if bias is not None:
        if bias.shape != (w.n,) or bias.device != x.device or not bias.is_floating_point():
            raise ValueError(
                f"bias must be a float tensor of shape ({w.n},) on {x.device}, got "
                f"{bias.dtype} {tuple(bias.shape)} on {bias.device}"
            )
        if bias.stride(0) != 1:
            raise ValueError("bias must be contiguous")


ACTIVATIONS = ("silu", "gelu_tanh")  # gated activations the GEMV prologue computes
# prologue codes (constexpr); _PRO_MERGE: x is a decode attention's unmerged key splits
# (`attention.DecodeSplits`), merged as the GEMV loads it
_PRO_NONE, _PRO_NORM, _PRO_SILU, _PRO_GELU, _PRO_MERGE = range(5)


def qmatmul(
    x: torch.Tensor | DecodeSplits,
    w: PackedWeight,
    bias: torch.Tensor | None = None,
    *,
    norm_weight: torch.Tensor | None = None,
    eps: float | None = None,
    act: str | None = None,
    residual: torch.Tensor | None = None,
) -> torch.Tensor:
    """x (M, K) @ W^T (+ bias) -> (M, N) in x.dtype, accumulated in float32.

    Fused forms (decode: the GEMV computes them while loading x / storing y; other M run
    the unfused kernels in sequence, with the same results up to rounding):
    norm_weight (K,) with eps: RMSNorm of x first, `(x * rsqrt(mean(x^2) + eps) * g) @ W^T`,
    in float32 (x is not rounded in between). act ("silu" or "gelu_tanh"): x is (M, 2K)
    [gate | up] and the input is act(gate) * up, in float32. residual (M, N) of x's dtype:
    `residual += x @ W^T (+ bias)` IN PLACE (one float32 add, rounded once); returns it.
    norm_weight and act exclude each other.
    x may be a decode attention's unmerged key splits (`DecodeSplits`, x (B, n_heads * d)
    once merged): the float32-x GEMV merges them while loading x, other kernels run after
    the merge kernel; no norm or activation with them."""
    return qmatmul_with(x, w, bias, norm_weight=norm_weight, eps=eps, act=act, residual=residual)


def qmatmul_with(
    x: torch.Tensor | DecodeSplits,
    w: PackedWeight,
    bias: torch.Tensor | None = None,
    *,
    path: str = "auto",
    split_k: int | None = None,
    out: torch.Tensor | None = None,
    gemv_config: dict[str, int] | None = None,
    norm_weight: torch.Tensor | None = None,
    eps: float | None = None,
    act: str | None = None,
    residual: torch.Tensor | None = None,
    gemm_config: dict[str, int] | None = None,
) -> torch.Tensor:
    """`qmatmul` with the kernel choice forced and an optional output buffer (for tests,
    benchmarks and static CUDA-graph buffers).

    path: "gemv", "gemm", "dequant" (a 16-bit copy of W into a 16-bit GEMM; not F32
    weights), "f16" (`qgemm_f16`: fp16 weight tiles, split-K; Q4_0 / Q4_1 / Q8_0 with K a
    multiple of 64, Q4_K, Q6_K) or "auto" (one float32 row and a large Q4_0 / Q4_1 weight
    on CUDA to x's int8 codes, `xcodes.takes`, unless gemv_config / gemm_config / split_k
    is given; GEMV for M <= GEMV_MAX_M, `f16_gemm_pays` shapes on CUDA to "f16", dequant
    from DEQUANT_MM_MIN_M rows on CUDA, else GEMM).
    split_k: the GEMV's K split (None: from the shape table). out: (M, N) contiguous,
    x.dtype, x's device.
    gemv_config: explicit GEMV tiles (BLOCK_N, BLOCK_B, SPLIT, num_warps; the tuner's hook)
        and Q8X (0 / 1 / 2: float32 x, or int8 activations in 1 / 2 levels; GEMV_INT8_X).
    gemm_config: explicit GEMM tiles for a plain (unfused) GEMM call (benchmarks/kernels/
    tune_gemm.py's hook): BLOCK_M, BLOCK_N, BLOCK_B, GROUP_M, num_warps, num_stages (keys
    left out keep `_gemm_config`'s value); for K-quant weights `qmatmul_kquants.gemm_config`'s
    tiles (block_m, block_n, split, num_warps, num_stages). It implies the GEMM path.
    norm_weight, eps, act, residual: the fused forms (see `qmatmul`); only the GEMV fuses
    them, the GEMM path runs the unfused kernels around the matmul.
    """
    if isinstance(x, DecodeSplits):
        if norm_weight is not None or act is not None:
            raise ValueError("a decode attention's key splits take no norm or activation")
        if _merges(x, w, bias, path, split_k, gemv_config, gemm_config):
            return _splits_matmul(x, w, bias, out, gemv_config, residual)
        x = x.merged().reshape(x.shape)
    _check_inputs(x, w, bias, act)
    _check_fusion(x, w, norm_weight, eps, act, residual, out)
    if path not in ("auto", "gemv", "gemm", "dequant", "f16"):
        raise ValueError(f"path must be 'auto', 'gemv', 'gemm', 'dequant' or 'f16', got {path!r}")
    if path == "f16" and w.qtype not in _F16_KERNEL_TYPES:
        raise ValueError(
            f"path 'f16' takes Q4_0, Q4_1, Q8_0, Q4_K or Q6_K weights, got {w.qtype.name}"
        )
    m = x.shape[0]
    fused = norm_weight is not None or act is not None or residual is not None
    if gemm_config is not None and (fused or path == "gemv"):
        raise ValueError("gemm_config applies to a plain matmul on the GEMM path")
    if fused and not _fuses(w.qtype, m, path):
        return _unfused(x, w, bias, path, split_k, gemv_config, norm_weight, eps, act, residual)
    if residual is not None:
        out = residual
    if out is None:
        out = torch.empty(m, w.n, dtype=x.dtype, device=x.device)
    elif out.shape != (m, w.n) or out.dtype != x.dtype or out.device != x.device:
        raise ValueError(
            f"out must be ({m}, {w.n}) {x.dtype} on {x.device}, got {tuple(out.shape)} "
            f"{out.dtype} on {out.device}"
        )
    elif not out.is_contiguous():
        raise ValueError("out must be contiguous")
    if m == 0:
        return out
    if path == "auto" and gemv_config is None and gemm_config is None and split_k is None:
        from llamapy.kernels.triton import xcodes

        if xcodes.takes(x, w, bias):  # one row, a large Q4_0 / Q4_1 weight: x's codes once
            pro = _prologue_code(norm_weight, act)
            return xcodes.matmul(x, w, out, pro, norm_weight, eps, residual is not None)
    if w.qtype in _KQUANT_TYPES and gemm_config is not None:
        cfg = _kquants.gemm_config(w.qtype, m, w.n, w.k, _num_sms(x.device), gemm_config)
        _kquants.launch(x, w.tensors, w.qtype, w.n, w.k, out, cfg)
        return out if bias is None else out.add_(bias)
    if w.qtype in _KQUANT_TYPES and (
        path == "f16"
        or (path == "auto" and not fused and f16_gemm_pays(x.device.type, w.qtype, m, w.n, w.k))
    ):
        _f16_gemm(x, w, bias, out)
        return out
    if w.qtype in _KQUANT_TYPES and (
        path == "dequant" or (path == "auto" and not fused and _dequant_pays(x, w))
    ):
        _dequant_mm(x, w, bias, out)
        return out
    if w.qtype in _KQUANT_TYPES:
        fusion = {}  # only when asked: the K-quant module's plain contract stays (x, .., out)
        if fused:
            fusion = dict(norm_weight=norm_weight, eps=eps or 0.0, act=act,
                          accumulate=residual is not None)  # fmt: skip
        _kquants.matmul(x, w.tensors, w.qtype, w.n, w.k, out, **fusion)
        return out if bias is None else out.add_(bias)
    if w.qtype not in _CODES:
        raise ValueError(f"{w.qtype.name} weights have no kernel; pack them with pack_weight")
    if path == "gemv" or (path == "auto" and m <= GEMV_MAX_M and gemm_config is None):
        pro = _prologue_code(norm_weight, act)
        _launch_gemv(x, w, bias, out, split_k, gemv_config, pro, norm_weight, eps, residual)
    elif path == "f16" or (
        path == "auto"
        and gemm_config is None
        and f16_gemm_pays(x.device.type, w.qtype, m, w.n, w.k)
    ):
        _f16_gemm(x, w, bias, out)
    elif path == "dequant" or (path == "auto" and _dequant_pays(x, w) and gemm_config is None):
        _dequant_mm(x, w, bias, out)
    else:
        _launch_gemm(x, w, bias, out, gemm_config)
    return out


# A GEMV that merges a decode attention's key splits as it loads x reads every split's
# partials in each program: row tiles narrower than this take this tile instead (the 1B's o
# tiles all do: Q4_0 8 x 64, Q4_1 8 x 32, Q8_0 2 x 64). H200, the 1B's o (2048 x 2048) after
# its attention at 2 / 4 / 8 splits (benchmarks/kernels/merge_gemv_lab.py --tiles, us a
# pair): Q8_0's 2-row tile 8.41 / 9.70 / 12.23 -> 7.42 / 8.07 / 8.59 (the merge kernel and
# the 2-row tile: 7.95 / 8.31 / 8.53); Q4_0 / Q4_1 about even with their 8-row tiles in the
# lab, and in the engine the bound 8 with this tile gave +1.8% / +4.0% tg128 (RESULTS.md).
MERGE_MIN_TILE = {"BLOCK_N": 16, "BLOCK_B": 64, "num_warps": 8}
# The merge inside the GEMV was measured on the 1B's o (K = 2048) for one sequence
# (RESULTS.md, thirty-first session); a shorter o (SmolLM2's 576 x 576) and decode batches of
# 2-4 rows keep the merge launch until they are measured.
MERGE_MIN_K = 2048
MERGE_MAX_ROWS = 1


def _merges(
    x: DecodeSplits,
    w: PackedWeight,
    bias: torch.Tensor | None,
    path: str,
    split_k: int | None,
    gemv_config: dict[str, int] | None,
    gemm_config: dict[str, int] | None,
) -> bool:
    """Whether this product's kernel merges x's key splits as it loads x: the float32-x GEMV
    of a legacy or float weight of K >= MERGE_MIN_K, at most MERGE_MAX_ROWS rows (not the
    codes' path, not int8 x), heads of whole 32-blocks."""
    m = x.shape[0]
    stand_in = x.out.reshape(x.shape)  # x as the merge kernel would leave it (unwritten)
    int8_x = (gemv_config or {}).get("Q8X", gemv_int8_x(x.out.device, w.qtype))
    return (
        w.qtype in _CODES
        and w.k >= MERGE_MIN_K
        and m <= MERGE_MAX_ROWS
        and (path == "gemv" or (path == "auto" and m <= GEMV_MAX_M))
        and split_k is None
        and gemm_config is None
        and not int8_x
        and x.head_dim % QK == 0
        and not (path == "auto" and gemv_config is None and _xcodes_takes(stand_in, w, bias))
    )


def _xcodes_takes(x: torch.Tensor, w: PackedWeight, bias: torch.Tensor | None) -> bool:
    from llamapy.kernels.triton import xcodes

    return xcodes.takes(x, w, bias)


def _splits_matmul(
    x: DecodeSplits,
    w: PackedWeight,
    bias: torch.Tensor | None,
    out: torch.Tensor | None,
    gemv_config: dict[str, int] | None,
    residual: torch.Tensor | None,
) -> torch.Tensor:
    """The GEMV over a decode attention's unmerged key splits (where `_merges` holds)."""
    stand_in = x.out.reshape(x.shape)
    _check_inputs(stand_in, w, bias, None)
    _check_fusion(stand_in, w, None, None, None, residual, out)
    if x.part_o.dtype != torch.float32 or x.part_lse.dtype != torch.float32:
        raise ValueError("a decode attention's key splits are float32")
    m = x.shape[0]
    if residual is not None:
        if residual.numel() and _overlap(x.part_o.view(m, -1), residual):
            raise ValueError("residual must not share memory with x (it is written in place)")
        out = residual
    if out is None:
        out = torch.empty(m, w.n, dtype=x.dtype, device=x.out.device)
    elif out.shape != (m, w.n) or out.dtype != x.dtype or not out.is_contiguous():
        raise ValueError(f"out must be a contiguous ({m}, {w.n}) {x.dtype} tensor")
    if m == 0:
        return out
    part_o, part_lse = x.part_o.contiguous(), x.part_lse.contiguous()
    _launch_gemv(part_o.view(m, -1), w, bias, out, None, gemv_config, _PRO_MERGE, part_lse,
                 None, residual, (x.num_splits, x.head_dim))  # fmt: skip
    return out


def f16_gemm_pays(device_type: str, qtype: QuantType, m: int, n: int, k: int) -> bool:
    """Whether the automatic choice for an (m x k) @ (n x k)^T product is `qgemm_f16`."""
    min_m = F16_GEMM_MAX_M if qtype in _F16_KQUANT_TYPES else F16_GEMM_MIN_M
    return (
        device_type == "cuda"
        and qtype in _F16_KERNEL_TYPES
        and min_m <= m <= F16_GEMM_MAX_M
        and k >= F16_GEMM_MIN_K
        and k % 64 == 0  # whole K steps of 2 blocks
    )


def _f16_gemm(
    x: torch.Tensor, w: PackedWeight, bias: torch.Tensor | None, out: torch.Tensor
) -> None:
    from llamapy.kernels.triton import qgemm_f16  # imports this module

    unit = qgemm_f16.unit(w.qtype)
    cfg = qgemm_f16.decode_config(x.shape[0], w.n, w.k, _num_sms(x.device), unit)
    if out.dtype == torch.float32:
        qgemm_f16.gemm_f16(x, w, cfg, out=out)
    else:
        out.copy_(qgemm_f16.gemm_f16(x, w, cfg))
    if bias is not None:
        out.add_(bias)


# Rows of x up to this many elements are scaled to fp16 from one load (`_scale_rows_kernel`).
SCALE_ROWS_ONE_PASS = 8192


def scale_rows_f16(x: torch.Tensor, y: torch.Tensor, s: torch.Tensor, pdl_on: bool) -> None:
    """y = x / s rounded to float16 (M, K), s (M,) or (M, 1) float32 the power of two per row
    with max |x| <= 2^14 s: x's rows in fp16's range for the fp16 matrix products."""
    m, k = x.shape
    block_k = min(triton.next_power_of_2(k), SCALE_ROWS_ONE_PASS)
    _scale_rows_kernel[(m,)](
        x, y, s, x.stride(0), K=k, BLOCK_K=block_k, **pdl.launch_options(pdl_on),
        num_warps=4 if block_k <= 2048 else 8,
    )  # fmt: skip


def _dequant_pays(x: torch.Tensor, w: PackedWeight) -> bool:
    return x.shape[0] >= DEQUANT_MM_MIN_M and x.is_cuda and w.qtype != QuantType.F32


def _dequant_mm(
    x: torch.Tensor, w: PackedWeight, bias: torch.Tensor | None, out: torch.Tensor
) -> None:
    """out = x W^T (+ bias) through a 16-bit dequantized copy of W, in row chunks, and a
    16-bit GEMM with float32 sums (cuBLAS on CUDA; float32 products of the 16-bit values in
    the interpreter, the same numbers up to summation order)."""
    m, n, k = x.shape[0], w.n, w.k
    wdt = torch.bfloat16 if w.qtype == QuantType.BF16 else torch.float16
    if wdt == torch.float16:  # x / 2^e per row, |x / 2^e| <= 2^14: fits float16's range
        xs = torch.empty(m, k, dtype=torch.float16, device=x.device)
        scale = torch.empty(m, 1, dtype=torch.float32, device=x.device)
        scale_rows_f16(x, xs, scale, pdl.pdl_enabled(x.device, w.nbytes))
    else:
        xs, scale = x.to(torch.bfloat16), None
    tile = _DEQUANT_BLOCK_N
    rows = min(n, max(tile, DEQUANT_SCRATCH // k // tile * tile))
    for first in range(0, n, rows):
        last = min(n, first + rows)
        wt = torch.empty(last - first, k, dtype=wdt, device=x.device)
        if w.qtype in _KQUANT_TYPES:
            _kquants.dequantize_rows(w.tensors, w.qtype, k, first, wt)
        else:
            grid = (triton.cdiv(last - first, tile), triton.cdiv(k // 32, _DEQUANT_BLOCK_B))
            _dequant_kernel[grid](
                *_operands(w), wt, last, k, first, QT=_CODES[w.qtype], BLOCK_N=tile,
                BLOCK_B=_DEQUANT_BLOCK_B, INTERP=INTERPRET, num_warps=4,
            )  # fmt: skip
        if x.is_cuda:
            y = torch.mm(xs, wt.t(), out_dtype=torch.float32)
        else:
            y = xs.float() @ wt.float().t()
        dest = out if last - first == n else out[:, first:last]
        if scale is not None and bias is None:  # one kernel: rescale into the output
            torch.mul(y, scale, out=dest)
            continue
        if scale is not None:
            y.mul_(scale)
        if bias is not None:
            y += bias[first:last].to(torch.float32)
        dest.copy_(y)


_DEQUANT_BLOCK_N, _DEQUANT_BLOCK_B = 32, 8


def _check_fusion(
    x: torch.Tensor,
    w: PackedWeight,
    norm_weight: torch.Tensor | None,
    eps: float | None,
    act: str | None,
    residual: torch.Tensor | None,
    out: torch.Tensor | None,
) -> None:
    if norm_weight is not None:
        if act is not None:
            raise ValueError("norm_weight and act cannot be fused into one matmul")
        if eps is None or not eps >= 0:
            raise ValueError(f"norm_weight needs eps >= 0, got eps={eps}")
        if (
            norm_weight.shape != (w.k,)
            or not norm_weight.is_floating_point()
            or norm_weight.device != x.device
            or (w.k > 1 and norm_weight.stride(0) != 1)
        ):
            raise ValueError(
                f"norm_weight must be a contiguous float ({w.k},) tensor on {x.device}, got "
                f"{norm_weight.dtype} {tuple(norm_weight.shape)} on {norm_weight.device}"
            )
    elif eps is not None:
        raise ValueError("eps is the RMSNorm's: pass it with norm_weight")
    if act is not None and act not in ACTIVATIONS:
        raise ValueError(f"act must be one of {ACTIVATIONS}, got {act!r}")
    if residual is None:
        return
    if out is not None:
        raise ValueError("pass out or residual, not both (the residual is the output)")
    m = x.shape[0]
    if (
        residual.shape != (m, w.n)
        or residual.dtype != x.dtype
        or residual.device != x.device
        or not residual.is_contiguous()
    ):
        raise ValueError(
            f"residual must be a contiguous ({m}, {w.n}) {x.dtype} tensor on {x.device}, got "
            f"{residual.dtype} {tuple(residual.shape)} on {residual.device}"
        )
    if residual.numel() and x.numel() and _overlap(x, residual):
        raise ValueError("residual must not share memory with x (it is written in place)")


def _overlap(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether the byte ranges of a and b intersect."""
    a0 = a.data_ptr()
    a1 = a0 + ((a.shape[0] - 1) * a.stride(0) + a.shape[1]) * a.element_size()
    b0 = b.data_ptr()
    b1 = b0 + b.numel() * b.element_size()
    return a0 < b1 and b0 < a1


def _prologue_code(norm_weight: torch.Tensor | None, act: str | None) -> int:
    if norm_weight is not None:
        return _PRO_NORM
    return {None: _PRO_NONE, "silu": _PRO_SILU, "gelu_tanh": _PRO_GELU}[act]


def _fuses(qtype: QuantType, m: int, path: str) -> bool:
    """Whether this call's kernel is a GEMV, which computes the fused forms itself."""
    if qtype in _KQUANT_TYPES:
        return path in ("auto", "gemv") and m <= _kquants.GEMV_MAX_M
    return path == "gemv" or (path == "auto" and m <= GEMV_MAX_M)


def _unfused(
    x: torch.Tensor,
    w: PackedWeight,
    bias: torch.Tensor | None,
    path: str,
    split_k: int | None,
    gemv_config: dict[str, int] | None,
    norm_weight: torch.Tensor | None,
    eps: float | None,
    act: str | None,
    residual: torch.Tensor | None,
) -> torch.Tensor:
    """The fused forms as separate kernels: norm / activation, matmul, residual add."""
    from llamapy.kernels.triton import activation, norm

    if x.shape[0] == 0:
        return residual if residual is not None else x.new_empty(0, w.n)
    if norm_weight is not None:
        x = norm.rms_norm(x, norm_weight, eps)
    elif act == "silu":
        x = activation.silu_and_mul_fused(x)
    elif act == "gelu_tanh":
        x = activation.gelu_tanh_and_mul_fused(x)
    y = qmatmul_with(x, w, bias, path=path, split_k=split_k, gemv_config=gemv_config)
    return y if residual is None else residual.add_(y)


def _rms_chunk_max(env: str | None) -> int:
    if not env:
        return 4096
    if not env.strip().isdigit() or int(env) < 1 or int(env) & (int(env) - 1):
        raise ValueError(f"LLAMAPY_GPU_RMS_CHUNK wants a power of two, got {env!r}")
    return int(env)


# The RMSNorm prologues (the GEMV's, the codes' quantizing kernel's) sum x^2 over the row in
# chunks of this many values (rows x columns): one load a thread for a 2048-wide row, where
# 256-wide chunks made eight dependent loads. LLAMAPY_GPU_RMS_CHUNK sets it for A/B runs
# (256: the chunk before).
RMS_CHUNK_MAX = _rms_chunk_max(os.environ.get("LLAMAPY_GPU_RMS_CHUNK"))


def rms_chunk(k: int, rows: int) -> int:
    """Columns a chunk of `_inv_rms` takes for rows of k values, `rows` at a time."""
    return min(1 << max(0, (k - 1).bit_length()), max(256, RMS_CHUNK_MAX // rows))


def gemv_int8_x(device: torch.device, qtype: QuantType) -> int:
    """The int8 levels (0: float32 x) the decode GEMV uses by default for this weight type
    and device: CUDA only (the interpreter runs the float32 GEMV unless a call asks for
    Q8X), then GEMV_INT8_X, or where unset level 1 for the types in _Q8X_DEFAULT_TYPES."""
    if device.type != "cuda" or INTERPRET or qtype not in _Q8X_TYPES:
        return 0
    if GEMV_INT8_X is None:
        return int(qtype in _Q8X_DEFAULT_TYPES)
    return int(GEMV_INT8_X)


def _operands(w: PackedWeight) -> tuple[torch.Tensor, ...]:
    """(qs, qh, d, m) pointers for the kernels; absent fields alias qs (never read)."""
    t = w.tensors
    qs = t["qs"] if "qs" in t else t["w"]
    return qs, t.get("qh", qs), t.get("d", qs), t.get("m", qs)


@functools.cache
def _num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 4  # interpreter: a small "machine", so tests reach the split-K path cheaply
    return torch.cuda.get_device_properties(device).multi_processor_count


_NIBBLE_TYPES = frozenset({QuantType.Q4_0, QuantType.Q4_1, QuantType.Q5_0, QuantType.Q5_1})

# Weights up to this size are read in a few microseconds: no split-K for them.
SMALL_GEMV_BYTES = 4 << 20


# The int8-activation GEMV's (BLOCK_N, BLOCK_B, num_warps, SPLIT) per shape class: a
# vocabulary-sized output, long K (down), wide N (gate_up), the rest (see `_q8x_config`).
_Q8X_TILES = {
    "nibble": ((4, 32, 1, 1), (8, 256, 4, 1), (8, 64, 1, 1), (4, 64, 4, 1)),
    "Q8_0": ((4, 32, 2, 1), (4, 64, 2, 2), (4, 32, 1, 1), (2, 32, 4, 1)),
}


def _q8x_config(qtype: QuantType, n: int, k: int, block_m: int) -> dict[str, int]:
    """Tiles of the int8-activation GEMV, from H200 sweeps at the Llama-3.2-1B shapes in the
    forms the decode step runs them (`tune_decode.py --wide --q8x --fused`: QKV / gate_up
    with the norm prologue, o / down adding into the residual, down with the gating
    prologue; the output matrix plain). Q4_0 (the other nibble types follow it): output
    4 rows x 32 blocks on one warp (64.6 us vs 84.6 for the float32 GEMV), long-K (down)
    8 rows x 256 blocks on four warps (9.0 vs 12.7), wide-N (gate_up) 8 rows x 64 blocks
    on one warp (14.3 vs 17.8), else 4 rows x 64 blocks on four warps. Q8_0: output 4 x 32
    on two warps, down 4 x 64 on two warps with K split in two (11.1 vs 13.3), gate_up
    4 x 32 on one warp (16.6 vs 23.9), o and smaller 2 x 32 on four warps. Blocks per step
    never exceed K's (rounded up to a power of two)."""
    tiles = _Q8X_TILES["Q8_0" if qtype == QuantType.Q8_0 else "nibble"]
    shape_class = 0 if n >= 65536 else 1 if k >= 4096 else 2 if n >= 8192 else 3
    block_n, block_b, num_warps, split = tiles[shape_class]
    nb_pow2 = 1 << max(0, (k // QK - 1).bit_length())  # (K >= 4096 keeps 2 steps a split)
    return {"BLOCK_M": block_m, "BLOCK_N": block_n, "BLOCK_B": min(block_b, nb_pow2),
            "num_warps": num_warps, "SPLIT": split, "Q8X": 1}  # fmt: skip


def _gemv_config(
    qtype: QuantType, m: int, n: int, k: int, num_sms: int, q8x: bool = False
) -> dict[str, int]:
    """Tile sizes of the GEMV, from an H100 sweep at the decode shapes of SmolLM2 and
    Llama-3.2-1B (benchmarks/kernels/tune_decode.py: CUDA-graph replays over rotating weight
    copies, float32 activations).

    4/5-bit types: 32 blocks (1024 weights) per K step and narrow row tiles (4-8 rows, 16 for
    wide-K-short matrices), no split: 1.1-1.5x over 8 blocks x 32 rows; vocabulary-sized
    outputs keep 32-row tiles of 8 blocks (thousands of programs already).
    Q4_0 / Q4_1 and Q8_0 below 8192 rows, one row of x: the H200 sweeps' tiles (at K >= 2048
    the 1B shapes', below it SmolLM2's). Other Q8_0 and float types (not swept): ~8 KiB of
    weights per program and step, 8 blocks per step, K split until the grid covers about two
    waves of the SMs, no split for small (latency-bound) matrices."""
    block_m = 1 << (m - 1).bit_length()
    if q8x and qtype in _Q8X_TYPES:
        return _q8x_config(qtype, n, k, block_m)
    small = n * row_nbytes(qtype, k) <= SMALL_GEMV_BYTES
    if qtype in _NIBBLE_TYPES:
        # Vocabulary-sized outputs: 32 rows x 8 blocks. Q4_0 / Q4_1 / Q5_0 from 32768 rows:
        # SmolLM2's 49152 x 576 output 18.4 -> 14.8 us (Q4_0), 24.3 -> 20.5 (Q5_0) in the
        # sweeps, tg128 1,575 / 1,579 -> 1,584 / 1,581 t/s (Q4_0), 1,596 / 1,595 -> 1,604 /
        # 1,607 (Q4_1; H200, .gpu/run73.sh)
        swept = qtype in (QuantType.Q4_0, QuantType.Q4_1, QuantType.Q5_0)
        q4_1_row = qtype == QuantType.Q4_1 and block_m == 1 and k >= 2048
        if q4_1_row and n >= 65536:
            # Q4_1's 128256 x 2048 output, one row of x: 16 x 16, 94.2 -> 89.5 us (H200,
            # tune_decode.py --types Q4_1 --shapes 1b --fused, .gpu/run77.sh)
            return {"BLOCK_M": 1, "BLOCK_N": 16, "BLOCK_B": 16, "SPLIT": 1, "num_warps": 4}
        if n >= 65536 or (swept and n >= 32768):
            return {"BLOCK_M": block_m, "BLOCK_N": 32, "BLOCK_B": 8, "SPLIT": 1}
        wide_n = not small and k <= 4096  # gate_up
        if q4_1_row and (wide_n or n <= 4096) and k < 4096:
            # Q4_1 at the 1B shapes (the same sweep; the 8 x 64 rule below came from Q4_0-led
            # sweeps): gate_up 32 x 16 16.09 -> 15.74 us, qkv 8 x 32 5.69 -> 5.32, o 8 x 32 on
            # eight warps 4.22 -> 4.01; down kept 8 x 64. 1B Q4_1 tg128 1,176 / 1,178 ->
            # 1,197 / 1,196 t/s with these (down there at a slower 32 x 16 split in four).
            if wide_n:
                return {"BLOCK_M": 1, "BLOCK_N": 32, "BLOCK_B": 16, "SPLIT": 1, "num_warps": 4}
            warps = 8 if n <= 2048 else 4
            return {"BLOCK_M": 1, "BLOCK_N": 8, "BLOCK_B": 32, "SPLIT": 1, "num_warps": warps}
        if qtype in (QuantType.Q4_0, QuantType.Q4_1) and block_m == 1 and k >= 2048 and not wide_n:
            # H200 sweeps of the decode step's fused forms (tune_decode.py --wide --fused, 1B
            # shapes): 8 rows x 64 blocks on four warps, Q4_0 qkv 6.26 -> 5.41 us, o 4.27 ->
            # 4.14, down 12.53 -> 10.27 (tg128 1,071 -> 1,126 t/s); Q4_1 qkv 6.28 -> 5.68, o
            # 4.27 -> 4.24, down 12.71 -> 10.65 (Q4_1 keeps only down and other K >= 4096
            # matrices here: its own sweep's tiles above). One row of x only (as measured;
            # the Q5 types were not swept).
            return {"BLOCK_M": block_m, "BLOCK_N": 8, "BLOCK_B": 64, "SPLIT": 1, "num_warps": 4}
        if qtype in (QuantType.Q4_0, QuantType.Q4_1) and block_m == 1 and k < 2048 and not wide_n:
            # H200 sweep of the fused forms at the SmolLM2 shapes (tune_decode.py --shapes
            # smol --fused, and --wide; fifteenth session, .gpu/run71.sh), us, rule -> these:
            # Q4_0 down (576 x 1536) 3.31 -> 2.86, o (576 x 576) 1.90 -> 1.86, gate_up (3072 x
            # 576) 3.62 -> 3.35, qkv (960 x 576) 2.26 kept; Q4_1 3.32 -> 2.90, 2.01 -> 1.88,
            # 3.53 -> 3.44, 2.32 -> 2.22. SmolLM2 tg128 Q4_0 1,492 / 1,487 -> 1,576 / 1,570
            # t/s, Q4_1 1,486 / 1,483 -> 1,602 / 1,605. (The Q5 types were not swept.)
            q4_1 = qtype == QuantType.Q4_1
            if k > 1024:
                block_n = 4 if q4_1 else 8
                return {"BLOCK_M": 1, "BLOCK_N": block_n, "BLOCK_B": 64, "SPLIT": 1, "num_warps": 4}
            if n <= 640:
                return {"BLOCK_M": 1, "BLOCK_N": 8, "BLOCK_B": 32, "SPLIT": 1, "num_warps": 8}
            block_n = 4 if q4_1 and n <= 1024 else 8
            return {"BLOCK_M": 1, "BLOCK_N": block_n, "BLOCK_B": 32, "SPLIT": 1, "num_warps": 4}
        if qtype == QuantType.Q5_0 and block_m == 1 and k < 2048 and not wide_n:
            # H200 sweep of the fused forms at the SmolLM2 shapes (SmolLM2 Q4_K_M files hold
            # Q5_0 q / k / o / gate_up; tune_decode.py --types Q5_0 --shapes smol --fused, and
            # --wide; sixteenth session, .gpu/run74.sh), us, rule -> 4 rows x 32 blocks on four
            # warps: qkv (960 x 576) 2.53 -> 2.47, o (576 x 576) 2.18 -> 2.03, v (192 x 576)
            # 2.22 -> 2.04; qk (768 x 576) 2.41 -> 2.31-2.36 with the sweep's best (2 x 32 on
            # one warp / 8 x 32 on eight). gate_up (3072 x 576) kept the rule below.
            return {"BLOCK_M": 1, "BLOCK_N": 4, "BLOCK_B": 32, "SPLIT": 1, "num_warps": 4}
        block_n = 16 if wide_n else 8 if n < 2048 else 4
        return {"BLOCK_M": block_m, "BLOCK_N": block_n, "BLOCK_B": 32, "SPLIT": 1}
    if qtype == QuantType.Q8_0 and block_m == 1 and k >= 2048 and n < 8192:
        # H200 sweep of the fused forms (tune_decode.py --types Q8_0 --wide --fused, 1B
        # shapes, one row of x; gate_up kept the rule below): down 8 rows x 32 blocks, K split
        # in two (11.44 -> 10.70 us), o 2 x 64 (5.55 -> 3.77), qkv 8 x 32 (7.24 -> 5.04); 1B
        # Q8_0 tg128 1,091 -> 1,186 t/s
        if k >= 4096:
            return {"BLOCK_M": block_m, "BLOCK_N": 8, "BLOCK_B": 32, "SPLIT": 2, "num_warps": 4}
        if n <= 2048:
            return {"BLOCK_M": block_m, "BLOCK_N": 2, "BLOCK_B": 64, "SPLIT": 1, "num_warps": 4}
        return {"BLOCK_M": block_m, "BLOCK_N": 8, "BLOCK_B": 32, "SPLIT": 1, "num_warps": 4}
    if qtype == QuantType.Q8_0 and block_m == 1 and k < 2048 and n < 8192:
        # H200 sweep of the fused forms at the SmolLM2 shapes (tune_decode.py --types Q8_0
        # --shapes smol --fused, and --wide; fifteenth session, .gpu/run70.sh): down (576 x
        # 1536) 4 rows x 64 blocks 5.89 -> 3.26 us, o (576 x 576) 1 row x 32 on one warp 2.34
        # -> 1.84, qkv (960 x 576) 8 x 32 on eight warps 3.26 -> 2.30, gate_up (3072 x 576)
        # 8 x 32 on four 4.25 -> 3.30; SmolLM2 Q8_0 tg128 1,267 / 1,270 -> 1,604 / 1,609 t/s
        # V alone (192 x 576, Q4_K_M files: Q and K are Q5_0) 4 x 32 on four warps 2.18 ->
        # 1.86 (sixteenth session, .gpu/run74.sh)
        if k > 1024:
            return {"BLOCK_M": 1, "BLOCK_N": 4, "BLOCK_B": 64, "SPLIT": 1, "num_warps": 4}
        if n <= 256:
            return {"BLOCK_M": 1, "BLOCK_N": 4, "BLOCK_B": 32, "SPLIT": 1, "num_warps": 4}
        if n <= 640:
            return {"BLOCK_M": 1, "BLOCK_N": 1, "BLOCK_B": 32, "SPLIT": 1, "num_warps": 1}
        warps = 8 if n <= 1024 else 4
        return {"BLOCK_M": 1, "BLOCK_N": 8, "BLOCK_B": 32, "SPLIT": 1, "num_warps": warps}
    block_b = 8
    tile_rows = 8192 // (block_b * row_nbytes(qtype, QK))
    block_n = max(4, min(64, 1 << (tile_rows.bit_length() - 1)))  # power of two
    steps = triton.cdiv(k // QK, block_b)
    programs = triton.cdiv(n, block_n) * triton.cdiv(m, block_m)
    if small:
        # latency-bound: a split-K reduction launch costs more than the bytes it spreads
        # (H100 profile: 1.1 us per reduce, 121 GEMVs a SmolLM2 token); narrower row tiles
        # give the SMs work instead
        while programs < num_sms and block_n > 4:
            block_n //= 2
            programs = triton.cdiv(n, block_n) * triton.cdiv(m, block_m)
        return {"BLOCK_M": block_m, "BLOCK_N": block_n, "BLOCK_B": block_b, "SPLIT": 1}
    split = 1
    while programs * split < 2 * num_sms and steps >= 2 * split:  # >= 1 step per split
        split *= 2
    return {"BLOCK_M": block_m, "BLOCK_N": block_n, "BLOCK_B": block_b, "SPLIT": split}


def _launch_gemv(
    x: torch.Tensor,
    w: PackedWeight,
    bias: torch.Tensor | None,
    out: torch.Tensor,
    split_k: int | None,
    config: dict[str, int] | None = None,
    pro: int = _PRO_NONE,
    norm_weight: torch.Tensor | None = None,
    eps: float | None = None,
    residual: torch.Tensor | None = None,
    merge: tuple[int, int] = (1, QK),
) -> None:
    """out = prologue(x) @ W^T (+ bias) (+ out, when `residual` is `out`); see `qmatmul`.
    merge: (splits, head dim) of a _PRO_MERGE x (the partial outputs, norm_weight their
    log-sum-exps; float32 x, `_splits_matmul`)."""
    m, n, k = x.shape[0], w.n, w.k
    want_q8x = (config or {}).get("Q8X", gemv_int8_x(x.device, w.qtype))
    if pro == _PRO_MERGE:
        want_q8x = 0
    bytes_form = "q8" in w.tensors and not want_q8x  # Q4_1's byte twin: Q8_0's tiles
    tile_type = QuantType.Q8_0 if bytes_form else w.qtype
    cfg = _gemv_config(tile_type, min(m, GEMV_MAX_M), n, k, _num_sms(x.device), bool(want_q8x))
    if want_q8x:  # the level the caller or the switch asked for
        cfg["Q8X"] = int(want_q8x)
    if config is not None:
        cfg.update(config)
    elif pro == _PRO_MERGE and cfg["BLOCK_N"] < MERGE_MIN_TILE["BLOCK_N"]:
        cfg.update(MERGE_MIN_TILE)  # fewer programs to read the splits' partials
    num_warps = cfg.pop("num_warps", 4)
    if m > cfg["BLOCK_M"]:  # forced GEMV for a larger batch: more row groups, same tiles
        cfg["BLOCK_M"] = 1 << (GEMV_MAX_M - 1).bit_length()
    if split_k is not None:
        if split_k < 1:
            raise ValueError(f"split_k must be >= 1, got {split_k}")
        cfg["SPLIT"] = split_k
    split = cfg["SPLIT"]
    q8x = int(cfg.pop("Q8X", 0))
    if q8x not in (0, 1, 2):
        raise ValueError(f"Q8X must be 0, 1 or 2 (int8 levels), got {q8x}")
    if w.qtype not in _Q8X_TYPES:  # float weights: float32 x always
        q8x = 0
    nb = k // QK
    steps_per_split = triton.cdiv(triton.cdiv(nb, cfg["BLOCK_B"]), split)
    # split > 1: float32 partials (SPLIT, M, N), summed in order by _reduce_kernel
    dest = out if split == 1 else torch.empty(split, m, n, dtype=torch.float32, device=x.device)
    grid = (triton.cdiv(n, cfg["BLOCK_N"]), split, triton.cdiv(m, cfg["BLOCK_M"]))
    has_res = residual is not None
    operands = _operands(w)
    if q8x:  # the int8-activation step reads the quants as int32 words
        operands = (operands[0].view(torch.int32), *operands[1:])
    elif bytes_form:
        operands = (w.tensors["q8"], *operands[1:])
    pdl_on = pdl.pdl_enabled(x.device, w.nbytes)
    # qs elements per 32-weight block; the program's share of each row goes to L2 before the
    # PDL wait (weights are never written by an earlier kernel)
    block_width = (16 if w.qtype in _NIBBLE_TYPES and not bytes_form else QK) // (4 if q8x else 1)
    nbytes = steps_per_split * cfg["BLOCK_B"] * block_width * operands[0].element_size()
    lines = pdl.prefetch_lines(nbytes) if pdl_on else 0
    _gemv_kernel[grid](
        x, *operands, bias if bias is not None else out,
        norm_weight if norm_weight is not None else out, dest,
        m, n, k, x.stride(0), steps_per_split, float(eps or 0.0),
        QT=_Q4_1_BYTES if bytes_form else _CODES[w.qtype],
        HAS_BIAS=bias is not None and split == 1, PRO=pro,
        HAS_RES=has_res and split == 1, INTERP=INTERPRET, WB=block_width, PF=lines, Q8X=q8x,
        RMS_CHUNK=rms_chunk(k, cfg["BLOCK_M"]), MERGE_S=merge[0], HEAD_D=merge[1], **cfg,
        **pdl.launch_options(pdl_on, pdl.trigger_enabled(x.device, k)), num_warps=num_warps,
    )  # fmt: skip
    if split > 1:
        block = 1024
        _reduce_kernel[(triton.cdiv(m * n, block),)](
            dest, bias if bias is not None else out, out, m * n, n,
            SPLIT=split, HAS_BIAS=bias is not None, HAS_RES=has_res, BLOCK=block,
            INTERP=INTERPRET, **pdl.launch_options(pdl_on, pdl.trigger_enabled(x.device, k)),
            num_warps=4,
        )  # fmt: skip


# Measured GEMM tiles: (type name, M bucket, size class) (`qmatmul_kquants.gemm_key`) ->
# the `_gemm_config` keys. Filled from `benchmarks/kernels/tune_gemm.py --emit-python`;
# shapes without an entry use the rule in `_gemm_config`.
# Measured by benchmarks/kernels/tune_gemm.py on an H200 (2026-11-26; the comment: the rule's
# geometric-mean time over the entry's across the key's cells). Keys the sweep did not
# cover keep the rule below.
# fmt: off
GEMM_TABLE: dict[tuple[str, int, str], dict[str, int]] = {
    ("Q4_0", 64, "large"): dict(BLOCK_M=32, BLOCK_N=64, BLOCK_B=8, GROUP_M=8, num_warps=4,
                                num_stages=2),  # 1.77x
    ("Q4_0", 64, "small"): dict(BLOCK_M=32, BLOCK_N=64, BLOCK_B=4, GROUP_M=8, num_warps=4,
                                num_stages=3),  # 2.14x
    ("Q4_0", 256, "large"): dict(BLOCK_M=32, BLOCK_N=64, BLOCK_B=4, GROUP_M=8, num_warps=4,
                                 num_stages=3),  # 1.50x
    ("Q4_0", 256, "small"): dict(BLOCK_M=32, BLOCK_N=64, BLOCK_B=4, GROUP_M=8, num_warps=4,
                                 num_stages=3),  # 2.56x
    ("Q4_0", 512, "large"): dict(BLOCK_M=64, BLOCK_N=64, BLOCK_B=4, GROUP_M=8, num_warps=4,
                                 num_stages=1),  # 1.14x
    ("Q4_0", 512, "small"): dict(BLOCK_M=32, BLOCK_N=128, BLOCK_B=2, GROUP_M=8, num_warps=4,
                                 num_stages=3),  # 1.75x
    ("Q8_0", 64, "large"): dict(BLOCK_M=32, BLOCK_N=64, BLOCK_B=4, GROUP_M=8, num_warps=4,
                                num_stages=3),  # 2.32x
    ("Q8_0", 64, "small"): dict(BLOCK_M=32, BLOCK_N=64, BLOCK_B=4, GROUP_M=8, num_warps=4,
                                num_stages=3),  # 2.87x
    ("Q8_0", 256, "large"): dict(BLOCK_M=32, BLOCK_N=128, BLOCK_B=4, GROUP_M=8, num_warps=8,
                                 num_stages=3),  # 2.01x
    ("Q8_0", 256, "small"): dict(BLOCK_M=32, BLOCK_N=64, BLOCK_B=2, GROUP_M=8, num_warps=4,
                                 num_stages=3),  # 3.59x
    ("Q8_0", 512, "large"): dict(BLOCK_M=128, BLOCK_N=64, BLOCK_B=2, GROUP_M=8, num_warps=8,
                                 num_stages=1),  # 1.62x
    ("Q8_0", 512, "small"): dict(BLOCK_M=32, BLOCK_N=128, BLOCK_B=2, GROUP_M=8, num_warps=8,
                                 num_stages=3),  # 2.32x
}
# fmt: on
_GEMM_KEYS = frozenset({"BLOCK_M", "BLOCK_N", "BLOCK_B", "GROUP_M", "num_warps", "num_stages"})


def _gemm_config(qtype: QuantType, m: int, n: int = 0, k: int = 0) -> dict[str, int]:
    """Tiles of the GEMM: a GEMM_TABLE entry for the shape if there is one; else BLOCK_M
    follows M up to 128, 128 weights per K step (64 for the float types, whose tiles are
    wider in bytes), 8 warps for 128-row tiles, 3 stages."""
    block_m = 16 if m <= 16 else 32 if m <= 32 else 64 if m <= 64 else 128
    block_b = 2 if qtype in _FLOAT_DTYPES else 4
    cfg = {"BLOCK_M": block_m, "BLOCK_N": 128 if block_m >= 64 else 64, "BLOCK_B": block_b,
           "GROUP_M": 8, "num_warps": 8 if block_m >= 128 else 4, "num_stages": 3}  # fmt: skip
    if _kquants is not None and n and k:
        cfg.update(GEMM_TABLE.get(_kquants.gemm_key(qtype, m, n, k), {}))
    return cfg


def _launch_gemm(
    x: torch.Tensor,
    w: PackedWeight,
    bias: torch.Tensor | None,
    out: torch.Tensor,
    config: dict[str, int] | None = None,
) -> None:
    m, n, k = x.shape[0], w.n, w.k
    cfg = _gemm_config(w.qtype, m, n, k)
    if config is not None:
        if not config.keys() <= _GEMM_KEYS:
            raise ValueError(
                f"gemm_config takes {sorted(_GEMM_KEYS)}, got {sorted(config.keys() - _GEMM_KEYS)}"
            )
        cfg.update(config)
    num_warps, num_stages = cfg.pop("num_warps"), cfg.pop("num_stages")
    grid = (triton.cdiv(m, cfg["BLOCK_M"]) * triton.cdiv(n, cfg["BLOCK_N"]),)
    _gemm_kernel[grid](
        x, *_operands(w), bias if bias is not None else out, out,
        m, n, k, x.stride(0),
        QT=_CODES[w.qtype], HAS_BIAS=bias is not None, INTERP=INTERPRET, **cfg,
        num_warps=num_warps, num_stages=num_stages,
    )  # fmt: skip


# --------------------------------------------------------------------------- kernels

if HAS_TRITON:
    # float32 -> dtype, rounded to nearest even (one definition: rounding.py)
    _round_to = rounding.round_to

    @triton.jit
    def _exact_f32(q, offset: tl.constexpr):
        """Integers q + offset in [0, 2^23) -> float32 q, exactly, without the int -> float
        convert (quarter rate on NVIDIA GPUs): the bits of 2^23 + u are 0x4B000000 | u."""
        u = (q.to(tl.int32) + offset) | 0x4B000000
        return u.to(tl.float32, bitcast=True) - (8388608.0 + offset)

    @triton.jit
    def _row_tile(ptr, rows, n_mask, b_first, nb, BLOCK_B: tl.constexpr, WIDTH: tl.constexpr):
        """Elements [b_first * WIDTH, +BLOCK_B * WIDTH) of rows `rows` of a (N, nb * WIDTH)
        array, loaded as one contiguous run per row and viewed as (BN, BLOCK_B, WIDTH)."""
        c = b_first * WIDTH + tl.arange(0, BLOCK_B * WIDTH)
        mask = n_mask[:, None] & (c < nb * WIDTH)[None, :]
        t = tl.load(ptr + rows[:, None] * (nb * WIDTH) + c[None, :], mask=mask, other=0)
        return tl.reshape(t, (rows.shape[0], BLOCK_B, WIDTH))

    @triton.jit
    def _nibble_tile(
        qs_ptr, qh_ptr, d_ptr, m_ptr, rows, n_mask, b_first, nb,
        BLOCK_B: tl.constexpr, QT: tl.constexpr,
    ):  # fmt: skip
        """Blocks [b_first, +BLOCK_B) of a 4/5-bit weight -> low and high quants (BN, BB, 16)
        float32 (weights 32b + j and 32b + 16 + j), scale d and offset c (BN, BB): w = d q + c.
        """
        qs = _row_tile(qs_ptr, rows, n_mask, b_first, nb, BLOCK_B, 16)
        lo = qs & 0xF
        hi = qs >> 4
        offs_b = b_first + tl.arange(0, BLOCK_B)
        blk = rows[:, None] * nb + offs_b[None, :]  # (BN, BB) block index in W
        mask = n_mask[:, None] & (offs_b < nb)[None, :]
        if QT == 2 or QT == 3:  # Q5_0, Q5_1: fifth bit of weight j is bit j of qh
            j = tl.arange(0, 16)[None, None, :]
            qh = tl.load(qh_ptr + blk, mask=mask, other=0)[:, :, None]
            lo = lo | (((qh >> j) & 1) << 4).to(tl.uint8)
            hi = hi | (((qh >> (j + 16)) & 1) << 4).to(tl.uint8)
        d = tl.load(d_ptr + blk, mask=mask, other=0.0).to(tl.float32)
        if QT == 1 or QT == 3:  # Q4_1, Q5_1: w = d q + m
            c = tl.load(m_ptr + blk, mask=mask, other=0.0).to(tl.float32)
        elif QT == 0:  # Q4_0: w = d (q - 8)
            c = -8.0 * d
        else:  # Q5_0: w = d (q - 16)
            c = -16.0 * d
        return _exact_f32(lo, 0), _exact_f32(hi, 0), d, c

    @triton.jit
    def _wide_tile(
        qs_ptr, d_ptr, rows, n_mask, b_first, nb, BLOCK_B: tl.constexpr, QT: tl.constexpr
    ):  # fmt: skip
        """Blocks [b_first, +BLOCK_B) of a Q8_0, float or byte-form Q4_1 weight -> values
        (BN, BB, 32) float32 and the scale d (BN, BB) (ones for the float types)."""
        q = _row_tile(qs_ptr, rows, n_mask, b_first, nb, BLOCK_B, 32)
        if QT == 4 or QT == 6:
            offs_b = b_first + tl.arange(0, BLOCK_B)
            mask = n_mask[:, None] & (offs_b < nb)[None, :]
            d = tl.load(d_ptr + rows[:, None] * nb + offs_b[None, :], mask=mask, other=0.0)
            return _exact_f32(q, 128 if QT == 4 else 0), d.to(tl.float32)
        else:
            return q.to(tl.float32), tl.full((rows.shape[0], BLOCK_B), 1.0, tl.float32)

    # act(gate) * up, as the K-quant GEMV's activation prologue computes it (one definition)
    _gated = _kquants._gated

    # 1 / rms of x's rows, as the K-quant GEMV's norm prologue computes it (one definition)
    _inv_rms = _kquants._inv_rms

    @triton.jit
    def _merged_tile(x_row, lse_row, b_first, nb, row_ok, BLOCK_B: tl.constexpr,
                     WIDTH: tl.constexpr, MERGE_S: tl.constexpr, HEAD_D: tl.constexpr):  # fmt: skip
        """`_x_tile` of a decode attention's output still in its MERGE_S key splits: x_row
        the row's partial outputs (n_heads, MERGE_S, HEAD_D), lse_row their log2-sum-exp2
        (n_heads, MERGE_S); element k = h HEAD_D + j is sum_s 2^(lse_s - M) o_s[j] / sum_s
        2^(lse_s - M), M the largest lse_s of head h (as `attention._combine_kernel`). A
        32-block lies in one head (HEAD_D a multiple of 32), so x_row + 16 is the high half."""
        bb = b_first + tl.arange(0, BLOCK_B)
        head = (bb * 32) // HEAD_D
        ok = (bb < nb) & row_ok
        lse_h = lse_row + head * MERGE_S
        top = tl.full([BLOCK_B], float("-inf"), tl.float32)
        for s in tl.static_range(MERGE_S):
            top = tl.maximum(top, tl.load(lse_h + s, mask=ok, other=float("-inf")))
        top = tl.where(top == float("-inf"), 0.0, top)  # every split empty: weights 0, x 0
        # element k of head h sits at (h MERGE_S + s) HEAD_D + k - h HEAD_D in split s
        offs = (bb * 32 + head * ((MERGE_S - 1) * HEAD_D))[:, None] + tl.arange(0, WIDTH)[None, :]
        total = tl.zeros([BLOCK_B], tl.float32)
        xv = tl.zeros([BLOCK_B, WIDTH], tl.float32)
        for s in tl.static_range(MERGE_S):
            w = tl.exp2(tl.load(lse_h + s, mask=ok, other=float("-inf")) - top)
            total += w
            part = tl.load(x_row + offs + s * HEAD_D, mask=ok[:, None], other=0.0)
            xv += w[:, None] * part
        return xv / tl.where(total > 0, total, 1.0)[:, None]

    @triton.jit
    def _x_tile(x_row, b_first, nb, row_ok, BLOCK_B: tl.constexpr, WIDTH: tl.constexpr,
                PRO: tl.constexpr, lse_row=None, MERGE_S: tl.constexpr = 1,
                HEAD_D: tl.constexpr = 32):  # fmt: skip
        """x[32 b + j] for blocks b in [b_first, +BLOCK_B), j < WIDTH -> (BB, WIDTH) float32;
        PRO 2 / 3: x is a [gate | up] row of 2K and the value is act(gate) * up; PRO 4: x is
        a decode attention's unmerged splits (`_merged_tile`)."""
        if PRO == 4:
            return _merged_tile(x_row, lse_row, b_first, nb, row_ok, BLOCK_B, WIDTH, MERGE_S,
                                HEAD_D)  # fmt: skip
        c = tl.arange(0, BLOCK_B * WIDTH)
        b = b_first + c // WIDTH
        offs = b * 32 + c % WIDTH
        mask = (b < nb) & row_ok
        xv = tl.load(x_row + offs, mask=mask, other=0.0).to(tl.float32)
        if PRO >= 2:
            up = tl.load(x_row + nb * 32 + offs, mask=mask, other=0.0).to(tl.float32)
            xv = _gated(xv, up, PRO == 2)
        return tl.reshape(xv, (BLOCK_B, WIDTH))

    @triton.jit
    def _g_tile(g_ptr, b_first, nb, BLOCK_B: tl.constexpr, WIDTH: tl.constexpr):
        """The norm weight at the elements `_x_tile` loads -> (BB, WIDTH) float32."""
        c = tl.arange(0, BLOCK_B * WIDTH)
        b = b_first + c // WIDTH
        gv = tl.load(g_ptr + b * 32 + c % WIDTH, mask=b < nb, other=0.0)
        return tl.reshape(gv.to(tl.float32), (BLOCK_B, WIDTH))

    @triton.jit
    def _g_halves(g_ptr, b_first, nb, BLOCK_B: tl.constexpr, PRO: tl.constexpr):
        """The norm weight's halves (BB, 16) at the elements `_x_halves` loads, once per step
        for all rows (PRO 1); ones otherwise (unread)."""
        gl, gh = 1.0, 1.0
        if PRO == 1:
            gl = _g_tile(g_ptr, b_first, nb, BLOCK_B, 16)
            gh = _g_tile(g_ptr + 16, b_first, nb, BLOCK_B, 16)
        return gl, gh

    @triton.jit
    def _x_halves(x_row, row_ok, b_first, nb, gl, gh, BLOCK_B: tl.constexpr, PRO: tl.constexpr,
                  lse_row=None, MERGE_S: tl.constexpr = 1, HEAD_D: tl.constexpr = 32):  # fmt: skip
        """One row's x[32b + j] and x[32b + 16 + j] (BB, 16) float32 with the prologue
        applied (PRO 1: times the norm weight's halves gl / gh, the 1 / rms comes at the end;
        other PRO: gl / gh unread; PRO 4: `_merged_tile`)."""
        xl = _x_tile(x_row, b_first, nb, row_ok, BLOCK_B, 16, PRO, lse_row, MERGE_S, HEAD_D)
        xh = _x_tile(x_row + 16, b_first, nb, row_ok, BLOCK_B, 16, PRO, lse_row, MERGE_S, HEAD_D)
        if PRO == 1:
            xl = xl * gl
            xh = xh * gh
        return xl, xh

    @triton.jit
    def _accumulate_row(acc, part, i, BLOCK_M: tl.constexpr):
        """acc[i] += part for a static row i of the (BLOCK_M, BN, BB) accumulator."""
        if BLOCK_M == 1:
            return acc + part[None, :, :]
        else:
            ids_m = tl.arange(0, BLOCK_M)
            return tl.where((ids_m == i)[:, None, None], acc + part[None, :, :], acc)

    @triton.jit
    def _dp4a(a, b, c, SIGNED_A: tl.constexpr, INTERP: tl.constexpr):
        """c + the dot product of the four bytes of int32 words a and b (b's bytes signed,
        a's signed or unsigned), element-wise: one `dp4a` instruction a word on the GPU."""
        if INTERP:
            for t in tl.static_range(4):
                bt = (b << (24 - 8 * t)) >> 24  # arithmetic shift: the signed byte
                at = (a >> (8 * t)) & 0xFF
                if SIGNED_A:
                    at = (a << (24 - 8 * t)) >> 24
                c += at * bt
            return c
        elif SIGNED_A:
            return tl.inline_asm_elementwise(
                "dp4a.s32.s32 $0, $1, $2, $3;", "=r,r,r,r", [a, b, c],
                dtype=tl.int32, is_pure=True, pack=1,
            )  # fmt: skip
        else:
            return tl.inline_asm_elementwise(
                "dp4a.u32.s32 $0, $1, $2, $3;", "=r,r,r,r", [a, b, c],
                dtype=tl.int32, is_pure=True, pack=1,
            )  # fmt: skip

    @triton.jit
    def _rint(v):
        """float32 v with |v| < 2^22 -> the nearest integer (ties to even) as int32: adding
        1.5 * 2^23 leaves the rounded integer in the low mantissa bits."""
        return (v + 12582912.0).to(tl.int32, bitcast=True) - 0x4B400000

    @triton.jit
    def _pack_bytes(q):
        """(BB, 16) int32 codes in [-127, 127] -> (BB, 4) int32 words, four codes a word,
        the first in the low byte (the byte order a block's quants have)."""
        q4 = tl.reshape(q & 0xFF, (q.shape[0], 4, 4))
        return tl.sum(q4 << (8 * tl.arange(0, 4))[None, None, :], axis=2)  # disjoint bytes

    @triton.jit
    def _codes(xl, xh):
        """One row's x blocks as halves (BB, 16) float32 (x[32b + j], x[32b + 16 + j]) ->
        int8 codes q = rint(x * 127 / a) (BB, 16) int32 per half, the scale a / 127 (BB,) and
        the codes' sum (BB,), a = max(amax, 2^-60) (no overflow for tiny blocks; all-zero
        blocks get zero codes): llama.cpp's q8_1 activations."""
        amax = tl.maximum(tl.max(tl.abs(xl), axis=1), tl.max(tl.abs(xh), axis=1))
        amax = tl.maximum(amax, 8.673617379884035e-19)  # 2^-60
        inv = 127.0 / amax
        ql = _rint(xl * inv[:, None])
        qh = _rint(xh * inv[:, None])
        total = tl.sum(ql, axis=1) + tl.sum(qh, axis=1)
        return ql, qh, amax / 127.0, total

    @triton.jit
    def _q8_part(lo, hi, ql, qh, scale, total, d, c, QT: tl.constexpr, INTERP: tl.constexpr):
        """The block sums (BN, BB) of the weight words lo / hi (`_gemv_step_q8x`) with one
        row's codes ql / qh (BB, 16), their scale and sum: d * scale * sum_j q_j c_j, with the
        -8 / -16 offsets folded into the integer sum, or + m * scale * sum_j c_j (c = m)."""
        zero = tl.zeros(lo.shape, tl.int32)
        dot = _dp4a(lo, _pack_bytes(ql)[None, :, :], zero, QT == 4, INTERP)
        dot = _dp4a(hi, _pack_bytes(qh)[None, :, :], dot, QT == 4, INTERP)
        isum = tl.sum(dot, axis=2)  # |.| <= 32 * 31 * 127: exact in float32
        if QT == 0:
            isum -= 8 * total[None, :]
        elif QT == 2:
            isum -= 16 * total[None, :]
        part = isum.to(tl.float32) * (d * scale[None, :])
        if QT == 1 or QT == 3:
            part += c * (scale * total.to(tl.float32))[None, :]
        return part

    @triton.jit
    def _words(ptr, rows, n_mask, b_first, nb, PER_BLOCK: tl.constexpr, OFFSET: tl.constexpr,
               BLOCK_B: tl.constexpr):  # fmt: skip
        """Words [OFFSET, OFFSET + 4) of blocks [b_first, +BLOCK_B) of rows `rows` of an
        (N, nb * PER_BLOCK) int32 array -> (BN, BB, 4)."""
        b = b_first + tl.arange(0, BLOCK_B)
        c = b[:, None] * PER_BLOCK + OFFSET + tl.arange(0, 4)[None, :]
        mask = n_mask[:, None, None] & (b < nb)[None, :, None]
        ptrs = ptr + rows[:, None, None] * (nb * PER_BLOCK) + c[None, :, :]
        return tl.load(ptrs, mask=mask, other=0)

    @triton.jit
    def _high_bits(qh, FIRST: tl.constexpr):
        """Bits FIRST + 4i .. +3 of a Q5 block's qh (BN, BB) -> (BN, BB, 4) words with them at
        bit 4 of bytes 0..3 (the fifth bit of the weights word i of qs holds)."""
        i = tl.arange(0, 4)[None, None, :]
        v = (qh[:, :, None] >> (FIRST + 4 * i)) & 0xF
        return ((v * 0x00204081) & 0x01010101) << 4  # bit t of v -> bit 8t, then bit 8t + 4

    @triton.jit
    def _gemv_step_q8x(
        acc, x_ptr, qs_ptr, qh_ptr, d_ptr, m_ptr, rows, n_mask, b_first, nb, m0, M, stride_xm,
        g_ptr, QT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_B: tl.constexpr,
        PRO: tl.constexpr, INTERP: tl.constexpr, LEVELS: tl.constexpr,
    ):  # fmt: skip
        """`_gemv_step` with x quantized to int8 per 32-block (`_codes`) and integer dot
        products (`_q8_part`): qs_ptr is the quants viewed as int32 words. Per block and row,
        sum_j w_j x_j ~ d * sx * sum_j q_j c_j (+ the offset's m * sx * sum_j c_j, or
        -8 / -16 codes folded into the integer sum), c the codes, sx the x scale. LEVELS 2
        adds the residual x - sx c quantized the same way (x ~ sx c + sr cr: x's rounding
        error ~254 times smaller, twice the integer work)."""
        offs_b = b_first + tl.arange(0, BLOCK_B)
        blk = rows[:, None] * nb + offs_b[None, :]  # (BN, BB) block index in W
        mask = n_mask[:, None] & (offs_b < nb)[None, :]
        d = tl.load(d_ptr + blk, mask=mask, other=0.0).to(tl.float32)
        if QT < 4:
            w = _words(qs_ptr, rows, n_mask, b_first, nb, 4, 0, BLOCK_B)
            lo = w & 0x0F0F0F0F  # weights 4i .. 4i + 3 of word i
            hi = (w >> 4) & 0x0F0F0F0F  # weights 16 + 4i ..
            if QT == 2 or QT == 3:
                qh = tl.load(qh_ptr + blk, mask=mask, other=0)
                lo = lo | _high_bits(qh, 0)
                hi = hi | _high_bits(qh, 16)
        else:  # Q8_0: words 0-3 hold weights 0-15, words 4-7 weights 16-31
            lo = _words(qs_ptr, rows, n_mask, b_first, nb, 8, 0, BLOCK_B)
            hi = _words(qs_ptr, rows, n_mask, b_first, nb, 8, 4, BLOCK_B)
        c = d  # the offsets m (Q4_1, Q5_1); unread by the other types
        if QT == 1 or QT == 3:
            c = tl.load(m_ptr + blk, mask=mask, other=0.0).to(tl.float32)
        gl, gh = _g_halves(g_ptr, b_first, nb, BLOCK_B, PRO)
        for i in tl.static_range(BLOCK_M):
            x_row = x_ptr + (m0 + i).to(tl.int64) * stride_xm
            xl, xh = _x_halves(x_row, m0 + i < M, b_first, nb, gl, gh, BLOCK_B, PRO)
            cl, ch, sx, total = _codes(xl, xh)
            part = _q8_part(lo, hi, cl, ch, sx, total, d, c, QT, INTERP)
            if LEVELS == 2:
                rl = xl - cl.to(tl.float32) * sx[:, None]
                rh = xh - ch.to(tl.float32) * sx[:, None]
                cl, ch, sx, total = _codes(rl, rh)
                part += _q8_part(lo, hi, cl, ch, sx, total, d, c, QT, INTERP)
            acc = _accumulate_row(acc, part, i, BLOCK_M)
        return acc

    @triton.jit
    def _gemv_step(
        acc, x_ptr, qs_ptr, qh_ptr, d_ptr, m_ptr, rows, n_mask, b_first, nb, m0, M, stride_xm,
        g_ptr, QT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_B: tl.constexpr,
        PRO: tl.constexpr, MERGE_S: tl.constexpr, HEAD_D: tl.constexpr,
    ):  # fmt: skip
        """Adds blocks [b_first, +BLOCK_B) of the rows `rows` times x rows m0.. to acc
        (BM, BN, BB). PRO: 1 x * g (the norm's 1/rms is applied to the sums), 2 / 3 the gated
        activation of a [gate | up] x, 4 x a decode attention's MERGE_S unmerged key splits
        (g_ptr their log-sum-exps, (M, K / HEAD_D, MERGE_S))."""
        if QT < 4:
            lo, hi, d, c = _nibble_tile(
                qs_ptr, qh_ptr, d_ptr, m_ptr, rows, n_mask, b_first, nb, BLOCK_B, QT
            )
            gl, gh = _g_halves(g_ptr, b_first, nb, BLOCK_B, PRO)
            for i in tl.static_range(BLOCK_M):
                x_row = x_ptr + (m0 + i).to(tl.int64) * stride_xm
                lse_row = g_ptr + (m0 + i).to(tl.int64) * (nb * 32 // HEAD_D * MERGE_S)
                xl, xh = _x_halves(x_row, m0 + i < M, b_first, nb, gl, gh, BLOCK_B, PRO,
                                   lse_row, MERGE_S, HEAD_D)  # fmt: skip
                sq = tl.sum(lo * xl[None, :, :] + hi * xh[None, :, :], axis=2)  # (BN, BB)
                sx = tl.sum(xl + xh, axis=1)  # (BB,)
                acc = _accumulate_row(acc, d * sq + c * sx[None, :], i, BLOCK_M)
        else:
            q, d = _wide_tile(qs_ptr, d_ptr, rows, n_mask, b_first, nb, BLOCK_B, QT)
            if QT == 6:  # Q4_1 as bytes: w = d q + m
                offs_b = b_first + tl.arange(0, BLOCK_B)
                blk = rows[:, None] * nb + offs_b[None, :]
                mask = n_mask[:, None] & (offs_b < nb)[None, :]
                c = tl.load(m_ptr + blk, mask=mask, other=0.0).to(tl.float32)
            if PRO == 1:
                gv = _g_tile(g_ptr, b_first, nb, BLOCK_B, 32)
            for i in tl.static_range(BLOCK_M):
                x_row = x_ptr + (m0 + i).to(tl.int64) * stride_xm
                lse_row = g_ptr + (m0 + i).to(tl.int64) * (nb * 32 // HEAD_D * MERGE_S)
                xv = _x_tile(x_row, b_first, nb, m0 + i < M, BLOCK_B, 32, PRO, lse_row, MERGE_S,
                             HEAD_D)  # fmt: skip
                if PRO == 1:
                    xv = xv * gv
                part = tl.sum(q * xv[None, :, :], axis=2)  # (BN, BB)
                if QT == 4:
                    part = d * part
                elif QT == 6:
                    part = d * part + c * tl.sum(xv, axis=1)[None, :]
                acc = _accumulate_row(acc, part, i, BLOCK_M)
        return acc

    @triton.jit
    def _gemv_any_step(
        acc, x_ptr, qs_ptr, qh_ptr, d_ptr, m_ptr, rows, n_mask, b_first, nb, m0, M, stride_xm,
        g_ptr, QT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_B: tl.constexpr,
        PRO: tl.constexpr, INTERP: tl.constexpr, Q8X: tl.constexpr, MERGE_S: tl.constexpr,
        HEAD_D: tl.constexpr,
    ):  # fmt: skip
        """One K step of the GEMV, float32 (`_gemv_step`) or int8 activations (Q8X levels;
        not with PRO 4)."""
        args = (x_ptr, qs_ptr, qh_ptr, d_ptr, m_ptr, rows, n_mask, b_first, nb, m0, M)
        if Q8X > 0:
            acc = _gemv_step_q8x(acc, *args, stride_xm, g_ptr, QT, BLOCK_M, BLOCK_B, PRO, INTERP,
                                 Q8X)  # fmt: skip
        else:
            acc = _gemv_step(acc, *args, stride_xm, g_ptr, QT, BLOCK_M, BLOCK_B, PRO, MERGE_S,
                             HEAD_D)  # fmt: skip
        return acc

    @triton.jit
    def _gemv_kernel(
        x_ptr, qs_ptr, qh_ptr, d_ptr, m_ptr, bias_ptr, g_ptr, out_ptr,
        M, N, K, stride_xm, steps_per_split, eps,
        QT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
        BLOCK_B: tl.constexpr, SPLIT: tl.constexpr, HAS_BIAS: tl.constexpr,
        PRO: tl.constexpr, HAS_RES: tl.constexpr, INTERP: tl.constexpr,
        WB: tl.constexpr, PF: tl.constexpr, PDL: tl.constexpr, Q8X: tl.constexpr,
        RMS_CHUNK: tl.constexpr, MERGE_S: tl.constexpr = 1, HEAD_D: tl.constexpr = 32,
    ):  # fmt: skip
        """out[m, n] = sum_k x[m, k] W[n, k] over this program's rows, row group and K split
        (SPLIT > 1: float32 partials into out (SPLIT, M, N)). PRO: the prologue on x (1 RMSNorm
        with weight g, 2 SiLU / 3 GELU-tanh gating of a [gate | up] x, 4 x a decode
        attention's MERGE_S unmerged key splits of HEAD_D-wide heads, g their log-sum-exps,
        `_merged_tile`); HAS_RES: out += y.
        PDL: PF lines of each row's qs (WB elements a block) go to L2 before the wait.
        Q8X 1 / 2: x quantized to int8 blocks in 1 / 2 levels, integer dot products
        (`_gemv_step_q8x`; qs_ptr the quants as int32 words)."""
        pid_k = tl.program_id(1)
        m0 = tl.program_id(2) * BLOCK_M
        offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        rows = offs_n.to(tl.int64)
        n_mask = offs_n < N
        nb = K // 32
        b_start = pid_k * steps_per_split * BLOCK_B  # splits are whole steps: stop at K only
        if PDL:
            b_stop = tl.minimum(b_start + steps_per_split * BLOCK_B, nb)
            pdl.prefetch_rows(qs_ptr, rows, n_mask, nb * WB, b_start * WB, b_stop * WB, PF)
        pdl.wait(PDL)
        pdl.launch_dependents(PDL)
        acc = tl.zeros((BLOCK_M, BLOCK_N, BLOCK_B), tl.float32)
        args = (x_ptr, qs_ptr, qh_ptr, d_ptr, m_ptr, rows, n_mask)
        if INTERP:  # numpy >= 2.4 cannot make the interpreter's scalars `range` bounds
            step = 0
            while step < steps_per_split:
                acc = _gemv_any_step(acc, *args, b_start + step * BLOCK_B, nb, m0, M, stride_xm,
                                     g_ptr, QT, BLOCK_M, BLOCK_B, PRO, INTERP, Q8X, MERGE_S,
                                     HEAD_D)  # fmt: skip
                step += 1
        else:
            for step in range(0, steps_per_split):
                acc = _gemv_any_step(acc, *args, b_start + step * BLOCK_B, nb, m0, M, stride_xm,
                                     g_ptr, QT, BLOCK_M, BLOCK_B, PRO, INTERP, Q8X, MERGE_S,
                                     HEAD_D)  # fmt: skip
        y = tl.sum(acc, axis=2)  # (BM, BN)
        offs_m = m0 + tl.arange(0, BLOCK_M)
        o_mask = (offs_m[:, None] < M) & n_mask[None, :]
        if PRO == 1:  # sum_k W x g / rms(x): the scale is linear, partial sums take it too
            inv = _inv_rms(x_ptr, offs_m, M, stride_xm, K, eps, BLOCK_M, RMS_CHUNK, INTERP)
            y = y * inv[:, None]
        if SPLIT == 1:
            if HAS_BIAS:
                y += tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
            o_ptr = out_ptr + offs_m[:, None].to(tl.int64) * N + offs_n[None, :]
            if HAS_RES:  # out is the residual: added once, here (no split)
                y += tl.load(o_ptr, mask=o_mask, other=0.0).to(tl.float32)
            tl.store(o_ptr, _round_to(y, out_ptr.dtype.element_ty, INTERP), mask=o_mask)
        else:
            ws_row = (pid_k * M + offs_m[:, None]).to(tl.int64)
            tl.store(out_ptr + ws_row * N + offs_n[None, :], y, mask=o_mask)

    @triton.jit
    def _reduce_kernel(
        ws_ptr, bias_ptr, out_ptr, MN, N,
        SPLIT: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_RES: tl.constexpr,
        BLOCK: tl.constexpr, INTERP: tl.constexpr, PDL: tl.constexpr,
    ):  # fmt: skip
        """out = sum over s of ws[s] (+ bias) (+ out: the residual, added once, here), added
        in order s = 0, 1, ... (deterministic)."""
        pdl.wait(PDL)
        pdl.launch_dependents(PDL)
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < MN
        y = tl.zeros((BLOCK,), tl.float32)
        for s in tl.static_range(SPLIT):
            y += tl.load(ws_ptr + s * MN.to(tl.int64) + offs, mask=mask, other=0.0)
        if HAS_BIAS:
            y += tl.load(bias_ptr + offs % N, mask=mask, other=0.0).to(tl.float32)
        if HAS_RES:
            y += tl.load(out_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        tl.store(out_ptr + offs, _round_to(y, out_ptr.dtype.element_ty, INTERP), mask=mask)

    @triton.jit
    def _dot(a, b, acc, INTERP: tl.constexpr):
        """acc + a @ b. The interpreter's bf16 dot multiplies raw bits, so there both go to
        float32 first (16-bit products are exact in float32: same sums); the GPU runs a
        float32 pair in TF32."""
        if INTERP:
            return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
        else:
            return tl.dot(a, b, acc, input_precision="tf32")

    @triton.jit
    def _gemm_step(
        acc, x_rows, qs_ptr, qh_ptr, d_ptr, m_ptr, rows, n_mask, m_mask, b_first, nb,
        QT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
        BLOCK_B: tl.constexpr, INTERP: tl.constexpr,
    ):  # fmt: skip
        """acc (BM, BN) + x[:, blocks b_first..] @ W[rows, blocks b_first..]^T."""
        cdt = x_rows.dtype.element_ty
        offs_b = b_first + tl.arange(0, BLOCK_B)
        x_mask = m_mask[:, None, None] & (offs_b < nb)[None, :, None]
        if QT < 4:
            lo, hi, d, c = _nibble_tile(
                qs_ptr, qh_ptr, d_ptr, m_ptr, rows, n_mask, b_first, nb, BLOCK_B, QT
            )
            # d q + c rounds once, as ggml's float32 dequantizer
            wl = _round_to(lo * d[:, :, None] + c[:, :, None], cdt, INTERP)
            wh = _round_to(hi * d[:, :, None] + c[:, :, None], cdt, INTERP)
            wl = tl.reshape(wl, (BLOCK_N, BLOCK_B * 16))
            wh = tl.reshape(wh, (BLOCK_N, BLOCK_B * 16))
            xo = offs_b[None, :, None] * 32 + tl.arange(0, 16)[None, None, :]  # (1, BB, 16)
            xl = tl.reshape(tl.load(x_rows + xo, mask=x_mask, other=0.0), (BLOCK_M, BLOCK_B * 16))
            xh = tl.load(x_rows + xo + 16, mask=x_mask, other=0.0)
            xh = tl.reshape(xh, (BLOCK_M, BLOCK_B * 16))
            acc = _dot(xl, tl.trans(wl), acc, INTERP)
            acc = _dot(xh, tl.trans(wh), acc, INTERP)
        else:
            q, d = _wide_tile(qs_ptr, d_ptr, rows, n_mask, b_first, nb, BLOCK_B, QT)
            if QT == 4:
                q = q * d[:, :, None]
            wt = tl.reshape(_round_to(q, cdt, INTERP), (BLOCK_N, BLOCK_B * 32))
            xo = offs_b[None, :, None] * 32 + tl.arange(0, 32)[None, None, :]  # (1, BB, 32)
            xt = tl.load(x_rows + xo, mask=x_mask, other=0.0)
            acc = _dot(tl.reshape(xt, (BLOCK_M, BLOCK_B * 32)), tl.trans(wt), acc, INTERP)
        return acc

    @triton.jit
    def _grouped_tile(pid, M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                      GROUP_M: tl.constexpr):  # fmt: skip
        """Program pid's (row tile, column tile) in grouped order: GROUP_M row tiles run
        together over each weight column tile, so it is read from L2 by all of them."""
        num_m = tl.cdiv(M, BLOCK_M)
        num_n = tl.cdiv(N, BLOCK_N)
        first_m = pid // (GROUP_M * num_n) * GROUP_M
        group_size = tl.minimum(num_m - first_m, GROUP_M)
        pid_m = first_m + (pid % (GROUP_M * num_n)) % group_size
        pid_n = (pid % (GROUP_M * num_n)) // group_size
        return pid_m, pid_n

    @triton.jit
    def _gemm_kernel(
        x_ptr, qs_ptr, qh_ptr, d_ptr, m_ptr, bias_ptr, out_ptr,
        M, N, K, stride_xm,
        QT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
        BLOCK_B: tl.constexpr, GROUP_M: tl.constexpr, HAS_BIAS: tl.constexpr,
        INTERP: tl.constexpr,
    ):  # fmt: skip
        """out = x W^T (+ bias) by (BLOCK_M, BLOCK_N) tiles; W tiles dequantized in registers
        and rounded to x's dtype (16-bit x) or kept float32 for a TF32 dot (float32 x)."""
        pid_m, pid_n = _grouped_tile(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)

        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        m_mask = offs_m < M
        n_mask = offs_n < N
        rows = offs_n.to(tl.int64)
        x_rows = x_ptr + offs_m.to(tl.int64)[:, None, None] * stride_xm  # (BM, 1, 1)
        nb = K // 32
        acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
        args = (x_rows, qs_ptr, qh_ptr, d_ptr, m_ptr, rows, n_mask, m_mask)
        if INTERP:  # numpy >= 2.4 cannot make the interpreter's scalars `range` bounds
            b0 = 0
            while b0 < nb:
                acc = _gemm_step(acc, *args, b0, nb, QT, BLOCK_M, BLOCK_N, BLOCK_B,
                                 INTERP)  # fmt: skip
                b0 += BLOCK_B
        else:
            for b0 in range(0, nb, BLOCK_B):
                acc = _gemm_step(acc, *args, b0, nb, QT, BLOCK_M, BLOCK_N, BLOCK_B,
                                 INTERP)  # fmt: skip
        if HAS_BIAS:
            acc += tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
        o_ptr = out_ptr + offs_m.to(tl.int64)[:, None] * N + offs_n[None, :]
        y = _round_to(acc, out_ptr.dtype.element_ty, INTERP)
        tl.store(o_ptr, y, mask=m_mask[:, None] & n_mask[None, :])

    @triton.jit
    def _dequant_kernel(
        qs_ptr, qh_ptr, d_ptr, m_ptr, out_ptr, row_end, K, row0,
        QT: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_B: tl.constexpr, INTERP: tl.constexpr,
    ):  # fmt: skip
        """Rows [row0, row_end) of W dequantized (d q + c rounded once, as the GEMM's tiles)
        and rounded to out's dtype: out[row - row0, :], one (BLOCK_N, BLOCK_B blocks) tile
        per program."""
        offs_n = row0 + tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        n_mask = offs_n < row_end
        rows = offs_n.to(tl.int64)
        nb = K // 32
        b_first = tl.program_id(1) * BLOCK_B
        offs_b = b_first + tl.arange(0, BLOCK_B)
        mask = n_mask[:, None, None] & (offs_b < nb)[None, :, None]
        odt = out_ptr.dtype.element_ty
        base = out_ptr + (rows - row0)[:, None, None] * K
        if QT < 4:
            lo, hi, d, c = _nibble_tile(
                qs_ptr, qh_ptr, d_ptr, m_ptr, rows, n_mask, b_first, nb, BLOCK_B, QT
            )
            cols = offs_b[None, :, None] * 32 + tl.arange(0, 16)[None, None, :]
            tl.store(base + cols, _round_to(lo * d[:, :, None] + c[:, :, None], odt, INTERP),
                     mask=mask)  # fmt: skip
            tl.store(base + cols + 16, _round_to(hi * d[:, :, None] + c[:, :, None], odt, INTERP),
                     mask=mask)  # fmt: skip
        else:
            q, d = _wide_tile(qs_ptr, d_ptr, rows, n_mask, b_first, nb, BLOCK_B, QT)
            if QT == 4:
                q = q * d[:, :, None]
            cols = offs_b[None, :, None] * 32 + tl.arange(0, 32)[None, None, :]
            tl.store(base + cols, _round_to(q, odt, INTERP), mask=mask)

    @triton.jit
    def _scale_rows_kernel(x_ptr, y_ptr, s_ptr, stride_xm, K: tl.constexpr,
                           BLOCK_K: tl.constexpr, PDL: tl.constexpr):  # fmt: skip
        """Row r of x (float) -> y = x / s as float16 and s = 2^e (float32), the power of two
        with max |x| <= 2^14 s (y then fits float16 exactly as x's scaled values round).
        A row that fits one BLOCK_K tile is loaded once; longer rows are read twice."""
        pdl.wait(PDL)
        pdl.launch_dependents(PDL)
        row = tl.program_id(0).to(tl.int64)
        x_row = x_ptr + row * stride_xm
        if BLOCK_K >= K:
            offs = tl.arange(0, BLOCK_K)
            v = tl.load(x_row + offs, mask=offs < K, other=0.0).to(tl.float32)
            top = tl.max(tl.abs(v), axis=0)
        else:
            amax = tl.zeros((BLOCK_K,), tl.float32)
            for k0 in range(0, K, BLOCK_K):
                offs = k0 + tl.arange(0, BLOCK_K)
                v = tl.load(x_row + offs, mask=offs < K, other=0.0)
                amax = tl.maximum(amax, tl.abs(v.to(tl.float32)))
            top = tl.max(amax, axis=0)
        e = tl.ceil(tl.log2(tl.maximum(top, 1e-30))) - 14.0
        inv = tl.exp2(-e)
        if BLOCK_K >= K:
            tl.store(y_ptr + row * K + offs, (v * inv).to(tl.float16), mask=offs < K)
        else:
            for k0 in range(0, K, BLOCK_K):
                offs = k0 + tl.arange(0, BLOCK_K)
                v = tl.load(x_row + offs, mask=offs < K, other=0.0)
                tl.store(y_ptr + row * K + offs, (v.to(tl.float32) * inv).to(tl.float16),
                         mask=offs < K)  # fmt: skip
        tl.store(s_ptr + row, tl.exp2(e))
