"""The fp16 fused dequantize-GEMM lab (benchmarks/kernels/gemm_f16_lab.py) against float64
torch references, on fresh random blocks and activations each run (the seed is printed).

Error bounds, from the arithmetic (u = 2^-11, fp16's unit roundoff):
- x is scaled per row by s = 2^e (max |x / s| <= 2^14) and rounded to fp16: |dx| <= u |x|,
  or s 2^-25 where x / s falls below fp16's normal range; each weight is one fp16 rounding
  of ggml's value (Q4_0 / Q8_0: d (q - 8) or d q is one correctly rounded product; Q4_1: one
  fp16 FMA, within u of ggml's float32 d q + m): |dw| <= u |w|, or 2^-25 when subnormal.
  So |y - x W^T| <= sum_k |x_k| |w_k| (2 u) (1.01 for u^2 terms) + the subnormal terms +
  float32 accumulation (K 2^-23 sum_k |x_k w_k|, twice the textbook constant: tensor cores).
- Against an fp16 emulation (x and W rounded as above by torch, products in float64) only
  the float32 accumulation differs; on CUDA, Q4_1's FMA may also differ from ggml's double
  rounding by one fp16 ulp of a weight.
- Split-K sums SPLIT_K float32 partials (each scaled by the row's power of two: exact) in
  order: a float32 sum of K products in another association, within the same K 2^-23 term.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import llamapy.kernels.triton as kt
from llamapy.quant.dequant import dequantize
from llamapy.quant.types import QuantType, block_size, row_nbytes, type_size

pytestmark = pytest.mark.skipif(not kt.HAS_TRITON, reason="triton is not installed")

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks" / "kernels"))
if kt.HAS_TRITON:
    import gemm_f16_lab as lab

    from llamapy.kernels.triton.qmatmul import pack_weight

ON_GPU = torch.cuda.is_available() and not kt.INTERPRET
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
T = QuantType
TYPES = [T.Q4_0, T.Q4_1, T.Q8_0]
# byte offsets of each block's fp16 scales (d, and m / dmin) and their spread: weights ~0.1
# for the legacy types; Q4_K's |w| up to ~10, Q6_K's ~130 (sc = -128, q = -32): within fp16
FP16_FIELDS = {
    T.Q4_0: ((0,), 0.01),
    T.Q4_1: ((0, 2), 0.01),
    T.Q8_0: ((0,), 0.01),
    T.Q4_K: ((0, 2), 0.01),
    T.Q6_K: ((208,), 0.001),
}
U = 2.0**-11  # fp16 unit roundoff
SUBNORMAL = 2.0**-25  # half of fp16's subnormal spacing: the rounding error below 2^-14


def random_blocks(rng: np.random.Generator, qtype: QuantType, n: int, k: int) -> torch.Tensor:
    """(n, row_bytes) uint8 blocks: every quant (and K-quant sub-block scale) equally likely,
    fp16 scales ~ N(0, spread^2) (`FP16_FIELDS`)."""
    offsets, spread = FP16_FIELDS[qtype]
    blocks = rng.integers(0, 256, (n * k // block_size(qtype), type_size(qtype)), dtype=np.uint8)
    for off in offsets:
        vals = (rng.standard_normal(blocks.shape[0]) * spread).astype(np.float16)
        blocks[:, off : off + 2] = vals.view(np.uint8).reshape(-1, 2)
    return torch.from_numpy(blocks.reshape(n, -1)).to(DEVICE)


def random_x(rng: np.random.Generator, m: int, k: int) -> torch.Tensor:
    return torch.from_numpy(rng.standard_normal((m, k), dtype=np.float32)).to(DEVICE)


def row_scales(x: torch.Tensor) -> torch.Tensor:
    """s = 2^(ceil(log2 max|x_row|) - 14) per row, float64 (M, 1)."""
    amax = x.abs().amax(dim=1, keepdim=True).clamp_min(1e-30)
    return torch.exp2(torch.ceil(torch.log2(amax)) - 14).double()


def check_exact(x: torch.Tensor, blocks: torch.Tensor, qtype: QuantType, y: torch.Tensor) -> None:
    """y against x @ W^T in float64 (W: the blocks dequantized), within the bound above."""
    k = x.shape[1]
    assert y.dtype == torch.float32 and y.shape == (x.shape[0], blocks.shape[0])
    x64 = x.double()
    w64 = dequantize(blocks, qtype, torch.float64)  # (N, K)
    ax, aw = x64.abs(), w64.abs()
    mag = ax @ aw.T  # sum_k |x_k| |w_k|
    bound = mag * (2 * U * 1.01 + k * 2.0**-23) + SUBNORMAL * (
        row_scales(x) * aw.sum(1)[None, :] + ax.sum(1)[:, None]
    )
    assert_within(qtype.name, (y.double() - x64 @ w64.T).abs(), bound)


def assert_within(name: str, err: torch.Tensor, bound: torch.Tensor) -> None:
    """Every |error| of an (M, N) result within its bound; the worst cell named if not."""
    worst = int(torch.argmax(err - bound))
    assert bool((err <= bound).all()), (
        f"{name}: error {err.flatten()[worst]:.3g} > bound {bound.flatten()[worst]:.3g} "
        f"at {divmod(worst, err.shape[1])}"
    )


def check_emulated(
    x: torch.Tensor, blocks: torch.Tensor, qtype: QuantType, y: torch.Tensor
) -> None:
    """y against the fp16 operands emulated by torch, products summed in float64: only the
    float32 accumulation (and on CUDA Q4_1's single-rounding FMA) may differ."""
    s = row_scales(x)
    x16 = (x.double() / s).half().double()  # power-of-two scaling: exact, then one rounding
    w16 = dequantize(blocks, qtype, torch.float32).half().double()  # ggml float32 -> fp16
    mag = (x16.abs() @ w16.abs().T) * s
    bound = mag * x.shape[1] * 2.0**-23
    if qtype == T.Q4_1 and ON_GPU:
        bound = bound + mag * U
    assert_within(f"{qtype.name} (fp16 emulation)", (y.double() - (x16 @ w16.T) * s).abs(), bound)


def run(rng, qtype, m, n, k, config=None, x=None):
    blocks = random_blocks(rng, qtype, n, k)
    w = pack_weight(blocks, qtype, (n, k))
    x = random_x(rng, m, k) if x is None else x
    y = lab.gemm_f16(x, w, config)
    return x, blocks, y


# --------------------------------------------------------------------------- numerics


@pytest.mark.parametrize("qtype", TYPES, ids=lambda q: q.name)
@pytest.mark.parametrize("k", [64, 128])
@pytest.mark.parametrize("n", [16, 48])
@pytest.mark.parametrize("m", [1, 5, 17])
def test_matches_float64_reference(rng, qtype: QuantType, m: int, n: int, k: int) -> None:
    """The rule's tiles: one partial row tile (BLOCK_M >= 16 > M, or 17 over two), one
    partial weight tile (BLOCK_N = 128 > N)."""
    x, blocks, y = run(rng, qtype, m, n, k)
    check_exact(x, blocks, qtype, y)
    check_emulated(x, blocks, qtype, y)


# GROUP_M=2 over 3 x 3 tiles: the grouped order's short last group; SWAP_AB: the transposed
# dot and store; BLOCK_B=1: one block per K step (4 steps at K=128). SPLIT_K=1: the kernel
# without split-K (without it the rule would split these K loops)
CONFIGS = [
    dict(BLOCK_M=16, BLOCK_N=16, BLOCK_B=1, GROUP_M=2, SPLIT_K=1),
    dict(BLOCK_M=16, BLOCK_N=16, BLOCK_B=2, GROUP_M=2, SWAP_AB=1, SPLIT_K=1),
    dict(BLOCK_M=32, BLOCK_N=32, BLOCK_B=4, GROUP_M=1, SWAP_AB=1, SPLIT_K=1),
    dict(BLOCK_M=64, BLOCK_N=64, BLOCK_B=2, SWAP_AB=0, SPLIT_K=1),
]


@pytest.mark.parametrize(
    "config", CONFIGS, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items())
)
@pytest.mark.parametrize("qtype", TYPES, ids=lambda q: q.name)
def test_tile_configs(rng, qtype: QuantType, config: dict[str, int]) -> None:
    x, blocks, y = run(rng, qtype, 40, 48, 128, config)
    check_exact(x, blocks, qtype, y)
    check_emulated(x, blocks, qtype, y)


