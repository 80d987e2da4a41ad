"""Mirostat v1 and v2 [arXiv:2007.14966], batched: truncation sized by a per-sequence mu.

As llama_sampler_mirostat_apply / llama_sampler_mirostat_v2_apply. mu starts at 2 * tau and
after each token moves by -eta * (observed surprise - tau), the surprise being -log2 of the
chosen token's probability among the kept candidates; it lives in the sequence's
SamplerState. Both versions work on all V tokens in descending probability order.
"""

from __future__ import annotations

import torch

from llamapy.sampling.filters import Candidates, masked_softmax

_M = 100  # llama.cpp's common_sampler_init passes m = 100 to llama_sampler_init_mirostat


def mirostat_candidates(
    x: torch.Tensor, version: torch.Tensor, tau: torch.Tensor, mu: torch.Tensor
) -> Candidates:
    """Sorted candidates of logits x (B, V) (after temperature), alive = what mirostat keeps.

    version, tau, mu: (B, 1) float64 columns; version is 1 or 2.
    """
    c = Candidates(x, x.shape[1])
    c.sort()
    p = masked_softmax(c.logits, None).double()  # (B, V), sorted descending
    n_vocab = x.shape[1]
    keep_v1 = _v1_count(p, mu, n_vocab)
    # v2: keep the leading tokens with surprise -log2 p <= mu, at least one
    surprising = -torch.log2(p) > mu
    first = torch.where(
        surprising.any(-1, keepdim=True), surprising.int().argmax(-1, keepdim=True), n_vocab
    )
    keep_v2 = first.clamp_min(1)
    keep = torch.where(version == 1, keep_v1, keep_v2)  # (B, 1)
    pos = torch.arange(n_vocab, device=x.device).unsqueeze(0)
    c.alive = pos < keep
    return c


def _v1_count(p: torch.Tensor, mu: torch.Tensor, n_vocab: int) -> torch.Tensor:
    # s_hat: least-squares Zipf exponent of the top m probabilities
    m = min(_M - 1, n_vocab - 1)
    i = torch.arange(m, device=p.device, dtype=torch.float64)
    t = torch.log((i + 2) / (i + 1))  # (m,)
    b = torch.log(p[:, :m] / p[:, 1 : m + 1])  # (B, m)
    s_hat = (t * b).sum(-1, keepdim=True) / (t * t).sum()
    eps = s_hat - 1
    k = ((eps * 2.0**mu) / (1 - float(n_vocab) ** (-eps))) ** (1 / s_hat)
    # int(k) then max(k, 1) (llama_sampler_top_k_impl clamps to the vocabulary)
    k = torch.nan_to_num(k, nan=1.0, posinf=float(n_vocab), neginf=1.0)
    return k.clamp(1, n_vocab).floor().long()


def surprise(c: Candidates, pos: torch.Tensor) -> torch.Tensor:
    """-log2 p of the chosen candidate among the kept ones: (B,) float64."""
    p = masked_softmax(c.logits, c.alive).double()
    return -torch.log2(p.gather(1, pos).squeeze(1))
