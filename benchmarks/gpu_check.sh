#!/usr/bin/env bash
# The one prepared run for a lent GPU machine (no mlflow there, packages of its own image), about 9
# minutes at most: each step has a time cap, most telling first after the kernel tests, and whatever a
# capped step measured is kept (the kernel benchmark rewrites gpu.json / gpu.md after every row).
# Everything lands in $OUT (gpu-tests.log, gpu.json, gpu.md, gpu-bench.log, metanet.md/.json with the GPU
# predict time); copy gpu.md, gpu.json, metanet.md and metanet.json to benchmarks/results/. From the
# repository root, with run's timeout_s ≈ 580:
#   OUT=/tmp/out bash benchmarks/gpu_check.sh
set -o pipefail
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
OUT=${OUT:?set OUT to the folder the results go to}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu-tests.log"
timeout 120 python3 -m pytest -q -p no:cacheprovider tests/test_kernels.py 2>&1 | tee -a "$OUT/gpu-tests.log" | tail -15
# --tune, the first shape, --e2e, the other shapes (benchmarks/moe_kernels.py, "Order")
timeout 360 python3 -m benchmarks.moe_kernels --paths --e2e --tune --out "$OUT" 2>&1 | tee "$OUT/gpu-bench.log" | tail -40
timeout 40 python3 -m pytest -q -p no:cacheprovider tests/test_model.py tests/test_partition.py -k gpu 2>&1 | tee -a "$OUT/gpu-tests.log" | tail -5
timeout 40 python3 benchmarks/metanetwork.py --only-predict-time --device cuda 2>&1 | tail -2 | tee -a "$OUT/gpu-tests.log"
cp benchmarks/results/metanet.md benchmarks/results/metanet.json "$OUT/"
