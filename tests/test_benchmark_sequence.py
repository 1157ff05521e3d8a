"""benchmarks/sequence.py: a run continued from its saved state is the run that never stopped."""

from __future__ import annotations

import importlib.util
import json
import sys

from pathlib import Path

import pytest
from safetensors.torch import load_file

from conftest import REPO_ROOT

sys.path.insert(0, str(REPO_ROOT))
spec = importlib.util.spec_from_file_location("benchmarks.sequence", REPO_ROOT / "benchmarks" / "sequence.py")
seq = importlib.util.module_from_spec(spec)
sys.modules["benchmarks.sequence"] = seq
spec.loader.exec_module(seq)
recorded_settings = seq.recorded_settings

TINY = ["--network", "mlp:784-48-48", "--limit", "800", "--preset", "fast", "--set", "epochs=2", "batch_size=64"]


def _run(out, tasks, data_dir, *extra):
    return seq.main(["run", "--out", str(out), "--tasks", str(tasks), "--data-dir", str(data_dir), *TINY, *extra])


def _comparable(record) -> dict:
    d = json.loads(json.dumps(seq.asdict(record)))
    d.pop("machine"), d.pop("sessions")
    for t in d["tasks"]:
        t.pop("seconds"), t.pop("phase_seconds")
    return d


def test_resumed_run_equals_uninterrupted_run(tmp_path, data_dir):
    whole = _run(tmp_path / "whole", 3, data_dir)
    _run(tmp_path / "parts", 2, data_dir)
    resumed = _run(tmp_path / "parts", 3, data_dir)
    assert resumed.sessions == 2 and len(resumed.tasks) == 3
    assert _comparable(resumed) == _comparable(whole)
    a, b = load_file(str(tmp_path / "whole" / "state.safetensors")), load_file(str(tmp_path / "parts" / "state.safetensors"))
    assert a.keys() == b.keys() and all(a[k].equal(b[k]) for k in a)
    # zero forgetting across the resume: task 1 checked after tasks 2 and 3, tasks 2 after 3, all identical
    assert [(z["task"], z["after_task"]) for z in resumed.zero_forgetting] == [(0, 1), (0, 2), (1, 2)]
    assert all(z["identical"] for z in resumed.zero_forgetting)
    assert all(t.forecast_after["basis"] for t in resumed.tasks)
    assert all(t.phase_validation["reuse"] == round(t.validation_accuracy, 3) for t in resumed.tasks)
    # test accuracy per phase (reported only): the same phases, ending at the network whose test accuracy is recorded
    assert all(list(t.phase_test) == list(t.phase_validation) for t in resumed.tasks)
    assert all(t.phase_test["reuse"] == round(t.test_accuracy, 3) for t in resumed.tasks)


def test_other_settings_are_refused(tmp_path, data_dir):
    _run(tmp_path / "r", 1, data_dir)
    with pytest.raises(SystemExit, match="other settings"):
        _run(tmp_path / "r", 2, data_dir, "max_drop=0.9")


def test_a_record_from_before_a_new_setting_resumes(tmp_path, data_dir):
    """A run recorded before `precision` and `reuse_measure` existed ran as fp32 with reuse by connections, whatever
    the defaults are now; it resumes, and other values are refused."""
    from safetensors.torch import save_file

    out = tmp_path / "r"
    _run(out, 1, data_dir)
    state = out / "state.safetensors"
    record = json.loads((out / "run.json").read_text())
    del record["config"]["precision"], record["config"]["reuse_measure"]
    save_file(load_file(str(state)), str(state), metadata={"record": json.dumps(record)})
    (out / "run.json").write_text(json.dumps(record))
    with pytest.raises(SystemExit, match="other settings"):
        _run(out, 2, data_dir, "precision=bf16")
    with pytest.raises(SystemExit, match="other settings"):
        _run(out, 2, data_dir, "reuse_measure=signal")
    resumed = _run(out, 2, data_dir)
    assert len(resumed.tasks) == 2 and resumed.config["precision"] == "fp32"
    assert resumed.config["reuse_measure"] == "connections" != seq.CLNPConfig().reuse_measure


