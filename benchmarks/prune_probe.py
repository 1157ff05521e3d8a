#!/usr/bin/env python
"""Which pruning rule keeps a task best for the units it spends?

Learns permuted-MNIST task 1 into a fresh network with a preset's dense phase, exactly as `learn_task` does (same
seeds, so the dense network is the task-1 dense network of a sequence run with that preset and seed), and caches it
with the trainer's generator state. Each variant then prunes a copy with its own pruning settings and fine-tunes it
as `learn_task` does (including the `finetune_keep` rule), and reports units kept, validation and test accuracy.
The test set is only reported, never used to choose.

    python benchmarks/prune_probe.py --cache runs/probes/dense-s1 --seed 1 --variant base:max_drop=0.4 \\
        --variant global:max_drop=0.4,prune_rank=global

A variant is `NAME:key=value,...` with CLNPConfig fields (max_drop, prune_rank, prune_fraction, min_units, ...).
Prints one JSON line per variant.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

from benchmarks.tasks import load_task  # noqa: E402
from serving.contract import FREE  # noqa: E402
from trainer.clnp import CLNPConfig, SCORES, new_owners, preset, task_masks, zero_free_connections  # noqa: E402
from trainer.network import MaskedNetwork, parse_network_spec  # noqa: E402
from trainer.pruning import PruneContext, restore, schedule_for  # noqa: E402
from trainer.training import TaskTrainer, accuracy, train_compact  # noqa: E402


def parse_variant(text: str) -> tuple[str, dict]:
    name, _, rest = text.partition(":")
    out: dict = {}
    types = {f: type(getattr(CLNPConfig(), f)) for f in CLNPConfig.__dataclass_fields__}
    for kv in filter(None, rest.split(",")):
        k, _, v = kv.partition("=")
        if k not in types:
            raise SystemExit(f"error: unknown setting {k!r} in variant {name!r}; use CLNPConfig fields")
        out[k] = (v.lower() in ("1", "true")) if types[k] is bool else types[k](v)
    return name, out


def dense_state(cache: Path, preset_name: str, network: str, data_dir, seed: int):
    """The task-1 dense network as learn_task leaves it before pruning, and the trainer's generator state then."""
    spec = parse_network_spec(network)
    task = load_task("permuted-mnist:1", spec, data_dir, None, seed, "cpu")
    cfg = preset(preset_name, seed=seed)
    torch.manual_seed(cfg.seed)  # as benchmarks/sequence.py does for a new network
    net = MaskedNetwork(spec)
    owners = new_owners(net)
    net.add_head(task.num_classes, task.scale, task.shift, generator=torch.Generator().manual_seed(cfg.seed + 1))
    torch.manual_seed(cfg.seed)  # as learn_task does
    tr = TaskTrainer(net, owners, 0, cfg.seed, cfg.batch_size)
    f = cache / "dense.safetensors"
    if f.exists():
        saved = load_file(f)
        restore(net, {k[4:]: v for k, v in saved.items() if k.startswith("net.")})
        tr.generator.set_state(saved["generator"])
        meta = json.loads((cache / "dense.json").read_text())
        return cfg, task, net, owners, tr, saved["teacher"], meta
    t0 = time.perf_counter()
    for i, o in enumerate(owners):
        net.reinit_units(i, (o == FREE), generator=tr.generator)
    every = [torch.ones(len(o)) for o in owners]
    params, grad_masks = tr.free_unit_parameters()
    tr.run_epochs(task.x_train, task.y_train, cfg.dense_plan(), params, grad_masks, every,
                  penalty_units=[(o == FREE).float() for o in owners], desc="train")
    teacher = tr.logits(task.x_train, every)
    meta = {"seed": seed, "preset": preset_name, "dense_validation": accuracy(net, task.x_val, task.y_val, 0, every),
            "dense_test": accuracy(net, task.x_test, task.y_test, 0, every),
            "seconds": round(time.perf_counter() - t0, 1)}
    cache.mkdir(parents=True, exist_ok=True)
    tensors = {f"net.{k}": v.contiguous() for k, v in net.state_tensors().items()}
    tensors.update(teacher=teacher.contiguous(), generator=tr.generator.get_state())
    save_file(tensors, f)
    (cache / "dense.json").write_text(json.dumps(meta))
    return cfg, task, net, owners, tr, teacher, meta


