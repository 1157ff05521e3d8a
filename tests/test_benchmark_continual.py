"""benchmarks/continual (python -m benchmarks.continual) in quick mode: invariants of the results, not golden
numbers; and its typed record of continual.json against the committed results."""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch

from conftest import REPO_ROOT

sys.path.insert(0, str(REPO_ROOT))  # benchmarks/ is a folder of the repository, not an installed package

from benchmarks.continual.cli import RESULTS, main, parse_args  # noqa: E402
from benchmarks.continual.learners import CLNPLearner, diagonal_fisher  # noqa: E402
from benchmarks.continual.record import ABSENT, CLNPReport, RecordError, Result  # noqa: E402
from benchmarks.continual.scenarios import summarize  # noqa: E402
from benchmarks.tasks import Task  # noqa: E402
from trainer.clnp import CLNPConfig  # noqa: E402
from trainer.network import MaskedNetwork, parse_network_spec  # noqa: E402

COMMITTED = REPO_ROOT / "benchmarks" / "results" / "continual.json"

SECTIONS = ("settings", "machine", "published", "estimate", "ewc_selection", "headline", "sweep", "training_cost",
            "cnn", "plots", "total_wall_seconds")
METHODS = ("CLNP", "fine-tuning", "EWC", "single-task")


@pytest.fixture(scope="module")
def quick(tmp_path_factory, data_dir):
    out = tmp_path_factory.mktemp("continual")
    returned = main(["--quick", "--data-dir", str(data_dir), "--out", str(out)])
    res = json.loads((out / "continual.json").read_text())
    assert isinstance(returned, Result) and returned.to_json() == res  # main returns what it wrote
    return out, res


def _runs(res):
    yield "headline", res["headline"]["runs"]
    yield "cnn", res["cnn"]["runs"]


def test_json_has_every_section(quick):
    _, res = quick
    for key in SECTIONS:
        assert key in res, key
    assert res["machine"]["torch"] == torch.__version__ and res["machine"]["cpu_count"] and res["machine"]["platform"]
    assert res["total_wall_seconds"] > 0
    assert res["headline"]["seed_count"] == 1
    run = res["headline"]["runs"][0]
    assert set(METHODS) <= set(run["methods"])
    N = res["settings"]["tasks"]
    for name in METHODS:
        m = run["methods"][name]
        assert len(m["accuracy_matrix"]) == N and all(len(r) == N for r in m["accuracy_matrix"])
        assert 0 <= m["average_accuracy"] <= 100
        assert m["train_seconds"] > 0
        assert set(res["headline"]["summary"][name]) == {"average_accuracy", "backward_transfer", "train_seconds"}
    ew = res["ewc_selection"]
    assert ew["winner"] in ew["grid"] and len(ew["grid"]) == 2 and set(ew["scores"]) == {f"{g:g}" for g in ew["grid"]}
    assert run["methods"]["EWC"]["ewc_lambda"] == ew["winner"]
    assert [r["max_drop"] for r in res["sweep"]["rows"]] == [0.0, CLNPConfig().max_drop]
    for r in res["sweep"]["rows"]:
        assert 0 <= r["average_accuracy"] <= 100 and set(r["free_after_last_task"]) == {"layer1", "layer2"}
    tc = res["training_cost"]
    assert tc["clnp_median"] > 0 and tc["plain_median"] > 0 and tc["clnp_time_over_plain_time"] > 0
    assert set(res["cnn"]["runs"][0]["methods"]) >= {"CLNP", "fine-tuning", "single-task"}
    assert len(res["cnn"]["sources"]) == 3
    assert res["published"]["CLNP"] == "98.42 ± 0.04"


