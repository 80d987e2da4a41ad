"""The Python API end to end on the default model (few tokens each: the CPU path is slow)."""

from __future__ import annotations

import dataclasses
import errno

import pytest
import torch

from llamapy import ContextLengthError
from llamapy.api import LLM
from llamapy.errors import InsufficientMemoryError
from llamapy.sampling.params import SamplingParams

pytestmark = pytest.mark.models


@pytest.fixture(scope="module")
def llm(smollm2_path) -> LLM:
    return LLM(smollm2_path, n_ctx=256)


def test_greedy_is_deterministic_and_batched_equals_alone(llm: LLM) -> None:
    prompts = ["The capital of France is", "1, 2, 3, 4,", "Once upon a time"]
    params = SamplingParams.greedy(max_tokens=6)
    together = llm.generate(prompts, params)
    alone = [llm.generate(p, params)[0] for p in prompts]
    assert [o.token_ids for o in together] == [o.token_ids for o in alone]
    assert all(o.finish_reason == "length" and len(o.token_ids) == 6 for o in together)
    assert together[1].text.startswith(" 5")


def test_seed_reproduces_sampling(llm: LLM) -> None:
    p = SamplingParams(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, max_tokens=8, seed=1234)
    a = llm.generate("Tell me a story", p)[0]
    b = llm.generate("Tell me a story", p)[0]
    assert a.token_ids == b.token_ids
    others = {
        tuple(llm.generate("Tell me a story", dataclasses.replace(p, seed=s))[0].token_ids)
        for s in range(3)
    }
    assert len(others) > 1


def test_stop_string_is_not_returned(llm: LLM) -> None:
    free = llm.generate("1, 2, 3, 4,", SamplingParams.greedy(max_tokens=8))[0]
    assert " 6" in free.text
    out = llm.generate("1, 2, 3, 4,", SamplingParams.greedy(max_tokens=8, stop=(" 6",)))[0]
    assert out.finish_reason == "stop"
    assert out.text == free.text[: free.text.index(" 6")]


def test_stream_concatenates_to_generate(llm: LLM) -> None:
    params = SamplingParams.greedy(max_tokens=6)
    pieces = list(llm.stream("The sky is", params))
    assert "".join(p.text for p in pieces) == llm.generate("The sky is", params)[0].text
    assert pieces[-1].finish_reason == "length"
    assert pieces[-1].usage is not None and pieces[-1].usage.completion_tokens == 6


def test_chat_uses_template_and_stops_at_end_of_turn(llm: LLM) -> None:
    out = llm.chat([{"role": "user", "content": "Say hi."}], SamplingParams.greedy(max_tokens=40))
    assert out.text.strip()
    assert "<|im_end|>" not in out.text
    if out.finish_reason == "stop":
        assert llm.tokenizer.is_eog(out.token_ids[-1])


def test_prompt_longer_than_context_is_refused(llm: LLM) -> None:
    with pytest.raises(ContextLengthError, match="context holds 256"):
        llm.generate("word " * 400, SamplingParams.greedy(max_tokens=1))


def test_generation_stops_at_context_limit(smollm2_path) -> None:
    small = LLM(smollm2_path, n_ctx=48)
    ids = small.tokenize("hello " * 40)
    out = small.generate([ids], SamplingParams.greedy(max_tokens=1000, ignore_eos=True))[0]
    assert out.finish_reason == "length"
    assert len(ids) + len(out.token_ids) == 48


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"n_threads": 0}, "n_threads"),
        ({"device": "tpu"}, "device"),
        ({"n_ctx": -1}, "n_ctx must be an integer >= 0"),
        ({"n_ctx": "512"}, "n_ctx must be an integer >= 0"),
        ({"async_scheduling": "yes"}, "async_scheduling"),
        ({"kv_cache_dtype": "q8_0"}, "KV cache type must be one of f32, f16, bf16"),
    ],
)
def test_bad_options(smollm2_path, kwargs, match) -> None:
    with pytest.raises(ValueError, match=match):
        LLM(smollm2_path, **kwargs)


def test_no_memory_for_the_context_is_a_clear_error(smollm2_path, monkeypatch) -> None:
    """As an mmap of a huge KV cache fails (`llamapy run -c 999999999` printed a traceback)."""

    def no_memory(*args, **kwargs):
        raise OSError(errno.ENOMEM, "Cannot allocate memory")

    monkeypatch.setattr("llamapy.api.LLMEngine", no_memory)
    with pytest.raises(InsufficientMemoryError, match="context of 100000 tokens.*lower the"):
        LLM(smollm2_path, n_ctx=100_000)


def test_a_kv_cache_beyond_the_machine_is_refused_first(smollm2_path) -> None:
    """A context whose KV cache exceeds the machine's RAM is refused before anything is
    allocated (`-c 999999999` spent ~9 GB and 24 s building block tables first; a larger one
    met the OOM killer)."""
    with pytest.raises(InsufficientMemoryError, match=r"KV cache of a 20000000000-token .*-c"):
        LLM(smollm2_path, n_ctx=20_000_000_000)


