"""The greedy pick of the decode step and its input ids: torch definitions (the oracle and
the CPU path) and the dispatch to the Triton kernels on CUDA (kernels/triton/sampling.py,
imported only there: the CPU path does not import triton).
"""

from __future__ import annotations

import torch


def greedy_pick_reference(
    logits: torch.Tensor, ban_eog: torch.Tensor, eog: torch.Tensor
) -> torch.Tensor:
    """(n, V) logits, (n,) ban flags (nonzero: ban), (E,) end-of-generation ids -> (n,) int64:
    the first index of each row's maximum, the eog ids of banned rows excluded (-inf);
    `logits` is left as it is. NaN counts as +inf (the first NaN wins, as torch.argmax)."""
    x = logits.to(torch.float32, copy=True)
    x = torch.where(x.isnan(), float("inf"), x)
    if eog.numel():
        x[:, eog] = x[:, eog].masked_fill(ban_eog[:, None].bool(), float("-inf"))
    return x.argmax(dim=-1)


def decode_ids_reference(ids: torch.Tensor, src: torch.Tensor, prev: torch.Tensor) -> torch.Tensor:
    """(n,) ids, (n,) source rows, (P,) previous picks -> (n,) int64: prev[src[r]] where
    src[r] >= 0, else ids[r]."""
    picked = prev[src.clamp(min=0).long()]
    return torch.where(src >= 0, picked, ids.to(picked.dtype))


def greedy_pick(logits: torch.Tensor, ban_eog: torch.Tensor, eog: torch.Tensor) -> torch.Tensor:
    """`greedy_pick_reference`; on CUDA two Triton launches."""
    if logits.is_cuda:
        from llamapy.kernels.triton import HAS_TRITON

        if HAS_TRITON:
            from llamapy.kernels.triton import sampling

            if eog.numel() <= sampling.MAX_EOG:
                return sampling.greedy_pick(logits, ban_eog, eog)
    return greedy_pick_reference(logits, ban_eog, eog)


def decode_ids(ids: torch.Tensor, src: torch.Tensor, prev: torch.Tensor) -> torch.Tensor:
    """`decode_ids_reference`; on CUDA one Triton launch."""
    if ids.is_cuda:
        from llamapy.kernels.triton import HAS_TRITON

        if HAS_TRITON:
            from llamapy.kernels.triton import sampling

            return sampling.decode_ids(ids, src, prev)
    return decode_ids_reference(ids, src, prev)
