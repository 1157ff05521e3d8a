"""The clnp.admin.v1.AdminService servicer and the converters of its messages.

Capacity, ListTasks, Reload and Status: each converts the request, asks the runtime (or
`serving.capacity`), and converts the answer. Errors are domain errors; `serving.server` maps
them to status codes. `capacity_from_proto` rebuilds a `CapacityReport` on the client side so
clnp-admin formats it with `serving.capacity.format_capacity`, the same code as everywhere else.
"""

from __future__ import annotations

import logging
import math
import os
from typing import Callable

from serving._generated.clnp.admin.v1 import admin_pb2 as pb
from serving._generated.clnp.admin.v1 import admin_pb2_grpc as pb_grpc
from serving.capacity import CapacityReport, LayerCapacity, TaskCapacity, capacity_report
from serving.errors import ReloadFailed, UnknownVersion
from serving.runtime import ReloadResult, Runtime, tasks_of

logger = logging.getLogger(__name__)


def capacity_to_proto(report: CapacityReport) -> pb.CapacityResponse:
    """A CapacityReport as a CapacityResponse; an unknown estimate (no task yet) becomes NaN."""
    est = report.estimated_additional_tasks
    return pb.CapacityResponse(
        version=report.version,
        layers=[
            pb.LayerCapacity(name=l.name, kind=l.kind, total=l.total, free=l.free, owned_by_task=l.owned_by_task)
            for l in report.layers
        ],
        tasks=[
            pb.TaskCapacity(
                name=t.name, index=t.index, owned_per_layer=t.owned_per_layer, reused_per_layer=t.reused_per_layer
            )
            for t in report.tasks
        ],
        estimated_additional_tasks=math.nan if est is None else est,
        estimate_basis=report.estimate_basis,
    )


def capacity_from_proto(response: pb.CapacityResponse) -> CapacityReport:
    """The CapacityReport a CapacityResponse describes (NaN estimate -> None; maps keep layer/task order)."""
    layer_names = [l.name for l in response.layers]
    task_names = [t.name for t in response.tasks]
    est = response.estimated_additional_tasks
    return CapacityReport(
        version=response.version,
        layers=tuple(
            LayerCapacity(
                name=l.name,
                kind=l.kind,
                total=l.total,
                free=l.free,
                owned_by_task={n: int(l.owned_by_task.get(n, 0)) for n in task_names},
            )
            for l in response.layers
        ),
        tasks=tuple(
            TaskCapacity(
                name=t.name,
                index=t.index,
                owned_per_layer={n: int(t.owned_per_layer.get(n, 0)) for n in layer_names},
                reused_per_layer={n: int(t.reused_per_layer.get(n, 0)) for n in layer_names},
            )
            for t in response.tasks
        ),
        estimated_additional_tasks=None if math.isnan(est) else est,
        estimate_basis=response.estimate_basis,
    )


def _parse_version(text: str) -> int | None:
    if text == "":
        return None
    if text.isdigit() and text.isascii():
        return int(text)
    raise UnknownVersion(f"version {text!r} is not a version number; versions are positive integers")


class AdminServicer(pb_grpc.AdminServiceServicer):
    """Capacity, tasks, reload and loader status of one runtime.

    `reload` is the server's reload function (it also refreshes health); by default the
    runtime's own.
    """

    def __init__(self, runtime: Runtime, reload: Callable[[bool], ReloadResult] | None = None,
                 worker: tuple[int, int] = (0, 1)) -> None:
        self._runtime = runtime
        self._worker = worker  # (index, count) of this server process
        self._reload = reload if reload is not None else (lambda force: runtime.reload(force=force))

    def Capacity(self, request, context):
        loaded = self._runtime.get_version(_parse_version(request.version))
        return capacity_to_proto(capacity_report(loaded.manifest))

    def ListTasks(self, request, context):
        versions = self._runtime.loaded_versions()
        latest = self._runtime.latest()
        return pb.ListTasksResponse(
            loaded_version=0 if latest is None else latest.version,
            available_versions=[v.version for v in versions],
            tasks=[
                pb.TaskInfo(
                    name=t.name,
                    index=t.index,
                    classes=list(t.classes),
                    input_shape=list(t.input_shape),
                    since_version=t.version,
                    versions=list(held_by),
                    validation_accuracy=t.validation_accuracy,
                    test_accuracy=math.nan if t.test_accuracy is None else t.test_accuracy,
                )
                for t, held_by in tasks_of(versions)
            ],
        )

    def Reload(self, request, context):
        """Load a newer version now (retrying versions that failed before); FAILED_PRECONDITION if none loads."""
        result = self._reload(True)
        if result.error is not None:
            raise ReloadFailed(result.message)
        return pb.ReloadResponse(
            loaded_version=result.loaded_version or 0, changed=result.changed, message=result.message
        )

    def Status(self, request, context):
        status = self._runtime.status()
        error = status.last_error
        return pb.StatusResponse(
            loaded_version=status.loaded_version or 0,
            last_reload_error="" if error is None else error.message,
            last_reload_error_version=0 if error is None else error.version,
            last_reload_time=status.last_reload_time or "",
            reloads=status.reloads,
            failed_reloads=status.failed_reloads,
            worker=self._worker[0],
            workers=self._worker[1],
            pid=os.getpid(),
        )
