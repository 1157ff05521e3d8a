"""Shared helpers of the serving tests: test repositories, server subprocesses, certificates.

Imports neither our `inference` protos nor tritonclient (they clash in protobuf's registry), so
every test module may import it.
"""

from __future__ import annotations

import datetime
import importlib.util
import ipaddress
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT.parent / "shared" / "data"
NETWORK = "mlp:784-32-32"
# Tasks of the template repository, one version each: version N holds the first N tasks.
TEMPLATE_TASKS = (("digits", "mnist"), ("fashion", "fashion-mnist"), ("pairs", "split-mnist:0,1"))
LISTENING = re.compile(r"clnp-serve listening on (\S+):(\d+)")


def build_repository(root: Path, tasks=TEMPLATE_TASKS, network: str = NETWORK, limit: int = 2000) -> Path:
    """A repository with one version per task (trainer API, tiny network, one epoch)."""
    from trainer.clnp import CLNPConfig
    from trainer.pipeline import add_task

    config = CLNPConfig(epochs=1, finetune_epochs=0, prune_connections=False)
    for name, source in tasks:
        add_task(root, name, source, network=network, config=config, limit=limit, data_dir=str(DATA))
    return root


def template_repository(tmp_path_factory) -> Path:
    """The session's template repository (versions 1..3), built once and shared by all modules."""
    root = tmp_path_factory.getbasetemp() / "clnp-template-repository"
    if not (root / "3" / "manifest.json").is_file():
        if root.exists():
            shutil.rmtree(root)
        build_repository(root)
    return root


def copy_repository(template: Path, dest: Path, versions: tuple[int, ...]) -> Path:
    """A copy of `template` holding only `versions`."""
    dest.mkdir(parents=True)
    shutil.copy2(template / "clnp-repository.json", dest / "clnp-repository.json")
    for v in versions:
        shutil.copytree(template / str(v), dest / str(v))
    return dest


def publish_copy(template: Path, repo: Path, version: int, corrupt: str | None = None) -> Path:
    """Publish `template`'s version into `repo` the way the trainer does: a staging dir renamed into place.

    corrupt: None, "onnx" (flip bytes of model.onnx) or "manifest" (a wrong sha256 in the manifest).
    """
    staging = repo / f".staging-{version}-test-{uuid.uuid4().hex[:8]}"
    shutil.copytree(template / str(version), staging)
    if corrupt == "onnx":
        data = bytearray((staging / "model.onnx").read_bytes())
        mid = len(data) // 2
        data[mid:mid + 64] = bytes(b ^ 0xFF for b in data[mid:mid + 64])
        (staging / "model.onnx").write_bytes(bytes(data))
    elif corrupt == "manifest":
        text = (staging / "manifest.json").read_text()
        text = re.sub(r'"weights_sha256": "[0-9a-f]+"', '"weights_sha256": "' + "0" * 64 + '"', text)
        (staging / "manifest.json").write_text(text)
    elif corrupt is not None:
        raise ValueError(f"unknown corruption {corrupt!r}")
    os.rename(staging, repo / str(version))
    return repo / str(version)


def wait_until(predicate, timeout: float = 15.0, interval: float = 0.05):
    """Poll `predicate` until it returns something true (returned), or fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"condition not met within {timeout} s")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def subprocess_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env.pop("CLNP_TOKEN", None)
    return env


@dataclass
class ServerProcess:
    """A clnp-serve subprocess; `target` is HOST:PORT once it listens."""

    process: subprocess.Popen
    target: str
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def terminate(self, timeout: float = 20) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            raise


def start_server(repository: Path, log_dir: Path, *args: str, timeout: float = 60) -> ServerProcess:
    """Run `clnp-serve --repository REPO --host 127.0.0.1 --port 0 ARGS` and wait for its listening line."""
    log_path = log_dir / f"clnp-serve-{uuid.uuid4().hex[:6]}.log"
    out = open(log_path, "w")
    cmd = [sys.executable, "-c", "from serving.cli import serve_main; serve_main()",
           "--repository", str(repository), "--host", "127.0.0.1", "--port", "0", *args]
    process = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=subprocess_env(), cwd=ROOT)
    out.close()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        m = LISTENING.search(log_path.read_text(errors="replace"))
        if m:
            return ServerProcess(process, f"{m.group(1)}:{m.group(2)}", log_path)
        if process.poll() is not None:
            raise RuntimeError(f"clnp-serve exited with {process.returncode}:\n{log_path.read_text()}")
        time.sleep(0.05)
    process.kill()
    raise RuntimeError(f"clnp-serve did not start within {timeout} s:\n{log_path.read_text()}")


def add_task_command(repository: Path, task: str, source: str, limit: int = 2000) -> list[str]:
    """The command publishing one more task: `clnp-train add-task` when the trainer CLI exists, else the API."""
    if importlib.util.find_spec("trainer.cli") is not None:
        return [sys.executable, "-c", "import sys; from trainer.cli import main; sys.exit(main())",
                "add-task", "--repository", str(repository), "--task", task, "--data", source,
                "--epochs", "1", "--finetune-epochs", "0", "--limit", str(limit), "--data-dir", str(DATA)]
    code = (
        "import sys; from trainer.pipeline import add_task; from trainer.clnp import CLNPConfig; "
        "add_task(sys.argv[1], sys.argv[2], sys.argv[3], config=CLNPConfig(epochs=1, finetune_epochs=0, "
        "prune_connections=False), limit=int(sys.argv[4]), data_dir=sys.argv[5])"
    )
    return [sys.executable, "-c", code, str(repository), task, source, str(limit), str(DATA)]


def self_signed_certificate(directory: Path, hostname: str = "localhost") -> tuple[Path, Path]:
    """A self-signed certificate for `hostname` and 127.0.0.1; returns (cert.pem, key.pem)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hostname)])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.DNSName(hostname), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = directory / "cert.pem", directory / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return cert_path, key_path


def ort_scores(model_path: Path, x, task_index: int, classes: int):
    """What ONNX Runtime returns locally for one task (one thread, like the server's default)."""
    import numpy as np
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    session = ort.InferenceSession(str(model_path), options, providers=["CPUExecutionProvider"])
    (scores,) = session.run(["scores"], {"input": x, "task": np.full(len(x), task_index, dtype=np.int64)})
    return scores[:, :classes]


def served_scores(version_dir: Path, x, task: str):
    """What clnp-serve answers for `task` of that version: its own subnetwork graph when the version has one,
    else the shared graph (one thread, like the server's default)."""
    import json

    import numpy as np
    import onnxruntime as ort

    manifest = json.loads((Path(version_dir) / "manifest.json").read_text())
    record = next(t for t in manifest["tasks"] if t["name"] == task)
    classes = len(record["classes"])
    if not record.get("graph"):
        return ort_scores(Path(version_dir) / manifest["onnx"]["file"], x, record["index"], classes)
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    session = ort.InferenceSession(str(Path(version_dir) / record["graph"]["file"]), options,
                                   providers=["CPUExecutionProvider"])
    (scores,) = session.run(["scores"], {"input": x, "task": np.zeros(len(x), dtype=np.int64)})
    return scores[:, :classes]
