#!/usr/bin/env python
"""How much of the pruning loss can fine-tuning win back?

Learns permuted-MNIST task 1 into a fresh network with a preset's dense phase and pruning schedule (the
trainer's `learn_dense` and `prune_and_finetune`, as `learn_task` runs them, without the fine-tuning), saves
that pruned state with the dense network's logits, then fine-tunes copies of it with each variant and reports
validation and test accuracy. The test set is only reported, never used to choose.

    python benchmarks/finetune_probe.py --cache /tmp/ftprobe --variant default --variant long-hard
    python benchmarks/finetune_probe.py --cache runs/probes/ft-plan10-s0 --set max_drop=0.4 plan_tasks=10 \
        precision=bf16 --variant base:seed=1 --variant d02:distill=0.2,seed=1

`--set KEY=VALUE ...` applies CLNPConfig settings to the dense phase, pruning and every variant (as
benchmarks/sequence.py's --set; the cache records them and refuses a different set).

A variant is `NAME` from VARIANTS or `NAME:epochs=60,distill=0.9,temperature=4,lr=0.001,dropout=0.2,seed=1`
(seed: the fine-tuning's data order and dropout; also average=0.998 for a moving average of the weights and
schedule=constant for the learning-rate schedule).
Prints one JSON line per variant.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

from benchmarks.sequence import parse_settings  # noqa: E402
from benchmarks.tasks import load_task  # noqa: E402
from trainer.clnp import learn_dense, new_owners, preset, prune_and_finetune, task_masks  # noqa: E402
from trainer.network import MaskedNetwork, parse_network_spec  # noqa: E402
from trainer.pruning import restore  # noqa: E402
from trainer.training import TaskTrainer, accuracy, train_compact  # noqa: E402

VARIANTS = {
    "none": {"epochs": 0},
    "default": {},  # the preset's own fine-tuning
    "long": {"epochs": 60},
    "hard": {"distill": 0.9, "temperature": 4.0},
    "long-hard": {"epochs": 60, "distill": 0.9, "temperature": 4.0},
    "long-hard-lowdrop": {"epochs": 60, "distill": 0.9, "temperature": 4.0, "dropout": 0.1},
}


def parse_variant(text: str) -> tuple[str, dict]:
    name, _, rest = text.partition(":")
    if not rest:
        if name not in VARIANTS:
            raise SystemExit(f"error: unknown variant {name!r}; choose one of {', '.join(VARIANTS)} or NAME:key=value,...")
        return name, dict(VARIANTS[name])
    out = {}
    for kv in rest.split(","):
        k, _, v = kv.partition("=")
        out[k] = v if k == "schedule" else float(v)
    return name, out


def pruned_state(cache: Path, preset_name: str, network: str, data_dir, seed: int, settings: dict):
    spec = parse_network_spec(network)
    task = load_task("permuted-mnist:1", spec, data_dir, None, seed, "cpu")
    cfg = preset(preset_name, seed=seed, **settings)
    torch.manual_seed(cfg.seed)
    net = MaskedNetwork(spec)
    owners = new_owners(net)
    net.add_head(task.num_classes, task.scale, task.shift, generator=torch.Generator().manual_seed(cfg.seed + 1))
    f = cache / "pruned.safetensors"
    if f.exists():
        recorded = json.loads((cache / "pruned.json").read_text()).get("settings")
        if recorded is not None and recorded != settings:
            raise SystemExit(f"error: {cache} holds a task pruned with --set {recorded}, not {settings}; use another "
                             "--cache or the same --set")
        saved = load_file(f)
        restore(net, {k[4:]: v for k, v in saved.items() if k.startswith("net.")})
        owners = [saved[f"owners.{i}"] for i in range(len(owners))]
        meta = json.loads((cache / "pruned.json").read_text())
        return cfg, task, net, owners, saved["teacher"], meta
    t0 = time.perf_counter()
    dense = learn_dense(net, owners, 0, task, cfg)  # learn_task's steps 1 and 2
    dense_val, dense_test = dense.validation, accuracy(net, task.x_test, task.y_test, 0, dense.masks)
    # steps 3 and 4 without the fine-tuning, which the variants do
    result = prune_and_finetune(net, dense, task, replace(cfg, finetune_epochs=0))
    owners, teacher = result.owners, dense.teacher
    meta = {"settings": settings, "dense_validation": dense_val, "dense_test": dense_test, "units": [int((o == 0).sum()) for o in owners],
            "max_drop": cfg.max_drop, "prune_steps": result.prune_steps, "seconds": round(time.perf_counter() - t0, 1)}
    cache.mkdir(parents=True, exist_ok=True)
    tensors = {f"net.{k}": v.contiguous() for k, v in net.state_tensors().items()}
    tensors.update({f"owners.{i}": o.contiguous() for i, o in enumerate(owners)}, teacher=teacher.contiguous())
    save_file(tensors, f)
    (cache / "pruned.json").write_text(json.dumps(meta))
    return cfg, task, net, owners, teacher, meta


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cache", type=Path, required=True, help="folder for the pruned state (reused when present)")
    p.add_argument("--variant", action="append", default=[], help="fine-tuning variant (repeatable)")
    p.add_argument("--preset", default="default")
    p.add_argument("--network", default="mlp:784-2000-2000")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-drop", type=float, help="the pruning bound (default: the preset's; as --set max_drop=)")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                   help="CLNPConfig settings for the dense phase, pruning and fine-tuning")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--data-dir", default=os.environ.get("CLNP_DATA_DIR"))
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    variants = [parse_variant(v) for v in args.variant or ["default"]]
    settings = parse_settings(args.set)
    if args.max_drop is not None:
        settings["max_drop"] = args.max_drop
    cfg, task, net, owners, teacher, meta = pruned_state(args.cache, args.preset, args.network, args.data_dir, args.seed,
                                                           settings)
    masks = task_masks(owners, 0)
    base = copy.deepcopy(net.state_tensors())
    pruned_val = accuracy(net, task.x_val, task.y_val, 0, masks)
    print(json.dumps({"pruned": meta, "pruned_validation": round(pruned_val, 3),
                      "pruned_test": round(accuracy(net, task.x_test, task.y_test, 0, masks), 3)}), flush=True)
    for name, v in variants:
        restore(net, base)
        plan = cfg.finetune_plan()
        plan = replace(plan, epochs=int(v.get("epochs", plan.epochs)), learning_rate=v.get("lr", plan.learning_rate),
                       distill=v.get("distill", plan.distill), temperature=v.get("temperature", plan.temperature),
                       dropout=v.get("dropout", plan.dropout), average=v.get("average", plan.average),
                       lr_schedule=v.get("schedule", plan.lr_schedule))
        t0 = time.perf_counter()
        if plan.epochs > 0:
            tr = TaskTrainer(net, owners, 0, int(v.get("seed", cfg.seed + 17)), cfg.batch_size)
            train_compact(tr, [m.bool() for m in masks], plan, task.x_train, task.y_train, own_units=True,
                          teacher=teacher if plan.distill > 0 else None, desc="fine-tune")
        print(json.dumps({"variant": name, "settings": v, "validation": round(accuracy(net, task.x_val, task.y_val, 0, masks), 3),
                          "test": round(accuracy(net, task.x_test, task.y_test, 0, masks), 3),
                          "seconds": round(time.perf_counter() - t0, 1)}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
