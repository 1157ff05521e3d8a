"""Every selectable CLNP method keeps the invariants, on small real data through the public API.

For each preset and unit score: a second task leaves the first bit-identical (add_task's own check and the
logits here), no connection runs from a FREE unit into an owned unit, ONNX Runtime agrees with torch, and
the first task keeps some units but fewer than the layer has.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

from serving.contract import FREE
from serving.capacity import capacity_report
from serving.repository import ModelRepository
from trainer.clnp import PRESETS, ConfigError, new_owners, planned_units, preset, task_masks
from trainer import clnp
from trainer.compact import compact_task, move_into, widen, write_back
from trainer.network import MaskedNetwork, parse_network_spec
from trainer.pipeline import add_task, fit_to_network, load_network
from trainer.pruning import SCHEDULES, SCORES, _cut, _cut_global
from trainer.training import EpochPlan, TaskTrainer, dropout_masks

NETWORK = "mlp:784-64-64"
FAST = dict(epochs=2, batch_size=64, learning_rate=0.002, recovery_epochs=2.0, max_prune_steps=6, max_drop=1.0)
METHODS = [(name, {}) for name in sorted(PRESETS)] + [
    ("default", {"score": s}) for s in sorted(SCORES) if s != PRESETS["default"].score] + [
    ("reference", {"schedule": "iterative"}), ("default", {"precision": "bf16"}), ("default", {"isolate": True}),
    ("default", {"teacher": "full"}), ("default", {"teacher": "full", "distill_dense": True}),
    ("default", {"finetune_average": 0.99}), ("default", {"prune_rank": "global"}), ("default", {"reuse_init": "zero"})]


@pytest.mark.parametrize("name,overrides", METHODS,
                         ids=[f"{n}-{'-'.join(str(v) for v in o.values()) or 'as-is'}" for n, o in METHODS])
def test_method_keeps_the_invariants(name, overrides, tmp_path, data_dir):
    config = preset(name, **{**FAST, **overrides}) if name != "reference" else preset(name, epochs=2, batch_size=64, **overrides)
    root = tmp_path / "repo"
    first = add_task(root, "a", "permuted-mnist:3", network=NETWORK, config=config, limit=1000, data_dir=str(data_dir))
    second = add_task(root, "b", "split-mnist:0,1,2,3,4", config=config, limit=1000, data_dir=str(data_dir))
    assert second.earlier_tasks_checked == 1  # add_task compared task a bit for bit before publishing
    assert second.parity_max_difference < 1e-3

    repo = ModelRepository.open(root)
    probe = fit_to_network(np.random.default_rng(0).uniform(0, 255, (64, 784)).astype(np.float32),
                           parse_network_spec(NETWORK), "probe")
    nets = {v: load_network(repo, repo.read_manifest(v)) for v in (1, 2)}
    with torch.no_grad():
        before = nets[1][0](probe, 0, task_masks(nets[1][1], 0))
        after = nets[2][0](probe, 0, task_masks(nets[2][1], 0))
    assert torch.equal(before, after)

    net, owners = nets[2]
    for i in range(1, len(owners)):  # connections from FREE units into owned units are exactly zero
        rows, cols = owners[i] != FREE, owners[i - 1] == FREE
        assert torch.count_nonzero(net.weights[i].detach()[rows][:, cols]) == 0
    for i, o in enumerate(owners):
        assert torch.count_nonzero(net.weights[i].detach()[o == FREE]) == 0  # FREE rows hold nothing either
    if config.isolate:  # the second task reads nothing from the first task's units, in any layer or its head
        for i in range(1, len(owners)):
            rows, cols = owners[i] == 1, owners[i - 1] == 0
            assert rows.any() and torch.count_nonzero(net.weights[i].detach()[rows][:, cols]) == 0
        assert torch.count_nonzero(net.head_weights[1].detach()[:, owners[-1] == 0]) == 0
        assert set(second.outcome.reused.values()) == {0}
    assert all(0 < k < 64 for k in first.outcome.units_kept.values()), first.outcome.units_kept
    assert all(0 <= k < 64 for k in second.outcome.units_kept.values())  # it may live on reused units alone
    for outcome in (first.outcome, second.outcome):
        assert outcome.validation_accuracy >= outcome.dense_validation_accuracy - config.max_drop - 1e-9
        # validation after each phase: it starts at the dense figure and ends at the published one
        phases = outcome.phase_validation
        assert list(phases) == ["train", "prune", "fine-tune", "reuse"]
        assert phases["train"] == outcome.dense_validation_accuracy
        assert phases["reuse"] == outcome.validation_accuracy
        # fine-tuning is kept when it does not lose to the pruned network, or ("bound") stays within the max drop
        assert phases["fine-tune"] >= phases["prune"] or (
            config.finetune_keep == "bound" and phases["fine-tune"] >= phases["train"] - config.max_drop)
        assert (outcome.teacher_validation is not None) == (config.teacher == "full")


def test_compact_copy_round_trips_bit_for_bit(data_dir):
    """Copying a task's visible units out and back (no training) leaves every tensor bit-identical."""
    torch.manual_seed(0)
    net = MaskedNetwork(parse_network_spec("cnn:1x28x28-c6-c8-d16"))
    owners = new_owners(net)
    net.add_head(10, torch.ones(1, 28, 28), torch.zeros(1, 28, 28))
    net.add_head(5, torch.ones(1, 28, 28), torch.zeros(1, 28, 28))
    owners = [torch.tensor([0, -1, 1, 0, -1, 1]), torch.tensor([1, 1, -1, 0, -1, 0, 1, -1]),
              torch.tensor([0] * 5 + [1] * 6 + [-1] * 5)]
    before = {k: v.clone() for k, v in net.state_tensors().items()}
    visible = [(o == 0) | (o == 1) for o in owners]
    ct = compact_task(net, owners, 1, visible)
    x = torch.rand(4, 1, 28, 28) * 255
    with torch.no_grad():  # the compact copy computes what the masked full network does
        full = net(x, 1, task_masks(owners, 1))
        small = ct.net(x, 0, [torch.ones(len(o)) for o in ct.owners])
    torch.testing.assert_close(small, full, rtol=1e-5, atol=1e-5)
    write_back(ct, net, 1)
    for k, v in net.state_tensors().items():
        assert torch.equal(v, before[k]), k


