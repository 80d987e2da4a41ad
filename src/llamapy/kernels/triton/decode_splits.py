"""A decode attention's output still in its key splits, for a consumer that merges them."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True, slots=True)
class DecodeSplits:
    """A decode attention's output still in its key splits (flash-decoding's partials):
    part_o (B, n_heads, S, d) float32, each split's normalized output, and part_lse (B,
    n_heads, S) float32, its log2-sum-exp2 (-inf: an empty split). The output is
    sum_s 2^(lse_s - M) part_o_s / sum_s 2^(lse_s - M), M the largest lse_s; `merged` computes
    it (the merge kernel, into `out`); the float32-x GEMV computes it while loading x
    (`qmatmul`, so that the merge takes no launch of its own)."""

    part_o: torch.Tensor
    part_lse: torch.Tensor
    out: torch.Tensor  # (B, n_heads, d) of the attention output's dtype, where `merged` writes

    @property
    def num_splits(self) -> int:
        return self.part_o.shape[2]

    @property
    def head_dim(self) -> int:
        return self.part_o.shape[3]

    @property
    def dtype(self) -> torch.dtype:
        return self.out.dtype

    @property
    def shape(self) -> tuple[int, int]:
        """(B, n_heads * d): the merged output's shape as a matmul's x."""
        b, h, _, d = self.part_o.shape
        return b, h * d

    def merged(self) -> torch.Tensor:
        """The merged output (B, n_heads, d): `out`, written by the merge kernel."""
        from llamapy.kernels.triton.attention import combine_splits

        combine_splits(self.part_o, self.part_lse, self.out)
        return self.out
