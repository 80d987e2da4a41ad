#!/usr/bin/env python
"""Write llama.cpp's teacher-forced log-probs, perplexity and greedy continuations for the
real test models to tests/models/data/, and print how llamapy compares.

CI compares llamapy against these files (tests/models/test_fidelity.py), so it does not
need llama.cpp. Regenerate with llama-cpp-python installed:

    python scripts/make_fidelity_refs.py smollm2-135m gemma3-270m

Text: the first topics of CPython's `Lib/pydoc_data/topics.py` (the Python Language
Reference, Python Software Foundation License Version 2), tokenized by llama.cpp with BOS as
`llama-perplexity` does. The token ids are stored, so the test does not depend on the local
Python's text.

Each `fidelity-<alias>.npz` holds, for two perplexity chunks of N_CTX tokens (first token
replaced by BOS when the model adds one, each evaluated in one llama_decode of 512):
  tokens (2*N_CTX,) int32, topk_ids / topk_logprobs (2, N_CTX, K) int32 / float16 (llama.cpp's
  top-K log-probs at every position), target_logprobs (2, N_CTX - 1) float32 (the log-prob of
  the actual next token), ppl / ppl_stderr (llama-perplexity's estimate over those chunks),
  greedy_prompt_ids / greedy_prompt_offsets / greedy_ids (5 raw prompts, 32 argmax tokens
  each from llama.cpp's logits), greedy_topk_ids / greedy_topk_logprobs (5, 32, 16)
  (llama.cpp's top log-probs at each of those steps, to tell near-ties), and meta (JSON:
  sources, versions, figures measured here).

Printed, besides the table: llama.cpp's agreement with itself (n_batch 512 vs 1), the exact
KL (both full distributions are here) next to the top-K estimate the test can compute, and a
float64 control (llamapy with float64 activations and KV cache).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "tests" / "models" / "data"

N_CTX = 512  # llama-perplexity's default context
N_CHUNKS = 2
TOP_K = 128
N_THREADS = 2  # llamapy's torch threads
# llama.cpp's threads: its results do not depend on the count, and one thread avoids its
# spinning barriers stalling on a busy 2-core machine (token-by-token passes took minutes).
LLAMA_CPP_THREADS = 1
TEXT_CHARS = 16_000  # comfortably more than N_CHUNKS * N_CTX tokens for both vocabularies
GREEDY_TOKENS = 32
GREEDY_TOP_K = 16  # llama.cpp's top log-probs at each greedy step
GREEDY_PROMPTS = (
    "The capital of France is",
    "def fibonacci(n):\n",
    "Once upon a time, in a small village by the sea,",
    "The three primary colors are",
    "Water boils at a temperature of",
)


def reference_text() -> tuple[str, dict]:
    """Whole topics of the Language Reference, in key order, until TEXT_CHARS characters."""
    from pydoc_data.topics import topics

    keys, parts, size = [], [], 0
    for key in sorted(topics):
        keys.append(key)
        parts.append(topics[key])
        size += len(topics[key]) + 2
        if size >= TEXT_CHARS:
            break
    source = {
        "file": "CPython Lib/pydoc_data/topics.py (The Python Language Reference)",
        "license": "Python Software Foundation License Version 2",
        "python": platform.python_version(),
        "topics": keys,
    }
    return "\n\n".join(parts), source


# -- llama.cpp ---------------------------------------------------------------------------


def llama_cpp_model(path: Path, n_batch: int, *, logits_all: bool = True):
    import llama_cpp

    return llama_cpp.Llama(
        model_path=str(path),
        n_ctx=N_CTX,
        n_batch=n_batch,
        n_ubatch=n_batch,
        n_threads=LLAMA_CPP_THREADS,
        n_threads_batch=LLAMA_CPP_THREADS,
        logits_all=logits_all,
        verbose=False,
    )


def llama_cpp_logits(lm, ids: list[int]) -> torch.Tensor:
    """Teacher-forced logits (len(ids), V) of one chunk on an empty KV cache."""
    lm.reset()
    lm.eval(ids)
    return torch.from_numpy(np.array(lm.scores[: len(ids)], dtype=np.float32))


def llama_cpp_greedy(lm, prompt_ids: list[int], n: int) -> tuple[list[int], list[np.ndarray]]:
    """argmax decoding from llama.cpp's last-row logits (no sampler in the way), and the
    log-probs of each step. `lm` is made without logits_all, so each llama_decode outputs
    its last row only, as in llama-cli; the prompt goes in batches of lm.n_batch."""
    n_vocab = lm.n_vocab()
    out: list[int] = []
    logprobs: list[np.ndarray] = []
    lm.reset()
    batch = list(prompt_ids)
    for _ in range(n):
        lm.eval(batch)
        logits = np.ctypeslib.as_array(lm._ctx.get_logits_ith(-1), shape=(n_vocab,))
        logprobs.append(torch.log_softmax(torch.from_numpy(logits.copy()).double(), -1).numpy())
        batch = [int(np.argmax(logits))]
        out.append(batch[0])
    return out, logprobs


def dequantized_copy(src: Path, dst: Path) -> Path:
    """The GGUF at `src` with every tensor dequantized to F32 (gguf-py's dequantizers)."""
    import gguf

    reader = gguf.GGUFReader(src)
    arch = reader.fields["general.architecture"].contents()
    writer = gguf.GGUFWriter(str(dst), arch)
    for kv in reader.fields.values():
        if kv.name.startswith("GGUF.") or kv.name == "general.architecture":
            continue
        vtype = kv.types[0]
        sub = kv.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(kv.name, kv.contents(), vtype, sub_type=sub)
    for t in reader.tensors:
        writer.add_tensor(t.name, gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return dst


# -- comparisons -------------------------------------------------------------------------


@dataclass
class Row:
    model: str
    top1: float = 0.0
    kl_exact: float = 0.0
    kl_topk: float = 0.0
    ppl_ref: float = 0.0
    ppl_ours: float = 0.0
    greedy_same: int = 0
    extra: dict = field(default_factory=dict)

    @property
    def ppl_rel(self) -> float:
        return self.ppl_ours / self.ppl_ref - 1.0


def chunk_ppl(logits: list[torch.Tensor], chunks: list[list[int]]):
    """llama-perplexity's estimate: positions first .. n_ctx-2 of each chunk predict the next
    token (first = n_ctx / 2)."""
    from llamapy.engine.scoring import PerplexityStats, token_nll

    stats = PerplexityStats()
    first = N_CTX // 2
    for lg, ids in zip(logits, chunks, strict=True):
        stats.add(token_nll(lg[first : N_CTX - 1], torch.tensor(ids[first + 1 :])))
    return stats


def agreement(ref: list[torch.Tensor], ours: list[torch.Tensor]) -> tuple[float, float]:
    """(top-1 agreement, mean exact KL(ref || ours)) over every position of every chunk."""
    from llamapy.engine.scoring import kl_divergence

    r, o = torch.cat(ref), torch.cat(ours)
    top1 = (r.argmax(-1) == o.argmax(-1)).double().mean().item()
    return top1, kl_divergence(r, o).mean().item()


def topk_refs(ref: list[torch.Tensor], chunks: list[list[int]]) -> dict[str, np.ndarray]:
    ids, lps, targets = [], [], []
    for lg, chunk in zip(ref, chunks, strict=True):
        logp = torch.log_softmax(lg.double(), dim=-1)
        top = logp.topk(TOP_K, dim=-1)
        ids.append(top.indices.int().numpy())
        lps.append(top.values.numpy().astype(np.float16))
        targets.append(logp[:-1].gather(-1, torch.tensor(chunk[1:])[:, None])[:, 0].float().numpy())
    return {
        "topk_ids": np.stack(ids),
        "topk_logprobs": np.stack(lps),
        "target_logprobs": np.stack(targets),
    }


def float64_logits(llm, chunks: list[list[int]]) -> list[torch.Tensor]:
    """Control: llamapy with the same (dequantized) weights but float64 activations and KV
    cache (norms, rope tables and the attention softmax stay float32, as the layers do)."""
    from llamapy.engine.scoring import score_tokens

    model = llm.engine.runner.model
    embed = model.embed_tokens
    model.embed_tokens = lambda ids: embed(ids).double()  # the rest follows x.dtype
    try:
        return [score_tokens(model, c, kv_dtype=torch.float64) for c in chunks]
    finally:
        del model.embed_tokens


def until_eog(ids: list[int], eog: frozenset[int]) -> list[int]:
    """The tokens before the first end-of-generation token."""
    return next((ids[:i] for i, t in enumerate(ids) if t in eog), list(ids))


def _first_diff(a: list[int], b: list[int]) -> int | None:
    """Index of the first differing token; None where the lists are equal."""
    if a == b:
        return None
    return next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), len(a))


