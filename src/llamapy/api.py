"""The Python API: `LLM(model).generate(prompts, params)`, `.chat(messages)`, streaming."""

from __future__ import annotations

import errno
import os
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from llamapy.embedding import ENCODER_ARCHS, EmbeddingEngine, RerankResult, rank
from llamapy.engine.kv_cache import kv_cache_dtype as parse_kv_cache_dtype
from llamapy.engine.llm_engine import EngineConfig, LLMEngine, RequestOutput, check_device
from llamapy.errors import InsufficientMemoryError, UnsupportedError
from llamapy.formats import GGUFFile, open_model_file
from llamapy.hub import DEFAULT_MODEL, resolve_model
from llamapy.sampling.params import SamplingParams
from llamapy.tokenizer import ChatTemplate, Tokenizer, resolve_chat_template

Message = Mapping[str, Any]


@dataclass(slots=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int = 0

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@dataclass(slots=True)
class CompletionOutput:
    """One finished generation."""

    text: str
    token_ids: list[int]
    finish_reason: str | None
    usage: Usage
    prompt_token_ids: list[int] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class StreamPiece:
    """A streamed fragment: new text and tokens; the last one carries the finish reason."""

    text: str
    token_ids: list[int]
    finish_reason: str | None = None
    usage: Usage | None = None


class LLM:
    """Load a model once; generate from it.

    Args:
        model: a .gguf path, a Hugging Face folder, an alias or hf:ORG/REPO[/FILE].
        n_ctx: tokens one sequence may hold (default: min(4096, the model's context); 0: the
            model's whole context, as llama.cpp's `-c 0`).
        max_num_seqs: sequences generated together.
        n_threads: torch CPU threads (default: all cores).
        chat_template: a named template, a file, or None for the model's own.
        device: "cpu" (default) or "cuda[:N]".
        quantize: a `llamapy quantize` type (Q4_0, Q8_0, Q4_K_M, ...): the weights are
            quantized as they load, with llama.cpp's per-tensor choices; no file is written.
        embedding: load the model for `embed` / `rerank` only (no generation engine, no KV
            cache); encoders (BERT) always are. A generating model embeds too, sharing its
            weights.
        pooling: none, mean, cls, last or rank; None: the model's own (see EmbeddingEngine).
        enforce_eager: no native CPU decode step (models/cpu_step.py: one numba call a
            step where every matmul takes the VNNI kernels), no compiled one
            (models/cpu_compile.py; on by default where a C++ compiler is found, unless
            LLAMAPY_CPU_COMPILE=0) and no CUDA graphs.
        cpu_compile: compile the CPU decode step or not (None: that default) where the
            native step cannot run.
        async_scheduling: launch each decode step before the previous one's tokens are read
            back (the host's work overlaps the GPU's); None: on for CUDA, off on the CPU.
        kv_cache_dtype: the KV cache's element type by llama.cpp's names (`-ctk`): "f16"
            (the default, as llama.cpp's; CUDA's only one), "f32" (the CPU's reference and
            ggml-emulation paths' default: twice the memory, slower at long contexts),
            "bf16" (CPU, the torch layers only).
    """

    def __init__(
        self,
        model: str | os.PathLike[str] | None = None,
        *,
        n_ctx: int | None = None,
        max_num_seqs: int = 8,
        max_num_batched_tokens: int = 512,
        n_threads: int | None = None,
        chat_template: str | None = None,
        device: str = "cpu",
        enable_prefix_caching: bool = True,
        cpu_kernels: str | None = None,
        quantize: str | None = None,
        embedding: bool | None = None,
        pooling: str | None = None,
        enforce_eager: bool = False,
        cpu_compile: bool | None = None,
        async_scheduling: bool | None = None,
        kv_cache_dtype: str | None = None,
    ) -> None:
        if n_threads is not None:
            if not isinstance(n_threads, int) or n_threads <= 0:
                raise ValueError(f"n_threads must be a positive integer, got {n_threads!r}")
            torch.set_num_threads(n_threads)
        if n_ctx is not None and (type(n_ctx) is not int or n_ctx < 0):
            raise ValueError(
                f"n_ctx must be an integer >= 0 (0: the model's context length), got {n_ctx!r}"
            )
        check_device(device)
        kv_dtype = None if kv_cache_dtype is None else parse_kv_cache_dtype(kv_cache_dtype, device)
        t0 = time.perf_counter()
        self.resolved = resolve_model(model or DEFAULT_MODEL)
        self.model_file = open_model_file(self.resolved.path)
        self.config = self.model_file.config
        if isinstance(self.model_file, GGUFFile):  # its metadata, parsed once
            self.tokenizer = Tokenizer.from_metadata(self.model_file.metadata)
        else:
            self.tokenizer = Tokenizer.from_path(self.resolved.path)
        if n_ctx == 0:
            n_ctx = self.config.context_length
        ctx = n_ctx if n_ctx is not None else min(4096, self.config.context_length)
        self._pooling, self._cpu_kernels, self._device = pooling, cpu_kernels, device
        self._embedder: EmbeddingEngine | None = None
        self.engine: LLMEngine | None = None
        if embedding or self.config.arch in ENCODER_ARCHS:  # encoders only embed
            if quantize is not None:
                raise UnsupportedError("quantize is not supported for embedding models")
            self._embedder = self._new_embedder(None, n_ctx)
        else:
            self.engine = self._new_engine(
                EngineConfig(
                    max_model_len=ctx,
                    max_num_seqs=max_num_seqs,
                    max_num_batched_tokens=max_num_batched_tokens,
                    enable_prefix_caching=enable_prefix_caching,
                    device=device,
                    quantize=quantize,
                    async_scheduling=async_scheduling,
                    kv_dtype=kv_dtype,
                    **({"cpu_kernels": cpu_kernels} if cpu_kernels is not None else {}),
                    # no compiled CPU decode step, no CUDA graphs
                    **(
                        {"cpu_compile": False, "cpu_native_step": False, "cuda_graphs": False}
                        if enforce_eager
                        else {}
                    ),
                    **(
                        {"cpu_compile": cpu_compile}
                        if cpu_compile is not None and not enforce_eager
                        else {}
                    ),
                )
            )
        self.chat_template: ChatTemplate | None = resolve_chat_template(
            chat_template,
            model_template=self.model_file.chat_template,
            bos_token=self._piece(self.tokenizer.bos_id),
            eos_token=self._piece(self.tokenizer.eos_id),
        )
        self.load_time = time.perf_counter() - t0

    def _new_engine(self, config: EngineConfig) -> LLMEngine:
        """The generation engine; memory it cannot get (the KV cache of a huge n_ctx) is an
        error naming the context size, not an OSError from an mmap deep inside."""
        try:
            return LLMEngine(self.model_file, self.tokenizer, config)
        except (MemoryError, torch.OutOfMemoryError, OSError) as e:
            if isinstance(e, OSError) and e.errno != errno.ENOMEM:
                raise
            raise InsufficientMemoryError(
                f"not enough memory for the model with a context of {config.max_model_len} "
                f"tokens ({e}); lower the context size (-c / n_ctx; the model was trained "
                f"with {self.config.context_length})"
            ) from None

    def _piece(self, token_id: int | None) -> str:
        return self.tokenizer.id_to_piece(token_id) if token_id is not None else ""

    @property
    def n_ctx(self) -> int:
        if self.engine is None:
            return self.embedder.max_tokens
        return self.engine.config.max_model_len

    def _generation_engine(self) -> LLMEngine:
        if self.engine is None:
            raise UnsupportedError(
                "this model was loaded for embeddings only; it cannot generate text"
            )
        return self.engine

    # -- text <-> tokens -----------------------------------------------------------------

    def tokenize(self, text: str, add_special: bool = True, parse_special: bool = False):
        return self.tokenizer.encode(text, add_special=add_special, parse_special=parse_special)

    def detokenize(self, token_ids: Sequence[int], skip_special: bool = False) -> str:
        return self.tokenizer.decode(token_ids, skip_special=skip_special)

    def apply_chat_template(
        self, messages: Sequence[Message], *, add_generation_prompt: bool = True, **kwargs: Any
    ) -> list[int]:
        """Render messages with the chat template and tokenize them (special tokens parsed;
        BOS added only when the template does not write it itself)."""
        if self.chat_template is None:
            raise ValueError("this model has no chat template; pass chat_template= (e.g. 'chatml')")
        text = self.chat_template.render(
            list(messages), add_generation_prompt=add_generation_prompt, **kwargs
        )
        bos = self._piece(self.tokenizer.bos_id)
        add_bos = not (bos and text.startswith(bos))
        ids = self.tokenizer.encode(text, add_special=False, parse_special=True)
        if add_bos and self.tokenizer.add_bos and self.tokenizer.bos_id is not None:
            ids = [self.tokenizer.bos_id, *ids]
        return ids

    # -- generation ---------------------------------------------------------------------

    def _prompt_ids(self, prompt: str | Sequence[int]) -> list[int]:
        if isinstance(prompt, str):
            return self.tokenize(prompt)
        return [int(t) for t in prompt]

    def generate(
        self,
        prompts: str | Sequence[int] | Sequence[str | Sequence[int]],
        params: SamplingParams | Sequence[SamplingParams] | None = None,
    ) -> list[CompletionOutput]:
        """Generate for each prompt (text or token ids); all run as one continuous batch."""
        if isinstance(prompts, str) or (
            isinstance(prompts, Sequence) and prompts and isinstance(prompts[0], int)
        ):
            prompts = [prompts]  # type: ignore[list-item]
        prompts = list(prompts)  # type: ignore[arg-type]
        if isinstance(params, SamplingParams) or params is None:
            params = [params or SamplingParams()] * len(prompts)
        if len(params) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(params)} sampling params")
        ids = [self._prompt_ids(p) for p in prompts]
        self._generation_engine()
        rids = [self.engine.add_request(i, p) for i, p in zip(ids, params, strict=True)]
        results = self._collect(rids)
        for out, prompt_ids in zip(results, ids, strict=True):
            out.prompt_token_ids = prompt_ids
            out.usage.prompt_tokens = len(prompt_ids)
        return results

    def _collect(self, rids: list[str]) -> list[CompletionOutput]:
        texts = {r: [] for r in rids}
        tokens: dict[str, list[int]] = {r: [] for r in rids}
        last: dict[str, RequestOutput] = {}
        try:
            while self.engine.has_unfinished_requests():
                for o in self.engine.step():
                    texts[o.request_id].append(o.text)
                    tokens[o.request_id].extend(o.token_ids)
                    last[o.request_id] = o
        except BaseException:
            for r in rids:
                self.engine.abort_request(r)
            raise
        return [self._completion(r, "".join(texts[r]), tokens[r], last.get(r)) for r in rids]

    @staticmethod
    def _completion(rid: str, text: str, tokens: list[int], o: RequestOutput | None):
        usage = Usage(
            o.num_prompt_tokens if o else 0,
            o.num_output_tokens if o else 0,
            o.num_cached_tokens if o else 0,
        )
        return CompletionOutput(text, tokens, o.finish_reason if o else "length", usage)

    def stream(
        self, prompt: str | Sequence[int], params: SamplingParams | None = None
    ) -> Iterator[StreamPiece]:
        """Yield text as it is generated; closing the iterator cancels the request."""
        rid = self._generation_engine().add_request(
            self._prompt_ids(prompt), params or SamplingParams()
        )
        try:
            while self.engine.has_unfinished_requests():
                for o in self.engine.step():
                    if o.request_id != rid:
                        continue
                    usage = None
                    if o.finished:
                        usage = Usage(o.num_prompt_tokens, o.num_output_tokens, o.num_cached_tokens)
                    yield StreamPiece(o.text, o.token_ids, o.finish_reason, usage)
                    if o.finished:
                        return
        finally:
            self.engine.abort_request(rid)

    def chat(
        self,
        messages: Sequence[Message],
        params: SamplingParams | None = None,
        *,
        stream: bool = False,
        **template_kwargs: Any,
    ) -> CompletionOutput | Iterator[StreamPiece]:
        ids = self.apply_chat_template(messages, **template_kwargs)
        if stream:
            return self.stream(ids, params)
        return self.generate([ids], params)[0]

    # -- embeddings and reranking --------------------------------------------------------

    def _new_embedder(self, model: torch.nn.Module | None, n_ctx: int | None) -> EmbeddingEngine:
        kernels = self._cpu_kernels or os.environ.get("LLAMAPY_CPU_KERNELS", "fast")
        return EmbeddingEngine(
            self.model_file,
            self.tokenizer,
            pooling=self._pooling,
            device=self._device,
            cpu_kernels=kernels,
            model=model,
            max_tokens=n_ctx,
        )

    @property
    def embedder(self) -> EmbeddingEngine:
        """The embedding engine (a generating model's shares its weights)."""
        if self._embedder is None:
            engine = self._generation_engine()
            self._embedder = self._new_embedder(engine.runner.model, engine.config.max_model_len)
        return self._embedder

    def embed(
        self,
        texts: str | Sequence[str],
        *,
        normalize: bool | int | None = None,
        pooling: str | None = None,
        truncate: bool = False,
    ) -> torch.Tensor | list[torch.Tensor]:
        """Embeddings of `texts`, many per forward pass: (D,) for one text, (B, D) for a list;
        pooling "none" gives each text's (L, D) token vectors.

        Args:
            normalize: True: L2; False: none; an int: llama.cpp's embd_normalize (-1 none,
                0 max-absolute, 2 L2, p > 0 p-norm); None: the model's default (L2 unless a
                sentence-transformers folder has no Normalize module).
            pooling: override the model's pooling for this call.
            truncate: cut texts longer than the model takes (else ContextLengthError).
        """
        single = isinstance(texts, str)
        items = [texts] if single else list(texts)
        p = (2 if normalize else -1) if isinstance(normalize, bool) else normalize
        vectors = self.embedder.embed_texts(
            items, normalize_p=p, pooling=pooling, truncate=truncate
        )
        if (pooling or self.embedder.pooling) == "none":
            return vectors[0] if single else vectors
        stacked = torch.stack(vectors) if vectors else torch.empty(0, self.config.hidden_size)
        return stacked[0] if single else stacked

    def rerank(
        self,
        query: str,
        documents: Sequence[str],
        *,
        top_n: int | None = None,
        truncate: bool = False,
    ) -> list[RerankResult]:
        """Documents by relevance to `query`, best first (at most top_n): a cross-encoder's raw
        score, or a decoder's p("yes") (Qwen3-Reranker style)."""
        docs = list(documents)
        scores = self.embedder.rerank_scores(query, docs, truncate=truncate)
        return rank(scores, docs, top_n)