# (M, N, K, tiles): K steps per split at SPLIT_K 2 / 3 in the comments
SPLIT_CASES = {
    # 4 steps: 2 + 2 / 2 + 2 + an empty split; 3 x 3 tiles, GROUP_M=2
    "even": (40, 48, 128, dict(BLOCK_M=16, BLOCK_N=16, BLOCK_B=1, GROUP_M=2)),
    # 5 steps: 3 + 2 / 2 + 2 + 1; partial row and weight tiles (17 rows of 16, 48 of 32),
    # the transposed dot
    "edges": (17, 48, 160, dict(BLOCK_M=16, BLOCK_N=32, BLOCK_B=1, SWAP_AB=1)),
    # 1 step: more splits than K steps, 1 + empty / 1 + empty + empty
    "empty": (5, 16, 64, dict(BLOCK_M=16, BLOCK_N=16, BLOCK_B=2)),
}


@pytest.mark.parametrize("case", SPLIT_CASES)
@pytest.mark.parametrize("split", [2, 3])
@pytest.mark.parametrize("qtype", TYPES, ids=lambda q: q.name)
def test_split_k(rng, qtype: QuantType, split: int, case: str) -> None:
    """Split-K within the same bounds, reproducible to the bit; where only one split gets K
    steps, bit-identical to SPLIT_K=1 (the empty splits add zeros)."""
    m, n, k, tile = SPLIT_CASES[case]
    config = {**tile, "SPLIT_K": split}
    x, blocks, y = run(rng, qtype, m, n, k, config)
    check_exact(x, blocks, qtype, y)
    check_emulated(x, blocks, qtype, y)
    w = pack_weight(blocks, qtype, (n, k))
    assert torch.equal(lab.gemm_f16(x, w, config), y)  # deterministic: no atomics
    if lab.used_splits(k, tile, split) == 1:  # the others are empty: exactly SPLIT_K=1's sums
        assert torch.equal(y, lab.gemm_f16(x, w, {**tile, "SPLIT_K": 1}))


