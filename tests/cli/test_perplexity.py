"""`llamapy perplexity` and the teacher-forced scoring under it (llamapy.engine.scoring).

The method is checked two ways: against a numpy transcription of llama.cpp's
`perplexity()` (tools/perplexity/perplexity.cpp) over logits from one forward pass per chunk,
and end to end against llama.cpp itself (llama-cpp-python) on the real SmolLM2.
"""

from __future__ import annotations

import json
import math
import re
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from llamapy.cli.main import main as cli_main
from llamapy.engine.scoring import (
    PerplexityStats,
    kl_divergence,
    kl_divergence_topk,
    perplexity,
    score_tokens,
)
from llamapy.formats import open_model_file
from llamapy.models import build_causal_lm


def main(argv: list[str]) -> int:
    return cli_main(["perplexity", *argv])


@pytest.fixture
def tiny_model(tiny_gguf: Path):
    return build_causal_lm(open_model_file(tiny_gguf))


def llama_cpp_perplexity(chunk_logits: list[np.ndarray], chunks: list[list[int]]):
    """perplexity.cpp's arithmetic: score positions n_ctx/2 .. n_ctx-2 of each chunk; sums
    of nll and nll^2 in double; stderr = ppl * sqrt((E[nll^2] - E[nll]^2) / (count - 1))."""
    nll = nll2 = 0.0
    count = 0
    for logits, ids in zip(chunk_logits, chunks, strict=True):
        n_ctx = len(ids)
        for i in range(n_ctx // 2, n_ctx - 1):
            row = logits[i].astype(np.float32)
            max_logit = row.max()
            sum_exp = float(np.exp(row - max_logit, dtype=np.float32).astype(np.float64).sum())
            v = -(float(row[ids[i + 1]] - max_logit) - math.log(sum_exp))
            nll, nll2, count = nll + v, nll2 + v * v, count + 1
    nll, nll2 = nll / count, nll2 / count
    ppl = math.exp(nll)
    return ppl, ppl * math.sqrt((nll2 - nll * nll) / (count - 1)), count


def _assert_close(a: torch.Tensor, b: torch.Tensor) -> None:
    """Equal up to float32 summation order (random weights give logits of large scale).

    Measured over 36 comparisons of prefill batch sizes 1/7/16 vs 64 on fresh tiny models:
    max |diff| / max |logit| has median 6e-6 and reached 4.5e-5 (BLAS picks other kernels
    for other shapes), so 2e-4 of the logit scale is the bound; a real batching bug (a lost
    prefix, a shifted position) moves logits by a sizeable fraction of that scale."""
    torch.testing.assert_close(a, b, rtol=1e-4, atol=2e-4 * float(b.abs().max()))


def test_score_tokens_is_batch_invariant(tiny_model, rng) -> None:
    ids = rng.integers(0, 32, size=45).tolist()
    whole = score_tokens(tiny_model, ids, batch_size=64)
    assert whole.shape == (45, 32) and whole.dtype == torch.float32
    for batch_size in (1, 7, 16):
        _assert_close(score_tokens(tiny_model, ids, batch_size=batch_size), whole)
    tail = score_tokens(tiny_model, ids, batch_size=7, logits_from=30)
    _assert_close(tail, whole[30:])


def test_score_tokens_is_causal(tiny_model, rng) -> None:
    """Changing token k changes no logits before position k."""
    ids = rng.integers(0, 32, size=24).tolist()
    other = list(ids)
    other[15] = (ids[15] + 1) % 32
    a, b = score_tokens(tiny_model, ids, batch_size=5), score_tokens(tiny_model, other)
    _assert_close(a[:15], b[:15])
    assert not torch.allclose(a[15:], b[15:])


@pytest.mark.parametrize(("n_ctx", "batch_size"), [(16, 16), (16, 5), (10, 3)])
def test_perplexity_matches_llama_cpp_arithmetic(tiny_model, rng, n_ctx, batch_size) -> None:
    tokens = rng.integers(3, 32, size=3 * n_ctx + 5).tolist()
    seen: list[float] = []
    stats = perplexity(
        tiny_model,
        tokens,
        n_ctx=n_ctx,
        n_chunks=3,
        bos_id=1,
        batch_size=batch_size,
        on_chunk=lambda i, s: seen.append(s.ppl),
    )
    chunks = [[1, *tokens[c * n_ctx + 1 : (c + 1) * n_ctx]] for c in range(3)]
    logits = [score_tokens(tiny_model, c, batch_size=n_ctx).numpy() for c in chunks]
    ppl, stderr, count = llama_cpp_perplexity(logits, chunks)
    assert stats.count == count == 3 * (n_ctx - n_ctx // 2 - 1)
    # Random weights give logits in the hundreds; prefill batches change float32 summation
    # order, so compare mean NLLs to 2e-4 nats (a wrong position would be off by nats).
    assert stats.nll_mean == pytest.approx(math.log(ppl), abs=2e-4)
    assert stats.ppl_stderr == pytest.approx(stderr, rel=2e-3)
    assert len(seen) == 3 and seen[-1] == stats.ppl
    first_chunk = llama_cpp_perplexity(logits[:1], chunks[:1])[0]
    assert math.log(seen[0]) == pytest.approx(math.log(first_chunk), abs=2e-4)


def test_perplexity_stats_edge_cases() -> None:
    s = PerplexityStats()
    assert math.isnan(s.ppl_stderr)
    s.add(torch.tensor([0.5, 0.5]))  # zero variance: llama.cpp prints an error, no stderr
    assert s.ppl == pytest.approx(math.exp(0.5)) and math.isnan(s.ppl_stderr)


def test_kl_topk_is_exact_with_full_k_and_a_lower_bound_below(rng) -> None:
    ref = torch.from_numpy(rng.standard_normal((6, 50)) * 3)
    ours = ref + torch.from_numpy(rng.standard_normal((6, 50)) * 0.3)
    exact = kl_divergence(ref, ours)
    logp = torch.log_softmax(ref, -1)
    full = logp.topk(50, -1)
    torch.testing.assert_close(kl_divergence_topk(full.indices, full.values, ours), exact)
    top = logp.topk(8, -1)
    est = kl_divergence_topk(top.indices, top.values, ours)
    assert torch.all(est <= exact + 1e-12) and torch.all(est >= 0)


# -- the command -------------------------------------------------------------------------


def _one_line_error(capsys, code: int, message: str) -> None:
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert message in err[-1] and "Traceback" not in "\n".join(err), err


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["-c", "2"], "--ctx-size must be >= 4"),
        (["-b", "0"], "--batch-size must be > 0"),
        (["--chunks", "0"], "--chunks must be -1 or > 0"),
    ],
)
def test_bad_flags(tmp_path: Path, capsys, flags, message) -> None:
    text = tmp_path / "t.txt"
    text.write_text("hello")
    _one_line_error(capsys, main(["-f", str(text), *flags]), message)


