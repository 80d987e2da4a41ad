"""The CUDA-graph greedy pick's two-pass argmax equals torch.argmax, ties included."""

import pytest
import torch

from llamapy.engine.model_runner import argmax_rows


@pytest.mark.parametrize("vocab", [1000, 65536, 128256, 262144])
def test_argmax_rows_matches_torch(vocab: int) -> None:
    gen = torch.Generator().manual_seed(torch.seed())
    x = torch.randn(5, vocab, generator=gen)
    # ties: row 1 has its maximum twice (in different chunks), row 2 twice in one chunk,
    # row 3 is constant, row 4 peaks in the last column
    top = x.max() + 1
    x[1, [7, vocab - 3]] = top
    x[2, [vocab // 2, vocab // 2 + 1]] = top
    x[3] = 0.5
    x[4, -1] = top
    assert torch.equal(argmax_rows(x), x.argmax(dim=-1))
    assert argmax_rows(x)[3].item() == 0 and argmax_rows(x)[4].item() == vocab - 1
