"""Lab (issue 6, the 1B's tg128): the codes GEMV's tiles and its persistent form.

The codes GEMV (`kernels/triton/xcodes.py`) streams the 1B's MLP at ~1.8 TB/s with codes made
for free, against ~3.0 for a copy; its programs are one-warp, two-row tiles over two K
steps, and each step's loads are consumed before the next step's are issued. Variants:
- tiles giving each thread two or four 32-blocks a step (BLOCK_B = 64 or 128 a warp), so
  more bytes are in flight a thread with x still read once a thread (these two: `--tiles`);
- the persistent, software-pipelined form (`xcodes._PIPE`: rows a tile, warps, programs
  an SM, tiles loaded ahead; x's codes read once a program, the next row tiles' loads
  issued before the current one is computed).
(K's steps unrolled at compile time were a variant in the twenty-sixth session, slower, and
deleted since: benchmarks/RESULTS.md.)

Each variant is checked first on the GPU against float64 (the weights' blocks from
`tests/ggml_blocks.py`, x the value the codes stand for; fresh random inputs each run), then
timed as CUDA-graph replays over rotating copies of the weight (more than L2 holds): the
1B's gate_up and output (short K) and down (long K), us a call, and the MLP chain with codes
made once (16 layers, us a layer).

    python benchmarks/kernels/xcodes_tile_lab.py [--layers 16] [--tiles] [--type Q4_1]
        [--long-only]
"""

from __future__ import annotations

import argparse
import itertools
import sys
from pathlib import Path

import numpy as np
import torch
from tune_decode import graph_time

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # tests.ggml_blocks
from tests.ggml_blocks import random_blocks  # noqa: E402

from llamapy.kernels.triton import xcodes  # noqa: E402
from llamapy.kernels.triton.qmatmul import pack_weight  # noqa: E402
from llamapy.quant.dequant import dequantize  # noqa: E402
from llamapy.quant.types import QuantType  # noqa: E402

SHORT_K = [(2, 32, 1), (1, 32, 1), (2, 64, 1), (1, 64, 1), (4, 64, 1), (2, 128, 1), (2, 64, 2)]
LONG_K = [(1, 128, 4), (1, 256, 4), (2, 256, 4), (1, 256, 8), (1, 128, 2), (1, 64, 1)]
# persistent (BLOCK_N, num_warps, programs an SM, tiles loaded ahead); the twenty-sixth
# session's first sweep (1-4 rows, 1-2 warps, 4-32 programs an SM, one tile ahead) put the
# best at 1-2 rows, one warp, 16-32 programs for short K, 2 rows, 8 warps, 2 programs long
PIPE_SHORT = list(itertools.product((1, 2, 4), (1,), (8, 12, 16, 24, 32), (1, 2)))
PIPE_LONG = list(itertools.product((1, 2), (4, 8), (1, 2, 3, 4), (1, 2)))


