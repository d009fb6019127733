#!/usr/bin/env bash
# Everything that needs a CUDA GPU, as one script (CI has no GPU; run it on a GPU machine):
#   1. the training throughput benchmark on a LLaMA-7B shape (bench/train_throughput.py):
#      reference vs ours, ours with the chunked loss, an fp32 residual stream, under FSDP2,
#      compiled;
#   2. the GPU tests (pytest -m gpu): the pretrain stage in bf16 and under FSDP with resume,
#      DeepSpeed ZeRO-2/3 configs, CUDA perplexity = CPU;
#   3. reference vs ours with gradient checkpointing.
# Logs and JSON go to $OUT (default bench/out). Each part has its own time limit, so one that
# hangs cannot eat the others' time. Needs the project installed with a CUDA torch (deepspeed
# and accelerate for the ZeRO tests, which skip without them).
set -u
OUT=${OUT:-bench/out}
PY=${PYTHON:-python3}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
cd "$(dirname "$0")/.."

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
$PY -c "import torch, transformers, peft; print(torch.__version__, transformers.__version__, peft.__version__)" \
    | tee -a "$OUT/gpu.txt"

$PY bench/train_throughput.py --steps 12 --warmup 4 --timeout 120 --total-timeout 330 \
    --variants reference,ours,ours-chunked-ce,ours-fp32-residual,ours-fsdp,ours-compile \
    --json "$OUT/throughput.json" 2>&1 | tee "$OUT/throughput.log"
timeout 240 $PY -m pytest -q -rs -m gpu -p no:cacheprovider \
    tests/test_training_gpu.py tests/test_deepspeed_gpu.py tests/test_evaluate.py 2>&1 \
    | tee "$OUT/pytest_gpu.log"
$PY bench/train_throughput.py --steps 12 --warmup 4 --timeout 60 --total-timeout 120 \
    --gradient-checkpointing --variants reference,ours,ours-chunked-ce \
    --json "$OUT/throughput_gc.json" 2>&1 | tee "$OUT/throughput_gc.log"
