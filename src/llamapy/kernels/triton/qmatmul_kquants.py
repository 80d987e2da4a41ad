"""Fused dequantize-matmul for the k-quants (Q2_K..Q6_K) and IQ4_NL / IQ4_XS: y = x W^T.

`pack` splits ggml's blocks once into row-contiguous arrays (quants, high bits, small integer
scales, fp16 super-block scales), the same bytes rearranged: nothing is expanded to float in
memory. 6-bit packed scales are decoded to one byte each (0.5 bit per weight more than ggml
for Q3_K..Q5_K and IQ4_XS); the float products d * sc stay in the kernels, computed in float32
exactly as ggml's `dequantize_row_*` does, so every dequantized weight is bit-identical.

Kernels walk K in "units" (a 256-weight super-block; an IQ4_NL block of 32) and, inside a
unit, in "pieces" of 32 (16 for the IQ4 types) consecutive weights, in ggml's own loop order
(`_q45_k`, `_q6_k`, ...), so each piece has one quant byte run and one or two scales:

- GEMV (decode, M <= GEMV_MAX_M): a program owns BLOCK_N rows and NSB units per K step;
  pieces are dequantized in registers as (BLOCK_N, NSB, L) tiles and multiply-added into a
  (BLOCK_M, BLOCK_N, NSB, L) float32 accumulator reduced once at the end. Small grids split
  K across programs writing float32 partials that `_reduce_kernel` sums in a fixed order
  (deterministic, no atomics).
  The GEMV also fuses what surrounds a decode matmul (`matmul`'s keywords): an RMSNorm of x
  (x * g as it is loaded, the row's 1 / rms from a pass over x, applied to the sums), the
  gated activation act(gate) * up of a [gate | up] x, and out += y (the residual stream).
- GEMM (prefill): each piece (BLOCK_N, L), rounded to x's dtype, goes to `tl.dot` with a
  float32 accumulator. float32 x keeps float32 operands and Triton's default TF32 dot (10-bit
  mantissa, float32 range, so large scales cannot overflow as in fp16).

Everything is sized from shapes (no host sync, no data-dependent allocation), so calls can be
captured in CUDA graphs.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch

from llamapy.kernels.triton import HAS_TRITON, INTERPRET, pdl, rounding, triton_usable
from llamapy.quant.grids import table
from llamapy.quant.kquants import _k_scale_min, _q3_k_scales
from llamapy.quant.types import QuantType, block_size, row_nbytes, type_size

if HAS_TRITON:
    import triton
    import triton.language as tl

    _SQRT_2_OVER_PI = tl.constexpr(math.sqrt(2.0 / math.pi))

# Packed arrays per type, in the kernels' pointer order: (name, dtype, weights per element);
# 0 weights per element marks the (16,) float32 IQ4 value table.
_U8, _I8, _F16 = torch.uint8, torch.int8, torch.float16
_FIELDS: dict[QuantType, tuple[tuple[str, torch.dtype, int], ...]] = {
    QuantType.Q2_K: (("qs", _U8, 4), ("sc", _U8, 16), ("d", _F16, 256), ("dmin", _F16, 256)),
    QuantType.Q3_K: (("qs", _U8, 4), ("hmask", _U8, 8), ("sc", _I8, 16), ("d", _F16, 256)),
    QuantType.Q4_K: (
        ("qs", _U8, 2), ("sc", _U8, 32), ("mn", _U8, 32), ("d", _F16, 256), ("dmin", _F16, 256),
    ),
    QuantType.Q5_K: (
        ("qs", _U8, 2), ("qh", _U8, 8), ("sc", _U8, 32), ("mn", _U8, 32),
        ("d", _F16, 256), ("dmin", _F16, 256),
    ),
    QuantType.Q6_K: (("ql", _U8, 2), ("qh", _U8, 4), ("sc", _I8, 16), ("d", _F16, 256)),
    QuantType.IQ4_NL: (("qs", _U8, 2), ("d", _F16, 32), ("kvalues", torch.float32, 0)),
    QuantType.IQ4_XS: (
        ("qs", _U8, 2), ("sc", _I8, 32), ("d", _F16, 256), ("kvalues", torch.float32, 0),
    ),
}  # fmt: skip
TYPES: frozenset[QuantType] = frozenset(_FIELDS)

# Lanes per piece: the IQ4 types keep ggml's 16-byte nibble runs (weights j and j + 16).
_LANES = {q: 16 if q in (QuantType.IQ4_NL, QuantType.IQ4_XS) else 32 for q in TYPES}

# Decode batches up to this many rows take the GEMV. Its cost per weight is ~3 ALU ops to
# dequantize plus one fp32 FMA per row; an H100 streaming ~3 TB/s of 4.5-bit weights issues
# ~6 fp32 ops per weight, so past ~4 rows `tl.dot` (tile dequantized once for 16+ rows, MACs
# on tensor cores) is cheaper.
GEMV_MAX_M = 4
_X_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


# --------------------------------------------------------------------------- packing


def _check_geometry(qtype: QuantType, n: int, k: int) -> None:
    if qtype not in TYPES:
        names = ", ".join(sorted(t.name for t in TYPES))
        raise ValueError(f"{qtype.name} is not a k-quant kernel type (have: {names})")
    if n < 0 or k <= 0 or k % block_size(qtype):
        raise ValueError(
            f"a {n}x{k} {qtype.name} weight needs N >= 0 and K a positive multiple of "
            f"{block_size(qtype)}"
        )


def pack(data: torch.Tensor, qtype: QuantType, n: int, k: int) -> dict[str, torch.Tensor]:
    """ggml blocks (N, row_bytes) uint8 of an (N, K) weight -> the kernels' arrays (same device).

    Quants keep ggml's byte order; scales become one (signed) byte each; fp16 fields stay fp16.
    """
    _check_geometry(qtype, n, k)
    nb = k // block_size(qtype)
    if data.dtype != torch.uint8 or tuple(data.shape) != (n, nb * type_size(qtype)):
        raise ValueError(
            f"{qtype.name} blocks of a {n}x{k} weight are uint8 {(n, nb * type_size(qtype))}, "
            f"got {data.dtype} {tuple(data.shape)}"
        )
    blocks = data.reshape(n, nb, type_size(qtype))  # (N, nb, type_size)
    return {name: t.contiguous() for name, t in _PACKERS[qtype](blocks).items()}


def _run(blocks: torch.Tensor, start: int, stop: int) -> torch.Tensor:
    """Bytes [start, stop) of every block -> (N, nb * (stop - start)) uint8."""
    return blocks[:, :, start:stop].reshape(blocks.shape[0], -1)


def _half(blocks: torch.Tensor, offset: int) -> torch.Tensor:
    """The fp16 at byte `offset` of every block -> (N, nb) float16."""
    return blocks[:, :, offset : offset + 2].contiguous().view(torch.float16).squeeze(-1)


def _per_row(t: torch.Tensor, n: int) -> torch.Tensor:
    return t.reshape(n, -1)


def _pack_q2_k(b: torch.Tensor) -> dict[str, torch.Tensor]:
    # block_q2_K {u8 scales[16] (scale | min << 4); u8 qs[64]; fp16 d, dmin}
    return {"qs": _run(b, 16, 80), "sc": _run(b, 0, 16), "d": _half(b, 80), "dmin": _half(b, 82)}


def _pack_q3_k(b: torch.Tensor) -> dict[str, torch.Tensor]:
    # block_q3_K {u8 hmask[32]; u8 qs[64]; u8 scales[12] (16 x 6 bits); fp16 d}
    n = b.shape[0]
    sc = _q3_k_scales(b[:, :, 96:108].reshape(-1, 12)).to(torch.int8)  # sc - 32, exact
    qs, hmask = _run(b, 32, 96), _run(b, 0, 32)
    return {"qs": qs, "hmask": hmask, "sc": _per_row(sc, n), "d": _half(b, 108)}


def _pack_q45_k(b: torch.Tensor, qh: bool) -> dict[str, torch.Tensor]:
    # block_q4_K {fp16 d, dmin; u8 scales[12]; u8 qs[128]}; block_q5_K puts qh[32] before qs.
    n = b.shape[0]
    sc, mn = _k_scale_min(b[:, :, 4:16].reshape(-1, 12))  # (N * nb, 8) each
    qs_at = 48 if qh else 16
    out = {"qs": _run(b, qs_at, qs_at + 128)}
    if qh:
        out["qh"] = _run(b, 16, 48)
    out |= {"sc": _per_row(sc, n), "mn": _per_row(mn, n), "d": _half(b, 0), "dmin": _half(b, 2)}
    return out


def _pack_q6_k(b: torch.Tensor) -> dict[str, torch.Tensor]:
    # block_q6_K {u8 ql[128]; u8 qh[64]; i8 scales[16]; fp16 d}
    sc = _run(b, 192, 208).view(torch.int8)
    return {"ql": _run(b, 0, 128), "qh": _run(b, 128, 192), "sc": sc, "d": _half(b, 208)}


def _pack_iq4_nl(b: torch.Tensor) -> dict[str, torch.Tensor]:
    # block_iq4_nl {fp16 d; u8 qs[16]}
    return {"qs": _run(b, 2, 18), "d": _half(b, 0), "kvalues": table("iq4nl", b.device)}


def _pack_iq4_xs(b: torch.Tensor) -> dict[str, torch.Tensor]:
    # block_iq4_xs {fp16 d; u16 scales_h; u8 scales_l[4]; u8 qs[128]}: 8 six-bit scales, the
    # low 4 bits in scales_l nibbles, the high 2 in scales_h bit pairs (dequantize_row_iq4_xs).
    n = b.shape[0]
    sh = b[:, :, 2].to(torch.int32) | (b[:, :, 3].to(torch.int32) << 8)  # (N, nb)
    sh = torch.stack([(sh >> (2 * j)) & 3 for j in range(8)], dim=-1)  # (N, nb, 8)
    sl = b[:, :, 4:8].to(torch.int32)
    sl = torch.stack([sl & 0x0F, sl >> 4], dim=-1).reshape(n, -1, 8)  # sub-block j: byte j//2
    sc = ((sl | (sh << 4)) - 32).to(torch.int8)
    return {
        "qs": _run(b, 8, 136),
        "sc": _per_row(sc, n),
        "d": _half(b, 0),
        "kvalues": table("iq4nl", b.device),
    }


_PACKERS = {
    QuantType.Q2_K: _pack_q2_k,
    QuantType.Q3_K: _pack_q3_k,
    QuantType.Q4_K: functools.partial(_pack_q45_k, qh=False),
    QuantType.Q5_K: functools.partial(_pack_q45_k, qh=True),
    QuantType.Q6_K: _pack_q6_k,
    QuantType.IQ4_NL: _pack_iq4_nl,
    QuantType.IQ4_XS: _pack_iq4_xs,
}


# --------------------------------------------------------------------------- torch reference


def dequantize_packed(
    tensors: dict[str, torch.Tensor], qtype: QuantType, n: int, k: int
) -> torch.Tensor:
    """The packed weight back to float32 (N, K), in torch ops, with ggml's float32 arithmetic.

    The kernels compute the same values; tests compare this with `quant.dequant.dequantize`.
    """
    _check_geometry(qtype, n, k)
    _check_tensors(tensors, qtype, n, k, tensors[_FIELDS[qtype][0][0]].device)
    if n == 0:
        return torch.empty(0, k, dtype=torch.float32, device=tensors["d"].device)
    return _DEQUANTIZERS[qtype](tensors, n, k).reshape(n, k)


def _scale(t: torch.Tensor, per: int) -> torch.Tensor:
    """Per-unit fp16 scales (N, U) -> float32 repeated for `per` sub-blocks: (N, U * per)."""
    return t.to(torch.float32).repeat_interleave(per, dim=1)


def _planes(qs: torch.Tensor, shifts: range, mask: int) -> torch.Tensor:
    """(..., L) bytes -> (..., len(shifts), L): the bit fields at each shift."""
    return torch.stack([(qs >> s) & mask for s in shifts], dim=-2)


def _dq_q2_k(t: dict[str, torch.Tensor], n: int, k: int) -> torch.Tensor:
    sc = t["sc"].to(torch.int32)  # (N, K/16)
    dl = _scale(t["d"], 16) * (sc & 0x0F).to(torch.float32)
    ml = _scale(t["dmin"], 16) * (sc >> 4).to(torch.float32)
    # Each 32-byte run holds 128 weights: 2 bits at shifts 0, 2, 4, 6 for 4 runs of 32.
    q = _planes(t["qs"].reshape(n, -1, 32), range(0, 8, 2), 3).reshape(n, -1, 16)
    return dl[..., None] * q.to(torch.float32) - ml[..., None]


def _dq_q3_k(t: dict[str, torch.Tensor], n: int, k: int) -> torch.Tensor:
    dl = _scale(t["d"], 16) * t["sc"].to(torch.float32)  # (N, K/16)
    ql = _planes(t["qs"].reshape(n, -1, 2, 32), range(0, 8, 2), 3)  # (N, U, 2, 4, 32)
    hm = _planes(t["hmask"].reshape(n, -1, 32), range(8), 1).reshape(n, -1, 2, 4, 32)
    q = ql.to(torch.int8) - ((hm ^ 1) << 2).to(torch.int8)  # a clear high bit subtracts 4
    return dl.reshape(n, -1, 1) * q.reshape(n, -1, 16).to(torch.float32)


def _dq_q45_k(t: dict[str, torch.Tensor], n: int, k: int) -> torch.Tensor:
    dl = _scale(t["d"], 8) * t["sc"].to(torch.float32)  # (N, K/32)
    ml = _scale(t["dmin"], 8) * t["mn"].to(torch.float32)
    # 32-byte run c: low nibbles are sub-block 2c, high nibbles sub-block 2c + 1.
    q = _planes(t["qs"].reshape(n, -1, 32), range(0, 8, 4), 0x0F).reshape(n, -1, 8, 32)
    if "qh" in t:  # bit s of qh byte j: fifth bit of weight j of sub-block s
        q = q | (_planes(t["qh"].reshape(n, -1, 32), range(8), 1) << 4)
    q = q.reshape(n, -1, 32).to(torch.float32)
    return dl[..., None] * q - ml[..., None]


def _dq_q6_k(t: dict[str, torch.Tensor], n: int, k: int) -> torch.Tensor:
    dl = _scale(t["d"], 16) * t["sc"].to(torch.float32)  # (N, K/16)
    ql = t["ql"].reshape(n, -1, 2, 2, 32)  # (N, U, half, run, 32)
    lo = _planes(ql, range(0, 8, 4), 0x0F)  # (N, U, half, run, nibble, 32)
    lo = lo.transpose(-3, -2).reshape(n, -1, 2, 4, 32)  # piece r = run r % 2, nibble r // 2
    hi = _planes(t["qh"].reshape(n, -1, 2, 32), range(0, 8, 2), 3)  # (N, U, half, 4, 32)
    q = (lo | (hi << 4)).to(torch.int8) - 32
    return dl.reshape(n, -1, 1) * q.reshape(n, -1, 16).to(torch.float32)


def _dq_iq4(t: dict[str, torch.Tensor], n: int, k: int) -> torch.Tensor:
    # 16-byte runs: low nibbles are weights 0..15 of a 32-weight sub-block, high 16..31.
    q = _planes(t["qs"].reshape(n, -1, 16), range(0, 8, 4), 0x0F).reshape(n, -1, 32)
    d = t["d"].to(torch.float32)  # IQ4_NL: d per block of 32
    dl = _scale(t["d"], 8) * t["sc"].to(torch.float32) if "sc" in t else d  # IQ4_XS: d (ls - 32)
    return dl[..., None] * t["kvalues"][q.long()]


_DEQUANTIZERS = {
    QuantType.Q2_K: _dq_q2_k,
    QuantType.Q3_K: _dq_q3_k,
    QuantType.Q4_K: _dq_q45_k,
    QuantType.Q5_K: _dq_q45_k,
    QuantType.Q6_K: _dq_q6_k,
    QuantType.IQ4_NL: _dq_iq4,
    QuantType.IQ4_XS: _dq_iq4,
}


# --------------------------------------------------------------------------- launchers


def _check_tensors(
    tensors: dict[str, torch.Tensor], qtype: QuantType, n: int, k: int, device: torch.device
) -> None:
    for name, dtype, per in _FIELDS[qtype]:
        t = tensors.get(name)
        shape = (16,) if per == 0 else (n, k // per)
        if t is None or t.dtype != dtype or tuple(t.shape) != shape:
            got = "missing" if t is None else f"{t.dtype} {tuple(t.shape)}"
            raise ValueError(
                f"packed {qtype.name} field {name!r} must be {dtype} {shape}, got {got} "
                "(make it with pack())"
            )
        if t.device != device or not t.is_contiguous():
            raise ValueError(
                f"packed field {name!r} must be contiguous on {device}, got "
                f"{'contiguous' if t.is_contiguous() else 'strided'} on {t.device}"
            )


def _check_matmul(
    x: torch.Tensor,
    tensors: dict[str, torch.Tensor],
    qtype: QuantType,
    n: int,
    k: int,
    out: torch.Tensor,
    x_cols: int | None = None,
) -> None:
    _check_geometry(qtype, n, k)
    x_cols = k if x_cols is None else x_cols
    if x.dim() != 2 or x.shape[1] != x_cols or x.dtype not in _X_DTYPES:
        raise ValueError(
            f"x must be float16, bfloat16 or float32 of shape (M, {x_cols}), got {x.dtype} "
            f"{tuple(x.shape)}"
        )
    if x.stride(1) != 1:
        raise ValueError(f"x rows must be contiguous, got strides {x.stride()}")
    if out.dim() != 2 or tuple(out.shape) != (x.shape[0], n) or out.dtype != x.dtype:
        raise ValueError(
            f"out must be {x.dtype} of shape {(x.shape[0], n)}, got {out.dtype} {tuple(out.shape)}"
        )
    if out.stride(1) != 1:
        raise ValueError(f"out rows must be contiguous, got strides {out.stride()}")
    if out.device != x.device:
        raise ValueError(f"x is on {x.device} but out is on {out.device}")
    if not HAS_TRITON or not triton_usable(x.device):
        raise ValueError(
            f"the Triton matmul runs on CUDA tensors (CPU only with TRITON_INTERPRET=1), got "
            f"x on {x.device}"
        )
    _check_tensors(tensors, qtype, n, k, x.device)


@dataclass(frozen=True, slots=True)
class KernelConfig:
    """One launch: GEMV (`nsb` units per K step) or GEMM; K split over `split` programs."""

    gemm: bool
    block_m: int
    block_n: int
    nsb: int = 1  # GEMV only
    split: int = 1
    num_warps: int = 4
    num_stages: int = 1  # GEMM only


def _pow2(v: int) -> int:
    return 1 << max(0, v - 1).bit_length()


@functools.cache
def _num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 1  # interpreter: a one-SM "machine" keeps the grids (CPU time) small
    return torch.cuda.get_device_properties(device).multi_processor_count


def _split(units: int, step: int, programs: int, num_sms: int) -> int:
    """K splits (of whole `step`s of units) until the grid is about two waves of the SMs."""
    return max(1, min(triton.cdiv(units, step), (2 * num_sms) // max(programs, 1)))


def gemv_config(qtype: QuantType, m: int, n: int, k: int, num_sms: int) -> KernelConfig:
    """Up to 2048 weights per row and K step; pieces of ~1024 weights (16 per thread, 8 for
    4-row batches: sm_90 builds stay under ~170 registers without spills), narrowed to 256
    and then split over K until the grid covers two waves of the SMs."""
    unit, lanes = block_size(qtype), _LANES[qtype]
    units = k // unit
    block_m = min(_pow2(m), GEMV_MAX_M)
    measured = block_m == 1 and num_sms > 1  # the H200 sweeps below: one row of x
    if qtype in (QuantType.Q4_K, QuantType.Q6_K) and measured and units >= 8 and n <= 2048:
        # H200 sweeps (tune_decode.py, 1B shapes): the 2048-row matrices (o, down) read 8
        # super-blocks a step on two warps (the same weights per thread as the Q4_K rule
        # below): Q4_K o 4.69 -> 4.43 us, down 12.65 -> 11.68; Q6_K o 5.55 -> 4.98, down
        # 15.97 -> 13.67
        return KernelConfig(False, block_m, 1, 8, 1, 2)
    if qtype == QuantType.Q6_K and measured and 4 <= units < 8 and n <= 2048:
        # SmolLM2's Q6_K ffn_down (576 x 1536, Q4_K_M files): one row on one warp, 4
        # super-blocks a step, 4.32 -> 3.42 us (H200, tune_decode.py, sixteenth session)
        return KernelConfig(False, block_m, 1, 4, 1, 1)
    if qtype == QuantType.Q6_K and measured and n >= 65536 and units >= 4:
        # the vocabulary-sized output of Q4_K_M files: 4 rows x 4 super-blocks on one warp,
        # 155.5 -> 146.7 us at 128256 x 2048 (128 weights a thread)
        return KernelConfig(False, block_m, 4, 4, 1, 1)
    if qtype == QuantType.Q4_K and units >= 4 and num_sms > 1:
        # H100 sweep (benchmarks/kernels/tune_decode.py) at the SmolLM2 / Llama-3.2-1B decode
        # shapes: one row per single-warp program, 4 super-blocks per step, no split: best
        # at every shape, 1.10-1.22x over the rule below
        return KernelConfig(False, block_m, 1, 4, 1, 1)
    per_thread = 16 if block_m <= 2 else 8
    nsb = min(2048 // unit, _pow2(units))
    block_n = max(1, 1024 // (nsb * lanes))
    while triton.cdiv(n, block_n) < 2 * num_sms and block_n > 1 and block_n * nsb * lanes > 256:
        block_n //= 2
    programs = triton.cdiv(n, block_n) * triton.cdiv(m, block_m)
    # latency-bound small weights: no split-K reduction launch (see qmatmul.SMALL_GEMV_BYTES)
    small = n * row_nbytes(qtype, k) <= 4 << 20
    split = 1 if small else _split(units, nsb, programs, num_sms)
    warps = max(1, min(4, block_n * nsb * lanes // (32 * per_thread)))
    return KernelConfig(False, block_m, block_n, nsb, split, warps)


# Measured GEMM tiles: (type name, M bucket, size class) (see `gemm_key`) -> KernelConfig
# fields block_m, block_n, num_warps, num_stages and optionally split (absent: the rule in
# `gemm_config` for the tiles). Filled from `benchmarks/kernels/tune_gemm.py --emit-python`;
# shapes without an entry use the rule.
# Measured by benchmarks/kernels/tune_gemm.py on an H200 (2026-11-26; the comment: the rule's
# geometric-mean time over the entry's across the key's cells). Keys the sweep did not
# cover keep the rule below.
# fmt: off
GEMM_TABLE: dict[tuple[str, int, str], dict[str, int]] = {
    ("Q4_K", 64, "small"): dict(block_m=64, block_n=32, num_warps=4, num_stages=2),  # 1.17x
    ("Q4_K", 256, "small"): dict(block_m=128, block_n=32, num_warps=8, num_stages=1),  # 1.09x
    ("Q6_K", 64, "small"): dict(block_m=64, block_n=32, num_warps=4, num_stages=2),  # 1.20x
    ("Q6_K", 256, "large"): dict(block_m=128, block_n=64, num_warps=8, num_stages=1),  # 1.23x
    ("Q6_K", 256, "small"): dict(block_m=128, block_n=64, num_warps=8, num_stages=1),  # 1.33x
    ("Q6_K", 512, "large"): dict(block_m=128, block_n=64, num_warps=8, num_stages=1),  # 1.20x
    ("Q6_K", 512, "small"): dict(block_m=128, block_n=64, num_warps=8, num_stages=1),  # 1.04x
}
# fmt: on
GEMM_M_BUCKETS = (64, 256, 512)  # the sweep's M: batched decode (64, 256) and prefill (512)
GEMM_SMALL_WEIGHTS = 1 << 21  # N * K up to this: size class "small" (SmolLM2-135M-like)
_GEMM_FIELDS = frozenset({"block_m", "block_n", "split", "num_warps", "num_stages"})


def gemm_key(qtype: QuantType, m: int, n: int, k: int) -> tuple[str, int, str] | None:
    """The GEMM_TABLE key of an (M, K) x (N, K) product: M in (32, 64] -> 64, (64, 256] ->
    256, above -> 512; "small" / "large" weights by N * K. None for M <= 32 (not swept)."""
    if m <= GEMM_M_BUCKETS[0] // 2:
        return None
    bucket = next((b for b in GEMM_M_BUCKETS if m <= b), GEMM_M_BUCKETS[-1])
    return qtype.name, bucket, "small" if n * k <= GEMM_SMALL_WEIGHTS else "large"


def gemm_config(
    qtype: QuantType,
    m: int,
    n: int,
    k: int,
    num_sms: int,
    tiles: dict[str, int] | None = None,
) -> KernelConfig:
    """BLOCK_M follows M up to 128; split-K (whole units) when the tiles cannot fill the SMs.
    Larger tiles run one stage: pipelining the eight pieces' x loads would take 140+ KiB of
    shared memory. A GEMM_TABLE entry for the shape replaces these; `tiles` (the tuner's
    hook: block_m, block_n, split, num_warps, num_stages) replaces both."""
    entry = tiles if tiles is not None else GEMM_TABLE.get(gemm_key(qtype, m, n, k))
    if entry is not None and not entry.keys() <= _GEMM_FIELDS:
        raise ValueError(
            f"GEMM tiles take {sorted(_GEMM_FIELDS)}, got {sorted(entry.keys() - _GEMM_FIELDS)}"
        )
    block_m = 16 if m <= 16 else 32 if m <= 32 else 64 if m <= 64 else 128
    block_n = 128 if block_m == 128 else 64
    warps, stages = (8, 1) if block_m == 128 else (4, 2 if block_m <= 32 else 1)
    if entry is not None:
        block_m, block_n = entry.get("block_m", block_m), entry.get("block_n", block_n)
        warps, stages = entry.get("num_warps", warps), entry.get("num_stages", stages)
    programs = triton.cdiv(m, block_m) * triton.cdiv(n, block_n)
    split = _split(k // block_size(qtype), 1, programs, num_sms)
    if entry is not None and entry.get("split", 0) > 0:
        split = entry["split"]
    return KernelConfig(True, block_m, block_n, 1, split, warps, stages)


# GEMV modes (constexpr MODE; 1 is the GEMM): the prologue computed on x as it is loaded.
_GEMV, _GEMM, _NORM, _SILU, _GELU = range(5)
_ACT_MODES = {"silu": _SILU, "gelu_tanh": _GELU}


def matmul(
    x: torch.Tensor,
    tensors: dict[str, torch.Tensor],
    qtype: QuantType,
    n: int,
    k: int,
    out: torch.Tensor,
    *,
    norm_weight: torch.Tensor | None = None,
    eps: float = 0.0,
    act: str | None = None,
    accumulate: bool = False,
) -> None:
    """out = x @ W^T for the packed (N, K) weight `tensors`; x (M, K) float16/bfloat16/float32,
    out (M, N) of x's dtype; float32 accumulation.

    GEMV only (M <= GEMV_MAX_M), in float32 throughout: norm_weight (K,): x is RMS-normed
    first (eps); act ("silu" / "gelu_tanh"): x is (M, 2K) [gate | up], the input is
    act(gate) * up; accumulate: out += the product (out is the residual stream)."""
    m = x.shape[0]
    fused = norm_weight is not None or act is not None or accumulate
    if fused and m > GEMV_MAX_M:
        raise ValueError(
            f"norm / act / accumulate are fused by the GEMV (M <= {GEMV_MAX_M}), got M={m}"
        )
    cfg_of = gemv_config if m <= GEMV_MAX_M else gemm_config
    k_cols = 2 * k if act is not None else k
    _check_matmul(x, tensors, qtype, n, k, out, k_cols)
    if m == 0 or n == 0:
        return
    cfg = cfg_of(qtype, m, n, k, _num_sms(x.device))
    launch(x, tensors, qtype, n, k, out, cfg, norm_weight=norm_weight, eps=eps, act=act,
           accumulate=accumulate)  # fmt: skip


def launch(
    x: torch.Tensor,
    tensors: dict[str, torch.Tensor],
    qtype: QuantType,
    n: int,
    k: int,
    out: torch.Tensor,
    config: KernelConfig,
    *,
    norm_weight: torch.Tensor | None = None,
    eps: float = 0.0,
    act: str | None = None,
    accumulate: bool = False,
) -> None:
    """`matmul` with an explicit kernel choice and tiles (tests and benchmarks); the fused
    forms need a GEMV config."""
    if act is not None and act not in _ACT_MODES:
        raise ValueError(f"act must be one of {tuple(_ACT_MODES)}, got {act!r}")
    if norm_weight is not None and act is not None:
        raise ValueError("norm_weight and act cannot be fused into one matmul")
    mode = _NORM if norm_weight is not None else _ACT_MODES.get(act, _GEMV)
    if config.gemm and (mode != _GEMV or accumulate):
        raise ValueError("norm / act / accumulate are fused by the GEMV only (a GEMM config)")
    _check_matmul(x, tensors, qtype, n, k, out, 2 * k if act is not None else k)
    if norm_weight is not None:
        if (
            norm_weight.shape != (k,)
            or not norm_weight.is_floating_point()
            or norm_weight.device != x.device
            or not norm_weight.is_contiguous()
        ):
            raise ValueError(
                f"norm_weight must be a contiguous float ({k},) tensor on {x.device}, got "
                f"{norm_weight.dtype} {tuple(norm_weight.shape)} on {norm_weight.device}"
            )
        if not eps >= 0:
            raise ValueError(f"eps must be >= 0, got {eps}")
    m = x.shape[0]
    if m == 0 or n == 0:
        return
    cfg = config
    pdl_on = not cfg.gemm and pdl.pdl_enabled(x.device, n * row_nbytes(qtype, k))
    trigger = not cfg.gemm and pdl.trigger_enabled(x.device, k)
    units, unit = k // block_size(qtype), block_size(qtype)
    step = cfg.nsb if not cfg.gemm else 1
    per_split = triton.cdiv(triton.cdiv(units, step), cfg.split) * step  # units per split
    split = triton.cdiv(units, per_split)  # no empty splits
    # split > 1: float32 partials (split, M, N), summed in order by _reduce_kernel
    dest = out if split == 1 else torch.empty(split, m, n, dtype=torch.float32, device=x.device)
    ptrs = [tensors[name] for name, _, _ in _FIELDS[qtype]]
    strides = [t.stride(0) if t.dim() == 2 else 0 for t in ptrs]
    ptrs += [ptrs[0]] * (6 - len(ptrs))  # unused pointer slots alias the quants (never read)
    strides += [0] * (6 - len(strides))
    dest_stride_m = dest.stride(0) if split == 1 else n
    args = (x, dest, *ptrs, *strides, m, n, units, x.stride(0), dest_stride_m, m * n, per_split)
    consts = dict(
        QTYPE=int(qtype),
        UNIT=unit,
        L=_LANES[qtype],
        BM=cfg.block_m,
        BN=cfg.block_n,
        INTERP=INTERPRET,
    )
    if cfg.gemm:
        grid = (triton.cdiv(m, cfg.block_m) * triton.cdiv(n, cfg.block_n), split)
        _gemm_kernel[grid](*args, **consts, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    else:
        grid = (triton.cdiv(n, cfg.block_n), triton.cdiv(m, cfg.block_m), split)
        g = norm_weight if norm_weight is not None else x  # never read without the norm
        # the split's share of the first two fields' rows goes to L2 before the PDL wait
        widths = [_unit_width(f, unit) for f in _FIELDS[qtype][:2]]
        sizes = [t.element_size() for t in ptrs[:2]]
        lines = [
            pdl.prefetch_lines(per_split * w * e) if pdl_on else 0
            for w, e in zip(widths, sizes, strict=True)
        ]
        _gemv_kernel[grid](
            *args, g, float(eps), **consts, NSB=cfg.nsb, MODE=mode,
            HAS_RES=accumulate and split == 1, AW=widths[0], BW=widths[1], PA=lines[0],
            PB=lines[1], **pdl.launch_options(pdl_on, trigger), num_warps=cfg.num_warps,
        )  # fmt: skip
    if split > 1:
        block = 1024
        _reduce_kernel[(triton.cdiv(m * n, block),)](
            dest, out, m, n, out.stride(0), SPLIT=split, HAS_RES=accumulate, BLOCK=block,
            INTERP=INTERPRET, **pdl.launch_options(pdl_on, trigger), num_warps=4,
        )  # fmt: skip


def _unit_width(field: tuple[str, torch.dtype, int], unit: int) -> int:
    """Elements of a `_FIELDS` entry per unit (super-block) of weights; 0 for a shared table."""
    weights_per_element = field[2]
    return unit // weights_per_element if weights_per_element else 0


def dequantize_rows(
    tensors: dict[str, torch.Tensor], qtype: QuantType, k: int, first: int, out: torch.Tensor
) -> None:
    """Rows first .. first + len(out) of the packed (N, K) weight, dequantized into out
    (rows, K) (float16 / bfloat16 / float32), rounded once from ggml's float32 values."""
    rows = out.shape[0]
    if out.shape[1] != k or not out.is_contiguous():
        raise ValueError(f"out must be a contiguous (rows, {k}) tensor, got {tuple(out.shape)}")
    if rows == 0:
        return
    ptrs = [tensors[name] for name, _, _ in _FIELDS[qtype]]
    strides = [t.stride(0) if t.dim() == 2 else 0 for t in ptrs]
    ptrs += [ptrs[0]] * (6 - len(ptrs))
    strides += [0] * (6 - len(strides))
    units, unit = k // block_size(qtype), block_size(qtype)
    bn = 32
    _dequant_kernel[(triton.cdiv(rows, bn), units)](
        out, *ptrs, *strides, first, first + rows, units, k, QTYPE=int(qtype), UNIT=unit,
        L=_LANES[qtype], BN=bn, INTERP=INTERPRET, num_warps=4,
    )  # fmt: skip