def test_split_cases_cover_short_and_empty_splits() -> None:
    """The cases above do what their comments say (used_splits: splits that get K steps)."""
    used = {
        c: [lab.used_splits(k, t, s) for s in (2, 3)] for c, (_, _, k, t) in SPLIT_CASES.items()
    }
    assert used == {"even": [2, 2], "edges": [2, 3], "empty": [1, 1]}


def test_rule_split() -> None:
    """The rule's SPLIT_K makes about 2 x 132 programs, never more splits than K steps and
    none empty; a config without SPLIT_K gets the rule's split for its own tiles."""
    for m in (16, 64, 256):
        for n, k in ((3072, 2048), (2048, 2048), (2048, 8192), (16384, 2048)):
            cfg = lab.default_config(m, k, n)
            programs = lab.tiles(m, n, cfg) * cfg["SPLIT_K"]
            assert 2 * lab.SMS / 2**0.5 <= programs <= 2 * lab.SMS * 2**0.5, (m, n, k, cfg)
    assert lab.default_config(64, 2048, 2048)["SPLIT_K"] == 16  # 16 tiles of 64 x 128
    assert lab.default_config(64, 2048, 16384)["SPLIT_K"] == 2
    assert lab.default_config(256, 2048, 16384)["SPLIT_K"] == 1  # 256 tiles: no split
    cfg = lab.default_config(64, 576, 576)  # 5 tiles, 9 K steps: 9 splits of one step
    assert (cfg["BLOCK_B"], cfg["SPLIT_K"]) == (2, 9)
    assert lab.rule_split(64, 576, 576, dict(cfg, BLOCK_M=16, BLOCK_N=64)) == 5  # 36 tiles: 8 -> 5
    assert lab.default_config(5, 64, 16)["SPLIT_K"] == 1  # one K step
    tile = SPLIT_CASES["even"][3]
    assert lab._resolve(tile, 40, 48, 128)["SPLIT_K"] == 4  # 9 tiles, 4 K steps
    assert lab._resolve(None, 0, 48, 128)["SPLIT_K"] == 1


@pytest.mark.parametrize("qtype", TYPES, ids=lambda q: q.name)
def test_rows_of_very_different_magnitude(rng, qtype: QuantType) -> None:
    """Each row gets its own power-of-two scale: 1e5 would overflow fp16 and 1e-6 lose most
    of its bits as a subnormal, yet every row keeps fp16's relative precision."""
    mags = torch.tensor([1e4, 1e-4, 1e5, 1e-6, 1.0, 1e-4, 1e4], device=DEVICE)
    x = random_x(rng, len(mags), 128) * mags[:, None]
    x, blocks, y = run(rng, qtype, len(mags), 48, 128, x=x)
    check_exact(x, blocks, qtype, y)
    check_emulated(x, blocks, qtype, y)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_16_bit_x(rng, dtype: torch.dtype) -> None:
    x = random_x(rng, 5, 64).to(dtype)
    x, blocks, y = run(rng, T.Q4_0, 5, 16, 64, x=x)
    check_exact(x, blocks, T.Q4_0, y)


