"""Train a task on only the units it sees: copy them into a small network, train that, copy back.

Once pruning has begun, a task sees its earlier tasks' units and its own remaining ones, often a fraction of
the layer; the masked full network would still pay for every unit in every matrix product. Retraining and
fine-tuning therefore run on a compact copy (rows and columns of the visible units only), and only the
copied entries are written back. Entries that were frozen in the copy are written back with the values they
were copied from, so earlier tasks stay bit-identical. torch's pruning utilities only mask; they do not
shrink a layer, so this is written here.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from serving.contract import FREE
from trainer.network import LayerSpec, MaskedNetwork, NetworkSpec


@dataclass
class CompactTask:
    """Task `task`'s visible units of `net` as a one-task network (its task index is 0)."""

    net: MaskedNetwork
    owners: list[torch.Tensor]  # per compact layer: FREE, 0 (the task's own units) or 1 (an earlier task's)
    index: list[torch.Tensor]  # per layer: the full network's unit index of each compact unit


def _in_view(w: torch.Tensor, in_units: int) -> torch.Tensor:
    return w.reshape(w.shape[0], in_units, -1)  # (out, in_units, k)


@torch.no_grad()
def compact_task(net: MaskedNetwork, owners: list[torch.Tensor], task: int, visible: list[torch.Tensor]) -> CompactTask:
    """Copy the visible units (bool per unit and layer) of task `task` into a small network."""
    index = [torch.nonzero(v.cpu()).flatten() for v in visible]
    spec = NetworkSpec(net.spec.family, net.spec.input_shape,
                       tuple(LayerSpec(l.kind, len(ix)) for l, ix in zip(net.spec.layers, index)))
    small = MaskedNetwork(spec)
    device = net.weights[0].device
    small.to(device)
    full_units = [l.units for l in net.spec.layers]
    for i, ix in enumerate(index):
        w = net.weights[i][ix.to(device)]
        if i > 0:
            w = _in_view(w, full_units[i - 1])[:, index[i - 1].to(device)]
        small.weights[i].copy_(w.reshape(small.weights[i].shape))
        small.biases[i].copy_(net.biases[i][ix.to(device)])
    hw = _in_view(net.head_weights[task], full_units[-1])[:, index[-1].to(device)]
    small.add_head(hw.shape[0], net.pre_scales[task].cpu(), net.pre_shifts[task].cpu())
    small.to_device(device)
    small.head_weights[0].copy_(hw.reshape(small.head_weights[0].shape))
    small.head_biases[0].copy_(net.head_biases[task])
    small_owners = []
    for o, ix in zip(owners, index):
        so = o[ix.to(o.device)].clone()
        mine, earlier = so == task, (so != FREE) & (so != task)
        so[mine], so[earlier] = 0, 1
        small_owners.append(so)
    return CompactTask(small, small_owners, index)


@torch.no_grad()
def write_back(ct: CompactTask, net: MaskedNetwork, task: int) -> None:
    """Copy the compact network's entries back to where they came from in `net`."""
    device = net.weights[0].device
    full_units = [l.units for l in net.spec.layers]
    for i, ix in enumerate(ct.index):
        rows = ix.to(device)
        w = net.weights[i]
        small_w = ct.net.weights[i]
        if i == 0:
            w[rows] = small_w
        else:
            cols = ct.index[i - 1].to(device)
            view = _in_view(w, full_units[i - 1])  # a view: writes land in w
            view[rows.reshape(-1, 1), cols.reshape(1, -1)] = _in_view(small_w, len(cols))
        net.biases[i][rows] = ct.net.biases[i]
    cols = ct.index[-1].to(device)
    view = _in_view(net.head_weights[task], full_units[-1])
    view[:, cols] = _in_view(ct.net.head_weights[0], len(cols))
    net.head_biases[task].copy_(ct.net.head_biases[0])


