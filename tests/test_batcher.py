"""The micro-batcher on its own: order, splitting, mixed tasks, and the failure of one call.

A fake runner stands in for an ONNX Runtime session: the score of a row is a function of the
row and its task index, so any misplaced, reordered or mis-tasked row shows in the answer, and
the runner records every call it gets.
"""

from __future__ import annotations

import threading

import numpy as np
import pytest

from serving.batcher import MicroBatcher, row_chunks, run_unbatched
from serving.errors import NotReady

WIDTH = 4  # the runner's output width (max classes)


class FakeRunner:
    """scores[i, k] = x[i, 0] * 10 + task[i] + k / 10; records the rows and tasks of every call."""

    def __init__(self, fail_when=None, gate: threading.Event | None = None) -> None:
        self.calls: list[tuple[np.ndarray, np.ndarray]] = []
        self.threads: list[str] = []  # the thread each call ran on
        self._fail_when = fail_when
        self._gate = gate
        self.entered = threading.Event()  # set once a call has started

    def run(self, x: np.ndarray, task_index: np.ndarray) -> np.ndarray:
        self.entered.set()
        if self._gate is not None:
            self._gate.wait(10)
        self.calls.append((x[:, 0].copy(), task_index.copy()))
        self.threads.append(threading.current_thread().name)
        if self._fail_when is not None and self._fail_when(x):
            raise RuntimeError("the runtime failed on this call")
        return (x[:, :1] * 10 + task_index[:, None] + np.arange(WIDTH)[None, :] / 10).astype(np.float32)


def want(x: np.ndarray, task: int, width: int) -> np.ndarray:
    return (x[:, :1] * 10 + task + np.arange(width)[None, :] / 10).astype(np.float32)


def rows(start: int, n: int) -> np.ndarray:
    """n rows whose first feature numbers them start, start+1, ..."""
    x = np.zeros((n, 3), dtype=np.float32)
    x[:, 0] = np.arange(start, start + n)
    return x


def test_row_chunks():
    assert row_chunks(10, 4) == [slice(0, 4), slice(4, 8), slice(8, 10)]
    assert row_chunks(4, 4) == [slice(0, 4)]
    assert row_chunks(1, 256) == [slice(0, 1)]


def test_a_lone_request_runs_at_once_on_the_callers_thread():
    runner = FakeRunner()
    batcher = MicroBatcher(max_rows=8, timeout_s=5.0)  # a long timeout that a lone request must not wait for
    try:
        x = rows(0, 3)
        future = batcher.submit(runner, x, 2, 3)
        assert future.done()  # no hand-off to the worker thread: it ran inside submit
        np.testing.assert_array_equal(future.result(), want(x, 2, 3))
    finally:
        batcher.close()
    assert runner.threads == [threading.current_thread().name]


def test_a_large_request_is_split_in_order_into_calls_of_at_most_max_rows():
    runner = FakeRunner()
    batcher = MicroBatcher(max_rows=4, timeout_s=0)
    try:
        x = rows(100, 10)
        got = batcher.submit(runner, x, 1, WIDTH).result(timeout=5)
    finally:
        batcher.close()
    np.testing.assert_array_equal(got, want(x, 1, WIDTH))
    assert [len(r) for r, _ in runner.calls] == [4, 4, 2]
    np.testing.assert_array_equal(np.concatenate([r for r, _ in runner.calls]), x[:, 0])  # in order


def test_queued_requests_of_mixed_tasks_share_calls_and_each_gets_its_own_rows():
    gate = threading.Event()
    runner = FakeRunner(gate=gate)
    batcher = MicroBatcher(max_rows=16, timeout_s=0)
    try:
        holder: list = []  # the first request runs on its caller's thread (idle batcher) until the gate opens
        caller = threading.Thread(target=lambda: holder.append(batcher.submit(runner, rows(0, 1), 0, WIDTH)))
        caller.start()
        assert runner.entered.wait(5)  # a call is running: what follows queues up
        requests = [(rows(10 * i, i + 1), i % 3, 2 + i % 3) for i in range(5)]  # 15 rows, three tasks, three widths
        futures = [batcher.submit(runner, x, task, width) for x, task, width in requests]
        gate.set()
        results = [f.result(timeout=5) for f in futures]
        caller.join(5)
    finally:
        gate.set()
        batcher.close()
    np.testing.assert_array_equal(holder[0].result(timeout=1), want(rows(0, 1), 0, WIDTH))
    assert runner.threads[0] == caller.name and set(runner.threads[1:]) == {"clnp-batcher"}
    for (x, task, width), got in zip(requests, results):
        np.testing.assert_array_equal(got, want(x, task, width))
    shared = [tasks for _, tasks in runner.calls if len(set(tasks.tolist())) > 1]
    assert shared, f"the queued requests of different tasks should share a call: {runner.calls}"
    assert sum(len(r) for r, _ in runner.calls) == 1 + 15


def test_a_failed_call_fails_its_requests_only_and_the_worker_lives_on():
    runner = FakeRunner(fail_when=lambda x: bool((x[:, 0] == 666).any()))
    batcher = MicroBatcher(max_rows=4, timeout_s=0)
    try:
        bad = rows(664, 6)  # its second chunk (rows 668..669) is fine, its first (664..667) fails
        with pytest.raises(RuntimeError, match="the runtime failed"):
            batcher.submit(runner, bad, 0, WIDTH).result(timeout=5)
        x = rows(0, 5)
        np.testing.assert_array_equal(batcher.submit(runner, x, 1, WIDTH).result(timeout=5), want(x, 1, WIDTH))
    finally:
        batcher.close()


def test_close_finishes_queued_requests_then_refuses():
    gate = threading.Event()
    runner = FakeRunner(gate=gate)
    batcher = MicroBatcher(max_rows=2, timeout_s=0)
    futures = [batcher.submit(runner, rows(i, 3), 0, WIDTH) for i in range(3)]  # 3 rows: split, so queued
    closer = threading.Thread(target=batcher.close)
    closer.start()
    gate.set()
    closer.join(10)
    assert not closer.is_alive()
    for i, f in enumerate(futures):
        np.testing.assert_array_equal(f.result(timeout=1), want(rows(i, 3), 0, WIDTH))
    with pytest.raises(NotReady):
        batcher.submit(runner, rows(0, 1), 0, WIDTH)


def test_unbatched_runs_split_too_and_report_each_call():
    runner = FakeRunner()
    seen = []
    x = rows(7, 5)
    got = run_unbatched(runner, x, 2, 3, max_rows=2, observer=lambda n, r, s: seen.append((n, r)))
    np.testing.assert_array_equal(got, want(x, 2, 3))
    assert seen == [(1, 2), (1, 2), (1, 1)]


def test_timing_of_a_split_request_counts_its_own_calls_once():
    from serving.batcher import Timing

    runner = FakeRunner()
    batcher = MicroBatcher(max_rows=2, timeout_s=0)
    timing = Timing()
    try:
        batcher.submit(runner, rows(0, 5), 0, WIDTH, timing).result(timeout=5)
    finally:
        batcher.close()
    assert len(runner.calls) == 3 and timing.infer_ns > 0
    # waiting is what is left of the request's span once its own three calls are taken out: never their sum again
    assert timing.queue_ns + timing.infer_ns == timing.finished_ns - timing.submitted_ns
