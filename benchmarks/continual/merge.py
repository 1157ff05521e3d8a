"""One result from partial runs (--methods subsets, parts that skipped sections), as `--merge` does."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from benchmarks.continual.progress import log
from benchmarks.continual.record import ABSENT, METHOD_FLAGS, MergedPart, RecordError, Result, SeedRun, Sweep
from benchmarks.continual.report import PUBLISHED, make_plots, write_markdown
from benchmarks.continual.scenarios import headline_block, headline_sweep_row

# settings that every part of a merged run must share: otherwise the numbers are not comparable
MERGE_MUST_MATCH = ("tasks", "network", "epochs", "limit", "batch_size", "clnp_config", "sources", "device", "quick",
                    "ewc_fisher_samples")
SECTIONS = ("ewc_selection", "headline", "sweep", "training_cost", "cnn")


def merge_results(parts: list[tuple[str, Result]]) -> Result:
    """One result from partial runs (folder, its result), in the order given.

    Every part must have used the same data, network and schedule; a part may add seeds (e.g. more seeds of CLNP
    alone: each method is then summarised over the seeds it ran). A method may come from one part per seed, and
    each other section from one part only. Raises ValueError saying what does not fit.
    """
    if len(parts) < 2:
        raise ValueError("--merge needs at least two result folders")
    first_dir, first = parts[0]
    for d, r in parts[1:]:
        for k in MERGE_MUST_MATCH:
            mine, theirs = getattr(r.settings, k), getattr(first.settings, k)
            if mine != theirs:
                raise ValueError(f"{d} ran with {k}={mine!r} but {first_dir} with {theirs!r}: only runs of the same "
                                 "settings can be merged")

    def one(section: str):
        found = [(d, getattr(r, section)) for d, r in parts if getattr(r, section) is not None]
        if len(found) > 1:
            raise ValueError(f"section {section!r} is in both {found[0][0]} and {found[1][0]}; run it in one part only")
        return found[0][1] if found else None

    seeds = list(dict.fromkeys(s for _, r in parts for s in r.settings.seeds))  # first part's seeds first
    by_seed = {s: SeedRun(seed=s, methods={}, wall_seconds_by_part={}, wall_seconds=0.0) for s in seeds}
    owner: dict[tuple[int, str], str] = {}
    for d, r in parts:
        if r.headline is None:
            continue
        for run in r.headline.runs:
            for name, m in run.methods.items():
                if (run.seed, name) in owner:
                    raise ValueError(f"method {name} (seed {run.seed}) is in both {owner[run.seed, name]} "
                                     f"and {d}; run it in one part only")
                owner[run.seed, name] = d
                by_seed[run.seed].methods[name] = m
            by_seed[run.seed].wall_seconds_by_part[d] = run.wall_seconds
    runs = [run for run in by_seed.values() if run.methods]
    for run in runs:
        run.methods = {n: run.methods[n] for n in METHOD_FLAGS.values() if n in run.methods}
        run.wall_seconds = max(run.wall_seconds_by_part.values(), default=0.0)
    seeds = [run.seed for run in runs] or seeds
    headline = headline_block(first.settings.sources, first.settings.network, seeds, runs) if runs else None
    run0 = runs[0].methods if runs else {}

    sweep: Sweep | None = one("sweep")
    cfg = first.settings.clnp_config
    if sweep is not None and "CLNP" in run0 and sweep.epochs == cfg["epochs"] and sweep.seed == runs[0].seed:
        asked = next(r for _, r in parts if r.sweep is not None).settings.sweep_max_drop
        wanted = [float(v) for v in asked.split(",") if v.strip()]  # as the part that ran the sweep was asked
        have = {r.max_drop for r in sweep.rows}
        if cfg["max_drop"] in wanted and cfg["max_drop"] not in have:  # the part that ran the sweep had no CLNP
            row = headline_sweep_row(run0["CLNP"], cfg["max_drop"], sweep.tasks)
            sweep = replace(sweep, rows=sorted(sweep.rows + [row], key=lambda r: r.max_drop))

    starts = [_finished_at(r) - r.total_wall_seconds for _, r in parts]
    ends = [_finished_at(r) for _, r in parts]
    settings = replace(first.settings, seeds=seeds,
                       methods=",".join(k for k, v in METHOD_FLAGS.items() if any(n == v for _, n in owner)))
    return Result(
        settings=settings,
        machine=replace(first.machine, load_average_at_end=parts[-1][1].machine.load_average_at_end),
        published=PUBLISHED,
        estimate=None,
        merged_from=[MergedPart(folder=d, methods=r.settings.methods, seeds=r.settings.seeds,
                                sections=[k for k in SECTIONS if getattr(r, k) is not None],
                                wall_seconds=r.total_wall_seconds, estimate=r.estimate,
                                torch_threads=r.machine.torch_threads) for d, r in parts],
        ewc_selection=one("ewc_selection"),
        headline=headline,
        sweep=sweep,
        training_cost=one("training_cost"),
        cnn=one("cnn"),
        # parts may run side by side: the run took from the first start to the last finish
        total_wall_seconds=(max(ends) - min(starts)) if all(ends) else max(r.total_wall_seconds for _, r in parts),
        finished_at=max(ends),
        plots=[],
    )


def _finished_at(r: Result) -> float:
    return 0.0 if r.finished_at is ABSENT else r.finished_at


def merge_main(folders: list[str], out: Path) -> Result:
    """Merge the continual.json of the folders into out (with continual.md and the plots)."""
    parts = []
    for d in folders:
        f = Path(d) / "continual.json"
        if not f.is_file():
            raise SystemExit(f"--merge: {f} not found (a folder written by a `python -m benchmarks.continual` run)")
        try:
            r = Result.read(f)
        except RecordError as e:
            raise SystemExit(f"--merge: {e}")
        if r.finished_at is ABSENT:  # written before finished_at existed: the file's time is when it finished
            r.finished_at = f.stat().st_mtime
        parts.append((str(d), r))
    try:
        res = merge_results(parts)
    except ValueError as e:
        raise SystemExit(f"--merge: {e}")
    out.mkdir(parents=True, exist_ok=True)
    res.plots = make_plots(res, out)
    write_outputs(res, out)
    log(f"merged {len(parts)} runs into {out / 'continual.json'}, {out / 'continual.md'}, {len(res.plots)} plots")
    return res


def write_outputs(res: Result, out: Path) -> None:
    """continual.json and continual.md into out."""
    (out / "continual.json").write_text(res.dumps())
    write_markdown(res, out / "continual.md", res.plots)
