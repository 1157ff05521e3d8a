"""Add a task to the latest version of a model repository, and evaluate what a repository holds."""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from serving.repository import (
    MARKER_FILE,
    CorruptVersionError,
    LayerRecord,
    Manifest,
    ModelRepository,
    OnnxRecord,
    RepositoryError,
    TaskRecord,
    utc_now,
    validate_task_name,
    FORMAT_VERSION,
    ONNX_FILE,
    WEIGHTS_FILE,
)
from serving.objectstore import ObjectStoreRepository, create_repository, is_remote, open_repository
from trainer import distributed
from trainer.clnp import (CLNPConfig, ConfigError, TaskOutcome, accuracy, check_capacity, learn_task, new_owners,
                          pool_extra, recorded_settings, task_masks)
from trainer.data import TaskData, load_source
from serving.contract import INPUT_NAME, OUTPUT_NAME, TASK_INPUT_NAME
from trainer.export import OPSET, check_parity, export_onnx, export_task_graph
from trainer.network import MaskedNetwork, NetworkSpec, parse_network_spec
from trainer.training import DROPOUT_DRAWS

logger = logging.getLogger(__name__)

DEFAULT_NETWORK = "mlp:784-2000-2000"
PROBE_SAMPLES = 256  # real inputs used for the zero-forgetting check and the ONNX parity check


class InputMismatchError(ValueError):
    """The data does not fit the network (shape), or a --network that differs from the repository's."""


class RankZeroFailedError(RuntimeError):
    """Data-parallel training: rank 0 failed to check or publish the task (it reports why)."""


class VerificationError(RuntimeError):
    """An earlier task changed, or the export disagrees with torch: nothing was published."""


@dataclass
class AddTaskResult:
    manifest: Manifest
    outcome: TaskOutcome
    test_accuracy: float | None
    parity_max_difference: float
    earlier_tasks_checked: int
    seconds: dict[str, float] = field(default_factory=dict)  # phase -> wall seconds
    world_size: int = 1  # processes that trained it (torchrun)


def _ensure_repository_target(path: str | Path) -> ModelRepository | ObjectStoreRepository | None:
    """The repository at `path` (a folder or an object-store URL) if there is one; None if it can be created
    there. Writes nothing."""
    if is_remote(path):
        try:
            return ObjectStoreRepository.open(str(path))
        except RepositoryError as e:
            if "no " + MARKER_FILE not in str(e):
                raise
            if not ObjectStoreRepository(str(path)).is_empty():
                raise RepositoryError(f"{path} holds objects and is not a clnp model repository") from None
            return None
    path = Path(path)
    if (path / MARKER_FILE).exists():
        return ModelRepository.open(path)
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise RepositoryError(f"{path} exists, is not empty and is not a clnp model repository")
    return None


def load_network(repo: ModelRepository | ObjectStoreRepository, manifest: Manifest) -> tuple[MaskedNetwork, list[torch.Tensor]]:
    """Rebuild the torch network and ownership of a stored version (safetensors: no code runs)."""
    spec = parse_network_spec(manifest.network)
    arrays = repo.load_weights(manifest)
    tensors = {k: torch.from_numpy(np.array(v)) for k, v in arrays.items()}
    try:
        net = MaskedNetwork.from_state(spec, tensors, len(manifest.tasks))
    except ValueError as e:
        raise CorruptVersionError(f"version {manifest.version}: {e}") from e
    owners = [torch.tensor(l.owner, dtype=torch.int64) for l in manifest.layers]
    if [len(o) for o in owners] != [l.units for l in spec.layers]:
        raise CorruptVersionError(f"version {manifest.version}: unit ownership does not match {manifest.network}")
    return net, owners


def fit_to_network(x: np.ndarray, spec: NetworkSpec, what: str) -> torch.Tensor:
    """Reshape raw features (N, *feature_shape) to the network's input shape, or raise InputMismatchError."""
    need = math.prod(spec.input_shape)
    have = math.prod(x.shape[1:])
    if have != need:
        raise InputMismatchError(
            f"{what} has samples of shape {tuple(x.shape[1:])} ({have} values) but the network {spec} "
            f"takes {tuple(spec.input_shape)} ({need} values)"
        )
    return torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)).reshape(len(x), *spec.input_shape)


@dataclass
class _Tensors:
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_val: torch.Tensor
    y_val: torch.Tensor


