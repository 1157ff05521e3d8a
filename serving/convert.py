"""Pure converters between the Open Inference Protocol messages and numpy arrays.

The wire stops here: `decode_infer_request` turns a ModelInferRequest into the model name,
version, id and one float32 array, checking what can be wrong on the wire (names, datatype, and
that the values sent fill the shape sent), raising the domain errors of `serving.errors`;
whether that shape fits the model, and how many rows a request may hold, is checked once, by the
runtime. `encode_infer_response` turns scores into a ModelInferResponse, and
`model_metadata_response` / `model_config_response` describe a task (a `ModelDescription`).

Accepted input datatypes (all cast to float32, the model's input type):

* ``FP32`` (preferred: no conversion), ``FP64``, ``FP16``,
* ``INT8``, ``INT16``, ``INT32``, ``INT64``, ``UINT8``, ``UINT16``, ``UINT32``, ``UINT64``
  (``UINT8`` is a compact way to send raw pixels 0..255).

Values come either as ``raw_input_contents`` (paired by position with ``inputs``,
little-endian, row-major; every datatype above) or as typed ``contents`` (``fp32_contents``,
``fp64_contents``, ``int_contents`` for INT8/16/32, ``int64_contents``, ``uint_contents`` for
UINT8/16/32, ``uint64_contents``; FP16 has no typed field). ``BOOL`` and ``BYTES`` are refused.
The response always carries the scores as FP32 in ``raw_output_contents`` (which is what
tritonclient reads).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from serving._generated.inference import grpc_service_pb2 as pb
from serving._generated.inference import model_config_pb2 as mc
from serving.errors import InvalidInput, UnknownVersion

PLATFORM = "onnxruntime_onnx"

# datatype -> little-endian numpy dtype of its raw bytes
RAW_DTYPES: dict[str, str] = {
    "FP32": "<f4",
    "FP64": "<f8",
    "FP16": "<f2",
    "INT8": "i1",
    "INT16": "<i2",
    "INT32": "<i4",
    "INT64": "<i8",
    "UINT8": "u1",
    "UINT16": "<u2",
    "UINT32": "<u4",
    "UINT64": "<u8",
}
# datatype -> the InferTensorContents field holding its typed values
TYPED_FIELDS: dict[str, str] = {
    "FP32": "fp32_contents",
    "FP64": "fp64_contents",
    "INT8": "int_contents",
    "INT16": "int_contents",
    "INT32": "int_contents",
    "INT64": "int64_contents",
    "UINT8": "uint_contents",
    "UINT16": "uint_contents",
    "UINT32": "uint_contents",
    "UINT64": "uint64_contents",
}
_ALL_TYPED_FIELDS = (
    "bool_contents",
    "int_contents",
    "int64_contents",
    "uint_contents",
    "uint64_contents",
    "fp32_contents",
    "fp64_contents",
    "bytes_contents",
)
ACCEPTED_DATATYPES = tuple(RAW_DTYPES)


@dataclass(frozen=True)
class TensorNames:
    """The names of a model's one input and one output on the wire."""

    input_name: str  # e.g. "input"
    output_name: str  # e.g. "scores"


@dataclass(frozen=True)
class ModelDescription:
    """What ModelMetadata and ModelConfig say about one task (built by `serving.dataplane`)."""

    name: str  # the task, which is the model name
    versions: tuple[int, ...]  # loaded versions holding the task
    input_name: str
    input_shape: tuple[int, ...]  # per sample, without the batch
    output_name: str
    classes: int  # output width
    max_request_rows: int  # most rows one request may hold (the configured limit, or what fits in a message)
    batch_rows: int  # most rows one ONNX Runtime call runs
    batching: bool  # concurrent requests share ONNX Runtime calls
    batch_timeout_us: int  # how long a batch waits to fill under load
    execution_provider: str  # "cpu" or "cuda"
    parameters: dict[str, str]  # further facts, by name (reported in ModelConfig.parameters)


