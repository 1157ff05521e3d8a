"""Continual Learning via Neural Pruning: learn one task into the FREE units of a shared network.

Ownership: `owners[i]` is an int64 tensor (units_i,) holding, per unit of hidden layer i, the index of
the task that owns it or FREE (-1). Task t's mask is "owned by a task <= t" (serving.contract.visible_to).

Learning task t (see `learn_task`; steps 1-2 are `learn_dense`, steps 3-4 `prune_and_finetune`, public so
that a probe can start from a cached dense network and still run the method itself):
1. FREE units get fresh incoming weights and biases; task t gets a fresh head.
2. Train with Adam on cross-entropy (with dropout on the hidden units, optionally + alpha * L1 of the FREE
   units' activations; with `config.distill_dense`, + distillation from the "full" teacher of step 3).
   Only FREE units' incoming weights/biases and head t receive gradients (a fresh optimizer, no weight
   decay: entries whose gradient is always zero stay bit-identical). Earlier units'
   rows are never touched, and their incoming connections from FREE units are zero and stay zero.
   With `config.isolate`, connections from earlier tasks' units into the FREE units and head t start at zero and
   stay there: the task is learned as its own subnetwork, reads no earlier features, and reuses nothing (steps 5
   and 6 are skipped; it reports 0 reused). Earlier tasks are unaffected either way.
3. Prune with graceful forgetting: a unit score (`config.score`, see trainer.pruning) and a schedule
   (`config.schedule`) decide which FREE units the task keeps while validation accuracy stays within
   `max_drop` points of the unpruned (dense) network. The iterative schedule retrains after each step,
   distilling from a teacher's logits: the dense network's, or with `config.teacher` "full", those of a network
   of the same shape trained on the task alone (fine-tuning, step 4, distils from the same teacher). The kept
   units become task t's; pruned units' incoming and outgoing connections are zeroed.
4. Fine-tune task t's units (connections from FREE units held at zero). `config.finetune_keep` says when the result
   is kept: "bound" (default) whenever its validation accuracy is within `max_drop` of the dense network (or over
   the pruned one's), "better" only when it is not under the pruned network's. Pruning stops at the last step that
   passed on validation, so the pruned network's validation accuracy is the best of several tries and reads high;
   fine-tuning chooses nothing on validation. Otherwise the pruned network is kept, and the outcome says so.
5. Connection pruning (`config.prune_connections`; off in the default preset): task t's connections from earlier
   tasks' units are pruned by magnitude while validation accuracy stays within `reuse_max_drop` points of the
   fine-tuned network. It frees no unit. At `reuse_max_drop=0` it still removes every connection whose removal
   changes no validation answer, which costs test accuracy that validation cannot show (README.md, "Task sequences"),
   so it runs only where the "connections" reuse measure needs it.
Under a plan with a candidate pool K (`config.pool()`: `candidate_pool`, by default 2 under a plan), a task whose
share is more than 1/K of what is FREE (the last tasks of a plan; the very last one's share is all that is FREE)
learns steps 1-6 in a wider copy of the network instead (`learn_in_pool`): temporary FREE units beyond each
layer's width make the candidates up to K x its share, pruning keeps its share from all of them, and the units
kept beyond the width take the FREE units it left (trainer.compact.widen and move_into). The published network
keeps its shape.
6. The reuse measure (`config.reuse_measure`), how many earlier units task t draws on per layer:
   - "connections": the earlier units that keep a connection into task t after step 5;
   - "signal": read-only, the fewest earlier units that carry all but `reuse_signal_tail` of the signal
     into task t's units (see `reuse_by_signal`). It changes no weight, so it costs no accuracy, and it
     still means something when step 5 does not run.
"""

from __future__ import annotations

import copy
import logging
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields, replace

import torch

from serving.contract import FREE, plan_share, visible_to
from trainer.compact import move_into, widen
from trainer.network import MaskedNetwork
from trainer.pruning import RANKS, SCHEDULES, SCORES, PruneContext, restore, schedule_for
from trainer.training import LR_SCHEDULES, PRECISIONS, EpochPlan, TaskTrainer, accuracy, mean_activations, train_compact

logger = logging.getLogger(__name__)


# How "reused" is counted (CLNPConfig.reuse_measure); see the module docstring, step 6.
REUSE_MEASURES = ("connections", "signal")
# When the fine-tuned network replaces the pruned one (CLNPConfig.finetune_keep); see the module docstring, step 4.
FINETUNE_KEEP = ("bound", "better")
# Distillation's teacher (CLNPConfig.teacher); see the module docstring, step 3, and `full_teacher`.
TEACHERS = ("dense", "full")
# How a new task's connections from earlier units start (CLNPConfig.reuse_init); see learn_dense.
REUSE_INITS = ("random", "zero")


class CapacityExhaustedError(Exception):
    """A hidden layer has no FREE unit left, so no further task can be learned."""


class ConfigError(ValueError):
    """A CLNPConfig value outside what is allowed; the message says what is."""


