"""The residual stream's int8 codes written by the GEMV that adds into it (`qmatmul`'s
`codes_out`, `xcodes.StreamCodes`) and read by the next norm's codes GEMV (`codes`), against
float64 references on fresh random blocks and inputs each run (the `rng` fixture prints
the seed).

The producer's 32-row tiles write each block's codes of h * g (two levels) and its sum of
h^2; the consumer multiplies its product by rsqrt(mean(h^2) + eps): RMSNorm(h) @ W^T, as
the quantizing kernel's codes of RMSNorm(h) give it. Tolerances are test_xcodes.py's: the
codes stand for their values within half the second level's step (each block's amax / 127 /
254 / 2), float32 sums err by ~1e-6 of sum |w x|. Without a GPU the kernels run in Triton's
interpreter at small shapes; with one, at the Llama-3.2-1B shapes too.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from tests.ggml_blocks import random_blocks
from tests.kernels.test_xcodes import EPS, assert_codes_stand_for, codes_x, q4_weight

import llamapy.kernels.triton as kt
from llamapy.quant.dequant import dequantize
from llamapy.quant.types import QuantType, block_size

pytestmark = [
    pytest.mark.skipif(not kt.HAS_TRITON, reason="triton is not installed"),
    pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning"),
]

if kt.HAS_TRITON:
    from llamapy.kernels.triton import qmatmul as qm
    from llamapy.kernels.triton import xcodes

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
# (N, K) of the producer (o: N rows of the stream) and of the consumer (gate_up: K = the
# stream's width): small shapes, and the 1B's on a GPU
PRODUCER_SHAPES = [(64, 96), (256, 64)]
CONSUMER_SHAPES = [(37, 256), (10, 1024)]
if CUDA:
    PRODUCER_SHAPES += [(2048, 2048)]
    CONSUMER_SHAPES += [(16384, 2048), (2048, 8192)]


def legacy_weight(rng: np.random.Generator, qtype: QuantType, n: int, k: int):
    blocks = random_blocks(rng, qtype, (n, k // block_size(qtype)))
    blocks = torch.from_numpy(blocks.reshape(n, -1))
    w = qm.pack_weight(blocks.to(DEVICE), qtype, (n, k))
    return w, dequantize(blocks, qtype).double()


def row(rng: np.random.Generator, n: int, scale: float = 1.0) -> torch.Tensor:
    return torch.from_numpy(rng.standard_normal((1, n), dtype=np.float32) * scale).to(DEVICE)


def norm_weight(rng: np.random.Generator, n: int) -> torch.Tensor:
    return torch.from_numpy(rng.random(n, dtype=np.float32) + 0.5).to(DEVICE)


def poisoned(codes: xcodes.StreamCodes) -> xcodes.StreamCodes:
    """The buffers filled with values no kernel writes: a block left unwritten fails."""
    codes.codes[0].fill_(0x7F7F7F7F)
    codes.codes[1].fill_(float("nan"))
    codes.codes[2].fill_(1 << 30)
    codes.sumsq.fill_(float("nan"))
    return codes


@pytest.mark.parametrize("qtype", [QuantType.Q4_0, QuantType.Q4_1, QuantType.Q8_0, QuantType.Q5_0])
@pytest.mark.parametrize(("n", "k"), PRODUCER_SHAPES)
def test_gemv_writes_the_stream_codes(rng, n: int, k: int, qtype: QuantType) -> None:
    """The residual GEMV with codes_out: the stream as the plain GEMV's within float32 sums,
    the codes stand for the stored stream times g, the blocks' sums of squares are its."""
    w, dense = legacy_weight(rng, qtype, n, k)
    x, start, g = row(rng, k), row(rng, n, 4.0), norm_weight(rng, n)
    codes = poisoned(xcodes.StreamCodes.empty(g, EPS))
    h = start.clone()
    assert qm.qmatmul(x, w, residual=h, codes_out=codes) is h
    want = start.double().cpu().reshape(-1) + dense @ x.double().cpu().reshape(-1)
    mag = start.double().abs().cpu().reshape(-1) + dense.abs() @ x.double().abs().cpu().reshape(-1)
    err = (h.double().cpu().reshape(-1) - want).abs()
    assert (err <= 2e-6 * mag).all(), f"stream: {(err / mag).max():.3g}"
    hs = h.double().cpu().reshape(-1)
    assert_codes_stand_for(codes.codes, hs * g.double().cpu(), "stream codes")
    squares = (hs * hs).reshape(-1, 32).sum(dim=1)
    torch.testing.assert_close(codes.sumsq.double().cpu(), squares, rtol=1e-6, atol=0)


def reference_codes(h: torch.Tensor, g: torch.Tensor) -> xcodes.StreamCodes:
    """StreamCodes of h made the other way: the quantizing kernel's codes of h * g, the
    blocks' sums of squares in float64."""
    codes = xcodes.StreamCodes.empty(g, EPS)
    xcodes.quantize((h * g).contiguous(), h.shape[1], 0, buffers=codes.codes)
    hs = h.double().reshape(-1, 32)
    codes.sumsq.copy_((hs * hs).sum(dim=1))
    return codes


