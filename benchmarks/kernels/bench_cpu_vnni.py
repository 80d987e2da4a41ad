#!/usr/bin/env python
"""The AVX512-VNNI matmul (kernels/cpu/vnni.py) against the int4pack path, same sitting.

    python benchmarks/kernels/bench_cpu_vnni.py [--threads 2] [--types Q4_0,Q4_1,...]
        [--reps 8]

Per weight type, random blocks at model shapes:
  decode   one row of x through 120 matrices of a layer's shapes (SmolLM2's 960x576,
           576x576, 3072x576, 576x1536, 30 copies each; Q4_K, Q6_K with K = 768 for 576: ~60-110
           MB, past the 32 MB L3, as a decoded token reads them): GB/s of GGUF block
           bytes; vnni's op (x quantized beforehand), the int4pack op (its bf16 x included)
  prefill  512 rows of x through 1B-shaped 3072x2048 and 2048x8192 matrices: GOP/s, vnni
           with x's quantization included, int4pack's bf16 dequant + oneDNN GEMM
  call     the op's fixed cost: one 16x64 matrix, one row of x
Best of --reps runs; the two methods alternate within each repetition.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from llamapy.kernels.cpu import int4pack, vnni
from llamapy.quant.quantize import quantize
from llamapy.quant.types import QuantType, row_nbytes

DECODE_SHAPES = [(960, 576), (576, 576), (3072, 576), (576, 1536)]
DECODE_SHAPES_K = [(960, 768), (768, 768), (3072, 768), (768, 1536)]  # K-quants: K % 256 == 0
PREFILL_SHAPES = [(3072, 2048), (2048, 8192)]


def blocks(qtype: QuantType, n: int, k: int, rng: np.random.Generator) -> torch.Tensor:
    if qtype in vnni.K_QUANTS:  # no quantizer needed: random bytes, sane fp16 d (and dmin)
        size, d_offsets = (144, (0, 2)) if qtype == QuantType.Q4_K else (210, (208,))
        b = rng.integers(0, 256, (n * k // 256, size), dtype=np.uint8)
        for off in d_offsets:
            d = (rng.standard_normal(b.shape[0]) * 1e-2).astype(np.float16)
            b[:, off : off + 2] = d.view(np.uint8).reshape(-1, 2)
        return torch.from_numpy(b).view(n, -1)
    w = torch.from_numpy(rng.standard_normal((n, k), dtype=np.float32))
    return quantize(w, qtype).view(n, row_nbytes(qtype, k))


def best(fns: dict, reps: int) -> dict[str, float]:
    times: dict[str, list[float]] = {name: [] for name in fns}
    for fn in fns.values():
        fn()
    for _ in range(reps):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return {name: min(t) for name, t in times.items()}


def decode_row(qtype: QuantType, reps: int, rng: np.random.Generator) -> str:
    shapes = DECODE_SHAPES_K if qtype in vnni.K_QUANTS else DECODE_SHAPES
    base = {s: blocks(qtype, *s, rng) for s in shapes}
    mats = []
    for _ in range(30):
        for n, k in shapes:
            data = base[n, k].clone()  # own memory: the sweep reads 120 matrices
            mats.append((n, k, vnni.pack(data, qtype, n, k), int4pack.PACKERS[qtype](data, n, k)))
    total = sum(base[s].nbytes for s in shapes) * 30
    xs = {k: torch.randn(1, k) for _, k in shapes}
    qx = {k: vnni.quantize_x(x, qtype) for k, x in xs.items()}

    def vnni_sweep():
        for n, k, tiles, _ in mats:
            torch.ops.llamapy.vnni_mm(*qx[k], tiles, int(qtype), n)

    def int4_sweep():
        for _, k, _, packed in mats:
            int4pack.int4pack_mm(xs[k], packed)

    t = best({"vnni": vnni_sweep, "int4": int4_sweep}, reps)
    return (
        f"| {qtype.name} | decode sweep ({total / 1e6:.0f} MB), GB/s "
        f"| {total / t['vnni'] / 1e9:.1f} | {total / t['int4'] / 1e9:.1f} "
        f"| {t['int4'] / t['vnni']:.2f} |"
    )


def prefill_row(qtype: QuantType, n: int, k: int, reps: int, rng: np.random.Generator) -> str:
    data = blocks(qtype, n, k, rng)
    tiles, packed = vnni.pack(data, qtype, n, k), int4pack.PACKERS[qtype](data, n, k)
    x = torch.randn(512, k)
    t = best(
        {
            "vnni": lambda: vnni.vnni_mm(x, tiles, qtype, n),
            "int4": lambda: int4pack.dequant_mm(x, packed, n, 1024),
        },
        reps,
    )
    ops = 2 * 512 * n * k
    return (
        f"| {qtype.name} | prefill M=512 {n}x{k}, GOP/s | {ops / t['vnni'] / 1e9:.0f} "
        f"| {ops / t['int4'] / 1e9:.0f} | {t['int4'] / t['vnni']:.2f} |"
    )


def call_row(qtype: QuantType, rng: np.random.Generator, n_calls: int = 2000) -> str:
    data = blocks(qtype, 16, 256, rng)
    tiles, packed = vnni.pack(data, qtype, 16, 256), int4pack.PACKERS[qtype](data, 16, 256)
    x = torch.randn(1, 256)
    q, s = vnni.quantize_x(x, qtype)

    def vnni_calls():
        for _ in range(n_calls):
            torch.ops.llamapy.vnni_mm(q, s, tiles, int(qtype), 16)

    def int4_calls():
        for _ in range(n_calls):
            int4pack.int4pack_mm(x, packed)

    t = best({"vnni": vnni_calls, "int4": int4_calls}, 3)
    return (
        f"| {qtype.name} | one call, 16x256, us | {t['vnni'] / n_calls * 1e6:.1f} "
        f"| {t['int4'] / n_calls * 1e6:.1f} | {t['int4'] / t['vnni']:.2f} |"
    )


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--types", default="Q4_0,Q4_1,Q5_0,Q8_0,Q4_K,Q6_K")
    ap.add_argument("--reps", type=int, default=8)
    args = ap.parse_args()
    if not vnni.available():
        ap.error("the VNNI kernels are not available here (numba, AVX512-VNNI, LLAMAPY_CPU_VNNI)")
    torch.set_num_threads(args.threads)
    rng = np.random.default_rng(0)
    print(f"threads {args.threads}; best of {args.reps} (prefill: of {max(2, args.reps // 3)})")
    print("| type | test | vnni | int4pack | ratio |")
    print("| --- | --- | ---: | ---: | ---: |")
    for name in args.types.split(","):
        qtype = QuantType[name]
        print(decode_row(qtype, args.reps, rng), flush=True)
        for n, k in PREFILL_SHAPES:
            print(prefill_row(qtype, n, k, max(2, args.reps // 3), rng), flush=True)
        print(call_row(qtype, rng), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
