"""Lab (issue 6, Q4_K_M files): Q6_K rows over x's int8 codes against the K-quant GEMV.

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

    python benchmarks/kernels/q6k_codes_lab.py [--copies-down 16]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch
from tune_decode import graph_time

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # tests.ggml_blocks
from tests.ggml_blocks import random_blocks  # noqa: E402

from llamapy.kernels.triton import qmatmul_kquants, xcodes  # noqa: E402
from llamapy.kernels.triton.qmatmul import pack_weight, qmatmul  # noqa: E402
from llamapy.quant.dequant import dequantize  # noqa: E402
from llamapy.quant.types import QuantType  # noqa: E402

Q6 = QuantType.Q6_K
# (BLOCK_N, num_warps, programs an SM, tiles loaded ahead)
SHORT = [(1, 1, 16, 1), (2, 1, 8, 1), (2, 1, 16, 1), (2, 1, 16, 2), (2, 1, 24, 1),
         (4, 1, 8, 1), (4, 1, 16, 1), (2, 2, 8, 1), (4, 2, 8, 1)]  # fmt: skip
LONG = [(1, 4, 2, 1), (1, 4, 4, 1), (1, 4, 4, 2), (1, 2, 8, 1), (2, 4, 2, 1), (2, 4, 4, 1),
        (1, 8, 2, 1), (2, 8, 2, 1)]  # fmt: skip


def weights(rng: np.random.Generator, n: int, k: int, copies: int) -> tuple[list, torch.Tensor]:
    """`copies` packed Q6_K (n, k) weights (the first's float64 values too)."""
    out, dense = [], None
    for i in range(copies):
        blocks = torch.from_numpy(random_blocks(rng, Q6, (n, k // 256)).reshape(n, -1))
        out.append(pack_weight(blocks.cuda(), Q6, (n, k)))
        if i == 0:
            dense = dequantize(blocks, Q6).double()
    return out, dense


def codes_x(codes) -> torch.Tensor:
    c = codes[0].cpu().view(torch.int8).double().reshape(xcodes.LEVELS, -1, 32)
    return (c * codes[1].cpu().double()[:, :, None]).sum(dim=0).reshape(-1)


def check(w, dense: torch.Tensor, codes) -> float:
    """The codes GEMV against float64; the worst error over its bound (must be <= 1)."""
    got = xcodes.gemv(codes, w, torch.full((1, w.n), float("nan"), device="cuda"), False)
    xr = codes_x(codes)
    ref, mag = dense @ xr, dense.abs() @ xr.abs()
    worst = float(((got.double().cpu().reshape(-1) - ref).abs() / (2e-6 * mag + 1e-30)).max())
    if not worst <= 1.0:
        raise SystemExit(f"the Q6_K codes GEMV is wrong at {w.n} x {w.k}: {worst:.3g} of its bound")
    return worst


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--copies-down", type=int, default=16)
    parser.add_argument("--copies-output", type=int, default=4)
    args = parser.parse_args()
    seed = int(np.random.SeedSequence().entropy % (1 << 32))
    print(torch.cuda.get_device_name(), "seed", seed, flush=True)
    rng = np.random.default_rng(seed)
    k, f, vocab = 2048, 8192, 128256
    outputs, output_f64 = weights(rng, vocab, k, args.copies_output)
    downs, down_f64 = weights(rng, k, f, args.copies_down)
    x = torch.from_numpy(rng.standard_normal((1, k), dtype=np.float32)).cuda()
    gu = torch.from_numpy(rng.standard_normal((1, 2 * f), dtype=np.float32)).cuda()
    act = (torch.nn.functional.silu(gu[:, :f]) * gu[:, f:]).contiguous()
    x_codes, a_codes = xcodes.quantize(x, k, 0), xcodes.quantize(gu, f, 2)
    stream = torch.zeros(1, k, device="cuda")
    logits = torch.empty(1, vocab, device="cuda")

    def kquant(w, xin, out, accumulate: bool) -> None:
        qmatmul_kquants.matmul(xin, w.tensors, Q6, w.n, w.k, out, accumulate=accumulate)

    rows: list[tuple[str, str, float, float]] = []
    t_out = graph_time([lambda w=w: kquant(w, x, logits, False) for w in outputs])
    t_down = graph_time([lambda w=w: kquant(w, act, stream, True) for w in downs])
    rows += [("K-quant GEMV (float32 x)", "output", 0.0, t_out)]
    rows += [("K-quant GEMV (float32 x)", "down", 0.0, t_down)]
    print(rows, flush=True)
    saved = dict(xcodes._Q6K_PIPE)
    best = {"short": (float("inf"), None), "long": (float("inf"), None)}
    for side, configs in (("short", SHORT), ("long", LONG)):
        for config in configs:
            xcodes._Q6K_PIPE = {"short": config, "long": config}
            if side == "short":
                worst = check(outputs[0], output_f64, x_codes)
                us = graph_time([lambda w=w: xcodes.gemv(x_codes, w, logits, False)
                                 for w in outputs])  # fmt: skip
            else:
                worst = check(downs[0], down_f64, a_codes)
                us = graph_time([lambda w=w: xcodes.gemv(a_codes, w, stream, True)
                                 for w in downs])  # fmt: skip
            matrix = "output" if side == "short" else "down"
            rows.append((f"codes GEMV {config}", matrix, worst, us))
            print(rows[-1], flush=True)
            if us < best[side][0]:
                best[side] = (us, config)
    xcodes._Q6K_PIPE = {"short": best["short"][1], "long": best["long"][1]}
    # the engine's calls: quantize (with the gating for down) + GEMV, through qmatmul
    t_out = graph_time([lambda w=w: qmatmul(x, w) for w in outputs])
    t_down = graph_time([lambda w=w: qmatmul(gu, w, act="silu", residual=stream) for w in downs])
    rows += [(f"quantize + codes GEMV {best['short'][1]}", "output", 0.0, t_out)]
    rows += [(f"quantize + codes GEMV {best['long'][1]}", "down", 0.0, t_down)]
    xcodes._Q6K_PIPE = saved
    print("q6k-pipe-env " + "/".join(",".join(map(str, best[s][1])) for s in ("short", "long")))
    print("\n| form | matrix | worst / bound | us a call |")
    print("| --- | --- | ---: | ---: |")
    for name, matrix, worst, us in rows:
        print(f"| {name} | {matrix} | {worst:.2f} | {us:.2f} |")


if __name__ == "__main__":
    main()
