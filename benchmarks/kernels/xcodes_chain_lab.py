"""Lab (issue 6, the 1B's tg128): what the MLP's int8-codes launches cost in a decode chain.

A 16-layer chain of the Llama-3.2-1B MLP (gate_up 16384 x 2048 and down 2048 x 8192, Q4_0,
distinct weights a layer, one row) as CUDA-graph replays, us a layer:
- "quantize": the engine's form: the norm's codes, the gate_up codes GEMV, the activation's
  codes, the down codes GEMV into the stream (four launches), for each quantizing tile
  (32-blocks a program, warps) swept;
- the two GEMVs alone with codes made once outside the graph (the ceiling of free codes);
and each quantizing launch alone (64 in a graph, its input L2-hot as after its producer).
(The twenty-fifth session's "gated" form, gate_up writing down's codes, was measured here and
deleted: benchmarks/RESULTS.md.)

    python benchmarks/kernels/xcodes_chain_lab.py [--layers 16]
"""

from __future__ import annotations

import argparse
import itertools

import torch
from tune_decode import graph_time, random_packed

from llamapy.kernels.triton import xcodes
from llamapy.quant.types import QuantType

BLOCKS = (2, 4, 8, 16)
WARPS = (1, 2, 4)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--layers", type=int, default=16)
    args = parser.parse_args()
    torch.manual_seed(0)
    k, f = 2048, 8192
    gate_ups = random_packed(QuantType.Q4_0, 2 * f, k, args.layers)
    downs = random_packed(QuantType.Q4_0, k, f, args.layers)
    stream = torch.randn(1, k, device="cuda")
    g = torch.rand(k, device="cuda") + 0.5
    act_in = torch.randn(1, 2 * f, device="cuda")
    saved = xcodes._QUANT_BLOCKS, xcodes._QUANT_WARPS
    print(torch.cuda.get_device_name(), flush=True)

    def engine_layer(i: int) -> None:
        codes = xcodes.quantize(stream, k, 1, g, 1e-5)
        gu = xcodes.gemv(codes, gate_ups[i], torch.empty(1, 2 * f, device="cuda"), False)
        xcodes.gemv(xcodes.quantize(gu, f, 2), downs[i], stream, True)

    rows = []
    for blocks, warps in itertools.product(BLOCKS, WARPS):
        xcodes._QUANT_BLOCKS, xcodes._QUANT_WARPS = blocks, warps
        norm = graph_time([lambda: xcodes.quantize(stream, k, 1, g, 1e-5)] * 64)
        act = graph_time([lambda: xcodes.quantize(act_in, f, 2)] * 64)
        chain = graph_time([lambda i=i: engine_layer(i) for i in range(args.layers)])
        rows.append((f"quantize {blocks} blocks x {warps} warps", norm, act, chain))
        print(rows[-1], flush=True)
    xcodes._QUANT_BLOCKS, xcodes._QUANT_WARPS = saved
    free_in = xcodes.quantize(stream, k, 1, g, 1e-5)
    free_act = xcodes.quantize(act_in, f, 2)

    def free_layer(i: int) -> None:
        xcodes.gemv(free_in, gate_ups[i], torch.empty(1, 2 * f, device="cuda"), False)
        xcodes.gemv(free_act, downs[i], stream, True)

    rows.append(("free codes (GEMVs only)", None, None,
                 graph_time([lambda i=i: free_layer(i) for i in range(args.layers)])))  # fmt: skip
    best = min((r for r in rows if r[1] is not None), key=lambda r: r[3])[0].split()
    print(f"best-tile {best[1]},{best[4]}")  # for LLAMAPY_GPU_X_CODES_QUANT_TILE
    print("\n| form | norm codes K=2048 us | act codes F=8192 us | MLP chain us a layer |")
    print("| --- | ---: | ---: | ---: |")
    for name, norm, act, chain in rows:
        cell = lambda v: "" if v is None else f"{v:.2f}"  # noqa: E731
        print(f"| {name} | {cell(norm)} | {cell(act)} | {chain:.2f} |")


if __name__ == "__main__":
    main()
