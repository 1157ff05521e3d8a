"""The typed records of continual.json: what a run (or a merge of runs) measured.

Every record is a dataclass whose fields are the keys of its JSON object, in the order the file holds them.
`to_json()` gives that object and `from_json()` reads it back, checking every key and value type; anything that
does not fit raises `RecordError` with a one-line message naming the key (e.g.
``headline.runs[0].methods["CLNP"]: missing key 'accuracy_matrix'``).

Three field kinds go beyond a plain key:

* `optional()`: a key that only some files hold (a merged run's `merged_from`, keys older runs did not write);
  when the file leaves it out the field is `ABSENT`, and `to_json()` leaves it out again.
* `inline()`: a record whose keys sit in the parent's object (a method's CLNP or EWC details beside its
  accuracy summary); an optional inline record is None when none of its keys is there.
* `stands_for_none(...)`: the object that stands for None, such as ``{"skipped": true}`` for a section a run
  skipped, or ``{}`` for no estimate.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

# command-line name -> the method's name in continual.json; also the order methods are reported in
METHOD_FLAGS = {"clnp": "CLNP", "finetune": "fine-tuning", "ewc": "EWC", "single": "single-task"}
SKIPPED = {"skipped": True}


R = TypeVar("R", bound="Record")


class RecordError(ValueError):
    """JSON that does not hold what a record needs; the message is one line saying where and what."""


class Absent:
    """The value of an optional key that the JSON leaves out (None is JSON null). There is one: ABSENT."""

    _the: Absent | None = None

    def __new__(cls) -> Absent:
        if cls._the is None:
            cls._the = super().__new__(cls)
        return cls._the

    def __bool__(self) -> bool:
        return False

    def __repr__(self) -> str:
        return "ABSENT"


ABSENT = Absent()


def optional() -> Any:
    """A key that a file may leave out: ABSENT then, and left out again by to_json()."""
    return field(default=ABSENT, metadata={"optional": True})


def inline(required: bool = False) -> Any:
    """A record whose keys sit in the parent's JSON object; unless required, None when none of them is there."""
    if required:
        return field(metadata={"inline": True})
    return field(default=None, metadata={"inline": True})


def stands_for_none(*forms: dict) -> Any:
    """A field whose None is written as forms[0]; any of the forms reads back as None."""
    return field(metadata={"none": forms})


class Record:
    """A dataclass that reads and writes its JSON object (see the module's docstring)."""

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.metadata.get("inline"):
                if value is not None:
                    out.update(value.to_json())
            elif value is not ABSENT:
                out[f.name] = _to_json(value, f.metadata)
        return out

    @classmethod
    def json_keys(cls) -> set[str]:
        """Every key of this record's object, its inline records' included."""
        hints = _hints(cls)
        keys = set()
        for f in dataclasses.fields(cls):
            keys |= _record_class(hints[f.name]).json_keys() if f.metadata.get("inline") else {f.name}
        return keys

    @classmethod
    def from_json(cls: type[R], data: Any, where: str = "") -> R:
        """The record in data (the JSON object at `where`); RecordError if a key is missing, unexpected or of the
        wrong type."""
        if not isinstance(data, dict):
            raise RecordError(f"{where or 'the result'}: expected an object, got {_kind(data)}")
        hints = _hints(cls)
        values: dict[str, Any] = {}
        known: set[str] = set()
        for f in dataclasses.fields(cls):
            tp = hints[f.name]
            if f.metadata.get("inline"):
                sub = _record_class(tp)
                keys = sub.json_keys()
                known |= keys
                if keys & data.keys() or f.default is dataclasses.MISSING:
                    values[f.name] = sub.from_json({k: v for k, v in data.items() if k in keys}, where)
                else:
                    values[f.name] = None
                continue
            known.add(f.name)
            if f.name not in data:
                if f.metadata.get("optional"):
                    values[f.name] = ABSENT
                    continue
                raise RecordError(f"{_at(where)}missing key {f.name!r}")
            value, here = data[f.name], _key(where, f.name)
            if "none" in f.metadata and value in f.metadata["none"]:
                values[f.name] = None
            else:
                values[f.name] = _parse(tp, value, here)
        unexpected = [k for k in data if k not in known]
        if unexpected:
            raise RecordError(f"{_at(where)}unexpected key {unexpected[0]!r}")
        obj = cls(**values)
        obj.validate(where)
        return obj

    def validate(self, where: str) -> None:
        """What the keys' types alone do not say; RecordError naming where. Called by from_json."""


