"""llama.cpp's tests/test-sampling.cpp, case by case, against our Sampler.

There each case builds logits = log(probs), applies one sampler then dist, and checks the
candidates' probabilities in array order. Here a case runs the chain with that one sampler
(`samplers=[...]`, every other setting neutral) and compares the final distribution by
token id. Where llama.cpp checks probabilities that dist did not renormalize (XTC and
typical alone), the expected values are renormalized over the same candidates.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from llamapy.sampling import (
    DryVocab,
    Sampler,
    SamplerState,
    SamplingParams,
    make_generator,
    samplers_from_chars,
)

P4 = [0.1, 0.2, 0.3, 0.4]


def _params(stage: str, **kw) -> SamplingParams:
    base = dict(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, samplers=[stage])
    return SamplingParams(**{**base, **kw})


def _probs(probs, params, history=(), sampler=None, generators=None) -> np.ndarray:
    logits = torch.tensor([[math.log(p) if p > 0 else -math.inf for p in probs]])
    sampler = sampler or Sampler()
    return sampler.probs(logits, [params], [list(history)], generators)[0].double().numpy()


def _check(got, expected):
    # llama.cpp's check: |p - expected| < 1e-5 for every candidate
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize(("temp", "expected"), [(1.0, [0.1, 0.2, 0.3, 0.4]), (0.0, [0, 0, 0, 1.0])])
def test_temp(temp, expected):
    _check(_probs(P4, _params("temperature", temperature=temp)), expected)
    # test_temp_ext with delta 0, exponent 1 is the same
    p = _params("temperature", temperature=temp, dynatemp_range=0.0, dynatemp_exponent=1.0)
    _check(_probs(P4, p), expected)


@pytest.mark.parametrize(
    ("k", "expected"),
    [
        (1, [0, 0, 0, 1.0]),
        (3, [0, 0.22222, 0.33333, 0.44444]),
        (4, [0.1, 0.2, 0.3, 0.4]),
        (0, [0.1, 0.2, 0.3, 0.4]),
    ],
)
def test_top_k(k, expected):
    _check(_probs(P4, _params("top_k", top_k=k)), expected)


@pytest.mark.parametrize(
    ("p", "expected"),
    [
        (0.0, [0, 0, 0, 1.0]),
        (0.7, [0, 0, 0.428571, 0.571429]),
        (0.8, [0, 0.22222, 0.33333, 0.44444]),
        (1.0, [0.1, 0.2, 0.3, 0.4]),
    ],
)
def test_top_p(p, expected):
    _check(_probs(P4, _params("top_p", top_p=p)), expected)


@pytest.mark.parametrize(
    ("p", "expected"),
    [
        (0.00, [0.1, 0.2, 0.3, 0.4]),
        (0.24, [0.1, 0.2, 0.3, 0.4]),
        (0.26, [0, 0.2 / 0.9, 0.3 / 0.9, 0.4 / 0.9]),
        (0.49, [0, 0.2 / 0.9, 0.3 / 0.9, 0.4 / 0.9]),
        (0.51, [0, 0, 0.3 / 0.7, 0.4 / 0.7]),
        (0.74, [0, 0, 0.3 / 0.7, 0.4 / 0.7]),
        (0.76, [0, 0, 0, 1.0]),
        (1.00, [0, 0, 0, 1.0]),
    ],
)
def test_min_p(p, expected):
    _check(_probs(P4, _params("min_p", min_p=p)), expected)


def test_min_p_above_one_is_rejected():
    # llama.cpp's case min_p = 1.05 keeps the top token; its server limits min_p to [0, 1]
    with pytest.raises(ValueError, match="min_p"):
        _params("min_p", min_p=1.05)


@pytest.mark.parametrize(
    ("threshold", "kept"),
    [
        (0.09, {3: 0.1}),  # "XTC should": all but the least likely of those above 0.09 go
        (0.19, {2: 0.2, 3: 0.1}),
        (0.29, {1: 0.3, 2: 0.2, 3: 0.1}),
        (0.39, {0: 0.4, 1: 0.3, 2: 0.2, 3: 0.1}),  # "XTC should not": one token above
    ],
)
def test_xtc(rng, threshold, kept):
    # probability 0.99 as in llama.cpp; here the draw comes from the row's generator, so
    # the expectation follows that draw (u > 0.99 leaves the candidates alone)
    probs = [0.4, 0.3, 0.2, 0.1]
    for seed in rng.integers(0, 2**63, size=8):
        u = torch.rand((), dtype=torch.float64, generator=make_generator(int(seed)))
        expected = np.zeros(4)
        use = kept if u <= 0.99 else dict(enumerate(probs))
        for t, p in use.items():
            expected[t] = p
        gen = [make_generator(int(seed))]
        got = _probs(probs, _params("xtc", xtc_probability=0.99, xtc_threshold=threshold),
                     generators=gen)  # fmt: skip
        _check(got, expected / expected.sum())


@pytest.mark.parametrize(
    ("probs", "expected"),
    [
        ([0.97, 0.01, 0.01, 0.01], [1.0, 0, 0, 0]),  # llama.cpp: {0.97}
        ([0.4, 0.2, 0.2, 0.2], [0, 1 / 3, 1 / 3, 1 / 3]),  # llama.cpp: {0.2, 0.2, 0.2}
    ],
)
def test_typical(probs, expected):
    _check(_probs(probs, _params("typ_p", typical_p=0.5)), expected)


P5 = [0.2] * 5


@pytest.mark.parametrize(
    ("history", "expected", "repeat", "freq", "presence"),
    [
        ([0], [0, 0.25, 0.25, 0.25, 0.25], 50.0, 0.0, 0.0),
        ([0, 1, 2], [0, 0, 0, 0.5, 0.5], 50.0, 0.0, 0.0),
        ([0, 1, 2, 0, 0], [0, 0, 0, 0.5, 0.5], 50.0, 0.0, 0.0),
        ([0], [0.000011, 0.249997, 0.249997, 0.249997, 0.249997], 1.0, 5.0, 5.0),
        ([0, 1, 2], [0.000023, 0.000023, 0.000023, 0.499966, 0.499966], 1.0, 5.0, 5.0),
        ([0, 1, 2, 0, 0], [0.000000, 0.000023, 0.000023, 0.499977, 0.499977], 1.0, 5.0, 5.0),
    ],
)
def test_penalties(history, expected, repeat, freq, presence):
    p = _params(
        "penalties",
        repeat_penalty=repeat,
        frequency_penalty=freq,
        presence_penalty=presence,
        repeat_last_n=len(history),
    )
    _check(_probs(P5, p, history), expected)


def _token_vocab(texts: list[str]) -> DryVocab:
    """A vocabulary whose token t reads texts[t]; breakers of one token need no tokenizer."""

    def encode(s: str) -> list[int]:
        raise AssertionError(f"no breaker here spans tokens, got {s!r}")

    return DryVocab(lambda t: texts[t].encode(), encode, len(texts))


@pytest.mark.parametrize(
    ("probs", "history", "expected", "mult", "base", "allowed", "last_n", "breakers"),
    [
        (
            [0.25] * 4, [0, 1], [0.25] * 4, 1.0, 1.1, 2, 4, [],
        ),
        (
            [0.25] * 4, [0, 1, 2, 0, 1], [0.296923, 0.296923, 0.109232, 0.296923],
            1.0, 1.1, 2, 5, [],
        ),
        (
            P5, [0, 1, 3, 4, 0, 1], P5, 1.0, 1.1, 2, 6, [3],
        ),
        (
            P5, [0, 1, 2, 0, 1], [0.241818, 0.241818, 0.032727, 0.241818, 0.241818],
            2.0, 1.1, 2, 5, [],
        ),
        (
            P5, [0, 1, 2, 3, 4, 0, 1], P5, 1.0, 1.1, 4, 7, [],
        ),
    ],
)  # fmt: skip
def test_dry(probs, history, expected, mult, base, allowed, last_n, breakers):
    # llama.cpp passes token breakers ({{3}}); here breakers are strings over a vocabulary
    # in which only token 3 reads "\n"
    texts = ["a", "b", "c", "\n", "e"][: len(probs)]
    p = _params(
        "dry",
        dry_multiplier=mult,
        dry_base=base,
        dry_allowed_length=allowed,
        dry_penalty_last_n=last_n,
        dry_sequence_breakers=["\n"] if breakers else [],
    )
    sampler = Sampler(dry_vocab=_token_vocab(texts))
    _check(_probs(probs, p, history, sampler), expected)


@pytest.mark.parametrize(
    ("n", "expected"),
    [
        (1.0, [0, 0, 0.428571, 0.571429]),
        (0.0, [0.1, 0.2, 0.3, 0.4]),  # 0 is a no-op, not greedy (llama.cpp PR 13345)
        (3.0, [0.1, 0.2, 0.3, 0.4]),
    ],
)
def test_top_n_sigma(n, expected):
    _check(_probs(P4, _params("top_n_sigma", top_n_sigma=n)), expected)


def _queue_expectation(n_vocab, seq, top_k, top_p, min_p):
    """llama.cpp's test_sampler_queue bookkeeping: (size, min id) after each sampler."""
    min_id, max_id, size = 0, n_vocab - 1, n_vocab
    for s in seq:
        if s == "k":
            size = min(size, top_k)
            min_id = max(min_id, n_vocab - top_k)
        elif s == "p":
            divisor = n_vocab * (n_vocab - 1) // 2 - min_id * (min_id - 1) // 2
            target = math.ceil(np.float32(top_p) * np.float32(divisor))
            min_id, size, cumsum = n_vocab, 0, 0
            while True:
                min_id -= 1
                size += 1
                cumsum += min_id
                if cumsum >= target:
                    break
            if min_id == 1:  # token 0 has p == 0: top-p keeps it with token 1
                min_id -= 1
                size += 1
        else:
            expected = max(math.ceil(np.float32(1.0 - np.float32(min_p)) * n_vocab), 1)
            size = min(expected, size)
            m = max(math.floor(np.float32(min_p) * n_vocab), 1)
            min_id = min(max(m, n_vocab - size), n_vocab - 1)
    return size, min_id, max_id


