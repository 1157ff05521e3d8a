#!/usr/bin/env python
"""Continual-learning benchmark: CLNP against fine-tuning, EWC and single-task networks, in one run.

Every method sees the same tasks, the same data (same validation hold-out), the same network spec and
the same optimiser schedule (CLNP's dense phase of the `--preset` config: Adam, learning rate and its
schedule, dropout, batch size, epochs), and is measured on the same machine in the same run (one process, or the
processes of a split run merged with `--merge`, see the end of this text).

Scenarios and measurements
--------------------------
* Headline: permuted MNIST, tasks ``permuted-mnist:1`` .. ``permuted-mnist:N`` (seed 0 would not be the
  identity either, 1..N simply matches "task 1, task 2, ..."), an MLP (default 784-2000-2000), one head
  per task. Methods:

  - ``CLNP``: `trainer.clnp.learn_task` driven in-process with the `--preset` config (only epochs and the seed
    changed), no repository and no ONNX. After each task: FREE units per layer, units owned by every
    task per layer, earlier units reused per layer, validation accuracy, and a zero-forgetting check:
    every earlier task's logits on a fixed probe batch (its first 256 test images) are compared with
    `torch.equal` to the logits recorded right after that task was learned.
  - ``fine-tuning``: the same `MaskedNetwork` with all-ones masks, a new head per task, every hidden
    weight trainable (no protection).
  - ``EWC``: fine-tuning plus lambda/2 * sum_i F_i (theta - theta*_i)^2 over the hidden weights (diagonal
    Fisher of the log-likelihood of labels sampled from the model, exact per-sample gradients, on
    `--ewc-fisher-samples` training samples, accumulated over tasks). Lambda is chosen on validation data:
    each value of `--ewc-lambdas` learns the first `--ewc-select-tasks` tasks, the best mean validation
    accuracy after the last of them wins.
  - ``single-task``: a fresh network per task (the reference without any sharing).

  Per method: the accuracy matrix A[i][j] (test accuracy on task i after learning task j, j >= i), the
  average accuracy after the last task, backward transfer (mean over i < N-1 of A[i][N-1] - A[i][i];
  negative = forgetting) and the training wall time.
* Graceful-forgetting sweep: CLNP again with each `--sweep-max-drop` value on the first `--sweep-tasks`
  tasks; average accuracy against the FREE units left. CLNP is deterministic and task-by-task, so the
  value equal to the headline's max_drop is read off the headline run's prefix when the settings match.
* Training cost: samples/second of CLNP's training step (`TaskTrainer.run_epochs` over the FREE units: grad masks and the
  L1 activity penalty) against a plain step of the same network through the same loop, interleaved.
* CNN (`--cnn`, default on): split MNIST (pairs of digits), CLNP, fine-tuning and single-task (EWC with
  `--cnn-ewc-lambda`), with filters per layer per task.

Outputs in `--out` (default benchmarks/results for a full run of every method, else a new temporary folder):
continual.json, continual.md and PNG plots.

    python benchmarks/continual.py --data-dir ../shared/data            # the full run (hours on 2 CPU cores)
    python benchmarks/continual.py --data-dir ../shared/data --quick    # about a minute

Every learner is seeded from `--seeds` alone, so a method learns the same thing whether it runs beside the
others or on its own (a test checks this). On a machine with two or more cores the full run can therefore
be split into processes that run side by side (one torch thread each) and merged:

    python benchmarks/continual.py --data-dir ../shared/data --out /tmp/a --methods clnp,single \
        --no-cnn --cost-steps 0 &
    python benchmarks/continual.py --data-dir ../shared/data --out /tmp/b --methods finetune,ewc \
        --sweep-max-drop= &
    wait && python benchmarks/continual.py --merge /tmp/a /tmp/b --out benchmarks/results
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from trainer.clnp import (  # noqa: E402
    FREE,
    CapacityExhaustedError,
    PRESETS,
    CLNPConfig,
    accuracy,
    check_capacity,
    learn_task,
    new_owners,
    preset,
    task_masks,
)
from trainer.network import MaskedNetwork, NetworkSpec, parse_network_spec  # noqa: E402
from trainer.training import TaskTrainer  # noqa: E402
from benchmarks.tasks import Task, load_task  # noqa: E402

PUBLISHED = {  # Golkar, Kagan & Cho 2019, permuted MNIST, 10 tasks (average test accuracy, percent)
    "source": "Golkar, Kagan, Cho: Continual Learning via Neural Pruning (2019), permuted MNIST, 10 tasks",
    "CLNP": "98.42 ± 0.04",
    "single-task": "98.48",
    "EWC": "97.0",
    "SI": "97.2",
}
PROBE_SAMPLES = 256

FULL = dict(tasks=10, network="mlp:784-2000-2000", epochs=None, limit=None, batch_size=None, ewc_lambdas="100,1000,10000", ewc_select_tasks=3,
            ewc_fisher_samples=1000, sweep_max_drop="0,0.1,0.2,0.5,1", sweep_tasks=3, sweep_epochs=None,
            cnn_network="cnn:1x28x28-c32-c64-d256", cnn_tasks=5, cost_steps=100, cost_rounds=3)
QUICK = dict(tasks=3, network="mlp:784-64-64", epochs=1, limit=1000, batch_size=64, ewc_lambdas="10,1000",
             ewc_select_tasks=2, ewc_fisher_samples=200, sweep_max_drop=f"0,{CLNPConfig().max_drop:g}", sweep_tasks=2, sweep_epochs=None,
             cnn_network="cnn:1x28x28-c8-c16-d32", cnn_tasks=3, cost_steps=10, cost_rounds=2)
METHOD_FLAGS = {"clnp": "CLNP", "finetune": "fine-tuning", "ewc": "EWC", "single": "single-task"}
SPLIT_PAIRS = [(0, 1), (2, 3), (4, 5), (6, 7), (8, 9)]

_T0 = time.perf_counter()


def log(msg: str) -> None:
    """A progress line on stderr with the elapsed time."""
    print(f"[{time.perf_counter() - _T0:8.1f}s] {msg}", file=sys.stderr, flush=True)


# ============================================================================ data


# ============================================================================ learners


def _ones(net: MaskedNetwork, device) -> list[torch.Tensor]:
    return [torch.ones(l.units, device=device) for l in net.spec.layers]


def train_epochs(net: MaskedNetwork, task: int, x: torch.Tensor, y: torch.Tensor, params: list, cfg: CLNPConfig,
                 generator: torch.Generator, masks: list[torch.Tensor], penalty=None) -> None:
    """Adam over (x, y) with CLNP's dense-phase schedule (epochs, learning rate and its schedule, dropout)."""
    trainer = TaskTrainer(net, [], task, cfg.seed, cfg.batch_size, generator=generator)
    trainer.run_epochs(x, y, replace(cfg.dense_plan(), alpha=0.0), params, [None] * len(params), masks,
                       extra_loss=penalty, desc="baseline")


class CLNPLearner:
    """`learn_task` task after task on one network; records capacity, reuse and the zero-forgetting checks."""

    def __init__(self, spec: NetworkSpec, config: CLNPConfig, device: str):
        self.config, self.device = config, device
        torch.manual_seed(config.seed)  # as trainer.pipeline.add_task does for a new network
        self.net = MaskedNetwork(spec).to_device(device)
        self.owners = new_owners(self.net)
        self.seconds: list[float] = []
        self.tasks: list[dict] = []  # per task: what learning it did
        self.probes: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.zero_forgetting: list[dict] = []  # {"task": i, "after_task": j, "identical": bool}
        self.exhausted_at: int | None = None
        self.exhausted_message = ""

    def _masks(self, t: int) -> list[torch.Tensor]:
        return [m.to(self.device) for m in task_masks(self.owners, t)]

    @torch.no_grad()
    def logits(self, t: int, x: torch.Tensor) -> torch.Tensor:
        return self.net(x, t, self._masks(t))

    def learn(self, t: int, task: Task) -> None:
        if self.exhausted_at is not None:
            return
        try:
            check_capacity(self.net, self.owners)
        except CapacityExhaustedError as e:
            self.exhausted_at, self.exhausted_message = t, str(e)
            log(f"  CLNP: capacity exhausted before task {t + 1}: {e}")
            return
        index = self.net.add_head(task.num_classes, task.scale, task.shift,
                                  generator=torch.Generator().manual_seed(self.config.seed + 1))
        assert index == t
        self.net.to_device(self.device)
        t0 = time.perf_counter()
        self.owners, outcome = learn_task(self.net, self.owners, index, task, self.config)
        self.seconds.append(time.perf_counter() - t0)
        names = self.net.spec.layer_names
        self.tasks.append({
            "task": t,
            "source": task.source,
            "validation_accuracy": outcome.validation_accuracy,
            "dense_validation_accuracy": outcome.dense_validation_accuracy,
            "units_kept": dict(outcome.units_kept),
            "units_pruned": dict(outcome.units_pruned),
            "reused": dict(outcome.reused),
            "connections_pruned": dict(outcome.connections_pruned),
            "free_after": {n: int((o == FREE).sum()) for n, o in zip(names, self.owners)},
            "owned_after": {n: [int((o == k).sum()) for k in range(t + 1)] for n, o in zip(names, self.owners)},
            "seconds": self.seconds[-1],
        })
        for i, (xp, ref) in sorted(self.probes.items()):
            self.zero_forgetting.append({"task": i, "after_task": t, "identical": bool(torch.equal(self.logits(i, xp), ref))})
        xp = task.x_test[:PROBE_SAMPLES]
        self.probes[t] = (xp, self.logits(t, xp))

    def accuracy(self, i: int, x: torch.Tensor, y: torch.Tensor, split: str) -> float | None:
        if self.exhausted_at is not None and i >= self.exhausted_at:
            return None
        return accuracy(self.net, x, y, i, self._masks(i))

    def report(self) -> dict:
        names = list(self.net.spec.layer_names)
        return {
            "config": asdict(self.config),
            "layers": names,
            "layer_units": [l.units for l in self.net.spec.layers],
            "tasks": self.tasks,
            "free_per_layer_after_task": [tk["free_after"] for tk in self.tasks],
            "units_per_task_per_layer": {n: [int((o == k).sum()) for k in range(len(self.tasks))]
                                         for n, o in zip(names, self.owners)},
            "reused_per_task_per_layer": [tk["reused"] for tk in self.tasks],
            "zero_forgetting": self.zero_forgetting,
            "zero_forgetting_all_identical": all(z["identical"] for z in self.zero_forgetting),
            "capacity_exhausted_at_task": self.exhausted_at,
            "capacity_exhausted_message": self.exhausted_message,
        }


