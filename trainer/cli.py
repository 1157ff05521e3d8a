"""`clnp-train`: add tasks to a model repository, evaluate them, show capacity.

Exit codes: 0 success; 2 bad input or usage (nothing in the repository changed);
1 failure (an earlier task changed, the export disagreed with torch, or an unexpected error).
"""

from __future__ import annotations

import json
import logging
import os
import sys

import click

from serving.contract import plan_share
from trainer.clnp import (FINETUNE_KEEP as _FINETUNE_KEEP, PRESETS as _PRESETS, REUSE_MEASURES as _REUSE_MEASURES,
                          REUSE_INITS as _REUSE_INITS, TEACHERS as _TEACHERS, DEFAULT_CANDIDATE_POOL, CLNPConfig)
from trainer.pruning import RANKS as _RANKS, SCHEDULES as _SCHEDULES, SCORES as _SCORES

EXIT_FAILURE = 1
EXIT_USER_ERROR = 2

_DEFAULTS = CLNPConfig()


def _user_errors() -> tuple[type[BaseException], ...]:
    from serving.repository import RepositoryError
    from trainer.clnp import CapacityExhaustedError, ConfigError
    from trainer.data import DataError
    from trainer.network import NetworkSpecError
    from trainer.pipeline import InputMismatchError

    return (RepositoryError, DataError, NetworkSpecError, InputMismatchError, CapacityExhaustedError, ConfigError,
            KeyError)


def check_writable(repository: str) -> None:
    """Fail fast, before any training, with one line when this user cannot write the repository (exit 2).

    Probes by creating and removing a file: permission bits, ownership, read-only mounts and ACLs all show,
    and root's own capabilities count as they really are.
    """
    import tempfile
    from pathlib import Path

    from serving.objectstore import ObjectStoreRepository, is_remote

    if is_remote(repository):
        from serving.repository import RepositoryError

        try:
            ObjectStoreRepository(repository).check_writable()
        except RepositoryError as e:
            _fail(f"cannot write to the model repository: {e}", EXIT_USER_ERROR)
        return
    path = Path(repository)
    probe = path
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent  # a repository yet to be created: its nearest existing folder must take it
    try:
        with tempfile.TemporaryFile(dir=probe, prefix=".clnp-write-check-"):
            pass
    except OSError as e:
        where = str(path) if probe == path else f"{probe} (to create {path})"
        _fail(f"cannot write to the model repository: {where}: {e.strerror or e} (running as uid {os.getuid()}, "
              f"gid {os.getgid()}); make it writable by this user, or run as its owner "
              f"(in a container: docker run --user $(id -u):$(id -g) ...)", EXIT_USER_ERROR)


def _fail(message: str, code: int) -> None:
    click.echo(f"error: {message}", err=True)
    sys.exit(code)


def _run(fn):
    """Run fn(), turning our errors into a one-line message and the documented exit code."""
    from trainer.pipeline import RankZeroFailedError, VerificationError
    from trainer.export import ExportError

    try:
        return fn()
    except _user_errors() as e:
        msg = e.args[0] if isinstance(e, KeyError) and e.args else str(e)
        _fail(str(msg), EXIT_USER_ERROR)
    except (VerificationError, ExportError) as e:
        _fail(f"{e} (nothing was published)", EXIT_FAILURE)
    except RankZeroFailedError as e:
        _fail(str(e), EXIT_FAILURE)
    except PermissionError as e:  # e.g. the repository's permissions changed during training
        _fail(f"permission denied: {e.filename or e} (running as uid {os.getuid()}); nothing was published: "
              f"make the repository writable by this user", EXIT_USER_ERROR)


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.option("-v", "--verbose", is_flag=True, help="Log progress details to stderr.")
def cli(verbose: bool) -> None:
    """Continual Learning via Neural Pruning: teach one shared network task after task.

    Each task is learned into the units earlier tasks left free, pruned to what it needs, and frozen:
    earlier tasks keep bit-identical outputs. Each call publishes a new version to a model repository.
    """
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")


@cli.command("add-task")
@click.option("--repository", "-r", required=True, type=click.Path(file_okay=False),
              help="Model repository: a folder, or an s3:// gs:// az:// URL (created with the first task).")