@dataclass(frozen=True)
class CLNPConfig:
    """How one task is learned and pruned. Defaults are the "default" preset (see PRESETS)."""

    epochs: int = 30  # passes over the training data while learning the task (dense phase)
    learning_rate: float = 0.001  # Adam's step size in the dense phase
    lr_schedule: str = "cosine"  # dense phase: "cosine" (to 0), "step" (x lr_decay for the last quarter), "constant"
    lr_decay: float = 0.1  # the "step" schedule's factor
    batch_size: int = 256  # samples per step (the paper's setup)
    dropout: float = 0.2  # probability of dropping a dense hidden unit's activation in each training step (not conv)
    alpha: float = 0.0  # L1 penalty on FREE units' activations: alpha * mean over a layer's units (width-independent)
    score: str = "taylor"  # unit score for pruning: "taylor", "activity" or "magnitude"
    schedule: str = "iterative"  # pruning schedule: "iterative" (prune, recover, repeat) or "one-shot" (bisection)
    max_drop: float = 0.5  # graceful forgetting: validation accuracy points pruning may cost the dense network
    prune_fraction: float = 0.5  # iterative: share of each layer's remaining units the first step removes
    min_prune_fraction: float = 0.05  # iterative: failed steps halve the share; stop below this
    max_prune_steps: int = 24  # iterative: stop after this many steps
    min_units: int = 0  # pruning keeps at least this many units per layer (of those free); 0: only max_drop decides
    max_units: int = 0  # pruning keeps at most this many units per layer, whatever max_drop allows; 0: no cap
    plan_tasks: int = 0  # the network is planned for this many tasks in all: each keeps an equal share of the FREE
    # units, FREE // (plan_tasks - tasks learned) per layer, whatever max_drop allows (`planned_units`); 0: off
    candidate_pool: float | None = None  # under a plan: a task chooses its share from at least this many times as
    # many candidate units per layer; where FREE holds fewer (the last tasks), it trains in temporary units beyond the
    # layer's width, and the units it keeps there move into FREE ones (`learn_in_pool`); 0: off, FREE alone;
    # None: DEFAULT_CANDIDATE_POOL under a plan, off without one (`pool`)
    prune_rank: str = "layer"  # iterative: a step cuts its share of each layer ("layer") or of all layers ranked
    # together by score ("global"); RANKS
    recovery_epochs: float = 2.0  # iterative: at most this many epochs of retraining after each step
    recovery_lr: float = 0.0003  # iterative: Adam's step size while retraining after a step
    recovery_lr_schedule: str = "constant"  # iterative: the retraining's schedule over recovery_epochs (as lr_schedule;
    # "cosine" ends it at 0, as the dense phase ends)
    recovery_early_stop: bool = True  # iterative: stop retraining once validation accuracy is back (checked 4x/epoch)
    distill: float = 0.5  # weight of distillation from the teacher while retraining and fine-tuning (0: off)
    distill_temperature: float = 2.0  # softening of both networks' logits in the distillation term
    teacher: str = "dense"  # distillation's teacher: "dense" (the task's unpruned network in the shared one) or
    # "full" (a network of the same shape trained on the task alone, every unit, the dense phase's schedule); TEACHERS
    distill_dense: bool = False  # the dense phase distils from the "full" teacher too (weight `distill`); needs it
    finetune_epochs: int = 60  # epochs of fine-tuning the kept units after pruning (0: none); cheap on the compact copy
    finetune_lr: float = 0.001  # Adam's step size while fine-tuning
    finetune_lr_schedule: str = "cosine"  # learning-rate schedule of the fine-tuning epochs (as lr_schedule)
    finetune_average: float = 0.0  # fine-tuning keeps an exponential moving average of the weights it moves, with
    # this decay per step, and ends on it (0: off, the last step's weights)
    finetune_keep: str = "bound"  # keep the fine-tuned network: "bound" (within max_drop of dense, or over the
    # pruned one) or "better" (only when its validation accuracy is not under the pruned network's); FINETUNE_KEEP
    prune_connections: bool = False  # step 5: prune task connections from earlier units (the "connections" measure)
    reuse_max_drop: float = 0.0  # accuracy points that connection pruning may cost, from the fine-tuned accuracy
    reuse_measure: str = "signal"  # what "reused" counts: "connections" or "signal" (REUSE_MEASURES)
    reuse_signal_tail: float = 0.05  # "signal": share of the task's incoming signal the uncounted earlier units carry
    isolate: bool = False  # the task reads no earlier task's units: its own subnetwork, no feature reuse (see step 2)
    reuse_init: str = "random"  # the new units' (and head's) connections from earlier units start "random" (drawn as
    # every weight is) or at "zero" (the task starts as if isolated and grows reuse where its gradients lead); REUSE_INITS
    activity_samples: int = 10000  # training samples a unit score looks at
    precision: str = "fp32"  # training steps' arithmetic: "fp32" or "bf16" (trainer.training.PRECISIONS)
    seed: int = 0  # seeds initialisation, data order and dropout

    def __post_init__(self) -> None:
        if self.score not in SCORES:
            raise ConfigError(f"unknown unit score {self.score!r}; choose one of {', '.join(SCORES)}")
        if self.schedule not in SCHEDULES:
            raise ConfigError(f"unknown pruning schedule {self.schedule!r}; choose one of {', '.join(SCHEDULES)}")
        for value in (self.lr_schedule, self.recovery_lr_schedule, self.finetune_lr_schedule):
            if value not in LR_SCHEDULES:
                raise ConfigError(f"unknown learning-rate schedule {value!r}; choose one of {', '.join(LR_SCHEDULES)}")
        if self.precision not in PRECISIONS:
            raise ConfigError(f"unknown precision {self.precision!r}; choose one of {', '.join(PRECISIONS)}")
        if self.reuse_init not in REUSE_INITS:
            raise ConfigError(f"unknown reuse_init {self.reuse_init!r}; choose one of {', '.join(REUSE_INITS)}")
        if self.prune_rank not in RANKS:
            raise ConfigError(f"unknown prune_rank {self.prune_rank!r}; choose one of {', '.join(RANKS)}")
        if self.prune_rank != "layer" and self.schedule != "iterative":
            raise ConfigError(f"prune_rank {self.prune_rank!r} ranks the iterative schedule's steps; the "
                              f"{self.schedule!r} schedule has none (add --schedule iterative)")
        if self.teacher not in TEACHERS:
            raise ConfigError(f"unknown teacher {self.teacher!r}; choose one of {', '.join(TEACHERS)}")
        if self.teacher != "dense" and self.distill == 0:
            raise ConfigError(f"teacher {self.teacher!r} needs distillation (distill > 0); without it no teacher is used")
        if self.distill_dense and (self.teacher != "full" or self.distill == 0):
            raise ConfigError("distill_dense needs teacher 'full' and distill > 0: the dense network cannot teach "
                              "itself; add --teacher full")
        if self.finetune_keep not in FINETUNE_KEEP:
            raise ConfigError(f"unknown finetune_keep {self.finetune_keep!r}; choose one of {', '.join(FINETUNE_KEEP)}")
        if self.reuse_measure not in REUSE_MEASURES:
            raise ConfigError(f"unknown reuse measure {self.reuse_measure!r}; choose one of {', '.join(REUSE_MEASURES)}")
        if not 0 <= self.reuse_signal_tail < 1:
            raise ConfigError(f"reuse_signal_tail {self.reuse_signal_tail} must be in [0, 1)")
        if self.max_drop < 0 or self.reuse_max_drop < 0:
            raise ConfigError(f"max_drop {self.max_drop} and reuse_max_drop {self.reuse_max_drop} must be >= 0 "
                              "(accuracy points the task may lose)")
        if not 0 <= self.dropout < 1:
            raise ConfigError(f"dropout {self.dropout} must be in [0, 1)")
        if not 0 <= self.finetune_average < 1:
            raise ConfigError(f"finetune_average {self.finetune_average} must be in [0, 1) (an average's decay per step; "
                              "0: off)")
        if not 0 <= self.distill <= 1:
            raise ConfigError(f"distill {self.distill} must be in [0, 1]")
        if self.min_units < 0:
            raise ConfigError(f"min_units {self.min_units} must be >= 0 (units per layer pruning must leave)")
        if self.max_units < 0:
            raise ConfigError(f"max_units {self.max_units} must be >= 0 (most units per layer a task may keep; 0: no cap)")
        if self.max_units and self.min_units > self.max_units:
            raise ConfigError(f"min_units {self.min_units} is above max_units {self.max_units}: a task cannot keep at "
                              "least the one and at most the other; lower --min-units or raise --max-units")
        if self.plan_tasks < 0:
            raise ConfigError(f"plan_tasks {self.plan_tasks} must be >= 0 (the tasks the network is planned for; 0: off)")
        if self.plan_tasks and (self.min_units or self.max_units):
            raise ConfigError("plan_tasks sets how many units each task keeps; it cannot go with min_units or "
                              "max_units (drop --min-units and --max-units, or --plan-tasks)")
        if self.candidate_pool and self.candidate_pool <= 1:  # None (the default) and 0 pass
            raise ConfigError(f"candidate_pool {self.candidate_pool} must be 0 (off) or above 1 (candidates per unit "
                              "a task keeps)")
        if not 0 < self.prune_fraction < 1 or not 0 < self.min_prune_fraction <= self.prune_fraction:
            raise ConfigError("prune fractions must satisfy 0 < min_prune_fraction <= prune_fraction < 1")

    def pool(self) -> float:
        """The candidate pool a task learns with: `candidate_pool`, or where that is None, DEFAULT_CANDIDATE_POOL under
        a plan and 0 (off) without one."""
        if self.candidate_pool is not None:
            return self.candidate_pool
        return DEFAULT_CANDIDATE_POOL if self.plan_tasks else 0.0

    def dense_plan(self) -> EpochPlan:
        return EpochPlan(self.epochs, self.learning_rate, self.lr_schedule, self.lr_decay, self.dropout, self.alpha,
                         distill=self.distill if self.distill_dense else 0.0, temperature=self.distill_temperature,
                         precision=self.precision)

    def recovery_plan(self) -> EpochPlan:
        return EpochPlan(self.recovery_epochs, self.recovery_lr, self.recovery_lr_schedule, self.lr_decay,
                         dropout=self.dropout, distill=self.distill, temperature=self.distill_temperature,
                         check_every=0.25 if self.recovery_early_stop else 0.0, precision=self.precision)

    def finetune_plan(self) -> EpochPlan:
        return EpochPlan(self.finetune_epochs, self.finetune_lr, self.finetune_lr_schedule, self.lr_decay, self.dropout,
                         distill=self.distill, temperature=self.distill_temperature, precision=self.precision,
                         average=self.finetune_average)


