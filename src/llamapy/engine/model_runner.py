"""Runs one scheduled step: flatten the batch, run the model over the paged KV cache, sample."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from llamapy.engine.block_manager import BlockManager
from llamapy.engine.kv_cache import allocate_kv_cache
from llamapy.engine.scheduler import ScheduledSeq
from llamapy.layers.attention import AttentionMetadata
from llamapy.models.llama import LlamaForCausalLM
from llamapy.sampling.params import SamplingParams
from llamapy.sampling.sampler import Sampler, SamplerOutput, make_generator


@dataclass(frozen=True, slots=True)
class SampledToken:
    token_id: int
    logprob: float | None = None
    top_logprobs: tuple[tuple[int, float], ...] = ()  # most likely first, n_probs of them


def _with_logprobs(out: SamplerOutput, row: int, n_probs: int) -> SampledToken:
    top_ids = out.top_token_ids[row, :n_probs].tolist()
    top_lps = out.top_logprobs[row, :n_probs].tolist()
    return SampledToken(
        int(out.token_ids[row]), float(out.logprobs[row]), tuple(zip(top_ids, top_lps, strict=True))
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
        max_model_len: int | None = None,
        cuda_graphs: bool = True,
    ) -> None:
        self.model = model
        self.device = torch.device(device)
        self.block_size = block_size
        # One block more than the block manager hands out: padded rows of a captured decode
        # step write their K/V there.
        self.kv_caches = allocate_kv_cache(
            model.config, num_blocks + 1, block_size, kv_dtype, device
        )
        self.sampler = Sampler(sorted(eog_token_ids))
        self._generators: dict[int, torch.Generator] = {}
        self.graphs: DecodeGraphs | None = None
        if self.device.type == "cuda" and cuda_graphs:
            max_len = max_model_len or num_blocks * block_size
            self.graphs = DecodeGraphs(
                model,
                self.kv_caches,
                max_batch=max_num_seqs,
                max_blocks=-(-max_len // block_size),
                scratch_block=num_blocks,
                block_size=block_size,
            )

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
        if self.graphs is not None and self.graphs.fits(batch):
            logits = self.graphs.run(batch, block_manager)
        else:
            input_ids, positions, meta, sample_rows = self.prepare(batch, block_manager)
            hidden = self.model(input_ids, positions, meta, self.kv_caches)
            if not sampled_items:
                return {}
            logits = self.model.compute_logits(hidden[sample_rows])
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
            it.seq.seq_id: _with_logprobs(out, row, it.seq.params.n_probs)
            for row, it in enumerate(sampled_items)
        }

    def _generator(self, seq_id: int, params: SamplingParams) -> torch.Generator:
        gen = self._generators.get(seq_id)
        if gen is None:
            gen = self._generators[seq_id] = make_generator(params.seed, self.device)
        return gen

    def release(self, seq_id: int) -> None:
        self._generators.pop(seq_id, None)


class DecodeGraphs:
    """Decode steps (one new token per sequence) replayed from CUDA graphs.

    One graph per batch-size bucket, captured on first use over static input buffers: ids,
    positions, slots, block tables of a fixed width, sequence lengths. A step copies its
    inputs into the buffers (rows past the batch point at a scratch block), replays the graph
    and returns the logits of its rows. Everything inside reads lengths from device tensors,
    so one graph serves any sequence lengths.
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
    ) -> None:
        self.model, self.kv_caches = model, kv_caches
        self.block_size, self.scratch_block = block_size, scratch_block
        self.buckets = sorted({b for b in (1, 2, 4, 8, 16, 24, 32) if b < max_batch} | {max_batch})
        self.buckets += [b for b in range(48, max_batch, 16) if b not in self.buckets]
        self.buckets.sort()
        dev = kv_caches[0][0].device
        n = self.buckets[-1]
        self.input_ids = torch.zeros(n, dtype=torch.int64, device=dev)
        self.positions = torch.zeros(n, dtype=torch.int64, device=dev)
        self.slots = torch.zeros(n, dtype=torch.int64, device=dev)
        self.block_tables = torch.zeros(n, max_blocks, dtype=torch.int32, device=dev)
        self.seq_lens = torch.ones(n, dtype=torch.int32, device=dev)
        self.query_start_loc = torch.arange(n + 1, dtype=torch.int32, device=dev)
        self.max_blocks = max_blocks
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.pool = None

    def fits(self, batch: list[ScheduledSeq]) -> bool:
        return len(batch) <= self.buckets[-1] and all(
            item.num_new_tokens == 1
            and item.needs_sample
            and len(item.seq.block_table) <= self.max_blocks
            for item in batch
        )

    def _meta(self, bs: int) -> AttentionMetadata:
        return AttentionMetadata(
            slot_mapping=self.slots[:bs],
            block_tables=self.block_tables[:bs],
            seq_lens=self.seq_lens[:bs],
            query_start_loc=self.query_start_loc[: bs + 1],
            max_query_len=1,
            max_seq_len=self.max_blocks * self.block_size,
        )

    def _forward(self, bs: int) -> torch.Tensor:
        hidden = self.model(
            self.input_ids[:bs], self.positions[:bs], self._meta(bs), self.kv_caches
        )
        return self.model.compute_logits(hidden)

    def _capture(self, bs: int) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):  # warm up: compile kernels, settle the allocator
                self._forward(bs)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            logits = self._forward(bs)
        self.pool = graph.pool()
        return graph, logits

    @torch.inference_mode()
    def run(self, batch: list[ScheduledSeq], block_manager: BlockManager) -> torch.Tensor:
        n = len(batch)
        bs = next(b for b in self.buckets if b >= n)
        ids, positions, slots, seq_lens = [], [], [], []
        tables = torch.full((bs, self.max_blocks), self.scratch_block, dtype=torch.int32)
        for row, item in enumerate(batch):
            seq = item.seq
            pos = seq.num_computed_tokens
            ids.append(seq.tokens_between(pos, pos + 1)[0])
            positions.append(pos)
            slots.append(block_manager.slot(seq, pos))
            seq_lens.append(pos + 1)
            tables[row, : len(seq.block_table)] = torch.tensor(seq.block_table, dtype=torch.int32)
        pad = bs - n
        ids += [0] * pad
        positions += [0] * pad
        slots += [self.scratch_block * self.block_size] * pad
        seq_lens += [1] * pad
        self.input_ids[:bs].copy_(torch.tensor(ids), non_blocking=True)
        self.positions[:bs].copy_(torch.tensor(positions), non_blocking=True)
        self.slots[:bs].copy_(torch.tensor(slots), non_blocking=True)
        self.seq_lens[:bs].copy_(torch.tensor(seq_lens, dtype=torch.int32), non_blocking=True)
        self.block_tables[:bs].copy_(tables, non_blocking=True)
        if bs not in self.graphs:
            self.graphs[bs] = self._capture(bs)
        graph, logits = self.graphs[bs]
        graph.replay()
        return logits[:n]
