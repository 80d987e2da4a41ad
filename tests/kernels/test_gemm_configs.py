"""The GEMM tile tables and hooks (`GEMM_TABLE`, `gemm_config=`) of the quantized matmuls, and
the tile sweep's (benchmarks/kernels/tune_gemm.py) grid, JSON-to-table logic and CLI.

Kernels run under TRITON_INTERPRET=1 on the CPU at small shapes (on CUDA as well); results are
checked against the float64 `qmatmul_reference` on fresh random weights.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import llamapy.kernels.triton as kt
from llamapy.quant.types import QuantType, block_size

pytestmark = pytest.mark.skipif(not kt.HAS_TRITON, reason="triton is not installed")

from llamapy.kernels.triton import qmatmul as qm  # noqa: E402
from llamapy.kernels.triton import qmatmul_kquants as qk  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "kernels" / "tune_gemm.py"
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
T = QuantType
# x float32: the GPU's dot runs in TF32 (x and W rounded to 2^-11 relative); the interpreter
# multiplies in float32. 4x the TF32 operand roundings plus float32 accumulation.
TOL = 4 * 2 * 2.0**-11 + 1e-5 if DEVICE == "cuda" else 1e-5


def load_tuner():
    spec = importlib.util.spec_from_file_location("tune_gemm", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def random_weight(rng: np.random.Generator, qtype: QuantType, n: int, k: int) -> torch.Tensor:
    """(n, row_bytes) uint8 blocks: random quants, fp16 scales of a trained model's size."""
    tg = load_tuner()
    return tg.random_blocks(qtype, n, k, rng).to(DEVICE)


def rel_err(y: torch.Tensor, exact: torch.Tensor) -> float:
    return ((y.double() - exact).norm() / exact.norm()).item()


# --------------------------------------------------------------------------- table lookup


