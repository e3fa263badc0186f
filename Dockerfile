# CPU image by default; a CUDA image with:
#   docker build --build-arg BASE=nvidia/cuda:12.8.0-runtime-ubuntu24.04 --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu128 .
ARG BASE=python:3.11-slim
FROM ${BASE}

ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 \
    MOESERVE_CACHE=/home/moeserve/.cache/moeserve

# The package versions differ between the CPU and CUDA bases, so they are not pinned here.
# gcc: moeserve compiles its native CPU kernels for the serving CPU at first start (kernels/native.py).
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-pip python3-venv curl gcc libc6-dev \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --create-home --uid 1000 moeserve

WORKDIR /opt/moeserve
COPY pyproject.toml constraints.txt README.md ./
COPY moeserve ./moeserve
COPY configs ./configs
# torch first, from the pinned version and the chosen index: a plain resolve would pick another build.
RUN python3 -m venv /opt/venv \
    && /opt/venv/bin/pip install --index-url ${TORCH_INDEX} "$(grep '^torch==' constraints.txt)" \
    && /opt/venv/bin/pip install -c constraints.txt .
ENV PATH=/opt/venv/bin:$PATH

USER 1000
EXPOSE 8000
HEALTHCHECK --interval=30s --timeout=5s --start-period=120s --retries=3 \
    CMD ["curl", "-fsS", "http://127.0.0.1:8000/health"]
ENTRYPOINT ["moeserve", "serve", "--host", "0.0.0.0", "--port", "8000"]
