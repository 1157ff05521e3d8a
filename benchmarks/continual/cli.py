"""The command line: parse_args and main (`python -m benchmarks.continual`, see the package's docstring)."""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

import benchmarks.continual as package
from benchmarks.continual.estimate import plan_estimate
from benchmarks.continual.merge import merge_main, write_outputs
from benchmarks.continual.progress import log, restart_clock
from benchmarks.continual.record import METHOD_FLAGS, Estimate, Machine, Result, Settings
from benchmarks.continual.report import PUBLISHED, fmt_stat, make_plots
from benchmarks.continual.scenarios import cnn_scenario, headline_scenario, max_drop_sweep, select_ewc_lambda, \
    training_cost
from trainer.clnp import PRESETS, CLNPConfig, preset
from trainer.network import parse_network_spec

REPO_ROOT = Path(__file__).resolve().parents[2]
RESULTS = REPO_ROOT / "benchmarks" / "results"

FULL = dict(preset="default", tasks=10, network="mlp:784-2000-2000", epochs=None, limit=None, batch_size=None, ewc_lambdas="100,1000,10000", ewc_select_tasks=3,
            ewc_fisher_samples=1000, sweep_max_drop="0,0.1,0.2,0.5,1", sweep_tasks=3, sweep_epochs=None,
            cnn_network="cnn:1x28x28-c32-c64-d256", cnn_tasks=5, cost_steps=100, cost_rounds=3)
QUICK = dict(preset="fast", tasks=3, network="mlp:784-64-64", epochs=1, limit=1000, batch_size=64, ewc_lambdas="10,1000",
             ewc_select_tasks=2, ewc_fisher_samples=200, sweep_max_drop=f"0,{CLNPConfig().max_drop:g}", sweep_tasks=2, sweep_epochs=None,
             cnn_network="cnn:1x28x28-c8-c16-d32", cnn_tasks=3, cost_steps=10, cost_rounds=2)


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m benchmarks.continual", description=package.__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--data-dir", default=None, help="folder holding mnist/ (e.g. ../shared/data); else $CLNP_DATA_DIR")
    p.add_argument("--out", default=None,
                   help="output folder; default: benchmarks/results for a full run of every method (and for "
                        "--merge), a new temporary folder for --quick and partial runs, so committed results stay")
    p.add_argument("--preset", choices=sorted(PRESETS),
                   help=f"CLNP method preset (trainer.clnp.PRESETS; default {FULL['preset']}, {QUICK['preset']} with "
                        "--quick); every method uses its dense-phase schedule")
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
            args.out = str(RESULTS)
        else:
            args.out = tempfile.mkdtemp(prefix="clnp-continual-")
            print(f"writing to {args.out} (a quick or partial run; --out to choose)", file=sys.stderr)
    return args


def main(argv=None) -> Result | Estimate:
    """Run the benchmark (argv as on the command line); returns what continual.json holds (--estimate-only: the
    estimate, and no file is written)."""
    args = parse_args(argv)
    threads = torch.get_num_threads()
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        if args.merge:
            return merge_main(args.merge, Path(args.out))
        return run(args)
    finally:
        torch.set_num_threads(threads)  # in-process callers (tests) get their setting back


