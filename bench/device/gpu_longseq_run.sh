#!/usr/bin/env bash
# Third lease: two attention-heavy single-GPU plans (seq 8192) and the GPU-only test.
#   OUT=DIR bash bench/device/gpu_longseq_run.sh
set -u
OUT=${OUT:-out}; mkdir -p "$OUT"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
timeout 60 python3 -m pytest -q -p no:cacheprovider tests/test_runtime_profiles.py -k profile_on_cuda 2>&1 | tail -3
timeout 200 python3 bench/gpu_fidelity.py measure -o "$OUT/gpu_fidelity_longseq.json" --steps 8 --only "seq 8192" \
  > "$OUT/fidelity.log" 2>&1
echo "fidelity rc $?"; tail -4 "$OUT/fidelity.log"
