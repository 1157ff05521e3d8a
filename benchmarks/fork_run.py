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
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from dataclasses import asdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.sequence import load_state, parse_settings, save_state  # noqa: E402
from trainer.clnp import CLNPConfig, ConfigError  # noqa: E402


def fork(src: Path, dst: Path, overrides: dict) -> dict:
    """Copy `src`'s state into `dst` with `overrides` applied to its settings; returns the settings that changed."""
    if not (src / "state.safetensors").is_file():
        raise SystemExit(f"error: {src} holds no CLNP run state (state.safetensors); give a `sequence.py run` folder")
    if dst.exists():
        raise SystemExit(f"error: {dst} exists; fork into a new folder")
    record, net, owners, probes = load_state(src, _network_of(src))
    old = dict(record.config)
    try:
        config = CLNPConfig(**{**old, **overrides})  # validated as any setting is
    except ConfigError as e:
        raise SystemExit(f"error: {e}")
    record.config = asdict(config)
    changed = {k: v for k, v in record.config.items() if old.get(k) != v}
    record.notes.append(f"forked from {src.name} after task {len(record.tasks)}: later tasks use {changed}; "
                        f"tasks 1-{len(record.tasks)} were learned with the original settings")
    dst.mkdir(parents=True)
    try:
        save_state(dst, record, net, owners, probes)
    except BaseException:
        shutil.rmtree(dst, ignore_errors=True)
        raise
    return changed


def _network_of(folder: Path) -> str:
    return json.loads((folder / "run.json").read_text())["network"]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("source", type=Path, help="a CLNP run folder of benchmarks/sequence.py (with state.safetensors)")
    p.add_argument("dest", type=Path, help="the new folder")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="settings for the tasks after the fork")
    args = p.parse_args(argv)
    changed = fork(args.source, args.dest, parse_settings(args.set))
    print(f"forked {args.source} into {args.dest}; changed: {changed or 'nothing'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