class FineTuneLearner:
    """One network, all-ones masks, a new head per task, every hidden weight trainable; EWC if ewc_lambda."""

    def __init__(self, spec: NetworkSpec, config: CLNPConfig, device: str, ewc_lambda: float | None = None,
                 fisher_samples: int = 1000):
        self.config, self.device = config, device
        self.ewc_lambda, self.fisher_samples = ewc_lambda, fisher_samples
        torch.manual_seed(config.seed)
        self.net = MaskedNetwork(spec).to_device(device)
        self.generator = torch.Generator().manual_seed(config.seed)
        self.seconds: list[float] = []
        self.fisher_seconds: list[float] = []
        self.fisher_sum: list[torch.Tensor] | None = None  # A = sum_i F_i, per hidden parameter
        self.weighted: list[torch.Tensor] | None = None  # sum_i F_i theta*_i
        self.anchor: list[torch.Tensor] | None = None  # weighted / A: the penalty's centre

    def _hidden_params(self) -> list[torch.nn.Parameter]:
        return [*self.net.weights, *self.net.biases]

    def _penalty(self) -> torch.Tensor:
        # sum_i F_i (theta - theta*_i)^2 == A (theta - anchor)^2 + const: same value up to a constant, same gradient
        total = sum((a * (p - c).pow(2)).sum() for p, a, c in zip(self._hidden_params(), self.fisher_sum, self.anchor))
        return 0.5 * self.ewc_lambda * total

    def learn(self, t: int, task: Task) -> None:
        net = self.net
        index = net.add_head(task.num_classes, task.scale, task.shift,
                             generator=torch.Generator().manual_seed(self.config.seed + 1))
        assert index == t
        net.to_device(self.device)
        t0 = time.perf_counter()
        params = [*self._hidden_params(), net.head_weights[index], net.head_biases[index]]  # earlier heads frozen
        penalty = self._penalty if (self.ewc_lambda and self.fisher_sum is not None) else None
        train_epochs(net, index, task.x_train, task.y_train, params, self.config, self.generator,
                     _ones(net, self.device), penalty)
        if self.ewc_lambda:
            t1 = time.perf_counter()
            n = min(self.fisher_samples, len(task.x_train))
            pick = torch.randperm(len(task.x_train), generator=self.generator)[:n].to(task.x_train.device)
            fisher = diagonal_fisher(net, index, task.x_train[pick], generator=self.generator)
            theta = [p.detach().clone() for p in self._hidden_params()]
            if self.fisher_sum is None:
                self.fisher_sum = fisher
                self.weighted = [f * th for f, th in zip(fisher, theta)]
            else:
                self.fisher_sum = [a + f for a, f in zip(self.fisher_sum, fisher)]
                self.weighted = [w + f * th for w, f, th in zip(self.weighted, fisher, theta)]
            self.anchor = [torch.where(a > 0, w / a.clamp_min(1e-30), torch.zeros_like(a))
                           for w, a in zip(self.weighted, self.fisher_sum)]
            self.fisher_seconds.append(time.perf_counter() - t1)
        self.seconds.append(time.perf_counter() - t0)

    def accuracy(self, i: int, x: torch.Tensor, y: torch.Tensor, split: str) -> float:
        return accuracy(self.net, x, y, i, _ones(self.net, self.device))

    def report(self) -> dict:
        out = {"config": asdict(self.config)}
        if self.ewc_lambda:
            out.update(ewc_lambda=self.ewc_lambda, fisher_samples=self.fisher_samples,
                       fisher_seconds=self.fisher_seconds, fisher_labels="sampled from the model")
        return out


class SingleTaskLearner:
    """A fresh network for every task (same init seed, same schedule); keeps only the current one."""

    def __init__(self, spec: NetworkSpec, config: CLNPConfig, device: str):
        self.spec, self.config, self.device = spec, config, device
        self.generator = torch.Generator().manual_seed(config.seed)
        self.seconds: list[float] = []
        self.current: tuple[int, MaskedNetwork] | None = None
        self.cache: dict[tuple[int, str], float] = {}

    def learn(self, t: int, task: Task) -> None:
        torch.manual_seed(self.config.seed)
        net = MaskedNetwork(self.spec)
        net.add_head(task.num_classes, task.scale, task.shift,
                     generator=torch.Generator().manual_seed(self.config.seed + 1))
        net.to_device(self.device)
        t0 = time.perf_counter()
        train_epochs(net, 0, task.x_train, task.y_train, [*net.parameters()], self.config, self.generator,
                     _ones(net, self.device))
        self.seconds.append(time.perf_counter() - t0)
        self.current = (t, net)

    def accuracy(self, i: int, x: torch.Tensor, y: torch.Tensor, split: str) -> float:
        if (i, split) not in self.cache:
            t, net = self.current
            assert t == i, "a single-task network is evaluated right after it is trained"
            self.cache[(i, split)] = accuracy(net, x, y, 0, _ones(net, self.device))
        return self.cache[(i, split)]

    def report(self) -> dict:
        return {"config": asdict(self.config), "note": "a separate network per task: no forgetting by construction"}


# ============================================================================ EWC's Fisher


def diagonal_fisher(net: MaskedNetwork, task: int, x: torch.Tensor, labels: torch.Tensor | None = None,
                    generator: torch.Generator | None = None, batch: int = 250) -> list[torch.Tensor]:
    """Diagonal Fisher of the hidden parameters: mean over samples of (d log p(y|x) / d theta)^2.

    y is drawn from the model's predictive distribution (the true Fisher) unless `labels` is given.
    Per-sample gradients are exact: for a dense layer z = h W^T + b the per-sample gradient is
    outer(dz, h), so the sum of its squares over samples is (dz^2)^T (h^2); for a 3x3 conv it is
    dz (Cout, HW) @ unfold(h)^T (HW, Cin*9) per sample. The forward mirrors MaskedNetwork.hidden with
    all-ones masks (checked against the network's own logits on the first batch).
    Returns [F(weight_0), ..., F(weight_L-1), F(bias_0), ..., F(bias_L-1)] (the order of _hidden_params).
    """
    L = len(net.weights)
    fw = [torch.zeros_like(w, dtype=torch.float64) for w in net.weights]
    fb = [torch.zeros_like(b, dtype=torch.float64) for b in net.biases]
    n = len(x)
    for s in range(0, n, batch):
        xr = x[s:s + batch]
        h = net.preprocess(xr, task)
        zs, ins, last = [], [], None
        for i, layer in enumerate(net.spec.layers):
            w, b = net.weights[i], net.biases[i]
            if layer.kind == "conv":
                ins.append(h)
                z = F.conv2d(h, w, b, padding=1)
                last = torch.relu(z)
                h = F.max_pool2d(last, 2)
            else:
                h = h.flatten(1)
                ins.append(h)
                z = h @ w.T + b
                last = torch.relu(z)
                h = last
            zs.append(z)
        feats = (F.max_pool2d(last, 2) if last.dim() == 4 else last).flatten(1)
        logits = feats @ net.head_weights[task].T + net.head_biases[task]
        if s == 0:
            with torch.no_grad():
                ref = net(xr, task, _ones(net, x.device))
            if not torch.allclose(ref, logits, rtol=1e-4, atol=1e-4):
                raise RuntimeError("diagonal_fisher's forward disagrees with MaskedNetwork's")
        logp = torch.log_softmax(logits, 1)
        if labels is None:
            yb = torch.multinomial(logp.detach().exp().cpu(), 1, generator=generator).squeeze(1).to(x.device)
        else:
            yb = labels[s:s + batch]
        total = logp.gather(1, yb.reshape(-1, 1)).sum()  # samples are independent: dz rows are per-sample
        dzs = torch.autograd.grad(total, zs)
        with torch.no_grad():
            for i in range(L):
                dz, inp = dzs[i], ins[i].detach()
                if dz.dim() == 2:
                    fw[i] += ((dz * dz).T @ (inp * inp)).double()
                    fb[i] += (dz * dz).sum(0).double()
                else:
                    cols = F.unfold(inp, 3, padding=1)  # (B, Cin*9, HW)
                    g = torch.bmm(dz.flatten(2), cols.transpose(1, 2))  # (B, Cout, Cin*9): per-sample grads
                    fw[i] += g.pow(2).sum(0).reshape(fw[i].shape).double()
                    fb[i] += dz.sum(dim=(2, 3)).pow(2).sum(0).double()
    return [(f / max(1, n)).float() for f in fw + fb]


