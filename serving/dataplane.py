"""The data plane: what the gRPC servicers call, between them and the runtime.

It owns the request accounting (Prometheus metrics and the ModelStatistics counters), and what
the server says about a task (ModelMetadata, ModelConfig, readiness, the repository index). The
servicers in `serving.server` only convert between the wire and these plain values.

A ModelInfer call runs as

    with plane.call() as call:
        target = call.resolve(name, version)       # UnknownTask / UnknownVersion / NotReady
        x = decode_input(request, plane.names(target))
        scores = call.run(target, x)               # the runtime checks x against the model, once

and `call` records the request when the block ends, with the status code of the error that ended
it, if any (`code_of`, the server's one mapping of errors to codes).
"""

from __future__ import annotations

import math
import time
from typing import Callable

import numpy as np

from serving.capacity import CapacityReport, capacity_report
from serving.convert import ModelDescription, TensorNames
from serving.errors import NotReady, UnknownTask, UnknownVersion
from serving.batcher import Timing
from serving.metrics import UNKNOWN_TASK_LABEL, InferenceStatistics, Phases, ServingMetrics, TaskStatistics
from serving.runtime import LoadedVersion, Runtime, Target, tasks_of

FP32_BYTES = 4
MESSAGE_OVERHEAD_BYTES = 64 * 1024  # room left in a message for the request's names, shape and framing


