"""llamapy against llama.cpp on the real models: teacher-forced top-1 agreement, KL
divergence, perplexity, and greedy continuations.

The references in data/fidelity-<alias>.npz come from llama.cpp itself
(scripts/make_fidelity_refs.py, which documents the format and prints the exact KL and
llama.cpp's agreement with itself). Targets (the fidelity issue): top-1 >= 99%, mean
KL <= 0.01 nats, perplexity within 0.5%, greedy identical for >= 4 of 5 prompts.

Top-1 >= 99% is not met on these quantized models, and cannot be by an exact implementation
(nor is greedy 4/5 on either model, nor perplexity within 0.5% on Gemma without the VNNI
CPU kernels: see the xfails):
llama.cpp's CPU matmuls quantize activations to 8 bits (Q8_0/Q8_K) for quantized weights,
so near-ties flip. llama.cpp does not reach it against itself either (one llama_decode of
512 tokens vs one token at a time: the figures in each file's meta), and llamapy run in
float64 gives llamapy's float32 logits back (KL ~1e-11). Each unmet target is an explicit
strict xfail with the measured figures, so it turns red the day it is met; separate floors
(and the near-tie check on greedy divergences) catch regressions.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
import torch

from llamapy.api import LLM
from llamapy.engine.scoring import (
    PerplexityStats,
    chunk_for_perplexity,
    kl_divergence_topk,
    score_tokens,
    token_nll,
)
from llamapy.kernels.cpu import vnni
from llamapy.sampling.params import SamplingParams

pytestmark = [pytest.mark.models, pytest.mark.slow]

DATA = Path(__file__).parent / "data"
FIXTURES = {"smollm2-135m": "smollm2_path", "gemma3-270m": "gemma3_path"}

TOP1_TARGET = 0.99
KL_TARGET = 0.01  # nats, mean over positions
PPL_REL_TARGET = 0.005
GREEDY_TARGET = 4  # of 5 prompts identical over 32 tokens
# Regression floor for top-1, below llama.cpp's self-agreement (n_batch 512 vs 1; meta).
TOP1_FLOOR = 0.93
PPL_REL_FLOOR = 0.01
# A greedy step where llama.cpp's log-probs of its token and ours differ by less than this
# is a near-tie that its 8-bit activation rounding can flip (its self-disagreement flips
# top-1 at margins of this size).
NEAR_TIE = 0.5


@dataclass(frozen=True, slots=True)
class Fidelity:
    model: str
    top1: float
    kl_topk: float  # top-K estimate (a lower bound of the exact KL; see kl_divergence_topk)
    ppl_ref: float
    ppl_ours: float
    greedy_same: int
    greedy_total: int
    greedy_margins: list[float | None]  # llama.cpp's log-prob margin at each first divergence
    meta: dict

    @property
    def ppl_rel(self) -> float:
        return self.ppl_ours / self.ppl_ref - 1.0

    def __str__(self) -> str:
        m = self.meta["measured"]
        return (
            f"{self.model}: top-1 {self.top1:.2%}, KL top-{self.meta['top_k']} estimate "
            f"{self.kl_topk:.5f}, PPL llama.cpp {self.ppl_ref:.4f} llamapy {self.ppl_ours:.4f} "
            f"({self.ppl_rel:+.3%}), greedy identical {self.greedy_same}/{self.greedy_total} "
            f"(llama.cpp margins at divergences {self.greedy_margins}); "
            f"llama.cpp vs itself (n_batch 512 vs 1): top-1 {m['llama_cpp_self_top1']:.2%}, "
            f"KL {m['llama_cpp_self_kl']:.5f}"
        )


def _teacher_forced(llm: LLM, refs, meta: dict) -> tuple[float, float, PerplexityStats]:
    """(top-1 agreement, mean top-K KL, llamapy's perplexity stats) over the stored chunks;
    one chunk's logits at a time (Gemma's are 512 x 262144 floats)."""
    n_ctx, first = meta["n_ctx"], meta["n_ctx"] // 2
    tokens = refs["tokens"].tolist()
    agree = kl_sum = 0.0
    stats = PerplexityStats()
    for c in range(meta["n_chunks"]):
        ids = chunk_for_perplexity(tokens, c, n_ctx, meta["bos_id"])
        logits = score_tokens(llm, ids, batch_size=meta["llama_cpp_n_batch"])  # (n_ctx, V)
        top_ids = torch.from_numpy(refs["topk_ids"][c])
        top_lps = torch.from_numpy(refs["topk_logprobs"][c].astype(np.float32))
        agree += (logits.argmax(-1) == top_ids[:, 0]).sum().item()
        kl_sum += kl_divergence_topk(top_ids, top_lps, logits).sum().item()
        stats.add(token_nll(logits[first : n_ctx - 1], torch.tensor(ids[first + 1 :])))
    n = meta["n_chunks"] * n_ctx
    return agree / n, kl_sum / n, stats


def _greedy(llm: LLM, refs) -> tuple[int, int, list[float | None]]:
    """(identical continuations, prompts, margins): at the first step where llamapy's argmax
    differs from llama.cpp's, llama.cpp's log-prob of its own token minus that of ours
    (inf when ours is outside llama.cpp's stored top tokens)."""
    offsets = refs["greedy_prompt_offsets"].tolist()
    flat = refs["greedy_prompt_ids"].tolist()
    prompts = [flat[a:b] for a, b in zip(offsets[:-1], offsets[1:], strict=True)]
    expected = refs["greedy_ids"].tolist()  # llama.cpp's raw argmax, past any EOG
    eog = llm.tokenizer.eog_ids
    params = SamplingParams(temperature=0.0, max_tokens=len(expected[0]))
    outs = [_until_eog(o.token_ids, eog) for o in llm.generate(prompts, params)]
    margins: list[float | None] = []
    for p, (ours, ref) in enumerate(zip(outs, expected, strict=True)):
        ref_cut = _until_eog(ref, eog)
        if ours == ref_cut:
            margins.append(None)
            continue
        d = next((i for i, (a, b) in enumerate(zip(ours, ref_cut)) if a != b), None)  # noqa: B905
        d = min(len(ours), len(ref_cut)) if d is None else d
        ids = refs["greedy_topk_ids"][p, d].tolist()
        top = dict(zip(ids, refs["greedy_topk_logprobs"][p, d].astype(float).tolist(), strict=True))
        best_eog = max((top.get(t, -np.inf) for t in eog), default=-np.inf)
        theirs = top[ref[d]] if d < len(ref_cut) else best_eog
        margins.append(theirs - (top.get(ours[d], -np.inf) if d < len(ours) else best_eog))
    return sum(m is None for m in margins), len(prompts), margins


def _until_eog(ids: list[int], eog: frozenset[int]) -> list[int]:
    """The tokens before the first end-of-generation token (llamapy stops there)."""
    return next((ids[:i] for i, t in enumerate(ids) if t in eog), list(ids))


@pytest.fixture(scope="module")
def fidelity(request) -> Fidelity:
    return _measure(request, cpu_kernels=None)


@pytest.fixture(scope="module")
def fidelity_ggml(request) -> Fidelity:
    """The same figures with LLAMAPY_CPU_KERNELS=ggml (llama.cpp's CPU roundings emulated)."""
    return _measure(request, cpu_kernels="ggml")


# torch's thread count as the process started (read at collection, before any test can
# change it): the figures are the default configuration's. On an AMX host Gemma 3's figures
# depend on it (its Q6_K ffn_down on int4pack prefills through oneDNN's bf16 GEMM): at one
# thread its perplexity is -0.69% against -0.40% at two (one CI run measured it at one,
# after some earlier test had left torch at one thread); LLAMAPY_CPU_VNNI_Q6K=1 (integer
# dots, the same at any thread count) gives -0.10%.
DEFAULT_THREADS = torch.get_num_threads()


def _measure(request, cpu_kernels: str | None) -> Fidelity:
    threads = torch.get_num_threads()
    torch.set_num_threads(DEFAULT_THREADS)
    try:
        return _measure_at_default_threads(request, cpu_kernels)
    finally:
        torch.set_num_threads(threads)


def _measure_at_default_threads(request, cpu_kernels: str | None) -> Fidelity:
    alias = request.param
    path = request.getfixturevalue(FIXTURES[alias])
    with np.load(DATA / f"fidelity-{alias}.npz") as f:
        refs = {k: f[k] for k in f.files}
    meta = json.loads(str(refs["meta"]))
    # the default path as users get it: the fast kernels decode through the native step
    # where it runs (models/cpu_step.py: SmolLM2 on VNNI hosts), else the compiled one
    # (models/cpu_compile.py; the test suite otherwise compiles nothing, see conftest.py)
    with mock.patch.dict(os.environ, {"LLAMAPY_CPU_COMPILE": "1"}):
        llm = LLM(str(path), n_ctx=meta["n_ctx"], cpu_kernels=cpu_kernels)
    top1, kl, stats = _teacher_forced(llm, refs, meta)
    # The stored perplexity is the one the stored target log-probs give.
    ref_stats = PerplexityStats()
    ref_stats.add(-torch.from_numpy(refs["target_logprobs"][:, meta["n_ctx"] // 2 :]).flatten())
    assert ref_stats.ppl == pytest.approx(float(refs["ppl"]), rel=1e-5)
    same, total, margins = _greedy(llm, refs)
    name = alias if cpu_kernels is None else f"{alias} [{cpu_kernels}]"
    result = Fidelity(name, top1, kl, float(refs["ppl"]), stats.ppl, same, total, margins, meta)
    print(result)
    return result


def _models(xfail: dict[str, str], strict: bool = True) -> list:
    """The models, those in `xfail` as xfails (strict unless told) with the reason given."""
    return [
        pytest.param(a, marks=pytest.mark.xfail(strict=strict, reason=xfail[a]))
        if a in xfail
        else a
        for a in FIXTURES
    ]


@pytest.mark.parametrize("fidelity", list(FIXTURES), indirect=True)
def test_kl_divergence(fidelity: Fidelity) -> None:
    """Mean KL(llama.cpp || llamapy), estimated from llama.cpp's top-K plus the lumped tail."""
    assert fidelity.kl_topk <= KL_TARGET, str(fidelity)


# Measured on the default CPU path. With the VNNI kernels (kernels/cpu/vnni.py: 8-bit x for
# Q4_0 / Q4_1 / Q5_0 / Q5_1 / Q8_0 / Q4_K weights, as llama.cpp) both models are within the
# target: SmolLM2 +0.36% (EPYC host) / -0.24% (AMX host), Gemma 3 -0.28% (EPYC) / -0.40%
# (AMX; -0.10% with LLAMAPY_CPU_VNNI_Q6K=1). Without them (int4pack:
# bf16 activations and scales, bf16 weights in the prefill GEMMs) Gemma 3 is not; the float32
# reference path (LLAMAPY_CPU_KERNELS=reference) gives -0.40% (SmolLM2) and -0.58% (Gemma 3).
PPL_XFAIL = {}
if not vnni.available():
    PPL_XFAIL["gemma3-270m"] = (
        "measured -0.59% (llama.cpp 17.088, llamapy 16.988 over 512 tokens) on the int4pack "
        "CPU path (-0.28% with the VNNI kernels, -0.58% on the float32 reference path): "
        "within the 8-bit activation noise of llama.cpp, which moves by as much between its "
        "own n_batch 512 and 1"
    )


@pytest.mark.parametrize("fidelity", _models(PPL_XFAIL), indirect=True)
def test_perplexity_within_half_percent(fidelity: Fidelity) -> None:
    assert abs(fidelity.ppl_rel) <= PPL_REL_TARGET, str(fidelity)


@pytest.mark.parametrize("fidelity", list(FIXTURES), indirect=True)
def test_perplexity_floor(fidelity: Fidelity) -> None:
    """Not the target: a regression guard at about 2.5x llama.cpp's self-difference."""
    assert abs(fidelity.ppl_rel) <= PPL_REL_FLOOR, str(fidelity)


GREEDY_XFAIL = {
    "smollm2-135m": "measured 1/5 identical (SmolLM2 Q4_1, fast CPU path, with the VNNI "
    "kernels as with int4pack, on an EPYC host; with the float16 KV cache, the default "
    "since the thirty-second session, as with the float32 one before it (0/5 there in that "
    "session); 3/5 on an AMX host with the compiled decode step, 0/5 there with the native "
    "one, which is as close to llama.cpp teacher-forced one token at a time: KL 0.0035 / "
    "0.0036, top-1 97.5% / 98.4% over 512 tokens; 2/5 on the float32 reference path): the "
    "divergences fall where llama.cpp's own log-prob margin between the two tokens is "
    "0.06-0.33 nats, inside its 8-bit activation noise (it flips 2.4% of top-1s against "
    "itself, n_batch 512 vs 1)",
    "gemma3-270m": "measured 2/5 identical on an EPYC host with the float16 KV cache (the "
    "default since the thirty-second session), 3/5 with the float32 one (Gemma 3 Q4_K_M, "
    "fast CPU path with the VNNI kernels, on an EPYC and on an AMX host; 1/5 there with "
    "LLAMAPY_CPU_VNNI_Q6K=1; 2/5 with int4pack, 3/5 on the float32 reference path), "
    "divergences at llama.cpp margins of 0.03-0.44 nats; llama.cpp agrees with itself "
    "(prompt batched vs one token at a time) on only 3/5 of these prompts",
}


@pytest.mark.parametrize("fidelity", _models(GREEDY_XFAIL), indirect=True)
def test_greedy_continuations(fidelity: Fidelity) -> None:
    assert fidelity.greedy_same >= GREEDY_TARGET, str(fidelity)


@pytest.mark.parametrize("fidelity", list(FIXTURES), indirect=True)
def test_greedy_diverges_only_at_near_ties(fidelity: Fidelity) -> None:
    """Where a continuation differs, llama.cpp itself nearly tied the two tokens."""
    assert all(m is None or m <= NEAR_TIE for m in fidelity.greedy_margins), str(fidelity)


@pytest.mark.parametrize("fidelity", list(FIXTURES), indirect=True)
def test_top1_agreement_floor(fidelity: Fidelity) -> None:
    """Not the target (see below): a regression guard under llama.cpp's self-agreement."""
    assert fidelity.top1 >= TOP1_FLOOR, str(fidelity)


TOP1_XFAIL = (
    "top-1 >= 99% is unreachable against quantized llama.cpp: its matmuls quantize "
    "activations to 8 bits, and it does not agree with itself (n_batch 512 vs 1) either "
    "(figures in the reference meta); llamapy measured 98.0% (SmolLM2) and 96.1% (Gemma 3) on "
    "the fast CPU path with the VNNI kernels and its default float16 KV cache (97.9% and "
    "96.3% with a float32 one; 96.6% and 96.3% with int4pack; 97.5% and 96.1% "
    "on the float32 reference path), llama.cpp vs itself 97.6% and 95.4%; llamapy in float64 "
    "agrees with llamapy 100%"
)


@pytest.mark.parametrize("fidelity", _models(dict.fromkeys(FIXTURES, TOP1_XFAIL)), indirect=True)
def test_top1_agreement_target(fidelity: Fidelity) -> None:
    assert fidelity.top1 >= TOP1_TARGET, str(fidelity)


# -- LLAMAPY_CPU_KERNELS=ggml: llama.cpp's CPU roundings emulated ------------------------------
# (kernels/cpu/ggml_numerics.py: 8-bit matmul activations per weight type with Q8_1's fp16 sum,
# F16 K/V/Q and attention probabilities, the fp16 GELU table). The same targets, not loosened.
# Each emulated step equals llama.cpp's own intermediate tensors to float32 summation order,
# but quantized activations are discontinuous: a last-bit difference in a float32 sum flips an
# 8-bit rounding, and through attention that reaches every later token. llamapy in this mode
# against itself, with only its matmul sums changed from float32 to float64, agrees at top-1
# 97.36%, KL 3.6e-3 (SmolLM2) - as llama.cpp against itself (n_batch 512 vs 1: 97.56%,
# 3.3e-3). Meeting these needs ggml's exact SIMD summation order in every kernel, not just
# its roundings (benchmarks/kernels/CPU_NOTES.md, "ggml numerics").
GGML_CHAOS = (
    "emulating llama.cpp's roundings does not reach it while float32 summation order differs: "
    "see the comment above"
)
GGML_TOP1_XFAIL = {
    "smollm2-135m": f"measured 97.27% in ggml mode ({GGML_CHAOS})",
    "gemma3-270m": f"measured 96.78% in ggml mode ({GGML_CHAOS})",
}
GGML_GREEDY_XFAIL = {
    "smollm2-135m": "measured 2/5 identical in ggml mode, divergences at llama.cpp margins of "
    f"0.06-0.33 nats ({GGML_CHAOS})",
    "gemma3-270m": "measured 2/5 identical in ggml mode, divergences at llama.cpp margins of "
    f"0.03-0.09 nats ({GGML_CHAOS})",
}
# Not strict: which side of 0.5% this lands on depends on the host CPU's GEMM kernels (oneDNN
# picks AMX tiles where the CPU has them, another summation order): -0.80% on an AVX512-BF16
# host, +0.23% on an AMX host (same code, 2026-11-25 and -26).
GGML_PPL_XFAIL = {
    "gemma3-270m": "measured -0.80% in ggml mode on an AVX512-BF16 host (llama.cpp 17.088, "
    "llamapy 16.952), +0.23% on an AMX host; the default path is within 0.5% on both: "
    f"perplexity moves by this much with summation order alone ({GGML_CHAOS})",
}


@pytest.mark.parametrize("fidelity_ggml", list(FIXTURES), indirect=True)
def test_ggml_kl_divergence(fidelity_ggml: Fidelity) -> None:
    assert fidelity_ggml.kl_topk <= KL_TARGET, str(fidelity_ggml)


@pytest.mark.parametrize("fidelity_ggml", _models(GGML_PPL_XFAIL, strict=False), indirect=True)
def test_ggml_perplexity_within_half_percent(fidelity_ggml: Fidelity) -> None:
    assert abs(fidelity_ggml.ppl_rel) <= PPL_REL_TARGET, str(fidelity_ggml)


@pytest.mark.parametrize("fidelity_ggml", _models(GGML_GREEDY_XFAIL), indirect=True)
def test_ggml_greedy_continuations(fidelity_ggml: Fidelity) -> None:
    assert fidelity_ggml.greedy_same >= GREEDY_TARGET, str(fidelity_ggml)


@pytest.mark.parametrize("fidelity_ggml", list(FIXTURES), indirect=True)
def test_ggml_greedy_diverges_only_at_near_ties(fidelity_ggml: Fidelity) -> None:
    m = fidelity_ggml.greedy_margins
    assert all(x is None or x <= NEAR_TIE for x in m), str(fidelity_ggml)


@pytest.mark.parametrize("fidelity_ggml", list(FIXTURES), indirect=True)
def test_ggml_top1_agreement_floor(fidelity_ggml: Fidelity) -> None:
    """Not the target: a regression guard (an emulation bug drops far below it)."""
    assert fidelity_ggml.top1 >= TOP1_FLOOR, str(fidelity_ggml)


@pytest.mark.parametrize("fidelity_ggml", _models(GGML_TOP1_XFAIL), indirect=True)
def test_ggml_top1_agreement_target(fidelity_ggml: Fidelity) -> None:
    assert fidelity_ggml.top1 >= TOP1_TARGET, str(fidelity_ggml)
