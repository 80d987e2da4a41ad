"""LLMEngine: requests in, streamed outputs out; one `step()` runs one batch.

step: scheduler.schedule() -> model_runner.run() -> scheduler.postprocess() -> outputs
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import time
from dataclasses import dataclass, field

import torch

from llamapy.engine.block_manager import BlockManager
from llamapy.engine.kv_cache import DEFAULT_BLOCK_SIZE, default_kv_dtype, kv_bytes_per_block
from llamapy.engine.model_runner import (
    ModelRunner,
    PendingStep,
    SampledToken,
    launchable,
    plain_greedy,
)
from llamapy.engine.output import TextStream
from llamapy.engine.scheduler import Scheduler, SchedulerConfig
from llamapy.engine.sequence import PENDING, FinishReason, Sequence
from llamapy.errors import ContextLengthError, InsufficientMemoryError
from llamapy.kernels.cpu.malloc import mapped_while_loading
from llamapy.layers.linear import CPU_KERNELS
from llamapy.models import build_causal_lm
from llamapy.models.cpu_compile import compile_enabled_by_default
from llamapy.sampling.dry import DryVocab
from llamapy.sampling.params import SamplingParams
from llamapy.structured.matcher import GrammarCompiler
from llamapy.tokenizer import Tokenizer

logger = logging.getLogger(__name__)

# GPU memory a model's optional larger weight forms (`models.llama.gpu_kquant_twins`) leave
# free beside the KV cache: a step's activations, logits, CUDA graphs' buffers and the
# dequantize path's 16-bit weight copies.
GPU_WORKING_BYTES = 1 << 30


def _ram_and_swap() -> int | None:
    """The machine's memory and swap in bytes (Linux; else RAM alone where sysconf knows it)."""
    try:
        with open("/proc/meminfo") as f:
            fields = dict(line.split(":", 1) for line in f)
        return sum(int(fields[k].split()[0]) * 1024 for k in ("MemTotal", "SwapTotal"))
    except (OSError, KeyError, ValueError):
        pass
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):
        return None


def check_kv_fits(kv_bytes: int, tokens: int, device: torch.device) -> None:
    """A KV cache larger than the device could ever hold (the GPU's free memory; the CPU's
    RAM and swap, beyond which Linux refuses the cache's mapping anyway, though its pages
    become resident only as tokens fill it) is an InsufficientMemoryError naming the context
    size, before anything is allocated (the block tables alone of a billion-token context
    take gigabytes)."""
    if device.type == "cuda":
        have, what = torch.cuda.mem_get_info(device)[0], "free on the GPU"
    else:
        have, what = _ram_and_swap(), "of RAM and swap"
        if have is None:  # not known here: the allocation itself will tell
            return
    if kv_bytes > have:
        raise InsufficientMemoryError(
            f"the KV cache of a {tokens}-token context needs {kv_bytes / 2**30:.1f} GiB, more "
            f"than the {have / 2**30:.1f} GiB {what}; lower the context size (-c / n_ctx)"
        )


