"""The capacity forecast: how many more tasks fit, from the new units each task so far took."""

import math
import subprocess
import sys
from pathlib import Path

import pytest

from serving.capacity import TREND_MAX_DECLINE, TREND_MIN_TASKS, forecast_additional_tasks, unit_trend

ROOT = Path(__file__).resolve().parent.parent


def history(units: list[int], layer: str = "layer1") -> list[dict[str, int]]:
    return [{layer: u} for u in units]


def test_steady_tasks_fit_free_over_their_size():
    units = [50] * 8
    n, basis = forecast_additional_tasks({"layer1": 1000}, {"layer1": 1000 - 400}, history(units))
    assert n == 12.0  # 600 free / 50 a task
    assert "no decline" in basis and "layer1 runs out first (600 free)" in basis


def test_a_power_law_decline_is_recovered_and_projected():
    a, b = 201.0, 0.4
    units = [round(a * k ** -b - 1) for k in range(1, 13)]
    fa, fb = unit_trend(units)
    assert fb == pytest.approx(b, abs=0.01) and fa == pytest.approx(a, rel=0.02)
    free = 2000 - sum(units)
    n, basis = forecast_additional_tasks({"layer1": 2000}, {"layer1": free}, history(units))
    # independent projection with the true law: count tasks 13, 14, ... while they fit
    left, expected, k = float(free), 0, 13
    while a * k ** -b - 1 <= left:
        left -= a * k ** -b - 1
        expected, k = expected + 1, k + 1
    assert abs(n - expected) <= 1
    # a fixed rate at the recent tasks' size would say far fewer: the decline is what the forecast adds
    assert n > free // (sum(units[-3:]) / 3)
    assert "decline of tasks 2–12 (task 1 had no earlier unit to reuse)" in basis and "b=0.40" in basis


def test_the_first_task_is_not_a_point_of_the_decline():
    """Task 1 reuses nothing, so it may take any number of units: the trend is that of tasks 2..n."""
    a, b = 150.0, 0.3
    later = [round(a * k ** -b - 1) for k in range(2, 11)]
    for first in (40, 120, 900):
        fa, fb = unit_trend([first] + later)
        assert fb == pytest.approx(b, abs=0.01) and fa == pytest.approx(a, rel=0.02)
    # with TREND_MIN_TASKS tasks there is no later task to spare: task 1 stays in the fit
    few = [900] + later[: TREND_MIN_TASKS - 1]
    assert unit_trend(few) != unit_trend([40] + later[: TREND_MIN_TASKS - 1])


def test_few_tasks_use_the_plain_mean():
    units = [300, 100, 50, 20][: TREND_MIN_TASKS - 1]
    assert unit_trend(units) == (sum(units) / len(units) + 1.0, 0.0)
    n, basis = forecast_additional_tasks({"l": 1000}, {"l": 1000 - sum(units)}, history(units, "l"))
    assert n == (1000 - sum(units)) // (sum(units) / len(units))
    assert "the mean new units of the" in basis


def test_a_steep_decline_is_capped():
    units = [1000, 200, 60, 20, 8, 3]
    assert unit_trend(units)[1] == TREND_MAX_DECLINE


def test_the_tightest_layer_decides_and_is_named():
    owned = [{"conv1": 6, "fc": 40} for _ in range(6)]
    n, basis = forecast_additional_tasks({"conv1": 64, "fc": 500}, {"conv1": 28, "fc": 260}, owned)
    assert n == 4.0  # conv1: 28 // 6, fc alone would allow 6
    assert "conv1 runs out first (28 free)" in basis


def test_full_none_and_zero_unit_tasks():
    assert forecast_additional_tasks({"l": 10}, {"l": 0}, history([10], "l"))[0] == 0.0
    n, basis = forecast_additional_tasks({"l": 10}, {"l": 10}, history([0, 0], "l"))
    assert math.isinf(n) and "no new unit" in basis
    # a task that reused only (0 units of its own) stays in the fit instead of breaking the logarithm
    n, _ = forecast_additional_tasks({"l": 500}, {"l": 300}, history([80, 60, 0, 40, 20], "l"))
    assert 0 < n < math.inf
    # a layer no task has taken units of never limits
    n, basis = forecast_additional_tasks({"a": 100, "b": 100}, {"a": 70, "b": 100}, [{"a": 10, "b": 0}] * 3)
    assert n == 7.0 and "a runs out first" in basis


def test_backtest_replays_a_run_without_seeing_its_future(tmp_path):
    """The benchmark's forecast at task n reads only tasks 1..n: changing later tasks leaves it unchanged."""
    import json

    def write(folder, units):
        tasks = []
        free = 1000
        for u in units:
            free -= u
            tasks.append({"units_kept": {"layer1": u}, "free_after": {"layer1": free}})
        folder.mkdir()
        (folder / "run.json").write_text(json.dumps({"method": "clnp", "tasks": tasks}))

    write(tmp_path / "a", [100, 90, 80, 70, 60, 50, 40])
    write(tmp_path / "b", [100, 90, 80, 70, 60, 10, 10])
    out = subprocess.run([sys.executable, "benchmarks/forecast_backtest.py", str(tmp_path / "a"),
                          str(tmp_path / "b"), "--from", "5"], cwd=ROOT, capture_output=True, text=True, check=True)
    rows = [line for line in out.stdout.splitlines() if line.startswith("| 5 |")]
    assert len(rows) == 2
    a_cells, b_cells = (r.split("|") for r in rows)
    assert a_cells[4].strip() == "90" and b_cells[4].strip() == "20"  # what the rest of each run took
    assert a_cells[5].split()[0] == b_cells[5].split()[0]  # the same forecast from the same first 5 tasks
    assert a_cells[7] == b_cells[7]
