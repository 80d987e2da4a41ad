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


def top_n_sigma(o: Oracle, cand: list[int], n: float) -> list[int]:
    if n <= 0 or len(cand) <= 1:
        return cand
    finite = [o.logits[t] for t in cand if o.logits[t] != -math.inf]
    if not finite:
        return cand
    top = max(finite)
    mean = sum(finite) / len(finite)
    std = math.sqrt(sum((x - mean) ** 2 for x in finite) / len(finite))
    cut = top - n * std
    for t in cand:
        if o.logits[t] != top:
            o.near(o.logits[t], cut)
        if o.logits[t] < cut:
            o.logits[t] = -math.inf
    return cand


def xtc(
    o: Oracle, cand: list[int], prob: float, threshold: float, min_keep: int, u: float
) -> list[int]:
    """u: the row's XTC draw; the sampler runs when u <= prob."""
    if prob <= 0 or threshold > 0.5 or len(cand) < 2 or u > prob:
        return cand
    cand = o.order_by_logit(cand)
    probs = o.softmax(cand)
    pos_last = 0
    for i, q in enumerate(probs):
        o.near(q, threshold)
        if q >= threshold:
            pos_last = i
        else:
            break
    if len(cand) - pos_last >= min_keep and pos_last > 0:
        return cand[pos_last:]
    return cand


def temperature(o: Oracle, cand: list[int], temp: float, delta: float, exponent: float) -> None:
    """llama_sampler_temp_ext: dynamic temperature when delta > 0, then temp_impl."""
    if delta > 0:
        if len(cand) <= 1:
            return
        probs = o.softmax(cand)
        entropy = -sum(q * math.log(q) for q in probs if q > 0)
        normalized = entropy / math.log(len(cand))
        lo, hi = max(0.0, temp - delta), temp + delta
        temp = lo + (hi - lo) * normalized**exponent
    if temp <= 0:
        ordered = o.order_by_logit(cand)
        if len(ordered) > 1:
            o.near(o.logits[ordered[0]], o.logits[ordered[1]])
        for t in ordered[1:]:
            o.logits[t] = -math.inf
        return
    for t in cand:
        o.logits[t] /= temp


def dry(o: Oracle, p: SamplingParams, history: Sequence[int], breakers) -> None:
    """DRY by its definition: a token that would extend a repeat of the end of the window
    (not reaching back past the most recent sequence breaker) of length >= allowed loses
    multiplier * base^(length - allowed). `breakers`: {head: [tails]}."""
    window = list(history) if p.dry_penalty_last_n == -1 else list(history)[-p.dry_penalty_last_n :]
    n, allowed = len(window), p.dry_allowed_length
    if not p.has_dry or n <= allowed:
        return
    # the most recent breaker: the head closest to the end whose tail follows it in full
    limit = n
    for head_pos in range(n - 1, -1, -1):
        tails = [list(t) for t in breakers.get(window[head_pos], ())]
        after = window[head_pos + 1 :]
        fitting = [t for t in tails if after[: len(t)] == t]
        if fitting:
            limit = len(after) - max(len(t) for t in fitting)
            break
    if limit < allowed:
        return
    longest: dict[int, int] = {}
    for end in range(n - 1):  # a repeat of the window's end, ending at `end`
        length = 0
        while length <= end and window[end - length] == window[n - 1 - length]:
            length += 1
        length = min(length, limit)
        if length >= allowed:
            nxt = window[end + 1]
            longest[nxt] = max(longest.get(nxt, 0), length)
    max_exp = int(88.7228391 / math.log(p.dry_base)) if p.dry_base > 1.000001 else 0
    for token, length in longest.items():
        if () in breakers.get(token, ()):
            continue
        e = length - allowed
        if max_exp > 0:
            e = min(e, max_exp)
        o.logits[token] -= p.dry_multiplier * p.dry_base**e


def mirostat(o: Oracle, p: SamplingParams, mu: float) -> list[int]:
    """Mirostat v1 (m = 100) or v2 over all tokens: the kept candidates."""
    cand = o.order_by_logit(list(range(len(o.logits))))
    probs = o.softmax(cand)
    if p.mirostat == 2:
        size = len(cand)
        for i, q in enumerate(probs):
            surprise = -math.log2(q) if q > 0 else math.inf
            o.near(surprise, mu)
            if surprise > mu:
                size = i
                break
        return cand[: max(size, 1)]
    m = min(99, len(cand) - 1)
    with np.errstate(divide="ignore", invalid="ignore"):  # p = 0 after temperature 0
        num = sum(math.log((i + 2) / (i + 1)) * np.log(probs[i] / probs[i + 1]) for i in range(m))
    den = sum(math.log((i + 2) / (i + 1)) ** 2 for i in range(m))
    s_hat = num / den
    eps = s_hat - 1
    k = ((eps * 2**mu) / (1 - len(cand) ** (-eps))) ** (1 / s_hat)
    if k == k and abs(k) < 1e15:  # NaN / huge: no boundary to respect
        o.near(k, round(k))
    # int(NaN) is undefined in C++ (INT_MIN on x86, so max(., 1) = 1); top-k clamps to size
    k = 1 if k != k else len(cand) if k > len(cand) else max(int(k), 1)
    return cand[:k]


def final_probs(o: Oracle, cand: list[int]) -> np.ndarray:
    out = np.zeros_like(o.logits)
    x = o.logits[cand]
    if not np.isfinite(x).any():
        out[o.order_by_logit(cand)[0]] = 1.0
        return out
    e = np.exp(x - x.max())
    out[cand] = e / e.sum()
    return out


def reference(
    logits: np.ndarray,
    p: SamplingParams,
    history: Sequence[int] = (),
    eog: Sequence[int] = (),
    *,
    breakers=None,
    u_xtc: float = 0.0,
    mu: float | None = None,
) -> tuple[np.ndarray, np.ndarray, float]:
    """llama.cpp's chain on one row: (final distribution, logits after bias and the leading
    penalties / DRY stages, margin)."""
    o = Oracle(logits)
    logit_bias(o, p, eog)
    cand = list(range(len(o.logits)))
    if p.mirostat:
        processed = o.logits.copy()
        temperature(o, cand, p.temperature, 0.0, 1.0)
        cand = mirostat(o, p, 2 * p.mirostat_tau if mu is None else mu)
        return final_probs(o, cand), processed, o.margin
    processed = None
    for stage in p.samplers:
        name = stage.value
        if processed is None and name not in ("penalties", "dry"):
            processed = o.logits.copy()
        if name == "penalties":
            penalties(o, p, history)
        elif name == "dry":
            dry(o, p, history, breakers or {})
        elif name == "top_n_sigma":
            cand = top_n_sigma(o, cand, p.top_n_sigma)
        elif name == "top_k":
            cand = top_k(o, cand, p.top_k)
        elif name == "typ_p":
            cand = typical(o, cand, p.typical_p, p.min_keep)
        elif name == "top_p":
            cand = top_p(o, cand, p.top_p, p.min_keep)
        elif name == "min_p":
            cand = min_p(o, cand, p.min_p, p.min_keep)
        elif name == "xtc":
            cand = xtc(o, cand, p.xtc_probability, p.xtc_threshold, p.min_keep, u_xtc)
        elif name == "temperature":
            temperature(o, cand, p.temperature, p.dynatemp_range, p.dynatemp_exponent)
    if processed is None:
        processed = o.logits.copy()
    return final_probs(o, cand), processed, o.margin
