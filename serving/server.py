"""The gRPC server: Open Inference Protocol, admin API, health, reflection, metrics, hot reload.

Servicers are thin: convert the request (`serving.convert`), call the data plane
(`serving.dataplane`, which owns the runtime calls, metrics, statistics and model descriptions),
convert the answer. Domain errors become status codes in one place, `status_code_for` (used by the
`ErrorMappingInterceptor` around every RPC and by the token interceptor); anything unexpected
is logged with its traceback and answered INTERNAL with a generic message.

`ClnpServer` wires it together: the runtime, the gRPC server with its services, the optional
Prometheus endpoint and the repository watcher. `clnp-serve` (serving.cli) runs one.
"""

from __future__ import annotations

import dataclasses
import hmac
import importlib.metadata
import logging
import threading
from concurrent import futures
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from serving._generated.clnp.admin.v1 import admin_pb2, admin_pb2_grpc
from serving._generated.inference import grpc_service_pb2 as pb
from serving._generated.inference import grpc_service_pb2_grpc as pb_grpc
from serving.admin import AdminServicer
from serving.convert import (
    decode_input,
    encode_infer_response,
    model_config_response,
    model_metadata_response,
    parse_version,
    request_header,
)
from serving.dataplane import DataPlane
from serving.errors import (
    InvalidInput,
    NotReady,
    ReloadFailed,
    RequestTooLarge,
    ServingError,
    Unauthenticated,
    UnknownTask,
    UnknownVersion,
)
from serving.metrics import ServingMetrics
from serving.objectstore import ObjectStoreRepository, default_cache_dir, is_remote
from serving.repository import ModelRepository
from serving.runtime import ReloadResult, Runtime, RuntimeConfig

logger = logging.getLogger(__name__)

SERVER_NAME = "clnp"
EXTENSIONS = ("statistics",)
INFERENCE_SERVICE = pb.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name
ADMIN_SERVICE = admin_pb2.DESCRIPTOR.services_by_name["AdminService"].full_name
DEFAULT_MAX_MESSAGE_BYTES = 64 * 1024 * 1024

# The one mapping of domain errors to gRPC status codes.
_STATUS_CODES: dict[type[ServingError], grpc.StatusCode] = {
    UnknownTask: grpc.StatusCode.NOT_FOUND,
    UnknownVersion: grpc.StatusCode.NOT_FOUND,
    InvalidInput: grpc.StatusCode.INVALID_ARGUMENT,
    RequestTooLarge: grpc.StatusCode.RESOURCE_EXHAUSTED,
    NotReady: grpc.StatusCode.UNAVAILABLE,
    Unauthenticated: grpc.StatusCode.UNAUTHENTICATED,
    ReloadFailed: grpc.StatusCode.FAILED_PRECONDITION,
}
GENERIC_INTERNAL_MESSAGE = "internal server error"


def status_code_for(error: BaseException) -> grpc.StatusCode:
    """The gRPC status code of an error: the domain errors' own, INTERNAL for anything else."""
    for cls in type(error).__mro__:
        if cls in _STATUS_CODES:
            return _STATUS_CODES[cls]
    return grpc.StatusCode.INTERNAL


class ErrorMappingInterceptor(grpc.ServerInterceptor):
    """Turns exceptions escaping a unary RPC into status codes (the one place this happens).

    Domain errors abort with `status_code_for` and their message; anything else is logged with
    its traceback and aborts INTERNAL with a generic message, so internals never reach a client.
    """

    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        if handler is None or handler.unary_unary is None:
            return handler
        behavior = handler.unary_unary
        method = handler_call_details.method

        def mapped(request, context):
            try:
                return behavior(request, context)
            except ServingError as e:
                code, message = status_code_for(e), str(e)
            except Exception:
                if context.code() not in (None, grpc.StatusCode.OK):  # the handler aborted with its own code
                    raise
                logger.exception("unexpected error in %s", method)
                code, message = grpc.StatusCode.INTERNAL, GENERIC_INTERNAL_MESSAGE
            context.abort(code, message)

        return handler._replace(unary_unary=mapped)


def _server_version() -> str:
    try:
        return importlib.metadata.version("clnp")
    except importlib.metadata.PackageNotFoundError:
        return "0+unknown"


def code_name(error: BaseException) -> str:
    """The gRPC status code name an error is answered with (the metrics' `code` label)."""
    return status_code_for(error).name


