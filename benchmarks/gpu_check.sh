#!/usr/bin/env bash
# The one prepared run for a lent GPU machine (no mlflow there, packages of its own image):
# the kernel tests on CUDA, then the kernel benchmark with every part. Everything lands in $OUT
# (gpu-tests.log, gpu.json, gpu.md, gpu-bench.log); copy gpu.md and gpu.json to benchmarks/results/.
# About 5-8 minutes on an H100/H200; run from the repository root:  OUT=/tmp/out bash benchmarks/gpu_check.sh
set -o pipefail
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
OUT=${OUT:?set OUT to the folder the results go to}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu-tests.log"
python3 -m pytest -q -p no:cacheprovider tests/test_kernels.py 2>&1 | tee -a "$OUT/gpu-tests.log" | tail -15
python3 -m benchmarks.moe_kernels --paths --e2e --tune --out "$OUT" 2>&1 | tee "$OUT/gpu-bench.log" | tail -40
