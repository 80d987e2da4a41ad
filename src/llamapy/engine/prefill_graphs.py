"""CUDA: steps with prompt tokens (prefill chunks, mixed prefill + decode batches) replayed
from CUDA graphs, one per (token bucket, sequence bucket).

Eagerly, a prefill of a small model is host-bound: each layer is a dozen kernel launches of
10-20 us of Python each around a few microseconds of GPU work (SmolLM2's pp512 on an H100:
~400 launches, 16k-30k tokens/s from call to call). A captured graph replays them at once.

A step is padded to its buckets. Padded tokens write their K/V to the scratch block and
belong to no sequence: their attention rows are never written or read, and every other op
is row-wise. Padded sequences have no queries (their tile programs return at once). Every
size the kernels see is a bucket's, so the host-side values of `AttentionMetadata` are the
bucket's too (`max_query_len` bounds the attention grid); what varies between steps (ids,
positions, slots, lengths, query starts, block tables, the rows to sample) is read from one
int32 device buffer, filled by one host-to-device copy per step. The graph ends with the
logits of the sampled rows, which the sampler takes as from an eager step.
"""

from __future__ import annotations

from collections.abc import Sequence as Seq

import numpy as np
import torch

from llamapy.engine.scheduler import ScheduledSeq
from llamapy.layers.attention import AttentionMetadata

# Token buckets: powers of two up to 512, then multiples of 256 (at most ~1.5x padding of
# a step's tokens, and the GEMMs of large steps are not launch-bound anyway); steps past
# MAX_TOKENS run eagerly.
MIN_TOKENS = 16
MAX_TOKENS = 2048


def token_buckets(max_tokens: int) -> list[int]:
    """The token counts graphs are captured for, covering 1..min(max_tokens, MAX_TOKENS)."""
    limit = max(MIN_TOKENS, min(max_tokens, MAX_TOKENS))
    out, t = [], MIN_TOKENS
    while t < limit:
        out.append(t)
        t = t * 2 if t < 512 else t + 256
    return [*out, limit]


def seq_buckets(max_seqs: int) -> list[int]:
    """Powers of two up to max_seqs, and max_seqs itself."""
    out, b = [], 1
    while b < max_seqs:
        out.append(b)
        b *= 2
    out.append(max_seqs)
    return out


class Layout:
    """Offsets of the int32 input buffer for at most `max_tokens` tokens and `max_seqs`
    sequences: ids, positions, slots (max_tokens each), seq_lens, sample rows (max_seqs
    each), query starts (max_seqs + 1), block tables (max_seqs, max_blocks)."""

    def __init__(self, max_tokens: int, max_seqs: int, max_blocks: int) -> None:
        self.max_tokens, self.max_seqs, self.max_blocks = max_tokens, max_seqs, max_blocks
        t, s = max_tokens, max_seqs
        self.ids, self.positions, self.slots = 0, t, 2 * t
        self.seq_lens = 3 * t
        self.sample_rows = self.seq_lens + s
        self.query_start = self.sample_rows + s
        self.tables = self.query_start + s + 1
        self.width = self.tables + s * max_blocks


def pack_inputs(
    host: np.ndarray,
    layout: Layout,
    batch: Seq[ScheduledSeq],
    block_size: int,
    scratch_block: int,
    n_tokens: int,
    n_seqs: int,
) -> int:
    """Fill `host` (int32, layout.width) for `batch` padded to `n_tokens` tokens and `n_seqs`
    sequences; return how many sequences are sampled (their rows come first in the sample
    rows, in batch order)."""
    lo = layout
    scratch_slot = scratch_block * block_size
    tables = host[lo.tables : lo.tables + n_seqs * lo.max_blocks].reshape(n_seqs, lo.max_blocks)
    tables[:] = scratch_block
    sample_rows = host[lo.sample_rows : lo.sample_rows + n_seqs]
    sample_rows[:] = 0
    row = n_sampled = 0
    for b, item in enumerate(batch):
        seq, start = item.seq, item.seq.num_computed_tokens
        end = start + item.num_new_tokens
        n = end - start
        host[lo.ids + row : lo.ids + row + n] = seq.tokens_between(start, end)
        pos = np.arange(start, end, dtype=np.int32)
        host[lo.positions + row : lo.positions + row + n] = pos
        table = np.asarray(seq.block_table, dtype=np.int32)
        host[lo.slots + row : lo.slots + row + n] = table[pos // block_size] * block_size + (
            pos % block_size
        )
        host[lo.seq_lens + b] = end
        host[lo.query_start + b] = row
        tables[b, : len(table)] = table
        row += n
        if item.needs_sample:
            sample_rows[n_sampled] = row - 1
            n_sampled += 1
    # padded tokens: position 0 at the scratch slot, in no sequence
    host[lo.ids + row : lo.ids + n_tokens] = 0
    host[lo.positions + row : lo.positions + n_tokens] = 0
    host[lo.slots + row : lo.slots + n_tokens] = scratch_slot
    # padded sequences: no queries (their query range is empty), length 1 on the scratch
    host[lo.seq_lens + len(batch) : lo.seq_lens + n_seqs] = 1
    host[lo.query_start + len(batch) : lo.query_start + n_seqs + 1] = row
    return n_sampled