def test_a_task_learned_in_a_wider_copy_moves_into_the_free_units_and_computes_what_it_computed_there():
    """widen adds FREE units in every layer (a conv net and its dense layer) without changing any task's answer;
    move_into puts a task that kept units beyond the width into FREE units of the network, where it answers
    as it did in the wide copy, and writes no earlier task's unit or head."""
    torch.manual_seed(0)
    net = MaskedNetwork(parse_network_spec("cnn:1x28x28-c6-c8-d16"))
    for classes in (10, 5):
        net.add_head(classes, torch.ones(1, 28, 28), torch.zeros(1, 28, 28))
    owners = [torch.tensor([0, -1, 0, -1, -1, 0]), torch.tensor([0, -1, -1, 0, -1, 0, -1, -1]),
              torch.tensor([0] * 6 + [-1] * 10)]
    clnp.zero_free_connections(net, owners, 0)
    x = torch.rand(4, 1, 28, 28) * 255
    before = {k: v.clone() for k, v in net.state_tensors().items()}
    wide, wide_owners = widen(net, owners, [3, 2, 5])
    assert [l.units for l in wide.spec.layers] == [9, 10, 21]
    assert [int((o == FREE).sum()) for o in wide_owners] == [6, 7, 15]
    with torch.no_grad():
        torch.testing.assert_close(wide(x, 0, task_masks(wide_owners, 0)), net(x, 0, task_masks(owners, 0)),
                                   rtol=1e-6, atol=1e-6)
    # task 1 "learned" in the wide copy: fresh weights in its rows and head, units kept within and beyond the width
    generator = torch.Generator().manual_seed(3)
    for i, o in enumerate(wide_owners):
        wide.reinit_units(i, o == FREE, generator=generator)
    with torch.no_grad():
        wide.head_weights[1].normal_(generator=generator)
    kept = [[1, 6, 8], [2, 9], [7, 16, 17, 20]]
    wide_new = [o.clone() for o in wide_owners]
    for o, k in zip(wide_new, kept):
        o[k] = 1
    clnp.zero_free_connections(wide, wide_new, 1)
    new = move_into(wide, wide_new, net, owners, 1)
    assert [int((o == 1).sum()) for o in new] == [3, 2, 4]
    assert new[0][1] == 1 and new[2][7] == 1  # kept within the width: where they were
    for o, n in zip(owners, new):
        assert torch.equal(n[o != FREE], o[o != FREE])  # task 0's units stay task 0's
    with torch.no_grad():
        torch.testing.assert_close(net(x, 1, task_masks(new, 1)), wide(x, 1, task_masks(wide_new, 1)),
                                   rtol=1e-5, atol=1e-5)
        assert torch.equal(net(x, 0, task_masks(new, 0)), net(x, 0, task_masks(owners, 0)))
    after = net.state_tensors()
    for i, o in enumerate(owners):  # earlier rows and heads bit-identical
        assert torch.equal(after[f"layers.{i}.weight"][o == 0], before[f"layers.{i}.weight"][o == 0])
    assert torch.equal(after["heads.0.weight"], before["heads.0.weight"])
    too_many = [o.clone() for o in wide_new]
    too_many[1][[3, 4, 6, 7, 8]] = 1  # 7 units where the network has 5 FREE
    with pytest.raises(RuntimeError, match="kept 7 units, but the network has only 5 FREE"):
        move_into(wide, too_many, net, owners, 1)


def test_a_candidate_pool_lets_a_plan_s_last_tasks_choose_from_more_units_than_are_free(tmp_path, data_dir):
    """candidate_pool 2.5 under a plan of 3 on 64 units: the first task has 64 FREE for its 21 (no pool: it is
    learned exactly as without one); the second chooses 21 from 53 (43 FREE and 10 temporary), the last 22 from
    55 (33 temporary). The published network keeps its shape, every earlier task stays bit-identical (add_task
    checks it), and the CLNP invariants hold. Without a plan there is no share to size a pool from: refused
    before any data is read."""
    config = preset("default", **dict(FAST, epochs=1, recovery_epochs=0.5, finetune_epochs=1), plan_tasks=3)
    assert config.pool() == 2.0 and replace(config, candidate_pool=0).pool() == 0 == replace(config, plan_tasks=0).pool()
    pooled, plain = tmp_path / "pooled", tmp_path / "plain"
    add_task(plain, "a", "permuted-mnist:1", network=NETWORK, config=replace(config, candidate_pool=0), limit=500,
             data_dir=str(data_dir))
    outcomes = []
    for name, source in (("a", "permuted-mnist:1"), ("b", "permuted-mnist:2"), ("c", "permuted-mnist:3")):
        result = add_task(pooled, name, source, network=NETWORK, config=replace(config, candidate_pool=2.5),
                          limit=500, data_dir=str(data_dir))
        assert result.earlier_tasks_checked == len(outcomes) and result.parity_max_difference < 1e-3
        outcomes.append(result.outcome)
        repo = ModelRepository.open(pooled)
        net, owners = load_network(repo, repo.read_manifest())
        assert [l.units for l in net.spec.layers] == [64, 64]
        for i in range(1, len(owners)):  # connections from FREE units into owned units are exactly zero
            rows, cols = owners[i] != FREE, owners[i - 1] == FREE
            assert torch.count_nonzero(net.weights[i].detach()[rows][:, cols]) == 0
        o = result.outcome
        assert o.phase_validation["reuse"] == o.validation_accuracy
        assert o.validation_accuracy >= o.dense_validation_accuracy - config.max_drop - 1e-9 or o.capped
    assert [o.pool for o in outcomes] == [{}, {"layer1": 53, "layer2": 53}, {"layer1": 55, "layer2": 55}]
    assert [set(o.units_kept.values()) for o in outcomes] == [{21}, {21}, {22}]
    assert [set(o.units_pruned.values()) for o in outcomes] == [{43}, {22}, {0}]  # of the FREE units, as ever
    assert [[int((o == t).sum()) for t in (FREE, 0, 1, 2)] for o in owners] == [[0, 21, 21, 22]] * 2
    # the first task had FREE units enough: the pool did nothing, bit for bit
    a = load_network(ModelRepository.open(plain), ModelRepository.open(plain).read_manifest(1))[0].state_tensors()
    b = load_network(repo, repo.read_manifest(1))[0].state_tensors()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(ConfigError, match="must be 0 \\(off\\) or above 1"):
        preset("default", candidate_pool=1.0)
    with pytest.raises(ConfigError, match="there is no plan: add --plan-tasks"):
        add_task(tmp_path / "none", "a", "permuted-mnist:1", network=NETWORK,
                 config=preset("default", candidate_pool=2.0), limit=500, data_dir=str(tmp_path / "no-data"))
    assert not (tmp_path / "none").exists() or not any((tmp_path / "none").iterdir())


