"""Decode steps replayed from CUDA graphs give what the same engine computes eagerly (GPU only;
random-weight tiny model, so any difference is a bug in the graph inputs, padding or the
greedy pick inside the graph, not a near tie of a real model)."""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")


def _generate(path, graphs: bool, prompts, params):
    from llamapy.engine.llm_engine import EngineConfig, LLMEngine
    from llamapy.formats import open_model_file
    from llamapy.tokenizer import Tokenizer

    cfg = EngineConfig(max_model_len=256, max_num_seqs=4, device="cuda", cuda_graphs=graphs)
    engine = LLMEngine(open_model_file(path), Tokenizer.from_path(path), cfg)
    ids = [engine.add_request(p, params) for p in prompts]
    tokens: dict[str, list[int]] = {i: [] for i in ids}
    while engine.has_unfinished_requests():
        for out in engine.step():
            tokens[out.request_id] += out.token_ids
    if graphs:
        assert engine.runner.graphs.graphs, "no decode step was replayed from a graph"
    return [tokens[i] for i in ids]


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
    seeded = SamplingParams(temperature=0.8, seed=7, max_tokens=24, ignore_eos=True)
    assert _generate(tiny_gguf, True, prompts, seeded) == _generate(
        tiny_gguf, False, prompts, seeded
    )
