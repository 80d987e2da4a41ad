"""Quantization time: llamapy's torch quantizers vs llama.cpp's `ggml_quantize_chunk`
(baseline, through ctypes from llama-cpp-python), same matrices, same sitting, same number of
threads (llama.cpp: rows split across Python threads, as llama-quantize splits them; llamapy:
torch intra-op threads). Also checks that the blocks are identical.

    python benchmarks/quantize_bench.py [--threads 2] [--types Q4_K,Q6_K] [--imatrix] [--json]

Matrices: 2048 x 2048 and SmolLM2-135M's FFN shapes (576 x 1536, 1536 x 576; types whose
block does not divide the row are skipped), standard normal weights.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests" / "quant"))

from ggml_quant_oracle import load, quantize_chunk  # noqa: E402

from llamapy.quant.quantize import IMATRIX_TYPES, quantize  # noqa: E402
from llamapy.quant.types import QuantType, block_size  # noqa: E402

SHAPES = {"2048x2048": (2048, 2048), "smollm2 ffn_down": (576, 1536), "smollm2 ffn_up": (1536, 576)}
DEFAULT_TYPES = "Q2_K,Q3_K,Q4_K,Q5_K,Q6_K,IQ4_NL,IQ4_XS,Q4_0,Q4_1,Q5_0,Q5_1,Q8_0"


def _best_time(fn, repeat: int) -> float:
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def _ggml_threaded(x: np.ndarray, qtype: QuantType, im: np.ndarray | None, threads: int):
    parts = np.array_split(x, threads)
    with ThreadPoolExecutor(threads) as pool:  # ctypes releases the GIL during the call
        return np.concatenate(list(pool.map(lambda p: quantize_chunk(p, qtype, im), parts)))


def bench(name: str, qtype: QuantType, use_im: bool, threads: int, repeat: int) -> dict | None:
    rows, n = SHAPES[name]
    if n % block_size(qtype):
        return None
    rng = np.random.default_rng(0)
    x = rng.standard_normal((rows, n)).astype(np.float32)
    im = (rng.random(n) ** 3).astype(np.float32) if use_im else None
    xt, imt = torch.from_numpy(x), (None if im is None else torch.from_numpy(im))
    ref = _ggml_threaded(x, qtype, im, threads)
    ours = quantize(xt, qtype, imt).numpy()
    t_ref = _best_time(lambda: _ggml_threaded(x, qtype, im, threads), repeat)
    t_ours = _best_time(lambda: quantize(xt, qtype, imt), repeat)
    return {
        "matrix": name,
        "type": qtype.name,
        "imatrix": use_im,
        "identical": bool(np.array_equal(ours, ref)),
        "llama_cpp_s": t_ref,
        "llamapy_s": t_ours,
        "slowdown": t_ours / t_ref,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--types", default=DEFAULT_TYPES)
    ap.add_argument("--matrices", default=",".join(SHAPES))
    ap.add_argument("--imatrix", action="store_true", help="also with an importance matrix")
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    if load() is None:
        sys.exit("llama-cpp-python is not installed: no baseline")
    torch.set_num_threads(args.threads)
    types = [QuantType[t.strip().upper()] for t in args.types.split(",")]
    results = []
    for name in args.matrices.split(","):
        for qtype in types:
            for use_im in [False] + ([True] if args.imatrix and qtype in IMATRIX_TYPES else []):
                r = bench(name, qtype, use_im, args.threads, args.repeat)
                if r is None:
                    continue
                results.append(r)
                if not args.json:
                    print(
                        f"{r['matrix']:17s} {r['type']:7s} {'imatrix' if use_im else '':7s} "
                        f"llama.cpp {r['llama_cpp_s']:7.3f} s  llamapy {r['llamapy_s']:7.3f} s  "
                        f"x{r['slowdown']:5.1f}  identical={r['identical']}",
                        flush=True,
                    )
    if args.json:
        print(json.dumps({"threads": args.threads, "results": results}, indent=1))


if __name__ == "__main__":
    main()
