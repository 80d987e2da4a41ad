"""Lab (issue 6, the 1B's tg128): the decode attention's split merge inside o's GEMV.

A decode layer runs the fused attention (rotary, cache write, key splits), a launch that
merges the splits (1.4-1.6 us a layer in the twenty-eighth session's profile, plus its
boundary), then o's GEMV adding into the residual stream. With `defer_merge` the attention
returns its partials (`DecodeSplits`) and o's GEMV merges them as it loads x (`qmatmul`'s
merge prologue): no merge launch, but each of o's programs reads all splits' partials (S x
8 KB for the 1B) instead of x (8 KB).

Each variant is checked first against float64 (the attention of the step over the cache with
the new key written, then the product with the dequantized weight, plus the residual), then
timed as CUDA-graph replays of attention + o over rotating caches and weights (the 1B's 32
query heads, 8 KV heads of 64, o 2048 x 2048; `tune_decode.graph_time`, us a pair), at the
split counts the engine's one-sequence graphs take for each context (`graph_decode_splits`),
with PDL as the engine launches the 1B's kernels.

    python benchmarks/kernels/merge_gemv_lab.py [--contexts 16,64,128,256,512]
        [--types Q4_0,Q4_1,Q8_0,Q4_K] [--tiles]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import attn_short_lab
import numpy as np
import torch
from tune_decode import graph_time

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # tests.ggml_blocks
from tests.ggml_blocks import random_blocks  # noqa: E402

from llamapy.engine.model_runner import graph_decode_splits  # noqa: E402
from llamapy.kernels.triton import attention, pdl, qmatmul  # noqa: E402
from llamapy.quant.types import QuantType  # noqa: E402

HEADS, KV, D = attn_short_lab.HEADS["1b"]
COPIES = attn_short_lab.COPIES  # rotating caches; as many rotating weights
DEV = attn_short_lab.DEV
# o's GEMV tiles tried with the merge (BLOCK_N, BLOCK_B, num_warps): fewer rows a program
# read the partials more often, more rows fewer times
TILES = [(8, 64, 4), (16, 64, 4), (16, 64, 8), (32, 64, 8), (8, 32, 4), (4, 64, 4)]


def make_case(seq: int, qtype: QuantType, gen: torch.Generator, rng) -> dict:
    """`attn_short_lab`'s step (the 1B's heads) plus o's rotating weights and residuals."""
    case = attn_short_lab.make_case(HEADS, KV, D, seq, gen)
    n = k = HEADS * D
    blocks = [random_blocks(rng, qtype, (n, k // 256 if qtype == QuantType.Q4_K else k // 32))
              for _ in range(COPIES)]  # fmt: skip
    data = [torch.from_numpy(b.reshape(n, -1)).to(DEV) for b in blocks]
    case["data"], case["qtype"] = data, qtype
    case["weights"] = [qmatmul.pack_weight(x, qtype, (n, k), legacy_twin=True) for x in data]
    case["res"] = [torch.randn(1, n, device=DEV, generator=gen) for _ in range(COPIES)]
    return case


def calls(case: dict, splits: int, defer: bool, tile) -> list:
    c = case
    keys = ("BLOCK_N", "BLOCK_B", "num_warps")
    cfg = None if tile is None else dict(zip(keys, tile, strict=True))

    def pair(i: int) -> None:
        x = attention.rope_cache_attention_decode(
            c["q"], c["k"], c["v"], c["cos"], c["sin"], c["kc"], c["vc"], c["tables"][i],
            c["lens"], c["slots"][i], interleaved=False, scale=D**-0.5, num_splits=splits,
            out=c["out"], tiles=(16, 4, 1), defer_merge=defer,
        )  # fmt: skip
        if isinstance(x, torch.Tensor):
            x = x.view(1, -1)
        qmatmul.qmatmul_with(x, c["weights"][i], residual=c["res"][i], gemv_config=cfg)

    return [lambda i=i: pair(i) for i in range(COPIES)]


def reference(case: dict) -> torch.Tensor:
    """float64 o(attention) + residual of copy 0's step (the residual as it is now)."""
    x = attn_short_lab.reference(case).reshape(1, -1)
    prod = qmatmul.qmatmul_reference(x, case["data"][0], case["qtype"], (HEADS * D, HEADS * D))
    return prod + case["res"][0].double()


def run(case: dict, splits: int, defer: bool, tile) -> tuple[float, float]:
    res0 = case["res"][0].clone()
    want = reference(case)
    calls(case, splits, defer, tile)[0]()
    torch.cuda.synchronize()
    got = case["res"][0].double()
    err = ((got - want).norm() / (want - res0.double()).norm()).item()
    case["res"][0].copy_(res0)
    return graph_time(calls(case, splits, defer, tile)), err


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--contexts", default="16,64,128,256,512")
    parser.add_argument("--types", default="Q4_0,Q4_1,Q8_0,Q4_K")
    parser.add_argument("--tiles", action="store_true", help="also o's tiles with the merge")
    args = parser.parse_args()
    gen = torch.Generator(device=DEV)
    seed = torch.seed() % 2**31
    gen.manual_seed(seed)
    rng = np.random.default_rng(seed)
    pdl.set_model_bytes(torch.device(DEV), 700 << 20)  # the 1B's: PDL as its engine launches
    print(torch.cuda.get_device_name(), "seed", seed)
    rows = []
    for tname in args.types.split(","):
        qtype = QuantType[tname]
        for seq in (int(s) for s in args.contexts.split(",")):
            splits = graph_decode_splits(1, KV, seq)
            case = make_case(seq, qtype, gen, rng)
            base, err0 = run(case, splits, False, None)
            merged, err1 = run(case, splits, True, None)
            best, label, worst = merged, "default tile", max(err0, err1)
            for tile in TILES if args.tiles else []:
                try:
                    us, err = run(case, splits, True, tile)
                except Exception as exc:  # a tile that does not compile: named, skipped
                    print(f"  skip {tname} {seq} {tile}: {type(exc).__name__}")
                    continue
                worst = max(worst, err)
                print(f"  {tname} seq {seq:4d} S {splits:2d} tile {tile}: {us:6.2f} us", flush=True)
                if us < best:
                    best, label = us, f"{tile[0]} rows x {tile[1]} blocks, {tile[2]} warps"
            flag = "  WRONG" if worst > 1e-4 else ""
            print(f"{tname} seq {seq:4d} S {splits:2d}: merge kernel {base:6.2f}, in o "
                  f"{merged:6.2f} us; error {worst:.1e}{flag}", flush=True)  # fmt: skip
            rows.append((tname, seq, splits, base, merged, best, label, worst))
    print("\n| type | keys | splits | merge kernel + o us | merged in o us | ratio | best tile "
          "| best us | worst error |")  # fmt: skip
    print("| --- | ---: | ---: | ---: | ---: | ---: | --- | ---: | ---: |")
    for tname, seq, splits, base, merged, best, label, err in rows:
        print(f"| {tname} | {seq} | {splits} | {base:.2f} | {merged:.2f} | {base / merged:.3f} "
              f"| {label} | {best:.2f} | {err:.1e} |")  # fmt: skip


if __name__ == "__main__":
    main()
