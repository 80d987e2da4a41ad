"""Async scheduling (a greedy decode step launched before the previous step's tokens are read
back) gives what the synchronous engine gives: the same tokens, text, finish reasons and
usage, request by request, whatever finishes a sequence while its next step is in flight.

On the CPU the launched step runs eagerly (`ModelRunner.launch` without graphs), so this is
a test of the engine's bookkeeping: PENDING tokens, late outputs, discarded steps, the fall
back to synchronous steps. The CUDA-graph side (the id gather inside the graph) is checked
against the same synchronous engine in test_cuda_graphs.py."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from llamapy.engine.llm_engine import EngineConfig, LLMEngine
from llamapy.engine.model_runner import ModelRunner
from llamapy.engine.sequence import PENDING
from llamapy.formats import open_model_file
from llamapy.sampling.params import SamplingParams
from llamapy.tokenizer import Tokenizer


@dataclass
class Result:
    tokens: list[int]
    text: str
    reason: str | None
    usage: tuple[int, int, int]  # prompt, output, cached tokens of the final output


def _engine(path, async_on: bool, **overrides) -> LLMEngine:
    cfg = dict(
        max_model_len=128, max_num_seqs=4, kv_cache_tokens=1024, device="cpu", cpu_compile=False
    )
    cfg.update(overrides)
    config = EngineConfig(async_scheduling=async_on, **cfg)
    return LLMEngine(open_model_file(path), Tokenizer.from_path(path), config)


def _run(
    engine: LLMEngine,
    requests,
    later=None,
    *,
    later_at: int = 3,
    abort_at: dict[int, str] | None = None,
):
    """Run to completion; `later` requests are added after step `later_at`, `abort_at`
    {step: request id} aborts a request before that step. Results by request id."""
    results: dict[str, Result] = {}

    def add(prompt, params, rid):
        engine.add_request(prompt, params, request_id=rid)
        results[rid] = Result([], "", None, (0, 0, 0))

    for rid, (prompt, params) in requests.items():
        add(prompt, params, rid)
    steps = 0
    while engine.has_unfinished_requests():
        if steps == later_at:
            for rid, (prompt, params) in (later or {}).items():
                add(prompt, params, rid)
        if abort_at and steps in abort_at:
            engine.abort_request(abort_at[steps])
        for out in engine.step():
            r = results[out.request_id]
            assert r.reason is None, f"{out.request_id}: output after it finished"
            assert PENDING not in out.token_ids
            r.tokens += out.token_ids
            r.text += out.text
            r.reason = out.finish_reason
            r.usage = (out.num_prompt_tokens, out.num_output_tokens, out.num_cached_tokens)
        steps += 1
        assert steps < 1000, "the engine does not finish"
    return results


def _count_launches(engine: LLMEngine, monkeypatch) -> list[int]:
    calls = [0]
    launch = engine.runner.launch

    def counted(*args, **kwargs):
        calls[0] += 1
        return launch(*args, **kwargs)

    monkeypatch.setattr(engine.runner, "launch", counted)
    return calls


def _both(path, monkeypatch, requests, later=None, later_at=3, **kw):
    """(sync results, async results, async launches)."""
    sync = _run(_engine(path, False, **kw), requests, later, later_at=later_at)
    engine = _engine(path, True, **kw)
    calls = _count_launches(engine, monkeypatch)
    return sync, _run(engine, requests, later, later_at=later_at), calls[0]


def test_default_is_async_on_cuda_only(tiny_gguf) -> None:
    assert _engine(tiny_gguf, None).async_scheduling is False  # CPU: nothing to overlap
    with pytest.raises(ValueError, match="async_scheduling"):
        EngineConfig(async_scheduling="yes")


def test_greedy_lengths_and_admission(tiny_gguf, monkeypatch) -> None:
    # different lengths (a sequence finishes while the others' next step is in flight),
    # requests admitted mid-way (the pending step is read back before their prefill), a
    # context limit reached (finish reason length at max_model_len)
    greedy = SamplingParams.greedy
    requests = {
        "a": ([1, 5, 9], greedy(max_tokens=3, ignore_eos=True)),
        "b": ([2, 7, 3, 3, 8] * 8, greedy(max_tokens=17, ignore_eos=True)),
        "c": ([4], greedy(max_tokens=30, ignore_eos=True)),
    }
    later = {
        "d": ([6, 6, 1], greedy(max_tokens=9, ignore_eos=True)),
        "e": ([3] * 50, greedy(ignore_eos=True)),  # runs into the 64-token context
    }
    sync, got, launches = _both(tiny_gguf, monkeypatch, requests, later, max_model_len=64)
    assert got == sync
    assert sync["e"].reason == "length" and sync["e"].usage[:2] == (50, 14)
    assert [len(sync[r].tokens) for r in "abcd"] == [3, 17, 30, 9]
    assert launches >= 20, "decode steps did not run async"


def test_stop_strings_and_prefix_cache(tiny_gguf, monkeypatch) -> None:
    # a stop string met while the next step runs: that step's token is discarded; the
    # prompts share a prefix, so blocks computed in async steps are hashed into the prefix
    # cache (their tokens must be the real ones) and reused by the later request
    prompt = [2, 7, 3, 3, 8, 1] * 6
    greedy = SamplingParams.greedy
    free = _run(_engine(tiny_gguf, False), {"x": (prompt, greedy(max_tokens=24, ignore_eos=True))})
    text = free["x"].text
    stop = text[len(text) // 2 : len(text) // 2 + 5]
    params = greedy(max_tokens=24, stop=[stop], ignore_eos=True)
    requests = {
        "a": (prompt, params),
        "b": ([5, 5], SamplingParams.greedy(max_tokens=20)),
        "f": (prompt, greedy(max_tokens=24, ignore_eos=True)),
    }
    # added once "f" has computed 48 tokens: its third block (4 prompt tokens, 12 generated)
    # is cached
    later = {"c": (prompt + free["x"].tokens[:12] + [4], SamplingParams.greedy(max_tokens=6))}
    sync, got, launches = _both(tiny_gguf, monkeypatch, requests, later, later_at=16)
    assert got == sync
    assert sync["f"].tokens == free["x"].tokens
    assert sync["a"].reason == "stop" and stop not in sync["a"].text
    assert sync["c"].usage[2] == 48, "the later request did not find the generated block"
    assert launches > 0


def test_seeded_sampling_async(tiny_gguf, monkeypatch) -> None:
    # sampled rows (temperature, top-k/p, min-p, logit bias) run async too: the sampler on
    # the launched step's logits, each row's uniform drawn from its own generator at launch
    requests = {
        "greedy": ([1, 2, 3], SamplingParams.greedy(max_tokens=25, ignore_eos=True)),
        "hot": ([3, 2], SamplingParams(temperature=1.5, seed=3, max_tokens=20, ignore_eos=True)),
        "biased": ([3, 2], SamplingParams(seed=11, logit_bias={4: 3.0}, max_tokens=12)),
        "min_p": ([7], SamplingParams(temperature=0.7, min_p=0.2, seed=5, max_tokens=16)),
    }
    sync, got, launches = _both(tiny_gguf, monkeypatch, requests)
    assert got == sync
    assert len(set(map(tuple, (sync["hot"].tokens, sync["greedy"].tokens)))) == 2
    assert launches >= 15


def test_host_history_samplers_fall_back_to_sync_steps(tiny_gguf, monkeypatch) -> None:
    # a penalty reads the token history on the host: while it runs, steps are synchronous;
    # once it finishes, the others go async
    requests = {
        "greedy": ([1, 2, 3], SamplingParams.greedy(max_tokens=25, ignore_eos=True)),
        "sampled": ([3, 2], SamplingParams(temperature=0.9, seed=3, max_tokens=20)),
        "penalty": ([5], SamplingParams.greedy(max_tokens=6, repeat_penalty=1.3, ignore_eos=True)),
    }
    sync, got, launches = _both(tiny_gguf, monkeypatch, requests)
    assert got == sync
    # 24 decode steps for "greedy"; the 5 while "penalty" decodes are synchronous
    assert 0 < launches <= 24 - 5


def test_tight_cache_preemption(tiny_gguf, monkeypatch) -> None:
    # 4 blocks of 16 for three growing sequences: preemption and recompute, which async
    # scheduling avoids by reading the pending tokens back first (too few free blocks)
    greedy = SamplingParams.greedy
    requests = {
        "a": ([1, 5, 9] * 4, greedy(max_tokens=14, ignore_eos=True)),
        "b": ([2, 7] * 5, greedy(max_tokens=20, ignore_eos=True)),
        "c": ([4, 4, 4], greedy(max_tokens=25, ignore_eos=True)),
    }
    kw = dict(max_model_len=64, kv_cache_tokens=64)
    sync_engine = _engine(tiny_gguf, False, **kw)
    sync = _run(sync_engine, requests)
    engine = _engine(tiny_gguf, True, **kw)
    calls = _count_launches(engine, monkeypatch)
    assert _run(engine, requests) == sync
    assert sync_engine.scheduler.num_preemptions > 0 and engine.scheduler.num_preemptions > 0
    assert calls[0] > 0


def test_abort_with_a_step_in_flight(tiny_gguf, monkeypatch) -> None:
    greedy = SamplingParams.greedy(max_tokens=20, ignore_eos=True)
    requests = {"a": ([1, 5], greedy), "b": ([2, 6], greedy), "c": ([3, 7], greedy)}
    engine = _engine(tiny_gguf, True)
    calls = _count_launches(engine, monkeypatch)
    got = _run(engine, requests, abort_at={5: "b"})
    sync = _run(_engine(tiny_gguf, False), requests)
    assert calls[0] > 0
    assert got["a"] == sync["a"] and got["c"] == sync["c"]
    assert got["b"].reason is None and got["b"].tokens == sync["b"].tokens[: len(got["b"].tokens)]
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks


def test_end_of_generation_token(smollm2_path, monkeypatch) -> None:
    # a real model's answer ends on its end-of-generation token while a step is in flight
    tok = Tokenizer.from_path(smollm2_path)
    text = (
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging "
        "Face<|im_end|>\n<|im_start|>user\nSay hello.<|im_end|>\n<|im_start|>assistant\n"
    )
    prompt = tok.encode(text, parse_special=True)
    requests = {
        "eog": (prompt, SamplingParams.greedy(max_tokens=60)),
        "long": (prompt, SamplingParams.greedy(max_tokens=40, ignore_eos=True)),
    }
    kw = dict(max_model_len=256, enable_prefix_caching=False)
    sync, got, launches = _both(smollm2_path, monkeypatch, requests, **kw)
    assert got == sync
    assert sync["eog"].reason == "stop" and len(sync["eog"].tokens) < 60
    assert launches > 0


def test_fill_decode_inputs_layout() -> None:
    np = pytest.importorskip("numpy")
    from llamapy.engine.block_manager import BlockManager
    from llamapy.engine.model_runner import _FIELDS, fill_decode_inputs
    from llamapy.engine.scheduler import ScheduledSeq
    from llamapy.engine.sequence import Sequence

    bm = BlockManager(16, 4, enable_prefix_caching=False)
    seqs = []
    for prompt, outs in (([1, 2, 3, 4, 5], [9]), ([7], [PENDING]), ([3, 3], [])):
        seq = Sequence(prompt, 10, SamplingParams.greedy(ignore_eos=bool(outs)))
        seq.output_token_ids = list(outs)
        bm.allocate(seq, len(seq))
        seq.num_computed_tokens = len(seq) - 1
        seqs.append(seq)
    cap, width, bs, scratch = 8, 3, 4, 15
    host = np.full(_FIELDS * cap + cap * width, 12345, dtype=np.int32)
    fill_decode_inputs(host, [ScheduledSeq(s, 1) for s in seqs], bm, cap, width, bs, scratch,
                       [-1, 0, -1])  # fmt: skip
    field = host[: _FIELDS * cap].reshape(_FIELDS, cap)[:, :bs]
    tables = host[_FIELDS * cap :].reshape(cap, width)[:bs]
    assert field[0, :3].tolist() == [9, 0, 3]  # ids (PENDING: taken from the source row)
    assert field[1, :3].tolist() == [5, 1, 1]  # positions
    slots = [bm.slot(s, s.num_computed_tokens) for s in seqs] + [scratch * 4]
    assert field[2].tolist() == slots
    assert field[3].tolist() == [6, 2, 2, 1]  # lengths; padded rows 1
    assert field[4, :3].tolist() == [1, 1, 0]  # ban end-of-generation (ignore_eos)
    assert field[5].tolist() == [-1, 0, -1, -1]
    for row, seq in enumerate(seqs):
        n = len(seq.block_table)
        assert tables[row, :n].tolist() == seq.block_table
        assert (tables[row, n:] == scratch).all()
    assert (tables[3] == scratch).all()


def test_runner_can_launch_one_sampled_token(tiny_gguf) -> None:
    from llamapy.engine.model_runner import launchable, plain_greedy
    from llamapy.engine.scheduler import ScheduledSeq
    from llamapy.engine.sequence import Sequence

    engine = _engine(tiny_gguf, True)
    runner: ModelRunner = engine.runner
    seq = Sequence([1, 2, 3], 5, SamplingParams.greedy())
    assert not runner.can_launch([ScheduledSeq(seq, 1)])  # not at its last token
    assert not runner.can_launch([ScheduledSeq(seq, 3)])  # a prompt
    seq.num_computed_tokens = 2
    assert runner.can_launch([ScheduledSeq(seq, 1)])
    # the engine's per-request checks
    assert plain_greedy(SamplingParams.greedy(ignore_eos=True, stop=["x"]))
    for params in (SamplingParams(temperature=0.7), SamplingParams.greedy(logit_bias={3: 1.0})):
        assert launchable(params) and not plain_greedy(params), params
    for params in (
        SamplingParams.greedy(repeat_penalty=1.2),
        SamplingParams(presence_penalty=0.5),
        SamplingParams(dry_multiplier=0.8),
        SamplingParams(mirostat=2),
        SamplingParams.greedy(n_probs=2),
        SamplingParams.greedy(grammar='root ::= "a"'),
    ):
        assert not launchable(params) and not plain_greedy(params), params
