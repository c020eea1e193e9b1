# The `finetune` image. Stages: base (Python, tini, user) -> build (venv from constraints.txt) ->
# model (optional baked model) -> dev (the dev container: + test and lint tools) -> runtime (the default).
#
#   make image                        CUDA image (docker build --target runtime .), CUDA 13.0: driver >= 580.65.06
#   make image CUDA_FLAVOUR=cu126     the same for an older driver (see CUDA_FLAVOUR below)
#   make image-cpu                    CPU-only image on Debian, with the CPU torch wheel from .docker-wheels/
#
# Build arguments:
#   CUDA_FLAVOUR         cu130 (default), cu128 or cu126: the CUDA base image below and the CUDA version the torch
#                        wheels must have (the build fails if they disagree). The image declares it in
#                        NVIDIA_REQUIRE_CUDA, so the NVIDIA container toolkit refuses an older driver at start.
#                        cu130 takes torch from PyPI; make image passes PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/<flavour>
#                        for the others. Minimum drivers (NVIDIA's CUDA release notes): cu130 580.65.06,
#                        cu128 570.26, cu126 560.28.03.
#   BASE_IMAGE           Any Debian/Ubuntu image with Python >= 3.11 in its apt sources; empty or unset
#                        means the CUDA_FLAVOUR's base below (so a caller may pass it through blank).
#   BAKE_MODEL           Bake a model into the image for air-gapped clusters: a directory under models/ in
#                        the build context (BAKE_MODEL=models/my-gpt2), or a Hub id (BAKE_MODEL=gpt2) downloaded
#                        at build time. The image then defaults to it (FINETUNE_MODEL) with HF_HUB_OFFLINE=1.
#   PIP_FIND_LINKS       Folder of local wheels preferred by pip; make image-cpu sets /wheels (.docker-wheels/).
#   PIP_INDEX_URL, PIP_EXTRA_INDEX_URL, PIP_NO_INDEX   Passed to pip as is (mirrors, offline builds).
# Secret (BuildKit): extra CA certificates for a TLS-intercepting proxy, appended to the system bundle only
# while pip or the Hub download runs and never written to a layer:
#   DOCKER_BUILDKIT=1 docker build --secret id=ca,src=/path/to/proxy-ca.pem ...

# The CUDA `base` flavour is enough: the torch wheels bring their own CUDA runtime, cuDNN and NCCL (the
# nvidia-* wheels), so the image needs only the NVIDIA container runtime's conventions, not the multi-GB
# `runtime`/`devel` flavours. Ubuntu 24.04 because its python3 is 3.12; 22.04's 3.10 is too old.
# One stage per flavour; only the one CUDA_FLAVOUR names is pulled. NVIDIA_REQUIRE_CUDA replaces the base's own
# (which also admits older datacenter driver branches through CUDA's minor-version compatibility): this image
# asks for the driver its torch's CUDA version needs, the same minimum `finetune doctor` checks (entrypoint/runtime/cuda.py).
# The 13.0 and 12.6 tags are not pinned by digest yet: no registry was reachable where they were added; pin them
# with `docker buildx imagetools inspect nvidia/cuda:<tag>`.
ARG BASE_IMAGE
ARG CUDA_FLAVOUR=cu130

FROM nvidia/cuda:13.0.0-base-ubuntu24.04 AS cuda-cu130
ENV NVIDIA_REQUIRE_CUDA="cuda>=13.0" \
    FINETUNE_IMAGE_CUDA=13.0

FROM nvidia/cuda:12.8.1-base-ubuntu24.04@sha256:133c78a0575303be34164d0b90137a042172bdf60696af01a3c424ab402d86e2 AS cuda-cu128
ENV NVIDIA_REQUIRE_CUDA="cuda>=12.8" \
    FINETUNE_IMAGE_CUDA=12.8

FROM nvidia/cuda:12.6.3-base-ubuntu24.04 AS cuda-cu126
ENV NVIDIA_REQUIRE_CUDA="cuda>=12.6" \
    FINETUNE_IMAGE_CUDA=12.6

# DL3006: cuda-${CUDA_FLAVOUR} is one of the stages above, each tagged.
# hadolint ignore=DL3006
FROM cuda-${CUDA_FLAVOUR} AS cuda
# Every GPU, compute and nvidia-smi only; set on the CUDA flavours alone, so the CPU image (a Debian base) expects
# no GPU and `finetune` there trains on the CPU instead of stopping with exit 11 (DRIVER).
# Expandable segments: the caching allocator grows one mapping instead of keeping fixed blocks, so the changing
# shapes of evaluation and the last batch of an epoch fragment less. `docker run -e PYTORCH_CUDA_ALLOC_CONF=...`
# (or a pod's env) replaces it.
ENV NVIDIA_VISIBLE_DEVICES=all \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility \
    PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True