# -- one model -----------------------------------------------------------------------------


@dataclass
class Setup:
    """What every comparison of one model file shares."""

    path: Path
    llm: object  # llamapy.api.LLM
    tokens: list[int]
    chunks: list[list[int]]
    add_bos: bool
    bos_id: int | None


def setup(path: Path, text: str) -> Setup:
    import llama_cpp

    from llamapy.api import LLM
    from llamapy.engine.scoring import chunk_for_perplexity

    vocab = llama_cpp.Llama(model_path=str(path), vocab_only=True, verbose=False)
    add_bos = bool(llama_cpp.llama_vocab_get_add_bos(llama_cpp.llama_model_get_vocab(vocab.model)))
    bos_id = vocab.token_bos() if add_bos else None
    tokens = vocab.tokenize(text.encode(), add_bos=True, special=False)  # common_tokenize
    if len(tokens) < N_CHUNKS * N_CTX:
        raise SystemExit(f"{path.name}: the text gives only {len(tokens)} tokens")
    tokens = tokens[: N_CHUNKS * N_CTX]
    chunks = [chunk_for_perplexity(tokens, c, N_CTX, bos_id) for c in range(N_CHUNKS)]
    llm = LLM(str(path), n_ctx=N_CTX, n_threads=N_THREADS)
    return Setup(path, llm, tokens, chunks, add_bos, bos_id)


