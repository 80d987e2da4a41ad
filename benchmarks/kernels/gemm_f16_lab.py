"""Lab: the fp16-tile fused dequantize-GEMM (src/llamapy/kernels/triton/qgemm_f16.py) swept
and timed against dequantize + cuBLAS and the TF32 fused GEMM.

How the kernel builds fp16 tiles, scales x and splits K: the module's docstring.

GPU benchmark (checks against the dequant path, sweeps tiles and splits at M = 64, carries
the best 5 to the other M, prints a markdown table):

    PYTHONPATH=src python benchmarks/kernels/gemm_f16_lab.py [--types Q4_0,Q8_0,Q4_1,Q4_K,Q6_K]
        [--m 1,4,16,32,64,128,256] [--split 1,2,4,8,16] [--quick] [--workers 14]
        [--budget-s 220]

At M <= 4 the decode GEMV is timed too (is a tensor-core tile, 16 rows of which only M are
used, cheaper than the GEMV's CUDA-core arithmetic?). Q4_K runs the shapes whose K is a
multiple of their 256-weight super-blocks (Q4_K, Q6_K).
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import itertools
import math
import multiprocessing
import os
import sys
import time

import torch

from llamapy.kernels.triton import INTERPRET
from llamapy.kernels.triton import qmatmul as qm
from llamapy.kernels.triton.packed import PackedWeight
from llamapy.kernels.triton.qgemm_f16 import (  # noqa: F401  (re-exported for the tests)
    CONFIG_KEYS,
    MAX_SPLIT,
    SMS,
    TYPES,
    _resolve,
    default_config,
    gemm_f16,
    rule_split,
    tiles,
    unit,
    used_splits,
)
from llamapy.quant.types import QuantType, row_nbytes

# --------------------------------------------------------------------------- benchmark

SHAPES = [  # (name, N, K): Llama-3.2-1B, then SmolLM2-135M (QKV and gate/up fused)
    ("1b qkv", 3072, 2048),
    ("1b o", 2048, 2048),
    ("1b gate_up", 16384, 2048),
    ("1b down", 2048, 8192),
    ("smol qkv", 960, 576),
    ("smol o", 576, 576),
    ("smol gate_up", 3072, 576),
    ("smol down", 576, 1536),
]
SWEEP_M = 64  # the full sweep runs at this M; other M try its best TOP configs and the rule
TOP = 5
SPLITS = (1, 2, 4, 8, 16)  # SPLIT_K values the sweep picks from (--split)
MAX_REL_ERR = 1e-2  # against the dequant path (both round x and W to fp16: ~1e-3 expected)
ROTATE_BYTES = 80 << 20  # weight bytes per timed graph: more than an H100's 50 MB L2
MAX_COPIES = 512  # calls per graph (SmolLM2's 576x576 Q4_0 needs 440)


def sweep_tiles(m: int) -> list[dict[str, int]]:
    """Tiles for M rows (SPLIT_K 1): BLOCK_M <= M's power of two (>= 16), BLOCK_N 64 or 128,
    BLOCK_B 2, 4 or 8, 3 or 4 stages, either operand order; the fewer warps (4, else 8) that
    keep at most 128 fp16 weights (64 registers) and 128 accumulators per thread, and at
    least 8 accumulators."""
    top_m = max(16, 1 << (m - 1).bit_length())
    out = []
    for bm, bn, bb, stages, swap in itertools.product(
        (16, 32, 64, 128), (64, 128), (2, 4, 8), (3, 4), (0, 1)
    ):
        if bm > top_m:
            continue
        for warps in (4, 8):
            threads = 32 * warps
            if bn * bb * 32 <= 128 * threads and 8 * threads <= bm * bn <= 128 * threads:
                out.append({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_B": bb, "GROUP_M": 8,
                            "SWAP_AB": swap, "num_warps": warps, "num_stages": stages,
                            "SPLIT_K": 1})  # fmt: skip
                break
    return out


def sweep_grid(
    m: int, n: int, k: int, splits: tuple[int, ...] | list[int] = SPLITS, unit_size: int = 32
) -> list[dict[str, int]]:
    """Configs for an (M, N, K) product: each of `sweep_tiles` whose K step divides K, at
    SPLIT_K 1 (if in splits) and at the value of splits nearest (in log2) to 2 SMS / tiles,
    the rule's target, if that is not 1. Values that would leave a split empty (more splits
    than K steps, or 8 splits of 9 steps: 2 steps each, 5 used) are not tried. One split per
    tile keeps the sweep to about twice the tiles."""
    out = []
    for tile in sweep_tiles(m):
        if not fits(tile, k, unit_size):
            continue
        cands = [v for v in splits if used_splits(k, tile, v, unit_size) == v]
        if not cands:
            continue
        target = 2 * SMS / tiles(m, n, tile)
        best = min(cands, key=lambda v: (abs(math.log2(v / target)), v))
        out += [{**tile, "SPLIT_K": v} for v in sorted({best} | ({1} & set(cands)))]
    return out


def label(cfg: dict[str, int]) -> str:
    return "/".join(str(cfg[k]) for k in CONFIG_KEYS if k != "GROUP_M")


def binary(cfg: dict[str, int]) -> dict[str, int]:
    """cfg with SPLIT_K 2 for any SPLIT_K > 1: the config that builds the same GEMM binary
    (the kernel sees only whether K is split)."""
    return {**cfg, "SPLIT_K": min(cfg["SPLIT_K"], 2)}


def _random_packed(qtype: QuantType, n: int, k: int, device: str) -> PackedWeight:
    """A packed weight quantized from N(0, 0.05^2) floats (a trained layer's scale)."""
    from llamapy.quant.quantize import quantize

    blocks = quantize(torch.randn(n, k) * 0.05, qtype)
    return qm.pack_weight(blocks.to(device), qtype, (n, k))


def _copy(w: PackedWeight) -> PackedWeight:
    """The same weight in new memory (a rotating copy for the timings)."""
    return PackedWeight(w.qtype, w.n, w.k, {name: t.clone() for name, t in w.tensors.items()})


def fits(cfg: dict[str, int], k: int, unit_size: int = 32) -> bool:
    """Whether cfg's K step divides K (SmolLM2's K = 576 = 18 blocks takes BLOCK_B <= 2);
    any SPLIT_K runs (splits past the last K step are empty)."""
    return k % (unit_size * cfg["BLOCK_B"]) == 0


def shapes_for(qtype: QuantType) -> list[tuple[str, int, int]]:
    """SHAPES whose K the type can hold (K-quants: whole 256-weight super-blocks)."""
    whole = 256 if qtype in (QuantType.Q4_K, QuantType.Q6_K) else 32
    return [s for s in SHAPES if s[2] % whole == 0]


def _warm(qtype_name: str, cfg: dict[str, int]) -> tuple[str, dict[str, int], str]:
    """Worker: compile cfg's kernels by one run per specialization the shapes need (Triton
    specializes integers on divisibility by 16: K = 576 makes the scales' row stride 18),
    which fills Triton's disk cache for the timing process -> (type, cfg, "ok" or why not)."""
    try:
        qtype = QuantType[qtype_name]
        for k in sorted({k for _, _, k in shapes_for(qtype)}):
            if fits(cfg, k, unit(qtype)):
                gemm_f16(torch.randn(64, k, device="cuda"), _random_packed(qtype, 256, k, "cuda"),
                         cfg)  # fmt: skip
        torch.cuda.synchronize()
    except Exception as exc:  # out of shared memory, compile errors: the config is skipped
        return qtype_name, cfg, f"{type(exc).__name__}: {str(exc).splitlines()[0][:100]}"
    return qtype_name, cfg, "ok"


def precompile(todo: list[tuple[str, dict[str, int]]], workers: int) -> dict[tuple, str]:
    """Compile every (type, config) on a pool of spawned processes -> status by
    (type name, label)."""
    if workers <= 0:
        return {(q, label(c)): _warm(q, c)[2] for q, c in todo}
    ctx = multiprocessing.get_context("spawn")
    with cf.ProcessPoolExecutor(workers, mp_context=ctx) as pool:
        done = [f.result() for f in [pool.submit(_warm, q, c) for q, c in todo]]
    return {(q, label(c)): status for q, c, status in done}


def _timed(graph_time, ws: list[PackedWeight], fn) -> float:
    """us per call of fn(w), w rotating over ws, from CUDA-graph replays (at least ~500
    calls in all); inf if it fails."""
    try:
        return graph_time([lambda w=w: fn(w) for w in ws], reps=max(2, min(20, 512 // len(ws))))
    except Exception:  # a config that does not launch (resources): skipped
        torch.cuda.synchronize()
        return math.inf


def _rel_err(x: torch.Tensor, w: PackedWeight, cfg: dict[str, int] | None) -> float:
    """gemm_f16's relative (Frobenius) difference from the dequant path; raises above
    MAX_REL_ERR."""
    ref = qm.qmatmul_with(x, w, path="dequant").double()
    rel = float((gemm_f16(x, w, cfg).double() - ref).norm() / ref.norm())
    if not rel <= MAX_REL_ERR:
        raise RuntimeError(
            f"{w.qtype.name} {w.n}x{w.k} M={x.shape[0]} config {cfg}: relative error "
            f"{rel:.2e} against the dequant path (> {MAX_REL_ERR})"
        )
    return rel


def bench_cell(
    graph_time, ws: list[PackedWeight], m: int, configs: list[dict[str, int]]
) -> tuple[list[tuple[float, dict[str, int]]], float, float, float, float]:
    """At M rows: checks gemm_f16 (rule) against the dequant path, times `configs` and the
    current paths, checks the fastest config too -> ((us, cfg) fastest first, dequant us,
    fused gemm us, GEMV us (M <= 4, else inf), the larger relative error)."""
    x = torch.randn(m, ws[0].k, device="cuda")
    rel = _rel_err(x, ws[0], None)
    times = []
    for cfg in configs:
        t = _timed(graph_time, ws, lambda w, cfg=cfg: gemm_f16(x, w, cfg))
        if math.isfinite(t):
            times.append((t, cfg))
    times.sort(key=lambda p: p[0])
    if times:
        rel = max(rel, _rel_err(x, ws[0], times[0][1]))
    dq = _timed(graph_time, ws, lambda w: qm.qmatmul_with(x, w, path="dequant"))
    old = _timed(graph_time, ws, lambda w: qm.qmatmul_with(x, w, path="gemm"))
    gv = math.inf
    if m <= qm.GEMV_MAX_M:
        gv = _timed(graph_time, ws, lambda w: qm.qmatmul_with(x, w, path="gemv"))
    return times, dq, old, gv, rel


def _parse(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--types", default="Q4_0,Q8_0,Q4_1", help="of Q4_0, Q4_1, Q8_0, Q4_K, Q6_K")
    ap.add_argument("--m", default="16,32,64,128,256", help="rows of x, comma-separated")
    ap.add_argument("--quick", action="store_true", help="time the rule's config only")
    ap.add_argument("--workers", type=int, default=min(14, os.cpu_count() or 1),
                    help="compile processes (0: compile in this one)")  # fmt: skip
    ap.add_argument("--budget-s", type=float, default=220.0,
                    help="after this many seconds, time only the top configs")  # fmt: skip
    ap.add_argument("--split", default=",".join(map(str, SPLITS)),
                    help="SPLIT_K values the sweep picks from, comma-separated (the rule's "
                         "config keeps its own)")  # fmt: skip
    args = ap.parse_args(argv)
    try:
        args.types = [QuantType[name] for name in args.types.split(",")]
    except KeyError as exc:
        ap.error(f"--types takes ggml type names among Q4_0,Q4_1,Q8_0,Q4_K,Q6_K, got {exc}")
    bad = [t.name for t in args.types if t not in TYPES]
    if bad:
        ap.error(
            f"--types: no gemm_f16 kernel for {','.join(bad)} (Q4_0, Q4_1, Q8_0, Q4_K, Q6_K only)"
        )
    try:
        args.m = [int(v) for v in args.m.split(",")]
    except ValueError:
        ap.error(f"--m takes integers like 16,64, got {args.m!r}")
    if min(args.m) < 1:
        ap.error("--m values must be >= 1")
    try:
        args.split = sorted({int(v) for v in args.split.split(",")})
    except ValueError:
        ap.error(f"--split takes integers like 1,4,16, got {args.split!r}")
    if not 1 <= min(args.split) <= max(args.split) <= MAX_SPLIT:
        ap.error(f"--split values must be in [1, {MAX_SPLIT}]")
    if args.workers < 0 or not args.budget_s > 0:
        ap.error("--workers must be >= 0 and --budget-s > 0")
    return args


def planned(
    args: argparse.Namespace, m: int, n: int, k: int, unit_size: int = 32
) -> list[dict[str, int]]:
    """Configs timed at (M, N, K) before the sweep's top ones join: the rule's first, then
    (unless --quick) the sweep grid at SWEEP_M with --split's values."""
    rule = default_config(m, k, n, unit_size)
    grid = [] if args.quick or m != SWEEP_M else sweep_grid(m, n, k, args.split, unit_size)
    return [rule] + [c for c in grid if c != rule]


def main(argv: list[str] | None = None) -> None:
    args = _parse(argv)
    if not torch.cuda.is_available() or INTERPRET:
        sys.exit("gemm_f16_lab: the benchmark needs a CUDA GPU (and TRITON_INTERPRET unset)")
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from tune_decode import graph_time  # CUDA-graph replays of a list of calls

    t0 = time.time()
    plans = {(q, m, n, k): planned(args, m, n, k, unit(q))
             for q in args.types for m in args.m for _, n, k in shapes_for(q)}  # fmt: skip
    todo = {(q.name, label(binary(c))): (q.name, binary(c))
            for (q, *_), cfgs in plans.items() for c in cfgs}  # fmt: skip
    status = precompile(list(todo.values()), args.workers)  # by binary: SPLIT_K 1 or 2
    failed = sum(s != "ok" for s in status.values())
    print(f"{torch.cuda.get_device_name()}: {len(status) - failed}/{len(status)} kernels built, "
          f"{failed} failed to compile or run ({time.time() - t0:.0f} s)")  # fmt: skip
    print("config: BLOCK_M/BLOCK_N/BLOCK_B/SWAP_AB/num_warps/num_stages/SPLIT_K; speedup: the "
          "best of dequant, gemm and (M <= 4) gemv over f16\n")  # fmt: skip
    print("| type | N x K | M | best config | f16 us | dequant us | gemm us | gemv us | speedup "
          "| rel err |")  # fmt: skip
    print("| --- | --- | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for qtype in args.types:
        for _, n, k in shapes_for(qtype):
            copies = min(MAX_COPIES, math.ceil(ROTATE_BYTES / (n * row_nbytes(qtype, k))))
            w = _random_packed(qtype, n, k, "cuda")
            ws = [w] + [_copy(w) for _ in range(copies - 1)]
            rows = {}
            ranking: list[dict[str, int]] = []  # the sweep's configs, fastest first
            for m in sorted(args.m, key=lambda v: v != SWEEP_M):  # the sweep first
                configs = [c for c in plans[(qtype, m, n, k)]
                           if status[(qtype.name, label(binary(c)))] == "ok"]  # fmt: skip
                if time.time() - t0 > args.budget_s:
                    configs = configs[:1]  # out of time: the rule's config (and the top ones)
                top_m = max(16, 1 << (m - 1).bit_length())
                top = [c for c in ranking if c["BLOCK_M"] <= top_m][:TOP]
                configs += [c for c in top if c not in configs]
                times, dq, old, gv, rel = bench_cell(graph_time, ws, m, configs)
                if m == SWEEP_M:
                    ranking = [c for _, c in times]
                best_t, best = times[0] if times else (math.inf, None)
                rows[m] = (f"| {qtype.name} | {n}x{k} | {m} | {label(best) if best else '-'} | "
                           f"{best_t:.1f} | {dq:.1f} | {old:.1f} | {gv:.1f} | "
                           f"{min(dq, old, gv) / best_t:.2f}x | {rel:.1e} |")  # fmt: skip
            print("\n".join(rows[m] for m in sorted(rows)), flush=True)
            del w, ws
    print(f"\n({time.time() - t0:.0f} s; {failed} configs skipped: they did not compile)")


if __name__ == "__main__":
    main()
