"""Teacher-forced scoring: the logits of every position of one token sequence, and the
statistics llama.cpp's `llama-perplexity` derives from them (perplexity, KL divergence).

The engine only samples each sequence's last token; scoring runs the model forward directly
over a fresh paged KV cache that holds this one sequence, prefilled in batches.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch

from llamapy.engine.kv_cache import DEFAULT_BLOCK_SIZE, allocate_kv_cache
from llamapy.layers.attention import AttentionMetadata
from llamapy.models.llama import LlamaForCausalLM


def _causal_lm(llm_or_model) -> LlamaForCausalLM:
    """The model of an `LLM` (its engine's runner) or the model itself."""
    engine = getattr(llm_or_model, "engine", None)
    return engine.runner.model if engine is not None else llm_or_model


def _cache_dtype(llm_or_model) -> torch.dtype:
    """An `LLM`'s KV cache type (`-ctk`: float16 by default), float32 for a bare model."""
    engine = getattr(llm_or_model, "engine", None)
    return engine.runner.kv_caches[0][0].dtype if engine is not None else torch.float32


def _one_sequence_metadata(
    start: int, end: int, block_size: int, device: torch.device | None = None
) -> AttentionMetadata:
    """Tokens start..end-1 of the only sequence; its blocks are 0, 1, 2, ... in order."""
    num_blocks = -(-end // block_size)
    return AttentionMetadata(
        slot_mapping=torch.arange(start, end, dtype=torch.int64, device=device),
        block_tables=torch.arange(num_blocks, dtype=torch.int32, device=device)[None, :],
        seq_lens=torch.tensor([end], dtype=torch.int32, device=device),
        query_start_loc=torch.tensor([0, end - start], dtype=torch.int32, device=device),
        max_query_len=end - start,
        max_seq_len=end,
        seq_lens_host=(end,),
        query_start_loc_host=(0, end - start),
    )


@torch.inference_mode()
def iter_logits(
    llm_or_model,
    token_ids: Sequence[int],
    *,
    batch_size: int = 512,
    logits_from: int = 0,
    kv_dtype: torch.dtype | None = None,
    block_size: int = DEFAULT_BLOCK_SIZE,
) -> Iterator[tuple[int, torch.Tensor]]:
    """Prefill `token_ids` as one sequence in batches of `batch_size` tokens; for each batch
    that reaches position `logits_from`, yield (first position, logits (n, V) float32) of
    its positions >= logits_from. Row i predicts token i + 1 (as llama_get_logits_ith).
    kv_dtype: the fresh cache's type (None: the LLM's, `_cache_dtype`)."""
    if batch_size <= 0:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size}")
    num_tokens = len(token_ids)
    if not 0 <= logits_from <= num_tokens:
        raise ValueError(f"logits_from must be in [0, {num_tokens}], got {logits_from}")
    model = _causal_lm(llm_or_model)
    device = model.embed.device
    ids = torch.as_tensor(list(token_ids), dtype=torch.int64, device=device)
    num_blocks = max(1, -(-num_tokens // block_size))
    kv_dtype = kv_dtype or _cache_dtype(llm_or_model)
    kv_caches = allocate_kv_cache(model.config, num_blocks, block_size, kv_dtype, device)
    for start in range(0, num_tokens, batch_size):
        end = min(start + batch_size, num_tokens)
        meta = _one_sequence_metadata(start, end, block_size, device)
        positions = torch.arange(start, end, device=device)
        hidden = model(ids[start:end], positions, meta, kv_caches)  # (n, D)
        if end > logits_from:
            first = max(start, logits_from)
            logits = model.compute_logits(hidden[first - start :])  # (n', V)
            yield first, logits.float().cpu()


def score_tokens(
    llm_or_model,
    token_ids: Sequence[int],
    *,
    batch_size: int = 512,
    logits_from: int = 0,
    kv_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Teacher-forced logits (T - logits_from, V) float32 of one sequence: row i holds the
    model's prediction for token logits_from + i + 1, given every token before it.

    A fresh KV cache serves each call; the prompt is prefilled in batches of `batch_size`
    (llama.cpp's -b), so the result is what a single llama_decode per batch would give.
    """
    parts = [
        logits
        for _, logits in iter_logits(
            llm_or_model,
            token_ids,
            batch_size=batch_size,
            logits_from=logits_from,
            kv_dtype=kv_dtype,
        )
    ]
    if not parts:
        return torch.empty(0, 0)
    return torch.cat(parts)


def token_nll(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """-log softmax(logits)[target] per row, (n,) float64 (llama.cpp sums exp in double)."""
    logits = logits.double()
    return torch.logsumexp(logits, dim=-1) - logits.gather(-1, targets.long()[:, None])[:, 0]


@dataclass(slots=True)
class PerplexityStats:
    """Running sums of the negative log-likelihood, as `perplexity()` in llama.cpp's
    tools/perplexity/perplexity.cpp keeps them (nll, nll2, count)."""

    nll_sum: float = 0.0
    nll2_sum: float = 0.0
    count: int = 0

    def add(self, nll: torch.Tensor) -> None:
        nll = nll.double()
        self.nll_sum += float(nll.sum())
        self.nll2_sum += float((nll * nll).sum())
        self.count += int(nll.numel())

    @property
    def nll_mean(self) -> float:
        return self.nll_sum / self.count if self.count else math.nan

    @property
    def ppl(self) -> float:
        return math.exp(self.nll_mean)

    @property
    def ppl_stderr(self) -> float:
        """The standard error llama.cpp prints after `+/-`: ppl * sqrt(var(nll) / (n - 1));
        NaN where that variance is not positive (llama.cpp logs an error instead)."""
        if self.count < 2:
            return math.nan
        var = self.nll2_sum / self.count - self.nll_mean**2
        return self.ppl * math.sqrt(var / (self.count - 1)) if var > 0 else math.nan


def chunk_for_perplexity(
    tokens: Sequence[int], chunk: int, n_ctx: int, bos_id: int | None
) -> list[int]:
    """Chunk `chunk` of n_ctx tokens with its first token replaced by BOS when the model
    adds one (llama.cpp's perplexity: `tokens[seq_start] = llama_vocab_bos(vocab)`)."""
    ids = list(tokens[chunk * n_ctx : (chunk + 1) * n_ctx])
    if bos_id is not None:
        ids[0] = bos_id
    return ids


def kl_divergence_topk(
    ref_ids: torch.Tensor, ref_logprobs: torch.Tensor, logits: torch.Tensor
) -> torch.Tensor:
    """KL(ref || model) per row, (n,) float64, from the reference's top-K only.

    The reference keeps `ref_ids` / `ref_logprobs` (n, K); the rest of its mass is lumped
    into one tail bucket, and the model's distribution (from `logits` (n, V)) is lumped over
    the same tokens. By the data-processing inequality this is a lower bound of the exact
    KL; with K >= 128 the gap is small where the reference is confident.
    """
    logq = torch.log_softmax(logits.double(), dim=-1)
    logq_k = logq.gather(-1, ref_ids.long())  # (n, K)
    logp_k = ref_logprobs.double()
    p_k = logp_k.exp()
    p_tail = (1.0 - p_k.sum(-1)).clamp_min(0.0)
    q_tail = (1.0 - logq_k.exp().sum(-1)).clamp_min(1e-30)
    head = (p_k * (logp_k - logq_k)).sum(-1)
    tail = torch.where(p_tail > 0, p_tail * (p_tail.clamp_min(1e-30).log() - q_tail.log()), 0.0)
    return head + tail


def kl_divergence(ref_logits: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """Exact KL(softmax(ref) || softmax(model)) per row, (n,) float64."""
    logp = torch.log_softmax(ref_logits.double(), dim=-1)
    logq = torch.log_softmax(logits.double(), dim=-1)
    return (logp.exp() * (logp - logq)).sum(-1)


def perplexity(
    llm_or_model,
    tokens: Sequence[int],
    *,
    n_ctx: int,
    n_chunks: int,
    bos_id: int | None,
    batch_size: int = 512,
    on_chunk: Callable[[int, PerplexityStats], None] | None = None,
) -> PerplexityStats:
    """llama.cpp's `perplexity()` over the first `n_chunks` chunks of n_ctx tokens: each
    chunk on an empty KV cache, BOS first (when `bos_id` is given), and only positions
    n_ctx/2 .. n_ctx-2 scored, each against the next token. `on_chunk(i, stats)` sees the
    running sums after chunk i."""
    if n_chunks * n_ctx > len(tokens):
        raise ValueError(f"{n_chunks} chunks of {n_ctx} need more than {len(tokens)} tokens")
    first = n_ctx // 2
    stats = PerplexityStats()
    for i in range(n_chunks):
        ids = chunk_for_perplexity(tokens, i, n_ctx, bos_id)
        targets = torch.tensor(ids, dtype=torch.int64)
        for pos, logits in iter_logits(llm_or_model, ids, batch_size=batch_size, logits_from=first):
            n = min(logits.shape[0], n_ctx - 1 - pos)  # the last position has no target
            if n > 0:
                stats.add(token_nll(logits[:n], targets[pos + 1 : pos + 1 + n]))
        if on_chunk is not None:
            on_chunk(i, stats)
    return stats