def test_unknown_method_names_are_refused():
    with pytest.raises(ConfigError, match="unit score"):
        preset("default", score="entropy")
    with pytest.raises(ConfigError, match="preset"):
        preset("fastest")
    assert set(SCHEDULES) == {"one-shot", "iterative"} and {"activity", "taylor", "magnitude"} <= set(SCORES)
    with pytest.raises(ConfigError, match="precision 'fp16'"):
        preset("default", precision="fp16")
    with pytest.raises(ConfigError, match="max_drop -0.5"):
        preset("default", max_drop=-0.5)
    with pytest.raises(ConfigError, match="learning-rate schedule 'linear'"):
        preset("default", recovery_lr_schedule="linear")
    assert preset("default").recovery_plan().lr_schedule == "constant"  # the recovery every recorded run used
    assert preset("default", recovery_lr_schedule="cosine").recovery_plan().lr_schedule == "cosine"


@pytest.mark.parametrize("spec", ["mlp:20-12-10", "cnn:1x8x8-c4-d6"])
def test_bf16_steps_compute_in_bfloat16_and_hold_earlier_rows(spec):
    """precision=bf16 changes the arithmetic of the steps (not the parameters' dtype) and moves only FREE rows."""
    from trainer.training import EpochPlan, TaskTrainer, dropout_masks

    torch.manual_seed(0)
    base = MaskedNetwork(parse_network_spec(spec))
    shape = base.spec.input_shape
    for _ in range(2):
        base.add_head(3, torch.ones(shape), torch.zeros(shape))
    owners = new_owners(base)
    for o in owners:
        o[: len(o) // 2] = 0  # task 0 owns half of each layer
    with torch.no_grad():
        for i in range(1, len(owners)):  # no connection from a FREE unit into an owned one
            w = base.weights[i].view(base.weights[i].shape[0], len(owners[i - 1]), -1)
            w[(owners[i] == 0).nonzero().reshape(-1, 1), (owners[i - 1] == FREE).nonzero().reshape(1, -1)] = 0
    x, y = torch.rand(64, *shape) * 255, torch.randint(0, 3, (64,))
    ones = [torch.ones(len(o)) for o in owners]
    seen_dtypes, results = set(), {}
    for precision in ("fp32", "bf16"):
        net = MaskedNetwork.from_state(base.spec, {k: v.clone() for k, v in base.state_tensors().items()}, 2)
        trainer = TaskTrainer(net, owners, 1, 0, 16)
        params, grad_masks = trainer.free_unit_parameters()
        real_matmul = torch.Tensor.__matmul__

        def spy(a, b):
            out = real_matmul(a, b)
            if precision == "bf16":
                seen_dtypes.add(out.dtype)
            return out

        torch.Tensor.__matmul__ = spy
        try:
            trainer.run_epochs(x, y, EpochPlan(2, 0.01, precision=precision), params, grad_masks, ones)
        finally:
            torch.Tensor.__matmul__ = real_matmul
        assert all(p.dtype == torch.float32 for p in net.parameters())
        for i, o in enumerate(owners):  # earlier rows bit-identical, FREE rows trained
            assert torch.equal(net.weights[i][o == 0], base.weights[i][o == 0])
            assert not torch.equal(net.weights[i][o == FREE], base.weights[i][o == FREE])
        results[precision] = torch.cat([p.detach().flatten() for p in net.parameters()])
    assert torch.bfloat16 in seen_dtypes  # the products really ran in bfloat16
    assert not torch.equal(results["fp32"], results["bf16"])


def _two_task_net():
    """A 2-layer MLP where task 0 owns some units, the rest are FREE, and task 1's head is added."""
    torch.manual_seed(0)
    net = MaskedNetwork(parse_network_spec("mlp:20-12-10"))
    for _ in range(2):
        net.add_head(3, torch.ones(20), torch.zeros(20))
    owners = [torch.tensor([0, FREE, 0, FREE, FREE, 0, FREE, 0, FREE, FREE, 0, FREE]),
              torch.tensor([FREE, 0, 0, FREE, 0, FREE, FREE, 0, FREE, FREE])]
    with torch.no_grad():  # as CLNP leaves it: no connection from a FREE unit into an owned unit
        w = net.weights[1]
        w[(owners[1] == 0).nonzero().reshape(-1, 1), (owners[0] == FREE).nonzero().reshape(1, -1)] = 0
    return net, owners


def test_still_rows_outside_autograd_give_the_same_gradients():
    """run_epochs computes earlier tasks' rows without autograd; logits and every gradient match the plain pass."""
    from trainer.training import TaskTrainer, frozen_split, split_hidden

    net, owners = _two_task_net()
    kept = [o.clone() for o in owners]  # task 1 after pruning: it keeps some of the FREE units
    kept[0][[1, 4, 8]] = 1
    kept[1][[0, 6]] = 1
    with torch.no_grad():  # and the units it let go hold nothing, as after pruning
        for i, o in enumerate(kept):
            net.weights[i][o == FREE] = 0
    learning = TaskTrainer(net, owners, 1, 0, 8).free_unit_parameters()  # moving: the FREE units
    tuning = TaskTrainer(net, kept, 1, 0, 8).own_unit_parameters()  # moving: task 1's units
    for (params, masks), moving in ((learning, [7, 6]), (tuning, [3, 2])):
        split = frozen_split(net, 1, params, masks)
        assert split is not None and [len(s.moving) for s in split] == moving
        x = torch.rand(8, 20) * 3
        drop = [torch.bernoulli(torch.full((8, len(o)), 0.8)) for o in owners]  # per-row dropout masks
        grads = []
        for hidden in (net.hidden, lambda h, m: split_hidden(net, h, m, split)):
            for p in params:
                p.grad = None
            acts = hidden(net.preprocess(x, 1), drop)
            logits = net.features(acts) @ net.head_weights[1].T + net.head_biases[1]
            torch.nn.functional.cross_entropy(logits, torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])).backward()
            grads.append(([p.grad * (1 if m is None else m) for p, m in zip(params, masks)], logits.detach()))
        (plain, plain_logits), (fast, fast_logits) = grads
        torch.testing.assert_close(fast_logits, plain_logits, rtol=1e-6, atol=1e-6)
        for a, b in zip(fast, plain):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
        assert any(torch.count_nonzero(g) for g in fast)


