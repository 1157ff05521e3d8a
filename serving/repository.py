"""The model repository: the one contract between the trainer and the server.

Layout on disk::

    REPO/
      clnp-repository.json        marker: {"format": "clnp-model-repository", "format_version": 1}
      1/                          one complete version per numbered directory
        manifest.json             what the version is (see `Manifest`); written last
        weights.safetensors       the trainable state (never pickle: a repository must not run code)
        model.onnx                one shared network with per-task masks, heads and preprocessing
        task-<i>.onnx             task i's own subnetwork (only the units it sees); named in the manifest
      2/ ...
      .staging-*/                 a version being written; never read, renamed into place when complete

A version becomes visible by one `os.rename` of a fully written and fsynced staging directory,
so a crash or Ctrl-C mid-publish never leaves a half version and never touches the previous one.
This module imports no torch: the server reads it, the trainer writes through it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import re
import shutil
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from serving.contract import FREE, visible_to

logger = logging.getLogger(__name__)

FORMAT_NAME = "clnp-model-repository"
FORMAT_VERSION = 1
MARKER_FILE = "clnp-repository.json"
MANIFEST_FILE = "manifest.json"
WEIGHTS_FILE = "weights.safetensors"
ONNX_FILE = "model.onnx"
STAGING_PREFIX = ".staging-"
TASK_NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")
TASK_NAME_RULE = "1 to 64 characters: letters, digits, '_' or '-', starting with a letter or digit"


class RepositoryError(Exception):
    """The repository is missing, not a model repository, or cannot be written."""


class VersionNotFoundError(RepositoryError):
    """A requested version does not exist in the repository."""


class CorruptVersionError(RepositoryError):
    """A version exists but its files are missing, unreadable or fail their checksums."""


class InvalidTaskNameError(RepositoryError):
    """A task name breaks the naming rule or is already taken."""


def validate_task_name(name: str, existing: tuple[str, ...] = ()) -> str:
    """Return `name` if it is a safe, unused task name.

    Raises InvalidTaskNameError saying which rule is broken.
    """
    if not isinstance(name, str) or not TASK_NAME_PATTERN.match(name):
        raise InvalidTaskNameError(f"invalid task name {name!r}: use {TASK_NAME_RULE}")
    if name in existing:
        raise InvalidTaskNameError(
            f"task name {name!r} is already taken; existing tasks: {', '.join(existing)}"
        )
    return name


@dataclass(frozen=True)
class LayerRecord:
    """One hidden layer of the shared network and who owns each of its units."""

    name: str  # "layer1", "layer2", ...
    kind: str  # "dense" (units are neurons) or "conv" (units are filters/channels)
    units: int  # number of units in the layer
    owner: tuple[int, ...]  # per unit: the index of the task that owns it, or FREE (-1)

    def owned_by(self, task_index: int) -> int:
        """Number of units owned by exactly `task_index`."""
        return sum(1 for o in self.owner if o == task_index)

    @property
    def free(self) -> int:
        """Number of units no task owns."""
        return sum(1 for o in self.owner if o == FREE)

    def mask(self, task_index: int) -> np.ndarray:
        """Task `task_index`'s view of the layer: 1.0 where the owner is a task <= task_index."""
        owner = np.asarray(self.owner, dtype=np.int64)
        return visible_to(owner, task_index).astype(np.float32)


@dataclass(frozen=True)
class TaskRecord:
    """One task learned into the network, in learning order."""

    name: str  # the task ID clients call it by
    index: int  # position in learning order; its mask is "owned by a task <= index"
    classes: tuple[str, ...]  # class names; the task's scores are output columns 0..len(classes)-1
    source: str  # the data source it was trained on
    input_shape: tuple[int, ...]  # raw features per sample (without the batch)
    validation_accuracy: float  # percent, after pruning and fine-tuning
    test_accuracy: float | None  # percent, on the source's test split when it has one
    reused: Mapping[str, int]  # layer name -> units of earlier tasks that feed this task's units
    created: str  # ISO 8601 UTC time the task was learned
    version: int  # the repository version that first held this task
    training: Mapping[str, Any] = field(default_factory=dict)  # options and figures of its training
    # The task's own subnetwork as a small ONNX graph (only the units it sees): {"file", "sha256", "size", "units"}.
    # Same inputs as the shared graph (the task input is all zeros); output (batch, len(classes)). None in
    # versions written before task graphs; the server then runs the shared graph.
    graph: Mapping[str, Any] | None = None