@pytest.mark.parametrize(
    ("seq", "top_k", "top_p", "min_p"),
    [
        ("k", 10000, 1.0, 1.0), ("k", 1, 1.0, 1.0), ("p", 10000, 1.0, 1.0),
        ("p", 10000, 0.0, 1.0), ("m", 10000, 1.0, 1.0), ("m", 10000, 1.0, 1e-12),
        ("k", 100, 1.0, 1.0), ("p", 10000, 0.0003, 1.0), ("p", 10000, 0.8, 1.0),
        ("m", 10000, 1.0, 9997.9 / 9999.0), ("m", 10000, 1.0, 0.1),
        ("kp", 100, 0.8, 0.1), ("km", 100, 0.8, 0.1), ("pk", 100, 0.8, 0.1),
        ("pm", 100, 0.8, 0.1), ("mk", 100, 0.8, 0.1), ("mp", 100, 0.8, 9997.9 / 9999.0),
        ("mp", 100, 0.8, 0.1), ("kpm", 100, 0.8, 0.1), ("kmp", 100, 0.8, 0.1),
        ("pkm", 100, 0.8, 0.1), ("pmk", 100, 0.8, 0.1), ("mkp", 100, 0.8, 0.1),
        ("mpk", 100, 0.8, 0.1),
    ],
)  # fmt: skip
def test_sampler_queue(seq, top_k, top_p, min_p):
    # logits = log(id): token 0 is -inf, a candidate with p = 0 (not observable in probs)
    n_vocab = 10000
    logits = torch.log(torch.arange(n_vocab, dtype=torch.float32)).unsqueeze(0)
    params = SamplingParams(
        temperature=1.0, top_k=top_k, top_p=top_p, min_p=min_p, min_keep=1,
        samplers=samplers_from_chars(seq),
    )  # fmt: skip
    kept = torch.nonzero(Sampler().probs(logits, [params])[0] > 0).squeeze(1)
    size, min_id, max_id = _queue_expectation(n_vocab, seq, top_k, top_p, min_p)
    assert size >= 1
    assert kept.tolist() == list(range(max(min_id, 1), max_id + 1))


def test_dist_singleton_rng():
    """A draw from one candidate still takes its number (llama.cpp keeps the RNG aligned)."""
    one = SamplingParams(temperature=1.0, top_k=1, top_p=1.0, min_p=0.0)
    two = SamplingParams(temperature=1.0, top_k=2, top_p=1.0, min_p=0.0)
    singleton, control = SamplerState(make_generator(4242)), SamplerState(make_generator(4242))
    sampler = Sampler()
    sampler(torch.zeros(1, 1), [one], generators=[singleton])
    sampler(torch.zeros(1, 2), [two], generators=[control])
    flat = SamplingParams(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0)
    for _ in range(4):
        logits = torch.zeros(1, 256)
        a = sampler(logits, [flat], generators=[singleton])
        b = sampler(logits, [flat], generators=[control])
        assert a.item() == b.item()
