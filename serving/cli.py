"""Command-line entry points: `clnp-serve` runs the server, `clnp-admin` talks to its admin API.

Exit codes: 0 success; 1 the server could not be reached or refused the call (the message names
the gRPC status code), or the server could not start; 2 bad usage (click's own) or a path that
is not a model repository.
"""

from __future__ import annotations

import json
import logging
import math
import signal
import sys
import threading
from pathlib import Path

import click

logger = logging.getLogger(__name__)

DEFAULT_TARGET = "localhost:50051"


# ---- clnp-serve ------------------------------------------------------------------------------


@click.command(context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@click.option("--repository", "-r", required=True, envvar="CLNP_REPOSITORY", type=click.Path(file_okay=False),
              help="Model repository to serve: a folder, or an s3:// gs:// az:// URL (polled, mirrored into --cache-dir).")
@click.option("--cache-dir", type=click.Path(file_okay=False, path_type=Path), envvar="CLNP_CACHE_DIR", default=None,
              help="With an object-store repository: the local folder its versions are downloaded to and served "
                   "from [default: $XDG_CACHE_HOME/clnp/<hash of the URL>].")
@click.option("--host", default="0.0.0.0", help="Address to bind.")
@click.option("--port", default=50051, type=click.IntRange(0, 65535), help="gRPC port; 0 picks a free one.")
@click.option("--threads", default=16, type=click.IntRange(1), help="gRPC worker threads.")
@click.option("--intra-op-threads", default=1, type=click.IntRange(1), help="ONNX Runtime threads per call.")
@click.option("--keep-versions", default=1, type=click.IntRange(1),
              help="Loaded versions kept (newest first); requests may pick one with model_version.")
@click.option("--max-batch-size", default=256, type=click.IntRange(1),
              help="Most rows one ONNX Runtime call runs; a larger request runs as several calls, in order.")
@click.option("--max-request-rows", default=0, type=click.IntRange(0),
              help="Most rows one request may hold; 0: no limit but --max-message-bytes.")
@click.option("--batching/--no-batching", default=True, help="Run concurrent requests as one ONNX Runtime call.")
@click.option("--task-graphs/--no-task-graphs", default=True,
              help="Run each task on its own subnetwork graph (only the units it sees) where the version has one; "
                   "--no-task-graphs runs every task on the shared graph.")
@click.option("--batch-timeout-us", default=500, type=click.IntRange(0),
              help="Under load, how long a batch waits to fill (never when the queue is empty).")
@click.option("--poll-interval", default=2.0, type=click.FloatRange(0), help="Seconds between repository checks; 0: off.")
@click.option("--metrics-port", default=None, type=click.IntRange(0, 65535),
              help="Serve Prometheus /metrics on this port (0: a free one, printed at start) [default: off].")
@click.option("--metrics-host", default=None, help="Address of the metrics endpoint [default: --host].")
@click.option("--token", envvar="CLNP_TOKEN", default=None,
              help="Require 'authorization: Bearer TOKEN' on admin calls (prefer env CLNP_TOKEN: arguments show in ps).")
@click.option("--require-token-for-inference", is_flag=True, help="Require the token on inference calls too.")
@click.option("--tls-cert", type=click.Path(dir_okay=False, exists=True, path_type=Path), help="PEM certificate chain.")
@click.option("--tls-key", type=click.Path(dir_okay=False, exists=True, path_type=Path), help="PEM private key.")
@click.option("--max-message-bytes", default=64 * 1024 * 1024, type=click.IntRange(1024),
              help="Largest gRPC message, both directions.")
@click.option("--shutdown-grace", default=10.0, type=click.FloatRange(0),
              help="Seconds in-flight calls get to finish on SIGTERM/SIGINT.")
@click.option("--workers", default=1, type=click.IntRange(1),
              help="Server processes sharing the port (SO_REUSEPORT), each with its own runtime; about one core each.")
@click.option("--max-worker-restarts", default=5, type=click.IntRange(0),
              help="With --workers > 1: restarts of crashed workers allowed per minute before the server exits 1.")
@click.option("--execution-provider", default="cpu", type=click.Choice(["cpu", "cuda"]),
              help="ONNX Runtime execution provider; cuda needs the onnxruntime-gpu build (extra 'gpu') and a GPU.")
@click.option("--status-file", type=click.Path(dir_okay=False, path_type=Path), envvar="CLNP_STATUS_FILE", default=None,
              help="Write the bound port and TLS settings here once listening (JSON; removed at exit), for "
                   "`clnp-admin health --status-file` (the images' HEALTHCHECK) [env CLNP_STATUS_FILE].")
@click.option("--log-level", default="INFO", type=click.Choice(["DEBUG", "INFO", "WARNING", "ERROR"]))
def serve_main(repository, cache_dir, host, port, threads, intra_op_threads, keep_versions, max_batch_size, max_request_rows,
               batching, task_graphs, batch_timeout_us, poll_interval, metrics_port, metrics_host, token, require_token_for_inference,
               tls_cert, tls_key, max_message_bytes, shutdown_grace, workers, max_worker_restarts, execution_provider,
               status_file, log_level):
    """Serve every task of a CLNP model repository over the Open Inference Protocol (gRPC).

    Prints `clnp-serve listening on HOST:PORT` once it accepts calls. SIGTERM or SIGINT drains:
    health turns NOT_SERVING, new calls are refused, in-flight calls finish, exit 0.
    """
    from serving.repository import RepositoryError
    from serving.runtime import RuntimeConfig
    from serving.server import ClnpServer, ServerConfig

    logging.basicConfig(level=log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if (tls_cert is None) != (tls_key is None):
        raise click.UsageError("--tls-cert and --tls-key go together")
    if require_token_for_inference and not token:
        raise click.UsageError("--require-token-for-inference needs --token (or CLNP_TOKEN)")
    config = ServerConfig(
        repository=repository,
        cache_dir=cache_dir,
        host=host,
        port=port,
        threads=threads,
        runtime=RuntimeConfig(
            intra_op_threads=intra_op_threads,
            keep_versions=keep_versions,
            max_batch_size=max_batch_size,
            max_request_rows=max_request_rows,
            batching=batching,
            task_graphs=task_graphs,
            batch_timeout_us=batch_timeout_us,
            execution_provider=execution_provider,
        ),
        poll_interval=poll_interval,
        metrics_port=metrics_port,
        metrics_host=metrics_host,
        token=token or None,
        require_token_for_inference=require_token_for_inference,
        tls_cert=tls_cert,
        tls_key=tls_key,
        max_message_bytes=max_message_bytes,
        shutdown_grace=shutdown_grace,
    )

    if workers > 1:
        sys.exit(_serve_workers(config, workers, max_worker_restarts, log_level, status_file))
    stop = threading.Event()

    def on_signal(signum, frame):
        logger.info("received %s; draining", signal.Signals(signum).name)
        signal.signal(signal.SIGINT, signal.SIG_DFL)  # a second Ctrl-C kills at once
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    server = ClnpServer(config)
    try:
        server.start()
    except RepositoryError as e:
        click.echo(f"clnp-serve: error: {e}", err=True)
        server.stop(0)
        sys.exit(2)
    except (OSError, RuntimeError) as e:
        click.echo(f"clnp-serve: error: {e}", err=True)
        server.stop(0)
        sys.exit(1)
    _write_status(status_file, config, server.port)
    click.echo(f"clnp-serve listening on {server.address}")
    if server.metrics_port is not None:
        click.echo(f"clnp-serve metrics on {metrics_host or host}:{server.metrics_port}")
    sys.stdout.flush()
    try:
        while not stop.wait(0.5):
            pass
        server.stop()
    finally:
        _remove_status(status_file)
    sys.exit(0)


def _write_status(path: Path | None, config, port: int) -> None:
    """Record where this server listens, for `clnp-admin health --status-file` (written atomically)."""
    import os

    if path is None:
        return
    status = {"pid": os.getpid(), "host": config.host, "port": int(port), "tls": config.tls_cert is not None,
              "tls_cert": None if config.tls_cert is None else str(Path(config.tls_cert).resolve())}
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(json.dumps(status))
        os.replace(tmp, path)
    except OSError as e:  # e.g. a read-only file system: serving matters more than the health file
        logger.warning("cannot write the status file %s: %s", path, e)


def _remove_status(path: Path | None) -> None:
    import os

    try:
        if path is not None and json.loads(path.read_text()).get("pid") == os.getpid():
            path.unlink()
    except (OSError, ValueError):
        pass


def _serve_workers(config, workers: int, max_restarts: int, log_level: str, status_file: Path | None = None) -> int:
    """clnp-serve --workers N: run the supervisor (serving.workers) until SIGTERM/SIGINT; the exit code."""
    from serving.objectstore import open_repository
    from serving.repository import RepositoryError
    from serving.workers import StartupError, Supervisor

    try:
        open_repository(config.repository)  # fail fast, once, rather than in every worker
    except RepositoryError as e:
        click.echo(f"clnp-serve: error: {e}", err=True)
        return 2
    supervisor = Supervisor(config, workers, max_restarts=max_restarts, log_level=log_level)

    def on_signal(signum, frame):
        logger.info("received %s; draining %d workers", signal.Signals(signum).name, workers)
        signal.signal(signal.SIGINT, signal.SIG_DFL)  # a second Ctrl-C kills at once
        supervisor.request_stop()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGUSR1, lambda *_: supervisor.relay_reload())  # a worker answered an admin Reload
    try:
        supervisor.start()
    except StartupError as e:
        click.echo(f"clnp-serve: error: {e}", err=True)
        return e.exit_code
    except OSError as e:
        click.echo(f"clnp-serve: error: {e}", err=True)
        return 1
    _write_status(status_file, config, int(supervisor.address.rsplit(":", 1)[1]))
    click.echo(f"clnp-serve listening on {supervisor.address} ({workers} workers)")
    if supervisor.metrics_port is not None:
        click.echo(f"clnp-serve metrics on {config.metrics_host or config.host}:{supervisor.metrics_port}")
    sys.stdout.flush()
    try:
        code = supervisor.run()
    finally:
        _remove_status(status_file)
    logger.info("stopped" if code == 0 else "stopped with errors")
    return code


# ---- clnp-admin ------------------------------------------------------------------------------


class _AdminError(click.ClickException):
    """A one-line `clnp-admin: error: ...` on stderr and exit code 1."""

    def show(self, file=None) -> None:
        click.echo(f"clnp-admin: error: {self.format_message()}", err=True)


class _AdminClient:
    """A channel and stub to the admin service, turning gRPC failures into a one-line exit 1."""

    def __init__(self, target: str, token: str | None, tls_ca: Path | None, tls_server_name: str | None,
                 timeout: float) -> None:
        import grpc

        from serving._generated.clnp.admin.v1 import admin_pb2_grpc

        self.target = target
        self.timeout = timeout
        self.metadata = (("authorization", f"Bearer {token}"),) if token else ()
        options = [("grpc.ssl_target_name_override", tls_server_name)] if tls_server_name else []
        if tls_ca is not None:
            creds = grpc.ssl_channel_credentials(root_certificates=Path(tls_ca).read_bytes())
            self.channel = grpc.secure_channel(target, creds, options=options)
        else:
            self.channel = grpc.insecure_channel(target, options=options)
        self.stub = admin_pb2_grpc.AdminServiceStub(self.channel)

    def call(self, rpc: str, request):
        import grpc

        try:
            return getattr(self.stub, rpc)(request, timeout=self.timeout, metadata=self.metadata)
        except grpc.RpcError as e:
            code = e.code()
            details = " ".join((e.details() or "").split())
            if code == grpc.StatusCode.UNAVAILABLE:
                what = f"cannot reach {self.target}"
            elif code == grpc.StatusCode.DEADLINE_EXCEEDED:
                what = f"{self.target} did not answer within {self.timeout:g} s"
            else:
                what = f"{self.target} refused {rpc}"
            raise _AdminError(f"{what} ({code.name}): {details}") from None
        finally:
            self.channel.close()


def _client_options(f):
    options = [
        click.option("--target", "-t", default=DEFAULT_TARGET, envvar="CLNP_TARGET", show_default=True,
                     help="Server address HOST:PORT (env CLNP_TARGET)."),
        click.option("--token", envvar="CLNP_TOKEN", default=None, help="Bearer token (env CLNP_TOKEN)."),
        click.option("--tls-ca", type=click.Path(dir_okay=False, exists=True, path_type=Path), default=None,
                     help="PEM CA certificate: connect with TLS and trust this CA."),
        click.option("--tls-server-name", default=None, help="Name to check the server certificate against."),
        click.option("--timeout", default=10.0, type=click.FloatRange(min=0, min_open=True), show_default=True,
                     help="Seconds to wait for the answer."),
        click.option("--json", "as_json", is_flag=True, help="Print JSON instead of text."),
    ]
    for option in reversed(options):
        f = option(f)
    return f


def _echo_json(data) -> None:
    click.echo(json.dumps(data, indent=2, sort_keys=True, allow_nan=False))


def _number(value: float):
    """A float for JSON: NaN (unknown) -> None, infinity -> "unbounded"."""
    if math.isnan(value):
        return None
    if math.isinf(value):
        return "unbounded"
    return value


def _table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in [header, ["-" * w for w in widths], *rows]]
    return "\n".join(lines)


