"""The searched quantizers (k-quants, IQ4_NL / IQ4_XS, legacy types with an imatrix) against
llama.cpp's `ggml_quantize_chunk`, byte for byte.

Three oracles: llama.cpp live through ctypes on fresh random rows (skipped when
llama-cpp-python is not installed), llama.cpp's bytes committed in tests/quant/data
(scripts/make_quant_refs.py; always runs), and the dequantizer (bit-exact with gguf-py) for
the round trip. A failure names the seed; rerun with LLAMAPY_TEST_SEED=<seed>.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path

import numpy as np
import pytest
import torch
from ggml_quant_oracle import load as load_ggml
from ggml_quant_oracle import quantize_chunk

from llamapy.quant.dequant import dequantize
from llamapy.quant.quantize import IMATRIX_TYPES, SUPPORTED_TYPES, quantize, quantize_supported
from llamapy.quant.types import QuantType, type_size

SEARCHED = [
    QuantType.Q2_K, QuantType.Q3_K, QuantType.Q4_K, QuantType.Q5_K, QuantType.Q6_K,
    QuantType.IQ4_NL, QuantType.IQ4_XS,
]  # fmt: skip
LEGACY_IMATRIX = [QuantType.Q4_0, QuantType.Q4_1, QuantType.Q5_0, QuantType.Q5_1]
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
REFS = Path(__file__).parent / "data" / "quant-refs.npz"
N = 512  # weights per row in the live tests: 2 super-blocks
needs_llama_cpp = pytest.mark.skipif(
    load_ggml() is None, reason="llama-cpp-python (ggml_quantize_chunk) is not installed"
)


@pytest.fixture
def seed() -> int:
    return int(os.environ.get("LLAMAPY_TEST_SEED") or secrets.randbits(32))


def random_rows(rng: np.random.Generator, num_rows: int, n: int = N) -> np.ndarray:
    """Rows of many kinds: scales from 1e-9 to 1e6, outliers, zeros, constants, sparse rows,
    one-signed rows, values on a grid (ties in the searches), blocks with signed zeros."""
    g = rng.standard_normal
    kinds = [
        lambda: g(n) * 10.0 ** rng.uniform(-3, 3),
        lambda: g(n) * 10.0 ** rng.uniform(-9, 6),
        lambda: g(n) * np.where(rng.random(n) < 0.03, 10.0 ** rng.uniform(1, 3), 1.0),
        lambda: g(n) * (rng.random(n) < rng.uniform(0.02, 0.9)),
        lambda: np.zeros(n) * rng.choice([-1.0, 1.0], n),
        lambda: np.full(n, g() * 10.0 ** rng.uniform(-3, 3)),
        lambda: np.abs(g(n)) * rng.choice([-1.0, 1.0]) + rng.uniform(-1, 1),
        lambda: rng.integers(-8, 8, n) / rng.choice([1.0, 4.0, 8.0]),
        lambda: g(n) * 10.0 ** rng.uniform(-44, -36),
    ]
    picks = rng.integers(0, len(kinds), num_rows)
    return np.stack([kinds[k]() for k in picks]).astype(np.float32)


def random_imatrix(rng: np.random.Generator, n: int = N) -> np.ndarray:
    im = (rng.random(n) * 2.0) ** rng.uniform(1, 6)
    im[rng.random(n) < 0.05] = 0.0
    return im.astype(np.float32)


def rmse(blocks: np.ndarray, qtype: QuantType, x: np.ndarray) -> float:
    y = dequantize(torch.from_numpy(blocks), qtype).reshape(x.shape).double().numpy()
    return float(np.sqrt(np.mean((y - x) ** 2)))


def assert_same_blocks(
    got: np.ndarray, ref: np.ndarray, qtype: QuantType, x: np.ndarray, what: str
) -> None:
    """All blocks identical; else the fraction that is, and both round-trip RMSEs."""
    ts = type_size(qtype)
    same = (got.reshape(-1, ts) == ref.reshape(-1, ts)).all(axis=1)
    if not same.all():
        first = int(np.argmin(same))
        pytest.fail(
            f"{what}: {same.mean():.4%} of {same.size} blocks identical; first differing "
            f"block {first}:\n got       {got.reshape(-1, ts)[first].tolist()}\n"
            f" llama.cpp {ref.reshape(-1, ts)[first].tolist()}\n"
            f"RMSE llamapy {rmse(got, qtype, x):.6g}, llama.cpp {rmse(ref, qtype, x):.6g}"
        )


@needs_llama_cpp
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("qtype", SEARCHED, ids=lambda t: t.name)
def test_matches_llama_cpp(qtype: QuantType, device: str, seed: int) -> None:
    rng = np.random.default_rng(seed)
    x = random_rows(rng, 48)
    imatrix = random_imatrix(rng)
    xt = torch.from_numpy(x).to(device)
    got = quantize(xt, qtype).cpu().numpy()
    assert_same_blocks(got, quantize_chunk(x, qtype), qtype, x, f"{qtype.name}, seed={seed}")
    got = quantize(xt, qtype, torch.from_numpy(imatrix).to(device)).cpu().numpy()
    ref = quantize_chunk(x, qtype, imatrix)
    assert_same_blocks(got, ref, qtype, x, f"{qtype.name} with imatrix, seed={seed}")


@needs_llama_cpp
@pytest.mark.parametrize("qtype", LEGACY_IMATRIX, ids=lambda t: t.name)
def test_legacy_with_imatrix_matches_llama_cpp(qtype: QuantType, seed: int) -> None:
    rng = np.random.default_rng(seed)
    x = random_rows(rng, 32, n=int(rng.choice([64, 576, 1024])))
    imatrix = random_imatrix(rng, x.shape[1])
    got = quantize(torch.from_numpy(x), qtype, torch.from_numpy(imatrix)).numpy()
    ref = quantize_chunk(x, qtype, imatrix)
    assert_same_blocks(got, ref, qtype, x, f"{qtype.name} with imatrix, seed={seed}")


@needs_llama_cpp
@pytest.mark.parametrize("qtype", [QuantType.Q8_0, QuantType.F16], ids=lambda t: t.name)
def test_imatrix_ignored_like_llama_cpp(qtype: QuantType, seed: int) -> None:
    rng = np.random.default_rng(seed)
    x = random_rows(rng, 8)
    imatrix = random_imatrix(rng)
    got = quantize(torch.from_numpy(x), qtype, torch.from_numpy(imatrix)).numpy()
    assert np.array_equal(got, quantize(torch.from_numpy(x), qtype).numpy())
    assert np.array_equal(got, quantize_chunk(x, qtype, imatrix))


@pytest.fixture(scope="module")
def refs() -> dict[str, np.ndarray]:
    with np.load(REFS) as data:
        return {k: data[k] for k in data.files}


# Without an imatrix the legacy types are gguf-py's quantizers, tested in test_quantize.py.
REF_CASES = [pytest.param(t, False, id=t.name) for t in SEARCHED] + [
    pytest.param(t, True, id=f"{t.name}-imatrix") for t in SEARCHED + LEGACY_IMATRIX
]


@pytest.mark.parametrize(("qtype", "use_imatrix"), REF_CASES)
def test_matches_committed_llama_cpp_blocks(
    qtype: QuantType, use_imatrix: bool, refs: dict[str, np.ndarray]
) -> None:
    key = f"{qtype.name}_imatrix" if use_imatrix else qtype.name
    x = refs["x"]
    imatrix = torch.from_numpy(refs["imatrix"]) if use_imatrix else None
    got = quantize(torch.from_numpy(x), qtype, imatrix).numpy()
    assert_same_blocks(got, refs[key], qtype, x, f"{key} (committed reference)")


# RMSE / RMS of a Gaussian row of 512 after a round trip, per type: the largest mean over 32
# rows and the largest single row seen in 10 seeds (Q2_K 0.301 / 0.332, Q3_K 0.153 / 0.165,
# Q4_K 0.072 / 0.078, Q5_K 0.037 / 0.040, Q6_K 0.018 / 0.020, IQ4_NL 0.077 / 0.084,
# IQ4_XS 0.078 / 0.085), with a 10% margin. Row scales keep d within fp16's normal range.
ROUNDTRIP_REL_RMSE = {
    QuantType.Q2_K: (0.33, 0.365),
    QuantType.Q3_K: (0.168, 0.182),
    QuantType.Q4_K: (0.079, 0.086),
    QuantType.Q5_K: (0.041, 0.044),
    QuantType.Q6_K: (0.020, 0.022),
    QuantType.IQ4_NL: (0.085, 0.093),
    QuantType.IQ4_XS: (0.085, 0.094),
}


@pytest.mark.parametrize("qtype", SEARCHED, ids=lambda t: t.name)
def test_roundtrip_error(qtype: QuantType, seed: int) -> None:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((32, N)) * 10.0 ** rng.uniform(-2, 3, (32, 1))
    x = x.astype(np.float32)
    y = dequantize(quantize(torch.from_numpy(x), qtype), qtype).reshape(x.shape).numpy()
    rel = np.sqrt(np.mean((y - x) ** 2, axis=1) / np.mean(x.astype(np.float64) ** 2, axis=1))
    mean_bound, row_bound = ROUNDTRIP_REL_RMSE[qtype]
    what = f"{qtype.name}: relative RMSE mean {rel.mean():.4f}, max {rel.max():.4f}; seed={seed}"
    assert rel.mean() < mean_bound and rel.max() < row_bound, what


@pytest.mark.parametrize("qtype", SEARCHED + LEGACY_IMATRIX, ids=lambda t: t.name)
def test_imatrix_lowers_the_weighted_error(qtype: QuantType, seed: int) -> None:
    """What the imatrix is for: the error weighted by it drops (summed over many rows)."""
    rng = np.random.default_rng(seed)
    x = torch.from_numpy(rng.standard_normal((64, N)).astype(np.float32))
    im = torch.from_numpy((rng.random(N) ** 4 * 10).astype(np.float32))

    def weighted(imatrix: torch.Tensor | None) -> float:
        y = dequantize(quantize(x, qtype, imatrix), qtype).reshape(x.shape)
        return float(((y - x) ** 2 * im).sum())

    plain, with_im = weighted(None), weighted(im)
    assert with_im < 0.95 * plain, f"{qtype.name}: {with_im:.4g} vs {plain:.4g}, seed={seed}"


def test_supported_types() -> None:
    for qtype in SEARCHED + LEGACY_IMATRIX + [QuantType.Q8_0, QuantType.F16]:
        assert quantize_supported(qtype) and qtype in SUPPORTED_TYPES
    for qtype in (QuantType.TQ1_0, QuantType.IQ2_XXS, QuantType.IQ1_S, QuantType.MXFP4):
        assert not quantize_supported(qtype)
    assert set(IMATRIX_TYPES) == set(SEARCHED + LEGACY_IMATRIX)


@pytest.mark.parametrize(
    ("imatrix", "match"),
    [
        (torch.ones(256), "shape"),
        (torch.ones(2, 512), "shape"),
        (torch.full((512,), float("nan")), "finite and non-negative"),
        (-torch.ones(512), "finite and non-negative"),
    ],
)
def test_bad_imatrix_raises(imatrix: torch.Tensor, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        quantize(torch.zeros(3, 512), QuantType.Q4_K, imatrix)


@pytest.mark.parametrize("qtype", SEARCHED, ids=lambda t: t.name)
def test_partial_super_block_raises(qtype: QuantType) -> None:
    n = 48 if qtype == QuantType.IQ4_NL else 320
    with pytest.raises(ValueError, match="not a multiple of"):
        quantize(torch.zeros(2, n), qtype)


def test_shapes_and_empty(seed: int) -> None:
    rng = np.random.default_rng(seed)
    x = torch.from_numpy(rng.standard_normal((2, 3, 256)))  # float64, 3-d
    out = quantize(x, QuantType.Q4_K)
    assert out.shape == (2, 3, 144) and out.dtype == torch.uint8
    flat = quantize(x.reshape(6, 256).float(), QuantType.Q4_K)
    assert torch.equal(out.reshape(6, 144), flat)
    assert quantize(torch.zeros(0, 256), QuantType.Q6_K).shape == (0, 210)
