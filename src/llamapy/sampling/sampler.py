"""Batched llama.cpp sampler chain on device tensors: logits (B, V) -> token ids (B,).

The chain is logit bias, then each row's `samplers` in order (default: penalties -> dry ->
top_n_sigma -> top_k -> typ_p -> top_p -> min_p -> xtc -> temperature), then the draw; rows
with mirostat run logit bias -> temperature -> mirostat instead (common_sampler_init). Each
stage mirrors its llama_sampler_*_apply; the candidate-set mechanics are in filters.py.

Rows are grouped by their chain; a batch whose rows share one (the usual case) runs as one
group with no gathering. Within a group each stage runs only if some row turns it on.

The draw (llama_sampler_dist_apply) is inverse-CDF sampling: one uniform double from the
sequence's own torch.Generator, the first candidate in candidate order whose cumulative
(unnormalized, float64) probability reaches u * total. A row draws one number per token for
the draw unless greedy, and, before it, one for XTC when XTC is on (llama.cpp gives XTC its
own generator from the same seed): whatever the batch around it, a seed gives the same
tokens alone or batched. Mirostat's mu is the only other per-sequence state (SamplerState).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from llamapy.sampling import filters
from llamapy.sampling.dry import DryVocab, apply_dry
from llamapy.sampling.filters import Candidates, masked_softmax
from llamapy.sampling.mirostat import mirostat_candidates, surprise
from llamapy.sampling.params import SamplingParams
from llamapy.sampling.penalties import History, apply_logit_bias, apply_penalties
from llamapy.sampling.stages import SamplerStage

_NEG_INF = float("-inf")
_EDITS = (SamplerStage.PENALTIES, SamplerStage.DRY)  # stages that rewrite logits by token


@dataclass(frozen=True, slots=True)
class SamplerOutput:
    """Chosen tokens and log-probabilities, per row either of the raw logits (before any
    sampler, llama-server's n_probs and vLLM's logprobs: the model's own distribution) or,
    with `post_sampling_probs`, of the final distribution the token was drawn from (its
    candidates only; entries past them are -inf). top_* have max(n_probs) columns; a row
    reads its first n_probs."""

    token_ids: torch.Tensor  # (B,) int64
    logprobs: torch.Tensor  # (B,) float32, of the chosen token
    top_token_ids: torch.Tensor  # (B, N) int64, most likely first
    top_logprobs: torch.Tensor  # (B, N) float32


@dataclass(slots=True, eq=False)
class SamplerState:
    """One sequence's sampler state across its tokens: its generator (None: torch's default
    one, not reproducible) and mirostat's mu (None: 2 * mirostat_tau, its start)."""

    generator: torch.Generator | None = None
    mirostat_mu: float | None = None


_ROW_FIELDS = (
    "top_k", "typical_p", "top_p", "min_p", "temperature", "min_keep", "xtc_probability",
    "xtc_threshold", "top_n_sigma", "dynatemp_range", "dynatemp_exponent",
)  # fmt: skip


class _RowParams:
    """Per-row parameters as device columns, each (B, 1): float32 `_ROW_FIELDS` of the
    params, and `greedy` (bool). One host-to-device copy; columns are sliced when read."""

    def __init__(self, table: torch.Tensor) -> None:
        self.table = table  # (B, len(_ROW_FIELDS) + 1)
        self._cols = torch.split(table, 1, dim=1)  # views, one call

    @classmethod
    def build(cls, params: Sequence[SamplingParams], device: torch.device) -> _RowParams:
        rows = [[float(getattr(p, n)) for n in _ROW_FIELDS] + [p.is_greedy] for p in params]
        return cls(torch.tensor(rows, dtype=torch.float32).to(device))

    def __getattr__(self, name: str) -> torch.Tensor:
        col = self._cols[-1] > 0 if name == "greedy" else self._cols[_ROW_FIELDS.index(name)]
        setattr(self, name, col)  # read once per call
        return col

    def take(self, index: torch.Tensor) -> _RowParams:
        return _RowParams(self.table[index])


