"""Summarise `benchmarks/sequence.py` run folders: one JSON, one markdown report, plots.

Runs with the same settings and dropout draws but different seeds form a group (mean ± standard deviation over seeds).
Every run is also a row: tasks done, average test accuracy, zero-forgetting checks, the largest share a
task took, how far pruning went below the task's own dense accuracy, and the wall time per task.
"""

from __future__ import annotations

import json
import re
import statistics
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from benchmarks.sequence import RunRecord
from serving.capacity import forecast_additional_tasks
from trainer.training import DROPOUT_DRAWS

PAPER = {"CLNP": 98.42, "CLNP std": 0.04, "single-task": 98.48}  # permuted MNIST, 10 tasks, 784-2000-2000
# the accuracy target: this network, all training data, this many tasks on at least this many seeds, every task
# fitting and every zero-forgetting check bit-identical, an average of at least `average` and a mean difference to
# the single-task reference (same seed, task by task) of at least `difference`
TARGET = {"network": "mlp:784-2000-2000", "tasks": 10, "seeds": 3, "average": 98.5, "difference": -0.1}
REPORT_SCHEMA_VERSION = 1


@dataclass(frozen=True)
class RunSummary:
    folder: str
    label: str  # method, nearest preset and any setting that differs from it
    group: str  # label without the seed
    method: str
    seed: int
    tasks_done: int
    tasks_planned: int
    all_fit: bool  # no capacity exhausted within the planned tasks
    average_test_accuracy: float  # over the tasks done, each at the end of the run
    zero_forgetting_checks: int
    zero_forgetting_identical: int
    max_units_per_task: dict  # layer -> the most units any task took
    worst_drop_from_dense: float  # max over tasks of (dense validation - validation), points
    max_drop: float
    reuse_max_drop: float  # connection pruning (step 5) may cost this much more, from the fine-tuned accuracy
    seconds_per_task: float
    free_after_last: dict


DENSE_FIELDS = ("epochs", "learning_rate", "lr_schedule", "lr_decay", "batch_size", "dropout")  # what `single` uses


# how a label names dropout drawn another way than the code draws it now (target_check reads it back)
DRAWS_IN_LABEL = "dropout_draws="


def _label(r: RunRecord, with_seed: bool) -> str:
    """Method, the preset that names the run's settings most briefly as the presets are now (the one it ran with on
    a tie), and every setting that differs from that preset."""
    from trainer.clnp import PRESETS, recorded_settings

    def diff(name: str) -> list[str]:
        # the preset as a run of it with this run's plan would record it (a default that follows the plan counts as
        # the preset's), with the preset's own plan
        chosen = PRESETS[name]
        base = recorded_settings(replace(chosen, plan_tasks=r.config.get("plan_tasks", 0))) | {
            "plan_tasks": chosen.plan_tasks}
        return [f"{k}={v}" for k, v in r.config.items() if k != "seed" and base.get(k) != v
                and (r.method == "clnp" or k in DENSE_FIELDS)]

    name = min(PRESETS, key=lambda n: (len(diff(n)), n != r.preset))
    # dropout drawn another way than the code draws it now: the same settings, other random numbers
    draws = [f"{DRAWS_IN_LABEL}{r.dropout_draws}"] if r.dropout_draws != DROPOUT_DRAWS else []
    parts = [r.method, name, *diff(name), *draws] + ([f"limit={r.limit}"] if r.limit else []) + \
        [f"{r.tasks_planned} tasks"]
    if with_seed:
        parts.append(f"seed {r.seed}")
    return " ".join(parts)


def _finals(r: RunRecord) -> list[float]:
    """Each task's test accuracy at the end of the run (CLNP: the last accuracy row; single: as learned)."""
    last = r.accuracy_rows[-1] if r.method == "clnp" and r.accuracy_rows else []
    return [a if a is not None else t.test_accuracy for a, t in zip(last, r.tasks)] if last \
        else [t.test_accuracy for t in r.tasks]


def summarise(folder: Path, r: RunRecord) -> RunSummary:
    finals = _finals(r)
    layers = list(r.tasks[0].units_kept) if r.tasks else []
    return RunSummary(
        folder=str(folder), label=_label(r, True), group=_label(r, False), method=r.method, seed=r.seed,
        tasks_done=len(r.tasks), tasks_planned=r.tasks_planned, all_fit=r.capacity_exhausted_at is None,
        average_test_accuracy=sum(finals) / len(finals) if finals else float("nan"),
        zero_forgetting_checks=len(r.zero_forgetting),
        zero_forgetting_identical=sum(1 for z in r.zero_forgetting if z["identical"]),
        max_units_per_task={n: max(t.units_kept[n] for t in r.tasks) for n in layers},
        worst_drop_from_dense=max((t.dense_validation_accuracy - t.validation_accuracy for t in r.tasks), default=0.0),
        max_drop=r.config["max_drop"],
        reuse_max_drop=r.config.get("reuse_max_drop", 0.0) if r.config.get("prune_connections", True) else 0.0,
        seconds_per_task=sum(t.seconds for t in r.tasks) / max(1, len(r.tasks)),
        free_after_last=dict(r.tasks[-1].free_after) if r.tasks else {},
    )