@click.option("--task", "-t", required=True, help="Task name: letters, digits, '_' or '-', at most 64, unique.")
@click.option("--data", "-d", "source", required=True,
              help="Data source: mnist, fashion-mnist, permuted-mnist:SEED, split-mnist:A,B,..., "
                   "split-fashion-mnist:A,B,..., FILE.npz (x, y[, x_val, y_val, x_test, y_test]) or FILE.csv.")
@click.option("--network", "-n", default=None,
              help="Network spec for the first task, e.g. mlp:784-2000-2000 (default) or cnn:1x28x28-c32-c64-d256. "
                   "Later tasks use the repository's network; if given again it must match.")
@click.option("--preset", type=click.Choice(sorted(_PRESETS)), default="default", show_default=True,
              help="Method settings to start from: default (dropout, 30 epochs, Taylor-scored iterative pruning "
                   "with distilled recovery, 60 fine-tuning epochs), balanced (the earlier default: 10 and 20 "
                   "epochs, about 0.6x the time), fast (about a fifth of the time), reference (the first method: "
                   "L1 penalty, activity scores, one-shot pruning). Options below override it.")
@click.option("--epochs", type=click.IntRange(min=1), default=None,
              help=f"Training epochs on the new task before pruning [default: {_DEFAULTS.epochs}].")
@click.option("--max-drop", type=click.FloatRange(min=0, max=100), default=None,
              help=f"Graceful forgetting: validation accuracy points pruning may cost the new task "
                   f"[default: {_DEFAULTS.max_drop}].")
@click.option("--min-units", type=click.IntRange(min=0), default=None,
              help="Pruning leaves the new task at least this many units per layer (of the free ones), to spend "
                   f"spare capacity on accuracy [default: {_DEFAULTS.min_units}: max drop alone decides].")
@click.option("--max-units", type=click.IntRange(min=0), default=None,
              help="Pruning leaves the new task at most this many units per layer, cutting past the max drop if it "
                   "must, so no task takes most of a layer; the summary says what the cap cost "
                   f"[default: {_DEFAULTS.max_units}: no cap].")
@click.option("--plan-tasks", type=click.IntRange(min=0), default=None,
              help="The network is planned for N tasks in all: the new task keeps an equal share of the free units, "
                   "free // (N - tasks learned) per layer, whatever the max drop allows (accuracy follows the units "
                   "a task keeps). The version keeps the plan, and later tasks follow it unless given --plan-tasks "
                   "again; 0 ends it [default: the latest version's plan, else none; not with --min-units or "
                   "--max-units].")
@click.option("--candidate-pool", type=click.FloatRange(min=0), default=None,
              help="Under a plan: the new task chooses its share from at least this many times as many candidate "
                   "units per layer. Where fewer are free (the last tasks of a plan), it trains in temporary units "
                   "beyond the layer's width, and the units it keeps move into free ones; the published network "
                   f"keeps its shape. 0: the free units alone [default: {DEFAULT_CANDIDATE_POOL:g} under a plan].")
@click.option("--score", type=click.Choice(sorted(_SCORES)), default=None,
              help=f"How units are ranked for pruning [default: {_DEFAULTS.score}].")
@click.option("--schedule", type=click.Choice(sorted(_SCHEDULES)), default=None,
              help=f"Pruning schedule: iterative (prune a share, retrain, repeat) or one-shot (bisection, no "
                   f"retraining) [default: {_DEFAULTS.schedule}].")
@click.option("--prune-rank", type=click.Choice(list(_RANKS)), default=None,
              help="Iterative schedule: each step cuts its share of every layer (layer) or of all layers ranked "
                   f"together by score (global) [default: {_DEFAULTS.prune_rank}].")
@click.option("--dropout", type=click.FloatRange(min=0, max=1, max_open=True), default=None,
              help=f"Dropout on hidden units while training [default: {_DEFAULTS.dropout}].")
@click.option("--alpha", type=click.FloatRange(min=0), default=None,
              help=f"L1 penalty on free units' mean activation per layer [default: {_DEFAULTS.alpha}].")
@click.option("--distill", type=click.FloatRange(min=0, max=1), default=None,
              help=f"Weight of distillation from the teacher (--teacher) while retraining and fine-tuning "
                   f"[default: {_DEFAULTS.distill}].")
