"""EmbeddingEngine: texts -> pooled vectors, (query, document) pairs -> relevance scores.

Many sequences go through one forward pass (flattened, no padding; see batch.py). Encoders
(BERT) and decoders (the llama family, as llama.cpp's --embedding) share the code:

- embeddings: the final hidden states (after the decoder's output norm, llama.cpp's
  `result_norm`), pooled per sequence (none / mean / cls / last), optionally normalised;
- reranking: a cross-encoder pools its [CLS] [query] [SEP] [document] [SEP] pass and
  applies its classification head (the raw score, as llama.cpp); a decoder reads its last
  token's "yes" / "no" logits (Qwen3-Reranker style: the GGUF's `cls.output` rows when the
  converter extracted them, else the LM head's) and scores p(yes) = softmax([yes, no])[0].
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from llamapy.config import ENCODER_ARCHS
from llamapy.embedding.batch import (
    SCRATCH_BLOCK_SIZE,
    EncoderInput,
    FlatBatch,
    flatten,
    scratch_kv_cache,
    split_batches,
)
from llamapy.embedding.pooling import POOLING_TYPES, normalize, pool, split_tokens
from llamapy.errors import ContextLengthError, LlamapyError, UnsupportedError
from llamapy.formats import GGUFFile, HFFolder
from llamapy.kernels.cpu.malloc import mapped_while_loading, tune_malloc
from llamapy.layers.linear import QLinear
from llamapy.layers.norm import rms_norm
from llamapy.models import CAUSAL_LM_CLASSES, build_causal_lm
from llamapy.models.bert import BertModel
from llamapy.models.weights import Weights
from llamapy.tokenizer import Tokenizer

logger = logging.getLogger(__name__)

# Qwen3-Reranker's prompt (llama.cpp's converter writes it as the GGUF's "rerank" template).
DEFAULT_RERANK_TEMPLATE = (
    "<|im_start|>system\nJudge whether the Document meets the requirements based on the Query "
    'and the Instruct provided. Note that the answer can only be "yes" or "no".<|im_end|>\n'
    "<|im_start|>user\n<Instruct>: Given a web search query, retrieve relevant passages that "
    "answer the query\n<Query>: {query}\n<Document>: {document}<|im_end|>\n"
    "<|im_start|>assistant\n<think>\n\n</think>\n\n"
)
RERANK_TEMPLATE_KEY = "tokenizer.chat_template.rerank"


class EmbeddingEngine:
    """Load (or share) a model and encode batches of sequences with it.

    Args:
        model_file: the opened file; its config picks encoder or decoder.
        tokenizer: the model's tokenizer.
        pooling: none, mean, cls, last or rank; None: the model's own (a sentence-transformers
            folder's Pooling module or the GGUF's pooling type), else rank for a cross-encoder,
            mean for other encoders and last for decoders.
        model: an already prepared decoder to share (the generation engine's), or None.
        max_tokens: the longest sequence accepted (default: the model's context, or a
            sentence-transformers folder's max_seq_length).
        max_batch_tokens / max_batch_seqs: the size of one forward pass.
    """

    def __init__(
        self,
        model_file: GGUFFile | HFFolder,
        tokenizer: Tokenizer,
        *,
        pooling: str | None = None,
        device: str | torch.device = "cpu",
        cpu_kernels: str = "fast",
        model: torch.nn.Module | None = None,
        max_tokens: int | None = None,
        max_batch_tokens: int = 8192,
        max_batch_seqs: int = 256,
    ) -> None:
        if pooling is not None and pooling not in POOLING_TYPES:
            raise ValueError(f"pooling must be one of {', '.join(POOLING_TYPES)}, got {pooling!r}")
        for name, value in (
            ("max_batch_tokens", max_batch_tokens),
            ("max_batch_seqs", max_batch_seqs),
        ):
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        self.config = cfg = model_file.config
        self.tokenizer = tokenizer
        self.device = torch.device(device)
        if self.device.type == "cpu":  # batch scratch from a warm heap (kernels/cpu/malloc)
            tune_malloc()
        self.is_encoder = cfg.arch in ENCODER_ARCHS
        if not self.is_encoder and cfg.arch not in CAUSAL_LM_CLASSES:
            raise UnsupportedError(f"architecture {cfg.arch!r} cannot embed")
        self.max_batch_tokens, self.max_batch_seqs = max_batch_tokens, max_batch_seqs
        self.model = model if model is not None else self._build(model_file, cpu_kernels)
        self.cls_out = None if self.is_encoder else self._decoder_head(model_file)
        st = _sentence_transformers_settings(model_file)
        self.pooling = pooling or cfg.pooling or self._default_pooling()
        self.default_normalize = st.get("normalize", True)
        self.max_tokens = min(
            max_tokens or cfg.context_length, st.get("max_seq_length") or cfg.context_length
        )
        self.rerank_template = _rerank_template(model_file)
        # Matryoshka models may be cut to fewer dimensions: None (not supported), () (any
        # size), or the sizes the model was trained for (config.json, as vLLM reads it).
        self.matryoshka_dimensions = _matryoshka(model_file)
        if self.pooling == "rank" and not self.is_reranker:
            raise UnsupportedError(
                "this model has no classification head: it cannot rerank (pooling 'rank')"
            )
        self._prefix, self._suffix = self._special_tokens()
        self._kv_dtype = torch.float16 if self.device.type == "cuda" else torch.float32

    # -- construction ---------------------------------------------------------------------

    def _build(self, model_file: GGUFFile | HFFolder, cpu_kernels: str) -> torch.nn.Module:
        cpu = self.device.type == "cpu"
        with mapped_while_loading() if cpu else contextlib.nullcontext():  # kernels/cpu/malloc
            model = (
                BertModel(Weights(model_file)).eval()
                if self.is_encoder
                else build_causal_lm(model_file)
            )
            repacks = self.device.type == "cuda" or cpu_kernels == "fast"
            model.prepare(
                self.device,
                cpu_kernels=cpu_kernels,
                release_pages=model_file.release_pages if repacks else None,
            )
        return model

    def _decoder_head(self, model_file: GGUFFile | HFFolder) -> QLinear | None:
        """A reranker GGUF's `cls.output` (the LM head's "yes" and "no" rows), if present."""
        w = Weights(model_file)
        weight = w.q_opt("cls.output.weight")
        if weight is None:
            return None
        head = QLinear(weight, w.f32_opt("cls.output.bias"))
        head.prepare(self.device, "reference")
        return head

    def _default_pooling(self) -> str:
        if self.is_encoder:
            return "rank" if self.model.has_classifier else "mean"
        return "last"

    def _special_tokens(self) -> tuple[list[int], list[int]]:
        """What encode(add_special=True) puts before and after a text ([CLS] / [SEP], BOS /
        EOS), found by encoding the empty text."""
        ids = self.tokenizer.encode("", add_special=True)
        bos = self.tokenizer.bos_id
        if ids and ids[0] == bos:
            return ids[:1], ids[1:]
        return [], ids

    @property
    def hidden_size(self) -> int:
        return self.config.hidden_size

    @property
    def is_reranker(self) -> bool:
        if self.is_encoder:
            return self.model.has_classifier
        return True  # a decoder scores with its yes / no logits

    # -- inputs ---------------------------------------------------------------------------

    def text_input(self, text: str, *, truncate: bool = False) -> EncoderInput:
        """A text as the model embeds it: special tokens added, checked against max_tokens
        (or cut to it, keeping the special tokens)."""
        body = self.tokenizer.encode(text, add_special=False)
        room = self.max_tokens - len(self._prefix) - len(self._suffix)
        if len(body) > room:
            if not truncate:
                raise ContextLengthError(
                    f"the input has {len(body) + len(self._prefix) + len(self._suffix)} tokens "
                    f"but the model takes at most {self.max_tokens}; shorten it or truncate"
                )
            body = body[: max(room, 0)]
        return EncoderInput(self._prefix + body + self._suffix)

    def ids_input(self, token_ids: Sequence[int]) -> EncoderInput:
        """Token ids given by the caller, used as they are."""
        ids = [int(t) for t in token_ids]
        if not ids:
            raise ValueError("an input has no tokens")
        vocab = self.config.vocab_size
        bad = [t for t in ids if not 0 <= t < vocab]
        if bad:
            raise ValueError(f"token id {bad[0]} is outside the vocabulary (0..{vocab - 1})")
        if len(ids) > self.max_tokens:
            raise ContextLengthError(
                f"the input has {len(ids)} tokens but the model takes at most {self.max_tokens}"
            )
        return EncoderInput(ids)

    def pair_input(self, query: str, document: str, *, truncate: bool = False) -> EncoderInput:
        """A (query, document) pair as the reranker reads it."""
        if not self.is_encoder:
            prompt = self.rerank_template.replace("{query}", query).replace("{document}", document)
            ids = self.tokenizer.encode(prompt, add_special=False, parse_special=True)
            if len(ids) > self.max_tokens:
                raise ContextLengthError(
                    f"the query and document take {len(ids)} tokens but the model takes at most "
                    f"{self.max_tokens}"
                )
            return EncoderInput(ids)
        q = self.tokenizer.encode(query, add_special=False)
        d = self.tokenizer.encode(document, add_special=False)
        room = self.max_tokens - len(self._prefix) - 2 * len(self._suffix)
        if len(q) + len(d) > room:
            if not truncate:
                raise ContextLengthError(
                    f"the query and document take {len(q) + len(d) + self.max_tokens - room} "
                    f"tokens but the model takes at most {self.max_tokens}; shorten them or "
                    f"truncate"
                )
            q, d = _truncate_longest_first(q, d, room)
        first = self._prefix + q + self._suffix
        second = d + self._suffix
        types = [0] * len(first) + [1] * len(second)
        return EncoderInput(first + second, types if self.model.num_token_types > 1 else None)

    # -- forward passes -------------------------------------------------------------------

    @torch.inference_mode()
    def encode(
        self, inputs: Sequence[EncoderInput], pooling: str | None = None
    ) -> list[torch.Tensor]:
        """Each input's pooled vector (D,) (pooling "none": its (L, D) token vectors; "rank":
        its classifier outputs), not normalised, float32 on the CPU."""
        pooling = pooling or self.pooling
        if pooling not in POOLING_TYPES:
            raise ValueError(f"pooling must be one of {', '.join(POOLING_TYPES)}, got {pooling!r}")
        if pooling == "rank" and not self.is_reranker:
            raise UnsupportedError(
                "this model has no classification head: it cannot rerank (pooling 'rank')"
            )
        out: list[torch.Tensor | None] = [None] * len(inputs)
        for idx in split_batches(inputs, self.max_batch_tokens, self.max_batch_seqs):
            batch = flatten([inputs[i] for i in idx], self.device)
            results = self._pooled(batch, pooling)
            for i, r in zip(idx, results, strict=True):
                out[i] = r
        return out  # type: ignore[return-value]

    def _pooled(self, batch: FlatBatch, pooling: str) -> list[torch.Tensor]:
        hidden = self._hidden(batch)  # (T, D)
        if pooling == "none":
            return [t.float().cpu() for t in split_tokens(hidden, batch.seq_lens)]
        if pooling == "rank":
            return list(self._scores(hidden, batch).float().cpu())
        return list(pool(hidden, batch.seq_lens, pooling).float().cpu())

    def _hidden(self, batch: FlatBatch) -> torch.Tensor:
        """Final hidden states (T, D) of a flattened batch."""
        cfg = self.config
        if self.is_encoder:
            kv = None
            if self.device.type == "cuda":  # the Triton kernels read K/V from a scratch cache
                kv = self._scratch(batch, cfg.num_heads, cfg.head_dim, cfg.head_dim)
            return self.model(
                batch.input_ids, batch.positions, batch.meta, kv, batch.token_type_ids
            )
        kv = self._scratch(batch, cfg.num_kv_heads, cfg.head_dim, cfg.v_head_dim or cfg.head_dim)
        hidden = self.model(batch.input_ids, batch.positions, batch.meta, [kv] * cfg.num_layers)
        return rms_norm(hidden, self.model.norm, cfg.norm_eps)  # llama.cpp's result_norm

    def _scratch(self, batch: FlatBatch, n_kv: int, d: int, dv: int):
        return scratch_kv_cache(
            batch.num_blocks, n_kv, d, dv, self._kv_dtype, self.device, SCRATCH_BLOCK_SIZE
        )

    def _scores(self, hidden: torch.Tensor, batch: FlatBatch) -> torch.Tensor:
        """(B, n_out) rank-pooling outputs."""
        if self.is_encoder:
            return self.model.classify(pool(hidden, batch.seq_lens, "cls"))
        last = pool(hidden, batch.seq_lens, "last")  # already through the output norm
        if self.cls_out is not None:
            logits = self.cls_out(last)  # rows: yes, no
        else:
            yes_no = torch.tensor(self._yes_no_ids(), device=hidden.device)
            logits = self.model.lm_head(last)[:, yes_no]
            cap = self.config.final_logit_softcap
            if cap:
                logits = torch.tanh(logits / cap) * cap
        return torch.softmax(logits.float(), dim=-1)

    def _yes_no_ids(self) -> list[int]:
        ids = []
        for word in ("yes", "no"):
            found = [self.tokenizer.piece_to_id(p) for p in (word, "▁" + word, "Ġ" + word)]
            found = [t for t in found if t is not None]
            if not found:
                raise UnsupportedError(f"the vocabulary has no {word!r} token: cannot rerank")
            ids.append(found[0])
        return ids

    # -- conveniences ---------------------------------------------------------------------

    def embed_texts(
        self,
        texts: Sequence[str],
        *,
        normalize_p: int | None = None,
        pooling: str | None = None,
        truncate: bool = False,
    ) -> list[torch.Tensor]:
        """Pooled (and normalised: p as llama.cpp's embd_normalize; None: the model's
        default, L2 or none) vectors of `texts`."""
        inputs = [self.text_input(t, truncate=truncate) for t in texts]
        vectors = self.encode(inputs, pooling)
        return self.normalized(vectors, normalize_p, pooling or self.pooling)

    def normalized(
        self, vectors: list[torch.Tensor], normalize_p: int | None, pooling: str
    ) -> list[torch.Tensor]:
        if pooling in ("none", "rank"):  # as llama.cpp: only pooled embeddings are normalised
            return vectors
        p = normalize_p if normalize_p is not None else (2 if self.default_normalize else -1)
        return [normalize(v, p) for v in vectors]

    def check_dimensions(self, dimensions: int) -> None:
        """ValueError unless the pooled vectors may be cut to `dimensions`."""
        allowed = self.matryoshka_dimensions
        if allowed is None:
            raise ValueError("this model does not support 'dimensions' (it is not Matryoshka)")
        if not 0 < dimensions <= self.hidden_size or (allowed and dimensions not in allowed):
            sizes = ", ".join(map(str, allowed)) if allowed else f"1..{self.hidden_size}"
            raise ValueError(f"dimensions must be one of {sizes}, got {dimensions}")

    def rerank_scores(
        self, query: str, documents: Sequence[str], *, truncate: bool = False
    ) -> list[float]:
        """The relevance score of each document for `query`, in the documents' order."""
        if not self.is_reranker:
            raise UnsupportedError(
                "this model has no classification head: it cannot rerank (pooling 'rank')"
            )
        inputs = [self.pair_input(query, d, truncate=truncate) for d in documents]
        return [float(s[0]) for s in self.encode(inputs, "rank")]


