"""The runtime: loaded model versions, inference on them, and hot reload.

Pure numpy and onnxruntime; no gRPC here (the servicers in `serving.server` convert the wire to
and from numpy and map the domain errors of `serving.errors` to status codes).

One ONNX Runtime session per loaded version serves every task of that version: a row's task is
an int64 index the graph uses to pick the task's masks, head and preprocessing, so there is one
copy of the weights however many tasks there are, and rows of different tasks can share a batch.

The set of loaded versions is an immutable `_Loaded` snapshot held in one attribute and replaced
by a single assignment when a new version is ready, so a request sees either the old or the new
set, never half of each. A request keeps a reference to the `LoadedVersion` it resolved, so it
finishes on the session it started with even if that version is unloaded meanwhile.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from serving.batcher import ExecutionObserver, MicroBatcher, Timing, run_unbatched
from serving.errors import InvalidInput, NotReady, RequestTooLarge, UnknownTask, UnknownVersion
from serving.repository import Manifest, ModelRepository, TaskRecord

logger = logging.getLogger(__name__)

EXECUTION_PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}


@dataclass(frozen=True)
class RuntimeConfig:
    """How versions are loaded and requests executed."""

    intra_op_threads: int = 1  # ONNX Runtime intra-op threads of each session
    keep_versions: int = 1  # loaded versions kept, newest first; 1 = only the newest
    max_batch_size: int = 256  # most rows one ORT call runs; a larger request runs as several calls, in order
    max_request_rows: int = 0  # most rows one request may hold; 0: no limit but the gRPC message size
    batching: bool = True  # run concurrent requests (of any tasks) as one ORT call
    batch_timeout_us: int = 500  # when requests queue behind the first, how long to wait for more
    execution_provider: str = "cpu"  # "cpu" or "cuda" (needs onnxruntime-gpu and a GPU)
    task_graphs: bool = True  # run each task's own subnetwork graph where the version has one (else the shared graph)

    def __post_init__(self) -> None:
        for name, low in (("intra_op_threads", 1), ("keep_versions", 1), ("max_batch_size", 1),
                          ("max_request_rows", 0), ("batch_timeout_us", 0)):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
        if self.execution_provider not in EXECUTION_PROVIDERS:
            raise ValueError(f"execution_provider must be one of {', '.join(EXECUTION_PROVIDERS)}, "
                             f"got {self.execution_provider!r}")


def check_execution_provider(name: str) -> None:
    """Raise RuntimeError, saying what to install, unless ONNX Runtime here offers provider `name`."""
    import onnxruntime as ort

    wanted = EXECUTION_PROVIDERS[name]
    if name == "cuda" and hasattr(ort, "preload_dlls"):  # CUDA and cuDNN from the nvidia-* wheels, where the system has none
        ort.preload_dlls()
    available = ort.get_available_providers()
    if wanted not in available:
        hint = " (install the onnxruntime-gpu build: pip install 'clnp[gpu]', and run where a CUDA GPU is visible)" \
            if name == "cuda" else ""
        raise RuntimeError(f"execution provider {name!r} ({wanted}) is not available in this ONNX Runtime; "
                           f"available: {', '.join(available)}{hint}")


@dataclass(frozen=True)
class ReloadError:
    """A version that failed to load, and why."""

    version: int
    message: str
    time: str  # RFC 3339 UTC


@dataclass(frozen=True)
class ReloadResult:
    """The outcome of one `Runtime.reload`."""

    loaded_version: int | None  # served by default afterwards; None while nothing is loaded
    changed: bool  # a newer version was loaded
    message: str  # what happened, in words
    error: ReloadError | None = None  # set when newer versions exist but none of them could be loaded


@dataclass(frozen=True)
class RuntimeStatus:
    """Loader state, for the admin Status RPC and the metrics."""

    loaded_version: int | None
    loaded_versions: tuple[int, ...]
    reloads: int  # successful loads of a new version (the initial load included)
    failed_reloads: int  # failed load attempts
    last_reload_time: str | None  # RFC 3339 UTC of the last load attempt
    last_error: ReloadError | None  # the most recent failure, kept after later successes


class LifecycleError(RuntimeError):
    """A Runtime method was called out of order (start twice, reload before start, start after close)."""


def _rfc3339_now() -> str:
    now = time.time()
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(now)) + f".{int(now % 1 * 1000):03d}Z"


class LoadedVersion:
    """One verified, warmed-up version: its manifest, the ORT session of the shared graph, and those of the tasks'
    own subnetwork graphs (task index -> session), which answer for their tasks where present."""

    def __init__(self, manifest: Manifest, session, task_sessions: dict | None = None) -> None:
        self.manifest = manifest
        self.session = session
        self.task_sessions = dict(task_sessions or {})
        self._tasks = {t.name: t for t in manifest.tasks}

    @property
    def version(self) -> int:
        return self.manifest.version

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.manifest.input_shape)

    @property
    def task_names(self) -> tuple[str, ...]:
        return self.manifest.task_names

    def has_task(self, name: str) -> bool:
        return name in self._tasks

    def task(self, name: str) -> TaskRecord:
        """The task called `name`; raises UnknownTask naming the tasks of this version."""
        try:
            return self._tasks[name]
        except KeyError:
            known = ", ".join(self.task_names) or "(none)"
            raise UnknownTask(f"unknown task (model) {name!r}; served tasks: {known}") from None

    def run(self, x: np.ndarray, task_index: np.ndarray) -> np.ndarray:
        """Scores of every row: x (B, *input_shape) float32, task_index (B,) int64 -> (B, max_classes) float32.

        Rows of a task with its own graph run there (one call per task in the batch), the rest on the shared graph;
        columns past a task's classes are zero either way.
        """
        onnx = self.manifest.onnx
        if not self.task_sessions:
            return self._run_shared(x, task_index)
        first = int(task_index[0])
        if first in self.task_sessions and (task_index == first).all():  # the common case: one task
            return self._run_task(first, x)
        scores = np.zeros((len(x), onnx.max_classes), dtype=np.float32)
        for t in np.unique(task_index).tolist():
            rows = np.flatnonzero(task_index == t)
            part = x[rows]
            scores[rows] = self._run_task(t, part) if t in self.task_sessions else \
                self._run_shared(part, task_index[rows])
        return scores

    def _run_shared(self, x: np.ndarray, task_index: np.ndarray) -> np.ndarray:
        onnx = self.manifest.onnx
        (scores,) = self.session.run([onnx.output_name], {onnx.input_name: x, onnx.task_input_name: task_index})
        return scores

    def _run_task(self, t: int, x: np.ndarray) -> np.ndarray:
        onnx = self.manifest.onnx
        (own,) = self.task_sessions[t].run([onnx.output_name], {onnx.input_name: x,
                                                                onnx.task_input_name: np.zeros(len(x), np.int64)})
        if own.shape[1] == onnx.max_classes:
            return own
        scores = np.zeros((len(x), onnx.max_classes), dtype=np.float32)
        scores[:, :own.shape[1]] = own
        return scores


def load_version(repository: ModelRepository, version: int, intra_op_threads: int = 1,
                 execution_provider: str = "cpu", task_graphs: bool = True) -> LoadedVersion:
    """Verify, open and warm up one version.

    Checks both files against their checksums, creates the session, checks its inputs and
    outputs against the manifest, and runs a zero batch for every task, checking the output
    shape and that every value is finite. Raises CorruptVersionError/VersionNotFoundError from
    the repository, or RuntimeError/ValueError (and onnxruntime's errors) when the model does not
    load or misbehaves.
    """
    import onnxruntime as ort  # imported here: importing this module stays cheap and side-effect free

    manifest = repository.verify(version)
    options = ort.SessionOptions()
    options.intra_op_num_threads = intra_op_threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    providers: list = [EXECUTION_PROVIDERS[execution_provider]]
    if execution_provider == "cuda":  # full float32 matmuls: TF32 would answer up to ~1e-3 away from the CPU
        providers = [(EXECUTION_PROVIDERS["cuda"], {"use_tf32": "0"})]
    if execution_provider != "cpu":
        providers.append("CPUExecutionProvider")  # ONNX Runtime places the nodes the GPU provider lacks on the CPU
    session = ort.InferenceSession(str(repository.onnx_path(manifest)), options, providers=providers)
    onnx = manifest.onnx
    inputs = {i.name: i for i in session.get_inputs()}
    outputs = {o.name for o in session.get_outputs()}
    for name, kind in ((onnx.input_name, "tensor(float)"), (onnx.task_input_name, "tensor(int64)")):
        if name not in inputs:
            raise RuntimeError(f"version {version}: the model has no input {name!r} (it has {sorted(inputs)})")
        if inputs[name].type != kind:
            raise RuntimeError(f"version {version}: input {name!r} is {inputs[name].type}, expected {kind}")
    static = inputs[onnx.input_name].shape[1:]
    if len(static) != len(manifest.input_shape) or any(
        isinstance(d, int) and d != want for d, want in zip(static, manifest.input_shape)
    ):
        raise RuntimeError(
            f"version {version}: model input shape {inputs[onnx.input_name].shape} does not fit "
            f"the manifest's input shape {list(manifest.input_shape)}"
        )
    if onnx.output_name not in outputs:
        raise RuntimeError(f"version {version}: the model has no output {onnx.output_name!r}")
    task_sessions = {}
    if task_graphs:
        for task in manifest.tasks:
            if task.graph:
                path = repository.file_path(manifest, task.graph["file"])
                task_sessions[task.index] = ort.InferenceSession(str(path), options, providers=providers)
    loaded = LoadedVersion(manifest, session, task_sessions)
    zeros = np.zeros((2, *manifest.input_shape), dtype=np.float32)
    for task in manifest.tasks:
        if len(task.classes) > onnx.max_classes:
            raise RuntimeError(f"version {version}: task {task.name!r} has more classes than the output is wide")
        scores = loaded.run(zeros, np.full(2, task.index, dtype=np.int64))
        if scores.shape != (2, onnx.max_classes) or scores.dtype != np.float32:
            raise RuntimeError(
                f"version {version}: warm-up of task {task.name!r} returned {scores.dtype} {scores.shape}, "
                f"expected float32 (2, {onnx.max_classes})"
            )
        if not np.all(np.isfinite(scores)):
            raise RuntimeError(f"version {version}: warm-up of task {task.name!r} returned non-finite scores")
        if task.index in task_sessions:  # its own graph must answer as the shared graph does (up to round-off)
            probe = np.random.default_rng(task.index).random((4, *manifest.input_shape), dtype=np.float32)
            index = np.full(4, task.index, dtype=np.int64)
            own, shared = loaded.run(probe, index), loaded._run_shared(probe, index)
            if not np.allclose(own, shared, rtol=0, atol=1e-5 + 1e-4 * float(np.abs(shared).max())):
                raise RuntimeError(f"version {version}: task {task.name!r}'s own graph disagrees with the shared "
                                   f"graph by {float(np.abs(own - shared).max()):.3g}")
    return loaded


@dataclass(frozen=True)
class Target:
    """What one request runs on: a loaded version and one of its tasks."""

    loaded: LoadedVersion
    task: TaskRecord

    @property
    def version(self) -> int:
        return self.loaded.version

    @property
    def input_shape(self) -> tuple[int, ...]:
        return self.loaded.input_shape


@dataclass(frozen=True)
class _Loaded:
    """An immutable snapshot of the loaded versions."""

    versions: dict[int, LoadedVersion] = field(default_factory=dict)  # ascending by version

    @property
    def latest(self) -> LoadedVersion | None:
        return self.versions[max(self.versions)] if self.versions else None


class Runtime:
    """The loaded versions of one repository, inference on them, and their hot reload.

    Call `start()` once (loads the newest loadable versions), `reload()` to pick up newer
    published versions (the server's watcher and the admin Reload do), `close()` at shutdown.
    """

    def __init__(
        self,
        repository: ModelRepository,
        config: RuntimeConfig | None = None,
        observer: ExecutionObserver | None = None,
    ) -> None:
        self.repository = repository
        self.config = config if config is not None else RuntimeConfig()
        self._observer = observer
        self._loaded = _Loaded()
        self._reload_lock = threading.Lock()
        self._failed: dict[int, tuple[tuple, ReloadError]] = {}  # version -> (file signature, error)
        self._reloads = 0
        self._failed_reloads = 0
        self._last_attempt: str | None = None
        self._last_error: ReloadError | None = None
        self._batcher: MicroBatcher | None = None
        self._started = False
        self._closed = False

    # ---- lifecycle -------------------------------------------------------------------------

    def start(self) -> ReloadResult:
        """Load the newest loadable version, and older ones up to `keep_versions`; start the batcher.

        Broken versions are skipped and recorded. Nothing loadable is not an error: the runtime
        stays not ready and a later `reload()` loads the first good version published.
        Raises LifecycleError when called twice or after `close()`, and RuntimeError when the
        configured execution provider is not available.
        """
        if self._started or self._closed:
            raise LifecycleError("Runtime.start() may be called once, before close()")
        check_execution_provider(self.config.execution_provider)
        self._started = True
        if self.config.batching:
            self._batcher = MicroBatcher(self.config.max_batch_size, self.config.batch_timeout_us / 1e6, self._observer)
        with self._reload_lock:
            loaded: dict[int, LoadedVersion] = {}
            for version in reversed(self._list_versions()):
                if len(loaded) >= self.config.keep_versions:
                    break
                lv = self._try_load(version, force=True)
                if lv is not None:
                    loaded[version] = lv
            self._loaded = _Loaded(dict(sorted(loaded.items())))
            latest = self._loaded.latest
            if latest is None:
                logger.warning("no loadable version in %s yet; not ready", self.repository.root)
                return ReloadResult(None, False, "no loadable version yet", self._last_error)
            return ReloadResult(latest.version, True, f"loaded versions {', '.join(map(str, self._loaded.versions))}")

    def close(self) -> None:
        """Finish queued requests and stop the batcher; later requests raise NotReady."""
        self._closed = True
        if self._batcher is not None:
            self._batcher.close()

    @property
    def ready(self) -> bool:
        """True while a version is loaded and the runtime is not closed."""
        return not self._closed and self._loaded.latest is not None

    # ---- reading the loaded state ------------------------------------------------------------

    def latest(self) -> LoadedVersion | None:
        """The version served by default (the newest loaded), or None."""
        return self._loaded.latest

    def loaded_versions(self) -> tuple[LoadedVersion, ...]:
        """All loaded versions, oldest first."""
        return tuple(self._loaded.versions.values())

    def get_version(self, version: int | None) -> LoadedVersion:
        """A loaded version (None: the newest). Raises NotReady or UnknownVersion."""
        snapshot = self._loaded
        if not snapshot.versions or self._closed:
            raise NotReady("no model version is loaded yet" if not self._closed else "the server is shutting down")
        if version is None:
            return snapshot.latest
        try:
            return snapshot.versions[version]
        except KeyError:
            raise UnknownVersion(
                f"version {version} is not loaded; loaded versions: {', '.join(map(str, snapshot.versions))}"
            ) from None

    def resolve(self, task: str, version: int | None = None) -> Target:
        """The loaded version and task record a request runs on.

        Raises NotReady, UnknownVersion (version not loaded, or it does not hold the task) or
        UnknownTask (the message names the served tasks).
        """
        loaded = self.get_version(version)
        if version is not None and not loaded.has_task(task):
            latest = self._loaded.latest
            if latest is not None and latest.has_task(task):
                raise UnknownVersion(
                    f"task {task!r} is not in version {version}; it first appears in version {latest.task(task).version}"
                )
        return Target(loaded, loaded.task(task))

    def status(self) -> RuntimeStatus:
        """Loader state: versions, reload counters and the last error."""
        snapshot = self._loaded
        latest = snapshot.latest
        return RuntimeStatus(
            loaded_version=None if latest is None else latest.version,
            loaded_versions=tuple(snapshot.versions),
            reloads=self._reloads,
            failed_reloads=self._failed_reloads,
            last_reload_time=self._last_attempt,
            last_error=self._last_error,
        )

    # ---- inference -------------------------------------------------------------------------

    def infer(self, task: str, x: np.ndarray, version: int | None = None) -> np.ndarray:
        """Scores (B, classes) of task `task` for raw features x (B, *input_shape).

        Raises NotReady, UnknownTask, UnknownVersion, InvalidInput or RequestTooLarge.
        """
        return self.run(self.resolve(task, version), x)

    def run(self, target: Target, x: np.ndarray, timing: Timing | None = None) -> np.ndarray:
        """Scores (B, classes) of `target`'s task for x (B, *input_shape), batched with others when enabled.

        `timing`, when given, is filled with the time the request waited for its ORT calls and spent in them.

        This is where a request's rows are checked against the model, once: a float32 array of
        shape (B, *input_shape) with B >= 1, and B within `max_request_rows` when that is set. A
        request of more than `max_batch_size` rows runs as several ORT calls, in order, and gets
        one answer. Raises InvalidInput, RequestTooLarge or NotReady.
        """
        if not isinstance(x, np.ndarray) or x.dtype != np.float32:
            raise InvalidInput(f"input must be a float32 array, got {getattr(x, 'dtype', type(x).__name__)}")
        shape = target.input_shape
        expected = "[-1, " + ", ".join(map(str, shape)) + "]"
        if x.ndim != len(shape) + 1 or tuple(x.shape[1:]) != shape:
            raise InvalidInput(f"input has shape {list(x.shape)}; expected {expected}")
        if len(x) == 0:
            raise InvalidInput("input has an empty batch; send at least one row")
        limit = self.config.max_request_rows
        if limit and len(x) > limit:
            raise RequestTooLarge(f"request of {len(x)} rows exceeds the server's limit of {limit} rows "
                                  f"(--max-request-rows); split the request")
        if self._closed:
            raise NotReady("the server is shutting down")
        x = np.ascontiguousarray(x)
        width = len(target.task.classes)
        if self._batcher is not None:
            return self._batcher.submit(target.loaded, x, target.task.index, width, timing).result()
        return run_unbatched(target.loaded, x, target.task.index, width, self.config.max_batch_size, self._observer,
                             timing)

    # ---- reloading -------------------------------------------------------------------------

    def reload(self, force: bool = False) -> ReloadResult:
        """Load the newest version newer than the one served, if any, and make it the default.

        Tries newer versions newest first and installs the first that verifies, loads and warms
        up; older loaded versions beyond `keep_versions` are dropped (requests already running on
        them finish). A version that failed is not tried again until one of its files changes
        (mtime or size), unless `force`. Never raises for a broken version: the result carries
        the error and the previous version keeps serving. Raises LifecycleError before `start()`.
        """
        if not self._started:
            raise LifecycleError("Runtime.reload() called before start()")
        with self._reload_lock:
            latest = self._loaded.latest
            current = None if latest is None else latest.version
            candidates = [v for v in reversed(self._list_versions()) if current is None or v > current]
            if not candidates:
                what = "no version published yet" if current is None else f"version {current} is the newest"
                return ReloadResult(current, False, f"{what}; nothing to load")
            errors: list[ReloadError] = []
            for version in candidates:
                lv = self._try_load(version, force=force)
                if lv is None:
                    errors.append(self._failed[version][1])
                    continue
                versions = dict(self._loaded.versions)
                versions[version] = lv
                keep = sorted(versions)[-self.config.keep_versions:]
                self._loaded = _Loaded({v: versions[v] for v in keep})  # the atomic swap
                dropped = sorted(set(versions) - set(keep))
                logger.info("now serving version %d (loaded: %s; unloaded: %s)", version, keep, dropped or "none")
                message = f"loaded version {version}"
                if errors:
                    message += "; skipped broken " + "; ".join(f"version {e.version}: {e.message}" for e in errors)
                return ReloadResult(version, True, message)
            still = "nothing is served" if current is None else f"still serving version {current}"
            message = f"{still}; " + "; ".join(f"version {e.version} failed to load: {e.message}" for e in errors)
            return ReloadResult(current, False, message, errors[0])

    def _list_versions(self) -> list[int]:
        try:
            return self.repository.versions()
        except OSError as e:
            logger.warning("cannot list %s: %s", self.repository.root, e)
            return []

    def _signature(self, version: int) -> tuple:
        """The version folder's files with their mtime and size: a failed version is retried once this changes."""
        vdir = self.repository.version_dir(version)
        sig = []
        try:
            names = sorted(os.listdir(vdir))
        except OSError:
            return ()
        for name in names:
            try:
                st = os.stat(vdir / name)
                sig.append((name, st.st_mtime_ns, st.st_size))
            except OSError:
                sig.append((name, None))
        return tuple(sig)

    def _try_load(self, version: int, force: bool) -> LoadedVersion | None:
        """Load one version, or record why it failed and return None (skipping known failures)."""
        signature = self._signature(version)
        known = self._failed.get(version)
        if known is not None and known[0] == signature and not force:
            return None
        self._last_attempt = _rfc3339_now()
        start = time.perf_counter()
        try:
            loaded = load_version(self.repository, version, self.config.intra_op_threads,
                                  self.config.execution_provider, self.config.task_graphs)
        except Exception as e:  # any failure means: do not serve it; the message is recorded and logged
            error = ReloadError(version, str(e) or type(e).__name__, self._last_attempt)
            self._failed[version] = (signature, error)
            self._failed_reloads += 1
            self._last_error = error
            logger.error("version %d cannot be served: %s", version, error.message)
            return None
        self._failed.pop(version, None)
        self._reloads += 1
        logger.info(
            "loaded version %d (%d tasks) in %.2f s", version, len(loaded.manifest.tasks), time.perf_counter() - start
        )
        return loaded


def tasks_of(versions: Sequence[LoadedVersion]) -> list[tuple[TaskRecord, tuple[int, ...]]]:
    """Every task of the given versions with the versions holding it, newest version's records first."""
    seen: dict[str, tuple[TaskRecord, list[int]]] = {}
    for lv in sorted(versions, key=lambda v: -v.version):
        for t in lv.manifest.tasks:
            seen.setdefault(t.name, (t, []))[1].append(lv.version)
    return sorted(((t, tuple(sorted(vs))) for t, vs in seen.values()), key=lambda item: item[0].index)


__all__ = [
    "EXECUTION_PROVIDERS",
    "ExecutionObserver",
    "LifecycleError",
    "LoadedVersion",
    "ReloadError",
    "ReloadResult",
    "Runtime",
    "RuntimeConfig",
    "RuntimeStatus",
    "Target",
    "check_execution_provider",
    "load_version",
    "tasks_of",
]
