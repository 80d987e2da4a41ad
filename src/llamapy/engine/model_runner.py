"""Runs one scheduled step: flatten the batch, run the model over the paged KV cache, sample."""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from llamapy.engine.block_manager import BlockManager
from llamapy.engine.kv_cache import allocate_kv_cache
from llamapy.engine.prefill_graphs import PrefillGraphs
from llamapy.engine.scheduler import ScheduledSeq
from llamapy.kernels.cpu.malloc import tune_malloc
from llamapy.layers.attention import AttentionMetadata
from llamapy.models.llama import LlamaForCausalLM
from llamapy.sampling.dry import DryVocab
from llamapy.sampling.greedy import decode_ids, greedy_pick
from llamapy.sampling.params import SamplingParams
from llamapy.sampling.sampler import Sampler, SamplerOutput, SamplerState, make_state
from llamapy.structured.matcher import MaskWorker
from llamapy.switches import switched_off

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class SampledToken:
    token_id: int
    logprob: float | None = None
    top_logprobs: tuple[tuple[int, float], ...] = ()  # most likely first, n_probs of them


class PendingStep:
    """A launched decode step whose greedy tokens are not read back yet (async scheduling).

    `device_tokens` (rows in batch order) feed the next step's input ids on the device;
    `tokens()` waits for this step alone (an event recorded after it, before anything
    launched later) and returns the ids from a pinned host copy.
    """

    def __init__(
        self,
        seq_ids: list[int],
        device_tokens: torch.Tensor,
        host_tokens: torch.Tensor,
        event: torch.cuda.Event | None,
    ) -> None:
        self.seq_ids = seq_ids
        self.rows = {sid: row for row, sid in enumerate(seq_ids)}
        self.device_tokens = device_tokens
        self._host = host_tokens
        self._event = event

    def tokens(self) -> list[int]:
        if self._event is not None:
            self._event.synchronize()
        return self._host.tolist()


def _with_logprobs(out: SamplerOutput, row: int, p: SamplingParams) -> SampledToken:
    top_ids = out.top_token_ids[row, : p.n_probs].tolist()
    top_lps = out.top_logprobs[row, : p.n_probs].tolist()
    if p.post_sampling_probs:  # only the final candidates (llama-server drops p = 0)
        kept = [i for i, lp in enumerate(top_lps) if lp != float("-inf")]
        top_ids, top_lps = [top_ids[i] for i in kept], [top_lps[i] for i in kept]
    return SampledToken(
        int(out.token_ids[row]), float(out.logprobs[row]), tuple(zip(top_ids, top_lps, strict=True))
    )


def plain_greedy(p: SamplingParams) -> bool:
    """Rows the captured graph samples itself: argmax with, at most, the EOG ban."""
    return (
        p.picks_argmax
        and not p.has_penalties
        and not p.has_dry
        and not p.logit_bias
        and not p.n_probs
        and p.constraint is None  # grammar masks apply outside the graph
    )


def launchable(p: SamplingParams) -> bool:
    """Rows a step can sample without waiting for the step before (async scheduling): no
    sampler that reads the token history on the host (penalties, DRY), keeps host state per
    token (mirostat's mu) or applies a grammar mask, and no log-probabilities to report."""
    return (
        not p.has_penalties
        and not p.has_dry
        and not p.mirostat
        and not p.n_probs
        and p.constraint is None
    )


