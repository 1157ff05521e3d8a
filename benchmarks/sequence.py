"""Resumable task sequences: CLNP (or the single-task reference) over permuted-MNIST tasks, one task at a time.

Long runs (10 tasks x 3 seeds, or a 30-task lifetime) outlast a working session, so each finished task is
saved before the next starts, and `run` started again on the same folder continues where it stopped.

    python benchmarks/sequence.py run --out runs/clnp-s0 --tasks 10 --seed 0 --data-dir ../shared/data
    python benchmarks/sequence.py run --out runs/single-s0 --method single --tasks 10 --seed 0 ...
    python benchmarks/sequence.py report runs/clnp-s0 runs/clnp-s1 runs/single-s0 --out /tmp/report
    python benchmarks/sequence.py reuse runs/clnp-s0 --data-dir ../shared/data   # both reuse measures, per task

A run folder holds `run.json` (the `RunRecord`, readable) and, for CLNP, `state.safetensors`: the network,
unit ownership and every task's probe logits, with the same `RunRecord` in its metadata. The state file is
written to a temporary name and renamed, so it and the record it carries always agree; `run.json` is a copy.

Task k (1-based) is `permuted-mnist:k`. CLNP learns through the trainer's public `learn_task`, exactly as
`clnp-train add-task` does, without the repository and the ONNX export. After every task:
- the test accuracy of every task so far (a row of the accuracy matrix),
- the zero-forgetting check: every earlier task's logits on 256 test images are `torch.equal` to those
  recorded right after it was learned (kept in the state, so the check spans resumes),
- FREE units per layer, and the capacity forecast `clnp-train capacity` would print.
- CLNP: validation accuracy at the end of each phase (train, prune, fine-tune, reuse), and test accuracy at the
  same points (`phase_test`), reported only: pruning chooses on validation, never on test.
The single-task reference trains a fresh network per task with CLNP's dense-phase schedule (same epochs,
learning rate and its schedule, dropout, batch size), no pruning.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
# the repository root first, even when PYTHONPATH names it too: benchmarks/ (this script's folder, which Python puts
# first) holds serving.py, which would shadow the `serving` package
sys.path[:] = [str(REPO_ROOT)] + [p for p in sys.path if p != str(REPO_ROOT)]

import torch  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

from serving.capacity import forecast_additional_tasks  # noqa: E402
from serving.contract import FREE  # noqa: E402
from trainer.clnp import (PRESETS, SETTINGS_BEFORE_THEY_EXISTED, CapacityExhaustedError, CLNPConfig, accuracy,  # noqa: E402
                          check_capacity, learn_task, new_owners, preset, recorded_settings, reuse_by_signal,
                          reuse_counts, task_masks, train_alone)
from trainer.network import MaskedNetwork, parse_network_spec  # noqa: E402
from trainer.training import DROPOUT_DRAWS  # noqa: E402
from benchmarks.tasks import Task, load_task  # noqa: E402

SCHEMA_VERSION = 1
PROBE_SAMPLES = 256
METHODS = ("clnp", "single")


@dataclass
class TaskResult:
    """One learned task."""

    index: int  # 0-based learning order
    source: str
    test_accuracy: float  # percent, right after learning it
    validation_accuracy: float  # as published: after pruning and fine-tuning (CLNP), or after training (single)
    dense_validation_accuracy: float  # before pruning (equals validation_accuracy for single)
    units_kept: dict[str, int]  # layer -> units the task owns (CLNP); all units (single)
    free_after: dict[str, int]  # layer -> FREE units after the task (CLNP)
    reused: dict[str, int]  # layer -> earlier units feeding the task (CLNP)
    prune_steps: int
    seconds: float  # wall time of learning the task (no evaluation)
    forecast_after: dict = field(default_factory=dict)  # the capacity forecast after this task (CLNP)
    trained_on: str = "cpu"  # "cpu", or the GPU's name (checks and test accuracy always run on the CPU)
    phase_seconds: dict = field(default_factory=dict)  # CLNP: "train", "prune", "fine-tune", "reuse" -> wall s
    phase_validation: dict = field(default_factory=dict)  # CLNP: the same phases -> validation % at their end
    # CLNP: the same phases -> test % at their end. Reported only, to show where the held-out accuracy goes (pruning
    # decisions are made on validation, which they therefore flatter); nothing is chosen on it. Empty in older records.
    phase_test: dict = field(default_factory=dict)
    # CLNP: validation % of a fine-tuned network that ended under the pruned one and was discarded; None when
    # fine-tuning was kept (and in records made before this was recorded)
    finetune_discarded: float | None = None
    # CLNP with teacher "full": validation % of the network trained on the task alone that taught it; None otherwise
    teacher_validation: float | None = None
    # CLNP with max_units: layer -> units the max_drop search kept before the cap cut the layer; empty otherwise
    capped: dict = field(default_factory=dict)
    # CLNP with candidate_pool: layer -> candidates the task chose from (FREE and temporary units), where the pool
    # was wider than FREE; empty otherwise
    pool: dict = field(default_factory=dict)


@dataclass
class RunRecord:
    """Everything a run has done so far; the same record for the report, the plots and a resume."""

    schema_version: int
    method: str  # "clnp" or "single"
    preset: str
    config: dict  # trainer.clnp.recorded_settings(CLNPConfig)
    network: str
    tasks_planned: int
    seed: int
    limit: int | None  # training samples per task (None: all 54,000)
    machine: dict
    tasks: list[TaskResult] = field(default_factory=list)
    accuracy_rows: list[list[float]] = field(default_factory=list)  # row j: test accuracy of tasks 0..j after task j
    zero_forgetting: list[dict] = field(default_factory=list)  # {"task", "after_task", "identical"}
    capacity_exhausted_at: int | None = None
    sessions: int = 0  # how many times `run` started on this folder
    notes: list[str] = field(default_factory=list)  # what happened to the run beside its tasks (machine changes)
    # how dropout was drawn (trainer.training.DROPOUT_DRAWS): a run repeats bit for bit only with the same draws.
    # Records made before 2026-12-07 say "bernoulli"; one without the key was made since.
    dropout_draws: str = DROPOUT_DRAWS

    def settings(self) -> dict:
        return {k: getattr(self, k) for k in ("method", "preset", "config", "network", "seed", "limit",
                                              "dropout_draws")}

    @classmethod
    def from_dict(cls, d: dict) -> "RunRecord":
        if d.get("schema_version") != SCHEMA_VERSION:
            raise SystemExit(f"error: run record schema {d.get('schema_version')} is not {SCHEMA_VERSION}")
        d = dict(d)
        d["tasks"] = [TaskResult(**t) for t in d.get("tasks", [])]
        # A setting added after the run was recorded takes the value the code had before it existed.
        d["config"] = ({f.name: f.default for f in fields(CLNPConfig)} | SETTINGS_BEFORE_THEY_EXISTED
                       | d.get("config", {}))
        return cls(**{f.name: d[f.name] for f in fields(cls) if f.name in d})


def machine(device: str = "cpu") -> dict:
    m = {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
         "cpu_count": os.cpu_count(), "torch": torch.__version__, "torch_threads": torch.get_num_threads()}
    if device != "cpu":
        m["device"] = torch.cuda.get_device_name()
    return m


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ---- data -------------------------------------------------------------------------------------------


# ---- state ------------------------------------------------------------------------------------------


def save_state(out: Path, record: RunRecord, net: MaskedNetwork | None, owners, probes: dict[int, tuple]) -> None:
    """Write the state (CLNP) and the record atomically: the state file carries the record it belongs to."""
    text = json.dumps(asdict(record), indent=1)
    if net is not None:
        tensors = {k: v.detach().cpu().contiguous() for k, v in net.state_tensors().items()}
        for i, o in enumerate(owners):
            tensors[f"owners.{i}"] = o.cpu().contiguous()
        for t, (x, logits) in probes.items():
            tensors[f"probe.{t}.x"] = x.contiguous()
            tensors[f"probe.{t}.logits"] = logits.contiguous()
        tmp = out / "state.safetensors.tmp"
        save_file(tensors, str(tmp), metadata={"record": text})
        os.replace(tmp, out / "state.safetensors")
    tmp = out / "run.json.tmp"
    tmp.write_text(text)
    os.replace(tmp, out / "run.json")


def load_state(out: Path, spec_text: str):
    """(record, net, owners, probes) from a CLNP run folder's state file."""
    from safetensors import safe_open

    path = out / "state.safetensors"
    with safe_open(str(path), "pt") as f:
        record = RunRecord.from_dict(json.loads(f.metadata()["record"]))
    tensors = load_file(str(path))
    spec = parse_network_spec(spec_text)
    n = len(record.tasks)
    net = MaskedNetwork.from_state(spec, tensors, n)
    owners = [tensors[f"owners.{i}"] for i in range(len(spec.layers))]
    probes = {t: (tensors[f"probe.{t}.x"], tensors[f"probe.{t}.logits"]) for t in range(n)}
    return record, net, owners, probes