@dataclass(slots=True)
class _Group:
    """Rows sharing one chain; `index` is None when the group is the whole batch."""

    rows: list[int]
    index: torch.Tensor | None
    mirostat: bool
    stages: tuple[SamplerStage, ...]
    lead: int  # leading penalties / DRY stages, run by process_logits


class Sampler:
    """llama.cpp's sampler chain over a batch of rows with per-row params.

    Args:
        eog_token_ids: end-of-generation tokens, banned in rows with `ignore_eos`.
        dry_vocab: the model's token texts, for DRY's sequence breakers (DryVocab).
    """

    def __init__(self, eog_token_ids: Sequence[int] = (), dry_vocab: DryVocab | None = None):
        self.eog_token_ids = tuple(int(t) for t in eog_token_ids)
        self.dry_vocab = dry_vocab

    def __call__(
        self,
        logits: torch.Tensor,
        params: Sequence[SamplingParams],
        histories: History | None = None,
        generators: Sequence[torch.Generator | SamplerState | None] | None = None,
        *,
        return_logprobs: bool = False,
    ) -> torch.Tensor | SamplerOutput:
        """Pick one token per row.

        Args:
            logits: (B, V) model output, any float dtype, on the device to work on.
            params: one SamplingParams per row.
            histories: per row, the tokens penalties and DRY look at (prompt + generated, as
                llama.cpp); only read for rows with either. See penalties.History.
            generators: per row, the sequence's SamplerState (make_state) or generator
                (make_generator; mirostat rows need a SamplerState); None draws from
                torch's default generator (not reproducible).
            return_logprobs: return a SamplerOutput instead of the ids alone.

        Returns:
            (B,) int64 token ids on logits.device, or a SamplerOutput.
        """
        _check_batch(logits, params, generators)
        states = _states(params, generators)
        groups = _groups(params, logits.device)
        x = self._process(logits, params, histories, groups)
        post = return_logprobs and any(p.post_sampling_probs and p.n_probs for p in params)
        if not post and all(p.picks_argmax for p in params):
            token_ids = x.argmax(dim=-1)  # same as the chain: no stage drops the argmax
            return _logprobs(logits, token_ids, params) if return_logprobs else token_ids
        u_xtc, u_dist = _uniforms(params, states, logits.device)
        rp = _RowParams.build(params, logits.device)
        finals = self._finals(x, params, histories, groups, states, rp, u_xtc)
        positions = [
            self._draw_group(g, c, params, states, rp, u_dist)
            for g, c in zip(groups, finals, strict=True)
        ]
        chosen = [
            c.ids().gather(1, pos).squeeze(1) for c, pos in zip(finals, positions, strict=True)
        ]
        if len(groups) == 1:
            token_ids = chosen[0]
        else:
            token_ids = torch.empty(len(params), dtype=torch.int64, device=logits.device)
            for g, ids in zip(groups, chosen, strict=True):
                token_ids[g.index] = ids
        if not return_logprobs:
            return token_ids
        out = _logprobs(logits, token_ids, params)
        return _with_post_sampling(out, params, groups, finals, positions) if post else out

    def probs(
        self,
        logits: torch.Tensor,
        params: Sequence[SamplingParams],
        histories: History | None = None,
        generators: Sequence[torch.Generator | SamplerState | None] | None = None,
    ) -> torch.Tensor:
        """The distribution the draw samples from, (B, V) float32 (llama.cpp's final cur_p).

        Greedy rows are one-hot on the token they would pick. XTC rows draw their XTC
        number from `generators`; mirostat's mu is read, not updated.
        """
        _check_batch(logits, params, generators)
        states = _states(params, generators)
        groups = _groups(params, logits.device)
        x = self._process(logits, params, histories, groups)
        u_xtc, _ = _uniforms(params, states, logits.device, dist=False)
        rp = _RowParams.build(params, logits.device)
        finals = self._finals(x, params, histories, groups, states, rp, u_xtc)
        out = torch.zeros_like(x)
        for g, c in zip(groups, finals, strict=True):
            p = masked_softmax(c.logits, c.alive)
            one_hot = torch.zeros_like(p).scatter_(1, _best(c), 1.0)
            p = torch.where(_rows(rp.greedy, g), one_hot, p)
            rows = torch.zeros(len(g.rows), x.shape[1], device=x.device).scatter_(1, c.ids(), p)
            if g.index is None:
                out = rows
            else:
                out[g.index] = rows
        return out

    def process_logits(
        self,
        logits: torch.Tensor,
        params: Sequence[SamplingParams],
        histories: History | None = None,
    ) -> torch.Tensor:
        """Logit bias, then the penalties / DRY stages that lead each row's chain, on a
        float32 copy: (B, V)."""
        _check_batch(logits, params, None)
        return self._process(logits, params, histories, _groups(params, logits.device))

    # -- internals ---------------------------------------------------------------------------

    def _process(
        self,
        logits: torch.Tensor,
        params: Sequence[SamplingParams],
        histories: History | None,
        groups: list[_Group],
    ) -> torch.Tensor:
        x = logits.to(torch.float32, copy=True)
        apply_logit_bias(x, params, self.eog_token_ids)
        for g in groups:
            if g.lead == 0:
                continue
            if g.index is None:
                self._edits(x, params, histories, g.stages[: g.lead])
                continue
            xg = x[g.index]
            sub = [params[r] for r in g.rows]
            self._edits(xg, sub, _take(histories, g), g.stages[: g.lead])
            x[g.index] = xg
        return x

    def _edits(
        self,
        x: torch.Tensor,
        params: Sequence[SamplingParams],
        histories: History | None,
        stages: Sequence[SamplerStage],
    ) -> None:
        for stage in stages:
            if stage == SamplerStage.PENALTIES:
                apply_penalties(x, params, histories)
            else:
                rows = [i for i, p in enumerate(params) if p.has_dry]
                if rows:
                    apply_dry(x, params, histories, rows, self.dry_vocab)

    def _finals(
        self,
        x: torch.Tensor,
        params: Sequence[SamplingParams],
        histories: History | None,
        groups: list[_Group],
        states: list[SamplerState],
        rp: _RowParams,
        u_xtc: torch.Tensor | None,
    ) -> list[Candidates]:
        """Each group's final candidates, after its whole chain."""
        finals = []
        for g in groups:
            xg = x if g.index is None else x[g.index]
            rpg = rp if g.index is None else rp.take(g.index)
            sub = params if g.index is None else [params[r] for r in g.rows]
            if g.mirostat:
                finals.append(_mirostat(xg, sub, [states[r] for r in g.rows], rpg))
                continue
            ug = None if u_xtc is None else _rows(u_xtc, g)
            hist = histories if g.index is None else _take(histories, g)
            finals.append(self._chain(xg, sub, hist, g, rpg, ug))
        return finals

    def _chain(
        self,
        x: torch.Tensor,
        params: Sequence[SamplingParams],
        histories: History | None,
        g: _Group,
        rp: _RowParams,
        u_xtc: torch.Tensor | None,
    ) -> Candidates:
        """The group's stages after the leading edits, on candidates."""
        c = Candidates(x, x.shape[1])
        on = _StagesOn(params)
        for stage in g.stages[g.lead :]:
            if stage in _EDITS:
                if on.edits(stage):
                    c.edit_by_token(lambda full, s=stage: self._edits(full, params, histories, [s]))
            elif stage == SamplerStage.TOP_N_SIGMA:
                if on.top_n_sigma:
                    filters.top_n_sigma(c, rp.top_n_sigma)
            elif stage == SamplerStage.TEMPERATURE:
                filters.temperature(
                    c, rp.temperature, rp.dynatemp_range, rp.dynatemp_exponent,
                    dynamic=on.dynatemp, may_be_greedy=on.may_be_greedy,
                )  # fmt: skip
            elif stage == SamplerStage.TOP_K:
                if on.top_k:
                    c.sort(on.top_k_width)
                    filters.top_k(c, rp.top_k)
            elif on.filter(stage):
                c.sort()
                _filter(stage, c, rp, u_xtc)
        return c

    def _draw_group(
        self,
        g: _Group,
        c: Candidates,
        params: Sequence[SamplingParams],
        states: list[SamplerState],
        rp: _RowParams,
        u_dist: torch.Tensor,
    ) -> torch.Tensor:
        pos = _draw(c, _rows(rp.greedy, g), _rows(u_dist, g))
        if g.mirostat:  # mu -= eta * (observed surprise - tau)
            for r, s in zip(g.rows, surprise(c, pos).tolist(), strict=True):
                p, state = params[r], states[r]
                mu = _mu(p, state)
                state.mirostat_mu = mu - p.mirostat_eta * (s - p.mirostat_tau)
        return pos