class ModelRunner:
    def __init__(
        self,
        model: LlamaForCausalLM,
        *,
        num_blocks: int,
        block_size: int,
        eog_token_ids: frozenset[int] = frozenset(),
        kv_dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
        max_num_seqs: int = 8,
        max_num_batched_tokens: int = 512,
        max_model_len: int | None = None,
        cuda_graphs: bool = True,
        dry_vocab: DryVocab | None = None,  # token texts for DRY's sequence breakers
    ) -> None:
        self.model = model
        self.device = torch.device(device)
        self.block_size = block_size
        self.max_blocks_per_seq = -(-(max_model_len or num_blocks * block_size) // block_size)
        if self.device.type == "cpu":  # prefill scratch from a warm heap (kernels/cpu/malloc)
            tune_malloc()
        elif not switched_off("LLAMAPY_GPU_ROPE_TABLES"):  # cos / sin gathered by position
            # (one launch a step, not seven a rope kind) where the step's bound fits the
            # tables: every step of this runner
            model.build_rope_tables(self.max_blocks_per_seq * block_size)
        # One block more than the block manager hands out: padded rows of a captured decode
        # step write their K/V there.
        self.kv_caches = allocate_kv_cache(
            model.config, num_blocks + 1, block_size, kv_dtype, device
        )
        self.sampler = Sampler(sorted(eog_token_ids), dry_vocab)
        self._generators: dict[int, SamplerState] = {}  # per sequence: generator, mirostat mu
        self.grammar_masks = MaskWorker(model.config.vocab_size)
        self._eog = torch.tensor(sorted(eog_token_ids), dtype=torch.int64, device=self.device)
        self._launches = 0  # async steps launched: which pinned token buffer is next
        # pinned host buffers for launched steps' tokens, used in turn (a step's buffer is
        # read back before the step after next is launched)
        self._host_tokens = (
            [torch.zeros(max_num_seqs, dtype=torch.int64, pin_memory=True) for _ in range(2)]
            if self.device.type == "cuda"
            else []
        )
        self.graphs: DecodeGraphs | None = None
        self.prefill_graphs: PrefillGraphs | None = None
        if self.device.type == "cuda" and cuda_graphs:
            self.graphs = DecodeGraphs(
                model,
                self.kv_caches,
                max_batch=max_num_seqs,
                max_blocks=self.max_blocks_per_seq,
                scratch_block=num_blocks,
                block_size=block_size,
                eog_token_ids=sorted(eog_token_ids),
            )
            self.prefill_graphs = PrefillGraphs(
                model,
                self.kv_caches,
                max_tokens=max_num_batched_tokens,
                max_seqs=max_num_seqs,
                max_blocks=self.max_blocks_per_seq,
                scratch_block=num_blocks,
                block_size=block_size,
            )

    @torch.inference_mode()  # as `run`: graphs guard on it
    def compile_decode(self, *, native: bool = True, compiled: bool = True) -> None:
        """CPU: run decode steps as one numba call where the model's kernels and caches allow
        and `native` (models/cpu_step.py), else, if `compiled`, through torch.compile
        (models/cpu_compile.py). Warm-up steps that write only the scratch block load (or
        compile) them now: the native executor; the compiled graphs of a one-sequence step,
        one with a narrow block table and, where the context can grow past it, one as wide
        as the attention op takes (`cpu_attention.MIN_BLOCKS`: another graph, which would
        otherwise compile in the middle of a generation). Batched steps' graphs compile at
        the first one."""
        from llamapy.kernels.cpu.attention import MIN_BLOCKS
        from llamapy.models.cpu_compile import CompiledDecode
        from llamapy.models.cpu_step import NativeDecode

        if not hasattr(self.model, "compiled_decode"):
            return
        step = NativeDecode.build(self.model, self.kv_caches) if native else None
        if step is not None:  # one numba call a step (loaded or compiled by the warm-up)
            self.model.native_decode = step
            widths = [1]
        elif not compiled:
            return
        else:
            self.model.compiled_decode = CompiledDecode()
            widths = [1] + ([MIN_BLOCKS] if self.max_blocks_per_seq >= MIN_BLOCKS else [])
        scratch = self.kv_caches[0][0].shape[0] - 1
        for width in widths:
            meta = AttentionMetadata(
                slot_mapping=torch.tensor([scratch * self.block_size]),
                block_tables=torch.full((1, width), scratch, dtype=torch.int32),
                seq_lens=torch.ones(1, dtype=torch.int32),
                query_start_loc=torch.tensor([0, 1], dtype=torch.int32),
                max_query_len=1,
                max_seq_len=1,
                seq_lens_host=(1,),
                query_start_loc_host=(0, 1),
            )
            zero = torch.zeros(1, dtype=torch.long)
            self.model(zero, zero, meta, self.kv_caches)

    def prepare(
        self, batch: list[ScheduledSeq], block_manager: BlockManager
    ) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata, list[int]]:
        """Flattened ids and positions, attention metadata, and the row of each sequence
        whose last token is sampled."""
        ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        seq_lens: list[int] = []
        starts = [0]
        sample_rows: list[int] = []
        for item in batch:
            seq, start = item.seq, item.seq.num_computed_tokens
            end = start + item.num_new_tokens
            ids.extend(seq.tokens_between(start, end))
            positions.extend(range(start, end))
            slots.extend(block_manager.slot(seq, p) for p in range(start, end))
            seq_lens.append(end)
            starts.append(starts[-1] + item.num_new_tokens)
            if item.needs_sample:
                sample_rows.append(starts[-1] - 1)
        max_blocks = max(len(item.seq.block_table) for item in batch)
        tables = [
            item.seq.block_table + [0] * (max_blocks - len(item.seq.block_table)) for item in batch
        ]
        dev = self.device
        meta = AttentionMetadata(
            slot_mapping=torch.tensor(slots, dtype=torch.int64, device=dev),
            block_tables=torch.tensor(tables, dtype=torch.int32, device=dev),
            seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=dev),
            query_start_loc=torch.tensor(starts, dtype=torch.int32, device=dev),
            max_query_len=max(item.num_new_tokens for item in batch),
            max_seq_len=max(seq_lens),
            seq_lens_host=tuple(seq_lens),
            query_start_loc_host=tuple(starts),
        )
        input_ids = torch.tensor(ids, dtype=torch.int64, device=dev)
        return input_ids, torch.tensor(positions, device=dev), meta, sample_rows

    @torch.inference_mode()
    def run(
        self, batch: list[ScheduledSeq], block_manager: BlockManager
    ) -> dict[int, SampledToken]:
        """Compute the batch; return the token sampled for each sequence that reached its
        last token, by seq_id."""
        sampled_items = [item for item in batch if item.needs_sample]
        # grammar masks are computed in a worker thread while the model runs
        masks = self.grammar_masks.submit([item.seq.grammar for item in sampled_items])
        if self.graphs is not None and self.graphs.fits(batch):
            logits, greedy = self.graphs.run(batch, block_manager)
            if all(plain_greedy(item.seq.params) for item in sampled_items):
                tokens = greedy.tolist()  # the step's only device-to-host copy
                return {
                    it.seq.seq_id: SampledToken(t)
                    for it, t in zip(sampled_items, tokens, strict=True)
                }
        elif self.prefill_graphs is not None and self.prefill_graphs.fits(batch):
            logits = self.prefill_graphs.run(batch)
            if not sampled_items:
                return {}
        else:
            input_ids, positions, meta, sample_rows = self.prepare(batch, block_manager)
            hidden = self.model(input_ids, positions, meta, self.kv_caches)
            if not sampled_items:
                return {}
            logits = self.model.compute_logits(hidden[sample_rows])
        if masks is not None:
            logits = masks.apply(logits)  # disallowed tokens -> -inf, before the chain
        params = [item.seq.params for item in sampled_items]
        want_logprobs = any(p.n_probs for p in params)
        out = self.sampler(
            logits,
            params,
            [item.seq.token_ids for item in sampled_items],
            [self._generator(item.seq.seq_id, item.seq.params) for item in sampled_items],
            return_logprobs=want_logprobs,
        )
        if not want_logprobs:
            tokens = out.tolist()
            return {
                it.seq.seq_id: SampledToken(t) for it, t in zip(sampled_items, tokens, strict=True)
            }
        return {
            it.seq.seq_id: _with_logprobs(out, row, it.seq.params)
            for row, it in enumerate(sampled_items)
        }

    # -- async scheduling --------------------------------------------------------------------

    def can_launch(self, batch: list[ScheduledSeq]) -> bool:
        """Whether `launch` can run this batch of sequences whose sampling parameters are
        `launchable` (the caller's check, made once per request): one sampled token per
        sequence and, on CUDA, a batch the decode graphs take."""
        if not all(item.num_new_tokens == 1 and item.needs_sample for item in batch):
            return False
        return self.graphs.fits(batch) if self.graphs is not None else True

    @torch.inference_mode()
    def launch(
        self,
        batch: list[ScheduledSeq],
        block_manager: BlockManager,
        prev: PendingStep | None,
        greedy_only: bool = False,
    ) -> PendingStep:
        """Start a decode step without waiting for it (`can_launch(batch)` holds).

        A sequence whose last token is still PENDING takes it from `prev` (launched just
        before) on the device. `greedy_only`: every row is `plain_greedy` (the pick inside
        the graph is the token; otherwise the sampler runs on the step's logits, its
        uniforms drawn now from each sequence's generator). The result is read back by
        `PendingStep.tokens()`."""
        src = [-1] * len(batch)
        for row, item in enumerate(batch):
            if item.seq.last_token_pending:
                if prev is None or item.seq.seq_id not in prev.rows:
                    raise RuntimeError(f"sequence {item.seq.seq_id}: pending token unknown")
                src[row] = prev.rows[item.seq.seq_id]
        seq_ids = [item.seq.seq_id for item in batch]
        if self.graphs is not None:
            logits, tokens = self.graphs.run(batch, block_manager, src)
        else:
            input_ids, positions, meta, _ = self.prepare(batch, block_manager)
            if prev is not None:
                rows = torch.tensor(src, device=self.device)
                from_prev = prev.device_tokens[rows.clamp(min=0)]
                input_ids = torch.where(rows >= 0, from_prev, input_ids)
            hidden = self.model(input_ids, positions, meta, self.kv_caches)
            logits = self.model.compute_logits(hidden)
            if greedy_only:
                ban = torch.tensor([it.seq.params.ignore_eos for it in batch], device=self.device)
                tokens = greedy_pick(logits, ban, self._eog)
        if not greedy_only:
            tokens = self.sampler(
                logits,
                [item.seq.params for item in batch],
                None,  # no row reads the history (launchable)
                [self._generator(item.seq.seq_id, item.seq.params) for item in batch],
            )
            if self.graphs is not None:  # the next graph takes its ids from here
                self.graphs.last_tokens[: len(batch)].copy_(tokens)
        if self.device.type != "cuda":
            return PendingStep(seq_ids, tokens, tokens, None)
        # a pinned copy queued behind the step, and an event to wait for it alone
        host = self._host_tokens[self._launches % 2][: len(batch)]
        self._launches += 1
        host.copy_(tokens, non_blocking=True)
        event = torch.cuda.Event()
        event.record()
        return PendingStep(seq_ids, tokens, host, event)

    def _generator(self, seq_id: int, params: SamplingParams) -> SamplerState:
        gen = self._generators.get(seq_id)
        if gen is None:
            # a CPU generator on every device: a row's uniform costs no kernel launch, and a
            # seed draws the same numbers on the CPU and the GPU
            gen = self._generators[seq_id] = make_state(params)
        return gen

    def release(self, seq_id: int) -> None:
        self._generators.pop(seq_id, None)