def average_after(r: RunRecord, k: int) -> float:
    """Average test accuracy of tasks 1..k, measured after task k (what a run that stopped there would report)."""
    if r.method == "clnp" and len(r.accuracy_rows) >= k:
        row = r.accuracy_rows[k - 1][:k]
        values = [a if a is not None else t.test_accuracy for a, t in zip(row, r.tasks)]
    else:
        values = [t.test_accuracy for t in r.tasks[:k]]
    return sum(values) / len(values)


def forecast_check(r: RunRecord, after: int = 10) -> dict | None:
    """The capacity forecast after task `after` against what the run then did."""
    if r.method != "clnp" or len(r.tasks) <= after:
        return None
    f = r.tasks[after - 1].forecast_after
    later = r.tasks[after:]
    layers = list(r.tasks[0].free_after)
    used = {n: r.tasks[after - 1].free_after[n] - r.tasks[-1].free_after[n] for n in layers}
    per_task = {n: used[n] / len(later) for n in layers}
    # tasks that fit at the observed rate: FREE after task `after` / observed units per task, tightest layer
    observed = min(r.tasks[after - 1].free_after[n] / per_task[n] for n in layers if per_task[n] > 0) \
        if any(per_task[n] > 0 for n in layers) else float("inf")
    exhausted = r.capacity_exhausted_at
    # the forecast as the product makes it now (its rule may have changed since the run), from the same tasks and
    # from all of them
    totals = {n: r.tasks[0].free_after[n] + r.tasks[0].units_kept[n] for n in layers}
    owned = [{n: t.units_kept[n] for n in layers} for t in r.tasks]
    now, now_basis = forecast_additional_tasks(totals, dict(r.tasks[after - 1].free_after), owned[:after])
    at_end, _ = forecast_additional_tasks(totals, dict(r.tasks[-1].free_after), owned)
    return {
        "after_task": after, "forecast_additional_tasks": f.get("additional_tasks"), "basis": f.get("basis"),
        "tasks_run_after": len(later), "capacity_exhausted_at_task": exhausted,
        "actually_fit": (exhausted - after) if exhausted is not None else None,
        "observed_new_units_per_task": per_task,
        "additional_tasks_at_observed_rate": observed,
        "free_after_last": r.tasks[-1].free_after,
        "current_rule_forecast": now, "current_rule_basis": now_basis, "current_rule_forecast_at_end": at_end,
    }


def _sem(values: list[float]) -> float | None:
    """Standard error of the mean (None for fewer than two values)."""
    return statistics.stdev(values) / len(values) ** 0.5 if len(values) > 1 else None


PHASES = ("train", "prune", "fine-tune", "reuse")  # learn_task's phases, in order


def phase_test_means(r: RunRecord) -> dict | None:
    """Mean test accuracy at the end of each phase, over the run's tasks that recorded it (`phase_test`): where the
    held-out accuracy goes. Tasks without an earlier task (task 1) skip connection pruning, so the reuse step is
    also given over the later tasks alone, paired with their fine-tuned figure."""
    tasks = [t for t in r.tasks if r.method == "clnp" and set(PHASES) <= set(t.phase_test)]
    if not tasks:
        return None
    later = [t for t in tasks if t.index > 0]
    steps = [t.phase_test["reuse"] - t.phase_test["fine-tune"] for t in later]
    return {"tasks": [t.index + 1 for t in tasks],
            "mean": {p: statistics.fmean(t.phase_test[p] for t in tasks) for p in PHASES},
            "reuse_step": {"tasks": len(later), "mean": statistics.fmean(steps) if steps else None,
                           "sem": _sem(steps)}}


# Tasks counted as early in the split of the difference to the reference (the first five of a sequence).
EARLY_TASKS = 5