@click.option("--teacher", type=click.Choice(list(_TEACHERS)), default=None,
              help="Distillation's teacher: dense (the task's unpruned network in the shared one) or full (a "
                   "network of the same shape trained on the task alone first: about 30 more epochs of the full "
                   f"network) [default: {_DEFAULTS.teacher}].")
@click.option("--distill-dense/--no-distill-dense", default=None,
              help="The dense phase distils from the full teacher too (--teacher full), at --distill's weight "
                   "[default: off].")
@click.option("--learning-rate", "--lr", type=click.FloatRange(min=0, min_open=True), default=None,
              help=f"Adam learning rate [default: {_DEFAULTS.learning_rate}].")
@click.option("--lr-schedule", type=click.Choice(["constant", "cosine", "step"]), default=None,
              help=f"Learning-rate schedule of the training epochs [default: {_DEFAULTS.lr_schedule}].")
@click.option("--recovery-epochs", type=click.FloatRange(min=0), default=None,
              help=f"Iterative schedule: at most this many epochs of retraining after each pruning step "
                   f"[default: {_DEFAULTS.recovery_epochs}].")
@click.option("--batch-size", type=click.IntRange(min=1), default=None,
              help=f"Samples per training step [default: {_DEFAULTS.batch_size}].")
@click.option("--finetune-epochs", type=click.IntRange(min=0), default=None,
              help=f"Epochs of fine-tuning the task's units after pruning [default: {_DEFAULTS.finetune_epochs}].")
@click.option("--finetune-keep", type=click.Choice(list(_FINETUNE_KEEP)), default=None,
              help="When the fine-tuned network replaces the pruned one: bound (its validation accuracy is within "
                   "--max-drop of the unpruned network's, or over the pruned one's) or better (not under the pruned "
                   f"one's) [default: {_DEFAULTS.finetune_keep}].")
@click.option("--finetune-average", type=click.FloatRange(min=0, max=1, max_open=True), default=None,
              help="Fine-tuning ends on an exponential moving average of the weights it moves, with this decay per "
                   f"step (0.9998: about the last 5,000 steps; 0: off) [default: {_DEFAULTS.finetune_average}].")
@click.option("--reuse-max-drop", type=click.FloatRange(min=0, max=100), default=None,
              help=f"Accuracy points the connection pruning behind the reuse measure may cost "
                   f"[default: {_DEFAULTS.reuse_max_drop}].")
@click.option("--reuse-measure", type=click.Choice(list(_REUSE_MEASURES)), default=None,
              help=f"What 'reused' counts: connections (earlier units still connected after the connection "
                   f"pruning) or signal (read-only: the fewest earlier units carrying all but "
                   f"{_DEFAULTS.reuse_signal_tail:.0%} of the signal into the task's units) [default: {_DEFAULTS.reuse_measure}].")
@click.option("--precision", type=click.Choice(["fp32", "bf16"]), default=None,
              help=f"Arithmetic of the training steps: bf16 runs matrix products in bfloat16 under torch.autocast "
                   f"(weights, gradients and evaluations stay float32; about 2x faster where the CPU has bfloat16 "
                   f"dot products) [default: {_DEFAULTS.precision}].")
@click.option("--connection-pruning/--no-connection-pruning", default=None,
              help="Prune the task's connections from earlier units by magnitude, within --reuse-max-drop, after "
                   "fine-tuning (what the connections measure of reuse counts; without it, that measure counts every "
                   "earlier unit connected at all) [default: on in "
                   f"{', '.join(n for n, c in _PRESETS.items() if c.prune_connections)}, off in the others].")
@click.option("--reuse-init", type=click.Choice(list(_REUSE_INITS)), default=None,
              help="How the new task's connections from earlier units start: drawn at random like every weight, or at "
                   f"zero (trainable: the task starts as if isolated) [default: {_DEFAULTS.reuse_init}].")
@click.option("--isolate", is_flag=True,
              help="Learn the task as its own subnetwork: it reads none of the earlier tasks' units (no feature "
                   "reuse, 0 reused). Earlier tasks are unaffected either way.")