# ---- running ----------------------------------------------------------------------------------------


def parse_settings(pairs: list[str], where: str = "--set") -> dict:
    """`--set KEY=VALUE ...` as CLNPConfig overrides, each value parsed as its field's type (`where` names the
    option in an error)."""
    kinds = {f.name: f.type for f in fields(CLNPConfig)}
    out = {}
    for kv in pairs:
        key, _, value = kv.partition("=")
        if key not in kinds:
            raise SystemExit(f"error: {where} {kv}: unknown option {key!r}")
        out[key] = {"int": int, "float": float, "bool": lambda v: v.lower() in ("1", "true", "yes"), "str": str}[kinds[key]](value)
    return out


def run(args) -> RunRecord:
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("error: --device cuda: this torch build sees no CUDA device; use --device cpu")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(args.threads)
    config = preset(args.preset, seed=args.seed, **parse_settings(args.set or []))
    fresh = RunRecord(SCHEMA_VERSION, args.method, args.preset, recorded_settings(config), args.network, args.tasks,
                      args.seed, args.limit, machine(args.device))
    net, owners, probes = None, None, {}
    if (out / "run.json").exists():
        if args.method == "clnp":
            record, net, owners, probes = load_state(out, args.network)
        else:
            record = RunRecord.from_dict(json.loads((out / "run.json").read_text()))
        if record.settings() != fresh.settings():
            raise SystemExit(f"error: {out} holds a run with other settings ({record.settings()}); "
                             "use another --out or the same settings")
        record.tasks_planned = max(record.tasks_planned, args.tasks)
        log(f"resuming {out}: {len(record.tasks)} of {record.tasks_planned} tasks done")
    else:
        record = fresh
        if args.method == "clnp":
            torch.manual_seed(config.seed)  # as trainer.pipeline.add_task does for a new network
            net = MaskedNetwork(parse_network_spec(args.network))
            owners = new_owners(net)
    spec = parse_network_spec(args.network)
    here = machine(args.device)
    if probes and any(record.machine.get(k) != here.get(k) for k in FLOAT_IDENTITY):
        probes, moved = rebase_probes(net, owners, probes)
        note = (f"session {record.sessions + 1}: resumed on another machine or thread count "
                f"({describe(record.machine)} -> "
                f"{describe(here)}); the zero-forgetting probes were recomputed from the saved state here, "
                f"{moved} of {len(probes)} differed in float round-off (another machine's kernels or thread count), "
                "not in weights")
        record.notes.append(note)
        log(note)
    record.sessions += 1
    record.machine = here
    tests: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def test_set(t: int):
        if t not in tests:
            d = load_task(f"permuted-mnist:{t + 1}", spec, args.data_dir, args.limit, config.seed, "cpu")
            tests[t] = (d.x_test, d.y_test)
        return tests[t]

    for t in range(len(record.tasks), record.tasks_planned):
        if record.capacity_exhausted_at is not None:
            break
        task = load_task(f"permuted-mnist:{t + 1}", spec, args.data_dir, args.limit, config.seed, "cpu")
        tests[t] = (task.x_test, task.y_test)
        if args.method == "clnp":
            try:
                check_capacity(net, owners)
            except CapacityExhaustedError as e:
                record.capacity_exhausted_at = t
                log(f"capacity exhausted before task {t + 1}: {e}")
                save_state(out, record, net, owners, probes)
                break
            result = learn_clnp(net, owners, t, task, config, args.device)
            owners = result.pop("owners")
            test_acc = accuracy(net, task.x_test, task.y_test, t, task_masks(owners, t))
            with torch.no_grad():
                for i, (xp, ref) in sorted(probes.items()):
                    same = bool(torch.equal(net(xp, i, task_masks(owners, i)), ref))
                    record.zero_forgetting.append({"task": i, "after_task": t, "identical": same})
                xp = task.x_test[:PROBE_SAMPLES].clone()
                probes[t] = (xp, net(xp, t, task_masks(owners, t)))
            row = [accuracy(net, *test_set(i), i, task_masks(owners, i)) for i in range(t)] + [test_acc]
            names = net.spec.layer_names
            free_after = {n: int((o == FREE).sum()) for n, o in zip(names, owners)}
            owned = [{n: int((o == k).sum()) for n, o in zip(names, owners)} for k in range(t + 1)]
            n_more, basis = forecast_additional_tasks({n: l.units for n, l in zip(names, net.spec.layers)},
                                                      free_after, owned)
            result.update(test_accuracy=test_acc, free_after=free_after,
                          forecast_after={"additional_tasks": None if n_more == float("inf") else n_more,
                                          "basis": basis})
        else:
            result = learn_single(t, task, config, args.network, args.device)
            row = [None] * t + [result["test_accuracy"]]
            result.update(free_after={}, reused={})
        trained_on = "cpu" if args.device == "cpu" else torch.cuda.get_device_name()
        record.tasks.append(TaskResult(index=t, source=task.source, trained_on=trained_on, **result))
        record.accuracy_rows.append(row)
        save_state(out, record, net if args.method == "clnp" else None, owners, probes)
        done = record.tasks[-1]
        avg = sum(r.test_accuracy for r in record.tasks) / len(record.tasks)
        log(f"task {t + 1}/{record.tasks_planned}: test {done.test_accuracy:.2f}% (dense val "
            f"{done.dense_validation_accuracy:.2f}, val {done.validation_accuracy:.2f}), kept {done.units_kept}, "
            f"free {done.free_after}, {done.seconds:.0f}s; average so far {avg:.3f}"
            + ("" if done.finetune_discarded is None else
               f"; fine-tuning discarded (it ended at val {done.finetune_discarded:.2f})")
            + ("" if done.teacher_validation is None else f"; teacher val {done.teacher_validation:.2f}")
            + ("" if not done.capped else f"; {'its plan share' if config.plan_tasks else 'max_units'} cut it from {done.capped}")
            + ("" if not done.pool else f"; chosen from a candidate pool of {done.pool}"))
        del task
    return record


