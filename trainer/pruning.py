"""How CLNP decides which of a task's candidate units to give back: unit scores and pruning schedules.

Both are small named objects, registered by name and chosen by `CLNPConfig.score` / `CLNPConfig.schedule`
(the shape of torch.nn.utils.prune's methods: one object, one job).

Unit scores (higher: more important to the task):
- "activity": mean activation over training samples (the paper's criterion).
- "taylor": first-order Taylor importance, mean over samples of |activation x d loss / d activation|
  (the change in loss if the unit were removed).
- "magnitude": L2 norm of the unit's incoming weights.

Schedules:
- "one-shot": after training, per layer, bisect for the most low-score units that can go while validation
  accuracy stays within max_drop (shared out over the layers in order) of the dense network.
- "iterative": remove a fraction of the task's remaining units in every layer, recover with a little
  training (distilled from the dense network), and keep the step if validation accuracy stays within
  max_drop of the dense network; after a failed step, restore and halve the fraction, until it is below
  `min_prune_fraction` or `max_prune_steps` steps were tried.
Both leave at least `min_units` of a layer's candidates (`CLNPConfig.min_units`; 0: max_drop alone decides), a
floor a team sets when it has capacity to spare and wants it spent on accuracy. Both keep at most `max_units`
(`CLNPConfig.max_units`; 0: no cap), a ceiling a team sets so that no task can take most of a layer: where
max_drop would keep more, a last step cuts the layer to the cap by score (the iterative schedule then recovers),
whatever that costs in accuracy, and `PruneResult.capped_from` says what the bound alone would have kept.
Floor and cap are one count for every layer, or one per layer: a plan (`CLNPConfig.plan_tasks`) sets both to
each layer's equal share of its FREE units, so the task keeps exactly that share.
"""

from __future__ import annotations

import copy
import logging
import math
from dataclasses import dataclass, replace
from typing import Callable

import torch
import torch.nn.functional as F

from trainer.network import MaskedNetwork
from trainer.training import EpochPlan, TaskTrainer, mean_activations, train_compact

logger = logging.getLogger(__name__)


@dataclass
class PruneContext:
    """What a score or schedule needs about the task being learned.

    `visible[i]`: (units_i,) bool, units the task sees now (earlier tasks' units and its own candidates);
    `candidates[i]`: (units_i,) bool, units the task may still keep (FREE before it started).
    """

    net: MaskedNetwork
    trainer: TaskTrainer
    task: int
    x_train: torch.Tensor
    y_train: torch.Tensor
    accuracy: Callable[[list[torch.Tensor]], float]  # validation accuracy (percent) through the given bool masks
    candidates: list[torch.Tensor]
    earlier: list[torch.Tensor]  # units owned by earlier tasks (always visible, never pruned)
    score_samples: int  # training samples a score looks at
    recovery: EpochPlan  # the iterative schedule's recovery training
    teacher: torch.Tensor | None  # dense network's logits on x_train, for distillation
    x_val: torch.Tensor  # validation data, for stopping recovery early
    y_val: torch.Tensor

    def visible(self, keep: list[torch.Tensor]) -> list[torch.Tensor]:
        return [(e | k).float() for e, k in zip(self.earlier, keep)]


# ---- unit scores ------------------------------------------------------------------------------------


class UnitScore:
    """Scores every unit of every hidden layer for the task; only candidates' scores are read."""

    name = ""

    def __call__(self, ctx: PruneContext, keep: list[torch.Tensor]) -> list[torch.Tensor]:
        raise NotImplementedError


class ActivityScore(UnitScore):
    name = "activity"

    def __call__(self, ctx, keep):
        return mean_activations(ctx.net, ctx.x_train[: ctx.score_samples], ctx.task, ctx.visible(keep))