def test_clnp_zero_forgetting_is_bit_exact(quick):
    _, res = quick
    for scenario, runs in _runs(res):
        for run in runs:
            c = run["methods"]["CLNP"]
            N = len(c["accuracy_matrix"])
            checks = {(z["task"], z["after_task"]) for z in c["zero_forgetting"]}
            assert checks == {(i, j) for j in range(N) for i in range(j)}, scenario
            assert all(z["identical"] for z in c["zero_forgetting"]), scenario
            assert c["zero_forgetting_all_identical"]
            A = c["accuracy_matrix"]
            for i in range(N):
                for j in range(i, N):
                    assert A[i][j] is not None and A[i][j] == A[i][i], (scenario, i, j)
            assert c["backward_transfer"] == 0.0


def test_fine_tuning_forgets(quick):
    _, res = quick
    A = res["headline"]["runs"][0]["methods"]["fine-tuning"]["accuracy_matrix"]
    assert A[0][-1] < A[0][0] - 5.0, A
    assert res["headline"]["runs"][0]["methods"]["fine-tuning"]["backward_transfer"] < 0


def test_free_units_never_increase(quick):
    _, res = quick
    for scenario, runs in _runs(res):
        c = runs[0]["methods"]["CLNP"]
        layers, units = c["layers"], c["layer_units"]
        prev = dict(zip(layers, units))
        for k, tk in enumerate(c["tasks"]):
            for n, u in zip(layers, units):
                assert tk["free_after"][n] <= prev[n], (scenario, k, n)
                owned = tk["owned_after"][n]
                assert len(owned) == k + 1 and sum(owned) + tk["free_after"][n] == u
                assert owned[k] == tk["units_kept"][n]
                assert 0 <= tk["reused"][n] <= u - tk["free_after"][n] - owned[k]
            prev = tk["free_after"]
        # an earlier task's units never change hands
        for n in layers:
            for k in range(len(c["tasks"])):
                assert {tk["owned_after"][n][k] for tk in c["tasks"][k:]} == {c["units_per_task_per_layer"][n][k]}


