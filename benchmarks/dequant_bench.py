"""Dequantization throughput: llamapy's torch dequantizers vs gguf-py's numpy ones (baseline),
same random blocks, same sitting. Also reports whether the outputs agree bit for bit
(NaN payloads from random scale bytes compared as NaN).

    python benchmarks/dequant_bench.py [--weights 4194304] [--threads 2] [--json]
"""

from __future__ import annotations

import argparse
import json
import time

import gguf
import numpy as np
import torch

from llamapy.quant.dequant import DEQUANTIZERS, dequantize
from llamapy.quant.types import QuantType, block_size, type_size


def _best_time(fn, repeat: int = 3) -> float:
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def bench(qtype: QuantType, n_weights: int, rng: np.random.Generator) -> dict:
    n_blocks = max(1, n_weights // block_size(qtype))
    blocks = rng.integers(0, 256, (n_blocks, type_size(qtype)), dtype=np.uint8)
    if qtype == QuantType.F32:
        blocks = rng.standard_normal(n_blocks, dtype=np.float32).view(np.uint8).reshape(-1, 4)
    elif qtype == QuantType.F16:
        blocks = rng.standard_normal(n_blocks).astype(np.float16).view(np.uint8).reshape(-1, 2)
    data = torch.from_numpy(blocks)
    ref = gguf.quants.dequantize(blocks, qtype).astype(np.float32).reshape(-1)
    ours = dequantize(data, qtype).numpy().reshape(-1)
    exact = np.array_equal(ours, ref, equal_nan=True)
    t_ref = _best_time(lambda: gguf.quants.dequantize(blocks, qtype))
    t_ours = _best_time(lambda: dequantize(data, qtype))
    n = n_blocks * block_size(qtype)
    return {
        "type": qtype.name,
        "weights": n,
        "bit_exact": bool(exact),
        "gguf_py_mw_s": n / t_ref / 1e6,
        "llamapy_mw_s": n / t_ours / 1e6,
        "ratio": t_ref / t_ours,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--weights", type=int, default=1 << 22, help="weights per type")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    rng = np.random.default_rng()
    with np.errstate(all="ignore"):  # random scale bytes make NaNs and infs on purpose
        rows = [bench(qtype, args.weights, rng) for qtype in DEQUANTIZERS]
    if args.json:
        print(json.dumps(rows, indent=2))
        return
    print("| type | bit-exact vs gguf-py | gguf-py Mw/s | llamapy Mw/s | ratio |")
    print("| --- | --- | ---: | ---: | ---: |")
    for r in rows:
        print(
            f"| {r['type']} | {'yes' if r['bit_exact'] else 'NO'} | {r['gguf_py_mw_s']:.0f} "
            f"| {r['llamapy_mw_s']:.0f} | {r['ratio']:.1f}x |"
        )


if __name__ == "__main__":
    main()
