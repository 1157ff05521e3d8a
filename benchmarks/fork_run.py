#!/usr/bin/env python
"""Fork a CLNP sequence run after its last task, with other settings for the tasks that follow: a probe.

Late tasks of a long run (a network mostly owned, a few hundred FREE units) behave unlike early ones, and
reaching them again costs hours. This copies a run folder's saved state into a new folder and rewrites the
settings its record holds, so that `benchmarks/sequence.py run --out NEW --tasks N --set ...` (the same
settings) learns the next tasks with them, on the very network the original run built:

    python benchmarks/fork_run.py /work/runs/lifetime NEW --set max_drop=0.8 finetune_epochs=60
    python benchmarks/sequence.py run --out NEW --tasks 32 --set max_drop=0.8 finetune_epochs=60 ...

The forked record says where it came from in its notes; its tasks before the fork were learned with the
original settings, so its average over all tasks is not a result of the new ones. Keep forks out of the
folders a report groups by settings (e.g. put them under benchmarks/results/sequence/probes/).

`--at N` forks after task N of a longer run instead of after its last: the tasks after N are taken out again
(their units FREE, their heads, probes and records dropped). Nothing of theirs reaches the next task: learning
a task re-draws every FREE unit's incoming weights first, and connections from FREE units into owned ones are
zero. So the fork holds the network as it stood after task N, and running it on with unchanged settings
learns task N + 1 exactly as the original run did (the test checks it).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.sequence import load_state, parse_settings, save_state  # noqa: E402
from serving.contract import FREE  # noqa: E402
from trainer.clnp import CLNPConfig, ConfigError, recorded_settings  # noqa: E402
from trainer.network import MaskedNetwork  # noqa: E402
from trainer.training import DROPOUT_DRAWS  # noqa: E402


def fork(src: Path, dst: Path, overrides: dict, at: int | None = None) -> dict:
    """Copy `src`'s state into `dst` with `overrides` applied to its settings; returns the settings that changed.
    `at`: keep only the first `at` tasks (the network as it stood after task `at`); None keeps them all."""
    if not (src / "state.safetensors").is_file():
        raise SystemExit(f"error: {src} holds no CLNP run state (state.safetensors); give a `sequence.py run` folder")
    if dst.exists():
        raise SystemExit(f"error: {dst} exists; fork into a new folder")
    record, net, owners, probes = load_state(src, _network_of(src))
    if at is not None:
        net, owners, probes = _truncate(record, net, owners, probes, at, src)
    old = dict(record.config)
    try:
        config = CLNPConfig(**{**old, **overrides})  # validated as any setting is
    except ConfigError as e:
        raise SystemExit(f"error: {e}")
    record.config = recorded_settings(config)
    changed = {k: v for k, v in record.config.items() if old.get(k) != v}
    if record.dropout_draws != DROPOUT_DRAWS:  # later tasks draw dropout as the code does now
        changed["dropout_draws"], record.dropout_draws = DROPOUT_DRAWS, DROPOUT_DRAWS
    record.notes.append(f"forked from {src.name} after task {len(record.tasks)}: later tasks use {changed}; "
                        f"tasks 1-{len(record.tasks)} were learned with the original settings")
    dst.mkdir(parents=True)
    try:
        save_state(dst, record, net, owners, probes)
    except BaseException:
        shutil.rmtree(dst, ignore_errors=True)
        raise
    return changed


def _truncate(record, net, owners, probes, at: int, src: Path):
    """The run as it stood after its first `at` tasks: later tasks' units FREE again, their heads, probes and
    records dropped (`record` is changed in place)."""
    done = len(record.tasks)
    if not 0 < at <= done:
        raise SystemExit(f"error: --at {at}: {src} holds tasks 1-{done}; fork after one of them")
    if at == done:
        return net, owners, probes
    owners = [torch.where(o >= at, torch.full_like(o, FREE), o) for o in owners]
    tensors = {k: v for k, v in net.state_tensors().items()
               if not k.startswith(("heads.", "preprocess.")) or int(k.split(".")[1]) < at}
    net = MaskedNetwork.from_state(net.spec, tensors, at)
    probes = {t: p for t, p in probes.items() if t < at}
    record.tasks = record.tasks[:at]
    record.accuracy_rows = record.accuracy_rows[:at]
    record.zero_forgetting = [z for z in record.zero_forgetting if z["after_task"] < at]
    record.tasks_planned = at
    record.capacity_exhausted_at = None
    record.notes.append(f"taken back to task {at} of {done} (benchmarks/fork_run.py --at {at})")
    return net, owners, probes


def _network_of(folder: Path) -> str:
    return json.loads((folder / "run.json").read_text())["network"]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("source", type=Path, help="a CLNP run folder of benchmarks/sequence.py (with state.safetensors)")
    p.add_argument("dest", type=Path, help="the new folder")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="settings for the tasks after the fork")
    p.add_argument("--at", type=int, default=None, metavar="N",
                   help="fork after task N (1-based), dropping the tasks after it (default: after the last)")
    args = p.parse_args(argv)
    changed = fork(args.source, args.dest, parse_settings(args.set), args.at)
    print(f"forked {args.source} into {args.dest}; changed: {changed or 'nothing'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