class TaylorScore(UnitScore):
    name = "taylor"

    def __call__(self, ctx, keep):
        net, t = ctx.net, ctx.task
        x, y = ctx.x_train[: ctx.score_samples], ctx.y_train[: ctx.score_samples]
        masks = ctx.visible(keep)
        sums = [torch.zeros(len(k), dtype=torch.float64, device=k.device) for k in keep]
        for s in range(0, len(x), 1024):
            acts = net.hidden(net.preprocess(x[s:s + 1024], t), masks)
            for a in acts:
                a.retain_grad()
            logits = net.features(acts) @ net.head_weights[t].T + net.head_biases[t]
            loss = F.cross_entropy(logits, y[s:s + 1024], reduction="sum")  # per-sample gradients, unscaled
            grads = torch.autograd.grad(loss, acts)
            for i, (a, g) in enumerate(zip(acts, grads)):
                contrib = a.detach() * g  # (B, units) or (B, C, H, W)
                if contrib.dim() == 4:
                    contrib = contrib.sum(dim=(2, 3))
                sums[i] += contrib.abs().sum(0).double()
        return [v / max(1, len(x)) for v in sums]


class MagnitudeScore(UnitScore):
    name = "magnitude"

    @torch.no_grad()
    def __call__(self, ctx, keep):
        return [w.detach().flatten(1).norm(dim=1).double() for w in ctx.net.weights]


SCORES: dict[str, UnitScore] = {s.name: s for s in (ActivityScore(), TaylorScore(), MagnitudeScore())}


# ---- schedules --------------------------------------------------------------------------------------


@dataclass
class PruneResult:
    keep: list[torch.Tensor]  # (units_i,) bool: candidates the task keeps
    accuracy: float  # validation accuracy with those units, after any recovery training
    steps: int  # pruning steps tried
    epoch_seconds: list[float]  # recovery training time
    # units per layer the max_drop search kept before the `max_units` cap cut them (None: the cap did not bind)
    capped_from: list[int] | None = None


class PruneSchedule:
    """Decides which candidates the task keeps, given the dense validation accuracy and `max_drop`."""

    name = ""

    def __call__(self, ctx: PruneContext, score: UnitScore, dense_accuracy: float, max_drop: float) -> PruneResult:
        raise NotImplementedError


