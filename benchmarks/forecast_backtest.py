#!/usr/bin/env python
"""Replays the capacity forecast on finished sequence runs: what it would have said, and what happened.

For every CLNP run folder given (each holds the `run.json` that `benchmarks/sequence.py` writes) and every
task count `n` from --from on, the forecast is made from the first `n` tasks only, as `clnp-train capacity`
would have made it then. It is compared with the rest of the run, which it never saw:

- the new units per layer the remaining tasks took, against what the forecast assumed they would take;
- the tasks that fit after task `n`: a count when the run filled the network, otherwise a lower bound (the
  tasks the run went on to learn) and the count the forecast made at the run's end, from all its tasks.

Two rules side by side: `trend` (`serving.capacity.forecast_additional_tasks`, what the product uses) and
`recent mean` (each new task takes the mean of the last 3 tasks' new units; the rule before it).

    python benchmarks/forecast_backtest.py benchmarks/results/sequence/runs/* --from 5
    python benchmarks/forecast_backtest.py RUN... --out benchmarks/results/forecast_backtest.md

Prints markdown; --out writes it to a file (it refuses to overwrite one unless --force).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from serving.capacity import forecast_additional_tasks, trend_units, unit_trend  # noqa: E402

RECENT = 3


def load_units(folder: Path) -> tuple[dict[str, int], list[dict[str, int]]] | None:
    """(units per layer, new units per task per layer) of a CLNP run, or None for another kind of run."""
    path = folder / "run.json"
    if not path.is_file():
        return None
    record = json.loads(path.read_text())
    tasks = record.get("tasks", [])
    if record.get("method") != "clnp" or not tasks or not tasks[0].get("free_after"):
        return None
    first = tasks[0]
    totals = {n: first["free_after"][n] + first["units_kept"][n] for n in first["free_after"]}
    return totals, [{n: t["units_kept"][n] for n in totals} for t in tasks]


def trend_need(owned: list[dict[str, int]], k: int) -> dict[str, float]:
    """New units per layer the trend rule expects of the k-th task (k from 1)."""
    out = {}
    for name in owned[0]:
        units = [o[name] for o in owned]
        if any(units):
            out[name] = trend_units(*unit_trend(units), k)
        else:
            out[name] = 0.0
    return out


def recent_mean_need(owned: list[dict[str, int]]) -> dict[str, float]:
    recent = owned[-RECENT:]
    return {name: sum(o[name] for o in recent) / len(recent) for name in owned[0]}


def recent_mean_fit(free: dict[str, int], owned: list[dict[str, int]]) -> float:
    need = recent_mean_need(owned)
    fits = [free[n] // need[n] for n in need if need[n] > 0]
    return float(min(fits)) if fits else math.inf


def replay(totals: dict[str, int], owned: list[dict[str, int]], n: int) -> dict:
    seen, rest = owned[:n], owned[n:]
    free = {name: totals[name] - sum(o[name] for o in seen) for name in totals}
    tight = min(free, key=free.get)  # report the layer with the fewest FREE units
    actual = sum(o[tight] for o in rest)
    trend = sum(trend_need(seen, n + 1 + j)[tight] for j in range(len(rest)))
    recent = recent_mean_need(seen)[tight] * len(rest)
    fit_trend, _ = forecast_additional_tasks(totals, free, seen)
    return {"n": n, "layer": tight, "free": free[tight], "rest": len(rest), "actual": actual,
            "trend": trend, "recent": recent, "fit_trend": fit_trend, "fit_recent": recent_mean_fit(free, seen)}


def pct(pred: float, actual: float) -> str:
    return f"{100 * (pred - actual) / actual:+.0f}%" if actual else "n/a"


def report(folders: list[Path], start: int) -> str:
    lines = ["# Capacity forecast, replayed on finished runs", "",
             f"Made by `python benchmarks/forecast_backtest.py RUN... --from {start}`: CLNP runs with more than {start} "
             "tasks. Each forecast sees only the first n tasks of a run; the columns after it",
             "are what the rest of the run did. Units are those of the layer with the fewest FREE units.", ""]
    errors: dict[str, list[float]] = {"trend": [], "recent": []}  # signed, relative to what the rest took
    for folder in folders:
        loaded = load_units(folder)
        if loaded is None:
            continue
        totals, owned = loaded
        if len(owned) <= start:
            continue
        lines += [f"## {folder.name} ({len(owned)} tasks)", "",
                  "| after task n | FREE | tasks after n | new units they took | trend expected | recent mean "
                  "expected | trend: tasks that fit | recent mean: tasks that fit |",
                  "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
        for n in range(start, len(owned)):
            r = replay(totals, owned, n)
            errors["trend"].append((r["trend"] - r["actual"]) / r["actual"] if r["actual"] else 0.0)
            errors["recent"].append((r["recent"] - r["actual"]) / r["actual"] if r["actual"] else 0.0)
            lines.append(f"| {n} | {r['free']} | {r['rest']} | {r['actual']} | {r['trend']:.0f} ({pct(r['trend'], r['actual'])}) "
                         f"| {r['recent']:.0f} ({pct(r['recent'], r['actual'])}) | {r['fit_trend']:.0f} | {r['fit_recent']:.0f} |")
        free_end = {name: totals[name] - sum(o[name] for o in owned) for name in totals}
        end_fit, basis = forecast_additional_tasks(totals, free_end, owned)
        full = any(v == 0 for v in free_end.values())
        lines += ["", f"At the end of the run: FREE {free_end}; "
                  + ("the network is full." if full else
                     f"the trend forecast, now from all {len(owned)} tasks, says {end_fit:.0f} more fit ({basis})."), ""]
    if errors["trend"]:
        lines += ["## Summary", "",
                  f"Over {len(errors['trend'])} replayed points, the mean absolute error of the new units the rest of "
                  f"the run took: trend {100 * statistics.mean(map(abs, errors['trend'])):.0f}%, "
                  f"recent mean {100 * statistics.mean(map(abs, errors['recent'])):.0f}%. The mean signed error "
                  f"(positive: the rule expected more units than were taken, so it under-counts the tasks that fit): "
                  f"trend {100 * statistics.mean(errors['trend']):+.0f}%, "
                  f"recent mean {100 * statistics.mean(errors['recent']):+.0f}%.", ""]
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="+", type=Path, help="sequence run folders (each with run.json)")
    ap.add_argument("--from", dest="start", type=int, default=5, help="first task count to replay from (default 5)")
    ap.add_argument("--out", type=Path, help="write the markdown here instead of printing it")
    ap.add_argument("--force", action="store_true", help="overwrite --out if it exists")
    args = ap.parse_args()
    if args.start < 1:
        ap.error("--from must be at least 1")
    text = report(sorted(args.runs), args.start)
    if args.out:
        if args.out.exists() and not args.force:
            print(f"error: {args.out} exists; pass --force to overwrite it", file=sys.stderr)
            return 2
        args.out.write_text(text + "\n")
    else:
        print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