def record(cls):
    """The decorator of the records: a keyword-only dataclass."""
    return dataclass(kw_only=True)(cls)


# ============================================================================ the records


@record
class Stat(Record):
    """Mean and sample standard deviation over seeds (std None for one seed, everything None for none)."""

    mean: float | None
    std: float | None
    n: int


@record
class MethodStats(Record):
    """A method's headline numbers over the seeds it ran."""

    average_accuracy: Stat
    backward_transfer: Stat
    train_seconds: Stat


@record
class Summary(Record):
    """A method's accuracy matrix A[i][j] (task i after task j, j >= i, else None) and what follows from it."""

    accuracy_matrix: list[list[float | None]]
    average_accuracy: float | None  # over the tasks with an accuracy after the last task
    tasks_counted: int
    backward_transfer: float | None  # mean over i < N-1 of A[i][N-1] - A[i][i]
    train_seconds: float
    train_seconds_per_task: list[float]


@record
class ForgettingCheck(Record):
    """Task `task`'s logits on its probe batch after task `after_task`, compared with torch.equal."""

    task: int
    after_task: int
    identical: bool


@record
class TaskLearned(Record):
    """What CLNP's learning of one task did (per layer: units, reuse, connections) and what it left FREE."""

    task: int
    source: str
    validation_accuracy: float
    dense_validation_accuracy: float
    units_kept: dict[str, int]
    units_pruned: dict[str, int]
    reused: dict[str, int]
    connections_pruned: dict[str, float]
    free_after: dict[str, int]
    owned_after: dict[str, list[int]]  # layer -> units owned by each task so far
    seconds: float


@record
class CLNPReport(Record):
    """CLNP's capacity, reuse and zero-forgetting record of a sequence."""

    layers: list[str]
    layer_units: list[int]
    tasks: list[TaskLearned]
    free_per_layer_after_task: list[dict[str, int]]
    units_per_task_per_layer: dict[str, list[int]]
    reused_per_task_per_layer: list[dict[str, int]]
    zero_forgetting: list[ForgettingCheck]
    zero_forgetting_all_identical: bool
    capacity_exhausted_at_task: int | None
    capacity_exhausted_message: str


@record
class EWCReport(Record):
    """EWC's penalty strength and its Fisher estimates."""

    ewc_lambda: float
    fisher_samples: int
    fisher_seconds: list[float]
    fisher_labels: str


@record
class MethodRun(Record):
    """One method on one seed's sequence of tasks."""

    summary: Summary = inline(required=True)
    eval_seconds: float
    config: dict[str, Any]  # trainer.clnp.CLNPConfig as a dict
    clnp: CLNPReport | None = inline()
    ewc: EWCReport | None = inline()
    note: str | Absent = optional()


@record
class SeedRun(Record):
    """Every method of a scenario on one seed."""

    seed: int
    methods: dict[str, MethodRun]
    wall_seconds_by_part: dict[str, float] | Absent = optional()  # merged runs: folder -> its wall time
    wall_seconds: float

    def validate(self, where: str) -> None:
        for name, m in self.methods.items():  # CLNP and EWC carry their own records
            for method, detail, key in (("CLNP", m.clnp, "layers"), ("EWC", m.ewc, "ewc_lambda")):
                if name == method and detail is None:
                    raise RecordError(f"{_key(where, 'methods')}[{json.dumps(name)}]: missing key {key!r}")


@record
class Headline(Record):
    """The headline scenario (permuted MNIST) over its seeds."""

    scenario: str
    sources: list[str]
    network: str
    seeds: list[int]
    seed_count: int
    runs: list[SeedRun]
    summary: dict[str, MethodStats]
    zero_forgetting_all_identical: bool | None  # None: CLNP did not run

    def validate(self, where: str) -> None:
        if not self.runs:
            raise RecordError(f"{_key(where, 'runs')}: no run (a skipped section is {{\"skipped\": true}})")


@record
class CNNScenario(Record):
    """The convolutional scenario (split MNIST) over its seeds."""

    scenario: str
    sources: list[str]
    network: str
    seeds: list[int]
    runs: list[SeedRun]
    summary: dict[str, MethodStats]
    ewc_lambda: float | None
    zero_forgetting_all_identical: bool

    def validate(self, where: str) -> None:
        if not self.runs:
            raise RecordError(f"{_key(where, 'runs')}: no run (a skipped section is {{\"skipped\": true}})")
        for i, run in enumerate(self.runs):
            if "CLNP" not in run.methods:
                raise RecordError(f"{_key(where, 'runs')}[{i}].methods: no \"CLNP\" (the scenario always runs it)")


