"""The serving side end to end: runtime, converters, the gRPC server over real channels, hot reload.

This module imports our generated `inference` protos; tritonclient (whose protos clash with ours
in protobuf's registry) is only ever imported in subprocesses (tests/test_triton_client.py).
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
import urllib.request
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

from serving._generated.clnp.admin.v1 import admin_pb2, admin_pb2_grpc
from serving._generated.inference import grpc_service_pb2 as pb
from serving._generated.inference import grpc_service_pb2_grpc as pb_grpc
from serving.convert import TensorNames, decode_input, encode_infer_response
from serving.errors import InvalidInput, NotReady, RequestTooLarge, UnknownTask, UnknownVersion
from serving.repository import ModelRepository
from serving.runtime import LifecycleError, Runtime, RuntimeConfig
from serving.server import ClnpServer, ErrorMappingInterceptor, ServerConfig
from serving_helpers import (
    DATA,
    ROOT,
    add_task_command,
    copy_repository,
    ort_scores,
    served_scores,
    wait_until,
    publish_copy,
    self_signed_certificate,
    start_server,
    subprocess_env,
    template_repository,
)

TASKS = ("digits", "fashion", "pairs")
CLASSES = {"digits": 10, "fashion": 10, "pairs": 2}
MAX_BATCH = 64


@pytest.fixture(scope="session")
def template(tmp_path_factory) -> Path:
    return template_repository(tmp_path_factory)


@pytest.fixture()
def repo_v1(template, tmp_path) -> Path:
    return copy_repository(template, tmp_path / "repo", (1,))


@pytest.fixture()
def repo_v2(template, tmp_path) -> Path:
    return copy_repository(template, tmp_path / "repo", (1, 2))


def rows(n: int, seed: int = 0) -> np.ndarray:
    """Raw MNIST-like features: (n, 784) float32 pixel values 0..255."""
    return (np.random.default_rng(seed).random((n, 784)) * 255).astype(np.float32)


def infer_request(task: str, x: np.ndarray, version: str = "", typed: bool = False, request_id: str = "") -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name=task, model_version=version, id=request_id)
    tensor = request.inputs.add(name="input", datatype="FP32", shape=list(x.shape))
    if typed:
        tensor.contents.fp32_contents.extend(x.ravel().tolist())
    else:
        request.raw_input_contents.append(x.astype("<f4").tobytes())
    return request


def scores_of(response: pb.ModelInferResponse) -> np.ndarray:
    out = response.outputs[0]
    return np.frombuffer(response.raw_output_contents[0], dtype="<f4").reshape(list(out.shape))


def expected(template: Path, version: int, task: str, x: np.ndarray) -> np.ndarray:
    return served_scores(template / str(version), x, task)


# ---- runtime (no gRPC) -------------------------------------------------------------------------


@pytest.mark.parametrize("batching", [False, True], ids=["unbatched", "batched"])
def test_runtime_matches_onnxruntime_for_every_task(template, batching):
    runtime = Runtime(ModelRepository.open(template), RuntimeConfig(batching=batching))
    runtime.start()
    try:
        assert runtime.ready and runtime.status().loaded_version == 3
        x = rows(5)
        for task in TASKS:
            got = runtime.infer(task, x)
            assert got.shape == (5, CLASSES[task])
            np.testing.assert_array_equal(got, expected(template, 3, task, x))
    finally:
        runtime.close()


def test_task_graphs_answer_as_the_shared_graph_does_up_to_round_off(template):
    x = rows(6)
    answers = {}
    for graphs in (True, False):
        runtime = Runtime(ModelRepository.open(template), RuntimeConfig(task_graphs=graphs, batching=False))
        runtime.start()
        try:
            answers[graphs] = {task: runtime.infer(task, x) for task in TASKS}
        finally:
            runtime.close()
    manifest = ModelRepository.open(template).read_manifest(3)
    for task in TASKS:
        record = manifest.task(task)
        shared = ort_scores(template / "3" / "model.onnx", x, record.index, len(record.classes))
        np.testing.assert_array_equal(answers[False][task], shared)  # --no-task-graphs: the shared graph
        np.testing.assert_array_equal(answers[True][task], expected(template, 3, task, x))  # the task's own graph
        np.testing.assert_allclose(answers[True][task], shared, rtol=0, atol=1e-5)
        assert (answers[True][task].argmax(1) == shared.argmax(1)).all()


def test_a_task_graph_that_disagrees_with_the_shared_graph_is_not_served(template, tmp_path):
    repo = copy_repository(template, tmp_path / "repo", (1, 2))
    # Version 2 with task 0's graph swapped for task 1's (checksums made to match): it loads, but answers wrongly.
    v2 = repo / "2"
    data = json.loads((v2 / "manifest.json").read_text())
    g0, g1 = data["tasks"][0]["graph"], data["tasks"][1]["graph"]
    (v2 / g0["file"]).write_bytes((v2 / g1["file"]).read_bytes())
    g0["sha256"], g0["size"] = g1["sha256"], g1["size"]
    (v2 / "manifest.json").write_text(json.dumps(data))
    runtime = Runtime(ModelRepository.open(repo))
    try:
        runtime.start()
        assert runtime.status().loaded_version == 1
        assert "own graph disagrees with the shared graph" in runtime.status().last_error.message
    finally:
        runtime.close()


def test_batched_results_equal_unbatched_under_concurrency(template):
    executions: list[tuple[int, int]] = []
    lock = threading.Lock()

    def observe(requests, n_rows, seconds):
        with lock:
            executions.append((requests, n_rows))

    repository = ModelRepository.open(template)
    batched = Runtime(repository, RuntimeConfig(batching=True, batch_timeout_us=2000), observer=observe)
    plain = Runtime(repository, RuntimeConfig(batching=False))
    batched.start()
    plain.start()
    rng = np.random.default_rng(1)
    jobs = [(TASKS[rng.integers(3)], rows(int(rng.integers(1, 4)), seed=i)) for i in range(400)]
    try:
        with concurrent.futures.ThreadPoolExecutor(16) as pool:
            results = list(pool.map(lambda job: batched.infer(*job), jobs))
        bitwise = 0
        for (task, x), got in zip(jobs, results):
            want = plain.infer(task, x)
            np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)
            bitwise += bool(np.array_equal(got, want))
    finally:
        batched.close()
        plain.close()
    multi = [e for e in executions if e[0] > 1]
    print(f"\n{len(jobs)} requests ran in {len(executions)} ORT calls; {len(multi)} calls held several requests "
          f"(largest: {max(e[0] for e in executions)} requests, {max(e[1] for e in executions)} rows); "
          f"{bitwise}/{len(jobs)} results bitwise equal to unbatched")
    assert sum(e[0] for e in executions) == len(jobs)
    assert multi, "under concurrency some ORT calls must hold several requests"


def test_runtime_errors(template, tmp_path):
    runtime = Runtime(ModelRepository.open(template), RuntimeConfig(batching=False, max_batch_size=3, max_request_rows=8))
    runtime.start()
    with pytest.raises(UnknownTask, match="digits, fashion, pairs"):
        runtime.infer("nope", rows(1))
    with pytest.raises(UnknownVersion, match="loaded versions: 3"):
        runtime.infer("digits", rows(1), version=1)
    with pytest.raises(InvalidInput, match="float32"):
        runtime.infer("digits", rows(1).astype(np.float64))
    with pytest.raises(InvalidInput, match="shape"):
        runtime.infer("digits", rows(1)[:, :10])
    with pytest.raises(InvalidInput, match="empty batch"):
        runtime.infer("digits", rows(0))
    with pytest.raises(RequestTooLarge, match="limit of 8 rows"):
        runtime.infer("digits", rows(9))
    x = rows(8, seed=4)  # the limit itself is served, as three calls of at most 3 rows
    np.testing.assert_array_equal(runtime.infer("digits", x), expected(template, 3, "digits", x))
    runtime.close()
    with pytest.raises(NotReady):
        runtime.infer("digits", rows(1))

    empty = ModelRepository.create(tmp_path / "empty")
    runtime = Runtime(empty)
    result = runtime.start()
    assert not runtime.ready and result.loaded_version is None
    with pytest.raises(NotReady):
        runtime.infer("digits", rows(1))
    runtime.close()


def test_runtime_lifecycle_is_explicit(template):
    runtime = Runtime(ModelRepository.open(template))
    with pytest.raises(LifecycleError):
        runtime.reload()
    runtime.start()
    with pytest.raises(LifecycleError):
        runtime.start()
    runtime.close()
    with pytest.raises(LifecycleError):
        runtime.start()


def test_runtime_keeps_versions_and_picks_by_version(template, repo_v1):
    runtime = Runtime(ModelRepository.open(repo_v1), RuntimeConfig(keep_versions=2, batching=False))
    runtime.start()
    x = rows(3)
    try:
        publish_copy(template, repo_v1, 2)
        publish_copy(template, repo_v1, 3)
        result = runtime.reload()
        assert result.changed and result.loaded_version == 3
        assert [v.version for v in runtime.loaded_versions()] == [1, 3]  # newest two loaded; 2 was skipped over
        np.testing.assert_array_equal(runtime.infer("digits", x, version=1), expected(template, 1, "digits", x))
        # the CLNP invariant, seen through the server: an earlier task's scores are bit-identical in a later version
        np.testing.assert_array_equal(runtime.infer("digits", x, version=3), runtime.infer("digits", x, version=1))
        with pytest.raises(UnknownVersion, match="first appears in version 2"):
            runtime.infer("fashion", x, version=1)
        with pytest.raises(UnknownVersion):
            runtime.infer("digits", x, version=2)
    finally:
        runtime.close()


def test_runtime_skips_corrupt_version_and_retries_only_when_it_changes(template, repo_v2):
    publish_copy(template, repo_v2, 3, corrupt="onnx")
    runtime = Runtime(ModelRepository.open(repo_v2), RuntimeConfig(batching=False))
    runtime.start()
    try:
        status = runtime.status()
        assert status.loaded_version == 2  # fell back to the newest good version
        assert status.last_error.version == 3 and "checksum" in status.last_error.message
        assert status.failed_reloads == 1
        for _ in range(3):  # polling does not retry an unchanged broken version
            result = runtime.reload()
            assert not result.changed and result.error.version == 3
        assert runtime.status().failed_reloads == 1
        manifest = repo_v2 / "3" / "manifest.json"
        st = manifest.stat()
        os.utime(manifest, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
        assert not runtime.reload().changed
        assert runtime.status().failed_reloads == 2  # retried once because the manifest changed
    finally:
        runtime.close()


# ---- converters ----------------------------------------------------------------------------------


SPEC = TensorNames("input", "scores")


def test_decode_input_raw_typed_and_other_datatypes():
    x = np.round(rows(2))
    np.testing.assert_array_equal(decode_input(infer_request("t", x), SPEC), x)
    np.testing.assert_array_equal(decode_input(infer_request("t", x, typed=True), SPEC), x)
    for datatype, dtype, field in (("UINT8", "u1", "uint_contents"), ("FP64", "<f8", "fp64_contents"),
                                   ("INT64", "<i8", "int64_contents")):
        raw = pb.ModelInferRequest(model_name="t")
        raw.inputs.add(name="input", datatype=datatype, shape=[2, 784])
        raw.raw_input_contents.append(x.astype(dtype).tobytes())
        np.testing.assert_array_equal(decode_input(raw, SPEC), x)
        typed = pb.ModelInferRequest(model_name="t")
        tensor = typed.inputs.add(name="input", datatype=datatype, shape=[2, 784])
        getattr(tensor.contents, field).extend(x.astype(dtype).ravel().tolist())
        np.testing.assert_array_equal(decode_input(typed, SPEC), x)


def test_encode_infer_response_is_raw_fp32():
    scores = np.arange(6, dtype=np.float32).reshape(2, 3)
    response = encode_infer_response("digits", 3, "abc", "scores", scores)
    assert (response.model_name, response.model_version, response.id) == ("digits", "3", "abc")
    assert response.outputs[0].name == "scores" and response.outputs[0].datatype == "FP32"
    assert list(response.outputs[0].shape) == [2, 3]
    np.testing.assert_array_equal(scores_of(response), scores)


# ---- the gRPC server ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def server(template, tmp_path_factory):
    repo = copy_repository(template, tmp_path_factory.mktemp("served") / "repo", (1, 2, 3))
    config = ServerConfig(repository=repo, host="127.0.0.1", port=0, poll_interval=0, metrics_port=0,
                          runtime=RuntimeConfig(max_batch_size=MAX_BATCH))
    with ClnpServer(config) as s:
        yield s


@pytest.fixture(scope="module")
def channel(server):
    with grpc.insecure_channel(server.address) as ch:
        yield ch


@pytest.fixture(scope="module")
def stub(channel):
    return pb_grpc.GRPCInferenceServiceStub(channel)


def test_live_ready_and_server_metadata(stub):
    assert stub.ServerLive(pb.ServerLiveRequest()).live
    assert stub.ServerReady(pb.ServerReadyRequest()).ready
    for task in TASKS:
        assert stub.ModelReady(pb.ModelReadyRequest(name=task)).ready
        assert stub.ModelReady(pb.ModelReadyRequest(name=task, version="3")).ready
    assert not stub.ModelReady(pb.ModelReadyRequest(name="nope")).ready
    assert not stub.ModelReady(pb.ModelReadyRequest(name="digits", version="9")).ready
    meta = stub.ServerMetadata(pb.ServerMetadataRequest())
    assert meta.name == "clnp" and meta.version and "statistics" in meta.extensions


def test_model_metadata(stub):
    for task in TASKS:
        meta = stub.ModelMetadata(pb.ModelMetadataRequest(name=task))
        assert meta.name == task and meta.platform == "onnxruntime_onnx" and list(meta.versions) == ["3"]
        assert [(i.name, i.datatype, list(i.shape)) for i in meta.inputs] == [("input", "FP32", [-1, 784])]
        assert [(o.name, o.datatype, list(o.shape)) for o in meta.outputs] == [("scores", "FP32", [-1, CLASSES[task]])]
    with pytest.raises(grpc.RpcError) as e:
        stub.ModelMetadata(pb.ModelMetadataRequest(name="nope"))
    assert e.value.code() == grpc.StatusCode.NOT_FOUND


@pytest.mark.parametrize("typed", [False, True], ids=["raw", "typed"])
def test_model_infer_matches_onnxruntime(stub, template, typed):
    x = rows(4, seed=7)
    for task in TASKS:
        response = stub.ModelInfer(infer_request(task, x, typed=typed, request_id=f"req-{task}"))
        assert (response.model_name, response.model_version, response.id) == (task, "3", f"req-{task}")
        np.testing.assert_array_equal(scores_of(response), expected(template, 3, task, x))


def _bad(kind: str) -> tuple[pb.ModelInferRequest, grpc.StatusCode, str]:
    x = rows(2)
    if kind == "unknown task":
        return infer_request("nope", x), grpc.StatusCode.NOT_FOUND, "digits, fashion, pairs"
    if kind == "unknown version":
        return infer_request("digits", x, version="7"), grpc.StatusCode.NOT_FOUND, "version 7"
    if kind == "wrong datatype":
        r = pb.ModelInferRequest(model_name="digits")
        r.inputs.add(name="input", datatype="BYTES", shape=[2, 784])
        r.raw_input_contents.append(x.tobytes())
        return r, grpc.StatusCode.INVALID_ARGUMENT, "datatype 'BYTES'"
    if kind == "wrong shape":
        r = infer_request("digits", x)
        r.inputs[0].shape[:] = [2, 28, 28]
        return r, grpc.StatusCode.INVALID_ARGUMENT, "expected [-1, 784]"
    if kind == "wrong element count":
        r = infer_request("digits", x)
        r.raw_input_contents[0] = r.raw_input_contents[0][:-4]
        return r, grpc.StatusCode.INVALID_ARGUMENT, "needs 6272 bytes"
    if kind == "wrong typed count":
        r = infer_request("digits", x, typed=True)
        del r.inputs[0].contents.fp32_contents[-1]
        return r, grpc.StatusCode.INVALID_ARGUMENT, "needs 1568"
    if kind == "missing input":
        return pb.ModelInferRequest(model_name="digits"), grpc.StatusCode.INVALID_ARGUMENT, "missing input 'input'"
    if kind == "extra input":
        r = infer_request("digits", x)
        r.inputs.add(name="task", datatype="INT64", shape=[2])
        r.raw_input_contents.append(np.zeros(2, "<i8").tobytes())
        return r, grpc.StatusCode.INVALID_ARGUMENT, "exactly one input"
    if kind == "wrong input name":
        r = infer_request("digits", x)
        r.inputs[0].name = "pixels"
        return r, grpc.StatusCode.INVALID_ARGUMENT, "unknown input 'pixels'"
    if kind == "no data":
        r = pb.ModelInferRequest(model_name="digits")
        r.inputs.add(name="input", datatype="FP32", shape=[2, 784])
        return r, grpc.StatusCode.INVALID_ARGUMENT, "no data"
    if kind == "empty batch":
        return infer_request("digits", rows(0)), grpc.StatusCode.INVALID_ARGUMENT, "empty batch"
    if kind == "negative dimension":
        r = infer_request("digits", x)
        r.inputs[0].shape[:] = [-1, 784]
        return r, grpc.StatusCode.INVALID_ARGUMENT, "dimensions are [batch, ...] >= 0"
    raise ValueError(kind)


BAD_KINDS = ["unknown task", "unknown version", "wrong datatype", "wrong shape", "wrong element count",
             "wrong typed count", "missing input", "extra input", "wrong input name", "no data", "empty batch",
             "negative dimension"]


@pytest.mark.parametrize("kind", BAD_KINDS)
def test_bad_request_then_good_request(stub, template, kind):
    request, code, text = _bad(kind)
    with pytest.raises(grpc.RpcError) as e:
        stub.ModelInfer(request)
    assert e.value.code() == code, e.value.details()
    assert text in e.value.details()
    x = rows(MAX_BATCH, seed=3)  # the largest allowed batch still works right after
    np.testing.assert_array_equal(scores_of(stub.ModelInfer(infer_request("digits", x))), expected(template, 3, "digits", x))


def _samples(text: str) -> dict[tuple[str, tuple], float]:
    """Every sample of a /metrics page, read with prometheus-client's own parser."""
    from prometheus_client.parser import text_string_to_metric_families

    return {(smp.name, tuple(sorted(smp.labels.items()))): smp.value
            for family in text_string_to_metric_families(text) for smp in family.samples}


