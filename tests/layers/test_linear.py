"""QLinear's fused (stacked) layers: exact stacking, and what memory they keep."""

from __future__ import annotations

import gc
import weakref

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType
from gguf import quants as gguf_quants

from llamapy.layers.linear import QLinear
from llamapy.quant.qtensor import QTensor
from llamapy.quant.types import QuantType


def _weight(rng: np.random.Generator, n: int, k: int) -> QTensor:
    w = rng.standard_normal((n, k)).astype(np.float32)
    q = gguf_quants.quantize(w, GGMLQuantizationType.Q4_0)
    return QTensor(torch.from_numpy(np.ascontiguousarray(q)).view(n, -1), QuantType.Q4_0, (n, k))


@pytest.fixture
def parts(rng: np.random.Generator) -> list[QTensor]:
    return [_weight(rng, n, 64) for n in (32, 16, 16)]


def test_fused_layer_is_the_stacked_projections(parts) -> None:
    layer = QLinear.fused(parts, [None] * 3)
    assert (layer.out_features, layer.in_features) == (64, 64)
    x = torch.randn(3, 64)
    expected = torch.cat([QLinear(p)(x) for p in parts], dim=1)
    torch.testing.assert_close(layer(x), expected, rtol=0, atol=0)
    assert layer.weight.shape == (64, 64)
    assert torch.equal(layer.weight.data, torch.cat([p.data for p in parts]))


def test_fused_layer_stacks_late_and_keeps_no_copy(parts, rng) -> None:
    """The stacked copy is made when the layer is prepared (a model builds every layer
    first: copies made at build time were all resident at once) and freed once packed (an
    empty view of it had kept ~340 MB of a 1B model's QKV / gate-up blocks alive)."""
    layer = QLinear.fused(parts, [None] * 3)
    assert layer._parts is not None  # nothing stacked yet
    stacked = weakref.ref(layer.weight.data.untyped_storage())
    assert layer._parts is None
    x = torch.from_numpy(rng.standard_normal((2, 64), dtype=np.float32))
    before = layer(x)  # the reference path: dequantized blocks, float32
    w_abs = layer.dense_weight().abs().T
    layer.prepare(torch.device("cpu"))
    gc.collect()
    assert stacked() is None, "the stacked blocks outlived packing"
    assert layer.weight.data.numel() == 0
    # the packed kernels may round x to 8 bits per 32-block (VNNI: half a step of the
    # block's amax / 127, with the scale an fp16) or x, W and the output to bf16 (int4pack)
    block_amax = x.abs().view(2, -1, 32).amax(dim=2, keepdim=True).expand(-1, -1, 32)
    bound = (block_amax.reshape(2, 64) * (1 / 254 + 2**-11)) @ w_abs + 3 * 2**-9 * (x.abs() @ w_abs)
    assert ((layer(x) - before).abs() <= bound).all()
