"""Lab (issue 6, Q4_K_M files): Q6_K and Q4_K rows over x's int8 codes as stored.

A Q4_K_M file's output matrix is Q6_K (the 1B's: 128256 x 2048, 215 MB, the largest matrix a
token reads) and so are about half its ffn_down (2048 x 8192). The K-quant GEMV
(`qmatmul_kquants`, float32 x) spends ~12 instructions a weight unpacking them; the codes
kernel (`xcodes._q6k_pipe_kernel`) ~2. Each variant is checked first on the GPU against
float64 (the weights' blocks from `tests/ggml_blocks.py`, x the value the codes stand for;
fresh random inputs each run), then timed as CUDA-graph replays over rotating copies of the
weight (more than L2 holds), us a call:
- the K-quant GEMV as the engine calls it (the output: x already normed; down: x the gated
  activation, added into the stream);
- the codes GEMV alone (codes made once, outside the graph), for each persistent tile
  (rows a tile, warps, programs an SM, tiles loaded ahead);
- the best tile with its quantizing launch in the graph (the engine's cost: the quantizing
  kernel applies the gating for down).
`--type Q4_K`: the 1B's gate_up and ffn_down as Q4_K blocks read as stored
(`xcodes._q4k_pipe_kernel`, 4.6 bits a weight) against their Q4_1 twins over the same codes
(6 bits a weight: the path before it).

    python benchmarks/kernels/q6k_codes_lab.py [--type Q6_K | Q4_K] [--copies-down 16]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch
from tune_decode import graph_time
from xcodes_tile_lab import check  # the codes GEMV against float64

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # tests.ggml_blocks
from tests.ggml_blocks import random_blocks  # noqa: E402

from llamapy.kernels.triton import qmatmul_kquants, xcodes  # noqa: E402
from llamapy.kernels.triton.qmatmul import pack_weight, qmatmul  # noqa: E402
from llamapy.quant.dequant import dequantize  # noqa: E402
from llamapy.quant.types import QuantType  # noqa: E402

Q6 = QuantType.Q6_K
Q4K = QuantType.Q4_K
# (BLOCK_N, num_warps, programs an SM, tiles loaded ahead)
SHORT = [(1, 1, 16, 1), (2, 1, 8, 1), (2, 1, 16, 1), (2, 1, 16, 2), (2, 1, 24, 1),
         (4, 1, 8, 1), (4, 1, 16, 1), (2, 2, 8, 1), (4, 2, 8, 1)]  # fmt: skip
LONG = [(1, 4, 2, 1), (1, 4, 4, 1), (1, 4, 4, 2), (1, 2, 8, 1), (2, 4, 2, 1), (2, 4, 4, 1),
        (1, 8, 2, 1), (2, 8, 2, 1)]  # fmt: skip


def weights(
    rng: np.random.Generator, qtype: QuantType, n: int, k: int, copies: int
) -> tuple[list, list, torch.Tensor]:
    """`copies` packed (n, k) weights as stored, their legacy twins (Q4_K; else []), and the
    first's float64 values."""
    out, twins, dense = [], [], None
    for i in range(copies):
        blocks = torch.from_numpy(random_blocks(rng, qtype, (n, k // 256)).reshape(n, -1))
        out.append(pack_weight(blocks.cuda(), qtype, (n, k)))
        if qtype == Q4K:
            twins.append(pack_weight(blocks.cuda(), qtype, (n, k), legacy_twin=True))
        if i == 0:
            dense = dequantize(blocks, qtype).double()
    return out, twins, dense


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--type", default="Q6_K", choices=["Q6_K", "Q4_K"])
    parser.add_argument("--copies-down", type=int, default=16)
    parser.add_argument("--copies-output", type=int, default=4)
    args = parser.parse_args()
    qtype = QuantType[args.type]
    seed = int(np.random.SeedSequence().entropy % (1 << 32))
    print(torch.cuda.get_device_name(), "seed", seed, flush=True)
    rng = np.random.default_rng(seed)
    k, f, vocab = 2048, 8192, 128256
    if qtype == Q6:  # short K: the output matrix
        outputs, _, output_f64 = weights(rng, qtype, vocab, k, args.copies_output)
    else:  # gate_up
        outputs, short_twins, output_f64 = weights(rng, qtype, 2 * f, k, args.copies_down)
    downs, down_twins, down_f64 = weights(rng, qtype, k, f, args.copies_down)
    short = "output" if qtype == Q6 else "gate_up"
    x = torch.from_numpy(rng.standard_normal((1, k), dtype=np.float32)).cuda()
    gu = torch.from_numpy(rng.standard_normal((1, 2 * f), dtype=np.float32)).cuda()
    act = (torch.nn.functional.silu(gu[:, :f]) * gu[:, f:]).contiguous()
    x_codes, a_codes = xcodes.quantize(x, k, 0), xcodes.quantize(gu, f, 2)
    stream = torch.zeros(1, k, device="cuda")
    logits = torch.empty(1, outputs[0].n, device="cuda")

    def kquant(w, xin, out, accumulate: bool) -> None:
        qmatmul_kquants.matmul(xin, w.tensors, Q6, w.n, w.k, out, accumulate=accumulate)

    rows: list[tuple[str, str, float, float]] = []
    if qtype == Q6:
        t_out = graph_time([lambda w=w: kquant(w, x, logits, False) for w in outputs])
        t_down = graph_time([lambda w=w: kquant(w, act, stream, True) for w in downs])
        base = "K-quant GEMV (float32 x)"
    else:  # the twins over the same codes (the default Q4_1 codes GEMVs)
        t_out = graph_time([lambda w=w: xcodes.gemv(x_codes, w, logits, False)
                            for w in short_twins])  # fmt: skip
        t_down = graph_time([lambda w=w: xcodes.gemv(a_codes, w, stream, True)
                             for w in down_twins])  # fmt: skip
        base = "Q4_1 twins, codes GEMV"
    rows += [(base, short, 0.0, t_out), (base, "down", 0.0, t_down)]
    print(rows, flush=True)
    attr = "_Q6K_PIPE" if qtype == Q6 else "_Q4K_PIPE"
    saved = dict(getattr(xcodes, attr))
    best = {"short": (float("inf"), None), "long": (float("inf"), None)}
    for side, configs in (("short", SHORT), ("long", LONG)):
        for config in configs:
            setattr(xcodes, attr, {"short": config, "long": config})
            if side == "short":
                worst = check(outputs[0], output_f64, x_codes)
                us = graph_time([lambda w=w: xcodes.gemv(x_codes, w, logits, False)
                                 for w in outputs])  # fmt: skip
            else:
                worst = check(downs[0], down_f64, a_codes)
                us = graph_time([lambda w=w: xcodes.gemv(a_codes, w, stream, True)
                                 for w in downs])  # fmt: skip
            matrix = short if side == "short" else "down"
            rows.append((f"codes GEMV {config}", matrix, worst, us))
            print(rows[-1], flush=True)
            if us < best[side][0]:
                best[side] = (us, config)
    setattr(xcodes, attr, {"short": best["short"][1], "long": best["long"][1]})
    # the engine's calls: quantize (with the gating for down) + GEMV, through qmatmul
    t_out = graph_time([lambda w=w: qmatmul(x, w) for w in outputs])
    t_down = graph_time([lambda w=w: qmatmul(gu, w, act="silu", residual=stream) for w in downs])
    rows += [(f"quantize + codes GEMV {best['short'][1]}", short, 0.0, t_out)]
    rows += [(f"quantize + codes GEMV {best['long'][1]}", "down", 0.0, t_down)]
    setattr(xcodes, attr, saved)
    env = "/".join(",".join(map(str, best[s][1])) for s in ("short", "long"))
    print(f"{args.type.lower().replace('_', '')}-pipe-env {env}")
    print("\n| form | matrix | worst / bound | us a call |")
    print("| --- | --- | ---: | ---: |")
    for name, matrix, worst, us in rows:
        print(f"| {name} | {matrix} | {worst:.2f} | {us:.2f} |")


if __name__ == "__main__":
    main()