def test_still_rows_fed_by_moving_units_take_the_plain_pass():
    from trainer.training import TaskTrainer, frozen_split

    net, owners = _two_task_net()
    with torch.no_grad():
        net.weights[1][1, 1] = 0.5  # owned unit 1 of layer 2 reads FREE unit 1 of layer 1
    params, masks = TaskTrainer(net, owners, 1, 0, 8).free_unit_parameters()
    assert frozen_split(net, 1, params, masks) is None
    conv = MaskedNetwork(parse_network_spec("cnn:1x8x8-c2-d4"))
    conv.add_head(2, torch.ones(1, 8, 8), torch.zeros(1, 8, 8))
    params, masks = TaskTrainer(conv, new_owners(conv), 0, 0, 4).free_unit_parameters()
    assert frozen_split(conv, 0, params, masks) is None


def test_dropout_masks_keep_each_dense_unit_with_the_keep_probability_scaled_and_leave_conv_masks_alone():
    net = MaskedNetwork(parse_network_spec("cnn:1x8x8-c4-d300"))
    masks = [torch.ones(4), torch.ones(300)]
    masks[1][:100] = 0  # units the task does not see stay dropped in every row
    keep = 0.8
    drawn = dropout_masks(masks, net.spec.layers, 200, keep, torch.Generator().manual_seed(3))
    assert drawn[0] is masks[0]  # conv: whole filters are never dropped
    dense = drawn[1]
    assert dense.shape == (200, 300) and dense.dtype == masks[1].dtype
    assert torch.all(dense[:, :100] == 0)
    seen = dense[:, 100:]
    assert set(seen.unique().tolist()) == {0.0, 1.0 / keep}  # inverted dropout: kept entries scaled by 1/keep
    kept = (seen > 0).double().mean().item()  # 40,000 draws: the standard error is 0.002
    assert abs(kept - keep) < 0.01
    assert abs(seen.double().mean().item() - 1.0) < 0.0125  # the expected activation is unchanged
    again = dropout_masks(masks, net.spec.layers, 200, keep, torch.Generator().manual_seed(3))[1]
    other = dropout_masks(masks, net.spec.layers, 200, keep, torch.Generator().manual_seed(4))[1]
    assert torch.equal(dense, again) and not torch.equal(dense, other)  # the trainer's generator decides the draws


def test_reuse_by_signal_counts_the_earlier_units_that_carry_the_signal_and_changes_nothing():
    """Layer 1: units 0, 1 are task 0's, unit 2 is task 1's; on input (10, 1, 1) unit j's activation is x_j.

    Task 1's layer-2 unit reads (1, 1, w): the signals are 10, 1 and w. With w = 0 the earlier units carry all
    of it: both count at a 5% tail (dropping unit 1 would leave 1/11 = 9% uncounted), only unit 0 at 10%.
    With w = 100 the task leans on its own unit, and unit 1's 1/111 falls under the 5% tail.
    """
    from trainer.clnp import reuse_by_signal, reuse_counts

    net = MaskedNetwork(parse_network_spec("mlp:3-3-2"))
    for _ in range(2):
        net.add_head(2, torch.ones(3), torch.zeros(3))
    owners = [torch.tensor([0, 0, 1]), torch.tensor([0, 1])]
    x = torch.tensor([[10.0, 1.0, 1.0]])
    with torch.no_grad():
        net.weights[0].copy_(torch.eye(3))
        net.biases[0].zero_()
        net.weights[1].copy_(torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 0.0]]))
    before = {k: v.clone() for k, v in net.state_tensors().items()}
    assert reuse_by_signal(net, owners, 1, x, tail=0.05)["layer1"] == 2
    assert reuse_by_signal(net, owners, 1, x, tail=0.10)["layer1"] == 1
    for k, v in net.state_tensors().items():  # read-only
        assert torch.equal(v, before[k]), k
    with torch.no_grad():
        net.weights[1][1, 2] = 100.0
    assert reuse_by_signal(net, owners, 1, x, tail=0.05)["layer1"] == 1
    assert reuse_counts(net, owners, 1)["layer1"] == 2  # both are connected: the connection count cannot tell
    assert reuse_by_signal(net, owners, 0, x)["layer1"] == 0  # task 0 has no earlier units


def test_default_preset_reports_reuse_by_signal(tmp_path, data_dir):
    """The default's reuse figure counts at most the earlier units and fewer than a connection count."""
    config = preset("default", **FAST)
    assert config.reuse_measure == "signal" and config.reuse_max_drop == 0.0
    root = tmp_path / "repo"
    add_task(root, "a", "permuted-mnist:3", network=NETWORK, config=config, limit=1000, data_dir=str(data_dir))
    second = add_task(root, "b", "permuted-mnist:4", config=config, limit=1000, data_dir=str(data_dir))
    repo = ModelRepository.open(root)
    manifest = repo.read_manifest(2)
    net, owners = load_network(repo, manifest)
    from trainer.clnp import reuse_counts

    connected = reuse_counts(net, owners, 1)
    for name, o in zip(net.spec.layer_names, owners):
        assert manifest.tasks[1].reused[name] == second.outcome.reused[name]
        assert 0 < second.outcome.reused[name] <= connected[name] <= int((o == 0).sum())
    assert second.outcome.reused != connected  # the measures differ on a real task
    # the default prunes no connection (step 5 is off): every earlier unit still feeds task b
    assert all(f == 0.0 for f in second.outcome.connections_pruned.values())
    assert connected == {n: int((o == 0).sum()) for n, o in zip(net.spec.layer_names, owners)}


