#!/usr/bin/env bash
# The GPU measurements of one lease (about 5 minutes, each part time-boxed): a measured
# hardware profile (`paraplan profile --device cuda`), the single-GPU fidelity runs
# (bench/gpu_fidelity.py measure) and a kernel-family breakdown of one eager step.
# Run from the repository root on a machine with one NVIDIA GPU:   OUT=DIR bash bench/device/gpu_run.sh
# Writes under $OUT whatever finished.
set -u
OUT=${OUT:-out}; mkdir -p "$OUT"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
{ nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
  python3 -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name())"; } > "$OUT/device.txt" 2>&1
cat "$OUT/device.txt"
t0=$SECONDS
timeout 150 python3 -m cli profile --device cuda -o "$OUT/gpu-measured.yaml" > "$OUT/profile.log" 2>&1
echo "profile rc $? in $((SECONDS - t0)) s"; tail -3 "$OUT/profile.log"
t0=$SECONDS
timeout 270 python3 bench/gpu_fidelity.py measure -o "$OUT/gpu_fidelity.json" --steps 10 > "$OUT/fidelity.log" 2>&1
echo "fidelity rc $? in $((SECONDS - t0)) s"; tail -8 "$OUT/fidelity.log"
t0=$SECONDS
timeout 90 python3 bench/device/kernel_breakdown.py -o "$OUT/kernel_breakdown.json" > "$OUT/breakdown.log" 2>&1
echo "breakdown rc $? in $((SECONDS - t0)) s"; tail -3 "$OUT/breakdown.log"
ls -la "$OUT"