def teacher_forced(s: Setup, row: Row, *, controls: bool) -> dict[str, np.ndarray]:
    """Fill the row's teacher-forced figures; return the arrays the test needs."""
    from llamapy.engine.scoring import kl_divergence_topk, score_tokens

    lm = llama_cpp_model(s.path, 512)
    ref = [llama_cpp_logits(lm, c) for c in s.chunks]
    del lm
    ours = [score_tokens(s.llm, c, batch_size=512) for c in s.chunks]
    refs = topk_refs(ref, s.chunks)
    row.top1, row.kl_exact = agreement(ref, ours)
    row.kl_topk = (
        kl_divergence_topk(  # exactly what the test computes from the stored file
            torch.from_numpy(refs["topk_ids"]).flatten(0, 1),
            torch.from_numpy(refs["topk_logprobs"].astype(np.float32)).flatten(0, 1),
            torch.cat(ours),
        )
        .mean()
        .item()
    )
    ppl_ref, ppl_ours = chunk_ppl(ref, s.chunks), chunk_ppl(ours, s.chunks)
    row.ppl_ref, row.ppl_ours = ppl_ref.ppl, ppl_ours.ppl
    refs["ppl"], refs["ppl_stderr"] = np.float64(ppl_ref.ppl), np.float64(ppl_ref.ppl_stderr)
    if not controls:
        return refs
    # llama.cpp against itself: one token per llama_decode.
    lm1 = llama_cpp_model(s.path, 1)
    ref_b1 = [llama_cpp_logits(lm1, c) for c in s.chunks]
    del lm1
    x = row.extra
    x["llama_cpp_self_top1"], x["llama_cpp_self_kl"] = agreement(ref, ref_b1)
    x["llama_cpp_self_ppl_rel"] = chunk_ppl(ref_b1, s.chunks).ppl / ppl_ref.ppl - 1
    x["llamapy_vs_b1_top1"], x["llamapy_vs_b1_kl"] = agreement(ref_b1, ours)
    f64 = float64_logits(s.llm, s.chunks)
    x["f64_vs_llama_cpp_top1"], x["f64_vs_llama_cpp_kl"] = agreement(ref, f64)
    x["f64_vs_llamapy_top1"], x["f64_vs_llamapy_kl"] = agreement(f64, ours)
    return refs


