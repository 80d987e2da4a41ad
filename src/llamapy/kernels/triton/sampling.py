"""The decode step's greedy pick and its input ids, on the device in few launches.

`greedy_pick`: the argmax of each row of logits after banning the end-of-generation ids in
the rows that ask for it (`ignore_eos`), in two launches (per-chunk maxima, then the first
chunk holding the row's maximum) where torch took ~10 (a float32 copy, the ban's index /
masked_fill / index_put, two reductions and a gather). `decode_ids`: row r's input id is the
previous step's pick in row src[r] where src[r] >= 0, else ids[r] (async scheduling), one
launch where torch took four. Their torch references (the oracle and the CPU path) are in
sampling/greedy.py, which the CPU path imports without triton.
"""

from __future__ import annotations

import torch

from llamapy.kernels.triton import HAS_TRITON, pdl
from llamapy.kernels.triton.norm import FLOAT_DTYPES, check_device
from llamapy.sampling.greedy import decode_ids_reference, greedy_pick_reference

if HAS_TRITON:
    import triton
    import triton.language as tl

ARGMAX_CHUNK = 4096  # logits per program of the first pass
MAX_EOG = 64  # end-of-generation ids a ban can hold (vocabularies have a handful)
_INT_DTYPES = (torch.int32, torch.int64)


def _check_greedy(logits: torch.Tensor, ban_eog: torch.Tensor, eog: torch.Tensor) -> None:
    check_device("greedy_pick", logits, ban_eog, eog)
    if logits.dim() != 2 or logits.dtype not in FLOAT_DTYPES:
        raise ValueError(
            f"greedy_pick: logits must be (n, V) float32, float16 or bfloat16, got "
            f"{tuple(logits.shape)} {logits.dtype}"
        )
    if logits.shape[1] and logits.stride(1) != 1:
        raise ValueError(f"greedy_pick: logits rows must be contiguous, strides {logits.stride()}")
    if ban_eog.shape != (logits.shape[0],) or ban_eog.dtype not in (torch.bool, *_INT_DTYPES):
        raise ValueError(
            f"greedy_pick: ban_eog must be ({logits.shape[0]},) bool, int32 or int64, got "
            f"{tuple(ban_eog.shape)} {ban_eog.dtype}"
        )
    if eog.dim() != 1 or eog.dtype not in _INT_DTYPES or eog.numel() > MAX_EOG:
        raise ValueError(
            f"greedy_pick: eog must be (E,) int32 or int64 with E <= {MAX_EOG}, got "
            f"{tuple(eog.shape)} {eog.dtype}"
        )
    if not ban_eog.is_contiguous() or not eog.is_contiguous():
        raise ValueError("greedy_pick: ban_eog and eog must be contiguous")


def greedy_pick(logits: torch.Tensor, ban_eog: torch.Tensor, eog: torch.Tensor) -> torch.Tensor:
    """`greedy_pick_reference` in two launches: per (row, chunk of ARGMAX_CHUNK logits) the
    maximum and its first index, then per row the first chunk holding the maximum. Shapes
    only decide the launches (CUDA-graph safe)."""
    _check_greedy(logits, ban_eog, eog)
    n, v = logits.shape
    out = torch.empty(n, dtype=torch.int64, device=logits.device)
    if n == 0:
        return out
    if v == 0:
        raise ValueError("greedy_pick: logits have no columns")
    chunk = min(ARGMAX_CHUNK, triton.next_power_of_2(v))
    chunks = triton.cdiv(v, chunk)
    best = torch.empty(n, chunks, dtype=torch.float32, device=logits.device)
    where = torch.empty(n, chunks, dtype=torch.int32, device=logits.device)
    options = pdl.launch_options(pdl.pdl_enabled(logits.device))
    _chunk_max_kernel[(n, chunks)](
        logits, ban_eog, eog, best, where, v, logits.stride(0), eog.numel(),
        CHUNK=chunk, BLOCK_E=max(2, triton.next_power_of_2(eog.numel())), **options,
        num_warps=8 if chunk >= 2048 else 4,
    )  # fmt: skip
    _pick_chunk_kernel[(n,)](
        best, where, out, chunks, BLOCK_C=max(2, triton.next_power_of_2(chunks)), **options,
        num_warps=1,
    )  # fmt: skip
    return out