# A plan's last task learns in exactly the units left, with nothing to prune from; choosing them from twice as many
# candidates raised its validation accuracy by 0.23-0.37 points on three seeds of permuted MNIST (README.md, "A
# candidate pool for the last task"), so a plan brings a pool of 2 unless candidate_pool says otherwise.
DEFAULT_CANDIDATE_POOL = 2.0

# Named starting points; any option given next to a preset overrides it.
PRESETS: dict[str, CLNPConfig] = {
    # Dropout, 30 cosine epochs, no L1 penalty; Taylor-scored iterative pruning with recovery distilled from the
    # dense network, 60 distilled fine-tuning epochs; no connection pruning, and the read-only signal measure of
    # reuse. Permuted MNIST, 10 tasks: README.md, "Task sequences".
    "default": CLNPConfig(),
    # The default before it: 10 dense and 20 fine-tuning epochs, reuse measured by pruning connections within
    # 0.1 points. About 0.6x the default's time per task; permuted MNIST, 10 tasks, 3 seeds: 98.26.
    "balanced": CLNPConfig(epochs=10, finetune_epochs=20, prune_connections=True, reuse_max_drop=0.1,
                           reuse_measure="connections", finetune_keep="better"),
    # The balanced preset on a third of its budget: 3 dense epochs, one-epoch recoveries, 5 fine-tuning epochs.
    "fast": CLNPConfig(epochs=3, learning_rate=0.002, recovery_epochs=1.0, finetune_epochs=5, prune_connections=True,
                       reuse_max_drop=0.1, reuse_measure="connections", finetune_keep="better"),
    # The method before: L1 activity penalty, mean-activity scores, one-shot bisection, 4 step-decay epochs.
    "reference": CLNPConfig(epochs=4, learning_rate=0.002, lr_schedule="step", dropout=0.0, alpha=1.0,
                            score="activity", schedule="one-shot", max_drop=1.0, distill=0.0, finetune_epochs=2,
                            finetune_lr=0.001, finetune_lr_schedule="step", prune_connections=True,
                            reuse_max_drop=0.1, reuse_measure="connections", finetune_keep="better"),
}

