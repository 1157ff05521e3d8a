#!/usr/bin/env python
"""A KServe peer for the serving benchmark: the same ONNX model behind KServe's own Python model server.

Runs under an interpreter that has `kserve` (a separate virtual environment: KServe pins its own gRPC and
protobuf), not the project's. Every task of the repository's newest version becomes a `kserve.Model` named after
the task, answering the Open Inference Protocol over gRPC: it runs the version's model.onnx with ONNX Runtime (one
intra-op thread, like clnp-serve) with the task's index, and slices the task's classes, which is what clnp-serve
computes. Reads the manifest as JSON: the project's packages are not importable there.

    /path/to/kserve-venv/bin/python benchmarks/kserve_peer.py --repository DIR --port 0

Prints `kserve-peer listening on 127.0.0.1:PORT` once the gRPC port accepts connections.
"""

from __future__ import annotations

import argparse
import json
import socket
import threading
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
from kserve import InferOutput, InferRequest, InferResponse, Model, ModelServer


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class TaskModel(Model):
    """One task of the shared network, on the version's one ONNX Runtime session."""

    def __init__(self, name: str, index: int, classes: int, session, onnx: dict) -> None:
        super().__init__(name)
        self._index, self._classes, self._session, self._onnx = index, classes, session, onnx
        self.ready = True

    def predict(self, payload: InferRequest, headers=None, response_headers=None) -> InferResponse:
        x = payload.inputs[0].as_numpy().astype(np.float32, copy=False)
        task = np.full(len(x), self._index, dtype=np.int64)
        (scores,) = self._session.run([self._onnx["output_name"]],
                                      {self._onnx["input_name"]: x, self._onnx["task_input_name"]: task})
        scores = np.ascontiguousarray(scores[:, : self._classes])
        out = InferOutput(name=self._onnx["output_name"], shape=list(scores.shape), datatype="FP32")
        out.set_data_from_numpy(scores, binary_data=True)
        return InferResponse(response_id=payload.id, model_name=self.name, infer_outputs=[out])


def announce_when_listening(port: int) -> None:
    for _ in range(600):
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                print(f"kserve-peer listening on 127.0.0.1:{port}", flush=True)
                return
        except OSError:
            time.sleep(0.1)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repository", type=Path, required=True)
    p.add_argument("--port", type=int, default=0, help="gRPC port; 0: a free one")
    args = p.parse_args()
    versions = sorted(int(d.name) for d in args.repository.iterdir() if d.name.isdigit())
    vdir = args.repository / str(versions[-1])
    manifest = json.loads((vdir / "manifest.json").read_text())
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    session = ort.InferenceSession(str(vdir / manifest["onnx"]["file"]), options, providers=["CPUExecutionProvider"])
    models = [TaskModel(t["name"], t["index"], len(t["classes"]), session, manifest["onnx"]) for t in manifest["tasks"]]
    grpc_port = args.port or free_port()
    threading.Thread(target=announce_when_listening, args=(grpc_port,), daemon=True).start()
    ModelServer(grpc_port=grpc_port, http_port=free_port(), workers=1).start(models)


if __name__ == "__main__":
    main()
