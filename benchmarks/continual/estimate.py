"""The run's wall time predicted before it runs, from a few timed steps of its networks."""

from __future__ import annotations

import math
import time
from dataclasses import replace

import torch

from benchmarks.continual.learners import ones_masks
from benchmarks.continual.record import ABSENT, Estimate, NetworkTiming, TaskEstimate
from benchmarks.continual.report import duration_text
from trainer.clnp import CLNPConfig, accuracy, new_owners
from trainer.network import MaskedNetwork, NetworkSpec, parse_network_spec
from trainer.training import TaskTrainer

LOAD_SECONDS = 1.0  # loading one task's data


def time_network(spec: NetworkSpec, cfg: CLNPConfig, device: str, steps: int = 3) -> NetworkTiming:
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
    ones = ones_masks(net, device)
    tr.run_epochs(x[:b], y[:b], plan, params, grad_masks, ones)  # warm-up
    clnp_step = sum(tr.run_epochs(x, y, plan, params, grad_masks, ones)) / steps
    plain_step = sum(tr.run_epochs(x, y, replace(plan, alpha=0.0), plain, [None] * len(plain), ones)) / steps
    xe = torch.rand(2048, *spec.input_shape, device=device)
    t0 = time.perf_counter()
    accuracy(net, xe, torch.zeros(2048, dtype=torch.int64, device=device), 0, ones)
    return NetworkTiming(clnp_step=clnp_step, plain_step=plain_step,
                         eval_per_sample=(time.perf_counter() - t0) / 2048)


class _Costs:
    """Predicted seconds of each kind of work for one network and one kind of task."""

    def __init__(self, args, cfg: CLNPConfig, spec: NetworkSpec, kind: str, tm: NetworkTiming):
        full_train, full_val, n_test = (54000, 6000, 10000) if kind == "permuted" else (10800, 1200, 2000)
        if args.limit is None:
            n_train, n_val = full_train, full_val
        else:
            n_train, n_val = min(args.limit, full_train), min(full_val, max(args.limit // 5, 500))
        self.cfg, self.tm, self.n_train = cfg, tm, n_train
        self.units = [l.units for l in spec.layers]
        self.steps_per_epoch = math.ceil(n_train / cfg.batch_size)
        self.val_pass = n_val * tm.eval_per_sample
        plain = cfg.epochs * self.steps_per_epoch * tm.plain_step
        self.per_task = TaskEstimate(
            clnp_first=self.clnp(cfg.epochs, False), clnp_later=self.clnp(cfg.epochs, True), plain=plain,
            ewc=plain * 1.15 + min(args.ewc_fisher_samples, n_train) * 3 * tm.eval_per_sample,
            test_eval=n_test * tm.eval_per_sample, val_eval=self.val_pass)

    def clnp(self, epochs: int, later: bool) -> float:
        """One CLNP task: training and fine-tuning steps, the pruning searches, the activity pass."""
        evals = 4 + sum(math.ceil(math.log2(u + 1)) for u in self.units)
        if later:  # connection pruning: a bisection over task t's connections from earlier units, per layer
            fan = self.units[1:] + [10]
            evals += sum(math.ceil(math.log2(max(2, a * b // 2))) for a, b in zip(fan, self.units))
        return ((epochs + self.cfg.finetune_epochs) * self.steps_per_epoch * self.tm.clnp_step
                + evals * self.val_pass + min(self.n_train, self.cfg.activity_samples) * self.tm.eval_per_sample)

    def scenario(self, n: int, ewc: bool, single: bool, clnp: bool = True, finetune: bool = True) -> float:
        """A sequence of n tasks with the given methods, evaluations and data loading included."""
        p = self.per_task
        t = (p.clnp_first + (n - 1) * p.clnp_later if clnp else 0.0) + (n * p.plain if finetune else 0.0)
        methods = clnp + finetune + ewc
        t += n * p.ewc if ewc else 0.0
        t += n * p.plain if single else 0.0
        return t + (n * (n + 1) / 2 * methods + n * single) * p.test_eval + n * LOAD_SECONDS


def plan_estimate(args, cfg: CLNPConfig) -> Estimate:
    """The run's wall time predicted from step and evaluation timings of its networks (a few seconds to take).

    Counts training steps per method and task, the pruning searches of CLNP (one validation pass per
    bisection step) and the test evaluations of the accuracy matrices; data loading at ~1 s per task.
    """
    spec = parse_network_spec(args.network)
    tm = time_network(spec, cfg, args.device)
    p = _Costs(args, cfg, spec, "permuted", tm)
    N, S = args.tasks, len(args.seed_list)
    grid = [v for v in args.ewc_lambdas.split(",") if v.strip()]
    K = min(args.ewc_select_tasks, N)
    ewc_selection = 0.0 if args.no_ewc or len(grid) < 2 else \
        len(grid) * (K * p.per_task.ewc + K * (K + 1) / 2 * p.per_task.val_eval) + K * LOAD_SECONDS
    headline = S * p.scenario(N, not args.no_ewc, not args.no_single_headline, args.run_clnp,
                              args.run_finetune) if args.headline else 0.0
    sweep = 0.0
    if args.sweep_max_drop.strip():
        drops = [float(v) for v in args.sweep_max_drop.split(",") if v.strip()]
        n = min(args.sweep_tasks, N)
        own = len(drops) - (1 if cfg.max_drop in drops and not args.sweep_epochs and args.run_clnp else 0)
        e = args.sweep_epochs or cfg.epochs
        sweep = own * (n * p.clnp(e, True) + n * (n + 1) / 2 * p.per_task.test_eval) + n * LOAD_SECONDS
    cost = (args.cost_rounds + 1) * args.cost_steps * (tm.clnp_step + tm.plain_step) if args.cost_steps > 0 else 0.0
    cnn, cnn_timing = 0.0, ABSENT
    if args.cnn:
        cspec = parse_network_spec(args.cnn_network)
        cnn_timing = time_network(cspec, cfg, args.device)
        cp = _Costs(args, cfg, cspec, "split", cnn_timing)
        cnn = S * cp.scenario(args.cnn_tasks, args.cnn_ewc_lambda is not None, not args.no_single)
    sections = {"ewc_selection": ewc_selection, "headline": headline, "sweep": sweep, "training_cost": cost,
                "cnn": cnn}
    total = sum(sections.values())
    text = (f"predicted wall time {duration_text(total)} (" + ", ".join(
        f"{k.replace('_', ' ')} {duration_text(v)}" for k, v in sections.items()) + f") at {tm.clnp_step:.3f} s per "
        f"CLNP step, {tm.plain_step:.3f} s per plain step of {spec}, {torch.get_num_threads()} torch thread(s)")
    return Estimate(mlp_timing=tm, steps_per_epoch=p.steps_per_epoch, per_task=p.per_task,
                    ewc_selection=ewc_selection, headline=headline, sweep=sweep, training_cost=cost, cnn=cnn,
                    cnn_timing=cnn_timing, total_seconds=total, text=text)