def prune_and_tune(cfg: CLNPConfig, task, net, owners, tr: TaskTrainer, teacher, dense_val: float) -> dict:
    """learn_task's steps 3 and 4 on task 0 of `net` (changed in place); returns what they kept and scored."""
    t0 = time.perf_counter()
    free = [o == FREE for o in owners]
    earlier = [o != FREE for o in owners]
    ctx = PruneContext(net=net, trainer=tr, task=0, x_train=task.x_train, y_train=task.y_train,
                       accuracy=lambda keep: accuracy(net, task.x_val, task.y_val, 0, ctx.visible(keep)),
                       candidates=free, earlier=earlier, score_samples=cfg.activity_samples,
                       recovery=cfg.recovery_plan(), teacher=teacher, x_val=task.x_val, y_val=task.y_val)
    schedule = schedule_for(cfg.schedule, cfg.prune_fraction, cfg.min_prune_fraction, cfg.max_prune_steps,
                            cfg.min_units, cfg.prune_rank)
    result = schedule(ctx, SCORES[cfg.score], dense_val, cfg.max_drop)
    owners = [o.clone() for o in owners]
    for i in range(len(owners)):
        owners[i][free[i] & result.keep[i]] = 0
    zero_free_connections(net, owners, 0)
    masks = task_masks(owners, 0)
    out = {"units": [int((o == 0).sum()) for o in owners], "prune_steps": result.steps,
           "pruned_validation": accuracy(net, task.x_val, task.y_val, 0, masks),
           "pruned_test": accuracy(net, task.x_test, task.y_test, 0, masks)}
    pruned_val = out["pruned_validation"]
    if cfg.finetune_epochs > 0:
        before = copy.deepcopy(net.state_tensors())
        tr.owners = owners
        train_compact(tr, [m.bool() for m in masks], cfg.finetune_plan(), task.x_train, task.y_train, own_units=True,
                      teacher=teacher, desc="fine-tune")
        tuned = accuracy(net, task.x_val, task.y_val, 0, masks)
        within = cfg.finetune_keep == "bound" and tuned >= dense_val - cfg.max_drop
        if tuned < pruned_val and not within:
            restore(net, before)
    out.update(validation=accuracy(net, task.x_val, task.y_val, 0, masks),
               test=accuracy(net, task.x_test, task.y_test, 0, masks), seconds=round(time.perf_counter() - t0, 1))
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cache", type=Path, required=True, help="folder for the dense state (reused when present)")
    p.add_argument("--variant", action="append", default=[], help="NAME:key=value,... (repeatable)")
    p.add_argument("--preset", default="default")
    p.add_argument("--network", default="mlp:784-2000-2000")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--data-dir", default=os.environ.get("CLNP_DATA_DIR"))
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    variants = [parse_variant(v) for v in args.variant]
    cfg, task, net, owners, tr, teacher, meta = dense_state(args.cache, args.preset, args.network, args.data_dir,
                                                            args.seed)
    print(json.dumps({"dense": meta}), flush=True)
    base, gen = copy.deepcopy(net.state_tensors()), tr.generator.get_state()
    for name, v in variants:
        restore(net, base)
        tr.generator.set_state(gen)
        tr.owners = owners
        out = prune_and_tune(preset(args.preset, seed=args.seed, **v), task, net, owners, tr, teacher,
                             meta["dense_validation"])
        print(json.dumps({"variant": name, "settings": v, **{k: (round(x, 3) if isinstance(x, float) else x)
                                                             for k, x in out.items()}}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
