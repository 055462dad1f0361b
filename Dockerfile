# One image for web, worker, beat and the simulated agents.
FROM python:3.11-slim-bookworm

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /app

RUN apt-get update && apt-get install -y --no-install-recommends openssh-client && rm -rf /var/lib/apt/lists/*

COPY pyproject.toml README.md ./
COPY core ./core
COPY config ./config
COPY fleet ./fleet
COPY models_registry ./models_registry
COPY training ./training
COPY frontend ./frontend
COPY devices_agent ./devices_agent
COPY benchmarks ./benchmarks
COPY manage.py ./
# Set PIP_EXTRA_INDEX_URL (build arg) to an index with CPU builds of torch: the default
# build of torch==2.13.0 on Linux is a multi-GB CUDA build that edge servers do not need.
ARG PIP_EXTRA_INDEX_URL=""
RUN pip install --no-cache-dir -e . \
    && python manage.py collectstatic --noinput --settings=config.settings.demo
# The builder of ONNX Runtime training artifacts, a virtualenv of its own at the pins of
# pyproject.toml: its onnxruntime build must never replace the server's.
RUN PIP_NO_CACHE_DIR=1 python -m models_registry.ml.ort_env /opt/ort-builder
ENV ORT_BUILDER_PYTHON=/opt/ort-builder/bin/python

# /tls: the server certificate (a volume shared with the proxy; see python -m config.tls).
RUN useradd --create-home flotilla && mkdir -p /data /tls && chown flotilla /data /tls
USER flotilla
ENV FLOTILLA_DATA_DIR=/data ARTIFACT_ROOT=/data/artifacts STATIC_ROOT=/app/var/static
EXPOSE 8000
CMD ["python", "-m", "uvicorn", "config.asgi:application", "--host", "0.0.0.0", "--port", "8000", "--workers", "2", "--loop", "uvloop", "--http", "httptools", "--no-access-log"]
