# syntax=docker/dockerfile:1
#
# charlstm images, one file, three targets (docs/DEPLOYMENT.md):
#
#   docker build -t charlstm:gpu .                  gpu (default): onnxruntime-gpu, CUDA 13 + cuDNN 9
#   docker build --target cpu -t charlstm:cpu .     cpu: plain onnxruntime on python:3.12-slim
#   docker build --target train -t charlstm:train . train: the training CLI, with TensorFlow
#
# The two serving images hold the service dependencies and exactly one onnxruntime; TensorFlow
# only ever enters the `train` target (tests/test_deploy.py checks this).
#
# Behind a proxy or a private package index (docs/DEPLOYMENT.md):
#   --build-arg PIP_INDEX_URL=https://pypi.example.com/simple    and/or PIP_EXTRA_INDEX_URL
#   --build-arg HTTPS_PROXY=http://proxy:3128                    (predefined: no ARG needed)
#   --secret id=ca,src=/path/to/ca-bundle.pem                    a CA bundle pip should trust

# onnxruntime-gpu 1.31 is built for CUDA 13.0 and cuDNN 9, which need NVIDIA driver >= 580 on
# the host. The CUDA major version of the base image must match it: onnxruntime's CUDA provider
# finds libcudart, libcublas and libcudnn through the system library path of this image.
ARG CUDA_IMAGE=nvidia/cuda:13.0.2-cudnn-runtime-ubuntu24.04
ARG PYTHON_IMAGE=python:3.12-slim
# The same onnxruntime release in the CPU, GPU and training images, so that a model exported
# and checked by `train` runs on the runtime that serves it.
ARG ORT_VERSION=1.31.1

# ---- GPU ---------------------------------------------------------------------------------