def against_single(records: list[tuple[Path, RunRecord]]) -> list[dict]:
    """Each CLNP run paired task by task with the single-task reference of the same seed, network, data budget
    and dense schedule (`DENSE_FIELDS`): CLNP minus reference, over the tasks both have learned (the bar is
    `TARGET["difference"]`); the standard error is over tasks, within one seed.
    `validation_difference` is the same on the held-out validation images, as each task was learned (CLNP's never
    change afterwards): the figure a setting may be chosen on, since the test set chooses nothing."""
    singles = [(f, r) for f, r in records if r.method == "single"]
    pairs = []
    for f, r in records:
        if r.method != "clnp":
            continue
        for sf, s in singles:
            if (s.seed, s.network, s.limit) != (r.seed, r.network, r.limit) or \
                    any(s.config.get(k) != r.config.get(k) for k in DENSE_FIELDS):
                continue
            matched = [(a, b, t, u) for a, b, t, u in zip(_finals(r), _finals(s), r.tasks, s.tasks)
                       if t.source == u.source]
            if not matched:
                continue
            both = [(a, b) for a, b, _, _ in matched]
            d = [a - b for a, b in both]
            dv = [t.validation_accuracy - u.validation_accuracy for _, _, t, u in matched]
            kept = [sum(t.units_kept.values()) / len(t.units_kept) for _, _, t, _ in matched]
            # the difference in two parts, on test (recorded only): the dense phase against the reference, split at
            # task 6 (later tasks learn beside more earlier units, in fewer FREE ones), and the kept network against
            # its own dense phase (what pruning and fine-tuning cost)
            dense = [(t.index, t.phase_test["train"] - b, a - t.phase_test["train"])
                     for a, b, t, _ in matched if "train" in t.phase_test]
            split = {"dense_early": [x for i, x, _ in dense if i < EARLY_TASKS],
                     "dense_late": [x for i, x, _ in dense if i >= EARLY_TASKS], "after_dense": [y for _, _, y in dense]}
            pairs.append({"folder": str(f), "single_folder": str(sf), "seed": r.seed, "tasks": len(both),
                          "prune_connections": bool(r.config.get("prune_connections")),
                          "group": _label(r, with_seed=False), "limit": r.limit, "network": r.network,
                          "units_per_task": statistics.fmean(kept),
                          "clnp_mean": statistics.fmean(a for a, _ in both),
                          "single_mean": statistics.fmean(b for _, b in both), "difference": statistics.fmean(d),
                          "sem": _sem(d), "validation_difference": statistics.fmean(dv),
                          "tasks_under": sum(1 for x in d if x < 0), "worst": min(d), "best": max(d),
                          "per_task": [{"index": t.index, "units": k, "difference": x, "validation_difference": v}
                                       for (_, _, t, _), k, x, v in zip(matched, kept, d, dv)],
                          **{k: ({"mean": statistics.fmean(v), "sem": _sem(v), "tasks": len(v)} if v else None)
                             for k, v in split.items()}})
            break
    return pairs


def _fit_runs(pairs: list[dict]) -> list[dict]:
    return [p for p in pairs if p["network"] == TARGET["network"] and not p["limit"] and not p.get("prune_connections")]


def _fit_tasks(runs: list[dict]) -> list[dict]:
    """The paired tasks of `runs`, a task two runs share counted once: a fork's tasks before the fork, or a task
    taken from another run, were learned bit for bit alike and are one observation (the same seed, place, units
    and differences)."""
    rows, seen = [], set()
    for p in runs:
        for t in p.get("per_task", []):
            key = (p.get("seed"), t["index"], t["units"], t["difference"], t["validation_difference"])
            if key not in seen:
                seen.add(key)
                rows.append(t)
    return rows


FIT_PLACE = 4.5  # where `units_fit` reads its line: a task in the middle of a 10-task run (places 0..9)


def fit_at(f: dict, units):
    """One of `units_fit`'s fits read at `units` (a number or an array) for a task at FIT_PLACE."""
    import numpy as np

    return f["intercept"] + f["per_task_later"] * FIT_PLACE + f["per_doubling"] * np.log2(units)


def units_fit(pairs: list[dict]) -> dict | None:
    """How a task's difference to the single-task reference follows the units it kept: a least-squares fit over every
    paired task of the runs on the target's network with all training data and without connection pruning (step 5,
    which costs test accuracy of its own), of the difference (test, and
    validation) on an intercept, the task's place in the sequence (0 for the first) and log2 of its units (mean over
    the hidden layers). Coefficients with their standard errors; None under 10 tasks. The test fit is reported only;
    the validation fit is the one a setting may be chosen on."""
    runs = _fit_runs(pairs)
    rows = _fit_tasks(runs)
    if len(rows) < 10:
        return None
    import numpy as np

    x = np.array([[1.0, t["index"], np.log2(max(t["units"], 1.0))] for t in rows])
    out = {"tasks": len(rows), "runs": len(runs)}
    for key in ("difference", "validation_difference"):
        y = np.array([t[key] for t in rows])
        coef, *_ = np.linalg.lstsq(x, y, rcond=None)
        resid = y - x @ coef
        se = np.sqrt(np.diag(np.linalg.inv(x.T @ x)) * float(resid @ resid) / (len(y) - 3))
        out[key] = {"intercept": float(coef[0]), "per_task_later": float(coef[1]), "per_doubling": float(coef[2]),
                    "per_task_later_se": float(se[1]), "per_doubling_se": float(se[2])}
        out[key]["at_units"] = {str(u): float(fit_at(out[key], u)) for u in (100, 150, 200)}
    return out


