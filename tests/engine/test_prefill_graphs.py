"""Prefill steps replayed from CUDA graphs (engine/prefill_graphs.py).

On the CPU: the buckets cover every step size, and the packed int32 inputs say what the
eager step's `ModelRunner.prepare` says (ids, positions, slots, lengths, query starts, block
tables, sampled rows), padded as the module promises. On a GPU: every prefill or mixed step
of an engine run gives the eager step's logits, and whole generations equal the eager ones
(random-weight tiny model: any difference is a bug in the graph inputs or padding).
"""

from __future__ import annotations

import random
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from llamapy.engine.block_manager import BlockManager
from llamapy.engine.model_runner import ModelRunner
from llamapy.engine.prefill_graphs import (
    MAX_TOKENS,
    MIN_TOKENS,
    Layout,
    pack_inputs,
    seq_buckets,
    token_buckets,
)
from llamapy.engine.scheduler import ScheduledSeq
from llamapy.engine.sequence import Sequence

BLOCK = 16


@pytest.mark.parametrize("max_tokens", [1, 16, 100, 512, 600, 2048, 8192])
def test_token_buckets_cover_every_step(max_tokens: int) -> None:
    buckets = token_buckets(max_tokens)
    assert buckets == sorted(set(buckets)) and buckets[0] == MIN_TOKENS
    assert buckets[-1] == max(MIN_TOKENS, min(max_tokens, MAX_TOKENS))
    for n in range(1, buckets[-1] + 1):
        t = next(b for b in buckets if b >= n)
        assert t <= max(MIN_TOKENS, 2 * n - 1 if n <= 512 else n + 255)


@pytest.mark.parametrize("max_seqs", [1, 3, 8, 256])
def test_seq_buckets(max_seqs: int) -> None:
    buckets = seq_buckets(max_seqs)
    assert buckets[0] == 1 and buckets[-1] == max_seqs and buckets == sorted(set(buckets))


