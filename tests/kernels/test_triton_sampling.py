"""The decode step's device-side greedy pick and input ids (kernels/triton/sampling.py)
against a numpy implementation of their definitions and their torch references.

Fresh random logits each run, with planted ties (the first index must win, also across
chunks), banned end-of-generation ids holding the row maximum, NaN and all -inf rows.
Several chunks per row on CUDA and under TRITON_INTERPRET=1 (vocabularies past
ARGMAX_CHUNK).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from llamapy.kernels.triton import INTERPRET, sampling
from llamapy.sampling.greedy import greedy_pick as dispatched_greedy_pick

ON_GPU = torch.cuda.is_available()
DEVICE = "cuda" if ON_GPU else "cpu"
pytestmark = pytest.mark.skipif(
    not (ON_GPU or INTERPRET), reason="needs CUDA or TRITON_INTERPRET=1"
)


def oracle(logits: np.ndarray, ban: np.ndarray, eog: np.ndarray) -> np.ndarray:
    """First index of each row's maximum, NaN as +inf, eog ids of banned rows excluded."""
    x = logits.astype(np.float64)
    x[np.isnan(x)] = np.inf
    for r in range(x.shape[0]):
        if ban[r]:
            x[r, eog] = -np.inf
    return np.argmax(x, axis=1)


def make_logits(rng: np.random.Generator, n: int, v: int) -> np.ndarray:
    x = rng.standard_normal((n, v)).astype(np.float32) * 3
    for r in range(n):  # a tie for the maximum, later in the row (often in another chunk)
        top = int(np.argmax(x[r]))
        if v > 1:
            x[r, int(rng.integers(top, v))] = x[r, top]
    return x


@pytest.mark.parametrize("v", [1, 7, 300, sampling.ARGMAX_CHUNK + 1000, 2 * sampling.ARGMAX_CHUNK])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_greedy_pick_equals_oracle(rng: np.random.Generator, v: int, dtype: torch.dtype) -> None:
    n = 4
    x = make_logits(rng, n, v)
    ban = rng.integers(0, 2, n).astype(np.int32)
    ban[0] = 1
    # eog ids: row 0's maximum (so the ban changes its pick) and a few random ones
    top0 = int(np.argmax(x[0]))
    eog = np.unique(np.concatenate([[top0], rng.integers(0, v, 3)])).astype(np.int64)
    if v > 2:
        x[1, 0] = x[1, 1] = x[1].max() + 1  # a tie at the very start of a row
    logits = torch.from_numpy(x).to(dtype)
    x_rounded = logits.float().numpy()  # ties and order as the rounded logits have them
    want = oracle(x_rounded, ban, eog)
    args = (logits.to(DEVICE), torch.from_numpy(ban).to(DEVICE), torch.from_numpy(eog).to(DEVICE))
    got = sampling.greedy_pick(*args)
    assert got.dtype == torch.int64
    np.testing.assert_array_equal(got.cpu().numpy(), want)
    np.testing.assert_array_equal(sampling.greedy_pick_reference(*args).cpu().numpy(), want)


def test_greedy_pick_special_rows(rng: np.random.Generator) -> None:
    v = sampling.ARGMAX_CHUNK + 17
    x = make_logits(rng, 3, v)
    x[0, int(rng.integers(sampling.ARGMAX_CHUNK, v))] = np.nan  # NaN wins, as in torch.argmax
    x[1, :] = -np.inf  # nothing finite: index 0
    nan_at = sorted(rng.choice(v, 2, replace=False))
    x[2, nan_at] = np.nan  # the first NaN wins
    ban = np.zeros(3, np.int32)
    eog = np.zeros(0, np.int64)
    got = sampling.greedy_pick(
        torch.from_numpy(x).to(DEVICE),
        torch.from_numpy(ban).to(DEVICE),
        torch.from_numpy(eog).to(DEVICE),
    )
    want = oracle(x, ban, eog)
    assert want[1] == 0 and want[2] == nan_at[0]
    np.testing.assert_array_equal(got.cpu().numpy(), want)
    np.testing.assert_array_equal(torch.from_numpy(x).argmax(-1).numpy(), want)  # torch agrees


def test_dispatched_greedy_pick_uses_the_same_definition(rng: np.random.Generator) -> None:
    """The engine's pick (sampling.greedy.greedy_pick: the kernel on CUDA, torch elsewhere)
    equals the oracle."""
    x = make_logits(rng, 3, 1000)
    ban = np.array([1, 0, 1], np.int32)
    eog = np.array([int(np.argmax(x[0])), 5], np.int64)
    got = dispatched_greedy_pick(
        torch.from_numpy(x).to(DEVICE),
        torch.from_numpy(ban).to(DEVICE),
        torch.from_numpy(eog).to(DEVICE),
    )
    np.testing.assert_array_equal(got.cpu().numpy(), oracle(x, ban, eog))


def test_decode_ids(rng: np.random.Generator) -> None:
    n, p = 37, 64
    ids = torch.from_numpy(rng.integers(0, 50000, n).astype(np.int32)).to(DEVICE)
    src = torch.from_numpy(rng.integers(-1, p, n).astype(np.int32)).to(DEVICE)
    prev = torch.from_numpy(rng.integers(0, 50000, p).astype(np.int64)).to(DEVICE)
    got = sampling.decode_ids(ids, src, prev).cpu().numpy()
    s, i, pv = src.cpu().numpy(), ids.cpu().numpy(), prev.cpu().numpy()
    want = np.where(s >= 0, pv[np.maximum(s, 0)], i)
    np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(sampling.decode_ids_reference(ids, src, prev).cpu().numpy(), want)


def test_bad_inputs_are_refused() -> None:
    logits = torch.zeros(2, 10, device=DEVICE)
    ban = torch.zeros(2, dtype=torch.int32, device=DEVICE)
    eog = torch.zeros(1, dtype=torch.int64, device=DEVICE)
    with pytest.raises(ValueError, match="logits must be"):
        sampling.greedy_pick(logits.long(), ban, eog)
    with pytest.raises(ValueError, match="ban_eog must be"):
        sampling.greedy_pick(logits, ban[:1], eog)
    with pytest.raises(ValueError, match="eog must be"):
        sampling.greedy_pick(
            logits, ban, torch.zeros(sampling.MAX_EOG + 1, dtype=torch.int64, device=DEVICE)
        )
    with pytest.raises(ValueError, match="contiguous"):
        sampling.greedy_pick(torch.zeros(10, 2, device=DEVICE).t(), ban, eog)
    with pytest.raises(ValueError, match="lengths differ"):
        sampling.decode_ids(ban, ban[:1], eog)
    with pytest.raises(ValueError, match="ids must be"):
        sampling.decode_ids(logits, ban, eog)