class InferenceServicer(pb_grpc.GRPCInferenceServiceServicer):
    """The Open Inference Protocol over the data plane: every task is a model, named by the task.

    Conversion only: the data plane resolves, runs, counts and describes.
    """

    def __init__(self, plane: DataPlane, is_shutting_down=lambda: False) -> None:
        self._plane = plane
        self._shutting_down = is_shutting_down
        self._version = _server_version()

    def ServerLive(self, request, context):
        return pb.ServerLiveResponse(live=True)

    def ServerReady(self, request, context):
        return pb.ServerReadyResponse(ready=self._plane.ready and not self._shutting_down())

    def ModelReady(self, request, context):
        ready = self._plane.model_ready(request.name, parse_version(request.version))
        return pb.ModelReadyResponse(ready=ready and not self._shutting_down())

    def ServerMetadata(self, request, context):
        return pb.ServerMetadataResponse(name=SERVER_NAME, version=self._version, extensions=list(EXTENSIONS))

    def ModelMetadata(self, request, context):
        return model_metadata_response(self._plane.describe(request.name, parse_version(request.version)))

    def ModelConfig(self, request, context):
        return model_config_response(self._plane.describe(request.name, parse_version(request.version)))

    def ModelInfer(self, request, context):
        with self._plane.call() as call:
            header = request_header(request)
            target = call.resolve(header.model_name, header.model_version)
            names = self._plane.names(target)
            x = decode_input(request, names)
            scores = call.run(target, x)
            return encode_infer_response(header.model_name, target.version, header.id, names.output_name, scores)

    def RepositoryIndex(self, request, context):
        models = [pb.RepositoryIndexResponse.ModelIndex(name=name, version=str(v), state="READY")
                  for name, v in self._plane.repository_index()]
        return pb.RepositoryIndexResponse(models=models)

    def ModelStatistics(self, request, context):
        rows = self._plane.task_statistics(request.name, parse_version(request.version))
        return pb.ModelStatisticsResponse(model_stats=[
            pb.ModelStatistics(
                name=name,
                version=str(v),
                last_inference=s.last_inference_ms,
                inference_count=s.inference_count,
                execution_count=s.execution_count,
                inference_stats=pb.InferStatistics(
                    success=pb.StatisticDuration(count=s.success_count, ns=s.success_ns),
                    fail=pb.StatisticDuration(count=s.fail_count, ns=s.fail_ns),
                    queue=pb.StatisticDuration(count=s.success_count, ns=s.queue_ns),
                    compute_input=pb.StatisticDuration(count=s.success_count, ns=s.compute_input_ns),
                    compute_infer=pb.StatisticDuration(count=s.success_count, ns=s.compute_infer_ns),
                    compute_output=pb.StatisticDuration(count=s.success_count, ns=s.compute_output_ns),
                ),
            )
            for name, v, s in rows
        ])


class TokenAuthInterceptor(grpc.ServerInterceptor):
    """Requires `authorization: Bearer TOKEN` metadata on the calls of the protected services."""

    def __init__(self, token: str, protected_services: tuple[str, ...], metrics: ServingMetrics | None = None) -> None:
        self._expected = f"Bearer {token}".encode()
        self._prefixes = tuple(f"/{s}/" for s in protected_services)
        self._metrics = metrics
        error = Unauthenticated("missing or invalid token: send metadata 'authorization: Bearer <token>'")

        def deny(request, context):
            context.abort(status_code_for(error), str(error))

        self._deny = grpc.unary_unary_rpc_method_handler(deny)

    def intercept_service(self, continuation, handler_call_details):
        method = handler_call_details.method
        if method.startswith(self._prefixes):
            presented = b""
            for key, value in handler_call_details.invocation_metadata or ():
                if key == "authorization":
                    presented = value.encode() if isinstance(value, str) else value
            if not hmac.compare_digest(presented, self._expected):
                if self._metrics is not None:
                    self._metrics.auth_failures.labels(method.split("/")[1]).inc()
                return self._deny
        return continuation(handler_call_details)