def target_check(pairs: list[dict], runs: list[RunSummary]) -> list[dict]:
    """Each setting's seeds against the accuracy target (`TARGET`): the mean over seeds of the average test accuracy
    and of the per-seed difference to the single-task reference, and what, if anything, keeps the setting from
    meeting it. Only runs planned for the target's tasks, with all training data on the target's network, are
    checked (not proxies or lifetime runs); a seed counts when its run learned all the tasks and is paired with a
    reference over all of them. A setting measured with both ways of drawing dropout is also checked over the runs
    of both (`<settings> (both dropout draws)`), a seed counted once however many runs it has."""
    by_folder = {s.folder: s for s in runs}
    groups: dict[str, list[dict]] = {}
    for p in pairs:
        if p["network"] == TARGET["network"] and not p["limit"] and \
                by_folder[p["folder"]].tasks_planned == TARGET["tasks"]:
            groups.setdefault(p["group"], []).append(p)
    # The same settings measured with both ways of drawing dropout (the same Bernoulli masks from other random
    # numbers, `dropout_draws` in the label of the older runs) are also checked as one measurement of more runs.
    draws_token = re.compile(rf" {re.escape(DRAWS_IN_LABEL)}\S+")
    by_setting: dict[str, list[str]] = {}
    for g in groups:
        by_setting.setdefault(draws_token.sub("", g), []).append(g)
    pooled = {f"{setting} (both dropout draws)": [p for g in names for p in groups[g]]
              for setting, names in by_setting.items() if len(names) > 1}
    rows = []
    for g, members in (groups | pooled).items():
        members = sorted(members, key=lambda p: p["seed"])
        summaries = [by_folder[p["folder"]] for p in members]
        n = TARGET["tasks"]
        done = {p["seed"] for p in members if p["tasks"] >= n}  # distinct seeds paired over all the tasks
        # the means are over the runs paired over all the tasks (a run's early tasks are not its average); while
        # none is, over all of them, to show how the setting goes
        counted = [i for i, p in enumerate(members) if p["tasks"] >= n] or list(range(len(members)))
        average = statistics.fmean(summaries[i].average_test_accuracy for i in counted)
        diffs = [members[i]["difference"] for i in counted]
        difference = statistics.fmean(diffs)
        missing = []
        if len(done) < TARGET["seeds"]:
            missing.append(f"seeds with all {n} tasks: {len(done)} of {TARGET['seeds']}")
        if not all(s.all_fit for s in summaries):
            missing.append("a task did not fit")
        if any(s.zero_forgetting_identical != s.zero_forgetting_checks for s in summaries):
            missing.append("a zero-forgetting check was not bit-identical")
        if average < TARGET["average"]:
            missing.append(f"average {average:.2f} < {TARGET['average']}")
        if difference < TARGET["difference"]:
            missing.append(f"difference {difference:+.3f} < {TARGET['difference']}")
        rows.append({"group": g, "seeds": [p["seed"] for p in members], "tasks": [p["tasks"] for p in members],
                     "seed_differences": [p["difference"] for p in members],
                     "average": average, "difference": difference,
                     "counted": [members[i]["folder"] for i in counted],
                     "difference_std": statistics.stdev(diffs) if len(diffs) > 1 else None,
                     "validation_difference": statistics.fmean(members[i]["validation_difference"] for i in counted),
                     "units_per_task": statistics.fmean(members[i]["units_per_task"] for i in counted),
                     "met": not missing, "missing": missing})
    return rows


