"""Fused dequantize-matmul (kernels/triton/qmatmul.py) vs cuBLAS bf16 `x @ W_bf16.T`, same
shapes, same sitting, on one CUDA GPU. Each config is checked against the float64 reference
first; times are medians of `triton.testing.do_bench` (which clears L2 before each call) over
rotating weight copies (so no call finds its weight in L2 either). GB/s counts the packed
weight bytes only.

    python benchmarks/kernels/bench_qmatmul.py [--types Q4_0,Q8_0] [--ms 1,16,64,256,512]
        [--shapes 2048x8192,...] [--crossover] [--json]
    TRITON_INTERPRET=1 python benchmarks/kernels/bench_qmatmul.py --smoke   # CPU, tiny, quick

--crossover adds M = 2, 4, 8 with both kernels forced (where GEMV stops paying: GEMV_MAX_M).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
import time

import torch

# (N, K) of a ~1B llama (SmolLM2-360M / Llama-3.2-1B projections)
REAL_SHAPES = [(576, 576), (1536, 576), (576, 1536), (2048, 2048), (8192, 2048), (2048, 8192)]
TYPE_NAMES = ["Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "F16", "BF16", "F32"]
ROTATE_BYTES = 200 << 20  # weight copies cycled per config: several times an H100's 50 MB L2
UNIT_ROUNDOFF = {torch.float32: 2.0**-24, torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8}


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--types", default=",".join(TYPE_NAMES), help="comma-separated quant types")
    ap.add_argument("--ms", default="1,16,64,256,512", help="comma-separated batch rows M")
    ap.add_argument("--shapes", default=None, help="comma-separated NxK (default: model shapes)")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    ap.add_argument("--crossover", action="store_true", help="also M=2,4,8 with both kernels")
    ap.add_argument("--smoke", action="store_true", help="tiny shapes, CPU under the interpreter")
    ap.add_argument("--json", action="store_true", help="print the rows as JSON lines too")
    return ap.parse_args()


def random_weight(qtype, n: int, k: int, device: str, gen: torch.Generator) -> torch.Tensor:
    """(n, row_bytes) uint8 blocks: random quants, moderate fp16 scales (|w| ~ 0.1)."""
    from llamapy.quant.types import QuantType, row_nbytes, type_size

    floats = {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32}
    if qtype.name in floats:
        w = torch.randn(n, k, generator=gen, device=device) * 0.1
        return w.to(floats[qtype.name]).view(torch.uint8).reshape(n, -1)
    data = torch.randint(0, 256, (n, row_nbytes(qtype, k)), generator=gen, device=device)
    blocks = data.to(torch.uint8).view(-1, type_size(qtype))
    n_fp16 = 2 if qtype in (QuantType.Q4_1, QuantType.Q5_1) else 1  # d (and m) lead the block
    scales = torch.randn(blocks.shape[0], n_fp16, generator=gen, device=device) * 0.01
    blocks[:, : 2 * n_fp16] = scales.to(torch.float16).view(torch.uint8)
    return blocks.view(n, -1)


def timer(smoke: bool):
    """Median time of fn() in microseconds."""
    if smoke:

        def measure(fn) -> float:
            times = []
            for _ in range(3):
                t0 = time.perf_counter()
                fn()
                times.append(time.perf_counter() - t0)
            return sorted(times)[1] * 1e6

        return measure
    from triton.testing import do_bench

    return lambda fn: do_bench(fn, warmup=25, rep=100, return_mode="median") * 1e3


def bench_shape(qm, qtype, n: int, k: int, ms: list[int], paths: dict, args, measure) -> list:
    """One weight shape: checks, then times ours (per path) and cuBLAS for every M."""
    from llamapy.quant.dequant import dequantize

    device = "cpu" if args.smoke else "cuda"
    dtype = getattr(torch, args.dtype)
    gen = torch.Generator(device=device).manual_seed(n * 131 + k)
    first = random_weight(qtype, n, k, device, gen)
    packed_bytes = qm.pack_weight(first, qtype, (n, k)).nbytes
    copies = 1 if args.smoke else max(2, min(64, ROTATE_BYTES // max(packed_bytes, n * k * 2)))
    datas = [first] + [random_weight(qtype, n, k, device, gen) for _ in range(copies - 1)]
    packed = [qm.pack_weight(d, qtype, (n, k)) for d in datas]
    dense = [dequantize(d, qtype, dtype) for d in datas]  # cuBLAS's operand (bf16 by default)
    rows = []
    for m in ms:
        x = torch.randn(m, k, generator=gen, device=device).to(dtype)
        exact = qm.qmatmul_reference(x.double(), datas[0], qtype, (n, k))
        t_ref = measure(_rotating(lambda w, x=x: x @ w.T, dense))
        for path in paths.get(m, ["auto"]):
            y = qm.qmatmul_with(x, packed[0], path=path)
            err = ((y.double() - exact).norm() / exact.norm()).item()
            tol = 3 * UNIT_ROUNDOFF[dtype] + 4 * 2.0**-10 * (dtype == torch.float32) + 1e-5
            if not err <= tol:
                sys.exit(f"{qtype.name} {n}x{k} M={m} {path}: relative error {err:.3g} > {tol}")
            t = measure(_rotating(lambda w, x=x, p=path: qm.qmatmul_with(x, w, path=p), packed))
            used = path if path != "auto" else ("gemv" if m <= qm.GEMV_MAX_M else "gemm")
            rows.append(
                {
                    "type": qtype.name, "n": n, "k": k, "m": m, "path": used,
                    "us": t, "gb_s": packed_bytes / t / 1e3, "cublas_us": t_ref,
                    "speedup": t_ref / t, "rel_err": err,
                }
            )  # fmt: skip
    return rows


def _rotating(fn, weights: list):
    """A no-argument callable applying fn to the next weight copy on each call."""
    it = itertools.cycle(weights)
    return lambda: fn(next(it))


def print_table(rows: list[dict]) -> None:
    print(
        f"{'type':<5} {'N':>5} {'K':>5} {'M':>4} {'path':<4} {'us':>9} {'GB/s':>7} "
        f"{'cuBLAS us':>9} {'x cuBLAS':>8} {'rel err':>8}"
    )
    for r in rows:
        print(
            f"{r['type']:<5} {r['n']:>5} {r['k']:>5} {r['m']:>4} {r['path']:<4} {r['us']:>9.2f} "
            f"{r['gb_s']:>7.0f} {r['cublas_us']:>9.2f} {r['speedup']:>8.2f} {r['rel_err']:>8.1e}"
        )
    print("x cuBLAS: cuBLAS bf16 time / ours (> 1: ours is faster); GB/s: packed weight bytes")


def main() -> None:
    args = parse_args()
    if args.smoke:
        os.environ["TRITON_INTERPRET"] = "1"  # before the kernels are decorated
    elif not torch.cuda.is_available():
        sys.exit("this benchmark needs a CUDA GPU (or --smoke under TRITON_INTERPRET=1)")
    from llamapy.kernels.triton import qmatmul as qm
    from llamapy.quant.types import QuantType

    types = [QuantType[t.strip().upper()] for t in args.types.split(",")]
    ms = [int(m) for m in args.ms.split(",")]
    shapes = REAL_SHAPES
    if args.shapes:
        shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
    paths: dict[int, list[str]] = {}
    if args.crossover:
        ms = sorted(set(ms) | {2, 4, 8})
        paths = {m: ["gemv", "gemm"] for m in (1, 2, 4, 8, 16)}
    if args.smoke:
        shapes, ms, paths = [(40, 96)], [1, 3, 17], {3: ["gemv", "gemm"]}
    measure = timer(args.smoke)
    rows = []
    for qtype in types:
        for n, k in shapes:
            rows += bench_shape(qm, qtype, n, k, ms, paths, args, measure)
    if args.json:
        for r in rows:
            print(json.dumps(r))
    print_table(rows)


if __name__ == "__main__":
    main()
