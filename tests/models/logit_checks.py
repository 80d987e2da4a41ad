"""How two decode paths' logits may differ: the check the CPU decode-step tests share."""

from __future__ import annotations

import torch


def explained_picks(got: torch.Tensor, ref: torch.Tensor) -> tuple[bool, int, int]:
    """Greedy picks of logits `got` (B, V) against the reference path's `ref`: (whether each
    differing pick is explained by the perturbation, picks that differ, rows). A pick may
    differ only where the reference's logit of it lies within twice the largest logit
    difference of the reference's maximum (garbage would pick tokens far below the top)."""
    pick = got.argmax(-1)
    gap = ref.max(-1).values - ref.gather(-1, pick[:, None])[:, 0]
    noise = (got - ref).abs().max(-1).values
    return bool((gap <= 2 * noise).all()), int((gap > 0).sum()), len(pick)