def test_a_request_larger_than_one_call_runs_as_several_in_order(server, stub, template):
    """5,000 MNIST test images in one request: 79 ORT calls of at most 64 rows, one correct answer."""
    from trainer.data import load_source

    data = load_source("mnist", data_dir=str(DATA))
    x, y = data.x_test[:5000].reshape(5000, -1).astype(np.float32), data.y_test[:5000]
    calls = server.metrics.registry.get_sample_value
    before = calls("clnp_execution_seconds_count")
    options = [("grpc.max_send_message_length", 64 << 20), ("grpc.max_receive_message_length", 64 << 20)]
    with grpc.insecure_channel(server.address, options=options) as ch:
        response = pb_grpc.GRPCInferenceServiceStub(ch).ModelInfer(infer_request("digits", x), timeout=60)
    got = scores_of(response)
    assert got.shape == (5000, 10)
    np.testing.assert_array_equal(got, expected(template, 3, "digits", x))
    # the served answer scores the real test images as the trainer did when it published the task
    trained = ModelRepository.open(template).read_manifest(3).task("digits").test_accuracy
    assert abs((got.argmax(1) == y).mean() * 100 - trained) < 3, trained
    assert calls("clnp_execution_seconds_count") - before >= -(-5000 // MAX_BATCH)  # it really was split


def test_statistics_list_every_loaded_task_before_its_first_request(template, tmp_path):
    """perf_analyzer looks a model up in ModelStatistics before it sends a request, as Triton lists every model."""
    repo = copy_repository(template, tmp_path / "repo", (3,))
    with ClnpServer(ServerConfig(repository=repo, host="127.0.0.1", port=0, poll_interval=0)) as s, \
            grpc.insecure_channel(s.address) as ch:
        stats = pb_grpc.GRPCInferenceServiceStub(ch).ModelStatistics(pb.ModelStatisticsRequest()).model_stats
        assert {(m.name, m.version) for m in stats} == {(t, "3") for t in TASKS}
        assert all(m.inference_stats.success.count == 0 for m in stats)


def test_model_config_for_every_task(stub):
    from serving.dataplane import rows_that_fit
    from serving.server import DEFAULT_MAX_MESSAGE_BYTES

    for task in TASKS:
        config = stub.ModelConfig(pb.ModelConfigRequest(name=task)).config
        assert (config.name, config.platform, config.backend) == (task, "onnxruntime_onnx", "onnxruntime")
        # no row limit configured: a request may hold what fits in a message
        assert config.max_batch_size == rows_that_fit(DEFAULT_MAX_MESSAGE_BYTES, (784,)) > 20000
        assert [(i.name, i.data_type, list(i.dims)) for i in config.input] == [("input", 11, [784])]  # TYPE_FP32
        assert [(o.name, o.data_type, list(o.dims)) for o in config.output] == [("scores", 11, [CLASSES[task]])]
        assert config.dynamic_batching.max_queue_delay_microseconds == 500
        assert config.parameters["batch_rows"].string_value == str(MAX_BATCH)
        assert config.parameters["clnp_version"].string_value == "3"
    assert stub.ModelConfig(pb.ModelConfigRequest(name="pairs", version="3")).config.output[0].dims == [2]
    for request, code in ((pb.ModelConfigRequest(name="nope"), grpc.StatusCode.NOT_FOUND),
                          (pb.ModelConfigRequest(name="digits", version="1"), grpc.StatusCode.NOT_FOUND)):
        with pytest.raises(grpc.RpcError) as e:
            stub.ModelConfig(request)
        assert e.value.code() == code


def test_request_row_limit_is_its_own_option(template, tmp_path):
    repo = copy_repository(template, tmp_path / "repo", (3,))
    config = ServerConfig(repository=repo, host="127.0.0.1", port=0, poll_interval=0,
                          runtime=RuntimeConfig(max_batch_size=4, max_request_rows=10))
    with ClnpServer(config) as s, grpc.insecure_channel(s.address) as ch:
        stub = pb_grpc.GRPCInferenceServiceStub(ch)
        assert stub.ModelConfig(pb.ModelConfigRequest(name="digits")).config.max_batch_size == 10
        with pytest.raises(grpc.RpcError) as e:
            stub.ModelInfer(infer_request("digits", rows(11)))
        assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "limit of 10 rows (--max-request-rows)" in e.value.details()
        x = rows(10, seed=2)  # the limit itself, as calls of 4, 4 and 2 rows
        np.testing.assert_array_equal(scores_of(stub.ModelInfer(infer_request("digits", x))),
                                      expected(template, 3, "digits", x))


def test_capacity_metrics_read_back_with_the_prometheus_parser(server, template):
    from serving.capacity import capacity_report

    text = urllib.request.urlopen(f"http://127.0.0.1:{server.metrics_port}/metrics", timeout=10).read().decode()
    samples = _samples(text)
    report = capacity_report(ModelRepository.open(template).read_manifest(3))
    for layer in report.layers:
        assert samples[("clnp_units", (("layer", layer.name), ("owner", "FREE")))] == layer.free
        assert samples[("clnp_layer_units", (("layer", layer.name),))] == layer.total
        for task, owned in layer.owned_by_task.items():
            assert samples[("clnp_units", (("layer", layer.name), ("owner", task)))] == owned
        owners = [v for (name, labels), v in samples.items() if name == "clnp_units" and dict(labels)["layer"] == layer.name]
        assert sum(owners) == layer.total  # FREE plus every owner is the whole layer
    assert samples[("clnp_tasks_served", ())] == 3
    assert samples[("clnp_forecast_additional_tasks", ())] == report.estimated_additional_tasks


def test_execution_provider_refused_clearly_when_unavailable(template, tmp_path):
    import onnxruntime as ort

    with pytest.raises(ValueError, match="execution_provider must be one of cpu, cuda"):
        RuntimeConfig(execution_provider="tpu")
    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this ONNX Runtime has the CUDA provider; the refusal cannot be shown here")
    runtime = Runtime(ModelRepository.open(template), RuntimeConfig(execution_provider="cuda"))
    with pytest.raises(RuntimeError, match="'cuda' .*not available.*available: .*CPUExecutionProvider"):
        runtime.start()
    repo = copy_repository(template, tmp_path / "repo", (3,))
    with pytest.raises(RuntimeError, match="clnp-serve: error: execution provider 'cuda'") as e:
        start_server(repo, tmp_path, "--execution-provider", "cuda")
    assert "exited with 1" in str(e.value) and "Traceback" not in str(e.value)


def test_cuda_sessions_ask_for_full_float32(template, monkeypatch):
    """The CUDA provider is asked to keep TF32 off (on an H100, TF32 moved scores by up to 9e-4 from the CPU's)."""
    import onnxruntime as ort

    from serving.runtime import load_version

    asked = []

    class Refuse(Exception):
        pass

    def record(path, options, providers):
        asked.append(providers)
        raise Refuse

    monkeypatch.setattr(ort, "InferenceSession", record)
    monkeypatch.setattr(ort, "preload_dlls", lambda *a, **k: None, raising=False)
    repo = ModelRepository.open(template)
    for provider, expected in (("cuda", [("CUDAExecutionProvider", {"use_tf32": "0"}), "CPUExecutionProvider"]),
                               ("cpu", ["CPUExecutionProvider"])):
        with pytest.raises(Refuse):
            load_version(repo, repo.versions()[-1], execution_provider=provider)
        assert asked[-1] == expected


def test_health_and_reflection(channel):
    health = health_pb2_grpc.HealthStub(channel)
    for service in ("", "inference.GRPCInferenceService", "clnp.admin.v1.AdminService"):
        assert health.Check(health_pb2.HealthCheckRequest(service=service)).status == health_pb2.HealthCheckResponse.SERVING
    with pytest.raises(grpc.RpcError) as e:
        health.Check(health_pb2.HealthCheckRequest(service="no.such.Service"))
    assert e.value.code() == grpc.StatusCode.NOT_FOUND
    services = set(ProtoReflectionDescriptorDatabase(channel).get_services())
    assert {"inference.GRPCInferenceService", "clnp.admin.v1.AdminService", "grpc.health.v1.Health",
            "grpc.reflection.v1alpha.ServerReflection"} <= services


def test_statistics_index_and_metrics(server, stub):
    for task in TASKS:
        stub.ModelInfer(infer_request(task, rows(3)))
    with pytest.raises(grpc.RpcError):
        stub.ModelInfer(infer_request("nope", rows(1)))
    stats = {(s.name, s.version): s for s in stub.ModelStatistics(pb.ModelStatisticsRequest()).model_stats}
    digits = stats[("digits", "3")]
    assert digits.inference_stats.success.count >= 1 and digits.inference_count >= 3 and digits.inference_stats.success.ns > 0
    # Triton's breakdown, which perf_analyzer reads: one count per successful request in each phase, and the
    # phases fit inside the request's own time
    i = digits.inference_stats
    phases = (i.queue, i.compute_input, i.compute_infer, i.compute_output)
    assert all(p.count == i.success.count for p in phases)
    assert i.compute_infer.ns > 0 and sum(p.ns for p in phases) <= i.success.ns
    only = stub.ModelStatistics(pb.ModelStatisticsRequest(name="pairs")).model_stats
    assert [s.name for s in only] == ["pairs"]
    index = stub.RepositoryIndex(pb.RepositoryIndexRequest())
    assert {(m.name, m.version, m.state) for m in index.models} == {(t, "3", "READY") for t in TASKS}

    text = urllib.request.urlopen(f"http://127.0.0.1:{server.metrics_port}/metrics", timeout=10).read().decode()
    for task in TASKS:
        assert f'clnp_requests_total{{code="OK",task="{task}"}}' in text
        assert f'clnp_request_latency_seconds_count{{task="{task}"}}' in text
    assert 'clnp_request_errors_total{code="NOT_FOUND",task="(unknown)"}' in text
    assert "clnp_loaded_version 3.0" in text and "clnp_reload_failures_total 0.0" in text
    assert "clnp_batch_requests_count" in text


def test_token_auth(template, tmp_path):
    repo = copy_repository(template, tmp_path / "repo", (3,))
    config = ServerConfig(repository=repo, host="127.0.0.1", port=0, poll_interval=0, token="s3cret")
    with ClnpServer(config) as s, grpc.insecure_channel(s.address) as ch:
        admin = admin_pb2_grpc.AdminServiceStub(ch)
        infer = pb_grpc.GRPCInferenceServiceStub(ch)
        for metadata in ((), (("authorization", "Bearer wrong"),), (("authorization", "s3cret"),)):
            with pytest.raises(grpc.RpcError) as e:
                admin.Status(admin_pb2.StatusRequest(), metadata=metadata)
            assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
        good = (("authorization", "Bearer s3cret"),)
        assert admin.Status(admin_pb2.StatusRequest(), metadata=good).loaded_version == 3
        assert infer.ModelInfer(infer_request("digits", rows(1))).model_version == "3"  # inference stays open
        health = health_pb2_grpc.HealthStub(ch)
        assert health.Check(health_pb2.HealthCheckRequest()).status == health_pb2.HealthCheckResponse.SERVING

    config = ServerConfig(repository=repo, host="127.0.0.1", port=0, poll_interval=0, token="s3cret",
                          require_token_for_inference=True)
    with ClnpServer(config) as s, grpc.insecure_channel(s.address) as ch:
        infer = pb_grpc.GRPCInferenceServiceStub(ch)
        with pytest.raises(grpc.RpcError) as e:
            infer.ModelInfer(infer_request("digits", rows(1)))
        assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert infer.ModelInfer(infer_request("digits", rows(1)), metadata=good).model_version == "3"


def test_tls(template, tmp_path):
    repo = copy_repository(template, tmp_path / "repo", (3,))
    cert, key = self_signed_certificate(tmp_path)
    config = ServerConfig(repository=repo, host="127.0.0.1", port=0, poll_interval=0, tls_cert=cert, tls_key=key,
                          token="t0k")
    with ClnpServer(config) as s:
        credentials = grpc.ssl_channel_credentials(root_certificates=cert.read_bytes())
        with grpc.secure_channel(f"localhost:{s.port}", credentials) as ch:
            x = rows(2)
            response = pb_grpc.GRPCInferenceServiceStub(ch).ModelInfer(infer_request("pairs", x))
            np.testing.assert_array_equal(scores_of(response), expected(template, 3, "pairs", x))
            status = admin_pb2_grpc.AdminServiceStub(ch).Status(
                admin_pb2.StatusRequest(), metadata=(("authorization", "Bearer t0k"),))
            assert status.loaded_version == 3
        with grpc.insecure_channel(s.address) as ch:  # plaintext is refused
            with pytest.raises(grpc.RpcError) as e:
                pb_grpc.GRPCInferenceServiceStub(ch).ServerLive(pb.ServerLiveRequest(), timeout=5)
            assert e.value.code() == grpc.StatusCode.UNAVAILABLE


def test_unexpected_errors_become_a_generic_internal(caplog):
    """Domain errors keep their code and message; anything else is INTERNAL and leaks nothing."""

    def boom(request, context):
        raise RuntimeError("secret detail /etc/passwd")

    def not_found(request, context):
        raise UnknownTask("unknown task (model) 'x'; served tasks: a, b")

    handlers = {"Boom": grpc.unary_unary_rpc_method_handler(boom),
                "NotFound": grpc.unary_unary_rpc_method_handler(not_found)}
    server = grpc.server(concurrent.futures.ThreadPoolExecutor(2), interceptors=[ErrorMappingInterceptor()])
    server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler("test.Errors", handlers)])
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
            with pytest.raises(grpc.RpcError) as e:
                ch.unary_unary("/test.Errors/Boom")(b"", timeout=10)
            assert e.value.code() == grpc.StatusCode.INTERNAL
            assert e.value.details() == "internal server error"
            with pytest.raises(grpc.RpcError) as e:
                ch.unary_unary("/test.Errors/NotFound")(b"", timeout=10)
            assert e.value.code() == grpc.StatusCode.NOT_FOUND and "served tasks: a, b" in e.value.details()
    finally:
        server.stop(0)
    assert "secret detail" in caplog.text  # the traceback is logged, not sent


