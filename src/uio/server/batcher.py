"""Dynamic batching: requests wait in an asyncio queue and run in groups on one inference thread.

The event loop only queues requests and awaits their results; a collector task takes the first
request waiting, then whatever else arrives within ``max_wait_ms`` (up to ``max_batch``), and
hands them to :func:`uio.requests.run_requests` on the single inference thread. While that thread
works, new requests queue up and form the next batch. Requests whose client has gone (their
future cancelled) are dropped before they are computed.
"""
from __future__ import annotations

import asyncio
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from ..requests import TaskRequest, run_requests
from .metrics import Metrics

log = logging.getLogger("uio.server")


class QueueFull(Exception):
    """The queue holds ``max_queue`` requests already."""


@dataclass
class Outcome:
    """What the inference thread made of one request: its result (or exception) and its batch's size."""

    result: dict | Exception
    batch_size: int


@dataclass
class _Pending:
    request: TaskRequest
    future: asyncio.Future
    queued_at: float = field(default_factory=time.perf_counter)


class Batcher:
    """Queues task requests and runs them in batches on one thread (see the module docstring)."""

    def __init__(self, runner, metrics: Metrics, max_batch: int, max_wait_ms: float, max_queue: int):
        self.runner, self.metrics = runner, metrics
        self.max_batch, self.max_wait = max_batch, max_wait_ms / 1000
        self._queue: asyncio.Queue[_Pending] = asyncio.Queue(maxsize=max_queue)
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="uio-inference")
        self._collector: asyncio.Task | None = None
        metrics.queue_depth.set_function(self._queue.qsize)

    def start(self) -> None:
        """Start collecting batches (in the running event loop)."""
        self._collector = asyncio.get_running_loop().create_task(self._collect())

    async def stop(self) -> None:
        """Stop collecting and let the inference thread finish (after the requests in flight)."""
        if self._collector is not None:
            self._collector.cancel()
        self._executor.shutdown(wait=True)

    async def submit(self, request: TaskRequest) -> Outcome:
        """Queue ``request`` and wait for its outcome; :class:`QueueFull` when the queue is full.

        Cancelling the wait (the client went away) drops the request if it has not run yet.
        """
        pending = _Pending(request, asyncio.get_running_loop().create_future())
        try:
            self._queue.put_nowait(pending)
        except asyncio.QueueFull:
            raise QueueFull from None
        return await pending.future

    async def _next_batch(self) -> list[_Pending]:
        batch = [await self._queue.get()]
        deadline = time.perf_counter() + self.max_wait
        while len(batch) < self.max_batch:
            try:
                batch.append(self._queue.get_nowait())
                continue
            except asyncio.QueueEmpty:
                pass
            left = deadline - time.perf_counter()
            if left <= 0:
                break
            try:
                batch.append(await asyncio.wait_for(self._queue.get(), left))
            except asyncio.TimeoutError:
                break
        return batch

    async def _collect(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = await self._next_batch()
            live = [p for p in batch if not p.future.done()]
            self.metrics.dropped.inc(len(batch) - len(live))
            if not live:
                continue
            outcomes = await loop.run_in_executor(self._executor, self._run, [p.request for p in live])
            for pending, outcome in zip(live, outcomes):
                if not pending.future.done():
                    pending.future.set_result(outcome)

    def _run(self, requests: list[TaskRequest]) -> list[Outcome]:
        """On the inference thread: run ``requests``, noting each one's batch size."""
        sizes = [1] * len(requests)

        def on_batch(indices: list[int], seconds: float) -> None:
            self.metrics.observe_batch(len(indices), seconds)
            for index in indices:
                sizes[index] = len(indices)

        try:
            results = run_requests(self.runner, requests, self.max_batch, on_batch=on_batch)
        except Exception as err:  # a bug in grouping must not stop the worker: fail these requests only
            log.exception("batch failed")
            results = [err] * len(requests)
        return [Outcome(result, size) for result, size in zip(results, sizes)]