class DecodeGraphs:
    """Decode steps (one new token per sequence) replayed from CUDA graphs.

    One graph per batch-size bucket, captured on first use over static inputs: token ids,
    positions, slots, sequence lengths and block tables of a fixed width, all in one int32
    buffer that a step fills with a single host-to-device copy (rows past the batch point at
    a scratch block). The graph computes the logits and the greedy pick (argmax after the
    per-row end-of-generation ban of `ignore_eos`), so a greedy step returns to the host
    only the token ids. Lengths are read from device tensors: one graph serves any lengths.
    """

    def __init__(
        self,
        model: LlamaForCausalLM,
        kv_caches: list[tuple[torch.Tensor, torch.Tensor]],
        *,
        max_batch: int,
        max_blocks: int,
        scratch_block: int,
        block_size: int,
        eog_token_ids: Sequence[int] = (),
    ) -> None:
        self.model, self.kv_caches = model, kv_caches
        self.block_size, self.scratch_block = block_size, scratch_block
        self.num_kv_heads = kv_caches[0][0].shape[2]
        buckets = {b for b in (1, 2, 4, 8, 16, 24, 32) if b < max_batch}
        buckets |= set(range(48, max_batch, 16)) | {max_batch}
        self.buckets = sorted(buckets)
        dev = kv_caches[0][0].device
        self.num_sms = torch.cuda.get_device_properties(dev).multi_processor_count
        n = self.max_batch = self.buckets[-1]
        self.max_blocks = max_blocks
        # layout of the int32 input buffer: ids, positions, slots, seq_lens, ban_eog, and the
        # row of the previous step's pick that is the id (-1: the id field is) (n each), then
        # the block tables (n, max_blocks)
        self.width = _FIELDS * n + n * max_blocks
        # two host buffers, used in turn: a step fills one while the copy of the step
        # before may still be queued (async scheduling launches without waiting)
        self.staging = [
            torch.zeros(self.width, dtype=torch.int32, pin_memory=True) for _ in range(2)
        ]
        self._runs = 0
        self.inputs = torch.zeros(self.width, dtype=torch.int32, device=dev)
        # each graph's greedy picks, in batch order: the next step's ids (async scheduling).
        # The graph reads a copy made before it runs, so running it again (the warm-up runs
        # of a capture) reads the same ids.
        self.last_tokens = torch.zeros(n, dtype=torch.int64, device=dev)
        self.prev_tokens = torch.zeros(n, dtype=torch.int64, device=dev)
        self.eog = torch.tensor(sorted(eog_token_ids), dtype=torch.int64, device=dev)
        self.query_start_loc = torch.arange(n + 1, dtype=torch.int32, device=dev)
        # by (batch bucket, attention splits)
        self.graphs: dict[tuple[int, int], tuple[torch.cuda.CUDAGraph, torch.Tensor, torch.Tensor]]
        self.graphs = {}
        self.pool = None

    def _field(self, index: int, bs: int) -> torch.Tensor:
        return self.inputs[index * self.max_batch : index * self.max_batch + bs]

    def fits(self, batch: list[ScheduledSeq]) -> bool:
        return len(batch) <= self.max_batch and all(
            item.num_new_tokens == 1
            and item.needs_sample
            and len(item.seq.block_table) <= self.max_blocks
            for item in batch
        )

    def splits_for(self, bs: int, max_len: int | None = None) -> int:
        """Key splits of the decode attention for a batch bucket whose longest sequence has
        `max_len` keys (`graph_decode_splits`)."""
        return graph_decode_splits(bs, self.num_kv_heads, max_len, self.num_sms)

    def _forward(self, bs: int, splits: int) -> tuple[torch.Tensor, torch.Tensor]:
        tables = self.inputs[_FIELDS * self.max_batch :].view(self.max_batch, self.max_blocks)
        meta = AttentionMetadata(
            slot_mapping=self._field(2, bs),
            block_tables=tables[:bs],
            seq_lens=self._field(3, bs),
            query_start_loc=self.query_start_loc[: bs + 1],
            max_query_len=1,
            max_seq_len=self.max_blocks * self.block_size,
            decode_splits=splits,
            decode_tile=graph_decode_tile(bs, self.num_kv_heads, splits, self.num_sms),
        )
        ids = decode_ids(self._field(0, bs), self._field(5, bs), self.prev_tokens)
        hidden = self.model(ids, self._field(1, bs), meta, self.kv_caches)
        logits = self.model.compute_logits(hidden)
        greedy = greedy_pick(logits, self._field(4, bs), self.eog)
        self.last_tokens[:bs].copy_(greedy)
        return logits, greedy

    def _capture(
        self, bs: int, splits: int
    ) -> tuple[torch.cuda.CUDAGraph, torch.Tensor, torch.Tensor]:
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):  # warm up: compile kernels, settle the allocator
                self._forward(bs, splits)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            logits, greedy = self._forward(bs, splits)
        self.pool = graph.pool()
        return graph, logits, greedy

    @torch.inference_mode()
    def run(
        self,
        batch: list[ScheduledSeq],
        block_manager: BlockManager,
        src_rows: list[int] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Replay the step: (logits (n, V), greedy token ids (n,)) on the device. Row r's
        input id is the previous replay's pick in row src_rows[r] where that is >= 0."""
        n, cap, width = len(batch), self.max_batch, self.max_blocks
        bs = next(b for b in self.buckets if b >= n)
        staging = self.staging[self._runs % 2]
        self._runs += 1
        fill_decode_inputs(staging.numpy(), batch, block_manager, cap, width, bs,
                           self.scratch_block, src_rows)  # fmt: skip
        self.inputs.copy_(staging, non_blocking=True)
        if src_rows is not None and max(src_rows) >= 0:
            self.prev_tokens.copy_(self.last_tokens)
        max_len = max(item.seq.num_computed_tokens for item in batch) + 1
        key = (bs, self.splits_for(bs, max_len))
        if key not in self.graphs:
            self.graphs[key] = self._capture(*key)
        graph, logits, greedy = self.graphs[key]
        graph.replay()
        return logits[:n], greedy[:n]


_FIELDS = 6  # per-row int32 fields of the decode graphs' input buffer


# A batch whose (sequence, KV head) programs alone fill the GPU splits its keys only past this
# many keys a split: below it the splits' merge kernel costs more than the split programs
# save. H200, Llama-3.2-1B shape, 64 sequences (8 KV heads: 512 programs), S_TG
# (benchmarks/gpu_bench.py --batch 64, one lease each): at 129-256 keys Q4_K_M 4 splits
# 23,676, 2 splits 24,023, 1 split 24,666; Q4_1 27,919 / 28,252 / 29,066; at 897-1024 keys
# (--batch-prompt 896) Q4_1 4 / 2 / 1 splits 22,816 / 22,870 / 23,131. Longer keys were not
# measured: past 1024 the count doubles with the length up to the batch rule's.
SPLIT_MIN_KEYS = 1024


# A batch of fewer (sequence, KV head) programs than two an SM takes only as many splits as its
# longest sequence has SHORT_TILE-key tiles (at least SHORT_MIN_SPLITS, a power of two), each
# split one tile: the empty splits and the merge's reads of their partials cost more than
# they hold. H200, Llama-3.2-1B heads, one sequence, the fused decode attention and its merge
# (benchmarks/kernels/attn_short_lab.py, us a call): at 16 keys 32 splits 5.09, 2 splits 4.03;
# at 64 keys 5.17 against 4 splits 4.19; one split walking 32- or 64-key tiles alone was
# slower past its first tile (~3 us a further tile). LLAMAPY_GPU_DECODE_SHORT_SPLITS=0: the
# batch's rule at every length.
SHORT_TILE = 16
SHORT_MIN_SPLITS = 2
# The most key splits a decode graph takes (powers of two): a batch's MAX_SPLITS; a single
# sequence's ONE_SEQUENCE_MAX_SPLITS, so that past 512 keys it keeps one 16-key tile a split
# up to 4096 keys (a split's further tiles cost ~3 us each: attn_short_lab). H200, 1B shape,
# tg128 after 4096 / 1024 tokens (`gpu_ab.py ... --depth D`), 32 -> 256 splits: Q4_0 863 ->
# 1127 t/s (1.305x) / 1.111x, Q4_1 1.078x / 1.009x; four sequences of 4096 keys with up to
# 64 splits 0.99x, hence the batches' 32 (benchmarks/RESULTS.md, thirty-second session).
# LLAMAPY_GPU_DECODE_MAX_SPLITS sets the single sequence's (32: the rule before).
MAX_SPLITS = 32
ONE_SEQUENCE_MAX_SPLITS = 256


@functools.cache
def _one_sequence_max_splits(env: str | None) -> int:
    value = (env or "").strip()
    if value.isdigit() and int(value) > 0 and not int(value) & (int(value) - 1):
        return int(value)
    if value:  # anything else keeps the default, said once
        logger.warning("LLAMAPY_GPU_DECODE_MAX_SPLITS=%r is not a power of two: the default %d",
                       env, ONE_SEQUENCE_MAX_SPLITS)  # fmt: skip
    return ONE_SEQUENCE_MAX_SPLITS


def graph_decode_splits(
    bs: int, num_kv_heads: int, max_len: int | None = None, num_sms: int = 132
) -> int:
    """Key splits of the decode attention in a graph of `bs` sequences, a power of two: up to
    ONE_SEQUENCE_MAX_SPLITS for a single sequence, MAX_SPLITS for a batch, fewer when the
    batch already gives the SMs enough (sequence, KV head) programs. Splits past the keys are
    empty programs, so one graph serves every length up to its split count's (H100 sweep,
    benchmarks/kernels/tune_decode.py: 16-key tiles over 8-32 splits are 2-4x faster than one
    long split at 128-2048 keys, one sequence). A batch
    of at least two programs an SM splits only as far as its longest sequence (`max_len`
    keys, None: any length) gives each split SPLIT_MIN_KEYS keys; a smaller batch as far as
    it gives each split one SHORT_TILE-key tile (`graph_decode_tile`), or with
    LLAMAPY_GPU_DECODE_SHORT_SPLITS off its count for any length, at most MAX_SPLITS."""
    programs = bs * num_kv_heads
    cap = MAX_SPLITS
    if bs == 1:
        cap = _one_sequence_max_splits(os.environ.get("LLAMAPY_GPU_DECODE_MAX_SPLITS"))
    splits = max(1, min(cap, 1 << max(0, (2048 // programs) - 1).bit_length()))
    if max_len is None:
        return splits
    if programs >= 2 * num_sms:
        by_length = 1 << max(0, -(-max_len // SPLIT_MIN_KEYS) - 1).bit_length()
        return min(splits, by_length)
    if switched_off("LLAMAPY_GPU_DECODE_SHORT_SPLITS"):
        return min(splits, MAX_SPLITS)
    tiles = 1 << max(0, -(-max_len // SHORT_TILE) - 1).bit_length()
    return min(splits, max(SHORT_MIN_SPLITS, tiles))


def graph_decode_tile(bs: int, num_kv_heads: int, splits: int, num_sms: int = 132) -> int | None:
    """Keys a tile of the decode attention in a graph of `bs` sequences at `splits` splits:
    SHORT_TILE where its longest sequence cut a small batch's splits (`graph_decode_splits`:
    one tile a split), else None (the kernel's rule)."""
    programs = bs * num_kv_heads
    if programs >= 2 * num_sms or splits >= graph_decode_splits(bs, num_kv_heads, None, num_sms):
        return None
    return SHORT_TILE


def fill_decode_inputs(
    host,  # numpy int32 (_FIELDS * cap + cap * width,)
    batch: list[ScheduledSeq],
    block_manager: BlockManager,
    cap: int,
    width: int,
    bs: int,
    scratch_block: int,
    src_rows: list[int] | None = None,
) -> None:
    """The decode graphs' input buffer for `batch` padded to `bs` rows: ids, positions,
    slots, sequence lengths, ban_eog, source rows (fields of `cap` each), block tables
    (cap, width). Padded rows have length 1, write the scratch block and read it."""
    n, block_size = len(batch), block_manager.block_size
    seqs = [item.seq for item in batch]
    pos = [seq.num_computed_tokens for seq in seqs]
    tables = host[_FIELDS * cap :].reshape(cap, width)
    tables[:bs] = scratch_block
    slots = []
    for row, (seq, p) in enumerate(zip(seqs, pos, strict=True)):
        table = seq.block_table
        tables[row, : len(table)] = table
        slots.append(table[p // block_size] * block_size + p % block_size)
    host[:n] = [max(seq.token_at(p), 0) for seq, p in zip(seqs, pos, strict=True)]
    host[cap : cap + n] = pos
    host[2 * cap : 2 * cap + n] = slots
    host[2 * cap + n : 2 * cap + bs] = scratch_block * block_size
    lengths = host[3 * cap : 3 * cap + bs]
    lengths[:] = 1
    lengths[:n] += pos
    host[4 * cap : 4 * cap + n] = [seq.params.ignore_eos for seq in seqs]
    host[5 * cap : 5 * cap + bs] = -1
    if src_rows is not None:
        host[5 * cap : 5 * cap + n] = src_rows