def report_main(folders: list[str], out: Path) -> dict:
    records = []
    for f in folders:
        path = Path(f) / "run.json"
        if not path.exists():
            raise SystemExit(f"error: {f} has no run.json (not a run folder of benchmarks/sequence.py)")
        records.append((Path(f), RunRecord.from_dict(json.loads(path.read_text()))))
    rows = [summarise(f, r) for f, r in records]
    groups: dict[str, list[RunSummary]] = {}
    for s in rows:
        groups.setdefault(s.group, []).append(s)
    by_folder = {str(f): r for f, r in records}
    group_rows = []
    for g, members in groups.items():
        avgs = [m.average_test_accuracy for m in members]
        common = min(m.tasks_done for m in members)  # seeds still running: compare them where all have been
        at_common = [average_after(by_folder[m.folder], common) for m in members] if common else []
        group_rows.append({"group": g, "seeds": [m.seed for m in members], "mean": statistics.fmean(avgs),
                           "std": statistics.stdev(avgs) if len(avgs) > 1 else 0.0, "per_seed": avgs,
                           "tasks_done": [m.tasks_done for m in members], "common_tasks": common,
                           "common_mean": statistics.fmean(at_common) if at_common else None,
                           "common_std": statistics.stdev(at_common) if len(at_common) > 1 else 0.0,
                           "common_per_seed": at_common})
    pairs = against_single(records)
    result = {
        "schema_version": REPORT_SCHEMA_VERSION,
        "paper": PAPER,
        "groups": group_rows,
        "runs": [asdict(s) for s in rows],
        "forecasts": [fc | {"folder": str(f)} for f, r in records if (fc := forecast_check(r)) is not None],
        "phase_test": [pt | {"folder": str(f)} for f, r in records if (pt := phase_test_means(r)) is not None],
        "against_single": pairs,
        "target": target_check(pairs, rows),
        "units_fit": units_fit(pairs),
        "records": {str(f): asdict(r) for f, r in records},
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "sequence.json").write_text(json.dumps(result, indent=1))
    plots = make_plots(records, out) + tradeoff_plot(result["against_single"], out) + \
        units_plot(result["against_single"], result["units_fit"], out)
    (out / "sequence.md").write_text(markdown(result, plots))
    print(f"wrote {out / 'sequence.json'}, {out / 'sequence.md'} and {len(plots)} plot(s)")
    return result


