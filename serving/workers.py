"""`clnp-serve --workers N`: N server processes sharing one port, under one supervisor.

One Python process serves with about one core (the gRPC threads and the batcher share the GIL).
With `--workers N` the supervisor (the process clnp-serve starts as) spawns N workers. Each is a
whole `ClnpServer` with its own ONNX Runtime session, micro-batcher and repository watcher, bound
to the same port with `SO_REUSEPORT`, so the kernel spreads incoming connections over them.

What the supervisor guarantees:

* **One metrics endpoint.** Each worker serves its own registry on a loopback port that only the
  supervisor knows; the supervisor's `/metrics` scrapes them all and merges the families:
  counters and histograms are summed, gauges take the minimum over the workers (the most
  conservative reading: a worker still on the old version shows, FREE units are never
  overstated). `clnp_workers` and `clnp_worker_restarts_total` describe the workers themselves.
  A hand-written merge rather than prometheus-client's multiprocess mode: that mode cannot carry
  the collectors that read the runtime at scrape time (loader state, capacity), which would have
  to become push-style gauges in every worker.
* **Drain everywhere.** SIGTERM or SIGINT to the supervisor is sent on to every worker as
  SIGTERM: each turns its health NOT_SERVING, refuses new calls, finishes the calls in flight
  and exits 0; then the supervisor exits 0.
* **Reload everywhere.** An admin Reload reaches one worker (the one the connection landed on).
  That worker reloads, sends SIGUSR1 to the supervisor, which sends SIGHUP to every worker, and
  each reloads. The Reload answer says which worker answered and that the others were told.
  (Each worker's watcher also polls the repository, so they converge even without it.)
* **No silent half-capacity server.** A worker that exits while the server is not stopping is
  restarted, at most `max_restarts` times in RESTART_WINDOW_S seconds; past that, the supervisor
  stops the rest and exits 1.
"""

from __future__ import annotations

import dataclasses
import logging
import multiprocessing
import os
import queue
import signal
import socket
import threading
import time
import urllib.request
from dataclasses import dataclass

from serving.server import ClnpServer, ServerConfig, _join_host_port

logger = logging.getLogger(__name__)

RESTART_WINDOW_S = 60.0  # restarts counted against max_restarts within this many seconds
START_TIMEOUT_S = 120.0  # how long a worker may take to load the repository and bind
SCRAPE_TIMEOUT_S = 2.0  # one worker's /metrics, fetched by the supervisor


# ---- the worker process ---------------------------------------------------------------------


def worker_main(config: ServerConfig, index: int, events, log_level: str) -> None:
    """One worker: a ClnpServer on the shared port until SIGTERM (runs in a spawned process)."""
    from serving.repository import RepositoryError

    logging.basicConfig(level=log_level, format=f"%(asctime)s %(levelname)s worker-{index} %(name)s: %(message)s")
    stop = threading.Event()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a terminal's Ctrl-C reaches the supervisor, which drains us
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    server = ClnpServer(dataclasses.replace(
        config, reuse_port=True, worker=index,
        metrics_port=None if config.metrics_port is None else 0, metrics_host="127.0.0.1"))
    others = config.workers - 1
    supervisor = os.getppid()

    def notify_peers() -> str:
        os.kill(supervisor, signal.SIGUSR1)
        return f"the other {others} worker{'s were' if others != 1 else ' was'} told to reload"

    server.peer_notifier = notify_peers

    def on_hup(*_):  # the supervisor relays another worker's admin Reload
        threading.Thread(target=server.reload, kwargs={"force": True}, name="clnp-peer-reload", daemon=True).start()

    signal.signal(signal.SIGHUP, on_hup)
    try:
        server.start()
    except RepositoryError as e:
        events.put(("failed", index, 2, str(e)))
        server.stop(0)
        raise SystemExit(2)
    except Exception as e:  # cannot bind, provider missing, ...: the supervisor reports it and exits
        events.put(("failed", index, 1, str(e) or type(e).__name__))
        server.stop(0)
        raise SystemExit(1)
    events.put(("up", index, os.getpid(), server.metrics_port))
    while not stop.wait(0.5):
        pass
    server.stop()


