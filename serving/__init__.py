"""The serving side of CLNP: the model repository format, the ONNX Runtime data plane and the gRPC server.

Never imports torch or the trainer. Submodules: `repository` (the on-disk contract), `capacity`,
`runtime` (loaded versions, inference, hot reload, micro-batching), `convert` (wire <-> numpy),
`errors`, `server` (gRPC services), `admin`, `metrics`, `cli` (clnp-serve, clnp-admin).
"""