def markdown(res: dict, plots: list[str]) -> str:
    L = ["# CLNP task sequences (permuted MNIST)", "",
         f"Paper (784-2000-2000, 10 tasks): CLNP {PAPER['CLNP']} ± {PAPER['CLNP std']}, single-task {PAPER['single-task']}.",
         "", "## Groups (mean ± std over seeds of the average test accuracy after the last task)", "",
         "The last columns compare the seeds where all of them have been: the average over the first K tasks, "
         "measured after task K, K being the fewest tasks any seed has done. `dropout_draws=bernoulli`: a run made "
         "before 2026-12-07, when dropout was drawn with `torch.bernoulli`; the same settings with other random "
         "numbers, so it is grouped apart from runs made since.", "",
         "| settings | seeds | tasks done | average test accuracy (%) | per seed | K | after task K (%) | per seed |",
         "|---|---|---|---:|---|---:|---:|---|"]
    for g in res["groups"]:
        common = "—" if g.get("common_mean") is None else f"{g['common_mean']:.2f} ± {g['common_std']:.2f}"
        L.append(f"| {g['group']} | {', '.join(map(str, g['seeds']))} | {', '.join(map(str, g['tasks_done']))} | "
                 f"{g['mean']:.2f} ± {g['std']:.2f} | {', '.join(f'{a:.2f}' for a in g['per_seed'])} | "
                 f"{g.get('common_tasks', '—')} | {common} | {', '.join(f'{a:.2f}' for a in g.get('common_per_seed', []))} |")
    L += ["", "## Runs", "", "Settings are named against the presets as they are now.", "",
          "| folder | settings | tasks | all fit | avg test (%) | zero forgetting | most units a task took | worst drop below dense "
          "(bound: max-drop + reuse-max-drop) | s/task | FREE after last |", "|---|---|---|---|---:|---|---|---|---:|---|"]
    for s in res["runs"]:
        checks = (f"{s['zero_forgetting_identical']}/{s['zero_forgetting_checks']} bit-identical"
                  if s["method"] == "clnp" else "—")
        L.append(f"| {Path(s['folder']).name} | {s['label']} | {s['tasks_done']}/{s['tasks_planned']} | "
                 f"{'yes' if s['all_fit'] else 'no'} | {s['average_test_accuracy']:.2f} | {checks} | {_units(s['max_units_per_task'])} | {s['worst_drop_from_dense']:.2f} "
                 f"({s['max_drop']} + {s.get('reuse_max_drop', 0.0)}) | {s['seconds_per_task']:.0f} | {_units(s['free_after_last'])} |")
    for folder, rec in res["records"].items():
        devices: dict[str, list[int]] = {}
        for t in rec["tasks"]:
            devices.setdefault(t.get("trained_on", "cpu"), []).append(t["index"] + 1)
        if len(devices) > 1 or rec.get("notes"):
            L += ["", f"### {Path(folder).name}: machines and notes", ""]
            L += [f"- Tasks {_ranges(ix)} trained on {'the CPU' if d == 'cpu' else d} (checks and test accuracy "
                  "always on the CPU)." for d, ix in devices.items()]
            L += [f"- {n}" for n in rec.get("notes", [])]
    if res.get("phase_test"):
        L += ["", "## Where test accuracy goes (test after each phase, recorded only, never chosen on)", "",
              "Mean over the tasks that recorded it. `reuse` is after connection pruning (step 5), the network the "
              "run keeps; the last column pairs it with the fine-tuned network over tasks 2 on (mean ± standard "
              "error).", "",
              "| folder | tasks | dense | pruned | fine-tuned | kept | connection pruning, per task |",
              "|---|---|---:|---:|---:|---:|---:|"]
        for pt in res["phase_test"]:
            m, step = pt["mean"], pt["reuse_step"]
            n = f"{step['tasks']} task{'s' if step['tasks'] != 1 else ''}"
            cut = "—" if step["mean"] is None else (f"{step['mean']:+.3f}" + (
                f" ± {step['sem']:.3f}" if step["sem"] is not None else "") + f" ({n})")
            L.append(f"| {Path(pt['folder']).name} | {_ranges(pt['tasks'])} | {m['train']:.2f} | {m['prune']:.2f} | "
                     f"{m['fine-tune']:.2f} | {m['reuse']:.2f} | {cut} |")
    if res.get("against_single"):
        L += ["", "## Against the single-task reference (same seed, same tasks, same dense schedule)", "",
              "CLNP minus the single-task reference, task by task (mean ± standard error over tasks). The bar is "
              f"{TARGET['difference']} at worst. The validation column is the same difference on the held-out validation images, "
              "the one a setting may be chosen on.", "",
              "| folder | reference | tasks | CLNP | reference | difference | tasks under | range | validation difference "
              "| units per task |",
              "|---|---|---:|---:|---:|---:|---:|---|---:|---:|"]
        for p in res["against_single"]:
            sem = "" if p["sem"] is None else f" ± {p['sem']:.2f}"
            L.append(f"| {Path(p['folder']).name} | {Path(p['single_folder']).name} | {p['tasks']} | "
                     f"{p['clnp_mean']:.2f} | {p['single_mean']:.2f} | {p['difference']:+.2f}{sem} | "
                     f"{p['tasks_under']} | {p['worst']:+.2f} to {p['best']:+.2f} | {p['validation_difference']:+.2f} | "
                     f"{p['units_per_task']:.0f} |")
        parts = [p for p in res["against_single"] if p.get("after_dense")]
        if parts:
            def cell(x):
                return "—" if x is None else f"{x['mean']:+.2f}" + (f" ± {x['sem']:.2f}" if x["sem"] is not None else "") \
                    + f" ({x['tasks']})"
            L += ["", "### Where the difference comes from (test, recorded only)", "",
                  f"The same pairs, in two parts: the task's dense network (before pruning) minus the reference, over "
                  f"tasks 1–{EARLY_TASKS} and {EARLY_TASKS + 1} on, and the kept network minus its own dense "
                  "network (what pruning and fine-tuning cost). Mean ± standard error (tasks).", "",
                  f"| folder | dense − reference, tasks 1–{EARLY_TASKS} | dense − reference, tasks {EARLY_TASKS + 1}+ "
                  "| kept − dense |", "|---|---:|---:|---:|"]
            for p in parts:
                L.append(f"| {Path(p['folder']).name} | {cell(p['dense_early'])} | {cell(p['dense_late'])} | "
                         f"{cell(p['after_dense'])} |")
        if res.get("target"):
            t = TARGET
            L += ["", f"### Settings against the target ({t['network']}, all training data, {t['tasks']} tasks on at "
                  f"least {t['seeds']} seeds, all fit, bit-identical, average ≥ {t['average']}, difference ≥ "
                  f"{t['difference']})", "",
                  "Means over the settings' seeds that learned all the tasks (over all its seeds while none has): the "
                  "difference is each seed's, task by task, averaged over seeds (± standard deviation over seeds); "
                  "a seed still under way shows its own figure so far in the seeds column. A setting met the target "
                  "when nothing is missing. A setting measured with both ways of drawing dropout has a row for each and one for the runs of both together "
                  "(`(both dropout draws)`: the same settings, so more runs of one measurement; a seed with two "
                  "runs is listed twice, each run enters the means, and the seed counts once towards the seeds the "
                  "target asks for).", "",
                  "| settings | seeds (tasks paired: difference) | average test (%) | difference | validation difference "
                  "| units per task | target |", "|---|---|---:|---:|---:|---:|---|"]
            for g in res["target"]:
                std = "" if g["difference_std"] is None else f" ± {g['difference_std']:.2f}"
                seeds = ", ".join(f"{s} ({n}: {d:+.2f})" for s, n, d in zip(g["seeds"], g["tasks"], g["seed_differences"]))
                L.append(f"| {g['group']} | {seeds} | {g['average']:.2f} | {g['difference']:+.2f}{std} | "
                         f"{g['validation_difference']:+.2f} | {g['units_per_task']:.0f} | "
                         f"{'**met**' if g['met'] else 'not met: ' + '; '.join(g['missing'])} |")
        if "sequence_tradeoff.png" in plots:
            L += ["", "Units per task is the mean over the paired tasks and the hidden layers. Runs of 7 or more "
                  "paired tasks with all training data, as a picture:", "", "![](sequence_tradeoff.png)"]
        fit = res.get("units_fit")
        if fit:
            L += ["", "### Accuracy follows the units a task keeps", "",
                  f"Every paired task of the {fit['runs']} runs on {TARGET['network']} with all training data and "
                  "without connection pruning "
                  f"({fit['tasks']} tasks; a task two runs share, such as a fork's tasks before the fork, once): a "
                  "least-squares fit of its difference to the reference on its place in the "
                  "sequence and log2 of the units it kept (mean over the hidden layers); coefficients ± standard "
                  "error. The last columns are the fit's difference for a task of the middle of a 10-task run "
                  "keeping that many units. Test is recorded only; validation is what a setting may be chosen on.", "",
                  "| on | per doubling of the units kept | per task later in the sequence | 100 units | 150 units "
                  "| 200 units |", "|---|---:|---:|---:|---:|---:|"]
            for key, name in (("validation_difference", "validation"), ("difference", "test")):
                f = fit[key]
                L.append(f"| {name} | {f['per_doubling']:+.3f} ± {f['per_doubling_se']:.3f} | "
                         f"{f['per_task_later']:+.4f} ± {f['per_task_later_se']:.4f} | "
                         + " | ".join(f"{f['at_units'][u]:+.2f}" for u in ("100", "150", "200")) + " |")
            if "sequence_units.png" in plots:
                L += ["", "![](sequence_units.png)"]
    for fc in res["forecasts"]:
        L += ["", f"## Capacity forecast after task {fc['after_task']} ({fc['folder']})", "",
              f"- `clnp-train capacity` forecast: {fc['forecast_additional_tasks']} more tasks ({fc['basis']}).",
              f"- Then {fc['tasks_run_after']} more tasks ran: they took "
              f"{_units({k: round(v) for k, v in fc['observed_new_units_per_task'].items()})} new units per task; "
              f"FREE after the last: {_units(fc['free_after_last'])}.",
              f"- At that observed rate, {fc['additional_tasks_at_observed_rate']:.0f} tasks fit after task "
              f"{fc['after_task']}" + (f"; capacity ran out at task {fc['capacity_exhausted_at_task'] + 1}."
                                       if fc["capacity_exhausted_at_task"] is not None else ".")]
        if fc.get("current_rule_forecast") is not None:
            L += [f"- The forecast as `clnp-train capacity` makes it now, from the same {fc['after_task']} tasks: "
                  f"{fc['current_rule_forecast']:.0f} more ({fc['current_rule_basis']}). From all "
                  f"{fc['after_task'] + fc['tasks_run_after']} tasks it says {fc['current_rule_forecast_at_end']:.0f} "
                  f"more, so about {fc['tasks_run_after'] + fc['current_rule_forecast_at_end']:.0f} after task "
                  f"{fc['after_task']} in all (until a run fills the network, that total is itself a forecast)."]
    L += [""] + [f"![{p}]({p})" for p in plots]
    return "\n".join(L) + "\n"


