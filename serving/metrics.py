"""What the server counts: Prometheus metrics and the per-task statistics of ModelStatistics.

`ServingMetrics` keeps its own `CollectorRegistry` (never prometheus_client's global one, so two
servers in one process, as in the tests, do not collide) and serves it over HTTP on its own port.
Loader figures (loaded version, reloads, failures) are read from the runtime at scrape time by a
collector, so the runtime itself knows nothing about Prometheus.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from typing import Callable

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from serving.capacity import CapacityReport
from serving.runtime import RuntimeStatus

logger = logging.getLogger(__name__)

UNKNOWN_TASK_LABEL = "(unknown)"  # label of requests for a task that is not served (bounded label values)
LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)


class _RuntimeCollector(Collector):
    """Loader state, read from the runtime when Prometheus scrapes."""

    def __init__(self, status: Callable[[], RuntimeStatus], ready: Callable[[], bool]) -> None:
        self._status = status
        self._ready = ready

    def collect(self):
        status = self._status()
        yield GaugeMetricFamily("clnp_ready", "1 while a model version is loaded and served", value=float(self._ready()))
        yield GaugeMetricFamily(
            "clnp_loaded_version",
            "Model version served by default (0 while none is loaded)",
            value=float(status.loaded_version or 0),
        )
        yield GaugeMetricFamily("clnp_loaded_versions", "Number of model versions loaded", value=len(status.loaded_versions))
        yield CounterMetricFamily("clnp_reloads", "Model versions loaded successfully", value=status.reloads)
        yield CounterMetricFamily("clnp_reload_failures", "Failed attempts to load a model version", value=status.failed_reloads)
        error_version = GaugeMetricFamily(
            "clnp_last_reload_error_version", "Version of the last failed load (0 if none failed)"
        )
        error_version.add_metric([], float(status.last_error.version if status.last_error else 0))
        yield error_version


FREE_OWNER_LABEL = "FREE"  # the owner label of units no task owns


class _CapacityCollector(Collector):
    """Units per layer by owner, tasks served and the forecast, read from the served version at scrape time.

    Operators alert on these before the network fills: e.g. `clnp_forecast_additional_tasks < 2`.
    """

    def __init__(self, capacity: Callable[[], CapacityReport | None]) -> None:
        self._capacity = capacity

    def collect(self):
        report = self._capacity()
        units = GaugeMetricFamily("clnp_units", "Units (neurons or filters) per layer of the served version, by owner "
                                  f"({FREE_OWNER_LABEL}: owned by no task)", labels=["layer", "owner"])
        total = GaugeMetricFamily("clnp_layer_units", "Units per layer of the served version", labels=["layer"])
        tasks = GaugeMetricFamily("clnp_tasks_served", "Tasks in the served version")
        forecast = GaugeMetricFamily(
            "clnp_forecast_additional_tasks",
            "How many more tasks fit in the served version, by the trend of new units per task (+Inf: unbounded; "
            "absent before the first task)")
        if report is not None:
            for layer in report.layers:
                total.add_metric([layer.name], layer.total)
                units.add_metric([layer.name, FREE_OWNER_LABEL], layer.free)
                for task, n in layer.owned_by_task.items():
                    units.add_metric([layer.name, task], n)
            tasks.add_metric([], len(report.tasks))
            if report.estimated_additional_tasks is not None:
                forecast.add_metric([], report.estimated_additional_tasks)
        yield units
        yield total
        yield tasks
        yield forecast


class ServingMetrics:
    """Per-task request counters, error counters by status code, latency and batch histograms."""

    def __init__(self, status: Callable[[], RuntimeStatus] | None = None, ready: Callable[[], bool] | None = None,
                 capacity: Callable[[], CapacityReport | None] | None = None) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "clnp_requests", "Inference requests by task and gRPC status code", ["task", "code"], registry=self.registry
        )
        self.errors = Counter(
            "clnp_request_errors", "Failed inference requests by task and gRPC status code", ["task", "code"],
            registry=self.registry,
        )
        self.rows = Counter("clnp_inference_rows", "Rows (samples) inferred by task", ["task"], registry=self.registry)
        self.latency = Histogram(
            "clnp_request_latency_seconds", "ModelInfer latency seen by the server, by task", ["task"],
            buckets=LATENCY_BUCKETS, registry=self.registry,
        )
        self.batch_requests = Histogram(
            "clnp_batch_requests", "Requests run together in one ONNX Runtime call", buckets=BATCH_BUCKETS,
            registry=self.registry,
        )
        self.batch_rows = Histogram(
            "clnp_batch_rows", "Rows run together in one ONNX Runtime call", buckets=BATCH_BUCKETS, registry=self.registry
        )
        self.execution_seconds = Histogram(
            "clnp_execution_seconds", "Duration of one ONNX Runtime call", buckets=LATENCY_BUCKETS, registry=self.registry
        )
        self.auth_failures = Counter(
            "clnp_auth_failures", "Calls refused for a missing or wrong token, by service", ["service"],
            registry=self.registry,
        )
        if status is not None:
            self.registry.register(_RuntimeCollector(status, ready or (lambda: False)))
        if capacity is not None:
            self.registry.register(_CapacityCollector(capacity))
        self._http = None

    def observe_request(self, task: str, code: str, seconds: float, rows: int) -> None:
        """Count one ModelInfer call (code "OK" or a gRPC status code name)."""
        self.requests.labels(task, code).inc()
        if code != "OK":
            self.errors.labels(task, code).inc()
        else:
            self.rows.labels(task).inc(rows)
        self.latency.labels(task).observe(seconds)

    def observe_execution(self, requests: int, rows: int, seconds: float) -> None:
        """Count one ONNX Runtime call (the runtime's execution observer)."""
        self.batch_requests.observe(requests)
        self.batch_rows.observe(rows)
        self.execution_seconds.observe(seconds)

    def start_http(self, host: str, port: int) -> int:
        """Serve /metrics on host:port (0: a free port); returns the bound port."""
        from prometheus_client import start_http_server

        server, _thread = start_http_server(port, addr=host, registry=self.registry)
        self._http = server
        return server.server_port

    def stop_http(self) -> None:
        """Stop the HTTP endpoint, if started."""
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
            self._http = None


@dataclass
class TaskStatistics:
    """Counts and durations of one task on one version (the ModelStatistics fields we fill).

    Like Triton's: queue, compute_input (decoding the request), compute_infer (the ONNX Runtime calls that held its
    rows) and compute_output (encoding the answer) are counted once per successful request.
    """

    success_count: int = 0
    success_ns: int = 0
    fail_count: int = 0
    fail_ns: int = 0
    queue_ns: int = 0
    compute_input_ns: int = 0
    compute_infer_ns: int = 0
    compute_output_ns: int = 0
    inference_count: int = 0  # rows inferred
    execution_count: int = 0  # successful requests
    last_inference_ms: int = 0  # Unix time of the last success, milliseconds


@dataclass(frozen=True)
class Phases:
    """Where one successful request's time went, in nanoseconds."""

    queue_ns: int = 0
    compute_input_ns: int = 0
    compute_infer_ns: int = 0
    compute_output_ns: int = 0


class InferenceStatistics:
    """Thread-safe per (task, version) statistics for the ModelStatistics RPC."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._stats: dict[tuple[str, int], TaskStatistics] = {}

    def record(self, task: str, version: int, ok: bool, duration_ns: int, rows: int,
               phases: Phases | None = None) -> None:
        """Count one request for a served task."""
        with self._lock:
            s = self._stats.setdefault((task, version), TaskStatistics())
            if ok:
                s.success_count += 1
                s.success_ns += duration_ns
                s.inference_count += rows
                s.execution_count += 1
                s.last_inference_ms = int(time.time() * 1000)
                if phases is not None:
                    s.queue_ns += phases.queue_ns
                    s.compute_input_ns += phases.compute_input_ns
                    s.compute_infer_ns += phases.compute_infer_ns
                    s.compute_output_ns += phases.compute_output_ns
            else:
                s.fail_count += 1
                s.fail_ns += duration_ns

    def snapshot(self) -> dict[tuple[str, int], TaskStatistics]:
        """A copy of every (task, version)'s statistics."""
        with self._lock:
            return {k: TaskStatistics(**vars(v)) for k, v in self._stats.items()}