def test_gemm_key_buckets() -> None:
    q = T.Q4_0
    assert qk.gemm_key(q, 32, 960, 576) is None  # small batches keep the rule
    assert qk.gemm_key(q, 33, 960, 576) == ("Q4_0", 64, "small")
    assert qk.gemm_key(q, 64, 960, 576) == ("Q4_0", 64, "small")
    assert qk.gemm_key(q, 65, 960, 576) == ("Q4_0", 256, "small")
    assert qk.gemm_key(q, 256, 3072, 2048) == ("Q4_0", 256, "large")
    assert qk.gemm_key(q, 257, 3072, 2048) == ("Q4_0", 512, "large")
    assert qk.gemm_key(T.Q6_K, 4096, 2048, 8192) == ("Q6_K", 512, "large")
    edge = qk.GEMM_SMALL_WEIGHTS
    assert qk.gemm_key(q, 100, edge // 512, 512)[2] == "small"
    assert qk.gemm_key(q, 100, edge // 512 + 1, 512)[2] == "large"
    # every model shape of the sweep lands in its intended class
    for name, n, k in load_tuner().SHAPES:
        assert qk.gemm_key(q, 512, n, k)[2] == ("small" if name.startswith("smol") else "large")


# The rules as they were before the tables (the empty table must not change them).
def old_legacy_rule(qtype: QuantType, m: int) -> dict[str, int]:
    bm = 16 if m <= 16 else 32 if m <= 32 else 64 if m <= 64 else 128
    bb = 2 if qtype in (T.F16, T.BF16, T.F32) else 4
    return {"BLOCK_M": bm, "BLOCK_N": 128 if bm >= 64 else 64, "BLOCK_B": bb, "GROUP_M": 8,
            "num_warps": 8 if bm >= 128 else 4, "num_stages": 3}  # fmt: skip


def old_kquant_rule(qtype: QuantType, m: int, n: int, k: int, sms: int) -> qk.KernelConfig:
    bm = 16 if m <= 16 else 32 if m <= 32 else 64 if m <= 64 else 128
    bn = 128 if bm == 128 else 64
    programs = -(-m // bm) * -(-n // bn)
    split = max(1, min(k // block_size(qtype), (2 * sms) // programs))
    warps, stages = (8, 1) if bm == 128 else (4, 2 if bm <= 32 else 1)
    return qk.KernelConfig(True, bm, bn, 1, split, warps, stages)


@pytest.mark.parametrize("m", [5, 16, 17, 33, 64, 100, 512, 2048])
def test_empty_tables_keep_the_rules(m: int, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(qm, "GEMM_TABLE", {})
    monkeypatch.setattr(qk, "GEMM_TABLE", {})
    for qtype in (T.Q4_0, T.Q8_0, T.F16, T.BF16):
        for n, k in ((960, 576), (16384, 2048)):
            assert qm._gemm_config(qtype, m, n, k) == old_legacy_rule(qtype, m)
    for qtype in (T.Q4_K, T.Q6_K):
        for n, k, sms in ((960, 1536, 132), (16384, 2048, 132), (2048, 8192, 1)):
            assert qk.gemm_config(qtype, m, n, k, sms) == old_kquant_rule(qtype, m, n, k, sms)


def test_legacy_table_entry_is_used(monkeypatch: pytest.MonkeyPatch) -> None:
    entry = {"BLOCK_M": 32, "BLOCK_N": 64, "BLOCK_B": 2, "num_warps": 4, "num_stages": 2}
    monkeypatch.setattr(qm, "GEMM_TABLE", {("Q8_0", 256, "large"): entry})
    assert qm._gemm_config(T.Q8_0, 200, 3072, 2048) == entry | {"GROUP_M": 8}
    # another type, bucket or size class: the rule
    assert qm._gemm_config(T.Q4_0, 200, 3072, 2048) == old_legacy_rule(T.Q4_0, 200)
    assert qm._gemm_config(T.Q8_0, 300, 3072, 2048) == old_legacy_rule(T.Q8_0, 300)
    assert qm._gemm_config(T.Q8_0, 200, 960, 576) == old_legacy_rule(T.Q8_0, 200)


def test_kquant_table_entry_is_used(monkeypatch: pytest.MonkeyPatch) -> None:
    table = {
        ("Q4_K", 512, "large"): {"block_m": 64, "block_n": 32, "num_warps": 4, "num_stages": 3},
        ("Q6_K", 64, "large"): {
            "block_m": 32,
            "block_n": 128,
            "num_warps": 8,
            "num_stages": 1,
            "split": 2,
        },  # fmt: skip
    }
    monkeypatch.setattr(qk, "GEMM_TABLE", table)
    cfg = qk.gemm_config(T.Q4_K, 512, 2048, 8192, 132)
    # no split in the entry: the rule's, for these tiles (8 x 64 programs fill 132 SMs)
    assert cfg == qk.KernelConfig(True, 64, 32, 1, 1, 4, 3)
    assert qk.gemm_config(T.Q4_K, 512, 2048, 2048, 1000).split == 3  # 2000 // 512 programs
    assert qk.gemm_config(T.Q6_K, 64, 3072, 2048, 132) == qk.KernelConfig(True, 32, 128, 1, 2,
                                                                            8, 1)  # fmt: skip
    assert qk.gemm_config(T.Q6_K, 65, 3072, 2048, 132) == old_kquant_rule(T.Q6_K, 65, 3072,
                                                                           2048, 132)  # fmt: skip


def test_bad_tiles_are_refused(rng: np.random.Generator) -> None:
    with pytest.raises(ValueError, match="GEMM tiles take"):
        qk.gemm_config(T.Q4_K, 64, 64, 256, 1, {"BLOCK_M": 64})
    n, k = 32, 256
    x = torch.randn(8, k, device=DEVICE)
    w = qm.pack_weight(random_weight(rng, T.Q4_0, n, k), T.Q4_0, (n, k))
    with pytest.raises(ValueError, match="gemm_config takes"):
        qm.qmatmul_with(x, w, gemm_config={"block_m": 16})
    with pytest.raises(ValueError, match="gemm_config applies"):
        qm.qmatmul_with(x, w, path="gemv", gemm_config={"BLOCK_M": 16})
    with pytest.raises(ValueError, match="gemm_config applies"):
        qm.qmatmul_with(
            x, w, gemm_config={"BLOCK_M": 16}, residual=torch.zeros(8, n, device=DEVICE)
        )


# --------------------------------------------------------------------------- the hook


class Spy:
    """Wraps a Triton kernel: records each launch's keyword arguments."""

    def __init__(self, kernel) -> None:
        self.kernel, self.calls = kernel, []

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.calls.append(kwargs)
            return self.kernel[grid](*args, **kwargs)

        return launch


LEGACY_CASES = [  # (type, M, config): tiles unlike the rule's, K steps that do not divide K
    (
        T.Q4_0,
        20,
        {"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_B": 2, "GROUP_M": 1, "num_warps": 2, "num_stages": 2},
    ),  # fmt: skip
    (T.Q8_0, 9, {"BLOCK_M": 32, "BLOCK_N": 16, "BLOCK_B": 1, "num_warps": 4, "num_stages": 1}),
    (T.Q4_1, 3, {"BLOCK_N": 16, "BLOCK_B": 8}),  # M <= GEMV_MAX_M: the config implies the GEMM
]


@pytest.mark.parametrize("case", LEGACY_CASES, ids=lambda c: f"{c[0].name}-M{c[1]}")
def test_legacy_hook_matches_reference(case, rng, monkeypatch) -> None:
    qtype, m, cfg = case
    n, k = 40, 288  # neither a multiple of the tiles
    spy = Spy(qm._gemm_kernel)
    monkeypatch.setattr(qm, "_gemm_kernel", spy)
    data = random_weight(rng, qtype, n, k)
    w = qm.pack_weight(data, qtype, (n, k))
    x = torch.from_numpy(rng.standard_normal((m, k), dtype=np.float32)).to(DEVICE)
    bias = torch.from_numpy(rng.standard_normal(n, dtype=np.float32)).to(DEVICE)
    y = qm.qmatmul_with(x, w, bias, gemm_config=cfg)
    exact = qm.qmatmul_reference(x.double(), data, qtype, (n, k), bias)
    assert rel_err(y, exact) <= TOL
    (launched,) = spy.calls
    assert {key: launched[key] for key in cfg} == cfg


@pytest.mark.parametrize("qtype", [T.Q4_K, T.Q6_K], ids=lambda t: t.name)
def test_kquant_hook_matches_reference(qtype, rng, monkeypatch) -> None:
    m, n, k = 7, 24, 512
    spy = Spy(qk._gemm_kernel)
    monkeypatch.setattr(qk, "_gemm_kernel", spy)
    data = random_weight(rng, qtype, n, k)
    w = qm.pack_weight(data, qtype, (n, k))
    x = torch.from_numpy(rng.standard_normal((m, k), dtype=np.float32)).to(DEVICE)
    cfg = {"block_m": 16, "block_n": 16, "split": 2, "num_warps": 2, "num_stages": 1}
    y = qm.qmatmul_with(x, w, gemm_config=cfg)
    exact = qm.qmatmul_reference(x.double(), data, qtype, (n, k))
    assert rel_err(y, exact) <= TOL
    (launched,) = spy.calls
    assert (launched["BM"], launched["BN"], launched["num_warps"]) == (16, 16, 2)


def test_table_entry_reaches_the_kernel(rng, monkeypatch) -> None:
    """A filled table changes the launch (and not the result) of a plain qmatmul call."""
    m, n, k = 40, 24, 256
    entry = {"BLOCK_M": 64, "BLOCK_N": 16, "BLOCK_B": 2, "num_warps": 2, "num_stages": 1}
    monkeypatch.setattr(qm, "GEMM_TABLE", {("Q4_0", 64, "small"): entry})
    spy = Spy(qm._gemm_kernel)
    monkeypatch.setattr(qm, "_gemm_kernel", spy)
    data = random_weight(rng, T.Q4_0, n, k)
    w = qm.pack_weight(data, T.Q4_0, (n, k))
    x = torch.from_numpy(rng.standard_normal((m, k), dtype=np.float32)).to(DEVICE)
    y = qm.qmatmul(x, w)
    assert rel_err(y, qm.qmatmul_reference(x.double(), data, T.Q4_0, (n, k))) <= TOL
    (launched,) = spy.calls
    assert {key: launched[key] for key in entry} == entry


# --------------------------------------------------------------------------- the sweep


def test_grid_is_pruned() -> None:
    tg = load_tuner()
    for qtype in (T.Q4_0, T.Q8_0, T.Q4_K, T.Q6_K):
        grid = tg.grid_for(qtype)
        assert 20 <= len(grid) <= 200, qtype
        assert len({json.dumps(c, sort_keys=True) for c in grid}) == len(grid)
        for cfg in grid:
            bm = tg.block_m_of(cfg)
            bn = cfg.get("BLOCK_N", cfg.get("block_n"))
            assert bm * bn / (32 * cfg["num_warps"]) <= tg.MAX_REGS
            # timed only where the row tile fits the batch
            assert all(m >= bm for *_, m in tg.cells(qtype, cfg))
            assert len(tg.cells(qtype, cfg)) == sum(m >= bm for m in tg.MS) * len(
                tg.shapes_for(qtype)
            )
    # K-quant shapes need K in whole super-blocks: SmolLM2's K=576 is left out
    assert all(k % 256 == 0 for _, _, k in tg.shapes_for(T.Q4_K))
    assert len(tg.shapes_for(T.Q4_0)) == len(tg.SHAPES)


def synthetic_results(rng: np.random.Generator) -> tuple[list[dict], dict, dict]:
    """Timings where config A wins the 1B cells at M=512 and the current choice wins the
    SmolLM2 ones; config C is fastest at one cell but missing from another."""
    a = {"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_B": 4, "GROUP_M": 8, "num_warps": 4,
         "num_stages": 2}  # fmt: skip
    b = a | {"BLOCK_N": 128}
    c = a | {"BLOCK_M": 128}
    results = []
    for name, n, k in [("1b qkv", 3072, 2048), ("1b o", 2048, 2048), ("smol o", 576, 576)]:
        large = name.startswith("1b")
        base = float(rng.uniform(50, 100))
        row = {"qtype": "Q4_0", "shape": name, "n": n, "k": k, "m": 512}
        results.append(row | {"cfg": None, "us": base})
        results.append(row | {"cfg": a, "us": base * (0.5 if large else 1.5)})
        results.append(row | {"cfg": b, "us": base * (0.7 if large else 1.2)})
        if name == "1b qkv":
            results.append(row | {"cfg": c, "us": base * 0.3})
    kq = {"block_m": 32, "block_n": 64, "num_warps": 4, "num_stages": 1, "split": 0}
    for m in (40, 64):
        row = {"qtype": "Q6_K", "shape": "1b down", "n": 2048, "k": 8192, "m": m}
        results.append(row | {"cfg": None, "us": 100.0})
        results.append(row | {"cfg": kq, "us": 80.0})
    row = {"qtype": "Q6_K", "shape": "1b down", "n": 2048, "k": 8192, "m": 16}  # no key
    results.append(row | {"cfg": kq, "us": 1.0})
    return results, a, kq


def test_best_table_and_emitted_python(rng, tmp_path) -> None:
    tg = load_tuner()
    results, a, kq = synthetic_results(rng)
    tables = tg.best_table(results)
    legacy, kquants = tables["legacy"], tables["kquants"]
    assert set(legacy) == {("Q4_0", 512, "large")}  # small: the current choice stays
    assert legacy[("Q4_0", 512, "large")] == a | {"_gain": pytest.approx(2.0)}
    assert set(kquants) == {("Q6_K", 64, "large")}
    assert kquants[("Q6_K", 64, "large")]["_gain"] == pytest.approx(1.25)

    path = tmp_path / "gemm.json"
    path.write_text(json.dumps({"device": "test", "results": results}))
    text = tg.emit_python(str(path))
    assert max(map(len, text.splitlines())) <= 100  # pastes ruff-clean
    legacy_src, kq_src = text.split("# qmatmul_kquants.py")
    scope: dict = {}
    exec(legacy_src, scope)  # noqa: S102 (our own output)
    assert scope["GEMM_TABLE"] == {("Q4_0", 512, "large"): a}
    exec(kq_src, scope)  # noqa: S102
    kq_entry = {key: v for key, v in kq.items() if key != "split"}  # split 0: the rule's
    assert scope["GEMM_TABLE"] == {("Q6_K", 64, "large"): kq_entry}
    # what it prints fits the config functions
    assert qk.gemm_config(T.Q6_K, 64, 2048, 8192, 132, kq_entry).block_n == 64


def test_best_table_needs_every_cell() -> None:
    tg = load_tuner()
    cfg = {"block_m": 64, "block_n": 64, "num_warps": 4, "num_stages": 1, "split": 1}
    results = [
        {"qtype": "Q4_K", "shape": s, "n": 2048, "k": 2048, "m": 256, "cfg": c, "us": us}
        for s, c, us in [("a", None, 10.0), ("b", None, 10.0), ("a", cfg, 1.0)]
    ]
    assert tg.best_table(results) == {"legacy": {}, "kquants": {}}


def run_script(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=120
    )


def test_dry_run_lists_the_grid() -> None:
    tg = load_tuner()
    done = run_script("--dry-run", "--types", "Q4_0,Q6_K")
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    heads = [ln for ln in lines if not ln.startswith("  ")]
    assert len(heads) == 2 and heads[0].startswith("Q4_0: ") and heads[1].startswith("Q6_K: ")
    n_q4 = len(tg.grid_for(T.Q4_0))
    assert f"{n_q4} configs" in heads[0]
    assert sum(ln.startswith("  BLOCK_M=") for ln in lines) == n_q4
    assert sum(ln.startswith("  block_m=") for ln in lines) == len(tg.grid_for(T.Q6_K))


@pytest.mark.parametrize(
    ("types", "message"), [("Q4_0,Q9_X", "unknown type"), ("F16", "no quantized GEMM kernel")]
)
def test_bad_types_are_refused(types: str, message: str) -> None:
    done = run_script("--dry-run", "--types", types)
    assert done.returncode != 0 and message in done.stderr


def test_check_and_time_on_a_tiny_shape(rng, tmp_path, monkeypatch) -> None:
    """The sweep's worker (dry compile for sm_90, one run per cell, reference check) and
    timing loop, with a wall-clock timer instead of CUDA graphs, at a tiny shape."""
    tg = load_tuner()
    monkeypatch.setattr(tg, "SHAPES", [("tiny", 24, 512)])
    monkeypatch.setattr(tg, "MS", (16, 40))
    monkeypatch.setattr(tg, "ROTATE_BYTES", 1)
    good = {"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_B": 2, "GROUP_M": 8, "num_warps": 4,
            "num_stages": 2}  # fmt: skip
    big = good | {"BLOCK_M": 32}  # only timed where M >= 32
    for cfg in (good, big):
        assert tg._check_one("Q4_0", cfg, DEVICE) == ("Q4_0", cfg, "ok")

    results: list[dict] = []
    path = tmp_path / "t.json"
    ticks = iter(range(1, 1000))
    tg.time_type(T.Q4_0, [good, big], results, str(path), math.inf, DEVICE,
                 timer=lambda calls: [c() for c in calls] and float(next(ticks)))  # fmt: skip
    got = [(r["m"], r["cfg"] is None, r["cfg"] == big) for r in results]
    assert got == [(16, True, False), (16, False, False), (40, True, False),
                   (40, False, False), (40, False, True)]  # fmt: skip
    assert json.loads(path.read_text())["results"] == results


def test_spill_pruning() -> None:
    tg = load_tuner()
    statuses = {
        ("Q4_0", 1): "ok regs=200 shared=0",
        ("Q4_0", 2): "spills: regs=255 stack=100 shared=0",
        ("Q4_0", 3): "spills: regs=255 stack=200 shared=0",
        ("Q4_0", 4): "fails: 262144 B shared memory",
        ("Q4_0", 5): "unknown (AttributeError)",
        # every build spills: the least-spilling ones (up to twice the least) still run
        ("Q4_K", 1): "spills: regs=255 stack=150 shared=0",
        ("Q4_K", 2): "spills: regs=255 stack=300 shared=0",
        ("Q4_K", 3): "spills: regs=255 stack=301 shared=0",
        ("Q4_K", 4): "fails: RuntimeError: ...",
    }
    keep = tg.keep_built(statuses, 128)
    assert {key for key, kept in keep.items() if kept} == {
        ("Q4_0", 1), ("Q4_0", 2), ("Q4_0", 5), ("Q4_K", 1), ("Q4_K", 2)
    }  # fmt: skip
    assert tg.spill_of(statuses[("Q4_K", 3)]) == 301 and tg.spill_of(statuses[("Q4_0", 1)]) == 0


def test_dry_compile_for_sm90() -> None:
    """Triton's bundled ptxas builds a config for sm_90 without a GPU and reports its
    registers, spills and shared memory (in a process without TRITON_INTERPRET)."""
    code = f"""
import sys
sys.path.insert(0, {str(SCRIPT.parent)!r})
import tune_gemm as tg
from llamapy.quant.types import QuantType as Q
small = dict(BLOCK_M=32, BLOCK_N=64, BLOCK_B=2, GROUP_M=8, num_warps=4, num_stages=2)
huge = dict(BLOCK_M=128, BLOCK_N=256, BLOCK_B=8, GROUP_M=8, num_warps=4, num_stages=3)
print(tg.dry_compile(Q.Q4_0, small))
print(tg.dry_compile(Q.Q4_0, huge))
print(tg.dry_compile(Q.Q6_K, dict(block_m=32, block_n=32, num_warps=4, num_stages=1)))
"""
    env = {key: v for key, v in os.environ.items() if key != "TRITON_INTERPRET"}
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env
    )
    if done.returncode and "ptxas" in done.stderr:
        pytest.skip(f"no usable ptxas: {done.stderr.splitlines()[-1]}")
    assert done.returncode == 0, done.stderr
    small, huge, q6k = done.stdout.splitlines()
    assert small.startswith("ok regs=") and int(small.split("regs=")[1].split()[0]) <= 255
    assert huge.startswith(("fails", "spills")), huge  # 384 KiB of stages, or spilled
    assert q6k.startswith(("ok", "spills")), q6k