@record
class EWCSelection(Record):
    """EWC's lambda chosen on validation data (or the single value given)."""

    grid: list[float]
    tasks: int
    split: str | Absent = optional()
    criterion: str | Absent = optional()
    scores: dict[str, float] | None  # f"{lambda:g}" -> mean validation accuracy; None: no selection
    winner: float
    validation_accuracy_matrices: dict[str, list[list[float | None]]] | Absent = optional()
    seconds: float
    per_task_seconds: dict[str, list[float]] | Absent = optional()
    seed: int | Absent = optional()
    note: str | Absent = optional()


@record
class OwnSweepRun(Record):
    """The checks of a sweep row that had its own CLNP run."""

    zero_forgetting_all_identical: bool
    capacity_exhausted_at_task: int | None


@record
class SweepRow(Record):
    """CLNP with one max_drop on the sweep's tasks."""

    max_drop: float
    from_headline_run: bool
    average_accuracy: float | None
    accuracy_matrix: list[list[float | None]]
    free_after_last_task: dict[str, int] | None
    units_per_task_per_layer: dict[str, list[int]]
    validation_accuracy: list[float]
    train_seconds: float
    tasks_learned: int
    own_run: OwnSweepRun | None = inline()  # None: read off the headline run


@record
class Sweep(Record):
    """The graceful-forgetting sweep over max_drop."""

    tasks: int
    epochs: int
    seed: int
    layer_units: list[int]
    rows: list[SweepRow]


@record
class TrainingCost(Record):
    """Samples per second of CLNP's training step against a plain step of the same network."""

    network: str
    batch_size: int
    steps_per_block: int
    rounds: int
    clnp_samples_per_second: list[float]
    plain_samples_per_second: list[float]
    clnp_median: float
    plain_median: float
    clnp_time_over_plain_time: float
    what: str


@record
class NetworkTiming(Record):
    """Seconds per CLNP step, per plain step and per evaluated sample of one network."""

    clnp_step: float
    plain_step: float
    eval_per_sample: float


@record
class TaskEstimate(Record):
    """Predicted seconds per task of each kind of work."""

    clnp_first: float
    clnp_later: float
    plain: float
    ewc: float
    test_eval: float
    val_eval: float


@record
class Estimate(Record):
    """The run's wall time predicted before it ran, per section (seconds)."""

    mlp_timing: NetworkTiming
    steps_per_epoch: int
    per_task: TaskEstimate
    ewc_selection: float
    headline: float
    sweep: float
    training_cost: float
    cnn: float
    cnn_timing: NetworkTiming | Absent = optional()
    total_seconds: float
    text: str


@record
class MergedPart(Record):
    """One of the runs a merged result combines."""

    folder: str
    methods: str
    seeds: list[int]
    sections: list[str]
    wall_seconds: float
    estimate: Estimate | None = stands_for_none({})
    torch_threads: int


@record
class Machine(Record):
    """Where the run ran."""

    platform: str
    cpu_count: int | None
    torch: str
    torch_threads: int
    python: str
    numpy: str
    load_average_at_start: list[float] | None
    load_average_at_end: list[float] | None
    note: str


@record
class Settings(Record):
    """The command line of the run (as parsed, with defaults filled in) and what follows from it: one field per
    attribute of cli.parse_args's result, so a new option needs its field here (the quick-run test notices)."""

    data_dir: str | None
    out: str
    preset: str | Absent = optional()  # absent in runs from before --preset
    quick: bool
    tasks: int
    network: str
    epochs: int | None
    limit: int | None
    batch_size: int | None
    seeds: list[int]
    ewc_lambdas: str
    ewc_select_tasks: int
    ewc_fisher_samples: int
    methods: str
    no_ewc: bool
    no_single: bool
    sweep_max_drop: str
    sweep_tasks: int
    sweep_epochs: int | None
    cnn: bool
    cnn_network: str
    cnn_tasks: int
    cnn_ewc_lambda: float | None
    cost_steps: int
    cost_rounds: int
    estimate: bool
    estimate_only: bool
    merge: list[str] | None | Absent = optional()  # absent in runs from before --merge
    device: str
    threads: int
    run_clnp: bool
    run_finetune: bool
    no_single_headline: bool
    headline: bool
    clnp_config: dict[str, Any]  # trainer.clnp.CLNPConfig as a dict
    sources: list[str]


