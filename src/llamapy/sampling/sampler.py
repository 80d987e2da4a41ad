"""Batched llama.cpp sampler chain on device tensors: logits (B, V) -> token ids (B,).

The chain is params.DEFAULT_CHAIN: logit bias -> penalties -> top-k -> typical -> top-p ->
min-p -> temperature -> dist, each stage mirroring its llama_sampler_*_apply.

How llama.cpp's shrinking candidate list maps onto tensors: after bias and penalties the
logits no longer change until temperature, so each row is sorted once (descending; a
`topk` of the largest top_k in the batch when every row has top_k > 0, else a full stable
sort). A boolean `alive` mask then stands for "still a candidate": each filter only clears
entries, computes its probabilities over the alive entries (temperature 1, since temperature
comes last) and counts `min_keep` over alive entries in logit order, as llama.cpp counts
over its candidate array. Tokens whose logit is -inf (banned by a bias) stay candidates, as
in llama.cpp, but have probability 0 and are never drawn.

The draw (llama_sampler_dist_apply) is inverse-CDF sampling: one uniform double from the
sequence's own torch.Generator, the first candidate in logit order whose cumulative
(unnormalized, float64) probability reaches u * total. Each sampled token consumes exactly
one number from its sequence's generator, whatever the batch around it, so a seed gives
the same tokens alone or batched. Greedy rows (temperature <= 0) consume none.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from llamapy.sampling.params import SamplingParams
from llamapy.sampling.penalties import History, apply_logit_bias, apply_penalties

_NEG_INF = float("-inf")


@dataclass(frozen=True, slots=True)
class SamplerOutput:
    """Chosen tokens and log-probabilities of the raw logits (before any sampler).

    Like llama-server's n_probs (post_sampling_probs off) and vLLM's logprobs: the model's
    own distribution. top_* have max(n_probs) columns; a row reads its first n_probs.
    """

    token_ids: torch.Tensor  # (B,) int64
    logprobs: torch.Tensor  # (B,) float32, of the chosen token
    top_token_ids: torch.Tensor  # (B, N) int64, most likely first
    top_logprobs: torch.Tensor  # (B, N) float32


@dataclass(slots=True)
class _Candidates:
    """Each row's tokens in descending logit order, and which are still candidates."""

    logits: torch.Tensor  # (B, K) float32, sorted descending
    token_ids: torch.Tensor  # (B, K) int64
    alive: torch.Tensor  # (B, K) bool


@dataclass(frozen=True, slots=True)
class _RowParams:
    """Per-row parameters as float32 device columns, each (B, 1)."""

    top_k: torch.Tensor
    typical_p: torch.Tensor
    top_p: torch.Tensor
    min_p: torch.Tensor
    temperature: torch.Tensor
    min_keep: torch.Tensor

    @classmethod
    def build(cls, params: Sequence[SamplingParams], device: torch.device) -> _RowParams:
        rows = [(p.top_k, p.typical_p, p.top_p, p.min_p, p.temperature, p.min_keep) for p in params]
        table = torch.tensor(rows, dtype=torch.float32).to(device)  # (B, 6), one copy
        return cls(*(table[:, j : j + 1] for j in range(table.shape[1])))


class Sampler:
    """llama.cpp's default sampler chain over a batch of rows with per-row params.

    Args:
        eog_token_ids: end-of-generation tokens, banned in rows with `ignore_eos`.
    """

    def __init__(self, eog_token_ids: Sequence[int] = ()) -> None:
        self.eog_token_ids = tuple(int(t) for t in eog_token_ids)

    def __call__(
        self,
        logits: torch.Tensor,
        params: Sequence[SamplingParams],
        histories: History | None = None,
        generators: Sequence[torch.Generator | None] | None = None,
        *,
        return_logprobs: bool = False,
    ) -> torch.Tensor | SamplerOutput:
        """Pick one token per row.

        Args:
            logits: (B, V) model output, any float dtype, on the device to work on.
            params: one SamplingParams per row.
            histories: per row, the tokens the penalties look at (prompt + generated, as
                llama.cpp); only read for rows with penalties. See penalties.History.
            generators: per row, the sequence's generator (make_generator); None draws
                from torch's default generator (not reproducible).
            return_logprobs: return a SamplerOutput instead of the ids alone.

        Returns:
            (B,) int64 token ids on logits.device, or a SamplerOutput.
        """
        _check_batch(logits, params, generators)
        x = self.process_logits(logits, params, histories)
        if _all_plain_greedy(params):
            token_ids = x.argmax(dim=-1)  # same as the chain: no filter drops the argmax
        else:
            cand, temp = self._truncate(x, params)
            pos = _draw(cand, temp, params, generators)  # (B, 1)
            token_ids = cand.token_ids.gather(1, pos).squeeze(1)
        if not return_logprobs:
            return token_ids
        return _logprobs(logits, token_ids, params)

    def probs(
        self,
        logits: torch.Tensor,
        params: Sequence[SamplingParams],
        histories: History | None = None,
    ) -> torch.Tensor:
        """The distribution the draw samples from, (B, V) float32 (llama.cpp's final cur_p).

        Greedy rows are one-hot on the token they would pick.
        """
        _check_batch(logits, params, None)
        x = self.process_logits(logits, params, histories)
        cand, temp = self._truncate(x, params)
        p = _masked_softmax(_scaled(cand.logits, temp), cand.alive)  # (B, K)
        one_hot = torch.zeros_like(p).scatter_(1, _first_alive(cand.alive), 1.0)
        p = torch.where(temp <= 0, one_hot, p)
        return torch.zeros_like(x).scatter_(1, cand.token_ids, p)

    def process_logits(
        self,
        logits: torch.Tensor,
        params: Sequence[SamplingParams],
        histories: History | None = None,
    ) -> torch.Tensor:
        """Logit bias then penalties, on a float32 copy: (B, V)."""
        x = logits.to(torch.float32, copy=True)
        apply_logit_bias(x, params, self.eog_token_ids)
        apply_penalties(x, params, histories)
        return x

    def _truncate(
        self, x: torch.Tensor, params: Sequence[SamplingParams]
    ) -> tuple[_Candidates, torch.Tensor]:
        """top-k -> typical -> top-p -> min-p; returns candidates and the (B, 1) temperature."""
        rp = _RowParams.build(params, x.device)
        cand = _sorted_candidates(x, params)
        _top_k(cand, rp.top_k)
        if any(p.typical_p < 1.0 for p in params):
            _typical(cand, rp.typical_p, rp.min_keep)
        if any(p.top_p < 1.0 for p in params):
            _top_p(cand, rp.top_p, rp.min_keep)
        if any(p.min_p > 0.0 for p in params):
            _min_p(cand, rp.min_p, rp.min_keep)
        return cand, rp.temperature