class _AdminGroup(click.Group):
    def main(self, *args, **kwargs):
        kwargs.setdefault("prog_name", "clnp-admin")
        return super().main(*args, **kwargs)


@click.group(cls=_AdminGroup, context_settings={"help_option_names": ["-h", "--help"]})
def admin_main():
    """Inspect and control a running clnp-serve: capacity, tasks, reload, status.

    Exit 1 (with the gRPC status code) when the server cannot be reached or refuses the call.
    """


@admin_main.command()
@_client_options
@click.option("--model-version", default="", help="Version to inspect [default: the newest loaded].")
def capacity(target, token, tls_ca, tls_server_name, timeout, as_json, model_version):
    """Units per layer (total, FREE, owned by each task), per task owned/reused, and how many more tasks fit."""
    from serving._generated.clnp.admin.v1 import admin_pb2
    from serving.admin import capacity_from_proto
    from serving.capacity import format_capacity

    client = _AdminClient(target, token, tls_ca, tls_server_name, timeout)
    report = capacity_from_proto(client.call("Capacity", admin_pb2.CapacityRequest(version=model_version)))
    if as_json:
        _echo_json(report.to_json())
    else:
        click.echo(format_capacity(report))


@admin_main.command()
@_client_options
def tasks(target, token, tls_ca, tls_server_name, timeout, as_json):
    """The tasks served, with their classes, versions and accuracies."""
    from serving._generated.clnp.admin.v1 import admin_pb2

    client = _AdminClient(target, token, tls_ca, tls_server_name, timeout)
    response = client.call("ListTasks", admin_pb2.ListTasksRequest())
    items = [
        {
            "name": t.name,
            "index": t.index,
            "classes": list(t.classes),
            "input_shape": list(t.input_shape),
            "since_version": t.since_version,
            "versions": list(t.versions),
            "validation_accuracy": _number(t.validation_accuracy),
            "test_accuracy": _number(t.test_accuracy),
        }
        for t in response.tasks
    ]
    if as_json:
        _echo_json({"loaded_version": response.loaded_version, "available_versions": list(response.available_versions),
                    "tasks": items})
        return
    click.echo(f"serving version {response.loaded_version} "
               f"(loaded: {', '.join(map(str, response.available_versions)) or 'none'})")
    rows = []
    for t in items:
        classes = ", ".join(t["classes"])
        if len(classes) > 40:
            classes = classes[:37] + "..."
        acc = lambda v: "-" if v is None else f"{v:.2f}"
        rows.append([t["name"], str(t["index"]), f"{len(t['classes'])}: {classes}", str(t["since_version"]),
                     ",".join(map(str, t["versions"])), acc(t["validation_accuracy"]), acc(t["test_accuracy"])])
    click.echo(_table(["task", "index", "classes", "since", "versions", "val acc %", "test acc %"], rows))


