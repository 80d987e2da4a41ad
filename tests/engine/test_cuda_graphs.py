"""Decode steps replayed from CUDA graphs give what the same engine computes eagerly (GPU only;
random-weight tiny model, so any difference is a bug in the graph inputs, padding or the
greedy pick inside the graph, not a near tie of a real model)."""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")


def _generate_each(
    path, prompts, params_list, async_on: bool, graphs: bool = True, max_model_len: int = 256
):
    """Generations, each prompt with its params, with or without async scheduling and
    graphs, and a count of the steps launched async."""
    from llamapy.engine.llm_engine import EngineConfig, LLMEngine
    from llamapy.formats import open_model_file
    from llamapy.tokenizer import Tokenizer

    cfg = EngineConfig(
        max_model_len=max_model_len,
        max_num_seqs=4,
        device="cuda",
        async_scheduling=async_on,
        cuda_graphs=graphs,
    )
    engine = LLMEngine(open_model_file(path), Tokenizer.from_path(path), cfg)
    ids = [engine.add_request(p, q) for p, q in zip(prompts, params_list, strict=True)]
    tokens: dict[str, list[int]] = {i: [] for i in ids}
    launched = 0
    while engine.has_unfinished_requests():
        for out in engine.step():
            tokens[out.request_id] += out.token_ids
        launched += engine._pending is not None
    if graphs:
        assert engine.runner.graphs.graphs, "no decode step was replayed from a graph"
    return [tokens[i] for i in ids], launched


def _generate(path, graphs: bool, prompts, params):
    """Synchronous generations, every prompt with the same params."""
    return _generate_each(path, prompts, [params] * len(prompts), False, graphs)[0]


def test_graph_decode_matches_eager(tiny_gguf, monkeypatch) -> None:
    from llamapy.kernels.triton import qmatmul
    from llamapy.sampling.params import SamplingParams

    # The prompts' prefill runs padded to a token bucket with graphs (64 rows: the float16
    # dequantize + cuBLAS path) and at its own 44 rows eagerly (the TF32 GEMM): other
    # roundings, which flip this random model's near-ties. Same path both ways here, so the
    # comparison is of the decode graphs alone (prefill graphs: test_prefill_graphs.py).
    monkeypatch.setattr(qmatmul, "DEQUANT_MM_MIN_M", 1 << 30)

    # 3 sequences: a padded bucket of 4; one prompt long enough to span several KV blocks
    prompts = [[1, 5, 9], [2, 7, 3, 3, 8] * 8, [4]]
    greedy = SamplingParams.greedy(max_tokens=24, ignore_eos=True)
    assert _generate(tiny_gguf, True, prompts, greedy) == _generate(
        tiny_gguf, False, prompts, greedy
    )
    # async scheduling: the ids of a step gathered inside the graph from the one before;
    # lengths differ, so steps run with sequences finished while a step was in flight
    # (the decode kernels compute each row alone, so the steps' other rows do not matter)
    ragged = [SamplingParams.greedy(max_tokens=n, ignore_eos=True) for n in (5, 24, 13)]
    got, launched = _generate_each(tiny_gguf, prompts, ragged, async_on=True)
    assert launched > 10, "no decode step was launched async"
    assert got == _generate_each(tiny_gguf, prompts, ragged, async_on=False)[0]
    got, launched = _generate_each(tiny_gguf, prompts, ragged, async_on=True, graphs=False)
    assert launched > 10, "no eager decode step was launched async"
    assert got == _generate_each(tiny_gguf, prompts, ragged, async_on=False, graphs=False)[0]
    # seeded sampling async: the sampler on the graph's logits, its picks the next ids
    # (ignore_eos: every sequence runs its length, whatever this random model's EOS odds)
    hot = [
        SamplingParams(temperature=1.2, seed=s, max_tokens=n, ignore_eos=True)
        for s, n in ((1, 9), (2, 24), (3, 17))
    ]
    got, launched = _generate_each(tiny_gguf, prompts, hot, async_on=True)
    assert launched > 10, "no sampled decode step was launched async"
    assert got == _generate_each(tiny_gguf, prompts, hot, async_on=False)[0]
    seeded = SamplingParams(temperature=0.8, seed=7, max_tokens=24, ignore_eos=True)
    assert _generate(tiny_gguf, True, prompts, seeded) == _generate(
        tiny_gguf, False, prompts, seeded
    )