def test_missing_file_is_one_line_error(capsys) -> None:
    _one_line_error(capsys, main(["-f", "/no/such/file.txt"]), "cannot read /no/such/file.txt")


def test_too_short_file(tmp_path: Path, tiny_gguf: Path, capsys) -> None:
    text = tmp_path / "short.txt"
    text.write_text("hello")
    code = main(["-m", str(tiny_gguf), "-f", str(text), "-c", "8"])
    _one_line_error(capsys, code, "you need at least 16 tokens")


def _reference_text() -> str:
    from pydoc_data.topics import topics

    return "\n\n".join(topics[k] for k in sorted(topics)[:3])


@pytest.mark.models
def test_perplexity_matches_llama_cpp_on_smollm2(smollm2_path: Path, tmp_path, capsys) -> None:
    llama_cpp = pytest.importorskip("llama_cpp")
    n_ctx, n_chunks = 64, 2  # each forward dequantizes every weight: keep them few
    text_file = tmp_path / "text.txt"
    text_file.write_text(_reference_text())
    argv = ["-m", str(smollm2_path), "-f", str(text_file), "-c", str(n_ctx), "-t", "2"]
    assert main([*argv, "--chunks", str(n_chunks), "--json"]) == 0
    got = json.loads(capsys.readouterr().out)

    lm = llama_cpp.Llama(
        model_path=str(smollm2_path), n_ctx=n_ctx, n_batch=n_ctx, logits_all=True, verbose=False
    )
    tokens = lm.tokenize(text_file.read_bytes(), add_bos=True, special=False)
    add_bos = llama_cpp.llama_vocab_get_add_bos(llama_cpp.llama_model_get_vocab(lm.model))
    chunks, logits = [], []
    for c in range(n_chunks):
        ids = tokens[c * n_ctx : (c + 1) * n_ctx]
        ids[0] = lm.token_bos() if add_bos else ids[0]
        lm.reset()
        lm.eval(ids)
        chunks.append(ids)
        logits.append(np.array(lm.scores[:n_ctx]))
    ppl, stderr, count = llama_cpp_perplexity(logits, chunks)
    assert got["n_tokens"] == len(tokens) and got["n_chunks"] == n_chunks
    assert got["n_tokens_scored"] == count == n_chunks * (n_ctx // 2 - 1)
    # SmolLM2 is Q4_1: llama.cpp quantizes activations to 8 bits in its matmuls, we do not.
    assert got["ppl"] == pytest.approx(ppl, rel=0.01), (got["ppl"], ppl)
    assert got["ppl_stderr"] == pytest.approx(stderr, rel=0.05)
    assert got["nll_mean"] == pytest.approx(math.log(got["ppl"]))

    # The text output: llama.cpp's running line, then the final estimate.
    assert main([*argv, "--chunks", "2"]) == 0
    out = capsys.readouterr().out
    assert re.fullmatch(r"\[1\]\d+\.\d{4},\[2\]\d+\.\d{4},\n", out.splitlines(True)[0])
    assert re.fullmatch(r"Final estimate: PPL = \d+\.\d{4} \+/- \d+\.\d{5}", out.splitlines()[1])


if __name__ == "__main__":
    raise SystemExit(pytest.main([__file__, *sys.argv[1:]]))