@admin_main.command()
@_client_options
def reload(target, token, tls_ca, tls_server_name, timeout, as_json):
    """Load a newer published version now (exit 1 if one exists but fails to load)."""
    from serving._generated.clnp.admin.v1 import admin_pb2

    client = _AdminClient(target, token, tls_ca, tls_server_name, timeout)
    response = client.call("Reload", admin_pb2.ReloadRequest())
    if as_json:
        _echo_json({"loaded_version": response.loaded_version, "changed": response.changed, "message": response.message})
    else:
        click.echo(response.message)


@admin_main.command()
@_client_options
def status(target, token, tls_ca, tls_server_name, timeout, as_json):
    """Loader state: version served, reload counters and the last reload error."""
    from serving._generated.clnp.admin.v1 import admin_pb2

    client = _AdminClient(target, token, tls_ca, tls_server_name, timeout)
    r = client.call("Status", admin_pb2.StatusRequest())
    data = {
        "loaded_version": r.loaded_version,
        "reloads": r.reloads,
        "failed_reloads": r.failed_reloads,
        "last_reload_time": r.last_reload_time,
        "last_reload_error": r.last_reload_error,
        "last_reload_error_version": r.last_reload_error_version,
        "worker": r.worker,
        "workers": r.workers,
        "pid": r.pid,
    }
    if as_json:
        _echo_json(data)
        return
    width = max(map(len, data))
    for key, value in data.items():
        click.echo(f"{key.ljust(width)}  {value if value not in ('', 0) or key in ('loaded_version', 'worker') else '-'}")