def test_a_run_made_with_the_old_dropout_draws_is_its_own_group_and_does_not_resume(tmp_path, data_dir):
    """Dropout drawn another way is the same setting with other random numbers: a record that says "bernoulli" is
    named so, grouped apart from the runs made now, and not continued with today's draws; a fork continues it with
    them and says so. A record without the key was made with today's draws."""
    from safetensors.torch import save_file

    from benchmarks.fork_run import fork
    from benchmarks.sequence_report import _label
    from trainer.training import DROPOUT_DRAWS

    out, now_dir = tmp_path / "r", tmp_path / "now"
    now = _run(now_dir, 1, data_dir)
    assert now.dropout_draws == DROPOUT_DRAWS == "uniform"
    record = json.loads((now_dir / "run.json").read_text())
    assert record["dropout_draws"] == "uniform"
    del record["dropout_draws"]
    assert seq.RunRecord.from_dict(record).dropout_draws == "uniform"
    old = record | {"dropout_draws": "bernoulli"}
    out.mkdir()
    save_file(load_file(str(now_dir / "state.safetensors")), str(out / "state.safetensors"),
              metadata={"record": json.dumps(old)})
    (out / "run.json").write_text(json.dumps(old))
    assert _label(seq.RunRecord.from_dict(old), False) == _label(now, False).replace(
        " limit=", " dropout_draws=bernoulli limit=")
    res = seq.main(["report", str(out), str(now_dir), "--out", str(tmp_path / "rep")])
    assert sorted(len(g["seeds"]) for g in res["groups"]) == [1, 1]  # one seed each: two groups, not one of two
    with pytest.raises(SystemExit, match="other settings"):
        _run(out, 2, data_dir)
    assert json.loads((out / "run.json").read_text()) == old  # nothing written
    changed = fork(out, tmp_path / "fork", {})
    assert changed == {"dropout_draws": "uniform"}
    forked = _run(tmp_path / "fork", 2, data_dir)
    assert forked.dropout_draws == "uniform" and len(forked.tasks) == 2
    assert any("dropout_draws" in n for n in forked.notes)


def test_runs_are_named_by_the_nearest_preset():
    """A run keeps a readable name when the presets change: the preset its settings differ least from."""
    from benchmarks.sequence_report import _label
    from trainer.clnp import PRESETS

    def record(preset, config):
        return seq.RunRecord(seq.SCHEMA_VERSION, "clnp", preset, config, "mlp:784-2000-2000", 10, 0, None, {})

    balanced = recorded_settings(PRESETS["balanced"])
    assert _label(record("default", balanced), False) == "clnp balanced 10 tasks"
    assert _label(record("default", balanced | {"max_drop": 0.8}), True) == "clnp balanced max_drop=0.8 10 tasks seed 0"
    assert _label(record("fast", recorded_settings(PRESETS["default"])), False) == "clnp default 10 tasks"


def test_a_plan_s_default_candidate_pool_is_recorded_and_named_as_the_pool_it_is():
    """Under a plan the candidate pool defaults to 2: a run of it records 2.0 and reads as a run that asked for 2;
    a record made before the pool existed (no key) ran without one, and says so where it planned."""
    from benchmarks.sequence_report import _label
    from trainer.clnp import DEFAULT_CANDIDATE_POOL, preset

    def label(config: dict) -> str:
        return _label(seq.RunRecord(seq.SCHEMA_VERSION, "clnp", "default", config, "mlp:784-2000-2000", 10, 0, None,
                                    {}), False)

    planned = recorded_settings(preset("default", plan_tasks=10))
    assert planned["candidate_pool"] == DEFAULT_CANDIDATE_POOL == 2.0
    assert planned == recorded_settings(preset("default", plan_tasks=10, candidate_pool=2))
    assert recorded_settings(preset("default"))["candidate_pool"] == 0.0  # no plan, no pool
    assert label(planned) == "clnp default plan_tasks=10 10 tasks"
    assert label(planned | {"candidate_pool": 3.0}) == "clnp default plan_tasks=10 candidate_pool=3.0 10 tasks"

    def from_before(config: dict) -> dict:  # a record written before candidate_pool existed
        d = {"schema_version": seq.SCHEMA_VERSION, "method": "clnp", "preset": "default", "network": "mlp:784-2000-2000",
             "tasks_planned": 10, "seed": 0, "limit": None, "machine": {},
             "config": {k: v for k, v in config.items() if k != "candidate_pool"}}
        return seq.RunRecord.from_dict(d).config

    assert from_before(planned)["candidate_pool"] == 0.0
    assert label(from_before(planned)) == "clnp default plan_tasks=10 candidate_pool=0.0 10 tasks"
    assert label(from_before(recorded_settings(preset("default")))) == "clnp default 10 tasks"


