"""Micro-batching: requests that arrive together share one forward pass.

Every request puts a job (its texts and a future) on a queue. One worker task takes the oldest
job, adds every queued job of the same kind (deterministic, or MC-dropout with the same passes
and dropout rate) while the batch stays within `max_batch` texts, runs the blocking inference in
a single worker thread and hands each job its rows. While a batch runs, new requests queue up and
form the next batch, so batches grow with the load. Before each batch the worker waits up to
`max_wait` (default 2 ms; not at all once `max_batch` texts wait) so that requests arriving a
moment apart, such as those of clients the previous batch just answered, share the batch.
`close` is a graceful drain: it refuses new requests and runs the queued ones before stopping.
"""

from __future__ import annotations

import asyncio
import collections
import time
from collections.abc import Callable, Hashable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from llmclf.serve import defaults

# run(key, texts) -> one result per text, in order; runs in the worker thread.
RunBatch = Callable[[Hashable, list[str]], Sequence[Any]]


class ServerBusyError(Exception):
    """More texts are queued than `max_queue`: the client should retry later (HTTP 503)."""


class BatcherClosedError(Exception):
    """The server is shutting down and takes no new requests (HTTP 503)."""


@dataclass
class _Job:
    key: Hashable
    texts: list[str]
    future: asyncio.Future = field(repr=False)


@dataclass
class BatcherStats:
    """Counters for /healthz and tests: forward batches run, texts classified, largest batch."""

    batches: int = 0
    texts: int = 0
    largest_batch: int = 0
    busy_seconds: float = 0.0


