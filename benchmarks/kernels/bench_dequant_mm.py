"""Fused dequantize-GEMM vs dequantize + cuBLAS (`qmatmul_with(path="gemm" | "dequant")`) at
the Llama-3.2-1B matrix shapes, by rows of x: the measurement behind
`qmatmul.DEQUANT_MM_MIN_M`. Timed as CUDA-graph replays (what a captured step sees); also
prints the relative difference of the two paths' outputs. GPU only.

    python benchmarks/kernels/bench_dequant_mm.py [--types Q4_0,Q8_0,Q4_1] [--m 16,32,64,128]
"""

from __future__ import annotations

import argparse

import torch

from llamapy.kernels.triton import qmatmul as qm
from llamapy.quant.quantize import quantize
from llamapy.quant.types import QuantType

SHAPES = [(3072, 2048), (2048, 2048), (16384, 2048), (2048, 8192), (128256, 2048)]


def graph_time_us(fn, reps: int = 20) -> float:
    """Mean microseconds per call over `reps` calls replayed from one CUDA graph."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn(), fn()  # compile, settle the allocator
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(reps):
            fn()
    graph.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / reps * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--types", default="Q4_0,Q8_0,Q4_1")
    ap.add_argument("--m", default="16,32,64,128,256,512")
    args = ap.parse_args()
    try:
        types = [QuantType[name] for name in args.types.split(",")]
        rows = [int(v) for v in args.m.split(",")]
    except (KeyError, ValueError) as e:
        ap.error(f"--types takes ggml type names (Q4_0,Q8_0,...), --m integers: {e}")
    if min(rows) < 1:
        ap.error("--m values must be >= 1")
    print("| type | N x K | M | gemm us | dequant us | speedup | rel diff |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: |")
    for qtype in types:
        name = qtype.name
        for n, k in SHAPES:
            blocks = quantize(torch.randn(n, k) * 0.05, qtype)
            w = qm.pack_weight(blocks.cuda(), qtype, (n, k))
            for m in rows:
                x = torch.randn(m, k, device="cuda")
                fused = graph_time_us(lambda x=x, w=w: qm.qmatmul_with(x, w, path="gemm"))
                dq = graph_time_us(lambda x=x, w=w: qm.qmatmul_with(x, w, path="dequant"))
                a = qm.qmatmul_with(x, w, path="gemm").double()
                b = qm.qmatmul_with(x, w, path="dequant").double()
                diff = ((b - a).norm() / a.norm()).item()
                print(f"| {name} | {n}x{k} | {m} | {fused:.1f} | {dq:.1f} | {fused / dq:.2f} "
                      f"| {diff:.1e} |", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