def run(args) -> Result | Estimate:
    """Every section the command line asks for, written to args.out as continual.json, continual.md and plots."""
    t_start = restart_clock()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    spec = parse_network_spec(args.network)
    if spec.family != "mlp":
        raise SystemExit(f"--network must be an MLP spec for permuted MNIST, got {args.network}")
    cfg = preset(args.preset, epochs=args.epochs, batch_size=args.batch_size)
    sources = [f"permuted-mnist:{i}" for i in range(1, args.tasks + 1)]
    seeds = args.seed_list
    settings = Settings(**{k: v for k, v in vars(args).items() if k != "seed_list"}
                        | dict(seeds=seeds, clnp_config=asdict(cfg), sources=sources))
    load_start = _loadavg()
    log(f"continual benchmark: {len(sources)} permuted-MNIST tasks, {spec}, {args.epochs} epochs, "
        f"limit {args.limit}, seeds {seeds}, device {args.device}, torch threads {torch.get_num_threads()}")

    estimate: Estimate | None = None
    if args.estimate or args.estimate_only:
        estimate = plan_estimate(args, cfg)
        log("estimate: " + estimate.text)
        if args.estimate_only:
            return estimate

    # ---- EWC lambda on validation data (first seed) ------------------------------------------
    ewc = None
    if not args.no_ewc:
        log(f"EWC lambda selection: grid {args.ewc_lambdas} on the first {min(args.ewc_select_tasks, len(sources))} tasks")
        ewc = select_ewc_lambda(spec, sources, cfg, args, seeds[0])

    # ---- headline -------------------------------------------------------------------------------
    def on_first_task(t, timings, eval_seconds):
        if t == 0 and estimate:
            log("first headline task took " + ", ".join(f"{k} {v:.1f}s" for k, v in timings.items())
                + f"; predicted CLNP {estimate.per_task.clnp_first:.1f}s, fine-tuning "
                  f"{estimate.per_task.plain:.1f}s")

    headline = None
    if args.headline:
        headline = headline_scenario(spec, sources, cfg, args, ewc.winner if ewc else None, on_first_task)
        for name, s in headline.summary.items():
            log(f"headline {name}: avg acc {fmt_stat(s.average_accuracy)}, backward transfer "
                f"{fmt_stat(s.backward_transfer)}, train {fmt_stat(s.train_seconds, 1)}s")

    # ---- max-drop sweep -------------------------------------------------------------------------
    sweep = None
    if args.sweep_max_drop.strip():
        log(f"max-drop sweep: {args.sweep_max_drop} on {min(args.sweep_tasks, len(sources))} tasks")
        sweep = max_drop_sweep(spec, sources, cfg, args, seeds[0], headline.runs[0] if args.run_clnp else None)

    # ---- training cost --------------------------------------------------------------------------
    cost = None
    if args.cost_steps > 0:
        log(f"training cost: {args.cost_rounds} rounds x {args.cost_steps} steps per method")
        cost = training_cost(spec, cfg, args, seeds[0])

    # ---- CNN scenario ---------------------------------------------------------------------------
    cnn = None
    if args.cnn:
        cnn = cnn_scenario(parse_network_spec(args.cnn_network), cfg, args)
        for name, s in cnn.summary.items():
            log(f"CNN {name}: avg acc {fmt_stat(s.average_accuracy)}, backward transfer {fmt_stat(s.backward_transfer)}")

    res = Result(
        settings=settings,
        machine=Machine(platform=platform.platform(), cpu_count=os.cpu_count(), torch=torch.__version__,
                        torch_threads=torch.get_num_threads(), python=platform.python_version(),
                        numpy=np.__version__, load_average_at_start=load_start, load_average_at_end=_loadavg(),
                        note="wall times depend on what else the machine ran; see the load averages"),
        published=PUBLISHED,
        estimate=estimate,
        ewc_selection=ewc,
        headline=headline,
        sweep=sweep,
        training_cost=cost,
        cnn=cnn,
        total_wall_seconds=time.perf_counter() - t_start,
        finished_at=time.time(),
        plots=[],
    )
    (out / "continual.json").write_text(res.dumps())  # before the plots
    res.plots = make_plots(res, out)
    res.total_wall_seconds = time.perf_counter() - t_start
    res.finished_at = time.time()
    write_outputs(res, out)
    log(f"done in {res.total_wall_seconds:.1f}s: {out / 'continual.json'}, {out / 'continual.md'}, "
        f"{len(res.plots)} plots")
    return res


def _loadavg() -> list[float] | None:
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except (AttributeError, OSError):
        return None
