"""`clnp-train add-task` under torchrun: 2 CPU processes, gloo on loopback, small real data.

The invariants hold as in one process: earlier tasks are bit-identical, ONNX matches torch, and only rank 0
publishes.
"""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import torch

from serving.repository import ModelRepository
from serving_helpers import DATA, ROOT, copy_repository, ort_scores, subprocess_env, template_repository
from trainer.clnp import task_masks
from trainer.data import load_source
from trainer.pipeline import fit_to_network, load_network


def test_add_task_under_torchrun_with_two_processes(tmp_path_factory, tmp_path):
    template = template_repository(tmp_path_factory)
    repo = copy_repository(template, tmp_path / "repo", (1,))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "trainer.cli", "add-task", "--repository", str(repo), "--task", "fashion", "--data", "fashion-mnist",
           "--epochs", "1", "--finetune-epochs", "0", "--limit", "2000", "--data-dir", str(DATA), "--json"]
    env = subprocess_env()
    env["OMP_NUM_THREADS"] = "1"
    proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads(proc.stdout[proc.stdout.index("{"):])  # rank 0 alone prints the result
    assert proc.stdout.count('"world_size"') == 1
    assert report["world_size"] == 2 and report["version"] == 2
    assert report["earlier_tasks_verified"] == 1
    assert report["onnx_parity_max_difference"] < 1e-4

    r = ModelRepository.open(repo)
    assert r.versions() == [1, 2]  # rank 1 published nothing of its own
    assert not [p.name for p in repo.iterdir() if p.name.startswith(".staging")]
    old, new = r.verify(1), r.verify(2)
    assert new.task_names == ("digits", "fashion")

    # Zero forgetting, checked here independently of the trainer's own check: the served scores of the earlier
    # task are bit-identical on real test images, and so are its units' weights.
    x = load_source("mnist", data_dir=str(DATA), limit=2000).x_test[:500].reshape(500, -1).astype(np.float32)
    np.testing.assert_array_equal(ort_scores(r.onnx_path(new), x, 0, 10), ort_scores(r.onnx_path(old), x, 0, 10))
    w_old, w_new = r.load_weights(old), r.load_weights(new)
    for layer in old.layers:
        owned = np.array(layer.owner) == 0
        i = int(layer.name.removeprefix("layer")) - 1
        for key in (f"layers.{i}.weight", f"layers.{i}.bias"):
            np.testing.assert_array_equal(w_new[key][owned], w_old[key][owned])

    # ONNX parity, checked independently: the published graph against the torch network rebuilt from the weights.
    net, owners = load_network(r, new)
    xf = load_source("fashion-mnist", data_dir=str(DATA), limit=2000).x_test[:300]
    xt = fit_to_network(xf, net.spec, "test")
    with torch.no_grad():
        torch_scores = net(xt, 1, task_masks(owners, 1)).numpy()
    np.testing.assert_allclose(ort_scores(r.onnx_path(new), xt.reshape(len(xt), -1).numpy(), 1, 10), torch_scores,
                               rtol=1e-4, atol=1e-4)


_SHUTDOWN_PROBE = r'''
import json, os, sys
import torch
from trainer import distributed

def gloo_workers():  # ProcessGroupGloo's worker threads name themselves pt_gloo_runloop
    return sum(open(f"/proc/self/task/{t}/comm").read().strip() == "pt_gloo_runloop" for t in os.listdir("/proc/self/task"))

w = distributed.init_from_environment("cpu")
p = torch.nn.Parameter(torch.zeros(3))
step = distributed.data_parallel(lambda x: (x * p).sum(), [p])
step(torch.full((3,), float(w.rank + 1))).backward()  # rank 0 sees ones, rank 1 twos: the mean is 1.5
del step
outcome = distributed.main_rank_outcome("published" if w.is_main else None)
running = gloo_workers()
distributed.shutdown()
report = {"rank": w.rank, "grad": p.grad.tolist(), "outcome": outcome,
          "workers_running": running, "workers_after_shutdown": gloo_workers()}
with open(os.path.join(sys.argv[1], f"rank{w.rank}.json"), "w") as f:  # a file each: the ranks share one stdout
    json.dump(report, f)
'''


def test_shutdown_frees_the_group_that_carried_the_last_broadcast(tmp_path):
    """DistributedDataParallel keeps the group it all-reduces over alive after it is gone; if that were the default
    group, its worker threads could drop the final broadcast's tensors while the interpreter finalizes and abort a
    run that succeeded. Gradients go over a group of their own, so shutdown really frees the default one."""
    script = tmp_path / "probe.py"
    script.write_text(_SHUTDOWN_PROBE)
    env = subprocess_env()
    env["OMP_NUM_THREADS"] = "1"
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           str(script), str(tmp_path)], env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    reports = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    assert [r["rank"] for r in reports] == [0, 1]
    for r in reports:
        assert r["grad"] == [1.5, 1.5, 1.5]  # DDP averaged the two ranks' gradients over its group
        assert r["outcome"] == "published"  # the default group carried rank 0's outcome to both ranks
        # Two groups' workers while running; after shutdown only those of the group DDP still holds remain.
        assert r["workers_running"] >= 2 * r["workers_after_shutdown"] > 0
