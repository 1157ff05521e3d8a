"""Continual Learning via Neural Pruning: learn one task into the FREE units of a shared network.

Ownership: `owners[i]` is an int64 tensor (units_i,) holding, per unit of hidden layer i, the index of
the task that owns it or FREE (-1). Task t's mask is "owned by a task <= t".

Learning task t (see `learn_task`):
1. FREE units get fresh incoming weights and biases; task t gets a fresh head.
2. Train with Adam on cross-entropy + alpha * L1 of the FREE units' activations. Only FREE units'
   incoming weights/biases and head t receive gradients (a fresh optimizer, no weight decay: entries
   whose gradient is always zero stay bit-identical). Earlier units' rows are never touched, and
   their incoming connections from FREE units are zero and stay zero.
3. Prune with graceful forgetting: each FREE unit's activity is its mean activation over the training
   data; per layer, the least active units go back to FREE, as many as keep validation accuracy within
   `max_drop` points of the unpruned network (the budget is shared out over the layers in order).
   The rest become task t's; pruned units' incoming and outgoing connections are zeroed.
4. Fine-tune task t's units (connections from FREE units held at zero), kept only if it helps.
5. Connection pruning for the reuse measure: task t's connections from earlier tasks' units are pruned
   by magnitude while validation accuracy stays within `reuse_max_drop` points of the fine-tuned
   network, so "reused" counts the earlier units that keep a connection into task t.
"""

from __future__ import annotations

import copy
import logging
import math
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from tqdm import tqdm

from serving.contract import FREE, visible_to
from trainer.network import MaskedNetwork

logger = logging.getLogger(__name__)



class CapacityExhaustedError(Exception):
    """A hidden layer has no FREE unit left, so no further task can be learned."""


@dataclass(frozen=True)
class CLNPConfig:
    epochs: int = 4  # passes over the training data while learning the task
    learning_rate: float = 0.002  # Adam's step size (the paper's setup)
    batch_size: int = 256  # samples per step (the paper's setup)
    alpha: float = 1.0  # L1 penalty on FREE units' activations: alpha * mean over a layer's units (width-independent)
    lr_decay: float = 0.1  # learning rate factor for the last quarter of the epochs (when epochs >= 2)
    max_drop: float = 1.0  # graceful forgetting: validation accuracy points the pruning may cost
    finetune_epochs: int = 2  # epochs of fine-tuning the kept units after pruning (0: none)
    finetune_lr: float = 0.001  # Adam's step size while fine-tuning
    prune_connections: bool = True  # prune task connections from earlier units by magnitude (reuse measure)
    reuse_max_drop: float = 0.1  # accuracy points that connection pruning may cost, from the fine-tuned accuracy
    activity_samples: int = 10000  # training samples used to measure each unit's mean activation
    seed: int = 0  # seeds initialisation and data order


@dataclass
class TaskOutcome:
    """What learning one task did, for the manifest and the summary."""

    index: int
    dense_validation_accuracy: float  # before pruning, percent
    validation_accuracy: float  # after pruning and fine-tuning, percent
    units_kept: dict[str, int]  # layer -> units task t now owns
    units_pruned: dict[str, int]  # layer -> FREE units returned to FREE
    reused: dict[str, int]  # layer -> earlier units with a connection into task t
    connections_pruned: dict[str, float]  # layer -> fraction of task t's connections from earlier units pruned
    epoch_seconds: list[float] = field(default_factory=list)
    seconds: float = 0.0


def new_owners(net: MaskedNetwork) -> list[torch.Tensor]:
    """Ownership for a fresh network: every unit FREE."""
    return [torch.full((l.units,), FREE, dtype=torch.int64) for l in net.spec.layers]


def task_masks(owners: list[torch.Tensor], task: int) -> list[torch.Tensor]:
    """Task `task`'s view: 1.0 for units owned by a task <= `task`, else 0.0."""
    return [visible_to(o, task).float() for o in owners]


def accuracy(net: MaskedNetwork, x: torch.Tensor, y: torch.Tensor, task: int, masks: list[torch.Tensor],
             batch_size: int = 2048) -> float:
    """Percent of samples whose arg-max logit is the label."""
    correct = 0
    with torch.no_grad():
        for s in range(0, len(x), batch_size):
            correct += (net(x[s:s + batch_size], task, masks).argmax(1) == y[s:s + batch_size]).sum().item()
    return 100.0 * correct / max(1, len(x))


