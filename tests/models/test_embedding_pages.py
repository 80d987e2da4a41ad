"""On the CPU the embedding table stays in the mapped model file (the matrices are repacked
copies, their file pages let go at load): each lookup maps the pages of its rows, and the
models let them go right after it, so a long generation does not bring the whole table
resident (on kernels whose page cache holds large folios each lookup maps 2 MiB; Gemma 3's
table is 70% of its file). Measured as the mapping's `Rss` in /proc/self/smaps."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from llamapy.api import LLM
from llamapy.sampling.params import SamplingParams

pytestmark = [
    pytest.mark.models,
    pytest.mark.skipif(
        not sys.platform.startswith("linux") or not Path("/proc/self/smaps").exists(),
        reason="reads the mapping's resident size from Linux's /proc/self/smaps",
    ),
]


def mapped_kib(address: int) -> int:
    """Resident KiB of the mapping of this process that holds `address`."""
    inside = False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        head = line.split()[0]
        if "-" in head and not head.endswith(":"):
            start, end = (int(a, 16) for a in head.split("-"))
            inside = start <= address < end
        elif inside and head == "Rss:":
            return int(line.split()[1])
    raise AssertionError(f"no mapping holds {address:#x}")


def test_looked_up_rows_are_not_left_resident(smollm2_path, rng) -> None:
    llm = LLM(str(smollm2_path), n_ctx=256, n_threads=1)
    model = llm.engine.runner.model
    table = model.embed.data
    where = table.data_ptr()
    assert model.release_embedding_pages is not None
    vocab = table.shape[0]
    ids = torch.from_numpy(rng.choice(vocab, 64, replace=False))
    # the measure sees pages a lookup maps: rows read straight from the table stay mapped
    rows = table[ids].clone()
    assert mapped_kib(where) > 0
    x = model.embed_tokens(ids)
    assert mapped_kib(where) == 0
    want = model.embed_tokens(ids.flip(0)).flip(0)  # the same rows, read again from the file
    assert torch.equal(x, want) and rows.shape[0] == len(ids)
    # and through a whole generation (prefill and decode steps)
    out = llm.generate(["Tell me about the sea."], SamplingParams(max_tokens=16, seed=int(ids[0])))
    assert out[0].token_ids
    assert mapped_kib(where) == 0
