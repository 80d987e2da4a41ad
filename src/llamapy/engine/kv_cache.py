"""The paged KV cache: per layer, K and V of shape (num_blocks, block_size, n_kv, head_dim)."""

from __future__ import annotations

import math
import mmap

import torch

from llamapy.config import ModelConfig

DEFAULT_BLOCK_SIZE = 16

# KV cache element types by llama.cpp's names (`-ctk` / `-ctv`), and where they run: the CPU
# takes all three (float32 and float16 in the native decode step and the numba attention,
# bfloat16 through the torch layers only); CUDA's Triton kernels take float16. The default:
# `default_kv_dtype`.
KV_CACHE_TYPES = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}
CUDA_KV_CACHE_TYPES = ("f16",)


def default_kv_dtype(device: torch.device | str, cpu_kernels: str = "fast") -> torch.dtype:
    """float16, as llama.cpp's default cache (CUDA; the CPU's fast kernels: half the memory
    and the bytes a long context reads a token; tg128 after 2048 tokens, SmolLM2 1.19 ->
    1.47x llama.cpp, Gemma 3 270M 0.92 -> 1.12x, benchmarks/RESULTS.md, thirty-second
    session), except float32 for the CPU's torch reference path (the oracle) and its
    emulation of llama.cpp's roundings (`cpu_kernels` "reference" / "ggml", which rounds K
    and V to float16 itself)."""
    if torch.device(device).type == "cuda" or cpu_kernels == "fast":
        return torch.float16
    return torch.float32


def kv_cache_dtype(name: str, device: str = "cpu") -> torch.dtype:
    """The torch dtype of a KV cache type name (f32, f16, bf16; float32 / float16 /
    bfloat16 too) on `device`; ValueError naming the choices for anything else, or for a
    type the device's kernels do not read."""
    aliases = {"float32": "f32", "float16": "f16", "bfloat16": "bf16"}
    key = aliases.get(name.strip().lower(), name.strip().lower())
    if key not in KV_CACHE_TYPES:
        raise ValueError(f"KV cache type must be one of {', '.join(KV_CACHE_TYPES)}, got {name!r}")
    if torch.device(device).type == "cuda" and key not in CUDA_KV_CACHE_TYPES:
        raise ValueError(
            f"on CUDA the KV cache type must be one of {', '.join(CUDA_KV_CACHE_TYPES)} "
            f"(the Triton kernels' cache), got {name!r}"
        )
    return KV_CACHE_TYPES[key]


def kv_bytes_per_block(cfg: ModelConfig, block_size: int, dtype: torch.dtype) -> int:
    per_token = cfg.num_kv_heads * (cfg.head_dim + (cfg.v_head_dim or cfg.head_dim))
    return cfg.num_layers * block_size * per_token * torch.tensor([], dtype=dtype).element_size()


def allocate_kv_cache(
    cfg: ModelConfig,
    num_blocks: int,
    block_size: int = DEFAULT_BLOCK_SIZE,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Zeroed K and V caches for every layer. On the CPU they are views of one anonymous
    mapping (`zero_pages`): a cache sized for the whole context becomes resident only as
    tokens fill it, where torch.zeros would write every page at once (SmolLM2 at 8192
    tokens: a 377 MB float32 cache in the peak RSS of a one-token run)."""
    v_dim = cfg.v_head_dim or cfg.head_dim
    k_shape = (num_blocks, block_size, cfg.num_kv_heads, cfg.head_dim)
    v_shape = (num_blocks, block_size, cfg.num_kv_heads, v_dim)
    if torch.device(device).type != "cpu":
        return [
            (
                torch.zeros(k_shape, dtype=dtype, device=device),
                torch.zeros(v_shape, dtype=dtype, device=device),
            )
            for _ in range(cfg.num_layers)
        ]
    item = torch.tensor([], dtype=dtype).element_size()
    k_bytes, v_bytes = (_aligned(item * math.prod(shape)) for shape in (k_shape, v_shape))
    flat = zero_pages(cfg.num_layers * (k_bytes + v_bytes))
    caches = []
    for layer in range(cfg.num_layers):
        at = layer * (k_bytes + v_bytes)
        k = flat[at : at + item * math.prod(k_shape)].view(dtype).view(k_shape)
        v = flat[at + k_bytes : at + k_bytes + item * math.prod(v_shape)].view(dtype).view(v_shape)
        caches.append((k, v))
    return caches


def zero_pages(nbytes: int) -> torch.Tensor:
    """(nbytes,) uint8 zeros in a private anonymous memory mapping: the kernel hands out
    zeroed pages as they are first touched, so untouched ones cost no resident memory (and a
    forked child gets copy-on-write pages, as with any heap memory). The tensor keeps the
    mapping alive. Without POSIX mmap flags (Windows): torch.zeros."""
    flags = getattr(mmap, "MAP_PRIVATE", None), getattr(mmap, "MAP_ANONYMOUS", None)
    if None in flags:
        return torch.zeros(nbytes, dtype=torch.uint8)
    buf = mmap.mmap(-1, max(nbytes, 1), flags=flags[0] | flags[1])
    return torch.frombuffer(buf, dtype=torch.uint8)[:nbytes]


def _aligned(nbytes: int, to: int = 4096) -> int:
    """nbytes rounded up to a page: each layer's K and V start on their own page."""
    return -(-nbytes // to) * to
