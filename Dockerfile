# The raydarts image: the Ray head and workers of deploy/k8s/rayjob.yaml, and the MLflow server of
# deploy/k8s/mlflow.yaml (one image, so the server's MLflow is the client's).
#
#   docker build -t raydarts:0.1.0 .                                                      # torch with CUDA (PyPI)
#   docker build -t raydarts:0.1.0 --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cpu .   # CPU only
#
# PyPI's Linux torch wheels bring their CUDA libraries: on a GPU node the NVIDIA device plugin mounts the driver and
# nothing else is needed. The CPU index gives a far smaller image for CPU-only clusters.
FROM python:3.11-slim

# RAY_VERSION is the rayVersion of deploy/k8s/rayjob.yaml: KubeRay picks its health checks by it.
ARG RAY_VERSION=2.60.0
ARG TORCH_INDEX=https://pypi.org/simple

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# KubeRay runs `ray start` through bash; wget serves its probes on older Ray versions; gcc builds the search's
# native depthwise kernel on each node's CPU at first use (nas/kernels.py).
RUN apt-get update \
    && apt-get install -y --no-install-recommends bash wget gcc libc6-dev \
    && rm -rf /var/lib/apt/lists/*

# The user KubeRay's examples run as (uid 1000), with a home for ~/.ray and the data cache.
RUN useradd --create-home --uid 1000 ray
WORKDIR /app

# The heavy dependencies first (torch, Ray: a code change does not download them again), then the project the
# README's way, `pip install -e .`, with the rest of its dependencies (and kfp, for the Kubeflow steps).
# psycopg2-binary and boto3 are the MLflow server's: its Postgres database and its S3-compatible artifact store.
COPY setup.cfg pyproject.toml README.md ./
RUN pip install --index-url "${TORCH_INDEX}" "torch>=2.4,<=2.14.1" "torchvision>=0.19,<=0.29.1" \
    && pip install "ray[default,train,tune]==${RAY_VERSION}" psycopg2-binary boto3
COPY nas ./nas
COPY components ./components
COPY pipelines ./pipelines
RUN pip install -e ".[kubeflow]" "ray[default,train,tune]==${RAY_VERSION}" \
    && chown -R ray:ray /app

USER ray
ENV HOME=/home/ray