def follow_plan(config: CLNPConfig, previous: Manifest, inherit: bool = True) -> CLNPConfig:
    """`config` under the plan of the version a task is added to: the version's plan when `config` sets none and
    `inherit` holds, else `config` as it is (its own plan, or none). Raises ConfigError when the plan would be
    followed beside min_units or max_units, which a plan replaces."""
    if not (inherit and previous.plan_tasks and not config.plan_tasks):
        return config
    if config.min_units or config.max_units:
        raise ConfigError(
            f"the repository is planned for {previous.plan_tasks} tasks (version {previous.version}), and the plan "
            "sets the units each task keeps: leave out --min-units/--max-units, or give --plan-tasks 0 to end the plan")
    return dataclasses.replace(config, plan_tasks=previous.plan_tasks)


def add_task(
    repository: str | Path,
    task: str,
    source: str,
    *,
    network: str | None = None,
    config: CLNPConfig = CLNPConfig(),
    limit: int | None = None,
    data_dir: str | None = None,
    label_column: str | None = None,
    retention: int | None = None,
    show_progress: bool = False,
    device: str = "cpu",
    inherit_plan: bool = True,
) -> AddTaskResult:
    """Learn `task` from `source` into the free units of the latest version and publish the next one.

    The first call creates the repository and the network (`network`, default DEFAULT_NETWORK).
    A plan (`config.plan_tasks`) is kept by the version it publishes; with `inherit_plan` and no plan in `config`,
    the task follows the latest version's plan, so a plan set once holds for the tasks that follow it
    (`inherit_plan=False` with `plan_tasks=0` ends it).
    Raises (before anything is written): RepositoryError (not a repository, corrupt version, bad or
    duplicate task name), DataError, NetworkSpecError, InputMismatchError, CapacityExhaustedError;
    VerificationError if an earlier task changed or the export disagrees with torch.
    """
    timings: dict[str, float] = {}
    t_start = time.perf_counter()
    root = str(repository) if is_remote(repository) else Path(repository)
    validate_task_name(task)
    repo = _ensure_repository_target(root)
    previous = repo.verify() if repo is not None and repo.latest() is not None else None

    if previous is None:
        spec = parse_network_spec(network or DEFAULT_NETWORK)
    else:
        spec = parse_network_spec(previous.network)
        if network is not None and parse_network_spec(network) != spec:
            raise InputMismatchError(
                f"--network {network} differs from the repository's network {spec}; omit --network to use it"
            )
        validate_task_name(task, previous.task_names)
        config = follow_plan(config, previous, inherit_plan)

    if previous is None:
        torch.manual_seed(config.seed)
        net = MaskedNetwork(spec)
        owners = new_owners(net)
        old_tensors = {}
    else:
        net, owners = load_network(repo, previous)
        old_tensors = {k: v.clone() for k, v in net.state_tensors().items()}
    check_capacity(net, owners)  # fail fast, before loading data
    pool_extra(owners, net.num_tasks, config)  # and a plan with no share left, or a candidate pool without a plan

    t0 = time.perf_counter()
    data = load_source(source, data_dir=data_dir, limit=limit, seed=config.seed, label_column=label_column)
    tensors = _Tensors(
        fit_to_network(data.x_train, spec, f"data source {data.source!r}"),
        torch.from_numpy(data.y_train.astype(np.int64)),
        fit_to_network(data.x_val, spec, f"data source {data.source!r}"),
        torch.from_numpy(data.y_val.astype(np.int64)),
    )
    timings["load data"] = time.perf_counter() - t0

    index = net.add_head(
        data.num_classes,
        torch.from_numpy(np.broadcast_to(data.preprocessing.scale, data.feature_shape).astype(np.float32).copy()),
        torch.from_numpy(np.broadcast_to(data.preprocessing.shift, data.feature_shape).astype(np.float32).copy()),
        generator=torch.Generator().manual_seed(config.seed + 1),
    )
    t0 = time.perf_counter()
    if device != "cpu":  # train there; every check and the export run on the CPU
        on_device = _Tensors(*(t.to(device) for t in (tensors.x_train, tensors.y_train, tensors.x_val, tensors.y_val)))
        new_owner_list, outcome = learn_task(net.to_device(device), owners, index, on_device, config,
                                             show_progress=show_progress)
        net.to_device("cpu")
    else:
        new_owner_list, outcome = learn_task(net, owners, index, tensors, config, show_progress=show_progress)
    timings["learn"] = time.perf_counter() - t0

    w = distributed.world()
    if w is not None and not w.is_main:  # data-parallel: rank 0 checks and publishes; this rank waits for it
        done = distributed.main_rank_outcome(None)
        if done["error"] is not None:
            raise RankZeroFailedError(f"rank 0 did not publish: {done['error']}")
        timings["total"] = time.perf_counter() - t_start
        return AddTaskResult(Manifest.from_dict(done["manifest"]), outcome, done["test_accuracy"], done["parity"],
                             done["checked"], timings, world_size=w.size)
    try:
        probe = tensors.x_val[:PROBE_SAMPLES]
        checked = 0
        if previous is not None:
            checked = verify_earlier_tasks_unchanged(spec, old_tensors, owners, net, new_owner_list, probe)

        test_acc = None
        if data.x_test is not None and len(data.x_test):
            x_test = fit_to_network(data.x_test, spec, "test split")
            test_acc = accuracy(net, x_test, torch.from_numpy(data.y_test.astype(np.int64)), index,
                                task_masks(new_owner_list, index))

        t0 = time.perf_counter()
        onnx_bytes, max_classes = export_onnx(net, new_owner_list)
        parity = check_parity(onnx_bytes, net, new_owner_list, {t: probe for t in range(net.num_tasks)})
        graphs, graph_records = _task_graphs(repo, previous, net, new_owner_list, probe)
        timings["export"] = time.perf_counter() - t0

        created = utc_now()
        names = spec.layer_names
        new_record_fields = dict(
            name=task,
            index=index,
            classes=tuple(data.class_names),
            source=data.source,
            input_shape=tuple(spec.input_shape),
            validation_accuracy=round(outcome.validation_accuracy, 4),
            test_accuracy=None if test_acc is None else round(test_acc, 4),
            reused=dict(outcome.reused),
            created=created,
            training={
                "config": recorded_settings(config),  # with the pool the task learned with, not None
                "dropout_draws": DROPOUT_DRAWS,  # a rerun repeats the task bit for bit only with the same draws
                "limit": limit,
                "label_column": label_column,
                "device": device,
                "train_samples": int(len(tensors.x_train)),
                "validation_samples": int(len(tensors.x_val)),
                "dense_validation_accuracy": round(outcome.dense_validation_accuracy, 4),
                "units_pruned": outcome.units_pruned,
                "connections_pruned": {k: round(v, 4) for k, v in outcome.connections_pruned.items()},
                "epoch_seconds": [round(s, 2) for s in outcome.epoch_seconds],
                "phase_seconds": {k: round(v, 2) for k, v in outcome.phase_seconds.items()},
                "phase_validation_accuracy": {k: round(v, 4) for k, v in outcome.phase_validation.items()},
                "finetune_discarded_validation_accuracy": (None if outcome.finetune_discarded is None
                                                           else round(outcome.finetune_discarded, 4)),
                "teacher_validation_accuracy": (None if outcome.teacher_validation is None
                                                else round(outcome.teacher_validation, 4)),
                "units_capped_from": dict(outcome.capped),
                "seconds": round(outcome.seconds, 2),
            },
        )

        def build_manifest(version: int, weights_sha: str, onnx_sha: str) -> Manifest:
            earlier = previous.tasks if previous is not None else ()
            return Manifest(
                format_version=FORMAT_VERSION,
                version=version,
                network=str(spec),
                input_shape=tuple(spec.input_shape),
                layers=tuple(
                    LayerRecord(name=n, kind=l.kind, units=l.units, owner=tuple(int(v) for v in o.tolist()))
                    for n, l, o in zip(names, spec.layers, new_owner_list)
                ),
                tasks=tuple(dataclasses.replace(t, graph=graph_records.get(t.index)) for t in earlier)
                + (TaskRecord(version=version, graph=graph_records.get(index), **new_record_fields),),
                onnx=OnnxRecord(file=ONNX_FILE, input_name=INPUT_NAME, task_input_name=TASK_INPUT_NAME,
                                output_name=OUTPUT_NAME, max_classes=max_classes, opset=OPSET, sha256=onnx_sha),
                weights_file=WEIGHTS_FILE,
                weights_sha256=weights_sha,
                created=created,
                plan_tasks=config.plan_tasks,
            )

        t0 = time.perf_counter()
        if repo is None:
            repo = create_repository(root)
        weights = {k: v.detach().cpu().numpy() for k, v in net.state_tensors().items()}
        # The version this task was built on + 1: if another trainer published it meanwhile, fail rather than
        # publish a network without that trainer's task.
        version = 1 if previous is None else previous.version + 1
        manifest = repo.publish(build_manifest, weights, onnx_bytes, retention=retention, version=version,
                                extra_files=graphs)
        timings["publish"] = time.perf_counter() - t0
        timings["total"] = time.perf_counter() - t_start
        result = AddTaskResult(manifest, outcome, test_acc, parity, checked, timings)
    except BaseException as e:
        if w is not None:
            distributed.main_rank_outcome({"error": str(e) or type(e).__name__})
        raise
    if w is not None:
        distributed.main_rank_outcome({"error": None, "manifest": asdict(result.manifest),
                                       "test_accuracy": result.test_accuracy, "parity": result.parity_max_difference,
                                       "checked": result.earlier_tasks_checked})
        result = dataclasses.replace(result, world_size=w.size)
    return result


