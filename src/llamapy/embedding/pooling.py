"""Pooling of per-token hidden states into one vector per sequence, and normalisation.

Pooling types are llama.cpp's (`llama_pooling_type`): none (every token's vector), mean,
cls (the first token), last (the last token), rank (the classifier's output: pooled as
cls for encoders, last for decoders, then the model's head).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

POOLING_TYPES = ("none", "mean", "cls", "last", "rank")


def pool(hidden: torch.Tensor, seq_lens: Sequence[int], pooling: str) -> torch.Tensor:
    """hidden (T, D) of sequences of `seq_lens` tokens, concatenated -> (B, D).

    `pooling` is mean, cls or last ("none" keeps every token: see `split_tokens`)."""
    lens = torch.tensor(seq_lens, dtype=torch.long, device=hidden.device)
    ends = torch.cumsum(lens, 0)
    if pooling == "cls":
        return hidden[ends - lens]
    if pooling == "last":
        return hidden[ends - 1]
    if pooling == "mean":  # one (B, T) @ (T, D) matmul, as llama.cpp's inp_mean
        seq_of_token = torch.repeat_interleave(
            torch.arange(len(seq_lens), device=hidden.device), lens
        )
        weights = torch.zeros(
            len(seq_lens), hidden.shape[0], dtype=hidden.dtype, device=hidden.device
        )
        weights[seq_of_token, torch.arange(hidden.shape[0], device=hidden.device)] = 1.0
        return (weights @ hidden) / lens[:, None].to(hidden.dtype)
    raise ValueError(f"pooling must be mean, cls or last here, got {pooling!r}")


def split_tokens(hidden: torch.Tensor, seq_lens: Sequence[int]) -> list[torch.Tensor]:
    """Pooling "none": each sequence's (L_i, D) token vectors."""
    return list(torch.split(hidden, list(seq_lens)))


def normalize(x: torch.Tensor, embd_normalize: int = 2) -> torch.Tensor:
    """As llama.cpp's common_embd_normalize over the last dimension: -1 none, 0 max-absolute
    scaled to the int16 range, 2 Euclidean (L2), any other p > 0 the p-norm. A zero vector
    stays zero. Sums in float64, as llama.cpp does."""
    if embd_normalize == -1:
        return x
    x64 = x.to(torch.float64)
    if embd_normalize == 0:
        norm = x64.abs().amax(-1, keepdim=True) / 32760.0
    elif embd_normalize == 2:
        norm = x64.pow(2).sum(-1, keepdim=True).sqrt()
    elif embd_normalize > 0:
        p = float(embd_normalize)
        norm = x64.abs().pow(p).sum(-1, keepdim=True).pow(1.0 / p)
    else:
        raise ValueError(f"embd_normalize must be -1, 0 or a positive p, got {embd_normalize}")
    scale = torch.where(norm > 0, 1.0 / norm, torch.zeros_like(norm))
    return (x64 * scale).to(x.dtype)
