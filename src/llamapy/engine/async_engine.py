"""AsyncLLMEngine: one background thread steps the engine; each request reads its own queue.

The engine is not thread-safe, so every call into it (add, abort, step) holds one lock; the
model's torch ops release the GIL, so the event loop stays responsive while a step runs.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from llamapy.engine.llm_engine import LLMEngine, RequestOutput
from llamapy.errors import LlamapyError
from llamapy.sampling.params import SamplingParams

logger = logging.getLogger(__name__)


class QueueFullError(LlamapyError):
    """Too many requests are waiting; the client should retry later (HTTP 503)."""


class EngineDeadError(LlamapyError):
    """The engine loop failed; requests cannot be served."""


@dataclass
class EngineStats:
    """Counters since start, for /metrics and /slots (read without the lock: plain ints)."""

    num_requests: int = 0
    num_finished: int = 0
    num_aborted: int = 0
    prompt_tokens: int = 0
    generated_tokens: int = 0
    prompt_seconds: float = 0.0
    decode_seconds: float = 0.0
    steps: int = 0
    finish_reasons: dict[str, int] = field(default_factory=dict)


class AsyncLLMEngine:
    def __init__(self, engine: LLMEngine, *, max_queued: int = 256) -> None:
        self.engine = engine
        self.max_queued = max_queued
        self.stats = EngineStats()
        self._lock = threading.Lock()
        self._wakeup = threading.Event()
        self._stop = threading.Event()
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._error: BaseException | None = None
        self._aborts_lock = threading.Lock()
        self._pending_aborts: list[str] = []
        self._thread = threading.Thread(target=self._loop, name="llamapy-engine", daemon=True)
        self._thread.start()

    # -- requests ----------------------------------------------------------------------------

    @property
    def num_active(self) -> int:
        return len(self._streams)

    def add_request(self, prompt_ids: list[int], params: SamplingParams, request_id: str) -> None:
        """Queue a request. Raises the engine's validation errors (ContextLengthError,
        ValueError) and QueueFullError at once, before any output is streamed."""
        if self._error is not None:
            raise EngineDeadError(f"the engine stopped after an error: {self._error}")
        if len(self._streams) >= self.max_queued:
            raise QueueFullError(
                f"the server has {len(self._streams)} requests queued; retry later"
            )
        queue: asyncio.Queue = asyncio.Queue()
        loop = asyncio.get_running_loop()
        with self._lock:
            self.engine.add_request(prompt_ids, params, request_id)
            self._streams[request_id] = (loop, queue)
            self.stats.num_requests += 1
        self._wakeup.set()

    async def outputs(self, request_id: str) -> AsyncIterator[RequestOutput]:
        """Outputs of an added request as they come; leaving early (client gone) aborts it."""
        _, queue = self._streams[request_id]
        finished = False
        try:
            while True:
                item = await queue.get()
                if isinstance(item, BaseException):
                    raise EngineDeadError(f"the engine failed: {item}") from item
                finished = item.finished
                yield item
                if finished:
                    return
        finally:
            if not finished:
                self.abort(request_id)

    async def generate(
        self, prompt_ids: list[int], params: SamplingParams, request_id: str
    ) -> AsyncIterator[RequestOutput]:
        """add_request + outputs."""
        self.add_request(prompt_ids, params, request_id)
        async for out in self.outputs(request_id):
            yield out

    def abort(self, request_id: str) -> None:
        """Cancel a request; its blocks are freed before the next step (never blocks the
        caller on a running step)."""
        if self._streams.pop(request_id, None) is not None:
            with self._aborts_lock:
                self._pending_aborts.append(request_id)
            self.stats.num_aborted += 1
            self._wakeup.set()

    def _apply_aborts(self) -> None:
        with self._aborts_lock:
            pending, self._pending_aborts = self._pending_aborts, []
        for request_id in pending:
            self.engine.abort_request(request_id)

    def call(self, fn, *args, **kwargs):
        """Run `fn(engine, ...)` under the engine lock (for introspection: blocks, slots)."""
        with self._lock:
            return fn(self.engine, *args, **kwargs)

    # -- the loop ----------------------------------------------------------------------------

    def _loop(self) -> None:
        while not self._stop.is_set():
            with self._lock:
                self._apply_aborts()
                idle = not self.engine.has_unfinished_requests()
            if idle:
                self._wakeup.wait(timeout=0.5)
                self._wakeup.clear()
                continue
            try:
                with self._lock:
                    self._apply_aborts()
                    outputs = self.engine.step()
                    self.stats.steps += 1
            except Exception as e:  # a bug: fail every waiting request, keep no half state
                logger.exception("engine step failed")
                self._fail_all(e)
                continue
            for out in outputs:
                self._deliver(out)

    def _deliver(self, out: RequestOutput) -> None:
        target = self._streams.get(out.request_id)
        self.stats.generated_tokens += len(out.token_ids)
        if out.finished:
            self._streams.pop(out.request_id, None)
            self.stats.num_finished += 1
            self.stats.prompt_tokens += out.num_prompt_tokens - out.num_cached_tokens
            reason = out.finish_reason or "unknown"
            self.stats.finish_reasons[reason] = self.stats.finish_reasons.get(reason, 0) + 1
        if target is not None:
            loop, queue = target
            loop.call_soon_threadsafe(queue.put_nowait, out)

    def _fail_all(self, error: BaseException) -> None:
        with self._lock:
            streams, self._streams = self._streams, {}
            for request_id in streams:
                self.engine.abort_request(request_id)
        for loop, queue in streams.values():
            loop.call_soon_threadsafe(queue.put_nowait, error)

    def shutdown(self) -> None:
        self._stop.set()
        self._wakeup.set()
        self._thread.join(timeout=5)
