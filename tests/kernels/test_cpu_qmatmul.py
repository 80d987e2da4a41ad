"""CPU quantized matmul (llamapy.kernels.cpu) against a float64 reference, on fresh blocks.

Legacy blocks come from `quantize` of random floats; k-quant blocks are random bytes with
moderate fp16 super-block scales. Tolerances (relative Frobenius error vs float64):
  bf16 paths (int4pack at every M, planar at M > 8): x, the block scales/zeros and the output
  are each rounded to bf16 (relative error <= 2^-9 each; fp32 sums) -> at most 3 * 2^-9,
  so 2^-7 is the bound;
  fp32 paths (planar GEMV at M <= 8, dense, dequant-chunks): fp32 products and sums over
  K = 512 terms -> 1e-5.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from llamapy.kernels.cpu import CpuWeight, pack_weight_cpu, qmatmul_cpu, qmatmul_cpu_reference
from llamapy.kernels.cpu.qmatmul import PLANAR_GEMV_MAX_M
from llamapy.quant.quantize import quantize
from llamapy.quant.types import QuantType, row_nbytes, type_size

N, K = 96, 512
BF16_TOL = 2.0**-7
FP32_TOL = 1e-5
LEGACY = {QuantType.Q4_0, QuantType.Q4_1, QuantType.Q5_0, QuantType.Q5_1, QuantType.Q8_0}
# Byte offset of the fp16 super-block scales of each k-quant block.
K_FP16_FIELDS = {QuantType.Q4_K: (0, 2), QuantType.Q6_K: (208,), QuantType.Q5_K: (0, 2)}
# (type, method, packed bytes / block bytes bound)
CASES = [
    (QuantType.Q4_0, "int4pack", 20 / 18),
    (QuantType.Q4_1, "int4pack", 1.0),
    (QuantType.Q4_K, "int4pack", 160 / 144),
    (QuantType.Q8_0, "int4pack", 40 / 34),
    (QuantType.Q5_0, "planar", 1.0),
    (QuantType.Q5_1, "planar", 1.0),
    (QuantType.Q6_K, "planar", 1.0),
    (QuantType.Q5_K, "dequant-chunks", 1.0),
    (QuantType.F16, "dense", 1.0),
]


def random_weight(rng: np.random.Generator, qtype: QuantType) -> torch.Tensor:
    """Valid (N, row_bytes) uint8 blocks of a (N, K) weight."""
    if qtype in LEGACY or qtype == QuantType.F16:
        scale = 10.0 ** rng.uniform(-3, 0, (N, 1))  # rows of different magnitudes
        w = torch.from_numpy(rng.standard_normal((N, K)) * scale).to(torch.float32)
        return quantize(w, qtype).view(N, row_nbytes(qtype, K))
    blocks = rng.integers(0, 256, (N * K // 256, type_size(qtype)), dtype=np.uint8)
    for off in K_FP16_FIELDS[qtype]:
        d = (rng.standard_normal(blocks.shape[0]) * 1e-2).astype(np.float16)
        blocks[:, off : off + 2] = d.view(np.uint8).reshape(-1, 2)
    return torch.from_numpy(blocks).view(N, row_nbytes(qtype, K))


def rel_error(y: torch.Tensor, ref: torch.Tensor) -> float:
    return ((y.double() - ref.double()).norm() / ref.double().norm()).item()


def tolerance(w: CpuWeight, m: int) -> float:
    bf16 = w.method == "int4pack" or (w.method == "planar" and m > PLANAR_GEMV_MAX_M)
    return BF16_TOL if bf16 else FP32_TOL


@pytest.mark.parametrize(
    ("qtype", "method", "max_ratio"), CASES, ids=[f"{c[0].name}-{c[1]}" for c in CASES]
)
def test_qmatmul_matches_float64(rng, qtype, method, max_ratio) -> None:
    data = random_weight(rng, qtype)
    w = pack_weight_cpu(data, qtype, (N, K))
    assert (w.qtype, w.n, w.k, w.method) == (qtype, N, K, method)
    assert w.nbytes <= max_ratio * data.nbytes, f"packed {w.nbytes} B, blocks {data.nbytes} B"
    for m in (1, 5, 64):
        x = torch.from_numpy(rng.standard_normal((m, K))).to(torch.float32)
        bias = torch.from_numpy(rng.standard_normal(N)).to(torch.float32) if m == 5 else None
        y = qmatmul_cpu(x, w, bias)
        ref = qmatmul_cpu_reference(x, data, qtype, (N, K), bias)
        assert y.shape == (m, N) and y.dtype == torch.float32
        assert torch.isfinite(y).all(), f"M={m}: non-finite outputs"
        err = rel_error(y, ref)
        assert err <= tolerance(w, m), f"M={m}: relative error {err:.3g}"


def test_reference_is_float64_dequantized_matmul(rng) -> None:
    """The oracle itself: x @ W.T with W dequantized by hand from Q4_0 blocks (d * (q - 8))."""
    data = random_weight(rng, QuantType.Q4_0)
    blocks = data.reshape(-1, 18)
    d = blocks[:, :2].contiguous().view(torch.float16).double()  # (N*K/32, 1)
    qs = blocks[:, 2:].long()
    q = torch.cat([qs & 15, qs >> 4], dim=1) - 8  # (N*K/32, 32)
    w = (d * q).view(N, K)
    x = torch.randn(3, K)
    ref = qmatmul_cpu_reference(x, data, QuantType.Q4_0, (N, K))
    torch.testing.assert_close(ref, (x.double() @ w.T).float(), rtol=1e-6, atol=1e-6)


def test_pack_rejects_wrong_block_shape() -> None:
    data = torch.zeros(N, row_nbytes(QuantType.Q4_0, K) - 18, dtype=torch.uint8)
    with pytest.raises(ValueError, match="uint8 blocks"):
        pack_weight_cpu(data, QuantType.Q4_0, (N, K))
