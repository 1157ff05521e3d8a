"""clnp-admin against a live server (in-process, port 0), and clnp-serve's own command-line errors."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from serving.capacity import capacity_report, format_capacity
from serving.cli import admin_main
from serving.repository import ModelRepository
from serving.server import ClnpServer, ServerConfig
from serving_helpers import ROOT, copy_repository, publish_copy, self_signed_certificate, subprocess_env, template_repository


@pytest.fixture(scope="module")
def template(tmp_path_factory) -> Path:
    return template_repository(tmp_path_factory)


@pytest.fixture()
def live(template, tmp_path):
    """A server on versions 1..2 of the template (no watcher: reloads are explicit)."""
    repo = copy_repository(template, tmp_path / "repo", (1, 2))
    with ClnpServer(ServerConfig(repository=repo, host="127.0.0.1", port=0, poll_interval=0)) as server:
        yield server, repo


def admin(*args: str, env: dict | None = None):
    result = CliRunner().invoke(admin_main, list(args), env=env, catch_exceptions=False)
    return result


def test_capacity_text_is_format_capacity_of_the_served_version(live):
    server, repo = live
    result = admin("capacity", "--target", server.address)
    assert result.exit_code == 0, result.output
    manifest = ModelRepository.open(repo).read_manifest(2)
    assert result.stdout.rstrip("\n") == format_capacity(capacity_report(manifest))
    assert "FREE" in result.stdout and "digits" in result.stdout and "fashion" in result.stdout
    assert "more tasks that fit (forecast)" in result.stdout


def test_capacity_json(live):
    server, repo = live
    result = admin("capacity", "--target", server.address, "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    report = capacity_report(ModelRepository.open(repo).read_manifest(2)).to_dict()
    est = report.pop("estimated_additional_tasks")
    report = json.loads(json.dumps(report))  # tuples -> lists
    got = data.pop("estimated_additional_tasks")
    assert data == report
    assert got == ("unbounded" if math.isinf(est) else est)
    old = json.loads(admin("capacity", "--target", server.address, "--json", "--model-version", "2").stdout)
    assert old["version"] == 2
    missing = admin("capacity", "--target", server.address, "--model-version", "1")
    assert missing.exit_code == 1 and "NOT_FOUND" in missing.stderr


def test_capacity_json_is_one_form_in_both_clis(live):
    """clnp-train capacity --json (from the repository) and clnp-admin capacity --json (from the server) agree."""
    from trainer.cli import cli as train_cli

    server, repo = live
    served = json.loads(admin("capacity", "--target", server.address, "--json").stdout)
    local = CliRunner().invoke(train_cli, ["capacity", "-r", str(repo), "--json"])
    assert local.exit_code == 0, local.output
    assert json.loads(local.stdout) == served
    est = served["estimated_additional_tasks"]
    assert est == "unbounded" or isinstance(est, (int, float))


def test_tasks_status_and_reload(live, template):
    server, repo = live
    result = admin("tasks", "--target", server.address)
    assert result.exit_code == 0, result.output
    assert "serving version 2" in result.stdout and "digits" in result.stdout and "fashion" in result.stdout
    data = json.loads(admin("tasks", "--target", server.address, "--json").stdout)
    assert data["loaded_version"] == 2 and data["available_versions"] == [2]
    assert [(t["name"], t["index"], t["since_version"], t["versions"]) for t in data["tasks"]] == [
        ("digits", 0, 1, [2]), ("fashion", 1, 2, [2])]
    assert data["tasks"][0]["classes"] == [str(d) for d in range(10)] and data["tasks"][0]["input_shape"] == [784]

    result = admin("reload", "--target", server.address)
    assert result.exit_code == 0 and "nothing to load" in result.stdout
    publish_copy(template, repo, 3)
    data = json.loads(admin("reload", "--target", server.address, "--json").stdout)
    assert data == {"loaded_version": 3, "changed": True, "message": "loaded version 3"}

    result = admin("status", "--target", server.address)
    assert result.exit_code == 0 and "loaded_version" in result.stdout
    status = json.loads(admin("status", "--target", server.address, "--json").stdout)
    assert status["loaded_version"] == 3 and status["reloads"] == 2 and status["failed_reloads"] == 0
    assert status["last_reload_error"] == "" and status["last_reload_time"].endswith("Z")


def test_failed_reload_exits_1_and_shows_in_status(live, template):
    server, repo = live
    publish_copy(template, repo, 3, corrupt="onnx")
    result = admin("reload", "--target", server.address)
    assert result.exit_code == 1
    assert "FAILED_PRECONDITION" in result.stderr and "still serving version 2" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    status = json.loads(admin("status", "--target", server.address, "--json").stdout)
    assert status["loaded_version"] == 2 and status["last_reload_error_version"] == 3
    assert "checksum" in status["last_reload_error"]


def test_unreachable_server_is_one_line_and_exit_1():
    for command in ("capacity", "tasks", "reload", "status"):
        result = admin(command, "--target", "127.0.0.1:1", "--timeout", "5")
        assert result.exit_code == 1, result.output
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("clnp-admin: error: cannot reach 127.0.0.1:1 (UNAVAILABLE)")
        assert result.stdout == ""


def test_usage_error_exits_2():
    assert admin("capacity", "--timeout", "soon").exit_code == 2
    assert admin("no-such-command").exit_code == 2


def test_token_and_tls(template, tmp_path):
    repo = copy_repository(template, tmp_path / "repo", (3,))
    cert, key = self_signed_certificate(tmp_path)
    config = ServerConfig(repository=repo, host="127.0.0.1", port=0, poll_interval=0, token="s3cret",
                          tls_cert=cert, tls_key=key)
    with ClnpServer(config) as server:
        target = f"localhost:{server.port}"
        refused = admin("status", "--target", target, "--tls-ca", str(cert))
        assert refused.exit_code == 1 and "UNAUTHENTICATED" in refused.stderr
        ok = admin("status", "--target", target, "--tls-ca", str(cert), "--token", "s3cret", "--json")
        assert ok.exit_code == 0, ok.output
        assert json.loads(ok.stdout)["loaded_version"] == 3
        from_env = admin("tasks", "--target", target, "--tls-ca", str(cert), env={"CLNP_TOKEN": "s3cret"})
        assert from_env.exit_code == 0 and "pairs" in from_env.stdout
        plaintext = admin("status", "--target", target, "--token", "s3cret", "--timeout", "5")
        assert plaintext.exit_code == 1 and "UNAVAILABLE" in plaintext.stderr


def _console(name: str, *args: str) -> subprocess.CompletedProcess:
    exe = shutil.which(name)
    entry = {"clnp-admin": "admin_main", "clnp-serve": "serve_main"}[name]
    cmd = [exe] if exe else [sys.executable, "-c", f"from serving.cli import {entry}; {entry}()"]
    return subprocess.run([*cmd, *args], env=subprocess_env(), cwd=ROOT, capture_output=True, text=True, timeout=60)


def test_console_scripts(live, tmp_path):
    server, _ = live
    proc = _console("clnp-admin", "tasks", "--target", server.address, "--json")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["loaded_version"] == 2
    proc = _console("clnp-serve", "--repository", str(tmp_path / "nothing-here"), "--port", "0")
    assert proc.returncode == 2
    assert "clnp-serve: error:" in proc.stderr and "does not exist" in proc.stderr


def test_health_follows_the_servers_port_and_tls_through_its_status_file(template, tmp_path):
    from serving_helpers import start_server

    repo = copy_repository(template, tmp_path / "repo", (2,))
    cert, key = self_signed_certificate(tmp_path, hostname="clnp.internal")  # not the address health dials
    status = tmp_path / "status.json"
    server = start_server(repo, tmp_path, "--status-file", str(status), "--tls-cert", str(cert), "--tls-key", str(key))
    try:
        written = json.loads(status.read_text())
        assert written["tls"] and written["port"] == int(server.target.rsplit(":", 1)[1]) != 50051
        ok = admin("health", "--status-file", str(status))
        assert ok.exit_code == 0, ok.output
        assert ok.stdout.strip() == f"127.0.0.1:{written['port']}: SERVING"
        plain = admin("health", "--target", f"127.0.0.1:{written['port']}", "--timeout", "3")
        assert plain.exit_code == 1 and "health check failed (UNAVAILABLE)" in plain.stderr  # it really is TLS
    finally:
        assert server.terminate() == 0
    assert not status.exists()  # removed at exit
    gone = admin("health", "--status-file", str(status))
    assert gone.exit_code == 1 and len(gone.stderr.strip().splitlines()) == 1
    assert "cannot read the status file" in gone.stderr


def test_health_is_not_serving_until_a_version_is_loaded(tmp_path):
    from serving_helpers import start_server

    repo = tmp_path / "empty"
    ModelRepository.create(repo)
    status = tmp_path / "status.json"
    server = start_server(repo, tmp_path, "--status-file", str(status))
    try:
        ready = admin("health", "--status-file", str(status))
        assert ready.exit_code == 1 and ready.stdout.strip().endswith(": NOT_SERVING"), ready.output
        alive = admin("health", "--status-file", str(status), "--service", "clnp.admin.v1.AdminService")
        assert alive.exit_code == 0 and alive.stdout.strip().endswith(": SERVING"), alive.output
    finally:
        assert server.terminate() == 0
