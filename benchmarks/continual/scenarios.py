"""Running task sequences: the headline and CNN scenarios, EWC's lambda selection, the max_drop sweep and the
training-cost measurement. `args` is the parsed command line (benchmarks.continual.cli.parse_args)."""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F

from benchmarks.continual.learners import CLNPLearner, FineTuneLearner, Learner, SingleTaskLearner, ones_masks
from benchmarks.continual.progress import log
from benchmarks.continual.record import (
    METHOD_FLAGS,
    CNNScenario,
    EWCSelection,
    Headline,
    MethodRun,
    MethodStats,
    OwnSweepRun,
    SeedRun,
    Stat,
    Summary,
    Sweep,
    SweepRow,
    TaskLearned,
    TrainingCost,
)
from benchmarks.tasks import load_task
from trainer.clnp import FREE, CLNPConfig, new_owners
from trainer.network import MaskedNetwork, NetworkSpec
from trainer.training import TaskTrainer

SPLIT_PAIRS = [(0, 1), (2, 3), (4, 5), (6, 7), (8, 9)]  # the digits of each split-MNIST task

Matrix = list[list[float | None]]


@dataclass
class SequenceOutcome:
    """Per learner: A[i][j] = accuracy on task i after task j (j >= i, else None), and evaluation seconds."""

    A: dict[str, Matrix]
    eval_seconds: dict[str, float]


def run_sequence(learners: dict[str, Learner], sources: list[str], loader, split: str, label: str,
                 on_task=None) -> SequenceOutcome:
    """Learn the tasks in order with every learner, evaluating every task learned so far after each."""
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
    return SequenceOutcome(A=A, eval_seconds=eval_seconds)


def summarize(A: Matrix, seconds: list[float]) -> Summary:
    """Average accuracy after the last task and backward transfer (tasks without an accuracy left out)."""
    N = len(A)
    last = [A[i][N - 1] for i in range(N)]
    known = [v for v in last if v is not None]
    bwt_terms = [A[i][N - 1] - A[i][i] for i in range(N - 1) if A[i][N - 1] is not None and A[i][i] is not None]
    return Summary(
        accuracy_matrix=A,
        average_accuracy=(sum(known) / len(known)) if known else None,
        tasks_counted=len(known),
        backward_transfer=(sum(bwt_terms) / len(bwt_terms)) if bwt_terms else None,
        train_seconds=sum(seconds),
        train_seconds_per_task=seconds,
    )


def mean_std(values: list[float | None]) -> Stat:
    v = [x for x in values if x is not None]
    if not v:
        return Stat(mean=None, std=None, n=0)
    return Stat(mean=statistics.fmean(v), std=statistics.stdev(v) if len(v) > 1 else None, n=len(v))


def method_stats(runs: list[MethodRun]) -> MethodStats:
    """One method's headline numbers over its runs (one per seed)."""
    return MethodStats(average_accuracy=mean_std([m.summary.average_accuracy for m in runs]),
                       backward_transfer=mean_std([m.summary.backward_transfer for m in runs]),
                       train_seconds=mean_std([m.summary.train_seconds for m in runs]))


# ============================================================================ scenarios


def continual_scenario(spec: NetworkSpec, sources: list[str], cfg: CLNPConfig, args, seed: int, label: str,
                       ewc_lambda: float | None, single: bool = True, on_task=None, clnp: bool = True,
                       finetune: bool = True) -> SeedRun:
    """Every chosen method on one seed's sequence of tasks."""
    cfg = replace(cfg, seed=seed)
    loader = _loader(spec, args, seed)
    learners: dict[str, Learner] = {}
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
    methods = {name: learner.method_run(summarize(seq.A[name], learner.seconds), seq.eval_seconds[name])
               for name, learner in learners.items()}
    return SeedRun(seed=seed, methods=methods, wall_seconds=time.perf_counter() - t0)


