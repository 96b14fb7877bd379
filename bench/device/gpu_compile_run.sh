#!/usr/bin/env bash
# Second lease: the torch.compile runtime (paraplan-compile) on one GPU, with eager baselines
# of the same plans on the same machine.   OUT=DIR bash bench/device/gpu_compile_run.sh
set -u
OUT=${OUT:-out}; mkdir -p "$OUT"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/device.txt" 2>&1; cat "$OUT/device.txt"
t0=$SECONDS
timeout 330 python3 bench/gpu_fidelity.py measure -o "$OUT/gpu_fidelity_compile.json" --steps 10 \
  --only "compiled|gpt-1.3b mb8 x2, no recompute|llama-1b mb4 x2, no recompute" > "$OUT/fidelity.log" 2>&1
echo "fidelity rc $? in $((SECONDS - t0)) s"; tail -8 "$OUT/fidelity.log"
