#!/usr/bin/env python
"""Which pruning rule keeps a task best for the units it spends?

Learns permuted-MNIST task 1 into a fresh network with a preset's dense phase (the trainer's `learn_dense`, so
the dense network is the task-1 dense network of a sequence run with that preset and seed), and caches it with the
trainer's generator state. Each variant then prunes and fine-tunes a copy with its own settings (the trainer's
`prune_and_finetune`, learn_task's steps 3 and 4, `finetune_keep` rule included), and reports units kept,
validation and test accuracy.
The test set is only reported, never used to choose.

    python benchmarks/prune_probe.py --cache runs/probes/dense-s1 --seed 1 --variant base:max_drop=0.4 \\
        --variant global:max_drop=0.4,prune_rank=global

A variant is `NAME:key=value,...` with CLNPConfig fields (max_drop, prune_rank, prune_fraction, min_units, ...).
`--set KEY=VALUE ...` applies to the dense phase and every variant (precision=bf16, say; the cache records it).
Prints one JSON line per variant on stdout, and each pruning step on stderr.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

from benchmarks.sequence import parse_settings  # noqa: E402
from benchmarks.tasks import load_task  # noqa: E402
from trainer.clnp import (CLNPConfig, DenseTask, learn_dense, new_owners, preset, prune_and_finetune,  # noqa: E402
                          task_masks)
from trainer.network import MaskedNetwork, parse_network_spec  # noqa: E402
from trainer.pruning import restore  # noqa: E402
from trainer.training import TaskTrainer, accuracy  # noqa: E402


def parse_variant(text: str) -> tuple[str, dict]:
    name, _, rest = text.partition(":")
    return name, parse_settings(list(filter(None, rest.split(","))), where=f"--variant {name}:")


def dense_state(cache: Path, preset_name: str, network: str, data_dir, seed: int,
                settings: dict) -> tuple[object, MaskedNetwork, DenseTask, dict]:
    """The task-1 dense network (`learn_dense`, as learn_task runs it) and the trainer's generator state after
    it, from the cache when present."""
    spec = parse_network_spec(network)
    task = load_task("permuted-mnist:1", spec, data_dir, None, seed, "cpu")
    cfg = preset(preset_name, seed=seed, **settings)
    torch.manual_seed(cfg.seed)  # as benchmarks/sequence.py does for a new network
    net = MaskedNetwork(spec)
    owners = new_owners(net)
    net.add_head(task.num_classes, task.scale, task.shift, generator=torch.Generator().manual_seed(cfg.seed + 1))
    f = cache / "dense.safetensors"
    if f.exists():
        meta = json.loads((cache / "dense.json").read_text())
        if meta.get("settings", {}) != settings:
            raise SystemExit(f"error: {cache} holds a dense network learned with --set {meta.get('settings', {})}, not "
                             f"{settings}; use another --cache or the same --set")
        saved = load_file(f)
        restore(net, {k[4:]: v for k, v in saved.items() if k.startswith("net.")})
        tr = TaskTrainer(net, owners, 0, cfg.seed, cfg.batch_size)
        tr.generator.set_state(saved["generator"])
        every = [torch.ones(len(o)) for o in owners]
        return task, net, DenseTask(0, owners, tr, every, meta["dense_validation"], saved["teacher"]), meta
    t0 = time.perf_counter()
    dense = learn_dense(net, owners, 0, task, cfg)
    meta = {"seed": seed, "preset": preset_name, "settings": settings, "dense_validation": dense.validation,
            "dense_test": accuracy(net, task.x_test, task.y_test, 0, dense.masks),
            "seconds": round(time.perf_counter() - t0, 1)}
    cache.mkdir(parents=True, exist_ok=True)
    tensors = {f"net.{k}": v.contiguous() for k, v in net.state_tensors().items()}
    tensors.update(teacher=dense.teacher.contiguous(), generator=dense.trainer.generator.get_state())
    save_file(tensors, f)
    (cache / "dense.json").write_text(json.dumps(meta))
    return task, net, dense, meta


def prune_and_tune(cfg: CLNPConfig, task, net: MaskedNetwork, dense: DenseTask) -> dict:
    """learn_task's steps 3 and 4 (`prune_and_finetune`) on `dense` (`net` changed in place); returns what they
    kept and scored, with test accuracy after pruning and at the end (reported only)."""
    t0 = time.perf_counter()
    pruned_test = {}
    out = prune_and_finetune(net, dense, task, cfg, on_phase=lambda name, network, masks: pruned_test.setdefault(
        name, accuracy(network, task.x_test, task.y_test, 0, masks)))
    masks = task_masks(out.owners, 0)
    return {"units": [int((o == 0).sum()) for o in out.owners], "prune_steps": out.prune_steps,
            "pruned_validation": out.pruned_validation, "pruned_test": pruned_test["prune"],
            "validation": out.validation, "test": accuracy(net, task.x_test, task.y_test, 0, masks),
            "finetune_discarded": out.finetune_discarded, "seconds": round(time.perf_counter() - t0, 1)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cache", type=Path, required=True, help="folder for the dense state (reused when present)")
    p.add_argument("--variant", action="append", default=[], help="NAME:key=value,... (repeatable)")
    p.add_argument("--preset", default="default")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                   help="CLNPConfig settings for the dense phase and every variant (a variant may override them "
                        "for pruning and fine-tuning), as benchmarks/sequence.py's --set")
    p.add_argument("--network", default="mlp:784-2000-2000")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--data-dir", default=os.environ.get("CLNP_DATA_DIR"))
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    variants = [parse_variant(v) for v in args.variant]
    logging.basicConfig(level=logging.INFO, format="%(message)s")  # each pruning step, on stderr
    settings = parse_settings(args.set)
    task, net, dense, meta = dense_state(args.cache, args.preset, args.network, args.data_dir, args.seed,
                                              settings)
    print(json.dumps({"dense": meta}), flush=True)
    base, gen = copy.deepcopy(net.state_tensors()), dense.trainer.generator.get_state()
    for name, v in variants:
        restore(net, base)
        dense.trainer.generator.set_state(gen)
        out = prune_and_tune(preset(args.preset, seed=args.seed, **{**settings, **v}), task, net, dense)
        print(json.dumps({"variant": name, "settings": v, **{k: (round(x, 3) if isinstance(x, float) else x)
                                                             for k, x in out.items()}}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
