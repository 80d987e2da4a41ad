"""Programmatic dependent launch (PDL, Hopper and later) for the decode kernels: on for every
kernel of a small model (its weights on the device at most `AUTO_MAX_MODEL_BYTES`, as the
engine records them at load with `set_model_bytes`); in a larger model on for every kernel
but the matrix products of weights over `AUTO_MAX_WEIGHT_BYTES`; off where no model was
recorded. LLAMAPY_PDL=1 / 0 forces it on / off for every kernel. A product launched without
it still lets the next kernel launch early where K < `TRIGGER_MAX_K` (`trigger_enabled`).

A decode step is ~200 short kernels replayed from a CUDA graph; between two of them the GPU
drains one grid and ramps up the next (~0.9 us from the last program of one kernel to the
first of the next, H200). With PDL a kernel is launched with `launch_pdl=True` and may start
while the kernel before it still runs: it may read what no earlier kernel writes (weights:
`prefetch_l2`), then calls `wait`, which returns once every earlier grid has finished and its
writes are visible, and only then lets its own dependents launch (`launch_dependents`): so at
most one grid waits ahead of the running one, and the order of reads and writes between
kernels is the same as without PDL.

Measured (H200, tg128, benchmarks/RESULTS.md, eighteenth session): SmolLM2-135M-shape Q4_0
1612 / 1619 -> 1906 / 1900 t/s, Llama-3.2-1B-shape Q4_0 1235 -> 1214 with every kernel (its
GEMVs stream MBs each; the early grids and prefetches compete with them), but 1222 -> 1245
with every kernel but the GEMVs and 1255 with the GEMVs of at most 4 MB too (nineteenth
session: its 2.4-3.5 MB attention projections on, the 9-19 MB MLP ones off; the bound is 8
MiB since the thirty-fourth session, for the Q8_0 projections). Dependents let
go at a kernel's start instead (earlier sessions) left chains of early grids waiting on the
SMs: 1453 t/s for the same SmolLM2 file.

Rules for a kernel given `PDL=True` (a constexpr; False under the interpreter, on pre-Hopper
cards and where `pdl_enabled` says so):
- before `wait`, reads only of what the kernel right before it does not write: a kernel
  starts early only once that kernel has passed its own `wait` (every kernel calls
  `launch_dependents` after it), so every older one has finished. Weights (or their
  prefetches) qualify everywhere; in the fused decode attention also the step's inputs
  (lengths, block tables, slots, the rope rows gathered before the layers) and the KV
  cache's rows of earlier steps (`attention._decode_kernel`'s EARLY_TILE);
- no write anywhere before `wait`;
- `launch_dependents` after `wait`.
"""

from __future__ import annotations

import functools
import logging
import os

import torch

from llamapy.kernels.triton import HAS_TRITON, INTERPRET

if HAS_TRITON:
    import triton
    import triton.language as tl

logger = logging.getLogger(__name__)

L2_LINE = 128  # bytes a prefetch pulls into L2
# Whether the GEMVs prefetch their weights into L2 before the wait (benchmarks switch it off
# to measure what it buys).
PREFETCH = True


@functools.cache
def _device_pdl(index: int) -> bool:
    return torch.cuda.get_device_capability(index) >= (9, 0)


# Models whose weights take at most this many bytes on the device launch their kernels with
# PDL unless LLAMAPY_PDL says otherwise (the SmolLM2-135M-shape files: 77-145 MB; the
# Llama-3.2-1B shape's Q4_0 703 MB lost with it).
AUTO_MAX_MODEL_BYTES = 256 << 20


def _max_weight_bytes(env: str | None, default: int = 8 << 20) -> int:
    """LLAMAPY_PDL_MAX_WEIGHT_MIB (a lab setting): the size rule's bound in MiB, a positive
    integer; anything else keeps the default, said once."""
    value = (env or "").strip()
    if value.isdigit() and int(value) > 0:
        return int(value) << 20
    if value:
        logger.warning("LLAMAPY_PDL_MAX_WEIGHT_MIB=%r is not a positive integer: the default "
                       "%d MiB", env, default >> 20)  # fmt: skip
    return default


# In a larger model, matrix products of weights over this many bytes launch without PDL
# (the 1B Q4_0's 9.4 MB down and 18.9 MB gate_up GEMVs; tg128 1255 t/s without them, 1219
# with them, H200, nineteenth session). 8 MiB rather than 4 puts the 1B Q8_0's QKV (6.7 MB)
# and o (4.5 MB) on: 1.013x tg128 (thirty-fourth session). LLAMAPY_PDL_MAX_WEIGHT_MIB sets it
# for A/B runs.
AUTO_MAX_WEIGHT_BYTES = _max_weight_bytes(os.environ.get("LLAMAPY_PDL_MAX_WEIGHT_MIB"))
_model_bytes: dict[int, int] = {}  # by device index: the last model loaded there


