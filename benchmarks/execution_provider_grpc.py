"""clnp-serve over gRPC with each execution provider: answers compared, one client timed, one call at a time.

Starts `clnp-serve --execution-provider cpu`, then `cuda`, on the same repository; sends the same rows of one task
to both (batch 1, 64 and 5,000, KServe v2 ModelInfer with raw contents) and prints p50 latency, rows per second and
the largest difference between the two servers' scores. A check of the GPU path end to end, not a load test
(benchmarks/serving.py is the load test).

    python benchmarks/execution_provider_grpc.py REPOSITORY [TASK]
"""
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import grpc  # noqa: E402
import numpy as np  # noqa: E402

from serving._generated.inference import grpc_service_pb2 as pb, grpc_service_pb2_grpc as rpc  # noqa: E402


def call(stub, x: np.ndarray, task: str, input_name: str) -> np.ndarray:
    req = pb.ModelInferRequest(model_name=task)
    t = req.inputs.add()
    t.name, t.datatype = input_name, "FP32"
    t.shape.extend(x.shape)
    req.raw_input_contents.append(x.tobytes())
    r = stub.ModelInfer(req)
    return np.frombuffer(r.raw_output_contents[0], dtype=np.float32).reshape(len(x), -1)


def wait_ready(stub, process, timeout: float = 60.0) -> bool:
    """True once the server answers ServerReady; False if it exits or `timeout` passes first."""
    end = time.monotonic() + timeout
    while time.monotonic() < end and process.poll() is None:
        try:
            if stub.ServerReady(pb.ServerReadyRequest()).ready:
                return True
        except grpc.RpcError:
            pass
        time.sleep(0.2)
    return False


def main() -> int:
    repo = sys.argv[1]
    task = sys.argv[2] if len(sys.argv) > 2 else None
    results: dict[int, dict[str, np.ndarray]] = {}
    for k, ep in enumerate(("cpu", "cuda")):
        port = 50061 + k
        log = Path(f"/tmp/clnp-serve-{ep}.log")
        p = subprocess.Popen([sys.executable, "-c", "import sys; from serving.cli import serve_main; sys.exit(serve_main())",
                              "--repository", repo, "--port", str(port), "--execution-provider", ep,
                              "--poll-interval", "0"], stdout=log.open("w"), stderr=subprocess.STDOUT, env=os.environ)
        try:
            channel = grpc.insecure_channel(f"127.0.0.1:{port}", options=[("grpc.max_receive_message_length", 64 << 20),
                                                                          ("grpc.max_send_message_length", 64 << 20)])
            stub = rpc.GRPCInferenceServiceStub(channel)
            if not wait_ready(stub, p):
                print(f"clnp-serve --execution-provider {ep} is not ready (exit code {p.poll()}):\n"
                      f"{log.read_text()[-2000:]}")
                return 1
            if task is None:
                task = sorted(m.name for m in stub.RepositoryIndex(pb.RepositoryIndexRequest()).models)[-1]
            meta = stub.ModelMetadata(pb.ModelMetadataRequest(name=task)).inputs[0]
            width = [int(d) for d in meta.shape[1:]]
            rng = np.random.default_rng(0)
            for b in (1, 64, 5000):
                x = rng.random((b, *width), dtype=np.float32)
                results.setdefault(b, {})[ep] = call(stub, x, task, meta.name)
                for _ in range(20):
                    call(stub, x, task, meta.name)
                n = max(20, 2000 // b) if b < 5000 else 40
                latencies = []
                t0 = time.perf_counter()
                for _ in range(n):
                    s = time.perf_counter()
                    call(stub, x, task, meta.name)
                    latencies.append(time.perf_counter() - s)
                seconds = time.perf_counter() - t0
                print(f"gRPC {ep:4s} task {task} batch {b:5d}: p50 {np.median(latencies) * 1e3:.3f} ms  "
                      f"{n * b / seconds:,.0f} rows/s", flush=True)
        finally:
            p.terminate()
            p.wait(30)
    for b, r in results.items():
        print(f"batch {b}: max |cuda - cpu| over gRPC = {np.max(np.abs(r['cuda'] - r['cpu'])):.2e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