def test_connection_pruning_is_on_where_its_measure_needs_it_and_a_bound_needs_it_on():
    assert not PRESETS["default"].prune_connections
    assert all(c.prune_connections for c in PRESETS.values() if c.reuse_measure == "connections")
    with pytest.raises(ConfigError, match="connection pruning"):
        preset("default", reuse_max_drop=0.1)  # a bound for a step that does not run would be ignored silently
    assert preset("default", reuse_max_drop=0.1, prune_connections=True).reuse_max_drop == 0.1
    assert not preset("balanced", prune_connections=False).prune_connections  # the preset's own bound: no error


@pytest.mark.parametrize("schedule,rank", [(s, "layer") for s in sorted(SCHEDULES)] + [("iterative", "global")])
def test_min_units_is_a_floor_that_pruning_never_crosses(schedule, rank, tmp_path, data_dir):
    # max_drop 100: accuracy never stops pruning, so only the floor does.
    loose = dict(FAST, epochs=1, recovery_epochs=0.5, max_drop=100.0, finetune_epochs=0, schedule=schedule,
                 prune_rank=rank)
    kept = {}
    for floor in (0, 20, 1000):
        result = add_task(tmp_path / f"repo-{floor}", "a", "permuted-mnist:1", network=NETWORK,
                          config=preset("default", **loose, min_units=floor), limit=500, data_dir=str(data_dir))
        kept[floor] = result.outcome.units_kept
    assert all(k < 20 for k in kept[0].values()), kept  # without a floor, pruning goes below it
    assert set(kept[20].values()) == {20}, kept  # the floor, exactly: nothing else held pruning back
    assert set(kept[1000].values()) == {64}, kept  # a floor above the free units keeps them all
    with pytest.raises(ConfigError, match="min_units"):
        preset("default", min_units=-1)


@pytest.mark.parametrize("schedule,rank", [(s, "layer") for s in sorted(SCHEDULES)] + [("iterative", "global")])
def test_max_units_is_a_cap_that_cuts_past_the_max_drop_and_changes_nothing_where_it_does_not_bind(
        schedule, rank, tmp_path, data_dir):
    # max_drop 0: the bound alone keeps many units; a cap under that count cuts every layer to it exactly
    strict = dict(FAST, epochs=1, recovery_epochs=0.5, max_drop=0.0, finetune_epochs=1, schedule=schedule,
                  prune_rank=rank)
    runs = {}
    # a cap that cannot bind changes nothing, checked on one schedule (each add_task costs seconds)
    for cap in (0, 5, 64) if schedule == "iterative" and rank == "layer" else (0, 5):
        root = tmp_path / f"repo-{cap}"
        runs[cap] = (root, add_task(root, "a", "permuted-mnist:1", network=NETWORK,
                                    config=preset("default", **strict, max_units=cap), limit=500,
                                    data_dir=str(data_dir)).outcome)
    bound = runs[0][1].units_kept
    assert min(bound.values()) > 5, bound  # the premise: the bound alone keeps more than the cap
    assert runs[0][1].capped == {}
    assert runs[5][1].capped == bound  # what the bound alone kept, reported
    assert set(runs[5][1].units_kept.values()) == {5}
    assert runs[5][1].prune_steps == runs[0][1].prune_steps + 1  # the cut to the cap is one more step
    if 64 in runs:  # a cap above every layer's free units never binds: the same network, bit for bit
        assert runs[64][1].capped == {}
        a, b = ((r, r.read_manifest(1)) for r in (ModelRepository.open(runs[c][0]) for c in (0, 64)))
        a, b = a[0].load_weights(a[1]), b[0].load_weights(b[1])
        assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    with pytest.raises(ConfigError, match="max_units"):
        preset("default", max_units=-1)
    with pytest.raises(ConfigError, match="above max_units"):
        preset("default", min_units=30, max_units=20)
    assert preset("default", min_units=30, max_units=0).min_units == 30  # 0: no cap, any floor


def test_a_plan_spreads_the_free_units_evenly_and_refuses_a_task_it_has_no_share_for(tmp_path, data_dir):
    """plan_tasks N: each task keeps FREE // (N - tasks learned) units per layer, whatever max_drop allows, and the
    last one takes what is left; the version keeps the plan, so the tasks after the first follow it unasked, and
    the capacity report forecasts the rest of the plan. A task past the plan is refused before training, and
    nothing is published."""
    config = preset("default", **dict(FAST, epochs=1, recovery_epochs=0.5, finetune_epochs=1), plan_tasks=3)
    root = tmp_path / "repo"
    kept = []
    for name, source in (("a", "permuted-mnist:1"), ("b", "permuted-mnist:2"), ("c", "permuted-mnist:3")):
        # only the first task is given the plan; the others inherit it from the version they are added to
        result = add_task(root, name, source, network=NETWORK, config=config if name == "a" else
                          replace(config, plan_tasks=0), limit=500, data_dir=str(data_dir))
        kept.append(result.outcome.units_kept)
        assert result.manifest.plan_tasks == 3
        assert ModelRepository.open(root).read_manifest().tasks[-1].training["config"]["plan_tasks"] == 3
    assert [set(k.values()) for k in kept] == [{21}, {21}, {22}], kept  # 64 // 3, 43 // 2, then the 22 left
    repo = ModelRepository.open(root)
    assert [l.free for l in repo.read_manifest(3).layers] == [0, 0]
    after_one = capacity_report(repo.read_manifest(1))
    assert after_one.estimated_additional_tasks == 2.0
    assert "planned for 3 tasks" in after_one.estimate_basis and "the next layer1 21, layer2 21" in after_one.estimate_basis
    # the plan, not the trend, decides: planned for 10, the same version fits 9 more of 4 units (43 // 9) where
    # the trend of its one 21-unit task fits 2
    replanned = capacity_report(replace(repo.read_manifest(1), plan_tasks=10))
    assert replanned.estimated_additional_tasks == 9.0 and "the next layer1 4, layer2 4" in replanned.estimate_basis
    assert "would forecast 2" in replanned.estimate_basis
    assert capacity_report(repo.read_manifest(3)).estimated_additional_tasks == 0.0  # full: no plan share to offer
    net, owners = load_network(repo, repo.read_manifest(3))
    assert [[int((o == t).sum()) for t in range(3)] for o in owners] == [[21, 21, 22]] * 2

    # two tasks under a plan of 4; a third under a plan of 2 has no share left and is refused before its data is
    # even read (the data folder does not exist, so a later check would fail on the data instead)
    root = tmp_path / "repo2"
    for name, source in (("a", "permuted-mnist:1"), ("b", "permuted-mnist:2")):
        add_task(root, name, source, network=NETWORK, config=replace(config, plan_tasks=4), limit=500,
                 data_dir=str(data_dir))
    with pytest.raises(ConfigError, match="plan_tasks 2: the network holds 2 task"):
        add_task(root, "c", "permuted-mnist:3", config=replace(config, plan_tasks=2), limit=500,
                 data_dir=str(tmp_path / "no-data"))
    # the plan it inherits sets the units, so a floor or cap beside it is refused as early, saying how to end it
    with pytest.raises(ConfigError, match=r"planned for 4 tasks \(version 2\).*--plan-tasks 0 to end the plan"):
        add_task(root, "c", "permuted-mnist:3", config=replace(config, plan_tasks=0, max_units=5), limit=500,
                 data_dir=str(tmp_path / "no-data"))
    assert ModelRepository.open(root).latest() == 2  # nothing half-published
    # each layer gets its own share (a conv layer of 32 filters beside a dense layer of 64), one unit at least
    owners = [torch.tensor([FREE] * 30 + [0, 1]), torch.tensor([FREE] * 64)]
    assert planned_units(owners, 2, 6) == [7, 16] and planned_units(owners, 2, 0) is None
    assert planned_units([torch.tensor([FREE, 0, 1])], 2, 3) == [1] and planned_units(owners, 2, 100) == [1, 1]
    with pytest.raises(ConfigError, match="plan_tasks"):
        preset("default", plan_tasks=-1)
    with pytest.raises(ConfigError, match="cannot go with min_units or max_units"):
        preset("default", plan_tasks=3, max_units=10)


