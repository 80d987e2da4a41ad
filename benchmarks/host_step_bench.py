"""The host side of a batched decode step: what `LLMEngine.step()` costs in Python when the
model costs nothing.

The model runner is replaced by a stub that fills the decode graphs' input buffer
(`fill_decode_inputs`, the host part of a graph step) and returns random token ids, so the
figure is scheduling, input packing, detokenizing, stop checks and bookkeeping per step. With
async scheduling this work overlaps the GPU's step; it bounds the step time when it is the
longer of the two (a GPU profile shows it as engine step > graph replay).

    python benchmarks/host_step_bench.py [MODEL] [--batch 64,256] [--tokens 128]
                                         [--no-async] [--profile]
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import random
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_args import positive_int_list  # noqa: E402

from llamapy.engine.llm_engine import EngineConfig, LLMEngine  # noqa: E402
from llamapy.engine.model_runner import (  # noqa: E402
    _FIELDS,
    PendingStep,
    SampledToken,
    fill_decode_inputs,
)
from llamapy.formats import open_model_file  # noqa: E402
from llamapy.hub import resolve_model  # noqa: E402
from llamapy.sampling.params import SamplingParams  # noqa: E402
from llamapy.tokenizer import Tokenizer  # noqa: E402


class StubRunner:
    """Random tokens from the pieces a sampled text might use, inputs packed as for a graph."""

    def __init__(self, engine: LLMEngine, max_seqs: int, ctx: int, vocab: list[int]) -> None:
        self.bm = engine.block_manager
        self.cap, self.width = max_seqs, -(-ctx // self.bm.block_size)
        self.host = torch.zeros(_FIELDS * self.cap + self.cap * self.width, dtype=torch.int32)
        self.vocab = vocab
        self.rng = random.Random(0)

    def _tokens(self, n: int) -> list[int]:
        return self.rng.choices(self.vocab, k=n)

    def _fill(self, batch, src_rows=None) -> None:
        fill_decode_inputs(self.host.numpy(), batch, self.bm, self.cap, self.width, len(batch),
                           0, src_rows)  # fmt: skip

    def run(self, batch, block_manager) -> dict[int, SampledToken]:
        if all(item.num_new_tokens == 1 for item in batch):
            self._fill(batch)
        items = [item for item in batch if item.needs_sample]
        return {
            it.seq.seq_id: SampledToken(t)
            for it, t in zip(items, self._tokens(len(items)), strict=True)
        }

    def can_launch(self, batch) -> bool:
        return all(item.num_new_tokens == 1 and item.needs_sample for item in batch)

    def launch(self, batch, block_manager, prev, greedy_only: bool = False) -> PendingStep:
        src = [prev.rows[item.seq.seq_id] if item.seq.last_token_pending else -1 for item in batch]
        self._fill(batch, src)
        tokens = torch.tensor(self._tokens(len(batch)))
        return PendingStep([item.seq.seq_id for item in batch], tokens, tokens, None)

    def release(self, seq_id: int) -> None:
        pass


def measure(path: Path, batch: int, n_tokens: int, async_on: bool, profile: bool) -> float:
    """Milliseconds of host work per decode step of `batch` sequences."""
    ctx = 128 + n_tokens + 16
    cfg = EngineConfig(
        max_model_len=ctx,
        max_num_seqs=batch,
        max_num_batched_tokens=max(512, 128 * batch),
        kv_cache_tokens=batch * ctx,
        enable_prefix_caching=False,
        device="cpu",
        cpu_compile=False,
        async_scheduling=async_on,
    )
    tok = Tokenizer.from_path(path)
    engine = LLMEngine(open_model_file(path), tok, cfg)
    vocab = [i for i in range(min(tok.vocab_size, 32000)) if not tok.is_special(i)]
    stub = StubRunner(engine, batch, ctx, vocab)
    engine.runner = stub
    params = SamplingParams.greedy(max_tokens=n_tokens, ignore_eos=True)
    for _ in range(batch):
        engine.add_request(stub._tokens(128), params)
    engine.step()  # the prefill
    prof = cProfile.Profile() if profile else None
    steps = 0
    t0 = time.perf_counter()
    if prof:
        prof.enable()
    while engine.has_unfinished_requests():
        engine.step()
        steps += 1
    if prof:
        prof.disable()
    ms = (time.perf_counter() - t0) * 1e3 / steps
    if prof:
        pstats.Stats(prof).sort_stats("tottime").print_stats(15)
    return ms


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model", nargs="?", default="smollm2-135m", help="its tokenizer is used")
    ap.add_argument("--batch", type=positive_int_list, default=[64, 256])
    ap.add_argument("--tokens", type=int, default=128, help="tokens generated per sequence")
    ap.add_argument("--no-async", action="store_true")
    ap.add_argument("--profile", action="store_true", help="cProfile the steps")
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    if args.tokens < 2:
        ap.error("--tokens must be >= 2")
    if args.repeat < 1:
        ap.error("--repeat must be >= 1")
    path = resolve_model(args.model).path
    print(f"| batch | async | host ms per step (min of {args.repeat}) | us per sequence |")
    print("| ---: | --- | ---: | ---: |")
    for b in args.batch:
        ms = min(
            measure(path, b, args.tokens, not args.no_async, args.profile)
            for _ in range(args.repeat)
        )
        print(f"| {b} | {'off' if args.no_async else 'on'} | {ms:.3f} | {ms * 1e3 / b:.1f} |")


if __name__ == "__main__":
    main()