@click.option("--limit", type=click.IntRange(min=1), default=None,
              help="Train on the first N training samples only (quick runs).")
@click.option("--seed", type=click.IntRange(min=0), default=_DEFAULTS.seed, show_default=True,
              help="Seed for initialisation, data order and the validation split.")
@click.option("--data-dir", type=click.Path(file_okay=False), envvar="CLNP_DATA_DIR", default=None,
              help="Folder with mnist/ and fashion-mnist/ idx files [env CLNP_DATA_DIR]; "
                   "without it they are downloaded into a checked cache.")
@click.option("--label-column", default=None, help="Label column of a CSV source.")
@click.option("--retention", type=click.IntRange(min=1), default=None,
              help="Keep at most this many versions (the newest is always kept). Default: keep all.")
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True,
              help="Where to train. Exports and the zero-forgetting check always run on the CPU.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON instead of a summary.")
@click.option("--progress/--no-progress", default=None, help="Progress bars (default: when stderr is a terminal).")
def add_task_cmd(repository, task, source, network, preset, epochs, max_drop, min_units, max_units, plan_tasks, candidate_pool, score, schedule, prune_rank, dropout, alpha, distill, teacher,
                 distill_dense, learning_rate, lr_schedule, recovery_epochs, batch_size, finetune_epochs, finetune_keep, finetune_average, reuse_max_drop,
                 reuse_measure, precision, connection_pruning, reuse_init, isolate, limit, seed, data_dir, label_column, retention, device, as_json, progress):
    """Learn a new task into the free units of the latest version and publish the next version.

    The first call creates the repository and the network. Every earlier task is checked to be
    bit-identical before the new version (safetensors + ONNX) is published atomically.
    Runs unchanged under `torchrun --nproc-per-node N`: data-parallel, and only rank 0 publishes.
    """
    from trainer import distributed

    if device == "cuda":
        import torch

        if not torch.cuda.is_available():
            _fail("--device cuda: no CUDA device is available to this torch build; use --device cpu", EXIT_USER_ERROR)

    # Under torchrun (WORLD_SIZE > 1): join the process group; each rank trains on its shard, rank 0 publishes.
    world = distributed.init_from_environment(device)
    try:
        _add_task(repository, task, source, network, preset, epochs, max_drop, min_units, max_units, plan_tasks, candidate_pool, score, schedule, prune_rank, dropout, alpha,
                  distill, teacher, distill_dense, learning_rate, lr_schedule, recovery_epochs, batch_size, finetune_epochs, finetune_keep, finetune_average, reuse_max_drop,
                  reuse_measure, precision, connection_pruning, reuse_init, isolate, limit, seed, data_dir, label_column,
                  retention, device, as_json, progress, quiet=world is not None and not world.is_main)
    finally:
        distributed.shutdown()