def _certificate_name(pem_path: str) -> str | None:
    """The first DNS name (else IP address) a PEM certificate is issued for, to check the server's TLS against."""
    from cryptography import x509

    cert = x509.load_pem_x509_certificate(Path(pem_path).read_bytes())
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        names = san.get_values_for_type(x509.DNSName) or [str(ip) for ip in san.get_values_for_type(x509.IPAddress)]
        if names:
            return names[0]
    except x509.ExtensionNotFound:
        pass
    common = cert.subject.get_attributes_for_oid(x509.oid.NameOID.COMMON_NAME)
    return str(common[0].value) if common else None


@admin_main.command()
@click.option("--target", "-t", default=None, envvar="CLNP_TARGET",
              help=f"Server address HOST:PORT [default: from --status-file, else {DEFAULT_TARGET}].")
@click.option("--status-file", type=click.Path(dir_okay=False, path_type=Path), envvar="CLNP_STATUS_FILE",
              default=None, help="The file clnp-serve --status-file writes: its port and TLS settings are used "
                                 "[env CLNP_STATUS_FILE].")
@click.option("--service", default="", show_default=True,
              help="Health service name: '' (ready: a version is loaded), or clnp.admin.v1.AdminService (alive).")
@click.option("--tls-ca", type=click.Path(dir_okay=False, exists=True, path_type=Path), default=None,
              help="PEM CA certificate [default with a TLS status file: the server's own certificate].")
