"""The micro-batcher: concurrent requests, of any tasks, run as few ONNX Runtime calls.

Written here rather than taken from a library: the batching needed is small (one queue, one
worker thread) and must know that rows of different tasks share a call through the task index,
which the general-purpose batchers (Triton's dynamic batcher, Ray Serve's `@serve.batch`) do not
offer to an in-process ONNX Runtime session.

Pure numpy and threading: no gRPC, no onnxruntime import (a `Runner` is anything with
`run(x, task_index)`, in practice a `serving.runtime.LoadedVersion`).
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from concurrent.futures import Future
from typing import Callable, Protocol

import numpy as np

from serving.errors import NotReady

logger = logging.getLogger(__name__)

ExecutionObserver = Callable[[int, int, float], None]  # (requests, rows, seconds) of one ORT call


class Runner(Protocol):
    """What the batcher runs rows on: one loaded model version."""

    def run(self, x: np.ndarray, task_index: np.ndarray) -> np.ndarray:
        """Scores (B, max_classes) of x (B, *input_shape) float32 for task indices (B,) int64."""


def row_chunks(rows: int, max_rows: int) -> list[slice]:
    """The consecutive slices, of at most max_rows rows each, a request of `rows` rows runs as."""
    return [slice(start, min(start + max_rows, rows)) for start in range(0, rows, max_rows)]


class Timing:
    """Where one request's time went (nanoseconds): in its own ORT calls, and waiting for them.

    For a request split into chunks, waiting includes the time between its chunks while other requests' calls ran,
    but not the time its own earlier chunks ran.
    """

    __slots__ = ("submitted_ns", "finished_ns", "infer_ns")

    def __init__(self) -> None:
        self.submitted_ns = 0  # when it was handed to the batcher
        self.finished_ns = 0  # when its last ORT call ended
        self.infer_ns = 0  # its ORT calls, summed

    @property
    def queue_ns(self) -> int:
        return max(0, self.finished_ns - self.submitted_ns - self.infer_ns) if self.finished_ns else 0


class _Pending:
    """One chunk of one request, waiting in the queue."""

    __slots__ = ("runner", "x", "task_index", "width", "future", "timing")

    def __init__(self, runner: Runner, x: np.ndarray, task_index: int, width: int, timing: Timing | None) -> None:
        self.runner = runner
        self.x = x  # (B, *input_shape) float32, B <= max_rows
        self.task_index = task_index
        self.width = width  # the task's number of classes
        self.future: Future = Future()
        self.timing = timing  # filled before the future resolves


def _gather(parts: list[Future]) -> Future:
    """One future for a request split into parts: their results concatenated in order, or the first failure."""
    if len(parts) == 1:
        return parts[0]
    whole: Future = Future()
    remaining = [len(parts)]
    lock = threading.Lock()

    def done(_part: Future) -> None:
        with lock:
            remaining[0] -= 1
            last = remaining[0] == 0
        if not last:
            return
        failed = next((p.exception() for p in parts if p.exception() is not None), None)
        if failed is not None:
            whole.set_exception(failed)
        else:
            whole.set_result(np.concatenate([p.result() for p in parts]))

    for part in parts:
        part.add_done_callback(done)
    return whole


def run_unbatched(runner: Runner, x: np.ndarray, task_index: int, width: int, max_rows: int,
                  observer: ExecutionObserver | None = None, timing: Timing | None = None) -> np.ndarray:
    """Scores (B, width) of one request, run at once in chunks of at most max_rows rows (no queue)."""
    out = []
    if timing is not None:
        timing.submitted_ns = time.perf_counter_ns()
    for part in row_chunks(len(x), max_rows):
        rows = x[part]
        start = time.perf_counter_ns()
        scores = runner.run(rows, np.full(len(rows), task_index, dtype=np.int64))
        end = time.perf_counter_ns()
        seconds = (end - start) / 1e9
        if timing is not None:
            timing.infer_ns += end - start
            timing.finished_ns = end
        if observer is not None:
            observer(1, len(rows), seconds)
        out.append(scores[:, :width])
    return out[0] if len(out) == 1 else np.concatenate(out)


class MicroBatcher:
    """Runs concurrent requests, of any tasks, as one ORT call on one worker thread.

    One ORT call runs at a time. A request that finds the batcher idle (nothing running, nothing
    queued) runs at once on the caller's own thread: at low load there is no hand-off to another
    thread and back, which is most of a batch-1 call's overhead. Requests that arrive while a call
    runs queue up; the worker thread takes the oldest queued chunk and whatever else is queued
    behind it, up to `max_rows` rows in all, and when other requests were queued too (the server
    is under load) waits up to `timeout_s` for the batch to fill. Chunks on different loaded
    versions in one batch run as one call per version.

    A request larger than `max_rows` is split into consecutive chunks of at most `max_rows` rows,
    queued together and in order; its future resolves to the chunks' scores concatenated, or to the
    first chunk's failure.
    """

    def __init__(self, max_rows: int, timeout_s: float, observer: ExecutionObserver | None = None) -> None:
        if max_rows < 1:
            raise ValueError(f"max_rows must be >= 1, got {max_rows}")
        self.max_rows = max_rows
        self._timeout_s = timeout_s
        self._observer = observer
        self._queue: collections.deque[_Pending] = collections.deque()
        self._cond = threading.Condition()
        self._busy = False  # an ORT call runs (on a caller's thread or the worker's), or the worker fills a batch
        self._closed = False
        self._thread = threading.Thread(target=self._work, name="clnp-batcher", daemon=True)
        self._thread.start()

    def submit(self, runner: Runner, x: np.ndarray, task_index: int, width: int, timing: Timing | None = None) -> Future:
        """Queue one request; the future resolves to its scores (B, width). Raises NotReady once closed.

        `timing`, when given, holds the request's queue and ORT time by the time the future resolves.
        """
        if timing is not None:
            timing.submitted_ns = time.perf_counter_ns()
        chunks = [_Pending(runner, x[part], task_index, width, timing) for part in row_chunks(len(x), self.max_rows)]
        with self._cond:
            if self._closed:
                raise NotReady("the server is shutting down")
            inline = len(chunks) == 1 and not self._busy and not self._queue
            if inline:
                self._busy = True
            else:
                self._queue.extend(chunks)
                self._cond.notify()
        if inline:  # idle: run here, now
            try:
                self._run(chunks)
            finally:
                with self._cond:
                    self._busy = False
                    if self._queue:
                        self._cond.notify_all()
        return _gather([c.future for c in chunks])

    def close(self) -> None:
        """Stop accepting requests, finish the queued ones, and stop the worker."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self._thread.join()

    def _take_queued(self, batch: list[_Pending], rows: int) -> int:
        while self._queue and rows + len(self._queue[0].x) <= self.max_rows:
            item = self._queue.popleft()
            batch.append(item)
            rows += len(item.x)
        return rows

    def _work(self) -> None:
        while True:
            with self._cond:
                while self._busy or (not self._queue and not self._closed):
                    self._cond.wait()
                if not self._queue:
                    return  # closed and drained
                self._busy = True
                batch = [self._queue.popleft()]
                rows = self._take_queued(batch, len(batch[0].x))
                if len(batch) > 1 and self._timeout_s > 0:
                    deadline = time.monotonic() + self._timeout_s
                    while rows < self.max_rows and not self._closed:
                        remaining = deadline - time.monotonic()
                        if remaining <= 0:
                            break
                        self._cond.wait(remaining)
                        rows = self._take_queued(batch, rows)
                        if self._queue:  # the next one does not fit: the batch is as full as it gets
                            break
            try:
                self._run(batch)
            finally:
                with self._cond:
                    self._busy = False

    def _run(self, batch: list[_Pending]) -> None:
        groups: dict[int, list[_Pending]] = {}
        for item in batch:
            groups.setdefault(id(item.runner), []).append(item)
        for items in groups.values():
            try:
                start_ns = time.perf_counter_ns()
                if len(items) == 1:
                    x = items[0].x
                    task = np.full(len(x), items[0].task_index, dtype=np.int64)
                else:
                    x = np.concatenate([i.x for i in items])  # (sum B, *input_shape)
                    task = np.concatenate([np.full(len(i.x), i.task_index, dtype=np.int64) for i in items])
                scores = items[0].runner.run(x, task)  # (sum B, max_classes)
                end_ns = time.perf_counter_ns()
                seconds = (end_ns - start_ns) / 1e9
            except Exception as e:  # hand the failure to every waiting chunk; the worker lives on
                for item in items:
                    item.future.set_exception(e)
                continue
            offset = 0
            for item in items:
                n = len(item.x)
                if item.timing is not None:
                    item.timing.infer_ns += end_ns - start_ns
                    item.timing.finished_ns = max(item.timing.finished_ns, end_ns)
                item.future.set_result(scores[offset:offset + n, :item.width])
                offset += n
            if self._observer is not None:
                try:
                    self._observer(len(items), len(x), seconds)
                except Exception:
                    logger.exception("batch observer failed")


__all__ = ["ExecutionObserver", "MicroBatcher", "Runner", "Timing", "row_chunks", "run_unbatched"]