@dataclass(frozen=True)
class ServerConfig:
    """Everything `ClnpServer` needs; clnp-serve builds it from its options."""

    repository: Path | str  # the model repository to serve: a folder, or an s3:// gs:// az:// URL
    cache_dir: Path | None = None  # where an object-store repository is mirrored; None: default_cache_dir(url)
    host: str = "0.0.0.0"  # address to bind
    port: int = 50051  # gRPC port; 0 picks a free one (see ClnpServer.port)
    threads: int = 16  # gRPC worker threads
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)
    poll_interval: float = 2.0  # seconds between repository checks; 0 disables the watcher
    metrics_port: int | None = None  # Prometheus /metrics port; None: off, 0: a free one
    metrics_host: str | None = None  # default: `host`
    token: str | None = None  # admin RPCs (and inference, if required) need "authorization: Bearer TOKEN"
    require_token_for_inference: bool = False
    tls_cert: Path | None = None  # PEM certificate chain; with tls_key, serve TLS only
    tls_key: Path | None = None  # PEM private key
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES  # both directions
    shutdown_grace: float = 10.0  # seconds in-flight calls get to finish at shutdown
    reuse_port: bool = False  # bind with SO_REUSEPORT, so several server processes share the port
    worker: int = 0  # this process's index among `workers` (clnp-serve --workers)
    workers: int = 1  # server processes sharing the port

    def __post_init__(self) -> None:
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("TLS needs both a certificate and a key")
        if self.threads < 1:
            raise ValueError(f"threads must be >= 1, got {self.threads}")
        if self.poll_interval < 0:
            raise ValueError(f"poll_interval must be >= 0, got {self.poll_interval}")
        if self.max_message_bytes < 1024:
            raise ValueError(f"max_message_bytes must be >= 1024, got {self.max_message_bytes}")
        if self.token is not None and not self.token:
            raise ValueError("token must not be empty")


class _Mirror:
    """The server's local copy of an object-store repository: what the runtime loads from."""

    def __init__(self, remote: ObjectStoreRepository, cache: ModelRepository, keep_versions: int) -> None:
        self.remote = remote
        self.cache = cache
        self.keep = keep_versions
        self._failed: dict = {}  # version -> (manifest signature, why): not downloaded again until it changes
        self._lock = threading.Lock()

    def sync(self, force: bool = False):
        """Download and verify the newest versions missing from the cache; remove cached ones no longer needed."""
        from serving.objectstore import SyncResult
        from serving.repository import RepositoryError

        with self._lock:
            if force:
                self._failed.clear()
            try:
                result = self.remote.sync_to(self.cache, keep=self.keep, failed=self._failed)
            except RepositoryError as e:  # the store is unreachable: keep serving what is loaded
                logger.warning("cannot poll %s: %s", self.remote.url, e)
                return SyncResult(unreachable=str(e))
            try:
                self.cache.apply_retention(self.keep + 1)
            except OSError as e:
                logger.warning("cannot trim the cache %s: %s", self.cache.root, e)
            return result


