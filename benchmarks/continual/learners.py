"""The methods the benchmark compares: CLNP, fine-tuning, EWC and single-task networks.

Every learner is seeded from its config alone, so it learns the same thing beside the others or on its own.
They use the trainer's public API only (trainer.clnp, trainer.network, trainer.training).
"""

from __future__ import annotations

import time
from dataclasses import asdict, replace
from typing import Protocol

import torch
import torch.nn.functional as F

from benchmarks.continual.progress import log
from benchmarks.continual.record import CLNPReport, EWCReport, ForgettingCheck, MethodRun, Summary, TaskLearned
from benchmarks.tasks import Task
from trainer.clnp import FREE, CapacityExhaustedError, CLNPConfig, accuracy, check_capacity, learn_task, new_owners, \
    task_masks
from trainer.network import MaskedNetwork, NetworkSpec
from trainer.training import TaskTrainer

PROBE_SAMPLES = 256  # test images per task whose logits the zero-forgetting check compares


class Learner(Protocol):
    """What run_sequence drives: learn task t, then report accuracy on tasks 0..t."""

    seconds: list[float]  # training wall time of each task learned

    def learn(self, t: int, task: Task) -> None: ...

    def accuracy(self, i: int, x: torch.Tensor, y: torch.Tensor, split: str) -> float | None: ...

    def method_run(self, summary: Summary, eval_seconds: float) -> MethodRun: ...


def ones_masks(net: MaskedNetwork, device) -> list[torch.Tensor]:
    """All-ones unit masks: every unit of every layer visible."""
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
        self.tasks: list[TaskLearned] = []
        self.probes: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.zero_forgetting: list[ForgettingCheck] = []
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
        self.tasks.append(TaskLearned(
            task=t,
            source=task.source,
            validation_accuracy=outcome.validation_accuracy,
            dense_validation_accuracy=outcome.dense_validation_accuracy,
            units_kept=dict(outcome.units_kept),
            units_pruned=dict(outcome.units_pruned),
            reused=dict(outcome.reused),
            connections_pruned=dict(outcome.connections_pruned),
            free_after={n: int((o == FREE).sum()) for n, o in zip(names, self.owners)},
            owned_after={n: [int((o == k).sum()) for k in range(t + 1)] for n, o in zip(names, self.owners)},
            seconds=self.seconds[-1],
        ))
        for i, (xp, ref) in sorted(self.probes.items()):
            self.zero_forgetting.append(ForgettingCheck(task=i, after_task=t,
                                                        identical=bool(torch.equal(self.logits(i, xp), ref))))
        xp = task.x_test[:PROBE_SAMPLES]
        self.probes[t] = (xp, self.logits(t, xp))

    def accuracy(self, i: int, x: torch.Tensor, y: torch.Tensor, split: str) -> float | None:
        if self.exhausted_at is not None and i >= self.exhausted_at:
            return None
        return accuracy(self.net, x, y, i, self._masks(i))

    def report(self) -> CLNPReport:
        names = list(self.net.spec.layer_names)
        return CLNPReport(
            layers=names,
            layer_units=[l.units for l in self.net.spec.layers],
            tasks=self.tasks,
            free_per_layer_after_task=[tk.free_after for tk in self.tasks],
            units_per_task_per_layer={n: [int((o == k).sum()) for k in range(len(self.tasks))]
                                      for n, o in zip(names, self.owners)},
            reused_per_task_per_layer=[tk.reused for tk in self.tasks],
            zero_forgetting=self.zero_forgetting,
            zero_forgetting_all_identical=all(z.identical for z in self.zero_forgetting),
            capacity_exhausted_at_task=self.exhausted_at,
            capacity_exhausted_message=self.exhausted_message,
        )

    def method_run(self, summary: Summary, eval_seconds: float) -> MethodRun:
        return MethodRun(summary=summary, eval_seconds=eval_seconds, config=asdict(self.config), clnp=self.report())


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
                     ones_masks(net, self.device), penalty)
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
        return accuracy(self.net, x, y, i, ones_masks(self.net, self.device))

    def report(self) -> EWCReport | None:
        """EWC's settings and Fisher timings; None for plain fine-tuning."""
        if not self.ewc_lambda:
            return None
        return EWCReport(ewc_lambda=self.ewc_lambda, fisher_samples=self.fisher_samples,
                         fisher_seconds=self.fisher_seconds, fisher_labels="sampled from the model")

    def method_run(self, summary: Summary, eval_seconds: float) -> MethodRun:
        return MethodRun(summary=summary, eval_seconds=eval_seconds, config=asdict(self.config), ewc=self.report())


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
                     ones_masks(net, self.device))
        self.seconds.append(time.perf_counter() - t0)
        self.current = (t, net)

    def accuracy(self, i: int, x: torch.Tensor, y: torch.Tensor, split: str) -> float:
        if (i, split) not in self.cache:
            t, net = self.current
            assert t == i, "a single-task network is evaluated right after it is trained"
            self.cache[(i, split)] = accuracy(net, x, y, 0, ones_masks(net, self.device))
        return self.cache[(i, split)]

    def method_run(self, summary: Summary, eval_seconds: float) -> MethodRun:
        return MethodRun(summary=summary, eval_seconds=eval_seconds, config=asdict(self.config),
                         note="a separate network per task: no forgetting by construction")


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
                ref = net(xr, task, ones_masks(net, x.device))
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
