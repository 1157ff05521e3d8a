"""The model repository on object storage, against a real S3-compatible server (moto's server mode) on loopback.

Covers publish and serve, two trainers racing for one version, a publish killed mid-upload, corrupt objects, and
two server processes converging on a new version under load with no failed call.
"""

from __future__ import annotations

import dataclasses
import signal
import subprocess
import sys
import textwrap
import threading
import time
import urllib.request
import uuid
from pathlib import Path

import grpc
import numpy as np
import pytest

from serving._generated.clnp.admin.v1 import admin_pb2, admin_pb2_grpc
from serving._generated.inference import grpc_service_pb2 as pb
from serving._generated.inference import grpc_service_pb2_grpc as pb_grpc
from serving.objectstore import ObjectStoreRepository, is_remote, open_repository
from serving.repository import CorruptVersionError, ModelRepository, RepositoryError
from serving_helpers import (
    NETWORK,
    ROOT,
    add_task_command,
    free_port,
    served_scores,
    wait_until,
    start_server,
    subprocess_env,
    template_repository,
)

TASKS = ("digits", "fashion", "pairs")  # the template's tasks: version N holds the first N


@pytest.fixture(scope="module")
def template(tmp_path_factory) -> Path:
    return template_repository(tmp_path_factory)


@pytest.fixture(scope="module")
def s3_endpoint(tmp_path_factory):
    """moto's S3 server on a free loopback port, for this module."""
    port = free_port()
    log = open(tmp_path_factory.mktemp("moto") / "moto.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=log, stderr=subprocess.STDOUT)
    endpoint = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        try:
            urllib.request.urlopen(endpoint, timeout=2).read()
            break
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                pytest.fail(f"moto's S3 server did not start on {endpoint}")
            time.sleep(0.2)
    yield endpoint
    proc.terminate()
    proc.wait(10)
    log.close()


@pytest.fixture
def bucket(s3_endpoint, monkeypatch) -> str:
    """A new bucket; the standard AWS variables point every client (and subprocess) at the loopback server."""
    import boto3

    for name, value in (("AWS_ACCESS_KEY_ID", "testing"), ("AWS_SECRET_ACCESS_KEY", "testing"),
                        ("AWS_REGION", "us-east-1"), ("AWS_ENDPOINT_URL", s3_endpoint)):
        monkeypatch.setenv(name, value)
    name = f"clnp-{uuid.uuid4().hex[:12]}"
    boto3.client("s3").create_bucket(Bucket=name)
    return name


def objects(bucket: str, prefix: str) -> dict[str, bytes]:
    """Every object under `prefix`, by key relative to it (read with boto3, not with the code under test)."""
    import boto3

    s3 = boto3.client("s3")
    keys = [o["Key"] for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix + "/")
            for o in page.get("Contents", [])]
    return {k[len(prefix) + 1:]: s3.get_object(Bucket=bucket, Key=k)["Body"].read() for k in keys}


def put_object(bucket: str, key: str, data: bytes) -> None:
    import boto3

    boto3.client("s3").put_object(Bucket=bucket, Key=key, Body=data)


def upload(template: Path, remote: ObjectStoreRepository, version: int):
    """Publish the template's `version` to `remote` the way the trainer does (files, then the manifest)."""
    local = ModelRepository.open(template)
    m = local.read_manifest(version)

    def build(v, weights_sha, onnx_sha):
        return dataclasses.replace(m, version=v, weights_sha256=weights_sha,
                                   onnx=dataclasses.replace(m.onnx, sha256=onnx_sha))

    return remote.publish(build, local.load_weights(m), local.onnx_path(m).read_bytes(), version=version,
                          extra_files=graph_files(local, m))


def graph_files(local: ModelRepository, m) -> dict[str, bytes]:
    """The version's task graphs by file name."""
    return {t.graph["file"]: local.fetch(m, t.graph["file"]) for t in m.tasks if t.graph}


def rows(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).random((n, 784), dtype=np.float32)


