#!/usr/bin/env python
"""Does learning beside frozen earlier units cost a new task dense accuracy?

Loads a `benchmarks/sequence.py` CLNP run folder (its `state.safetensors`), adds the next permuted-MNIST task, and
runs only the dense phase of the run's preset, in one of two ways:
- `default`: as `learn_task` does: the FREE units see every earlier unit's output, and the head reads all units;
- `isolated`: connections from earlier tasks' units into the new units and the head are zero and stay zero, so the
  task learns in the FREE units alone, as a network of that width would;
- `zero-init`: as `default`, with those connections starting at zero instead of drawn at random (trainable: the
  task starts as if isolated and grows reuse where its gradients lead; `--set reuse_init=zero`, the trainer's
  `cut_earlier_connections`);
- `distilled`: as `default`, with the distillation term of the preset (`distill`, `distill_temperature`) added to
  the dense phase, its teacher a network of the full shape trained on the task alone (`train_alone`, the
  `--teacher full` teacher; `--teacher-cache FILE` keeps its logits in a safetensors file for another probe).

    python benchmarks/dense_probe.py --run runs/clnp-default-10-s0 --variant default
    python benchmarks/dense_probe.py --run runs/clnp-default-10-s0 --variant isolated
    python benchmarks/dense_probe.py --run runs/clnp-default-10-s0 --variant distilled --teacher-cache /tmp/t11.safetensors

Prints one JSON line: validation and test accuracy after the dense phase, FREE units per layer, seconds.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

from benchmarks.sequence import RunRecord, load_state  # noqa: E402
from benchmarks.tasks import load_task  # noqa: E402
from trainer.clnp import FREE, cut_earlier_connections, full_teacher, preset  # noqa: E402
from trainer.network import parse_network_spec  # noqa: E402
from trainer.training import TaskTrainer, accuracy, column_mask  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--run", type=Path, required=True, help="a CLNP run folder of benchmarks/sequence.py")
    p.add_argument("--variant", choices=["default", "isolated", "zero-init", "distilled"], required=True)
    p.add_argument("--data-dir", default=os.environ.get("CLNP_DATA_DIR"))
    p.add_argument("--teacher-cache", type=Path, help="distilled: the teacher's logits, read if there, else written")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    record = RunRecord.from_dict(json.loads((args.run / "run.json").read_text()))
    cfg = preset(record.preset, **record.config)
    spec = parse_network_spec(record.network)
    _, net, owners, _ = load_state(args.run, record.network)
    t = len(record.tasks)
    task = load_task(f"permuted-mnist:{t + 1}", spec, args.data_dir, record.limit, cfg.seed, "cpu")
    index = net.add_head(task.num_classes, task.scale, task.shift, generator=torch.Generator().manual_seed(cfg.seed + 1))
    torch.manual_seed(cfg.seed)
    tr = TaskTrainer(net, owners, index, cfg.seed, cfg.batch_size)
    for i, o in enumerate(owners):
        net.reinit_units(i, (o == FREE).cpu(), generator=tr.generator)
    params, grad_masks = tr.free_unit_parameters()  # [w1, b1, w2, b2, ..., head w, head b]
    if args.variant == "isolated":
        with torch.no_grad():
            for i in range(1, len(owners)):
                keep = column_mask(net.weights[i], len(owners[i - 1]), owners[i - 1] == FREE)
                net.weights[i].mul_(keep)
                grad_masks[2 * i] = grad_masks[2 * i] * keep
            keep = column_mask(net.head_weights[index], len(owners[-1]), owners[-1] == FREE)
            net.head_weights[index].mul_(keep)
            grad_masks[-2] = keep
    elif args.variant == "zero-init":
        cut_earlier_connections(net, owners, index)  # as learn_dense does with reuse_init "zero"
    all_on = [torch.ones(len(o)) for o in owners]
    t0 = time.perf_counter()
    teacher, teacher_val = None, None
    if args.variant == "distilled":
        cfg = dataclasses.replace(cfg, teacher="full", distill_dense=True)  # learn_task's --distill-dense
        if args.teacher_cache and args.teacher_cache.exists():
            cached = load_file(str(args.teacher_cache))
            teacher, teacher_val = cached["logits"], float(cached["validation"])
        else:
            teacher, teacher_val = full_teacher(net, index, task, cfg)
            if args.teacher_cache:
                save_file({"logits": teacher, "validation": torch.tensor(teacher_val)}, str(args.teacher_cache))
    t1 = time.perf_counter()
    tr.run_epochs(task.x_train, task.y_train, cfg.dense_plan(), params, grad_masks, all_on, teacher=teacher,
                  desc="train")
    print(json.dumps({
        "run": str(args.run), "variant": args.variant, "task": t + 1,
        "free_units": {n: int((o == FREE).sum()) for n, o in zip(spec.layer_names, owners)},
        "dense_validation": round(accuracy(net, task.x_val, task.y_val, index, all_on), 3),
        "dense_test": round(accuracy(net, task.x_test, task.y_test, index, all_on), 3),
        "teacher_validation": None if teacher_val is None else round(teacher_val, 3),
        "seconds": round(time.perf_counter() - t1, 1), "teacher_seconds": round(t1 - t0, 1),
    }))
    return 0


if __name__ == "__main__":
    sys.exit(main())
