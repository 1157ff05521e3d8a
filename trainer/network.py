"""The shared network: hidden layers whose units (neurons or conv filters) are owned by tasks, one head per task.

Masks are data, not graph mutation: `forward` takes the per-layer masks as an argument and changes
no state. A unit's mask value multiplies its activation after the ReLU (before pooling for conv).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


class NetworkSpecError(ValueError):
    """A network spec string that cannot be parsed; the message shows the allowed forms."""


SPEC_HELP = (
    "network spec forms: 'mlp:IN-H1-H2...' (e.g. mlp:784-2000-2000) or "
    "'cnn:CxHxW-cN...-dN...' (e.g. cnn:1x28x28-c32-c64-d256: 3x3 conv layers with N filters, "
    "each followed by 2x2 max pooling, then dense layers with N neurons)"
)


@dataclass(frozen=True)
class LayerSpec:
    kind: str  # "conv" (units are 3x3 filters, then 2x2 max pool) or "dense" (units are neurons)
    units: int  # filters or neurons


@dataclass(frozen=True)
class NetworkSpec:
    family: str  # "mlp" or "cnn"
    input_shape: tuple[int, ...]  # per-sample raw input: (D,) for mlp, (C, H, W) for cnn
    layers: tuple[LayerSpec, ...]  # hidden layers in order

    def __str__(self) -> str:
        if self.family == "mlp":
            return "mlp:" + "-".join(str(d) for d in (self.input_shape[0], *(l.units for l in self.layers)))
        parts = ["x".join(str(d) for d in self.input_shape)]
        parts += [("c" if l.kind == "conv" else "d") + str(l.units) for l in self.layers]
        return "cnn:" + "-".join(parts)

    @property
    def layer_names(self) -> tuple[str, ...]:
        return tuple(f"layer{i + 1}" for i in range(len(self.layers)))


def parse_network_spec(text: str) -> NetworkSpec:
    """Parse 'mlp:784-256-256' or 'cnn:1x28x28-c16-c32-d128'; raises NetworkSpecError."""
    text = text.strip()
    family, _, body = text.partition(":")
    parts = body.split("-") if body else []
    try:
        if family == "mlp":
            dims = [int(p) for p in parts]
            if len(dims) < 2 or min(dims) < 1:
                raise ValueError
            return NetworkSpec("mlp", (dims[0],), tuple(LayerSpec("dense", d) for d in dims[1:]))
        if family == "cnn":
            shape = tuple(int(d) for d in parts[0].split("x"))
            if len(shape) != 3 or min(shape) < 1 or len(parts) < 2:
                raise ValueError
            layers, seen_dense = [], False
            h, w = shape[1], shape[2]
            for p in parts[1:]:
                m = re.fullmatch(r"([cd])(\d+)", p)
                if not m or int(m.group(2)) < 1:
                    raise ValueError
                kind = "conv" if m.group(1) == "c" else "dense"
                if kind == "conv" and seen_dense:
                    raise NetworkSpecError(f"invalid network spec {text!r}: conv layers must come before dense layers")
                if kind == "conv":
                    h, w = h // 2, w // 2
                    if h < 1 or w < 1:
                        raise NetworkSpecError(f"invalid network spec {text!r}: too many conv layers for input {shape}")
                seen_dense |= kind == "dense"
                layers.append(LayerSpec(kind, int(m.group(2))))
            return NetworkSpec("cnn", shape, tuple(layers))
    except NetworkSpecError:
        raise
    except ValueError:
        pass
    raise NetworkSpecError(f"invalid network spec {text!r}; {SPEC_HELP}")


class MaskedNetwork(nn.Module):
    """Shared hidden layers plus one linear head per task.

    Parameters: `weights[i]`, `biases[i]` per hidden layer; `head_weights[t]`, `head_biases[t]` per task.
    Buffers: `pre_scale[t]`, `pre_shift[t]`: the task's fixed preprocessing, applied to raw input.
    """

    def __init__(self, spec: NetworkSpec):
        super().__init__()
        self.spec = spec
        self.weights = nn.ParameterList()
        self.biases = nn.ParameterList()
        self.head_weights = nn.ParameterList()
        self.head_biases = nn.ParameterList()
        self.pre_scales: list[torch.Tensor] = []  # per task, shape == input_shape
        self.pre_shifts: list[torch.Tensor] = []
        in_ch, in_dim, spatial = spec.input_shape[0], math.prod(spec.input_shape), None
        if spec.family == "cnn":
            spatial = (spec.input_shape[1], spec.input_shape[2])
        for layer in spec.layers:
            if layer.kind == "conv":
                w = torch.empty(layer.units, in_ch, 3, 3)
                in_ch = layer.units
                spatial = (spatial[0] // 2, spatial[1] // 2)
                in_dim = in_ch * spatial[0] * spatial[1]
            else:
                w = torch.empty(layer.units, in_dim)
                in_dim = layer.units
            self.weights.append(nn.Parameter(w))
            self.biases.append(nn.Parameter(torch.empty(layer.units)))
        self.feature_dim = in_dim  # width the heads read
        for i in range(len(spec.layers)):
            self.reinit_units(i, torch.ones(spec.layers[i].units, dtype=torch.bool))

    # ---- structure ----------------------------------------------------------------------------

    @property
    def num_tasks(self) -> int:
        return len(self.head_weights)

    def fan_in(self, i: int) -> int:
        w = self.weights[i]
        return math.prod(w.shape[1:])

    @torch.no_grad()
    def reinit_units(self, i: int, units: torch.Tensor, generator: torch.Generator | None = None) -> None:
        """Re-draw the incoming weights and bias of the selected units of layer i (PyTorch's default init)."""
        bound = 1.0 / math.sqrt(self.fan_in(i))
        w, b = self.weights[i], self.biases[i]
        fresh_w = torch.empty(w.shape).uniform_(-bound, bound, generator=generator).to(w.device)
        fresh_b = torch.empty(b.shape).uniform_(-bound, bound, generator=generator).to(b.device)
        units = units.to(w.device)
        w[units] = fresh_w[units]
        b[units] = fresh_b[units]

    @torch.no_grad()
    def add_head(self, num_classes: int, scale: torch.Tensor, shift: torch.Tensor,
                 generator: torch.Generator | None = None) -> int:
        """Append a task head and its preprocessing; returns the new task index."""
        bound = 1.0 / math.sqrt(self.feature_dim)
        self.head_weights.append(nn.Parameter(torch.empty(num_classes, self.feature_dim).uniform_(-bound, bound, generator=generator)))
        self.head_biases.append(nn.Parameter(torch.empty(num_classes).uniform_(-bound, bound, generator=generator)))
        self.pre_scales.append(scale.reshape(self.spec.input_shape).float().clone())
        self.pre_shifts.append(shift.reshape(self.spec.input_shape).float().clone())
        return self.num_tasks - 1

    def to_device(self, device: str | torch.device) -> "MaskedNetwork":
        """Move parameters and the per-task preprocessing to `device`; returns self."""
        self.to(device)
        self.pre_scales = [s.to(device) for s in self.pre_scales]
        self.pre_shifts = [s.to(device) for s in self.pre_shifts]
        return self

    # ---- computation --------------------------------------------------------------------------

    def hidden(self, x: torch.Tensor, masks: list[torch.Tensor]) -> list[torch.Tensor]:
        """Activations of every hidden layer after masking (before pooling for conv).

        x: preprocessed input (B, *input_shape). masks[i]: (units_i,) for one task, or (B, units_i) per row.
        Returns a list of (B, units) or (B, C, H, W) tensors.
        """
        acts = []
        h = x
        for i, layer in enumerate(self.spec.layers):
            m = masks[i]
            if layer.kind == "conv":
                h = F.conv2d(h, self.weights[i], self.biases[i], padding=1)  # (B, C, H, W)
                m = m.reshape(*m.shape, 1, 1)  # (C,1,1) or (B,C,1,1)
                a = torch.relu(h) * m
                acts.append(a)
                h = F.max_pool2d(a, 2)  # (B, C, H/2, W/2)
            else:
                h = h.flatten(1)  # (B, in)
                a = torch.relu(h @ self.weights[i].T + self.biases[i]) * m  # (B, units)
                acts.append(a)
                h = a
        return acts

    def features(self, acts: list[torch.Tensor]) -> torch.Tensor:
        """What the heads read: the last hidden layer, pooled and flattened if it is a conv layer."""
        last = acts[-1]
        if last.dim() == 4:
            last = F.max_pool2d(last, 2)
        return last.flatten(1)  # (B, feature_dim)

    def preprocess(self, x: torch.Tensor, task: int) -> torch.Tensor:
        return x.reshape(x.shape[0], *self.spec.input_shape) * self.pre_scales[task] + self.pre_shifts[task]

    def forward(self, x: torch.Tensor, task: int, masks: list[torch.Tensor]) -> torch.Tensor:
        """Logits of one task for raw input x (B, *input_shape) through the given masks: (B, classes)."""
        acts = self.hidden(self.preprocess(x, task), masks)
        return self.features(acts) @ self.head_weights[task].T + self.head_biases[task]

    # ---- state --------------------------------------------------------------------------------

    def state_tensors(self) -> dict[str, torch.Tensor]:
        """Every tensor that defines the network, by a stable name (for safetensors)."""
        out = {}
        for i in range(len(self.weights)):
            out[f"layers.{i}.weight"] = self.weights[i].detach()
            out[f"layers.{i}.bias"] = self.biases[i].detach()
        for t in range(self.num_tasks):
            out[f"heads.{t}.weight"] = self.head_weights[t].detach()
            out[f"heads.{t}.bias"] = self.head_biases[t].detach()
            out[f"preprocess.{t}.scale"] = self.pre_scales[t]
            out[f"preprocess.{t}.shift"] = self.pre_shifts[t]
        return out

    @classmethod
    def from_state(cls, spec: NetworkSpec, tensors: dict[str, torch.Tensor], num_tasks: int) -> "MaskedNetwork":
        """Rebuild a network from `state_tensors()` output; raises ValueError if tensors are missing or misshaped."""
        net = cls(spec)
        with torch.no_grad():
            for i in range(len(net.weights)):
                for name, p in ((f"layers.{i}.weight", net.weights[i]), (f"layers.{i}.bias", net.biases[i])):
                    t = _take(tensors, name, p.shape)
                    p.copy_(t)
            for t in range(num_tasks):
                hw = tensors.get(f"heads.{t}.weight")
                if hw is None or hw.dim() != 2 or hw.shape[1] != net.feature_dim:
                    raise ValueError(f"tensor heads.{t}.weight is missing or misshaped")
                net.head_weights.append(nn.Parameter(hw.clone().float()))
                net.head_biases.append(nn.Parameter(_take(tensors, f"heads.{t}.bias", (hw.shape[0],)).clone().float()))
                net.pre_scales.append(_take(tensors, f"preprocess.{t}.scale", spec.input_shape).clone().float())
                net.pre_shifts.append(_take(tensors, f"preprocess.{t}.shift", spec.input_shape).clone().float())
        return net


def _take(tensors: dict[str, torch.Tensor], name: str, shape) -> torch.Tensor:
    t = tensors.get(name)
    if t is None or tuple(t.shape) != tuple(shape):
        raise ValueError(f"tensor {name} is missing or not of shape {tuple(shape)}")
    return t


class ExportGraph(nn.Module):
    """The served graph: raw input and a task index per row in, that task's class scores out.

    All tasks' masks, heads (zero-padded to the widest) and preprocessing are constants of the graph.
    A task index outside [0, T) is mapped to T, which the Gather rejects, so a bad index errors
    instead of silently picking a mask (ONNX Gather would accept negative indices).
    """

    def __init__(self, net: MaskedNetwork, masks_per_task: list[list[torch.Tensor]]):
        super().__init__()
        self.net = net
        T = net.num_tasks
        self.num_tasks = T
        self.max_classes = max(w.shape[0] for w in net.head_weights)
        for i in range(len(net.spec.layers)):
            self.register_buffer(f"mask{i}", torch.stack([masks_per_task[t][i] for t in range(T)]))  # (T, units)
        hw = torch.zeros(T, self.max_classes, net.feature_dim)
        hb = torch.zeros(T, self.max_classes)
        for t in range(T):
            c = net.head_weights[t].shape[0]
            hw[t, :c] = net.head_weights[t].detach()
            hb[t, :c] = net.head_biases[t].detach()
        self.register_buffer("head_w", hw.reshape(T * self.max_classes, net.feature_dim))  # (T*C, F)
        self.register_buffer("head_b", hb.reshape(T * self.max_classes))
        self.register_buffer("pre_scale", torch.stack(net.pre_scales))  # (T, *input_shape)
        self.register_buffer("pre_shift", torch.stack(net.pre_shifts))

    def forward(self, x: torch.Tensor, task: torch.Tensor) -> torch.Tensor:
        T, C = self.num_tasks, self.max_classes
        task = torch.where((task >= 0) & (task < T), task, torch.full_like(task, T))  # (B,)
        x = x * torch.index_select(self.pre_scale, 0, task) + torch.index_select(self.pre_shift, 0, task)
        masks = [torch.index_select(getattr(self, f"mask{i}"), 0, task) for i in range(len(self.net.spec.layers))]
        acts = self.net.hidden(x, masks)
        feats = self.net.features(acts)  # (B, F)
        scores = (feats @ self.head_w.T + self.head_b).reshape(-1, T, C)  # (B, T, C)
        idx = task.clamp(max=T - 1).reshape(-1, 1, 1).expand(-1, 1, C)  # (B, 1, C)
        return torch.gather(scores, 1, idx).squeeze(1)  # (B, C)