def test_markdown_and_plots(quick):
    out, res = quick
    md = (out / "continual.md").read_text()
    assert md.strip()
    for needle in ("published (paper)", "98.42 ± 0.04", "97.2", "max_drop", "CLNP step time / plain step time",
                   "split MNIST", "FREE units per layer after each task", "Seeds: 1"):
        assert needle in md, needle
    assert len(res["plots"]) >= 5
    for name in ("accuracy_matrix.png", "capacity.png", "reuse.png", "max_drop_tradeoff.png", "cnn_accuracy_matrix.png"):
        assert name in res["plots"]
    for name in res["plots"]:
        data = (out / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 1000, name


@pytest.fixture(scope="module")
def parts(tmp_path_factory, data_dir):
    """The quick run in two parts, as two processes on two cores would run the full one, then merged."""
    a, b, merged = (tmp_path_factory.mktemp(n) for n in ("part_a", "part_b", "merged"))
    common = ["--quick", "--data-dir", str(data_dir), "--no-estimate"]
    main(common + ["--out", str(a), "--methods", "clnp,single", "--no-cnn", "--cost-steps", "0"])
    main(common + ["--out", str(b), "--methods", "finetune,ewc", "--sweep-max-drop="])
    main(["--merge", str(a), str(b), "--out", str(merged)])
    return a, b, merged, json.loads((merged / "continual.json").read_text())


@pytest.fixture(scope="module")
def more_seeds(tmp_path_factory, data_dir, parts):
    """A part that adds a second seed of CLNP alone, merged with the two parts above."""
    a, b, _, _ = parts
    c, merged = tmp_path_factory.mktemp("part_c"), tmp_path_factory.mktemp("merged_seeds")
    main(["--quick", "--data-dir", str(data_dir), "--no-estimate", "--out", str(c), "--methods", "clnp",
          "--seeds", "1", "--no-cnn", "--cost-steps", "0", "--sweep-max-drop="])
    main(["--merge", str(a), str(b), str(c), "--out", str(merged)])
    return c, merged, json.loads((merged / "continual.json").read_text())


def test_merged_parts_equal_the_single_run(quick, parts):
    _, single = quick
    a, b, out, res = parts
    for part in (a, b):  # a part on its own holds only its methods and sections
        r = json.loads((part / "continual.json").read_text())
        assert set(r["headline"]["runs"][0]["methods"]) in ({"CLNP", "single-task"}, {"fine-tuning", "EWC"})
    run, ref = res["headline"]["runs"][0], single["headline"]["runs"][0]
    assert list(run["methods"]) == list(METHODS)
    for name in METHODS:  # same seed, same data: every method learns exactly what it learns in one process
        assert run["methods"][name]["accuracy_matrix"] == ref["methods"][name]["accuracy_matrix"], name
    assert res["headline"]["zero_forgetting_all_identical"] is True
    assert res["ewc_selection"]["winner"] == single["ewc_selection"]["winner"]
    assert [(r["max_drop"], r["from_headline_run"]) for r in res["sweep"]["rows"]] == [(0.0, False), (CLNPConfig().max_drop, True)]
    assert [r["average_accuracy"] for r in res["sweep"]["rows"]] == [r["average_accuracy"] for r in single["sweep"]["rows"]]
    assert not res["training_cost"].get("skipped") and not res["cnn"].get("skipped")
    assert [p["folder"] for p in res["merged_from"]] == [str(a), str(b)]
    md = (out / "continual.md").read_text()
    assert "combined by `--merge`" in md and "EWC (λ=" in md and "FREE units per layer after each task" in md
    assert {"accuracy_matrix.png", "capacity.png", "max_drop_tradeoff.png", "cnn_capacity.png"} <= set(res["plots"])


def test_merge_adds_seeds_per_method(parts, more_seeds):
    _, _, _, two = parts
    c, out, res = more_seeds
    hl = res["headline"]
    assert res["settings"]["seeds"] == [0, 1] and [r["seed"] for r in hl["runs"]] == [0, 1]
    assert list(hl["runs"][1]["methods"]) == ["CLNP"]
    assert hl["runs"][0]["methods"] == two["headline"]["runs"][0]["methods"]  # seed 0 untouched
    seed1 = json.loads((c / "continual.json").read_text())["headline"]["runs"][0]["methods"]["CLNP"]
    accs = [two["headline"]["runs"][0]["methods"]["CLNP"]["average_accuracy"], seed1["average_accuracy"]]
    s = hl["summary"]["CLNP"]["average_accuracy"]
    assert s["n"] == 2 and s["mean"] == pytest.approx(sum(accs) / 2) and s["std"] is not None
    assert all(hl["summary"][n]["average_accuracy"]["n"] == 1 for n in ("fine-tuning", "EWC", "single-task"))
    assert hl["zero_forgetting_all_identical"] is True
    assert res["sweep"]["rows"] == two["sweep"]["rows"] and res["sweep"]["seed"] == 0
    md = (out / "continual.md").read_text()
    assert "Seeds: 2 (0, 1)" in md and "CLNP per seed" in md


def test_merge_refuses_what_does_not_fit(parts, tmp_path):
    a, b, _, _ = parts
    with pytest.raises(SystemExit, match=r"method CLNP \(seed 0\) is in both"):
        main(["--merge", str(a), str(a), "--out", str(tmp_path / "twice")])
    other = json.loads((b / "continual.json").read_text())
    other["settings"]["epochs"] = 3
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "continual.json").write_text(json.dumps(other))
    with pytest.raises(SystemExit, match="epochs=3"):
        main(["--merge", str(a), str(tmp_path / "other"), "--out", str(tmp_path / "mixed")])
    with pytest.raises(SystemExit, match="not found"):
        main(["--merge", str(a), str(tmp_path / "nowhere"), "--out", str(tmp_path / "x")])
    assert not (tmp_path / "twice").exists() and not (tmp_path / "mixed").exists()


