"""Export the shared network, with every task's masks, heads and preprocessing, to one ONNX graph."""

from __future__ import annotations

import contextlib
import io
import logging
import warnings

import numpy as np
import torch

from serving.contract import INPUT_NAME, OUTPUT_NAME, TASK_INPUT_NAME
from trainer.clnp import task_masks
from trainer.network import ExportGraph, MaskedNetwork

logger = logging.getLogger(__name__)

OPSET = 18
# ONNX Runtime and torch sum in different orders, so float32 round-off grows with the logits' size: a row
# passes when every score is within PARITY_ATOL + PARITY_RTOL * (the row's largest |score|) of torch's.
# A wrong mask, head or preprocessing moves scores by far more than 1e-4 of their scale.
PARITY_ATOL = 1e-5
PARITY_RTOL = 1e-4


class ExportError(Exception):
    """The exported graph is invalid or disagrees with the torch network."""


def export_onnx(net: MaskedNetwork, owners: list[torch.Tensor]) -> tuple[bytes, int]:
    """Export `net` with all its tasks; returns (serialized ONNX model, max_classes).

    Inputs: `input` float32 (batch, *input_shape) raw features, `task` int64 (batch,).
    Output: `scores` float32 (batch, max_classes). Raises ExportError if onnx.checker rejects it.
    """
    import onnx

    graph = ExportGraph(net, [task_masks(owners, t) for t in range(net.num_tasks)]).eval()
    batch = torch.export.Dim("batch", min=1)
    example = (torch.zeros(2, *net.spec.input_shape), torch.zeros(2, dtype=torch.int64))
    # The exporter prints progress and registry warnings we do not need in a CLI.
    quiet = io.StringIO()
    with warnings.catch_warnings(), contextlib.redirect_stdout(quiet):
        warnings.simplefilter("ignore")
        for name in ("torch.onnx", "torch._dynamo", "torch.export", "onnxscript", "onnx_ir"):
            logging.getLogger(name).setLevel(logging.ERROR)
        program = torch.onnx.export(
            graph, example, dynamo=True, opset_version=OPSET, input_names=[INPUT_NAME, TASK_INPUT_NAME],
            output_names=[OUTPUT_NAME], dynamic_shapes={"x": {0: batch}, "task": {0: batch}}, verbose=False,
            optimize=True,
        )
    model = program.model_proto
    try:
        onnx.checker.check_model(model)
    except onnx.checker.ValidationError as e:
        raise ExportError(f"exported graph fails onnx.checker: {e}") from e
    return model.SerializeToString(), graph.max_classes


def check_parity(onnx_bytes: bytes, net: MaskedNetwork, owners: list[torch.Tensor],
                 probes: dict[int, torch.Tensor], atol: float = PARITY_ATOL, rtol: float = PARITY_RTOL) -> float:
    """Run every task's probe inputs through ONNX Runtime and torch; return the largest absolute difference.

    A row agrees when every score is within `atol + rtol * max|torch score of the row|` of torch's, as
    numpy.allclose with the tolerance scaled by the row's largest score (round-off follows the largest
    terms of the sums, not each score). Raises ExportError naming the task if any row disagrees.
    """
    import onnxruntime as ort

    session = ort.InferenceSession(onnx_bytes, providers=["CPUExecutionProvider"])
    worst = 0.0
    with torch.no_grad():
        for t, x in probes.items():
            classes = net.head_weights[t].shape[0]
            expected = net(x, t, task_masks(owners, t)).numpy()  # (B, classes)
            got = session.run([OUTPUT_NAME], {INPUT_NAME: x.numpy().astype(np.float32),
                                              TASK_INPUT_NAME: np.full(len(x), t, dtype=np.int64)})[0][:, :classes]
            diff = np.abs(got - expected)  # (B, classes)
            allowed = atol + rtol * np.abs(expected).max(axis=1, keepdims=True)  # (B, 1)
            worst = max(worst, float(diff.max()))
            if (diff > allowed).any():
                row = int((diff - allowed).max(axis=1).argmax())
                raise ExportError(
                    f"ONNX Runtime and torch disagree on task {t}: max difference {float(diff[row].max()):.3g} "
                    f"> {float(allowed[row, 0]):.3g} allowed for scores up to {float(np.abs(expected[row]).max()):.3g}"
                )
    return worst


def export_task_graph(net: MaskedNetwork, owners: list[torch.Tensor], task: int,
                      probe: torch.Tensor) -> tuple[bytes, dict[str, int]] | None:
    """Task `task`'s own subnetwork as a small ONNX graph; returns (serialized model, units per layer).

    Only the units the task sees (owned by a task <= `task`) are copied, so a batch-1 call reads a fraction of the
    shared network's weights (the product is memory-bound: 784-2000-2000 is 22 MB a call). Inputs are those of the
    shared graph (the task input is all zeros); the output is (batch, classes). It is checked against the torch
    network on `probe` (the same tolerance as the shared graph). None when a layer shows the task no unit.
    """
    from trainer.compact import compact_task

    visible = [m.bool() for m in task_masks(owners, task)]
    units = {name: int(v.sum()) for name, v in zip(net.spec.layer_names, visible)}
    if min(units.values()) == 0:
        return None
    ct = compact_task(net, owners, task, visible)
    everything = [torch.zeros_like(o) for o in ct.owners]  # the copy's one task sees every copied unit
    data, _ = export_onnx(ct.net, everything)
    with torch.no_grad():
        full = net(probe, task, task_masks(owners, task)).numpy()
        small = ct.net(probe, 0, task_masks(everything, 0)).numpy()
    allowed = PARITY_ATOL + PARITY_RTOL * np.abs(full).max(axis=1, keepdims=True)
    if (np.abs(small - full) > allowed).any():
        raise ExportError(f"task {task}'s own subnetwork disagrees with the shared network by "
                          f"{float(np.abs(small - full).max()):.3g}")
    check_parity(data, ct.net, everything, {0: probe})
    return data, units