def headline_scenario(spec: NetworkSpec, sources: list[str], cfg: CLNPConfig, args, ewc_lambda: float | None,
                      on_first_task=None) -> Headline:
    """Permuted MNIST: the chosen methods on every seed."""
    runs = []
    for k, seed in enumerate(args.seed_list):
        log(f"headline: seed {seed} ({k + 1}/{len(args.seed_list)})")
        runs.append(continual_scenario(spec, sources, cfg, args, seed, f"permuted MNIST seed {seed}",
                                       ewc_lambda, single=not args.no_single_headline,
                                       on_task=on_first_task if k == 0 else None, clnp=args.run_clnp,
                                       finetune=args.run_finetune))
    return headline_block(sources, str(spec), args.seed_list, runs)


def headline_block(sources: list[str], network: str, seeds: list[int], runs: list[SeedRun]) -> Headline:
    """The headline section from per-seed runs."""
    # a merged run may hold some methods for more seeds than others: each is summarised over the seeds it ran
    names = [n for n in METHOD_FLAGS.values() if any(n in r.methods for r in runs)]
    summary = {name: method_stats([r.methods[name] for r in runs if name in r.methods]) for name in names}
    clnp = [r.methods["CLNP"].clnp.zero_forgetting_all_identical for r in runs if "CLNP" in r.methods]
    return Headline(scenario="permuted MNIST", sources=sources, network=network, seeds=seeds, seed_count=len(seeds),
                    runs=runs, summary=summary, zero_forgetting_all_identical=all(clnp) if clnp else None)


def cnn_scenario(cspec: NetworkSpec, cfg: CLNPConfig, args) -> CNNScenario:
    """Split MNIST (pairs of digits) with a convolutional network: CLNP, fine-tuning, single-task (and EWC)."""
    csources = [f"split-mnist:{a},{b}" for a, b in SPLIT_PAIRS[:args.cnn_tasks]]
    cruns = []
    for seed in args.seed_list:
        log(f"CNN scenario: seed {seed}, {cspec}, {len(csources)} split-MNIST tasks")
        cruns.append(continual_scenario(cspec, csources, cfg, args, seed, f"split MNIST (CNN) seed {seed}",
                                        args.cnn_ewc_lambda, single=not args.no_single))
    csummary = {name: method_stats([r.methods[name] for r in cruns]) for name in cruns[0].methods}
    return CNNScenario(scenario="split MNIST", sources=csources, network=str(cspec), seeds=args.seed_list,
                       runs=cruns, summary=csummary, ewc_lambda=args.cnn_ewc_lambda,
                       zero_forgetting_all_identical=all(r.methods["CLNP"].clnp.zero_forgetting_all_identical
                                                         for r in cruns))


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
        loss = F.cross_entropy(net(x, 0, ones_masks(net, device)), y)
        opt.zero_grad()
        loss.backward()
        opt.step()


def _loader(spec: NetworkSpec, args, seed: int):
    return lambda src: load_task(src, spec, args.data_dir, args.limit, seed, args.device)


def select_ewc_lambda(spec: NetworkSpec, sources: list[str], cfg: CLNPConfig, args, seed: int) -> EWCSelection:
    """The lambda of --ewc-lambdas with the best mean validation accuracy after the first tasks."""
    grid = [float(v) for v in args.ewc_lambdas.split(",") if v.strip()]
    K = min(args.ewc_select_tasks, len(sources))
    cfg = replace(cfg, seed=seed)
    if len(grid) == 1:
        return EWCSelection(grid=grid, tasks=K, scores=None, winner=grid[0], seconds=0.0,
                            note="a single value: no selection")
    learners = {f"{lam:g}": FineTuneLearner(spec, cfg, args.device, ewc_lambda=lam,
                                            fisher_samples=args.ewc_fisher_samples) for lam in grid}
    t0 = time.perf_counter()
    seq = run_sequence(learners, sources[:K], _loader(spec, args, seed), "val", "EWC lambda selection")
    scores = {name: statistics.fmean(seq.A[name][i][K - 1] for i in range(K)) for name in learners}
    winner = max(grid, key=lambda lam: (scores[f"{lam:g}"], -lam))
    log(f"EWC lambda selection: mean validation accuracy after {K} tasks "
        + ", ".join(f"lambda={k}: {v:.2f}" for k, v in scores.items()) + f" -> lambda={winner:g}")
    return EWCSelection(grid=grid, tasks=K, split="validation",
                        criterion=f"mean validation accuracy over the first {K} tasks after learning task {K}",
                        scores=scores, winner=winner, validation_accuracy_matrices=seq.A,
                        seconds=time.perf_counter() - t0,
                        per_task_seconds={name: l.seconds for name, l in learners.items()}, seed=seed)


