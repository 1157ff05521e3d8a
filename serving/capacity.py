"""Capacity diagnostics derived from a manifest: free, owned and reused units per layer and per task."""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass

from serving.contract import plan_share
from serving.repository import Manifest


@dataclass(frozen=True)
class LayerCapacity:
    name: str  # layer name
    kind: str  # "dense" or "conv"
    total: int  # units in the layer
    free: int  # units no task owns
    owned_by_task: dict[str, int]  # task name -> units it owns (learning order)


@dataclass(frozen=True)
class TaskCapacity:
    name: str  # task name
    index: int  # learning order
    owned_per_layer: dict[str, int]  # layer -> units the task owns
    reused_per_layer: dict[str, int]  # layer -> units of earlier tasks that keep a connection into the task


@dataclass(frozen=True)
class CapacityReport:
    version: int
    layers: tuple[LayerCapacity, ...]
    tasks: tuple[TaskCapacity, ...]
    estimated_additional_tasks: float | None  # None: nothing to estimate from (no task yet)
    estimate_basis: str  # how the estimate was made, in words

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_json(self) -> dict:
        """The one JSON form of a report (clnp-train and clnp-admin `capacity --json` both print it).

        `estimated_additional_tasks` is a number, the string "unbounded" when the recent tasks took
        no new unit, or null when there is nothing to estimate from (no task yet).
        """
        data = json.loads(json.dumps(self.to_dict(), default=str, allow_nan=True))  # tuples -> lists
        est = self.estimated_additional_tasks
        data["estimated_additional_tasks"] = None if est is None or math.isnan(est) else (
            "unbounded" if math.isinf(est) else est)
        return data


def capacity_report(manifest: Manifest) -> CapacityReport:
    """Per-layer and per-task unit accounting of one version.

    The estimate of further tasks is `forecast_additional_tasks`: the trend of new units per task, per
    layer; the tightest layer decides. A network planned for more tasks than it holds (Manifest.plan_tasks)
    fits exactly the rest of its plan, each keeping an equal share of the FREE units.
    """
    layers = tuple(
        LayerCapacity(
            name=l.name,
            kind=l.kind,
            total=l.units,
            free=l.free,
            owned_by_task={t.name: l.owned_by(t.index) for t in manifest.tasks},
        )
        for l in manifest.layers
    )
    tasks = tuple(
        TaskCapacity(
            name=t.name,
            index=t.index,
            owned_per_layer={l.name: l.owned_by(t.index) for l in manifest.layers},
            reused_per_layer={l.name: int(t.reused.get(l.name, 0)) for l in manifest.layers},
        )
        for t in manifest.tasks
    )
    if not manifest.tasks:
        return CapacityReport(manifest.version, layers, tasks, None, "no task learned yet")
    n, basis = forecast_additional_tasks(
        {l.name: l.units for l in manifest.layers}, {l.name: l.free for l in manifest.layers},
        [{l.name: l.owned_by(t.index) for l in manifest.layers} for t in manifest.tasks])
    if manifest.plan_tasks > len(manifest.tasks) and all(l.free for l in manifest.layers):
        # a plan says what the next tasks keep: no trend to guess
        left = manifest.plan_tasks - len(manifest.tasks)
        shares = ", ".join(f"{l.name} {plan_share(l.free, manifest.plan_tasks, len(manifest.tasks))}"
                           for l in manifest.layers)
        trend = "unbounded" if math.isinf(n) else f"{n:.0f}"
        return CapacityReport(manifest.version, layers, tasks, float(left), (
            f"the network is planned for {manifest.plan_tasks} tasks (clnp-train add-task --plan-tasks) and holds "
            f"{len(manifest.tasks)}: each of the {left} left keeps an equal share of the FREE units, the next "
            f"{shares}; without the plan, the tasks so far would forecast {trend} ({basis})"))
    return CapacityReport(manifest.version, layers, tasks, n, basis)


TREND_MIN_TASKS = 5  # fewer tasks than this: no trend is fitted, each new task takes the mean of those so far
TREND_MAX_DECLINE = 0.5  # cap on b in a·k^-b: the measured runs fit about 0.5 at most; a steeper fit of a few tasks is noise
_FORECAST_LIMIT = 1_000_000  # more tasks than this counts as unbounded


def first_fitted_task(n: int) -> int:
    """The first task (from 1) in the trend fitted to `n` tasks: task 1 had no earlier unit to reuse, so it is left
    out once TREND_MIN_TASKS tasks follow it (see `unit_trend`)."""
    return 2 if n > TREND_MIN_TASKS else 1