@pytest.mark.skipif(
    not torch.cuda.is_available() or torch.cuda.get_device_capability() < (9, 0),
    reason="PDL needs a Hopper (sm_90) or newer GPU",
)
def test_decode_with_pdl_matches_pdl_off(tiny_gguf, monkeypatch) -> None:
    """Whole decode steps (rope + cache write, paged attention, fused GEMVs, graphs, async
    scheduling) launched with programmatic dependent launch: the same greedy tokens as
    without it (kernels/triton/pdl.py)."""
    from llamapy.sampling.params import SamplingParams

    prompts = [[1, 5, 9], [2, 7, 3, 3, 8] * 8, [4]]
    params = [SamplingParams.greedy(max_tokens=n, ignore_eos=True) for n in (7, 32, 19)]
    got = {}
    for on in ("0", "1"):
        monkeypatch.setenv("LLAMAPY_PDL", on)
        got[on] = _generate_each(tiny_gguf, prompts, params, async_on=True)[0]
    assert got["1"] == got["0"]


def test_graphs_follow_context_length_splits(tiny_gguf, monkeypatch) -> None:
    """A batch that fills the SMs splits its keys by its longest sequence's length: graphs of
    1, 2 and 4 splits are captured as the sequences grow, and the tokens are the eager
    engine's (here on a pretend one-SM GPU and 16 keys a split, so a tiny batch crosses
    every split count within a few dozen tokens)."""
    from llamapy.engine import model_runner
    from llamapy.kernels.triton import qmatmul
    from llamapy.sampling.params import SamplingParams

    monkeypatch.setattr(qmatmul, "DEQUANT_MM_MIN_M", 1 << 30)  # as above: decode graphs alone
    monkeypatch.setattr(model_runner, "SPLIT_MIN_KEYS", 16)
    rule, seen = model_runner.graph_decode_splits, set()

    def one_sm(bs, num_kv_heads, max_len=None, num_sms=132):
        splits = rule(bs, num_kv_heads, max_len, num_sms=1)
        seen.add(splits)
        return splits

    monkeypatch.setattr(model_runner, "graph_decode_splits", one_sm)
    prompts = [[1, 5, 9], [4], [2, 7]]
    greedy = SamplingParams.greedy(max_tokens=40, ignore_eos=True)
    assert _generate(tiny_gguf, True, prompts, greedy) == _generate(
        tiny_gguf, False, prompts, greedy
    )
    assert {1, 2, 4} <= seen, f"split counts used: {sorted(seen)}"


def test_one_sequence_splits_long_contexts(tmp_path, rng, monkeypatch) -> None:
    """A single sequence's decode graphs split its keys past 512 up to 256 ways, one 16-key
    tile a split (`graph_decode_splits`): graphs of 64, 128 and 256 splits are captured as
    two long prompts decode, and the tokens are the eager engine's (its kernel's own split
    rule)."""
    from tests.gguf_factory import write_tiny_llama

    from llamapy.engine import model_runner
    from llamapy.kernels.triton import qmatmul
    from llamapy.sampling.params import SamplingParams

    monkeypatch.setattr(qmatmul, "DEQUANT_MM_MIN_M", 1 << 30)  # as above: decode graphs alone
    path = write_tiny_llama(tmp_path / "long.gguf", rng=rng, context_length=2304,
                            matrix_scale=0.125)  # fmt: skip
    rule, seen = model_runner.graph_decode_splits, set()

    def counted(bs, num_kv_heads, max_len=None, num_sms=132):
        splits = rule(bs, num_kv_heads, max_len, num_sms)
        seen.add(splits)
        return splits

    monkeypatch.setattr(model_runner, "graph_decode_splits", counted)
    greedy = SamplingParams.greedy(max_tokens=24, ignore_eos=True)
    for n in (1010, 2100):  # 1011-1034 keys: 64 then 128 splits; 2101-2124: 256
        prompt = [rng.integers(0, 32, n).tolist()]
        got = _generate_each(path, prompt, [greedy], False, True, max_model_len=2200)[0]
        want = _generate_each(path, prompt, [greedy], False, False, max_model_len=2200)[0]
        assert got == want
    assert {64, 128, 256} <= seen, f"split counts used: {sorted(seen)}"
