"""The candidate-set samplers of llama.cpp's chain, batched over rows with per-row params.

How llama.cpp's shrinking candidate array maps onto tensors: `Candidates` holds each row's
logits and token ids, in descending logit order once `sort` has run (a `topk` of the largest
top_k in the batch when top-k is the first filter and every row has top_k > 0, else a full
stable sort), and a boolean `alive` mask for "still a candidate". A filter only clears
entries, computing its probabilities over the alive ones and counting `min_keep` over alive
entries in logit order, as llama.cpp counts over its array. Samplers that change logits
(temperature, top-n-sigma's -inf) keep the order; penalties or DRY placed after a filter
make the set unsorted again. Tokens whose logit is -inf stay candidates, as in llama.cpp,
with probability 0.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

_NEG_INF = float("-inf")


@dataclass(slots=True)
class Candidates:
    """Each row's candidates: (B, K) logits, token ids (None: all V ids in id order) and the
    alive mask (None: all alive)."""

    logits: torch.Tensor
    n_vocab: int
    token_ids: torch.Tensor | None = None
    alive: torch.Tensor | None = None
    is_sorted: bool = False

    def alive_mask(self) -> torch.Tensor:
        if self.alive is None:
            self.alive = torch.ones_like(self.logits, dtype=torch.bool)
        return self.alive

    def ids(self) -> torch.Tensor:
        if self.token_ids is None:
            b, v = self.logits.shape
            self.token_ids = torch.arange(v, device=self.logits.device).expand(b, v)
        return self.token_ids

    def sort(self, top_k_width: int | None = None) -> None:
        """Descending logit order, alive entries first; `top_k_width` keeps only that many."""
        if self.is_sorted:
            return
        if top_k_width is not None and self.token_ids is None:
            # all V ids, none dead yet (only filters kill, and they sort first)
            width = min(top_k_width, self.logits.shape[1])
            self.logits, self.token_ids = top_candidates(self.logits, width)
            self.alive = None
        else:
            key = self.logits if self.alive is None else self.masked()
            order = key.sort(dim=-1, descending=True, stable=True).indices
            self.logits = self.logits.gather(1, order)
            self.token_ids = self.ids().gather(1, order)
            self.alive = None if self.alive is None else self.alive.gather(1, order)
        self.is_sorted = True

    def masked(self) -> torch.Tensor:
        """Logits with dead entries at -inf."""
        if self.alive is None:
            return self.logits
        return self.logits.masked_fill(~self.alive, _NEG_INF)

    def edit_by_token(self, edit: Callable[[torch.Tensor], None]) -> None:
        """Run an in-place (B, V) logit edit (penalties, DRY) on the candidates."""
        if self.token_ids is None:
            edit(self.logits)
            return
        shape = (self.logits.shape[0], self.n_vocab)
        full = self.logits.new_full(shape, _NEG_INF).scatter_(1, self.token_ids, self.logits)
        edit(full)
        self.logits = full.gather(1, self.token_ids)
        self.is_sorted = False


# Up to this many logits (rows x vocabulary) CUDA takes top-k candidates from a full stable
# sort: H200, torch 2.11, width 40, us a call (.gpu/topk_alt.py, fourteenth session): B=1
# V=49,152 sort 94 / topk 140 / unique keys 441; B=4 130 / 132 / 429; B=64 301 / 136 / 444;
# V=128,256 B=64 (8.2M logits) 626 / 159 / 583.
CUDA_SORT_MAX_NUMEL = 1 << 22


def top_candidates(logits: torch.Tensor, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's first `width` logits and ids in the order of a stable descending sort
    (equal logits: the lower id first).

    `torch.topk` leaves the order of equal logits, and which of them make the cut, to its
    implementation, and that differs with the batch: a row alone (top-k, so topk) and the
    same row beside a top_k = 0 row (a full stable sort) could keep different tokens, and a
    seeded request's text would depend on what it was batched with. On CUDA small batches
    take the stable sort itself (faster there than topk up to ~4M logits, H200), larger
    ones a topk over keys made unique (`_top_by_unique_keys`); neither syncs with the host.
    On the CPU topk's answer is checked for ties and a row with one is sorted
    (`_top_checked`)."""
    if logits.is_cuda:
        if logits.numel() <= CUDA_SORT_MAX_NUMEL:
            top = logits.sort(dim=-1, descending=True, stable=True)
            return top.values[:, :width], top.indices[:, :width]
        return _top_by_unique_keys(logits, width)
    return _top_checked(logits, width)


