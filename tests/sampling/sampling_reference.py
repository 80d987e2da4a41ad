"""A direct numpy transcription of llama.cpp's sampler chain, the oracle of the tests.

It works as llama.cpp does, on a shrinking list of candidate ids, one row at a time, in
float64, with the loops of src/llama-sampling.cpp written out. Besides the final
distribution it returns a `margin`: how close the row came to a decision boundary (a
cumulative sum next to p, a logit next to the min-p cut, two sort keys next to each other
at a cut). Tests redraw rows with a tiny margin, where float32 rounding may legitimately
decide the other way.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence

import numpy as np

from llamapy.sampling import SamplingParams


class Oracle:
    def __init__(self, logits: np.ndarray) -> None:
        self.logits = logits.astype(np.float64).copy()  # (V,)
        self.margin = math.inf

    def near(self, a: float, b: float) -> None:
        if math.isfinite(a) and math.isfinite(b):
            self.margin = min(self.margin, abs(a - b) / max(1.0, abs(b)))

    def order_by_logit(self, cand: list[int]) -> list[int]:
        return sorted(cand, key=lambda t: -self.logits[t])  # stable, like a stable sort

    def softmax(self, cand: list[int]) -> np.ndarray:
        x = self.logits[cand]
        with np.errstate(invalid="ignore"):
            e = np.exp(x - x.max())
        return e / e.sum()


def logit_bias(o: Oracle, p: SamplingParams, eog: Sequence[int]) -> None:
    for t, b in p.logit_bias.items():
        o.logits[t] += b
    if p.ignore_eos:
        for t in eog:
            o.logits[t] += -math.inf


def penalties(o: Oracle, p: SamplingParams, history: Sequence[int]) -> None:
    if p.repeat_last_n == 0:
        return
    window = list(history) if p.repeat_last_n == -1 else list(history)[-p.repeat_last_n :]
    for t, count in Counter(window).items():
        x = o.logits[t]
        x = x * p.repeat_penalty if x <= 0 else x / p.repeat_penalty
        o.logits[t] = x - (count * p.frequency_penalty + p.presence_penalty)


def top_k(o: Oracle, cand: list[int], k: int) -> list[int]:
    if k <= 0:
        return cand
    k = min(k, len(cand))
    ordered = o.order_by_logit(cand)
    if k < len(ordered):
        o.near(o.logits[ordered[k - 1]], o.logits[ordered[k]])
    return ordered[:k]


def typical(o: Oracle, cand: list[int], tp: float, min_keep: int) -> list[int]:
    if tp >= 1.0:
        return cand
    cand = o.order_by_logit(cand)
    probs = o.softmax(cand)
    entropy = -sum(q * math.log(q) for q in probs if q > 0)
    scores = [abs(-math.log(q) - entropy) if q > 0 else math.inf for q in probs]
    order = sorted(range(len(cand)), key=lambda i: scores[i])
    cum, last = 0.0, len(order)
    for i, idx in enumerate(order):
        cum += probs[idx]
        o.near(cum, tp)
        if cum > tp and (min_keep == 0 or i >= min_keep - 1):
            last = i + 1
            break
    for a, b in ((last - 2, last - 1), (last - 1, last)):
        if a >= 0 and b < len(order):
            o.near(scores[order[a]], scores[order[b]])
    return [cand[i] for i in order[:last]]


def top_p(o: Oracle, cand: list[int], tp: float, min_keep: int) -> list[int]:
    if tp >= 1.0:
        return cand
    cand = o.order_by_logit(cand)
    probs = o.softmax(cand)
    cum, last = 0.0, len(cand)
    for i in range(len(cand)):
        cum += probs[i]
        o.near(cum, tp)
        if cum >= tp and i + 1 >= min_keep:
            last = i + 1
            break
    return cand[:last]


def min_p(o: Oracle, cand: list[int], mp: float, min_keep: int) -> list[int]:
    if mp <= 0.0 or not cand:
        return cand
    max_logit = max(o.logits[t] for t in cand)
    min_logit = max_logit + math.log(mp)
    for t in cand:
        if o.logits[t] != max_logit:  # the max itself passes exactly in any precision
            o.near(o.logits[t], min_logit)
    filtered = [t for t in cand if o.logits[t] >= min_logit]
    if filtered and len(filtered) >= min_keep:
        return filtered
    ordered = o.order_by_logit(cand)
    i = 1
    while i < len(ordered) and not (o.logits[ordered[i]] < min_logit and i >= min_keep):
        i += 1
    return ordered[:i]


def final_probs(o: Oracle, cand: list[int], temperature: float) -> np.ndarray:
    out = np.zeros_like(o.logits)
    if temperature <= 0:
        ordered = o.order_by_logit(cand)
        if len(ordered) > 1:
            o.near(o.logits[ordered[0]], o.logits[ordered[1]])
        out[ordered[0]] = 1.0
        return out
    x = o.logits[cand] / temperature
    e = np.exp(x - x.max())
    out[cand] = e / e.sum()
    return out


def reference(
    logits: np.ndarray,
    p: SamplingParams,
    history: Sequence[int] = (),
    eog: Sequence[int] = (),
) -> tuple[np.ndarray, np.ndarray, float]:
    """llama.cpp's chain on one row: (final distribution, logits after penalties, margin)."""
    o = Oracle(logits)
    logit_bias(o, p, eog)
    penalties(o, p, history)
    processed = o.logits.copy()
    cand = list(range(len(o.logits)))
    cand = top_k(o, cand, p.top_k)
    cand = typical(o, cand, p.typical_p, p.min_keep)
    cand = top_p(o, cand, p.top_p, p.min_keep)
    cand = min_p(o, cand, p.min_p, p.min_keep)
    return final_probs(o, cand, p.temperature), processed, o.margin