@click.option("--tls-server-name", default=None,
              help="Name to check the server certificate against [default: the name in that certificate].")
@click.option("--timeout", default=4.0, type=click.FloatRange(min=0, min_open=True), show_default=True)
def health(target, status_file, service, tls_ca, tls_server_name, timeout):
    """Exit 0 when the server's gRPC health service answers SERVING, else 1 (a container HEALTHCHECK).

    With --status-file, follows how that server was started: its port (even --port 0) and TLS.
    """
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    if target is None and status_file is not None:
        try:
            status = json.loads(status_file.read_text())
            host = status["host"]
            port = int(status["port"])
        except (OSError, ValueError, KeyError) as e:
            raise _AdminError(f"cannot read the status file {status_file} ({e}); is clnp-serve running with "
                              "--status-file?") from None
        host = "127.0.0.1" if host in ("", "0.0.0.0", "::", "[::]") else host
        target = f"[{host}]:{port}" if ":" in host and not host.startswith("[") else f"{host}:{port}"
        if status.get("tls") and tls_ca is None:
            tls_ca = Path(status["tls_cert"])
            if tls_server_name is None:
                tls_server_name = _certificate_name(status["tls_cert"])
    target = target or DEFAULT_TARGET
    options = [("grpc.ssl_target_name_override", tls_server_name)] if tls_server_name else []
    if tls_ca is not None:
        channel = grpc.secure_channel(target, grpc.ssl_channel_credentials(root_certificates=Path(tls_ca).read_bytes()),
                                      options=options)
    else:
        channel = grpc.insecure_channel(target, options=options)
    try:
        reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=service),
                                                          timeout=timeout)
    except grpc.RpcError as e:
        raise _AdminError(f"{target}: health check failed ({e.code().name}): {' '.join((e.details() or '').split())}") \
            from None
    finally:
        channel.close()
    name = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    click.echo(f"{target}: {name}")
    if reply.status != health_pb2.HealthCheckResponse.SERVING:
        sys.exit(1)