def test_strided_rows_and_empty_batch(rng) -> None:
    """x rows with a stride above K (a view of a wider buffer); M = 0."""
    wide = random_x(rng, 5, 96)
    x, blocks, y = run(rng, T.Q8_0, 5, 16, 64, x=wide[:, :64])
    check_exact(x, blocks, T.Q8_0, y)
    w = pack_weight(blocks, T.Q8_0, (16, 64))
    assert lab.gemm_f16(wide[:0, :64], w).shape == (0, 16)


@pytest.mark.skipif(not ON_GPU, reason="model shapes need a GPU")
@pytest.mark.parametrize("qtype", TYPES, ids=lambda q: q.name)
@pytest.mark.parametrize(("n", "k"), [(3072, 2048), (576, 1536), (960, 576)])
def test_model_shapes_on_gpu(rng, qtype: QuantType, n: int, k: int) -> None:
    for m in (16, 64, 256):
        for swap in (0, 1):
            for split in ({}, {"SPLIT_K": 1}, {"SPLIT_K": 7}):  # the rule's, none, uneven
                x, blocks, y = run(rng, qtype, m, n, k, {"SWAP_AB": swap, **split})
                check_exact(x, blocks, qtype, y)
                check_emulated(x, blocks, qtype, y)


# --------------------------------------------------------------------------- arguments


@pytest.fixture
def q4_weight(rng):
    return pack_weight(random_blocks(rng, T.Q4_0, 16, 128), T.Q4_0, (16, 128))


@pytest.mark.parametrize(
    ("make_x", "message"),
    [
        (lambda: torch.ones(2, 128, dtype=torch.float64), "float16, bfloat16 or float32"),
        (lambda: torch.ones(2, 128, dtype=torch.int32), "float16, bfloat16 or float32"),
        (lambda: torch.ones(2, 64), "K=64 columns"),
        (lambda: torch.ones(128), "2-D"),
        (lambda: torch.ones(128, 2).t(), "contiguous"),
    ],
    ids=["float64", "int32", "k-mismatch", "1-d", "column-major"],
)
def test_bad_x(q4_weight, make_x, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        lab.gemm_f16(make_x().to(DEVICE), q4_weight)


def test_unsupported_weight_type(rng) -> None:
    blocks = torch.from_numpy(rng.integers(0, 256, (16, row_nbytes(T.Q5_0, 64)), dtype=np.uint8))
    w = pack_weight(blocks.to(DEVICE), T.Q5_0, (16, 64))
    with pytest.raises(ValueError, match="Q4_0, Q4_1, Q8_0, Q4_K, Q6_K weights, got Q5_0"):
        lab.gemm_f16(torch.ones(2, 64, device=DEVICE), w)
    with pytest.raises(ValueError, match="PackedWeight"):
        lab.gemm_f16(torch.ones(2, 64, device=DEVICE), blocks)


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({"BLOCK_K": 64}, "config takes"),
        ({"BLOCK_B": 8}, "multiple of 32 \\* BLOCK_B = 256"),
        ({"BLOCK_N": 48}, "power of two"),
        ({"BLOCK_M": 8}, ">= 16"),
        ({"SWAP_AB": 2}, "SWAP_AB 0 or 1"),
        ({"SPLIT_K": 0}, "SPLIT_K must be an integer in \\[1, 65535\\], got 0"),
        ({"SPLIT_K": -2}, "SPLIT_K must be an integer"),
        ({"SPLIT_K": 2.0}, "SPLIT_K must be an integer"),
        ({"SPLIT_K": 1 << 16}, "SPLIT_K must be an integer"),
    ],
)
def test_bad_config(q4_weight, config: dict[str, int], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        lab.gemm_f16(torch.ones(2, 128, device=DEVICE), q4_weight, config)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a second device")
def test_device_mismatch(q4_weight) -> None:
    with pytest.raises(ValueError, match="is on"):
        lab.gemm_f16(torch.ones(2, 128, device="cpu" if DEVICE == "cuda" else "cuda"), q4_weight)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--types", "Q5_0"], "no gemm_f16 kernel for Q5_0"),
        (["--types", "Q9_9"], "ggml type names"),
        (["--m", "0"], "--m values must be >= 1"),
        (["--m", "x"], "--m takes integers"),
        (["--workers", "-1"], "--workers must be >= 0"),
        (["--split", "0,4"], "--split values must be in [1, 65535]"),
        (["--split", "4,x"], "--split takes integers"),
    ],
)
def test_benchmark_arguments(capsys, argv: list[str], message: str) -> None:
    with pytest.raises(SystemExit) as exc:
        lab.main(argv)
    assert exc.value.code == 2 and message in capsys.readouterr().err