def test_report_groups_seeds_and_writes_plots(tmp_path, data_dir):
    _run(tmp_path / "c0", 2, data_dir, "--seed", "0")
    _run(tmp_path / "c1", 1, data_dir, "--seed", "1")
    record = json.loads((tmp_path / "c1" / "run.json").read_text())
    record["tasks_planned"] = 2  # as a run of 2 tasks stopped (by the end of a session) after its first
    (tmp_path / "c1" / "run.json").write_text(json.dumps(record))
    seq.main(["run", "--out", str(tmp_path / "single"), "--method", "single", "--tasks", "2",
              "--data-dir", str(data_dir), *TINY])
    res = seq.main(["report", str(tmp_path / "c0"), str(tmp_path / "c1"), str(tmp_path / "single"),
                    "--out", str(tmp_path / "rep")])
    groups = {g["group"]: g for g in res["groups"]}
    clnp = next(g for name, g in groups.items() if name.startswith("clnp"))
    assert clnp["seeds"] == [0, 1] and len(clnp["per_seed"]) == 2
    # seeds compared where both have been: task 1 alone, measured after task 1
    runs = {Path(r["folder"]).name: r for r in res["runs"]}
    assert clnp["tasks_done"] == [2, 1] and clnp["common_tasks"] == 1
    assert clnp["common_per_seed"][1] == runs["c1"]["average_test_accuracy"]
    first = res["records"][str(tmp_path / "c0")]["accuracy_rows"][0][0]
    assert clnp["common_per_seed"][0] == first
    assert any(name.startswith("single") for name in groups)
    # where test accuracy goes: per-phase means over the recorded tasks, and the connection-pruning step over task 2
    phases = {Path(p["folder"]).name: p for p in res["phase_test"]}
    assert set(phases) == {"c0", "c1"}  # CLNP runs only
    tasks = res["records"][str(tmp_path / "c0")]["tasks"]
    assert phases["c0"]["tasks"] == [1, 2]
    recorded = [t["phase_test"] for t in tasks]
    assert phases["c0"]["mean"]["prune"] == pytest.approx((recorded[0]["prune"] + recorded[1]["prune"]) / 2)
    step = phases["c0"]["reuse_step"]
    assert step["tasks"] == 1 and step["mean"] == pytest.approx(recorded[1]["reuse"] - recorded[1]["fine-tune"])
    assert phases["c1"]["reuse_step"] == {"tasks": 0, "mean": None, "sem": None}  # task 1 has no connection pruning
    # against the single-task reference: only the CLNP run of the reference's seed (0) pairs, task by task, with
    # CLNP's accuracies at the end of its run
    (pair,) = res["against_single"]
    assert Path(pair["folder"]).name == "c0" and Path(pair["single_folder"]).name == "single"
    ref = [t["test_accuracy"] for t in res["records"][str(tmp_path / "single")]["tasks"]]
    final = res["records"][str(tmp_path / "c0")]["accuracy_rows"][-1]
    diffs = [a - b for a, b in zip(final, ref)]
    assert pair["tasks"] == 2 and pair["difference"] == pytest.approx(sum(diffs) / 2)
    assert pair["tasks_under"] == sum(d < 0 for d in diffs) and pair["worst"] == pytest.approx(min(diffs))
    val = [a["validation_accuracy"] - b["validation_accuracy"]
           for a, b in zip(tasks, res["records"][str(tmp_path / "single")]["tasks"])]
    assert pair["validation_difference"] == pytest.approx(sum(val) / 2)
    kept = [t["units_kept"] for t in tasks]
    assert pair["units_per_task"] == pytest.approx(sum(sum(k.values()) / len(k) for k in kept) / 2)
    assert [t["units"] for t in pair["per_task"]] == pytest.approx([sum(k.values()) / len(k) for k in kept])
    assert [t["difference"] for t in pair["per_task"]] == pytest.approx(diffs)
    # the difference in two parts: dense minus reference (both tasks are early ones) and kept minus dense
    dense = [t["phase_test"]["train"] for t in tasks]
    assert pair["dense_early"]["tasks"] == 2 and pair["dense_late"] is None
    assert pair["dense_early"]["mean"] == pytest.approx(sum(d - r for d, r in zip(dense, ref)) / 2)
    assert pair["after_dense"]["mean"] == pytest.approx(sum(f - d for f, d in zip(final, dense)) / 2)
    md = (tmp_path / "rep" / "sequence.md").read_text()
    assert "bit-identical" in md and "FREE after last" in md and "Where test accuracy goes" in md
    assert "Against the single-task reference" in md
    assert "Where the difference comes from" in md
    for png in ("sequence_free_units.png", "sequence_accuracy.png"):
        assert (tmp_path / "rep" / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # accuracy against capacity: drawn for runs of 7 or more paired tasks on all the data (none here), or as asked
    from benchmarks.sequence_report import tradeoff_plot

    assert not (tmp_path / "rep" / "sequence_tradeoff.png").exists()
    assert tradeoff_plot(res["against_single"], tmp_path / "rep", min_tasks=2, all_data_only=False) == ["sequence_tradeoff.png"]
    assert (tmp_path / "rep" / "sequence_tradeoff.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_target_check_says_what_keeps_a_setting_from_the_target():
    """Seeds of one setting are averaged (accuracy and per-seed difference to the reference); the check names every
    criterion missed, and proxies, lifetime runs and runs on part of the data are not checked."""
    from benchmarks.sequence_report import TARGET, RunSummary, target_check

    def run(folder, seed, avg, done=10, planned=10, fit=True, identical=45):
        return RunSummary(folder=folder, label="", group="", method="clnp", seed=seed, tasks_done=done,
                          tasks_planned=planned, all_fit=fit, average_test_accuracy=avg,
                          zero_forgetting_checks=45, zero_forgetting_identical=identical, max_units_per_task={},
                          worst_drop_from_dense=0.0, max_drop=0.4, reuse_max_drop=0.0, seconds_per_task=1.0,
                          free_after_last={})

    def pair(folder, group, seed, diff, tasks=10, limit=None, network=TARGET["network"]):
        return {"folder": folder, "group": group, "seed": seed, "tasks": tasks, "difference": diff,
                "validation_difference": diff / 2, "units_per_task": 100.0 + seed, "limit": limit,
                "network": network}

    runs = [run("a0", 0, 98.60), run("a1", 1, 98.56), run("a2", 2, 98.55),  # meets it
            run("b0", 0, 98.56), run("b1", 1, 98.55), run("b2", 2, 98.58, fit=False),  # -0.11 and one did not fit
            run("c0", 0, 98.40, done=6), run("c1", 1, 98.70, identical=44),  # 1 seed whole, one check not identical
            run("c1b", 1, 98.70),  # the same seed again counts once
            run("l0", 0, 98.9, done=30, planned=30), run("p0", 0, 99.0, done=3, planned=3), run("s0", 0, 98.9)]
    pairs = [pair("a0", "A", 0, -0.05), pair("a1", "A", 1, -0.08), pair("a2", "A", 2, -0.10),
             pair("b0", "B", 0, -0.09), pair("b1", "B", 1, -0.12), pair("b2", "B", 2, -0.12),
             pair("c0", "C", 0, -0.02, tasks=6), pair("c1", "C", 1, 0.0), pair("c1b", "C", 1, 0.0),
             pair("l0", "L", 0, 0.0), pair("p0", "P", 0, 0.0, tasks=3), pair("s0", "S", 0, 0.0, limit=5000)]
    rows = {r["group"]: r for r in target_check(pairs, runs)}
    assert set(rows) == {"A", "B", "C"}  # the lifetime run, the 3-task proxy and the --limit run are not checked
    a, b, c = rows["A"], rows["B"], rows["C"]
    assert a["met"] and a["missing"] == [] and a["seeds"] == [0, 1, 2]
    assert a["seed_differences"] == [-0.05, -0.08, -0.10]  # each seed's own, shown beside the mean
    assert a["average"] == pytest.approx((98.60 + 98.56 + 98.55) / 3)
    assert a["difference"] == pytest.approx(-0.23 / 3) and a["validation_difference"] == pytest.approx(-0.23 / 6)
    assert not b["met"] and b["missing"] == ["a task did not fit", "difference -0.110 < -0.1"]
    assert b["difference_std"] == pytest.approx(0.0173, abs=1e-4)
    assert not c["met"] and c["tasks"] == [6, 10, 10]
    assert c["missing"] == ["seeds with all 10 tasks: 1 of 3", "a zero-forgetting check was not bit-identical"]


def test_target_check_pools_a_setting_measured_with_both_dropout_draws():
    """A setting with runs of both dropout draws gets its two rows and one over all its runs; a seed with a run of
    each counts once towards the seeds, and settings measured with one draw only get no pooled row."""
    from benchmarks.sequence_report import TARGET, RunSummary, target_check

    def run(folder, seed, avg):
        return RunSummary(folder=folder, label="", group="", method="clnp", seed=seed, tasks_done=10,
                          tasks_planned=10, all_fit=True, average_test_accuracy=avg,
                          zero_forgetting_checks=45, zero_forgetting_identical=45, max_units_per_task={},
                          worst_drop_from_dense=0.0, max_drop=0.4, reuse_max_drop=0.0, seconds_per_task=1.0,
                          free_after_last={})

    def pair(folder, group, seed, diff, tasks=10):
        return {"folder": folder, "group": group, "seed": seed, "tasks": tasks, "difference": diff,
                "validation_difference": diff, "units_per_task": 200.0, "limit": None, "network": TARGET["network"]}

    old, new = "clnp fast plan_tasks=10 dropout_draws=bernoulli 10 tasks", "clnp fast plan_tasks=10 10 tasks"
    runs = [run("b0", 0, 98.52), run("b1", 1, 98.61), run("b2", 2, 98.60),
            run("u0", 0, 98.56), run("u1", 1, 98.64), run("o0", 0, 98.7)]
    pairs = [pair("b0", old, 0, -0.14), pair("b1", old, 1, -0.07), pair("b2", old, 2, -0.10),
             pair("u0", new, 0, -0.06), pair("u1", new, 1, -0.50, tasks=6),
             pair("o0", "clnp other 10 tasks", 0, 0.0)]
    rows = {r["group"]: r for r in target_check(pairs, runs)}
    both = "clnp fast plan_tasks=10 10 tasks (both dropout draws)"
    assert set(rows) == {old, new, both, "clnp other 10 tasks"}
    assert not rows[old]["met"] and rows[old]["missing"] == ["difference -0.103 < -0.1"]
    # the run under way is listed but its 6 tasks do not enter the means while a seed has all 10
    assert rows[new]["missing"] == ["seeds with all 10 tasks: 1 of 3"] and rows[new]["counted"] == ["u0"]
    assert rows[new]["difference"] == pytest.approx(-0.06) and rows[new]["average"] == pytest.approx(98.56)
    p = rows[both]
    assert p["seeds"] == [0, 0, 1, 1, 2] and p["tasks"] == [10, 10, 10, 6, 10]
    assert p["counted"] == ["b0", "u0", "b1", "b2"]
    assert p["difference"] == pytest.approx(-0.37 / 4)  # with the run under way it would be -0.174
    assert p["average"] == pytest.approx((98.52 + 98.61 + 98.60 + 98.56) / 4)
    assert p["met"] and p["missing"] == []  # seeds 0, 1 and 2 each whole in one of the draws


def test_units_fit_recovers_a_known_slope_and_leaves_out_what_it_should(tmp_path):
    """The fit of a task's difference on its place and log2 of its units recovers the coefficients it was built
    from; runs with connection pruning, on part of the data or on another network do not enter it; the plot is drawn."""
    import numpy as np

    from benchmarks.sequence_report import TARGET, units_fit, units_plot

    rng = np.random.default_rng(0)

    def pair(seed, network=TARGET["network"], limit=None, prune_connections=False, slope=0.08):
        tasks = []
        for i in range(10):
            units = float(rng.uniform(60, 400))
            d = -0.9 - 0.01 * i + slope * np.log2(units) + rng.normal(0, 0.01)
            tasks.append({"index": i, "units": units, "difference": d, "validation_difference": d + 0.02})
        return {"seed": seed, "network": network, "limit": limit, "prune_connections": prune_connections,
                "per_task": tasks}

    pairs = [pair(s) for s in range(3)] + [pair(9, prune_connections=True, slope=1.0), pair(9, limit=5000, slope=1.0),
                                           pair(9, network="mlp:784-100-100", slope=1.0)]
    # a fork of seed 0's run after its task 9: its tasks 1-9 are the original's, counted once; its task 10 is new
    last = dict(pairs[0]["per_task"][9], units=300.0)
    last["difference"] = -0.9 - 0.09 + 0.08 * np.log2(300.0)
    last["validation_difference"] = last["difference"] + 0.02
    pairs.append(dict(pairs[0], per_task=pairs[0]["per_task"][:9] + [last]))
    fit = units_fit(pairs)
    assert fit["runs"] == 4 and fit["tasks"] == 31  # the three others are left out (their slope would show)
    test, val = fit["difference"], fit["validation_difference"]
    assert test["per_doubling"] == pytest.approx(0.08, abs=0.01) and test["per_doubling_se"] < 0.01
    assert test["per_task_later"] == pytest.approx(-0.01, abs=0.004)
    assert val["intercept"] == pytest.approx(test["intercept"] + 0.02, abs=1e-9)
    assert test["at_units"]["200"] == pytest.approx(test["intercept"] + 4.5 * test["per_task_later"]
                                                   + test["per_doubling"] * np.log2(200))
    assert units_fit(pairs[3:6]) is None  # nothing left to fit
    assert units_plot(pairs, fit, tmp_path) == ["sequence_units.png"]
    assert (tmp_path / "sequence_units.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _stale_probe(out, **machine) -> None:
    """Task 1's probe in a run's saved state as another machine or thread count answered it (off in round-off),
    with the record's machine changed by `machine`."""
    record, net, owners, probes = seq.load_state(out, "mlp:784-48-48")
    record.machine = dict(record.machine, **machine)
    x, ref = probes[0]
    probes[0] = (x, ref + 1e-6)
    seq.save_state(out, record, net, owners, probes)


def test_resume_on_another_machine_recomputes_the_probes(tmp_path, data_dir):
    """Another CPU rounds the same weights differently: the probes are recomputed there, and the run says so."""
    out = tmp_path / "r"
    _run(out, 1, data_dir)
    _stale_probe(out, torch="0.0-elsewhere")  # what the other machine's kernels answered for the same weights
    resumed = _run(out, 2, data_dir)
    assert len(resumed.notes) == 1 and "1 of 1 differed" in resumed.notes[0] and "0.0-elsewhere" in resumed.notes[0]
    assert [(z["task"], z["after_task"], z["identical"]) for z in resumed.zero_forgetting] == [(0, 1, True)]
    # on the same machine nothing is recomputed: a stale probe would fail the check
    _stale_probe(out)
    again = _run(out, 3, data_dir)
    assert len(again.notes) == 1
    assert [z["identical"] for z in again.zero_forgetting if z["after_task"] == 2] == [False, True]


def test_resume_at_another_thread_count_recomputes_the_probes(tmp_path, data_dir):
    """A matrix product splits its sums by thread, so a run resumed at another thread count recomputes its probes
    from the saved state (and says so) instead of comparing its outputs with references made at the old count."""
    import torch

    before = torch.get_num_threads()
    out = tmp_path / "r"
    try:
        _run(out, 1, data_dir, "--threads", "1")
        _stale_probe(out)  # what one thread answered, where two threads round otherwise
        resumed = _run(out, 2, data_dir, "--threads", "2")
    finally:
        torch.set_num_threads(before)
    assert resumed.machine["torch_threads"] == 2
    assert len(resumed.notes) == 1 and "1 of 1 differed" in resumed.notes[0] and "1 threads -> " in resumed.notes[0]
    assert [(z["task"], z["after_task"], z["identical"]) for z in resumed.zero_forgetting] == [(0, 1, True)]


def test_forecast_check_replays_the_current_rule_on_a_recorded_run():
    """The lifetime run's record: the forecast it recorded after task 10, and the current rule from the same tasks."""
    from benchmarks.sequence_report import forecast_check
    from serving.capacity import forecast_additional_tasks

    path = REPO_ROOT / "benchmarks/results/sequence/runs/clnp-lifetime-30-md08-s0/run.json"
    raw = json.loads(path.read_text())
    fc = forecast_check(seq.RunRecord.from_dict(raw))
    assert fc["forecast_additional_tasks"] == raw["tasks"][9]["forecast_after"]["additional_tasks"]
    first10 = [{n: t["units_kept"][n] for n in ("layer1", "layer2")} for t in raw["tasks"][:10]]
    free10 = raw["tasks"][9]["free_after"]
    assert free10["layer1"] == 2000 - sum(u["layer1"] for u in first10)
    expected, _ = forecast_additional_tasks({"layer1": 2000, "layer2": 2000}, free10, first10)
    assert fc["current_rule_forecast"] == expected
    assert fc["tasks_run_after"] == 20 and fc["free_after_last"] == raw["tasks"][-1]["free_after"]


def test_a_fork_learns_its_next_tasks_with_the_new_settings(tmp_path, data_dir):
    """benchmarks/fork_run.py: the fork keeps the network and records, and resumes only with the new settings."""
    from benchmarks.fork_run import fork

    _run(tmp_path / "orig", 1, data_dir)
    changed = fork(tmp_path / "orig", tmp_path / "fork", {"max_drop": 0.9, "finetune_epochs": 1})
    assert changed == {"max_drop": 0.9, "finetune_epochs": 1}
    with pytest.raises(SystemExit, match="other settings"):
        _run(tmp_path / "fork", 2, data_dir)  # the original settings no longer match
    forked = _run(tmp_path / "fork", 2, data_dir, "max_drop=0.9", "finetune_epochs=1")
    original = json.loads((tmp_path / "orig" / "run.json").read_text())
    assert _comparable(forked)["tasks"][0] == {k: v for k, v in original["tasks"][0].items()
                                               if k not in ("seconds", "phase_seconds")}
    assert forked.config["max_drop"] == 0.9 and len(forked.tasks) == 2
    assert [(z["task"], z["identical"]) for z in forked.zero_forgetting] == [(0, True)]
    assert any("forked from orig after task 1" in n for n in forked.notes)
    with pytest.raises(SystemExit, match="exists"):
        fork(tmp_path / "orig", tmp_path / "fork", {})
    with pytest.raises(SystemExit, match="max_drop"):
        fork(tmp_path / "orig", tmp_path / "bad", {"max_drop": -1.0})
    assert not (tmp_path / "bad").exists()


def test_a_fork_taken_back_to_an_earlier_task_learns_the_next_one_as_the_original_run_did(tmp_path, data_dir):
    """fork_run --at N: the tasks after N are dropped (units FREE, heads, probes, records), and running on with
    the same settings learns task N + 1 bit for bit as the original did: what a later task left in the FREE
    units never reaches the next one."""
    from benchmarks.fork_run import fork

    original = _run(tmp_path / "orig", 3, data_dir)
    assert fork(tmp_path / "orig", tmp_path / "back", {}, at=2) == {}
    back = json.loads((tmp_path / "back" / "run.json").read_text())
    assert len(back["tasks"]) == 2 and len(back["accuracy_rows"]) == 2
    assert [(z["task"], z["after_task"]) for z in back["zero_forgetting"]] == [(0, 1)]
    state = load_file(str(tmp_path / "back" / "state.safetensors"))
    assert "heads.2.weight" not in state and "probe.2.x" not in state and "heads.1.weight" in state
    assert all(int((state[f"owners.{i}"] == 2).sum()) == 0 for i in range(2))
    again = _run(tmp_path / "back", 3, data_dir)
    assert _comparable(again)["tasks"] == _comparable(original)["tasks"]
    assert again.accuracy_rows == original.accuracy_rows and again.zero_forgetting == original.zero_forgetting
    a, b = load_file(str(tmp_path / "orig" / "state.safetensors")), load_file(str(tmp_path / "back" / "state.safetensors"))
    assert a.keys() == b.keys() and all(a[k].equal(b[k]) for k in a)
    assert any("taken back to task 2 of 3" in n for n in again.notes)
    with pytest.raises(SystemExit, match="--at 4: .* holds tasks 1-3"):
        fork(tmp_path / "orig", tmp_path / "past", {}, at=4)
    assert not (tmp_path / "past").exists()


def test_reuse_table_reads_both_measures_from_the_saved_state(tmp_path, data_dir, capsys):
    """The connection count read back from the state equals what the run recorded; the signal count is at most it."""
    record = _run(tmp_path / "r", 2, data_dir)
    capsys.readouterr()
    seq.main(["reuse", str(tmp_path / "r"), "--data-dir", str(data_dir)])
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| 1 ") or line.startswith("| 2 ")]
    assert len(rows) == 2
    for row, task in zip(rows, record.tasks):
        cells = [c.strip() for c in row.strip("|").split("|")][1:]
        for cell, name in zip(cells, ["layer1", "layer2"]):
            own, earlier, connected, signal = (int(v) for v in cell.split("/"))
            assert own == task.units_kept[name] and connected == task.reused[name]
            assert 0 <= signal <= connected <= earlier
    with pytest.raises(SystemExit, match="no state.safetensors"):
        seq.main(["reuse", str(tmp_path), "--data-dir", str(data_dir)])