def parse_widths(network: str) -> list[int]:
    """Hidden layer widths of a network spec string."""
    from trainer.network import parse_network_spec

    return [l.units for l in parse_network_spec(network).layers]


def _ranges(ix: list[int]) -> str:
    """1, 2, 3, 5 -> "1-3, 5"."""
    parts, start = [], None
    for k, i in enumerate(ix):
        if start is None:
            start = i
        if k + 1 == len(ix) or ix[k + 1] != i + 1:
            parts.append(f"{start}" if start == i else f"{start}-{i}")
            start = None
    return ", ".join(parts)


def _units(d: dict) -> str:
    return " / ".join(str(v) for v in d.values()) if d else "—"


def make_plots(records, out: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    clnp = [(f, r) for f, r in records if r.method == "clnp" and r.tasks]
    if not clnp:
        return []
    from matplotlib.ticker import MaxNLocator

    names = []
    layers = list(clnp[0][1].tasks[0].free_after)
    widths = [int(w) for w in parse_widths(clnp[0][1].network)]
    fig, axes = plt.subplots(1, len(layers), figsize=(11, 4.5), squeeze=False)
    for f, r in clnp:
        xs = list(range(0, len(r.tasks) + 1))
        for ax, layer, width in zip(axes[0], layers, widths):
            ax.plot(xs, [width] + [t.free_after[layer] for t in r.tasks], marker=".", label=f.name)
    for ax, layer, width in zip(axes[0], layers, widths):
        ax.set_title(f"FREE units in {layer} after each task (of {width})")
        ax.set_xlabel("tasks learned")
        ax.set_ylim(0, width * 1.02)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    fig.legend(*axes[0][0].get_legend_handles_labels(), loc="lower center", ncol=3, fontsize=7)
    fig.tight_layout(rect=(0, 0.12, 1, 1))
    fig.savefig(out / "sequence_free_units.png", dpi=110)
    plt.close(fig)
    names.append("sequence_free_units.png")

    full = [(f, r) for f, r in records if r.tasks and r.limit is None]
    limited = [(f, r) for f, r in records if r.tasks and r.limit is not None]
    panels = [(full, "all training data")] + ([(limited, "limited training data (--limit)")] if limited else [])
    fig, axes = plt.subplots(1, len(panels), figsize=(11 if len(panels) == 1 else 13, 4.5), squeeze=False)
    for ax, (runs, title) in zip(axes[0], panels):
        for f, r in runs:
            ax.plot(range(1, len(r.tasks) + 1), [t.test_accuracy for t in r.tasks], marker=".", label=f.name)
        if runs is full:
            ax.axhline(PAPER["CLNP"], color="grey", linestyle="--", linewidth=0.8, label="paper CLNP average")
        ax.set_title(title)
        ax.set_xlabel("task")
        ax.set_ylabel("test accuracy (%) after learning it")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "sequence_accuracy.png", dpi=110)
    plt.close(fig)
    names.append("sequence_accuracy.png")
    return names