def _lowest(scores: torch.Tensor, among: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the k lowest-scored units where `among` (ties broken by index)."""
    idx = torch.nonzero(among).flatten()
    return idx[torch.argsort(scores[idx], stable=True)[:k]]


@dataclass
class OneShotBisection(PruneSchedule):
    name = "one-shot"
    min_units: int | list[int] = 0  # keep at least this many candidates per layer (where there are that many)
    max_units: int | list[int] = 0  # keep at most this many candidates per layer (0: no cap)

    def __call__(self, ctx, score, dense_accuracy, max_drop):
        keep = [c.clone() for c in ctx.candidates]
        floors = per_layer(self.min_units, len(keep))
        scores = score(ctx, keep)
        L = len(keep)
        for i in range(L):
            order = _lowest(scores[i], keep[i], int(keep[i].sum()))  # least important first
            floor = dense_accuracy - max_drop * (i + 1) / L

            def acc_without(k: int) -> float:
                trial = [m.clone() for m in keep]
                trial[i][order[:k]] = False
                return ctx.accuracy(trial)

            # largest k whose accuracy stays above the floor (k=0 always does), leaving min_units where there are
            # that many (without a floor, a layer may give back every candidate and live on reused units)
            lo, hi = 0, len(order) - min(floors[i], len(order))
            while lo < hi:
                mid = (lo + hi + 1) // 2
                if acc_without(mid) >= floor:
                    lo = mid
                else:
                    hi = mid - 1
            keep[i][order[:lo]] = False
        keep, capped_from = _cap(keep, self.max_units, lambda: score(ctx, keep))
        return PruneResult(keep, ctx.accuracy(keep), L + (capped_from is not None), [], capped_from)


@dataclass
class IterativeRecovery(PruneSchedule):
    name = "iterative"
    first_fraction: float = 0.5  # share of each layer's remaining units the first step removes
    min_fraction: float = 0.05  # stop once a failed step has halved the share below this
    max_steps: int = 12  # stop after this many steps, kept or not
    min_units: int | list[int] = 0  # keep at least this many candidates per layer (where there are that many)
    max_units: int | list[int] = 0  # keep at most this many candidates per layer (0: no cap)
    rank: str = "layer"  # "layer": each step cuts `fraction` of every layer; "global": of all layers together (RANKS)

    def __call__(self, ctx, score, dense_accuracy, max_drop):
        floor = dense_accuracy - max_drop
        keep = [c.clone() for c in ctx.candidates]
        least = [max(1, min(m, int(c.sum())))  # one at least, as a step cuts
                 for m, c in zip(per_layer(self.min_units, len(ctx.candidates)), ctx.candidates)]
        saved = copy.deepcopy(ctx.net.state_tensors())
        accuracy = ctx.accuracy(keep)
        fraction, steps, seconds = self.first_fraction, 0, []
        while fraction >= self.min_fraction and steps < self.max_steps:
            scores = score(ctx, keep)
            trial = _cut(keep, scores, fraction, least) if self.rank == "layer" else \
                _cut_global(keep, scores, fraction, least)
            if all(torch.equal(a, b) for a, b in zip(trial, keep)):
                break
            steps += 1
            target = max(floor, accuracy)  # recover fully if the step can, else stop at the floor
            trial_acc = ctx.accuracy(trial)
            if trial_acc < target and ctx.recovery.epochs > 0:
                # retrain the task's remaining units on a compact copy (only the units it sees)
                seconds += _recover(ctx, trial, target, steps)
                trial_acc = ctx.accuracy(trial)
            kept = [int(k.sum()) for k in trial]
            if trial_acc >= floor:
                keep, accuracy = trial, trial_acc
                saved = copy.deepcopy(ctx.net.state_tensors())
                logger.info("prune step %d (%.3f): kept %s, validation %.2f%% (floor %.2f)", steps, fraction, kept,
                            trial_acc, floor)
            else:
                restore(ctx.net, saved)
                logger.info("prune step %d (%.3f): %s would give %.2f%% < floor %.2f; restored", steps, fraction,
                            kept, trial_acc, floor)
                fraction /= 2
        trial, capped_from = _cap(keep, self.max_units, lambda: score(ctx, keep))
        if capped_from is not None:  # the cap binds: cut to it, recover towards the floor, keep it whatever it scores
            steps += 1
            accuracy = ctx.accuracy(trial)
            if accuracy < floor and ctx.recovery.epochs > 0:  # as a step of the search: recover only under the floor
                seconds += _recover(ctx, trial, floor, steps)
                accuracy = ctx.accuracy(trial)
            keep = trial
            logger.info("prune step %d (cap %s): kept %s of %s, validation %.2f%% (floor %.2f)", steps,
                        self.max_units, [int(k.sum()) for k in keep], capped_from, accuracy, floor)
        return PruneResult(keep, accuracy, steps, seconds, capped_from)


# How the iterative schedule shares a step's cut among the layers (CLNPConfig.prune_rank).
RANKS = ("layer", "global")


def _recover(ctx: PruneContext, trial: list[torch.Tensor], target: float, step: int) -> list[float]:
    """Retrain the task's remaining units (`trial`) beside the earlier ones on a compact copy, stopping once
    validation reaches `target`; the seconds of each epoch."""
    return train_compact(ctx.trainer, [e | k for e, k in zip(ctx.earlier, trial)], ctx.recovery, ctx.x_train,
                         ctx.y_train, own_units=False, teacher=ctx.teacher, val=(ctx.x_val, ctx.y_val), target=target,
                         desc=f"recover step {step}")


def per_layer(units: int | list[int], layers: int) -> list[int]:
    """A unit floor or cap as one count per layer: an int applies to every layer, a list (a plan's shares,
    CLNPConfig.plan_tasks) gives each layer its own."""
    if isinstance(units, int):
        return [units] * layers
    if len(units) != layers:
        raise ValueError(f"{len(units)} unit counts for {layers} layers")
    return list(units)


def _cap(keep: list[torch.Tensor], max_units: int | list[int],
         scores: Callable[[], list[torch.Tensor]]) -> tuple[list[torch.Tensor], list[int] | None]:
    """`keep` cut to at most `max_units` units per layer (one count, or one per layer), the lowest-scored going
    first, and the counts before the cut; `keep` itself and None where no layer holds more (a count of 0: no cap
    there). Scores only where it cuts."""
    counts = [int(k.sum()) for k in keep]
    caps = per_layer(max_units, len(keep))
    if all(m <= 0 or c <= m for c, m in zip(counts, caps)):
        return keep, None
    ranked = scores()
    trial = [k.clone() for k in keep]
    for i, k in enumerate(keep):
        if 0 < caps[i] < counts[i]:
            trial[i][_lowest(ranked[i], k, counts[i] - caps[i])] = False
    return trial, counts


def _cut(keep: list[torch.Tensor], scores: list[torch.Tensor], fraction: float, least: list[int]) -> list[torch.Tensor]:
    """`keep` less the lowest-scored `fraction` of each layer's remaining units, leaving `least[i]` in layer i."""
    trial = [k.clone() for k in keep]
    for i, k in enumerate(keep):
        remaining = int(k.sum())
        cut = min(remaining - least[i], math.floor(fraction * remaining))
        if cut > 0:
            trial[i][_lowest(scores[i], k, cut)] = False
    return trial


def _cut_global(keep: list[torch.Tensor], scores: list[torch.Tensor], fraction: float,
                least: list[int]) -> list[torch.Tensor]:
    """`keep` less the lowest-scored `fraction` of all layers' remaining units ranked together, leaving `least[i]`
    in layer i. The scores are compared as they are: a Taylor score is the first-order change in the task's loss
    when the unit goes, the same quantity in every layer, so one ranking lets a task keep more units in the layer
    that needs them (EideticNet cuts the same share of every layer, as `_cut` does)."""
    trial = [k.clone() for k in keep]
    cand = [torch.nonzero(k).flatten() for k in keep]
    total = sum(len(c) for c in cand)
    budget = min(math.floor(fraction * total), sum(max(0, len(c) - l) for c, l in zip(cand, least)))
    if budget <= 0:
        return trial
    # each layer's units, lowest first, past its floor; merged by score (ties: layer, then index)
    pool = []
    for i, c in enumerate(cand):
        order = c[torch.argsort(scores[i][c], stable=True)][: max(0, len(c) - least[i])]
        pool += [(float(scores[i][u]), i, int(u)) for u in order]
    for _, i, u in sorted(pool)[:budget]:
        trial[i][u] = False
    return trial


SCHEDULES: dict[str, PruneSchedule] = {s.name: s for s in (OneShotBisection(), IterativeRecovery())}


def schedule_for(name: str, first_fraction: float, min_fraction: float, max_steps: int,
                 min_units: int | list[int] = 0, rank: str = "layer",
                 max_units: int | list[int] = 0) -> PruneSchedule:
    """The registered schedule `name`, with the iterative schedule's settings and the unit floor and cap applied."""
    s = SCHEDULES[name]
    if isinstance(s, IterativeRecovery):
        return replace(s, first_fraction=first_fraction, min_fraction=min_fraction, max_steps=max_steps,
                       min_units=min_units, max_units=max_units, rank=rank)
    return replace(s, min_units=min_units, max_units=max_units)


def restore(net: MaskedNetwork, tensors: dict[str, torch.Tensor]) -> None:
    """Copy saved `state_tensors()` back into the network."""
    with torch.no_grad():
        current = net.state_tensors()
        for k, v in tensors.items():
            current[k].copy_(v)
