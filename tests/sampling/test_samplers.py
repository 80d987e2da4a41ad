"""The batched sampler chain against sampling_reference (llama.cpp's loops in numpy)."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch
from sampling_reference import reference

from llamapy.sampling import (
    DEFAULT_SAMPLERS,
    Sampler,
    SamplerOutput,
    SamplerStage,
    SamplingParams,
    filters,
    make_generator,
)

# Every filter off: a row samples from softmax(logits) unless a test turns one on.
PLAIN = SamplingParams(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0)
MARGIN = 2e-6  # rows closer than this to a decision boundary are redrawn
EOG = (3, 7)


def _draw_rows(rng, params, n_vocab, histories, scale=3.0):
    """Fresh logits per row, redrawn while the oracle says the row sits on a boundary."""
    rows, refs = [], []
    for p, h in zip(params, histories, strict=True):
        for _ in range(100):
            x = (rng.standard_normal(n_vocab) * scale).astype(np.float32)
            ref, processed, margin = reference(x, p, h, EOG)
            if margin > MARGIN:
                break
        else:
            raise AssertionError("could not draw a row away from every boundary")
        rows.append(x)
        refs.append((ref, processed))
    return torch.from_numpy(np.stack(rows)), refs


def _histories(rng, n_rows, n_vocab, length=80):
    # few distinct ids so that tokens repeat and the counts matter
    pool = rng.choice(n_vocab, size=12, replace=False)
    return [[int(t) for t in rng.choice(pool, size=length)] for _ in range(n_rows)]


def _assert_matches(params, rng, n_vocab=1000, histories=None):
    histories = histories or [[] for _ in params]
    logits, refs = _draw_rows(rng, params, n_vocab, histories)
    sampler = Sampler(eog_token_ids=EOG)
    got = sampler.probs(logits, params, histories).numpy()
    processed = sampler.process_logits(logits, params, histories).numpy()
    for row, (ref, ref_processed) in enumerate(refs):
        np.testing.assert_allclose(processed[row], ref_processed, rtol=1e-6, atol=1e-6)
        # the same candidates; float32 may underflow where float64 has p < 1e-30
        assert not got[row][ref == 0].any(), f"row {row}: a token the chain drops is kept"
        assert got[row][ref > 1e-30].all(), f"row {row}: a token the chain keeps is dropped"
        np.testing.assert_allclose(got[row], ref, rtol=1e-4, atol=1e-7, err_msg=f"row {row}")


def _vary(**fields_per_row):
    """One PLAIN-based SamplingParams per row from lists of field values."""
    n = len(next(iter(fields_per_row.values())))
    return [
        dataclasses.replace(PLAIN, **{k: v[i] for k, v in fields_per_row.items()}) for i in range(n)
    ]


# --- SamplingParams ------------------------------------------------------------------


def test_defaults_are_llama_cpp_common_params_sampling():
    p = SamplingParams()
    expected = dict(
        temperature=0.8, top_k=40, top_p=0.95, min_p=0.05, typical_p=1.0,
        repeat_penalty=1.0, repeat_last_n=64, presence_penalty=0.0, frequency_penalty=0.0,
        seed=None, max_tokens=None, stop=(), ignore_eos=False, min_keep=0, n_probs=0,
        post_sampling_probs=False, dry_multiplier=0.0, dry_base=1.75, dry_allowed_length=2,
        dry_penalty_last_n=64, dry_sequence_breakers=("\n", ":", '"', "*"),
        xtc_probability=0.0, xtc_threshold=0.1, top_n_sigma=-1.0, dynatemp_range=0.0,
        dynatemp_exponent=1.0, mirostat=0, mirostat_tau=5.0, mirostat_eta=0.1,
    )  # fmt: skip
    assert {k: getattr(p, k) for k in expected} == expected
    assert dict(p.logit_bias) == {}
    assert SamplingParams.greedy().is_greedy and not p.is_greedy
    # common_params_sampling::samplers, by llama.cpp's names
    assert [s.value for s in p.samplers] == [
        "penalties", "dry", "top_n_sigma", "top_k", "typ_p", "top_p", "min_p", "xtc",
        "temperature",
    ]  # fmt: skip
    assert p.samplers == DEFAULT_SAMPLERS and all(isinstance(s, SamplerStage) for s in p.samplers)
    assert not (p.has_dry or p.has_xtc or p.has_penalties)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("temperature", -0.1), ("temperature", math.nan), ("temperature", math.inf),
        ("top_k", 2.5), ("top_k", True), ("top_p", 1.01), ("top_p", -0.1),
        ("min_p", 1.5), ("typical_p", -1.0), ("repeat_penalty", 0.0),
        ("repeat_penalty", -1.0), ("repeat_last_n", -2), ("presence_penalty", math.nan),
        ("frequency_penalty", math.inf), ("seed", -1), ("seed", 2**64), ("max_tokens", -1),
        ("stop", "abc"), ("stop", ("",)), ("min_keep", -1), ("n_probs", -1),
        ("ignore_eos", 1),
    ],
)  # fmt: skip
def test_invalid_field_raises_naming_it(field, value):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**{field: value})


@pytest.mark.parametrize("bias", [{-1: 1.0}, {5: math.inf}, {5: math.nan}])
def test_invalid_logit_bias_raises(bias):
    with pytest.raises(ValueError, match="logit_bias"):
        SamplingParams(logit_bias=bias)


def test_params_are_frozen_and_hashable():
    bias = {1: 2.0}
    p = SamplingParams(logit_bias=bias, stop=["x"])
    bias[1] = 5.0  # the caller's dict is copied
    assert p.logit_bias[1] == 2.0 and p.stop == ("x",)
    with pytest.raises(TypeError):
        p.logit_bias[1] = 3.0  # type: ignore[index]
    with pytest.raises(dataclasses.FrozenInstanceError):
        p.top_k = 3  # type: ignore[misc]
    assert hash(p) == hash(SamplingParams(logit_bias={1: 2.0}, stop=("x",)))


# --- each sampler against the oracle --------------------------------------------------


def test_logit_bias_and_ignore_eos(rng):
    params = _vary(
        logit_bias=[{0: 5.0, 9: -2.5}, {1: -math.inf, 2: 1.0}, {}, {4: 3.0}],
        ignore_eos=[False, False, True, True],
    )
    _assert_matches(params, rng, n_vocab=300)


@pytest.mark.parametrize("last_n", [0, -1, 1, 5, 64])
def test_penalties(rng, last_n):
    params = _vary(
        repeat_penalty=[1.3, 0.8, 1.0, 2.0],
        frequency_penalty=[0.0, 0.5, 0.3, -0.2],
        presence_penalty=[0.0, 0.0, 1.0, 0.4],
        repeat_last_n=[last_n] * 4,
    )
    _assert_matches(params, rng, histories=_histories(rng, 4, 1000))


def test_penalties_padded_tensor_history_equals_lists(rng):
    params = _vary(repeat_penalty=[1.5, 1.2, 1.1], repeat_last_n=[-1, 7, 30])
    lists = _histories(rng, 3, 500, length=40)
    lists[1] = lists[1][:9]  # ragged
    lists[2][-3] = 500 + 5  # an id outside the vocabulary takes a slot, counts for nothing
    width = max(len(h) for h in lists) + 3
    padded = torch.full((3, width), -1, dtype=torch.int64)
    for i, h in enumerate(lists):
        padded[i, 2 : 2 + len(h)] = torch.tensor(h)  # padding on both sides
    logits = torch.randn(3, 500) * 3
    sampler = Sampler()
    expected = sampler.process_logits(logits, params, lists)
    torch.testing.assert_close(sampler.process_logits(logits, params, padded), expected)
    assert not torch.equal(expected, logits)  # the penalties did something


@pytest.mark.parametrize("n_vocab", [100, 5000])
def test_top_k(rng, n_vocab):
    params = _vary(top_k=[1, 5, 40, n_vocab + 10, 0, -3])
    _assert_matches(params, rng, n_vocab=n_vocab)


@pytest.mark.parametrize("min_keep", [0, 1, 3, 50])
def test_typical(rng, min_keep):
    params = _vary(typical_p=[0.05, 0.2, 0.5, 0.9, 0.99, 1.0], min_keep=[min_keep] * 6)
    _assert_matches(params, rng)


@pytest.mark.parametrize("min_keep", [0, 1, 7, 2000])
def test_top_p(rng, min_keep):
    params = _vary(top_p=[0.0, 0.1, 0.5, 0.9, 0.999, 1.0], min_keep=[min_keep] * 6)
    _assert_matches(params, rng)


@pytest.mark.parametrize("min_keep", [0, 1, 7, 2000])
def test_min_p(rng, min_keep):
    params = _vary(min_p=[0.0, 0.01, 0.05, 0.3, 0.9, 1.0], min_keep=[min_keep] * 6)
    _assert_matches(params, rng)


def test_temperature(rng):
    params = _vary(temperature=[0.0, 0.1, 0.5, 1.0, 1.7])
    _assert_matches(params, rng)


@pytest.mark.parametrize("n_vocab", [100, 2000])
def test_full_chain_mixed_rows(rng, n_vocab):
    """Different params per row in one batch, every stage on in some rows."""
    params = [
        SamplingParams(),
        SamplingParams.greedy(repeat_penalty=1.2),
        SamplingParams(top_k=0, typical_p=0.7, min_keep=2, temperature=1.3),
        SamplingParams(top_k=10, top_p=0.6, min_p=0.1, presence_penalty=0.5),
        SamplingParams(top_k=n_vocab * 2, top_p=0.8, frequency_penalty=0.2, repeat_last_n=-1),
        SamplingParams.greedy(typical_p=0.3),
        SamplingParams(temperature=0.3, min_p=0.2, logit_bias={0: 4.0}, ignore_eos=True),
    ]
    _assert_matches(params, rng, n_vocab=n_vocab, histories=_histories(rng, 7, n_vocab))


def test_topk_path_and_sort_path_agree(rng):
    # all top_k > 0 -> torch.topk candidates; one top_k = 0 row -> full sort of every row
    rows = [SamplingParams(top_k=30, typical_p=0.8), SamplingParams(top_k=5, min_keep=3)]
    logits = torch.randn(2, 800) * 3
    sampler = Sampler()
    a = sampler.probs(logits, rows)
    b = sampler.probs(torch.cat([logits, logits[:1]]), [*rows, dataclasses.replace(PLAIN)])
    torch.testing.assert_close(a, b[:2])


# --- edge cases -----------------------------------------------------------------------


@pytest.mark.parametrize("force_sort", [False, True])
def test_ties_at_the_top_k_cut(rng, force_sort):
    n_vocab, k = 60, 7
    x = torch.from_numpy(rng.integers(0, 6, size=(3, n_vocab)).astype(np.float32))
    params = [dataclasses.replace(PLAIN, top_k=k)] * 3
    if force_sort:
        params[2] = PLAIN
    probs = Sampler().probs(x, params)
    for row in range(2):
        kept = probs[row] > 0
        # the first k of a stable descending sort: among equal logits the lower ids, the
        # same whether the row took the topk path or the sort path
        first_k = x[row].sort(descending=True, stable=True).indices[:k]
        assert kept.nonzero()[:, 0].tolist() == sorted(first_k.tolist())
        # against the exact softmax of the kept logits (float64): the float32 one rounds each
        # exp, the k-term sum and the division, within (k + 3) units of float32 rounding
        exact = x[row][kept].double().softmax(0).numpy()
        np.testing.assert_allclose(probs[row][kept].numpy(), exact, rtol=(k + 3) * 2.0**-24)


def test_exact_boundaries_follow_llama_cpp_comparisons():
    """Equal logits make the cumulative sums hit p exactly (0.125 steps are exact floats):
    top-p stops at cum >= p, typical only at cum > p, min-p keeps logit == max + log(p)."""
    x = torch.zeros(1, 8)
    cases = [
        (dataclasses.replace(PLAIN, top_p=0.5), 4),  # 0.5 >= 0.5 after 4 tokens
        (dataclasses.replace(PLAIN, top_p=0.375), 3),
        (dataclasses.replace(PLAIN, typical_p=0.5), 5),  # 0.5 > 0.5 is false: one more
        (dataclasses.replace(PLAIN, typical_p=0.375, min_keep=6), 6),
    ]
    for params, n_kept in cases:
        probs = Sampler().probs(x, [params])
        assert int((probs > 0).sum()) == n_kept, params
        ref, _, _ = reference(x[0].numpy(), params)
        assert int((ref > 0).sum()) == n_kept
    half = float(np.float32(math.log(np.float32(0.5))))  # max + log(min_p) in float32
    y = torch.tensor([[0.0, half, half - 1e-6, -5.0]])
    probs = Sampler().probs(y, [dataclasses.replace(PLAIN, min_p=0.5)])
    assert (probs[0] > 0).tolist() == [True, True, False, False]


def test_greedy_ties_pick_the_lowest_id():
    x = torch.zeros(3, 50)
    x[:, [11, 4, 30]] = 2.0
    params = [SamplingParams.greedy()] * 3
    assert Sampler()(x, params).tolist() == [4, 4, 4]
    mixed = [SamplingParams.greedy(), SamplingParams.greedy(top_k=0), PLAIN]
    tokens = Sampler()(x, mixed, generators=[None, None, make_generator(1)])
    assert tokens[:2].tolist() == [4, 4]  # the full stable sort keeps id order too


def test_all_banned_but_one(rng):
    n_vocab, keep = 200, 123
    ban = {t: -math.inf for t in range(n_vocab) if t != keep}
    params = [
        SamplingParams(logit_bias=ban),
        SamplingParams.greedy(logit_bias=ban),
        dataclasses.replace(PLAIN, logit_bias=ban, typical_p=0.5, min_keep=5),
        SamplingParams(logit_bias=ban, top_k=0, top_p=0.5, min_p=0.5, min_keep=10),
    ]
    logits = torch.randn(4, n_vocab) * 5
    gens = [make_generator(i) for i in range(4)]
    sampler = Sampler()
    for _ in range(20):
        assert sampler(logits, params, generators=gens).tolist() == [keep] * 4
    expected = torch.zeros(4, n_vocab)
    expected[:, keep] = 1.0
    torch.testing.assert_close(sampler.probs(logits, params), expected)


def test_greedy_is_argmax_and_draws_nothing(rng):
    n_vocab = 700
    logits = torch.randn(5, n_vocab) * 3
    hist = _histories(rng, 5, n_vocab)
    params = [SamplingParams.greedy(repeat_penalty=1.5, logit_bias={9: 3.0})] * 5
    gens = [make_generator(i) for i in range(5)]
    states = [g.get_state() for g in gens]
    sampler = Sampler()
    tokens = sampler(logits, params, hist, gens)
    assert torch.equal(tokens, sampler.process_logits(logits, params, hist).argmax(-1))
    assert all(torch.equal(g.get_state(), s) for g, s in zip(gens, states, strict=True))


def test_bad_inputs_raise():
    sampler = Sampler()
    with pytest.raises(ValueError, match="vocabulary"):
        sampler(torch.zeros(1, 10), [SamplingParams(logit_bias={10: 1.0})])
    with pytest.raises(ValueError, match="histories"):
        sampler(torch.zeros(1, 10), [SamplingParams(repeat_penalty=1.1)])
    with pytest.raises(ValueError, match="rows"):
        sampler(torch.zeros(2, 10), [SamplingParams()])


def test_return_logprobs(rng):
    logits = torch.randn(3, 400) * 2
    params = [SamplingParams(n_probs=5), SamplingParams.greedy(), SamplingParams(n_probs=2)]
    out = Sampler()(logits, params, generators=[make_generator(i) for i in range(3)],
                    return_logprobs=True)  # fmt: skip
    assert isinstance(out, SamplerOutput)
    logp = torch.log_softmax(logits.double(), -1)
    chosen = logp.gather(1, out.token_ids.unsqueeze(1)).squeeze(1)
    torch.testing.assert_close(out.logprobs.double(), chosen, rtol=0, atol=1e-5)
    assert out.top_token_ids.shape == (3, 5)
    assert torch.equal(out.top_token_ids, logp.argsort(-1, descending=True)[:, :5])
    assert out.token_ids[1] == logits[1].argmax()


# --- the draw: seeds and distribution -------------------------------------------------


def _generate(steps, logits_seq, row, params, seed, batch_others=()):
    """Tokens of one seeded sequence over `steps`, optionally batched with other rows."""
    sampler = Sampler()
    gen = make_generator(seed)
    others = [(p, make_generator(100 + i)) for i, p in enumerate(batch_others)]
    tokens = []
    for step in range(steps):
        x = logits_seq[step]
        batch = torch.stack([x] + [x.flip(0)] * len(others))
        ps = [params] + [p for p, _ in others]
        gs = [gen] + [g for _, g in others]
        tokens.append(int(sampler(batch, ps, [[]] * len(ps), gs)[row]))
    return tokens


def test_same_seed_same_tokens_alone_or_batched():
    steps, n_vocab = 40, 500
    logits_seq = [torch.randn(n_vocab) for _ in range(steps)]
    params = SamplingParams(top_k=100, top_p=0.99, min_p=0.0, temperature=1.2, seed=7)
    alone = _generate(steps, logits_seq, 0, params, seed=7)
    assert alone == _generate(steps, logits_seq, 0, params, seed=7)
    others = (PLAIN, SamplingParams.greedy(), SamplingParams(top_k=3, typical_p=0.5))
    assert alone == _generate(steps, logits_seq, 0, params, 7, batch_others=others)
    assert alone != _generate(steps, logits_seq, 0, params, seed=8)


def test_same_seed_same_tokens_alone_or_batched_with_tied_logits(rng):
    """Many equal logits (integers): alone the row's candidates come from topk, beside a
    top_k = 0 row from a full sort; both must keep and order the same tokens (lower id
    first), or the seeded draw picks different tokens (it did: one CI run, on a float32
    tie in the test above)."""
    steps, n_vocab = 40, 300
    logits_seq = [torch.from_numpy(rng.integers(-6, 6, n_vocab).astype(np.float32))
                  for _ in range(steps)]  # fmt: skip
    params = SamplingParams(top_k=50, top_p=0.95, min_p=0.0, temperature=2.0, seed=11)
    alone = _generate(steps, logits_seq, 0, params, seed=11)
    assert alone == _generate(steps, logits_seq, 0, params, 11, batch_others=(PLAIN,))


def _cuda_top(sort_max_numel: int):
    def top(x: torch.Tensor, width: int) -> tuple[torch.Tensor, torch.Tensor]:
        if not torch.cuda.is_available():
            pytest.skip("the CUDA dispatch of top_candidates needs a GPU")
        old, filters.CUDA_SORT_MAX_NUMEL = filters.CUDA_SORT_MAX_NUMEL, sort_max_numel
        try:
            values, ids = filters.top_candidates(x.cuda(), width)
        finally:
            filters.CUDA_SORT_MAX_NUMEL = old
        return values.cpu(), ids.cpu()

    return top


@pytest.mark.parametrize("path", ["checked", "unique_keys", "cuda_sort", "cuda_unique_keys"])
def test_top_candidates_are_a_stable_sorts_first(rng, path):
    """Every way of taking a row's top candidates (the CPU's checked topk, the CUDA way of
    unique keys run here on the CPU, and top_candidates' two CUDA dispatches on a GPU)
    against a stable descending sort: the same values and ids, on rows with many ties, ties
    across the cut, signed zeros, -inf and NaN."""
    top = {
        "checked": filters._top_checked,
        "unique_keys": filters._top_by_unique_keys,
        "cuda_sort": _cuda_top(1 << 30),
        "cuda_unique_keys": _cuda_top(0),
    }[path]
    n_vocab = 64
    rows = [
        rng.standard_normal(n_vocab),  # no tie (nearly surely)
        rng.integers(-3, 3, n_vocab),  # ties everywhere
        np.where(rng.random(n_vocab) < 0.5, -np.inf, rng.integers(0, 4, n_vocab)),
        np.where(rng.random(n_vocab) < 0.5, 0.0, -0.0),  # +0.0 and -0.0 are equal
        np.where(rng.random(n_vocab) < 0.1, np.nan, rng.integers(0, 4, n_vocab)),
    ]
    x = torch.from_numpy(np.stack(rows).astype(np.float32))
    for width in (1, 5, 17, n_vocab):
        cuts = []  # rows of distinct logits but for one tie across the cut: topk keeps
        for _ in range(8 if width < n_vocab else 0):  # either token (each about half the time)
            cut = torch.from_numpy(rng.permutation(n_vocab).astype(np.float32))
            pair = cut.sort(descending=True).indices[width - 1 : width + 1]
            cut[pair] = float(cut[pair[0]])
            cuts.append(cut)
        x = torch.cat([x[: len(rows)], *(c[None] for c in cuts)])
        values, ids = top(x.clone(), width)
        want = x.sort(dim=-1, descending=True, stable=True)
        assert ids.tolist() == want.indices[:, :width].tolist(), width
        torch.testing.assert_close(values, want.values[:, :width], equal_nan=True, rtol=0, atol=0)


def test_unseeded_generators_differ():
    logits = torch.zeros(1, 100_000)  # uniform: two 20-token sequences collide w.p. 1e-100
    g1, g2 = make_generator(None), make_generator(None)
    a = [int(Sampler()(logits, [PLAIN], generators=[g1])) for _ in range(20)]
    b = [int(Sampler()(logits, [PLAIN], generators=[g2])) for _ in range(20)]
    assert a != b


def _chi_square_pvalue(counts: np.ndarray, probs: np.ndarray) -> float:
    n = counts.sum()
    expected = n * probs
    stat = float(((counts - expected) ** 2 / expected).sum())
    dof = len(probs) - 1
    # P(chi2_dof >= stat) = Q(dof / 2, stat / 2), the regularized upper incomplete gamma
    q = torch.special.gammaincc(torch.tensor(dof / 2, dtype=torch.float64),
                                torch.tensor(stat / 2, dtype=torch.float64))  # fmt: skip
    return float(q)


def test_draws_follow_the_final_distribution(rng):
    n_vocab, n_rows, steps = 16, 500, 80  # 40,000 draws
    hist = [1, 1, 2, 5, 5, 5]
    params = SamplingParams(top_k=10, top_p=0.97, min_p=0.03, temperature=0.7,
                            repeat_penalty=1.3, presence_penalty=0.2)  # fmt: skip
    for _ in range(50):  # a distribution over several tokens, so the check has teeth
        logits, refs = _draw_rows(rng, [params], n_vocab, [hist], scale=1.5)
        ref = refs[0][0]
        support = np.flatnonzero(ref > 0)
        if len(support) >= 4:
            break

    sampler = Sampler()
    gens = [make_generator(int(s)) for s in rng.integers(0, 2**63, size=n_rows)]
    batch = logits.expand(n_rows, n_vocab)
    counts = np.zeros(n_vocab)
    for _ in range(steps):
        tokens = sampler(batch, [params] * n_rows, [hist] * n_rows, gens)
        counts += np.bincount(tokens.numpy(), minlength=n_vocab)
    assert counts[ref == 0].sum() == 0, "drew a token outside the final candidates"
    assert _chi_square_pvalue(counts[support], ref[support]) > 1e-4

    # the test has power: the distribution at temperature 1 is rejected
    wrong, _, _ = reference(logits[0].numpy(), dataclasses.replace(params, temperature=1.0),
                            hist)  # fmt: skip
    assert _chi_square_pvalue(counts[support], wrong[support] / wrong[support].sum()) < 1e-4