# ============================================================================ running a sequence


def run_sequence(learners: dict, sources: list[str], loader, split: str, label: str, on_task=None) -> dict:
    """Learn the tasks in order with every learner; A[name][i][j] = accuracy on task i after task j (j >= i)."""
    N = len(sources)
    A = {name: [[None] * N for _ in range(N)] for name in learners}
    eval_sets: list[tuple[torch.Tensor, torch.Tensor]] = []
    eval_seconds = {name: 0.0 for name in learners}
    for t, src in enumerate(sources):
        t0 = time.perf_counter()
        task = loader(src)
        x, y = task.split(split)
        eval_sets.append((x, y))
        log(f"{label}: task {t + 1}/{N} ({src}) loaded in {time.perf_counter() - t0:.1f}s")
        timings = {}
        for name, learner in learners.items():
            before = len(learner.seconds)
            learner.learn(t, task)
            took = learner.seconds[-1] if len(learner.seconds) > before else 0.0
            t1 = time.perf_counter()
            for i in range(t + 1):
                A[name][i][t] = learner.accuracy(i, *eval_sets[i], split)
            eval_seconds[name] += time.perf_counter() - t1
            timings[name] = took
            acc = A[name][t][t]
            first = A[name][0][t]
            log(f"{label}: task {t + 1}/{N} {name}: trained in {took:.1f}s, {split} acc on it "
                f"{'n/a' if acc is None else f'{acc:.2f}'}, on task 1 {'n/a' if first is None else f'{first:.2f}'}")
        if on_task is not None:
            on_task(t, timings, eval_seconds)
        del task
    return {"A": A, "eval_seconds": eval_seconds}


def summarize(A: list[list[float | None]], seconds: list[float]) -> dict:
    N = len(A)
    last = [A[i][N - 1] for i in range(N)]
    known = [v for v in last if v is not None]
    bwt_terms = [A[i][N - 1] - A[i][i] for i in range(N - 1) if A[i][N - 1] is not None and A[i][i] is not None]
    return {
        "accuracy_matrix": A,
        "average_accuracy": (sum(known) / len(known)) if known else None,
        "tasks_counted": len(known),
        "backward_transfer": (sum(bwt_terms) / len(bwt_terms)) if bwt_terms else None,
        "train_seconds": sum(seconds),
        "train_seconds_per_task": seconds,
    }


def mean_std(values: list[float | None]) -> dict:
    v = [x for x in values if x is not None]
    if not v:
        return {"mean": None, "std": None, "n": 0}
    return {"mean": statistics.fmean(v), "std": statistics.stdev(v) if len(v) > 1 else None, "n": len(v)}


# ============================================================================ scenarios


def continual_scenario(spec: NetworkSpec, sources: list[str], cfg: CLNPConfig, args, seed: int, label: str,
                       ewc_lambda: float | None, single: bool = True, on_task=None, clnp: bool = True,
                       finetune: bool = True) -> dict:
    cfg = replace(cfg, seed=seed)
    loader = _loader(spec, args, seed)
    learners = {}
    if clnp:
        learners["CLNP"] = CLNPLearner(spec, cfg, args.device)
    if finetune:
        learners["fine-tuning"] = FineTuneLearner(spec, cfg, args.device)
    if ewc_lambda is not None:
        learners["EWC"] = FineTuneLearner(spec, cfg, args.device, ewc_lambda=ewc_lambda,
                                          fisher_samples=args.ewc_fisher_samples)
    if single:
        learners["single-task"] = SingleTaskLearner(spec, cfg, args.device)
    _warm_up(spec, args.device)
    t0 = time.perf_counter()
    seq = run_sequence(learners, sources, loader, "test", label, on_task)
    methods = {}
    for name, learner in learners.items():
        methods[name] = summarize(seq["A"][name], learner.seconds)
        methods[name]["eval_seconds"] = seq["eval_seconds"][name]
        methods[name].update(learner.report())
    return {"seed": seed, "methods": methods, "wall_seconds": time.perf_counter() - t0}


def headline_block(sources: list[str], network: str, seeds: list[int], runs: list[dict]) -> dict:
    """The headline section of continual.json from per-seed runs (each {"seed", "methods": {name: ...}})."""
    # a merged run may hold some methods for more seeds than others: each is summarised over the seeds it ran
    names = [n for n in METHOD_FLAGS.values() if any(n in r["methods"] for r in runs)]
    summary = {name: {key: mean_std([r["methods"][name][key] for r in runs if name in r["methods"]])
                      for key in ("average_accuracy", "backward_transfer", "train_seconds")}
               for name in names}
    clnp = [r["methods"]["CLNP"]["zero_forgetting_all_identical"] for r in runs if "CLNP" in r["methods"]]
    return {"scenario": "permuted MNIST", "sources": sources, "network": network, "seeds": seeds,
            "seed_count": len(seeds), "runs": runs, "summary": summary,
            "zero_forgetting_all_identical": all(clnp) if clnp else None}


def _warm_up(spec: NetworkSpec, device: str) -> None:
    """A few throwaway steps so one-off start-up costs (kernels, thread pools) are not billed to the first method."""
    torch.manual_seed(12345)
    net = MaskedNetwork(spec)
    net.add_head(2, torch.ones(spec.input_shape), torch.zeros(spec.input_shape))
    net.to_device(device)
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    x = torch.rand(64, *spec.input_shape, device=device)
    y = torch.randint(0, 2, (64,), device=device)
    for _ in range(3):
        loss = F.cross_entropy(net(x, 0, _ones(net, device)), y)
        opt.zero_grad()
        loss.backward()
        opt.step()


def _loader(spec: NetworkSpec, args, seed: int):
    return lambda src: load_task(src, spec, args.data_dir, args.limit, seed, args.device)


def select_ewc_lambda(spec, sources, cfg, args, seed) -> dict:
    grid = [float(v) for v in args.ewc_lambdas.split(",") if v.strip()]
    K = min(args.ewc_select_tasks, len(sources))
    cfg = replace(cfg, seed=seed)
    if len(grid) == 1:
        return {"grid": grid, "tasks": K, "scores": None, "winner": grid[0], "seconds": 0.0,
                "note": "a single value: no selection"}
    learners = {f"{lam:g}": FineTuneLearner(spec, cfg, args.device, ewc_lambda=lam,
                                            fisher_samples=args.ewc_fisher_samples) for lam in grid}
    t0 = time.perf_counter()
    seq = run_sequence(learners, sources[:K], _loader(spec, args, seed), "val", "EWC lambda selection")
    scores = {name: statistics.fmean(seq["A"][name][i][K - 1] for i in range(K)) for name in learners}
    winner = max(grid, key=lambda lam: (scores[f"{lam:g}"], -lam))
    log(f"EWC lambda selection: mean validation accuracy after {K} tasks "
        + ", ".join(f"lambda={k}: {v:.2f}" for k, v in scores.items()) + f" -> lambda={winner:g}")
    return {"grid": grid, "tasks": K, "split": "validation", "criterion": f"mean validation accuracy over the "
            f"first {K} tasks after learning task {K}", "scores": scores, "winner": winner,
            "validation_accuracy_matrices": seq["A"], "seconds": time.perf_counter() - t0,
            "per_task_seconds": {name: l.seconds for name, l in learners.items()}, "seed": seed}


def max_drop_sweep(spec, sources, cfg, args, seed, headline: dict | None) -> dict:
    drops = [float(v) for v in args.sweep_max_drop.split(",") if v.strip()]
    n = min(args.sweep_tasks, len(sources))
    epochs = args.sweep_epochs or cfg.epochs
    scfg = replace(cfg, seed=seed, epochs=epochs)
    rows: dict[float, dict] = {}
    reusable = headline is not None and epochs == cfg.epochs
    learners = {}
    for d in drops:
        if reusable and d == cfg.max_drop:
            rows[d] = _headline_sweep_row(headline["methods"]["CLNP"], d, n)
        else:
            learners[f"max_drop={d:g}"] = (d, CLNPLearner(spec, replace(scfg, max_drop=d), args.device))
    if learners:
        seq = run_sequence({k: v[1] for k, v in learners.items()}, sources[:n], _loader(spec, args, seed), "test",
                           "max-drop sweep")
        for name, (d, learner) in learners.items():
            s = summarize(seq["A"][name], learner.seconds)
            rows[d] = {"max_drop": d, "from_headline_run": False, **_sweep_row(s, learner.tasks),
                       "zero_forgetting_all_identical": all(z["identical"] for z in learner.zero_forgetting),
                       "capacity_exhausted_at_task": learner.exhausted_at}
    return {"tasks": n, "epochs": epochs, "seed": seed, "layer_units": [l.units for l in spec.layers],
            "rows": [rows[d] for d in sorted(rows)]}


def _headline_sweep_row(clnp: dict, max_drop: float, n: int) -> dict:
    """The sweep's row for the default max_drop, from the headline CLNP run's first n tasks (same settings)."""
    A = [row[:n] for row in clnp["accuracy_matrix"][:n]]
    s = summarize(A, clnp["train_seconds_per_task"][:n])
    return {"max_drop": max_drop, "from_headline_run": True, **_sweep_row(s, clnp["tasks"][:n])}