@pytest.mark.skipif(ON_GPU, reason="checks the message on a machine without a usable GPU")
def test_benchmark_needs_a_gpu() -> None:
    with pytest.raises(SystemExit, match="needs a CUDA GPU"):
        lab.main(["--quick"])


def test_sweep_grid_is_pruned() -> None:
    """BLOCK_M follows M; every config fits the register budget the grid promises; each
    tile at SPLIT_K 1 and at most one split, never leaving a split empty."""
    for m, top in ((16, 16), (64, 64), (256, 128)):
        for n, k in ((2048, 2048), (576, 576), (16384, 2048)):
            grid = lab.sweep_grid(m, n, k)
            assert max(c["BLOCK_M"] for c in grid) == top
            per_tile: dict[str, list[int]] = {}
            for c in grid:
                threads = 32 * c["num_warps"]
                assert c["BLOCK_N"] * c["BLOCK_B"] * 32 <= 128 * threads
                assert 8 * threads <= c["BLOCK_M"] * c["BLOCK_N"] <= 128 * threads
                assert lab.fits(c, k) and c["SPLIT_K"] in lab.SPLITS
                assert lab.used_splits(k, c, c["SPLIT_K"]) == c["SPLIT_K"]
                per_tile.setdefault(lab.label({**c, "SPLIT_K": 0}), []).append(c["SPLIT_K"])
            assert all(s[0] == 1 and len(s) <= 2 for s in per_tile.values())
            assert len(per_tile) == sum(lab.fits(t, k) for t in lab.sweep_tiles(m))
    assert all(c["BLOCK_B"] <= 2 for c in lab.sweep_grid(64, 576, 576))
    # 2048 x 2048 at M = 64: 16 tiles of 64 x 128 want 16.5 splits, 128 tiles of 16 x 64 two
    grid = lab.sweep_grid(64, 2048, 2048)
    tile = dict(BLOCK_M=64, BLOCK_N=128, BLOCK_B=4, SWAP_AB=0, num_stages=3)
    assert [c["SPLIT_K"] for c in grid if tile.items() <= c.items()] == [1, 16]
    tile = dict(BLOCK_M=16, BLOCK_N=64, BLOCK_B=2, SWAP_AB=1, num_stages=4)
    assert [c["SPLIT_K"] for c in grid if tile.items() <= c.items()] == [1, 2]
    # --split: only the listed values (the nearest of them)
    assert {c["SPLIT_K"] for c in lab.sweep_grid(64, 2048, 2048, [1])} == {1}
    assert {c["SPLIT_K"] for c in lab.sweep_grid(64, 2048, 2048, [4])} == {4}
    assert {c["SPLIT_K"] for c in lab.sweep_grid(64, 2048, 2048, [4, 8])} == {4, 8}


def test_benchmark_plan() -> None:
    """The sweep at M = 64 (the rule's config first), the rule alone at other M; configs that
    differ only in SPLIT_K > 1 share a binary (one compile)."""
    args = lab._parse(["--split", "1,8"])
    plan = lab.planned(args, 64, 2048, 2048)
    assert plan[0] == lab.default_config(64, 2048, 2048) and len(plan) > 20
    assert {c["SPLIT_K"] for c in plan[1:]} == {1, 8}
    assert lab.planned(args, 16, 2048, 2048) == [lab.default_config(16, 2048, 2048)]
    assert lab.planned(lab._parse(["--quick"]), 64, 2048, 2048) == plan[:1]
    rule = plan[0]
    assert lab.binary({**rule, "SPLIT_K": 3}) == lab.binary({**rule, "SPLIT_K": 16}) != rule
    assert lab.binary({**rule, "SPLIT_K": 1}) == {**rule, "SPLIT_K": 1}
    assert {lab.binary(c)["SPLIT_K"] for c in plan} == {1, 2}


