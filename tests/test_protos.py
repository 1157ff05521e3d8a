"""The protos, their generated code, and wire compatibility with Triton's client.

Our `inference` protos and tritonclient's define the same symbols in protobuf's
default descriptor pool, so they cannot be imported in one process. Everything
that imports either runs in a subprocess (this process imports neither).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "gen_protos.py"
OURS = "serving._generated.inference.grpc_service_pb2"
TRITON = "tritonclient.grpc.service_pb2"
OURS_CONFIG = "serving._generated.inference.model_config_pb2"
TRITON_CONFIG = "tritonclient.grpc.model_config_pb2"


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        [sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120
    )


def _py(code: str, *args: str):
    """Run code in a fresh interpreter; return the JSON it prints last."""
    proc = _run("-c", textwrap.dedent(code), *args)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


# --- generation -------------------------------------------------------------


def test_check_passes_on_committed_tree():
    proc = _run(str(SCRIPT), "--check")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "up to date" in proc.stdout


def _copy_tree(tmp_path: Path) -> Path:
    shutil.copytree(ROOT / "protos", tmp_path / "protos")
    shutil.copytree(
        ROOT / "serving" / "_generated",
        tmp_path / "serving" / "_generated",
        ignore=shutil.ignore_patterns("__pycache__"),
    )
    assert _run(str(SCRIPT), "--check", "--root", str(tmp_path)).returncode == 0
    return tmp_path


def test_check_detects_changed_proto(tmp_path):
    root = _copy_tree(tmp_path)
    proto = root / "protos" / "clnp" / "admin" / "v1" / "admin.proto"
    text = proto.read_text()
    assert "  int64 failed_reloads = 6;\n" in text
    proto.write_text(text.replace("  int64 failed_reloads = 6;\n", "  int64 failed_reloads = 16;\n"))

    proc = _run(str(SCRIPT), "--check", "--root", str(root))
    assert proc.returncode == 1
    assert "differs: serving/_generated/clnp/admin/v1/admin_pb2.py" in proc.stderr
    assert "grpc_service" not in proc.stderr  # the untouched proto did not drift

    # Regenerating fixes it.
    assert _run(str(SCRIPT), "--root", str(root)).returncode == 0
    assert _run(str(SCRIPT), "--check", "--root", str(root)).returncode == 0


def test_check_detects_changed_rpc_comment(tmp_path):
    root = _copy_tree(tmp_path)
    proto = root / "protos" / "inference" / "grpc_service.proto"
    text = proto.read_text()
    assert "  // Run one inference request.\n" in text
    proto.write_text(text.replace("  // Run one inference request.\n", "  // Infer.\n"))

    proc = _run(str(SCRIPT), "--check", "--root", str(root))
    assert proc.returncode == 1
    assert "differs: serving/_generated/inference/grpc_service_pb2_grpc.py" in proc.stderr


def test_check_detects_missing_and_extra_files(tmp_path):
    root = _copy_tree(tmp_path)
    gen = root / "serving" / "_generated"
    (gen / "inference" / "grpc_service_pb2.pyi").unlink()
    (gen / "clnp" / "stale_pb2.py").write_text("")

    proc = _run(str(SCRIPT), "--check", "--root", str(root))
    assert proc.returncode == 1
    assert "missing: serving/_generated/inference/grpc_service_pb2.pyi" in proc.stderr
    assert "extra:   serving/_generated/clnp/stale_pb2.py" in proc.stderr


# --- generated modules -------------------------------------------------------


def test_generated_services_and_imports():
    got = _py(
        """
        import json
        from serving._generated.inference import grpc_service_pb2 as pb, grpc_service_pb2_grpc as pbg
        from serving._generated.clnp.admin.v1 import admin_pb2, admin_pb2_grpc
        svc = pb.DESCRIPTOR.services_by_name["GRPCInferenceService"]
        adm = admin_pb2.DESCRIPTOR.services_by_name["AdminService"]
        print(json.dumps({
            "svc": svc.full_name, "methods": [m.name for m in svc.methods],
            "adm": adm.full_name, "adm_methods": [m.name for m in adm.methods],
            "module": pb.ModelInferRequest.__module__,
            "grpc": [hasattr(pbg, n) for n in ("GRPCInferenceServiceStub",
                     "GRPCInferenceServiceServicer", "add_GRPCInferenceServiceServicer_to_server")]
                    + [hasattr(admin_pb2_grpc, n) for n in ("AdminServiceStub",
                     "AdminServiceServicer", "add_AdminServiceServicer_to_server")],
            "init": open(pb.__file__.replace("grpc_service_pb2.py", "__init__.py")).read(),
        }))
        """
    )
    assert got["svc"] == "inference.GRPCInferenceService"
    assert set(got["methods"]) >= {
        "ServerLive", "ServerReady", "ModelReady", "ServerMetadata",
        "ModelMetadata", "ModelInfer", "ModelStatistics", "RepositoryIndex",
    }
    assert got["adm"] == "clnp.admin.v1.AdminService"
    assert got["adm_methods"] == ["Capacity", "ListTasks", "Reload", "Status"]
    assert got["module"] == OURS
    assert all(got["grpc"])
    assert got["init"].startswith("# Generated by scripts/gen_protos.py; do not edit.")


# --- wire compatibility with tritonclient ---------------------------------------

_SCHEMA = """
    import importlib, json, sys
    mod = importlib.import_module(sys.argv[1])
    def fields(d):
        out = {}
        for f in d.fields:
            out[f.name] = [f.number, f.type, f.label, f.message_type.full_name if f.message_type else "",
                           f.containing_oneof.name if f.containing_oneof else "",
                           f.enum_type.full_name if f.enum_type else ""]
        return out
    msgs, enums = {}, {}
    def walk_enum(e):
        enums[e.full_name] = {v.name: v.number for v in e.values}
    def walk(d):
        msgs[d.full_name] = fields(d)
        for n in d.nested_types:
            walk(n)
        for e in d.enum_types:
            walk_enum(e)
    for d in mod.DESCRIPTOR.message_types_by_name.values():
        walk(d)
    for e in mod.DESCRIPTOR.enum_types_by_name.values():
        walk_enum(e)
    svc = mod.DESCRIPTOR.services_by_name.get("GRPCInferenceService")
    methods = {m.name: [m.input_type.full_name, m.output_type.full_name,
                        m.client_streaming, m.server_streaming] for m in svc.methods} if svc else {}
    print(json.dumps({"messages": msgs, "enums": enums, "methods": methods}))