class PrefillGraphs:
    """Non-decode steps replayed from CUDA graphs captured on first use of each (token
    bucket, sequence bucket); see the module docstring."""

    def __init__(
        self,
        model: torch.nn.Module,
        kv_caches: list[tuple[torch.Tensor, torch.Tensor]],
        *,
        max_tokens: int,
        max_seqs: int,
        max_blocks: int,
        scratch_block: int,
        block_size: int,
    ) -> None:
        self.model, self.kv_caches = model, kv_caches
        self.block_size, self.scratch_block = block_size, scratch_block
        self.token_buckets = token_buckets(max_tokens)
        self.seq_buckets = seq_buckets(max_seqs)
        self.layout = Layout(self.token_buckets[-1], self.seq_buckets[-1], max_blocks)
        dev = kv_caches[0][0].device
        self.staging = torch.zeros(self.layout.width, dtype=torch.int32, pin_memory=True)
        self.inputs = torch.zeros(self.layout.width, dtype=torch.int32, device=dev)
        # the staging buffer is rewritten only once its last copy to the device is done (a
        # step that samples nothing returns without waiting for the GPU)
        self.copied = torch.cuda.Event()
        self.graphs: dict[tuple[int, int], tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.pool = None

    def fits(self, batch: Seq[ScheduledSeq]) -> bool:
        lo = self.layout
        return (
            0 < len(batch) <= lo.max_seqs
            and sum(item.num_new_tokens for item in batch) <= lo.max_tokens
            and all(len(item.seq.block_table) <= lo.max_blocks for item in batch)
        )

    def _view(self, offset: int, n: int) -> torch.Tensor:
        return self.inputs[offset : offset + n]

    def _forward(self, n_tokens: int, n_seqs: int) -> torch.Tensor:
        lo = self.layout
        tables = self._view(lo.tables, lo.max_seqs * lo.max_blocks).view(-1, lo.max_blocks)
        meta = AttentionMetadata(
            slot_mapping=self._view(lo.slots, n_tokens),
            block_tables=tables[:n_seqs],
            seq_lens=self._view(lo.seq_lens, n_seqs),
            query_start_loc=self._view(lo.query_start, n_seqs + 1),
            max_query_len=n_tokens,  # bounds every sequence's queries: the attention grid
            max_seq_len=lo.max_blocks * self.block_size,
        )
        ids, positions = self._view(lo.ids, n_tokens), self._view(lo.positions, n_tokens)
        hidden = self.model(ids, positions, meta, self.kv_caches)
        rows = self._view(lo.sample_rows, n_seqs).long()
        return self.model.compute_logits(hidden[rows])

    def _capture(self, n_tokens: int, n_seqs: int) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
        # the buffer already holds this step's inputs: the warm-up runs write the same K/V
        # at the same slots as the replay will
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):  # warm up: compile kernels, settle the allocator
                self._forward(n_tokens, n_seqs)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            logits = self._forward(n_tokens, n_seqs)
        self.pool = graph.pool()
        return graph, logits

    @torch.inference_mode()
    def run(self, batch: Seq[ScheduledSeq]) -> torch.Tensor:
        """Replay the step; the logits (n_sampled, V) of its sampled sequences, in batch
        order, on the device."""
        n_tokens = sum(item.num_new_tokens for item in batch)
        t_bucket = next(t for t in self.token_buckets if t >= n_tokens)
        s_bucket = next(s for s in self.seq_buckets if s >= len(batch))
        self.copied.synchronize()
        host = self.staging.numpy()
        n_sampled = pack_inputs(
            host, self.layout, batch, self.block_size, self.scratch_block, t_bucket, s_bucket
        )
        self.inputs.copy_(self.staging, non_blocking=True)
        self.copied.record()
        key = (t_bucket, s_bucket)
        if key not in self.graphs:
            self.graphs[key] = self._capture(*key)
        graph, logits = self.graphs[key]
        graph.replay()
        return logits[:n_sampled]