@pytest.mark.parametrize("spec", ["mlp:784-12-10", "cnn:1x28x28-c3-c4-d6"])
def test_diagonal_fisher_matches_per_sample_autograd(spec):
    """The closed-form per-sample squared gradients equal a loop of one-sample backward passes."""
    net = MaskedNetwork(parse_network_spec(spec))
    shape = net.spec.input_shape
    net.add_head(3, torch.full(shape, 0.01), torch.zeros(shape), generator=torch.Generator().manual_seed(1))
    x = torch.rand(7, *shape, generator=torch.Generator().manual_seed(2)) * 255
    y = torch.tensor([0, 1, 2, 0, 1, 2, 1])
    fast = diagonal_fisher(net, 0, x, labels=y, batch=3)
    params = [*net.weights, *net.biases]
    ref = [torch.zeros_like(p) for p in params]
    masks = [torch.ones(l.units) for l in net.spec.layers]
    for n in range(len(x)):
        logp = torch.log_softmax(net(x[n:n + 1], 0, masks), 1)[0, y[n]]
        for r, g in zip(ref, torch.autograd.grad(logp, params)):
            r += g.pow(2) / len(x)
    for f, r in zip(fast, ref):
        assert torch.allclose(f, r, rtol=1e-4, atol=1e-9)


def test_capacity_exhaustion_is_recorded():
    """A CLNP network with no FREE unit left stops learning and reports it instead of failing the run."""
    spec = parse_network_spec("mlp:784-4-4")
    learner = CLNPLearner(spec, CLNPConfig(), "cpu")
    learner.owners = [torch.zeros(4, dtype=torch.int64) for _ in range(2)]  # every unit owned by task 0
    x = torch.rand(8, 28, 28)
    task = Task("t", 10, torch.ones(28, 28), torch.zeros(28, 28), x, torch.zeros(8, dtype=torch.int64),
                      x, torch.zeros(8, dtype=torch.int64), x, torch.zeros(8, dtype=torch.int64))
    learner.learn(1, task)
    assert learner.exhausted_at == 1 and "no free unit" in learner.exhausted_message
    assert learner.accuracy(1, x, task.y_test, "test") is None
    report = learner.report()
    assert isinstance(report, CLNPReport) and report.capacity_exhausted_at_task == 1
    s = summarize([[90.0, 90.0], [None, None]], [1.0])
    assert s.average_accuracy == 90.0 and s.tasks_counted == 1 and s.backward_transfer == 0.0


# ============================================================================ the typed record of continual.json


def test_committed_result_round_trips():
    """The committed results load into the typed record and write back to the same object, byte for byte."""
    text = COMMITTED.read_text()
    res = Result.read(COMMITTED)
    assert res.to_json() == json.loads(text)
    assert res.dumps() == text
    assert res.settings.tasks == 10 and res.settings.seeds == [0, 1, 2]
    assert res.settings.preset is ABSENT  # written before --preset: the key stays out on the way back
    assert [p.folder for p in res.merged_from][:2] == ["/tmp/bench/full-a", "/tmp/bench/full-b"]
    assert res.cnn is not None and res.cnn.runs[0].methods["CLNP"].clnp.zero_forgetting_all_identical
    run0 = res.headline.runs[0]
    assert list(run0.methods) == ["CLNP", "fine-tuning", "EWC", "single-task"]
    assert run0.methods["EWC"].ewc.ewc_lambda == res.ewc_selection.winner
    assert run0.methods["fine-tuning"].clnp is None and run0.methods["fine-tuning"].ewc is None
    assert [r.own_run is None for r in res.sweep.rows] == [r.from_headline_run for r in res.sweep.rows]


def _broken(edit) -> dict:
    data = json.loads(COMMITTED.read_text())
    edit(data)
    return data