@dataclass(frozen=True)
class OnnxRecord:
    """How to call the exported network."""

    file: str  # file name inside the version directory
    input_name: str  # float32 (batch, *input_shape): raw features, preprocessing is in the graph
    task_input_name: str  # int64 (batch,): the task index of each row
    output_name: str  # float32 (batch, max_classes): task t's scores are columns [0, len(classes))
    max_classes: int  # width of the output
    opset: int  # ONNX opset of the graph
    sha256: str  # of the file, checked before it is served
    size: int | None = None  # bytes of the file (absent in versions written before sizes were recorded)


@dataclass(frozen=True)
class Manifest:
    """Everything a version is, except the tensors."""

    format_version: int
    version: int
    network: str  # the network spec, e.g. "mlp:784-2000-2000"
    input_shape: tuple[int, ...]  # raw input shape of every task (the network's input)
    layers: tuple[LayerRecord, ...]
    tasks: tuple[TaskRecord, ...]
    onnx: OnnxRecord
    weights_file: str
    weights_sha256: str
    created: str  # ISO 8601 UTC
    weights_size: int | None = None  # bytes of the weights file (absent in versions written before sizes were recorded)
    # The tasks the network is planned for in all (`clnp-train add-task --plan-tasks`): each task keeps an equal share
    # of the FREE units, and later tasks keep the plan unless told otherwise. 0: no plan (and in versions before plans).
    plan_tasks: int = 0

    @property
    def task_names(self) -> tuple[str, ...]:
        return tuple(t.name for t in self.tasks)

    def task(self, name: str) -> TaskRecord:
        """The task called `name`; raises KeyError naming the known tasks."""
        for t in self.tasks:
            if t.name == name:
                return t
        raise KeyError(f"no task {name!r}; known tasks: {', '.join(self.task_names) or '(none)'}")

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True)

    def files(self) -> list[tuple[str, str, int | None]]:
        """Every file of the version besides the manifest: (name, sha256, size or None)."""
        out = [(self.onnx.file, self.onnx.sha256, self.onnx.size), (self.weights_file, self.weights_sha256, self.weights_size)]
        out += [(t.graph["file"], t.graph["sha256"], t.graph.get("size")) for t in self.tasks if t.graph]
        return out

    def with_files(self, names: Mapping[str, str], sizes: Mapping[str, int]) -> "Manifest":
        """This manifest with its files renamed (`names`: old -> new; absent: kept) and their sizes set."""
        def new(name: str) -> str:
            return names.get(name, name)

        tasks = tuple(dataclasses.replace(t, graph={**t.graph, "file": new(t.graph["file"]),
                                                    "size": sizes.get(t.graph["file"], t.graph.get("size"))})
                      if t.graph else t for t in self.tasks)
        return dataclasses.replace(
            self, tasks=tasks,
            onnx=dataclasses.replace(self.onnx, file=new(self.onnx.file), size=sizes.get(self.onnx.file, self.onnx.size)),
            weights_file=new(self.weights_file), weights_size=sizes.get(self.weights_file, self.weights_size))

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "Manifest":
        """Build a Manifest from its JSON form; raises ValueError/KeyError/TypeError on bad data."""
        if data.get("format_version") != FORMAT_VERSION:
            raise ValueError(
                f"manifest format_version {data.get('format_version')!r} is not supported "
                f"(this build reads {FORMAT_VERSION})"
            )
        layers = tuple(
            LayerRecord(name=l["name"], kind=l["kind"], units=int(l["units"]), owner=tuple(int(o) for o in l["owner"]))
            for l in data["layers"]
        )
        for l in layers:
            if len(l.owner) != l.units:
                raise ValueError(f"layer {l.name}: {len(l.owner)} owners for {l.units} units")
        tasks = tuple(
            TaskRecord(
                name=t["name"],
                index=int(t["index"]),
                classes=tuple(t["classes"]),
                source=t["source"],
                input_shape=tuple(int(d) for d in t["input_shape"]),
                validation_accuracy=float(t["validation_accuracy"]),
                test_accuracy=None if t.get("test_accuracy") is None else float(t["test_accuracy"]),
                reused={str(k): int(v) for k, v in t.get("reused", {}).items()},
                created=t["created"],
                version=int(t["version"]),
                training=dict(t.get("training", {})),
                graph=None if t.get("graph") is None else dict(t["graph"]),
            )
            for t in data["tasks"]
        )
        for i, t in enumerate(tasks):
            if t.index != i:
                raise ValueError(f"task {t.name!r} has index {t.index}, expected {i}")
        return cls(
            format_version=int(data["format_version"]),
            version=int(data["version"]),
            network=str(data["network"]),
            input_shape=tuple(int(d) for d in data["input_shape"]),
            layers=layers,
            tasks=tasks,
            onnx=OnnxRecord(**data["onnx"]),
            weights_file=str(data["weights_file"]),
            weights_sha256=str(data["weights_sha256"]),
            created=str(data["created"]),
            weights_size=None if data.get("weights_size") is None else int(data["weights_size"]),
            plan_tasks=int(data.get("plan_tasks", 0)),
        )