def greedy(s: Setup, row: Row, *, controls: bool) -> dict[str, np.ndarray]:
    """llama.cpp's and llamapy's argmax continuations; at each divergence, llama.cpp's
    log-prob margin between its token and ours (a near-tie when small)."""
    from llamapy.sampling.params import SamplingParams

    lm = llama_cpp_model(s.path, 512, logits_all=False)
    prompt_ids = [lm.tokenize(p.encode(), add_bos=True, special=False) for p in GREEDY_PROMPTS]
    if prompt_ids != [s.llm.tokenize(p) for p in GREEDY_PROMPTS]:
        print(f"{row.model}: prompt tokenizations differ; using llama.cpp's", file=sys.stderr)
    runs = [llama_cpp_greedy(lm, p, GREEDY_TOKENS) for p in prompt_ids]
    ref = [r[0] for r in runs]
    # Generation stops at end-of-generation in llamapy (no ignore_eos: banning EOS would
    # change the argmax); llama.cpp's raw argmax goes on, so compare up to the first EOG.
    eog = s.llm.tokenizer.eog_ids
    params = SamplingParams(temperature=0.0, max_tokens=GREEDY_TOKENS)
    ours = [until_eog(o.token_ids, eog) for o in s.llm.generate(prompt_ids, params)]
    row.greedy_same = sum(until_eog(a, eog) == b for a, b in zip(ref, ours, strict=True))
    margins = []
    for (toks, lps), mine in zip(runs, ours, strict=True):
        d = _first_diff(until_eog(toks, eog), mine)
        if d is None:
            margins.append(None)
            continue
        theirs = (
            max(lps[d][t] for t in eog) if d >= len(toks) or toks[d] in eog else lps[d][toks[d]]
        )
        alt = lps[d][mine[d]] if d < len(mine) else max(lps[d][t] for t in eog)
        margins.append((d, round(float(theirs - alt), 4)))
    row.extra["greedy_divergence_step_and_llama_cpp_margin"] = margins
    if controls:  # llama.cpp against itself: the prompt one token per llama_decode
        lm1 = llama_cpp_model(s.path, 1, logits_all=False)
        self_runs = [llama_cpp_greedy(lm1, p, GREEDY_TOKENS)[0] for p in prompt_ids]
        row.extra["llama_cpp_self_greedy_same"] = sum(
            a == b for a, b in zip(ref, self_runs, strict=True)
        )
    step_lps = torch.from_numpy(np.stack([np.stack(r[1]) for r in runs]))  # (5, 32, V)
    step_top = step_lps.topk(GREEDY_TOP_K, dim=-1)
    return {
        "greedy_topk_ids": step_top.indices.int().numpy(),
        "greedy_topk_logprobs": step_top.values.float().numpy().astype(np.float16),
        "greedy_prompt_ids": np.concatenate(prompt_ids).astype(np.int32),
        "greedy_prompt_offsets": np.cumsum([0] + [len(p) for p in prompt_ids]).astype(np.int32),
        "greedy_ids": np.asarray(ref, dtype=np.int32),
    }


