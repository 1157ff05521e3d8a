"""clnp-serve --workers N: one port, every worker reloads, drains on SIGTERM, and a crash is never silent.

Each test runs clnp-serve as a real process tree. Connections are spread over the workers by the
kernel (SO_REUSEPORT), so a test that needs a given worker opens channels until the admin Status
on one names it (Status reports the worker index and pid of the process that answered).
"""

from __future__ import annotations

import os
import re
import signal
import threading
import time
import urllib.request

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from serving._generated.clnp.admin.v1 import admin_pb2, admin_pb2_grpc
from serving._generated.inference import grpc_service_pb2 as pb
from serving._generated.inference import grpc_service_pb2_grpc as pb_grpc
from serving_helpers import copy_repository, publish_copy, served_scores, start_server, template_repository

WORKERS = 2


@pytest.fixture(scope="module")
def template(tmp_path_factory):
    return template_repository(tmp_path_factory)


def status(channel) -> admin_pb2.StatusResponse:
    return admin_pb2_grpc.AdminServiceStub(channel).Status(admin_pb2.StatusRequest(), timeout=10)


def channels_to_every_worker(target: str, tries: int = 200) -> dict[int, grpc.Channel]:
    """worker index -> an open channel whose connection landed on that worker."""
    found: dict[int, grpc.Channel] = {}
    for i in range(tries):
        # a distinct channel argument keeps gRPC from sharing one subchannel (one connection) between channels
        ch = grpc.insecure_channel(target, options=[("clnp.test.channel", i)])
        worker = status(ch).worker
        if worker in found:
            ch.close()
        else:
            found[worker] = ch
        if len(found) == WORKERS:
            return found
    raise AssertionError(f"reached only workers {sorted(found)} in {tries} connections")


def wait_until(predicate, timeout: float = 30.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"condition not met within {timeout} s")


def metric(port: int, name: str, labels: str = "") -> float | None:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    m = re.search(rf"^{re.escape(name + labels)} (\S+)$", text, re.M)
    return None if m is None else float(m.group(1))


def infer(channel, task: str, x: np.ndarray) -> np.ndarray:
    request = pb.ModelInferRequest(model_name=task)
    request.inputs.add(name="input", datatype="FP32", shape=list(x.shape))
    request.raw_input_contents.append(x.astype("<f4").tobytes())
    response = pb_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request, timeout=10)
    return np.frombuffer(response.raw_output_contents[0], dtype="<f4").reshape(list(response.outputs[0].shape))


def test_workers_share_a_port_reload_together_and_report_one_set_of_metrics(template, tmp_path):
    repo = copy_repository(template, tmp_path / "repo", (2,))
    server = start_server(repo, tmp_path, "--workers", str(WORKERS), "--poll-interval", "0", "--metrics-port", "0")
    try:
        assert f"({WORKERS} workers)" in server.log()
        mport = int(re.search(r"clnp-serve metrics on \S+:(\d+)", server.log()).group(1))
        chans = channels_to_every_worker(server.target)
        pids = {w: status(ch).pid for w, ch in chans.items()}
        assert len(set(pids.values())) == WORKERS and os.getpid() not in pids.values()
        x = (np.random.default_rng(1).random((3, 784)) * 255).astype(np.float32)
        want = served_scores(repo / "2", x, "digits")
        for ch in chans.values():  # every worker answers, with the same scores
            for _ in range(5):
                np.testing.assert_array_equal(infer(ch, "digits", x), want)
        # one coherent endpoint: the requests of both workers are summed, and both were scraped
        assert metric(mport, "clnp_workers") == WORKERS
        assert metric(mport, "clnp_requests_total", '{code="OK",task="digits"}') == 5 * WORKERS
        assert metric(mport, "clnp_loaded_version") == 2

        publish_copy(template, repo, 3)  # polling is off: only the admin Reload can bring it in
        reload = admin_pb2_grpc.AdminServiceStub(chans[0]).Reload(admin_pb2.ReloadRequest(), timeout=30)
        assert reload.loaded_version == 3 and reload.changed
        assert "(worker 0 of 2)" in reload.message and "the other 1 worker was told to reload" in reload.message
        wait_until(lambda: all(status(ch).loaded_version == 3 for ch in chans.values()))
        for ch in chans.values():
            np.testing.assert_array_equal(infer(ch, "pairs", x), served_scores(repo / "3", x, "pairs"))
        wait_until(lambda: metric(mport, "clnp_loaded_version") == 3)  # the minimum over the workers
        assert metric(mport, "clnp_tasks_served") == 3
        for ch in chans.values():
            ch.close()
    finally:
        assert server.terminate() == 0, server.log()