# Settings added after runs were recorded, or whose default changed since, with the value that reproduces what the
# code did before (a record without the key ran that way). Fields not listed here kept their default throughout.
SETTINGS_BEFORE_THEY_EXISTED: dict[str, object] = {"reuse_measure": "connections", "precision": "fp32",
                                                   "prune_connections": True, "finetune_keep": "better",
                                                   "candidate_pool": 0.0}


def recorded_settings(config: CLNPConfig) -> dict:
    """`config` as a run's record keeps it: every field, with the defaults that follow other settings resolved
    (candidate_pool: `config.pool()`), so that two runs that learn alike record alike."""
    return asdict(config) | {"candidate_pool": config.pool()}


def preset(name: str, **overrides) -> CLNPConfig:
    """The named preset with `overrides` applied (None values ignored); raises ConfigError for an unknown name."""
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    known = {f.name for f in fields(CLNPConfig)}
    bad = set(overrides) - known
    if bad:
        raise ConfigError(f"unknown option(s) {', '.join(sorted(bad))}")
    config = replace(PRESETS[name], **{k: v for k, v in overrides.items() if v is not None})
    if (overrides.get("reuse_max_drop") or 0) > 0 and not config.prune_connections:
        raise ConfigError(f"reuse_max_drop {overrides['reuse_max_drop']} bounds connection pruning, which is off "
                          "here; turn it on as well (--connection-pruning, or prune_connections=true)")
    return config


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
    prune_steps: int = 0  # pruning steps the schedule tried
    phase_seconds: dict[str, float] = field(default_factory=dict)  # "train", "prune", "fine-tune", "reuse" -> wall s
    phase_validation: dict[str, float] = field(default_factory=dict)  # the same phases -> validation % at their end
    # validation % of the teacher trained on the task alone (config.teacher == "full"); None for the dense teacher
    teacher_validation: float | None = None
    # validation % the fine-tuned network ended at when config.finetune_keep discarded it (the pruned network was
    # kept); None when fine-tuning was kept or did not run
    finetune_discarded: float | None = None
    # layer -> units pruning within max_drop would have kept, where config.max_units cut the layer to its cap;
    # empty when the cap did not bind
    capped: dict[str, int] = field(default_factory=dict)
    # layer -> candidate units the task chose from in a candidate pool (config.candidate_pool; FREE units and
    # temporary ones); empty when it chose from the FREE units alone
    pool: dict[str, int] = field(default_factory=dict)


def new_owners(net: MaskedNetwork) -> list[torch.Tensor]:
    """Ownership for a fresh network: every unit FREE."""
    return [torch.full((l.units,), FREE, dtype=torch.int64) for l in net.spec.layers]


def task_masks(owners: list[torch.Tensor], task: int) -> list[torch.Tensor]:
    """Task `task`'s view: 1.0 for units owned by a task <= `task`, else 0.0."""
    return [visible_to(o, task).float() for o in owners]


def check_capacity(net: MaskedNetwork, owners: list[torch.Tensor]) -> None:
    """Raise CapacityExhaustedError if any hidden layer has no FREE unit."""
    full = [name for name, o in zip(net.spec.layer_names, owners) if not bool((o == FREE).any())]
    if full:
        raise CapacityExhaustedError(
            f"no free unit left in {', '.join(full)} (every unit is owned by an earlier task); "
            "the network cannot learn another task"
        )


def planned_units(owners: list[torch.Tensor], task: int, plan_tasks: int) -> list[int] | None:
    """Units per hidden layer task `task` keeps under a plan of `plan_tasks` tasks (CLNPConfig.plan_tasks): an
    equal share of what is FREE now, FREE // (plan_tasks - task), at least one unit; None without a plan. Tasks
    0..task-1 are learned, so a plan of N tasks spreads the network evenly over N tasks and the last one takes
    what is left. Raises ConfigError when the plan has no share left (`task` >= `plan_tasks`)."""
    if not plan_tasks:
        return None
    if task >= plan_tasks:
        raise ConfigError(f"plan_tasks {plan_tasks}: the network holds {task} task(s) already, so the plan has no "
                          "share left for this one; give --plan-tasks the number of tasks you now expect in all, or "
                          "--plan-tasks 0 to go on without a plan")
    return [plan_share(int((o == FREE).sum()), plan_tasks, task) for o in owners]


def _in_units_view(w: torch.Tensor, in_units: int) -> torch.Tensor:
    """A weight tensor as (out, in_units, k): the k entries connecting each input unit to each output."""
    return w.reshape(w.shape[0], in_units, -1)


