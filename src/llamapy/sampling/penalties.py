"""Logit bias and repetition penalties: the first two stages of llama.cpp's sampler chain.

Both edit the logits of a whole batch in place. The host only gathers each row's bias
entries and the last `repeat_last_n` tokens of its history; the arithmetic is tensor ops.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from llamapy.sampling.params import SamplingParams

# Token histories of a batch: one id list per row, or a [B, L] int tensor where entries
# < 0 are padding (anywhere; the valid entries are read in order).
History = Sequence[Sequence[int]] | torch.Tensor

PAD = -1


def apply_logit_bias(
    logits: torch.Tensor, params: Sequence[SamplingParams], eog_token_ids: Sequence[int] = ()
) -> None:
    """Add each row's logit bias; `ignore_eos` adds -inf to the end-of-generation tokens.

    As llama_sampler_logit_bias_apply (biases add up; common_params_sampling puts the EOG
    bans of ignore_eos into the same bias list).
    """
    rows: list[int] = []
    ids: list[int] = []
    values: list[float] = []
    for row, p in enumerate(params):
        entries = list(p.logit_bias.items())
        if p.ignore_eos:
            entries += [(t, -math.inf) for t in eog_token_ids]
        rows += [row] * len(entries)
        ids += [t for t, _ in entries]
        values += [b for _, b in entries]
    if not rows:
        return
    n_vocab = logits.shape[-1]
    if max(ids) >= n_vocab:
        raise ValueError(f"logit_bias token id {max(ids)} is outside the vocabulary (< {n_vocab})")
    dev = logits.device
    index = (torch.tensor(rows, device=dev), torch.tensor(ids, device=dev))
    bias = torch.tensor(values, dtype=logits.dtype, device=dev)
    logits.index_put_(index, bias, accumulate=True)


def apply_penalties(
    logits: torch.Tensor, params: Sequence[SamplingParams], histories: History | None
) -> None:
    """Repeat, frequency and presence penalties from token counts over the last N tokens.

    As llama_sampler_penalties_apply: a token seen `count > 0` times in the window has its
    logit divided by repeat_penalty if positive, multiplied if <= 0, then lowered by
    `count * frequency_penalty + presence_penalty`. llama.cpp feeds the prompt tokens into
    this window too (common_sampler_accept on the prompt), so histories should hold them.
    """
    rows = [i for i, p in enumerate(params) if p.has_penalties]
    if not rows:
        return
    if histories is None:
        raise ValueError("histories are required when a row has repetition penalties")
    window = _windows(histories, [params[i] for i in rows], rows, logits.device)  # (R, L)
    token, count = _token_counts(window, logits.shape[-1])
    rep, freq, pres = _row_values(
        [
            (params[i].repeat_penalty, params[i].frequency_penalty, params[i].presence_penalty)
            for i in rows
        ],
        logits,
    )
    index = torch.tensor(rows, device=logits.device).unsqueeze(1)  # (R, 1)
    x = logits[index, token]  # (R, L): every read happens before any write
    count = count.to(x.dtype)
    repeated = torch.where(x <= 0, x * rep, x / rep) - (count * freq + pres)
    # a token repeated in the window writes the same value from each of its slots
    logits[index, token] = torch.where(count > 0, repeated, x)


def _token_counts(window: torch.Tensor, n_vocab: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per window slot, its token and how often that token occurs in the row: (R, L) each.

    Sparse on purpose: O(R L log L), never a (R, V) count table. Padding slots (and ids
    outside the vocabulary) point at token 0 with token 0's real count, a harmless rewrite.
    """
    valid = (window >= 0) & (window < n_vocab)
    ordered = torch.where(valid, window, -1).sort(dim=1).values  # padding sorts first
    token = torch.where(valid, window, 0)
    count = torch.searchsorted(ordered, token, right=True) - torch.searchsorted(ordered, token)
    return token, count


def _row_values(values: list[tuple[float, ...]], like: torch.Tensor) -> tuple[torch.Tensor, ...]:
    table = torch.tensor(values, dtype=like.dtype).to(like.device)  # (R, n)
    return tuple(table[:, j : j + 1] for j in range(table.shape[1]))  # each (R, 1)


def _windows(
    histories: History, params: list[SamplingParams], rows: list[int], device: torch.device
) -> torch.Tensor:
    """The last repeat_last_n valid tokens of each penalized row, padded with PAD: (R, L)."""
    if isinstance(histories, torch.Tensor):
        return _tensor_windows(histories, params, rows, device)
    if len(histories) <= max(rows):
        raise ValueError(f"got {len(histories)} histories for row {max(rows)}")
    cut = [_tail(histories[r], p.repeat_last_n) for r, p in zip(rows, params, strict=True)]
    width = max(1, max(len(t) for t in cut))
    padded = [t + [PAD] * (width - len(t)) for t in cut]
    return torch.tensor(padded, dtype=torch.int64).to(device)


def _tail(history: Sequence[int], last_n: int) -> list[int]:
    tail = history if last_n == -1 else history[-last_n:]  # slice first: prompts are long
    return [int(t) for t in tail]


def _tensor_windows(
    histories: torch.Tensor, params: list[SamplingParams], rows: list[int], device: torch.device
) -> torch.Tensor:
    if histories.ndim != 2 or histories.shape[0] <= max(rows):
        raise ValueError(f"history tensor must be (B, L), got {tuple(histories.shape)}")
    h = histories.to(device=device, dtype=torch.int64)[torch.tensor(rows, device=device)]
    width = h.shape[1]
    last_n = torch.tensor(
        [width if p.repeat_last_n == -1 else p.repeat_last_n for p in params], device=device
    ).unsqueeze(1)  # (R, 1)
    valid = h >= 0
    n_from_end = valid.flip(1).cumsum(1).flip(1)  # valid tokens at or after each position
    return torch.where(valid & (n_from_end <= last_n), h, PAD)