def test_zero_reuse_init_starts_a_task_beside_earlier_units_as_if_isolated_but_lets_it_learn_reuse(
        tmp_path, data_dir, monkeypatch):
    from benchmarks.tasks import load_task
    from trainer import clnp

    cfg = preset("default", **{**FAST, "epochs": 1}, finetune_epochs=1, reuse_init="zero")
    root = tmp_path / "repo"
    add_task(root, "a", "permuted-mnist:1", network=NETWORK, config=cfg, limit=500, data_dir=str(data_dir))
    repo = ModelRepository.open(root)
    net, owners = load_network(repo, repo.read_manifest(1))
    task = load_task("permuted-mnist:2", net.spec, str(data_dir), 500, 0, "cpu")
    index = net.add_head(task.num_classes, task.scale, task.shift, generator=torch.Generator().manual_seed(1))
    starts, cut = {}, clnp.cut_earlier_connections

    def record(n, o, t):  # what the task starts from: right after the cut, before any training step
        cut(n, o, t)
        starts["layer2"] = n.weights[1].detach()[o[1] == FREE][:, o[0] == 0].clone()
        starts["head"] = n.head_weights[t].detach()[:, o[-1] == 0].clone()
    monkeypatch.setattr(clnp, "cut_earlier_connections", record)
    clnp.learn_dense(net, owners, index, task, cfg)
    # the new units' and the head's connections from task a's units started at zero ...
    assert starts["layer2"].numel() > 0 and torch.count_nonzero(starts["layer2"]) == 0
    assert torch.count_nonzero(starts["head"]) == 0
    # ... and trained (not isolated: the task may learn to reuse them)
    trained = net.weights[1].detach()[owners[1] == FREE][:, owners[0] == 0]
    assert torch.count_nonzero(trained) > 0.9 * trained.numel()
    with pytest.raises(ConfigError, match="reuse_init"):
        preset("default", reuse_init="ones")


def test_global_rank_cuts_the_lowest_scores_of_all_layers_together_above_each_floor():
    keep = [torch.tensor([True, True, True, True, False]), torch.tensor([True, True, True, True])]
    scores = [torch.tensor([0.5, 0.1, 0.9, 0.2, 0.0], dtype=torch.float64),
              torch.tensor([0.05, 0.3, 0.15, 0.8], dtype=torch.float64)]
    # 8 candidates, half of them go: the four lowest of both layers (0.05, 0.1, 0.15, 0.2), not two per layer;
    # unit 4 of layer 1 (score 0.0) is not a candidate and stays as it was
    trial = _cut_global(keep, scores, 0.5, [1, 1])
    assert trial[0].tolist() == [True, False, True, False, False]
    assert trial[1].tolist() == [False, True, False, True]
    assert _cut(keep, scores, 0.5, [1, 1])[1].tolist() == [False, True, False, True]  # per layer: two each
    assert _cut(keep, scores, 0.5, [1, 1])[0].tolist() == [True, False, True, False, False]
    # a floor keeps units of its layer even where they score lowest; the cut takes the rest from the other layer
    floored = _cut_global(keep, scores, 0.5, [1, 3])
    assert floored[1].tolist() == [False, True, True, True]
    assert floored[0].tolist() == [False, False, True, False, False]
    assert sum(int(k.sum()) for k in floored) == 4
    assert keep[0].tolist() == [True, True, True, True, False]  # the input is left alone
    with pytest.raises(ConfigError, match="prune_rank"):
        preset("default", prune_rank="everywhere")
    with pytest.raises(ConfigError, match="iterative"):  # a setting the schedule would ignore is refused
        preset("default", prune_rank="global", schedule="one-shot")


def test_fine_tuning_that_loses_is_discarded_and_recorded(tmp_path, data_dir, monkeypatch):
    """A fine-tuned network under the pruned one is thrown away: the pruned network is published exactly as it was
    before fine-tuning, and the outcome and the manifest say what fine-tuning reached."""
    import trainer.clnp as clnp

    before_fine_tuning = {}

    def ruinous_fine_tuning(tr, visible, plan, x, y, **kwargs):
        before_fine_tuning.update({k: v.clone() for k, v in tr.net.state_tensors().items()})
        with torch.no_grad():  # every logit the same: chance accuracy, far under the pruned network
            tr.net.head_weights[tr.task].zero_()
            tr.net.head_biases[tr.task].zero_()
        return []

    monkeypatch.setattr(clnp, "train_compact", ruinous_fine_tuning)
    root = tmp_path / "repo"
    result = add_task(root, "a", "permuted-mnist:3", network=NETWORK, config=preset("default", **FAST), limit=1000,
                      data_dir=str(data_dir))
    outcome = result.outcome
    assert before_fine_tuning, "fine-tuning never ran"
    assert outcome.finetune_discarded is not None and outcome.finetune_discarded < outcome.validation_accuracy
    assert outcome.phase_validation["fine-tune"] == outcome.phase_validation["prune"]

    repo = ModelRepository.open(root)
    manifest = repo.read_manifest(1)
    net, _ = load_network(repo, manifest)
    published = net.state_tensors()
    for name in ("heads.0.weight", "heads.0.bias", "layers.0.weight", "layers.1.weight"):
        assert torch.equal(published[name], before_fine_tuning[name]), name
    stats = manifest.tasks[0].training
    assert stats["finetune_discarded_validation_accuracy"] == pytest.approx(outcome.finetune_discarded, abs=1e-4)