def _zero_block(view: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> None:
    """Zero the connections of an (out, in_units, k) view from the `cols` input units into the `rows` outputs."""
    view[rows.nonzero().flatten().reshape(-1, 1), cols.nonzero().flatten().reshape(1, -1)] = 0.0


@dataclass
class DenseTask:
    """Task `task` learned into the FREE units, before pruning: what `learn_dense` (learn_task's steps 1 and 2)
    hands to `prune_and_finetune` (steps 3 and 4). A probe that caches a dense network builds one from its cache."""

    task: int
    owners: list[torch.Tensor]  # ownership before the task (on the data's device): its FREE units are the candidates
    trainer: TaskTrainer  # the task's trainer; its generator carries on into pruning and fine-tuning
    masks: list[torch.Tensor]  # the units the dense network sees (every unit; isolated, the FREE ones)
    validation: float  # the dense network's validation accuracy, percent
    teacher: torch.Tensor | None  # distillation's teacher logits on the training inputs; None without distillation
    teacher_validation: float | None = None  # config.teacher == "full": that teacher's validation accuracy
    epoch_seconds: list[float] = field(default_factory=list)
    phase_seconds: dict[str, float] = field(default_factory=dict)  # "teacher", "train" -> wall s
    keep_units: list[int] | None = None  # units per layer pruning keeps, set by the caller (learn_dense)


@dataclass
class PrunedTask:
    """What `prune_and_finetune` kept: the task's units and how it scored on validation on the way."""

    owners: list[torch.Tensor]  # ownership with the task's kept units (on the data's device)
    units_pruned: dict[str, int]  # layer -> FREE units the task gave back
    prune_steps: int
    pruned_validation: float  # after pruning, percent
    validation: float  # of the network kept: fine-tuned, or pruned where fine-tuning was discarded
    finetune_discarded: float | None  # validation % of a discarded fine-tuning; None when kept or not run
    capped: dict[str, int] = field(default_factory=dict)  # as TaskOutcome.capped
    epoch_seconds: list[float] = field(default_factory=list)
    phase_seconds: dict[str, float] = field(default_factory=dict)  # "prune", "fine-tune" -> wall s


def learn_task(net: MaskedNetwork, owners: list[torch.Tensor], task: int, data, config: CLNPConfig,
               show_progress: bool = False,
               on_phase: Callable[[str, MaskedNetwork, list[torch.Tensor]], None] | None = None,
               ) -> tuple[list[torch.Tensor], TaskOutcome]:
    """Learn task `task` (its head already added to `net`) into the FREE units; returns new owners.

    `data` has x_train, y_train, x_val, y_val as tensors (raw features, int64 labels). `net` is changed
    in place; earlier tasks' units, heads and preprocessing are never written.
    on_phase(name, network, masks), if given, is called at the end of each phase ("train", "prune", "fine-tune",
    "reuse") with the network being trained (`net`, or its wide copy in a candidate pool) and the task's masks in
    it, for reports (a benchmark's held-out accuracy per phase); nothing it does feeds back into learning.
    Raises CapacityExhaustedError if a layer has no FREE unit (before anything changes).
    """
    check_capacity(net, owners)
    extra = pool_extra(owners, task, config)
    if any(extra):
        return learn_in_pool(net, owners, task, data, config, extra, show_progress, on_phase)
    return _learn(net, owners, task, data, config, show_progress, on_phase)


def pool_extra(owners: list[torch.Tensor], task: int, config: CLNPConfig) -> list[int]:
    """Temporary units per hidden layer task `task` trains in beyond the layer's width (`config.pool()`): enough that
    its candidates are the pool x its plan share; zeros where FREE holds that many, and without a plan. Raises
    ConfigError for a candidate_pool given without a plan."""
    if config.candidate_pool and not config.plan_tasks:
        raise ConfigError(f"candidate_pool {config.candidate_pool} sizes a task's candidates from its plan share, "
                          "and there is no plan: add --plan-tasks, or leave the candidate pool out")
    share = planned_units(owners, task, config.plan_tasks)
    if share is None:
        return [0] * len(owners)
    return [max(0, math.ceil(config.pool() * s) - int((o == FREE).sum())) for s, o in zip(share, owners)]


def learn_in_pool(net: MaskedNetwork, owners: list[torch.Tensor], task: int, data, config: CLNPConfig,
                  extra: list[int], show_progress: bool = False,
                  on_phase: Callable[[str, MaskedNetwork, list[torch.Tensor]], None] | None = None,
                  ) -> tuple[list[torch.Tensor], TaskOutcome]:
    """learn_task in a wider copy of `net` (`extra[i]` temporary FREE units beyond layer i), keeping the plan's
    share as computed on `net`; the kept units then move into `net`'s FREE units (trainer.compact.move_into).
    Earlier tasks' units and heads in `net` are never written; in the copy, the new units' connections start at
    zero into earlier units and heads and stay there (they are FREE), so earlier tasks compute there what they
    compute in `net`. The task's head reads the new units through fresh weights drawn as add_head draws them."""
    share = planned_units(owners, task, config.plan_tasks)
    wide, wide_owners = widen(net, owners, extra)
    with torch.no_grad():
        head = net.head_weights[task]
        bound = 1.0 / math.sqrt(net.feature_dim)  # the draw add_head made for the head's other columns
        fresh = torch.empty(wide.head_weights[task].shape).uniform_(
            -bound, bound, generator=torch.Generator().manual_seed(config.seed + 3))
        view = wide.head_weights[task].view(head.shape[0], wide.spec.layers[-1].units, -1)
        view[:, net.spec.layers[-1].units:] = fresh.view_as(view)[:, net.spec.layers[-1].units:].to(head.device)
    # the last phase is reported once the task is in `net`: what it then answers is what is published
    phases = (lambda name, network, masks: name != "reuse" and on_phase(name, network, masks)) if on_phase else None
    wide_new, outcome = _learn(wide, wide_owners, task, data, config, show_progress, phases, keep=share)
    new = move_into(wide, wide_new, net, owners, task)
    zero_free_connections(net, new, task)
    names = net.spec.layer_names
    masks = task_masks(new, task)
    outcome.units_pruned = {n: int((o == FREE).sum()) - k for n, o, k in zip(names, owners, share)}
    outcome.validation_accuracy = outcome.phase_validation["reuse"] = accuracy(net, data.x_val, data.y_val, task,
                                                                              masks)
    outcome.pool = {n: int((o == FREE).sum()) + e for n, o, e in zip(names, owners, extra)}
    if on_phase:
        on_phase("reuse", net, masks)
    return [o.cpu() for o in new], outcome


def _learn(net: MaskedNetwork, owners: list[torch.Tensor], task: int, data, config: CLNPConfig,
           show_progress: bool = False,
           on_phase: Callable[[str, MaskedNetwork, list[torch.Tensor]], None] | None = None,
           keep: list[int] | None = None) -> tuple[list[torch.Tensor], TaskOutcome]:
    """learn_task's steps on `net` as it is; `keep` (units per layer) replaces the plan's share."""
    t0 = time.perf_counter()
    names = net.spec.layer_names
    report = (lambda name, masks: on_phase(name, net, masks)) if on_phase else (lambda name, masks: None)
    dense = learn_dense(net, owners, task, data, config, show_progress, keep_units=keep)  # steps 1 and 2
    report("train", dense.masks)
    pruned = prune_and_finetune(net, dense, data, config, on_phase)  # steps 3 and 4
    owners, pruned_acc = pruned.owners, pruned.validation
    phases = {**dense.phase_seconds, **pruned.phase_seconds}
    phase_acc = {"train": dense.validation, "prune": pruned.pruned_validation, "fine-tune": pruned_acc}
    t_phase = time.perf_counter()

    # ---- 5. prune task t's connections from earlier units (the reuse measure) -----------------
    fractions = {n: 0.0 for n in names}
    if config.prune_connections and task > 0 and not config.isolate:
        fractions = _prune_reuse_connections(net, owners, task, data, pruned_acc, config.reuse_max_drop)
        pruned_acc = accuracy(net, data.x_val, data.y_val, task, task_masks(owners, task))

    phases["reuse"] = time.perf_counter() - t_phase
    phase_acc["reuse"] = pruned_acc
    report("reuse", task_masks(owners, task))
    if config.isolate:
        reused = {n: 0 for n in names}
    elif config.reuse_measure == "signal":
        reused = reuse_by_signal(net, owners, task, data.x_train[: config.activity_samples], config.reuse_signal_tail)
    else:
        reused = reuse_counts(net, owners, task)  # where the network is (the owners follow it there)
    owners = [o.cpu() for o in owners]
    outcome = TaskOutcome(
        index=task,
        dense_validation_accuracy=dense.validation,
        validation_accuracy=pruned_acc,
        units_kept={n: int((o == task).sum()) for n, o in zip(names, owners)},
        units_pruned=pruned.units_pruned,
        reused=reused,
        connections_pruned=fractions,
        epoch_seconds=dense.epoch_seconds + pruned.epoch_seconds,
        seconds=time.perf_counter() - t0,
        prune_steps=pruned.prune_steps,
        phase_seconds=phases,
        phase_validation=phase_acc,
        finetune_discarded=pruned.finetune_discarded,
        teacher_validation=dense.teacher_validation,
        capped=pruned.capped,
    )
    return owners, outcome


def learn_dense(net: MaskedNetwork, owners: list[torch.Tensor], task: int, data, config: CLNPConfig,
                show_progress: bool = False, keep_units: list[int] | None = None) -> DenseTask:
    """learn_task's steps 1 and 2: fresh FREE units, then the task learned in them (every unit visible; isolated,
    every FREE unit). `net` is changed in place (FREE units and head `task` only); `owners` is not.
    `keep_units`: the units per layer pruning keeps, where the caller sets them instead of the plan (a candidate
    pool's wide copy, whose FREE count is not the network's); None: the plan's share, or max_drop.
    Raises CapacityExhaustedError if a layer has no FREE unit (before anything changes)."""
    check_capacity(net, owners)
    planned_units(owners, task, config.plan_tasks)  # a plan with no share left fails here, before training
    t0 = time.perf_counter()
    torch.manual_seed(config.seed)
    device = data.x_train.device
    owners = [o.to(device).clone() for o in owners]
    tr = TaskTrainer(net, owners, task, config.seed, config.batch_size, show_progress, isolated=config.isolate)
    for i, o in enumerate(owners):
        net.reinit_units(i, (o == FREE).cpu(), generator=tr.generator)
    if config.isolate or config.reuse_init == "zero":  # isolated, they also stay zero (the trainer masks them)
        cut_earlier_connections(net, owners, task)
    phases = {}
    teacher, teacher_acc = None, None
    if config.teacher == "full":  # (CLNPConfig refuses it without distillation); its own generators, so the
        # dense phase below is the same whether it runs first or not
        teacher, teacher_acc = full_teacher(net, task, data, config, show_progress)
        phases["teacher"] = time.perf_counter() - t0

    t_phase = time.perf_counter()
    dense_masks = [torch.ones(len(o), device=device) if not config.isolate else (o == FREE).float() for o in owners]
    params, grad_masks = tr.free_unit_parameters()
    epoch_seconds = tr.run_epochs(data.x_train, data.y_train, config.dense_plan(), params, grad_masks, dense_masks,
                                  penalty_units=[(o == FREE).float() for o in owners],
                                  teacher=teacher if config.distill_dense else None, desc="train")
    phases["train"] = time.perf_counter() - t_phase
    dense_acc = accuracy(net, data.x_val, data.y_val, task, dense_masks)
    if teacher is None and config.distill > 0:
        teacher = tr.logits(data.x_train, dense_masks)
    return DenseTask(task, owners, tr, dense_masks, dense_acc, teacher, teacher_acc, epoch_seconds, phases,
                     keep_units)


def prune_and_finetune(net: MaskedNetwork, dense: DenseTask, data, config: CLNPConfig,
                       on_phase: Callable[[str, MaskedNetwork, list[torch.Tensor]], None] | None = None) -> PrunedTask:
    """learn_task's steps 3 and 4 on a task `learn_dense` learned: prune with graceful forgetting, give the kept
    units to the task, zero what the pruned units connected, and fine-tune (kept by `config.finetune_keep`).
    `net` is changed in place; `dense` is not, apart from its trainer's generator, so a probe can restore the
    network and the generator state and prune the same dense network again with other settings.
    on_phase is called as learn_task's ("prune", "fine-tune")."""
    task, tr, dense_acc, teacher = dense.task, dense.trainer, dense.validation, dense.teacher
    report = (lambda name, masks: on_phase(name, net, masks)) if on_phase else (lambda name, masks: None)
    names = net.spec.layer_names
    owners = [o.clone() for o in dense.owners]
    t_phase = time.perf_counter()

    # ---- 3. prune with graceful forgetting --------------------------------------------------------
    free = [o == FREE for o in owners]
    # what the task sees besides its candidates: earlier tasks' units, or isolated, none
    earlier = [(o != FREE) & (not config.isolate) for o in owners]
    ctx = PruneContext(
        net=net, trainer=tr, task=task, x_train=data.x_train, y_train=data.y_train,
        accuracy=lambda keep: accuracy(net, data.x_val, data.y_val, task, ctx.visible(keep)),
        candidates=free, earlier=earlier, score_samples=config.activity_samples, recovery=config.recovery_plan(),
        teacher=teacher, x_val=data.x_val, y_val=data.y_val,
    )
    plan = dense.keep_units or planned_units(owners, task, config.plan_tasks)  # a plan sets floor and cap alike
    schedule = schedule_for(config.schedule, config.prune_fraction, config.min_prune_fraction, config.max_prune_steps,
                            plan or config.min_units, config.prune_rank, plan or config.max_units)
    result = schedule(ctx, SCORES[config.score], dense_acc, config.max_drop)
    epoch_seconds = list(result.epoch_seconds)
    pruned_count = {n: int((f & ~k).sum()) for n, f, k in zip(names, free, result.keep)}
    for i in range(len(owners)):
        owners[i][free[i] & result.keep[i]] = task
    zero_free_connections(net, owners, task)
    pruned_acc = accuracy(net, data.x_val, data.y_val, task, task_masks(owners, task))
    phases = {"prune": time.perf_counter() - t_phase}
    report("prune", task_masks(owners, task))
    t_phase = time.perf_counter()
    logger.info("task %d: dense %.2f%%, pruned %.2f%% after %d step(s), kept %s", task, dense_acc, pruned_acc,
                result.steps, [int((o == task).sum()) for o in owners])

    # ---- 4. fine-tune the kept units ----------------------------------------------------------
    kept_acc, discarded = pruned_acc, None
    if config.finetune_epochs > 0:
        before = copy.deepcopy(net.state_tensors())
        tr.owners = owners  # the task's units are its own now
        seen = [o == task for o in owners] if config.isolate else [m.bool() for m in task_masks(owners, task)]
        epoch_seconds += train_compact(tr, seen, config.finetune_plan(),
                                       data.x_train, data.y_train, own_units=True, teacher=teacher, desc="fine-tune")
        tuned_acc = accuracy(net, data.x_val, data.y_val, task, task_masks(owners, task))
        within_bound = config.finetune_keep == "bound" and tuned_acc >= dense_acc - config.max_drop
        if tuned_acc < pruned_acc and not within_bound:
            restore(net, before)
            discarded = tuned_acc
            logger.info("task %d: fine-tuning ended at %.2f%% validation, under the pruned network's %.2f%%%s; "
                        "kept the pruned network", task, tuned_acc, pruned_acc,
                        f" and more than {config.max_drop} under dense" if config.finetune_keep == "bound" else "")
        else:
            kept_acc = tuned_acc
        tr.owners = dense.owners  # the trainer is the dense task's again (nothing in learn_task trains after this)
    phases["fine-tune"] = time.perf_counter() - t_phase
    report("fine-tune", task_masks(owners, task))
    capped = {} if result.capped_from is None else \
        {n: c for n, c, k in zip(names, result.capped_from, result.keep) if c > int(k.sum())}
    return PrunedTask(owners, pruned_count, result.steps, pruned_acc, kept_acc, discarded, capped, epoch_seconds,
                      phases)


def train_alone(spec, num_classes: int, scale: torch.Tensor, shift: torch.Tensor, x: torch.Tensor, y: torch.Tensor,
                config: CLNPConfig, seed: int, show_progress: bool = False,
                desc: str = "alone") -> tuple[MaskedNetwork, TaskTrainer]:
    """A fresh network of shape `spec` with one head (`num_classes`, input preprocessing `scale`/`shift`), every
    unit trained on (x, y) with the dense phase's schedule: the single-task reference of the sequence benchmark, and
    distillation's teacher with config.teacher == "full". `seed` seeds the initialisation (the head: seed + 1), the
    data order and dropout; torch's global generator is left as it was. Returns the network (on x's device) and
    the trainer that trained it (its `logits` reads the network batch by batch)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = MaskedNetwork(spec)
        net.add_head(num_classes, scale, shift, generator=torch.Generator().manual_seed(seed + 1))
    net.to_device(x.device)
    owners = [torch.full((layer.units,), FREE, dtype=torch.long, device=x.device) for layer in spec.layers]
    every = [torch.ones(layer.units, device=x.device) for layer in spec.layers]
    params = list(net.parameters())
    trainer = TaskTrainer(net, owners, 0, seed, config.batch_size, show_progress)
    trainer.run_epochs(x, y, config.dense_plan(), params, [None] * len(params), every, desc=desc)
    return net, trainer


def full_teacher(net: MaskedNetwork, task: int, data, config: CLNPConfig,
                 show_progress: bool = False) -> tuple[torch.Tensor, float]:
    """Distillation's teacher when config.teacher == "full": `train_alone` on task `task` (its preprocessing and
    number of classes), seeded apart from the shared network's training. Later tasks learn their dense network in
    fewer FREE units, and it scores less on validation the fewer there are; this teacher does not shrink.
    Returns its logits on the training inputs and its validation accuracy."""
    full, trainer = train_alone(net.spec, int(net.head_biases[task].shape[0]), net.pre_scales[task],
                                net.pre_shifts[task], data.x_train, data.y_train, config, config.seed + 2,
                                show_progress, desc="teacher")
    every = [torch.ones(layer.units, device=data.x_train.device) for layer in net.spec.layers]
    return trainer.logits(data.x_train, every), accuracy(full, data.x_val, data.y_val, 0, every)


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
def zero_free_connections(net: MaskedNetwork, owners: list[torch.Tensor], task: int) -> None:
    """Zero the incoming rows and biases of FREE units and every connection out of them."""
    for i, (o, (consumer, _)) in enumerate(zip(owners, _consumers(net, owners, task))):
        free = o == FREE
        net.weights[i][free] = 0.0
        net.biases[i][free] = 0.0
        # Rows of earlier tasks' units already hold zeros there and are never written.
        rows = ((owners[i + 1] == FREE) | (owners[i + 1] == task) if i + 1 < len(owners)
                else torch.ones(consumer.shape[0], dtype=torch.bool, device=o.device))
        _zero_block(_in_units_view(consumer, len(o)), rows, free)


@torch.no_grad()
def cut_earlier_connections(net: MaskedNetwork, owners: list[torch.Tensor], task: int) -> None:
    """Zero every connection from an earlier task's unit into a FREE unit or into head `task` (isolated learning).

    Only FREE units' rows and the new head are written, so earlier tasks stay bit-identical.
    """
    for i in range(1, len(owners)):
        rows, cols = owners[i] == FREE, owners[i - 1] != FREE
        _zero_block(_in_units_view(net.weights[i], len(owners[i - 1])), rows, cols)
    hw = _in_units_view(net.head_weights[task], len(owners[-1]))
    hw[:, owners[-1] != FREE] = 0.0


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


@torch.no_grad()
def reuse_by_signal(net: MaskedNetwork, owners: list[torch.Tensor], task: int, x: torch.Tensor,
                    tail: float = 0.05) -> dict[str, int]:
    """Per hidden layer: the fewest earlier units that carry all but `tail` of the signal into task t's units.

    A unit's signal into task t is its mean activation on `x` (raw inputs of the task; a conv filter's mean over
    positions) times the L1 norm of its connections into task t's units of the next layer (or into head t): the
    mean |contribution| it adds to them, since ReLU activations are >= 0. The earlier units left uncounted
    together carry at most `tail` of the signal from every unit the task sees (its own and earlier ones), so a
    task that leans on its own units counts few earlier ones. Reads the network; changes nothing.
    """
    means = mean_activations(net, x, task, task_masks(owners, task))
    out = {}
    for i, (w, rows) in enumerate(_consumers(net, owners, task)):
        out_l1 = _in_units_view(w, len(owners[i]))[rows].abs().sum(dim=(0, 2)).double()  # (in_units,)
        signal = means[i] * out_l1
        total = signal[visible_to(owners[i], task)].sum()
        earlier = signal[(owners[i] >= 0) & (owners[i] < task)]
        ranked = torch.sort(earlier, descending=True).values
        # after counting the k largest, the rest carry total_earlier - cumsum[k-1]; count until that is <= tail
        rest = ranked.sum() - torch.cat([ranked.new_zeros(1), torch.cumsum(ranked, 0)])  # rest[k]: all but top k
        k = int((rest > tail * total).sum())  # rest is non-increasing, so this is the first k that fits
        out[net.spec.layer_names[i]] = k
    return out


__all__ = [
    "CLNPConfig", "ConfigError", "PRESETS", "preset", "SETTINGS_BEFORE_THEY_EXISTED", "DEFAULT_CANDIDATE_POOL",
    "recorded_settings", "TaskOutcome", "CapacityExhaustedError", "FREE", "new_owners", "planned_units", "task_masks",
    "accuracy", "learn_task", "check_capacity", "reuse_counts", "reuse_by_signal", "REUSE_MEASURES", "FINETUNE_KEEP", "TEACHERS", "train_alone", "full_teacher",
]
