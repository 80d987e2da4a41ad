"""Embedding lookup from raw ggml blocks: rows `ids` of a quantized (vocab, dim) table,
dequantized in one launch (the torch path gathers the rows, then takes ~10 elementwise
launches to unpack them). Legacy block types, Q4_K, Q6_K and float tables; bit-identical to
`quant.dequant.dequantize` (float32 products and sums as ggml's dequantize_row_*, no FMA
contraction), times an optional float32 scale (Gemma's sqrt(d)).
"""

from __future__ import annotations

import torch

from llamapy.kernels.triton import HAS_TRITON, pdl
from llamapy.kernels.triton.norm import check_device
from llamapy.quant.dequant import dequantize
from llamapy.quant.types import QuantType, block_size, type_size

if HAS_TRITON:
    import triton
    import triton.language as tl

# type -> the kernel's QT code (the float types read the table as their own dtype)
_CODES = {
    QuantType.Q4_0: 0,
    QuantType.Q4_1: 1,
    QuantType.Q5_0: 2,
    QuantType.Q5_1: 3,
    QuantType.Q8_0: 4,
    QuantType.F16: 5,
    QuantType.BF16: 6,
    QuantType.F32: 7,
    QuantType.Q4_K: 8,
    QuantType.Q6_K: 9,
}
_FLOAT_VIEWS = {
    QuantType.F16: torch.float16,
    QuantType.BF16: torch.bfloat16,
    QuantType.F32: torch.float32,
}
SUPPORTED = frozenset(_CODES)
BLOCK = 1024  # elements of a row per program


def embedding_rows_reference(
    data: torch.Tensor, qtype: QuantType, ids: torch.Tensor, scale: float | None = None
) -> torch.Tensor:
    """data (V, row_bytes) uint8 blocks, ids (n,) -> (n, dim) float32 rows (times scale)."""
    x = dequantize(data[ids], qtype, torch.float32)
    return x * scale if scale is not None else x


def embedding_rows(
    data: torch.Tensor, qtype: QuantType, ids: torch.Tensor, scale: float | None = None
) -> torch.Tensor:
    """`embedding_rows_reference` in one launch; ids must be in [0, V) (unchecked on the
    device, as torch's index on CUDA reports it only asynchronously)."""
    check_device("embedding_rows", data, ids)
    if qtype not in SUPPORTED:
        names = ", ".join(sorted(t.name for t in SUPPORTED))
        raise ValueError(f"embedding_rows: no kernel for {qtype.name} (types: {names})")
    if data.dtype != torch.uint8 or data.dim() != 2 or not data.is_contiguous():
        raise ValueError(
            f"embedding_rows: data must be contiguous (V, row_bytes) uint8, got "
            f"{tuple(data.shape)} {data.dtype}"
        )
    ts, bs = type_size(qtype), block_size(qtype)
    if data.shape[1] % ts:
        raise ValueError(
            f"embedding_rows: {data.shape[1]} bytes a row is not a whole number of "
            f"{qtype.name} blocks"
        )
    if ids.dim() != 1 or ids.dtype not in (torch.int32, torch.int64) or not ids.is_contiguous():
        raise ValueError(
            f"embedding_rows: ids must be a contiguous 1-D int32 or int64 tensor, got "
            f"{tuple(ids.shape)} {ids.dtype}"
        )
    dim = data.shape[1] // ts * bs
    out = torch.empty(ids.shape[0], dim, dtype=torch.float32, device=data.device)
    if ids.numel() == 0 or dim == 0:
        return out
    table = data.view(_FLOAT_VIEWS[qtype]) if qtype in _FLOAT_VIEWS else data
    _embedding_kernel[(ids.shape[0], triton.cdiv(dim, BLOCK))](
        table, ids, out, table.shape[1], dim, float(scale if scale is not None else 1.0),
        QT=_CODES[qtype], TS=ts, BS=bs, HAS_SCALE=scale is not None, BLOCK=BLOCK,
        **pdl.launch_options(pdl.pdl_enabled(data.device)), num_warps=4,
        enable_fp_fusion=False,  # d * q + m rounds twice, as ggml's dequantize_row_*
    )  # fmt: skip
    return out


