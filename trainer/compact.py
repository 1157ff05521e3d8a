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
