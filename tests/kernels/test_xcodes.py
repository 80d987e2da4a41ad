"""The int8 codes of x and the GEMV that reads them (`kernels/triton/xcodes.py`), against
float64 references on fresh random blocks and inputs each run (the `rng` fixture prints the
seed); and `qmatmul`'s routing of large one-row Q4_0 products to them.

Tolerances: two levels of codes stand for x within half the second level's scale, amax /
127 / 254 / 2 of each 32-block (~2e-5 of the block's largest value), plus the prologue's
float32 arithmetic; the GEMV's integer dot products are exact and its float32 sums err by
~1e-6 of the sum of |w x|. Without a GPU the kernels run in Triton's interpreter at small
shapes; with one, at the Llama-3.2-1B shapes too.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from tests.ggml_blocks import random_blocks

import llamapy.kernels.triton as kt
from llamapy.quant.dequant import dequantize
from llamapy.quant.types import QuantType

pytestmark = [
    pytest.mark.skipif(not kt.HAS_TRITON, reason="triton is not installed"),
    pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning"),
]

if kt.HAS_TRITON:
    from llamapy.kernels.triton import qmatmul as qm
    from llamapy.kernels.triton import xcodes

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
EPS = 1e-5
# (N, K): small shapes everywhere (K over one and several quantizing programs and GEMV
# steps, N not a multiple of the row tile); the 1B's gate_up / down / output on a GPU
SHAPES = [(37, 256), (10, 1024)]  # K a multiple of 256: the Q4_K twins' too
if CUDA:
    SHAPES += [(16384, 2048), (2048, 8192), (128256, 2048)]


KINDS = {
    "Q4_0": QuantType.Q4_0,
    "Q4_1": QuantType.Q4_1,
    "Q4_K twin": QuantType.Q4_K,
    "Q6_K": QuantType.Q6_K,
    "Q4_K": QuantType.Q4_K,
}


def q4_weight(rng: np.random.Generator, n: int, k: int, kind: str = "Q4_0"):
    """A packed (n, k) weight and its float64 values: Q4_0, Q4_1, Q4_K blocks held as
    their Q4_1 twin (float32 scales and offsets, the GPU's form of Q4_K where the codes do
    not take it), Q6_K or Q4_K as stored."""
    qtype = KINDS[kind]
    per_row = k // (256 if qtype in (QuantType.Q4_K, QuantType.Q6_K) else 32)
    assert kind != "Q4_K twin" or qm.LEGACY_TWINS[qtype] == QuantType.Q4_1
    blocks = torch.from_numpy(random_blocks(rng, qtype, (n, per_row)).reshape(n, -1))
    w = qm.pack_weight(blocks.to(DEVICE), qtype, (n, k), legacy_twin=kind == "Q4_K twin")
    assert w.qtype in xcodes.TYPES
    return w, dequantize(blocks, qtype).double()


def q4_0_weight(rng: np.random.Generator, n: int, k: int):
    return q4_weight(rng, n, k)


def prologue_reference(x: torch.Tensor, pro: int, g: torch.Tensor, k: int) -> torch.Tensor:
    """float64 prologue output of one row (0 x, 1 RMSNorm, 2 SiLU / 3 GELU-tanh gating)."""
    xd = x.double().reshape(-1).cpu()
    if pro == 0:
        return xd
    if pro == 1:
        return xd / torch.sqrt((xd * xd).mean() + EPS) * g.double().cpu()
    gate, up = xd[:k], xd[k:]
    if pro == 2:
        return torch.nn.functional.silu(gate) * up
    return torch.nn.functional.gelu(gate, approximate="tanh") * up


def codes_x(codes) -> torch.Tensor:
    words, scales, _ = codes
    c = words.cpu().view(torch.int8).double().reshape(xcodes.LEVELS, -1, 32)
    return (c * scales.cpu().double()[:, :, None]).sum(dim=0).reshape(-1)


def assert_codes_stand_for(codes, y: torch.Tensor, what: str = "codes") -> None:
    """Two levels of codes stand for float64 y within half the second level's step (each
    32-block's amax / 127 / 254 / 2, 1% slack for the scales' float32 rounding) plus float32
    roundings of y itself; the codes are int8 and their sums match."""
    y = y.reshape(-1, 32)
    amax = y.abs().amax(dim=1, keepdim=True)
    err = (codes_x(codes).reshape(-1, 32) - y).abs()
    bound = amax * (1 / (127 * 254 * 2) * 1.01) + 1e-6 * y.abs() + 1e-30
    assert (err <= bound).all(), f"{what}: worst {(err / bound).max():.3g} of the bound"
    c = codes[0].cpu().view(torch.int8).reshape(xcodes.LEVELS, -1, 32).int()
    assert torch.equal(c.sum(dim=2), codes[2].cpu()), f"{what}: code sums"
    assert c.abs().max() <= 127


@pytest.mark.parametrize("pro", [0, 1, 2, 3])
@pytest.mark.parametrize("k", [256, 1024])
def test_codes_stand_for_the_prologue_output(rng, pro: int, k: int) -> None:
    width = 2 * k if pro >= 2 else k
    x = torch.from_numpy(rng.standard_normal((1, width), dtype=np.float32) * 3).to(DEVICE)
    g = torch.from_numpy(rng.random(k, dtype=np.float32) + 0.5).to(DEVICE)
    codes = xcodes.quantize(x, k, pro, g if pro == 1 else None, EPS)
    assert_codes_stand_for(codes, prologue_reference(x, pro, g, k))


@pytest.mark.parametrize("chunk_max", [256, 4096])
def test_norm_codes_in_one_chunk_or_several(rng, monkeypatch, chunk_max: int) -> None:
    """The quantizing kernel's RMSNorm sums x^2 over the row in one chunk (the default) or
    in several (`qm.RMS_CHUNK_MAX` 256): the same codes' bound either way."""
    monkeypatch.setattr(qm, "RMS_CHUNK_MAX", chunk_max)
    k = 1024
    x = torch.from_numpy(rng.standard_normal((1, k), dtype=np.float32) * 3).to(DEVICE)
    g = torch.from_numpy(rng.random(k, dtype=np.float32) + 0.5).to(DEVICE)
    assert_codes_stand_for(xcodes.quantize(x, k, 1, g, EPS), prologue_reference(x, 1, g, k))