"""


def test_schema_matches_triton():
    """Every message and rpc we declare is field-for-field Triton's."""
    ours, triton = _py(_SCHEMA, OURS), _py(_SCHEMA, TRITON)
    assert len(ours["messages"]) >= 30
    for name, fields in ours["messages"].items():
        assert fields == triton["messages"][name], name
    for name, sig in ours["methods"].items():
        assert sig == triton["methods"][name], name
    assert "ModelConfig" in ours["methods"]


def test_model_config_is_a_field_exact_subset_of_tritons():
    """ModelConfig declares only the fields we fill, each with Triton's number, type and label."""
    ours, triton = _py(_SCHEMA, OURS_CONFIG), _py(_SCHEMA, TRITON_CONFIG)
    assert {"inference.ModelConfig", "inference.ModelInput", "inference.ModelOutput"} <= set(ours["messages"])
    for name, fields in ours["messages"].items():
        if name.endswith("Entry"):  # map entries: key and value, numbered 1 and 2 by protobuf itself
            assert fields == triton["messages"][name], name
            continue
        for field, spec in fields.items():
            assert spec == triton["messages"][name][field], (name, field)
    for name, values in ours["enums"].items():
        assert values.items() <= triton["enums"][name].items(), name
    assert ours["enums"]["inference.DataType"] == triton["enums"]["inference.DataType"]


_WRITE = """
    import json, sys
    import {module} as pb
    from google.protobuf import json_format
    msg = build(pb)
    open(sys.argv[1], "wb").write(msg.SerializeToString())
    print(json.dumps(json_format.MessageToDict(msg, preserving_proto_field_name=True)))
"""

_READ = """
    import json, sys
    import {module} as pb
    from google.protobuf import json_format
    msg = getattr(pb, sys.argv[2])()
    msg.ParseFromString(open(sys.argv[1], "rb").read())
    print(json.dumps(json_format.MessageToDict(msg, preserving_proto_field_name=True)))
"""


def _roundtrip(tmp_path, builder: str, writer: str, reader: str, message: str):
    wire = tmp_path / "msg.bin"
    sent = _py(textwrap.dedent(builder) + textwrap.dedent(_WRITE).format(module=writer), str(wire))
    got = _py(_READ.format(module=reader), str(wire), message)
    return sent, got


_REQUEST = """
    import numpy as np
    def build(pb):
        r = pb.ModelInferRequest(model_name="clnp", model_version="3", id="req-7")
        r.parameters["task"].string_param = "mnist"
        r.parameters["sequence_id"].int64_param = -5
        r.parameters["flag"].bool_param = True
        r.parameters["temp"].double_param = 0.25
        r.parameters["big"].uint64_param = 2**63
        x = r.inputs.add(name="input", datatype="FP32", shape=[2, 3])
        x.parameters["binary_data_size"].int64_param = 24
        r.raw_input_contents.append(np.arange(6, dtype="<f4").tobytes())
        y = r.inputs.add(name="mask", datatype="INT64", shape=[2])
        y.contents.int64_contents.extend([1, -1])
        r.outputs.add(name="probs").parameters["classification"].int64_param = 2
        return r
"""