# ---- hot reload ----------------------------------------------------------------------------------


def test_hot_reload_by_polling_and_by_admin_reload(template, repo_v1):
    config = ServerConfig(repository=repo_v1, host="127.0.0.1", port=0, poll_interval=0.2)
    with ClnpServer(config) as s, grpc.insecure_channel(s.address) as ch:
        stub = pb_grpc.GRPCInferenceServiceStub(ch)
        admin = admin_pb2_grpc.AdminServiceStub(ch)
        x = rows(3)
        before = scores_of(stub.ModelInfer(infer_request("digits", x)))
        assert not stub.ModelReady(pb.ModelReadyRequest(name="fashion")).ready
        publish_copy(template, repo_v1, 2)
        wait_until(lambda: stub.ModelReady(pb.ModelReadyRequest(name="fashion")).ready)
        response = stub.ModelInfer(infer_request("digits", x))
        assert response.model_version == "2"
        np.testing.assert_array_equal(scores_of(response), before)  # earlier task unchanged, bit for bit
        np.testing.assert_array_equal(
            scores_of(stub.ModelInfer(infer_request("fashion", x))), expected(template, 2, "fashion", x))

    config = ServerConfig(repository=repo_v1, host="127.0.0.1", port=0, poll_interval=0)  # no watcher
    with ClnpServer(config) as s, grpc.insecure_channel(s.address) as ch:
        admin = admin_pb2_grpc.AdminServiceStub(ch)
        stub = pb_grpc.GRPCInferenceServiceStub(ch)
        assert not admin.Reload(admin_pb2.ReloadRequest()).changed
        publish_copy(template, repo_v1, 3)
        reply = admin.Reload(admin_pb2.ReloadRequest())
        assert reply.changed and reply.loaded_version == 3 and "version 3" in reply.message
        assert stub.ModelReady(pb.ModelReadyRequest(name="pairs")).ready
        status = admin.Status(admin_pb2.StatusRequest())
        assert status.loaded_version == 3 and status.reloads == 2 and status.failed_reloads == 0