def test_n_ctx_zero_is_the_models_context(smollm2_path) -> None:
    """As llama.cpp's `-c 0` and llama-cpp-python's `n_ctx=0`."""
    whole = LLM(smollm2_path, n_ctx=0)
    assert whole.n_ctx == whole.config.context_length == 8192


def test_bad_token_ids_are_refused(llm: LLM) -> None:
    with pytest.raises(ValueError, match="outside the vocabulary"):
        llm.generate([[1, 2, 10**7]], SamplingParams.greedy(max_tokens=1))
    with pytest.raises(ValueError, match="logit_bias token id"):
        llm.generate("hi", SamplingParams.greedy(max_tokens=1, logit_bias={10**7: 1.0}))


def test_logit_bias_bans_a_token(llm: LLM) -> None:
    free = llm.generate("1, 2, 3, 4,", SamplingParams.greedy(max_tokens=1))[0]
    banned = free.token_ids[0]
    out = llm.generate(
        "1, 2, 3, 4,", SamplingParams.greedy(max_tokens=1, logit_bias={banned: float("-inf")})
    )[0]
    assert out.token_ids[0] != banned


def test_max_tokens_zero_finishes_at_once(llm: LLM) -> None:
    zero, one = llm.generate(
        ["hi", "there"],
        [SamplingParams.greedy(max_tokens=0), SamplingParams.greedy(max_tokens=1)],
    )
    assert (zero.text, zero.token_ids, zero.finish_reason) == ("", [], "length")
    assert zero.usage.prompt_tokens == len(zero.prompt_token_ids)
    assert len(one.token_ids) == 1


def test_float16_kv_cache(smollm2_path) -> None:
    """kv_cache_dtype="f16" (`-ctk f16`, the default): the engine's caches are float16, the
    native decode step takes them, and greedy decoding keeps the float32 cache's first
    tokens. (At the fifth token of this prompt the two caches pick different tokens, and
    so does llama.cpp between its own F16 and F32 caches: the test below, where
    llama-cpp-python is installed; the kernels' errors are bounded in
    tests/kernels/test_cpu_decode_attention.py and tests/models/test_cpu_step.py.)"""
    half = LLM(smollm2_path, n_ctx=256, kv_cache_dtype="float16")
    runner = half.engine.runner
    assert {k.dtype for k, v in runner.kv_caches} == {torch.float16}
    assert {v.dtype for k, v in runner.kv_caches} == {torch.float16}
    assert runner.model.native_decode is not None
    params = SamplingParams.greedy(max_tokens=4)
    prompt = "The capital of France is"
    assert LLM(smollm2_path, n_ctx=256).engine.runner.kv_caches[0][0].dtype == torch.float16
    want = LLM(smollm2_path, n_ctx=256, kv_cache_dtype="f32").generate(prompt, params)[0]
    got = half.generate(prompt, params)[0]
    assert got.token_ids == want.token_ids


@pytest.mark.parametrize(("ctk", "ggml_type"), [("f16", 1), ("f32", 0)])
def test_cache_types_follow_llama_cpps(smollm2_path, ctk: str, ggml_type: int) -> None:
    """Greedy continuations with each KV cache type against llama.cpp's with the same type
    (GGML_TYPE_F16 = 1, F32 = 0): 12 tokens of this prompt, where the two types part at the
    fifth in both engines."""
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed")
    ref = llama_cpp.Llama(
        str(smollm2_path), n_ctx=256, n_threads=2, verbose=False, type_k=ggml_type,
        type_v=ggml_type,
    )  # fmt: skip
    prompt = "The capital of France is"
    ids = ref.tokenize(prompt.encode(), add_bos=True)
    want = []
    for token in ref.generate(ids, temp=0.0, top_k=1):
        want.append(token)
        if len(want) == 12:
            break
    llm = LLM(smollm2_path, n_ctx=256, kv_cache_dtype=ctk)
    got = llm.generate(prompt, SamplingParams.greedy(max_tokens=12, ignore_eos=True))[0]
    assert got.prompt_token_ids == ids
    assert got.token_ids == want


def test_scoring_takes_the_llms_cache_type(smollm2_path, monkeypatch) -> None:
    """Teacher-forced scoring (perplexity) fills a fresh cache of the LLM's type (`-ctk`),
    float32 for a bare model."""
    from llamapy.engine import scoring

    seen = []
    real = scoring.allocate_kv_cache

    def recording(cfg, num_blocks, block_size, dtype, device):
        seen.append(dtype)
        return real(cfg, num_blocks, block_size, dtype, device)

    monkeypatch.setattr(scoring, "allocate_kv_cache", recording)
    ids = list(range(100, 120))
    for ctk, dtype in ((None, torch.float16), ("f32", torch.float32), ("bf16", torch.bfloat16)):
        llm = LLM(smollm2_path, n_ctx=64, kv_cache_dtype=ctk)
        logits = scoring.score_tokens(llm, ids, batch_size=8)
        assert seen[-1] == dtype and logits.shape[0] == len(ids)
    scoring.score_tokens(llm.engine.runner.model, ids, batch_size=8)
    assert seen[-1] == torch.float32