def check_marker(raw: bytes, marker: str, root: str) -> None:
    """Raise RepositoryError unless `raw` (the marker file's bytes) describes a repository this build reads."""
    try:
        meta = json.loads(raw)
    except ValueError as e:
        raise RepositoryError(f"{marker} is unreadable: {e}") from e
    if not isinstance(meta, dict) or meta.get("format") != FORMAT_NAME:
        raise RepositoryError(f"{marker} does not describe a clnp model repository")
    if meta.get("format_version") != FORMAT_VERSION:
        raise RepositoryError(
            f"{root} has repository format {meta.get('format_version')!r}; this build reads {FORMAT_VERSION}"
        )


def version_taken(where, version: int) -> str:
    return (f"version {version} was published to {where} by another writer meanwhile; nothing written "
            f"(this task was trained onto version {version - 1 if version > 1 else 'none'}: run add-task again "
            "to train it onto the newest version)")


def utc_now() -> str:
    """The current time as ISO 8601 UTC, to the second."""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _write_synced(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class ModelRepository:
    """A directory of numbered, immutable model versions.

    Use `ModelRepository.open(root)` for an existing repository and `ModelRepository.create(root)`
    to make one (or open it, if it already is one).
    """

    def __init__(self, root: Path):
        self.root = Path(root)

    @classmethod
    def open(cls, root: str | os.PathLike) -> "ModelRepository":
        """Open an existing repository; raises RepositoryError when `root` is not one."""
        root = Path(root)
        marker = root / MARKER_FILE
        if not root.is_dir():
            raise RepositoryError(f"model repository {root} does not exist")
        if not marker.is_file():
            raise RepositoryError(f"{root} is not a clnp model repository (no {MARKER_FILE})")
        try:
            raw = marker.read_bytes()
        except OSError as e:
            raise RepositoryError(f"{marker} is unreadable: {e}") from e
        check_marker(raw, str(marker), str(root))
        return cls(root)

    @classmethod
    def create(cls, root: str | os.PathLike) -> "ModelRepository":
        """Open `root` as a repository, creating it if it is absent or an empty directory.

        Raises RepositoryError if `root` holds other files and is not a repository.
        """
        root = Path(root)
        if (root / MARKER_FILE).exists():
            return cls.open(root)
        if root.exists() and (not root.is_dir() or any(root.iterdir())):
            raise RepositoryError(f"{root} exists, is not empty and is not a clnp model repository")
        root.mkdir(parents=True, exist_ok=True)
        tmp = root / f"{MARKER_FILE}.{uuid.uuid4().hex}.tmp"
        _write_synced(tmp, json.dumps({"format": FORMAT_NAME, "format_version": FORMAT_VERSION}).encode())
        os.replace(tmp, root / MARKER_FILE)
        _fsync_dir(root)
        return cls(root)

    # ---- reading ---------------------------------------------------------------------------

    def versions(self) -> list[int]:
        """Complete versions, oldest first (numbered directories holding a manifest)."""
        found = []
        for entry in os.scandir(self.root):
            if entry.is_dir() and entry.name.isdigit() and (Path(entry.path) / MANIFEST_FILE).is_file():
                found.append(int(entry.name))
        return sorted(found)

    def latest(self) -> int | None:
        """The newest complete version, or None for an empty repository."""
        v = self.versions()
        return v[-1] if v else None

    def version_dir(self, version: int) -> Path:
        return self.root / str(version)

    def read_manifest(self, version: int | None = None) -> Manifest:
        """The manifest of `version` (default: the latest).

        Raises VersionNotFoundError or CorruptVersionError.
        """
        if version is None:
            version = self.latest()
            if version is None:
                raise VersionNotFoundError(f"model repository {self.root} holds no version yet")
        path = self.version_dir(version) / MANIFEST_FILE
        if not path.is_file():
            raise VersionNotFoundError(
                f"version {version} not found in {self.root}; versions: {self.versions() or 'none'}"
            )
        try:
            manifest = Manifest.from_dict(json.loads(path.read_text()))
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise CorruptVersionError(f"version {version}: manifest is invalid: {e}") from e
        if manifest.version != version:
            raise CorruptVersionError(f"version {version}: manifest says version {manifest.version}")
        return manifest

    def verify(self, version: int | None = None) -> Manifest:
        """Read `version`'s manifest and check both of its files against their sha256.

        Raises CorruptVersionError naming the file that is missing or altered.
        """
        manifest = self.read_manifest(version)
        vdir = self.version_dir(manifest.version)
        for name, expected, size in manifest.files():
            path = vdir / name
            if not path.is_file():
                raise CorruptVersionError(f"version {manifest.version}: {name} is missing")
            if size is not None and path.stat().st_size != size:
                raise CorruptVersionError(
                    f"version {manifest.version}: {name} has {path.stat().st_size} bytes, the manifest says {size}")
            if sha256_file(path) != expected:
                raise CorruptVersionError(f"version {manifest.version}: {name} does not match its checksum")
        return manifest

    def onnx_path(self, manifest: Manifest) -> Path:
        return self.version_dir(manifest.version) / manifest.onnx.file

    def file_path(self, manifest: Manifest, name: str) -> Path:
        return self.version_dir(manifest.version) / name

    def fetch(self, manifest: Manifest, name: str) -> bytes:
        """One of the version's files, checked against the manifest's sha256 (CorruptVersionError)."""
        expected = {n: sha for n, sha, _ in manifest.files()}
        if name not in expected:
            raise CorruptVersionError(f"version {manifest.version}: the manifest names no file {name!r}")
        try:
            data = self.file_path(manifest, name).read_bytes()
        except FileNotFoundError:
            raise CorruptVersionError(f"version {manifest.version}: {name} is missing") from None
        if hashlib.sha256(data).hexdigest() != expected[name]:
            raise CorruptVersionError(f"version {manifest.version}: {name} does not match its checksum")
        return data

    def load_weights(self, manifest: Manifest) -> dict[str, np.ndarray]:
        """The version's tensors as numpy arrays (safetensors: no code runs on load)."""
        from safetensors.numpy import load_file

        path = self.version_dir(manifest.version) / manifest.weights_file
        try:
            return load_file(str(path))
        except Exception as e:  # safetensors raises its own error types
            raise CorruptVersionError(f"version {manifest.version}: cannot read {manifest.weights_file}: {e}") from e

    # ---- writing ---------------------------------------------------------------------------

    def publish(
        self,
        build_manifest,
        weights: Mapping[str, np.ndarray],
        onnx_bytes: bytes,
        retention: int | None = None,
        version: int | None = None,
        extra_files: Mapping[str, bytes] | None = None,
    ) -> Manifest:
        """Write a new version atomically and return its manifest.

        `build_manifest(version, weights_sha256, onnx_sha256) -> Manifest` is called with the number
        the version will get and the checksums of the files written. The version is written into a
        staging directory, fsynced, and renamed into place; on any error (or KeyboardInterrupt) the
        staging directory is removed and the repository is as it was. Afterwards versions beyond
        `retention` (oldest first, never the newest) are removed.

        `extra_files` (name -> bytes) are written beside them; the manifest must name them (task graphs).
        `version` is the number to publish (the trainer passes the version it built on + 1, so a version
        published meanwhile by another trainer is never silently dropped); default: the latest + 1.
        Raises RepositoryError if another writer published that version number first.
        """
        from safetensors.numpy import save

        if version is None:
            latest = self.latest()
            version = 1 if latest is None else latest + 1
        elif version in self.versions():
            raise RepositoryError(version_taken(self.root, version))
        staging = self.root / f"{STAGING_PREFIX}{version}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        staging.mkdir()
        try:
            weights_bytes = save({k: np.ascontiguousarray(v) for k, v in weights.items()})
            _write_synced(staging / WEIGHTS_FILE, weights_bytes)
            _write_synced(staging / ONNX_FILE, onnx_bytes)
            for name, data in (extra_files or {}).items():
                _write_synced(staging / name, data)
            manifest = build_manifest(
                version, hashlib.sha256(weights_bytes).hexdigest(), hashlib.sha256(onnx_bytes).hexdigest()
            )
            if manifest.version != version:
                raise RepositoryError(f"manifest built for version {manifest.version}, expected {version}")
            sizes = {ONNX_FILE: len(onnx_bytes), WEIGHTS_FILE: len(weights_bytes),
                     **{n: len(d) for n, d in (extra_files or {}).items()}}
            manifest = manifest.with_files({}, sizes)
            self._commit(staging, manifest)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        logger.info("published version %d to %s", version, self.root)
        if retention is not None:
            self.apply_retention(retention)
        return manifest

    def _commit(self, staging: Path, manifest: Manifest) -> None:
        """Write the manifest into a staging directory holding the version's files, and rename it into place."""
        _write_synced(staging / MANIFEST_FILE, manifest.to_json().encode())
        _fsync_dir(staging)
        target = self.version_dir(manifest.version)
        if target.exists():
            raise RepositoryError(version_taken(self.root, manifest.version))
        os.rename(staging, target)  # atomic: the version appears whole or not at all
        _fsync_dir(self.root)

    def install(self, manifest: Manifest, files: Mapping[str, bytes]) -> bool:
        """Place a version that already exists elsewhere (a mirror's download) under its own number, atomically.

        The files are checked against the manifest first (CorruptVersionError). Returns False, writing nothing,
        when the version is already here (another process of the same server installed it).
        """
        expected = {name: (sha, size) for name, sha, size in manifest.files()}
        if set(files) != set(expected):
            raise CorruptVersionError(f"version {manifest.version}: expected files {sorted(expected)}, got {sorted(files)}")
        for name, data in files.items():
            sha, size = expected[name]
            if (size is not None and len(data) != size) or hashlib.sha256(data).hexdigest() != sha:
                raise CorruptVersionError(f"version {manifest.version}: {name} does not match its manifest")
        if self.version_dir(manifest.version).exists():
            return False
        staging = self.root / f"{STAGING_PREFIX}{manifest.version}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        staging.mkdir()
        try:
            for name, data in files.items():
                _write_synced(staging / name, data)
            self._commit(staging, manifest)
        except RepositoryError:
            shutil.rmtree(staging, ignore_errors=True)
            return False  # lost the rename to a sibling process installing the same version
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        return True

    def apply_retention(self, keep: int) -> list[int]:
        """Remove all but the newest `keep` versions (at least 1 is kept); returns those removed."""
        if keep < 1:
            raise RepositoryError(f"retention must keep at least 1 version, got {keep}")
        versions = self.versions()
        removed = versions[:-keep] if len(versions) > keep else []
        for v in removed:
            # Rename first so a reader never sees a version directory half deleted.
            doomed = self.root / f"{STAGING_PREFIX}removed-{v}-{uuid.uuid4().hex[:8]}"
            os.rename(self.version_dir(v), doomed)
            shutil.rmtree(doomed, ignore_errors=True)
            logger.info("removed version %d (retention %d)", v, keep)
        return removed
