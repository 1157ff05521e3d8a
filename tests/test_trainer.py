"""The CLNP trainer end to end: zero forgetting, ONNX parity, atomic publish, bad input."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import onnxruntime as ort
import pytest
import torch
from click.testing import CliRunner

from serving.contract import FREE
from serving.repository import ModelRepository, RepositoryError, CorruptVersionError
from trainer.cli import cli
from trainer.clnp import CLNPConfig, preset, task_masks
from trainer.data import load_source
from trainer.pipeline import add_task, fit_to_network, load_network

from conftest import REPO_ROOT, tree_snapshot

# 1500 samples: a smaller batch and a larger learning rate for enough progress in 3 epochs; 20 fine-tuning epochs
# (the default's 60 add time here and test nothing more).
QUICK = preset("default", epochs=3, batch_size=64, learning_rate=0.002, finetune_epochs=20)
NETWORKS = {"mlp": "mlp:784-96-96", "cnn": "cnn:1x28x28-c24-c32-d64"}
SOURCES = ["split-mnist:0,1,2,3,4", "permuted-mnist:7", "fashion-mnist"]


@pytest.fixture(scope="module", params=sorted(NETWORKS))
def three_task_repo(request, tmp_path_factory, data_dir):
    """A repository per network family holding 3 tasks learned one after another (versions 1..3)."""
    root = tmp_path_factory.mktemp(f"repo-{request.param}") / "repo"
    for i, src in enumerate(SOURCES):
        add_task(root, f"task{i}", src, network=NETWORKS[request.param], config=QUICK, limit=1500,
                 data_dir=str(data_dir))
    return root


@pytest.fixture(scope="module")
def probe(data_dir) -> np.ndarray:
    """Real inputs: MNIST and Fashion-MNIST test images, raw 0..255 float32, (200, 28, 28)."""
    a = load_source("mnist", data_dir=str(data_dir), limit=100).x_test[:100]
    b = load_source("fashion-mnist", data_dir=str(data_dir), limit=100).x_test[:100]
    return np.concatenate([a, b])


def _logits(repo: ModelRepository, version: int, task: int, x: np.ndarray) -> torch.Tensor:
    manifest = repo.read_manifest(version)
    net, owners = load_network(repo, manifest)
    with torch.no_grad():
        return net(fit_to_network(x, net.spec, "probe"), task, task_masks(owners, task))


def test_zero_forgetting_is_bit_exact(three_task_repo, probe):
    repo = ModelRepository.open(three_task_repo)
    assert repo.versions() == [1, 2, 3]
    for task in range(3):
        first = _logits(repo, task + 1, task, probe)  # the version that learned the task
        for later in range(task + 2, 4):
            assert torch.equal(first, _logits(repo, later, task, probe)), f"task {task} changed in version {later}"
    # ...and the tasks really learned something (well above chance on their own data; permuted pixels defeat
    # 3x3 convolutions at 1,500 samples, so the CNN's permuted task only has to beat chance clearly)
    manifest = repo.read_manifest()
    for t in manifest.tasks:
        floor = 60 if manifest.network.startswith("mlp") or "permuted" not in t.source else 2.5 * 100 / len(t.classes)
        assert t.validation_accuracy > floor, (t.name, t.validation_accuracy)


def test_units_are_owned_and_masks_nested(three_task_repo):
    manifest = ModelRepository.open(three_task_repo).read_manifest()
    for layer in manifest.layers:
        owners = set(layer.owner)
        assert owners <= {-1, 0, 1, 2}
        assert layer.free + sum(layer.owned_by(t) for t in range(3)) == layer.units
        for t in range(2):  # task t's mask is contained in task t+1's
            assert np.all(layer.mask(t) <= layer.mask(t + 1))
    # earlier tasks' units never change owner
    repo = ModelRepository.open(three_task_repo)
    for v in (1, 2):
        before, after = repo.read_manifest(v), repo.read_manifest(v + 1)
        for lb, la in zip(before.layers, after.layers):
            kept = [o for o in lb.owner if o >= 0]
            assert [a for a, b in zip(la.owner, lb.owner) if b >= 0] == kept


def test_onnx_matches_torch_for_every_task(three_task_repo, probe):
    repo = ModelRepository.open(three_task_repo)
    manifest = repo.verify()
    session = ort.InferenceSession(str(repo.onnx_path(manifest)), providers=["CPUExecutionProvider"])
    x = probe.reshape(len(probe), *manifest.input_shape)
    for t in manifest.tasks:
        expected = _logits(repo, manifest.version, t.index, probe).numpy()
        got = session.run([manifest.onnx.output_name], {
            manifest.onnx.input_name: x, manifest.onnx.task_input_name: np.full(len(x), t.index, dtype=np.int64)
        })[0]
        assert got.shape == (len(x), manifest.onnx.max_classes)
        np.testing.assert_allclose(got[:, : len(t.classes)], expected, rtol=0, atol=1e-5)
    # one call may mix rows of different tasks
    tasks = np.arange(len(x), dtype=np.int64) % len(manifest.tasks)
    mixed = session.run(None, {"input": x, "task": tasks})[0]
    for t in manifest.tasks:
        rows = tasks == t.index
        np.testing.assert_allclose(mixed[rows, : len(t.classes)], _logits(repo, manifest.version, t.index, probe[rows]).numpy(), atol=1e-5)


def test_task_graphs_match_torch_see_only_their_units_and_carry_over_byte_for_byte(three_task_repo, probe):
    repo = ModelRepository.open(three_task_repo)
    manifest = repo.verify()
    x = probe.reshape(len(probe), *manifest.input_shape)
    for t in manifest.tasks:
        assert t.graph is not None, t.name
        visible = {l.name: sum(1 for o in l.owner if 0 <= o <= t.index) for l in manifest.layers}
        assert t.graph["units"] == visible  # only the units the task sees
        session = ort.InferenceSession(str(repo.file_path(manifest, t.graph["file"])), providers=["CPUExecutionProvider"])
        got = session.run(["scores"], {"input": x, "task": np.zeros(len(x), dtype=np.int64)})[0]
        assert got.shape == (len(x), len(t.classes))
        np.testing.assert_allclose(got, _logits(repo, manifest.version, t.index, probe).numpy(), rtol=0, atol=1e-5)
        for v in range(t.version, manifest.version + 1):  # every later version holds the very same graph
            later = repo.read_manifest(v).task(t.name).graph
            assert later["sha256"] == t.graph["sha256"]
            assert repo.fetch(repo.read_manifest(v), later["file"]) == repo.fetch(manifest, t.graph["file"])


def test_a_version_without_task_graphs_gets_them_at_the_next_add_task(tmp_path, data_dir):
    root = tmp_path / "repo"
    config = CLNPConfig(epochs=1, finetune_epochs=0, prune_connections=False)
    add_task(root, "a", "mnist", network="mlp:784-32-32", config=config, limit=1000, data_dir=str(data_dir))
    manifest_path = root / "1" / "manifest.json"  # make version 1 look like one written before task graphs
    data = json.loads(manifest_path.read_text())
    (root / "1" / data["tasks"][0].pop("graph")["file"]).unlink()
    manifest_path.write_text(json.dumps(data))
    assert ModelRepository.open(root).verify(1).tasks[0].graph is None
    add_task(root, "b", "fashion-mnist", config=config, limit=1000, data_dir=str(data_dir))
    m = ModelRepository.open(root).verify(2)
    assert [t.graph is not None for t in m.tasks] == [True, True]


def test_onnx_rejects_out_of_range_task_index(three_task_repo, probe):
    repo = ModelRepository.open(three_task_repo)
    manifest = repo.read_manifest()
    session = ort.InferenceSession(str(repo.onnx_path(manifest)), providers=["CPUExecutionProvider"])
    x = probe[:2].reshape(2, *manifest.input_shape)
    for bad in (-1, -3, 3, 1000):
        with pytest.raises(Exception, match="out of"):
            session.run(None, {"input": x, "task": np.array([0, bad], dtype=np.int64)})


def test_manifest_describes_tasks(three_task_repo):
    manifest = ModelRepository.open(three_task_repo).read_manifest()
    assert [t.name for t in manifest.tasks] == ["task0", "task1", "task2"]
    assert manifest.tasks[0].classes == ("0", "1", "2", "3", "4")
    assert manifest.tasks[2].classes[0] == "T-shirt/top"
    assert [t.version for t in manifest.tasks] == [1, 2, 3]
    assert manifest.onnx.max_classes == 10
    assert manifest.onnx.opset >= 18
    for t in manifest.tasks:
        assert 0 <= t.test_accuracy <= 100
        assert set(t.reused) == {l.name for l in manifest.layers}
        assert t.training["config"]["learning_rate"] == 0.002
        assert t.training["config"]["schedule"] == "iterative" and t.training["config"]["score"] == "taylor"


def test_capacity_and_evaluate_cli(three_task_repo, data_dir):
    runner = CliRunner()
    res = runner.invoke(cli, ["capacity", "-r", str(three_task_repo), "--json"])
    assert res.exit_code == 0, res.output
    report = json.loads(res.output)
    manifest = ModelRepository.open(three_task_repo).read_manifest()
    for layer, rec in zip(report["layers"], manifest.layers):
        assert layer["total"] == rec.units and layer["free"] == rec.free
        assert layer["owned_by_task"] == {t.name: rec.owned_by(t.index) for t in manifest.tasks}
    res = runner.invoke(cli, ["capacity", "-r", str(three_task_repo)])
    assert res.exit_code == 0 and "FREE" in res.output and "task2" in res.output
    res = runner.invoke(cli, ["evaluate", "-r", str(three_task_repo), "--json", "--data-dir", str(data_dir)])
    assert res.exit_code == 0, res.output
    rows = json.loads(res.output)
    assert [r["task"] for r in rows] == ["task0", "task1", "task2"]
    for r, t in zip(rows, manifest.tasks):  # the stored test accuracy is reproduced from the repository
        assert r["split"] == "test" and r["accuracy"] == pytest.approx(t.test_accuracy, abs=1e-3)


# ---- publishing -------------------------------------------------------------------------------

def test_publish_failure_leaves_repository_unchanged(three_task_repo, tmp_path):
    root = tmp_path / "repo"
    shutil.copytree(three_task_repo, root)
    before = tree_snapshot(root)
    repo = ModelRepository.open(root)

    def failing_manifest(version, weights_sha, onnx_sha):
        raise RuntimeError("disk full (simulated by the test)")

    with pytest.raises(RuntimeError):
        repo.publish(failing_manifest, {"w": np.zeros(3, np.float32)}, b"onnx")
    assert tree_snapshot(root) == before


def test_killed_add_task_never_leaves_a_half_version(three_task_repo, tmp_path, data_dir):
    """Kill add-task at several moments, publish included: the repository is old or old+1, never between."""
    root = tmp_path / "repo"
    shutil.copytree(three_task_repo, root)
    before = tree_snapshot(root)
    cmd = [sys.executable, "-m", "trainer.cli", "add-task", "-r", str(root), "-t", "extra", "-d", "mnist",
           "--epochs", "1", "--limit", "1000", "--data-dir", str(data_dir), "--finetune-epochs", "0"]
    outcomes = set()
    for delay in (2.0, 4.0, 6.0, 8.0):
        proc = subprocess.Popen(cmd, cwd=REPO_ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        repo = ModelRepository.open(root)
        versions = repo.versions()
        assert versions in ([1, 2, 3], [1, 2, 3, 4])
        for v in versions:
            repo.verify(v)  # every visible version is complete and passes its checksums
        outcomes.add(len(versions))
        if versions == [1, 2, 3, 4]:
            break
        leftovers = {k: v for k, v in tree_snapshot(root).items() if not k.startswith(".staging-")}
        assert leftovers == before
    # the previous versions are byte-for-byte intact
    after = tree_snapshot(root)
    assert {k: v for k, v in after.items() if k.split(os.sep)[0] in {"1", "2", "3", "clnp-repository.json"}} == before


def test_ctrl_c_during_add_task_publishes_nothing(three_task_repo, tmp_path, data_dir):
    root = tmp_path / "repo"
    shutil.copytree(three_task_repo, root)
    before = tree_snapshot(root)
    proc = subprocess.Popen(
        [sys.executable, "-m", "trainer.cli", "-v", "add-task", "-r", str(root), "-t", "extra", "-d", "mnist",
         "--epochs", "3", "--data-dir", str(data_dir)],
        cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        # A shell's background jobs start with SIGINT ignored; give the child the default, as a terminal would.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    for line in proc.stderr:  # wait until the data is loaded and training has begun
        if "loaded mnist" in line:
            break
    time.sleep(0.5)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "interrupted" in err
    assert tree_snapshot(root) == before


def test_retention_keeps_newest_versions(three_task_repo, tmp_path):
    root = tmp_path / "repo"
    shutil.copytree(three_task_repo, root)
    repo = ModelRepository.open(root)
    assert repo.apply_retention(2) == [1]
    assert repo.versions() == [2, 3]
    assert repo.apply_retention(1) == [2]
    assert repo.versions() == [3]
    repo.verify(3)
    with pytest.raises(RepositoryError):
        repo.apply_retention(0)


# ---- bad input: a clear one-line error, exit code 2, nothing changed ---------------------------

def _run_cli(args, env=None):
    return CliRunner().invoke(cli, args, env=env)


BAD_INPUTS = {
    "unknown data source": (["-t", "x", "-d", "imagenet"], "unknown data source"),
    "unsafe task name": (["-t", "../etc", "-d", "mnist"], "invalid task name"),
    "duplicate task name": (["-t", "task1", "-d", "mnist"], "already taken"),
    "network mismatch": (["-t", "x", "-d", "mnist", "-n", "mlp:784-10-10"], "differs from the repository"),
    "bad network spec": (["-t", "x", "-d", "mnist", "-n", "mlp:abc"], "invalid network spec"),
    "bound for a step that is off": (["-t", "x", "-d", "mnist", "--reuse-max-drop", "0.1"], "--connection-pruning"),
    "dense distillation without its teacher": (["-t", "x", "-d", "mnist", "--distill-dense"], "--teacher full"),
    "unit floor above the cap": (["-t", "x", "-d", "mnist", "--min-units", "50", "--max-units", "20"],
                                 "lower --min-units or raise --max-units"),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_is_refused_and_changes_nothing(case, three_task_repo, tmp_path, data_dir):
    root = tmp_path / "repo"
    shutil.copytree(three_task_repo, root)
    before = tree_snapshot(root)
    args, message = BAD_INPUTS[case]
    res = _run_cli(["add-task", "-r", str(root), *args, "--limit", "500", "--data-dir", str(data_dir)])
    assert res.exit_code == 2, res.output
    assert message in res.output.lower() or message in res.output
    assert res.output.strip().startswith("error:") and len(res.output.strip().splitlines()) == 1
    assert tree_snapshot(root) == before


def test_input_shape_mismatch(three_task_repo, tmp_path):
    root = tmp_path / "repo"
    shutil.copytree(three_task_repo, root)
    before = tree_snapshot(root)
    data = tmp_path / "small.npz"
    rng = np.random.default_rng(0)
    np.savez(data, x=rng.normal(size=(300, 10)).astype(np.float32), y=rng.integers(0, 3, 300))
    res = _run_cli(["add-task", "-r", str(root), "-t", "tabular", "-d", str(data)])
    assert res.exit_code == 2 and "(10,)" in res.output and "784" in res.output, res.output
    assert tree_snapshot(root) == before


def test_not_a_repository(tmp_path, data_dir):
    root = tmp_path / "elsewhere"
    root.mkdir()
    (root / "notes.txt").write_text("not a model repository")
    res = _run_cli(["add-task", "-r", str(root), "-t", "x", "-d", "mnist", "--limit", "500", "--data-dir", str(data_dir)])
    assert res.exit_code == 2 and "not a clnp model repository" in res.output
    assert sorted(p.name for p in root.iterdir()) == ["notes.txt"]
    res = _run_cli(["capacity", "-r", str(tmp_path / "missing")])
    assert res.exit_code == 2 and "does not exist" in res.output


def test_corrupt_version_is_refused(three_task_repo, tmp_path, data_dir):
    root = tmp_path / "repo"
    shutil.copytree(three_task_repo, root)
    weights = root / "3" / "weights.safetensors"
    raw = bytearray(weights.read_bytes())
    raw[-5] ^= 0xFF
    weights.write_bytes(bytes(raw))
    before = tree_snapshot(root)
    res = _run_cli(["add-task", "-r", str(root), "-t", "x", "-d", "mnist", "--limit", "500", "--data-dir", str(data_dir)])
    assert res.exit_code == 2 and "does not match its checksum" in res.output, res.output
    assert tree_snapshot(root) == before
    with pytest.raises(CorruptVersionError):
        ModelRepository.open(root).verify(3)


def test_missing_and_corrupt_data_files(tmp_path, monkeypatch):
    # No data dir and an unreachable download address: a clear error, and no repository is created.
    monkeypatch.setenv("CLNP_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("CLNP_MNIST_URL", "http://127.0.0.1:9/")
    monkeypatch.delenv("CLNP_DATA_DIR", raising=False)
    root = tmp_path / "repo"
    res = _run_cli(["add-task", "-r", str(root), "-t", "x", "-d", "mnist"])
    assert res.exit_code == 2 and "--data-dir" in res.output, res.output
    assert not root.exists()
    # A corrupt idx file in the data dir is named in the error.
    bad = tmp_path / "data" / "mnist"
    bad.mkdir(parents=True)
    for f in (REPO_ROOT.parent / "shared" / "data" / "mnist").glob("*.gz"):
        shutil.copy(f, bad / f.name)
    labels = bad / "train-labels-idx1-ubyte.gz"
    labels.write_bytes(labels.read_bytes()[:-100])
    res = _run_cli(["add-task", "-r", str(root), "-t", "x", "-d", "mnist", "--data-dir", str(tmp_path / "data")])
    assert res.exit_code == 2 and "train-labels" in res.output, res.output
    assert not root.exists()


def test_full_layer_fails_fast_and_changes_nothing(tmp_path, data_dir):
    """A tiny network fills up; the next add-task is refused before training, naming the layer."""
    root = tmp_path / "repo"
    cfg = CLNPConfig(epochs=1, finetune_epochs=0, max_drop=0.0, alpha=0.0, prune_connections=False)
    full = False
    for i in range(6):
        add_task(root, f"t{i}", f"permuted-mnist:{i}", network="mlp:784-3-3", config=cfg, limit=600,
                 data_dir=str(data_dir))
        if any(l.free == 0 for l in ModelRepository.open(root).read_manifest().layers):
            full = True
            break
    assert full, "the 3-unit network should fill up within 6 tasks when nothing may be pruned"
    before = tree_snapshot(root)
    res = _run_cli(["add-task", "-r", str(root), "-t", "more", "-d", "mnist", "--limit", "500", "--data-dir", str(data_dir)])
    assert res.exit_code == 2 and "no free unit left in layer" in res.output, res.output
    assert tree_snapshot(root) == before


def test_help_explains_every_option():
    res = _run_cli(["add-task", "--help"])
    assert res.exit_code == 0
    for opt in ("--repository", "--task", "--data", "--network", "--epochs", "--max-drop", "--limit", "--seed",
                "--device", "--alpha", "--retention", "--data-dir"):
        assert opt in res.output


def test_parity_check_scales_with_the_logits_and_still_catches_a_wrong_mask_or_head(three_task_repo, probe):
    """Round-off on large logits passes (numpy.allclose-style, scaled by the row); a wrong mask or head fails."""
    from trainer.export import PARITY_ATOL, ExportError, check_parity, export_onnx

    repo = ModelRepository.open(three_task_repo)
    net, owners = load_network(repo, repo.read_manifest())
    x = fit_to_network(probe, net.spec, "probe")
    probes = {t: x for t in range(net.num_tasks)}
    with torch.no_grad():
        for hw in net.head_weights:
            hw.mul_(1e4)  # logits in the tens of thousands: float32 round-off exceeds any fixed 1e-5
    onnx_bytes, _ = export_onnx(net, owners)
    worst = check_parity(onnx_bytes, net, owners, probes)
    assert worst > PARITY_ATOL  # the old absolute rule would have refused this correct export

    wrong = [o.clone() for o in owners]
    unit = int(torch.nonzero(wrong[0] == 1)[0])
    wrong[0][unit] = 2  # one unit of task 1 moved to task 2: task 1's mask in the graph lacks it
    wrong_bytes, _ = export_onnx(net, wrong)
    with pytest.raises(ExportError, match="task 1"):
        check_parity(wrong_bytes, net, owners, probes)

    with torch.no_grad():
        net.head_biases[2][0] += 1e-2 * float(net.head_weights[2].abs().max())  # a slightly wrong head
    with pytest.raises(ExportError, match="task 2"):
        check_parity(onnx_bytes, net, owners, probes)


def _without_dac_override() -> list[str] | None:
    """A command prefix under which this user cannot write a folder it may not write (None: none available here).

    As root, the permission bits bind only once CAP_DAC_OVERRIDE is dropped (setpriv, util-linux); any other
    user is bound by them already.
    """
    if os.getuid() != 0:
        return []
    setpriv = shutil.which("setpriv")
    return None if setpriv is None else [setpriv, "--bounding-set", "-dac_override,-dac_read_search", "--"]


@pytest.mark.parametrize("exists", [True, False], ids=["existing folder", "folder to create"])
def test_unwritable_repository_is_one_line_before_any_training(tmp_path, data_dir, exists):
    prefix = _without_dac_override()
    if prefix is None:
        pytest.skip("no way to drop root's permission override here (setpriv missing)")
    parent = tmp_path / "locked"
    parent.mkdir()
    repo = parent / "repo"
    if exists:
        repo.mkdir()
        repo.chmod(0o555)
    else:
        parent.chmod(0o555)
    try:
        proc = subprocess.run(
            [*prefix, sys.executable, "-c", "from trainer.cli import main; main()", "add-task", "-r", str(repo),
             "-t", "digits", "-d", "mnist", "--data-dir", str(data_dir), "--network", "mlp:784-16-16"],
            capture_output=True, text=True, timeout=120, cwd=REPO_ROOT,
            env={**os.environ, "PYTHONPATH": str(REPO_ROOT)})
    finally:
        (repo if exists else parent).chmod(0o755)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: cannot write to the model repository"), proc.stderr
    assert "Permission denied" in lines[0] and "--user" in lines[0]
    assert (not repo.exists()) or list(repo.iterdir()) == []  # nothing written, nothing half-published


@pytest.mark.parametrize("option,bad,good,key,value", [
    ("--precision", "fp16", "bf16", "precision", "bf16"),
    ("--finetune-average", "1", "0.99", "finetune_average", 0.99),
    ("--prune-rank", "everywhere", "global", "prune_rank", "global"),
    ("--max-units", "-1", "40", "max_units", 40),
    ("--plan-tasks", "-1", "3", "plan_tasks", 3),
    ("--reuse-init", "ones", "zero", "reuse_init", "zero")])
def test_add_task_training_option_reaches_the_record(option, bad, good, key, value, tmp_path, data_dir):
    """A training option reaches the trainer and the version's training record; a bad value changes nothing."""
    root = tmp_path / "repo"
    args = ["add-task", "-r", str(root), "-t", "a", "-d", "permuted-mnist:2", "--network", "mlp:784-32-32",
            "--epochs", "1", "--finetune-epochs", "1", "--limit", "500", "--data-dir", str(data_dir), "--json"]
    res = CliRunner().invoke(cli, args + [option, bad])
    assert res.exit_code == 2 and option in res.output and bad in res.output and not root.exists()
    res = CliRunner().invoke(cli, args + [option, good])
    assert res.exit_code == 0, res.output
    record = ModelRepository.open(root).read_manifest(1).tasks[0]
    assert record.training["config"][key] == value