def make_generator(seed: int | None, device: torch.device | str = "cpu") -> torch.Generator:
    """A sequence's generator: seeded with `seed`, or from OS entropy when None.

    A CPU generator (the default) draws the one uniform per token without a kernel launch.
    """
    g = torch.Generator(device=device)
    if seed is None:
        g.seed()
    else:
        g.manual_seed(seed)
    return g


def _check_batch(
    logits: torch.Tensor,
    params: Sequence[SamplingParams],
    generators: Sequence[torch.Generator | None] | None,
) -> None:
    if logits.ndim != 2:
        raise ValueError(f"logits must be (B, V), got shape {tuple(logits.shape)}")
    if len(params) != logits.shape[0]:
        raise ValueError(f"got {len(params)} SamplingParams for {logits.shape[0]} rows")
    if generators is not None and len(generators) != logits.shape[0]:
        raise ValueError(f"got {len(generators)} generators for {logits.shape[0]} rows")


def _all_plain_greedy(params: Sequence[SamplingParams]) -> bool:
    # typical sampling may drop the most likely token; every other filter keeps it
    return all(p.is_greedy and p.typical_p >= 1.0 for p in params)


def _sorted_candidates(x: torch.Tensor, params: Sequence[SamplingParams]) -> _Candidates:
    n_vocab = x.shape[1]
    if all(p.top_k > 0 for p in params):
        width = min(max(p.top_k for p in params), n_vocab)
        logits, ids = x.topk(width, dim=-1, sorted=True)  # (B, K)
    else:
        logits, ids = x.sort(dim=-1, descending=True, stable=True)  # (B, V)
    alive = torch.ones_like(logits, dtype=torch.bool)
    return _Candidates(logits, ids, alive)


def _positions(cand: _Candidates) -> torch.Tensor:
    return torch.arange(cand.logits.shape[1], device=cand.logits.device).unsqueeze(0)  # (1, K)


def _masked_softmax(logits: torch.Tensor, alive: torch.Tensor) -> torch.Tensor:
    # as llama_sampler_softmax_impl over the remaining candidates; a row with no finite
    # candidate gets all zeros instead of NaN
    return logits.masked_fill(~alive, _NEG_INF).softmax(dim=-1).nan_to_num(0.0)


def _cut_after_first(stop: torch.Tensor) -> torch.Tensor:
    """Keep positions up to and including the first True of each row; all if none: (B, K)."""
    first = stop.int().argmax(dim=-1, keepdim=True)  # first maximal index
    pos = torch.arange(stop.shape[1], device=stop.device).unsqueeze(0)
    return ~stop.any(dim=-1, keepdim=True) | (pos <= first)


def _top_k(cand: _Candidates, top_k: torch.Tensor) -> None:
    # as llama_sampler_top_k_impl: k <= 0 disables, k is clamped to the candidate count
    width = cand.logits.shape[1]
    k = torch.where(top_k > 0, top_k.clamp_max(width), width)
    cand.alive &= _positions(cand) < k