def check_capacity(net: MaskedNetwork, owners: list[torch.Tensor]) -> None:
    """Raise CapacityExhaustedError if any hidden layer has no FREE unit."""
    full = [name for name, o in zip(net.spec.layer_names, owners) if not bool((o == FREE).any())]
    if full:
        raise CapacityExhaustedError(
            f"no free unit left in {', '.join(full)} (every unit is owned by an earlier task); "
            "the network cannot learn another task"
        )


def _in_units_view(w: torch.Tensor, in_units: int) -> torch.Tensor:
    """A weight tensor as (out, in_units, k): the k entries connecting each input unit to each output."""
    return w.reshape(w.shape[0], in_units, -1)


def _column_mask(w: torch.Tensor, in_units: int, keep_in: torch.Tensor) -> torch.Tensor:
    """A {0,1} tensor shaped like w that is 1 on the connections coming from input units where keep_in."""
    m = keep_in.float().reshape(1, in_units, 1).expand(w.shape[0], in_units, w.numel() // (w.shape[0] * in_units))
    return m.reshape(w.shape)


def _row_mask(w: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    return rows.float().reshape(-1, *([1] * (w.dim() - 1))).expand_as(w)


class _Trainer:
    """One task's learning run; keeps the grad masks and data together."""

    def __init__(self, net: MaskedNetwork, owners: list[torch.Tensor], task: int, config: CLNPConfig,
                 show_progress: bool):
        self.net, self.owners, self.task, self.config = net, owners, task, config
        self.show_progress = show_progress
        self.generator = torch.Generator().manual_seed(config.seed)

    def _epochs(self, x, y, epochs, lr, params, grad_masks, masks, penalty_units, desc) -> list[float]:
        """Run Adam over (x, y); grads are multiplied by grad_masks; returns seconds per epoch."""
        net, cfg = self.net, self.config
        opt = torch.optim.Adam(params, lr=lr)  # fresh state: a zero-gradient entry never moves
        times = []
        decay_from = math.ceil(epochs * 0.75) if epochs >= 2 else epochs
        for epoch in range(epochs):
            if epoch == decay_from:
                for g in opt.param_groups:
                    g["lr"] = lr * cfg.lr_decay
            t0 = time.perf_counter()
            order = torch.randperm(len(x), generator=self.generator).to(x.device)
            steps = range(0, len(x), cfg.batch_size)
            bar = tqdm(steps, desc=f"{desc} epoch {epoch + 1}/{epochs}", disable=not self.show_progress,
                       leave=False, unit="step")
            for s in bar:
                idx = order[s:s + cfg.batch_size]
                xb, yb = x[idx], y[idx]
                acts = net.hidden(net.preprocess(xb, self.task), masks)
                logits = net.features(acts) @ net.head_weights[self.task].T + net.head_biases[self.task]
                loss = F.cross_entropy(logits, yb)
                if penalty_units is not None and cfg.alpha > 0:
                    for a, free in zip(acts, penalty_units):
                        unit_act = a.mean(dim=(2, 3)) if a.dim() == 4 else a  # (B, units)
                        loss = loss + cfg.alpha * (unit_act * free).mean()  # mean over batch and units
                opt.zero_grad(set_to_none=False)
                loss.backward()
                for p, m in zip(params, grad_masks):
                    if m is not None:
                        p.grad.mul_(m)
                opt.step()
            times.append(time.perf_counter() - t0)
        return times

    def train_free_units(self, x, y) -> list[float]:
        """Phase 2: learn task t in the FREE units and its head."""
        net, t = self.net, self.task
        free = [(o == FREE) for o in self.owners]
        params, grad_masks = [], []
        for i in range(len(net.weights)):
            params += [net.weights[i], net.biases[i]]
            grad_masks += [_row_mask(net.weights[i], free[i]), free[i].float()]
        params += [net.head_weights[t], net.head_biases[t]]
        grad_masks += [None, None]
        masks = [torch.ones(len(o), device=o.device) for o in self.owners]  # every unit is an earlier task's or FREE
        return self._epochs(x, y, self.config.epochs, self.config.learning_rate, params, grad_masks, masks,
                            [f.float() for f in free], "train")

    def finetune(self, x, y) -> list[float]:
        """Phase 4: tune task t's own units and head; connections from FREE units stay zero."""
        net, t = self.net, self.task
        mine = [(o == t) for o in self.owners]
        params, grad_masks = [], []
        for i in range(len(net.weights)):
            w = net.weights[i]
            m = _row_mask(w, mine[i])
            if i > 0:
                m = m * _column_mask(w, len(self.owners[i - 1]), self.owners[i - 1] != FREE)
            params += [w, net.biases[i]]
            grad_masks += [m, mine[i].float()]
        hw = net.head_weights[t]
        params += [hw, net.head_biases[t]]
        grad_masks += [_column_mask(hw, len(self.owners[-1]), self.owners[-1] != FREE), None]
        return self._epochs(x, y, self.config.finetune_epochs, self.config.finetune_lr, params, grad_masks,
                            task_masks(self.owners, t), None, "fine-tune")

    @torch.no_grad()
    def unit_activity(self, x) -> list[torch.Tensor]:
        """Mean activation of every unit over (up to activity_samples of) the training data."""
        net = self.net
        x = x[: self.config.activity_samples]
        masks = [torch.ones(len(o), device=o.device) for o in self.owners]
        sums = [torch.zeros(len(o), dtype=torch.float64, device=o.device) for o in self.owners]
        for s in range(0, len(x), 2048):
            for i, a in enumerate(net.hidden(net.preprocess(x[s:s + 2048], self.task), masks)):
                unit = a.mean(dim=(2, 3)) if a.dim() == 4 else a
                sums[i] += unit.sum(0).double()
        return [s / max(1, len(x)) for s in sums]


def learn_task(net: MaskedNetwork, owners: list[torch.Tensor], task: int, data, config: CLNPConfig,
               show_progress: bool = False) -> tuple[list[torch.Tensor], TaskOutcome]:
    """Learn task `task` (its head already added to `net`) into the FREE units; returns new owners.

    `data` has x_train, y_train, x_val, y_val as tensors (raw features, int64 labels). `net` is changed
    in place; earlier tasks' units, heads and preprocessing are never written.
    Raises CapacityExhaustedError if a layer has no FREE unit (before anything changes).
    """
    check_capacity(net, owners)
    t0 = time.perf_counter()
    torch.manual_seed(config.seed)
    names = net.spec.layer_names
    device = data.x_train.device
    owners = [o.to(device).clone() for o in owners]
    tr = _Trainer(net, owners, task, config, show_progress)
    for i, o in enumerate(owners):
        net.reinit_units(i, (o == FREE).cpu(), generator=tr.generator)

    epoch_seconds = tr.train_free_units(data.x_train, data.y_train)

    # ---- 3. prune units by activity, with graceful forgetting --------------------------------
    all_on = [torch.ones(len(o), device=device) for o in owners]
    dense_acc = accuracy(net, data.x_val, data.y_val, task, all_on)
    activity = tr.unit_activity(data.x_train)
    keep = [torch.ones(len(o), dtype=torch.bool, device=device) for o in owners]  # units visible to task t
    pruned_count = {}
    L = len(owners)
    for i in range(L):
        free_idx = torch.nonzero(owners[i] == FREE).flatten()
        order = free_idx[torch.argsort(activity[i][free_idx], stable=True)]  # least active first
        floor = dense_acc - config.max_drop * (i + 1) / L

        def acc_with(k: int) -> float:
            trial = [m.clone() for m in keep]
            trial[i][order[:k]] = False
            return accuracy(net, data.x_val, data.y_val, task, [m.float() for m in trial])

        lo, hi = 0, len(order)  # largest k whose accuracy stays above the floor (k=0 always does)
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if acc_with(mid) >= floor:
                lo = mid
            else:
                hi = mid - 1
        keep[i][order[:lo]] = False
        pruned_count[names[i]] = lo
    for i in range(L):
        newly = (owners[i] == FREE) & keep[i]
        owners[i][newly] = task
    _zero_free_connections(net, owners, task)
    pruned_acc = accuracy(net, data.x_val, data.y_val, task, task_masks(owners, task))
    logger.info("task %d: dense %.2f%%, pruned %.2f%%", task, dense_acc, pruned_acc)

    # ---- 4. fine-tune the kept units ----------------------------------------------------------
    if config.finetune_epochs > 0:
        before = copy.deepcopy(net.state_tensors())
        epoch_seconds += tr.finetune(data.x_train, data.y_train)
        tuned_acc = accuracy(net, data.x_val, data.y_val, task, task_masks(owners, task))
        if tuned_acc < pruned_acc:  # keep the better of the two
            _restore(net, before)
        else:
            pruned_acc = tuned_acc

    # ---- 5. prune task t's connections from earlier units (the reuse measure) -----------------
    fractions = {n: 0.0 for n in names}
    if config.prune_connections and task > 0:
        fractions = _prune_reuse_connections(net, owners, task, data, pruned_acc, config.reuse_max_drop)
        pruned_acc = accuracy(net, data.x_val, data.y_val, task, task_masks(owners, task))

    owners = [o.cpu() for o in owners]
    outcome = TaskOutcome(
        index=task,
        dense_validation_accuracy=dense_acc,
        validation_accuracy=pruned_acc,
        units_kept={n: int((o == task).sum()) for n, o in zip(names, owners)},
        units_pruned=pruned_count,
        reused=reuse_counts(net, owners, task),
        connections_pruned=fractions,
        epoch_seconds=epoch_seconds,
        seconds=time.perf_counter() - t0,
    )
    return owners, outcome


def _consumers(net: MaskedNetwork, owners: list[torch.Tensor], task: int):
    """For each hidden layer i: (weight that reads layer i, rows that belong to task t)."""
    out = []
    for i in range(len(owners)):
        if i + 1 < len(owners):
            out.append((net.weights[i + 1], owners[i + 1] == task))
        else:
            hw = net.head_weights[task]
            out.append((hw, torch.ones(hw.shape[0], dtype=torch.bool, device=hw.device)))
    return out


@torch.no_grad()
def _zero_free_connections(net: MaskedNetwork, owners: list[torch.Tensor], task: int) -> None:
    """Zero the incoming rows and biases of FREE units and every connection out of them."""
    for i, (o, (consumer, _)) in enumerate(zip(owners, _consumers(net, owners, task))):
        free = o == FREE
        net.weights[i][free] = 0.0
        net.biases[i][free] = 0.0
        # Rows of earlier tasks' units already hold zeros there and are never written.
        rows = ((owners[i + 1] == FREE) | (owners[i + 1] == task) if i + 1 < len(owners)
                else torch.ones(consumer.shape[0], dtype=torch.bool, device=o.device))
        view = _in_units_view(consumer, len(o))
        view[rows.nonzero().flatten().reshape(-1, 1), free.nonzero().flatten().reshape(1, -1)] = 0.0


def _restore(net: MaskedNetwork, tensors: dict[str, torch.Tensor]) -> None:
    with torch.no_grad():
        current = net.state_tensors()
        for k, v in tensors.items():
            current[k].copy_(v)


@torch.no_grad()
def _prune_reuse_connections(net, owners, task, data, reference_acc, max_drop) -> dict[str, float]:
    """Magnitude-prune task t's connections from earlier units, layer by layer, under the accuracy floor."""
    names = net.spec.layer_names
    masks = task_masks(owners, task)
    fractions = {}
    L = len(owners)
    for i, (w, rows) in enumerate(_consumers(net, owners, task)):
        earlier = (owners[i] >= 0) & (owners[i] < task)
        view = _in_units_view(w, len(owners[i]))  # (out, in_units, k)
        strength = view.norm(dim=2)  # (out, in_units)
        cand = rows.reshape(-1, 1) & earlier.reshape(1, -1) & (strength > 0)
        values = strength[cand]
        if values.numel() == 0:
            fractions[names[i]] = 0.0
            continue
        sorted_vals = torch.sort(values).values
        original = w.clone()
        floor = reference_acc - max_drop * (i + 1) / L

        def apply(k: int) -> None:
            w.copy_(original)
            if k > 0:
                thr = sorted_vals[k - 1]
                cut = cand & (strength <= thr)
                _in_units_view(w, len(owners[i]))[cut] = 0.0

        lo, hi = 0, len(sorted_vals)
        while lo < hi:
            mid = (lo + hi + 1) // 2
            apply(mid)
            if accuracy(net, data.x_val, data.y_val, task, masks) >= floor:
                lo = mid
            else:
                hi = mid - 1
        apply(lo)
        fractions[names[i]] = lo / len(sorted_vals)
    return fractions


@torch.no_grad()
def reuse_counts(net: MaskedNetwork, owners: list[torch.Tensor], task: int) -> dict[str, int]:
    """Per hidden layer: units of earlier tasks with a non-zero connection into task t's units (or head)."""
    out = {}
    for i, (w, rows) in enumerate(_consumers(net, owners, task)):
        earlier = (owners[i] >= 0) & (owners[i] < task)
        view = _in_units_view(w, len(owners[i]))[rows]  # (rows_t, in_units, k)
        used = (view != 0).any(dim=2).any(dim=0) if view.shape[0] else torch.zeros_like(earlier)
        out[net.spec.layer_names[i]] = int((used & earlier).sum())
    return out


__all__ = [
    "CLNPConfig", "TaskOutcome", "CapacityExhaustedError", "FREE", "new_owners", "task_masks",
    "accuracy", "learn_task", "check_capacity", "reuse_counts",
]
