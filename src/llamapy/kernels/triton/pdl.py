"""Programmatic dependent launch (PDL, Hopper and later) for the decode kernels: opt-in
(LLAMAPY_PDL=1), off by default.

A decode step is ~200 short kernels replayed from a CUDA graph; between two of them the GPU
drains one grid and ramps up the next. With PDL a kernel is launched with
`launch_pdl=True` and may start while the kernel before it still runs: each kernel first lets
its dependents launch (`launch_dependents`), may read what no earlier kernel writes (weights:
`prefetch_l2`), and calls `wait` before its first read of an activation or its first write.
`wait` returns once every earlier grid has finished and its writes are visible, so the
order of reads and writes between kernels is the same as without PDL.

Why off: measured on an H200 (benchmarks/RESULTS.md, seventh session) it sped SmolLM2-shape
decode up ~5% and slowed Llama-3.2-1B-shape decode ~5-10%: the graph's kernel gaps are
already ~0.2 us each, and early-launched grids waiting on the SMs cost more than they save.

Rules for a kernel given `PDL=True` (a constexpr; False under the interpreter, on pre-Hopper
cards and unless LLAMAPY_PDL=1):
- nothing but weight reads (or prefetches) before `wait`;
- no write anywhere before `wait`.
"""

from __future__ import annotations

import functools
import os

import torch

from llamapy.kernels.triton import HAS_TRITON, INTERPRET

if HAS_TRITON:
    import triton
    import triton.language as tl

L2_LINE = 128  # bytes a prefetch pulls into L2
# Whether the GEMVs prefetch their weights into L2 before the wait (benchmarks switch it off
# to measure what it buys).
PREFETCH = True


@functools.cache
def _device_pdl(index: int) -> bool:
    return torch.cuda.get_device_capability(index) >= (9, 0)


def pdl_enabled(device: torch.device) -> bool:
    """Whether kernels on `device` launch with PDL: LLAMAPY_PDL=1, a CUDA device of compute
    capability >= 9.0, and not the interpreter."""
    if INTERPRET or device.type != "cuda" or os.environ.get("LLAMAPY_PDL", "0") != "1":
        return False
    return _device_pdl(device.index if device.index is not None else torch.cuda.current_device())


def launch_options(on: bool) -> dict[str, object]:
    """Keyword arguments of a Triton launch: the PDL constexpr and, when on, the launch flag."""
    return {"PDL": True, "launch_pdl": True} if on else {"PDL": False}


def prefetch_lines(nbytes: int, cap: int = 64) -> int:
    """The constexpr line count of a prefetch covering `nbytes` of a row: the next power of two
    of its 128-byte lines, at most `cap` (0 for nothing; a longer run is prefetched in part)."""
    if nbytes <= 0 or not PREFETCH:
        return 0
    return min(cap, triton.next_power_of_2(triton.cdiv(nbytes, L2_LINE)))


if HAS_TRITON:

    @triton.jit
    def wait(PDL: tl.constexpr):
        """Block until the kernels before this one have finished (their writes visible)."""
        if PDL:
            tl.extra.cuda.gdc_wait()

    @triton.jit
    def launch_dependents(PDL: tl.constexpr):
        """Let the next kernel launch (it still waits for this one before touching our data)."""
        if PDL:
            tl.extra.cuda.gdc_launch_dependents()

    @triton.jit
    def prefetch_l2(ptrs, mask):
        """A hint: pull the 128-byte lines of `ptrs` (where `mask`) into L2; nothing waits."""
        tl.inline_asm_elementwise(
            "{ .reg .pred p; setp.ne.s32 p, $2, 0; @p prefetch.global.L2 [$1]; mov.u32 $0, 0; }",
            "=r,l,r",
            [ptrs, mask.to(tl.int32)],
            dtype=tl.int32,
            is_pure=False,
            pack=1,
        )

    @triton.jit
    def prefetch_rows(base_ptr, rows, row_ok, row_len, start, stop, LINES: tl.constexpr):
        """Prefetch elements [start, stop) of rows `rows` (int64, where `row_ok`) of a row-major
        matrix at `base_ptr` with `row_len` elements a row: LINES 128-byte lines a row."""
        if LINES > 0:
            step: tl.constexpr = 1024 // base_ptr.dtype.element_ty.primitive_bitwidth
            offs = start + tl.arange(0, LINES) * step  # (LINES,) element offsets in a row
            ptrs = base_ptr + rows[:, None] * row_len + offs[None, :]
            prefetch_l2(ptrs, row_ok[:, None] & (offs < stop)[None, :])