def _sweep_row(s: dict, tasks: list[dict]) -> dict:
    last = tasks[-1] if tasks else {}
    return {"average_accuracy": s["average_accuracy"], "accuracy_matrix": s["accuracy_matrix"],
            "free_after_last_task": last.get("free_after"),
            "units_per_task_per_layer": dict(last.get("owned_after", {})),
            "validation_accuracy": [tk["validation_accuracy"] for tk in tasks],
            "train_seconds": s["train_seconds"], "tasks_learned": len(tasks)}


def training_cost(spec, cfg, args, seed) -> dict:
    """Samples/second of CLNP's training step vs a plain step of the same network, through the same loop."""
    steps, rounds = args.cost_steps, args.cost_rounds
    n = steps * cfg.batch_size
    limit = max(n, args.limit) if args.limit else None
    d = load_task("permuted-mnist:1", spec, args.data_dir, limit, seed, args.device)
    x, y = d.x_train, d.y_train
    while len(x) < n:
        x, y = torch.cat([x, x]), torch.cat([y, y])
    x, y = x[:n], y[:n]
    torch.manual_seed(seed)
    net = MaskedNetwork(spec)
    net.add_head(d.num_classes, d.scale, d.shift, generator=torch.Generator().manual_seed(seed + 1))
    net.to_device(args.device)
    owners = [o.to(args.device) for o in new_owners(net)]
    ccfg = replace(cfg, epochs=1, seed=seed)
    trainer = TaskTrainer(net, owners, 0, seed, cfg.batch_size)
    plain_params = [*net.weights, *net.biases, net.head_weights[0], net.head_biases[0]]
    ones = _ones(net, args.device)
    clnp_params, clnp_masks = trainer.free_unit_parameters()
    free = [(o == FREE).float() for o in owners]

    def clnp_block() -> float:  # grad masks (+ the L1 penalty on FREE units when alpha > 0), as in learn_task
        return sum(trainer.run_epochs(x, y, ccfg.dense_plan(), clnp_params, clnp_masks, ones, penalty_units=free))

    def plain_block() -> float:
        return sum(trainer.run_epochs(x, y, replace(ccfg.dense_plan(), alpha=0.0), plain_params,
                                      [None] * len(plain_params), ones, desc="plain"))

    clnp_block(), plain_block()  # warm-up
    c, p = [], []
    for r in range(rounds):
        for which in ((clnp_block, c), (plain_block, p)) if r % 2 == 0 else ((plain_block, p), (clnp_block, c)):
            which[1].append(n / which[0]())
    cm, pm = statistics.median(c), statistics.median(p)
    log(f"training cost: CLNP {cm:.0f} samples/s, plain {pm:.0f} samples/s, CLNP step time / plain = {pm / cm:.3f}")
    return {"network": str(spec), "batch_size": cfg.batch_size, "steps_per_block": steps, "rounds": rounds,
            "clnp_samples_per_second": c, "plain_samples_per_second": p,
            "clnp_median": cm, "plain_median": pm, "clnp_time_over_plain_time": pm / cm,
            "what": "CLNP: TaskTrainer.run_epochs over free_unit_parameters (all units FREE: grad masks on every "
                    "hidden parameter, the L1 penalty on FREE activations when alpha > 0); plain: the same loop with "
                    "no grad masks and no penalty; blocks interleaved, order alternating per round, one warm-up "
                    "block each"}


# ============================================================================ output


def _f(v, digits=2, dash="—") -> str:
    return dash if v is None else f"{v:.{digits}f}"


def _ms(d: dict, digits=2) -> str:
    if d["mean"] is None:
        return "—"
    return f"{d['mean']:.{digits}f}" + (f" ± {d['std']:.{digits}f}" if d["std"] is not None else "")