def check_codes_gemv(rng, n: int, k: int, kind: str = "Q4_0", accumulate: bool = False) -> None:
    """`gemv` of a fresh (n, k) weight and row against float64 of the x its codes stand for:
    its integer dots are exact, its float32 sums err by ~1e-6 of sum |w x| (+ |out| when
    it adds into out); a poisoned out when it does not."""
    w, dense = q4_weight(rng, n, k, kind)
    x = torch.from_numpy(rng.standard_normal((1, k), dtype=np.float32)).to(DEVICE)
    codes = xcodes.quantize(x, k, 0)
    start = torch.from_numpy(rng.standard_normal((1, n), dtype=np.float32)).to(DEVICE)
    out = start.clone() if accumulate else torch.full((1, n), float("nan"), device=DEVICE)
    got = xcodes.gemv(codes, w, out, accumulate).double().cpu().reshape(-1)
    xr = codes_x(codes)
    base = start.double().cpu().reshape(-1) if accumulate else torch.zeros(n, dtype=torch.float64)
    err = (got - (dense @ xr + base)).abs()
    mag = dense.abs() @ xr.abs() + base.abs()
    assert (err <= 2e-6 * mag + 1e-30).all(), f"{n}x{k}: {(err / (mag + 1e-30)).max():.3g}"


@pytest.fixture
def q4k_on(monkeypatch):
    """Q4_K rows over the codes as stored (off by default: LLAMAPY_GPU_X_CODES_Q4K_PIPE), at
    the tiles measured."""
    monkeypatch.setattr(xcodes, "_Q4K_PIPE", dict(xcodes.Q4K_PIPE_MEASURED))


@pytest.mark.parametrize("kind", ["Q4_0", "Q4_1", "Q4_K twin", "Q6_K", "Q4_K"])
@pytest.mark.parametrize("accumulate", [False, True])
@pytest.mark.parametrize(("n", "k"), SHAPES)
def test_codes_gemv_matches_float64(
    rng, q4k_on, n: int, k: int, accumulate: bool, kind: str
) -> None:
    check_codes_gemv(rng, n, k, kind, accumulate)


@pytest.mark.parametrize("tile", [(2, 32, 1), (2, 64, 1), (1, 128, 4), (1, 256, 4)])
def test_codes_gemv_tiles(rng, monkeypatch, tile) -> None:
    """Every tile the labs sweep (the persistent form off), over K of one and several steps
    and N past the last full tile."""
    monkeypatch.setattr(xcodes, "_PIPE", {"short": None, "long": None})
    monkeypatch.setattr(xcodes, "_Q41_PIPE", {"short": None, "long": None})
    monkeypatch.setattr(xcodes, "_TILE", tile)
    monkeypatch.setattr(xcodes, "_TILE_LONG_K", tile)
    for n, k in [(37, 1024), (5, 4096 if tile[1] > 32 else 2048)]:
        check_codes_gemv(rng, n, k)
        check_codes_gemv(rng, n, k, "Q4_1")


