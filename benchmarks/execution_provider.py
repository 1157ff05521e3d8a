"""ONNX Runtime execution providers compared on one published version: batch-1 and batched calls.

Loads the version the way `clnp-serve` does (`serving.runtime.load_version`, task graphs on), once per
execution provider, and times `LoadedVersion.run` in this process for each batch size: latency p50/p99 and
rows per second. Every provider's scores are compared with the CPU provider's on the same rows, so a figure
is only reported for a provider that answers what the CPU answers (up to float32 round-off).

    python benchmarks/execution_provider.py --repository REPO [--version N] --out /tmp/ep
    python benchmarks/execution_provider.py --repository REPO --providers cpu cuda --batch-sizes 1 64 5000 ...

`cuda` needs the onnxruntime-gpu build (`pip install 'clnp[gpu]'`) and a CUDA GPU; without them the run
stops with the same one-line error `clnp-serve --execution-provider cuda` gives. Results go to --out only: the
committed results in benchmarks/results/ change only when --out names that folder.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the repository first: benchmarks/serving.py must not shadow the package

import numpy as np  # noqa: E402

from serving.repository import ModelRepository  # noqa: E402
from serving.runtime import check_execution_provider, load_version  # noqa: E402

TOLERANCE = dict(rtol=1e-4, atol=1e-4)  # GPU kernels sum in another order than the CPU's


def machine_info(providers: list[str]) -> dict:
    info = {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(), "python": platform.python_version()}
    import onnxruntime as ort

    info["onnxruntime"] = ort.__version__
    if "cuda" in providers:
        try:
            info["gpu"] = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version", "--format=csv,noheader"],
                                         capture_output=True, text=True, timeout=30).stdout.strip()
        except (OSError, subprocess.SubprocessError) as e:
            info["gpu"] = f"unknown ({e})"
    return info


def time_calls(loaded, x: np.ndarray, tasks: np.ndarray, warmup: float, duration: float, min_calls: int) -> dict:
    end = time.perf_counter() + warmup
    while time.perf_counter() < end:
        loaded.run(x, tasks)
    latencies = []
    start = time.perf_counter()
    while time.perf_counter() - start < duration or len(latencies) < min_calls:
        t0 = time.perf_counter()
        loaded.run(x, tasks)
        latencies.append(time.perf_counter() - t0)
    seconds = time.perf_counter() - start
    ms = np.array(latencies) * 1e3
    return {"calls": len(latencies), "p50_ms": float(np.percentile(ms, 50)), "p99_ms": float(np.percentile(ms, 99)),
            "calls_per_s": len(latencies) / seconds, "rows_per_s": len(latencies) * len(x) / seconds}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repository", required=True, help="a local model repository")
    p.add_argument("--version", type=int, default=None, help="default: the newest")
    p.add_argument("--providers", nargs="+", default=["cpu", "cuda"], choices=["cpu", "cuda"])
    p.add_argument("--cpu-threads", type=int, nargs="+", default=[1],
                   help="intra-op threads for the CPU provider (1: what each clnp-serve worker uses by default)")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8, 64, 512, 5000])
    p.add_argument("--task", type=int, default=None, help="task index (default: the newest task)")
    p.add_argument("--warmup", type=float, default=0.5)
    p.add_argument("--duration", type=float, default=2.0, help="seconds of timed calls per batch size")
    p.add_argument("--out", required=True, help="folder for execution_provider.json and .md")
    args = p.parse_args(argv)

    for name in args.providers:
        try:
            check_execution_provider(name)
        except RuntimeError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
    repo = ModelRepository.open(args.repository)
    version = args.version if args.version is not None else repo.versions()[-1]
    manifest = repo.read_manifest(version)
    task = args.task if args.task is not None else manifest.tasks[-1].index
    rng = np.random.default_rng(0)
    biggest = max(args.batch_sizes)
    x_all = rng.random((biggest, *manifest.input_shape), dtype=np.float32)

    setups = [("cpu", n) for n in args.cpu_threads if "cpu" in args.providers]
    setups += [(name, 1) for name in args.providers if name != "cpu"]
    reference = {}
    rows = []
    for name, threads in setups:
        loaded = load_version(repo, version, intra_op_threads=threads, execution_provider=name, task_graphs=True)
        for b in args.batch_sizes:
            x = np.ascontiguousarray(x_all[:b])
            tasks = np.full(b, task, dtype=np.int64)
            scores = loaded.run(x, tasks)
            if name == "cpu" and b not in reference:
                reference[b] = scores
            diff = float(np.max(np.abs(scores - reference[b]))) if b in reference else None
            if b in reference and not np.allclose(scores, reference[b], **TOLERANCE):
                print(f"error: {name} disagrees with the CPU provider at batch {b}: max difference {diff:.3g}",
                      file=sys.stderr)
                return 1
            r = time_calls(loaded, x, tasks, args.warmup, args.duration, min_calls=5)
            r.update(provider=name, intra_op_threads=threads, batch=b, max_abs_diff_to_cpu=diff)
            rows.append(r)
            print(f"{name:5s} threads {threads:2d} batch {b:5d}: p50 {r['p50_ms']:8.3f} ms  p99 {r['p99_ms']:8.3f} ms  "
                  f"{r['rows_per_s']:12,.0f} rows/s", flush=True)
        del loaded

    report = {"machine": machine_info(args.providers), "repository_version": version, "task": task,
              "units_seen": manifest.tasks[task].graph.get("units") if manifest.tasks[task].graph else None,
              "rows": rows}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "execution_provider.json").write_text(json.dumps(report, indent=1))
    (out / "execution_provider.md").write_text(render(report))
    print(f"wrote {out / 'execution_provider.md'}")
    return 0


def render(report: dict) -> str:
    m = report["machine"]
    lines = [
        "# Execution providers: in-process calls of one version",
        "",
        f"Version {report['repository_version']}, task {report['task']} (its own task graph), "
        f"`LoadedVersion.run` as the server calls it. Machine: {m['processor']}, {m['cpu_count']} CPU cores"
        + (f", GPU {m['gpu']}" if m.get("gpu") else "") + f"; ONNX Runtime {m['onnxruntime']}.",
        "",
        "| provider | intra-op threads | batch | p50 ms | p99 ms | rows/s | max \\|diff\\| to CPU |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in report["rows"]:
        diff = "—" if r["max_abs_diff_to_cpu"] is None else f"{r['max_abs_diff_to_cpu']:.1e}"
        lines.append(f"| {r['provider']} | {r['intra_op_threads']} | {r['batch']} | {r['p50_ms']:.3f} | "
                     f"{r['p99_ms']:.3f} | {r['rows_per_s']:,.0f} | {diff} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