@pytest.mark.parametrize("corruption", ["onnx", "manifest"])
def test_corrupt_version_is_not_served(template, repo_v2, corruption):
    config = ServerConfig(repository=repo_v2, host="127.0.0.1", port=0, poll_interval=0.2, metrics_port=0)
    with ClnpServer(config) as s, grpc.insecure_channel(s.address) as ch:
        stub = pb_grpc.GRPCInferenceServiceStub(ch)
        admin = admin_pb2_grpc.AdminServiceStub(ch)
        x = rows(3)
        before = scores_of(stub.ModelInfer(infer_request("fashion", x)))
        publish_copy(template, repo_v2, 3, corrupt=corruption)
        status = wait_until(lambda: (st := admin.Status(admin_pb2.StatusRequest())).failed_reloads and st)
        assert status.loaded_version == 2 and status.last_reload_error_version == 3
        assert "checksum" in status.last_reload_error and status.last_reload_time
        time.sleep(0.6)  # a few more polls: the broken version is not retried
        assert admin.Status(admin_pb2.StatusRequest()).failed_reloads == 1
        with pytest.raises(grpc.RpcError) as e:
            admin.Reload(admin_pb2.ReloadRequest())
        assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "still serving version 2" in e.value.details()
        assert not stub.ModelReady(pb.ModelReadyRequest(name="pairs")).ready
        response = stub.ModelInfer(infer_request("fashion", x))
        assert response.model_version == "2"
        np.testing.assert_array_equal(scores_of(response), before)
        text = urllib.request.urlopen(f"http://127.0.0.1:{s.metrics_port}/metrics", timeout=10).read().decode()
        assert "clnp_reload_failures_total 2.0" in text  # the poll's failure and the forced admin retry
        assert "clnp_last_reload_error_version 3.0" in text and "clnp_loaded_version 2.0" in text