def infer(stub, task: str, x: np.ndarray) -> tuple[np.ndarray, int]:
    request = pb.ModelInferRequest(model_name=task)
    request.inputs.add(name="input", datatype="FP32", shape=list(x.shape))
    request.raw_input_contents.append(np.ascontiguousarray(x, dtype=np.float32).tobytes())
    response = stub.ModelInfer(request, timeout=20)
    out = response.outputs[0]
    return np.frombuffer(response.raw_output_contents[0], dtype=np.float32).reshape(out.shape), int(response.model_version)


def expected(template: Path, version: int, task: str, x: np.ndarray) -> np.ndarray:
    return served_scores(template / str(version), x, task)


def test_is_remote_tells_urls_from_paths():
    assert is_remote("s3://bucket/prefix") and is_remote("gs://b/p") and is_remote("az://account/container")
    assert not is_remote("/srv/models") and not is_remote("models") and not is_remote(Path("s3:/x"))


def test_trainer_publishes_to_s3_and_the_server_serves_and_reloads_it(bucket, tmp_path):
    url = f"s3://{bucket}/models/demo"
    train = subprocess.run(add_task_command(url, "digits", "mnist") + ["--network", NETWORK], env=subprocess_env(),
                           cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert train.returncode == 0, train.stdout + train.stderr
    stored = objects(bucket, "models/demo")
    names = sorted(stored)
    assert names[0] == "1/manifest.json" and names[-1] == "clnp-repository.json" and len(names) == 5, names
    for stem, ext in (("model", "onnx"), ("weights", "safetensors"), ("task-0", "onnx")):  # token-named uploads
        assert sum(1 for n in names if n.startswith(f"1/{stem}.") and n.endswith(f".{ext}")) == 1, (stem, names)

    capacity = subprocess.run([sys.executable, "-c", "import sys; from trainer.cli import main; sys.exit(main())",
                               "capacity", "--repository", url, "--json"], env=subprocess_env(), cwd=ROOT,
                              capture_output=True, text=True, timeout=60)
    assert capacity.returncode == 0 and '"digits"' in capacity.stdout, capacity.stderr

    cache = tmp_path / "cache"
    server = start_server(url, tmp_path, "--cache-dir", str(cache), "--poll-interval", "0.2")
    try:
        mirrored = ModelRepository.open(cache)
        assert mirrored.versions() == [1]
        model = mirrored.onnx_path(mirrored.read_manifest(1))
        x = rows(3)
        with grpc.insecure_channel(server.target) as ch:
            stub = pb_grpc.GRPCInferenceServiceStub(ch)
            scores, version = infer(stub, "digits", x)
            assert version == 1
            np.testing.assert_array_equal(scores, served_scores(model.parent, x, "digits"))
            train = subprocess.run(add_task_command(url, "fashion", "fashion-mnist"), env=subprocess_env(), cwd=ROOT,
                                   capture_output=True, text=True, timeout=300)
            assert train.returncode == 0, train.stdout + train.stderr
            wait_until(lambda: stub.ModelReady(pb.ModelReadyRequest(name="fashion")).ready, timeout=30)
            again, version = infer(stub, "digits", x)
            assert version == 2
            np.testing.assert_array_equal(again, scores)  # the earlier task answers bit for bit the same
    finally:
        assert server.terminate() == 0, server.log()


def test_trainer_refuses_an_unreachable_bucket_in_one_line_before_training(bucket):
    url = f"s3://{bucket}-missing/models"
    proc = subprocess.run(add_task_command(url, "digits", "mnist"), env=subprocess_env(), cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: cannot write to the model repository"), proc.stderr
    assert "Traceback" not in proc.stderr and "epoch" not in proc.stderr.lower()


def test_two_publishers_racing_for_one_version_exactly_one_wins(template, bucket):
    url = f"s3://{bucket}/race"
    a = ObjectStoreRepository.create(url)
    upload(template, a, 1)
    b = ObjectStoreRepository.open(url)
    local = ModelRepository.open(template)
    m2 = local.read_manifest(2)
    raced = {}

    def build_after_the_other_publishes(v, weights_sha, onnx_sha):
        raced["winner"] = upload(template, b, 2)  # B publishes version 2 while A's files are uploaded
        return dataclasses.replace(m2, version=v, weights_sha256=weights_sha,
                                   onnx=dataclasses.replace(m2.onnx, sha256=onnx_sha))

    with pytest.raises(RepositoryError, match="version 2 was published to .* by another writer meanwhile"):
        a.publish(build_after_the_other_publishes, local.load_weights(m2), local.onnx_path(m2).read_bytes(), version=2,
                  extra_files=graph_files(local, m2))
    winner = raced["winner"]
    stored = objects(bucket, "race")
    assert sorted(k for k in stored if k.startswith("2/")) == sorted(
        ["2/manifest.json"] + [f"2/{name}" for name, _, _ in winner.files()])  # the loser removed its files
    assert open_repository(url).verify(2) == winner


def test_two_trainers_racing_one_publishes_the_other_fails_clearly(template, bucket):
    url = f"s3://{bucket}/trainers"
    upload(template, ObjectStoreRepository.create(url), 1)
    procs = [subprocess.Popen(add_task_command(url, name, source), env=subprocess_env(), cwd=ROOT,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for name, source in (("left", "split-mnist:0,1"), ("right", "split-mnist:2,3"))]
    results = [(p.wait(300), *p.communicate()) for p in procs]
    codes = sorted(r[0] for r in results)
    assert codes == [0, 2], results
    loser = next(r for r in results if r[0] == 2)
    assert "version 2 was published to" in loser[2] and "another writer" in loser[2], loser[2]
    assert len(loser[2].strip().splitlines()) == 1 and "Traceback" not in loser[2]
    repo = open_repository(url)
    assert repo.versions() == [1, 2]
    winner = "left" if results[0][0] == 0 else "right"
    manifest = repo.verify(2)
    assert manifest.task_names == ("digits", winner)
    assert sorted(k for k in objects(bucket, "trainers") if k.startswith("2/")) == sorted(
        ["2/manifest.json"] + [f"2/{name}" for name, _, _ in manifest.files()])


def test_publish_killed_mid_upload_leaves_no_version_and_the_next_publish_cleans_up(template, bucket, tmp_path):
    url = f"s3://{bucket}/killed"
    upload(template, ObjectStoreRepository.create(url), 1)
    script = textwrap.dedent(f"""
        import os, signal, sys
        sys.path.insert(0, {str(ROOT)!r}); sys.path.insert(0, {str(ROOT / 'tests')!r})
        from pathlib import Path
        from serving.objectstore import ObjectStoreRepository
        from serving.repository import ModelRepository
        local = ModelRepository.open(Path({str(template)!r}))
        m = local.read_manifest(2)
        def build(*args):
            os.kill(os.getpid(), signal.SIGKILL)  # both files are uploaded; the manifest is not
        ObjectStoreRepository.open({url!r}).publish(build, local.load_weights(m), local.onnx_path(m).read_bytes(),
                                                   version=2)
    """)
    proc = subprocess.run([sys.executable, "-c", script], env=subprocess_env(), capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    leftovers = sorted(k for k in objects(bucket, "killed") if k.startswith("2/"))
    assert len(leftovers) == 2 and "2/manifest.json" not in leftovers  # the kill happened mid-publish

    repo = open_repository(url)
    assert repo.versions() == [1] and repo.latest() == 1  # readers do not see the partial upload
    cache = ModelRepository.create(tmp_path / "cache")
    assert repo.sync_to(cache, keep=2).installed == [1]

    published = upload(template, repo, 2)
    left = sorted(k for k in objects(bucket, "killed") if k.startswith("2/"))
    assert left == sorted(["2/manifest.json"] + [f"2/{name}" for name, _, _ in published.files()])
    assert not set(leftovers) & set(left)


@pytest.mark.parametrize("corruption", ["flipped", "truncated"])
def test_corrupt_object_is_refused_by_readers(template, bucket, corruption):
    url = f"s3://{bucket}/corrupt"
    repo = ObjectStoreRepository.create(url)
    upload(template, repo, 1)
    m = upload(template, repo, 2)
    key = f"corrupt/2/{m.onnx.file}"
    data = bytearray(objects(bucket, "corrupt")[f"2/{m.onnx.file}"])
    if corruption == "flipped":
        data[len(data) // 2] ^= 0xFF
        match = "does not match its checksum"
    else:
        data = data[:-10]
        match = f"has {len(data)} bytes, the manifest says {len(data) + 10}"
    put_object(bucket, key, bytes(data))
    with pytest.raises(CorruptVersionError, match=match):
        open_repository(url).verify(2)
    assert open_repository(url).verify(1).version == 1


def test_server_keeps_serving_when_the_newest_object_is_corrupt(template, bucket, tmp_path):
    url = f"s3://{bucket}/served"
    repo = ObjectStoreRepository.create(url)
    upload(template, repo, 1)
    m = upload(template, repo, 2)
    put_object(bucket, f"served/2/{m.weights_file}", b"not the weights")
    server = start_server(url, tmp_path, "--cache-dir", str(tmp_path / "cache"), "--poll-interval", "0.2")
    try:
        with grpc.insecure_channel(server.target) as ch:
            stub = pb_grpc.GRPCInferenceServiceStub(ch)
            x = rows(2)
            scores, version = infer(stub, "digits", x)
            assert version == 1
            np.testing.assert_array_equal(scores, expected(template, 1, "digits", x))
            admin = admin_pb2_grpc.AdminServiceStub(ch)
            reply = admin.Reload(admin_pb2.ReloadRequest())
            assert "version 2 not downloaded" in reply.message and "bytes, the manifest says" in reply.message, \
                reply.message
            upload(template, repo, 3)  # a good version after the broken one
            wait_until(lambda: stub.ModelReady(pb.ModelReadyRequest(name="pairs")).ready, timeout=30)
            assert infer(stub, "digits", x)[1] == 3
    finally:
        assert server.terminate() == 0, server.log()
    assert "version 2 of" in server.log() and "not mirrored" in server.log()


def _hammer(target: str, want: dict[str, tuple[np.ndarray, np.ndarray]], stop: threading.Event,
            records: list, lock: threading.Lock) -> None:
    with grpc.insecure_channel(target) as ch:
        stub = pb_grpc.GRPCInferenceServiceStub(ch)
        names = list(want)
        i = 0
        while not stop.is_set():
            task = names[i % len(names)]
            i += 1
            try:
                scores, version = infer(stub, task, want[task][0])
                ok = bool(np.array_equal(scores, want[task][1]))
                error = None if ok else "scores changed"
            except grpc.RpcError as e:
                ok, version, error = False, 0, f"{e.code().name}: {e.details()}"
            with lock:
                records.append((target, ok, version, error))


def test_two_servers_converge_on_a_new_version_under_load(template, bucket, tmp_path):
    url = f"s3://{bucket}/fleet"
    repo = ObjectStoreRepository.create(url)
    upload(template, repo, 1)
    upload(template, repo, 2)
    servers = [start_server(url, tmp_path, "--cache-dir", str(tmp_path / f"cache-{i}"), "--poll-interval", "0.2")
               for i in range(2)]
    want = {task: (rows(2, seed=i), expected(template, 2, task, rows(2, seed=i))) for i, task in enumerate(TASKS[:2])}
    stop, lock, records = threading.Event(), threading.Lock(), []
    clients = [threading.Thread(target=_hammer, args=(s.target, want, stop, records, lock))
               for s in servers for _ in range(3)]
    codes = []
    try:
        for c in clients:
            c.start()
        wait_until(lambda: len(records) > 50, timeout=30)
        upload(template, repo, 3)
        published_at = time.monotonic()
        for s in servers:
            with grpc.insecure_channel(s.target) as ch:
                stub = pb_grpc.GRPCInferenceServiceStub(ch)
                wait_until(lambda: stub.ModelReady(pb.ModelReadyRequest(name="pairs")).ready, timeout=30)
        converged_after = time.monotonic() - published_at
        n = len(records)
        wait_until(lambda: len(records) > n + 50, timeout=30)  # load goes on after both switched
    finally:
        stop.set()
        for c in clients:
            c.join(30)
        codes = [s.terminate() for s in servers]
    failed = [r for r in records if not r[1]]
    print(f"\ntwo servers on one bucket: {len(records)} calls, {len(failed)} failed, both on version 3 "
          f"{converged_after:.2f} s after the publish")
    assert not failed, failed[:5]
    for s in servers:
        answered = sorted({r[2] for r in records if r[0] == s.target})
        assert answered == [2, 3], (s.target, answered)  # each served the old version, then the new one
    assert codes == [0, 0]
