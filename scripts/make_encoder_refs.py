#!/usr/bin/env python
"""Write llama.cpp's embeddings of tiny nomic-bert and jina-bert-v2 GGUFs to
tests/embedding/data/encoders/, so CI checks llamapy's encoders of those architectures
without llama.cpp (tests/embedding/test_embed_nomic_jina.py).

Needs llama-cpp-python (the oracle):

    python scripts/make_encoder_refs.py

Each model of tests/embedding/encoder_factory.py's SPECS is written with its REF_SEEDS seed
(weights are multiples of 1/128 from numpy's PCG64, so CI rebuilds the same file; the
digest of its tensors and metadata is stored to prove it). `encoder-refs.json` holds the
texts, and per model: the spec, seed, digest and llama.cpp's token ids; `encoder-refs.npz`
holds llama.cpp's pooled embeddings `{model}/{pooling}/{raw|l2}` (texts, hidden) float32,
all texts in one batch, and for a model with a rank head its scores `{model}/rank` (texts,).
"""

from __future__ import annotations

import json
import platform
import sys
import tempfile
from dataclasses import asdict
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests" / "embedding"))

from encoder_factory import (  # noqa: E402
    POOLING_CASES,
    REF_SEEDS,
    SPECS,
    llama_cpp_embed,
    llama_cpp_rank,
    weights_digest,
    write_encoder_gguf,
)

OUT = ROOT / "tests" / "embedding" / "data" / "encoders"
# Varied lengths (1 to ~300 tokens with the tiny vocabulary), accents, CJK, digits, code.
TEXTS = [
    "a",
    "",
    "hello world",
    "The function returns a value of type int, or None if the key is missing.",
    "Ça va? Très bien, merci — et toi? naïve café résumé",
    "東京タワーは日本の電波塔です。",
    "3.14159 2.71828 1e-12 0xDEADBEEF",
    "def f(x):\n    return x ** 2  # square",
    "UPPER lower MiXeD",
    "If the argument is a string, the default module attribute is used; each call returns "
    "a new list of names, and an exception is raised when the path is not a file.",
    "Return a new dict with the keys of the given object. " * 6,
    "import os, sys; print(sys.argv[1:], os.path.join('a', 'b'))",
]


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    import llama_cpp

    meta: dict = {
        "texts": TEXTS,
        "llama_cpp_python": llama_cpp.__version__,
        "machine": f"{platform.system()} {platform.machine()}",
        "models": {},
    }
    arrays: dict[str, np.ndarray] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, spec in SPECS.items():
            seed = REF_SEEDS[name]
            path = write_encoder_gguf(Path(tmp) / f"{name}.gguf", spec, seed)
            ids = None
            for pooling, normalize in POOLING_CASES:
                emb, ids = llama_cpp_embed(path, TEXTS, pooling, normalize)
                key = f"{name}/{pooling}/{'l2' if normalize else 'raw'}"
                arrays[key] = emb.numpy().astype(np.float32)
            if spec.rank_head:
                arrays[f"{name}/rank"] = llama_cpp_rank(path, ids).numpy()
            meta["models"][name] = {
                "spec": asdict(spec),
                "seed": seed,
                "digest": weights_digest(spec, seed),
                "token_ids": ids,
            }
            print(f"{name}: {sum(map(len, ids))} tokens")
    np.savez_compressed(OUT / "encoder-refs.npz", **arrays)
    (OUT / "encoder-refs.json").write_text(
        json.dumps(meta, indent=1, ensure_ascii=False) + "\n", encoding="utf-8"
    )
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
