# Slim CPU image: the Prefect CPU worker and the CPU stages (download, convert, vocab, merge,
# quantize) with llama-cpp-python built for CPU. Build from the repo root:
#   docker build -f infra/docker/worker.Dockerfile -t llamaflow-worker .
FROM python:3.11.11-slim-bookworm AS build

# llama-cpp-python compiles llama.cpp (a few minutes); git lets setuptools see the project.
RUN apt-get update \
    && apt-get install -y --no-install-recommends build-essential cmake git \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /src
COPY pyproject.toml README.md ./
COPY steps ./steps
COPY pipelines ./pipelines
RUN python -m venv /opt/venv \
    && /opt/venv/bin/pip install --no-cache-dir "torch==2.13.0" --index-url https://download.pytorch.org/whl/cpu \
    && /opt/venv/bin/pip install --no-cache-dir ".[llamacpp,serve]"

FROM python:3.11.11-slim-bookworm
COPY --from=build /opt/venv /opt/venv
COPY conf /app/conf
ENV PATH=/opt/venv/bin:$PATH \
    LLAMAFLOW_CONF_DIR=/app/conf \
    PREFECT_SERVER_ANALYTICS_ENABLED=false \
    PYTHONUNBUFFERED=1
RUN useradd --create-home --uid 1000 llamaflow && mkdir -p /workspace && chown llamaflow /workspace
USER 1000
WORKDIR /workspace
CMD ["prefect", "worker", "start", "--pool", "cpu", "--type", "process"]