def on_device(task: Task, device: str) -> Task:
    """The task's training and validation tensors on `device` (the test set stays on the CPU)."""
    if device == "cpu":
        return task
    return replace(task, x_train=task.x_train.to(device), y_train=task.y_train.to(device),
                   x_val=task.x_val.to(device), y_val=task.y_val.to(device))


# What decides a CPU forward pass's round-off: the zero-forgetting probes compare bits, so they are only
# compared on the machine, torch build and thread count that computed them (a matrix product splits its sums
# by thread: a run resumed at 2 threads read 9 probes made at 1 thread as changed, though its saved weights
# answer them bit for bit at 1 thread).
FLOAT_IDENTITY = ("platform", "processor", "torch", "torch_threads")


def describe(m: dict) -> str:
    return f"{m.get('processor')}, {m.get('cpu_count')} cores, torch {m.get('torch')}, {m.get('torch_threads')} threads"


@torch.no_grad()
def rebase_probes(net: MaskedNetwork, owners, probes: dict[int, tuple]) -> tuple[dict[int, tuple], int]:
    """The probes' reference outputs recomputed here from the saved state, and how many changed.

    The state file holds the weights the references were computed from, so recomputing them checks nothing
    away: later tasks are still compared bit for bit against what these weights answer on this machine.
    """
    out, moved = {}, 0
    for t, (x, ref) in sorted(probes.items()):
        now = net(x, t, task_masks(owners, t))
        moved += int(not torch.equal(now, ref))
        out[t] = (x, now)
    return out, moved