def write_markdown(res: dict, path: Path, plots: list[str]) -> None:
    st = res["settings"]
    hl = res["headline"]
    L: list[str] = []
    L += ["# Continual learning benchmark: CLNP vs fine-tuning, EWC and single-task networks", ""]
    L += [f"Generated by `benchmarks/continual.py` ({'quick mode' if st['quick'] else 'full settings'}); "
          f"every method measured in the same run, on the same data, network and schedule.", ""]
    L += [f"- Scenario: permuted MNIST, {st['tasks']} tasks ({st['sources'][0]} … {st['sources'][-1]}), "
          f"network `{st['network']}`, one head per task",
          f"- Schedule (all methods): Adam lr {st['clnp_config']['learning_rate']}, batch {st['clnp_config']['batch_size']}, "
          f"epochs per task: {st['epochs']}, lr × {st['clnp_config']['lr_decay']} for the last quarter of the epochs; "
          f"CLNP also fine-tunes for {st['clnp_config']['finetune_epochs']} epochs after pruning (part of its algorithm)",
          f"- Training samples per task: {'all (54,000)' if st['limit'] is None else st['limit']}; "
          f"test: the full MNIST test set (10,000) per task",
          f"- Seeds: {len(st['seeds'])} ({', '.join(map(str, st['seeds']))}); "
          + (f"headline numbers are mean ± std over the seeds each method ran (column 'seeds'); the matrices and "
             f"capacity tables below are seed {st['seeds'][0]}" if len(st['seeds']) > 1 else "a single seed: no spread"),
          f"- Machine: {res['machine']['platform']}, {res['machine']['cpu_count']} CPUs, torch {res['machine']['torch']}, "
          f"torch threads: {res['machine']['torch_threads']}, device {st['device']}; load average "
          f"{res['machine']['load_average_at_start']} at the start, {res['machine']['load_average_at_end']} at the end "
          "(wall times depend on what else the machine ran)",
          f"- Total wall time: {res['total_wall_seconds'] / 60:.1f} min"
          + (f" (predicted before the run: {_dur(res['estimate']['total_seconds'])})"
             if res.get("estimate", {}).get("total_seconds") is not None else "")]
    for part in res.get("merged_from", []):
        L.append(f"  - part `{part['folder']}`: methods {part['methods']}, "
                 f"seeds {', '.join(map(str, part.get('seeds', [])))}, sections {', '.join(part['sections'])}: "
                 f"{part['wall_seconds'] / 60:.1f} min"
                 + (f" (predicted {_dur(part['estimate']['total_seconds'])})"
                    if part.get("estimate", {}).get("total_seconds") is not None else ""))
    if res.get("merged_from"):
        L.append(f"  - {len(res['merged_from'])} parts: separate processes with the same settings and data, "
                 "combined by `--merge`; the total runs from the first part's start to the last part's finish")
    L.append("")
    if hl.get("skipped"):
        hl = {"summary": {}, "runs": []}

    L += ["## Headline: permuted MNIST", ""]
    L += ["| method | avg accuracy (%) | forgetting: backward transfer (points) | train time (s) | seeds | published (paper) avg accuracy (%) |",
          "| --- | --- | --- | --- | --- | --- |"]
    summ = hl["summary"]
    for name in summ:
        s = summ[name]
        pub = PUBLISHED.get("EWC" if name == "EWC" else name, "—")
        label = name + (f" (λ={res['ewc_selection']['winner']:g})" if name == "EWC" else "")
        bwt = "0 (separate networks)" if name == "single-task" else _ms(s["backward_transfer"])
        L.append(f"| {label} | {_ms(s['average_accuracy'])} | {bwt} | {_ms(s['train_seconds'], 1)} "
                 f"| {s['average_accuracy']['n']} | {pub} |")
    L.append(f"| SI (not run here) | — | — | — | — | {PUBLISHED['SI']} |")
    L += ["", f"Published figures: {PUBLISHED['source']} (single-task: SGD; CLNP: mean ± std); "
          "they are for reference only, measured with other code, schedules and hardware.", ""]
    L += ["Backward transfer = mean over i < N of A[i][N] − A[i][i] (negative: forgetting). "
          "CLNP's train time includes pruning, fine-tuning and the connection pruning of the reuse measure.", ""]
    zf = [r["methods"]["CLNP"]["zero_forgetting"] for r in hl["runs"] if "CLNP" in r["methods"]]
    if zf:
        checks = sum(len(z) for z in zf)
        ok = sum(sum(1 for e in z if e["identical"]) for z in zf)
        L += [f"**Zero forgetting (CLNP)**: {ok}/{checks} checks bit-identical (each earlier task's logits on its "
              f"first {PROBE_SAMPLES} test images after every later task, `torch.equal`).", ""]
    ew = res["ewc_selection"]
    if ew.get("scores"):
        L += [f"**EWC lambda** chosen on validation data: grid {', '.join(f'{g:g}' for g in ew['grid'])}, "
              f"{ew['criterion']}: " + ", ".join(f"λ={k}: {v:.2f}%" for k, v in ew["scores"].items())
              + f" → **λ = {ew['winner']:g}** (diagonal Fisher of sampled labels on {st['ewc_fisher_samples']} "
                f"training samples per task, summed over tasks).", ""]
    elif ew.get("winner") is not None:
        L += [f"**EWC lambda**: {ew['winner']:g} ({ew.get('note', '')}).", ""]

    run0 = hl["runs"][0] if hl["runs"] else {"seed": None, "methods": {}}
    L += [f"### Accuracy matrices (seed {run0['seed']}): A[i][j] = test accuracy (%) on task i after learning task j", ""]
    for name, m in run0["methods"].items():
        L += [f"**{name}**", ""] + _matrix_md(m["accuracy_matrix"]) + [""]

    c = run0["methods"].get("CLNP", {"layers": [], "layer_units": [], "tasks": [], "units_per_task_per_layer": {},
                                     "capacity_exhausted_at_task": None})
    layers = c["layers"]
    L += [f"### CLNP capacity (seed {run0['seed']})", ""]
    L += ["FREE units per layer after each task (of " + ", ".join(f"{n}: {u}" for n, u in zip(layers, c["layer_units"]))
          + "):", ""]
    L += ["| after task | " + " | ".join(layers) + " | validation acc (%) |",
          "| --- |" + " --- |" * (len(layers) + 1)]
    for tk in c["tasks"]:
        L.append(f"| {tk['task'] + 1} | " + " | ".join(str(tk["free_after"][n]) for n in layers)
                 + f" | {tk['validation_accuracy']:.2f} |")
    L += ["", "Units owned per task per layer, and earlier units reused by each task (a non-zero connection into "
          "the task's units or head after connection pruning):", ""]
    L += ["| task | " + " | ".join(f"{n} owned" for n in layers) + " | " + " | ".join(f"{n} reused" for n in layers) + " |",
          "| --- |" + " --- |" * (2 * len(layers))]
    for k, tk in enumerate(c["tasks"]):
        L.append(f"| {k + 1} | " + " | ".join(str(c["units_per_task_per_layer"][n][k]) for n in layers) + " | "
                 + " | ".join(str(tk["reused"][n]) for n in layers) + " |")
    per_seed = [(r["seed"], r["methods"]["CLNP"]) for r in hl["runs"] if "CLNP" in r["methods"]]
    if len(per_seed) > 1:
        L += ["", "CLNP per seed: average accuracy, and FREE units per layer after the last task:", "",
              "| seed | avg accuracy (%) | " + " | ".join(f"{n} FREE" for n in layers) + " |",
              "| --- | --- |" + " --- |" * len(layers)]
        for seed, m in per_seed:
            free = m["tasks"][-1]["free_after"] if m["tasks"] else {}
            L.append(f"| {seed} | {_f(m['average_accuracy'])} | " + " | ".join(str(free.get(n, "—")) for n in layers)
                     + " |")
    if c["capacity_exhausted_at_task"] is not None:
        L += ["", f"Capacity exhausted before task {c['capacity_exhausted_at_task'] + 1}: {c['capacity_exhausted_message']}"]
    L.append("")

    sw = res["sweep"]
    L += ["## Graceful forgetting: max_drop sweep (CLNP)", ""]
    if sw.get("skipped"):
        L += ["skipped", ""]
    else:
        L += [f"{sw['tasks']} tasks, epochs per task: {sw['epochs']}, seed {sw['seed']}; FREE units left after the "
              f"last task (layer widths {sw['layer_units']}).", ""]
        L += ["| max_drop (points) | avg accuracy (%) | FREE per layer after last task | FREE (% of all units) | source |",
              "| --- | --- | --- | --- | --- |"]
        total = sum(sw["layer_units"])
        for r in sw["rows"]:
            free = r["free_after_last_task"] or {}
            pct = 100.0 * sum(free.values()) / total if free else None
            L.append(f"| {r['max_drop']:g} | {_f(r['average_accuracy'])} | {', '.join(str(v) for v in free.values())} "
                     f"| {_f(pct, 1)} | {'headline run' if r['from_headline_run'] else 'own run'} |")
        L.append("")

    tc = res["training_cost"]
    L += ["## Training cost", ""]
    if tc.get("skipped"):
        L += ["skipped", ""]
    else:
        L += [f"Network `{tc['network']}`, batch {tc['batch_size']}, {tc['rounds']} rounds of {tc['steps_per_block']} "
              f"steps per method ({tc['what']}).", "",
              "| step | samples/s (median) |", "| --- | --- |",
              f"| plain | {tc['plain_median']:.0f} |", f"| CLNP (masked grads + L1) | {tc['clnp_median']:.0f} |", "",
              f"CLNP step time / plain step time = **{tc['clnp_time_over_plain_time']:.3f}**", ""]

    cnn = res["cnn"]
    L += ["## Convolutional scenario: split MNIST", ""]
    if cnn.get("skipped"):
        L += ["skipped", ""]
    else:
        L += [f"{len(cnn['sources'])} tasks ({', '.join(cnn['sources'])}), network `{cnn['network']}`, "
              f"{len(cnn['runs'])} seed(s).", ""]
        L += ["| method | avg accuracy (%) | forgetting: backward transfer (points) | train time (s) |", "| --- | --- | --- | --- |"]
        for name, s in cnn["summary"].items():
            bwt = "0 (separate networks)" if name == "single-task" else _ms(s["backward_transfer"])
            L.append(f"| {name} | {_ms(s['average_accuracy'])} | {bwt} | {_ms(s['train_seconds'], 1)} |")
        crun = cnn["runs"][0]
        cz = crun["methods"]["CLNP"]["zero_forgetting"]
        L += ["", f"Zero forgetting (CLNP): {sum(z['identical'] for z in cz)}/{len(cz)} checks bit-identical.", ""]
        for name, m in crun["methods"].items():
            L += [f"**{name}** (seed {crun['seed']})", ""] + _matrix_md(m["accuracy_matrix"]) + [""]
        cc = crun["methods"]["CLNP"]
        L += ["CLNP filters / units per layer per task (and FREE after the last task):", "",
              "| task | " + " | ".join(cc["layers"]) + " |", "| --- |" + " --- |" * len(cc["layers"])]
        for k in range(len(cc["tasks"])):
            L.append(f"| {k + 1} | " + " | ".join(str(cc["units_per_task_per_layer"][n][k]) for n in cc["layers"]) + " |")
        if cc["tasks"]:
            L.append("| FREE | " + " | ".join(str(cc["tasks"][-1]["free_after"][n]) for n in cc["layers"]) + " |")
        L.append("")

    L += ["## Plots", ""] + [f"![{p}]({p})" for p in plots] + [""]
    path.write_text("\n".join(L))


def _matrix_md(A) -> list[str]:
    N = len(A)
    out = ["| task \\ after | " + " | ".join(str(j + 1) for j in range(N)) + " |", "| --- |" + " --- |" * N]
    for i in range(N):
        out.append(f"| {i + 1} | " + " | ".join("" if j < i else _f(A[i][j]) for j in range(N)) + " |")
    return out


