"""Lab (issue 6): the one-sequence decode attention at short contexts, split or not.

The decode graphs of one sequence run the fused attention (rotary + cache write + split
attention, `attention.rope_cache_attention_decode`) at 32 splits of 16-key tiles and a merge
launch after it, whatever the context: at 64 keys 4.6-5.1 us plus a 1.4-1.6 us merge a layer
(twenty-eighth session's profile). A single split writes its output itself (no merge
launch), but walks its keys alone. This lab times, at Llama-3.2-1B's heads (32 query, 8 KV,
dim 64) and SmolLM2's (9, 3, 64), contexts of 16-512 keys, each variant as CUDA-graph replays
over rotating caches (`tune_decode.graph_time`, a call = the kernel and its merge when it has
one): the graphs' split count at 16-key tiles (the engine's), and splits 1 / 2 / 4 with tiles
of 16-256 keys, 4 or 8 warps, the query heads' products as float32 broadcasts or `tl.dot`
(`attention.DECODE_FMA_MAX`). Every variant's output is first checked against a float64
reference of the same step (rotated q and key, the cache with the new key written).

    python benchmarks/kernels/attn_short_lab.py [--contexts 16,64,128,256,512] [--heads 1b]
"""

from __future__ import annotations

import argparse
import itertools

import torch
from tune_decode import graph_time

from llamapy.engine.model_runner import graph_decode_splits
from llamapy.kernels.triton import attention

HEADS = {"1b": (32, 8, 64), "smol": (9, 3, 64)}
BLOCK = 16  # cache block size (the engine's)
COPIES = 8  # rotating caches (distinct block tables over one pool)
DEV = "cuda"