# --------------------------------------------------------------------------- kernels
#
# Shared argument names: p, the packed arrays' pointers (in `_FIELDS` order) at the weight
# rows, (BN, 1, 1) each; u the units (GEMV (1, NSB, 1), GEMM a scalar); lane (1, 1, L); wm the
# weight mask; xp, xm the x pointers and mask at the unit's first weight (see `_consume`).

if HAS_TRITON:
    _Q2_K = tl.constexpr(int(QuantType.Q2_K))
    _Q3_K = tl.constexpr(int(QuantType.Q3_K))
    _Q4_K = tl.constexpr(int(QuantType.Q4_K))
    _Q5_K = tl.constexpr(int(QuantType.Q5_K))
    _Q6_K = tl.constexpr(int(QuantType.Q6_K))
    _IQ4_NL = tl.constexpr(int(QuantType.IQ4_NL))

    @triton.jit
    def _u2f(q):
        """Small non-negative integers -> float32, exactly: the bits of 2**23 + q, minus 2**23
        (an OR and an FADD instead of the slower I2F conversion)."""
        return (q.to(tl.int32) | 0x4B000000).to(tl.float32, bitcast=True) - 8388608.0

    # float32 -> dtype, rounded to nearest even (one definition: rounding.py)
    _round_to = rounding.round_to

    @triton.jit
    def _gated(g, u, SILU: tl.constexpr):
        """act(g) * u in float32, as kernels/triton/activation.py computes it: SiLU, else
        GELU-tanh (also the legacy GEMV's activation prologue, kernels/triton/qmatmul.py)."""
        if SILU:  # silu(g) = g * sigmoid(g)
            a = g * tl.sigmoid(g)
        else:  # gelu_tanh(g) = g * sigmoid(2z)
            z = _SQRT_2_OVER_PI * (g + 0.044715 * g * g * g)
            a = g * tl.sigmoid(2.0 * z)
        return a * u

    @triton.jit
    def _consume(acc, w, xp, xm, koff, MODE: tl.constexpr, INTERP: tl.constexpr):
        """acc += w times x at weights koff.. of the unit.

        GEMV: w (BN, NSB, L), xp (x pointers (BM, 1, NSB, L), y pointers), acc (BM, BN, NSB, L)
        float32 products; MODE 2: x * g (g at the y pointers), 3 / 4: act(x) * y (y: up).
        GEMM (MODE 1): w (BN, 1, L), xp (x pointers (BM, L), unused), acc (BM, BN) float32
        from `tl.dot`. MODE 5 (`_dequant_kernel`): w is stored, rounded, at the output
        pointers xp[0] + koff (BN, 1, L) under the mask xm; acc passes through.
        """
        if MODE == 5:  # dequantize only: w (BN, 1, L) stored at xp[0] + koff
            tl.store(xp[0] + koff, _round_to(w, xp[0].dtype.element_ty, INTERP), mask=xm)
        else:
            xv = tl.load(xp[0] + koff, mask=xm, other=0.0)
            if MODE == 1:
                wt = tl.trans(tl.reshape(w, (w.shape[0], w.shape[2])))  # (L, BN)
                if xv.dtype != tl.float32:
                    wt = _round_to(wt, xv.dtype, INTERP)
                if INTERP:  # the interpreter's bf16 dot multiplies raw bits: go through float32
                    acc = tl.dot(xv.to(tl.float32), wt.to(tl.float32), acc, input_precision="ieee")
                else:  # float32 operands run in TF32 (Triton's default)
                    acc = tl.dot(xv, wt, acc)
            else:
                xv = xv.to(tl.float32)
                if MODE == 2:
                    xv = xv * tl.load(xp[1] + koff, mask=xm, other=0.0).to(tl.float32)
                elif MODE >= 3:
                    up = tl.load(xp[1] + koff, mask=xm, other=0.0).to(tl.float32)
                    xv = _gated(xv, up, MODE == 3)
                acc += w[None, :, :, :] * xv
        return acc

    @triton.jit
    def _q2_k(acc, p, u, lane, wm, xp, xm, MODE: tl.constexpr, INTERP: tl.constexpr):
        """dequantize_row_q2_K: qs run h, shift 2j -> weights 128h + 32j + l, sub-block of 16
        8h + 2j + l // 16: (d * (sc & 15)) * q - dmin * (sc >> 4). Fields qs, sc, d, dmin."""
        d = tl.load(p[2] + u, mask=wm, other=0).to(tl.float32)
        dmin = tl.load(p[3] + u, mask=wm, other=0).to(tl.float32)
        for h in tl.static_range(2):
            b = tl.load(p[0] + u * 64 + 32 * h + lane, mask=wm, other=0)
            for j in tl.static_range(4):
                s0 = tl.load(p[1] + u * 16 + 8 * h + 2 * j, mask=wm, other=0)
                s1 = tl.load(p[1] + u * 16 + 8 * h + 2 * j + 1, mask=wm, other=0)
                dl = tl.where(lane < 16, d * (s0 & 15).to(tl.float32), d * (s1 & 15).to(tl.float32))
                ml = tl.where(
                    lane < 16, dmin * (s0 >> 4).to(tl.float32), dmin * (s1 >> 4).to(tl.float32)
                )
                w = dl * _u2f((b >> (2 * j)) & 3) - ml
                acc = _consume(acc, w, xp, xm, 128 * h + 32 * j, MODE, INTERP)
        return acc

    @triton.jit
    def _q3_k(acc, p, u, lane, wm, xp, xm, MODE: tl.constexpr, INTERP: tl.constexpr):
        """dequantize_row_q3_K: as Q2_K, plus hmask bit 4h + j of byte l (clear: minus 4);
        (d * (sc - 32)) * q. Fields qs, hmask, sc (minus 32), d."""
        d = tl.load(p[3] + u, mask=wm, other=0).to(tl.float32)
        hm = tl.load(p[1] + u * 32 + lane, mask=wm, other=0)
        for h in tl.static_range(2):
            b = tl.load(p[0] + u * 64 + 32 * h + lane, mask=wm, other=0)
            for j in tl.static_range(4):
                s0 = tl.load(p[2] + u * 16 + 8 * h + 2 * j, mask=wm, other=0).to(tl.float32)
                s1 = tl.load(p[2] + u * 16 + 8 * h + 2 * j + 1, mask=wm, other=0).to(tl.float32)
                q = ((b >> (2 * j)) & 3) | (((hm >> (4 * h + j)) & 1) << 2)
                w = tl.where(lane < 16, d * s0, d * s1) * (_u2f(q) - 4.0)
                acc = _consume(acc, w, xp, xm, 128 * h + 32 * j, MODE, INTERP)
        return acc

    @triton.jit
    def _q45_k(acc, p, u, lane, wm, xp, xm, HAS_QH: tl.constexpr,
               MODE: tl.constexpr, INTERP: tl.constexpr):  # fmt: skip
        """dequantize_row_q4_K / q5_K: qs run c, nibble h -> sub-block t = 2c + h of 32;
        (d * sc) * q - dmin * m; Q5_K's fifth bit is bit t of qh byte l. Fields qs, [qh,]
        sc, mn, d, dmin."""
        F: tl.constexpr = 1 if HAS_QH else 0  # field offset past qh
        d = tl.load(p[F + 3] + u, mask=wm, other=0).to(tl.float32)
        dmin = tl.load(p[F + 4] + u, mask=wm, other=0).to(tl.float32)
        if HAS_QH:
            hb = tl.load(p[1] + u * 32 + lane, mask=wm, other=0)
        for c in tl.static_range(4):
            b = tl.load(p[0] + u * 128 + 32 * c + lane, mask=wm, other=0)
            for h in tl.static_range(2):
                t = 2 * c + h
                dl = d * tl.load(p[F + 1] + u * 8 + t, mask=wm, other=0).to(tl.float32)
                ml = dmin * tl.load(p[F + 2] + u * 8 + t, mask=wm, other=0).to(tl.float32)
                q = (b >> (4 * h)) & 15
                if HAS_QH:
                    q = q | (((hb >> t) & 1) << 4)
                acc = _consume(acc, dl * _u2f(q) - ml, xp, xm, 32 * t, MODE, INTERP)
        return acc

    @triton.jit
    def _q6_k(acc, p, u, lane, wm, xp, xm, MODE: tl.constexpr, INTERP: tl.constexpr):
        """dequantize_row_q6_K: half h, piece r -> weights 128h + 32r + l: ql run 64h + 32 (r % 2)
        nibble r // 2, qh bits 2r of byte 32h + l; (d * sc) * (q - 32). Fields ql, qh, sc, d."""
        d = tl.load(p[3] + u, mask=wm, other=0).to(tl.float32)
        for h in tl.static_range(2):
            hq = tl.load(p[1] + u * 64 + 32 * h + lane, mask=wm, other=0)
            for run in tl.static_range(2):
                b = tl.load(p[0] + u * 128 + 64 * h + 32 * run + lane, mask=wm, other=0)
                for nib in tl.static_range(2):
                    r = 2 * nib + run
                    s0 = tl.load(p[2] + u * 16 + 8 * h + 2 * r, mask=wm, other=0).to(tl.float32)
                    s1 = tl.load(p[2] + u * 16 + 8 * h + 2 * r + 1, mask=wm, other=0)
                    q = ((b >> (4 * nib)) & 15) | (((hq >> (2 * r)) & 3) << 4)
                    w = tl.where(lane < 16, d * s0, d * s1.to(tl.float32)) * (_u2f(q) - 32.0)
                    acc = _consume(acc, w, xp, xm, 128 * h + 32 * r, MODE, INTERP)
        return acc

    @triton.jit
    def _iq4(acc, p, u, lane, wm, xp, xm, XS: tl.constexpr, MODE: tl.constexpr,
             INTERP: tl.constexpr):  # fmt: skip
        """dequantize_row_iq4_nl / iq4_xs: 16-byte runs j; low nibbles are weights 32j + l,
        high ones 32j + 16 + l; dl * kvalues_iq4nl[q], dl = d (IQ4_NL, one run per unit) or
        d * (ls - 32) (IQ4_XS, 8 runs). Fields qs, [sc,] d, kvalues."""
        F: tl.constexpr = 1 if XS else 0  # field offset past sc
        d = tl.load(p[F + 1] + u, mask=wm, other=0).to(tl.float32)
        kv = p[F + 2]
        for j in tl.static_range(8 if XS else 1):
            dl = d
            if XS:
                dl = d * tl.load(p[1] + u * 8 + j, mask=wm, other=0).to(tl.float32)
            b = tl.load(p[0] + u * (128 if XS else 16) + 16 * j + lane, mask=wm, other=0)
            acc = _consume(
                acc, dl * tl.load(kv + (b & 15).to(tl.int32)), xp, xm, 32 * j, MODE, INTERP
            )
            acc = _consume(
                acc, dl * tl.load(kv + (b >> 4).to(tl.int32)), xp, xm, 32 * j + 16, MODE, INTERP
            )
        return acc

    @triton.jit
    def _unit(acc, p, u, lane, wm, xp, xm, QTYPE: tl.constexpr, MODE: tl.constexpr,
              INTERP: tl.constexpr):  # fmt: skip
        """acc += units u of the weight rows `p` points at, times x."""
        args = (p, u, lane, wm, xp, xm)
        if QTYPE == _Q2_K:
            acc = _q2_k(acc, *args, MODE, INTERP)
        elif QTYPE == _Q3_K:
            acc = _q3_k(acc, *args, MODE, INTERP)
        elif QTYPE == _Q4_K or QTYPE == _Q5_K:  # noqa: PLR1714, SIM109 (`in`: not in Triton)
            acc = _q45_k(acc, *args, QTYPE == _Q5_K, MODE, INTERP)
        elif QTYPE == _Q6_K:
            acc = _q6_k(acc, *args, MODE, INTERP)
        else:
            acc = _iq4(acc, *args, QTYPE != _IQ4_NL, MODE, INTERP)
        return acc

    @triton.jit
    def _rows(A, B, C, D, E, F, sA, sB, sC, sD, sE, sF, row):
        """The packed arrays' pointers at the weight rows `row` (BN, 1, 1)."""
        return (A + row * sA, B + row * sB, C + row * sC, D + row * sD, E + row * sE, F + row * sF)

    @triton.jit
    def _gemv_step(acc, p, u0, u_hi, wm_rows, x_rows, m_ok, g_ptr, K, QTYPE: tl.constexpr,
                   UNIT: tl.constexpr, L: tl.constexpr, NSB: tl.constexpr,
                   MODE: tl.constexpr, INTERP: tl.constexpr):  # fmt: skip
        """acc (BM, BN, NSB, L) += units u0 .. u0 + NSB (those below u_hi) of W times x."""
        u = u0 + tl.arange(0, NSB)[None, :, None]  # (1, NSB, 1)
        u_ok = u < u_hi
        lane = tl.arange(0, L)[None, None, :]
        offs = (u * UNIT + lane)[None, :, :, :]  # (1, 1, NSB, L)
        xp = x_rows + offs  # (BM, 1, NSB, L)
        if MODE == 2:
            yp = g_ptr + offs  # the norm weight
        elif MODE >= 3:
            yp = xp + K  # up, K past gate
        else:
            yp = xp  # never read
        xm = m_ok & u_ok[None, :, :, :]
        return _unit(acc, p, u, lane, wm_rows & u_ok, (xp, yp), xm, QTYPE, MODE, INTERP)

    @triton.jit
    def _inv_rms(x_ptr, ms, M, stride_xm, K, eps, BM: tl.constexpr, CHUNK: tl.constexpr,
                 INTERP: tl.constexpr):  # fmt: skip
        """1 / sqrt(mean(x[m, :K]^2) + eps) for the rows ms (BM,) -> (BM,) float32. Each
        program reads the whole rows (a few KiB, L2-resident) rather than a norm kernel."""
        rows = x_ptr + ms.to(tl.int64)[:, None] * stride_xm
        row_ok = (ms < M)[:, None]
        cols = tl.arange(0, CHUNK)[None, :]
        ss = tl.zeros((BM, CHUNK), tl.float32)
        if INTERP:  # see _gemv_kernel
            c0 = 0
            while c0 < K:
                v = tl.load(rows + c0 + cols, mask=row_ok & (c0 + cols < K), other=0.0)
                ss += v.to(tl.float32) * v.to(tl.float32)
                c0 += CHUNK
        else:
            for c0 in range(0, K, CHUNK):
                v = tl.load(rows + c0 + cols, mask=row_ok & (c0 + cols < K), other=0.0)
                ss += v.to(tl.float32) * v.to(tl.float32)
        return tl.rsqrt(tl.sum(ss, axis=1) / K + eps)

    @triton.jit
    def _gemv_kernel(x_ptr, out_ptr, A, B, C, D, E, F, sA, sB, sC, sD, sE, sF,
                     M, N, U, stride_xm, stride_om, stride_os, per_split, g_ptr, eps,
                     QTYPE: tl.constexpr, UNIT: tl.constexpr, L: tl.constexpr,
                     BM: tl.constexpr, BN: tl.constexpr, NSB: tl.constexpr,
                     MODE: tl.constexpr, HAS_RES: tl.constexpr,
                     INTERP: tl.constexpr, AW: tl.constexpr, BW: tl.constexpr,
                     PA: tl.constexpr, PB: tl.constexpr, PDL: tl.constexpr):  # fmt: skip
        """out[split, m, n] = x[m] . W[n] over the split's units; grid (N/BN, M/BM, splits).
        MODE: the prologue on x (see `_consume`; 2: RMSNorm, its 1/rms applied to the sums);
        HAS_RES: out += the result (no split). PDL: PA / PB lines of the split's share of the
        rows of fields A / B (AW / BW elements a unit) go to L2 before the wait."""
        pid_n, pid_m, pid_s = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        rows = pid_n * BN + tl.arange(0, BN)
        row = rows.to(tl.int64)[:, None, None]  # (BN, 1, 1)
        p = _rows(A, B, C, D, E, F, sA, sB, sC, sD, sE, sF, row)
        ms = pid_m * BM + tl.arange(0, BM)
        x_rows = x_ptr + ms.to(tl.int64)[:, None, None, None] * stride_xm  # (BM, 1, 1, 1)
        m_ok = (ms < M)[:, None, None, None]
        u_lo = pid_s * per_split
        u_hi = tl.minimum(u_lo + per_split, U)
        if PDL:
            r64 = rows.to(tl.int64)
            pdl.prefetch_rows(A, r64, rows < N, sA, u_lo * AW, u_hi * AW, PA)
            pdl.prefetch_rows(B, r64, rows < N, sB, u_lo * BW, u_hi * BW, PB)
        pdl.wait(PDL)
        pdl.launch_dependents(PDL)
        acc = tl.zeros((BM, BN, NSB, L), dtype=tl.float32)
        if INTERP:  # numpy >= 2.4 cannot make the interpreter's scalars `range` bounds
            u0 = u_lo
            while u0 < u_hi:
                acc = _gemv_step(acc, p, u0, u_hi, row < N, x_rows, m_ok, g_ptr, U * UNIT,
                                 QTYPE, UNIT, L, NSB, MODE, INTERP)  # fmt: skip
                u0 += NSB
        else:
            for u0 in range(u_lo, u_hi, NSB):
                acc = _gemv_step(acc, p, u0, u_hi, row < N, x_rows, m_ok, g_ptr, U * UNIT,
                                 QTYPE, UNIT, L, NSB, MODE, INTERP)  # fmt: skip
        res = tl.sum(tl.sum(acc, axis=3), axis=2)  # (BM, BN)
        if MODE == 2:  # sum_k W x g / rms(x): linear, so split partials take the scale too
            res = res * _inv_rms(x_ptr, ms, M, stride_xm, U * UNIT, eps, BM, 256, INTERP)[:, None]
        out_ptrs = out_ptr + pid_s * stride_os + ms[:, None] * stride_om + rows[None, :]
        mask = (ms[:, None] < M) & (rows[None, :] < N)
        if HAS_RES:  # out is the residual stream: added once, here (no split)
            res += tl.load(out_ptrs, mask=mask, other=0.0).to(tl.float32)
        tl.store(out_ptrs, _round_to(res, out_ptr.dtype.element_ty, INTERP), mask=mask)

    @triton.jit
    def _gemm_kernel(x_ptr, out_ptr, A, B, C, D, E, F, sA, sB, sC, sD, sE, sF,
                     M, N, U, stride_xm, stride_om, stride_os, per_split,
                     QTYPE: tl.constexpr, UNIT: tl.constexpr, L: tl.constexpr,
                     BM: tl.constexpr, BN: tl.constexpr, INTERP: tl.constexpr):  # fmt: skip
        """As `_gemv_kernel` with (BM, BN) tiles from `tl.dot`; grid (tiles, splits), the
        M-tiles of an N-tile adjacent so that they share its weights in L2."""
        pid, pid_s = tl.program_id(0), tl.program_id(1)
        num_m = tl.cdiv(M, BM)
        pid_m, pid_n = pid % num_m, pid // num_m
        rows = pid_n * BN + tl.arange(0, BN)
        row = rows.to(tl.int64)[:, None, None]  # (BN, 1, 1)
        p = _rows(A, B, C, D, E, F, sA, sB, sC, sD, sE, sF, row)
        ms = pid_m * BM + tl.arange(0, BM)
        lane = tl.arange(0, L)
        x_rows = x_ptr + ms.to(tl.int64)[:, None] * stride_xm + lane[None, :]  # (BM, L)
        xm = (ms < M)[:, None]
        wm = row < N
        lane = lane[None, None, :]
        u_lo = pid_s * per_split
        u_hi = tl.minimum(u_lo + per_split, U)
        acc = tl.zeros((BM, BN), dtype=tl.float32)
        if INTERP:  # see _gemv_kernel
            u = u_lo
            while u < u_hi:
                acc = _unit(acc, p, u, lane, wm, (x_rows + u * UNIT, x_rows), xm, QTYPE, 1, INTERP)
                u += 1
        else:
            for u in range(u_lo, u_hi):
                acc = _unit(acc, p, u, lane, wm, (x_rows + u * UNIT, x_rows), xm, QTYPE, 1, INTERP)
        out_ptrs = out_ptr + pid_s * stride_os + ms[:, None] * stride_om + rows[None, :]
        mask = (ms[:, None] < M) & (rows[None, :] < N)
        tl.store(out_ptrs, _round_to(acc, out_ptr.dtype.element_ty, INTERP), mask=mask)

    @triton.jit
    def _dequant_kernel(out_ptr, A, B, C, D, E, F, sA, sB, sC, sD, sE, sF,
                        row0, row_end, U, K, QTYPE: tl.constexpr, UNIT: tl.constexpr,
                        L: tl.constexpr, BN: tl.constexpr, INTERP: tl.constexpr):  # fmt: skip
        """Rows [row0, row_end) of W, one unit of BN rows per program, dequantized as the
        GEMM's pieces and rounded to out's dtype: out[row - row0, :]."""
        pid_n, u = tl.program_id(0), tl.program_id(1)
        rows = row0 + pid_n * BN + tl.arange(0, BN)
        row = rows.to(tl.int64)[:, None, None]  # (BN, 1, 1)
        p = _rows(A, B, C, D, E, F, sA, sB, sC, sD, sE, sF, row)
        lane = tl.arange(0, L)[None, None, :]
        wm = (row < row_end) & (u < U)
        o = out_ptr + (row - row0) * K + u * UNIT + lane  # (BN, 1, L)
        _unit(tl.zeros((1, 1), tl.float32), p, u, lane, wm, (o, o), wm, QTYPE, 5, INTERP)

    @triton.jit
    def _reduce_kernel(ws_ptr, out_ptr, M, N, stride_om, SPLIT: tl.constexpr,
                       HAS_RES: tl.constexpr, BLOCK: tl.constexpr,
                       INTERP: tl.constexpr, PDL: tl.constexpr):  # fmt: skip
        """out[m, n] = the sum of the float32 partials ws[s, m, n], in order s = 0, 1, ...
        (HAS_RES: plus out[m, n], the residual stream, added once, here)."""
        pdl.wait(PDL)
        pdl.launch_dependents(PDL)
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < M * N
        acc = tl.zeros((BLOCK,), dtype=tl.float32)
        for i in tl.static_range(SPLIT):
            acc += tl.load(ws_ptr + i * M * N + offs, mask=mask, other=0.0)
        out_ptrs = out_ptr + (offs // N) * stride_om + offs % N
        if HAS_RES:
            acc += tl.load(out_ptrs, mask=mask, other=0.0).to(tl.float32)
        tl.store(out_ptrs, _round_to(acc, out_ptr.dtype.element_ty, INTERP), mask=mask)
