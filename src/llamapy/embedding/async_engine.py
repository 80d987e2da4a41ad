"""AsyncEmbedder: one worker thread runs the forward passes; requests that arrive while one
runs are batched together into the next (dynamic batching across HTTP requests).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import threading
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from llamapy.embedding.batch import EncoderInput
from llamapy.embedding.engine import EmbeddingEngine
from llamapy.engine.async_engine import EngineDeadError, QueueFullError

logger = logging.getLogger(__name__)


@dataclass(slots=True)
class _Job:
    inputs: list[EncoderInput]
    pooling: str
    future: concurrent.futures.Future


class AsyncEmbedder:
    def __init__(self, engine: EmbeddingEngine, *, max_queued: int = 64) -> None:
        self.engine = engine
        self.max_queued = max_queued
        self.num_requests = 0
        self.num_tokens = 0
        self._jobs: list[_Job] = []
        self._lock = threading.Lock()
        self._wakeup = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="llamapy-embed", daemon=True)
        self._thread.start()

    async def encode(
        self, inputs: Sequence[EncoderInput], pooling: str | None = None
    ) -> list[torch.Tensor]:
        """`EmbeddingEngine.encode` on the worker thread, batched with concurrent requests."""
        if self._stop.is_set():
            raise EngineDeadError("the embedding worker has stopped")
        future: concurrent.futures.Future = concurrent.futures.Future()
        with self._lock:
            if len(self._jobs) >= self.max_queued:
                raise QueueFullError(
                    f"the server has {len(self._jobs)} requests queued; retry later"
                )
            self._jobs.append(_Job(list(inputs), pooling or self.engine.pooling, future))
        self._wakeup.set()
        return await asyncio.wrap_future(future)

    def _loop(self) -> None:
        while not self._stop.is_set():
            self._wakeup.wait(timeout=0.5)
            self._wakeup.clear()
            with self._lock:
                jobs, self._jobs = self._jobs, []
            by_pooling: dict[str, list[_Job]] = {}
            for job in jobs:
                if job.future.set_running_or_notify_cancel():
                    by_pooling.setdefault(job.pooling, []).append(job)
            for pooling, group in by_pooling.items():
                self._run(pooling, group)

    def _run(self, pooling: str, jobs: list[_Job]) -> None:
        inputs = [x for job in jobs for x in job.inputs]
        try:
            results = self.engine.encode(inputs, pooling)
        except (ValueError, LookupError) as e:  # bad input of some job: answer each alone
            if len(jobs) > 1:
                for job in jobs:
                    self._run(pooling, [job])
                return
            jobs[0].future.set_exception(e)
            return
        except Exception as e:  # noqa: BLE001 - a failed pass fails its requests, not the server
            logger.exception("embedding pass failed")
            for job in jobs:
                job.future.set_exception(e)
            return
        self.num_requests += len(jobs)
        self.num_tokens += sum(len(x) for x in inputs)
        start = 0
        for job in jobs:
            job.future.set_result(results[start : start + len(job.inputs)])
            start += len(job.inputs)

    def shutdown(self) -> None:
        self._stop.set()
        self._wakeup.set()
        self._thread.join(timeout=5)