class MicroBatcher:
    """Collects concurrent `submit` calls into batches of at most `max_batch` texts for `run`.

    Args:
        run: blocking `run(key, texts)`, called in one worker thread, one batch at a time.
        max_batch: texts per batch; a single request with more texts runs as a batch of its own.
        max_wait: seconds the worker waits for more requests after the first one of a batch.
        max_queue: texts allowed to wait; beyond it `submit` raises `ServerBusyError`.
    """

    def __init__(self, run: RunBatch, max_batch: int = defaults.MAX_BATCH,
                 max_wait: float = defaults.MAX_WAIT_MS / 1000,
                 max_queue: int = defaults.QUEUED_BATCHES * defaults.MAX_BATCH) -> None:
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        self.run, self.max_batch, self.max_wait, self.max_queue = run, max_batch, max_wait, max_queue
        self.stats = BatcherStats()
        self._queue: collections.deque[_Job] = collections.deque()
        self._queued_texts = 0
        self._running_texts = 0
        self._wakeup: asyncio.Event | None = None
        self._full = asyncio.Event()  # set when a full batch is waiting
        self._worker: asyncio.Task | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._closed = False
        self._solo = 0  # jobs to run alone (after a batch failed, to find the request at fault)

    @property
    def queued_texts(self) -> int:
        """Texts waiting for a batch (not counting the batch being run)."""
        return self._queued_texts

    @property
    def running_texts(self) -> int:
        """Texts in the batch being run now."""
        return self._running_texts

    def start(self) -> None:
        """Start the worker task on the running event loop (`submit` does it on first use)."""
        if self._worker is None or self._worker.done():
            self._closed = False
            self._wakeup = asyncio.Event()
            self._full = asyncio.Event()
            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="llmclf-infer")
            self._worker = asyncio.get_running_loop().create_task(self._loop(), name="llmclf-batcher")

    async def close(self, timeout: float | None = None) -> None:
        """Stop taking requests (`submit` raises `BatcherClosedError`), finish the queued ones, then stop
        the worker. After `timeout` seconds the worker is cancelled and the requests still waiting
        fail with `BatcherClosedError` (a batch already running in the thread runs to its end)."""
        self._closed = True
        if self._worker is not None:
            if self._wakeup is not None:
                self._wakeup.set()  # the worker sees `_closed` and returns once the queue is empty
            try:
                await asyncio.wait_for(asyncio.shield(self._worker), timeout)
            except asyncio.TimeoutError:
                self._worker.cancel()
                try:
                    await self._worker
                except asyncio.CancelledError:
                    pass
            self._worker = None
        while self._queue:
            job = self._queue.popleft()
            if not job.future.done():
                job.future.set_exception(BatcherClosedError("the server is shutting down"))
        self._queued_texts = 0
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)
            self._executor = None

    async def submit(self, texts: list[str], key: Hashable = None) -> list[Any]:
        """The results of `run(key, texts)`, computed in a batch with other requests of the same key."""
        if not texts:
            return []
        if self._closed:
            raise BatcherClosedError("the server is shutting down")
        if self._queued_texts + len(texts) > self.max_queue and self._queued_texts > 0:
            raise ServerBusyError(f"{self._queued_texts} texts are already waiting (limit {self.max_queue}); "
                                  "retry later")
        self.start()
        job = _Job(key, list(texts), asyncio.get_running_loop().create_future())
        self._queue.append(job)
        self._queued_texts += len(texts)
        assert self._wakeup is not None
        self._wakeup.set()
        if self._queued_texts >= self.max_batch:
            self._full.set()
        return await job.future

    def _take_batch(self) -> list[_Job]:
        """The oldest job plus every later queued job of the same key that still fits."""
        first = self._queue.popleft()
        batch, size, keep = [first], len(first.texts), collections.deque()
        if self._solo > 0:
            self._solo -= 1
            self._queued_texts -= size
            return batch
        while self._queue:
            job = self._queue.popleft()
            if job.key == first.key and size + len(job.texts) <= self.max_batch:
                batch.append(job)
                size += len(job.texts)
            else:
                keep.append(job)
        self._queue = keep
        self._queued_texts -= size
        return batch

    async def _loop(self) -> None:
        assert self._wakeup is not None
        loop = asyncio.get_running_loop()
        while True:
            if not self._queue:
                if self._closed:
                    return
                self._wakeup.clear()
                await self._wakeup.wait()
                continue  # woken by a request or by `close`
            if self.max_wait > 0 and self._queued_texts < self.max_batch and not self._solo and not self._closed:
                # Let requests arriving together (or from clients the last batch just answered) join,
                # unless a full batch is already waiting.
                self._full.clear()
                try:
                    await asyncio.wait_for(self._full.wait(), self.max_wait)
                except asyncio.TimeoutError:
                    pass
            batch = [job for job in self._take_batch() if not job.future.cancelled()]
            texts = [t for job in batch for t in job.texts]
            if not texts:
                continue
            start = time.perf_counter()
            self._running_texts = len(texts)
            try:
                results = await loop.run_in_executor(self._executor, self.run, batch[0].key, texts)
                if len(results) != len(texts):
                    raise RuntimeError(f"inference returned {len(results)} results for {len(texts)} texts")
            except asyncio.CancelledError:
                for job in batch:
                    if not job.future.done():
                        job.future.set_exception(BatcherClosedError("the server is shutting down"))
                raise
            except Exception as exc:  # one failing batch must not stop the worker
                if len(batch) == 1:
                    if not batch[0].future.done():
                        batch[0].future.set_exception(exc)
                    continue
                # Run the jobs one by one, so that only the request that caused the error fails.
                self._queue.extendleft(reversed(batch))
                self._queued_texts += len(texts)
                self._solo = len(batch)
                continue
            finally:
                self._running_texts = 0
                self.stats.busy_seconds += time.perf_counter() - start
            self.stats.batches += 1
            self.stats.texts += len(texts)
            self.stats.largest_batch = max(self.stats.largest_batch, len(texts))
            offset = 0
            for job in batch:
                n = len(job.texts)
                if not job.future.done():  # a client that disconnected cancels its future
                    job.future.set_result(list(results[offset:offset + n]))
                offset += n
