# syntax=docker/dockerfile:1
# Two targets, both installed from the lock (requirements/lock-cpu.txt as pip constraints,
# so every package, direct or transitive, gets the version the tests ran with; `pip check`
# fails the build on any inconsistency):
#   api    - the FastAPI server and the cpu queue: CPU-only torch wheels (2.14.1+cpu from
#            PyTorch's CPU index satisfies the lock's torch==2.14.1), no CUDA at all.
#   worker - the gpu and train queues: PyPI's torch 2.14.1 wheel with its CUDA 13 runtime
#            wheels (the nvidia-*-cu13 pins of the lock).
# One CUDA stack: torch's. FAISS is faiss-cpu in both images: PyPI's faiss-gpu 1.15.1 is
# built against CUDA 12 and would load a second CUDA runtime beside torch's CUDA 13 in the
# same process. The FAISS shortlist is a small share of a sanitize job (the OT solver and
# the encoders run on the GPU through torch). The host needs an NVIDIA driver for CUDA 13.
# Build: docker build --target api -t otcclip-api .   |   docker build --target worker -t otcclip-worker .

ARG PYTHON_VERSION=3.11

FROM python:${PYTHON_VERSION}-slim AS base
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 \
    OTCCLIP_DATA_DIR=/data OTCCLIP_STORAGE_DIR=/data/storage
RUN useradd --create-home --uid 1000 otcclip && mkdir -p /data/storage && chown -R 1000:1000 /data
# torch needs setuptools at run time; `pip freeze` leaves it out of the lock, so its
# version (the one the lock's venv resolved) is pinned here.
RUN pip install --no-cache-dir setuptools==84.2.1
WORKDIR /app
COPY requirements/lock-cpu.txt requirements/lock-cpu.txt
COPY pyproject.toml README.md ./
COPY otcclip ./otcclip

FROM base AS api
# CPU wheels only: the API validates manifests (pyarrow, PIL) but never needs CUDA. torch
# and torchvision alone come from PyTorch's CPU index (versions from the lock); their
# dependencies come from PyPI, pinned, with the package in the second step.
RUN pip install --no-cache-dir --no-deps --constraint requirements/lock-cpu.txt \
        --index-url https://download.pytorch.org/whl/cpu torch torchvision \
 && pip install --no-cache-dir --constraint requirements/lock-cpu.txt ".[cpu]" \
 && pip check
USER 1000:1000
EXPOSE 8000
HEALTHCHECK --interval=15s --timeout=5s --retries=5 \
  CMD ["python", "-c", "import sys, urllib.request; sys.exit(urllib.request.urlopen('http://127.0.0.1:8000/healthz').status != 200)"]
CMD ["otcclip", "serve", "--host", "0.0.0.0", "--port", "8000", "--no-worker"]

FROM base AS worker
# torch from PyPI with its CUDA 13 runtime wheels, all pinned by the lock.
RUN pip install --no-cache-dir --constraint requirements/lock-cpu.txt ".[cpu]" \
 && pip check
USER 1000:1000
# Ask the worker itself (Celery remote control over the broker): it answers only while its
# consumer is connected. The worker is started with the node name celery@<hostname>.
HEALTHCHECK --interval=30s --timeout=20s --start-period=60s --retries=3 \
  CMD ["sh", "-c", "celery -A otcclip.workers.celery_app inspect ping --timeout 10 -d \"celery@$HOSTNAME\""]
CMD ["otcclip", "worker", "--queues", "gpu", "--concurrency", "1", "--name", "celery@%h"]