def tradeoff_plot(pairs: list[dict], out: Path, min_tasks: int = 7, all_data_only: bool = True) -> list[str]:
    """Accuracy against capacity: each CLNP run's mean difference to the single-task reference (± standard error
    over tasks) against the units a task kept, one colour per setting; runs with all training data and at least
    `min_tasks` paired tasks (`all_data_only=False`: runs on part of the data too). The bar
    (`TARGET["difference"]`) is the dashed line."""
    shown = [p for p in pairs if p["tasks"] >= min_tasks and p["sem"] is not None
             and not (all_data_only and p["limit"])]
    if not shown:
        return []
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(10, 7))
    groups = sorted({p["group"] for p in shown})
    for i, g in enumerate(groups):
        mine = [p for p in shown if p["group"] == g]
        ax.errorbar([p["units_per_task"] for p in mine], [p["difference"] for p in mine],
                    yerr=[p["sem"] for p in mine], fmt="o", color=f"C{i % 10}", capsize=3, label=g)
        for p in mine:
            ax.annotate(f"s{p['seed']} ({p['tasks']})", (p["units_per_task"], p["difference"]), fontsize=7,
                        xytext=(4, 3), textcoords="offset points")
    bar = TARGET["difference"]
    ax.axhline(bar, color="grey", linestyle="--", linewidth=0.8, label=f"bar: {-bar} under single-task")
    ax.axhline(0, color="black", linewidth=0.5)
    ax.set_xlabel("units a task kept (mean over tasks and layers)")
    ax.set_ylabel("CLNP minus single-task, test accuracy (points)")
    ax.set_title("Accuracy against capacity, paired with the single-task reference (seed (tasks))")
    # below the axes, clear of the x label, however many settings it lists; the tight box keeps all of it
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.09), ncol=2, fontsize=7)
    fig.savefig(out / "sequence_tradeoff.png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return ["sequence_tradeoff.png"]


def units_plot(pairs: list[dict], fit: dict | None, out: Path) -> list[str]:
    """Each paired task's test difference to the reference against the units it kept (log scale), coloured by its
    place in the sequence, with `units_fit`'s line for a task in the middle of a 10-task run."""
    rows = _fit_tasks(_fit_runs(pairs))
    if fit is None or not rows:
        return []
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, ax = plt.subplots(figsize=(9, 5.5))
    sc = ax.scatter([t["units"] for t in rows], [t["difference"] for t in rows], c=[t["index"] + 1 for t in rows],
                    cmap="viridis", s=14, alpha=0.8)
    fig.colorbar(sc, ax=ax, label="task in the sequence")
    f = fit["difference"]
    u = np.geomspace(min(t["units"] for t in rows), max(t["units"] for t in rows), 50)
    ax.plot(u, fit_at(f, u), color="C3",
            label=f"fit: {f['per_doubling']:+.2f} ± {f['per_doubling_se']:.2f} per doubling "
                  f"({fit['tasks']} tasks of {fit['runs']} runs)")
    ax.axhline(TARGET["difference"], color="grey", linestyle="--", linewidth=0.8,
               label=f"bar: {-TARGET['difference']} under single-task")
    ax.axhline(0, color="black", linewidth=0.5)
    ax.set_xscale("log")
    ax.set_xlabel("units the task kept (mean over the hidden layers, log scale)")
    ax.set_ylabel("CLNP minus single-task, test accuracy (points)")
    ax.set_title(f"A task's accuracy against the units it kept ({TARGET['network']}, all training data)")
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(out / "sequence_units.png", dpi=110)
    plt.close(fig)
    return ["sequence_units.png"]
