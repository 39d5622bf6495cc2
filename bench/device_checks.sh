#!/usr/bin/env bash
# Every GPU check in one device call (the device tool's machine: torch + triton + transformers, no Ray, no network):
# the kernel and CUDA-graph tests on CUDA, then bench/gpu_check.py. Results under $OUT (default ./device_out).
#   bash bench/device_checks.sh        # ~5 minutes on an H200 (2026-12-04); at most tests 3 + gpu_check 7 + profile 2.5
set -uo pipefail
OUT=${OUT:-device_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/gpu.txt" 2>&1
python -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" >> "$OUT/gpu.txt" 2>&1
cat "$OUT/gpu.txt"
# -o addopts='': the gpu-marked tests too; every other test in these files also runs on CUDA where it can.
timeout 180 python -m pytest -q -o addopts='' -p no:cacheprovider -x \
    tests/model/test_mxfp4_kernel.py tests/model/test_packed_experts.py tests/model/test_decode_attention.py \
    tests/model/test_prefill_attention.py \
    tests/engine/test_decode_graphs.py > "$OUT/gpu_tests.log" 2>&1
echo "gpu tests: exit $?"; tail -15 "$OUT/gpu_tests.log"
timeout 420 python bench/gpu_check.py --out "$OUT/gpu_check.json" > "$OUT/gpu_check.log" 2>&1
echo "gpu_check: exit $?"; tail -c 6000 "$OUT/gpu_check.log"
timeout 150 python bench/decode_profile.py --batch 1 > "$OUT/decode_profile.json" 2> "$OUT/decode_profile.log"
echo "decode_profile: exit $?"; cat "$OUT/decode_profile.json"; tail -5 "$OUT/decode_profile.log"
