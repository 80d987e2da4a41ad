"""DRY, XTC, top-n-sigma, dynamic temperature, mirostat, `samplers` orders, min_keep and
post-sampling probabilities, against sampling_reference (llama.cpp's definitions in numpy)."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch
from sampling_reference import dry, reference

from llamapy.sampling import (
    DEFAULT_SAMPLERS,
    DryVocab,
    Sampler,
    SamplerStage,
    SamplerState,
    SamplingParams,
    make_generator,
    samplers_from_chars,
    samplers_from_names,
)
from llamapy.sampling.dry import dry_penalties

PLAIN = SamplingParams(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0)
MARGIN = 2e-6  # rows closer than this to a decision boundary are redrawn
EOG = (3, 7)


class FixedBreakers(DryVocab):
    """A DryVocab handing out given token breakers (tested on their own below)."""

    def __init__(self, breakers: dict[int, tuple[tuple[int, ...], ...]]) -> None:
        super().__init__(lambda t: b"", lambda s: [], 0)
        self.fixed = breakers

    def breakers(self, strings):
        return self.fixed


def _first_uniform(seed: int) -> float:
    return float(torch.rand((), dtype=torch.float64, generator=make_generator(seed)))


def _compare(rng, params, n_vocab=400, histories=None, breakers=None, scale=3.0, margin=MARGIN):
    """Fresh logits per row (redrawn near a boundary); probs() equals the oracle per row."""
    histories = histories or [[] for _ in params]
    seeds = [int(s) for s in rng.integers(0, 2**63, size=len(params))]
    rows, refs = [], []
    for p, h, seed in zip(params, histories, seeds, strict=True):
        u = _first_uniform(seed) if p.has_xtc else 0.0
        for _ in range(100):
            x = (rng.standard_normal(n_vocab) * scale).astype(np.float32)
            ref, processed, m = reference(x, p, h, EOG, breakers=breakers, u_xtc=u)
            if m > margin:
                break
        else:
            raise AssertionError("could not draw a row away from every boundary")
        rows.append(x)
        refs.append((ref, processed))
    logits = torch.from_numpy(np.stack(rows))
    sampler = Sampler(EOG, FixedBreakers(breakers or {}))
    gens = [make_generator(s) for s in seeds]
    got = sampler.probs(logits, params, histories, gens).double().numpy()
    processed = sampler.process_logits(logits, params, histories).numpy()
    for row, (ref, ref_processed) in enumerate(refs):
        np.testing.assert_allclose(processed[row], ref_processed, rtol=1e-5, atol=1e-5)
        assert not got[row][ref == 0].any(), f"row {row}: a token the chain drops is kept"
        assert got[row][ref > 1e-30].all(), f"row {row}: a token the chain keeps is dropped"
        np.testing.assert_allclose(got[row], ref, rtol=1e-4, atol=1e-7, err_msg=f"row {row}")
    return logits


def _vary(base=PLAIN, **fields_per_row):
    n = len(next(iter(fields_per_row.values())))
    return [
        dataclasses.replace(base, **{k: v[i] for k, v in fields_per_row.items()}) for i in range(n)
    ]


def _repetitive(rng, n_rows, n_vocab, length=60, alphabet=5):
    """Histories that repeat themselves: chunks copied from earlier in the history."""
    out = []
    for _ in range(n_rows):
        pool = rng.choice(n_vocab, size=alphabet, replace=False)
        h = [int(t) for t in rng.choice(pool, size=8)]
        while len(h) < length:
            start = int(rng.integers(0, len(h)))
            h += h[start : start + int(rng.integers(1, 10))] + [int(rng.choice(pool))]
        out.append(h[:length])
    return out


# --- parameters and names -----------------------------------------------------------


def test_sampler_names_and_letters():
    assert samplers_from_chars("edskypmxt") == DEFAULT_SAMPLERS
    names = ["penalties", "dry", "top_n_sigma", "top_k", "typ_p", "top_p", "min_p", "xtc",
             "temperature"]  # fmt: skip
    assert samplers_from_names(names) == DEFAULT_SAMPLERS
    # aliases as common_sampler_types_from_names: kebab-case, no dash, misc., any case
    aliases = ["Top-K", "topk", "nucleus", "TEMP", "typ", "top-n-sigma", "minp", "typ-p"]
    assert [s.value for s in samplers_from_names(aliases)] == [
        "top_k", "top_k", "top_p", "temperature", "typ_p", "top_n_sigma", "min_p", "typ_p",
    ]  # fmt: skip
    assert SamplingParams(samplers=["temp", "top-k"]).samplers == (
        SamplerStage.TEMPERATURE,
        SamplerStage.TOP_K,
    )
    assert SamplingParams(samplers=[]).samplers == ()


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda: samplers_from_names(["top_k", "topq"]), "unknown sampler 'topq'"),
        (lambda: samplers_from_names(["infill"]), "not supported"),
        (lambda: samplers_from_names("top_k"), "list of sampler names"),
        (lambda: samplers_from_chars("kz"), "unknown sampler letter 'z'"),
        (lambda: samplers_from_chars("ka"), "'adaptive_p'.*not supported"),
        (lambda: SamplingParams(samplers=["top_k", 3]), "samplers"),
    ],
)
def test_bad_sampler_names_raise(call, match):
    with pytest.raises(ValueError, match=match):
        call()


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("dry_multiplier", -1.0), ("dry_multiplier", math.inf), ("dry_base", 0.5),
        ("dry_base", math.nan), ("dry_allowed_length", -1), ("dry_allowed_length", 1.5),
        ("dry_penalty_last_n", -2), ("dry_sequence_breakers", "\n"),
        ("dry_sequence_breakers", ["a", ""]), ("dry_sequence_breakers", [1]),
        ("xtc_probability", 1.5), ("xtc_probability", -0.1), ("xtc_threshold", 2.0),
        ("top_n_sigma", math.nan), ("dynatemp_range", -0.5), ("dynatemp_exponent", -1.0),
        ("mirostat", 3), ("mirostat", True), ("mirostat_tau", -1.0), ("mirostat_eta", math.inf),
        ("post_sampling_probs", 1),
    ],
)  # fmt: skip
def test_invalid_extra_field_raises_naming_it(field, value):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**{field: value})


def test_greedy_and_argmax_flags():
    assert SamplingParams.greedy().picks_argmax
    assert not SamplingParams.greedy(xtc_probability=0.5).picks_argmax  # XTC may drop it
    assert SamplingParams.greedy(xtc_probability=0.5, xtc_threshold=0.6).picks_argmax  # off
    assert not SamplingParams.greedy(typical_p=0.5).picks_argmax
    assert not SamplingParams.greedy(samplers=["top_k", "temperature"]).picks_argmax
    assert not SamplingParams.greedy(samplers=["top_k"]).is_greedy  # no temperature stage
    assert not SamplingParams.greedy(dynatemp_range=0.5).is_greedy
    assert SamplingParams.greedy(mirostat=2).is_greedy
    assert SamplingParams.greedy(dry_multiplier=0.8).has_dry
    assert not SamplingParams(xtc_probability=0.5, samplers=["top_k"]).has_xtc


# --- each new sampler against the oracle ----------------------------------------------


@pytest.mark.parametrize("n_vocab", [60, 400])
def test_dry(rng, n_vocab):
    hist = _repetitive(rng, 6, n_vocab)
    heads = rng.choice(n_vocab, size=6, replace=False).tolist()
    # single-token breakers, and heads with tails drawn from the histories (so they occur)
    breakers = {heads[0]: ((),), heads[1]: ((),)}
    for h, r in zip(heads[2:], range(4), strict=True):
        tail = tuple(hist[r][5 : 5 + int(rng.integers(1, 3))])
        breakers[hist[r][4]] = breakers.get(hist[r][4], ()) + (tail,)
        breakers.setdefault(h, ((int(rng.integers(n_vocab)),),))
    params = _vary(
        dry_multiplier=[0.8, 1.5, 0.3, 2.0, 0.8, 1.0],
        dry_base=[1.75, 1.1, 3.0, 1.0, 1.75, 1.0000005],
        dry_allowed_length=[2, 0, 1, 3, 4, 2],
        dry_penalty_last_n=[64, -1, 20, 5, 0, 40],
        dry_sequence_breakers=[("x",)] * 6,  # any non-empty list: FixedBreakers answers
    )
    _compare(rng, params, n_vocab, hist, breakers)


def test_dry_exponent_is_clamped():
    """pow(base, exp) is capped at float max: exp <= 88.72 / log(base)."""
    p = dataclasses.replace(PLAIN, dry_multiplier=1.0, dry_base=1e30, dry_allowed_length=1)
    hist = [1, 2, 3, 4, 5, 1, 2, 3, 4]  # a repeat of 4 tokens: token 5 would extend it
    got = dry_penalties(hist, p, {})
    assert int(88.7228391 / math.log(1e30)) == 1  # exponent 4 - 1 = 3 is clamped to 1
    assert got == {5: pytest.approx(1e30)}


def test_dry_z_algorithm_matches_the_definition(rng):
    """The Z-algorithm scan equals the brute-force definition on long repetitive windows."""
    for _ in range(30):
        n_vocab = int(rng.integers(2, 6))
        hist = _repetitive(rng, 1, n_vocab, length=int(rng.integers(3, 300)), alphabet=n_vocab)[0]
        breakers = {int(rng.integers(n_vocab)): ((int(rng.integers(n_vocab)),),)}
        p = dataclasses.replace(
            PLAIN, dry_multiplier=1.0, dry_base=1.5, dry_allowed_length=int(rng.integers(0, 4)),
            dry_penalty_last_n=int(rng.choice([-1, 10, 64, 1000])),
        )  # fmt: skip

        class Row:
            logits = np.zeros(n_vocab)

        dry(Row, p, hist, breakers)
        expected = {t: -v for t, v in enumerate(Row.logits) if v != 0}
        got = dry_penalties(hist, p, breakers)
        assert got.keys() == expected.keys()
        for t in got:
            assert got[t] == pytest.approx(expected[t], rel=1e-12)


def test_dry_penalizes_the_token_that_continues_a_repeat():
    # the worked example of llama_sampler_dry_apply: "a b c c b c y a b c"
    a, b, c, y = 0, 1, 2, 3
    p = dataclasses.replace(PLAIN, dry_multiplier=1.0, dry_base=2.0, dry_allowed_length=1)
    got = dry_penalties([a, b, c, c, b, c, y, a, b, c], p, {})
    # "a b c" repeats (3) -> c is next: 2^(3-1); "c" (1) -> b: 2^0; "b c" (2) -> y: 2^1
    assert got == {c: 4.0, b: 1.0, y: 2.0}
    assert dry_penalties([a, b, c, c, b, c, y, a, b, c], p, {y: ((),)}) == {c: 4.0, b: 1.0}


@pytest.mark.parametrize("min_keep", [0, 2, 5, 50])
def test_xtc(rng, min_keep):
    params = _vary(
        xtc_probability=[1.0, 1.0, 0.5, 0.5, 1.0, 0.0, 1.0],
        xtc_threshold=[0.05, 0.1, 0.1, 0.2, 0.3, 0.1, 0.6],
        min_keep=[min_keep] * 7,
        top_k=[0, 40, 0, 10, 0, 0, 0],
    )
    _compare(rng, params, n_vocab=300, scale=2.0)


def test_xtc_exact_boundaries():
    """Four equal tokens (p = 0.25 exactly): p >= threshold counts as above it, and the cut
    happens when exactly min_keep tokens remain."""
    x = torch.zeros(1, 4)
    base = dataclasses.replace(PLAIN, xtc_probability=1.0, xtc_threshold=0.25)
    for min_keep, n_kept in ((1, 1), (2, 4)):
        p = dataclasses.replace(base, min_keep=min_keep)
        probs = Sampler().probs(x, [p], generators=[make_generator(0)])
        assert int((probs > 0).sum()) == n_kept
    p = dataclasses.replace(base, xtc_threshold=0.26)  # none above: nothing to remove
    assert int((Sampler().probs(x, [p], generators=[make_generator(0)]) > 0).sum()) == 4


def test_xtc_draw_comes_before_the_dist_draw():
    """An XTC row takes two numbers per token from its generator (XTC's, then dist's), a
    greedy XTC row one; with XTC off, one and none."""

    def taken(p: SamplingParams) -> int:
        g, ref = make_generator(5), make_generator(5)
        Sampler()(torch.randn(1, 50), [p], generators=[g])
        for n in range(4):
            if torch.equal(g.get_state(), ref.get_state()):
                return n
            torch.rand((), dtype=torch.float64, generator=ref)
        raise AssertionError("more than 3 numbers taken")

    # the first number decides XTC: with logits (10, 0) and threshold 0 XTC leaves only
    # token 1; probability = the first number makes it run, the second number would not
    for seed in range(6):
        g = make_generator(seed)
        u1, u2 = (float(torch.rand((), dtype=torch.float64, generator=g)) for _ in range(2))
        prob = float(np.nextafter(np.float32(min(u1, u2)), np.float32(1)))  # >= it in float32
        p = dataclasses.replace(PLAIN, xtc_probability=prob, xtc_threshold=0.0)
        token = Sampler()(torch.tensor([[10.0, 0.0]]), [p], generators=[make_generator(seed)])
        assert int(token) == (1 if u1 <= u2 else 0)
    assert taken(SamplingParams(xtc_probability=0.5)) == 2
    assert taken(SamplingParams.greedy(xtc_probability=0.5)) == 1
    assert taken(SamplingParams()) == 1
    assert taken(SamplingParams.greedy()) == 0


def test_top_n_sigma(rng):
    params = _vary(
        top_n_sigma=[0.5, 1.0, 2.0, 3.0, -1.0, 0.0, 1.0],
        top_k=[0, 0, 0, 40, 0, 0, 5],
        logit_bias=[{}, {1: -math.inf, 2: -math.inf}, {}, {}, {}, {}, {}],
    )
    _compare(rng, params)


@pytest.mark.parametrize("exponent", [0.5, 1.0, 2.0])
def test_dynamic_temperature(rng, exponent):
    params = _vary(
        temperature=[0.8, 1.0, 0.3, 0.5, 0.0, 1.5],
        dynatemp_range=[0.5, 0.2, 0.5, 0.0, 0.3, 1.0],
        dynatemp_exponent=[exponent] * 6,
        top_k=[40, 0, 10, 0, 0, 3],
        min_p=[0.05, 0.0, 0.0, 0.1, 0.0, 0.0],
    )
    _compare(rng, params)


def test_dynamic_temperature_one_candidate_is_untouched():
    p = dataclasses.replace(PLAIN, top_k=1, dynatemp_range=0.5, temperature=0.0)
    probs = Sampler().probs(torch.randn(1, 30), [p])
    assert int((probs > 0).sum()) == 1


@pytest.mark.parametrize("version", [1, 2])
def test_mirostat_distribution(rng, version):
    params = _vary(
        mirostat=[version] * 8,
        mirostat_tau=[5.0, 3.0, 1.0, 8.0, 5.0, 4.0, 4.0, 4.0],
        temperature=[0.8, 1.0, 1.3, 0.7, 0.0, 1.0, 1.0, 1.0],
        repeat_penalty=[1.5] * 8,  # not in the chain under mirostat
        top_k=[5] * 8,  # nor is top-k
    )
    # mu where v1's k lands between 1 and V for these logits, and v2's cut inside the top
    mus = [float(m) for m in rng.uniform(6.0, 11.0, size=8)]
    for p, mu in zip(params, mus, strict=True):
        for _ in range(100):
            x = (rng.standard_normal(2000) * 2).astype(np.float32)
            ref, _, margin = reference(x, p, [1, 2, 3], mu=mu)
            if margin > 1e-4:
                break
        states = [SamplerState(make_generator(0), mu)]
        got = Sampler().probs(torch.from_numpy(x)[None], [p], [[1, 2, 3]], states)[0].numpy()
        assert not got[ref == 0].any() and got[ref > 1e-30].all()
        np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-7)
        assert states[0].mirostat_mu == mu  # probs() reads mu, does not move it


@pytest.mark.parametrize("version", [1, 2])
def test_mirostat_mu_follows_the_surprise(rng, version):
    """mu starts at 2 tau and moves by -eta (surprise - tau) per token, per sequence."""
    n_vocab, steps = 500, 12
    params = [
        SamplingParams(mirostat=version, mirostat_tau=4.0, mirostat_eta=0.2, temperature=0.9),
        SamplingParams(mirostat=version, mirostat_tau=2.5, mirostat_eta=0.1, temperature=1.1),
        SamplingParams(),  # a plain row in the same batch
    ]
    states = [SamplerState(make_generator(int(s))) for s in rng.integers(0, 2**63, size=3)]
    mus = [2 * 4.0, 2 * 2.5]
    sampler = Sampler()
    for _ in range(steps):
        x = torch.from_numpy((rng.standard_normal((3, n_vocab)) * 2).astype(np.float32))
        tokens = sampler(x, params, [[]] * 3, states).tolist()
        for row in range(2):
            ref, _, margin = reference(x[row].numpy(), params[row], mu=mus[row])
            assert ref[tokens[row]] > 0, "drew a token mirostat drops"
            if margin < 1e-4:  # near a cut: the candidate set may differ by float rounding
                mus[row] = states[row].mirostat_mu
                continue
            s = -math.log2(ref[tokens[row]])
            mus[row] -= params[row].mirostat_eta * (s - params[row].mirostat_tau)
            assert states[row].mirostat_mu == pytest.approx(mus[row], abs=1e-4)
    assert states[2].mirostat_mu is None


@pytest.mark.parametrize("drop", [99, 100])
def test_mirostat_v1_uses_the_top_100(rng, drop):
    """s_hat is fitted over the ratios of the 100 most likely tokens: a drop right before
    or right after the 100th moves k or must not (m = 100 in common_sampler_init)."""
    n_vocab = 1000
    x = np.sort(rng.standard_normal(n_vocab))[::-1].astype(np.float32)
    x[drop:] -= 6.0  # far less likely from here on
    p = SamplingParams(mirostat=1, temperature=1.0)
    for mu in (5.0, 7.0, 9.0):
        ref, _, margin = reference(x, p, mu=mu)
        if margin < 1e-4:
            continue
        got = Sampler().probs(torch.from_numpy(x)[None], [p], generators=[SamplerState(None, mu)])
        assert int((got > 0).sum()) == int((ref > 0).sum())
        np.testing.assert_allclose(got[0].numpy(), ref, rtol=1e-4, atol=1e-7)


def test_mirostat_v2_cut_is_strict():
    """v2 keeps tokens while -log2 p <= mu: a token exactly at mu stays."""
    x = torch.tensor([[3.0, 2.0, 1.0, 0.0, -1.0]])
    p = torch.softmax(x, -1).double()  # the same float32 softmax as the sampler's
    params = [SamplingParams(mirostat=2, temperature=1.0)]
    for keep in (1, 2, 3):
        mu = float(-torch.log2(p[0, keep - 1]))
        probs = Sampler().probs(x, params, generators=[SamplerState(None, mu)])
        assert int((probs > 0).sum()) == keep


def test_mirostat_needs_a_state():
    with pytest.raises(ValueError, match="SamplerState"):
        Sampler()(torch.randn(1, 10), [SamplingParams(mirostat=2)], generators=[make_generator(1)])


# --- orders, min_keep, groups -------------------------------------------------------------


def _random_params(rng, n_vocab):
    stages = list(SamplerStage)
    order = [stages[i] for i in rng.integers(0, len(stages), size=int(rng.integers(0, 10)))]
    return SamplingParams(
        samplers=order,
        temperature=float(rng.choice([0.0, 0.5, 1.0, 1.4])),
        top_k=int(rng.choice([0, 3, 40, n_vocab + 5])),
        top_p=float(rng.choice([0.5, 0.9, 1.0])),
        min_p=float(rng.choice([0.0, 0.05, 0.2])),
        typical_p=float(rng.choice([0.3, 0.9, 1.0])),
        min_keep=int(rng.choice([0, 1, 4, 30])),
        repeat_penalty=float(rng.choice([1.0, 1.3])),
        presence_penalty=float(rng.choice([0.0, 0.5])),
        dry_multiplier=float(rng.choice([0.0, 0.8])),
        dry_allowed_length=int(rng.choice([0, 2])),
        xtc_probability=float(rng.choice([0.0, 0.7, 1.0])),
        xtc_threshold=float(rng.choice([0.05, 0.15])),
        top_n_sigma=float(rng.choice([-1.0, 1.0, 2.0])),
        dynatemp_range=float(rng.choice([0.0, 0.4])),
        dry_sequence_breakers=("x",),
    )


def test_random_orders_and_settings(rng):
    """Rows with random `samplers` lists (repeats, omissions) and settings, in one batch."""
    n_vocab = 300
    params = [_random_params(rng, n_vocab) for _ in range(12)]
    hist = _repetitive(rng, 12, n_vocab)
    breakers = {hist[0][3]: ((),)}
    _compare(rng, params, n_vocab, hist, breakers, scale=2.0)


@pytest.mark.parametrize(
    "order",
    [
        "temperature;top_k;top_p", "top_p;temperature", "top_k;penalties;min_p;dry",
        "xtc;temperature;top_k", "typ_p;top_k;top_p", "min_p;top_n_sigma;typ_p;temperature",
        "", "temperature;temperature",
    ],
)  # fmt: skip
def test_given_orders(rng, order):
    n_vocab = 200
    base = SamplingParams(
        samplers=[s for s in order.split(";") if s], temperature=0.7, top_k=20, top_p=0.8,
        min_p=0.05, typical_p=0.9, min_keep=2, repeat_penalty=1.4, dry_multiplier=1.0,
        dry_allowed_length=1, xtc_probability=1.0, xtc_threshold=0.1, top_n_sigma=1.5,
        dry_sequence_breakers=("x",),
    )  # fmt: skip
    params = [base, dataclasses.replace(base, temperature=0.0), dataclasses.replace(base, top_k=0)]
    _compare(rng, params, n_vocab, _repetitive(rng, 3, n_vocab), {})


def test_each_row_as_if_alone(rng):
    """Mixed chains in one batch give each row the tokens it gets alone (same seeds)."""
    n_vocab, steps = 300, 10
    params = [
        SamplingParams(seed=1),
        SamplingParams(samplers=["top_k", "temperature"], top_k=5, xtc_probability=0.9),
        SamplingParams(mirostat=2, temperature=0.9),
        SamplingParams(xtc_probability=0.5, xtc_threshold=0.05, top_n_sigma=2.0),
        SamplingParams.greedy(dry_multiplier=1.0, dry_sequence_breakers=()),
        SamplingParams(mirostat=1, dynatemp_range=0.3),
    ]
    seeds = [int(s) for s in rng.integers(0, 2**63, size=len(params))]
    logits = [torch.randn(len(params), n_vocab) * 2 for _ in range(steps)]
    hist = _repetitive(rng, len(params), n_vocab)

    def run(rows):
        states = {r: SamplerState(make_generator(seeds[r])) for r in rows}
        out = []
        for x in logits:
            ps = [params[r] for r in rows]
            out.append(Sampler()(x[rows], ps, [hist[r] for r in rows], [states[r] for r in rows]))
        return torch.stack(out), states

    together, states = run(list(range(len(params))))
    for r in range(len(params)):
        alone, alone_states = run([r])
        assert torch.equal(alone[:, 0], together[:, r]), f"row {r}"
        assert alone_states[r].mirostat_mu == states[r].mirostat_mu


# --- probabilities before and after sampling ----------------------------------------------


def test_post_sampling_probs(rng):
    n_vocab = 500
    params = [
        SamplingParams(n_probs=5, post_sampling_probs=True, top_k=3),
        SamplingParams(n_probs=4, top_k=3),  # before sampling: the raw logits
        SamplingParams.greedy(n_probs=3, post_sampling_probs=True),
        SamplingParams(n_probs=6, post_sampling_probs=True, top_k=0, top_p=0.9, temperature=0.5),
    ]
    logits = torch.randn(4, n_vocab) * 2
    seeds = [int(s) for s in rng.integers(0, 2**63, size=4)]
    out = Sampler()(
        logits, params, generators=[make_generator(s) for s in seeds], return_logprobs=True
    )
    final = Sampler().probs(logits, params).double()
    raw = torch.log_softmax(logits.double(), -1)
    assert out.top_token_ids.shape == (4, 6)
    for row, p in enumerate(params):
        t = int(out.token_ids[row])
        ids, lps = out.top_token_ids[row, : p.n_probs], out.top_logprobs[row, : p.n_probs].double()
        if not p.post_sampling_probs:
            assert out.logprobs[row] == pytest.approx(float(raw[row, t]), abs=1e-5)
            assert torch.equal(ids, raw[row].argsort(descending=True)[: p.n_probs])
            continue
        q = final[row]
        assert out.logprobs[row] == pytest.approx(math.log(q[t]), abs=1e-5)
        n_kept = int((q > 0).sum())
        shown = min(p.n_probs, n_kept)
        assert torch.isinf(lps[shown:]).all(), "entries past the candidates are -inf"
        expected = q.argsort(descending=True)[:shown]
        assert set(ids[:shown].tolist()) == set(expected.tolist())
        torch.testing.assert_close(lps[:shown].exp(), q[ids[:shown]], rtol=1e-5, atol=1e-6)
    assert float(out.top_logprobs[2, 0]) == 0.0  # greedy: the token, with p = 1