def make_plots(res: dict, out: Path) -> list[str]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    files = []
    dpi = 90

    def heatmaps(run: dict, fname: str, title: str):
        methods = run["methods"]
        mats = {name: np.array([[np.nan if v is None or j < i else v for j, v in enumerate(row)]
                                for i, row in enumerate(m["accuracy_matrix"])], dtype=float)
                for name, m in methods.items()}
        finite = [a[np.isfinite(a)] for a in mats.values() if np.isfinite(a).any()]
        vmin = float(min(a.min() for a in finite)) if finite else 0.0  # one colour scale for every method
        fig, axes = plt.subplots(1, len(methods), figsize=(3.2 * len(methods), 3.2), squeeze=False)
        for ax, name in zip(axes[0], methods):
            A = mats[name]
            im = ax.imshow(A, vmin=vmin, vmax=100, cmap="viridis")
            ax.set_title(name, fontsize=9)
            ax.set_xlabel("after task", fontsize=8)
            ax.set_ylabel("task", fontsize=8)
            n = len(A)
            ax.set_xticks(range(n), [str(j + 1) for j in range(n)], fontsize=7)
            ax.set_yticks(range(n), [str(j + 1) for j in range(n)], fontsize=7)
            if n <= 10:
                for i in range(n):
                    for j in range(i, n):
                        if np.isfinite(A[i, j]):
                            ax.text(j, i, f"{A[i, j]:.0f}", ha="center", va="center", fontsize=6, color="w")
            fig.colorbar(im, ax=ax, fraction=0.046)
        fig.suptitle(title, fontsize=10)
        fig.tight_layout()
        fig.savefig(out / fname, dpi=dpi)
        plt.close(fig)
        files.append(fname)

    hl = res["headline"]["runs"][0] if not res["headline"].get("skipped") else {"methods": {}}
    if hl["methods"]:
        heatmaps(hl, "accuracy_matrix.png", "Permuted MNIST: test accuracy (%) on task i after task j")

    def capacity(c: dict, fname: str, title: str):
        layers = c["layers"]
        T = len(c["tasks"])
        if T == 0:
            return
        fig, axes = plt.subplots(1, len(layers), figsize=(4 * len(layers), 3.2), squeeze=False)
        cmap = plt.get_cmap("tab10" if T <= 10 else "tab20")
        for ax, n, units in zip(axes[0], layers, c["layer_units"]):
            xs = np.arange(T)
            bottom = np.zeros(T)
            for k in range(T):
                vals = np.array([c["tasks"][t]["owned_after"][n][k] if k <= t else 0 for t in range(T)], dtype=float)
                ax.bar(xs, vals, bottom=bottom, color=cmap(k % cmap.N), label=f"task {k + 1}")
                bottom += vals
            free = np.array([c["tasks"][t]["free_after"][n] for t in range(T)], dtype=float)
            ax.bar(xs, free, bottom=bottom, color="lightgrey", label="FREE")
            ax.set_xticks(xs, [str(t + 1) for t in range(T)], fontsize=7)
            ax.set_xlabel("after task", fontsize=8)
            ax.set_ylabel("units", fontsize=8)
            ax.set_title(f"{n} ({units} units)", fontsize=9)
        axes[0][-1].legend(fontsize=6, loc="center left", bbox_to_anchor=(1.0, 0.5))
        fig.suptitle(title, fontsize=10)
        fig.tight_layout()
        fig.savefig(out / fname, dpi=dpi)
        plt.close(fig)
        files.append(fname)

    c = hl["methods"].get("CLNP", {"layers": [], "tasks": []})
    if c["tasks"]:
        capacity(c, "capacity.png", "CLNP: units per layer by owner after each task")

    if c["tasks"]:
        fig, ax = plt.subplots(figsize=(5, 3.2))
        T = len(c["tasks"])
        width = 0.8 / len(c["layers"])
        for li, n in enumerate(c["layers"]):
            ax.bar(np.arange(T) + li * width, [tk["reused"][n] for tk in c["tasks"]], width, label=n)
        ax.set_xticks(np.arange(T) + 0.4 - width / 2, [str(t + 1) for t in range(T)], fontsize=7)
        ax.set_xlabel("task", fontsize=8)
        ax.set_ylabel("earlier units reused", fontsize=8)
        ax.set_title("CLNP: earlier units feeding each task, per layer", fontsize=9)
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out / "reuse.png", dpi=dpi)
        plt.close(fig)
        files.append("reuse.png")

    sw = res["sweep"]
    if not sw.get("skipped") and sw["rows"]:
        fig, ax = plt.subplots(figsize=(5, 3.4))
        total = sum(sw["layer_units"])
        for li, n in enumerate(next(iter(r["free_after_last_task"] for r in sw["rows"] if r["free_after_last_task"]), {})):
            xs = [(r["free_after_last_task"] or {}).get(n) for r in sw["rows"]]
            ys = [r["average_accuracy"] for r in sw["rows"]]
            pts = [(x, y, r["max_drop"]) for x, y, r in zip(xs, ys, sw["rows"]) if x is not None and y is not None]
            ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", label=f"{n} ({sw['layer_units'][li]} units)")
            labels: dict[tuple, list[str]] = {}
            for x, y, d in pts:
                labels.setdefault((x, y), []).append(f"{d:g}")
            for (x, y), ds in labels.items():
                ax.annotate("max_drop " + ", ".join(ds), (x, y), fontsize=6, xytext=(3, 3), textcoords="offset points")
        ax.set_xlabel(f"FREE units left after task {sw['tasks']}", fontsize=8)
        ax.set_ylabel("average test accuracy (%)", fontsize=8)
        ax.set_title(f"Graceful forgetting: max_drop trade-off (total {total} units)", fontsize=9)
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out / "max_drop_tradeoff.png", dpi=dpi)
        plt.close(fig)
        files.append("max_drop_tradeoff.png")

    cnn = res["cnn"]
    if not cnn.get("skipped"):
        heatmaps(cnn["runs"][0], "cnn_accuracy_matrix.png", "Split MNIST (CNN): test accuracy (%)")
        capacity(cnn["runs"][0]["methods"]["CLNP"], "cnn_capacity.png", "CLNP (CNN): filters/units by owner")
    return files


# ============================================================================ main


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--data-dir", default=None, help="folder holding mnist/ (e.g. ../shared/data); else $CLNP_DATA_DIR")
    p.add_argument("--out", default=None,
                   help="output folder; default: benchmarks/results for a full run of every method (and for "
                        "--merge), a new temporary folder for --quick and partial runs, so committed results stay")
    p.add_argument("--preset", default="default", choices=sorted(PRESETS),
                   help="CLNP method preset (trainer.clnp.PRESETS); every method uses its dense-phase schedule")
    p.add_argument("--quick", action="store_true", help="a small run (about a minute): " + ", ".join(f"{k}={v}" for k, v in QUICK.items()))
    p.add_argument("--tasks", type=int, help=f"permuted-MNIST tasks (default {FULL['tasks']})")
    p.add_argument("--network", help=f"MLP spec (default {FULL['network']})")
    p.add_argument("--epochs", type=int, help="epochs per task, every method (default: the preset's)")
    p.add_argument("--limit", type=int, help="training samples per task (load_source(limit=...)); default all")
    p.add_argument("--batch-size", type=int, help="batch size, every method (default: the preset's)")
    p.add_argument("--seeds", default="0", help="comma-separated seeds: init, data order, validation hold-out")
    p.add_argument("--ewc-lambdas", help=f"EWC lambda grid (default {FULL['ewc_lambdas']})")
    p.add_argument("--ewc-select-tasks", type=int, help=f"tasks used to choose lambda (default {FULL['ewc_select_tasks']})")
    p.add_argument("--ewc-fisher-samples", type=int, help=f"samples for the Fisher (default {FULL['ewc_fisher_samples']})")
    p.add_argument("--methods", default=",".join(METHOD_FLAGS),
                   help="headline methods to run (comma-separated subset of " + ",".join(METHOD_FLAGS) + "); "
                        "a subset writes a partial continual.json that --merge combines with the others' (two "
                        "processes on two cores halve the wall time)")
    p.add_argument("--no-ewc", action="store_true", help="skip EWC (headline and lambda selection)")
    p.add_argument("--no-single", action="store_true", help="skip the single-task reference (headline and CNN)")
    p.add_argument("--sweep-max-drop", help=f"max_drop values of the sweep (default {FULL['sweep_max_drop']}); '' skips")
    p.add_argument("--sweep-tasks", type=int, help=f"tasks in each sweep run (default {FULL['sweep_tasks']})")
    p.add_argument("--sweep-epochs", type=int, help="epochs per task in the sweep (default: --epochs)")
    p.add_argument("--cnn", dest="cnn", action="store_true", default=True, help="run the split-MNIST CNN scenario")
    p.add_argument("--no-cnn", dest="cnn", action="store_false", help="skip the CNN scenario")
    p.add_argument("--cnn-network", help=f"CNN spec (default {FULL['cnn_network']})")
    p.add_argument("--cnn-tasks", type=int, help=f"split-MNIST tasks, 2 digits each, at most 5 (default {FULL['cnn_tasks']})")
    p.add_argument("--cnn-ewc-lambda", type=float, default=None, help="also run EWC in the CNN scenario with this lambda")
    p.add_argument("--cost-steps", type=int, help=f"steps per timing block (default {FULL['cost_steps']}); 0 skips")
    p.add_argument("--cost-rounds", type=int, help=f"interleaved timing rounds (default {FULL['cost_rounds']})")
    p.add_argument("--estimate", action=argparse.BooleanOptionalAction, default=True,
                   help="predict the run's wall time first from a few timed steps (seconds)")
    p.add_argument("--estimate-only", action="store_true", help="print the predicted wall time and exit")
    p.add_argument("--merge", nargs="+", metavar="DIR",
                   help="combine the continual.json of partial runs (see --methods) into --out; runs nothing")
    p.add_argument("--device", default="cpu", help="torch device for training and evaluation (only cpu was tried)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch.set_num_threads; 1 by default: on shared cores two threads ran 3-4x slower than one "
                        "(spinning threads descheduled); 0 keeps torch's choice")
    args = p.parse_args(argv)
    base = QUICK if args.quick else FULL
    for k, v in base.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    args.seed_list = [int(s) for s in args.seeds.split(",") if s.strip()]
    if not args.seed_list:
        p.error("--seeds needs at least one seed")
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in methods if m not in METHOD_FLAGS]
    if unknown:
        p.error(f"--methods: unknown {', '.join(unknown)}; choose from {','.join(METHOD_FLAGS)}")
    args.run_clnp, args.run_finetune = "clnp" in methods, "finetune" in methods
    args.no_ewc = args.no_ewc or "ewc" not in methods
    args.no_single_headline = args.no_single or "single" not in methods
    args.headline = args.run_clnp or args.run_finetune or not args.no_ewc or not args.no_single_headline
    if not 1 <= args.cnn_tasks <= 5:
        p.error("--cnn-tasks must be 1..5")
    if args.tasks < 1:
        p.error("--tasks must be >= 1")
    if args.out is None:
        full = not args.quick and set(methods) == set(METHOD_FLAGS)
        if full or args.merge:
            args.out = str(REPO_ROOT / "benchmarks" / "results")
        else:
            import tempfile

            args.out = tempfile.mkdtemp(prefix="clnp-continual-")
            print(f"writing to {args.out} (a quick or partial run; --out to choose)", file=sys.stderr)
    return args


def main(argv=None) -> dict:
    """Run the benchmark (argv as on the command line); returns what continual.json holds."""
    args = parse_args(argv)
    threads = torch.get_num_threads()
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        if args.merge:
            return merge_main(args.merge, Path(args.out))
        return _run(args)
    finally:
        torch.set_num_threads(threads)  # in-process callers (tests) get their setting back