def _truncate_longest_first(q: list[int], d: list[int], room: int) -> tuple[list[int], list[int]]:
    """The `tokenizers` library's "longest_first" for a pair: the longer side is cut first;
    when both pass room / 2 each gets half, the second the odd token."""
    nq, nd = len(q), len(d)
    if nq + nd <= room:
        return q, d
    short = min(nq, nd)
    if short > room // 2:
        short, long = room // 2, room // 2 + room % 2
    else:
        long = room - short
    nq, nd = (short, long) if nq <= nd else (long, short)
    return q[:nq], d[:nd]


def _sentence_transformers_settings(model_file: GGUFFile | HFFolder) -> dict:
    """max_seq_length (sentence_bert_config.json) and whether modules.json ends with a
    Normalize module, for sentence-transformers folders; {} otherwise."""
    if not isinstance(model_file, HFFolder):
        return {}
    path: Path = model_file.path
    settings: dict = {}
    modules = path / "modules.json"
    if modules.is_file():
        try:
            entries = json.loads(modules.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as e:
            raise LlamapyError(f"cannot read {modules}: {e}") from None
        types = [str(m.get("type", "")) for m in entries if isinstance(m, dict)]
        settings["normalize"] = any(t.endswith("models.Normalize") for t in types)
    st_config = path / "sentence_bert_config.json"
    if st_config.is_file():
        try:
            value = json.loads(st_config.read_text(encoding="utf-8")).get("max_seq_length")
        except (OSError, json.JSONDecodeError) as e:
            raise LlamapyError(f"cannot read {st_config}: {e}") from None
        if isinstance(value, int) and value > 0:
            settings["max_seq_length"] = value
    return settings


def _matryoshka(model_file: GGUFFile | HFFolder) -> tuple[int, ...] | None:
    if not isinstance(model_file, HFFolder):
        return None
    cfg = model_file.hf_config
    dims = cfg.get("matryoshka_dimensions")
    if isinstance(dims, list) and all(isinstance(d, int) and d > 0 for d in dims):
        return tuple(dims)
    return () if cfg.get("is_matryoshka") else None


def _rerank_template(model_file: GGUFFile | HFFolder) -> str:
    if isinstance(model_file, GGUFFile):
        template = model_file.metadata.get(RERANK_TEMPLATE_KEY)
        if isinstance(template, str):
            return template
    return DEFAULT_RERANK_TEMPLATE


@dataclass(frozen=True, slots=True)
class RerankResult:
    """One document's place in a reranking: its index in the request, its score."""

    index: int
    score: float
    document: str | None = None


def rank(
    scores: Sequence[float], documents: Sequence[str] | None = None, top_n: int | None = None
) -> list[RerankResult]:
    """Results sorted by score, best first (ties keep the documents' order), the first top_n."""
    if top_n is not None and top_n < 0:
        raise ValueError(f"top_n must be >= 0, got {top_n}")
    order = sorted(range(len(scores)), key=lambda i: -scores[i])
    return [
        RerankResult(i, scores[i], documents[i] if documents is not None else None)
        for i in order[:top_n]
    ]