@pytest.mark.parametrize("keep", ["bound", "better"])
def test_fine_tuning_under_the_pruned_network_but_within_the_bound(tmp_path, data_dir, monkeypatch, keep):
    """finetune_keep="bound" (the default) keeps a fine-tuned network that ends under the pruned one on validation
    but within max_drop of the dense one; "better" (the earlier rule, kept by the older presets) discards it."""
    import trainer.clnp as clnp

    seen = {}
    real_accuracy = clnp.accuracy

    def marking_fine_tuning(tr, visible, plan, x, y, **kwargs):
        seen["before"] = tr.net.head_biases[tr.task].detach().clone()
        with torch.no_grad():  # the same shift on every class: no answer changes, but the weights do
            tr.net.head_biases[tr.task].add_(0.125)
        seen["marked"] = tr.net.head_biases[tr.task].detach().clone()
        return []

    def accuracy(net, x, y, task, masks):
        acc = real_accuracy(net, x, y, task, masks)
        if "marked" in seen and "tuned" not in seen:  # the first evaluation after fine-tuning: report it a bit lower
            seen["pruned"] = acc
            seen["tuned"] = acc - 0.01
            return seen["tuned"]
        return acc

    monkeypatch.setattr(clnp, "train_compact", marking_fine_tuning)
    monkeypatch.setattr(clnp, "accuracy", accuracy)
    config = preset("default", **FAST, finetune_keep=keep)
    result = add_task(tmp_path / "repo", "a", "permuted-mnist:3", network=NETWORK, config=config, limit=1000,
                      data_dir=str(data_dir))
    outcome = result.outcome
    assert "tuned" in seen, "fine-tuning never ran"
    # the event under test: under the pruned network, within the bound
    assert outcome.dense_validation_accuracy - config.max_drop <= seen["tuned"] < seen["pruned"]
    repo = ModelRepository.open(tmp_path / "repo")
    net, _ = load_network(repo, repo.read_manifest(1))
    published_bias = net.state_tensors()["heads.0.bias"]
    if keep == "bound":
        assert outcome.finetune_discarded is None
        assert torch.equal(published_bias, seen["marked"])
        assert outcome.phase_validation["fine-tune"] == seen["tuned"]
    else:
        assert outcome.finetune_discarded == seen["tuned"]
        assert torch.equal(published_bias, seen["before"])
        assert outcome.phase_validation["fine-tune"] == outcome.phase_validation["prune"]


def test_weight_average_ends_on_the_moving_average_and_leaves_held_entries_bit_identical(monkeypatch):
    """run_epochs with `average` ends on the exponential moving average of every step's weights (computed here
    by hand from the same steps), and an entry whose gradient mask is zero comes out bit-identical."""
    spec = parse_network_spec("mlp:20-12-10")
    x, y = torch.rand(96, 20, generator=torch.Generator().manual_seed(0)) * 255, torch.arange(96) % 3
    steps: list[list[torch.Tensor]] = []  # the moving parameters after every optimizer step

    def trained(average: float):
        torch.manual_seed(1)
        net = MaskedNetwork(spec)
        net.add_head(3, torch.ones(20) / 255, torch.zeros(20))
        owners = [torch.tensor([0] * 4 + [FREE] * 8), torch.tensor([0] * 3 + [FREE] * 7)]
        tr = TaskTrainer(net, owners, 0, seed=3, batch_size=32)
        params, grad_masks = tr.free_unit_parameters()
        start = [p.detach().clone() for p in params]
        steps.clear()
        tr.run_epochs(x, y, EpochPlan(3, 0.01, dropout=0.1, average=average), params, grad_masks,
                      [torch.ones(12), torch.ones(10)])
        return params, grad_masks, start, [list(s) for s in steps]

    adam_step = torch.optim.Adam.step

    def recording_step(opt, *args, **kwargs):
        out = adam_step(opt, *args, **kwargs)
        steps.append([p.detach().clone() for group in opt.param_groups for p in group["params"]])
        return out

    monkeypatch.setattr(torch.optim.Adam, "step", recording_step)
    params, grad_masks, start, history = trained(0.9)
    assert len(history) == 9  # 3 epochs of 3 batches
    expected = [s.clone() for s in start]
    for weights in history:
        for e, w in zip(expected, weights):
            e.mul_(0.9).add_(w, alpha=0.1)
    for p, m, e, last, s in zip(params, grad_masks, expected, history[-1], start):
        moving = torch.ones_like(p, dtype=torch.bool) if m is None else m != 0
        torch.testing.assert_close(p.detach()[moving], e[moving], rtol=1e-5, atol=1e-6)
        assert not torch.equal(p.detach()[moving], last[moving])  # not simply the last step's weights
        assert torch.equal(p.detach()[~moving], s[~moving])  # task 0's rows did not move at all
    plain, _, _, plain_history = trained(0.0)
    assert all(torch.equal(a.detach(), b) for a, b in zip(plain, plain_history[-1]))  # off: the last step's weights
    with pytest.raises(ConfigError, match="finetune_average"):
        preset("default", finetune_average=1.0)


def test_finetune_keep_is_checked_and_the_older_presets_keep_the_older_rule():
    with pytest.raises(ConfigError, match="finetune_keep"):
        preset("default", finetune_keep="sometimes")
    assert preset("default").finetune_keep == "bound"
    assert {preset(n).finetune_keep for n in ("balanced", "fast", "reference")} == {"better"}