def _add_task(repository, task, source, network, preset, epochs, max_drop, min_units, max_units, plan_tasks, candidate_pool, score, schedule, prune_rank, dropout, alpha, distill, teacher,
              distill_dense, learning_rate, lr_schedule, recovery_epochs, batch_size, finetune_epochs, finetune_keep, finetune_average, reuse_max_drop,
              reuse_measure, precision, connection_pruning, reuse_init, isolate, limit, seed, data_dir, label_column,
              retention, device, as_json, progress, quiet):
    from trainer.clnp import preset as make_config
    from trainer.pipeline import add_task

    check_writable(repository)
    config = _run(lambda: make_config(
        preset, epochs=epochs, learning_rate=learning_rate, lr_schedule=lr_schedule, batch_size=batch_size,
        dropout=dropout, alpha=alpha, score=score, schedule=schedule, max_drop=max_drop, min_units=min_units,
        max_units=max_units, plan_tasks=plan_tasks, candidate_pool=candidate_pool,
        prune_rank=prune_rank, distill=distill, teacher=teacher,
        distill_dense=distill_dense, recovery_epochs=recovery_epochs, finetune_epochs=finetune_epochs, finetune_keep=finetune_keep,
        finetune_average=finetune_average, reuse_max_drop=reuse_max_drop,
        reuse_measure=reuse_measure, precision=precision, prune_connections=connection_pruning, reuse_init=reuse_init,
        isolate=True if isolate else None, seed=seed))
    show = sys.stderr.isatty() if progress is None else progress
    result = _run(lambda: add_task(repository, task, source, network=network, config=config, limit=limit,
                                   data_dir=data_dir, label_column=label_column, retention=retention,
                                   show_progress=show, device=device, inherit_plan=plan_tasks is None))
    if quiet:  # a data-parallel rank other than 0: rank 0 reports
        return
    m, o = result.manifest, result.outcome
    record = m.tasks[-1]
    plan = m.plan_tasks  # the plan the task followed: its own, or the one it inherited
    # a plan sets each task's share itself: no warning that it took much of a layer
    warnings = [] if plan else large_share_warnings(o.units_kept, o.units_pruned, config.max_units)
    if as_json:
        click.echo(json.dumps({
            "version": m.version, "task": record.name, "index": record.index,
            "validation_accuracy": record.validation_accuracy, "test_accuracy": record.test_accuracy,
            "dense_validation_accuracy": o.dense_validation_accuracy, "units_kept": o.units_kept,
            "free_units": {l.name: l.free for l in m.layers}, "reused": o.reused,
            "epoch_seconds": o.epoch_seconds, "phase_seconds": o.phase_seconds,
            "phase_validation_accuracy": o.phase_validation, "finetune_discarded_validation_accuracy": o.finetune_discarded,
            "teacher_validation_accuracy": o.teacher_validation,
            "units_capped_from": o.capped, "plan_tasks": plan, "candidate_pool": o.pool, "warnings": warnings,
            "seconds": result.seconds,
            "earlier_tasks_verified": result.earlier_tasks_checked, "onnx_parity_max_difference": result.parity_max_difference,
            "world_size": result.world_size,
        }, indent=2))
        return
    test = "n/a" if record.test_accuracy is None else f"{record.test_accuracy:.2f}%"
    click.echo(f"published version {m.version} to {repository}: task {record.name!r} (index {record.index}, "
               f"{len(record.classes)} classes, from {record.source})")
    click.echo(f"  accuracy: test {test}, validation {record.validation_accuracy:.2f}% "
               f"(before pruning {o.dense_validation_accuracy:.2f}%, max drop {config.max_drop} points, "
               f"{o.prune_steps} pruning step(s))")
    for l in m.layers:
        click.echo(f"  {l.name}: kept {o.units_kept[l.name]:>5} units, reuses {o.reused[l.name]:>5} earlier, "
                   f"{l.free:>5} of {l.units} free")
    if plan:
        n = len(m.tasks)
        shares = ", ".join(f"{l.name} {plan_share(l.free, plan, n)}" for l in m.layers) if plan > n else ""
        click.echo(f"  plan: task {n} of {plan}" + (f"; the next keeps {shares} (--plan-tasks N changes the plan, "
                                                    "0 ends it)" if shares else "; the plan is complete"))
    if o.pool:
        click.echo("  candidate pool: chose from " + ", ".join(f"{n} {c}" for n, c in o.pool.items())
                   + " units (the free ones and temporary ones beyond the layer, which left with training)")
    click.echo("  validation after each phase: " + ", ".join(f"{name} {v:.2f}%" for name, v in o.phase_validation.items()))
    if o.teacher_validation is not None:
        click.echo(f"  teacher (trained on the task alone, every unit): {o.teacher_validation:.2f}% validation")
    if o.finetune_discarded is not None:
        click.echo(f"  fine-tuning ended at {o.finetune_discarded:.2f}% validation, under the pruned network"
                   + (f" and more than {config.max_drop} points under the unpruned one"
                      if config.finetune_keep == "bound" else "") + "; the pruned network was kept")
    if o.capped:
        drop = o.dense_validation_accuracy - o.phase_validation["prune"]
        bound = f"plan of {plan} tasks" if plan else f"max units {config.max_units}"
        click.echo(f"  {bound}: within the max drop pruning would have kept "
                   + ", ".join(f"{n} {c}" for n, c in o.capped.items())
                   + f"; cut to {'its share' if plan else 'the cap'}, pruned validation was {abs(drop):.2f} points "
                   + ("under" if drop > 0 else "over") + " the unpruned network"
                   + (f", past the max drop of {config.max_drop}" if drop > config.max_drop else ""))
    phases = ", ".join(f"{name} {s:.1f}s" for name, s in o.phase_seconds.items())
    click.echo(f"  time: {result.seconds['total']:.1f}s total: {phases}; export {result.seconds['export']:.1f}s")
    click.echo(f"  checks: {result.earlier_tasks_checked} earlier task(s) bit-identical; "
               f"ONNX matches torch to {result.parity_max_difference:.1e}")
    for w in warnings:
        click.echo(f"warning: {w}", err=True)


