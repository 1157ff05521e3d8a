"""Data-parallel training of one task over several processes (torchrun, PyTorchJob).

`clnp-train add-task` runs unchanged under `torchrun --nproc-per-node N`: torchrun sets RANK, WORLD_SIZE,
MASTER_ADDR and MASTER_PORT, and `init_from_environment` joins the process group (gloo on CPU, nccl on CUDA).
Then:
- every rank reads the same manifest and derives the same masks and the same initial weights (the seeded generator
  is shared; DistributedDataParallel also broadcasts rank 0's parameters when it wraps them);
- each step's batch is sharded with `DistributedSampler` (the global batch stays `batch_size`), the forward pass
  runs through DistributedDataParallel, whose all-reduce averages the gradients during backward, and the gradient
  masks are applied after it, before the optimizer step;
- only the parameters the step trains are registered with DistributedDataParallel, never earlier tasks' heads;
- pruning decisions, validation and Taylor scores use the full (unsharded) data on identical weights, so every rank
  takes the same ones; dropout draws from a per-rank generator;
- only rank 0 exports, checks and publishes; the others wait for its outcome.

DistributedDataParallel runs on a process group of its own (`_gradient_group`). DDP keeps references to the group it
is given after the wrapper itself is gone (torch 2.13), so `destroy_process_group` would not free that group, and its
gloo worker threads would outlive `shutdown`. When the group is the default one, the worker thread may then release the
last handle of the final broadcast (tensors with Python references) while the interpreter is finalizing, and the
process aborts ("terminate called without an active exception") after a successful run. With DDP on its own group,
the default group is really destroyed, its workers joined, before the interpreter exits.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn as nn


@dataclass(frozen=True)
class World:
    rank: int
    size: int
    backend: str

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def world() -> World | None:
    """The process group this process is in, when there is one with more than one process."""
    if not dist.is_available() or not dist.is_initialized() or dist.get_world_size() < 2:
        return None
    return World(dist.get_rank(), dist.get_world_size(), dist.get_backend())


_gradient_group = None  # the process group DistributedDataParallel all-reduces over (see the module's docstring)


def init_from_environment(device: str = "cpu") -> World | None:
    """Join the process group torchrun describes in the environment (WORLD_SIZE > 1); None when run alone."""
    if int(os.environ.get("WORLD_SIZE", "1")) < 2:
        return None
    if not dist.is_initialized():
        backend = "nccl" if device == "cuda" else "gloo"
        if device == "cuda":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend=backend)
    global _gradient_group
    if _gradient_group is None and dist.get_world_size() > 1:
        _gradient_group = dist.new_group(backend=dist.get_backend())  # collective: every rank, same order
    return world()


def shutdown() -> None:
    global _gradient_group
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()  # every group; the default one is freed and its worker threads joined here
    _gradient_group = None


class _Step(nn.Module):
    """What DistributedDataParallel wraps: exactly the parameters one training run moves, and the forward pass
    that uses them. The network itself is held outside the module so nothing else is registered."""

    def __init__(self, forward, params: list[torch.Tensor]):
        super().__init__()
        self.trained = nn.ParameterList(params)  # the same Parameter objects, not copies
        self._forward = forward

    def forward(self, *args):
        return self._forward(*args)


def data_parallel(forward, params: list[torch.Tensor]):
    """`forward` wrapped in DistributedDataParallel over `params` (the caller's tensors, updated in place)."""
    from torch.nn.parallel import DistributedDataParallel

    # _Step registers parameters only, no buffers: nothing to sync per forward pass (and nothing at init either).
    group = _gradient_group if _gradient_group is not None else dist.group.WORLD
    return DistributedDataParallel(_Step(forward, params), process_group=group, forward_sync_buffers=False)


def shard_order(n: int, w: World, seed: int, epoch: int) -> torch.Tensor:
    """This rank's sample indices for one epoch (DistributedSampler: shuffled by `seed` and `epoch`, equal shards)."""
    from torch.utils.data import DistributedSampler

    sampler = DistributedSampler(range(n), num_replicas=w.size, rank=w.rank, shuffle=True, seed=seed)
    sampler.set_epoch(epoch)
    return torch.tensor(list(iter(sampler)), dtype=torch.long)


def main_rank_outcome(outcome: object | None) -> object:
    """Rank 0 passes what happened (e.g. the published version or an error message); every rank gets it back."""
    box = [outcome]
    dist.broadcast_object_list(box, src=0)
    return box[0]
