#!/usr/bin/env python
"""Serving benchmark: clnp-serve over gRPC on loopback against ONNX Runtime in-process.

What it measures, all in one run so that every figure is a ratio against a floor taken on the
same (possibly busy) machine:

* the floor: the shared ONNX graph (model.onnx) in this process with ONNX Runtime, one intra-op
  thread, batch-1 calls in a sequential loop (req/s, p50, p99), taken before and after the server
  runs; the higher of the two is the floor the ratios use (the stricter choice); with task graphs
  in the version, the same loop on them too (what the server runs by default);
* clnp-serve as a subprocess (`clnp-serve --repository R --host 127.0.0.1 --port 0`), with its
  default micro-batching and with `--no-batching`: batch-1 ModelInfer requests spread
  round-robin over several tasks, at concurrency 1, 8 and 32 (client threads, each with its own
  stub), for a fixed duration after a warm-up; req/s, p50 and p99 latency as seen by the client;
* the server's resident memory (VmRSS of /proc/PID/status) serving the repository's oldest
  version (1 task) and its latest (10 tasks): the weights are shared by all tasks, so the second
  should cost about the same.

The client uses our generated stubs (serving._generated.inference), never tritonclient: the two
register the same protobuf names and clash in one process.

    python benchmarks/serving.py --build                 # build (or reuse) a 784-2000-2000 repository with 10 tasks
    python benchmarks/serving.py --repository DIR        # benchmark an existing repository

Writes benchmarks/results/serving.md and serving.json (see --output).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
# the repository root first, even when PYTHONPATH names it too: benchmarks/ (this script's folder, which Python puts
# first) holds serving.py, which would shadow the `serving` package
sys.path[:] = [str(ROOT)] + [p for p in sys.path if p != str(ROOT)]

from serving.repository import MARKER_FILE, ModelRepository  # noqa: E402

DATA_DIR = Path(__file__).resolve().parents[2] / "shared" / "data"
DEFAULT_NETWORK = "mlp:784-2000-2000"
DEFAULT_WORK_DIR = Path(os.environ.get("TMPDIR", "/tmp")) / "clnp-serving-benchmark"
COMMITTED_OUTPUT = ROOT / "benchmarks" / "results" / "serving"  # written only when --output says so
LISTENING = re.compile(r"(?:clnp-serve|kserve-peer) listening on (\S+):(\d+)")
TARGET_RATIO = 0.75  # issue target at concurrency 32: throughput >= 0.75x the in-process floor ...
TARGET_P99_MS = 50.0  # ... with p99 under 50 ms
TARGET_CONCURRENCY = 32


# ---- the repository --------------------------------------------------------------------------


def _slug(network: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", network).strip("-")


def build_repository(root: Path, tasks: int, network: str, limit: int, data_dir: Path) -> Path:
    """Add tasks perm-0, perm-1, ... (permuted-mnist:i) until the latest version holds `tasks`; resumable."""
    from trainer.clnp import CLNPConfig  # torch: only imported when building
    from trainer.pipeline import add_task

    config = CLNPConfig(epochs=1, finetune_epochs=0, prune_connections=False)
    have = 0
    if (root / MARKER_FILE).is_file():
        repo = ModelRepository.open(root)
        if repo.latest() is not None:
            manifest = repo.read_manifest()
            if manifest.network != network:
                sys.exit(f"error: {root} holds network {manifest.network}, not {network}; use another --work-dir")
            have = len(manifest.tasks)
    if have >= tasks:
        print(f"reusing {root} ({have} tasks)", flush=True)
        return root
    for i in range(have, tasks):
        start = time.perf_counter()
        result = add_task(root, f"perm-{i}", f"permuted-mnist:{i}", network=network, config=config,
                          limit=limit, data_dir=str(data_dir))
        print(f"built version {result.manifest.version} (task perm-{i}) in {time.perf_counter() - start:.1f} s",
              flush=True)
    return root


def single_version_copy(repository: Path, version: int, dest: Path) -> Path:
    """`dest`: a repository holding only `version` of `repository` (cached; hard links where possible)."""
    if (dest / str(version) / "manifest.json").is_file():
        return dest
    if dest.exists():
        shutil.rmtree(dest)
    dest.mkdir(parents=True)
    shutil.copy2(repository / MARKER_FILE, dest / MARKER_FILE)

    def link_or_copy(src, dst):
        try:
            os.link(src, dst)
        except OSError:
            shutil.copy2(src, dst)

    shutil.copytree(repository / str(version), dest / str(version), copy_function=link_or_copy)
    return dest


# ---- statistics ------------------------------------------------------------------------------


@dataclass
class Measurement:
    label: str
    concurrency: int
    requests: int
    seconds: float
    req_per_s: float
    p50_ms: float
    p99_ms: float
    mean_ms: float
    errors: int = 0
    ratio_to_floor: float | None = None
    extra: dict = field(default_factory=dict)


def summarize(label: str, concurrency: int, latencies: list[float], seconds: float, errors: int = 0) -> Measurement:
    lat = np.asarray(latencies, dtype=np.float64) * 1e3
    if len(lat) == 0:
        return Measurement(label, concurrency, 0, seconds, 0.0, float("nan"), float("nan"), float("nan"), errors)
    return Measurement(label, concurrency, len(lat), round(seconds, 3), round(len(lat) / seconds, 1),
                       round(float(np.percentile(lat, 50)), 3), round(float(np.percentile(lat, 99)), 3),
                       round(float(lat.mean()), 3), errors)


# ---- the floor: ONNX Runtime in-process --------------------------------------------------------


def measure_floor(repo, manifest, task_indices: list[int], x: np.ndarray, warmup: float,
                  duration: float, task_graphs: bool = False) -> Measurement:
    """Batch-1 calls in a sequential loop through the server's own runtime code in-process (`load_version`, one
    intra-op thread): on the shared graph (the floor the ratios use: the published network's cost, as in runs
    before task graphs), or with `task_graphs` on each task's own subnetwork graph, as the server runs them."""
    from serving.runtime import load_version

    loaded = load_version(repo, manifest.version, task_graphs=task_graphs)
    feeds = [(x, np.array([t], dtype=np.int64)) for t in task_indices]
    n = len(feeds)
    end = time.perf_counter() + warmup
    i = 0
    while time.perf_counter() < end:
        loaded.run(*feeds[i % n])
        i += 1
    latencies = []
    start = time.perf_counter()
    end = start + duration
    while True:
        s = time.perf_counter()
        if s >= end:
            break
        loaded.run(*feeds[i % n])
        latencies.append(time.perf_counter() - s)
        i += 1
    return summarize("in-process ORT (task graphs)" if task_graphs else "in-process ORT (floor)", 1, latencies,
                     time.perf_counter() - start)


