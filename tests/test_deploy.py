"""Keep deploy/ honest: every manifest parses, validates, and agrees with the CLIs, the server and the image.

Core kinds are validated against Kubernetes' own schemas (kubernetes-validate, offline). The custom resources
(KServe, Kubeflow) are checked for the fields their controllers need. Every container command line is parsed by the
click command it calls, without running it; ports, probes, volumes and the user agree with what that command line
and the Dockerfile say.
"""

from __future__ import annotations

import re
from pathlib import Path

import click
import pytest
import yaml

from serving.cli import serve_main
from serving.server import ADMIN_SERVICE, INFERENCE_SERVICE
from trainer.cli import cli as train_cli

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
KUBERNETES_VERSION = "1.30"  # the oldest minor version these manifests are checked against
CORE_KINDS = {"Deployment", "Service", "HorizontalPodAutoscaler", "Job", "PersistentVolumeClaim"}


def documents() -> list[tuple[Path, dict]]:
    docs = []
    for path in sorted(DEPLOY.rglob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc is not None:
                docs.append((path, doc))
    return docs


def by_kind(kind: str) -> list[dict]:
    return [d for _, d in documents() if d["kind"] == kind]


def one(kind: str, name: str) -> dict:
    found = [d for d in by_kind(kind) if d["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind} {name!r}, found {len(found)}"
    return found[0]


def image_uid() -> int:
    """The uid the Dockerfile's images run as."""
    text = (ROOT / "Dockerfile").read_text()
    uid = int(re.search(r"useradd[^\n]*--uid (\d+)", text).group(1))
    assert re.search(rf"^USER {uid}:", text, re.M), "the images do not switch to the user they create"
    return uid


def parse(command: list[str], args: list[str]) -> tuple[str, click.Context]:
    """Parse a container's command line with the click command it runs (nothing runs). Returns (program, ctx)."""
    program, rest = command[0], list(command[1:]) + list(args)
    if program == "torchrun":
        from torch.distributed.run import get_args_parser

        ns = get_args_parser().parse_args(rest)
        assert ns.no_python, "torchrun runs the clnp-train console script, so it needs --no-python"
        program, rest = ns.training_script, list(ns.training_script_args)
    if program == "clnp-serve":
        return program, serve_main.make_context("clnp-serve", rest)
    if program == "clnp-train":
        parent = train_cli.make_context("clnp-train", list(rest), resilient_parsing=True)
        name = rest[0]
        sub = train_cli.get_command(parent, name)
        assert sub is not None, f"clnp-train has no command {name!r}"
        return program, sub.make_context(name, rest[1:], parent=parent)
    raise AssertionError(f"unknown program {program!r}")


def pod_specs() -> list[tuple[str, dict, dict]]:
    """(what, pod spec, pod metadata) of every workload."""
    out = []
    for d in by_kind("Deployment"):
        out.append((f"Deployment {d['metadata']['name']}", d["spec"]["template"]["spec"], d["spec"]["template"]["metadata"]))
    for d in by_kind("Job"):
        out.append((f"Job {d['metadata']['name']}", d["spec"]["template"]["spec"], d["spec"]["template"]["metadata"]))
    for d in by_kind("PyTorchJob"):
        for role, replica in d["spec"]["pytorchReplicaSpecs"].items():
            out.append((f"PyTorchJob {d['metadata']['name']} {role}", replica["template"]["spec"],
                        replica["template"].get("metadata", {})))
    return out


def test_every_manifest_parses_and_names_itself():
    docs = documents()
    assert len(docs) >= 9
    for path, doc in docs:
        assert {"apiVersion", "kind", "metadata"} <= set(doc), path
        assert re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", doc["metadata"]["name"]), path
    kinds = {doc["kind"] for _, doc in docs}
    assert {"ServingRuntime", "InferenceService", "Deployment", "Service", "HorizontalPodAutoscaler", "Job",
            "PersistentVolumeClaim", "PyTorchJob"} <= kinds


def test_core_kinds_validate_against_the_kubernetes_schemas():
    kubernetes_validate = pytest.importorskip("kubernetes_validate")
    checked = 0
    for path, doc in documents():
        if doc["kind"] in CORE_KINDS:
            kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)
            checked += 1
    assert checked >= 7


def test_every_container_command_line_is_accepted_by_its_cli():
    seen = set()
    for what, spec, _ in pod_specs():
        for c in spec["containers"]:
            program, ctx = parse(c["command"], c.get("args", []))
            seen.add(program)
    for runtime in by_kind("ServingRuntime"):
        for c in runtime["spec"]["containers"]:
            program, _ = parse(c["command"], c.get("args", []))
            seen.add(program)
    assert seen == {"clnp-serve", "clnp-train"}


def test_servers_ports_probes_metrics_and_volumes_agree_with_their_flags():
    uid = image_uid()
    for what, spec, meta in pod_specs():
        assert spec["securityContext"]["runAsUser"] == uid and spec["securityContext"]["runAsNonRoot"], what
        mounts = {}
        for c in spec["containers"]:
            program, ctx = parse(c["command"], c.get("args", []))
            mounts = {m["mountPath"]: m for m in c.get("volumeMounts", [])}
            volumes = {v["name"] for v in spec.get("volumes", [])}
            assert {m["name"] for m in mounts.values()} <= volumes, what
            if program == "clnp-serve":
                p = ctx.params
                ports = {port["name"]: port["containerPort"] for port in c["ports"]}
                assert ports["grpc"] == p["port"], what
                assert ports["metrics"] == p["metrics_port"], what
                annotations = meta.get("annotations", {})
                assert annotations.get("prometheus.io/scrape") == "true", what
                assert int(annotations["prometheus.io/port"]) == p["metrics_port"], what
                assert annotations["prometheus.io/path"] == "/metrics", what
                ready, live = c["readinessProbe"]["grpc"], c["livenessProbe"]["grpc"]
                assert ready["port"] == live["port"] == p["port"], what
                assert ready["service"] in ("", INFERENCE_SERVICE), what  # SERVING once a version is loaded
                assert live["service"] == ADMIN_SERVICE, what  # SERVING whenever the process answers
                assert p["tls_cert"] is None, f"{what}: gRPC probes speak plaintext"
                repo = p["repository"]
                if "://" in repo:
                    assert p["cache_dir"] is not None and any(str(p["cache_dir"]).startswith(m) for m in mounts), what
                else:
                    mount = next(m for path, m in mounts.items() if repo.startswith(path + "/") or repo == path)
                    assert mount.get("readOnly"), f"{what}: the server only reads the repository"
            else:  # clnp-train: writes the repository on a mounted volume
                repo = ctx.params["repository"]
                mount = next(m for path, m in mounts.items() if repo.startswith(path + "/") or repo == path)
                assert not mount.get("readOnly"), what
                assert spec["securityContext"].get("fsGroup") == uid, f"{what}: the volume must be writable by {uid}"
                assert what.startswith("PyTorchJob") or spec["restartPolicy"] == "Never", what


def test_services_hpa_and_claims_point_at_what_exists():
    deployments = {d["metadata"]["name"]: d for d in by_kind("Deployment")}
    claims = {d["metadata"]["name"] for d in by_kind("PersistentVolumeClaim")}
    for svc in by_kind("Service"):
        selector = svc["spec"]["selector"]
        targets = [d for d in deployments.values()
                   if selector.items() <= d["spec"]["template"]["metadata"]["labels"].items()]
        assert targets, f"Service {svc['metadata']['name']} selects no Deployment"
        for port in svc["spec"]["ports"]:
            names = {p["name"] for d in targets for c in d["spec"]["template"]["spec"]["containers"] for p in c["ports"]}
            assert port["targetPort"] in names, port
    for hpa in by_kind("HorizontalPodAutoscaler"):
        assert hpa["spec"]["scaleTargetRef"]["name"] in deployments
    for what, spec, _ in pod_specs():
        for v in spec.get("volumes", []):
            if "persistentVolumeClaim" in v:
                assert v["persistentVolumeClaim"]["claimName"] in claims, what
    models = one("PersistentVolumeClaim", "clnp-models")
    assert models["spec"]["accessModes"] == ["ReadWriteMany"]  # the trainer writes while the servers read


def test_kserve_runtime_and_inference_service():
    runtime = one("ServingRuntime", "clnp")
    spec = runtime["spec"]
    assert spec["protocolVersions"] == ["grpc-v2"]
    assert any(f["name"] == "clnp" for f in spec["supportedModelFormats"])
    (container,) = spec["containers"]
    assert container["name"] == "kserve-container"
    (port,) = container["ports"]
    assert port["name"] == "h2c"
    _, ctx = parse(container["command"], container.get("args", []))
    assert port["containerPort"] == ctx.params["port"]
    assert ctx.params["repository"] == "/mnt/models"  # where KServe mounts storageUri
    assert container["securityContext"]["runAsUser"] == image_uid()
    for isvc in by_kind("InferenceService"):
        model = isvc["spec"]["predictor"]["model"]
        assert model["runtime"] == "clnp" and model["modelFormat"]["name"] == "clnp"
        assert model["protocolVersion"] == "grpc-v2"
        claim = re.fullmatch(r"pvc://([^/]+)/.+", model["storageUri"])
        assert claim and claim.group(1) in {d["metadata"]["name"] for d in by_kind("PersistentVolumeClaim")}


def test_pytorchjob_runs_add_task_under_torchrun():
    (job,) = by_kind("PyTorchJob")
    replicas = job["spec"]["pytorchReplicaSpecs"]
    assert set(replicas) == {"Master", "Worker"}
    for role, replica in replicas.items():
        (c,) = replica["template"]["spec"]["containers"]
        assert c["name"] == "pytorch", role  # the Kubeflow training operator finds the container by this name
        assert c["command"][0] == "torchrun"
        program, ctx = parse(c["command"], c.get("args", []))
        assert program == "clnp-train" and ctx.info_name == "add-task"