# Ubuntu 24.04's Python 3.12. The builder and the final image share this stage, so the venv's
# interpreter link (/opt/venv/bin/python -> /usr/bin/python3.12) holds in both.
FROM ${CUDA_IMAGE} AS gpu-python
# Versions come from the base image's Ubuntu release; pinning them would only break rebuilds
# after security updates.
# hadolint ignore=DL3008
RUN apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends python3.12 tini \
    && rm -rf /var/lib/apt/lists/*

FROM gpu-python AS gpu-deps
# hadolint ignore=DL3008
RUN apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends python3.12-venv \
    && rm -rf /var/lib/apt/lists/*
RUN python3.12 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
# Only pyproject.toml: this layer (gigabytes of CUDA wheels) is rebuilt when the dependencies
# change, not when the code or README do. The empty README satisfies `readme =` in
# pyproject.toml; the resulting empty `charlstm` distribution is removed again, the venv keeps
# only the third-party packages and the service's code is copied into the final stage.
# ("./[gpu]" is `.[gpu]` written so that hadolint sees a local project, not an unpinned package.)
COPY pyproject.toml ./
ARG ORT_VERSION
# A private index or mirror; unset or empty, pip uses PyPI. pip reads them from the RUN
# environment, where build arguments are.
ARG PIP_INDEX_URL=
ARG PIP_EXTRA_INDEX_URL=
# The CA bundle secret, when given (a TLS-intercepting proxy, an index with a private CA): pip
# trusts it instead of its own bundle, so it must hold every CA pip needs. It is mounted for
# this RUN only and never stored in a layer.
RUN --mount=type=secret,id=ca,required=false \
    if [ -s /run/secrets/ca ]; then export PIP_CERT=/run/secrets/ca SSL_CERT_FILE=/run/secrets/ca; fi \
    && touch README.md \
    && pip install "./[gpu]" "onnxruntime-gpu==${ORT_VERSION}" \
    && pip uninstall -y charlstm

# ---- the service's code and models, shared by both serving images ----------------------------

FROM ${PYTHON_IMAGE} AS service-files
WORKDIR /opt/charlstm
COPY app/ app/
COPY models/ models/
# `training export` creates model folders with mode 0700; the service user must read them.
# Everything stays owned by root and read-only to the service.
RUN chmod -R a+rX,go-w . \
    && python -m compileall -q app

# ---- CPU ---------------------------------------------------------------------------------

FROM ${PYTHON_IMAGE} AS cpu-deps
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
COPY pyproject.toml ./
ARG ORT_VERSION
# A private index or mirror; unset or empty, pip uses PyPI. pip reads them from the RUN
# environment, where build arguments are.
ARG PIP_INDEX_URL=
ARG PIP_EXTRA_INDEX_URL=
# The CA bundle secret, when given (a TLS-intercepting proxy, an index with a private CA): pip
# trusts it instead of its own bundle, so it must hold every CA pip needs. It is mounted for
# this RUN only and never stored in a layer.
RUN --mount=type=secret,id=ca,required=false \
    if [ -s /run/secrets/ca ]; then export PIP_CERT=/run/secrets/ca SSL_CERT_FILE=/run/secrets/ca; fi \
    && touch README.md \
    && pip install "./[serve]" "onnxruntime==${ORT_VERSION}" \
    && pip uninstall -y charlstm

FROM ${PYTHON_IMAGE} AS cpu
COPY --from=cpu-deps /opt/venv /opt/venv
# ORT_DISABLE_TELEMETRY: onnxruntime's full opt-out of its usage events (it would also keep a
# device id under $HOME, and warn at every engine start where it cannot). HOME=/tmp: a
# writable home for any uid, tmpfs or emptyDir where the root file system is read-only.
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    CHARLSTM_HOST=0.0.0.0 \
    CHARLSTM_PORT=8000 \
    CHARLSTM_MODELS_DIR=/opt/charlstm/models \
    CHARLSTM_DEVICE=cpu \
    ORT_DISABLE_TELEMETRY=1 \
    HOME=/tmp
# tini: Debian's, unless the base image has it already.
# hadolint ignore=DL3008
RUN command -v tini >/dev/null || { apt-get update \
        && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends tini \
        && rm -rf /var/lib/apt/lists/*; }
# A fixed uid above the system range (manifests name 10001), so no --system: useradd warns
# about a system uid past SYS_UID_MAX.
RUN groupadd --gid 10001 charlstm \
    && useradd --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent \
       --shell /usr/sbin/nologin charlstm
COPY --from=service-files /opt/charlstm /opt/charlstm
WORKDIR /opt/charlstm
USER 10001:10001
EXPOSE 8000
# app/probe.py: GET /health on CHARLSTM_HOST:CHARLSTM_PORT as set at run time (-e), stdlib only.
HEALTHCHECK --interval=15s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "-m", "app.probe"]
# tini as PID 1 forwards signals and reaps; the service also runs as PID 1 itself, so an
# entrypoint override works too. -s: under another init (`docker run --init`, a pod sharing
# its PID namespace) tini still reaps, as a subreaper, instead of warning that it cannot.
ENTRYPOINT ["tini", "-s", "--"]
CMD ["python", "-m", "app"]

# ---- training (TensorFlow; never a base of the serving images) ----------------------------

FROM ${PYTHON_IMAGE} AS train
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONUNBUFFERED=1
WORKDIR /src
COPY pyproject.toml ./
ARG ORT_VERSION
# A private index or mirror; unset or empty, pip uses PyPI. pip reads them from the RUN
# environment, where build arguments are.
ARG PIP_INDEX_URL=
ARG PIP_EXTRA_INDEX_URL=
# The CA bundle secret, when given (a TLS-intercepting proxy, an index with a private CA): pip
# trusts it instead of its own bundle, so it must hold every CA pip needs. It is mounted for
# this RUN only and never stored in a layer.
# `serve` too: export checks the ONNX graph against Keras with onnxruntime.
RUN --mount=type=secret,id=ca,required=false \
    if [ -s /run/secrets/ca ]; then export PIP_CERT=/run/secrets/ca SSL_CERT_FILE=/run/secrets/ca; fi \
    && touch README.md \
    && pip install "./[serve,train]" "onnxruntime==${ORT_VERSION}" \
    && pip uninstall -y charlstm
WORKDIR /opt/charlstm
COPY app/ app/
COPY training/ training/
# Meant to run with the checkout mounted here and the caller's uid (docker-compose.yml, profile
# `train`): runs/, models/ and the corpus cache (.data/cache, as in .gpu/train.sh) are then
# written into the checkout. HOME=/tmp gives Keras and matplotlib a writable home for any uid.
ENV HOME=/tmp \
    CHARLSTM_CACHE=/opt/charlstm/.data/cache
USER 10001:10001
ENTRYPOINT ["python", "-m", "training"]
CMD ["--help"]

# ---- GPU service (the default target, so it comes last) -----------------------------------

FROM gpu-python AS gpu
COPY --from=gpu-deps /opt/venv /opt/venv
# ORT_DISABLE_TELEMETRY: onnxruntime's full opt-out of its usage events (it would also keep a
# device id under $HOME, and warn at every engine start where it cannot). HOME=/tmp: a
# writable home for any uid, tmpfs or emptyDir where the root file system is read-only.
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    CHARLSTM_HOST=0.0.0.0 \
    CHARLSTM_PORT=8000 \
    CHARLSTM_MODELS_DIR=/opt/charlstm/models \
    CHARLSTM_DEVICE=cuda \
    ORT_DISABLE_TELEMETRY=1 \
    HOME=/tmp
# A fixed uid above the system range (manifests name 10001), so no --system: useradd warns
# about a system uid past SYS_UID_MAX.
RUN groupadd --gid 10001 charlstm \
    && useradd --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent \
       --shell /usr/sbin/nologin charlstm
COPY --from=service-files /opt/charlstm /opt/charlstm
WORKDIR /opt/charlstm
USER 10001:10001
EXPOSE 8000
# app/probe.py: GET /health on CHARLSTM_HOST:CHARLSTM_PORT as set at run time (-e), stdlib only.
HEALTHCHECK --interval=15s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "-m", "app.probe"]
# tini as PID 1 forwards signals and reaps; the service also runs as PID 1 itself, so an
# entrypoint override works too. -s: under another init (`docker run --init`, a pod sharing
# its PID namespace) tini still reaps, as a subreaper, instead of warning that it cannot.
ENTRYPOINT ["tini", "-s", "--"]
CMD ["python", "-m", "app"]