@pytest.mark.parametrize("kind", ["Q4_0", "Q4_1"])
@pytest.mark.parametrize("accumulate", [False, True])
@pytest.mark.parametrize("config", [(1, 1, 1, 1), (2, 1, 2, 1), (4, 2, 1, 2), (2, 1, 16, 2)])
def test_persistent_codes_gemv(rng, monkeypatch, config, accumulate: bool, kind: str) -> None:
    """The persistent, pipelined form (`xcodes._PIPE`): programs over several row tiles each
    (the interpreter's 4 SMs; N past the last full tile, tiles past the last program's), one
    or two tiles' loads ahead, K of one 32-block, a power of two and not (BLOCK_B padded)."""
    monkeypatch.setattr(xcodes, "_PIPE", {"short": config, "long": config})
    monkeypatch.setattr(xcodes, "_Q41_PIPE", {"short": config, "long": config})
    for n, k in [(37, 256), (11, 32), (9, 800)]:
        check_codes_gemv(rng, n, k, kind, accumulate)


@pytest.mark.parametrize("kind", ["Q6_K", "Q4_K"])
@pytest.mark.parametrize("accumulate", [False, True])
@pytest.mark.parametrize("config", [(1, 1, 1, 1), (2, 1, 16, 1), (4, 2, 1, 2), (1, 4, 4, 1)])
def test_kquant_codes_gemv(rng, monkeypatch, config, accumulate: bool, kind: str) -> None:
    """The Q6_K and Q4_K kernels (`_q6k_pipe_kernel`, `_q4k_pipe_kernel`) at every tile the
    lab sweeps: programs over one or several row tiles (the interpreter's 4 SMs; N past the
    last full tile), one or two tiles' loads ahead, K of one super-block, a power of two of
    units and not (the tile padded: 2304 = 18 Q6_K units, 36 Q4_K pairs)."""
    monkeypatch.setattr(xcodes, "_Q6K_PIPE", {"short": config, "long": config})
    monkeypatch.setattr(xcodes, "_Q4K_PIPE", {"short": config, "long": config})
    for n, k in [(37, 256), (9, 2304), (3, 512)]:
        check_codes_gemv(rng, n, k, kind, accumulate)


def test_q4_1_long_k_default_is_persistent_without_pdl(rng, monkeypatch) -> None:
    """The defaults: Q4_1's long K (down) takes the persistent form, Q4_0's the tiled one;
    the persistent kernels launch with PDL whatever the weight's size at short K, by the PDL
    size rule at long K (LLAMAPY_GPU_X_CODES_PIPE_PDL: 0 the rule everywhere, "all" PDL at
    long K too). The Q4_1 default's tile against float64 (a long K over the interpreter's 4
    SMs, N past the last tile)."""
    from llamapy.quant.types import QuantType

    assert xcodes._pipe_for(8192, QuantType.Q4_1) == xcodes.Q41_PIPE_DEFAULT["long"]
    assert xcodes._pipe_for(8192, QuantType.Q4_0) is None
    assert xcodes._pipe_for(2048, QuantType.Q4_1) == xcodes._pipe_for(2048, QuantType.Q4_0)
    check_codes_gemv(rng, 2 * xcodes.Q41_PIPE_DEFAULT["long"][0] * 4 * 3 + 5, 4096, "Q4_1", True)
    monkeypatch.setattr(xcodes, "_pdl", lambda device, weight_bytes: weight_bytes is None)
    out = torch.empty(1, 8, device=DEVICE)

    def pdl_whatever_size(kind: str, k: int) -> bool:
        return xcodes._pipe_grid(q4_weight(rng, 8, k, kind)[0], out, (2, 1, 1, 1))[2]

    monkeypatch.delenv(xcodes.PIPE_PDL_SWITCH, raising=False)
    cases = [("Q4_1", 4096), ("Q4_1", 2048), ("Q6_K", 4096), ("Q6_K", 2048)]
    assert [pdl_whatever_size(t, k) for t, k in cases] == [False, True, False, True]
    monkeypatch.setenv(xcodes.PIPE_PDL_SWITCH, "all")
    assert [pdl_whatever_size(t, 4096) for t in ("Q4_1", "Q6_K")] == [True, True]
    monkeypatch.setenv(xcodes.PIPE_PDL_SWITCH, "0")
    assert not pdl_whatever_size("Q4_0", 2048)


FORMS = ["plain", "norm", "silu+res", "gelu_tanh", "res"]