@pytest.mark.parametrize("edit, message", [
    (lambda d: d["headline"]["runs"][0]["methods"]["CLNP"].pop("accuracy_matrix"),
     r'^headline\.runs\[0\]\.methods\["CLNP"\]: missing key \'accuracy_matrix\'$'),
    (lambda d: d["headline"]["runs"][0]["methods"]["CLNP"]["tasks"][2].pop("free_after"),
     r'^headline\.runs\[0\]\.methods\["CLNP"\]\.tasks\[2\]: missing key \'free_after\'$'),
    (lambda d: d["headline"]["runs"][0]["methods"]["EWC"].pop("fisher_labels"),
     r'^headline\.runs\[0\]\.methods\["EWC"\]: missing key \'fisher_labels\'$'),
    (lambda d: d["settings"].update(tasks="10"), r'^settings\.tasks: expected an integer, got a string \("10"\)$'),
    (lambda d: d["sweep"]["rows"][1].update(max_drop=None), r"^sweep\.rows\[1\]\.max_drop: expected a number, got null$"),
    (lambda d: d["machine"].update(gpu="none"), r"^machine: unexpected key 'gpu'$"),
    (lambda d: d.pop("plots"), r"^missing key 'plots'$"),
    (lambda d: d.update(headline=[]), r"^headline: expected an object, got a list$"),
    (lambda d: d["headline"].update(runs=[]), r'^headline\.runs: no run'),
])
def test_malformed_result_gives_a_one_line_error(edit, message):
    with pytest.raises(RecordError, match=message) as e:
        Result.from_json(_broken(edit))
    assert "\n" not in str(e.value)


def test_merge_names_the_file_and_key_that_do_not_fit(tmp_path):
    """--merge with a part whose continual.json lacks a key stops with one line naming the file and the key."""
    for name, edit in (("good", lambda d: None), ("bad", lambda d: d["training_cost"].pop("clnp_median"))):
        (tmp_path / name).mkdir()
        (tmp_path / name / "continual.json").write_text(json.dumps(_broken(edit)))
    with pytest.raises(SystemExit) as e:
        main(["--merge", str(tmp_path / "good"), str(tmp_path / "bad"), "--out", str(tmp_path / "merged")])
    assert str(e.value) == f"--merge: {tmp_path / 'bad' / 'continual.json'}: training_cost: missing key 'clnp_median'"
    (tmp_path / "bad" / "continual.json").write_text("{not json")
    with pytest.raises(SystemExit, match="not readable as JSON"):
        main(["--merge", str(tmp_path / "good"), str(tmp_path / "bad"), "--out", str(tmp_path / "merged")])
    assert not (tmp_path / "merged").exists()


def test_skipped_sections_read_and_write_as_none():
    data = _broken(lambda d: d.update(sweep={"skipped": True}, cnn={"skipped": True}, estimate={},
                                      ewc_selection={"skipped": True, "winner": None}))
    res = Result.from_json(data)
    assert res.sweep is None and res.cnn is None and res.estimate is None and res.ewc_selection is None
    assert res.to_json() == data


def test_quick_and_partial_runs_never_default_to_the_committed_results(monkeypatch, tmp_path):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # where parse_args makes its new folders
    for argv in (["--quick"], ["--methods", "clnp,single"], ["--quick", "--methods", "clnp,finetune,ewc,single"]):
        out = Path(parse_args(argv).out)
        assert out.parent == tmp_path and out.is_dir() and not any(out.iterdir()), argv
    assert Path(parse_args([]).out) == RESULTS == REPO_ROOT / "benchmarks" / "results"
    assert Path(parse_args(["--merge", "a", "b"]).out) == RESULTS
    assert parse_args(["--quick", "--out", str(tmp_path / "mine")]).out == str(tmp_path / "mine")


def test_runs_as_a_module_from_the_repository_root():
    done = subprocess.run([sys.executable, "-m", "benchmarks.continual", "--help"], cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("usage: python -m benchmarks.continual") and "--merge DIR" in done.stdout
    assert "Continual-learning benchmark" in done.stdout
