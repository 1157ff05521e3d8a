#!/usr/bin/env python
"""Interleaved A/B of two clnp-serve configurations at one concurrency.

On a shared, noisy machine a figure measured minutes after another can differ by more than the
change being measured (the floor of one serving benchmark run moved from 1504 to 1886 req/s).
This runs both servers at once and alternates short windows between them, round after round, so
drift hits both alike; it reports each side's median and every window.

    python benchmarks/serving_ab.py --repository DIR --a= --b=--no-batching --concurrency 1 --rounds 6
    python benchmarks/serving_ab.py --repository DIR --kserve-python /path/to/kserve-venv/bin/python --concurrency 1

The client and the servers are those of benchmarks/serving.py. Prints a markdown table; writes nothing.
"""

from __future__ import annotations

import argparse
import importlib.util
import shlex
import statistics
import sys
from pathlib import Path

# benchmarks/serving.py under another name: `serving` is the package it benchmarks (it puts the repository root
# first on sys.path as it loads)
_spec = importlib.util.spec_from_file_location("serving_benchmark", Path(__file__).resolve().parent / "serving.py")
bench = importlib.util.module_from_spec(_spec)
sys.modules["serving_benchmark"] = bench
_spec.loader.exec_module(bench)

import numpy as np  # noqa: E402

from serving.repository import ModelRepository  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repository", type=Path, required=True)
    p.add_argument("--a", default="", help="clnp-serve flags of side A (default: none)")
    p.add_argument("--b", default="--no-batching", help="clnp-serve flags of side B")
    p.add_argument("--kserve-python", type=Path, default=None,
                   help="make side B KServe's model server over the same ONNX model (benchmarks/kserve_peer.py), run "
                        "by this interpreter (a virtual environment with kserve); --b is then ignored")
    p.add_argument("--concurrency", type=int, default=1)
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--window", type=float, default=2.0, help="measured seconds per window")
    p.add_argument("--spread", type=int, default=4, help="tasks the requests are spread over")
    args = p.parse_args(argv)

    manifest = ModelRepository.open(args.repository).verify()
    tasks = [t.name for t in manifest.tasks[: max(1, args.spread)]]
    x = np.random.default_rng(0).integers(0, 256, size=(1, *manifest.input_shape)).astype(np.float32)
    requests = bench.make_requests(manifest, tasks, x)
    sides = {f"A: `{args.a or '(defaults)'}`": (shlex.split(args.a), None)}
    if args.kserve_python is not None:
        sides["B: KServe peer"] = ([], [str(args.kserve_python), str(Path(__file__).resolve().parent / "kserve_peer.py")])
    else:
        sides[f"B: `{args.b or '(defaults)'}`"] = (shlex.split(args.b), None)
    windows: dict[str, list[float]] = {k: [] for k in sides}
    servers = {}
    try:
        for name, (flags, program) in sides.items():
            servers[name] = bench.Server(args.repository, bench.DEFAULT_WORK_DIR / "logs", flags, program=program)
            bench.warm_server(servers[name].target, requests)
        for _ in range(args.rounds):
            for name, server in servers.items():
                m = bench.run_load(server.target, requests, args.concurrency, 1, 0.5, args.window, name)
                if m.errors:
                    raise SystemExit(f"{name}: {m.errors} failed calls")
                windows[name].append(m.req_per_s)
    finally:
        for server in servers.values():
            server.stop()
    print(f"concurrency {args.concurrency}, {args.rounds} interleaved rounds of {args.window:g} s, "
          f"{manifest.network} version {manifest.version}\n")
    print("| side | median req/s | windows |\n|---|---:|---|")
    for name, values in windows.items():
        print(f"| {name} | {statistics.median(values):.0f} | {', '.join(f'{v:.0f}' for v in values)} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