# ---- the server ------------------------------------------------------------------------------


def serve_command() -> list[str]:
    """clnp-serve next to this interpreter, else on PATH, else the same entry point through `python -c`."""
    beside = Path(sys.executable).with_name("clnp-serve")
    if beside.is_file():
        return [str(beside)]
    found = shutil.which("clnp-serve")
    if found:
        return [found]
    return [sys.executable, "-c", "from serving.cli import serve_main; serve_main()"]


def _children(pid: int) -> list[int]:
    """Direct child processes of pid (Linux /proc)."""
    out = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            out += [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            pass
    return out


class Server:
    """A clnp-serve subprocess on 127.0.0.1 with a free port; `target` once it listens."""

    def __init__(self, repository: Path, log_dir: Path, args: list[str], timeout: float = 120,
                 program: list[str] | None = None) -> None:
        """program: what to run instead of clnp-serve (the KServe peer); it gets --repository and ARGS."""
        log_dir.mkdir(parents=True, exist_ok=True)
        self.log_path = log_dir / f"server-{int(time.time() * 1000)}.log"
        if program is None:
            self.command = [*serve_command(), "--repository", str(repository), "--host", "127.0.0.1", "--port", "0",
                            *args]
        else:
            self.command = [*program, "--repository", str(repository), *args]
        env = dict(os.environ)
        env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
        env.pop("CLNP_TOKEN", None)
        with open(self.log_path, "w") as out:
            self.process = subprocess.Popen(self.command, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
        deadline = time.monotonic() + timeout
        while True:
            m = LISTENING.search(self.log_path.read_text(errors="replace"))
            if m:
                self.target = f"{m.group(1)}:{m.group(2)}"
                return
            if self.process.poll() is not None:
                raise RuntimeError(f"clnp-serve exited with {self.process.returncode}:\n{self.log_path.read_text()}")
            if time.monotonic() > deadline:
                self.process.kill()
                raise RuntimeError(f"clnp-serve did not listen within {timeout} s:\n{self.log_path.read_text()}")
            time.sleep(0.05)

    def memory_kib(self) -> dict[str, int]:
        """VmRSS and VmHWM (peak) of the server, in KiB: with --workers, summed over the supervisor and its workers."""
        values = {"VmRSS": 0, "VmHWM": 0}
        for pid in [self.process.pid, *_children(self.process.pid)]:
            try:
                lines = Path(f"/proc/{pid}/status").read_text().splitlines()
            except OSError:
                continue
            for line in lines:
                key, _, rest = line.partition(":")
                if key in values:
                    values[key] += int(rest.split()[0])
        return values

    def cpu_seconds(self) -> float:
        """User + system CPU time the server has used so far: its process and, with --workers, its live workers."""
        total = 0.0
        for pid in [self.process.pid, *_children(self.process.pid)]:
            try:
                fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue  # a worker that just exited
            total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        return total

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def __enter__(self) -> "Server":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


# ---- the gRPC client -------------------------------------------------------------------------


def make_requests(manifest, tasks: list[str], x: np.ndarray):
    from serving._generated.inference import grpc_service_pb2 as pb

    onnx = manifest.onnx
    requests = []
    for name in tasks:
        request = pb.ModelInferRequest(model_name=name)
        request.inputs.add(name=onnx.input_name, datatype="FP32", shape=list(x.shape))
        request.raw_input_contents.append(np.ascontiguousarray(x, dtype="<f4").tobytes())
        requests.append(request)
    return requests


def open_channels(target: str, count: int):
    import grpc

    # A local subchannel pool per channel: each channel gets its own TCP connection (channels with
    # equal arguments otherwise share one through the global pool).
    options = [("grpc.use_local_subchannel_pool", 1)]
    channels = [grpc.insecure_channel(target, options=options) for _ in range(count)]
    for channel in channels:
        grpc.channel_ready_future(channel).result(timeout=30)
    return channels


def run_load(target: str, requests, concurrency: int, channels: int, warmup: float, duration: float,
             label: str) -> Measurement:
    """`concurrency` threads, each with its own stub, looping batch-1 ModelInfer round-robin over the tasks.

    Calls that complete inside the measuring window [warm-up end, warm-up end + duration] count.
    """
    from serving._generated.inference import grpc_service_pb2_grpc as pb_grpc

    chans = open_channels(target, max(1, min(channels, concurrency)))
    n = len(requests)
    barrier = threading.Barrier(concurrency + 1)
    window: list[float] = []
    results: list[list[float]] = [[] for _ in range(concurrency)]
    errors = [0] * concurrency
    failures: list[str] = []

    def worker(k: int) -> None:
        stub = pb_grpc.GRPCInferenceServiceStub(chans[k % len(chans)])
        lat = results[k]
        i = k  # spread the threads over the tasks
        barrier.wait()
        t0, t1 = window
        while True:
            s = time.perf_counter()
            if s >= t1:
                break
            try:
                stub.ModelInfer(requests[i % n], timeout=60)
            except Exception as e:  # counted and reported; the benchmark fails on any error
                errors[k] += 1
                if len(failures) < 3:
                    failures.append(repr(e))
                i += 1
                continue
            e = time.perf_counter()
            if t0 <= e <= t1:
                lat.append(e - s)
            i += 1

    threads = [threading.Thread(target=worker, args=(k,), daemon=True) for k in range(concurrency)]
    for t in threads:
        t.start()
    now = time.perf_counter()
    window.extend([now + warmup, now + warmup + duration])
    barrier.wait()
    for t in threads:
        t.join()
    for c in chans:
        c.close()
    latencies = [v for lat in results for v in lat]
    m = summarize(label, concurrency, latencies, duration, sum(errors))
    m.extra["channels"] = len(chans)
    if failures:
        m.extra["failures"] = failures
    return m


def warm_server(target: str, requests, calls: int = 40) -> None:
    from serving._generated.inference import grpc_service_pb2_grpc as pb_grpc

    (channel,) = open_channels(target, 1)
    stub = pb_grpc.GRPCInferenceServiceStub(channel)
    for i in range(calls):
        stub.ModelInfer(requests[i % len(requests)], timeout=60)
    channel.close()


# ---- reporting -------------------------------------------------------------------------------


def machine_info() -> dict:
    import grpc
    import onnxruntime

    try:
        cpus_usable = len(os.sched_getaffinity(0))
    except AttributeError:
        cpus_usable = os.cpu_count()
    cpu_model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "cpus_usable": cpus_usable,
        "cpu_model": cpu_model,
        "onnxruntime": onnxruntime.__version__,
        "grpcio": grpc.__version__,
        "numpy": np.__version__,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def fmt(v, digits=1):
    return "-" if v is None or (isinstance(v, float) and np.isnan(v)) else f"{v:.{digits}f}"


def render_markdown(report: dict) -> str:
    m = report["machine"]
    cfg = report["config"]
    floor = report["floor"]
    lines = [
        "# Serving benchmark",
        "",
        f"Machine: {m['platform']}, {m['cpu_model'] or 'unknown CPU'}, {m['cpu_count']} CPUs "
        f"({m['cpus_usable']} usable), Python {m['python']}, onnxruntime {m['onnxruntime']}, grpcio {m['grpcio']}; "
        f"{m['date']}; load average before/after: {report['load_average']['before']} / {report['load_average']['after']}.",
        "",
        f"Model: {cfg['network']}, version {cfg['version']} with {cfg['tasks']} tasks; batch-1 requests spread "
        f"round-robin over {len(cfg['request_tasks'])} tasks ({', '.join(cfg['request_tasks'])}); "
        f"{cfg['duration_s']:g} s per point after {cfg['warmup_s']:g} s warm-up; client: one thread per concurrent "
        f"request, each with its own stub, over {cfg['channels']} gRPC channel(s) (own TCP connection each; "
        "1, 4 and 32 channels measured within the noise of each other here, so one HTTP/2-multiplexed channel "
        "is the default, `--channels N` to change); "
        f"server: `{' '.join(cfg['server_command'])}` (+ the flags each row names: `--workers N`, `--no-batching`). "
        "Latency is the client's: from the call to the decoded response, gRPC and both processes' queuing included. "
        "On this 2-core machine client and server share the CPUs (last column: cores each kept busy).",
        "",
        f"Floor (the shared graph in-process: ONNX Runtime, 1 intra-op thread, sequential batch-1 calls): "
        f"**{fmt(floor['req_per_s'])} req/s**, "
        f"p50 {fmt(floor['p50_ms'], 2)} ms, p99 {fmt(floor['p99_ms'], 2)} ms; measured "
        + ", ".join(f"{f['extra']['when']}: {fmt(f['req_per_s'])} req/s" for f in report["floor_runs"])
        + "; the highest is the floor every ratio uses (the strictest choice on a busy machine)."
        + ("" if not report.get("task_graph_floor") else
           f" The server answers each task from its own subnetwork graph (`--no-task-graphs`: the shared graph); "
           f"in-process those calls run at {fmt(report['task_graph_floor']['req_per_s'])} req/s "
           f"(p50 {fmt(report['task_graph_floor']['p50_ms'], 2)} ms), so with them the server is bound by gRPC and "
           "Python, not by the model."),
        "",
        "| server | concurrency | req/s | p50 ms | p99 ms | ratio to floor | CPU cores: server / client |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in report["results"]:
        lines.append(f"| {r['label']} | {r['concurrency']} | {fmt(r['req_per_s'])} | {fmt(r['p50_ms'], 2)} | "
                     f"{fmt(r['p99_ms'], 2)} | {fmt(r['ratio_to_floor'], 2)} | "
                     f"{fmt(r['extra'].get('server_cores'), 2)} / {fmt(r['extra'].get('client_cores'), 2)} |")
    if report.get("perf_analyzer"):
        lines += ["", "Triton's perf_analyzer against the default server, in the same run (its own C++ client; "
                      "requests for one task; each point a stable window of its own choosing):", "",
                  "| client | concurrency | req/s | p50 ms | p99 ms | ratio to floor | server queue / compute us |",
                  "|---|---:|---:|---:|---:|---:|---:|"]
        for r in report["perf_analyzer"]:
            us = r["extra"]["server_us"]
            lines.append(f"| perf_analyzer | {r['concurrency']} | {fmt(r['req_per_s'])} | {fmt(r['p50_ms'], 2)} | "
                         f"{fmt(r['p99_ms'], 2)} | {fmt(r['ratio_to_floor'], 2)} | {us['Server Queue']} / "
                         f"{us['Server Compute Input'] + us['Server Compute Infer'] + us['Server Compute Output']} |")
    t = report["target"]
    lines += [
        "",
        f"Target (concurrency {TARGET_CONCURRENCY}, batching on): throughput >= {TARGET_RATIO}x the floor and "
        f"p99 < {TARGET_P99_MS:g} ms: ratio {fmt(t['ratio'], 2)}, p99 {fmt(t['p99_ms'], 2)} ms: "
        f"**{'not measured' if t['ratio'] is None else 'met' if t['met'] else 'NOT met'}**.",
        "",
        "## Server memory",
        "",
        "VmRSS of the clnp-serve process after start-up and 200 batch-1 requests (per version: the shared graph's "
        "ONNX Runtime session, and each task's subnetwork graph where the version has them).",
        "",
        "| repository served | version | tasks | model.onnx MiB | VmRSS MiB | VmHWM MiB |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for r in report["memory"]:
        lines.append(f"| {r['served']} | {r['version']} | {r['tasks']} | {fmt(r['onnx_mib'])} | "
                     f"{fmt(r['rss_mib'])} | {fmt(r['hwm_mib'])} |")
    mem = report["memory"]
    if len(mem) == 2:
        lines += ["", f"{mem[1]['tasks']} tasks vs {mem[0]['tasks']}: {fmt(mem[1]['rss_mib'] - mem[0]['rss_mib'])} MiB "
                      f"more resident memory ({fmt(mem[1]['rss_mib'] / mem[0]['rss_mib'], 2)}x)."]
    if report.get("rss_after_load"):
        lines += ["", "Server VmRSS / VmHWM after the load runs: " + "; ".join(
            f"{k}: {fmt(v['VmRSS'] / 1024)} / {fmt(v['VmHWM'] / 1024)} MiB" for k, v in report["rss_after_load"].items()) + "."]
    lines += ["", "Command:", "", "```", report["command"], "```", ""]
    return "\n".join(lines)


# ---- Triton's perf_analyzer --------------------------------------------------------------------


def run_perf_analyzer(binary: Path, target: str, task: str, concurrency: int, window_ms: int, work_dir: Path,
                      label: str) -> Measurement:
    """One perf_analyzer point against a running server: its own client, its own figures (CSV)."""
    import csv

    out = work_dir / f"perf-analyzer-{_slug(label)}-c{concurrency}.csv"
    cmd = [str(binary), "-m", task, "-u", target, "-i", "grpc", "--concurrency-range", f"{concurrency}:{concurrency}",
           "--measurement-interval", str(window_ms), "--stability-percentage", "50", "-f", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    if proc.returncode != 0 or not out.is_file():
        tail = " ".join((proc.stdout + proc.stderr).split()[-40:])
        raise RuntimeError(f"perf_analyzer failed ({proc.returncode}): {tail}")
    row = next(csv.DictReader(out.open()))
    m = Measurement(label=label, concurrency=concurrency, requests=0, errors=0, seconds=window_ms / 1000,
                    req_per_s=round(float(row["Inferences/Second"]), 1), mean_ms=None,
                    p50_ms=round(float(row["p50 latency"]) / 1000, 2), p99_ms=round(float(row["p99 latency"]) / 1000, 2))
    m.extra["server_us"] = {k: int(row[k]) for k in ("Server Queue", "Server Compute Input", "Server Compute Infer",
                                                      "Server Compute Output")}
    return m


# ---- main ------------------------------------------------------------------------------------


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--repository", type=Path, help="benchmark this existing model repository (its latest version)")
    src.add_argument("--build", action="store_true", help="build (or reuse) a repository under --work-dir")
    p.add_argument("--work-dir", type=Path, default=DEFAULT_WORK_DIR,
                   help="cache of built repositories and server logs, reused between runs")
    p.add_argument("--network", default=DEFAULT_NETWORK, help="network of the built repository")
    p.add_argument("--tasks", type=int, default=10, help="tasks of the built repository (one version each)")
    p.add_argument("--limit", type=int, default=2000, help="training samples per task when building")
    p.add_argument("--data-dir", type=Path, default=DATA_DIR, help="MNIST data directory when building")
    p.add_argument("--spread", type=int, default=4, help="tasks the requests are spread over (round-robin)")
    p.add_argument("--concurrency", default="1,8,32", help="comma-separated client concurrencies")
    p.add_argument("--duration", type=float, default=8.0, help="measured seconds per point")
    p.add_argument("--warmup", type=float, default=2.0, help="warm-up seconds before each point")
    p.add_argument("--channels", type=int, default=1,
                   help="gRPC channels (TCP connections) the client threads share round-robin")
    p.add_argument("--server-arg", action="append", default=[],
                   help="extra clnp-serve argument (repeatable), e.g. --server-arg=--threads=32")
    p.add_argument("--skip-no-batching", action="store_true", help="only measure the default (batching) server")
    p.add_argument("--skip-memory", action="store_true", help="skip the 1-task vs N-task memory comparison")
    p.add_argument("--perf-analyzer", type=Path, default=None,
                   help="also measure the default server with Triton's perf_analyzer binary at these concurrencies "
                        "(it needs LD_LIBRARY_PATH to reach libcudart; see README)")
    p.add_argument("--kserve-python", type=Path, default=None,
                   help="also measure KServe's model server over the same ONNX model (benchmarks/kserve_peer.py), "
                        "run by this interpreter: one from a virtual environment with kserve installed")
    p.add_argument("--workers", default="1",
                   help="comma-separated clnp-serve --workers counts measured with batching on, e.g. 1,2")
    p.add_argument("--output", type=Path, default=None,
                   help="write OUTPUT.md and OUTPUT.json [default: a new temporary folder; the committed results are "
                        f"{COMMITTED_OUTPUT.relative_to(ROOT)}]")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    started = time.perf_counter()
    concurrencies = [int(c) for c in args.concurrency.split(",") if c.strip()]
    args.work_dir.mkdir(parents=True, exist_ok=True)
    log_dir = args.work_dir / "logs"
    load_before = os.getloadavg()

    if args.build:
        repository = build_repository(args.work_dir / f"repo-{_slug(args.network)}", args.tasks, args.network,
                                      args.limit, args.data_dir)
    else:
        repository = args.repository
    repo = ModelRepository.open(repository)
    manifest = repo.verify()
    versions = repo.versions()
    request_tasks = [t.name for t in manifest.tasks[: max(1, args.spread)]]
    task_indices = [manifest.task(name).index for name in request_tasks]
    x = np.random.default_rng(0).integers(0, 256, size=(1, *manifest.input_shape)).astype(np.float32)
    requests = make_requests(manifest, request_tasks, x)
    print(f"repository {repository}: version {manifest.version}, {len(manifest.tasks)} tasks, {manifest.network}; "
          f"requests over {request_tasks}", flush=True)

    floors: list[Measurement] = []

    def floor_run(when: str) -> None:
        f = measure_floor(repo, manifest, task_indices, x, args.warmup, args.duration)
        f.extra["when"] = when
        floors.append(f)
        print(f"floor (in-process ORT, {when}): {f.req_per_s} req/s, p50 {f.p50_ms} ms, p99 {f.p99_ms} ms", flush=True)

    if args.output is None:
        import tempfile

        args.output = Path(tempfile.mkdtemp(prefix="clnp-serving-benchmark-")) / "serving"
    worker_counts = [int(w) for w in args.workers.split(",") if w.strip()]
    modes = [("batching" if w == 1 else f"batching, {w} workers", [] if w == 1 else ["--workers", str(w)])
             for w in worker_counts]
    if not args.skip_no_batching:
        modes.append(("no batching", ["--no-batching"]))
    if args.kserve_python is not None:
        modes.append(("KServe peer", None))
    results: list[Measurement] = []
    pa_results: list[Measurement] = []
    rss_after_load = {}
    server_command = None
    for label, extra in modes:
        floor_run(f"before the {label} server")
        peer = [str(args.kserve_python), str(ROOT / "benchmarks" / "kserve_peer.py")] if extra is None else None
        with Server(repository, log_dir, [] if peer else [*extra, *args.server_arg], program=peer) as server:
            server_command = server_command or (None if peer else server.command)
            warm_server(server.target, requests)
            for c in concurrencies:
                server_cpu, client_cpu, wall = server.cpu_seconds(), time.process_time(), time.perf_counter()
                m = run_load(server.target, requests, c, args.channels, args.warmup, args.duration, label)
                wall = time.perf_counter() - wall
                # CPU cores each side kept busy over the point (warm-up included): on a 2-core
                # machine the client's share is taken from the server.
                m.extra["server_cores"] = round((server.cpu_seconds() - server_cpu) / wall, 2)
                m.extra["client_cores"] = round((time.process_time() - client_cpu) / wall, 2)
                results.append(m)
                print(f"{label:>12} c={c:<3} {m.req_per_s:8.1f} req/s  p50 {m.p50_ms:7.2f} ms  p99 {m.p99_ms:7.2f} ms"
                      f"  errors {m.errors}  cores server {m.extra['server_cores']} client {m.extra['client_cores']}",
                      flush=True)
            rss_after_load[label] = server.memory_kib()
            if args.perf_analyzer is not None and label == "batching":
                for c in concurrencies:
                    m = run_perf_analyzer(args.perf_analyzer, server.target, request_tasks[0], c,
                                          int(args.duration * 1000 / 2), args.work_dir, f"perf_analyzer, {label}")
                    pa_results.append(m)
                    print(f"perf_analyzer c={c:<3} {m.req_per_s:8.1f} req/s  p50 {m.p50_ms:7.2f} ms  "
                          f"p99 {m.p99_ms:7.2f} ms  server us {m.extra['server_us']}", flush=True)

    floor_run("after the servers")
    floor = max(floors, key=lambda f: f.req_per_s)
    graph_floor = None
    if any(t.graph for t in manifest.tasks):
        graph_floor = measure_floor(repo, manifest, task_indices, x, args.warmup, args.duration, task_graphs=True)
        print(f"in-process with task graphs: {graph_floor.req_per_s} req/s, p50 {graph_floor.p50_ms} ms", flush=True)
    for m in [*results, *pa_results]:
        m.ratio_to_floor = round(m.req_per_s / floor.req_per_s, 3) if floor.req_per_s else None

    memory = []
    if not args.skip_memory:
        oldest = versions[0]
        targets = []
        if oldest != manifest.version:
            small = single_version_copy(repo.root, oldest, args.work_dir / f"version-{oldest}-of-{_slug(str(repo.root))}")
            targets.append((small, oldest))
        targets.append((repo.root, manifest.version))
        for root, version in targets:
            vm = ModelRepository.open(root).read_manifest(version)
            tasks = [t.name for t in vm.tasks[: max(1, args.spread)]]
            with Server(root, log_dir, list(args.server_arg)) as server:
                warm_server(server.target, make_requests(vm, tasks, x), calls=200)
                time.sleep(0.5)
                kib = server.memory_kib()
            onnx_bytes = (root / str(version) / vm.onnx.file).stat().st_size
            memory.append({"repository": str(root),
                           "served": "latest version" if root == repo.root else f"copy of version {version} alone",
                           "version": version, "tasks": len(vm.tasks),
                           "onnx_mib": round(onnx_bytes / 2**20, 1), "rss_mib": round(kib["VmRSS"] / 1024, 1),
                           "hwm_mib": round(kib["VmHWM"] / 1024, 1)})
            print(f"memory: version {version} ({len(vm.tasks)} tasks): VmRSS {kib['VmRSS'] / 1024:.1f} MiB", flush=True)

    at_target = next((m for m in results if m.label == "batching" and m.concurrency == TARGET_CONCURRENCY), None)
    target = {"concurrency": TARGET_CONCURRENCY, "min_ratio": TARGET_RATIO, "max_p99_ms": TARGET_P99_MS,
              "ratio": None, "p99_ms": None, "met": False}
    if at_target is not None:
        target.update(ratio=at_target.ratio_to_floor, p99_ms=at_target.p99_ms,
                      met=bool(at_target.errors == 0 and at_target.ratio_to_floor is not None
                               and at_target.ratio_to_floor >= TARGET_RATIO and at_target.p99_ms < TARGET_P99_MS))

    report = {
        "machine": machine_info(),
        "load_average": {"before": [round(v, 2) for v in load_before], "after": [round(v, 2) for v in os.getloadavg()]},
        "config": {
            "repository": str(repository), "network": manifest.network, "version": manifest.version,
            "tasks": len(manifest.tasks), "request_tasks": request_tasks, "batch": 1,
            "concurrency": concurrencies, "duration_s": args.duration, "warmup_s": args.warmup,
            "channels": args.channels, "client": "one thread per concurrent request, own stub each (our generated stubs)",
            "server_command": [Path(server_command[0]).name, *server_command[1:]] if server_command else None,
        },
        "floor": asdict(floor),
        "floor_runs": [asdict(f) for f in floors],
        "task_graph_floor": None if graph_floor is None else asdict(graph_floor),
        "results": [asdict(m) for m in results],
        "perf_analyzer": [asdict(m) for m in pa_results],
        "target": target,
        "memory": memory,
        "rss_after_load": rss_after_load,
        "command": " ".join(["python", "benchmarks/serving.py", *(sys.argv[1:] if argv is None else argv)]),
        "total_seconds": None,
    }
    report["total_seconds"] = round(time.perf_counter() - started, 1)
    markdown = render_markdown(report)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    args.output.with_suffix(".md").write_text(markdown)
    print()
    print(markdown)
    verdict = "not measured" if at_target is None else "met" if target["met"] else "NOT met"
    print(f"target at concurrency {TARGET_CONCURRENCY}: {verdict} "
          f"(ratio {target['ratio']}, p99 {target['p99_ms']} ms); total {report['total_seconds']} s", flush=True)
    print(f"wrote {args.output.with_suffix('.md')} and {args.output.with_suffix('.json')}")
    return 0 if all(m.errors == 0 for m in results) else 1


if __name__ == "__main__":
    sys.exit(main())
