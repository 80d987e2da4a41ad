"""Decode attention on the CPU through the paged float32 (or float16) KV cache: the torch op
`llamapy::decode_attention`, a numba kernel (`_attention_numba.py`) that the compiled decode
step (`layers.attention.decode_attention_dense`, `models/cpu_compile.py`) calls as one opaque
op.

Why: Inductor's C++ for the broadcast-and-sum formulation gathers each key and value row
through the block table once per query head and reduces each score across a vector, ~0.37
us per key and layer on SmolLM2-135M (~4 GB/s of cache): a 1000-token context added ~11
ms to a ~7.5 ms token. The kernel reads each key and value row once, in order, for all the
query heads (`_attention_numba.decode`); it takes over from MIN_BLOCKS of context.

`LLAMAPY_CPU_ATTENTION=0` turns it off (then the Inductor loops). The op checks what it is
given (devices, dtypes, shapes, contiguity) and raises ValueError naming the problem.
"""

from __future__ import annotations

import importlib.util

import torch

from llamapy.layers.attention import check_paged_shapes
from llamapy.switches import switched_off

# Block tables at least this wide (contexts past 256 tokens in blocks of 16) take the op;
# narrower ones Inductor's loops, whose fixed cost per call is lower: one SmolLM2-135M decode
# step (benchmarks/kernels/bench_cpu_decode_step.py --variants default,inductor-attn), op /
# Inductor, ms min: 6.91 / 6.43 at 16 keys, 6.27 / 5.79 at 64, 6.40 / 5.92 at 128, 7.19 /
# 6.82 at 256, 6.89 / 6.83 at 512 (cache rows hot there); in the engine
# (benchmarks/cpu_context_bench.py) at 520-1032 tokens of context 10.9-11.3 / 15.1-15.7 ms a
# token, at 264-520 9.1-9.2 / 11.1-11.3.
MIN_BLOCKS = 17

# numba is looked up, not imported, here: the import (~0.3 s) waits for the first call
_HAS_NUMBA = importlib.util.find_spec("numba") is not None
CACHE_DTYPES = (torch.float32, torch.float16)  # the caches the kernel reads


def available() -> bool:
    """Whether the kernel can run here (numba installed, not switched off). Plain code, no
    cache wrapper: the compiled decode step's tracing calls it."""
    return _HAS_NUMBA and not switched_off("LLAMAPY_CPU_ATTENTION")


def supports(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor
) -> bool:
    """Whether `decode_attention` takes these and pays (CPU, float32 queries, float32 or
    float16 caches, equal head dims, tables of at least MIN_BLOCKS columns): the caller's
    choice between it and the torch formulation. Under torch.compile the width test is a
    guard on the tables' dynamic width: the two sides are two graphs (models/cpu_compile.py
    keeps their calls apart)."""
    return (
        q.device.type == "cpu"
        and q.dtype == torch.float32
        and k_cache.dtype == v_cache.dtype
        and k_cache.dtype in CACHE_DTYPES
        and k_cache.shape == v_cache.shape
        and available()
        and block_tables.shape[1] >= MIN_BLOCKS  # last: no width guard where the op is off
    )


def decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    *,
    scale: float,
    sliding_window: int | None = None,
    softcap: float | None = None,
) -> torch.Tensor:
    """q (B, n_heads, d), one query per sequence at position seq_lens[b] - 1, over the keys
    of its block-table row (keys past seq_lens, and those out of the window, unseen) ->
    (B, n_heads, d): `layers.attention.decode_attention_dense`'s result."""
    window = 0 if sliding_window is None else int(sliding_window)
    if window < 0 or (sliding_window is not None and window == 0):
        raise ValueError(f"sliding_window must be >= 1 or None, got {sliding_window}")
    _check(q, k_cache, v_cache, block_tables, seq_lens)  # (when compiled: at trace time)
    return torch.ops.llamapy.decode_attention(
        q, k_cache, v_cache, block_tables, seq_lens, float(scale), window, float(softcap or 0.0)
    )


def _check(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
) -> None:
    if q.device.type != "cpu" or q.dtype != torch.float32:
        raise ValueError(f"q must be a float32 CPU tensor, got {q.dtype} on {q.device}")
    for name, t in (("k_cache", k_cache), ("v_cache", v_cache)):
        if t.device.type != "cpu" or t.dtype not in CACHE_DTYPES:
            raise ValueError(
                f"{name} must be a float32 or float16 CPU tensor, got {t.dtype} on {t.device}"
            )
    if k_cache.dtype != v_cache.dtype:
        raise ValueError(f"the caches' dtypes differ: {k_cache.dtype} and {v_cache.dtype}")
    check_paged_shapes(q, k_cache, v_cache, block_tables, seq_lens, batch=q.shape[0])
    if not (k_cache.is_contiguous() and v_cache.is_contiguous()):
        raise ValueError("the caches must be contiguous")


def _decode_attention_cpu(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    window: int,
    softcap: float,
) -> torch.Tensor:
    # the kernel reads raw memory: what it needs, checked cheaply (~1 us; `_check`, which
    # names the problem, ran in `decode_attention`), else the full check raises
    f32, i32 = torch.float32, torch.int32
    if not (
        q.dtype == f32
        and k_cache.dtype == v_cache.dtype
        and k_cache.dtype in CACHE_DTYPES
        and block_tables.dtype == seq_lens.dtype == i32
        and q.dim() == 3
        and k_cache.dim() == 4
        and k_cache.shape == v_cache.shape
        and k_cache.is_contiguous()
        and v_cache.is_contiguous()
        and q.shape[2] == k_cache.shape[3]
        and q.shape[1] % k_cache.shape[2] == 0
        and block_tables.dim() == 2
        and block_tables.shape[0] == seq_lens.shape[0] == q.shape[0]
    ):
        _check(q, k_cache, v_cache, block_tables, seq_lens)
        raise ValueError("decode_attention: unsupported inputs")  # (_check names most)
    q, tables, lens = q.contiguous(), block_tables.contiguous(), seq_lens.contiguous()
    out = torch.empty_like(q)
    if q.shape[0]:
        from llamapy.kernels.cpu import _attention_numba as kernel

        n_blocks, block_size, n_kv, d = k_cache.shape
        es = k_cache.element_size()
        status = kernel.decode(
            q.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(), tables.data_ptr(),
            lens.data_ptr(), out.data_ptr(), q.shape[0], q.shape[1], n_kv, d, n_blocks,
            block_size, tables.shape[1], scale, window, softcap, es, torch.get_num_threads(),
            kernel.worker_for(d, es),
        )  # fmt: skip
        if status == 1:
            raise ValueError(
                f"seq_lens must lie in [0, {tables.shape[1] * block_size}] (the block tables' "
                f"width times the block size), got {lens.tolist()}"
            )
        if status == 2:
            raise ValueError(f"a block table names a block outside the caches' {n_blocks}")
    return out


def _decode_attention_fake(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    window: int,
    softcap: float,
) -> torch.Tensor:
    return torch.empty_like(q, memory_format=torch.contiguous_format)


# A plain library op (as vnni.py's): a few us of dispatch where torch.library.custom_op costs
# ~10, once per layer of a decoded token.
_LIB = torch.library.Library("llamapy", "FRAGMENT")
_LIB.define(
    "decode_attention(Tensor q, Tensor k_cache, Tensor v_cache, Tensor block_tables, "
    "Tensor seq_lens, float scale, int window, float softcap) -> Tensor"
)
_LIB.impl("decode_attention", _decode_attention_cpu, "CPU")
torch.library.register_fake("llamapy::decode_attention", _decode_attention_fake, lib=_LIB)
