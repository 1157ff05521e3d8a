"""The training loop of one task: Adam over masked parameters, with dropout, an L1 activity penalty and distillation.

Every phase of CLNP (learning the task in the FREE units, recovering after a pruning step, fine-tuning the
kept units) and every baseline of the benchmark runs through `TaskTrainer.run_epochs`. A gradient mask
per parameter decides which entries may move; each call builds a fresh Adam with no weight decay, so an
entry whose gradient is always zero stays bit-identical.
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from tqdm import tqdm

from serving.contract import FREE
from trainer.network import MaskedNetwork


@dataclass(frozen=True)
class EpochPlan:
    """How to run a block of epochs."""

    epochs: float  # passes over the data; a fraction runs that share of one shuffled pass
    learning_rate: float  # Adam's step size at the start
    lr_schedule: str = "constant"  # "constant", "step" (x lr_decay for the last quarter) or "cosine" (to 0)
    lr_decay: float = 0.1  # the "step" schedule's factor
    dropout: float = 0.0  # probability of dropping each dense hidden unit's activation in a training step
    alpha: float = 0.0  # L1 penalty on the activations of the units in `penalty_units`
    distill: float = 0.0  # weight of the distillation term (0: cross-entropy only)
    temperature: float = 2.0  # distillation temperature
    check_every: float = 0.0  # call `stop_when` every this many epochs (0: never)
    precision: str = "fp32"  # arithmetic of the steps: "fp32", or "bf16" (see PRECISIONS)
    average: float = 0.0  # decay of an exponential moving average of the moving entries, updated every step, that
    # replaces them when the block ends (0: off; 0.998 averages over about the last 500 steps)


LR_SCHEDULES = ("constant", "step", "cosine")
# "bf16": each step's forward pass and loss run under torch.autocast with bfloat16, which casts matrix products (and
# convolutions) to bfloat16 and keeps reductions such as softmax and the losses in float32; the backward pass follows
# the forward's dtypes. Weights, gradients,
# the optimizer's state and every evaluation stay float32, so the gradient masks and zero-forgetting are exact as
# in fp32. Where the CPU has bfloat16 dot products (AVX512_BF16, AMX) the products run about twice as fast.
PRECISIONS = ("fp32", "bf16")


def step_precision(device: torch.device, precision: str):
    """The context a training step's forward and loss run in."""
    if precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def row_mask(w: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """A {0,1} tensor shaped like w that is 1 on the rows (output units) where `rows` is true."""
    return rows.float().reshape(-1, *([1] * (w.dim() - 1))).expand_as(w)


def column_mask(w: torch.Tensor, in_units: int, keep_in: torch.Tensor) -> torch.Tensor:
    """A {0,1} tensor shaped like w that is 1 on the connections coming from input units where `keep_in`."""
    m = keep_in.float().reshape(1, in_units, 1).expand(w.shape[0], in_units, w.numel() // (w.shape[0] * in_units))
    return m.reshape(w.shape)


def unit_means(a: torch.Tensor) -> torch.Tensor:
    """Per-sample activation of each unit: (B, units), averaging a conv map over its positions."""
    return a.mean(dim=(2, 3)) if a.dim() == 4 else a


@torch.no_grad()
def mean_activations(net: MaskedNetwork, x: torch.Tensor, task: int, masks: list[torch.Tensor],
                     batch_size: int = 2048) -> list[torch.Tensor]:
    """Each hidden unit's mean activation over the raw inputs x through `masks`: float64 (units_i,) per layer."""
    sums = [torch.zeros(len(m), dtype=torch.float64, device=m.device) for m in masks]
    for s in range(0, len(x), batch_size):
        for i, a in enumerate(net.hidden(net.preprocess(x[s:s + batch_size], task), masks)):
            sums[i] += unit_means(a).sum(0).double()
    return [v / max(1, len(x)) for v in sums]


# How `dropout_masks` draws, named so that a run record can say which draws made it: "uniform" since 2026-12-07,
# "bernoulli" (torch.bernoulli of a filled tensor) before. The two are the same distribution, not the same numbers.
DROPOUT_DRAWS = "uniform"


def dropout_masks(masks: list[torch.Tensor], layers, rows: int, keep: float,
                  generator: torch.Generator) -> list[torch.Tensor]:
    """One training step's masks with (inverted) dropout: each dense layer's (units,) mask becomes (rows, units),
    every entry kept with probability `keep` and scaled by 1/keep; conv layers' masks are returned as they are
    (dropping whole filters hurts small conv layers).

    The draws compare uniform numbers with `keep`: the same Bernoulli(keep) as torch.bernoulli of a filled tensor,
    at about 0.6x its cost on CPU, which makes a bfloat16 step at 2,000 units about 5% faster
    (benchmarks/results/training_speed.md)."""
    return [(torch.rand((rows, len(m)), generator=generator) < keep).to(m.device, m.dtype) * (m / keep)
            if layer.kind == "dense" else m for m, layer in zip(masks, layers)]  # (B, units)


class TaskTrainer:
    """Trains task `task` of `net`; holds the seeded generator that orders the data and draws dropout.

    The parameter sets are built from ownership (`owners[i]`: owner per unit of hidden layer i):
    - `free_unit_parameters`: the FREE units' incoming weights and biases, and the task's head;
    - `own_unit_parameters`: the task's own units (after pruning), minus connections from FREE units.
    With `isolated`, neither set holds a connection from an earlier task's unit (into the task's units or its
    head): the task reads no earlier features, and those entries stay at the zero `learn_task` set.
    """

    def __init__(self, net: MaskedNetwork, owners: list[torch.Tensor], task: int, seed: int, batch_size: int,
                 show_progress: bool = False, generator: torch.Generator | None = None,
                 dropout_generator: torch.Generator | None = None, isolated: bool = False):
        from trainer.distributed import world

        self.net, self.owners, self.task = net, owners, task
        self.isolated = isolated
        self.batch_size = batch_size
        self.world = world()  # set under torchrun: batches are sharded and gradients all-reduced (trainer.distributed)
        self.show_progress = show_progress and (self.world is None or self.world.is_main)
        self.generator = generator if generator is not None else torch.Generator().manual_seed(seed)
        if dropout_generator is None:
            # Alone: one stream orders the data and draws dropout. Data-parallel: the shared stream stays the same on
            # every rank (it seeds the sampler and initialisation), and each rank draws its own dropout.
            dropout_generator = self.generator if self.world is None else \
                torch.Generator().manual_seed(seed * 7919 + self.world.rank + 1)
        self.dropout_generator = dropout_generator

    # ---- which entries may move -----------------------------------------------------------------

    def free_unit_parameters(self) -> tuple[list[torch.Tensor], list[torch.Tensor | None]]:
        """Parameters and gradient masks for learning in the FREE units (rows of FREE units + the head)."""
        net, t = self.net, self.task
        params, grad_masks = [], []
        for i, o in enumerate(self.owners):
            free = o == FREE
            params += [net.weights[i], net.biases[i]]
            m = row_mask(net.weights[i], free)
            if i > 0 and self.isolated:
                m = m * column_mask(net.weights[i], len(self.owners[i - 1]), self._readable(i - 1))
            grad_masks += [m, free.float()]
        params += [net.head_weights[t], net.head_biases[t]]
        hw = net.head_weights[t]
        grad_masks += [column_mask(hw, len(self.owners[-1]), self._readable(-1)) if self.isolated else None, None]
        return params, grad_masks

    def _readable(self, i: int) -> torch.Tensor:
        """Units of hidden layer i whose output the task may read (FREE included): all, or isolated, not earlier tasks'."""
        o = self.owners[i]
        return (o == FREE) | (o == self.task) if self.isolated else torch.ones_like(o, dtype=torch.bool)

    def own_unit_parameters(self) -> tuple[list[torch.Tensor], list[torch.Tensor | None]]:
        """Parameters and gradient masks for tuning the task's own units; connections from FREE units stay zero."""
        net, t = self.net, self.task
        params, grad_masks = [], []
        for i, o in enumerate(self.owners):
            w = net.weights[i]
            m = row_mask(w, o == t)
            if i > 0:
                m = m * column_mask(w, len(self.owners[i - 1]), self._readable(i - 1) & (self.owners[i - 1] != FREE))
            params += [w, net.biases[i]]
            grad_masks += [m, (o == t).float()]
        hw = net.head_weights[t]
        params += [hw, net.head_biases[t]]
        grad_masks += [column_mask(hw, len(self.owners[-1]), self._readable(-1) & (self.owners[-1] != FREE)), None]
        return params, grad_masks

    # ---- the loop ---------------------------------------------------------------------------------

    def run_epochs(self, x: torch.Tensor, y: torch.Tensor, plan: EpochPlan, params: list[torch.Tensor],
                   grad_masks: list[torch.Tensor | None], masks: list[torch.Tensor], *,
                   penalty_units: list[torch.Tensor] | None = None, teacher: torch.Tensor | None = None,
                   stop_when=None, extra_loss=None, desc: str = "train") -> list[float]:
        """Adam over (x, y) with the task's head; returns the seconds of each (possibly partial) epoch.

        masks[i]: (units_i,) visibility of hidden layer i; dropout multiplies it per row. grad_masks
        multiply each parameter's gradient (None: all of it moves). penalty_units[i]: (units_i,) weights
        of the L1 activity penalty. teacher: (N, classes) logits aligned with x for distillation.
        stop_when(): called every `plan.check_every` epochs; returning True ends the run there.
        extra_loss(): a term added to every step's loss (e.g. a baseline's EWC penalty).
        """
        net, t = self.net, self.task
        opt = torch.optim.Adam(params, lr=plan.learning_rate)  # fresh state: a zero-gradient entry never moves
        n = len(x)
        w = self.world
        batch_size = self.batch_size if w is None else max(1, self.batch_size // w.size)  # per rank

        split = frozen_split(net, t, params, grad_masks)

        def forward(xb, step_masks):
            h = net.preprocess(xb, t)
            acts = net.hidden(h, step_masks) if split is None else split_hidden(net, h, step_masks, split)
            return acts, net.features(acts) @ net.head_weights[t].T + net.head_biases[t]  # (B, classes)

        if w is not None:
            from trainer.distributed import data_parallel, shard_order

            forward = data_parallel(forward, params)  # all-reduces the gradients of `params` during backward
            sampler_seed = int(torch.randint(2 ** 31 - 1, (1,), generator=self.generator))
            n_local = math.ceil(n / w.size)
        else:
            n_local = n
        steps_per_epoch = math.ceil(n_local / batch_size)
        total_steps = max(1, round(plan.epochs * steps_per_epoch))
        check_steps = round(plan.check_every * steps_per_epoch) if plan.check_every > 0 and stop_when else 0
        decay_from = math.ceil(plan.epochs * 0.75) * steps_per_epoch if plan.epochs >= 2 else total_steps
        keep = 1.0 - plan.dropout
        averaged = WeightAverage(params, grad_masks, plan.average) if plan.average > 0 else None
        times: list[float] = []
        bar = tqdm(total=total_steps, desc=desc, disable=not self.show_progress, leave=False, unit="step")
        step, t0, order = 0, time.perf_counter(), None
        while step < total_steps:
            within = step % steps_per_epoch
            if within == 0:
                if w is None:
                    order = torch.randperm(n, generator=self.generator).to(x.device)
                else:
                    order = shard_order(n, w, sampler_seed, step // steps_per_epoch).to(x.device)
            lr = plan.learning_rate
            if plan.lr_schedule == "step" and step >= decay_from:
                lr *= plan.lr_decay
            elif plan.lr_schedule == "cosine":
                lr *= 0.5 * (1.0 + math.cos(math.pi * step / total_steps))
            for g in opt.param_groups:
                g["lr"] = lr
            idx = order[within * batch_size:(within + 1) * batch_size]
            xb, yb = x[idx], y[idx]
            step_masks = masks
            if plan.dropout > 0:
                step_masks = dropout_masks(masks, net.spec.layers, len(idx), keep, self.dropout_generator)
            with step_precision(x.device, plan.precision):
                acts, logits = forward(xb, step_masks)
                loss = F.cross_entropy(logits, yb)
                if teacher is not None and plan.distill > 0:
                    T = plan.temperature
                    soft = F.kl_div(F.log_softmax(logits / T, dim=1), F.log_softmax(teacher[idx] / T, dim=1),
                                    reduction="batchmean", log_target=True) * (T * T)
                    loss = (1.0 - plan.distill) * loss + plan.distill * soft
                if penalty_units is not None and plan.alpha > 0:
                    for a, weight in zip(acts, penalty_units):
                        loss = loss + plan.alpha * (unit_means(a) * weight).mean()  # mean over batch and units
                if extra_loss is not None:
                    loss = loss + extra_loss()
            opt.zero_grad(set_to_none=False)
            loss.backward()  # data-parallel: the gradients are averaged over the ranks when this returns
            for p, m in zip(params, grad_masks):
                if m is not None:
                    p.grad.mul_(m)
            opt.step()
            if averaged is not None:
                averaged.update()
            step += 1
            bar.update(1)
            if step % steps_per_epoch == 0 or step == total_steps:
                times.append(time.perf_counter() - t0)
                t0 = time.perf_counter()
            if check_steps and step % check_steps == 0 and step < total_steps and stop_when():
                times.append(time.perf_counter() - t0)
                break
        bar.close()
        if averaged is not None:
            averaged.apply()
        return times

    @torch.no_grad()
    def logits(self, x: torch.Tensor, masks: list[torch.Tensor], batch_size: int = 2048) -> torch.Tensor:
        """The task's logits for x through `masks`, no dropout: (N, classes)."""
        return torch.cat([self.net(x[s:s + batch_size], self.task, masks) for s in range(0, len(x), batch_size)])


class WeightAverage:
    """An exponential moving average of the entries a block of training moves (Polyak averaging).

    torch.optim.swa_utils.AveragedModel averages a whole module; here the parameters are a list of tensors
    with gradient masks, and an entry whose mask is zero must come out bit-identical, so `apply` writes the
    average only where the mask lets the entry move (everywhere for a None mask).
    """

    def __init__(self, params: list[torch.Tensor], grad_masks: list[torch.Tensor | None], decay: float):
        if not 0 < decay < 1:
            raise ValueError(f"weight-average decay {decay} must be in (0, 1)")
        self.params, self.masks, self.decay = params, grad_masks, decay
        with torch.no_grad():
            self.shadow = [p.detach().clone() for p in params]

    @torch.no_grad()
    def update(self) -> None:
        for a, p in zip(self.shadow, self.params):
            a.lerp_(p.detach(), 1.0 - self.decay)

    @torch.no_grad()
    def apply(self) -> None:
        for p, a, m in zip(self.params, self.shadow, self.masks):
            p.copy_(a if m is None else torch.where(m != 0, a, p))


# The split pays for its gathers once still rows are about a third of the hidden units. On mlp:784-2000-2000 (one
# CPU thread, batch 256; python benchmarks/training_speed.py) its steps ran 0.9x as fast as the plain ones with 25%
# of the units still, 1.18x with 35%, 1.41x with 50%, 1.5x with 75% and 2.0x with 90% (a late task's compact copy).
SPLIT_MIN_STILL = 0.3


@dataclass(frozen=True)
class LayerSplit:
    """One dense layer's rows: those that train (`moving`) and those whose gradient mask holds them still."""

    moving: torch.Tensor  # (m,) row indices
    still: torch.Tensor  # (s,) row indices
    still_weight: torch.Tensor  # (s, in) those rows' weights, copied once: they do not change
    still_bias: torch.Tensor  # (s,)


def frozen_split(net: MaskedNetwork, task: int, params: list[torch.Tensor],
                 grad_masks: list[torch.Tensor | None]) -> list[LayerSplit] | None:
    """How to skip the backward pass through rows that cannot move, or None where that would change anything.

    A task learned beside earlier tasks trains a share of each layer (the FREE units, or its own); the rest
    are earlier tasks' units, which only feed it. Computing those rows without autograd leaves the result
    exact as long as no moving unit feeds a still row: then no gradient path runs through them. CLNP
    guarantees that (connections from FREE units into owned units are zero), and this checks it rather
    than trusting it. Only for dense layers with the parameter list [w0, b0, w1, b1, ..., head w, head b]
    of `net`; anything else (conv layers, other parameter sets) runs the plain forward.
    torch has no per-row requires_grad, so the rows are split by hand.
    """
    L = len(net.weights)
    expected = [p for i in range(L) for p in (net.weights[i], net.biases[i])] + [net.head_weights[task], net.head_biases[task]]
    if any(l.kind != "dense" for l in net.spec.layers) or len(params) != len(expected) or \
            any(a is not b for a, b in zip(params, expected)):
        return None
    out, previous_moving = [], None
    with torch.no_grad():
        for i in range(L):
            w_mask, b_mask = grad_masks[2 * i], grad_masks[2 * i + 1]
            if w_mask is None or b_mask is None:
                return None
            moves = (b_mask != 0) | (w_mask != 0).any(dim=1)
            moving, still = torch.nonzero(moves).flatten(), torch.nonzero(~moves).flatten()
            if previous_moving is not None and len(still) and len(previous_moving) and \
                    torch.count_nonzero(net.weights[i][still][:, previous_moving]) > 0:
                return None  # a moving unit feeds a still one: the gradient must pass through it
            out.append(LayerSplit(moving, still, net.weights[i][still].detach().clone(),
                                  net.biases[i][still].detach().clone()))
            previous_moving = moving
    still_share = sum(len(s.still) for s in out) / sum(len(s.still) + len(s.moving) for s in out)
    if still_share < SPLIT_MIN_STILL or any(len(s.moving) == 0 for s in out):
        return None  # too little to skip to pay for the split, or a layer that would take no part in autograd
    return out


def split_hidden(net: MaskedNetwork, x: torch.Tensor, masks: list[torch.Tensor], split: list[LayerSplit]) -> list[torch.Tensor]:
    """`net.hidden` for dense layers, with the still rows computed outside autograd (see `frozen_split`)."""
    acts, h = [], x.flatten(1)
    for i, s in enumerate(split):
        w, b = net.weights[i], net.biases[i]
        a = h.new_zeros(h.shape[0], w.shape[0])
        if len(s.still):
            with torch.no_grad():
                a = a.index_copy(1, s.still, torch.relu(h.detach() @ s.still_weight.T + s.still_bias))
        if len(s.moving):
            a = a.index_copy(1, s.moving, torch.relu(h @ w[s.moving].T + b[s.moving]))
        a = a * masks[i]
        acts.append(a)
        h = a
    return acts


def accuracy(net: MaskedNetwork, x: torch.Tensor, y: torch.Tensor, task: int, masks: list[torch.Tensor],
             batch_size: int = 2048) -> float:
    """Percent of samples whose arg-max logit is the label."""
    correct = 0
    with torch.no_grad():
        for s in range(0, len(x), batch_size):
            correct += (net(x[s:s + batch_size], task, masks).argmax(1) == y[s:s + batch_size]).sum().item()
    return 100.0 * correct / max(1, len(x))


def train_compact(trainer: "TaskTrainer", visible: list[torch.Tensor], plan: EpochPlan, x: torch.Tensor,
                  y: torch.Tensor, *, own_units: bool, teacher: torch.Tensor | None = None,
                  val: tuple[torch.Tensor, torch.Tensor] | None = None, target: float | None = None,
                  desc: str = "train") -> list[float]:
    """Train the trainer's task on a compact copy of its `visible` units, then write the result back.

    own_units=False trains the FREE (candidate) units and the head, as in the dense phase; True trains the
    task's own units with no connection from FREE units. With `val` and `target`, training stops at the
    first check (every plan.check_every epochs) where validation accuracy reaches `target`.
    Returns seconds per (partial) epoch.
    """
    from trainer.compact import compact_task, write_back

    ct = compact_task(trainer.net, trainer.owners, trainer.task, visible)
    small = TaskTrainer(ct.net, ct.owners, 0, 0, trainer.batch_size, trainer.show_progress, generator=trainer.generator,
                        dropout_generator=trainer.dropout_generator, isolated=trainer.isolated)
    params, grad_masks = small.own_unit_parameters() if own_units else small.free_unit_parameters()
    ones = [torch.ones(len(o), device=o.device) for o in ct.owners]
    def back_at_target() -> bool:
        return accuracy(ct.net, val[0], val[1], 0, ones) >= target

    stop = back_at_target if val is not None and target is not None else None
    seconds = small.run_epochs(x, y, plan, params, grad_masks, ones, teacher=teacher, stop_when=stop, desc=desc)
    write_back(ct, trainer.net, trainer.task)
    return seconds