def test_a_plan_given_once_holds_for_the_next_tasks_until_plan_tasks_0_ends_it(tmp_path, data_dir):
    """`--plan-tasks 4` on the first task: the second, given no plan, follows it (its share, the summary says which
    task of the plan it is and what the next keeps, and `capacity` forecasts the plan); `--plan-tasks 0` ends it."""
    root = tmp_path / "repo"
    args = ["-r", str(root), "--network", "mlp:784-32-32", "--epochs", "1", "--finetune-epochs", "1",
            "--limit", "500", "--data-dir", str(data_dir)]
    res = CliRunner().invoke(cli, ["add-task", "-t", "a", "-d", "permuted-mnist:1", *args, "--plan-tasks", "4"])
    assert res.exit_code == 0, res.output
    assert "plan: task 1 of 4; the next keeps layer1 8, layer2 8" in res.output  # (32 - 8) // 3
    res = CliRunner().invoke(cli, ["add-task", "-t", "b", "-d", "permuted-mnist:2", *args, "--json"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.output)
    assert out["plan_tasks"] == 4 and out["units_kept"] == {"layer1": 8, "layer2": 8}, out
    res = CliRunner().invoke(cli, ["capacity", "-r", str(root), "--json"])
    assert res.exit_code == 0, res.output
    report = json.loads(res.output)
    assert report["estimated_additional_tasks"] == 2 and "planned for 4 tasks" in report["estimate_basis"]
    # a floor beside the inherited plan is refused in one line, before training, and nothing is published
    before = tree_snapshot(root)
    res = _run_cli(["add-task", "-t", "c", "-d", "permuted-mnist:3", *args, "--min-units", "2"])
    assert res.exit_code == 2, res.output
    assert res.output.strip().splitlines() == [
        "error: the repository is planned for 4 tasks (version 2), and the plan sets the units each task keeps: "
        "leave out --min-units/--max-units, or give --plan-tasks 0 to end the plan"]
    assert tree_snapshot(root) == before
    res = CliRunner().invoke(cli, ["add-task", "-t", "c", "-d", "permuted-mnist:3", *args, "--plan-tasks", "0",
                                   "--json"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.output)["plan_tasks"] == 0
    assert ModelRepository.open(root).read_manifest(3).plan_tasks == 0


def test_candidate_pool_option_is_checked_in_one_line_and_the_summary_says_what_the_task_chose_from(tmp_path, data_dir):
    """`--candidate-pool` at or under 1, or without a plan, is refused in one line before any data is read;
    under a plan of 2 the first task has FREE units enough (no pool, the JSON says so) and the second chooses
    its 16 units from 32 candidates, 16 of them temporary, as the summary says."""
    root = tmp_path / "repo"
    args = ["-r", str(root), "--network", "mlp:784-32-32", "--epochs", "1", "--finetune-epochs", "1",
            "--limit", "500", "--data-dir", str(data_dir)]
    for extra, message in ((["--candidate-pool", "1"], "error: candidate_pool 1.0 must be 0 (off) or above 1"),
                           (["--candidate-pool", "2"], "error: candidate_pool 2.0 sizes a task's candidates from its "
                                                       "plan share, and there is no plan: add --plan-tasks")):
        res = _run_cli(["add-task", "-t", "a", "-d", "permuted-mnist:1", *args[:-1], str(tmp_path / "no-data"),
                        *extra])
        assert res.exit_code == 2, res.output
        lines = res.output.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(message), res.output
        assert not root.exists() or list(root.iterdir()) == []
    res = CliRunner().invoke(cli, ["add-task", "-t", "a", "-d", "permuted-mnist:1", *args, "--plan-tasks", "2",
                                   "--candidate-pool", "2", "--json"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.output)
    assert out["candidate_pool"] == {} and out["units_kept"] == {"layer1": 16, "layer2": 16}
    res = CliRunner().invoke(cli, ["add-task", "-t", "b", "-d", "permuted-mnist:2", *args, "--candidate-pool", "2"])
    assert res.exit_code == 0, res.output
    assert "candidate pool: chose from layer1 32, layer2 32 units" in res.output
    assert "layer1: kept    16 units" in res.output and "plan: task 2 of 2; the plan is complete" in res.output
    net, owners = load_network(ModelRepository.open(root), ModelRepository.open(root).read_manifest(2))
    assert [l.units for l in net.spec.layers] == [32, 32] and all(bool((o != FREE).all()) for o in owners)
    # a plan brings a pool of 2 unless told otherwise; 0 learns the last task in the units left, as before the pool
    for pool, chose in (([], {"layer1": 32, "layer2": 32}), (["--candidate-pool", "0"], {})):
        other = ["-r", str(tmp_path / f"repo-{len(pool)}"), *args[2:]]
        res = CliRunner().invoke(cli, ["add-task", "-t", "a", "-d", "permuted-mnist:1", *other, "--plan-tasks", "2",
                                       *pool])
        assert res.exit_code == 0, res.output
        res = CliRunner().invoke(cli, ["add-task", "-t", "b", "-d", "permuted-mnist:2", *other, *pool, "--json"])
        assert res.exit_code == 0, res.output
        out = json.loads(res.output)
        assert out["candidate_pool"] == chose and out["units_kept"] == {"layer1": 16, "layer2": 16}
        manifest = ModelRepository.open(tmp_path / f"repo-{len(pool)}").read_manifest()
        assert manifest.tasks[-1].training["config"]["candidate_pool"] == (0.0 if pool else 2.0)  # what it learned with
        assert manifest.tasks[-1].training["dropout_draws"] == "uniform"


def test_add_task_warns_when_a_task_keeps_most_of_a_layer_and_says_what_a_cap_cost(tmp_path, data_dir):
    """A task that keeps more than half of a layer's free units is warned about (with what bounds it); a cap
    (--max-units) cuts past the max drop, and the summary says what the bound alone would have kept."""
    args = ["-d", "permuted-mnist:2", "--network", "mlp:784-32-32", "--epochs", "1", "--finetune-epochs", "1",
            "--limit", "500", "--data-dir", str(data_dir)]
    root = tmp_path / "repo"
    res = CliRunner().invoke(cli, ["add-task", "-r", str(root), "-t", "all", *args, "--min-units", "32", "--json"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.output)
    assert out["units_kept"] == {"layer1": 32, "layer2": 32} and out["units_capped_from"] == {}
    assert [w.split(" (")[0] for w in out["warnings"]] == [
        "the task kept 32 of the 32 free units of layer1", "the task kept 32 of the 32 free units of layer2"]
    assert all("--max-units N caps" in w for w in out["warnings"])

    capped = tmp_path / "capped"
    res = CliRunner().invoke(cli, ["add-task", "-r", str(capped), "-t", "small", *args, "--max-drop", "0",
                                   "--max-units", "3"])
    assert res.exit_code == 0, res.output
    record = ModelRepository.open(capped).read_manifest(1).tasks[0]
    before = record.training["units_capped_from"]
    # max drop 0 on 32 units: the bound alone keeps more than 3 in each layer, so the cap cut both
    assert set(before) == {"layer1", "layer2"} and min(before.values()) > 3, before
    manifest = ModelRepository.open(capped).read_manifest(1)
    assert all(l.units - l.free == 3 for l in manifest.layers)
    line = next(l for l in res.output.splitlines() if l.strip().startswith("max units 3:"))
    assert f"layer1 {before['layer1']}, layer2 {before['layer2']}" in line and " the unpruned network" in line
    assert "warning:" not in res.output  # 3 of 32 is no large share
