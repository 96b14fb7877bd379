#!/usr/bin/env bash
# One lease's MoE measurement (about 2 minutes): paraplan's MoE layer forward + backward on one
# GPU for the busiest rank of published expert-parallel layouts, and the expert GEMMs four ways.
# Run from the repository root on a machine with one NVIDIA GPU:   OUT=DIR bash bench/device/moe_run.sh
set -u
OUT=${OUT:-out}; mkdir -p "$OUT"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
{ nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
  python3 -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name())"; } > "$OUT/device.txt" 2>&1
cat "$OUT/device.txt"
t0=$SECONDS
timeout 360 python3 bench/device/moe_layer.py -o "$OUT/moe_layer.json" ${MOE_ARGS:-} > "$OUT/moe_layer.log" 2>&1
echo "moe_layer rc $? in $((SECONDS - t0)) s"; tail -25 "$OUT/moe_layer.log"
ls -la "$OUT"
