"""`RotaryEmbedding.build_table`: cos / sin gathered by position (the GPU's decode steps take
them so, one launch instead of seven) must be the computed ones, bit for bit, and only where
the caller's bound says every position is inside the table."""

from __future__ import annotations

import pytest
import torch

from llamapy.config import RopeScaling
from llamapy.layers.rotary import RotaryEmbedding

ROPES = {
    "plain": dict(rot_dim=64, base=10_000.0),
    "linear": dict(rot_dim=32, base=10_000.0, scaling=RopeScaling(type="linear", factor=4.0)),
    "llama3": dict(
        rot_dim=64,
        base=500_000.0,
        scaling=RopeScaling(
            type="llama3",
            factor=32.0,
            low_freq_factor=1.0,
            high_freq_factor=4.0,
            original_context_length=8192,
        ),
    ),
}


@pytest.mark.parametrize("kind", list(ROPES))
def test_table_rows_are_the_computed_ones(kind, rng):
    rope = RotaryEmbedding(**ROPES[kind], interleaved=True)
    n = 1000
    positions = torch.from_numpy(rng.integers(0, n, 77)).to(torch.int32)
    want = rope.cos_sin(positions)
    rope.build_table(n, "cpu")
    got = rope.cos_sin(positions, bound=n)
    for g, w in zip(got, want, strict=True):
        assert g.shape == w.shape == (77, ROPES[kind]["rot_dim"] // 2)
        assert g.dtype == torch.float32
        assert torch.equal(g, w)
    # the last row too (a table one row short would index past it)
    last = torch.tensor([n - 1])
    assert torch.equal(rope.cos_sin(last, bound=n)[1], RotaryEmbedding(
        **ROPES[kind], interleaved=True).cos_sin(last)[1])  # fmt: skip


def test_positions_past_the_table_are_computed(rng):
    rope = RotaryEmbedding(rot_dim=64, base=10_000.0, interleaved=False)
    rope.build_table(16, "cpu")
    rope.table.fill_(float("nan"))  # a gathered row would show
    positions = torch.from_numpy(rng.integers(0, 40, 9))
    for bound in (None, 17, 40):  # no promise, or one the table does not cover
        cos, sin = rope.cos_sin(positions, bound)
        assert not cos.isnan().any() and not sin.isnan().any()
    cos, _ = rope.cos_sin(torch.arange(8), bound=16)
    assert cos.isnan().all()  # covered: gathered
