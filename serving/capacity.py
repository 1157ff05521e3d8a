"""Capacity diagnostics derived from a manifest: free, owned and reused units per layer and per task."""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass

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

    The estimate of further tasks is `forecast_additional_tasks`: the recent tasks' mean new units per
    layer; the tightest layer decides.
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
        [{l.name: l.owned_by(t.index) for l in manifest.layers} for t in manifest.tasks],
        [t.name for t in manifest.tasks])
    return CapacityReport(manifest.version, layers, tasks, n, basis)


FORECAST_WINDOW = 3  # recent tasks whose new units per layer are averaged into "a task like these"


def forecast_additional_tasks(layer_units: dict[str, int], free: dict[str, int], owned_per_task: list[dict[str, int]],
                              task_names: list[str] | None = None) -> tuple[float, str]:
    """How many more tasks fit, and the assumption it rests on, in words.

    Assumes each new task takes, per layer, the mean of the new units the last FORECAST_WINDOW tasks took
    (units a task owns; units it reuses cost nothing); a task fits while every layer has that many FREE
    units, so the tightest layer decides. math.inf when the recent tasks took no unit at all.
    """
    recent = owned_per_task[-FORECAST_WINDOW:]
    names = task_names[-FORECAST_WINDOW:] if task_names else [f"task {len(owned_per_task) - len(recent) + i}"
                                                              for i in range(len(recent))]
    who = names[0] if len(recent) == 1 else f"the last {len(recent)} tasks ({', '.join(names)})"
    full = [n for n in layer_units if free[n] == 0]
    if full:
        return 0.0, f"{', '.join(full)} has no free unit left"
    fits = []
    for n in layer_units:
        need = sum(o[n] for o in recent) / len(recent)
        if need > 0:
            fits.append((int(free[n] // need), n, need))
    if not fits:
        return math.inf, f"{who} took no new unit in any layer"
    count, layer, need = min(fits)
    per_layer = ", ".join(f"{n} {sum(o[n] for o in recent) / len(recent):.0f}" for n in layer_units)
    return float(count), (f"if each new task takes as many new units as {who} did on average ({per_layer}); "
                          f"{layer} limits ({free[layer]} free / {need:.0f} per task)")


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
    lines.append(f"more tasks like the recent ones that fit: {est_text} ({report.estimate_basis})")
    return "\n".join(lines)


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    widths = [max(len(r[i]) for r in [header] + rows) for i in range(len(header))]
    fmt = lambda r: "  ".join(c.rjust(w) if i >= 2 else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths)))
    return [fmt(header), "  ".join("-" * w for w in widths)] + [fmt(r) for r in rows]
