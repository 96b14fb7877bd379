"""Where a training step of the built-in model spends its device time, by kernel family.

    python bench/device/kernel_breakdown.py -o breakdown.json      (on a GPU; CPU works for a smoke test)

One step (forward, backward, AdamW as `paraplan run` does it on one process: bf16 autocast,
fp32 weights, foreach off) of the 1.3B GPT and the 1B Llama of bench/gpu_fidelity.py (`--moe`: its
Qwen3-30B-A3B-layered MoE instead) under
torch.profiler; device kernel time summed per family (GEMM, attention, memory-bound
elementwise/norm/softmax, optimizer, other) and the kernel count. It tells the training-runtime
profile how much an eager runtime spends outside GEMMs and attention.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from costmodel.spec import ModelSpec  # noqa: E402
from gpu_fidelity import GPT, LLAMA, QWEN3_MOE  # noqa: E402
from planner.zoo.model import build_model  # noqa: E402

FAMILIES = (("attention", ("flash", "fmha", "attention", "sdpa", "cudnn")),
            ("gemm", ("gemm", "sm90_xmma", "cutlass", "cublas", "ampere_", "sm80_", "nvjet", "addmm", "aten::mm", "bmm")),
            ("optimizer", ("adam", "foreach", "multi_tensor")),
            ("memory-bound", ("elementwise", "vectorized", "reduce", "norm", "softmax", "gelu", "silu", "copy",
                              "cat", "index", "embedding", "nll", "log_softmax", "fill", "where", "mul", "add")))


def family(name: str) -> str:
    low = name.lower()
    return next((fam for fam, keys in FAMILIES if any(k in low for k in keys)), "other")


def breakdown(model_kw: dict, batch: int, device: str) -> dict:
    spec = ModelSpec(**model_kw)
    model = build_model(spec)
    model.to_empty(device=device)
    model.init_weights(0)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, foreach=False)
    x = torch.randint(0, spec.vocab, (batch, spec.seq_len), device=device)

    def step() -> None:
        with torch.autocast(device, dtype=torch.bfloat16):
            logits = model(x)
        F.cross_entropy(logits.flatten(0, 1).float(), x.flatten(0, 1)).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(2):
        step()
    acts = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if device == "cuda" else [])
    with torch.profiler.profile(activities=acts) as prof:
        step()
        if device == "cuda":
            torch.cuda.synchronize()
    out: dict[str, list[float]] = {}
    for e in prof.key_averages():
        us = getattr(e, "device_time_total", 0.0) if device == "cuda" else e.self_cpu_time_total
        if device == "cuda" and e.device_type != torch.autograd.DeviceType.CUDA:
            continue
        if us <= 0:
            continue
        fam = out.setdefault(family(e.key), [0.0, 0])
        fam[0] += us * 1e-3
        fam[1] += e.count
    total = sum(v[0] for v in out.values())
    return {"model": spec.name, "batch": batch, "seq": spec.seq_len, "total_ms": round(total, 3),
            "families_ms_count": {k: [round(v[0], 3), int(v[1])] for k, v in sorted(out.items())}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-o", "--output", required=True)
    ap.add_argument("--small", action="store_true", help="2 layers, short sequences (a smoke test)")
    ap.add_argument("--moe", action="store_true", help="the mixture of experts of bench/gpu_fidelity.py instead")
    args = ap.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    runs = [(QWEN3_MOE, 4)] if args.moe else [(GPT, 8), (LLAMA, 4)]
    if args.small:
        runs = [({**m, "layers": 2, "seq_len": 128, "hidden": 256, "heads": 4, "vocab": 512,
                  **({"kv_heads": 2, "ffn_hidden": 1024} if "kv_heads" in m else {}),
                  **({"experts": 8, "experts_per_token": 2, "expert_ffn_hidden": 64, "head_dim": 64} if "experts" in m
                     else {})}, 2) for m, _ in runs]
    result = {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu", "torch": torch.__version__,
              "runs": [breakdown(m, b, device) for m, b in runs]}
    Path(args.output).write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
