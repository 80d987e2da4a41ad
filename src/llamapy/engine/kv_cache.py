"""The paged KV cache: per layer, K and V of shape (num_blocks, block_size, n_kv, head_dim)."""

from __future__ import annotations

import torch

from llamapy.config import ModelConfig

DEFAULT_BLOCK_SIZE = 16


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
    v_dim = cfg.v_head_dim or cfg.head_dim
    return [
        (
            torch.zeros(
                num_blocks, block_size, cfg.num_kv_heads, cfg.head_dim, dtype=dtype, device=device
            ),
            torch.zeros(
                num_blocks, block_size, cfg.num_kv_heads, v_dim, dtype=dtype, device=device
            ),
        )
        for _ in range(cfg.num_layers)
    ]