def run_model(alias: str, path: Path, args: argparse.Namespace, *, write: bool) -> Row:
    import llama_cpp

    text, source = reference_text()
    s = setup(path, text)
    row = Row(alias)
    row.extra["tokenizer_agrees"] = s.llm.tokenize(text)[: len(s.tokens)] == s.tokens
    arrays = teacher_forced(s, row, controls=write)
    arrays |= greedy(s, row, controls=write)
    if not write:
        return row
    meta = {
        "model": alias,
        "model_file": path.name,
        "llama_cpp_python": llama_cpp.__version__,
        "text": source,
        "n_ctx": N_CTX,
        "n_chunks": N_CHUNKS,
        "top_k": TOP_K,
        "add_bos": s.add_bos,
        "bos_id": s.bos_id,
        "llama_cpp_n_batch": 512,
        "greedy_prompts": list(GREEDY_PROMPTS),
        "measured": {k: v for k, v in vars(row).items() if k != "extra"} | row.extra,
    }
    DATA.mkdir(parents=True, exist_ok=True)
    out = DATA / f"fidelity-{alias}.npz"
    tokens = np.asarray(s.tokens, dtype=np.int32)
    np.savez_compressed(out, tokens=tokens, **arrays, meta=np.array(json.dumps(meta)))
    print(f"wrote {out.relative_to(ROOT)} ({out.stat().st_size / 1e6:.2f} MB)", flush=True)
    return row


def f32_control(alias: str, path: Path, args: argparse.Namespace) -> Row:
    """Both engines on an F32-dequantized copy: llama.cpp then quantizes no activations."""
    with tempfile.TemporaryDirectory() as tmp:
        f32 = dequantized_copy(path, Path(tmp) / f"{alias}-f32.gguf")
        return run_model(f"{alias} (F32 weights)", f32, args, write=False)


def print_table(rows: list[Row]) -> None:
    head = (
        "| model | top-1 | KL exact | KL top-K est. | PPL llama.cpp | PPL llamapy | rel diff "
        "| greedy identical |"
    )
    print(head)
    print("|" + " --- |" * 8)
    for r in rows:
        print(
            f"| {r.model} | {r.top1:.2%} | {r.kl_exact:.2e} | {r.kl_topk:.2e} | "
            f"{r.ppl_ref:.4f} | {r.ppl_ours:.4f} | {r.ppl_rel:+.3%} | "
            f"{r.greedy_same}/{len(GREEDY_PROMPTS)} |"
        )
    print()
    for r in rows:
        print(f"{r.model}:")
        for key, value in r.extra.items():
            shown = f"{value:.6g}" if isinstance(value, float) else value
            print(f"  {key}: {shown}")


def main(argv: list[str] | None = None) -> int:
    from llamapy.hub import resolve_model

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("models", nargs="*", default=["smollm2-135m", "gemma3-270m"])
    p.add_argument("--no-write", dest="write", action="store_false", help="only compare")
    p.add_argument(
        "--f32-control",
        nargs="*",
        default=["smollm2-135m"],
        metavar="ALIAS",
        help="also compare on F32-dequantized copies of these (default smollm2-135m)",
    )
    args = p.parse_args(argv)
    torch.set_num_threads(N_THREADS)
    rows = []
    for alias in args.models:
        rows.append(run_model(alias, resolve_model(alias).path, args, write=args.write))
        print_table(rows[-1:])
    rows += [f32_control(a, resolve_model(a).path, args) for a in args.f32_control]
    print(
        f"\n{N_CHUNKS} chunks of {N_CTX} tokens; top-1 and KL over all "
        f"{N_CHUNKS * N_CTX} positions, KL(llama.cpp || llamapy) in nats; the top-K estimate "
        f"lumps everything outside llama.cpp's top {TOP_K} into one bucket (a lower bound)."
    )
    print_table(rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