class _StagesOn:
    """Which stages some row of a group turns on (host-side flags; others are skipped)."""

    def __init__(self, params: Sequence[SamplingParams]) -> None:
        self.penalties = any(p.has_penalties for p in params)
        self.dry = any(p.has_dry for p in params)
        self.top_n_sigma = any(p.top_n_sigma > 0 for p in params)
        self.dynatemp = any(p.dynatemp_range > 0 for p in params)
        self.may_be_greedy = any(
            p.temperature <= 0 or (p.dynatemp_range > 0 and p.temperature <= p.dynatemp_range)
            for p in params
        )
        self.top_k = any(p.top_k > 0 for p in params)
        self.top_k_width = (
            max(p.top_k for p in params) if all(p.top_k > 0 for p in params) else None
        )
        self._filters = {
            SamplerStage.TYPICAL_P: any(p.typical_p < 1.0 for p in params),
            SamplerStage.TOP_P: any(p.top_p < 1.0 for p in params),
            SamplerStage.MIN_P: any(p.min_p > 0.0 for p in params),
            SamplerStage.XTC: any(p.has_xtc for p in params),
        }

    def edits(self, stage: SamplerStage) -> bool:
        return self.penalties if stage == SamplerStage.PENALTIES else self.dry

    def filter(self, stage: SamplerStage) -> bool:
        return self._filters[stage]