def test_full_teacher_is_trained_on_the_task_alone_and_teaches_recovery_and_fine_tuning(tmp_path, data_dir, monkeypatch):
    """teacher="full": a separate network of the same shape, every unit trained on the task, supplies the logits that
    recovery and fine-tuning distil from. The shared network's dense phase is untouched by it (bit-identical to the
    dense teacher's run) unless distill_dense asks the dense phase to distil from it too."""
    import trainer.clnp as clnp
    from benchmarks.tasks import load_task

    real_teacher, real_compact = clnp.full_teacher, clnp.train_compact

    def learn(config):
        made, used, dense_phase = {}, [], {}

        def full_teacher(net, task, data, config, show_progress):
            before = {k: v.clone() for k, v in net.state_tensors().items()}
            made["logits"], made["accuracy"] = real_teacher(net, task, data, config, show_progress)
            made["wrote_nothing"] = all(torch.equal(before[k], v) for k, v in net.state_tensors().items())
            return made["logits"], made["accuracy"]

        def compact(*args, teacher=None, **kwargs):
            used.append(teacher)
            return real_compact(*args, teacher=teacher, **kwargs)

        def on_phase(name, network, masks):
            if name == "train":
                dense_phase.update({k: v.clone() for k, v in net.state_tensors().items()})

        monkeypatch.setattr(clnp, "full_teacher", full_teacher)
        monkeypatch.setattr(clnp, "train_compact", compact)
        torch.manual_seed(0)
        net = MaskedNetwork(parse_network_spec(NETWORK))
        task = load_task("permuted-mnist:3", net.spec, str(data_dir), 1000, 0, "cpu")
        net.add_head(task.num_classes, task.scale, task.shift, generator=torch.Generator().manual_seed(1))
        _, outcome = clnp.learn_task(net, new_owners(net), 0, task, config, on_phase=on_phase)
        return net, task, outcome, made, used, dense_phase

    _, _, plain, _, _, plain_dense = learn(preset("default", **FAST))
    net, task, outcome, made, used, dense_phase = learn(preset("default", **FAST, teacher="full"))
    assert used and all(t is made["logits"] for t in used)  # every recovery and the fine-tuning distil from it
    assert made["logits"].shape == (len(task.x_train), task.num_classes)
    assert outcome.teacher_validation == made["accuracy"] and "teacher" in outcome.phase_seconds
    assert made["wrote_nothing"]  # training the teacher wrote nothing into the shared network
    # the dense phase is the dense teacher's, bit for bit: the full teacher neither feeds it nor moves its seeds
    assert all(torch.equal(plain_dense[k], v) for k, v in dense_phase.items())
    assert outcome.dense_validation_accuracy == plain.dense_validation_accuracy
    # and the teacher is not the shared network's own dense network
    dense_net = MaskedNetwork.from_state(net.spec, dense_phase, 1)
    every = [torch.ones(layer.units) for layer in net.spec.layers]
    with torch.no_grad():
        dense_logits = dense_net(task.x_train, 0, every)
    assert not torch.allclose(dense_logits, made["logits"], atol=1e-3)

    # distill_dense: the dense phase learns from the teacher as well, so it ends elsewhere, nearer the teacher
    _, _, distilled, made, _, distilled_dense = learn(preset("default", **FAST, teacher="full", distill_dense=True))
    assert not all(torch.equal(distilled_dense[k], v) for k, v in dense_phase.items())
    with torch.no_grad():
        distilled_logits = MaskedNetwork.from_state(net.spec, distilled_dense, 1)(task.x_train, 0, every)

    def kl_to_teacher(logits):
        return torch.nn.functional.kl_div(logits.log_softmax(1), made["logits"].log_softmax(1), log_target=True,
                                          reduction="batchmean")
    assert kl_to_teacher(distilled_logits) < kl_to_teacher(dense_logits)
    with pytest.raises(ConfigError, match="distill"):
        preset("default", teacher="full", distill=0.0)
    with pytest.raises(ConfigError, match="teacher 'full'"):
        preset("default", distill_dense=True)


def test_learn_task_steps_as_public_pieces_match_it_bit_for_bit_and_prune_again_from_a_restored_dense_net(data_dir):
    """learn_dense then prune_and_finetune (what the pruning and fine-tuning probes call) is learn_task's steps 1-4:
    the same network and owners bit for bit. Pruning again from the restored dense network and generator state, as
    a probe does for each variant, gives the same result again: the probes measure the method itself."""
    import copy

    from benchmarks.tasks import load_task
    from trainer.clnp import learn_dense, learn_task, prune_and_finetune
    from trainer.pruning import restore

    spec = parse_network_spec(NETWORK)
    config = preset("default", **{**FAST, "finetune_epochs": 3})
    task = load_task("permuted-mnist:2", spec, str(data_dir), 1000, 0, "cpu")

    def fresh():
        torch.manual_seed(0)
        net = MaskedNetwork(spec)
        net.add_head(task.num_classes, task.scale, task.shift, generator=torch.Generator().manual_seed(1))
        return net, new_owners(net)

    net_a, owners_a = fresh()
    owners_a, outcome = learn_task(net_a, owners_a, 0, task, config)

    net_b, owners_b = fresh()
    dense = learn_dense(net_b, owners_b, 0, task, config)
    assert all(torch.equal(o, p) for o, p in zip(dense.owners, owners_b))  # the caller's owners are not changed
    base, generator = copy.deepcopy(net_b.state_tensors()), dense.trainer.generator.get_state()
    results = []
    for _ in range(2):
        restore(net_b, base)
        dense.trainer.generator.set_state(generator)
        pruned = prune_and_finetune(net_b, dense, task, config)
        results.append(({k: v.clone() for k, v in net_b.state_tensors().items()}, pruned))
    for state, pruned in results:
        assert all(torch.equal(o, p) for o, p in zip(owners_a, pruned.owners))
        assert 0 < int((pruned.owners[0] == 0).sum()) < spec.layers[0].units  # it pruned, and kept something
        assert pruned.validation == outcome.validation_accuracy
        assert pruned.prune_steps == outcome.prune_steps and pruned.units_pruned == outcome.units_pruned
        assert dense.validation == outcome.dense_validation_accuracy
        reference = net_a.state_tensors()
        assert state.keys() == reference.keys()
        assert all(torch.equal(state[k], reference[k]) for k in reference), "steps 1-4 differ from learn_task's"
    assert all(torch.equal(o, p) for o, p in zip(dense.owners, owners_b))  # pruning left the dense record alone