def _top_checked(logits: torch.Tensor, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    # one more than kept: the first left out equal to the last kept is a tie across the cut
    values, ids = logits.topk(min(width + 1, logits.shape[1]), dim=-1, sorted=True)
    tied = (values[:, 1:] == values[:, :-1]).any(dim=-1)
    tied |= values.isnan().any(dim=-1)  # NaN compares unequal to itself: sort those too
    values, ids = values[:, :width], ids[:, :width]
    if bool(tied.any()):
        rows = tied.nonzero()[:, 0]
        order = logits[rows].sort(dim=-1, descending=True, stable=True).indices[:, :width]
        ids[rows] = order
        values[rows] = logits[rows].gather(1, order)
    return values, ids


def _top_by_unique_keys(logits: torch.Tensor, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    # int64 key: the float32 bits mapped to an integer of the same order (one NaN above
    # +inf, as sort places NaN first; -0.0 made +0.0, equal as in sort), then the id
    # reversed in the low 32 bits, so that among equal logits the lower id is larger
    x = logits.float()
    x = torch.where(x.isnan(), float("nan"), x) + 0.0
    bits = x.view(torch.int32)
    ordered = bits ^ ((bits >> 31) & 0x7FFFFFFF)
    n = logits.shape[1]
    rev_ids = torch.arange(n - 1, -1, -1, device=logits.device)
    keys = ordered.long() * 2**32 + rev_ids  # (a product: no shift of a negative number)
    top = keys.topk(width, dim=-1, sorted=True).values
    ids = (n - 1) - (top & 0xFFFFFFFF)
    return logits.gather(1, ids), ids


def masked_softmax(logits: torch.Tensor, alive: torch.Tensor | None) -> torch.Tensor:
    # as llama_sampler_softmax_impl over the remaining candidates; a row with no finite
    # candidate gets all zeros instead of NaN
    x = logits if alive is None else logits.masked_fill(~alive, _NEG_INF)
    return x.softmax(dim=-1).nan_to_num(0.0)


def _cut_after_first(stop: torch.Tensor) -> torch.Tensor:
    """Keep positions up to and including the first True of each row; all if none: (B, K)."""
    first = stop.int().argmax(dim=-1, keepdim=True)  # first maximal index
    pos = torch.arange(stop.shape[1], device=stop.device).unsqueeze(0)
    return ~stop.any(dim=-1, keepdim=True) | (pos <= first)


def top_k(c: Candidates, k: torch.Tensor) -> None:
    # as llama_sampler_top_k_impl: k <= 0 disables, k is clamped to the candidate count
    if c.alive is None:  # all alive: the rank is the position
        rank = torch.arange(1, c.logits.shape[1] + 1, device=c.logits.device)
        c.alive = (rank <= k) | (k <= 0)
        return
    rank = c.alive.cumsum(dim=-1)  # candidates so far, this one included
    c.alive = c.alive & ((rank <= k) | (k <= 0))


def typical(c: Candidates, typical_p: torch.Tensor, min_keep: torch.Tensor) -> None:
    # as llama_sampler_typical_apply: sort by |-log p - H|, keep until cum > p (strict)
    alive = c.alive_mask()
    p = masked_softmax(c.logits, alive)
    entropy = -torch.xlogy(p, p).sum(dim=-1, keepdim=True)  # 0 log 0 = 0
    score = (-p.log() - entropy).abs()
    big = torch.finfo(score.dtype).max  # p = 0 candidates last, then non-candidates
    score = torch.where(p > 0, score, big).masked_fill(~alive, float("inf"))
    order = score.argsort(dim=-1, stable=True)  # (B, K)
    cum = p.gather(1, order).cumsum(dim=-1)
    rank = torch.arange(1, p.shape[1] + 1, device=p.device)  # candidates come first in order
    stop = alive.gather(1, order) & (cum > typical_p) & (rank >= min_keep)
    keep = torch.zeros_like(alive).scatter_(1, order, _cut_after_first(stop))
    c.alive = alive & (keep | (typical_p >= 1.0))


def top_p(c: Candidates, p_keep: torch.Tensor, min_keep: torch.Tensor) -> None:
    # as llama_sampler_top_p_apply: in logit order keep until cum >= p and >= min_keep kept
    alive = c.alive_mask()
    p = masked_softmax(c.logits, alive)
    cum = p.cumsum(dim=-1)
    rank = alive.cumsum(dim=-1)
    stop = alive & (cum >= p_keep) & (rank >= min_keep)
    c.alive = alive & (_cut_after_first(stop) | (p_keep >= 1.0))


def min_p(c: Candidates, p_min: torch.Tensor, min_keep: torch.Tensor) -> None:
    # as llama_sampler_min_p_apply: p_i >= min_p * p_max <=> logit_i >= max + log(min_p);
    # both of its paths keep the top max(#passing, min_keep, 1) candidates
    alive = c.alive_mask()
    min_logit = c.masked().amax(dim=-1, keepdim=True) + p_min.log()
    rank = alive.cumsum(dim=-1)
    keep = (c.logits >= min_logit) | (rank <= min_keep.clamp_min(1))
    c.alive = alive & (keep | (p_min <= 0.0))


def xtc(
    c: Candidates,
    probability: torch.Tensor,
    threshold: torch.Tensor,
    min_keep: torch.Tensor,
    u: torch.Tensor,
) -> None:
    """As llama_sample_xtc_apply: with chance `probability` (u <= probability, u the row's
    XTC draw) remove every candidate with p >= threshold except the least likely of them,
    unless fewer than min_keep would remain. Rows with probability 0 are untouched."""
    alive = c.alive_mask()
    p = masked_softmax(c.logits, alive)
    size = alive.sum(dim=-1, keepdim=True)
    n_above = (alive & (p >= threshold)).sum(dim=-1, keepdim=True)  # a prefix: sorted
    pos_last = (n_above - 1).clamp_min(0)
    applies = (
        (probability > 0)
        & (threshold <= 0.5)
        & (size >= 2)
        & (u <= probability)
        & (size - pos_last >= min_keep)
        & (pos_last > 0)
    )
    rank = alive.cumsum(dim=-1)
    c.alive = alive & ((rank > pos_last) | ~applies)


def top_n_sigma(c: Candidates, n: torch.Tensor) -> None:
    """As llama_sampler_top_n_sigma_apply: logits below max - n * std (over the finite
    candidates, population std) become -inf; they stay candidates. n <= 0 disables."""
    alive = c.alive
    finite = c.logits != _NEG_INF
    if alive is not None:
        finite &= alive
    count = finite.sum(dim=-1, keepdim=True)
    x = torch.where(finite, c.logits, 0.0)
    mean = x.sum(dim=-1, keepdim=True) / count.clamp_min(1)
    var = torch.where(finite, (c.logits - mean) ** 2, 0.0).sum(dim=-1, keepdim=True)
    std = (var / count.clamp_min(1)).sqrt()
    peak = c.masked().amax(dim=-1, keepdim=True)
    size = c.logits.shape[1] if alive is None else alive.sum(dim=-1, keepdim=True)
    drop = (n > 0) & (size > 1) & (c.logits < peak - n * std)  # dead entries: no matter
    c.logits = c.logits.masked_fill(drop, _NEG_INF)


def temperature(
    c: Candidates,
    temp: torch.Tensor,
    delta: torch.Tensor,
    exponent: torch.Tensor,
    *,
    dynamic: bool,
    may_be_greedy: bool,
) -> None:
    """As llama_sampler_temp_ext_apply: with delta > 0 the temperature is
    max(0, t - delta) + 2 delta * (H / H_max)^exponent over the candidates (H_max = log of
    their count; none with one candidate or less); then llama_sampler_temp_impl: divide, or
    at temperature <= 0 keep only the first most likely candidate finite.

    `dynamic` / `may_be_greedy`: whether any row has delta > 0 / may end at temperature <= 0
    (known from the params on the host; skips work when not)."""
    t = temp
    if dynamic:
        alive = c.alive
        size = c.logits.shape[1] if alive is None else alive.sum(dim=-1, keepdim=True)
        size = torch.as_tensor(size, device=c.logits.device)
        p = masked_softmax(c.logits, alive)
        entropy = -torch.xlogy(p, p).sum(dim=-1, keepdim=True)
        normalized = entropy / size.clamp_min(2).float().log()
        lo, hi = (temp - delta).clamp_min(0.0), temp + delta
        dyn = lo + (hi - lo) * normalized.pow(exponent)
        t = torch.where(delta > 0, torch.where(size <= 1, 1.0, dyn), temp)
    if not may_be_greedy:
        c.logits = c.logits / t
        return
    greedy = t <= 0
    first_max = c.masked().argmax(dim=-1, keepdim=True)  # the first of equal maxima
    keep = torch.zeros_like(c.logits, dtype=torch.bool).scatter_(1, first_max, True)
    scaled = c.logits / torch.where(greedy, 1.0, t)
    c.logits = torch.where(greedy & ~keep, _NEG_INF, scaled)
