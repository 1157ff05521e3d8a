from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class CapacityRequest(_message.Message):
    __slots__ = ("version",)
    VERSION_FIELD_NUMBER: _ClassVar[int]
    version: str
    def __init__(self, version: _Optional[str] = ...) -> None: ...

class LayerCapacity(_message.Message):
    __slots__ = ("name", "kind", "total", "free", "owned_by_task")
    class OwnedByTaskEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    NAME_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    TOTAL_FIELD_NUMBER: _ClassVar[int]
    FREE_FIELD_NUMBER: _ClassVar[int]
    OWNED_BY_TASK_FIELD_NUMBER: _ClassVar[int]
    name: str
    kind: str
    total: int
    free: int
    owned_by_task: _containers.ScalarMap[str, int]
    def __init__(self, name: _Optional[str] = ..., kind: _Optional[str] = ..., total: _Optional[int] = ..., free: _Optional[int] = ..., owned_by_task: _Optional[_Mapping[str, int]] = ...) -> None: ...

class TaskCapacity(_message.Message):
    __slots__ = ("name", "index", "owned_per_layer", "reused_per_layer")
    class OwnedPerLayerEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    class ReusedPerLayerEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    NAME_FIELD_NUMBER: _ClassVar[int]
    INDEX_FIELD_NUMBER: _ClassVar[int]
    OWNED_PER_LAYER_FIELD_NUMBER: _ClassVar[int]
    REUSED_PER_LAYER_FIELD_NUMBER: _ClassVar[int]
    name: str
    index: int
    owned_per_layer: _containers.ScalarMap[str, int]
    reused_per_layer: _containers.ScalarMap[str, int]
    def __init__(self, name: _Optional[str] = ..., index: _Optional[int] = ..., owned_per_layer: _Optional[_Mapping[str, int]] = ..., reused_per_layer: _Optional[_Mapping[str, int]] = ...) -> None: ...

class CapacityResponse(_message.Message):
    __slots__ = ("version", "layers", "tasks", "estimated_additional_tasks", "estimate_basis")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    LAYERS_FIELD_NUMBER: _ClassVar[int]
    TASKS_FIELD_NUMBER: _ClassVar[int]
    ESTIMATED_ADDITIONAL_TASKS_FIELD_NUMBER: _ClassVar[int]
    ESTIMATE_BASIS_FIELD_NUMBER: _ClassVar[int]
    version: int
    layers: _containers.RepeatedCompositeFieldContainer[LayerCapacity]
    tasks: _containers.RepeatedCompositeFieldContainer[TaskCapacity]
    estimated_additional_tasks: float
    estimate_basis: str
    def __init__(self, version: _Optional[int] = ..., layers: _Optional[_Iterable[_Union[LayerCapacity, _Mapping]]] = ..., tasks: _Optional[_Iterable[_Union[TaskCapacity, _Mapping]]] = ..., estimated_additional_tasks: _Optional[float] = ..., estimate_basis: _Optional[str] = ...) -> None: ...

class ListTasksRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class TaskInfo(_message.Message):
    __slots__ = ("name", "index", "classes", "input_shape", "since_version", "versions", "validation_accuracy", "test_accuracy")
    NAME_FIELD_NUMBER: _ClassVar[int]
    INDEX_FIELD_NUMBER: _ClassVar[int]
    CLASSES_FIELD_NUMBER: _ClassVar[int]
    INPUT_SHAPE_FIELD_NUMBER: _ClassVar[int]
    SINCE_VERSION_FIELD_NUMBER: _ClassVar[int]
    VERSIONS_FIELD_NUMBER: _ClassVar[int]
    VALIDATION_ACCURACY_FIELD_NUMBER: _ClassVar[int]
    TEST_ACCURACY_FIELD_NUMBER: _ClassVar[int]
    name: str
    index: int
    classes: _containers.RepeatedScalarFieldContainer[str]
    input_shape: _containers.RepeatedScalarFieldContainer[int]
    since_version: int
    versions: _containers.RepeatedScalarFieldContainer[int]
    validation_accuracy: float
    test_accuracy: float
    def __init__(self, name: _Optional[str] = ..., index: _Optional[int] = ..., classes: _Optional[_Iterable[str]] = ..., input_shape: _Optional[_Iterable[int]] = ..., since_version: _Optional[int] = ..., versions: _Optional[_Iterable[int]] = ..., validation_accuracy: _Optional[float] = ..., test_accuracy: _Optional[float] = ...) -> None: ...

class ListTasksResponse(_message.Message):
    __slots__ = ("loaded_version", "available_versions", "tasks")
    LOADED_VERSION_FIELD_NUMBER: _ClassVar[int]
    AVAILABLE_VERSIONS_FIELD_NUMBER: _ClassVar[int]
    TASKS_FIELD_NUMBER: _ClassVar[int]
    loaded_version: int
    available_versions: _containers.RepeatedScalarFieldContainer[int]
    tasks: _containers.RepeatedCompositeFieldContainer[TaskInfo]
    def __init__(self, loaded_version: _Optional[int] = ..., available_versions: _Optional[_Iterable[int]] = ..., tasks: _Optional[_Iterable[_Union[TaskInfo, _Mapping]]] = ...) -> None: ...

class ReloadRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ReloadResponse(_message.Message):
    __slots__ = ("loaded_version", "changed", "message")
    LOADED_VERSION_FIELD_NUMBER: _ClassVar[int]
    CHANGED_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    loaded_version: int
    changed: bool
    message: str
    def __init__(self, loaded_version: _Optional[int] = ..., changed: _Optional[bool] = ..., message: _Optional[str] = ...) -> None: ...

class StatusRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class StatusResponse(_message.Message):
    __slots__ = ("loaded_version", "last_reload_error", "last_reload_error_version", "last_reload_time", "reloads", "failed_reloads", "worker", "workers", "pid")
    LOADED_VERSION_FIELD_NUMBER: _ClassVar[int]
    LAST_RELOAD_ERROR_FIELD_NUMBER: _ClassVar[int]
    LAST_RELOAD_ERROR_VERSION_FIELD_NUMBER: _ClassVar[int]
    LAST_RELOAD_TIME_FIELD_NUMBER: _ClassVar[int]
    RELOADS_FIELD_NUMBER: _ClassVar[int]
    FAILED_RELOADS_FIELD_NUMBER: _ClassVar[int]
    WORKER_FIELD_NUMBER: _ClassVar[int]
    WORKERS_FIELD_NUMBER: _ClassVar[int]
    PID_FIELD_NUMBER: _ClassVar[int]
    loaded_version: int
    last_reload_error: str
    last_reload_error_version: int
    last_reload_time: str
    reloads: int
    failed_reloads: int
    worker: int
    workers: int
    pid: int
    def __init__(self, loaded_version: _Optional[int] = ..., last_reload_error: _Optional[str] = ..., last_reload_error_version: _Optional[int] = ..., last_reload_time: _Optional[str] = ..., reloads: _Optional[int] = ..., failed_reloads: _Optional[int] = ..., worker: _Optional[int] = ..., workers: _Optional[int] = ..., pid: _Optional[int] = ...) -> None: ...
