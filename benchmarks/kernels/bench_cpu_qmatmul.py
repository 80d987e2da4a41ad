#!/usr/bin/env python
"""qmatmul_cpu against QLinear's dequantize-to-fp32 path, at the real matmul shapes.

    python benchmarks/kernels/bench_cpu_qmatmul.py [--threads 1 2] [--m 1 512] [--repeat 15]
    python benchmarks/kernels/bench_cpu_qmatmul.py --prefill --m 512 --threads 2
        [--chunk-weights 262144 1048576]   (int4 kernel vs bf16 dequant + GEMM)

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
    ap.add_argument(
        "--prefill",
        action="store_true",
        help="instead: at each M, the int4 kernel vs the bf16-dequant path (dequant alone, "
        "GEMM alone on a pre-expanded bf16 weight) for int4pack weights",
    )
    ap.add_argument("--chunk-weights", type=int, nargs="+", default=[0], help="0: the default")
    args = ap.parse_args()
    if args.prefill:
        prefill_main(args)
        return
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


def prefill_main(args: argparse.Namespace) -> None:
    """int4 kernel vs bf16 dequant + GEMM (qmatmul_cpu's M >= PREFILL_MIN_M path) per shape."""
    from llamapy.kernels.cpu import int4pack, qmatmul

    print(f"loadavg: {loadavg()}")
    print(
        f"{'weight':28} {'type':6} {'N x K':>13} {'M':>4} {'thr':>3} {'rows':>5} "
        f"{'int4 ms':>8} {'deq+mm ms':>9} {'speedup':>7} {'deq ms':>7} {'bf16mm ms':>9} "
        f"{'GF/s':>6}"
    )
    default = qmatmul.DEQUANT_CHUNK_WEIGHTS
    weights = []
    for m in args.models:
        weights += llama1b_weights() if m == "llama1b" else real_weights(m)
    for label, qt, _count in weights:
        n, k = qt.shape
        w = pack_weight_cpu(qt.data, qt.qtype, (n, k))
        if w.int4 is None or n > 16384:  # the output matrix: prefill needs one row
            continue
        full = n - n % int4pack.TILE_N
        wb = torch.cat(
            [int4pack.dequantize_rows_bf16(w.int4, 0, full)]
            + ([int4pack.dequantize_rows_bf16(w.int4, full, n)] if full < n else []),
            dim=1,
        )  # (K, N) bf16: the GEMM alone
        for m in args.m:
            x = torch.randn(m, k)
            xb = x.to(torch.bfloat16)
            for threads in args.threads:
                torch.set_num_threads(threads)
                for cw in args.chunk_weights:
                    qmatmul.DEQUANT_CHUNK_WEIGHTS = cw or default
                    rows = qmatmul.dequant_chunk_rows(k)
                    rep = max(3, args.repeat // (1 + n * k * m // 200_000_000))
                    t_int4 = timeit(lambda: int4pack.int4pack_mm(x, w.int4), rep)[0]  # noqa: B023
                    t_deq = timeit(
                        lambda: int4pack.dequant_mm(x, w.int4, n, rows),  # noqa: B023
                        rep,
                    )[0]
                    t_only = timeit(lambda: _dequant_only(w.int4, n, rows), rep)[0]  # noqa: B023
                    t_mm = timeit(lambda: torch.mm(xb, wb), rep)[0]  # noqa: B023
                    print(
                        f"{label:28} {qt.qtype.name:6} {f'{n}x{k}':>13} {m:4} {threads:3} "
                        f"{rows:5} {t_int4 * 1e3:8.2f} {t_deq * 1e3:9.2f} "
                        f"{t_int4 / t_deq:7.2f} {t_only * 1e3:7.2f} {t_mm * 1e3:9.2f} "
                        f"{2 * m * n * k / t_deq / 1e9:6.0f}",
                        flush=True,
                    )
    qmatmul.DEQUANT_CHUNK_WEIGHTS = default
    print(f"loadavg: {loadavg()}")


def _dequant_only(p, n: int, rows: int) -> None:
    from llamapy.kernels.cpu import int4pack

    full = n - n % int4pack.TILE_N
    for start in range(0, full, rows):
        int4pack.dequantize_rows_bf16(p, start, min(start + rows, full))
    if full < n:
        int4pack.dequantize_rows_bf16(p, full, n)


if __name__ == "__main__":
    main()