def make_case(heads: int, kv: int, d: int, seq: int, gen: torch.Generator) -> dict:
    cap = 4096 // BLOCK  # a graph's tables span the whole capacity
    kc = torch.randn(cap * COPIES, BLOCK, kv, d, device=DEV, generator=gen).half()
    vc = torch.randn(cap * COPIES, BLOCK, kv, d, device=DEV, generator=gen).half()
    perm = torch.randperm(cap * COPIES, device=DEV, generator=gen).to(torch.int32)
    tables = [perm[i * cap : (i + 1) * cap][None].contiguous() for i in range(COPIES)]
    slots = [t[0, (seq - 1) // BLOCK].long()[None] * BLOCK + (seq - 1) % BLOCK for t in tables]
    qkv = torch.randn(1, (heads + 2 * kv) * d, device=DEV, generator=gen)
    q, k, v = qkv.split([heads * d, kv * d, kv * d], dim=-1)
    pos = torch.full((1,), float(seq - 1), device=DEV)
    freqs = 10000.0 ** (-torch.arange(0, d, 2, device=DEV) / d)
    ang = pos[:, None] * freqs[None]
    return {
        "q": q.view(1, heads, d), "k": k.view(1, kv, d), "v": v.view(1, kv, d),
        "cos": ang.cos(), "sin": ang.sin(), "kc": kc, "vc": vc, "tables": tables,
        "slots": slots, "lens": torch.tensor([seq], device=DEV, dtype=torch.int32),
        "out": torch.empty(1, heads, d, device=DEV), "d": d, "seq": seq,
    }  # fmt: skip


def calls(case: dict, splits: int, tiles: tuple[int, int, int] | None) -> list:
    c = case
    return [
        lambda t=t, s=s: attention.rope_cache_attention_decode(
            c["q"], c["k"], c["v"], c["cos"], c["sin"], c["kc"], c["vc"], t, c["lens"], s,
            interleaved=False, scale=c["d"] ** -0.5, num_splits=splits, out=c["out"],
            tiles=tiles,
        )
        for t, s in zip(c["tables"], c["slots"], strict=True)
    ]  # fmt: skip


def reference(case: dict) -> torch.Tensor:
    """float64 attention of the first copy's step: q and the new key rotated (non-interleaved
    halves), the new key / value rounded to the cache's fp16, keys [0, seq)."""
    c = case
    q, k, v = (c[n][0].double() for n in ("q", "k", "v"))
    cos, sin = c["cos"][0].double(), c["sin"][0].double()

    def rot(x: torch.Tensor) -> torch.Tensor:
        h = x.shape[-1] // 2
        a, b = x[..., :h], x[..., h:]
        return torch.cat([a * cos - b * sin, b * cos + a * sin], dim=-1)

    qr, kr = rot(q).float().double(), rot(k).half().double()
    seq, table = c["seq"], c["tables"][0][0].long()
    pos = torch.arange(seq, device=DEV)
    keys = c["kc"][table[pos // BLOCK], pos % BLOCK].double()  # (seq, kv, d)
    vals = c["vc"][table[pos // BLOCK], pos % BLOCK].double()
    keys[-1], vals[-1] = kr, v.half().double()
    group = q.shape[0] // k.shape[0]
    keys = keys.repeat_interleave(group, dim=1)
    vals = vals.repeat_interleave(group, dim=1)
    s = torch.einsum("hd,thd->ht", qr, keys) * c["d"] ** -0.5
    return torch.einsum("ht,thd->hd", s.softmax(-1), vals)


def run(case: dict, splits: int, tiles, fma: int, want: torch.Tensor) -> tuple[float, float]:
    saved = attention.DECODE_FMA_MAX
    attention.DECODE_FMA_MAX = fma
    try:
        case["out"].fill_(float("nan"))
        calls(case, splits, tiles)[0]()
        torch.cuda.synchronize()
        err = (case["out"][0].double() - want).abs().max().item()
        return graph_time(calls(case, splits, tiles)), err
    finally:
        attention.DECODE_FMA_MAX = saved


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--contexts", default="16,64,128,256,512")
    parser.add_argument("--heads", default="1b,smol")
    args = parser.parse_args()
    gen = torch.Generator(device=DEV)
    gen.manual_seed(torch.seed() % 2**31)
    print(torch.cuda.get_device_name())
    variants: list[tuple[int, tuple[int, int, int] | None, int]] = []
    for bn, warps, fma in itertools.product((32, 64, 128, 256), (4, 8), (0, 1 << 20)):
        variants.append((1, (bn, warps, 1), fma))
    for splits, bn, fma in itertools.product((2, 4), (16, 32, 64), (0, 1 << 20)):
        variants.append((splits, (bn, 4, 1), fma))
    rows = []
    for name in args.heads.split(","):
        heads, kv, d = HEADS[name]
        base_splits = graph_decode_splits(1, kv)
        for seq in (int(s) for s in args.contexts.split(",")):
            case = make_case(heads, kv, d, seq, gen)
            want = reference(case)
            base, err = run(case, base_splits, None, attention.DECODE_FMA_MAX, want)
            best = (base, f"{base_splits} splits x 16 (engine)", err)
            worst_err = err
            for splits, tiles, fma in variants:
                if splits > 1 and splits * tiles[0] > 4 * seq:
                    continue
                try:
                    us, err = run(case, splits, tiles, fma, want)
                except Exception as exc:  # a tile that does not compile: named, skipped
                    print(f"  skip {name} {seq} {splits} {tiles} {fma}: {type(exc).__name__}")
                    continue
                worst_err = max(worst_err, err)
                if err > 5e-3:
                    print(f"  WRONG {name} seq {seq} {splits} {tiles} fma {fma}: err {err:.2e}")
                    continue
                label = f"{splits} x {tiles[0]}, {tiles[1]} warps, {'fma' if fma else 'dot'}"
                print(f"  {name} seq {seq:4d} {label:32s} {us:6.2f} us", flush=True)
                best = min(best, (us, label, err))
            rows.append((name, seq, base, best[0], best[1], worst_err))
    print("\n| heads | keys | engine us | best us | best | worst error |")
    print("| --- | ---: | ---: | ---: | --- | ---: |")
    for name, seq, base, us, label, err in rows:
        print(f"| {name} | {seq} | {base:.2f} | {us:.2f} | {label} | {err:.1e} |")


if __name__ == "__main__":
    main()
