"""AsyncLLMEngine: one background thread owns and steps the engine; each request reads its
own queue.

The engine is not thread-safe, so only the loop thread touches it: adds, aborts and
introspection are queued as calls that the loop runs between steps, and the event loop
awaits their results. A step can take seconds on a CPU; nothing on the event loop ever waits
for one to end (the model's torch ops release the GIL, so the event loop keeps running).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import threading
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

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
    """Counters since start, for /metrics and /slots (written by the loop thread only)."""

    num_requests: int = 0
    num_finished: int = 0
    num_aborted: int = 0
    prompt_tokens: int = 0
    generated_tokens: int = 0
    steps: int = 0
    finish_reasons: dict[str, int] = field(default_factory=dict)


@dataclass
class _Stream:
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue = field(default_factory=asyncio.Queue)
    first_output: asyncio.Event = field(default_factory=asyncio.Event)


class AsyncLLMEngine:
    def __init__(self, engine: LLMEngine, *, max_queued: int = 256) -> None:
        self.engine = engine
        self.max_queued = max_queued
        self.stats = EngineStats()
        self.error: BaseException | None = None
        self._streams: dict[str, _Stream] = {}
        self._calls_lock = threading.Lock()
        self._calls: list[tuple[Callable[[], Any], concurrent.futures.Future | None]] = []
        self._wakeup = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="llamapy-engine", daemon=True)
        self._thread.start()

    # -- requests ----------------------------------------------------------------------------

    @property
    def num_active(self) -> int:
        return len(self._streams)

    async def add_request(
        self, prompt_ids: list[int], params: SamplingParams, request_id: str
    ) -> AsyncIterator[RequestOutput]:
        """Queue a request and return its outputs as they come (leaving the iteration early
        aborts it). Raises the engine's validation errors (ContextLengthError, ValueError),
        QueueFullError and EngineDeadError before any output is produced."""
        if self.error is not None:
            raise EngineDeadError(f"the engine stopped after an error: {self.error!r}")
        if len(self._streams) >= self.max_queued:
            raise QueueFullError(
                f"the server has {len(self._streams)} requests queued; retry later"
            )
        stream = self._streams[request_id] = _Stream(asyncio.get_running_loop())
        try:
            await self.call(self._add, list(prompt_ids), params, request_id)
        except BaseException:
            self.abort(request_id)  # cancelled while queued, or rejected: drop it either way
            raise
        return self._iterate(request_id, stream.queue)

    def _add(self, engine: LLMEngine, prompt_ids: list[int], params, request_id: str) -> None:
        if self.error is not None:
            raise EngineDeadError(f"the engine stopped after an error: {self.error!r}")
        engine.add_request(prompt_ids, params, request_id)
        self.stats.num_requests += 1

    async def _iterate(self, request_id: str, queue: asyncio.Queue) -> AsyncIterator[RequestOutput]:
        finished = False
        try:
            while not finished:
                item = await queue.get()
                if isinstance(item, BaseException):
                    raise EngineDeadError(f"the engine failed: {item!r}") from item
                finished = item.finished
                yield item
        finally:
            if not finished:
                self.abort(request_id)

    async def first_output(self, request_id: str) -> None:
        """Wait until the request's prompt is computed (its first token is out), so its full
        prompt blocks are in the prefix cache; returns at once if it already finished."""
        stream = self._streams.get(request_id)
        if stream is not None:
            await stream.first_output.wait()

    async def generate(
        self, prompt_ids: list[int], params: SamplingParams, request_id: str
    ) -> AsyncIterator[RequestOutput]:
        """add_request, then its outputs."""
        async for out in await self.add_request(prompt_ids, params, request_id):
            yield out

    def abort(self, request_id: str) -> None:
        """Cancel a request; its blocks are freed before the next step (never waits)."""
        if self._streams.pop(request_id, None) is not None:
            self._submit(lambda: self._abort(request_id), None)

    def _abort(self, request_id: str) -> None:
        self.engine.abort_request(request_id)
        self.stats.num_aborted += 1

    async def call(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Run `fn(engine, *args)` on the loop thread between steps; its result or error."""
        future: concurrent.futures.Future = concurrent.futures.Future()
        self._submit(lambda: fn(self.engine, *args), future)
        return await asyncio.wrap_future(future)

    def _submit(self, thunk: Callable[[], Any], future: concurrent.futures.Future | None) -> None:
        with self._calls_lock:
            self._calls.append((thunk, future))
        self._wakeup.set()

    # -- the loop ----------------------------------------------------------------------------

    def _run_calls(self) -> None:
        with self._calls_lock:
            calls, self._calls = self._calls, []
        for thunk, future in calls:
            if future is not None and not future.set_running_or_notify_cancel():
                continue  # its caller went away
            try:
                result = thunk()
            except Exception as e:  # noqa: BLE001 - handed to the awaiting request
                if future is None:
                    logger.exception("engine call failed")
                else:
                    future.set_exception(e)
                continue
            if future is not None:
                future.set_result(result)

    def _loop(self) -> None:
        while not self._stop.is_set():
            self._wakeup.clear()
            self._run_calls()
            if self.error is not None or not self.engine.has_unfinished_requests():
                self._wakeup.wait(timeout=0.5)
                continue
            try:
                outputs = self.engine.step()
            except Exception as e:  # a bug: fail every request; the engine state is suspect
                logger.exception("engine step failed")
                self._fail_all(e)
                continue
            self.stats.steps += 1
            for out in outputs:
                self._deliver(out)

    def _deliver(self, out: RequestOutput) -> None:
        stream = self._streams.get(out.request_id)
        self.stats.generated_tokens += len(out.token_ids)
        if out.finished:
            self._streams.pop(out.request_id, None)
            self.stats.num_finished += 1
            self.stats.prompt_tokens += out.num_prompt_tokens - out.num_cached_tokens
            reason = out.finish_reason or "unknown"
            self.stats.finish_reasons[reason] = self.stats.finish_reasons.get(reason, 0) + 1
        if stream is not None:
            stream.loop.call_soon_threadsafe(stream.queue.put_nowait, out)
            stream.loop.call_soon_threadsafe(stream.first_output.set)

    def _fail_all(self, error: BaseException) -> None:
        self.error = error
        streams, self._streams = self._streams, {}
        for request_id, stream in streams.items():
            self.engine.abort_request(request_id)
            stream.loop.call_soon_threadsafe(stream.queue.put_nowait, error)
            stream.loop.call_soon_threadsafe(stream.first_output.set)
        self._run_calls()  # answer the queued calls too

    def shutdown(self) -> None:
        self._stop.set()
        self._wakeup.set()
        self._thread.join(timeout=5)
