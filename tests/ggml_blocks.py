"""Random ggml blocks for tests: every quant byte pattern, with each fp16 scale field
overwritten by a finite fp16 value (the oracle, gguf-py, and the kernels agree on finite
scales; random bits would make NaN / inf scales)."""

from __future__ import annotations

import numpy as np

from llamapy.quant.types import QuantType, type_size

# Byte offsets of the fp16 fields of each block (the ggml block_* structs).
FP16_FIELDS: dict[QuantType, tuple[int, ...]] = {
    QuantType.Q4_0: (0,),
    QuantType.Q4_1: (0, 2),
    QuantType.Q5_0: (0,),
    QuantType.Q5_1: (0, 2),
    QuantType.Q8_0: (0,),
    QuantType.Q2_K: (80, 82),
    QuantType.Q3_K: (108,),
    QuantType.Q4_K: (0, 2),
    QuantType.Q5_K: (0, 2),
    QuantType.Q6_K: (208,),
}


def random_fp16(rng: np.random.Generator, n: int) -> np.ndarray:
    """n finite fp16 values: mostly moderate normals, some arbitrary, subnormal or zero."""
    moderate = (rng.standard_normal(n) * 10.0 ** rng.uniform(-4, 1, n)).astype(np.float16)
    bits = rng.integers(0, 1 << 16, n, dtype=np.uint16)
    finite = np.where((bits & 0x7C00) == 0x7C00, bits & 0x83FF, bits).view(np.float16)
    subnormal = (bits & 0x83FF).view(np.float16)
    zero = np.where(rng.random(n) < 0.5, np.float16(0.0), np.float16(-0.0))
    kind = rng.choice(4, size=n, p=[0.7, 0.15, 0.1, 0.05])
    return np.choose(kind, [moderate, finite, subnormal, zero]).astype(np.float16)


def random_blocks(rng: np.random.Generator, qtype: QuantType, shape: tuple[int, ...]) -> np.ndarray:
    """Random uint8 blocks `(*shape, type_size)` with finite fp16 scale fields."""
    blocks = rng.integers(0, 256, (*shape, type_size(qtype)), dtype=np.uint8)
    flat = blocks.reshape(-1, type_size(qtype))
    for off in FP16_FIELDS[qtype]:
        flat[:, off : off + 2] = random_fp16(rng, flat.shape[0]).view(np.uint8).reshape(-1, 2)
    return blocks