if HAS_TRITON:

    @triton.jit
    def _fp16_at(ptr, mask):
        """The little-endian fp16 at byte pointers `ptr` -> float32."""
        lo = tl.load(ptr, mask=mask, other=0).to(tl.uint16)
        hi = tl.load(ptr + 1, mask=mask, other=0).to(tl.uint16)
        return (lo | (hi << 8)).to(tl.float16, bitcast=True).to(tl.float32)

    @triton.jit
    def _embedding_kernel(
        data_ptr, ids_ptr, out_ptr, row_len, dim, scale,
        QT: tl.constexpr, TS: tl.constexpr, BS: tl.constexpr, HAS_SCALE: tl.constexpr,
        BLOCK: tl.constexpr, PDL: tl.constexpr,
    ):  # fmt: skip
        """out[r, k] for k in this program's BLOCK of row r: element k of table row ids[r]
        (row_len: the table's row length in its own elements, bytes for the block types)."""
        pdl.wait(PDL)
        pdl.launch_dependents(PDL)
        r = tl.program_id(0)
        k = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        ok = k < dim
        row = data_ptr + tl.load(ids_ptr + r).to(tl.int64) * row_len
        if QT >= 5 and QT <= 7:  # float tables
            x = tl.load(row + k, mask=ok, other=0.0).to(tl.float32)
        elif QT == 8:  # Q4_K {fp16 d, dmin; u8 scales[12]; u8 qs[128]}: (d sc) q - dmin m
            e = k % 256
            base = row + (k // 256) * TS
            j = e // 32  # sub-block: its 6-bit scale and min (get_scale_min_k4)
            i = j % 4
            s0 = tl.load(base + 4 + i, mask=ok, other=0).to(tl.int32)  # scales[j % 4]
            s4 = tl.load(base + 8 + i, mask=ok, other=0).to(tl.int32)  # scales[4 + j % 4]
            s8 = tl.load(base + 12 + i, mask=ok, other=0).to(tl.int32)  # scales[8 + j % 4]
            sc = tl.where(j < 4, s0 & 63, (s8 & 0xF) | ((s0 >> 6) << 4))
            mn = tl.where(j < 4, s4 & 63, (s8 >> 4) | ((s4 >> 6) << 4))
            byte = tl.load(base + 16 + 32 * (e // 64) + e % 32, mask=ok, other=0).to(tl.int32)
            q = tl.where(e % 64 < 32, byte & 0xF, byte >> 4)
            dl = _fp16_at(base, ok) * sc.to(tl.float32)
            ml = _fp16_at(base + 2, ok) * mn.to(tl.float32)
            x = dl * q.to(tl.float32) - ml
        elif QT == 9:  # Q6_K {u8 ql[128]; u8 qh[64]; i8 scales[16]; fp16 d}: (d sc) (q - 32)
            e = k % 256
            base = row + (k // 256) * TS
            h = e // 128
            w = e % 128  # within the 128-weight half
            lo = tl.load(base + 64 * h + w % 64, mask=ok, other=0).to(tl.int32)
            lo = tl.where(w < 64, lo & 0xF, lo >> 4)
            hi = tl.load(base + 128 + 32 * h + w % 32, mask=ok, other=0).to(tl.int32)
            hi = (hi >> (2 * (w // 32))) & 3
            sc = tl.load(base + 192 + e // 16, mask=ok, other=0).to(tl.int8, bitcast=True)
            dl = _fp16_at(base + 208, ok) * sc.to(tl.float32)
            x = dl * ((lo | (hi << 4)) - 32).to(tl.float32)
        else:
            j = k % 32
            base = row + (k // 32) * TS  # each element's block
            d = _fp16_at(base, ok)
            if QT == 4:  # Q8_0 {d; i8 qs[32]}: x = q * d
                q = tl.load(base + 2 + j, mask=ok, other=0).to(tl.int8, bitcast=True)
                x = q.to(tl.float32) * d
            else:
                qs_at: tl.constexpr = 2 if QT == 0 else 4 if QT == 1 else 6 if QT == 2 else 8
                byte = tl.load(base + qs_at + j % 16, mask=ok, other=0).to(tl.int32)
                q = tl.where(j < 16, byte & 0xF, byte >> 4)
                if QT == 2 or QT == 3:  # fifth bit of weight j: bit j of the u32 qh
                    qh_at: tl.constexpr = 2 if QT == 2 else 4
                    qh_byte = tl.load(base + qh_at + j // 8, mask=ok, other=0).to(tl.int32)
                    q = q | (((qh_byte >> (j % 8)) & 1) << 4)
                if QT == 0:  # x = d * (q - 8)
                    x = d * (q - 8).to(tl.float32)
                elif QT == 2:  # x = d * (q - 16)
                    x = d * (q - 16).to(tl.float32)
                else:  # x = d * q + m
                    x = d * q.to(tl.float32) + _fp16_at(base + 2, ok)
        if HAS_SCALE:
            x = x * scale
        tl.store(out_ptr + r.to(tl.int64) * dim + k, x, mask=ok)


__all__ = ["SUPPORTED", "embedding_rows", "embedding_rows_reference"]
