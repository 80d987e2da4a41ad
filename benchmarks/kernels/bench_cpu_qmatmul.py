#!/usr/bin/env python
"""qmatmul_cpu against QLinear's dequantize-to-fp32 path, at the real matmul shapes.

    python benchmarks/kernels/bench_cpu_qmatmul.py [--threads 1 2] [--m 1 512] [--repeat 15]

Shapes and types: SmolLM2-135M Q4_1 and Gemma-3-270M Q4_K_M (real tensors from the cached
GGUF files), and a Llama-3.2-1B-shaped Q4_0 (random weights). Per (shape, type, M, threads):
median and best time of qmatmul_cpu, of QLinear, their ratio, GB/s of GGUF block bytes at
M=1, GFLOP/s at M=512, pack time and packed/block bytes; then, per model, the sum over all
its matrices of the M=1 medians (the matmul time of one decoded token). The machine may be
shared: the load average is printed.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from llamapy.kernels.cpu import pack_weight_cpu, qmatmul_cpu
from llamapy.layers.linear import QLinear
from llamapy.quant.qtensor import QTensor
from llamapy.quant.quantize import quantize
from llamapy.quant.types import QuantType


def real_weights(alias: str) -> list[tuple[str, QTensor, int]]:
    """One tensor per distinct (role, type, shape) of a cached model, with its count."""
    from llamapy.formats import open_model_file
    from llamapy.hub import resolve_model

    f = open_model_file(resolve_model(alias).path)
    seen: dict[tuple, list] = {}
    for name in f.tensor_infos:
        t = f.tensor(name)
        role = name.split(".")[-2] if name.startswith("blk") else name
        key = (role, t.qtype, tuple(t.shape))
        if len(t.shape) == 2:
            seen.setdefault(key, [f"{alias}:{role}", t, 0])[2] += 1
    return [tuple(v) for v in seen.values()]


def llama1b_weights() -> list[tuple[str, QTensor, int]]:
    out = []
    for role, (n, k), count in [
        ("attn_q", (2048, 2048), 32),  # q and o
        ("attn_k", (512, 2048), 32),  # k and v
        ("ffn_up", (8192, 2048), 32),  # gate and up
        ("ffn_down", (2048, 8192), 16),
        ("output", (128256, 2048), 1),
    ]:
        w = torch.randn(n, k) * 0.02
        out.append(
            (
                f"llama1b:{role}",
                QTensor(quantize(w, QuantType.Q4_0).view(n, -1), QuantType.Q4_0, (n, k)),
                count,
            )
        )
    return out


def loadavg() -> str:
    with open("/proc/loadavg") as f:
        return f.read().strip()


def timeit(fn, repeat: int) -> tuple[float, float]:
    fn()
    ts = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts), min(ts)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--m", type=int, nargs="+", default=[1, 512])
    ap.add_argument("--repeat", type=int, default=15)
    ap.add_argument("--models", nargs="+", default=["smollm2-135m", "gemma3-270m", "llama1b"])
    ap.add_argument("--no-baseline", action="store_true", help="skip the QLinear timings")
    args = ap.parse_args()
    weights = []
    for m in args.models:
        weights += llama1b_weights() if m == "llama1b" else real_weights(m)
    print(f"loadavg: {loadavg()}")
    print(
        f"{'weight':28} {'type':5} {'N x K':>13} {'method':14} {'M':>4} {'thr':>3} "
        f"{'med us':>9} {'best us':>9} {'QLinear us':>10} {'x':>6} {'GB/s':>6} {'GF/s':>6}"
    )
    per_token: dict[tuple[str, int], float] = {}
    for label, qt, count in weights:
        n, k = qt.shape
        t0 = time.perf_counter()
        w = pack_weight_cpu(qt.data, qt.qtype, (n, k))
        pack_s = time.perf_counter() - t0
        ql = QLinear(qt)
        for m in args.m:
            x = torch.randn(m, k)
            for threads in args.threads:
                torch.set_num_threads(threads)
                rep = max(3, args.repeat // (1 + n * k * m // 200_000_000))
                med, best = timeit(lambda: qmatmul_cpu(x, w), rep)  # noqa: B023
                base = float("nan") if args.no_baseline else timeit(lambda: ql(x), 3)[0]  # noqa: B023
                gbs = qt.data.nbytes / med / 1e9 if m == 1 else float("nan")
                if m == 1:
                    key = (label.split(":")[0], threads)
                    per_token[key] = per_token.get(key, 0.0) + count * med
                gfs = 2 * m * n * k / med / 1e9
                print(
                    f"{label:28} {qt.qtype.name:5} {f'{n}x{k}':>13} {w.method:14} {m:4} "
                    f"{threads:3} {med * 1e6:9.1f} {best * 1e6:9.1f} {base * 1e6:10.1f} "
                    f"{base / med:6.1f} {gbs:6.1f} {gfs:6.1f}",
                    flush=True,
                )
        print(
            f"  (x{count}; pack {pack_s * 1e3:.0f} ms, "
            f"packed {w.nbytes / qt.data.nbytes:.3f}x blocks)"
        )
    for (model, threads), total in per_token.items():
        print(f"{model}: all matmuls of one decoded token, {threads} thr: {total * 1e3:.2f} ms")
    print(f"loadavg: {loadavg()}")


if __name__ == "__main__":
    main()