def unit_trend(units: list[int]) -> tuple[float, float]:
    """(a, b) such that the k-th task (k from 1) takes about a·k^-b - 1 new units of a layer.

    Least squares of log(units + 1) on log k (the +1 keeps a task that took no unit in the fit), with b clipped
    to [0, TREND_MAX_DECLINE] and the line kept through the mean point. Fewer than TREND_MIN_TASKS tasks: b = 0
    and a - 1 is the plain mean. Later tasks reuse more of the earlier ones and take fewer units of their own;
    a power law fits that decline in the measured runs (benchmarks/forecast_backtest.py) where a fixed rate
    does not. Once TREND_MIN_TASKS tasks follow it, the first task is left out of the fit: it had no earlier
    unit to reuse, so it is not a point of the decline (replayed on 93 points of the measured runs, leaving it in
    made the trend expect 10% more units than the later tasks took, on average; leaving it out, 6%). Closed form, a few
    lines of arithmetic: no fitting library is needed.
    """
    n = len(units)
    if n < TREND_MIN_TASKS:
        return sum(units) / n + 1.0, 0.0
    first = first_fitted_task(n)
    xs = [math.log(k) for k in range(first, n + 1)]
    ys = [math.log(u + 1.0) for u in units[first - 1:]]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)
    b = min(max(-slope, 0.0), TREND_MAX_DECLINE)
    return math.exp(my + b * mx), b


def trend_units(a: float, b: float, k: int) -> float:
    """New units of a layer the k-th task is expected to take under the trend (a, b): at least one."""
    return max(a * k ** -b - 1.0, 1.0)


def forecast_additional_tasks(layer_units: dict[str, int], free: dict[str, int],
                              owned_per_task: list[dict[str, int]]) -> tuple[float, str]:
    """How many more tasks fit, and the assumption it rests on, in words.

    Per layer, the new units every task so far took (units it owns; units it reuses cost nothing) are fitted
    as a trend over the task's position, `unit_trend`; the next tasks are assumed to follow it, taking at
    least one unit of a layer that earlier tasks took units of. A task fits while every layer still has the
    units it needs, so the tightest layer decides. math.inf when no task took a unit at all.
    """
    n = len(owned_per_task)
    full = [name for name in layer_units if free[name] == 0]
    if full:
        return 0.0, f"{', '.join(full)} has no free unit left"
    trends = {name: unit_trend([o[name] for o in owned_per_task]) for name in layer_units
              if any(o[name] for o in owned_per_task)}
    if not trends:
        return math.inf, f"the {n} task(s) so far took no new unit in any layer"

    def need(name: str, k: int) -> float:
        return trend_units(*trends[name], k)

    left = {name: float(free[name]) for name in trends}
    count, limit = 0, None
    while count < _FORECAST_LIMIT:
        k = n + count + 1
        short = [name for name in trends if need(name, k) > left[name]]
        if short:
            limit = short[0]
            break
        for name in trends:
            left[name] -= need(name, k)
        count += 1
    else:
        return math.inf, f"the {n} tasks so far took so few units that more than {_FORECAST_LIMIT} fit"
    nxt = ", ".join(f"{name} {need(name, n + 1):.0f}" for name in trends)
    tail = f"so the next takes {nxt}; {limit} runs out first ({free[limit]} free)"
    if n < TREND_MIN_TASKS:
        return float(count), f"assuming each new task takes the mean new units of the {n} so far, {tail}"
    seen = f"tasks 2–{n} (task 1 had no earlier unit to reuse)" if first_fitted_task(n) == 2 else f"the {n} so far"
    if all(b == 0.0 for _, b in trends.values()):
        return float(count), f"assuming new tasks take as many new units as {seen} (no decline in them), {tail}"
    law = ", ".join(f"{name} a={a:.0f} b={b:.2f}" for name, (a, b) in trends.items())
    return float(count), (f"assuming new tasks follow the decline of {seen}, about a·k^-b - 1 new units for the "
                          f"k-th task ({law}), {tail}")


def format_capacity(report: CapacityReport) -> str:
    """A readable two-part table: units per layer by owner, then per task owned/reused."""
    lines = [f"version {report.version}", ""]
    task_names = [t.name for t in report.tasks]
    header = ["layer", "kind", "total", "FREE"] + task_names
    rows = [[l.name, l.kind, str(l.total), str(l.free)] + [str(l.owned_by_task[n]) for n in task_names] for l in report.layers]
    lines += _table(header, rows)
    if report.tasks:
        lines.append("")
        header = ["task", "index"] + [f"{l.name} owned/reused" for l in report.layers]
        rows = [
            [t.name, str(t.index)] + [f"{t.owned_per_layer[l.name]}/{t.reused_per_layer[l.name]}" for l in report.layers]
            for t in report.tasks
        ]
        lines += _table(header, rows)
    lines.append("")
    est = report.estimated_additional_tasks
    est_text = "unknown" if est is None else ("unbounded" if math.isinf(est) else str(int(est)))
    lines.append(f"more tasks that fit (forecast): {est_text}; {report.estimate_basis}")
    return "\n".join(lines)


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    widths = [max(len(r[i]) for r in [header] + rows) for i in range(len(header))]
    fmt = lambda r: "  ".join(c.rjust(w) if i >= 2 else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths)))
    return [fmt(header), "  ".join("-" * w for w in widths)] + [fmt(r) for r in rows]