@dataclass(frozen=True)
class RequestHeader:
    """Who a ModelInferRequest is for."""

    model_name: str
    model_version: int | None  # None: the newest loaded
    id: str


@dataclass(frozen=True)
class DecodedRequest:
    """A ModelInferRequest as plain values."""

    model_name: str
    model_version: int | None
    id: str
    inputs: np.ndarray  # (B, *input_shape) float32


def parse_version(text: str) -> int | None:
    """A model_version string as a number; "" means the newest. Raises UnknownVersion otherwise."""
    if text == "":
        return None
    if text.isdigit() and text.isascii():
        return int(text)
    raise UnknownVersion(f"model version {text!r} is not a version number; versions are positive integers")


def request_header(request: pb.ModelInferRequest) -> RequestHeader:
    """Model name, version and id of a request. Raises UnknownVersion for a non-numeric version."""
    return RequestHeader(request.model_name, parse_version(request.model_version), request.id)


def _shape_text(shape: Sequence[int]) -> str:
    return "[" + ", ".join(str(d) for d in shape) + "]"


def decode_input(request: pb.ModelInferRequest, spec: TensorNames) -> np.ndarray:
    """The request's one input as a float32 array of the shape the request gives.

    Raises InvalidInput: missing, extra or misnamed input; unsupported datatype; a negative or
    missing dimension; element count not matching the bytes or values sent; unknown requested
    output. The shape is checked against the model by the runtime, not here.
    """
    for out in request.outputs:
        if out.name != spec.output_name:
            raise InvalidInput(f"unknown requested output {out.name!r}; the model has one output {spec.output_name!r}")
    if len(request.inputs) == 0:
        raise InvalidInput(f"missing input {spec.input_name!r}")
    if len(request.inputs) > 1:
        names = ", ".join(repr(i.name) for i in request.inputs)
        raise InvalidInput(f"expected exactly one input {spec.input_name!r}, got {len(request.inputs)}: {names}")
    tensor = request.inputs[0]
    if tensor.name != spec.input_name:
        raise InvalidInput(f"unknown input {tensor.name!r}; the model takes one input {spec.input_name!r}")
    datatype = tensor.datatype
    if datatype not in RAW_DTYPES:
        raise InvalidInput(
            f"input {tensor.name!r} has datatype {datatype!r}; accepted: {', '.join(ACCEPTED_DATATYPES)} (FP32 preferred)"
        )
    shape = list(tensor.shape)
    if not shape or any(d < 0 for d in shape):
        raise InvalidInput(f"input {tensor.name!r} has shape {_shape_text(shape)}; dimensions are [batch, ...] >= 0")
    count = math.prod(shape)
    typed_present = [f for f in _ALL_TYPED_FIELDS if len(getattr(tensor.contents, f))]
    if request.raw_input_contents:
        if len(request.raw_input_contents) != len(request.inputs):
            raise InvalidInput(
                f"{len(request.raw_input_contents)} raw_input_contents for {len(request.inputs)} input; they pair by position"
            )
        if typed_present:
            raise InvalidInput(f"input {tensor.name!r} has both raw_input_contents and typed contents; send one")
        raw = request.raw_input_contents[0]
        dtype = np.dtype(RAW_DTYPES[datatype])
        if len(raw) != count * dtype.itemsize:
            raise InvalidInput(
                f"input {tensor.name!r} has {len(raw)} bytes of raw contents; shape {_shape_text(shape)} of "
                f"{datatype} needs {count * dtype.itemsize} bytes ({count} elements)"
            )
        values = np.frombuffer(raw, dtype=dtype)
    else:
        field = TYPED_FIELDS.get(datatype)
        if field is None:
            raise InvalidInput(f"datatype {datatype} has no typed contents; send it in raw_input_contents")
        wrong = [f for f in typed_present if f != field]
        if wrong:
            raise InvalidInput(f"input {tensor.name!r} is {datatype} but has values in {', '.join(wrong)}; use {field}")
        typed = getattr(tensor.contents, field)
        if len(typed) == 0:
            raise InvalidInput(f"input {tensor.name!r} has no data: send raw_input_contents or contents.{field}")
        if len(typed) != count:
            raise InvalidInput(
                f"input {tensor.name!r} has {len(typed)} values; shape {_shape_text(shape)} needs {count}"
            )
        if datatype in ("FP32", "FP64"):
            values = np.array(typed, dtype=np.float32 if datatype == "FP32" else np.float64)
        else:
            values = np.array(typed, dtype=np.int64 if datatype != "UINT64" else np.uint64)
            info = np.iinfo(np.dtype(RAW_DTYPES[datatype]))
            if values.size and (values.min() < info.min or values.max() > info.max):
                raise InvalidInput(f"input {tensor.name!r} has values outside the range of {datatype}")
    return values.astype(np.float32, copy=False).reshape(shape)