def _typical(cand: _Candidates, typical_p: torch.Tensor, min_keep: torch.Tensor) -> None:
    # as llama_sampler_typical_apply: sort by |-log p - H|, keep until cum > p (strict)
    p = _masked_softmax(cand.logits, cand.alive)
    entropy = -torch.xlogy(p, p).sum(dim=-1, keepdim=True)  # 0 log 0 = 0
    score = (-p.log() - entropy).abs()
    big = torch.finfo(score.dtype).max  # p = 0 candidates last, then non-candidates
    score = torch.where(p > 0, score, big).masked_fill(~cand.alive, float("inf"))
    order = score.argsort(dim=-1, stable=True)  # (B, K)
    cum = p.gather(1, order).cumsum(dim=-1)
    rank = _positions(cand) + 1  # candidates come first in `order`
    stop = cand.alive.gather(1, order) & (cum > typical_p) & (rank >= min_keep)
    keep = torch.zeros_like(cand.alive).scatter_(1, order, _cut_after_first(stop))
    cand.alive &= keep | (typical_p >= 1.0)


def _top_p(cand: _Candidates, top_p: torch.Tensor, min_keep: torch.Tensor) -> None:
    # as llama_sampler_top_p_apply: in logit order keep until cum >= p and >= min_keep kept
    p = _masked_softmax(cand.logits, cand.alive)
    cum = p.cumsum(dim=-1)
    rank = cand.alive.cumsum(dim=-1)  # candidates so far, this one included
    stop = cand.alive & (cum >= top_p) & (rank >= min_keep)
    cand.alive &= _cut_after_first(stop) | (top_p >= 1.0)


def _min_p(cand: _Candidates, min_p: torch.Tensor, min_keep: torch.Tensor) -> None:
    # as llama_sampler_min_p_apply: p_i >= min_p * p_max <=> logit_i >= max + log(min_p);
    # both of its paths keep the top max(#passing, min_keep, 1) candidates
    masked = cand.logits.masked_fill(~cand.alive, _NEG_INF)
    min_logit = masked.amax(dim=-1, keepdim=True) + min_p.log()
    rank = cand.alive.cumsum(dim=-1)
    keep = (cand.logits >= min_logit) | (rank <= min_keep.clamp_min(1))
    cand.alive &= keep | (min_p <= 0.0)


def _first_alive(alive: torch.Tensor) -> torch.Tensor:
    # the highest logit left: llama_sampler_temp_impl with temp <= 0 keeps only it
    return alive.int().argmax(dim=-1, keepdim=True)  # (B, 1)


def _scaled(logits: torch.Tensor, temperature: torch.Tensor) -> torch.Tensor:
    # llama_sampler_temp_impl divides by temp; temp <= 0 rows are handled by _first_alive
    return logits / torch.where(temperature <= 0, 1.0, temperature)


def _draw(
    cand: _Candidates,
    temperature: torch.Tensor,
    params: Sequence[SamplingParams],
    generators: Sequence[torch.Generator | None] | None,
) -> torch.Tensor:
    """Position (B, 1) in `cand` of each row's token: temperature, then llama's dist."""
    greedy = temperature <= 0
    scaled = _scaled(cand.logits, temperature).masked_fill(~cand.alive, _NEG_INF)
    peak = scaled.amax(dim=-1, keepdim=True)
    weight = (scaled - peak).exp().nan_to_num(0.0).double()  # unnormalized, as dist
    cum = weight.cumsum(dim=-1)
    u = _uniforms(params, generators, cand.logits.device)  # (B, 1) float64
    hit = (cum >= u * cum[:, -1:]) & (weight > 0)
    first_hit = hit.int().argmax(dim=-1, keepdim=True)
    fallback = _first_alive(cand.alive)  # greedy rows, and rows with no finite candidate
    return torch.where(greedy | ~hit.any(dim=-1, keepdim=True), fallback, first_hit)


def _uniforms(
    params: Sequence[SamplingParams],
    generators: Sequence[torch.Generator | None] | None,
    device: torch.device,
) -> torch.Tensor:
    """One U[0, 1) double per sampled row from its own generator; 0 for greedy rows."""
    gens = generators if generators is not None else [None] * len(params)
    draws = []
    for p, g in zip(params, gens, strict=True):
        if p.is_greedy:
            draws.append(torch.zeros((), dtype=torch.float64))
        elif g is None:
            draws.append(torch.rand((), dtype=torch.float64))
        else:
            draws.append(torch.rand((), dtype=torch.float64, generator=g, device=g.device))
    if all(d.device.type == "cpu" for d in draws):
        return torch.stack(draws).to(device).unsqueeze(1)  # one host-to-device copy
    return torch.stack([d.to(device) for d in draws]).unsqueeze(1)


def _logprobs(
    logits: torch.Tensor, token_ids: torch.Tensor, params: Sequence[SamplingParams]
) -> SamplerOutput:
    logp = logits.float().log_softmax(dim=-1)  # (B, V)
    chosen = logp.gather(1, token_ids.unsqueeze(1)).squeeze(1)
    n = min(max((p.n_probs for p in params), default=0), logp.shape[1])
    top_logprobs, top_ids = logp.topk(n, dim=-1, sorted=True)
    return SamplerOutput(token_ids, chosen, top_ids, top_logprobs)