def _run(args) -> dict:
    global _T0
    _T0 = time.perf_counter()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    spec = parse_network_spec(args.network)
    if spec.family != "mlp":
        raise SystemExit(f"--network must be an MLP spec for permuted MNIST, got {args.network}")
    cfg = preset(args.preset, epochs=args.epochs, batch_size=args.batch_size)
    sources = [f"permuted-mnist:{i}" for i in range(1, args.tasks + 1)]
    seeds = args.seed_list
    settings = {k: v for k, v in vars(args).items() if k != "seed_list"}
    settings.update(seeds=seeds, clnp_config=asdict(cfg), sources=sources)
    load_start = _loadavg()
    log(f"continual benchmark: {len(sources)} permuted-MNIST tasks, {spec}, {args.epochs} epochs, "
        f"limit {args.limit}, seeds {seeds}, device {args.device}, torch threads {torch.get_num_threads()}")

    estimate: dict = {}
    if args.estimate or args.estimate_only:
        estimate = plan_estimate(args, cfg)
        log("estimate: " + estimate["text"])
        if args.estimate_only:
            return {"estimate": estimate}

    # ---- EWC lambda on validation data (first seed) ------------------------------------------
    ewc = {"skipped": True, "winner": None}
    if not args.no_ewc:
        log(f"EWC lambda selection: grid {args.ewc_lambdas} on the first {min(args.ewc_select_tasks, len(sources))} tasks")
        ewc = select_ewc_lambda(spec, sources, cfg, args, seeds[0])

    # ---- headline -------------------------------------------------------------------------------
    def on_first_task(t, timings, eval_seconds):
        if t == 0 and estimate:
            log("first headline task took " + ", ".join(f"{k} {v:.1f}s" for k, v in timings.items())
                + f"; predicted CLNP {estimate['per_task']['clnp_first']:.1f}s, fine-tuning "
                  f"{estimate['per_task']['plain']:.1f}s")

    runs = []
    headline: dict = {"skipped": True}
    if args.headline:
        for k, seed in enumerate(seeds):
            log(f"headline: seed {seed} ({k + 1}/{len(seeds)})")
            runs.append(continual_scenario(spec, sources, cfg, args, seed, f"permuted MNIST seed {seed}",
                                           ewc.get("winner"), single=not args.no_single_headline,
                                           on_task=on_first_task if k == 0 else None, clnp=args.run_clnp,
                                           finetune=args.run_finetune))
        headline = headline_block(sources, str(spec), seeds, runs)
        for name, s in headline["summary"].items():
            log(f"headline {name}: avg acc {_ms(s['average_accuracy'])}, backward transfer "
                f"{_ms(s['backward_transfer'])}, train {_ms(s['train_seconds'], 1)}s")

    # ---- max-drop sweep -------------------------------------------------------------------------
    if args.sweep_max_drop.strip():
        log(f"max-drop sweep: {args.sweep_max_drop} on {min(args.sweep_tasks, len(sources))} tasks")
        sweep = max_drop_sweep(spec, sources, cfg, args, seeds[0], runs[0] if args.run_clnp else None)
    else:
        sweep = {"skipped": True}

    # ---- training cost --------------------------------------------------------------------------
    if args.cost_steps > 0:
        log(f"training cost: {args.cost_rounds} rounds x {args.cost_steps} steps per method")
        cost = training_cost(spec, cfg, args, seeds[0])
    else:
        cost = {"skipped": True}

    # ---- CNN scenario ---------------------------------------------------------------------------
    cnn: dict = {"skipped": True}
    if args.cnn:
        cspec = parse_network_spec(args.cnn_network)
        csources = [f"split-mnist:{a},{b}" for a, b in SPLIT_PAIRS[:args.cnn_tasks]]
        cruns = []
        for seed in seeds:
            log(f"CNN scenario: seed {seed}, {cspec}, {len(csources)} split-MNIST tasks")
            cruns.append(continual_scenario(cspec, csources, cfg, args, seed, f"split MNIST (CNN) seed {seed}",
                                            args.cnn_ewc_lambda, single=not args.no_single))
        csummary = {name: {key: mean_std([r["methods"][name][key] for r in cruns])
                           for key in ("average_accuracy", "backward_transfer", "train_seconds")}
                     for name in cruns[0]["methods"]}
        cnn = {"scenario": "split MNIST", "sources": csources, "network": str(cspec), "seeds": seeds, "runs": cruns,
               "summary": csummary, "ewc_lambda": args.cnn_ewc_lambda,
               "zero_forgetting_all_identical": all(r["methods"]["CLNP"]["zero_forgetting_all_identical"] for r in cruns)}
        for name, s in csummary.items():
            log(f"CNN {name}: avg acc {_ms(s['average_accuracy'])}, backward transfer {_ms(s['backward_transfer'])}")

    res = {
        "settings": settings,
        "machine": {"platform": platform.platform(), "cpu_count": os.cpu_count(), "torch": torch.__version__,
                    "torch_threads": torch.get_num_threads(), "python": platform.python_version(),
                    "numpy": np.__version__, "load_average_at_start": load_start,
                    "load_average_at_end": _loadavg(),
                    "note": "wall times depend on what else the machine ran; see the load averages"},
        "published": PUBLISHED,
        "estimate": estimate,
        "ewc_selection": ewc,
        "headline": headline,
        "sweep": sweep,
        "training_cost": cost,
        "cnn": cnn,
    }
    res["total_wall_seconds"] = time.perf_counter() - _T0
    res["finished_at"] = time.time()
    res["plots"] = []
    (out / "continual.json").write_text(json.dumps(res, indent=1, default=_json_default))  # before the plots
    plots = make_plots(res, out)
    res["plots"] = plots
    res["total_wall_seconds"] = time.perf_counter() - _T0
    res["finished_at"] = time.time()
    _write_outputs(res, out, plots)
    log(f"done in {res['total_wall_seconds']:.1f}s: {out / 'continual.json'}, {out / 'continual.md'}, "
        f"{len(plots)} plots")
    return res


def _write_outputs(res: dict, out: Path, plots: list[str]) -> None:
    (out / "continual.json").write_text(json.dumps(res, indent=1, default=_json_default))
    write_markdown(res, out / "continual.md", plots)


# settings that every part of a merged run must share: otherwise the numbers are not comparable
MERGE_MUST_MATCH = ("tasks", "network", "epochs", "limit", "batch_size", "clnp_config", "sources", "device", "quick",
                    "ewc_fisher_samples")


def merge_results(parts: list[tuple[str, dict]]) -> dict:
    """One continual.json from partial runs (--methods subsets, parts skipped with --no-cnn etc.).

    Every part must have used the same data, network and schedule; a part may add seeds (e.g. more seeds of CLNP
    alone: each method is then summarised over the seeds it ran). A method may come from one part per seed, and
    each other section from one part only. Raises ValueError saying what does not fit.
    """
    if len(parts) < 2:
        raise ValueError("--merge needs at least two result folders")
    first_dir, first = parts[0]
    for d, r in parts[1:]:
        for k in MERGE_MUST_MATCH:
            if r["settings"].get(k) != first["settings"].get(k):
                raise ValueError(f"{d} ran with {k}={r['settings'].get(k)!r} but {first_dir} with "
                                 f"{first['settings'].get(k)!r}: only runs of the same settings can be merged")

    def one(section: str) -> dict:
        found = [(d, r[section]) for d, r in parts if not r[section].get("skipped")]
        if len(found) > 1:
            raise ValueError(f"section {section!r} is in both {found[0][0]} and {found[1][0]}; run it in one part only")
        return found[0][1] if found else {"skipped": True}

    seeds = list(dict.fromkeys(s for _, r in parts for s in r["settings"]["seeds"]))  # first part's seeds first
    by_seed = {s: {"seed": s, "methods": {}, "wall_seconds_by_part": {}} for s in seeds}
    owner: dict[tuple[int, str], str] = {}
    for d, r in parts:
        if r["headline"].get("skipped"):
            continue
        for run in r["headline"]["runs"]:
            for name, m in run["methods"].items():
                if (run["seed"], name) in owner:
                    raise ValueError(f"method {name} (seed {run['seed']}) is in both {owner[run['seed'], name]} "
                                     f"and {d}; run it in one part only")
                owner[run["seed"], name] = d
                by_seed[run["seed"]]["methods"][name] = m
            by_seed[run["seed"]]["wall_seconds_by_part"][d] = run["wall_seconds"]
    runs = [run for run in by_seed.values() if run["methods"]]
    for run in runs:
        run["methods"] = {n: run["methods"][n] for n in METHOD_FLAGS.values() if n in run["methods"]}
        run["wall_seconds"] = max(run["wall_seconds_by_part"].values(), default=0.0)
    seeds = [run["seed"] for run in runs] or seeds
    headline = headline_block(first["settings"]["sources"], first["settings"]["network"], seeds, runs) if runs \
        else {"skipped": True}
    run0 = runs[0]["methods"] if runs else {}

    sweep = one("sweep")
    cfg = first["settings"]["clnp_config"]
    if not sweep.get("skipped") and "CLNP" in run0 and sweep["epochs"] == cfg["epochs"] \
            and sweep["seed"] == runs[0]["seed"]:
        asked = next(r for _, r in parts if not r["sweep"].get("skipped"))["settings"]["sweep_max_drop"]
        wanted = [float(v) for v in asked.split(",") if v.strip()]  # as the part that ran the sweep was asked
        have = {r["max_drop"] for r in sweep["rows"]}
        if cfg["max_drop"] in wanted and cfg["max_drop"] not in have:  # the part that ran the sweep had no CLNP
            sweep["rows"] = sorted(sweep["rows"] + [_headline_sweep_row(run0["CLNP"], cfg["max_drop"],
                                                                        sweep["tasks"])], key=lambda r: r["max_drop"])

    starts = [r.get("finished_at", 0.0) - r["total_wall_seconds"] for _, r in parts]
    ends = [r.get("finished_at", 0.0) for _, r in parts]
    settings = dict(first["settings"])
    settings["methods"] = ",".join(k for k, v in METHOD_FLAGS.items() if any(n == v for _, n in owner))
    settings["seeds"] = seeds
    res = {
        "settings": settings,
        "machine": dict(first["machine"], load_average_at_end=parts[-1][1]["machine"]["load_average_at_end"]),
        "published": PUBLISHED,
        "estimate": {},
        "merged_from": [{"folder": d, "methods": r["settings"]["methods"], "seeds": r["settings"]["seeds"],
                         "sections": [k for k in ("ewc_selection", "headline", "sweep", "training_cost", "cnn")
                                      if not r[k].get("skipped")],
                         "wall_seconds": r["total_wall_seconds"], "estimate": r.get("estimate", {}),
                         "torch_threads": r["machine"]["torch_threads"]} for d, r in parts],
        "ewc_selection": one("ewc_selection"),
        "headline": headline,
        "sweep": sweep,
        "training_cost": one("training_cost"),
        "cnn": one("cnn"),
        # parts may run side by side: the run took from the first start to the last finish
        "total_wall_seconds": (max(ends) - min(starts)) if all(ends) else max(r["total_wall_seconds"] for _, r in parts),
        "finished_at": max(ends),
    }
    return res