def check_device(device: str) -> None:
    """`cpu` or `cuda[:N]` naming a GPU this process can see; a clear error otherwise."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"device must be 'cpu' or 'cuda[:N]', got {device!r}") from e
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {device!r}: no CUDA GPU is available to this process")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(
                f"device {device!r}: only {torch.cuda.device_count()} CUDA device(s) visible"
            )
    elif dev.type != "cpu":
        raise ValueError(f"device must be 'cpu' or 'cuda[:N]', got {device!r}")


@dataclass(frozen=True, slots=True)
class EngineConfig:
    max_model_len: int = 4096  # tokens one sequence may hold (prompt + output)
    max_num_seqs: int = 8
    max_num_batched_tokens: int = 512  # per step; longer prompts are prefilled in chunks
    kv_cache_tokens: int | None = None  # KV pool size; default max_model_len
    block_size: int = DEFAULT_BLOCK_SIZE
    enable_prefix_caching: bool = True
    device: str = "cpu"
    kv_dtype: torch.dtype | None = None  # default: `default_kv_dtype`
    # "fast" (kernels/cpu: repacked weights, bf16 activations) or "reference" (the torch
    # oracle: dequantize per call, float32); LLAMAPY_CPU_KERNELS sets the default
    cpu_kernels: str = field(default_factory=lambda: os.environ.get("LLAMAPY_CPU_KERNELS", "fast"))
    cuda_graphs: bool = True  # replay decode and prefill steps from captured CUDA graphs
    # CPU (fast kernels): decode steps through torch.compile (models/cpu_compile.py);
    # default on where a C++ compiler is found, off with LLAMAPY_CPU_COMPILE=0
    cpu_compile: bool = field(default_factory=lambda: compile_enabled_by_default())
    # CPU (fast kernels): decode steps as one numba call where every matmul takes the VNNI
    # kernels (models/cpu_step.py; then no torch.compile is needed); off with
    # LLAMAPY_CPU_NATIVE_STEP=0 or enforce_eager
    cpu_native_step: bool = True
    # a `llamapy quantize` type (Q4_0, Q4_K_M, ...): weights are quantized as they load
    quantize: str | None = None
    # launch a decode step before the previous step's tokens are read back, so the
    # host's work on them (detokenizing, stop checks, scheduling) overlaps the GPU's step
    # (vLLM's --async-scheduling); None: on for CUDA, off on the CPU (nothing to overlap)
    async_scheduling: bool | None = None

    def __post_init__(self) -> None:
        check_device(self.device)
        if self.cpu_kernels not in CPU_KERNELS:
            raise ValueError(f"cpu_kernels must be one of {CPU_KERNELS}, got {self.cpu_kernels!r}")
        if self.cpu_kernels == "ggml" and torch.device(self.device).type != "cpu":
            raise ValueError(
                "cpu_kernels='ggml' (LLAMAPY_CPU_KERNELS=ggml) emulates llama.cpp's CPU "
                f"numerics and runs on the CPU only; got device {self.device!r}"
            )
        for name in ("max_model_len", "max_num_seqs", "max_num_batched_tokens", "block_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.async_scheduling not in (None, True, False):
            raise ValueError(f"async_scheduling must be True, False or None, got "
                             f"{self.async_scheduling!r}")  # fmt: skip
        for name in ("enable_prefix_caching", "cuda_graphs", "cpu_compile", "cpu_native_step"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be True or False, got {getattr(self, name)!r}")
        if self.quantize is not None:
            from llamapy.quant.presets import parse_preset

            parse_preset(self.quantize)  # ValueError naming the known types
        if self.kv_cache_tokens is not None and self.kv_cache_tokens < self.max_model_len:
            raise ValueError(
                f"kv_cache_tokens ({self.kv_cache_tokens}) must be >= max_model_len "
                f"({self.max_model_len})"
            )


@dataclass(slots=True)
class RequestOutput:
    """What one step produced for one request (text and tokens are the new part only)."""

    request_id: str
    text: str
    token_ids: list[int]
    finished: bool
    finish_reason: str | None
    num_prompt_tokens: int
    num_output_tokens: int
    num_cached_tokens: int
    logprobs: list[SampledToken] = field(default_factory=list)


@dataclass(slots=True)
class _Request:
    request_id: str
    seq: Sequence
    stream: TextStream
    params: SamplingParams
    async_ok: bool = False  # sampled without host history or state (`launchable`)
    greedy: bool = False  # the decode graph's own pick is the token (`plain_greedy`)


class LLMEngine:
    def __init__(self, model_file, tokenizer: Tokenizer, config: EngineConfig | None = None):
        self.config = config = config or EngineConfig()
        self.tokenizer = tokenizer
        self.model_config = model_file.config
        if config.max_model_len > self.model_config.context_length:
            logger.warning(
                "context %d exceeds the model's training context %d",
                config.max_model_len,
                self.model_config.context_length,
            )
        requantize = None
        if config.quantize is not None:
            from llamapy.convert.at_load import load_time_quantizer

            requantize = load_time_quantizer(model_file, config.quantize)
        device = torch.device(config.device)
        # Repacked weights are copies: the file's pages need not stay resident (embedding
        # rows are read back from the file as they are looked up).
        repacks = device.type == "cuda" or config.cpu_kernels in ("fast", "ggml")
        loading = mapped_while_loading() if device.type == "cpu" else contextlib.nullcontext()
        on_gpu_before = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
        kv_dtype = config.kv_dtype or default_kv_dtype(device, config.cpu_kernels)
        kv_tokens = config.kv_cache_tokens or config.max_model_len
        num_blocks = -(-kv_tokens // config.block_size)
        kv_bytes = (num_blocks + 1) * kv_bytes_per_block(  # + the scratch block
            self.model_config, config.block_size, kv_dtype
        )
        check_kv_fits(kv_bytes, kv_tokens, device)
        with loading:  # the packing's temporaries leave no fragmented heap (kernels/cpu/malloc)
            model = build_causal_lm(model_file, requantize)
            model.prepare(
                device,
                cpu_kernels=config.cpu_kernels,
                release_pages=model_file.release_pages if repacks else None,
                gpu_reserve_bytes=kv_bytes + GPU_WORKING_BYTES,
            )
        if device.type == "cuda":  # small models launch their kernels with PDL (triton/pdl)
            from llamapy.kernels.triton import pdl

            pdl.set_model_bytes(device, torch.cuda.memory_allocated(device) - on_gpu_before)
        if config.cpu_kernels == "ggml":  # llama.cpp's attention and GELU roundings too
            from llamapy.kernels.cpu.ggml_numerics import install

            install(model)
        self.block_manager = BlockManager(
            num_blocks, config.block_size, enable_prefix_caching=config.enable_prefix_caching
        )
        self.scheduler = Scheduler(
            SchedulerConfig(
                config.max_num_seqs, config.max_num_batched_tokens, config.max_model_len
            ),
            self.block_manager,
        )
        self.runner = ModelRunner(
            model,
            num_blocks=num_blocks,
            block_size=config.block_size,
            eog_token_ids=tokenizer.eog_ids,
            kv_dtype=kv_dtype,
            device=device,
            max_num_seqs=config.max_num_seqs,
            max_num_batched_tokens=config.max_num_batched_tokens,
            max_model_len=config.max_model_len,
            cuda_graphs=config.cuda_graphs,
            dry_vocab=DryVocab.from_tokenizer(tokenizer),
        )
        if device.type == "cpu" and config.cpu_kernels == "fast":
            self.runner.compile_decode(native=config.cpu_native_step, compiled=config.cpu_compile)
        self.async_scheduling = (
            config.async_scheduling
            if config.async_scheduling is not None
            else device.type == "cuda"
        )
        self._pending: PendingStep | None = None  # launched, tokens not read back yet
        self.requests: dict[int, _Request] = {}
        self._by_id: dict[str, _Request] = {}
        self._ids = itertools.count()
        self._ready: list[RequestOutput] = []  # finished at admission, not yet reported
        self.grammars = GrammarCompiler(tokenizer, self.model_config.vocab_size)

    # -- requests --------------------------------------------------------------------------

    def add_request(
        self, prompt_token_ids: list[int], params: SamplingParams, request_id: str | None = None
    ) -> str:
        n = len(prompt_token_ids)
        limit = self.config.max_model_len
        if n == 0:
            raise ValueError("the prompt is empty")
        if n >= limit:
            raise ContextLengthError(
                f"the prompt has {n} tokens but the context holds {limit}; shorten the prompt "
                f"or raise the context size"
            )
        vocab = self.model_config.vocab_size
        bad = [t for t in prompt_token_ids if not 0 <= t < vocab]
        if bad:
            raise ValueError(f"prompt token id {bad[0]} is outside the vocabulary (0..{vocab - 1})")
        bad = [t for t in params.logit_bias if t >= vocab]
        if bad:
            raise ValueError(
                f"logit_bias token id {bad[0]} is outside the vocabulary (0..{vocab - 1})"
            )
        max_new = limit - n if params.max_tokens is None else min(params.max_tokens, limit - n)
        request_id = request_id or f"req-{next(self._ids)}"
        if request_id in self._by_id:
            raise ValueError(f"request id {request_id!r} is already in use")
        seq = Sequence(list(prompt_token_ids), max_new, params, arrival_time=time.monotonic())
        if params.constraint is not None:
            seq.grammar = self.grammars.matcher(*params.constraint)
        req = _Request(
            request_id,
            seq,
            TextStream(self.tokenizer, params),
            params,
            async_ok=launchable(params),
            greedy=plain_greedy(params),
        )
        self.scheduler.add(seq)
        self.requests[seq.seq_id] = req
        self._by_id[request_id] = req
        if max_new == 0:  # nothing to compute: reported by the next step()
            self._finish(req, FinishReason.LENGTH)
            self._ready.append(RequestOutput(request_id, "", [], True, "length", n, 0, 0))
        return request_id

    def abort_request(self, request_id: str) -> None:
        req = self._by_id.get(request_id)
        if req is not None and not req.seq.is_finished:
            self.scheduler.abort(req.seq)
            self._forget(req)

    def has_unfinished_requests(self) -> bool:
        return bool(self._ready) or self.scheduler.has_unfinished()

    # -- the loop ----------------------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        """Schedule and run one batch; the outputs it produced.

        With async scheduling, a batch of decodes (`launchable` sampling) is launched and the
        previous step's tokens are read back and processed while it runs: its outputs come
        from this call, one step late. Sequences scheduled with a token still pending take it
        on the device; one that the token finishes has its launched step discarded."""
        outputs, self._ready = self._ready, []
        if self._pending is not None and not self._may_continue():
            outputs += self._resolve()
        batch = self.scheduler.schedule()
        if not batch:
            if self._pending is not None:
                outputs += self._resolve()
            return outputs
        if (
            self.async_scheduling
            and all(self.requests[item.seq.seq_id].async_ok for item in batch)
            and self.runner.can_launch(batch)
        ):
            greedy = all(self.requests[item.seq.seq_id].greedy for item in batch)
            launched = self.runner.launch(batch, self.block_manager, self._pending, greedy)
            if self._pending is not None:
                outputs += self._resolve()
            self.scheduler.postprocess(batch, dict.fromkeys(launched.seq_ids, PENDING))
            self._pending = launched
            return outputs
        if self._pending is not None:  # the batch needs its tokens on the host
            outputs += self._resolve()
            batch = [item for item in batch if not item.seq.is_finished]
            if not batch:
                return outputs
        sampled = self.runner.run(batch, self.block_manager)
        self.scheduler.postprocess(batch, {sid: s.token_id for sid, s in sampled.items()})
        for item in batch:
            sample = sampled.get(item.seq.seq_id)
            if sample is not None:
                outputs.append(self._process(self.requests[item.seq.seq_id], sample))
        return outputs

    def _may_continue(self) -> bool:
        """Whether the next batch can be scheduled with the pending tokens unread: it can
        only be more decodes that need no token on the host (nothing waits to be admitted,
        every sequence `launchable`) and no preemption (a free block per sequence)."""
        sched = self.scheduler
        return (
            not sched.waiting
            and self.block_manager.num_free_blocks >= len(sched.running)
            and all(self.requests[seq.seq_id].async_ok for seq in sched.running)
        )

    def _resolve(self) -> list[RequestOutput]:
        """Read back the pending step's tokens and process them (in place of PENDING)."""
        pending, self._pending = self._pending, None
        outputs = []
        for seq_id, token in zip(pending.seq_ids, pending.tokens(), strict=True):
            req = self.requests.get(seq_id)
            if req is None:  # aborted, or finished while the step ran
                continue
            req.seq.output_token_ids[-1] = token
            outputs.append(self._process(req, SampledToken(token)))
        return outputs

    def _process(self, req: _Request, sample: SampledToken) -> RequestOutput:
        seq = req.seq
        text, reason = req.stream.add(sample.token_id)
        if reason is None and seq.grammar is not None and self._grammar_done(seq, sample):
            text_tail, reason = req.stream.finish(FinishReason.STOP)
            text += text_tail
        if reason is None and (
            seq.num_output_tokens >= seq.max_new_tokens or len(seq) >= self.config.max_model_len
        ):
            text_tail, reason = req.stream.finish(FinishReason.LENGTH)
            text += text_tail
        if reason is not None:
            self._finish(req, reason)
        return RequestOutput(
            request_id=req.request_id,
            text=text,
            token_ids=[sample.token_id],
            finished=reason is not None,
            finish_reason=reason.value if reason is not None else None,
            num_prompt_tokens=seq.num_prompt_tokens,
            num_output_tokens=seq.num_output_tokens,
            num_cached_tokens=seq.num_cached_tokens,
            logprobs=[sample] if sample.logprob is not None else [],
        )

    @staticmethod
    def _grammar_done(seq: Sequence, sample: SampledToken) -> bool:
        """Advance the grammar; True when it is complete (finish reason "stop")."""
        if not seq.grammar.advance(sample.token_id):  # only if every allowed token was banned
            logger.warning("token %d breaks the grammar: %s", sample.token_id, seq.grammar.error)
            return True
        return seq.grammar.is_stopped

    def _finish(self, req: _Request, reason: FinishReason) -> None:
        self.scheduler.finish(req.seq, reason)
        self._forget(req)

    def _forget(self, req: _Request) -> None:
        self.runner.release(req.seq.seq_id)
        self.requests.pop(req.seq.seq_id, None)
        self._by_id.pop(req.request_id, None)