def max_drop_sweep(spec: NetworkSpec, sources: list[str], cfg: CLNPConfig, args, seed: int,
                   headline: SeedRun | None) -> Sweep:
    """CLNP with each --sweep-max-drop value; the headline's own max_drop is read off its run when it can be."""
    drops = [float(v) for v in args.sweep_max_drop.split(",") if v.strip()]
    n = min(args.sweep_tasks, len(sources))
    epochs = args.sweep_epochs or cfg.epochs
    scfg = replace(cfg, seed=seed, epochs=epochs)
    rows: dict[float, SweepRow] = {}
    reusable = headline is not None and epochs == cfg.epochs
    learners: dict[str, tuple[float, CLNPLearner]] = {}
    for d in drops:
        if reusable and d == cfg.max_drop:
            rows[d] = headline_sweep_row(headline.methods["CLNP"], d, n)
        else:
            learners[f"max_drop={d:g}"] = (d, CLNPLearner(spec, replace(scfg, max_drop=d), args.device))
    if learners:
        seq = run_sequence({k: v[1] for k, v in learners.items()}, sources[:n], _loader(spec, args, seed), "test",
                           "max-drop sweep")
        for name, (d, learner) in learners.items():
            own = OwnSweepRun(zero_forgetting_all_identical=all(z.identical for z in learner.zero_forgetting),
                              capacity_exhausted_at_task=learner.exhausted_at)
            rows[d] = sweep_row(d, summarize(seq.A[name], learner.seconds), learner.tasks, own)
    return Sweep(tasks=n, epochs=epochs, seed=seed, layer_units=[l.units for l in spec.layers],
                 rows=[rows[d] for d in sorted(rows)])


def headline_sweep_row(clnp: MethodRun, max_drop: float, n: int) -> SweepRow:
    """The sweep's row for the default max_drop, from the headline CLNP run's first n tasks (same settings)."""
    A = [row[:n] for row in clnp.summary.accuracy_matrix[:n]]
    s = summarize(A, clnp.summary.train_seconds_per_task[:n])
    return sweep_row(max_drop, s, clnp.clnp.tasks[:n], None)


def sweep_row(max_drop: float, s: Summary, tasks: list[TaskLearned], own_run: OwnSweepRun | None) -> SweepRow:
    """A sweep row from a CLNP run's summary and tasks; own_run None: read off the headline run."""
    last = tasks[-1] if tasks else None
    return SweepRow(max_drop=max_drop, from_headline_run=own_run is None, average_accuracy=s.average_accuracy,
                    accuracy_matrix=s.accuracy_matrix,
                    free_after_last_task=last.free_after if last else None,
                    units_per_task_per_layer=dict(last.owned_after) if last else {},
                    validation_accuracy=[tk.validation_accuracy for tk in tasks],
                    train_seconds=s.train_seconds, tasks_learned=len(tasks), own_run=own_run)


def training_cost(spec: NetworkSpec, cfg: CLNPConfig, args, seed: int) -> TrainingCost:
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
    ones = ones_masks(net, args.device)
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
    return TrainingCost(
        network=str(spec), batch_size=cfg.batch_size, steps_per_block=steps, rounds=rounds,
        clnp_samples_per_second=c, plain_samples_per_second=p, clnp_median=cm, plain_median=pm,
        clnp_time_over_plain_time=pm / cm,
        what="CLNP: TaskTrainer.run_epochs over free_unit_parameters (all units FREE: grad masks on every "
             "hidden parameter, the L1 penalty on FREE activations when alpha > 0); plain: the same loop with "
             "no grad masks and no penalty; blocks interleaved, order alternating per round, one warm-up "
             "block each")
