#!/usr/bin/env bash
# The one prepared run for a lent GPU machine (no mlflow there, packages of its own image):
# the kernel and GPU-predict tests on CUDA, the metanetwork's predict time on the GPU, then the kernel
# benchmark with every part. Everything lands in $OUT (gpu-tests.log, metanet.md/.json with the GPU
# predict time, gpu.json, gpu.md, gpu-bench.log); copy gpu.md, gpu.json, metanet.md and metanet.json to
# benchmarks/results/. About 6-9 minutes on an H100/H200; run from the repository root:
#   OUT=/tmp/out bash benchmarks/gpu_check.sh
set -o pipefail
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
OUT=${OUT:?set OUT to the folder the results go to}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu-tests.log"
python3 -m pytest -q -p no:cacheprovider tests/test_kernels.py 2>&1 | tee -a "$OUT/gpu-tests.log" | tail -15
python3 -m pytest -q -p no:cacheprovider tests/test_model.py tests/test_partition.py -k gpu 2>&1 | tee -a "$OUT/gpu-tests.log" | tail -5
python3 benchmarks/metanetwork.py --only-predict-time --device cuda 2>&1 | tail -2 | tee -a "$OUT/gpu-tests.log"
cp benchmarks/results/metanet.md benchmarks/results/metanet.json "$OUT/"
python3 -m benchmarks.moe_kernels --paths --e2e --tune --out "$OUT" 2>&1 | tee "$OUT/gpu-bench.log" | tail -40