def _filter(stage: SamplerStage, c: Candidates, rp: _RowParams, u_xtc: torch.Tensor | None):
    if stage == SamplerStage.TYPICAL_P:
        filters.typical(c, rp.typical_p, rp.min_keep)
    elif stage == SamplerStage.TOP_P:
        filters.top_p(c, rp.top_p, rp.min_keep)
    elif stage == SamplerStage.MIN_P:
        filters.min_p(c, rp.min_p, rp.min_keep)
    else:
        assert u_xtc is not None  # drawn whenever a row has XTC
        filters.xtc(c, rp.xtc_probability, rp.xtc_threshold, rp.min_keep, u_xtc)


def _mirostat(
    x: torch.Tensor, params: Sequence[SamplingParams], states: list[SamplerState], rp: _RowParams
) -> Candidates:
    """Temperature (plain, as common_sampler_init puts before mirostat) then mirostat."""
    c = Candidates(x, x.shape[1])
    zero = torch.zeros_like(rp.temperature)
    greedy = any(p.temperature <= 0 for p in params)
    filters.temperature(c, rp.temperature, zero, zero, dynamic=False, may_be_greedy=greedy)
    cols = [(p.mirostat, p.mirostat_tau, _mu(p, s)) for p, s in zip(params, states, strict=True)]
    table = torch.tensor(cols, dtype=torch.float64).to(x.device)  # (B, 3)
    version, tau, mu = (table[:, j : j + 1] for j in range(3))
    return mirostat_candidates(c.logits, version, tau, mu)


def _mu(p: SamplingParams, state: SamplerState) -> float:
    return 2.0 * p.mirostat_tau if state.mirostat_mu is None else state.mirostat_mu