def test_infer_request_triton_to_ours(tmp_path):
    sent, got = _roundtrip(tmp_path, _REQUEST, TRITON, OURS, "ModelInferRequest")
    assert got == sent
    assert got["model_name"] == "clnp" and got["model_version"] == "3" and got["id"] == "req-7"
    assert got["parameters"] == {
        "task": {"string_param": "mnist"},
        "sequence_id": {"int64_param": "-5"},
        "flag": {"bool_param": True},
        "temp": {"double_param": 0.25},
        "big": {"uint64_param": str(2**63)},
    }
    assert [(i["name"], i["datatype"], i["shape"]) for i in got["inputs"]] == [
        ("input", "FP32", ["2", "3"]),
        ("mask", "INT64", ["2"]),
    ]
    assert got["inputs"][0]["parameters"] == {"binary_data_size": {"int64_param": "24"}}
    assert got["inputs"][1]["contents"] == {"int64_contents": ["1", "-1"]}
    assert got["outputs"] == [
        {"name": "probs", "parameters": {"classification": {"int64_param": "2"}}}
    ]
    import base64, struct

    raw = base64.b64decode(got["raw_input_contents"][0])
    assert struct.unpack("<6f", raw) == (0.0, 1.0, 2.0, 3.0, 4.0, 5.0)


_RESPONSE = """
    import numpy as np
    def build(pb):
        r = pb.ModelInferResponse(model_name="clnp", model_version="3", id="req-7")
        r.parameters["task"].string_param = "mnist"
        out = r.outputs.add(name="probs", datatype="FP32", shape=[2, 2])
        out.parameters["task_index"].int64_param = 1
        r.raw_output_contents.append(np.array([[0.9, 0.1], [0.2, 0.8]], dtype="<f4").tobytes())
        r.outputs.add(name="label", datatype="INT64", shape=[2])
        r.raw_output_contents.append(np.array([0, 1], dtype="<i8").tobytes())
        return r
"""


def test_infer_response_ours_to_triton(tmp_path):
    sent, got = _roundtrip(tmp_path, _RESPONSE, OURS, TRITON, "ModelInferResponse")
    assert got == sent
    assert (got["model_name"], got["model_version"], got["id"]) == ("clnp", "3", "req-7")
    assert got["parameters"] == {"task": {"string_param": "mnist"}}
    assert [(o["name"], o["datatype"], o["shape"]) for o in got["outputs"]] == [
        ("probs", "FP32", ["2", "2"]),
        ("label", "INT64", ["2"]),
    ]
    assert got["outputs"][0]["parameters"] == {"task_index": {"int64_param": "1"}}

    # And tritonclient's own result decoding reads it as a real client would.
    arrays = _py(
        """
        import json, sys
        from tritonclient.grpc import InferResult, service_pb2
        r = service_pb2.ModelInferResponse()
        r.ParseFromString(open(sys.argv[1], "rb").read())
        res = InferResult(r)
        print(json.dumps({n: res.as_numpy(n).tolist() for n in ("probs", "label")}))
        """,
        str(tmp_path / "msg.bin"),
    )
    assert arrays["label"] == [0, 1]
    assert [[round(v, 6) for v in row] for row in arrays["probs"]] == [[0.9, 0.1], [0.2, 0.8]]


_METADATA = """
    def build(pb):
        T = pb.ModelMetadataResponse.TensorMetadata
        return pb.ModelMetadataResponse(
            name="clnp", versions=["1", "2", "3"], platform="onnxruntime_onnx",
            inputs=[T(name="input", datatype="FP32", shape=[-1, 1, 28, 28])],
            outputs=[T(name="probs", datatype="FP32", shape=[-1, 10]),
                     T(name="label", datatype="INT64", shape=[-1])],
        )
"""


def test_model_metadata_ours_to_triton(tmp_path):
    sent, got = _roundtrip(tmp_path, _METADATA, OURS, TRITON, "ModelMetadataResponse")
    assert got == sent
    assert got["name"] == "clnp"
    assert got["versions"] == ["1", "2", "3"]
    assert got["platform"] == "onnxruntime_onnx"
    assert got["inputs"] == [{"name": "input", "datatype": "FP32", "shape": ["-1", "1", "28", "28"]}]
    assert [o["name"] for o in got["outputs"]] == ["probs", "label"]
    assert got["outputs"][1] == {"name": "label", "datatype": "INT64", "shape": ["-1"]}