def learn_clnp(net: MaskedNetwork, owners, t: int, task: Task, config: CLNPConfig, device: str = "cpu") -> dict:
    """Learn task `t` into `net` (trained on `device`; `net` is back on the CPU afterwards, as the checks run there)."""
    index = net.add_head(task.num_classes, task.scale, task.shift,
                         generator=torch.Generator().manual_seed(config.seed + 1))
    if index != t:
        raise RuntimeError(f"head {index} added for task {t}")
    data = on_device(task, device)
    x_test, y_test = task.x_test.to(device), task.y_test.to(device)  # moved once, read after each phase
    phase_test: dict[str, float] = {}

    def held_out(name, network, masks):  # test accuracy at the end of a phase (on the training device): recorded,
        # never chosen on; `network` is `net`, or the wide copy a candidate pool trains in
        phase_test[name] = round(accuracy(network, x_test, y_test, index, masks), 3)

    t0 = time.perf_counter()
    try:
        new, outcome = learn_task(net.to_device(device), owners, index, data, config, on_phase=held_out)
    finally:
        net.to_device("cpu")
    new = [o.cpu() for o in new]
    return {"owners": new, "validation_accuracy": outcome.validation_accuracy,
            "dense_validation_accuracy": outcome.dense_validation_accuracy, "units_kept": dict(outcome.units_kept),
            "reused": dict(outcome.reused), "prune_steps": outcome.prune_steps,
            "phase_seconds": {k: round(v, 1) for k, v in outcome.phase_seconds.items()},
            "phase_validation": {k: round(v, 3) for k, v in outcome.phase_validation.items()},
            "phase_test": phase_test, "seconds": time.perf_counter() - t0,
            "finetune_discarded": None if outcome.finetune_discarded is None else round(outcome.finetune_discarded, 3),
            "teacher_validation": None if outcome.teacher_validation is None else round(outcome.teacher_validation, 3),
            "capped": dict(outcome.capped), "pool": dict(outcome.pool)}


