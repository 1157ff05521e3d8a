"""A benchmark task as tensors: one data source loaded, fitted to the network, with its preprocessing."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from trainer.data import load_source
from trainer.network import NetworkSpec
from trainer.pipeline import fit_to_network


@dataclass
class Task:
    source: str
    num_classes: int
    scale: torch.Tensor  # preprocessing, shaped like the network input
    shift: torch.Tensor
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_val: torch.Tensor
    y_val: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor

    def split(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        return (self.x_test, self.y_test) if name == "test" else (self.x_val, self.y_val)


def load_task(source: str, spec: NetworkSpec, data_dir: str | None, limit: int | None, seed: int,
              device: str) -> Task:
    d = load_source(source, data_dir=data_dir, limit=limit, seed=seed)
    shape = d.feature_shape

    def lab(y):
        return torch.from_numpy(y.astype(np.int64)).to(device)

    return Task(
        source=d.source,
        num_classes=d.num_classes,
        scale=torch.from_numpy(np.broadcast_to(d.preprocessing.scale, shape).astype(np.float32).copy()),
        shift=torch.from_numpy(np.broadcast_to(d.preprocessing.shift, shape).astype(np.float32).copy()),
        x_train=fit_to_network(d.x_train, spec, source).to(device), y_train=lab(d.y_train),
        x_val=fit_to_network(d.x_val, spec, source).to(device), y_val=lab(d.y_val),
        x_test=fit_to_network(d.x_test, spec, source).to(device), y_test=lab(d.y_test),
    )
