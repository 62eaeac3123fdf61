# syntax=docker/dockerfile:1
# Two targets:
#   api    - FastAPI server + CPU-only torch wheels (no CUDA), also runs the cpu queue
#   worker - Celery worker with CUDA torch wheels and faiss (gpu / train queues)
# Build: docker build --target api -t otcclip-api .   |   docker build --target worker -t otcclip-worker .

ARG PYTHON_VERSION=3.11

FROM python:${PYTHON_VERSION}-slim AS base
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 \
    HF_HUB_OFFLINE=1 OTCCLIP_DATA_DIR=/data OTCCLIP_STORAGE_DIR=/data/storage
RUN useradd --create-home --uid 1000 otcclip && mkdir -p /data/storage && chown -R otcclip /data
WORKDIR /app
COPY pyproject.toml README.md* ./
COPY otcclip ./otcclip

FROM base AS api
# CPU wheels only: the API validates manifests (pyarrow, PIL) but never needs CUDA.
RUN pip install --index-url https://download.pytorch.org/whl/cpu "torch==2.14.1" "torchvision==0.29.1" \
 && pip install ".[cpu]"
USER otcclip
EXPOSE 8000
HEALTHCHECK --interval=15s --timeout=5s --retries=5 \
  CMD python -c "import urllib.request,sys; sys.exit(urllib.request.urlopen('http://127.0.0.1:8000/healthz').status != 200)"
CMD ["otcclip", "serve", "--host", "0.0.0.0", "--port", "8000", "--no-worker"]

FROM base AS worker
# Default PyPI torch wheels bundle CUDA; faiss-gpu for the shortlist.
RUN pip install ".[gpu]" || pip install ".[cpu]"
USER otcclip
CMD ["otcclip", "worker", "--queues", "gpu", "--concurrency", "1"]