def _random_batch(rng: random.Random, manager: BlockManager, n_seqs: int) -> list[ScheduledSeq]:
    """Sequences with some tokens already computed, scattered block tables, chunks of
    various sizes (a decode token, a prompt chunk, a whole prompt), some not at their end."""
    free = list(range(manager.num_blocks))
    rng.shuffle(free)
    batch = []
    for _ in range(n_seqs):
        length = rng.randint(1, 70)
        seq = Sequence([rng.randrange(1000) for _ in range(length)], max_new_tokens=4)
        seq.num_computed_tokens = rng.randint(0, length - 1)
        new = rng.randint(1, length - seq.num_computed_tokens)
        seq.block_table = [free.pop() for _ in range(-(-length // BLOCK))]
        batch.append(ScheduledSeq(seq, new))
    return batch


@pytest.mark.parametrize("seed", range(5))
def test_pack_inputs_matches_prepare(seed: int) -> None:
    rng = random.Random(seed)
    manager = BlockManager(64, BLOCK, enable_prefix_caching=False)
    batch = _random_batch(rng, manager, rng.randint(1, 6))
    runner = SimpleNamespace(device=torch.device("cpu"))
    ids, positions, meta, sample_rows = ModelRunner.prepare(runner, batch, manager)
    n_tokens, n_seqs = len(ids) + rng.randint(0, 20), len(batch) + rng.randint(0, 3)
    layout = Layout(max_tokens=n_tokens + 5, max_seqs=n_seqs + 2, max_blocks=6)
    scratch = 64
    host = np.full(layout.width, -7, dtype=np.int32)  # poisoned
    n_sampled = pack_inputs(host, layout, batch, BLOCK, scratch, n_tokens, n_seqs)

    def field(offset: int, n: int) -> list[int]:
        return host[offset : offset + n].tolist()

    real, pad = len(ids), n_tokens - len(ids)
    assert field(layout.ids, n_tokens) == ids.tolist() + [0] * pad
    assert field(layout.positions, n_tokens) == positions.tolist() + [0] * pad
    assert field(layout.slots, n_tokens) == meta.slot_mapping.tolist() + [scratch * BLOCK] * pad
    extra = n_seqs - len(batch)
    assert field(layout.seq_lens, n_seqs) == meta.seq_lens.tolist() + [1] * extra
    starts = meta.query_start_loc.tolist()
    assert field(layout.query_start, n_seqs + 1) == starts + [real] * extra
    assert n_sampled == len(sample_rows)
    assert field(layout.sample_rows, n_sampled) == sample_rows
    assert field(layout.sample_rows + n_sampled, n_seqs - n_sampled) == [0] * (n_seqs - n_sampled)
    tables = host[layout.tables : layout.tables + n_seqs * 6].reshape(n_seqs, 6)
    for b, item in enumerate(batch):
        width = len(item.seq.block_table)
        assert tables[b, :width].tolist() == item.seq.block_table
        assert (tables[b, width:] == scratch).all()
    assert (tables[len(batch) :] == scratch).all()


# -- GPU --------------------------------------------------------------------------------------

gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")


def _engine(path, graphs: bool, **overrides):
    from llamapy.engine.llm_engine import EngineConfig, LLMEngine
    from llamapy.formats import open_model_file
    from llamapy.tokenizer import Tokenizer

    opts = {"max_model_len": 256, "max_num_seqs": 4, "max_num_batched_tokens": 48}
    cfg = EngineConfig(device="cuda", cuda_graphs=graphs, **{**opts, **overrides})
    return LLMEngine(open_model_file(path), Tokenizer.from_path(path), cfg)


def _run(engine, prompts, params, late: int = 2) -> list[list[int]]:
    """Generate; the last `late` prompts join after a few steps (mixed prefill + decode)."""
    ids = [engine.add_request(p, params) for p in prompts[: len(prompts) - late]]
    tokens: dict[str, list[int]] = {}
    steps = 0
    while engine.has_unfinished_requests() or len(ids) < len(prompts):
        if steps == 3:
            ids += [engine.add_request(p, params) for p in prompts[len(prompts) - late :]]
        for out in engine.step():
            tokens.setdefault(out.request_id, []).extend(out.token_ids)
        steps += 1
    return [tokens[i] for i in ids]


PROMPTS = [[1, 5, 9], [2, 7, 3, 3, 8] * 13, [4], [6, 1] * 30, [3] * 17]


@gpu
def test_every_graph_prefill_step_matches_eager_logits(tiny_gguf) -> None:
    from llamapy.sampling.params import SamplingParams

    engine = _engine(tiny_gguf, True)
    runner, model = engine.runner, engine.runner.model
    checked = []
    run = runner.run

    def checked_run(batch, manager):
        if not runner.graphs.fits(batch) and runner.prefill_graphs.fits(batch):
            with torch.inference_mode():
                ids, pos, meta, rows = runner.prepare(batch, manager)
                hidden = model(ids, pos, meta, runner.kv_caches)
                eager = model.compute_logits(hidden[rows]).float()
                graph = runner.prefill_graphs.run(batch).float()
            assert graph.shape == eager.shape
            assert torch.isfinite(graph).all()
            torch.testing.assert_close(graph, eager, rtol=1e-3, atol=1e-3)
            checked.append(sum(it.num_new_tokens for it in batch))
        return run(batch, manager)

    runner.run = checked_run
    _run(engine, PROMPTS, SamplingParams.greedy(max_tokens=12, ignore_eos=True))
    assert len(checked) >= 4, checked  # chunked prompts, mixed steps
    assert len(runner.prefill_graphs.graphs) >= 2


@gpu
def test_graph_prefill_generations_equal_eager(tiny_gguf) -> None:
    from llamapy.sampling.params import SamplingParams

    for params in (
        SamplingParams.greedy(max_tokens=16, ignore_eos=True),
        SamplingParams(temperature=0.8, seed=11, max_tokens=16, ignore_eos=True),
    ):
        with_graphs = _engine(tiny_gguf, True)
        got = _run(with_graphs, PROMPTS, params)
        assert with_graphs.runner.prefill_graphs.graphs
        assert got == _run(_engine(tiny_gguf, False), PROMPTS, params)