FROM ${BASE_IMAGE:-cuda} AS base
# Versions come from the base image's release (pinned by digest above), not from apt pins that would break
# on the next security update; the Python dependencies are pinned in constraints.txt.
# g++ (which brings gcc, binutils and the libc headers) and libpython3-dev (Python.h) are for torch.compile:
# inductor builds its CPU kernels with $CXX or g++, and Triton builds its GPU kernel launcher with $CC, gcc or
# clang, both against Python.h; without them `--compile on` dies at its first step (InvalidCxxCompiler). Left out
# while they install (dpkg path-exclude, dropped again at the end): what neither ever uses, the link-time
# optimizer (inductor asks for LTO only from clang), the sanitizer runtimes and the static libpython. That keeps
# the toolchain at 176 MB instead of 294 MB (measured on the CPU image).
# The CA secret matters here too: the CUDA image's NVIDIA apt source is HTTPS.
# hadolint ignore=DL3008
RUN --mount=type=secret,id=ca \
    if [ -f /run/secrets/ca ]; then \
        cat /etc/ssl/certs/ca-certificates.crt /run/secrets/ca > /tmp/ca.pem 2>/dev/null \
            || cp /run/secrets/ca /tmp/ca.pem; \
        echo 'Acquire::https::CAInfo "/tmp/ca.pem";' > /etc/apt/apt.conf.d/99build-ca; \
    fi \
    && printf 'path-exclude=%s\n' '/usr/lib*/gcc/*/*/lto1' '/usr/bin/*lto-dump*' '/usr/lib/gcc/*/*/lib*san*.a' \
        '/usr/lib/*-linux-gnu/lib*san.so*' '/usr/lib/*-linux-gnu/libpython3*.a' '/usr/lib/python3*/config-*/*.a' \
        > /etc/dpkg/dpkg.cfg.d/90-compile-toolchain \
    && apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
        ca-certificates python3 python3-venv tini g++ libpython3-dev \
    && apt-get clean \
    && rm -rf /var/lib/apt/lists/* /etc/apt/apt.conf.d/99build-ca /tmp/ca.pem \
        /etc/dpkg/dpkg.cfg.d/90-compile-toolchain \
    && if id -u 1000 >/dev/null 2>&1; then userdel --remove "$(id -nu 1000)"; fi \
    && useradd --uid 1000 --gid 0 --create-home --home-dir /home/finetune --shell /bin/bash finetune \
    && mkdir -p /data /output /cache \
    && chown 1000:0 /output /cache \
    && chmod 0775 /output /cache
# Every cache under one writable place, /tmp, so `docker run --read-only --tmpfs /tmp:exec` works for any UID
# (arbitrary-UID platforms have no home directory; HOME=/tmp catches the tools that write to ~ anyway). `exec`
# because torch.compile loads the kernels it builds (.so files) from TORCHINDUCTOR_CACHE_DIR and TRITON_CACHE_DIR,
# and Docker mounts a tmpfs noexec unless told otherwise; a Kubernetes emptyDir is exec already.
# To keep downloads between runs, mount a volume at /cache and point HF_HOME and FINETUNE_CACHE_DIR there.
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HOME=/tmp \
    XDG_CACHE_HOME=/tmp/.cache \
    HF_HOME=/tmp/.cache/huggingface \
    HF_DATASETS_CACHE=/tmp/.cache/huggingface/datasets \
    MPLCONFIGDIR=/tmp/.cache/matplotlib \
    TRITON_CACHE_DIR=/tmp/.cache/triton \
    TORCHINDUCTOR_CACHE_DIR=/tmp/.cache/torchinductor \
    TORCH_COMPILE_DEBUG_DIR=/tmp/.cache \
    FINETUNE_PRESET_DIR=/app/config

FROM base AS build
ARG PIP_FIND_LINKS PIP_INDEX_URL PIP_EXTRA_INDEX_URL PIP_NO_INDEX
ENV PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
COPY pyproject.toml constraints.txt ./
# Dependencies first, in their own layer, so a code change does not reinstall torch. The list is read from
# pyproject.toml and every version from constraints.txt (torch's nvidia-* and triton pins come from torch).
RUN --mount=type=secret,id=ca \
    --mount=type=cache,target=/root/.cache/pip \
    --mount=type=bind,source=.docker-wheels,target=/wheels \
    if [ -f /run/secrets/ca ]; then \
        cat /etc/ssl/certs/ca-certificates.crt /run/secrets/ca > /tmp/ca.pem && export PIP_CERT=/tmp/ca.pem; \
    fi \
    && python3 -m venv /opt/venv \
    && python3 -c 'import tomllib; print(*tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"], sep="\n")' \
        > /tmp/requirements.txt \
    && pip install -c constraints.txt -r /tmp/requirements.txt \
    && python3 -c 'import os, sys, torch; want = os.environ.get("FINETUNE_IMAGE_CUDA"); sys.exit(0 if not want or torch.version.cuda == want else f"torch {torch.__version__} has CUDA {torch.version.cuda}, this flavour needs {want}: pass the index with its wheels (make image sets it)")' \
    && rm -f /tmp/ca.pem /tmp/requirements.txt
# The app as a wheel, installed by the runtime stage on top of the unchanged venv: a code change then rebuilds
# a layer of kilobytes instead of copying the 1.5 GB venv again.
COPY entrypoint ./entrypoint
RUN --mount=type=secret,id=ca \
    --mount=type=cache,target=/root/.cache/pip \
    if [ -f /run/secrets/ca ]; then \
        cat /etc/ssl/certs/ca-certificates.crt /run/secrets/ca > /tmp/ca.pem && export PIP_CERT=/tmp/ca.pem; \
    fi \
    && pip wheel --no-deps --wheel-dir /dist . \
    && rm -rf /tmp/ca.pem build ./*.egg-info

FROM build AS model
ARG BAKE_MODEL=""
# The whole (allow-listed, see .dockerignore) context is mounted so BAKE_MODEL may name any folder under models/.
RUN --mount=type=secret,id=ca \
    --mount=type=bind,target=/context \
    mkdir -p /models \
    && if [ -z "$BAKE_MODEL" ]; then exit 0; fi \
    && if [ -d "/context/$BAKE_MODEL" ]; then cp -r "/context/$BAKE_MODEL" /models/baked && exit 0; fi \
    && if [ -f /run/secrets/ca ]; then \
        cat /etc/ssl/certs/ca-certificates.crt /run/secrets/ca > /tmp/ca.pem && export SSL_CERT_FILE=/tmp/ca.pem; \
    fi \
    && python3 -c 'import sys; from huggingface_hub import snapshot_download; snapshot_download(sys.argv[1], local_dir="/models/baked", allow_patterns=["*.json", "*.safetensors", "*.txt", "*.model"])' "$BAKE_MODEL" \
    && rm -rf /tmp/ca.pem /models/baked/.cache

FROM base AS dev
COPY --from=build /opt/venv /opt/venv
COPY pyproject.toml constraints.txt /workspace/
COPY entrypoint /workspace/entrypoint
WORKDIR /workspace
# The dev extra's tools, and the package editable from /workspace: the dev container mounts the repository
# there, so the installed `finetune` runs the code being edited.
RUN --mount=type=secret,id=ca \
    --mount=type=cache,target=/root/.cache/pip \
    if [ -f /run/secrets/ca ]; then \
        cat /etc/ssl/certs/ca-certificates.crt /run/secrets/ca > /tmp/ca.pem && export PIP_CERT=/tmp/ca.pem; \
    fi \
    && python3 -c 'import tomllib; print(*tomllib.load(open("pyproject.toml", "rb"))["project"]["optional-dependencies"]["dev"], sep="\n")' \
        > /tmp/requirements-dev.txt \
    && pip install -c constraints.txt -r /tmp/requirements-dev.txt \
    && pip install --no-deps -e . \
    && rm -rf /tmp/ca.pem /tmp/requirements-dev.txt \
    && chown -R 1000:0 /workspace
# A real home for the person in the dev container (the runtime's HOME=/tmp suits jobs, not editors), and the
# presets being edited rather than a copy.
ENV HOME=/home/finetune \
    FINETUNE_PRESET_DIR=/workspace/config
USER 1000:0

FROM base AS runtime
ARG BAKE_MODEL=""
COPY --from=build /opt/venv /opt/venv
RUN --mount=type=bind,from=build,source=/dist,target=/dist \
    pip install --no-cache-dir --no-index --no-deps /dist/*.whl
COPY config /app/config
COPY --from=model /models /models
# With a baked model, it is the default and the Hub is never asked; without one both stay empty (unset).
ENV FINETUNE_MODEL=${BAKE_MODEL:+/models/baked} \
    HF_HUB_OFFLINE=${BAKE_MODEL:+1}
# Mount points: /data (training text, read-only is fine), /output (model, metrics, checkpoints), /cache (optional).
WORKDIR /app
USER 1000:0
# tini is PID 1: it forwards SIGTERM to finetune, which saves a checkpoint and exits 7, and reaps zombies.
ENTRYPOINT ["tini", "--", "finetune"]
CMD ["train"]