# ---- metrics of all workers -----------------------------------------------------------------


class WorkersCollector:
    """The supervisor's /metrics: every worker's metrics, merged (see the module docstring)."""

    def __init__(self, supervisor: "Supervisor") -> None:
        self._supervisor = supervisor

    def collect(self):
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
        from prometheus_client.parser import text_string_to_metric_families

        merged: dict[str, tuple[str, str, dict]] = {}  # family -> (type, help, {(sample, labels): value})
        live = 0
        for port in self._supervisor.metrics_ports():
            try:
                url = f"http://127.0.0.1:{port}/metrics"
                text = urllib.request.urlopen(url, timeout=SCRAPE_TIMEOUT_S).read().decode()
            except OSError as e:  # a worker restarting: its figures are missing from this scrape only
                logger.warning("cannot scrape worker metrics on port %d: %s", port, e)
                continue
            live += 1
            for family in text_string_to_metric_families(text):
                kind, _, samples = merged.setdefault(family.name, (family.type, family.documentation, {}))
                for s in family.samples:
                    if s.name.endswith("_created"):
                        continue  # creation times differ per worker and mean nothing once merged
                    key = (s.name, tuple(sorted(s.labels.items())))
                    if key not in samples:
                        samples[key] = s.value
                    elif kind == "gauge":
                        samples[key] = min(samples[key], s.value)
                    else:
                        samples[key] += s.value
        for name, (kind, doc, samples) in merged.items():
            metric = Metric(name, doc, kind)
            for (sample, labels), value in samples.items():
                metric.add_sample(sample, dict(labels), value)
            yield metric
        yield GaugeMetricFamily("clnp_workers", "Worker processes whose metrics this scrape merged", value=live)
        yield CounterMetricFamily("clnp_worker_restarts", "Workers restarted after an unexpected exit",
                                  value=self._supervisor.restarts)


# ---- the supervisor ---------------------------------------------------------------------------


@dataclass
class _Worker:
    index: int
    process: multiprocessing.Process
    pid: int | None = None
    metrics_port: int | None = None
    up: bool = False


