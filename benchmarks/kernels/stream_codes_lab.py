"""The output projection writing gate_up's codes (`xcodes.StreamCodes`) against the engine's
chain (o adding into the stream, the quantizing kernel with the RMSNorm, gate_up over the
codes), at the Llama-3.2-1B shapes on a GPU. (Down writing the next layer's QKV codes, its
32-row tiles over K = 8192, lost: benchmarks/RESULTS.md, twenty-eighth session.)

Each form runs as one CUDA graph of 16 layers' chains over distinct weights (more bytes than
L2 holds), checked first against the other form's output; then the producer's tiles
(`qmatmul.STREAM_CODES_TILE`) are swept. Prints microseconds a layer.

    python benchmarks/kernels/stream_codes_lab.py [--types Q4_0,Q4_1]
"""

from __future__ import annotations

import argparse
import itertools

import torch

from llamapy.kernels.triton import qmatmul as qm
from llamapy.kernels.triton import xcodes
from llamapy.kernels.triton.qmatmul import pack_weight
from llamapy.quant.types import QuantType, row_nbytes

HIDDEN, FFN, LAYERS, EPS = 2048, 8192, 16, 1e-5


def random_weight(qtype: QuantType, n: int, k: int):
    """Random blocks with small finite scales (the output stays in float32's range)."""
    data = torch.randint(0, 256, (n, row_nbytes(qtype, k)), dtype=torch.uint8)
    blocks = data.view(n, k // 32, -1)
    scale = torch.full((n, k // 32), 0.001, dtype=torch.float16).view(torch.uint8).view(n, -1, 2)
    blocks[:, :, :2] = scale  # d, the first field of the legacy blocks
    if qtype == QuantType.Q4_1:
        blocks[:, :, 2:4] = scale  # m
    return pack_weight(data.cuda(), qtype, (n, k))


def graph_us(fn, reps: int = 50) -> float:
    """Microseconds a replay of one graph of fn's launches, divided by LAYERS."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    graph.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) * 1e3 / (reps * LAYERS)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--types", default="Q4_0")
    args = parser.parse_args()
    torch.manual_seed(0)
    print(torch.cuda.get_device_name())
    print("| type | form | us a layer |")
    for name in args.types.split(","):
        o_then_gate_up(QuantType[name])


def o_then_gate_up(qtype: QuantType) -> None:
    """o adding into the stream, then gate_up: the engine's (the quantizing kernel with the
    RMSNorm between them) against o writing gate_up's codes; o's 32-row tiles swept."""
    name = qtype.name
    wo = [random_weight(qtype, HIDDEN, HIDDEN) for _ in range(LAYERS)]
    wu = [random_weight(qtype, 2 * FFN, HIDDEN) for _ in range(LAYERS)]
    g = torch.rand(HIDDEN, device="cuda") + 0.5
    x = torch.randn(1, HIDDEN, device="cuda")
    start = torch.randn(1, HIDDEN, device="cuda")
    stream = start.clone()
    outs = [torch.empty(1, 2 * FFN, device="cuda") for _ in range(LAYERS)]
    codes = [xcodes.StreamCodes.empty(g, EPS) for _ in range(LAYERS)]

    def engine() -> None:
        for i in range(LAYERS):
            qm.qmatmul(x, wo[i], residual=stream)
            xcodes.matmul(stream, wu[i], outs[i], 1, g, EPS, False)

    def stream_codes() -> None:
        for i in range(LAYERS):
            qm.qmatmul(x, wo[i], residual=stream, codes_out=codes[i])
            xcodes.gemv(codes[i], wu[i], outs[i], False)

    stream.copy_(start)
    engine()
    want = outs[0].clone()
    stream.copy_(start)
    stream_codes()
    rel = ((outs[0] - want).abs().max() / want.abs().max()).item()
    print(f"check {name} o -> gate_up: max |codes form - engine| / max |engine| = {rel:.2e}")
    assert rel < 1e-3, rel
    print(f"| {name} | engine (o, quantize, gate_up) | {graph_us(engine):.2f} |")
    base_tile = dict(qm.STREAM_CODES_TILE)
    for block_b, warps in itertools.product((16, 32, 64), (4, 8, 16)):
        qm.STREAM_CODES_TILE.update(BLOCK_B=block_b, num_warps=warps)
        try:
            t = graph_us(stream_codes)
        except Exception as exc:  # out of resources: skip the variant
            print(f"  skip {block_b} x {warps}: {type(exc).__name__}")
            continue
        print(f"| {name} | o writes codes, {block_b} blocks, {warps} warps | {t:.2f} |")
    qm.STREAM_CODES_TILE.clear()
    qm.STREAM_CODES_TILE.update(base_tile)


if __name__ == "__main__":
    main()