def rows_that_fit(max_message_bytes: int, input_shape: tuple[int, ...]) -> int:
    """How many FP32 rows of input_shape one gRPC message of max_message_bytes carries."""
    row = FP32_BYTES * math.prod(input_shape)
    return max(1, (max_message_bytes - MESSAGE_OVERHEAD_BYTES) // row)


class InferCall:
    """One ModelInfer call: resolve, run, and, when the `with` block ends, its accounting."""

    def __init__(self, plane: "DataPlane") -> None:
        self._plane = plane
        self._target: Target | None = None
        self._rows = 0
        self._start = 0
        self._resolved = 0  # when the target was known: decoding starts
        self._ran: tuple[int, int] = (0, 0)  # (start, end) of the runtime call
        self._timing = Timing()

    def __enter__(self) -> "InferCall":
        self._start = time.perf_counter_ns()
        return self

    def resolve(self, task: str, version: int | None) -> Target:
        """The loaded version and task the request runs on."""
        self._target = self._plane.runtime.resolve(task, version)
        self._resolved = time.perf_counter_ns()
        return self._target

    def run(self, target: Target, x: np.ndarray) -> np.ndarray:
        """Scores (B, classes) of the request's rows."""
        self._rows = len(x)
        start = time.perf_counter_ns()
        scores = self._plane.runtime.run(target, x, self._timing)
        self._ran = (start, time.perf_counter_ns())
        return scores

    def __exit__(self, exc_type, exc, tb) -> None:
        code = "OK" if exc is None else self._plane.code_of(exc)
        phases = None
        if exc is None and self._ran[1]:
            phases = Phases(queue_ns=self._timing.queue_ns,
                            compute_input_ns=max(0, self._ran[0] - self._resolved),
                            compute_infer_ns=self._timing.infer_ns,
                            compute_output_ns=max(0, time.perf_counter_ns() - self._ran[1]))
        self._plane.record(self._target, self._start, code, self._rows, phases)


class DataPlane:
    """Inference, its accounting, and the descriptions of the served tasks, over one runtime."""

    def __init__(self, runtime: Runtime, code_of: Callable[[BaseException], str], max_message_bytes: int) -> None:
        self.runtime = runtime
        self.code_of = code_of
        self.max_message_bytes = max_message_bytes
        self.statistics = InferenceStatistics()
        self._capacity: tuple[LoadedVersion, CapacityReport] | None = None
        self.metrics = ServingMetrics(runtime.status, lambda: runtime.ready, self.capacity)

    # ---- inference -------------------------------------------------------------------------

    def call(self) -> InferCall:
        """A ModelInfer call's context (see the module docstring)."""
        return InferCall(self)

    @staticmethod
    def names(target: Target) -> TensorNames:
        """The wire names of the target's input and output."""
        onnx = target.loaded.manifest.onnx
        return TensorNames(onnx.input_name, onnx.output_name)

    def record(self, target: Target | None, start_ns: int, code: str, rows: int, phases: Phases | None = None) -> None:
        """Count one finished ModelInfer call in the metrics and the statistics."""
        duration = time.perf_counter_ns() - start_ns
        label = UNKNOWN_TASK_LABEL if target is None else target.task.name
        self.metrics.observe_request(label, code, duration / 1e9, rows)
        if target is not None:
            self.statistics.record(target.task.name, target.version, code == "OK", duration, rows, phases)

    # ---- what the server says about its tasks ---------------------------------------------

    @property
    def ready(self) -> bool:
        return self.runtime.ready

    def model_ready(self, task: str, version: int | None) -> bool:
        try:
            self.runtime.resolve(task, version)
        except (UnknownTask, UnknownVersion, NotReady):
            return False
        return True

    def max_request_rows(self, loaded: LoadedVersion) -> int:
        """The most rows one request may hold: the configured limit, or else what fits in a message."""
        limit = self.runtime.config.max_request_rows
        return limit if limit else rows_that_fit(self.max_message_bytes, loaded.input_shape)

    def describe(self, task: str, version: int | None) -> ModelDescription:
        """ModelMetadata and ModelConfig of one task (raises UnknownTask, UnknownVersion, NotReady)."""
        target = self.runtime.resolve(task, version)
        loaded, config = target.loaded, self.runtime.config
        holding = tuple(lv.version for lv in self.runtime.loaded_versions() if lv.has_task(task))
        onnx = loaded.manifest.onnx
        limit = config.max_request_rows
        return ModelDescription(
            name=task,
            versions=holding,
            input_name=onnx.input_name,
            input_shape=loaded.input_shape,
            output_name=onnx.output_name,
            classes=len(target.task.classes),
            max_request_rows=self.max_request_rows(loaded),
            batch_rows=config.max_batch_size,
            batching=config.batching,
            batch_timeout_us=config.batch_timeout_us,
            execution_provider=config.execution_provider,
            parameters={
                "max_request_rows_source": "--max-request-rows" if limit else
                f"what fits in --max-message-bytes {self.max_message_bytes} as FP32",
                "clnp_version": str(target.version),
                "clnp_task_index": str(target.task.index),
            },
        )

    def repository_index(self) -> list[tuple[str, int]]:
        """(task, version) of every loaded version's tasks."""
        return [(t.name, v) for t, versions in tasks_of(self.runtime.loaded_versions()) for v in versions]

    def task_statistics(self, task: str, version: int | None) -> list[tuple[str, int, TaskStatistics]]:
        """ModelStatistics rows, by task and version; an empty `task` means all (raises UnknownTask)."""
        stats = self.statistics.snapshot()
        # Like Triton, every loaded (task, version) has an entry, zero before its first request: clients such as
        # perf_analyzer look the model up in the statistics before they send anything.
        for name, v in self.repository_index():
            stats.setdefault((name, v), TaskStatistics())
        if task:
            served = {t.name for lv in self.runtime.loaded_versions() for t in lv.manifest.tasks}
            if task not in served and not any(name == task for name, _ in stats):
                known = ", ".join(sorted(served)) or "(none)"
                raise UnknownTask(f"unknown task (model) {task!r}; served tasks: {known}")
        return [(name, v, s) for (name, v), s in sorted(stats.items())
                if (not task or name == task) and (version is None or v == version)]

    def capacity(self) -> CapacityReport | None:
        """Capacity of the newest loaded version, or None while nothing is loaded."""
        latest = self.runtime.latest()
        if latest is None:
            return None
        cached = self._capacity
        if cached is None or cached[0] is not latest:  # a version's manifest never changes: one report each
            cached = self._capacity = (latest, capacity_report(latest.manifest))
        return cached[1]


__all__ = ["DataPlane", "InferCall", "rows_that_fit"]