def test_sigterm_turns_every_worker_not_serving_then_exits_0(template, tmp_path):
    repo = copy_repository(template, tmp_path / "repo", (3,))
    server = start_server(repo, tmp_path, "--workers", str(WORKERS), "--poll-interval", "0", "--shutdown-grace", "2")
    chans = channels_to_every_worker(server.target)
    seen: dict[int, list[int]] = {w: [] for w in chans}
    first = {w: threading.Event() for w in chans}

    def watch(worker: int, ch: grpc.Channel) -> None:
        try:
            for reply in health_pb2_grpc.HealthStub(ch).Watch(health_pb2.HealthCheckRequest(service=""), timeout=60):
                seen[worker].append(reply.status)
                first[worker].set()
        except grpc.RpcError:
            pass  # the stream ends when the worker stops

    threads = [threading.Thread(target=watch, args=item, daemon=True) for item in chans.items()]
    for t in threads:
        t.start()
    assert all(e.wait(10) for e in first.values())
    server.process.send_signal(signal.SIGTERM)
    rc = server.process.wait(60)
    for t in threads:
        t.join(10)
    log = server.log()
    assert rc == 0, log
    for worker, statuses in seen.items():
        assert statuses[0] == health_pb2.HealthCheckResponse.SERVING
        assert health_pb2.HealthCheckResponse.NOT_SERVING in statuses, (worker, statuses, log)
    assert log.count("serving.server: stopped") == WORKERS and "draining 2 workers" in log


def test_a_crashed_worker_is_restarted(template, tmp_path):
    repo = copy_repository(template, tmp_path / "repo", (3,))
    server = start_server(repo, tmp_path, "--workers", str(WORKERS), "--poll-interval", "0", "--metrics-port", "0")
    try:
        mport = int(re.search(r"clnp-serve metrics on \S+:(\d+)", server.log()).group(1))
        chans = channels_to_every_worker(server.target)
        victim = status(chans[1]).pid
        os.kill(victim, signal.SIGKILL)
        wait_until(lambda: "worker 1 exited unexpectedly (signal SIGKILL); restarting it" in server.log())
        wait_until(lambda: re.search(r"worker 1 serving \(pid (\d+)\)", server.log().split("restarting it")[-1]))
        wait_until(lambda: metric(mport, "clnp_workers") == WORKERS)
        assert metric(mport, "clnp_worker_restarts_total") == 1
        fresh = channels_to_every_worker(server.target)
        assert status(fresh[1]).pid != victim
        for ch in [*chans.values(), *fresh.values()]:
            ch.close()
    finally:
        assert server.terminate() == 0, server.log()


def test_a_crash_past_the_restart_budget_stops_the_server_with_exit_1(template, tmp_path):
    repo = copy_repository(template, tmp_path / "repo", (3,))
    server = start_server(repo, tmp_path, "--workers", str(WORKERS), "--poll-interval", "0",
                          "--max-worker-restarts", "0")
    chans = channels_to_every_worker(server.target)
    os.kill(status(chans[0]).pid, signal.SIGKILL)
    rc = server.process.wait(60)
    for ch in chans.values():
        ch.close()
    assert rc == 1, server.log()
    assert "worker 0 exited (signal SIGKILL) and 0 restarts in 60 s are used up: stopping the server" in server.log()


def test_a_worker_that_cannot_start_is_a_one_line_error(tmp_path):
    server_error = None
    try:
        start_server(tmp_path / "not-a-repository", tmp_path, "--workers", str(WORKERS))
    except RuntimeError as e:
        server_error = str(e)
    assert server_error is not None and "exited with 2" in server_error, server_error
    assert "clnp-serve: error:" in server_error and "Traceback" not in server_error