def _join_host_port(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host and not host.startswith("[") else f"{host}:{port}"


class ClnpServer:
    """One serving process: runtime, gRPC services, metrics endpoint and repository watcher.

    `start()` raises RepositoryError when the repository cannot be opened and RuntimeError when
    the port cannot be bound. `stop()` drains: health NOT_SERVING, no new calls, in-flight calls
    finish (up to the grace period), then the runtime closes.
    """

    def __init__(self, config: ServerConfig) -> None:
        self.config = config
        self.metrics: ServingMetrics | None = None
        self.runtime: Runtime | None = None
        self.plane: DataPlane | None = None
        self.port: int | None = None
        self.metrics_port: int | None = None
        self._server: grpc.Server | None = None
        self._health = health.HealthServicer(experimental_non_blocking=True)
        self._stopping = threading.Event()
        self._stopped = threading.Event()
        self._watcher: threading.Thread | None = None
        self._lock = threading.Lock()
        # With several workers: tells the others to reload and says so in words (set by serving.workers).
        self.peer_notifier = None
        self._mirror: _Mirror | None = None

    @property
    def address(self) -> str:
        """host:port the server is bound to."""
        return _join_host_port(self.config.host, self.port)

    def start(self) -> "ClnpServer":
        """Load the repository's newest version(s) and start serving."""
        cfg = self.config
        if is_remote(cfg.repository):
            remote = ObjectStoreRepository.open(str(cfg.repository))
            cache = ModelRepository.create(cfg.cache_dir or default_cache_dir(str(cfg.repository)))
            self._mirror = _Mirror(remote, cache, cfg.runtime.keep_versions)
            self._mirror.sync()
            repository = cache
        else:
            repository = ModelRepository.open(cfg.repository)
        self.runtime = Runtime(repository, cfg.runtime, observer=lambda *a: self.metrics.observe_execution(*a))
        self.plane = DataPlane(self.runtime, code_name, cfg.max_message_bytes)
        self.metrics = self.plane.metrics
        self.runtime.start()

        interceptors: list[grpc.ServerInterceptor] = []
        if cfg.token:
            protected = (ADMIN_SERVICE, INFERENCE_SERVICE) if cfg.require_token_for_inference else (ADMIN_SERVICE,)
            interceptors.append(TokenAuthInterceptor(cfg.token, protected, self.metrics))
            if cfg.tls_cert is None:
                logger.warning("a token is required but TLS is off: the token travels in clear text")
        interceptors.append(ErrorMappingInterceptor())  # innermost: sees the servicers' exceptions
        self._server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=cfg.threads, thread_name_prefix="clnp-grpc"),
            interceptors=interceptors,
            options=[
                ("grpc.max_receive_message_length", cfg.max_message_bytes),
                ("grpc.max_send_message_length", cfg.max_message_bytes),
                ("grpc.so_reuseport", 1 if cfg.reuse_port else 0),
            ],
        )
        pb_grpc.add_GRPCInferenceServiceServicer_to_server(
            InferenceServicer(self.plane, self._stopping.is_set), self._server
        )
        admin_pb2_grpc.add_AdminServiceServicer_to_server(
            AdminServicer(self.runtime, self.admin_reload, worker=(cfg.worker, cfg.workers)), self._server
        )
        health_pb2_grpc.add_HealthServicer_to_server(self._health, self._server)
        reflection.enable_server_reflection(
            (INFERENCE_SERVICE, ADMIN_SERVICE, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
             reflection.SERVICE_NAME),
            self._server,
        )
        bind = _join_host_port(cfg.host, cfg.port)
        if cfg.tls_cert is not None:
            credentials = grpc.ssl_server_credentials([(Path(cfg.tls_key).read_bytes(), Path(cfg.tls_cert).read_bytes())])
            self.port = self._server.add_secure_port(bind, credentials)
        else:
            self.port = self._server.add_insecure_port(bind)
        if not self.port:
            raise RuntimeError(f"cannot bind {bind}")
        self._server.start()
        self._refresh_health()
        if cfg.metrics_port is not None:
            self.metrics_port = self.metrics.start_http(cfg.metrics_host or cfg.host, cfg.metrics_port)
            logger.info("metrics on %s/metrics", _join_host_port(cfg.metrics_host or cfg.host, self.metrics_port))
        if cfg.poll_interval > 0:
            self._watcher = threading.Thread(target=self._watch, name="clnp-watcher", daemon=True)
            self._watcher.start()
        logger.info("serving %s on %s (version %s)", cfg.repository, self.address, self.runtime.status().loaded_version)
        return self

    def reload(self, force: bool = False) -> ReloadResult:
        """Load a newer published version if there is one, then refresh the health status.

        With an object-store repository, new versions are first downloaded and verified into the local cache.
        """
        sync = self._mirror.sync(force=force) if self._mirror is not None else None
        result = self.runtime.reload(force=force)
        self._refresh_health()
        if sync is not None and sync.describe():
            result = dataclasses.replace(result, message=f"{result.message}; {sync.describe()}")
        return result

    def admin_reload(self, force: bool = True) -> ReloadResult:
        """An admin Reload: this process reloads, and the other workers are told to (see `peer_notifier`)."""
        result = self.reload(force=force)
        if self.peer_notifier is None:
            return result
        return dataclasses.replace(result, message=f"{result.message} (worker {self.config.worker} of "
                                   f"{self.config.workers}); {self.peer_notifier()}")

    def _refresh_health(self) -> None:
        with self._lock:
            if self._stopping.is_set():
                return
            ready = self.runtime.ready
            serving = health_pb2.HealthCheckResponse.SERVING
            not_serving = health_pb2.HealthCheckResponse.NOT_SERVING
            self._health.set("", serving if ready else not_serving)
            self._health.set(INFERENCE_SERVICE, serving if ready else not_serving)
            self._health.set(ADMIN_SERVICE, serving)

    def _watch(self) -> None:
        while not self._stopping.wait(self.config.poll_interval):
            try:
                self.reload()
            except Exception:  # the watcher must outlive any one bad poll
                logger.exception("repository poll failed")

    def stop(self, grace: float | None = None) -> None:
        """Stop serving: health NOT_SERVING, refuse new calls, let in-flight ones finish, close."""
        with self._lock:
            if self._stopping.is_set():
                self._stopped.wait()
                return
            self._stopping.set()
            self._health.enter_graceful_shutdown()
        grace = self.config.shutdown_grace if grace is None else grace
        logger.info("shutting down (grace %.1f s)", grace)
        if self._server is not None:
            self._server.stop(grace).wait()
        if self._watcher is not None:
            self._watcher.join()
        if self.runtime is not None:
            self.runtime.close()
        if self.metrics is not None:
            self.metrics.stop_http()
        self._stopped.set()
        logger.info("stopped")

    def wait_for_termination(self, timeout: float | None = None) -> bool:
        """Block until stopped; True if it stopped within `timeout`."""
        return self._stopped.wait(timeout)

    def __enter__(self) -> "ClnpServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
