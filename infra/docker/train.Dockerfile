# CUDA training image: the GPU worker and the GPU stages (pretrain, sft, evaluate), with
# CUDA torch, llama-cpp-python built with CUDA, and a pinned llama.cpp for its reference tools
# (llama-quantize, llama-perplexity; `convert_hf_to_gguf.py` from the same checkout).
# Build from the repo root:
#   docker build -f infra/docker/train.Dockerfile -t llamaflow-train .
ARG CUDA_VERSION=12.8.1
ARG LLAMA_CPP_REF=b6643

FROM nvidia/cuda:${CUDA_VERSION}-devel-ubuntu24.04 AS llamacpp
ARG LLAMA_CPP_REF
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates cmake git build-essential \
    && rm -rf /var/lib/apt/lists/*
# A release tag, never a branch: the perplexity reference numbers depend on the exact build.
RUN git clone --depth 1 --branch "${LLAMA_CPP_REF}" https://github.com/ggml-org/llama.cpp /llama.cpp
WORKDIR /llama.cpp
# sm_80 (A100), sm_86 (A10/3090), sm_89 (L4/4090), sm_90 (H100/H200).
RUN cmake -B build -DGGML_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES="80;86;89;90" -DLLAMA_CURL=OFF \
        -DCMAKE_BUILD_TYPE=Release \
    && cmake --build build -j"$(nproc)" --target llama-quantize llama-perplexity \
    && mkdir -p /out/bin /out/lib \
    && cp build/bin/llama-quantize build/bin/llama-perplexity /out/bin/ \
    && find build -name "*.so*" -exec cp -P {} /out/lib/ \; \
    && cp convert_hf_to_gguf.py /out/bin/

FROM nvidia/cuda:${CUDA_VERSION}-devel-ubuntu24.04 AS project
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv python3-dev git cmake build-essential \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY pyproject.toml README.md ./
COPY steps ./steps
COPY pipelines ./pipelines
# torch first (the CUDA 12.8 wheel index), then the project; llama-cpp-python built for CUDA.
RUN python3 -m venv /opt/venv \
    && /opt/venv/bin/pip install --no-cache-dir "torch==2.13.0" --index-url https://download.pytorch.org/whl/cu128 \
    && CMAKE_ARGS="-DGGML_CUDA=on -DCMAKE_CUDA_ARCHITECTURES=80;86;89;90" \
       /opt/venv/bin/pip install --no-cache-dir ".[llamacpp,serve]" nvidia-ml-py==13.580.82

FROM nvidia/cuda:${CUDA_VERSION}-runtime-ubuntu24.04
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 libgomp1 \
    && rm -rf /var/lib/apt/lists/*
COPY --from=project /opt/venv /opt/venv
COPY --from=llamacpp /out/bin/ /usr/local/bin/
COPY --from=llamacpp /out/lib/ /usr/local/lib/
COPY conf /app/conf
RUN ldconfig
ENV PATH=/opt/venv/bin:$PATH \
    LLAMAFLOW_CONF_DIR=/app/conf \
    PREFECT_SERVER_ANALYTICS_ENABLED=false \
    PYTHONUNBUFFERED=1
RUN useradd --create-home --uid 1001 llamaflow && mkdir -p /workspace && chown llamaflow /workspace
USER 1001
WORKDIR /workspace
CMD ["prefect", "worker", "start", "--pool", "gpu", "--type", "process"]