def learn_single(t: int, task: Task, config: CLNPConfig, network: str, device: str = "cpu") -> dict:
    """A fresh network trained on the task alone with CLNP's dense-phase schedule (trainer.clnp.train_alone)."""
    t0 = time.perf_counter()
    net, _ = train_alone(parse_network_spec(network), task.num_classes, task.scale, task.shift,
                         task.x_train.to(device), task.y_train.to(device), config, config.seed, desc="single-task")
    seconds = time.perf_counter() - t0
    net.to_device("cpu")
    ones = [torch.ones(l.units) for l in net.spec.layers]
    val = accuracy(net, task.x_val, task.y_val, 0, ones)
    return {"test_accuracy": accuracy(net, task.x_test, task.y_test, 0, ones), "validation_accuracy": val,
            "dense_validation_accuracy": val, "units_kept": {n: l.units for n, l in zip(net.spec.layer_names, net.spec.layers)},
            "prune_steps": 0, "seconds": seconds}


def reuse_table(folder: Path, data_dir: str | None) -> str:
    """Both reuse measures for every task of a CLNP run, read from its saved state (markdown).

    A task's rows never change after it is learned, so both figures are what they were right after it; the
    "connections" column equals the run record's `reused` where the run counted that way.
    """
    if not (folder / "state.safetensors").exists():
        raise SystemExit(f"error: {folder} holds no state.safetensors (a CLNP run keeps it beside run.json)")
    record = RunRecord.from_dict(json.loads((folder / "run.json").read_text()))
    _, net, owners, _ = load_state(folder, record.network)
    config = CLNPConfig(**record.config)
    spec, names = net.spec, net.spec.layer_names
    lines = [f"Reuse per task of `{folder.name}` ({len(record.tasks)} tasks; signal tail {config.reuse_signal_tail:.0%})",
             "", "| task | " + " | ".join(f"{n}: own / earlier / connected / signal" for n in names) + " |",
             "|---:|" + "---|" * len(names)]
    for t, done in enumerate(record.tasks):
        x = load_task(done.source, spec, data_dir, record.limit, config.seed, "cpu").x_train[: config.activity_samples]
        connected = reuse_counts(net, owners, t)
        signal = reuse_by_signal(net, owners, t, x, config.reuse_signal_tail)
        cells = [f"{int((o == t).sum())} / {int(((o >= 0) & (o < t)).sum())} / {connected[n]} / {signal[n]}"
                 for n, o in zip(names, owners)]
        lines.append(f"| {t + 1} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run", help="run (or continue) one sequence into a folder")
    r.add_argument("--out", required=True, help="run folder; an existing one with the same settings is continued")
    r.add_argument("--method", choices=METHODS, default="clnp")
    r.add_argument("--preset", default="default", choices=list(PRESETS), help="CLNP preset (trainer.clnp.PRESETS)")
    r.add_argument("--set", nargs="*", metavar="KEY=VALUE", help="CLNPConfig fields overriding the preset")
    r.add_argument("--tasks", type=int, default=10, help="permuted-MNIST tasks (permuted-mnist:1..N)")
    r.add_argument("--seed", type=int, default=0, help="initialisation, data order, dropout, validation hold-out")
    r.add_argument("--network", default="mlp:784-2000-2000")
    r.add_argument("--limit", type=int, default=None, help="training samples per task (default: all)")
    r.add_argument("--data-dir", default=os.environ.get("CLNP_DATA_DIR"), help="folder holding mnist/")
    r.add_argument("--threads", type=int, default=1, help="torch threads (1: one process per core)")
    r.add_argument("--device", choices=["cpu", "cuda"], default="cpu",
                   help="where tasks are trained; every check and the test accuracy run on the CPU")
    rep = sub.add_parser("report", help="summarise run folders into JSON, markdown and plots")
    rep.add_argument("runs", nargs="+", help="run folders")
    rep.add_argument("--out", required=True, help="folder for sequence.json, sequence.md and the plots")
    reu = sub.add_parser("reuse", help="both reuse measures (connections, signal) per task of CLNP run folders")
    reu.add_argument("runs", nargs="+", help="CLNP run folders that hold their state.safetensors")
    reu.add_argument("--data-dir", default=os.environ.get("CLNP_DATA_DIR"), help="folder holding mnist/")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    if args.command == "run":
        return run(args)
    if args.command == "reuse":
        for folder in args.runs:
            print(reuse_table(Path(folder), args.data_dir))
        return None
    from benchmarks.sequence_report import report_main

    return report_main(args.runs, Path(args.out))


if __name__ == "__main__":
    main()