# --------------------------------------------------------------------------- Q4_K
# Q4_K tiles: w = fp16(q D16 - M16), one fp16 FMA of the sub-block's D = d sc and M = dmin mn
# each rounded to fp16 first (ggml: float32 D q - M). So |dw| <= u (|w| + q |D| + |M|)
# <= u (2 |w| + 2 |M|) (q D = w + M), plus 17 2^-25 where D, M or w fall below fp16's normal
# range (q <= 15). Units are 64 weights (32 bytes of qs: two sub-blocks).


def q4_k_parts(w) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per weight (N, K) float64: the quant q, D = d sc and M = dmin mn of its sub-block,
    from the packed tensors (qs in ggml's order: unit u's low nibbles are weights 64u + j,
    its high nibbles 64u + 32 + j)."""
    t = {name: v.cpu() for name, v in w.tensors.items()}
    n, k = w.n, w.k
    qs = t["qs"].reshape(n, k // 64, 32).long()
    q = torch.cat([qs & 0xF, qs >> 4], dim=2).reshape(n, k).double()
    sub = torch.arange(k) // 32
    d = t["d"].double()[:, torch.arange(k) // 256]
    dmin = t["dmin"].double()[:, torch.arange(k) // 256]
    return q, d * t["sc"].double()[:, sub], dmin * t["mn"].double()[:, sub]


def check_q4_k(x: torch.Tensor, blocks: torch.Tensor, y: torch.Tensor) -> None:
    """y against float64 x @ W^T within the bound above, and against the fp16 tiles emulated
    in torch (q D16 - M16 rounded once) within float32 accumulation."""
    n, k = blocks.shape[0], x.shape[1]
    w = pack_weight(blocks, T.Q4_K, (n, k))
    q, big_d, big_m = q4_k_parts(w)
    w64 = q * big_d - big_m  # exact; ggml's float32 D q - M is within 2^-24 of each term
    ggml = dequantize(blocks, T.Q4_K, torch.float64).cpu()
    assert bool(((ggml - w64).abs() <= 2.0**-23 * ((q * big_d).abs() + big_m.abs())).all())
    x64, y64 = x.double().cpu(), y.double().cpu()
    assert y.dtype == torch.float32 and y.shape == (x.shape[0], n)
    ax, aw = x64.abs(), w64.abs()
    mag = ax @ (aw + (2 * aw + 2 * big_m.abs())).T  # x's rounding + the weight's
    bound = mag * U * 1.01 + (ax @ aw.T) * k * 2.0**-23
    bound += SUBNORMAL * (row_scales(x64) * aw.sum(1)[None, :] + 17 * ax.sum(1)[:, None])
    assert_within("Q4_K", (y64 - x64 @ w64.T).abs(), bound)
    s = row_scales(x64)
    x16 = (x64 / s).half().double()
    w16 = (q * big_d.half().double() - big_m.half().double()).half().double()
    mag16 = (x16.abs() @ w16.abs().T) * s
    # float32 accumulation; and one fp16 ulp of a weight where float32 q D16 - M16 rounds
    # before fp16 (the interpreter's emulation of the FMA)
    bound16 = mag16 * (k * 2.0**-23 + U)
    assert_within("Q4_K (fp16 emulation)", (y64 - (x16 @ w16.T) * s).abs(), bound16)


@pytest.mark.parametrize("k", [256, 512])
@pytest.mark.parametrize("n", [16, 48])
@pytest.mark.parametrize("m", [1, 5, 17])
def test_q4_k_matches_float64_reference(rng, m: int, n: int, k: int) -> None:
    x, blocks, y = run(rng, T.Q4_K, m, n, k)
    check_q4_k(x, blocks, y)


# BLOCK_B 1 and 2: K steps that start inside a super-block (its d, dmin per unit); splits of
# 3 and 5 steps: short and empty ones; SWAP_AB: the transposed dot
Q4_K_CONFIGS = [
    dict(BLOCK_M=16, BLOCK_N=16, BLOCK_B=1, GROUP_M=2, SPLIT_K=1),
    dict(BLOCK_M=16, BLOCK_N=32, BLOCK_B=2, SWAP_AB=1, SPLIT_K=3),
    dict(BLOCK_M=32, BLOCK_N=16, BLOCK_B=1, SWAP_AB=1, SPLIT_K=5),
    dict(BLOCK_M=16, BLOCK_N=16, BLOCK_B=4, SPLIT_K=2),
]


@pytest.mark.parametrize(
    "config", Q4_K_CONFIGS, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items())
)
def test_q4_k_tiles_and_splits(rng, config: dict[str, int]) -> None:
    x, blocks, y = run(rng, T.Q4_K, 40, 48, 768, config)  # 3 super-blocks, 12 units
    check_q4_k(x, blocks, y)
    w = pack_weight(blocks, T.Q4_K, (48, 768))
    assert torch.equal(lab.gemm_f16(x, w, config), y)  # deterministic


def test_q4_k_unit_rule() -> None:
    """Q4_K's units are 64 weights: K = 2048 is 32 units, 16 K steps of 2 (128 weights a
    step, as the legacy types' 4 blocks; Q6_K's 128-weight units go one a step)."""
    from llamapy.kernels.triton import qgemm_f16

    assert qgemm_f16.unit(T.Q4_K) == 64 and qgemm_f16.unit(T.Q4_0) == 32
    cfg = lab.default_config(64, 2048, 2048, unit_size=64)
    assert cfg["BLOCK_B"] == 2 and lab.used_splits(2048, cfg, 8, unit_size=64) == 8
    assert lab.used_splits(2048, cfg, 32, unit_size=64) == 16  # no more splits than steps
    assert lab.default_config(64, 2048, 2048, unit_size=128)["BLOCK_B"] == 1
    assert lab.default_config(64, 576, 576)["BLOCK_B"] == 2  # 18 blocks: steps of 2
    with pytest.raises(ValueError, match="multiple of 64 \\* BLOCK_B = 256"):
        lab._resolve({"BLOCK_B": 4}, 16, 16, 192, unit_size=64)


def test_q4_k_through_qmatmul(rng) -> None:
    """qmatmul's path "f16" takes Q4_K (not routed there automatically yet): float32,
    bfloat16 x, a bias, and fused forms run unfused around it."""
    from llamapy.kernels.triton import qmatmul as qm

    n, k = 48, 512
    blocks = random_blocks(rng, T.Q4_K, n, k)
    w = pack_weight(blocks, T.Q4_K, (n, k))
    x = random_x(rng, 5, k)
    y = qm.qmatmul_with(x, w, path="f16")
    check_q4_k(x, blocks, y)
    bias = random_x(rng, 1, n)[0]
    assert torch.equal(qm.qmatmul_with(x, w, bias, path="f16"), y + bias)
    residual = random_x(rng, 5, n)
    expected = residual + y
    got = qm.qmatmul_with(x, w, path="f16", residual=residual.clone())
    assert torch.equal(got, expected)
    # routed at 64 rows only (measured: the dequantize path wins at 16-32)
    assert qm.f16_gemm_pays("cuda", T.Q4_K, 64, 2048, 2048)
    assert not qm.f16_gemm_pays("cuda", T.Q4_K, 32, 2048, 2048)
    assert not qm.f16_gemm_pays("cpu", T.Q4_K, 64, 2048, 2048)


# --------------------------------------------------------------------------- Q6_K
# Q6_K tiles: w = fp16((q - 32) D16), D16 = fp16(d sc) per 16 weights, so |dw| <= 2 u |w|
# plus 33 2^-25 where D or w is subnormal (|q - 32| <= 32). Units are 128 weights.


def q6_k_parts(w) -> tuple[torch.Tensor, torch.Tensor]:
    """Per weight (N, K) float64: q - 32 and D = d sc, from the packed ql, qh, sc, d (unit u:
    ql[64u..], qh[32u..]; run r of it: weights 128u + 32r + l, scale sc[k // 16])."""
    t = {name: v.cpu() for name, v in w.tensors.items()}
    n, k = w.n, w.k
    ql = t["ql"].reshape(n, k // 128, 64).long()
    qh = t["qh"].reshape(n, k // 128, 32).long()
    a, b = ql[..., :32], ql[..., 32:]
    runs = [(a & 0xF), (b & 0xF), (a >> 4), (b >> 4)]
    q = torch.cat([lo | (((qh >> (2 * r)) & 3) << 4) for r, lo in enumerate(runs)], dim=2)
    q = q.reshape(n, k).double() - 32
    kk = torch.arange(k)
    return q, t["d"].double()[:, kk // 256] * t["sc"].double()[:, kk // 16]


def check_q6_k(x: torch.Tensor, blocks: torch.Tensor, y: torch.Tensor) -> None:
    n, k = blocks.shape[0], x.shape[1]
    w = pack_weight(blocks, T.Q6_K, (n, k))
    q, big_d = q6_k_parts(w)
    w64 = q * big_d
    ggml = dequantize(blocks, T.Q6_K, torch.float64).cpu()
    assert bool(((ggml - w64).abs() <= 2.0**-23 * w64.abs()).all())  # the parts are W
    x64, y64 = x.double().cpu(), y.double().cpu()
    assert y.dtype == torch.float32 and y.shape == (x.shape[0], n)
    ax, aw = x64.abs(), w64.abs()
    bound = (ax @ aw.T) * (3 * U * 1.01 + k * 2.0**-23)
    bound += SUBNORMAL * (row_scales(x64) * aw.sum(1)[None, :] + 33 * ax.sum(1)[:, None])
    assert_within("Q6_K", (y64 - x64 @ w64.T).abs(), bound)
    s = row_scales(x64)
    x16 = (x64 / s).half().double()
    w16 = (q * big_d.half().double()).half().double()  # one rounding of an exact product
    bound16 = (x16.abs() @ w16.abs().T) * s * k * 2.0**-23
    assert_within("Q6_K (fp16 emulation)", (y64 - (x16 @ w16.T) * s).abs(), bound16)


@pytest.mark.parametrize("k", [256, 512])
@pytest.mark.parametrize("m", [1, 17])
def test_q6_k_matches_float64_reference(rng, m: int, k: int) -> None:
    x, blocks, y = run(rng, T.Q6_K, m, 48, k)
    check_q6_k(x, blocks, y)


@pytest.mark.parametrize(
    "config", Q4_K_CONFIGS, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items())
)
def test_q6_k_tiles_and_splits(rng, config: dict[str, int]) -> None:
    """BLOCK_B 1: steps that start in the second half of a super-block."""
    x, blocks, y = run(rng, T.Q6_K, 40, 48, 1024, config)  # 4 super-blocks, 8 units
    check_q6_k(x, blocks, y)


def test_q6_k_through_qmatmul(rng) -> None:
    from llamapy.kernels.triton import qmatmul as qm

    n, k = 48, 512
    blocks = random_blocks(rng, T.Q6_K, n, k)
    w = pack_weight(blocks, T.Q6_K, (n, k))
    x = random_x(rng, 3, k)
    check_q6_k(x, blocks, qm.qmatmul_with(x, w, path="f16"))
    assert qm.f16_gemm_pays("cuda", T.Q6_K, 64, 2048, 8192)
    assert not qm.f16_gemm_pays("cuda", T.Q6_K, 63, 2048, 8192)


def test_q4_k_in_the_lab() -> None:
    assert lab._parse(["--types", "Q4_K,Q6_K,Q4_0"]).types == [T.Q4_K, T.Q6_K, T.Q4_0]
    with pytest.raises(SystemExit):
        lab._parse(["--types", "Q5_0"])
    ks = {k for _, _, k in lab.shapes_for(T.Q4_K)}
    assert ks == {2048, 8192, 1536}  # SmolLM2's K = 576 has no whole super-blocks
    assert all(lab.fits(c, 2048, 64) for c in lab.sweep_grid(64, 2048, 2048, unit_size=64))
    plan = lab.planned(lab._parse(["--quick"]), 64, 2048, 2048, unit_size=64)
    assert plan == [lab.default_config(64, 2048, 2048, 64)]


@pytest.mark.skipif(not ON_GPU, reason="model shapes need a GPU")
@pytest.mark.parametrize(("n", "k"), [(3072, 2048), (16384, 2048), (2048, 8192)])
def test_k_quant_model_shapes_on_gpu(rng, n: int, k: int) -> None:
    for m in (1, 16, 64):
        for swap in (0, 1):
            x, blocks, y = run(rng, T.Q4_K, m, n, k, {"SWAP_AB": swap})
            check_q4_k(x, blocks, y)
            x, blocks, y = run(rng, T.Q6_K, m, n, k, {"SWAP_AB": swap})
            check_q6_k(x, blocks, y)