@pytest.mark.parametrize("form", ["persistent", "tiled"])
@pytest.mark.parametrize("accumulate", [False, True])
@pytest.mark.parametrize("kind", ["Q4_0", "Q4_1"])
@pytest.mark.parametrize(("n", "k"), CONSUMER_SHAPES)
def test_codes_gemv_applies_the_norm(rng, monkeypatch, n, k, kind, accumulate, form) -> None:
    """gemv over StreamCodes = W (x r) for the x its codes stand for, r = rsqrt(mean(h^2) +
    eps): the norm's scale taken from the blocks' sums of squares, in both GEMV forms."""
    if form == "tiled":
        monkeypatch.setattr(xcodes, "_PIPE", {"short": None, "long": None})
    else:
        monkeypatch.setattr(xcodes, "_PIPE", {"short": (2, 1, 2, 1), "long": (2, 1, 2, 1)})
    w, dense = q4_weight(rng, n, k, kind)
    h, g = row(rng, k, 3.0), norm_weight(rng, k)
    codes = reference_codes(h, g)
    start = row(rng, n)
    out = start.clone() if accumulate else torch.full((1, n), float("nan"), device=DEVICE)
    got = xcodes.gemv(codes, w, out, accumulate).double().cpu().reshape(-1)
    hd = h.double().cpu().reshape(-1)
    r = 1 / torch.sqrt((hd * hd).mean() + EPS)
    xr = codes_x(codes.codes) * r
    base = start.double().cpu().reshape(-1) if accumulate else torch.zeros(n, dtype=torch.float64)
    err = (got - (dense @ xr + base)).abs()
    mag = dense.abs() @ xr.abs() + base.abs()
    assert (err <= 2e-6 * mag).all(), f"{n}x{k}: {(err / mag).max():.3g}"


@pytest.mark.parametrize("kind", ["Q4_0", "Q4_1"])
def test_producer_then_consumer_is_rmsnorm_then_matmul(rng, monkeypatch, kind: str) -> None:
    """o adding into the stream and writing its codes, then gate_up over them through
    `qmatmul` (codes thresholds lowered to the small shapes), against float64
    RMSNorm(h) @ W^T: within the codes' bound (each block's amax / 127 / 254 / 2 of the
    normed values, times |W|) and float32 sums."""
    monkeypatch.setattr(xcodes, "MIN_K", 32)
    monkeypatch.setattr(xcodes, "MIN_WEIGHTS", 1)
    width, n_up, k_o = (2048, 16384, 2048) if CUDA else (256, 48, 128)
    wo, dense_o = legacy_weight(rng, QuantType[kind], width, k_o)
    wu, dense_u = q4_weight(rng, n_up, width, kind)
    x, start, g = row(rng, k_o), row(rng, width, 4.0), norm_weight(rng, width)
    h = start.clone()
    codes = poisoned(xcodes.StreamCodes.empty(g, EPS))
    qm.qmatmul(x, wo, residual=h, codes_out=codes)
    got = qm.qmatmul(h, wu, codes=codes).double().cpu().reshape(-1)
    hd = h.double().cpu().reshape(-1)
    normed = hd / torch.sqrt((hd * hd).mean() + EPS) * g.double().cpu()
    step = normed.reshape(-1, 32).abs().amax(dim=1).repeat_interleave(32) / (127 * 254 * 2)
    bound = dense_u.abs() @ (step * 1.01) + 2e-6 * (dense_u.abs() @ normed.abs())
    err = (got - dense_u @ normed).abs()
    assert (err <= bound).all(), f"worst {(err / bound).max():.3g} of the bound"
    # and the same as the quantizing launch's path, within both codes' errors
    plain = qm.qmatmul(h, wu, norm_weight=g, eps=EPS).double().cpu().reshape(-1)
    assert ((got - plain).abs() <= 2 * bound).all()


def test_bad_stream_codes_calls_are_refused(rng, monkeypatch) -> None:
    monkeypatch.setattr(xcodes, "MIN_K", 32)
    monkeypatch.setattr(xcodes, "MIN_WEIGHTS", 1)
    wo, _ = legacy_weight(rng, QuantType.Q4_0, 64, 64)
    x, h, g = row(rng, 64), row(rng, 64), norm_weight(rng, 64)
    codes = xcodes.StreamCodes.empty(g, EPS)
    with pytest.raises(ValueError, match="residual stream"):
        qm.qmatmul(x, wo, codes_out=codes)
    with pytest.raises(ValueError, match="residual stream"):
        qm.qmatmul(x, wo, residual=h, codes_out=codes, norm_weight=g, eps=EPS)
    with pytest.raises(ValueError, match="values for N=64"):
        qm.qmatmul(x, wo, residual=h, codes_out=xcodes.StreamCodes.empty(g[:32], EPS))
    with pytest.raises(ValueError, match="cannot write codes"):
        qm.qmatmul(torch.cat([x, x]), wo, residual=torch.cat([h, h]), codes_out=codes)
    with pytest.raises(ValueError, match="multiple of 32"):
        xcodes.StreamCodes.empty(g[:40], EPS)
    wk, _ = legacy_weight(rng, QuantType.Q8_0, 64, 64)  # not a codes GEMV type
    with pytest.raises(ValueError, match="does not take Q8_0"):
        qm.qmatmul(h, wk, codes=codes)
    wu, _ = q4_weight(rng, 64, 64)
    with pytest.raises(ValueError, match="carry their norm"):
        qm.qmatmul(h, wu, codes=codes, norm_weight=g, eps=EPS)
    wide, _ = q4_weight(rng, 64, 128)
    with pytest.raises(ValueError, match="values for K=128"):
        qm.qmatmul(row(rng, 128), wide, codes=codes)


def test_lab_tile_setting_parses_or_names_the_variable() -> None:
    assert qm._stream_codes_tile(None)["BLOCK_N"] == 32
    tile = qm._stream_codes_tile("64,4")
    assert (tile["BLOCK_B"], tile["num_warps"], tile["BLOCK_N"]) == (64, 4, 32)
    for bad in ("64", "a,4", "48,4", "0,4"):
        with pytest.raises(ValueError, match="LLAMAPY_GPU_STREAM_CODES_TILE"):
            qm._stream_codes_tile(bad)