# ---- processes -------------------------------------------------------------------------------------


def test_serving_imports_no_torch():
    code = textwrap.dedent("""
        import sys
        import serving.server, serving.cli, serving.runtime, serving.admin, serving.convert, serving.metrics
        bad = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'trainer'))
        print(bad)
        sys.exit(1 if bad else 0)
    """)
    proc = subprocess.run([sys.executable, "-c", code], env=subprocess_env(), cwd=ROOT, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_metrics_port_0_means_a_free_port_and_no_option_means_off(template, tmp_path):
    import re

    repo = copy_repository(template, tmp_path / "repo", (3,))
    server = start_server(repo, tmp_path, "--metrics-port", "0", "--poll-interval", "0")
    try:
        m = wait_until(lambda: re.search(r"clnp-serve metrics on 127\.0\.0\.1:(\d+)", server.log()))
        port = int(m.group(1))
        assert port != 0
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
        assert _samples(text)[("clnp_tasks_served", ())] == 3
    finally:
        assert server.terminate() == 0, server.log()
    quiet = start_server(repo, tmp_path, "--poll-interval", "0")
    try:
        assert "metrics on" not in quiet.log()
    finally:
        assert quiet.terminate() == 0, quiet.log()


def test_sigterm_finishes_in_flight_requests_and_exits_0(template, tmp_path):
    repo = copy_repository(template, tmp_path / "repo", (3,))
    big = 12000  # rows: a request that takes a while to send, decode and run
    server = start_server(repo, tmp_path, "--max-batch-size", str(big), "--max-message-bytes", str(64 << 20))
    x = rows(big, seed=5)
    want = expected(template, 3, "digits", x)
    try:
        with grpc.insecure_channel(server.target, options=[("grpc.max_send_message_length", 64 << 20),
                                                           ("grpc.max_receive_message_length", 64 << 20)]) as ch:
            stub = pb_grpc.GRPCInferenceServiceStub(ch)
            stub.ServerReady(pb.ServerReadyRequest(), wait_for_ready=True, timeout=10)
            request = infer_request("digits", x)
            t0 = time.perf_counter()
            stub.ModelInfer(request)
            alone = time.perf_counter() - t0
            future = stub.ModelInfer.future(request, timeout=30)
            time.sleep(min(alone / 3, 0.05))
            sent_at = time.perf_counter()
            server.process.send_signal(signal.SIGTERM)
            response = future.result()
            done_at = time.perf_counter()
            np.testing.assert_array_equal(scores_of(response), want)
            rc = server.process.wait(30)
    finally:
        if server.process.poll() is None:
            server.process.kill()
    log = server.log()
    print(f"\none {big}-row request takes {alone * 1000:.0f} ms; SIGTERM came {(sent_at - t0 - alone) * 1000:.0f} ms "
          f"after the second was sent and it finished {(done_at - sent_at) * 1000:.0f} ms later")
    assert rc == 0, log
    assert "received SIGTERM" in log and "stopped" in log


def _hammer(target: str, tasks: dict[str, np.ndarray], want: dict[str, np.ndarray], stop: threading.Event,
            records: list, lock: threading.Lock) -> None:
    with grpc.insecure_channel(target) as ch:
        stub = pb_grpc.GRPCInferenceServiceStub(ch)
        names = list(tasks)
        i = 0
        while not stop.is_set():
            task = names[i % len(names)]
            i += 1
            t0 = time.perf_counter()
            try:
                response = stub.ModelInfer(infer_request(task, tasks[task]), timeout=20)
                ok = bool(np.array_equal(scores_of(response), want[task]))
                version = int(response.model_version)
                error = None if ok else "scores changed"
            except grpc.RpcError as e:
                ok, version, error = False, 0, f"{e.code().name}: {e.details()}"
            with lock:
                records.append((t0, time.perf_counter() - t0, ok, version, error))


def test_reload_under_load(template, tmp_path):
    repo = copy_repository(template, tmp_path / "repo", (1, 2, 3))
    server = start_server(repo, tmp_path, "--poll-interval", "0.2")
    x = {task: rows(2, seed=i) for i, task in enumerate(TASKS)}
    want = {task: expected(template, 3, task, x[task]) for task in TASKS}
    stop, lock, records = threading.Event(), threading.Lock(), []
    clients = [threading.Thread(target=_hammer, args=(server.target, x, want, stop, records, lock)) for _ in range(8)]
    try:
        for c in clients:
            c.start()
        train_start = time.perf_counter()
        proc = subprocess.run(add_task_command(repo, "more", "split-mnist:2,3"), env=subprocess_env(), cwd=ROOT,
                              capture_output=True, text=True, timeout=120)
        train_end = time.perf_counter()
        assert proc.returncode == 0, proc.stdout + proc.stderr
        with grpc.insecure_channel(server.target) as ch:
            stub = pb_grpc.GRPCInferenceServiceStub(ch)
            wait_until(lambda: stub.ModelReady(pb.ModelReadyRequest(name="more")).ready, timeout=20)
            swapped_at = time.perf_counter()
            time.sleep(1.0)  # load continues on the new version
            new = scores_of(stub.ModelInfer(infer_request("more", rows(2))))
            assert new.shape == (2, 2)
    finally:
        stop.set()
        for c in clients:
            c.join(30)
        rc = server.terminate()
    failed = [r for r in records if not r[2]]
    during = sorted(r[1] for r in records if train_start <= r[0] <= swapped_at)
    versions = sorted({r[3] for r in records if r[2]})
    p99 = during[int(0.99 * (len(during) - 1))] * 1000 if during else float("nan")
    print(f"\nreload under load: {len(records)} requests sent, {len(failed)} failed; {len(during)} during training and "
          f"reload, p99 {p99:.1f} ms; training took {train_end - train_start:.1f} s; versions answered {versions}")
    assert not failed, failed[:5]
    assert versions == [3, 4]
    assert rc == 0