# A task that keeps more than this share of a layer's FREE units gets a warning: two such tasks fill the layer.
LARGE_SHARE = 0.5


def large_share_warnings(kept: dict[str, int], pruned: dict[str, int], max_units: int) -> list[str]:
    """One line per layer where a task kept more than LARGE_SHARE of the units that were FREE before it (its
    kept + pruned units), saying how much and what bounds it."""
    out = []
    for name, k in kept.items():
        free = k + pruned.get(name, 0)
        if free and k > LARGE_SHARE * free:
            out.append(f"the task kept {k} of the {free} free units of {name} ({100 * k / free:.0f}%), "
                       f"{free - k} left free; "
                       + ("lower --max-units to take less per task"
                          if max_units else "--max-units N caps what a task may keep (at some accuracy cost)")
                       + ", and `clnp-train capacity` shows what is left")
    return out


@cli.command("evaluate")
@click.option("--repository", "-r", required=True, type=click.Path(file_okay=False),
              help="Model repository: a folder, or an s3:// gs:// az:// URL.")
@click.option("--task", "-t", default=None, help="Only this task (default: all).")
@click.option("--version", type=click.IntRange(min=1), default=None, help="Version (default: the latest).")
@click.option("--data-dir", type=click.Path(file_okay=False), envvar="CLNP_DATA_DIR", default=None,
              help="Folder with mnist/ and fashion-mnist/ [env CLNP_DATA_DIR].")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def evaluate_cmd(repository, task, version, data_dir, as_json):
    """Test accuracy of each task on its data source's test split."""
    from trainer.pipeline import evaluate

    rows = _run(lambda: evaluate(repository, task, data_dir=data_dir, version=version))
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    click.echo(f"{'task':<20} {'split':<10} {'samples':>8} {'accuracy':>9}")
    for r in rows:
        click.echo(f"{r['task']:<20} {r['split']:<10} {r['samples']:>8} {r['accuracy']:>8.2f}%")
    if rows:
        click.echo(f"{'average':<20} {'':<10} {'':>8} {sum(r['accuracy'] for r in rows) / len(rows):>8.2f}%")


@cli.command("capacity")
@click.option("--repository", "-r", required=True, type=click.Path(file_okay=False),
              help="Model repository: a folder, or an s3:// gs:// az:// URL.")
@click.option("--version", type=click.IntRange(min=1), default=None, help="Version (default: the latest).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def capacity_cmd(repository, version, as_json):
    """Units per layer: total, FREE, owned by each task; per task: units owned and earlier units reused."""
    from serving.capacity import capacity_report, format_capacity
    from serving.objectstore import open_repository

    report = _run(lambda: capacity_report(open_repository(repository).read_manifest(version)))
    if as_json:
        click.echo(json.dumps(report.to_json(), indent=2, allow_nan=False))
    else:
        click.echo(format_capacity(report))


def main(argv: list[str] | None = None) -> None:
    """Console entry point: runs the CLI; Ctrl-C exits 130 having published nothing."""
    try:
        cli.main(args=argv, prog_name="clnp-train", standalone_mode=False)
    except (KeyboardInterrupt, click.exceptions.Abort):
        click.echo("error: interrupted; nothing was published", err=True)
        # os._exit, not sys.exit: with sys.exit(130) some runs still ended by SIGINT (-2 to the parent, not 130)
        # after this handler had run, depending on where the interrupt landed; os._exit leaves the interpreter
        # no later step to do that. add-task has already removed its staging directory; only the streams need
        # flushing.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(130)
    except click.exceptions.ClickException as e:
        e.show()
        sys.exit(e.exit_code)
    except click.exceptions.Exit as e:
        sys.exit(e.exit_code)


if __name__ == "__main__":
    main()