def _task_graphs(repo, previous: Manifest | None, net: MaskedNetwork, owners: list[torch.Tensor],
                 probe: torch.Tensor) -> tuple[dict[str, bytes], dict[int, dict]]:
    """Every task's own subnetwork graph (file name -> bytes) and its manifest record (task index -> record).

    An earlier task's graph is carried over byte for byte from the previous version: the units it sees never
    change, so neither do its answers. Tasks without one (versions before task graphs, and the new task) are
    exported and checked against torch.
    """
    graphs: dict[str, bytes] = {}
    records: dict[int, dict] = {}
    for t in range(net.num_tasks):
        old = previous.tasks[t].graph if previous is not None and t < len(previous.tasks) else None
        if old is not None:
            data, units = repo.fetch(previous, old["file"]), dict(old["units"])
        else:
            exported = export_task_graph(net, owners, t, probe)
            if exported is None:
                continue
            data, units = exported
        name = f"task-{t}.onnx"
        graphs[name] = data
        records[t] = {"file": name, "sha256": hashlib.sha256(data).hexdigest(), "size": len(data), "units": units}
    return graphs, records


def verify_earlier_tasks_unchanged(spec: NetworkSpec, old_tensors: dict[str, torch.Tensor],
                                   old_owners: list[torch.Tensor], net: MaskedNetwork,
                                   new_owners_: list[torch.Tensor], probe: torch.Tensor) -> int:
    """Check every earlier task's parameters and logits are bit-identical; returns how many tasks were checked.

    Raises VerificationError naming the first difference.
    """
    old_tasks = sum(1 for k in old_tensors if k.startswith("heads.") and k.endswith(".weight"))
    old_net = MaskedNetwork.from_state(spec, old_tensors, old_tasks)
    new = net.state_tensors()
    for i, o in enumerate(old_owners):
        owned = o >= 0
        if not torch.equal(new_owners_[i][owned], o[owned]):
            raise VerificationError(f"layer{i + 1}: ownership of earlier tasks' units changed")
        for name in (f"layers.{i}.weight", f"layers.{i}.bias"):
            if not torch.equal(new[name][owned], old_tensors[name][owned]):
                raise VerificationError(f"{name}: earlier tasks' units changed")
    for t in range(old_tasks):
        for part in ("heads.{t}.weight", "heads.{t}.bias", "preprocess.{t}.scale", "preprocess.{t}.shift"):
            name = part.format(t=t)
            if not torch.equal(new[name], old_tensors[name]):
                raise VerificationError(f"{name} changed")
        with torch.no_grad():
            before = old_net(probe, t, task_masks(old_owners, t))
            after = net(probe, t, task_masks(new_owners_, t))
        if not torch.equal(before, after):
            diff = (before - after).abs().max().item()
            raise VerificationError(f"task {t}'s logits changed (max difference {diff:.3g}); nothing was published")
    return old_tasks


