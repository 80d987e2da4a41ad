"""Lab (issue 6, the 1B's tg128): gate_up writing down's codes, against the quantizing launch.

A decode row's gated MLP over x's codes is four launches a layer: the norm's quantizing
kernel, gate_up's codes GEMV (the [gate | up] row in float32), the quantizing kernel with the
gating (act(gate) * up -> two levels of codes), and down's codes GEMV. The third is ~1.5 us of
a ~31 us layer plus a kernel boundary. `xcodes._gated_codes_kernel` folds it into gate_up: a
program owns whole 32-blocks of the activation (their 32 gate and 32 up rows, in tiles of BN
of each), so it quantizes them itself, with no counter and no float row in memory.

Each tile of the sweep (BN gate rows a tile, warps, programs an SM) is checked first on the
GPU against float64 (act(W x) for the x the input codes stand for, within the two levels'
bound), then timed as CUDA-graph replays over distinct weights a layer (more than L2 holds):
gate_up + the quantizing launch against the gated kernel, alone and in the MLP chain with
down, us a layer. `--pdl` records a 1B-sized model first, so the kernels launch with PDL as
in the engine.

    python benchmarks/kernels/gated_codes_lab.py [--type Q4_0|Q4_1] [--layers 16] [--pdl]
        [--tiles BN,W,P ...]
"""

from __future__ import annotations

import argparse
import itertools
import sys
from pathlib import Path

import numpy as np
import torch
from tune_decode import graph_time
from xcodes_tile_lab import codes_x, weights

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from llamapy.kernels.triton import pdl, xcodes  # noqa: E402
from llamapy.quant.types import QuantType  # noqa: E402

# A tile's gate and up rows over all of K take ~120 registers a thread at one row a warp of
# each (BN = W; sm_90 compiles by sass_count.py's `compile_for_hopper`), 64 at half a row, 255
# and spills beyond; the F / 32 = 256 blocks of the 1B are at most two programs an SM.
TILES = [
    (bn, w, p)
    for (bn, w), p in itertools.product(((4, 4), (8, 8), (16, 16), (2, 4), (4, 8), (8, 16)), (1, 2))
]


def check(codes, w, dense: torch.Tensor, x_codes) -> float:
    """The gated codes against float64 act(W x); the worst error over its bound (<= 1)."""
    f = w.n // 2
    xr = codes_x(x_codes)
    y, mag = dense @ xr, dense.abs() @ xr.abs()
    gate, up = y[:f], y[f:]
    ref = torch.nn.functional.silu(gate) * up
    # the GEMV's float32 sums err by ~1e-6 of sum |w x| (2e-6 here); act's slope <= 1.1
    slack = 2e-6 * (1.1 * up.abs() * mag[:f] + torch.nn.functional.silu(gate).abs() * mag[f:])
    ref, slack = ref.reshape(-1, 32), slack.reshape(-1, 32)
    amax = ref.abs().amax(dim=1, keepdim=True)
    err = (codes_x(codes).reshape(-1, 32) - ref).abs()
    bound = (amax + slack.amax(dim=1, keepdim=True)) * (1.01 / (127 * 254 * 2)) + slack
    bound = bound + 1e-6 * ref.abs() + 1e-30
    worst = float((err / bound).max())
    if not worst <= 1.0:
        raise SystemExit(f"the gated codes are wrong: {worst:.3g} of the bound")
    return worst


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--type", default="Q4_0", choices=("Q4_0", "Q4_1"))
    parser.add_argument("--pdl", action="store_true", help="launch with PDL as for the 1B")
    parser.add_argument("--tiles", nargs="*", help="BN,W,P tiles (default: the sweep)")
    args = parser.parse_args()
    seed = int(np.random.SeedSequence().entropy % (1 << 32))
    print(torch.cuda.get_device_name(), "seed", seed, args.type, flush=True)
    rng = np.random.default_rng(seed)
    if args.pdl:
        pdl.set_model_bytes(torch.device("cuda"), 700 << 20)
    k, f = 2048, 8192
    qtype = QuantType[args.type]
    gate_ups, gate_up_f64 = weights(rng, 2 * f, k, args.layers, qtype)
    downs, _ = weights(rng, k, f, args.layers, qtype)
    x = torch.from_numpy(rng.standard_normal((1, k), dtype=np.float32)).cuda()
    x_codes = xcodes.quantize(x, k, 0)
    a_codes = xcodes.code_buffers(f, x.device)
    gu_out = torch.empty(1, 2 * f, device="cuda")
    stream = torch.zeros(1, k, device="cuda")
    tiles = [tuple(int(v) for v in t.split(",")) for t in args.tiles] if args.tiles else TILES

    def two_launches(i: int) -> None:
        xcodes.gemv(x_codes, gate_ups[i], gu_out, False)
        xcodes.quantize(gu_out, f, 2, buffers=a_codes)

    def gated(i: int, tile) -> None:
        xcodes.gated_codes(x_codes, gate_ups[i], "silu", a_codes, tile)

    def timed(step) -> tuple[float, float]:
        alone = graph_time([lambda i=i: step(i) for i in range(args.layers)])
        chain = graph_time(
            [
                lambda i=i: (step(i), xcodes.gemv(a_codes, downs[i], stream, True))
                for i in range(args.layers)
            ]
        )
        return alone, chain

    two_launches(0)
    base_worst = check(a_codes, gate_ups[0], gate_up_f64, x_codes)
    rows = [("gate_up + quantizing launch", base_worst, *timed(two_launches))]
    print(rows[-1], flush=True)
    for tile in tiles:
        a_codes[0].fill_(0x7F7F7F7F)
        gated(0, tile)
        worst = check(a_codes, gate_ups[0], gate_up_f64, x_codes)
        rows.append((f"gated {tile}", worst, *timed(lambda i, t=tile: gated(i, t))))
        print(rows[-1], flush=True)
    rows.append(("gate_up + quantizing launch, again", base_worst, *timed(two_launches)))
    base = (rows[0][2] + rows[-1][2]) / 2, (rows[0][3] + rows[-1][3]) / 2
    print(f"\n{args.type}, PDL {'on' if args.pdl else 'off'}, {args.layers} layers")
    print("| variant | worst / bound | gate_up (+ quantize) us | vs base | MLP us | vs base |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for name, worst, alone, chain in rows:
        print(
            f"| {name} | {worst:.2f} | {alone:.2f} | {base[0] / alone:.3f} | {chain:.2f} "
            f"| {base[1] / chain:.3f} |"
        )
    fastest = min(rows[1:-1], key=lambda row: row[3])
    print("best", fastest[0].removeprefix("gated ").strip("()").replace(" ", ""))


if __name__ == "__main__":
    main()