def make_generator(seed: int | None, device: torch.device | str = "cpu") -> torch.Generator:
    """A sequence's generator: seeded with `seed`, or from OS entropy when None.

    A CPU generator (the default) draws the uniforms per token without a kernel launch.
    """
    g = torch.Generator(device=device)
    if seed is None:
        g.seed()
    else:
        g.manual_seed(seed)
    return g


def make_state(params: SamplingParams, device: torch.device | str = "cpu") -> SamplerState:
    """A new sequence's SamplerState: a generator seeded with params.seed, mirostat's mu unset."""
    return SamplerState(make_generator(params.seed, device))


def _check_batch(
    logits: torch.Tensor,
    params: Sequence[SamplingParams],
    generators: Sequence[object] | None,
) -> None:
    if logits.ndim != 2:
        raise ValueError(f"logits must be (B, V), got shape {tuple(logits.shape)}")
    if len(params) != logits.shape[0]:
        raise ValueError(f"got {len(params)} SamplingParams for {logits.shape[0]} rows")
    if generators is not None and len(generators) != logits.shape[0]:
        raise ValueError(f"got {len(generators)} generators for {logits.shape[0]} rows")


def _states(
    params: Sequence[SamplingParams],
    generators: Sequence[torch.Generator | SamplerState | None] | None,
) -> list[SamplerState]:
    if generators is None:
        generators = [None] * len(params)
    states = []
    for p, g in zip(params, generators, strict=True):
        if isinstance(g, SamplerState):
            states.append(g)
            continue
        if p.mirostat and g is not None:
            raise ValueError("mirostat keeps mu from token to token: pass a SamplerState per row")
        states.append(SamplerState(g))
    return states


def _groups(params: Sequence[SamplingParams], device: torch.device) -> list[_Group]:
    """Rows by chain, in order of first appearance."""
    first = params[0].samplers if params else ()
    if all(not p.mirostat and p.samplers == first for p in params):  # the usual case
        return [_Group(list(range(len(params))), None, False, first, _lead(first))]
    by_key: dict[tuple, list[int]] = {}
    for i, p in enumerate(params):
        by_key.setdefault((bool(p.mirostat), () if p.mirostat else p.samplers), []).append(i)
    whole = len(by_key) == 1
    groups = []
    for (mirostat, stages), rows in by_key.items():
        index = None if whole else torch.tensor(rows, device=device)
        groups.append(_Group(rows, index, mirostat, stages, _lead(stages)))
    return groups


def _lead(stages: tuple[SamplerStage, ...]) -> int:
    lead = 0
    while lead < len(stages) and stages[lead] in _EDITS:
        lead += 1
    return lead


def _take(histories: History | None, g: _Group) -> History | None:
    if histories is None or g.index is None:
        return histories
    if isinstance(histories, torch.Tensor):
        return histories[g.index.to(histories.device)]
    return [histories[r] for r in g.rows]


def _rows(column: torch.Tensor, g: _Group) -> torch.Tensor:
    return column if g.index is None else column[g.index]


def _best(c: Candidates) -> torch.Tensor:
    """Position (B, 1) of the first most likely candidate (a dead entry only if none is alive;
    alive -inf entries rank above dead ones)."""
    floor = torch.finfo(c.logits.dtype).min
    key = c.logits.nan_to_num(neginf=floor)
    if c.alive is not None:
        key = key.masked_fill(~c.alive, _NEG_INF)
    return key.argmax(dim=-1, keepdim=True)


