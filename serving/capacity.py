"""Capacity diagnostics derived from a manifest: free, owned and reused units per layer and per task."""

from __future__ import annotations

import dataclasses
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


def capacity_report(manifest: Manifest) -> CapacityReport:
    """Per-layer and per-task unit accounting of one version.

    The estimate of further tasks assumes each needs as many new units per layer as the last task
    took; the tightest layer decides.
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
    last = manifest.tasks[-1]
    fits = []
    for l in manifest.layers:
        need = l.owned_by(last.index)
        if need > 0:
            fits.append((l.free // need, l.name, need))
    if not fits:
        basis = f"the last task ({last.name}) took no new unit in any layer"
        return CapacityReport(manifest.version, layers, tasks, math.inf, basis)
    n, layer, need = min(fits)
    basis = f"if each new task needs as many units as {last.name} took; {layer} limits ({need} units per task)"
    if any(l.free == 0 for l in manifest.layers):
        full = [l.name for l in manifest.layers if l.free == 0]
        n, basis = 0, f"{', '.join(full)} has no free unit left"
    return CapacityReport(manifest.version, layers, tasks, float(n), basis)


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
    lines.append(f"more tasks like the last that fit: {est_text} ({report.estimate_basis})")
    return "\n".join(lines)


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    widths = [max(len(r[i]) for r in [header] + rows) for i in range(len(header))]
    fmt = lambda r: "  ".join(c.rjust(w) if i >= 2 else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths)))
    return [fmt(header), "  ".join("-" * w for w in widths)] + [fmt(r) for r in rows]