def free_port(host: str) -> int:
    """A port free on `host` now (for --port 0 with several workers, which must all bind the same one)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.bind((host.strip("[]"), 0))
        return s.getsockname()[1]


class StartupError(RuntimeError):
    """A worker could not start; `exit_code` is what clnp-serve exits with (2: repository, 1: other)."""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code


class Supervisor:
    """Starts, watches, restarts and drains the workers of one `clnp-serve --workers N`."""

    def __init__(self, config: ServerConfig, workers: int, max_restarts: int = 5, log_level: str = "INFO") -> None:
        if workers < 2:
            raise ValueError(f"a supervisor runs 2 or more workers, got {workers}")
        port = config.port or free_port(config.host)
        self.config = dataclasses.replace(config, port=port, workers=workers)
        self.max_restarts = max_restarts
        self.log_level = log_level
        self.restarts = 0
        self.metrics_port: int | None = None
        self._ctx = multiprocessing.get_context("spawn")  # fresh interpreters: no inherited gRPC or ORT state
        self._events = self._ctx.Queue()
        self._workers = [self._spawn(i) for i in range(workers)]
        self._restart_times: list[float] = []
        self._stop = threading.Event()
        self._relay = threading.Event()
        self._http = None

    @property
    def address(self) -> str:
        return _join_host_port(self.config.host, self.config.port)

    def metrics_ports(self) -> list[int]:
        return [w.metrics_port for w in self._workers if w.up and w.metrics_port]

    def _spawn(self, index: int) -> _Worker:
        process = self._ctx.Process(target=worker_main, args=(self.config, index, self._events, self.log_level),
                                    name=f"clnp-serve-worker-{index}", daemon=False)
        return _Worker(index, process)

    # ---- lifecycle -------------------------------------------------------------------------

    def start(self) -> "Supervisor":
        """Start every worker and wait until all serve; raises StartupError (after stopping the rest)."""
        for w in self._workers:
            w.process.start()
        deadline = time.monotonic() + START_TIMEOUT_S
        while not all(w.up for w in self._workers):
            try:
                self._handle_event(self._events.get(timeout=0.5))  # short: a worker may die without a word
            except queue.Empty:
                pass
            except StartupError:
                self._terminate_all()
                raise
            dead = [w for w in self._workers if not w.up and not w.process.is_alive()]
            if dead and self._events.empty():
                self._terminate_all()
                raise StartupError(f"worker {dead[0].index} exited with {dead[0].process.exitcode} while starting", 1)
            if time.monotonic() > deadline:
                self._terminate_all()
                raise StartupError(f"the workers did not start within {START_TIMEOUT_S:.0f} s", 1)
        if self.config.metrics_port is not None:
            from prometheus_client import CollectorRegistry, start_http_server

            registry = CollectorRegistry()
            registry.register(WorkersCollector(self))
            host = self.config.metrics_host or self.config.host
            self._http, _ = start_http_server(self.config.metrics_port, addr=host, registry=registry)
            self.metrics_port = self._http.server_port
        return self

    def _handle_event(self, event) -> None:
        kind, index = event[0], event[1]
        w = self._workers[index]
        if kind == "up":
            w.pid, w.metrics_port, w.up = event[2], event[3], True
            logger.info("worker %d serving (pid %d)", index, w.pid)
        elif kind == "failed":
            raise StartupError(f"worker {index}: {event[3]}", event[2])

    def request_stop(self) -> None:
        """Ask `run` to drain and return (safe from a signal handler)."""
        self._stop.set()

    def relay_reload(self) -> None:
        """Ask `run` to tell every worker to reload (safe from a signal handler)."""
        self._relay.set()

    def run(self) -> int:
        """Watch the workers until `request_stop`; returns the exit code (0 after a clean drain)."""
        while not self._stop.is_set():
            self._drain_events()
            if self._relay.is_set():
                self._relay.clear()
                for w in self._workers:
                    if w.process.is_alive():
                        os.kill(w.process.pid, signal.SIGHUP)
            for w in list(self._workers):
                if w.process.is_alive() or self._stop.is_set():
                    continue
                code = w.process.exitcode
                what = f"signal {signal.Signals(-code).name}" if code is not None and code < 0 else f"code {code}"
                now = time.monotonic()
                self._restart_times = [t for t in self._restart_times if now - t < RESTART_WINDOW_S]
                if len(self._restart_times) >= self.max_restarts:
                    logger.error("worker %d exited (%s) and %d restarts in %.0f s are used up: stopping the server",
                                 w.index, what, self.max_restarts, RESTART_WINDOW_S)
                    self._terminate_all()
                    self._close_http()
                    return 1
                logger.error("worker %d exited unexpectedly (%s); restarting it", w.index, what)
                self._restart_times.append(now)
                self.restarts += 1
                replacement = self._spawn(w.index)
                self._workers[w.index] = replacement
                replacement.process.start()
            self._stop.wait(0.2)
        return self._drain()

    def _drain_events(self) -> None:
        while True:
            try:
                event = self._events.get_nowait()
            except queue.Empty:
                return
            try:
                self._handle_event(event)
            except StartupError as e:  # a restarted worker that cannot start: it exits, and is counted
                logger.error("%s", e)

    def _drain(self) -> int:
        logger.info("draining %d workers", len(self._workers))
        clean = self._terminate_all()
        self._close_http()
        return 0 if clean else 1

    def _terminate_all(self) -> bool:
        """SIGTERM every live worker and wait for it; True when all exited 0."""
        for w in self._workers:
            if w.process.is_alive():
                os.kill(w.process.pid, signal.SIGTERM)
        clean = True
        deadline = time.monotonic() + self.config.shutdown_grace + 15
        for w in self._workers:
            w.process.join(max(0.1, deadline - time.monotonic()))
            if w.process.is_alive():
                logger.error("worker %d did not stop in time; killing it", w.index)
                w.process.kill()
                w.process.join()
                clean = False
            elif w.process.exitcode not in (0, None) and w.up:
                clean = False
        return clean

    def _close_http(self) -> None:
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
            self._http = None


__all__ = ["StartupError", "Supervisor", "WorkersCollector", "free_port", "worker_main"]
