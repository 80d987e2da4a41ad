"""Every tensor of the real GGUF models dequantizes bit-exactly as gguf-py does it."""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import pytest
import torch

from llamapy.formats import GGUFFile
from llamapy.quant.dequant import dequantize

ROWS_PER_CHUNK = 8192  # bounds memory on the 262k-row Gemma embedding


@pytest.mark.models
@pytest.mark.slow
@pytest.mark.parametrize("fixture", ["smollm2_path", "gemma3_path"])
def test_every_tensor_bit_exact(fixture: str, request: pytest.FixtureRequest) -> None:
    path: Path = request.getfixturevalue(fixture)
    f = GGUFFile(path)
    seen_types = set()
    for name, info in f.tensor_infos.items():
        q = f.tensor(name)
        rows = q.data.reshape(-1, q.data.shape[-1])
        for start in range(0, rows.shape[0], ROWS_PER_CHUNK):
            chunk = rows[start : start + ROWS_PER_CHUNK]
            expected = gguf.quants.dequantize(chunk.numpy(), info.qtype)
            got = dequantize(chunk, info.qtype)
            expected_bits = torch.from_numpy(np.ascontiguousarray(expected, np.float32))
            assert torch.equal(got.view(torch.int32), expected_bits.view(torch.int32)), (
                f"{name} ({info.qtype.name}) rows {start}..{start + len(chunk)}"
            )
        seen_types.add(info.qtype.name)
    expected_types = {
        "smollm2_path": {"Q4_1", "Q8_0", "F32"},
        "gemma3_path": {"Q5_0", "Q4_K", "Q6_K", "Q8_0", "F32"},
    }[fixture]
    assert seen_types == expected_types