def merge_main(folders: list[str], out: Path) -> dict:
    parts = []
    for d in folders:
        f = Path(d) / "continual.json"
        if not f.is_file():
            raise SystemExit(f"--merge: {f} not found (a folder written by a benchmarks/continual.py run)")
        r = json.loads(f.read_text())
        if "headline" not in r:
            raise SystemExit(f"--merge: {f} holds no results (an --estimate-only run?)")
        if "finished_at" not in r:  # written before finished_at existed: the file's time is when it finished
            r["finished_at"] = f.stat().st_mtime
        parts.append((str(d), r))
    try:
        res = merge_results(parts)
    except ValueError as e:
        raise SystemExit(f"--merge: {e}")
    out.mkdir(parents=True, exist_ok=True)
    plots = make_plots(res, out)
    res["plots"] = plots
    _write_outputs(res, out, plots)
    log(f"merged {len(parts)} runs into {out / 'continual.json'}, {out / 'continual.md'}, {len(plots)} plots")
    return res


def _loadavg() -> list[float] | None:
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except (AttributeError, OSError):
        return None


def _json_default(o):
    if isinstance(o, (np.floating, np.integer)):
        return o.item()
    if isinstance(o, torch.Tensor):
        return o.tolist()
    raise TypeError(f"not JSON serialisable: {type(o)}")


def _time_network(spec: NetworkSpec, cfg: CLNPConfig, device: str, steps: int = 3) -> dict:
    """Seconds per CLNP step, per plain step and per evaluated sample of one network, on random data."""
    torch.manual_seed(0)
    net = MaskedNetwork(spec)
    net.add_head(10, torch.ones(spec.input_shape), torch.zeros(spec.input_shape))
    net.to_device(device)
    owners = [o.to(device) for o in new_owners(net)]
    b = cfg.batch_size
    x = torch.rand(steps * b, *spec.input_shape, device=device)
    y = torch.randint(0, 10, (steps * b,), device=device)
    tr = TaskTrainer(net, owners, 0, cfg.seed, b)
    plan = replace(cfg, epochs=1).dense_plan()
    plain = [*net.weights, *net.biases, net.head_weights[0], net.head_biases[0]]
    params, grad_masks = tr.free_unit_parameters()
    ones = _ones(net, device)
    tr.run_epochs(x[:b], y[:b], plan, params, grad_masks, ones)  # warm-up
    clnp_step = sum(tr.run_epochs(x, y, plan, params, grad_masks, ones)) / steps
    plain_step = sum(tr.run_epochs(x, y, replace(plan, alpha=0.0), plain, [None] * len(plain), ones)) / steps
    xe = torch.rand(2048, *spec.input_shape, device=device)
    t0 = time.perf_counter()
    accuracy(net, xe, torch.zeros(2048, dtype=torch.int64, device=device), 0, ones)
    return {"clnp_step": clnp_step, "plain_step": plain_step, "eval_per_sample": (time.perf_counter() - t0) / 2048}


def _dur(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.0f} min"


def plan_estimate(args, cfg: CLNPConfig) -> dict:
    """The run's wall time predicted from step and evaluation timings of its networks (a few seconds to take).

    Counts training steps per method and task, the pruning searches of CLNP (one validation pass per
    bisection step) and the test evaluations of the accuracy matrices; data loading at ~1 s per task.
    """
    ft = cfg.finetune_epochs
    load = 1.0

    def sizes(kind: str) -> tuple[int, int, int]:
        full_train, full_val, test = (54000, 6000, 10000) if kind == "permuted" else (10800, 1200, 2000)
        if args.limit is None:
            return full_train, full_val, test
        return min(args.limit, full_train), min(full_val, max(args.limit // 5, 500)), test

    def parts(spec: NetworkSpec, kind: str, tm: dict) -> dict:
        n_train, n_val, n_test = sizes(kind)
        steps = math.ceil(n_train / cfg.batch_size)
        units = [l.units for l in spec.layers]
        val_pass = n_val * tm["eval_per_sample"]

        def clnp(epochs: int, later: bool) -> float:
            evals = 4 + sum(math.ceil(math.log2(u + 1)) for u in units)
            if later:  # connection pruning: a bisection over task t's connections from earlier units, per layer
                fan = units[1:] + [10]
                evals += sum(math.ceil(math.log2(max(2, a * b // 2))) for a, b in zip(fan, units))
            return ((epochs + ft) * steps * tm["clnp_step"] + evals * val_pass
                    + min(n_train, cfg.activity_samples) * tm["eval_per_sample"])

        plain = cfg.epochs * steps * tm["plain_step"]
        return {"clnp_first": clnp(cfg.epochs, False), "clnp_later": clnp(cfg.epochs, True), "plain": plain,
                "ewc": plain * 1.15 + min(args.ewc_fisher_samples, n_train) * 3 * tm["eval_per_sample"],
                "test_eval": n_test * tm["eval_per_sample"], "val_eval": val_pass, "steps_per_epoch": steps,
                "clnp_sweep": lambda e: clnp(e, True)}

    def scenario(p: dict, n: int, ewc: bool, single: bool, clnp: bool = True, finetune: bool = True) -> float:
        t = (p["clnp_first"] + (n - 1) * p["clnp_later"] if clnp else 0.0) + (n * p["plain"] if finetune else 0.0)
        methods = clnp + finetune + ewc
        t += n * p["ewc"] if ewc else 0.0
        t += n * p["plain"] if single else 0.0
        return t + (n * (n + 1) / 2 * methods + n * single) * p["test_eval"] + n * load

    spec = parse_network_spec(args.network)
    tm = _time_network(spec, cfg, args.device)
    p = parts(spec, "permuted", tm)
    N, S = args.tasks, len(args.seed_list)
    out = {"mlp_timing": tm, "steps_per_epoch": p["steps_per_epoch"],
           "per_task": {k: p[k] for k in ("clnp_first", "clnp_later", "plain", "ewc", "test_eval", "val_eval")}}
    grid = [v for v in args.ewc_lambdas.split(",") if v.strip()]
    K = min(args.ewc_select_tasks, N)
    out["ewc_selection"] = 0.0 if args.no_ewc or len(grid) < 2 else         len(grid) * (K * p["ewc"] + K * (K + 1) / 2 * p["val_eval"]) + K * load
    out["headline"] = S * scenario(p, N, not args.no_ewc, not args.no_single_headline, args.run_clnp,
                                   args.run_finetune) if args.headline else 0.0
    out["sweep"] = 0.0
    if args.sweep_max_drop.strip():
        drops = [float(v) for v in args.sweep_max_drop.split(",") if v.strip()]
        n = min(args.sweep_tasks, N)
        own = len(drops) - (1 if cfg.max_drop in drops and not args.sweep_epochs and args.run_clnp else 0)
        e = args.sweep_epochs or cfg.epochs
        out["sweep"] = own * (n * p["clnp_sweep"](e) + n * (n + 1) / 2 * p["test_eval"]) + n * load
    out["training_cost"] = (args.cost_rounds + 1) * args.cost_steps * (tm["clnp_step"] + tm["plain_step"]) \
        if args.cost_steps > 0 else 0.0
    out["cnn"] = 0.0
    if args.cnn:
        cspec = parse_network_spec(args.cnn_network)
        ctm = _time_network(cspec, cfg, args.device)
        cp = parts(cspec, "split", ctm)
        out["cnn_timing"] = ctm
        out["cnn"] = S * scenario(cp, args.cnn_tasks, args.cnn_ewc_lambda is not None, not args.no_single)
    keys = ("ewc_selection", "headline", "sweep", "training_cost", "cnn")
    out["total_seconds"] = sum(out[k] for k in keys)
    out["text"] = (f"predicted wall time {_dur(out['total_seconds'])} (" + ", ".join(
        f"{k.replace('_', ' ')} {_dur(out[k])}" for k in keys) + f") at {tm['clnp_step']:.3f} s per CLNP step, "
        f"{tm['plain_step']:.3f} s per plain step of {spec}, {torch.get_num_threads()} torch thread(s)")
    return out


if __name__ == "__main__":
    main()
