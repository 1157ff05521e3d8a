"""Build both images with podman and smoke-test them: health, one inference, the user, no torch in serve, and one
add-task in train.

Building them takes several minutes of this machine's 2 cores (the train image installs torch), more than CI's test
budget, so these tests run only when asked: `CLNP_IMAGE_TESTS=1 pytest tests/test_images.py`, with podman and the
local base image from `../shared/tools/container-base.sh`. CLNP_TORCH_WHEELS names a folder holding the CPU wheel of
torch to build the train image from (default: pip's configured index inside the build).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
import uuid
from pathlib import Path

import grpc
import numpy as np
import pytest

from serving._generated.inference import grpc_service_pb2 as pb
from serving._generated.inference import grpc_service_pb2_grpc as pb_grpc
from serving_helpers import DATA, ROOT, copy_repository, free_port, served_scores, template_repository

BASE_IMAGE = "localhost/pybase:3.11"
CONTAINERS_CONF = ROOT.parent / "shared" / "tools" / "containers.conf"
TAG = f"clnp-test-{uuid.uuid4().hex[:8]}"

pytestmark = pytest.mark.skipif(os.environ.get("CLNP_IMAGE_TESTS") != "1",
                                reason="image builds take minutes: set CLNP_IMAGE_TESTS=1 (needs podman)")


def podman(*args: str, timeout: float = 120, check: bool = True) -> subprocess.CompletedProcess:
    env = dict(os.environ, CONTAINERS_CONF=str(CONTAINERS_CONF))
    proc = subprocess.run(["podman", *args], env=env, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"podman {' '.join(args)} exited {proc.returncode}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


@pytest.fixture(scope="module")
def images():
    if shutil.which("podman") is None:
        pytest.fail("CLNP_IMAGE_TESTS=1 but podman is not installed (run ../shared/tools/container-base.sh)")
    if podman("image", "exists", BASE_IMAGE, check=False).returncode != 0:
        pytest.fail(f"no {BASE_IMAGE}: run ../shared/tools/container-base.sh")
    common = ["build", "--format", "docker", "--network", "host", "--build-arg", f"PYTHON_IMAGE={BASE_IMAGE}"]
    podman(*common, "--target", "serve", "-t", f"{TAG}-serve", str(ROOT), timeout=1200)
    wheels = os.environ.get("CLNP_TORCH_WHEELS")
    extra, staged = [], None
    if wheels:
        staged = ROOT / "wheels"  # inside the build context (git-ignored), mounted at /ctx by the build step
        staged.mkdir(exist_ok=True)
        for w in Path(wheels).glob("torch-*.whl"):
            shutil.copy2(w, staged / w.name)
        extra = ["--build-arg", "TORCH_PIP_ARGS=--find-links /ctx/wheels"]
    try:
        podman(*common, *extra, "--target", "train", "-t", f"{TAG}-train", str(ROOT), timeout=2400)
    finally:
        if staged is not None:
            shutil.rmtree(staged, ignore_errors=True)
    yield f"{TAG}-serve", f"{TAG}-train"
    podman("rmi", "-f", f"{TAG}-serve", f"{TAG}-train", check=False)


def test_serve_image_health_inference_user_and_clean_stop(images, tmp_path_factory, tmp_path):
    serve, _ = images
    template = template_repository(tmp_path_factory)
    repo = copy_repository(template, tmp_path / "repo", (2,))
    port = free_port()  # not the default 50051: the HEALTHCHECK must follow --port
    cid = podman("run", "-d", "--network", "host", "-v", f"{repo}:/models:ro", serve, "--host", "127.0.0.1",
                 "--port", str(port), "--metrics-port", str(free_port())).stdout.strip()
    try:
        deadline = time.monotonic() + 90
        while podman("healthcheck", "run", cid, check=False).returncode != 0:
            assert time.monotonic() < deadline, podman("logs", cid, check=False).stderr
            time.sleep(1)
        assert podman("exec", cid, "id", "-u").stdout.strip() == "10001"
        assert podman("exec", cid, "python", "-c", "import torch", check=False).returncode != 0  # torch-free
        x = np.random.default_rng(0).random((3, 784), dtype=np.float32)
        with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
            request = pb.ModelInferRequest(model_name="fashion")
            request.inputs.add(name="input", datatype="FP32", shape=[3, 784])
            request.raw_input_contents.append(x.tobytes())
            response = pb_grpc.GRPCInferenceServiceStub(ch).ModelInfer(request, timeout=20)
        scores = np.frombuffer(response.raw_output_contents[0], dtype=np.float32).reshape(3, 10)
        np.testing.assert_array_equal(scores, served_scores(repo / "2", x, "fashion"))
        podman("stop", "-t", "30", cid, timeout=60)
        state = json.loads(podman("inspect", cid).stdout)[0]["State"]
        assert state["ExitCode"] == 0, state
    finally:
        podman("rm", "-f", cid, check=False)


def test_train_image_adds_a_task_as_its_user(images, tmp_path):
    _, train = images
    repo = tmp_path / "repo"
    repo.mkdir()
    os.chown(repo, 10001, 10001)  # the image's user owns the bind-mounted repository
    run = ["run", "--rm", "--network", "host", "-v", f"{repo}:/repo", "-v", f"{DATA}:/data:ro", train]
    proc = podman(*run, "add-task", "--repository", "/repo", "--task", "digits", "--data", "mnist",
                  "--network", "mlp:784-32-32", "--epochs", "1", "--finetune-epochs", "0", "--limit", "2000",
                  "--data-dir", "/data", "--json", timeout=600)
    assert json.loads(proc.stdout)["version"] == 1
    assert (repo / "1" / "manifest.json").is_file()
    root_owned = tmp_path / "root-owned"
    root_owned.mkdir()
    refused = podman(*[a if a != f"{repo}:/repo" else f"{root_owned}:/repo" for a in run], "add-task", "--repository",
                     "/repo", "--task", "digits", "--data", "mnist", "--data-dir", "/data", check=False)
    assert refused.returncode == 2, refused.stderr
    assert refused.stderr.strip().startswith("error: cannot write to the model repository")
    assert len(refused.stderr.strip().splitlines()) == 1