def _draw(c: Candidates, greedy: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Position (B, 1) of each row's token among its candidates: llama's dist."""
    masked = c.masked()
    peak = masked.amax(dim=-1, keepdim=True)
    weight = (masked - peak).exp().nan_to_num(0.0).double()  # unnormalized, as dist
    cum = weight.cumsum(dim=-1)
    hit = (cum >= u * cum[:, -1:]) & (weight > 0)
    first_hit = hit.int().argmax(dim=-1, keepdim=True)
    # greedy rows (one finite candidate left), and rows with no finite candidate
    best = masked.argmax(dim=-1, keepdim=True)
    return torch.where(greedy | ~hit.any(dim=-1, keepdim=True), best, first_hit)


def _uniforms(
    params: Sequence[SamplingParams],
    states: list[SamplerState],
    device: torch.device,
    *,
    dist: bool = True,
) -> tuple[torch.Tensor | None, torch.Tensor]:
    """Per row, from its own generator: XTC's U[0, 1) double (when XTC is on, drawn first)
    and the draw's (unless greedy; 0 otherwise). ((B, 1) or None, (B, 1)) float64."""
    xtc: list[torch.Tensor | None] = []
    draw: list[torch.Tensor | None] = []
    for p, s in zip(params, states, strict=True):
        xtc.append(_rand(s.generator) if p.has_xtc else None)
        draw.append(_rand(s.generator) if dist and not p.is_greedy else None)
    any_xtc = any(u is not None for u in xtc)
    return (_stack(xtc, device) if any_xtc else None), _stack(draw, device)


def _rand(g: torch.Generator | None) -> torch.Tensor:
    if g is None:
        return torch.rand((), dtype=torch.float64)
    return torch.rand((), dtype=torch.float64, generator=g, device=g.device)


def _stack(draws: list[torch.Tensor | None], device: torch.device) -> torch.Tensor:
    zero = torch.zeros((), dtype=torch.float64)
    filled = [zero if d is None else d for d in draws]
    if all(d.device.type == "cpu" for d in filled):
        return torch.stack(filled).to(device).unsqueeze(1)  # one host-to-device copy
    return torch.stack([d.to(device) for d in filled]).unsqueeze(1)


def _logprobs(
    logits: torch.Tensor, token_ids: torch.Tensor, params: Sequence[SamplingParams]
) -> SamplerOutput:
    logp = logits.float().log_softmax(dim=-1)  # (B, V)
    chosen = logp.gather(1, token_ids.unsqueeze(1)).squeeze(1)
    n = min(max((p.n_probs for p in params), default=0), logp.shape[1])
    top_logprobs, top_ids = logp.topk(n, dim=-1, sorted=True)
    return SamplerOutput(token_ids, chosen, top_ids, top_logprobs)


def _with_post_sampling(
    out: SamplerOutput,
    params: Sequence[SamplingParams],
    groups: list[_Group],
    finals: list[Candidates],
    positions: list[torch.Tensor],
) -> SamplerOutput:
    """Rows with post_sampling_probs report the final distribution (server's
    post_sampling_probs: common_sampler_get_candidates sorted by p)."""
    chosen, top_lp = out.logprobs.clone(), out.top_logprobs.clone()
    top_ids = out.top_token_ids.clone()
    n = top_ids.shape[1]
    for g, c, pos in zip(groups, finals, positions, strict=True):
        post = [i for i, r in enumerate(g.rows) if params[r].post_sampling_probs]
        if not post:
            continue
        p = masked_softmax(c.logits, c.alive)  # (G, K)
        logp = p.log()
        k = min(n, p.shape[1])
        vals, idx = p.topk(k, dim=-1, sorted=True)
        ids = c.ids().gather(1, idx)
        lp = vals.log()
        if k < n:  # fewer candidates than asked for: pad
            lp = torch.cat([lp, lp.new_full((lp.shape[0], n - k), _NEG_INF)], dim=1)
            ids = torch.cat([ids, ids.new_zeros((ids.shape[0], n - k))], dim=1)
        local = torch.tensor(post, device=p.device)
        rows = torch.tensor([g.rows[i] for i in post], device=p.device)
        chosen[rows] = logp.gather(1, pos).squeeze(1)[local]
        top_ids[rows] = ids[local]
        top_lp[rows] = lp[local]
    return SamplerOutput(out.token_ids, chosen, top_ids, top_lp)
