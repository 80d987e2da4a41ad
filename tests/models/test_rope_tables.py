"""A model's rope tables (`LlamaForCausalLM.build_rope_tables`, built by the GPU's model
runner): the same logits as computed cos / sin, and read where the steps' bound fits."""

from __future__ import annotations

import pytest
import torch


@pytest.mark.parametrize("arch", ["llama-rope-llama3", "gemma3"])
def test_model_logits_with_tables(arch, tmp_path, rng):
    """A model's forward with its rope tables built gives the logits it gives without them
    (Gemma 3: two rope kinds, each its own table)."""
    from tiny_models import VOCAB, PagedRunner, save_folder, tiny_config, tiny_model

    from llamapy.formats import open_model_file
    from llamapy.models import build_causal_lm

    folder = save_folder(tiny_model(tiny_config(arch), int(rng.integers(2**31))), tmp_path / arch)
    model = build_causal_lm(open_model_file(folder))
    model.prepare("cpu", cpu_kernels="reference")
    ids = {0: rng.integers(0, VOCAB, 11).tolist(), 1: rng.integers(0, VOCAB, 5).tolist()}
    want = PagedRunner(model, num_seqs=2, max_len=16).step(ids)
    model.build_rope_tables(16)
    assert all(rope.table is not None for rope in model._ropes_by_kind.values())
    got = PagedRunner(model, num_seqs=2, max_len=16).step(ids)
    for s in ids:
        assert torch.equal(got[s], want[s])
    # the steps above did read the tables: zeroed, they zero q and k (uniform attention).
    # (Not NaN: torch's CPU SDPA returns zeros for NaN queries.)
    for rope in model._ropes_by_kind.values():
        rope.table.zero_()
    zeroed = PagedRunner(model, num_seqs=2, max_len=16).step(ids)
    for s in ids:
        assert (zeroed[s] - want[s]).abs().max() > 1e-2 * want[s].abs().max()
