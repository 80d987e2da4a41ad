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
    ) -> None:
        self.model = model
        self.device = torch.device(device)
        self.block_size = block_size
        self.kv_caches = allocate_kv_cache(model.config, num_blocks, block_size, kv_dtype, device)
        self.sampler = Sampler(sorted(eog_token_ids))
        self._generators: dict[int, torch.Generator] = {}

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
        input_ids, positions, meta, sample_rows = self.prepare(batch, block_manager)
        hidden = self.model(input_ids, positions, meta, self.kv_caches)
        sampled_items = [item for item in batch if item.needs_sample]
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