def _index(device: torch.device) -> int:
    return device.index if device.index is not None else torch.cuda.current_device()


def set_model_bytes(device: torch.device, nbytes: int) -> None:
    """Record the weights' size of the model just loaded on `device` (`LLMEngine`): kernels
    launched there from now on (CUDA-graph captures included) follow `wanted`."""
    if device.type == "cuda":
        _model_bytes[_index(device)] = nbytes


def wanted(env: str | None, model_bytes: int | None, weight_bytes: int | None = None) -> bool:
    """The policy, on a device that can run PDL, for a kernel reading a weight of
    `weight_bytes` (None: no weight): LLAMAPY_PDL "1" on, "0" off; otherwise off where no
    model is recorded, on for a model of at most AUTO_MAX_MODEL_BYTES, and in a larger one
    on unless the weight has more than AUTO_MAX_WEIGHT_BYTES."""
    if env in ("0", "1"):
        return env == "1"
    if model_bytes is None:
        return False
    if model_bytes <= AUTO_MAX_MODEL_BYTES or weight_bytes is None:
        return True
    return weight_bytes <= AUTO_MAX_WEIGHT_BYTES


def pdl_enabled(device: torch.device, weight_bytes: int | None = None) -> bool:
    """Whether a kernel on `device` reading a weight of `weight_bytes` (None: none) launches
    with PDL: a CUDA device of compute capability >= 9.0, not the interpreter, and `wanted`."""
    if INTERPRET or device.type != "cuda":
        return False
    index = _index(device)
    if not wanted(os.environ.get("LLAMAPY_PDL"), _model_bytes.get(index), weight_bytes):
        return False
    return _device_pdl(index)


# A matrix product launched without PDL (a large model's weights over AUTO_MAX_WEIGHT_BYTES)
# may still let the kernel after it launch early: compiled with its `wait` (a no-op without
# the launch flag) and `launch_dependents`. Measured (H200, thirty-fourth session): the 1B
# Q8_0's products without PDL (then QKV, o, gate_up, down) letting their successors start
# early, 1.043x tg128 by this rule, 1.039x all of them; the 1B Q4_0 / Q4_1 downs (K = 8192)
# letting the next layer's QKV start early (prefetching 3.5 MB beside their streams), 0.949x
# / 0.893x. So products with K < TRIGGER_MAX_K do (QKV, o, gate_up, the output matrix); the
# downs do not, nor once their loads are done (a lab setting of the thirty-fifth session:
# 1B Q4_0 1.004x, Q4_1 0.978x; removed). LLAMAPY_GPU_PDL_TRIGGER=0: none; "all": every one.
TRIGGER_SWITCH = "LLAMAPY_GPU_PDL_TRIGGER"
TRIGGER_MAX_K = 4096


@functools.cache
def trigger_setting(env: str | None) -> str:
    """LLAMAPY_GPU_PDL_TRIGGER as "0", "all" or "" (unset: the K rule); anything else keeps
    the K rule, said once."""
    value = (env or "").strip().lower()
    if value in ("", "0", "all"):
        return value
    logger.warning("LLAMAPY_GPU_PDL_TRIGGER=%r is not 0 or all: products with K < %d "
                   "trigger", env, TRIGGER_MAX_K)  # fmt: skip
    return ""


def trigger_wanted(env: str | None, k: int) -> bool:
    """The policy for a product over K inputs a row, launched without PDL, triggering right
    after its wait (`trigger_setting`): "0" never, "all" always, otherwise K < TRIGGER_MAX_K."""
    value = trigger_setting(env)
    return value != "0" and (value == "all" or k < TRIGGER_MAX_K)


def trigger_enabled(device: torch.device, k: int) -> bool:
    """Whether a product on `device` over K inputs a row, launched without PDL, still lets
    its dependents launch early: where PDL runs at all (`pdl_enabled` for a kernel without a
    weight) and `trigger_wanted`."""
    return trigger_wanted(os.environ.get(TRIGGER_SWITCH), k) and pdl_enabled(device)


def launch_options(on: bool, trigger: bool = False) -> dict[str, object]:
    """Keyword arguments of a Triton launch: the PDL constexpr and, when on, the launch flag.
    `trigger` (off): the kernel waits for everything before it as a plain launch does, but
    still calls `launch_dependents`, so that the next kernel may launch early."""
    if on:
        return {"PDL": True, "launch_pdl": True}
    return {"PDL": trigger}


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
        """Let the next kernel launch (it still waits for this one before touching our data);
        called after `wait`, so that no more than one grid waits ahead."""
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