def decode_ids(ids: torch.Tensor, src: torch.Tensor, prev: torch.Tensor) -> torch.Tensor:
    """`decode_ids_reference` in one launch. src[r] must be < len(prev) (unchecked on the
    device: the host fills src from its own batch)."""
    check_device("decode_ids", ids, src, prev)
    n = ids.shape[0] if ids.dim() == 1 else -1
    for name, t in (("ids", ids), ("src", src), ("prev", prev)):
        if t.dim() != 1 or t.dtype not in _INT_DTYPES or not t.is_contiguous():
            raise ValueError(
                f"decode_ids: {name} must be a contiguous 1-D int32 or int64 tensor, got "
                f"{tuple(t.shape)} {t.dtype}"
            )
    if src.shape[0] != n:
        raise ValueError(f"decode_ids: ids and src lengths differ: {n} vs {src.shape[0]}")
    out = torch.empty(n, dtype=torch.int64, device=ids.device)
    if n:
        block = max(2, triton.next_power_of_2(min(n, 1024)))
        _decode_ids_kernel[(triton.cdiv(n, block),)](
            ids, src, prev, out, n, BLOCK=block,
            **pdl.launch_options(pdl.pdl_enabled(ids.device)), num_warps=1,
        )  # fmt: skip
    return out


if HAS_TRITON:

    @triton.jit
    def _chunk_max_kernel(
        x_ptr, ban_ptr, eog_ptr, best_ptr, where_ptr, V, stride_x, E,
        CHUNK: tl.constexpr, BLOCK_E: tl.constexpr, PDL: tl.constexpr,
    ):  # fmt: skip
        """best[r, c], where[r, c]: the maximum of row r's logits [c * CHUNK, +CHUNK) and its
        first index (banned eog ids -inf, NaN +inf)."""
        pdl.wait(PDL)
        pdl.launch_dependents(PDL)
        r = tl.program_id(0)
        c = tl.program_id(1)
        offs = c * CHUNK + tl.arange(0, CHUNK)
        ok = offs < V
        x = tl.load(x_ptr + r.to(tl.int64) * stride_x + offs, mask=ok, other=float("-inf"))
        x = x.to(tl.float32)
        x = tl.where(x != x, float("inf"), x)
        x = tl.where(ok, x, float("-inf"))
        if E > 0:
            ban = tl.load(ban_ptr + r) != 0
            e = tl.arange(0, BLOCK_E)
            ids = tl.load(eog_ptr + e, mask=e < E, other=-1)
            hit = tl.sum(((offs[:, None] == ids[None, :]) & (ids >= 0)[None, :]).to(tl.int32), 1)
            x = tl.where((hit > 0) & ban, float("-inf"), x)
        value, index = tl.max(x, axis=0, return_indices=True, return_indices_tie_break_left=True)
        tl.store(best_ptr + r * tl.num_programs(1) + c, value)
        tl.store(where_ptr + r * tl.num_programs(1) + c, c * CHUNK + index)

    @triton.jit
    def _pick_chunk_kernel(best_ptr, where_ptr, out_ptr, C, BLOCK_C: tl.constexpr,
                           PDL: tl.constexpr):  # fmt: skip
        """out[r]: the index of the first chunk's maximum among row r's chunk maxima (a row
        that is all -inf picks index 0, as torch.argmax)."""
        pdl.wait(PDL)
        pdl.launch_dependents(PDL)
        r = tl.program_id(0)
        c = tl.arange(0, BLOCK_C)
        ok = c < C
        value = tl.load(best_ptr + r * C + c, mask=ok, other=float("-inf"))
        where = tl.load(where_ptr + r * C + c, mask=ok, other=0)
        top = tl.max(value, axis=0)
        first = tl.min(tl.where(ok & (value == top), c, BLOCK_C), axis=0)
        pick = tl.sum(tl.where(c == first, where, 0), axis=0)
        tl.store(out_ptr + r, pick.to(tl.int64))

    @triton.jit
    def _decode_ids_kernel(ids_ptr, src_ptr, prev_ptr, out_ptr, n, BLOCK: tl.constexpr,
                           PDL: tl.constexpr):  # fmt: skip
        pdl.wait(PDL)
        pdl.launch_dependents(PDL)
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        ok = offs < n
        src = tl.load(src_ptr + offs, mask=ok, other=-1)
        fallback = tl.load(ids_ptr + offs, mask=ok, other=0).to(tl.int64)
        picked = tl.load(prev_ptr + tl.maximum(src, 0), mask=ok & (src >= 0), other=0)
        tl.store(out_ptr + offs, tl.where(src >= 0, picked.to(tl.int64), fallback), mask=ok)


__all__ = [
    "ARGMAX_CHUNK",
    "decode_ids",
    "decode_ids_reference",
    "greedy_pick",
    "greedy_pick_reference",
]
