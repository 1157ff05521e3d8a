# syntax=docker/dockerfile:1
#
# Two images from one file:
#
#   docker build --target serve -t clnp-serve .    # the server: torch-free (`pip install .`)
#   docker build --target train -t clnp-train .    # the trainer: `.[train]`
#
# Where the trainer's torch comes from is a build argument (TORCH_PIP_ARGS, extra pip arguments for that one
# install). By default pip's configured index; its Linux torch wheel brings the CUDA libraries (gigabytes). For
# the CPU-only build:
#   --build-arg TORCH_PIP_ARGS="--index-url <PyTorch's CPU wheel index>"
#   --build-arg TORCH_PIP_ARGS="--find-links /ctx/wheels"   # a wheel folder in the build context, e.g. ./wheels
#
#   docker run --rm -p 50051:50051 -p 9100:9100 -v "$PWD/repo:/models:ro" clnp-serve
#   docker run --rm -v "$PWD/repo:/repo" --user "$(id -u):$(id -g)" clnp-train \
#       add-task --repository /repo --task digits --data mnist
#
# Options after the image name are appended to clnp-serve's command line (a repeated option
# overrides the default given here, e.g. `--port 6000`); secrets such as the admin token go in
# the environment (`-e CLNP_TOKEN=...`), never in the arguments.

ARG PYTHON_IMAGE=python:3.11-slim

# ---- common base: Python, a non-root user, a virtual environment on PATH ----------------------
FROM ${PYTHON_IMAGE} AS base
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH
RUN groupadd --system --gid 10001 clnp \
    && useradd --system --uid 10001 --gid clnp --create-home --home-dir /home/clnp --shell /usr/sbin/nologin clnp

# ---- build stages: install into /opt/venv, copied alone into the final images -----------------
FROM base AS serve-build
RUN python -m venv /opt/venv
WORKDIR /src
COPY . .
# The base install is the serving side: numpy, onnxruntime, grpcio (+ health, reflection), no torch.
RUN pip install . \
    && python -c "import serving.cli, serving.server, onnxruntime, grpc_health.v1.health_pb2_grpc" \
    && ! python -c "import torch" 2>/dev/null

FROM base AS train-build
ARG TORCH_REQUIREMENT="torch==2.13.0"
ARG TORCH_PIP_ARGS=""
RUN python -m venv /opt/venv
# torch first, from wherever TORCH_PIP_ARGS points (the build context is mounted at /ctx for a local wheel
# folder); `.[train]` then finds torch==2.13.0 satisfied (a +cpu local version satisfies the pin).
RUN --mount=type=bind,source=.,target=/ctx pip install ${TORCH_PIP_ARGS} "${TORCH_REQUIREMENT}"
WORKDIR /src
COPY . .
RUN pip install ".[train]" \
    && python -c "import torch, trainer.cli, trainer.pipeline"

# ---- train: clnp-train ------------------------------------------------------------------------
FROM base AS train
COPY --from=train-build /opt/venv /opt/venv
# Downloaded datasets go to $CLNP_CACHE_DIR (mount a volume there to keep them); world-writable so
# that `--user "$(id -u):$(id -g)"` (to write a bind-mounted repository as yourself) works too.
ENV CLNP_CACHE_DIR=/cache
RUN mkdir -p /cache && chmod 1777 /cache
USER 10001:10001
WORKDIR /home/clnp
ENTRYPOINT ["clnp-train"]
CMD ["--help"]

# ---- serve: clnp-serve on /models (last stage: the default target) ----------------------------
FROM base AS serve
COPY --from=serve-build /opt/venv /opt/venv
RUN mkdir -p /models
USER 10001:10001
WORKDIR /home/clnp
EXPOSE 50051 9100
# Ready = the gRPC health service answers SERVING for the server as a whole ("" service), which it does once
# a model version is loaded. clnp-serve writes where it listens (port, TLS) to $CLNP_STATUS_FILE, and the
# check reads it, so it follows `--port 6000` or `--tls-cert/--tls-key` given after the image name.
ENV CLNP_STATUS_FILE=/tmp/clnp-serve.json
HEALTHCHECK --interval=15s --timeout=5s --start-period=60s --retries=3 CMD ["clnp-admin", "health"]
ENTRYPOINT ["clnp-serve", "--repository", "/models", "--host", "0.0.0.0", "--port", "50051", "--metrics-port", "9100"]
CMD []