def weights(
    rng: np.random.Generator, n: int, k: int, copies: int, qtype: QuantType = QuantType.Q4_0
) -> tuple[list, torch.Tensor]:
    """`copies` packed (n, k) weights of `qtype` (the first's float64 values too)."""
    out, dense = [], None
    for i in range(copies):
        blocks = torch.from_numpy(random_blocks(rng, qtype, (n, k // 32)).reshape(n, -1))
        out.append(pack_weight(blocks.cuda(), qtype, (n, k)))
        if i == 0:
            dense = dequantize(blocks, qtype).double()
    return out, dense


def codes_x(codes) -> torch.Tensor:
    c = codes[0].cpu().view(torch.int8).double().reshape(xcodes.LEVELS, -1, 32)
    return (c * codes[1].cpu().double()[:, :, None]).sum(dim=0).reshape(-1)


def set_variant(tile: tuple[int, int, int], long_k: bool) -> None:
    if long_k:
        xcodes._TILE_LONG_K = tile
    else:
        xcodes._TILE = tile


def check(w, dense: torch.Tensor, codes) -> float:
    """The GEMV against float64; the worst error over its bound (must be <= 1)."""
    got = xcodes.gemv(codes, w, torch.full((1, w.n), float("nan"), device="cuda"), False)
    xr = codes_x(codes)
    ref, mag = dense @ xr, dense.abs() @ xr.abs()
    worst = float(((got.double().cpu().reshape(-1) - ref).abs() / (2e-6 * mag + 1e-30)).max())
    if not worst <= 1.0:
        raise SystemExit(f"the codes GEMV is wrong at {w.n} x {w.k}: {worst:.3g} of its bound")
    return worst


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--tiles", action="store_true", help="also the tiled form's sweep")
    parser.add_argument("--type", default="Q4_0", choices=("Q4_0", "Q4_1"))
    parser.add_argument("--long-only", action="store_true", help="only down's (long K) variants")
    args = parser.parse_args()
    seed = int(np.random.SeedSequence().entropy % (1 << 32))
    print(torch.cuda.get_device_name(), "seed", seed, flush=True)
    rng = np.random.default_rng(seed)
    k, f, vocab = 2048, 8192, 128256
    qtype = QuantType[args.type]
    gate_ups, gate_up_f64 = weights(rng, 2 * f, k, args.layers, qtype)
    downs, down_f64 = weights(rng, k, f, args.layers, qtype)
    outputs, output_f64 = weights(rng, vocab, k, 4, qtype)
    x = torch.from_numpy(rng.standard_normal((1, k), dtype=np.float32)).cuda()
    a = torch.from_numpy(rng.standard_normal((1, 2 * f), dtype=np.float32)).cuda()
    x_codes, a_codes = xcodes.quantize(x, k, 0), xcodes.quantize(a, f, 2)
    stream = torch.zeros(1, k, device="cuda")
    gu_out = torch.empty(1, 2 * f, device="cuda")
    o_out = torch.empty(1, vocab, device="cuda")
    saved = xcodes._TILE, xcodes._TILE_LONG_K
    saved_pipe = xcodes._PIPE, xcodes._Q41_PIPE
    tiled = [(False, t) for t in SHORT_K] + [(True, t) for t in LONG_K]
    if not args.tiles:
        tiled = [(False, saved[0]), (True, saved[1])]
    variants = [(long_k, ("tiled", tile)) for long_k, tile in tiled]
    variants += [(False, ("persistent", c)) for c in PIPE_SHORT]
    variants += [(True, ("persistent", c)) for c in PIPE_LONG]
    if args.long_only:
        variants = [v for v in variants if v[0]]

    def chain() -> float:
        return graph_time(
            [
                lambda i=i: (
                    xcodes.gemv(x_codes, gate_ups[i], gu_out, False),
                    xcodes.gemv(a_codes, downs[i], stream, True),
                )
                for i in range(args.layers)
            ]
        )

    rows = []
    best = {False: (float("inf"), None), True: (float("inf"), None)}
    for long_k, (form, tile) in variants:
        xcodes._TILE, xcodes._TILE_LONG_K = saved
        xcodes._PIPE = xcodes._Q41_PIPE = {"short": None, "long": None}
        if form == "tiled":
            set_variant(tile, long_k)
            name = f"{'long' if long_k else 'short'} K {tile}"
        else:
            xcodes._PIPE = xcodes._Q41_PIPE = (
                {"short": None, "long": tile} if long_k else {"short": tile, "long": None}
            )
            name = f"{'long' if long_k else 'short'} K persistent {tile}"
        if long_k:
            worst = check(downs[0], down_f64, a_codes)
            times = [graph_time([lambda w=w: xcodes.gemv(a_codes, w, stream, True)
                                 for w in downs])]  # fmt: skip
        else:
            worst = max(check(gate_ups[0], gate_up_f64, x_codes),
                        check(outputs[0], output_f64, x_codes))  # fmt: skip
            times = [
                graph_time([lambda w=w: xcodes.gemv(x_codes, w, gu_out, False)
                            for w in gate_ups]),
                graph_time([lambda w=w: xcodes.gemv(x_codes, w, o_out, False)
                            for w in outputs]),
            ]  # fmt: skip
        rows.append((name, worst, times, chain() if form == "tiled" else None))
        print(rows[-1], flush=True)
        if form == "persistent" and times[0] < best[long_k][0]:
            best[long_k] = (times[0], tile)
    xcodes._TILE, xcodes._TILE_LONG_K = saved
    xcodes._PIPE = xcodes._Q41_PIPE = {"short": best[False][1], "long": best[True][1]}
    rows.append((f"persistent {best[False][1]} / {best[True][1]}", 0.0, [], chain()))
    xcodes._PIPE = xcodes._Q41_PIPE = {"short": best[False][1], "long": None}
    rows.append((f"persistent {best[False][1]} / tiled", 0.0, [], chain()))
    xcodes._PIPE, xcodes._Q41_PIPE = saved_pipe
    print("pipe-env " + "/".join(",".join(map(str, best[lk][1] or "-")) for lk in (False, True)))
    print("\n| variant | worst / bound | gate_up us | output us | down us | MLP chain us a layer |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for name, worst, times, layer in rows:
        cells = ["", "", ""] if not times else (
            ["", "", f"{times[0]:.2f}"] if len(times) == 1 else [f"{t:.2f}" for t in times] + [""]
        )  # fmt: skip
        tail = "" if layer is None else f"{layer:.2f}"
        print(f"| {name} | {worst:.2f} | " + " | ".join(cells) + f" | {tail} |")


if __name__ == "__main__":
    main()