@record
class Result(Record):
    """continual.json: a whole run, or the merge of partial runs. A section the run skipped is None."""

    settings: Settings
    machine: Machine
    published: dict[str, str]
    estimate: Estimate | None = stands_for_none({})
    merged_from: list[MergedPart] | Absent = optional()
    ewc_selection: EWCSelection | None = stands_for_none({"skipped": True, "winner": None}, SKIPPED)
    headline: Headline | None = stands_for_none(SKIPPED)
    sweep: Sweep | None = stands_for_none(SKIPPED)
    training_cost: TrainingCost | None = stands_for_none(SKIPPED)
    cnn: CNNScenario | None = stands_for_none(SKIPPED)
    total_wall_seconds: float
    finished_at: float | Absent = optional()  # time.time() at the end; absent in older runs
    plots: list[str]

    def dumps(self) -> str:
        """The text of continual.json."""
        return json.dumps(self.to_json(), indent=1, default=_json_default)

    @classmethod
    def read(cls, path: Path) -> Result:
        """A continual.json; RecordError (one line, naming the file) if it is not one."""
        try:
            data = json.loads(Path(path).read_text())
        except (OSError, UnicodeDecodeError, ValueError) as e:
            raise RecordError(f"{path}: not readable as JSON: {e}") from None
        try:
            return cls.from_json(data)
        except RecordError as e:
            raise RecordError(f"{path}: {e}") from None


# ============================================================================ reading and writing values


def _to_json(value: Any, metadata: typing.Mapping = {}) -> Any:
    if value is None and "none" in metadata:
        return dict(metadata["none"][0])
    if isinstance(value, Record):
        return value.to_json()
    if isinstance(value, list):
        return [_to_json(v) for v in value]
    if isinstance(value, dict):
        return {k: _to_json(v) for k, v in value.items()}
    return value


_TYPE_NAMES = {float: "a number", int: "an integer", bool: "true or false", str: "a string"}


def _parse(tp: Any, value: Any, where: str) -> Any:
    """value checked against the type hint tp (records read with from_json); RecordError naming where."""
    if tp is Any:
        return value
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        kinds = [a for a in args if a not in (type(None), Absent)]
        if value is None:
            if type(None) in args:
                return None
            raise RecordError(f"{where}: expected {_describe(kinds[0])}, got null")
        if len(kinds) != 1:
            raise TypeError(f"record field {where}: a union of several types is not supported")
        return _parse(kinds[0], value, where)
    if origin is list:
        if not isinstance(value, list):
            raise RecordError(f"{where}: expected a list, got {_kind(value)}")
        return [_parse(args[0], v, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise RecordError(f"{where}: expected an object, got {_kind(value)}")
        return {k: _parse(args[1], v, f"{where}[{json.dumps(k)}]") for k, v in value.items()}
    if isinstance(tp, type) and issubclass(tp, Record):
        return tp.from_json(value, where)
    if tp in _TYPE_NAMES:
        ok = (isinstance(value, (int, float)) if tp is float else isinstance(value, tp)) and \
            (tp is bool or not isinstance(value, bool))
        if not ok:
            raise RecordError(f"{where}: expected {_TYPE_NAMES[tp]}, got {_kind(value)}")
        return value
    raise TypeError(f"record field {where}: unsupported type {tp!r}")


def _describe(tp: Any) -> str:
    if tp in _TYPE_NAMES:
        return _TYPE_NAMES[tp]
    return "a list" if typing.get_origin(tp) is list else "an object"


def _kind(value: Any) -> str:
    if value is None:
        return "null"
    name = {bool: "true or false", int: "a number", float: "a number", str: "a string", list: "a list",
            dict: "an object"}.get(type(value), type(value).__name__)
    shown = json.dumps(value) if isinstance(value, (bool, int, float, str)) else ""
    return f"{name} ({shown[:40]})" if shown else name


def _key(where: str, key: str) -> str:
    return f"{where}.{key}" if where else key


def _at(where: str) -> str:
    return f"{where}: " if where else ""


_HINTS: dict[type, dict[str, Any]] = {}


def _hints(cls: type) -> dict[str, Any]:
    if cls not in _HINTS:
        _HINTS[cls] = typing.get_type_hints(cls)
    return _HINTS[cls]


def _record_class(tp: Any) -> type[Record]:
    kinds = [a for a in typing.get_args(tp) if a is not type(None)] or [tp]
    return kinds[0]


def _json_default(o: Any) -> Any:
    if hasattr(o, "tolist"):  # numpy scalars and arrays, torch tensors
        return o.tolist()
    raise TypeError(f"not JSON serialisable: {type(o)}")
