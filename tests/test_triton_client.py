"""Wire compatibility with Triton's Python client (tritonclient.grpc).

tritonclient's protos and ours define the same `inference` symbols in protobuf's registry, so
neither this process nor the server may hold both: the server runs as a clnp-serve subprocess and
the client side runs in a fresh interpreter (a script below); this module imports neither.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

from serving_helpers import ROOT, copy_repository, start_server, subprocess_env, template_repository

CLIENT_SCRIPT = textwrap.dedent(
    """
    import json, sys
    import numpy as np
    import onnxruntime as ort
    import tritonclient.grpc as grpcclient
    from tritonclient.grpc import service_pb2, service_pb2_grpc
    from tritonclient.utils import InferenceServerException
    import grpc

    url, version_dir = sys.argv[1], sys.argv[2]
    manifest = json.load(open(f"{version_dir}/manifest.json"))
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    session = ort.InferenceSession(f"{version_dir}/model.onnx", options, providers=["CPUExecutionProvider"])
    client = grpcclient.InferenceServerClient(url)
    stub = service_pb2_grpc.GRPCInferenceServiceStub(grpc.insecure_channel(url))
    out = {"live": client.is_server_live(), "ready": client.is_server_ready(),
           "server": client.get_server_metadata(as_json=True), "tasks": {}}
    x = (np.random.default_rng(0).random((5, 784)) * 255).astype(np.float32)
    for task in manifest["tasks"]:
        name, classes = task["name"], len(task["classes"])
        (local,) = session.run(["scores"], {"input": x, "task": np.full(5, task["index"], dtype=np.int64)})
        local = local[:, :classes]
        result = {"ready": client.is_model_ready(name), "metadata": client.get_model_metadata(name, as_json=True),
                  "config": client.get_model_config(name, as_json=True)["config"]}
        tensor = grpcclient.InferInput("input", list(x.shape), "FP32")
        tensor.set_data_from_numpy(x)  # tritonclient.grpc sends raw_input_contents
        response = client.infer(name, [tensor], outputs=[grpcclient.InferRequestedOutput("scores")],
                                request_id=f"r-{name}")
        got = response.as_numpy("scores")
        # typed contents (fp32_contents), built with Triton's own protos
        request = service_pb2.ModelInferRequest(model_name=name, id=f"r-{name}")
        typed_input = request.inputs.add(name="input", datatype="FP32", shape=list(x.shape))
        typed_input.contents.fp32_contents.extend(x.ravel().tolist())
        typed = grpcclient.InferResult(stub.ModelInfer(request))
        for path, res in (("raw", response), ("typed", typed)):
            got = res.as_numpy("scores")
            result[path] = {
                "equal": bool(np.array_equal(got, local)), "shape": list(got.shape), "dtype": str(got.dtype),
                "id": res.get_response().id, "version": res.get_response().model_version,
            }
        out["tasks"][name] = result
    try:
        tensor = grpcclient.InferInput("input", [1, 784], "FP32")
        tensor.set_data_from_numpy(x[:1])
        client.infer("nope", [tensor])
        out["unknown"] = None
    except InferenceServerException as e:
        out["unknown"] = {"status": e.status(), "message": e.message()}
    print(json.dumps(out))
    """
)


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    template = template_repository(tmp_path_factory)
    tmp = tmp_path_factory.mktemp("triton")
    repo = copy_repository(template, tmp / "repo", (3,))
    server = start_server(repo, tmp)
    yield server, repo
    assert server.terminate() == 0, server.log()


def test_tritonclient_gets_model_config_and_exactly_what_onnxruntime_computes(served):
    server, repo = served
    proc = subprocess.run([sys.executable, "-c", CLIENT_SCRIPT, server.target, str(repo / "3")],
                          env=subprocess_env(), cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["live"] and out["ready"]
    assert out["server"]["name"] == "clnp"
    assert set(out["tasks"]) == {"digits", "fashion", "pairs"}
    for name, result in out["tasks"].items():
        assert result["ready"]
        meta = result["metadata"]
        classes = 2 if name == "pairs" else 10
        assert meta["platform"] == "onnxruntime_onnx" and meta["versions"] == ["3"]
        assert meta["inputs"] == [{"name": "input", "datatype": "FP32", "shape": ["-1", "784"]}]
        assert meta["outputs"] == [{"name": "scores", "datatype": "FP32", "shape": ["-1", str(classes)]}]
        config = result["config"]  # what perf_analyzer reads first
        assert config["name"] == name and config["platform"] == "onnxruntime_onnx"
        assert int(config["max_batch_size"]) > 20000  # no row limit: what fits in the 64 MiB message limit
        assert config["input"] == [{"name": "input", "data_type": "TYPE_FP32", "dims": ["784"]}]
        assert config["output"] == [{"name": "scores", "data_type": "TYPE_FP32", "dims": [str(classes)]}]
        assert config["dynamic_batching"]["max_queue_delay_microseconds"] == "500"
        for path in ("raw", "typed"):
            r = result[path]
            assert r["equal"], (name, path, r)
            assert r["shape"] == [5, classes] and r["dtype"] == "float32"
            assert r["id"] == f"r-{name}" and r["version"] == "3"
    assert out["unknown"]["status"] == "StatusCode.NOT_FOUND"
    assert "digits, fashion, pairs" in out["unknown"]["message"]