def evaluate(repository: str | Path, task: str | None = None, *, data_dir: str | None = None,
             version: int | None = None) -> list[dict]:
    """Test accuracy (percent) of each task (or one) of a version, on its source's test split.

    Falls back to the validation split for sources without a test split. Raises RepositoryError,
    DataError, KeyError (unknown task).
    """
    repo = open_repository(repository)
    manifest = repo.verify(version)
    net, owners = load_network(repo, manifest)
    spec = net.spec
    tasks = manifest.tasks if task is None else (manifest.task(task),)
    results = []
    for t in tasks:
        cfg = t.training.get("config", {})
        data: TaskData = load_source(t.source, data_dir=data_dir, seed=int(cfg.get("seed", 0)),
                                     limit=t.training.get("limit"), label_column=t.training.get("label_column"))
        split = "test" if data.x_test is not None and len(data.x_test) else "validation"
        x = data.x_test if split == "test" else data.x_val
        y = data.y_test if split == "test" else data.y_val
        acc = accuracy(net, fit_to_network(x, spec, t.source), torch.from_numpy(y.astype(np.int64)), t.index,
                       task_masks(owners, t.index))
        results.append({"task": t.name, "index": t.index, "split": split, "samples": int(len(x)),
                        "accuracy": round(acc, 4), "recorded_test_accuracy": t.test_accuracy})
    return results