@torch.no_grad()
def widen(net: MaskedNetwork, owners: list[torch.Tensor], extra: list[int]) -> tuple[MaskedNetwork, list[torch.Tensor]]:
    """`net` with `extra[i]` FREE units appended to hidden layer i, for training only (CLNPConfig.candidate_pool).

    Every existing entry is copied where it was; the new units' connections in and out (heads included) are zero,
    so each task's function is what it was in `net`. Returns the wide network (on `net`'s device) and the owners
    to match (the new units FREE)."""
    device = net.weights[0].device
    units = [l.units for l in net.spec.layers]
    wide_units = [u + e for u, e in zip(units, extra)]
    spec = NetworkSpec(net.spec.family, net.spec.input_shape,
                       tuple(LayerSpec(l.kind, u) for l, u in zip(net.spec.layers, wide_units)))
    shapes = MaskedNetwork(spec)  # only for the wide shapes; every tensor below is written in full
    tensors = {k: v.detach().cpu() for k, v in net.state_tensors().items()}
    for i in range(len(units)):
        w = torch.zeros(shapes.weights[i].shape)
        if i == 0:
            w[: units[0]] = tensors["layers.0.weight"]
        else:
            _in_view(w, wide_units[i - 1])[: units[i], : units[i - 1]] = _in_view(tensors[f"layers.{i}.weight"],
                                                                                  units[i - 1])
        b = torch.zeros(wide_units[i])
        b[: units[i]] = tensors[f"layers.{i}.bias"]
        tensors[f"layers.{i}.weight"], tensors[f"layers.{i}.bias"] = w, b
    for t in range(net.num_tasks):
        hw = tensors[f"heads.{t}.weight"]
        wide_hw = torch.zeros(hw.shape[0], shapes.feature_dim)
        _in_view(wide_hw, wide_units[-1])[:, : units[-1]] = _in_view(hw, units[-1])
        tensors[f"heads.{t}.weight"] = wide_hw
    wide = MaskedNetwork.from_state(spec, tensors, net.num_tasks).to_device(device)
    wide_owners = [torch.cat([o, torch.full((e,), FREE, dtype=o.dtype, device=o.device)]) for o, e in zip(owners, extra)]
    return wide, wide_owners


@torch.no_grad()
def move_into(wide: MaskedNetwork, wide_owners: list[torch.Tensor], net: MaskedNetwork, owners: list[torch.Tensor],
              task: int) -> list[torch.Tensor]:
    """Write task `task`, learned in `widen(net, owners, ...)`'s network, into `net`; returns `net`'s owners with it.

    The task's units within `net`'s width stay where they are; those beyond it take FREE units of `net` that the
    task did not keep (in index order), with their connections permuted to match. Only rows of units FREE in
    `owners` and the task's head are written, so earlier tasks' units and heads stay bit-identical. Raises
    RuntimeError when the task kept more units in a layer than `net` has FREE (a caller's bug)."""
    device = net.weights[0].device
    units = [l.units for l in net.spec.layers]
    wide_units = [l.units for l in wide.spec.layers]
    sources, new_owners = [], []
    for i, (wo, o) in enumerate(zip(wide_owners, owners)):
        wo, o = wo.to(device), o.to(device)
        kept = wo == task
        outside = kept[units[i]:].nonzero().flatten() + units[i]
        open_slots = ((o == FREE) & ~kept[: units[i]]).nonzero().flatten()
        if len(outside) > len(open_slots):
            raise RuntimeError(f"layer {i}: task {task} kept {int(kept.sum())} units, but the network has only "
                               f"{int((o == FREE).sum())} FREE")
        slots = open_slots[: len(outside)]
        source = torch.arange(units[i], device=device)
        source[slots] = outside
        sources.append(source)
        mine = o.clone()
        mine[kept[: units[i]]] = task
        mine[slots] = task
        new_owners.append(mine)
    for i in range(len(units)):
        rows = (owners[i].to(device) == FREE).nonzero().flatten()
        w = wide.weights[i][sources[i][rows]]
        if i > 0:
            w = _in_view(w, wide_units[i - 1])[:, sources[i - 1]]
        net.weights[i][rows] = w.reshape(len(rows), *net.weights[i].shape[1:])
        net.biases[i][rows] = wide.biases[i][sources[i][rows]]
    hw = _in_view(wide.head_weights[task], wide_units[-1])[:, sources[-1]]
    net.head_weights[task].copy_(hw.reshape(net.head_weights[task].shape))
    net.head_biases[task].copy_(wide.head_biases[task])
    return new_owners