@pytest.mark.parametrize("kind", ["Q4_0", "Q4_1", "Q6_K", "Q4_K"])
@pytest.mark.parametrize("form", FORMS)
def test_qmatmul_routes_large_q4_rows(rng, monkeypatch, q4k_on, form: str, kind: str) -> None:
    """With the thresholds lowered to a small shape, `qmatmul` takes the codes path for one
    float32 row (counted); it and the float32 GEMV (LLAMAPY_GPU_X_CODES=0) agree with the
    float64 reference within their errors; two rows, or the switch off, take the float32
    GEMV."""
    n, k = 24, 256
    monkeypatch.setattr(xcodes, "MIN_K", k)
    monkeypatch.setattr(xcodes, "MIN_WEIGHTS", n * k)
    monkeypatch.setattr(qm, "GEMV_INT8_X", False)
    calls = []
    real = xcodes.matmul
    monkeypatch.setattr(xcodes, "matmul", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    w, dense = q4_weight(rng, n, k, kind)
    act = {"silu+res": "silu", "gelu_tanh": "gelu_tanh"}.get(form)
    x = torch.from_numpy(rng.standard_normal((1, 2 * k if act else k), dtype=np.float32))
    kw = {}
    if form == "norm":
        g = torch.from_numpy(rng.random(k, dtype=np.float32) + 0.5).to(DEVICE)
        kw = {"norm_weight": g, "eps": EPS}
    if act:
        kw["act"] = act
    res = torch.from_numpy(rng.standard_normal((1, n), dtype=np.float32)).to(DEVICE)

    def run(switch: str, rows=x) -> torch.Tensor:
        monkeypatch.setenv("LLAMAPY_GPU_X_CODES", switch)
        extra = {"residual": res.repeat(rows.shape[0], 1)} if form.endswith("res") else {}
        return qm.qmatmul(rows.to(DEVICE), w, **kw, **extra).double().cpu()

    got = run("1")
    assert len(calls) == 1
    want = run("0")
    assert len(calls) == 1
    # float64 reference; errors bounded per row by the codes' error of each element of the
    # prologue output y (its block's amax / 127 / 254 / 2, as above) weighted by |w|, plus
    # the float32 prologue and sums (~1e-6 of sum |w y| each); the random blocks' scales
    # span decades, so the rows' sums cancel far below sum |w y| and a bound relative to
    # the output alone would not hold
    pro = {"plain": 0, "res": 0, "norm": 1, "silu+res": 2, "gelu_tanh": 3}[form]
    y = prologue_reference(x, pro, kw.get("norm_weight"), k)
    ref = dense @ y + (res.double().cpu().reshape(-1) if form.endswith("res") else 0)
    float_err = 3e-6 * (dense.abs() @ y.abs()) + 1e-6 * res.double().cpu().abs().reshape(-1)
    amax = y.reshape(-1, 32).abs().amax(dim=1).repeat_interleave(32)
    codes_err = dense.abs() @ (amax * (1.01 / (127 * 254 * 2)))
    for name, out, bound in (("codes", got, codes_err + float_err), ("float32", want, float_err)):
        err = (out.reshape(-1) - ref).abs()
        assert (err <= bound + 1e-30).all(), f"{name}: worst {(err / bound).max():.3g} of the bound"
    run("1", rows=torch.cat([x, x]))  # two rows: the float32 GEMV
    assert len(calls) == 1


def test_small_or_other_weights_keep_the_float32_gemv(rng) -> None:
    w, _ = q4_0_weight(rng, 64, 256)
    x = torch.zeros(1, 256, device=DEVICE)
    assert not xcodes.takes(x, w, None)  # below MIN_K / MIN_WEIGHTS
    w8 = qm.pack_weight(
        torch.from_numpy(random_blocks(rng, QuantType.Q8_0, (64, 8)).reshape(64, -1)).to(DEVICE),
        QuantType.Q8_0,
        (64, 256),
    )
    assert not xcodes.takes(x, w8, None)


def test_q6k_side_switched_off_keeps_the_kquant_gemv(rng, monkeypatch) -> None:
    """LLAMAPY_GPU_X_CODES_Q6K_PIPE's "-" for a side: Q6_K weights of that K are not taken
    (and `gemv` refuses them); the other side still is."""
    monkeypatch.setattr(xcodes, "MIN_K", 256)
    monkeypatch.setattr(xcodes, "MIN_WEIGHTS", 1)
    monkeypatch.setattr(xcodes, "_row_fits", lambda x: True)
    monkeypatch.setattr(
        xcodes, "_Q6K_PIPE", xcodes._pipe_config("2,1,16/-", xcodes.Q6K_PIPE_DEFAULT, "V")
    )
    short, _ = q4_weight(rng, 8, 256, "Q6_K")
    long, _ = q4_weight(rng, 8, 4096, "Q6_K")
    x = torch.zeros(1, 4096, device=DEVICE)
    assert xcodes.takes(x[:, :256], short, None) and xcodes.weight_takes(short)
    assert not xcodes.takes(x, long, None) and not xcodes.weight_takes(long)
    with pytest.raises(ValueError, match="Q6_K codes GEMV is off for K=4096"):
        xcodes.gemv(xcodes.quantize(x, 4096, 0), long, torch.zeros(1, 8, device=DEVICE), False)


def test_bad_inputs_are_refused(rng) -> None:
    w, _ = q4_0_weight(rng, 8, 256)
    x = torch.zeros(1, 256, device=DEVICE)
    with pytest.raises(ValueError, match="one contiguous float32 row"):
        xcodes.quantize(x.half(), 256, 0)
    with pytest.raises(ValueError, match="does not fit"):
        xcodes.quantize(x, 256, 2)  # gating needs a [gate | up] row of 2K
    with pytest.raises(ValueError, match="norm prologue"):
        xcodes.quantize(x, 256, 1)
    codes = xcodes.quantize(torch.zeros(1, 512, device=DEVICE), 512, 0)
    with pytest.raises(ValueError, match="codes are for K=512"):
        xcodes.gemv(codes, w, torch.zeros(1, 8, device=DEVICE), False)
    with pytest.raises(ValueError, match="out must be"):
        xcodes.gemv(xcodes.quantize(x, 256, 0), w, torch.zeros(1, 9, device=DEVICE), False)
    w8 = qm.pack_weight(
        torch.from_numpy(random_blocks(rng, QuantType.Q8_0, (8, 8)).reshape(8, -1)).to(DEVICE),
        QuantType.Q8_0,
        (8, 256),
    )
    with pytest.raises(ValueError, match="the codes GEMV takes"):
        xcodes.gemv(xcodes.quantize(x, 256, 0), w8, torch.zeros(1, 8, device=DEVICE), False)


def test_switch_takes_the_project_off_values(monkeypatch) -> None:
    monkeypatch.delenv("LLAMAPY_GPU_X_CODES", raising=False)
    assert xcodes.enabled()
    for value, on in (("1", True), ("0", False), ("off", False), ("False", False)):
        monkeypatch.setenv("LLAMAPY_GPU_X_CODES", value)
        assert xcodes.enabled() is on, value


def test_lab_settings_parse_or_name_the_variable() -> None:
    assert xcodes._min_weights(None) == 1 << 24
    assert xcodes._min_weights("4000000") == 4_000_000
    assert xcodes._quant_tile(None) == xcodes.QUANT_TILE_DEFAULT == (8, 1)
    assert xcodes._pipe_config(None, xcodes.Q6K_PIPE_DEFAULT) == xcodes.Q6K_PIPE_DEFAULT
    assert xcodes._pipe_config("2,1,16,2/-", name="X") == {"short": (2, 1, 16, 2), "long": None}
    with pytest.raises(ValueError, match="LLAMAPY_GPU_X_CODES_Q6K_PIPE"):
        xcodes._pipe_config("3,1,16/-", name="LLAMAPY_GPU_X_CODES_Q6K_PIPE")
    assert xcodes._quant_tile("2,4") == (2, 4)
    with pytest.raises(ValueError, match="LLAMAPY_GPU_X_CODES_MIN_WEIGHTS"):
        xcodes._min_weights("4M")
    for bad in ("3,4", "a,b", "4"):
        with pytest.raises(ValueError, match="LLAMAPY_GPU_X_CODES_QUANT_TILE"):
            xcodes._quant_tile(bad)
    assert xcodes._pipe_config(None) == xcodes.PIPE_DEFAULT
    assert xcodes._pipe_config("off") == {"short": None, "long": None}
    assert xcodes._pipe_config("2,1,16/-") == {"short": (2, 1, 16, 1), "long": None}
    assert xcodes._pipe_config("1,1,24,2/2,4,3") == {"short": (1, 1, 24, 2), "long": (2, 4, 3, 1)}
    for bad in ("2,1,16", "3,1,16/-", "2,1,16,3/-", "2,1/-", "a/b", "2,1,16/-/-", "0,1,1/-"):
        with pytest.raises(ValueError, match="LLAMAPY_GPU_X_CODES_PIPE"):
            xcodes._pipe_config(bad)
