#!/usr/bin/env python
"""Write llama.cpp's quantized blocks for a fixed set of rows to tests/quant/data/, so CI
checks llamapy's quantizers bit for bit without llama.cpp (tests/quant/test_quantize_search.py).

Needs llama-cpp-python (its libggml-base: `ggml_quantize_chunk`, what llama-quantize calls)
and the real test models (smollm2-135m, gemma3-270m) for the realistic rows:

    python scripts/make_quant_refs.py

`quant-refs.npz` holds `x` (ROWS, N) float32: seeded random rows of many kinds (Gaussian at
several scales, outliers, zeros, constants, sparse, one-signed, tiny, on a grid) and rows of
the real models' dequantized weights; `imatrix` (N,) float32 (some zeros); for every
type T in TYPES, `T` and `T_imatrix`: ggml_quantize_chunk's bytes (ROWS, row_bytes) without
and with the imatrix, and `T_imatrix` for the legacy LEGACY_IMATRIX_TYPES; `meta`: JSON
(versions, how the rows were made).
"""

from __future__ import annotations

import json
import platform
import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests" / "quant"))

from ggml_quant_oracle import load, quantize_chunk  # noqa: E402

from llamapy.formats import open_model_file  # noqa: E402
from llamapy.hub import resolve_model  # noqa: E402
from llamapy.quant.types import QuantType  # noqa: E402

OUT = ROOT / "tests" / "quant" / "data" / "quant-refs.npz"
N = 1024  # weights per row: 4 super-blocks of 256
TYPES = [
    QuantType.Q2_K, QuantType.Q3_K, QuantType.Q4_K, QuantType.Q5_K, QuantType.Q6_K,
    QuantType.IQ4_NL, QuantType.IQ4_XS,
]  # fmt: skip
# Without an imatrix these are gguf-py's quantizers, tested against gguf-py itself.
LEGACY_IMATRIX_TYPES = [QuantType.Q4_0, QuantType.Q4_1, QuantType.Q5_0, QuantType.Q5_1]
MODEL_ROWS = {  # alias -> tensors whose first N * 2 weights give two rows each
    "smollm2-135m": ["blk.0.attn_q.weight", "blk.3.ffn_down.weight"],
    "gemma3-270m": ["blk.0.attn_k.weight", "blk.5.ffn_up.weight"],
}


def synthetic_rows(rng: np.random.Generator) -> list[np.ndarray]:
    g = rng.standard_normal
    rows = [
        g(N) * 0.02,
        g(N) * 10.0,
        g(N) * np.where(rng.random(N) < 0.02, 50.0, 1.0),  # outliers
        np.zeros(N),
        np.full(N, -0.37),
        g(N) * (rng.random(N) < 0.1),  # sparse
        np.abs(g(N)),  # one-signed
        -np.abs(g(N)) - 1.0,
        g(N) * 1e-9,  # tiny: fp16 scales underflow
        g(N) * 1e-20,  # below GROUP_MAX_EPS
        rng.integers(-8, 8, N) / 4.0,  # on a grid: ties in the searches
        g(N) * 3e3,
    ]
    return [r.astype(np.float32) for r in rows]


def model_rows() -> list[np.ndarray]:
    rows = []
    for alias, names in MODEL_ROWS.items():
        model = open_model_file(resolve_model(alias).path)
        for name in names:
            w = model.tensor(name).dequantize(torch.float32).reshape(-1)[: 2 * N]
            rows.extend(w.numpy().reshape(2, N))
    return rows


def main() -> None:
    if load() is None:
        sys.exit("llama-cpp-python is not installed (needed for ggml_quantize_chunk)")
    rng = np.random.default_rng(20260525)
    x = np.stack(synthetic_rows(rng) + model_rows()).astype(np.float32)
    imatrix = (rng.random(N) * 2.0) ** 3
    imatrix[rng.random(N) < 0.05] = 0.0
    imatrix = imatrix.astype(np.float32)
    out: dict[str, np.ndarray] = {"x": x, "imatrix": imatrix}
    for qtype in TYPES:
        out[qtype.name] = quantize_chunk(x, qtype)
        out[f"{qtype.name}_imatrix"] = quantize_chunk(x, qtype, imatrix)
    for qtype in LEGACY_IMATRIX_TYPES:
        out[f"{qtype.name}_imatrix"] = quantize_chunk(x, qtype, imatrix)
    import llama_cpp

    meta = {
        "source": "ggml_quantize_chunk from llama-cpp-python's libggml-base",
        "llama_cpp_python": llama_cpp.__version__,
        "machine": platform.machine(),
        "rows": f"{len(synthetic_rows(np.random.default_rng(0)))} synthetic, then "
        + ", ".join(f"{a}: {n}" for a, ns in MODEL_ROWS.items() for n in ns),
    }
    out["meta"] = np.array(json.dumps(meta))
    OUT.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(OUT, **out)
    print(f"wrote {OUT} ({OUT.stat().st_size / 1024:.0f} KiB): {x.shape[0]} rows x {N}")


if __name__ == "__main__":
    main()
