#!/usr/bin/env python
"""How much a training step saves by computing earlier tasks' rows outside autograd, by bfloat16, and by cheaper dropout draws.

Builds `mlp:784-2000-2000` with a share of each layer owned by an earlier task (the rest FREE, as when a later
task is learned), and times training steps (forward, cross-entropy, backward; batch 256, dropout masks) of
the task's FREE units three ways, interleaved in the same run: the plain masked forward (`MaskedNetwork.hidden`),
the one `TaskTrainer.run_epochs` uses (`trainer.training.split_hidden` from 30% owned), and that one under
bfloat16 autocast (`precision="bf16"`). Those three reuse one set of dropout masks; two more bfloat16 ways draw
each step's masks inside the timed step, as `run_epochs` does: with `trainer.training.dropout_masks` (uniform
numbers against the keep probability) and with `torch.bernoulli` of a filled tensor (the draws before 2026-12-07);
the two draws are also timed alone.

    python benchmarks/training_speed.py --owned 0.5 --steps 30

Prints one JSON line per owned share: median seconds per step of each and the ratios.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from serving.contract import FREE  # noqa: E402
from trainer.clnp import new_owners  # noqa: E402
from trainer.network import MaskedNetwork, parse_network_spec  # noqa: E402
from trainer.training import TaskTrainer, dropout_masks, frozen_split, split_hidden, step_precision  # noqa: E402


def measure(owned: float, steps: int, network: str, batch: int) -> dict:
    torch.manual_seed(0)
    net = MaskedNetwork(parse_network_spec(network))
    shape = net.spec.input_shape
    for _ in range(2):
        net.add_head(10, torch.ones(shape), torch.zeros(shape))
    owners = new_owners(net)
    for o in owners:
        o[: int(owned * len(o))] = 0  # task 0 owns the first share of each layer
    with torch.no_grad():  # no connection from a FREE unit into an owned one
        for i in range(1, len(owners)):
            rows, cols = (owners[i] == 0).nonzero().reshape(-1, 1), (owners[i - 1] == FREE).nonzero().reshape(1, -1)
            net.weights[i][rows, cols] = 0
    params, grad_masks = TaskTrainer(net, owners, 1, 0, batch).free_unit_parameters()
    split = frozen_split(net, 1, params, grad_masks)
    x = torch.rand(batch, *shape) * 255
    y = torch.randint(0, 10, (batch,))
    keep = 0.8
    masks = [torch.bernoulli(torch.full((batch, len(o)), keep)) / keep for o in owners]
    ones = [torch.ones(len(o)) for o in owners]
    generator = torch.Generator().manual_seed(0)

    def bernoulli_masks():  # run_epochs' draws before 2026-12-07
        return [m * torch.bernoulli(torch.full((batch, len(m)), keep), generator=generator) / keep for m in ones]

    def step(hidden, precision, draw=None) -> float:
        t0 = time.perf_counter()
        for p in params:
            p.grad = None
        step_masks = masks if draw is None else draw()
        with step_precision(x.device, precision):
            acts = hidden(net.preprocess(x, 1), step_masks)
            loss = F.cross_entropy(net.features(acts) @ net.head_weights[1].T + net.head_biases[1], y)
        loss.backward()
        return time.perf_counter() - t0

    used = (lambda h, m: split_hidden(net, h, m, split)) if split else net.hidden  # what run_epochs uses
    ways = {"plain": (net.hidden, "fp32", None), "split": (used, "fp32", None), "bf16": (used, "bf16", None),
            "draws": (used, "bf16", lambda: dropout_masks(ones, net.spec.layers, batch, keep, generator)),
            "bernoulli_draws": (used, "bf16", bernoulli_masks)}
    times = {k: [] for k in ways}
    names = list(ways)
    for n in range(steps):
        for k in names[n % len(names):] + names[:n % len(names)]:  # each way takes every place in the order in turn
            times[k].append(step(*ways[k]))
    plain, fast, bf16, draws, bernoulli = (statistics.median(times[k]) for k in ways)
    draw_only = {"draws": lambda: dropout_masks(ones, net.spec.layers, batch, keep, generator),
                 "bernoulli_draws": bernoulli_masks}  # the masks alone, without the step
    draw_times = {k: [] for k in draw_only}
    for n in range(steps):
        for k in (("draws", "bernoulli_draws") if n % 2 == 0 else ("bernoulli_draws", "draws")):
            t0 = time.perf_counter()
            draw_only[k]()
            draw_times[k].append(time.perf_counter() - t0)
    return {"network": network, "owned_share": owned, "batch": batch, "steps": steps,
            "plain_s_per_step": round(plain, 4), "split_s_per_step": round(fast, 4), "speedup": round(plain / fast, 2),
            "bf16_s_per_step": round(bf16, 4), "bf16_speedup": round(fast / bf16, 2),
            "bf16_with_draws_s_per_step": round(draws, 4), "bf16_with_bernoulli_draws_s_per_step": round(bernoulli, 4),
            "draws_speedup": round(bernoulli / draws, 2),
            "draws_alone_ms": round(1000 * statistics.median(draw_times["draws"]), 2),
            "bernoulli_draws_alone_ms": round(1000 * statistics.median(draw_times["bernoulli_draws"]), 2),
            "threads": torch.get_num_threads(), "machine": platform.processor() or platform.machine()}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--owned", type=float, action="append", help="share of each layer an earlier task owns (repeatable)")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--network", default="mlp:784-2000-2000")
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    for owned in args.owned or [0.25, 0.5, 0.75]:
        print(json.dumps(measure(owned, args.steps, args.network, args.batch)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
