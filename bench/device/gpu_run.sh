#!/usr/bin/env bash
# The GPU measurements of one lease (about 5 minutes, each part time-boxed): a measured
# hardware profile (`paraplan profile --device cuda`), the single-GPU fidelity runs
# (bench/gpu_fidelity.py measure), a kernel-family breakdown of one eager step and one MoE
# layer measured (bench/device/moe_layer.py).
# Run from the repository root on a machine with one NVIDIA GPU:   OUT=DIR bash bench/device/gpu_run.sh
# PARTS picks the parts (default "profile fidelity breakdown moe"); MOE_ARGS and FIDELITY_ARGS
# pass options on (FIDELITY_ARGS="--only qwen3" runs the MoE plans only). `paraplan run` checks
# plans with the planner, which imports pulp: carry its wheel where the machine lacks it.
# Writes under $OUT whatever finished.
set -u
OUT=${OUT:-out}; mkdir -p "$OUT"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
{ nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
  python3 -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name())"; } > "$OUT/device.txt" 2>&1
cat "$OUT/device.txt"
PARTS=${PARTS:-profile fidelity breakdown moe}
part() { [[ " $PARTS " == *" $1 "* ]]; }
if part profile; then
t0=$SECONDS
timeout 150 python3 -m cli profile --device cuda -o "$OUT/gpu-measured.yaml" > "$OUT/profile.log" 2>&1
echo "profile rc $? in $((SECONDS - t0)) s"; tail -3 "$OUT/profile.log"
fi
if part fidelity; then
t0=$SECONDS
timeout 270 python3 bench/gpu_fidelity.py measure -o "$OUT/gpu_fidelity.json" --steps 10 ${FIDELITY_ARGS:-} \
  > "$OUT/fidelity.log" 2>&1
echo "fidelity rc $? in $((SECONDS - t0)) s"; tail -8 "$OUT/fidelity.log"
fi
if part breakdown; then
t0=$SECONDS
timeout 90 python3 bench/device/kernel_breakdown.py -o "$OUT/kernel_breakdown.json" > "$OUT/breakdown.log" 2>&1
echo "breakdown rc $? in $((SECONDS - t0)) s"; tail -3 "$OUT/breakdown.log"
fi
if part moe; then
t0=$SECONDS
timeout 360 python3 bench/device/moe_layer.py -o "$OUT/moe_layer.json" ${MOE_ARGS:-} > "$OUT/moe_layer.log" 2>&1
echo "moe_layer rc $? in $((SECONDS - t0)) s"; grep -v '^{' "$OUT/moe_layer.log" | tail -5
fi
ls -la "$OUT"