def decode_infer_request(request: pb.ModelInferRequest, spec: TensorNames) -> DecodedRequest:
    """Model name, version, id and input array of a request (see `decode_input` for what it raises)."""
    header = request_header(request)
    return DecodedRequest(header.model_name, header.model_version, header.id, decode_input(request, spec))


def encode_infer_response(
    model_name: str, model_version: int, request_id: str, output_name: str, scores: np.ndarray
) -> pb.ModelInferResponse:
    """A ModelInferResponse carrying scores (B, classes) as FP32 raw_output_contents."""
    scores = np.ascontiguousarray(scores, dtype="<f4")
    response = pb.ModelInferResponse(model_name=model_name, model_version=str(model_version), id=request_id)
    response.outputs.add(name=output_name, datatype="FP32", shape=list(scores.shape))
    response.raw_output_contents.append(scores.tobytes())
    return response


def model_metadata_response(model: ModelDescription) -> pb.ModelMetadataResponse:
    """ModelMetadata of one task: one FP32 input [-1, *input_shape], one FP32 output [-1, classes]."""
    Tensor = pb.ModelMetadataResponse.TensorMetadata
    return pb.ModelMetadataResponse(
        name=model.name,
        versions=[str(v) for v in model.versions],
        platform=PLATFORM,
        inputs=[Tensor(name=model.input_name, datatype="FP32", shape=[-1, *model.input_shape])],
        outputs=[Tensor(name=model.output_name, datatype="FP32", shape=[-1, model.classes])],
    )


INT32_MAX = 2**31 - 1


def model_config_response(model: ModelDescription) -> pb.ModelConfigResponse:
    """Triton's ModelConfig of one task, with the fields Triton clients and perf_analyzer read.

    max_batch_size is the most rows one request may hold (so dims leave the batch out);
    dynamic_batching is present when concurrent requests share calls; parameters add the rows of
    one ONNX Runtime call, the execution provider and `model.parameters`.
    """
    config = mc.ModelConfig(
        name=model.name,
        platform=PLATFORM,
        backend="onnxruntime",
        max_batch_size=min(model.max_request_rows, INT32_MAX),
        input=[mc.ModelInput(name=model.input_name, data_type=mc.TYPE_FP32, dims=list(model.input_shape))],
        output=[mc.ModelOutput(name=model.output_name, data_type=mc.TYPE_FP32, dims=[model.classes])],
        instance_group=[mc.ModelInstanceGroup(
            kind=mc.ModelInstanceGroup.KIND_GPU if model.execution_provider == "cuda" else mc.ModelInstanceGroup.KIND_CPU,
            count=1,
        )],
    )
    if model.batching:
        config.dynamic_batching.max_queue_delay_microseconds = model.batch_timeout_us
        config.dynamic_batching.preserve_ordering = True
    params = {"batch_rows": str(model.batch_rows), "execution_provider": model.execution_provider,
              **model.parameters}
    for key, value in params.items():
        config.parameters[key].string_value = value
    return pb.ModelConfigResponse(config=config)
