"""One mixture-of-experts layer on one GPU: paraplan's own MoE module, measured.

    python3 bench/device/moe_layer.py -o moe_layer.json [--device cuda] [--quick]

Each case is the busiest rank of a published expert-parallel layout under balanced routing:
experts/ep local experts, each token's k copies (the t k copies a rank receives), the expert
FFN of the model (Qwen3-30B-A3B, Qwen3-235B-A22B, DeepSeek-V3 with its shared expert,
Mixtral-8x7B). No all-to-all (one GPU): this measures what the cost model's `moe_cost` prices
beside the all-to-alls: the router, the permutation, the per-expert GEMMs and their
activation, forward and backward, in bf16.

Per case and token count it records:
  wall_s          forward + backward, synchronized, mean of timed iterations
  gpu_s           the summed duration of the GPU kernels of one iteration (torch.profiler)
  gemm_gpu_s      the part of gpu_s in GEMM kernels
  kernels         GPU kernels launched per iteration
  max_over_mean   the busiest local expert's copies over the mean (the router is random)
and, unless --no-gemms, the forward time of the same expert GEMMs four ways (`grouped`).
wall_s - gpu_s is the time the GPU waits for the host: the module's per-expert loop and its
`.tolist()` synchronization of the counts (as Megatron-Core's all-to-all dispatcher has one).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

import planner.zoo.model as zoo_model  # noqa: E402
from planner.zoo import ZOO  # noqa: E402
from planner.zoo.model import MoE  # noqa: E402

# (name, zoo model, ep of the published layout): local experts = experts / ep
CASES = [
    ("qwen3-30b-a3b/ep8", "qwen3-30b-a3b", 8),
    ("qwen3-235b-a22b/ep8", "qwen3-235b-a22b", 8),
    ("deepseek-v3/ep8", "deepseek-v3", 8),
    ("deepseek-v3/ep32", "deepseek-v3", 32),
    ("mixtral-8x7b/ep1", "mixtral-8x7b", 1),
]
TOKENS = (64, 2048, 4096, 8192, 16384)
GEMM_MARKS = ("gemm", "sm90", "sm80", "cutlass", "nvjet", "matmul", "ampere", "hopper")


def case_spec(model: str, ep: int):
    """The busiest rank's MoE: experts/ep experts, top-k as the model routes (each of the ep
    ranks sends t k / ep copies to it under balanced routing: t k in all)."""
    spec = ZOO[model]
    local = spec.experts // ep
    return dataclasses.replace(spec, experts=local, experts_per_token=min(spec.experts_per_token, local), layers=1,
                               dense_layers=0)


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def step(layer, x, grad) -> None:
    y = layer(x)
    y.backward(grad)


def gpu_kernels(layer, x, grad, device: str) -> tuple[float, float, int]:
    """(all kernels' seconds, GEMM kernels' seconds, kernels) of one forward + backward."""
    from torch.profiler import ProfilerActivity, profile
    if device != "cuda":
        return 0.0, 0.0, 0
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        step(layer, x, grad)
        sync(device)
    total = gemm = 0.0
    count = 0
    for e in prof.events():
        if e.device_type != torch.autograd.DeviceType.CUDA:
            continue
        us = e.device_time
        total += us
        count += 1
        if any(m in e.name.lower() for m in GEMM_MARKS):
            gemm += us
    return total * 1e-6, gemm * 1e-6, count


def measure_case(name: str, model: str, ep: int, tokens, device: str, iters: int, path: str) -> list[dict]:
    """`path`: the experts as the module runs them on this device ("auto"), or forced to a loop of
    one GEMM per expert ("loop")."""
    if path == "loop":
        zoo_model.grouped_mm_applies = lambda *args: False
    spec = case_spec(model, ep)
    torch.manual_seed(0)
    layer = MoE(spec).to(device=device, dtype=torch.bfloat16)
    for p in layer.parameters():
        torch.nn.init.normal_(p, std=0.02)
    rows = []
    for t in tokens:
        x = torch.randn(1, t, spec.hidden, device=device, dtype=torch.bfloat16, requires_grad=True)
        grad = torch.randn_like(x)
        with torch.no_grad():
            chosen = layer.router(x.reshape(-1, spec.hidden)).float().topk(spec.experts_per_token, dim=-1).indices
            counts = torch.bincount(chosen.reshape(-1), minlength=spec.experts).float()
        for _ in range(2):
            step(layer, x, grad)
        sync(device)
        t0 = time.perf_counter()
        for _ in range(iters):
            step(layer, x, grad)
        sync(device)
        wall = (time.perf_counter() - t0) / iters
        gpu, gemm, kernels = gpu_kernels(layer, x, grad, device)
        row = dict(case=name, path=path, model=model, ep=ep, tokens=t, hidden=spec.hidden, local_experts=spec.experts,
                   top_k=spec.experts_per_token, expert_ffn_hidden=spec.expert_ffn_hidden,
                   shared_ffn_hidden=spec.shared_expert_ffn_hidden, wall_s=wall, gpu_s=gpu, gemm_gpu_s=gemm,
                   kernels=kernels, max_over_mean=float(counts.max() / counts.mean()))
        print(json.dumps(row), flush=True)
        rows.append(row)
        layer.zero_grad(set_to_none=True)
        del x, grad
    del layer
    if device == "cuda":
        torch.cuda.empty_cache()
    zoo_model.grouped_mm_applies = GROUPED_MM_APPLIES
    return rows


GROUPED_MM_APPLIES = zoo_model.grouped_mm_applies


def paths_agree(device: str) -> dict:
    """The grouped-GEMM path against the loop on this device: forward and gradients of one
    Qwen3-30B-A3B-shaped layer with uneven (unaligned) expert counts, bf16; max |difference|
    over max |value|."""
    spec = case_spec("qwen3-30b-a3b", 8)
    torch.manual_seed(0)
    experts = zoo_model.GroupedExperts(spec).to(device=device, dtype=torch.bfloat16)
    for p in experts.parameters():
        torch.nn.init.normal_(p, std=0.02)
    counts = [(37 * i) % 301 for i in range(spec.experts)]  # 0 .. 300 rows, some 0, none aligned
    x = torch.randn(sum(counts), spec.hidden, device=device, dtype=torch.bfloat16)
    grad = torch.randn_like(x)
    outs = {}
    for path, applies in (("loop", lambda *args: False), ("auto", GROUPED_MM_APPLIES)):
        zoo_model.grouped_mm_applies = applies
        xi = x.clone().requires_grad_(True)
        experts.zero_grad(set_to_none=True)
        try:
            out = experts(xi, counts)
            out.backward(grad)
            outs[path] = [t.detach().float() for t in (out, xi.grad, experts.w1.grad, experts.w2.grad)]
        except Exception as exc:  # noqa: BLE001 - recorded: the lease's one chance to see it
            outs[path] = f"failed: {type(exc).__name__}: {exc}"[:300]
    zoo_model.grouped_mm_applies = GROUPED_MM_APPLIES
    result = {"grouped_applies": bool(GROUPED_MM_APPLIES(x, experts.w1, experts.w2))}
    if all(isinstance(v, list) for v in outs.values()):
        result["relative_diff"] = [float((a - b).abs().max() / b.abs().max().clamp_min(1e-9))
                                   for a, b in zip(outs["auto"], outs["loop"])]
    else:
        result["error"] = str(outs)
    print("paths_agree", json.dumps(result), flush=True)
    return result


def timed(fn, device: str, iters: int):
    """Mean seconds of fn() on the GPU (CUDA events), or why it failed."""
    try:
        for _ in range(3):
            fn()
        sync(device)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(iters):
            fn()
        end.record()
        sync(device)
        return start.elapsed_time(end) / iters * 1e-3
    except Exception as exc:  # noqa: BLE001 - a kernel this torch lacks is recorded, not fatal
        return f"failed: {type(exc).__name__}: {exc}"[:200]


def grouped_vs_loop(device: str, iters: int) -> list[dict]:
    """Forward time of the experts' up-projection (t k copies, experts/ep experts) four ways:
    one torch._grouped_mm, a loop of bf16 torch.mm (the module's), a loop of fp8 torch._scaled_mm
    (tensor-wise scales, the cast not included) and one dense GEMM of all the copies against one
    expert's weight (the same FLOPs in one kernel)."""
    if device != "cuda":
        return []
    out = []
    one = torch.ones((), device=device, dtype=torch.float32)
    for name, model, ep in CASES:
        spec = case_spec(model, ep)
        g, h, f = spec.experts, spec.hidden, 2 * spec.expert_ffn_hidden
        for t in (1024, 4096, 16384):
            m = t * spec.experts_per_token // g
            a = torch.randn(m * g, h, device=device, dtype=torch.bfloat16)
            w = torch.randn(g, h, f, device=device, dtype=torch.bfloat16)
            offs = torch.arange(m, m * g + 1, m, device=device, dtype=torch.int32)
            a8 = a.to(torch.float8_e4m3fn)
            w8t = w.transpose(1, 2).contiguous().to(torch.float8_e4m3fn)  # (g, f, h): each w8t[i].t() column-major
            fns = {
                "grouped_mm": lambda: torch._grouped_mm(a, w, offs=offs),
                "loop_mm": lambda: [a[i * m:(i + 1) * m] @ w[i] for i in range(g)],
                "loop_scaled_mm_fp8": lambda: [torch._scaled_mm(a8[i * m:(i + 1) * m], w8t[i].t(), scale_a=one,
                                                                scale_b=one, out_dtype=torch.bfloat16)
                                               for i in range(g)],
                "dense_mm": lambda: a @ w[0],
            }
            row = dict(case=name, tokens=t, experts=g, rows_per_expert=m, k=h, n=f, flops=2.0 * m * g * h * f)
            for label, fn in fns.items():
                row[label] = timed(fn, device, iters) if hasattr(torch, "_grouped_mm") or label != "grouped_mm" \
                    else "failed: no torch._grouped_mm"
            print(json.dumps(row), flush=True)
            out.append(row)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-o", "--output", required=True)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--quick", action="store_true", help="two small token counts, one case (a CPU smoke run)")
    ap.add_argument("--iters", type=int, default=8)
    ap.add_argument("--paths", default="auto,loop", help="experts' paths to measure: auto (grouped GEMM on a GPU in "
                    "bf16), loop (one GEMM per expert)")
    ap.add_argument("--no-gemms", action="store_true", help="leave out the four-way expert GEMM timing")
    args = ap.parse_args()
    cases = CASES[:1] if args.quick else CASES
    tokens = (16, 64) if args.quick else TOKENS
    result = {"device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
              "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"), "dtype": "bf16",
              "cases": [], "grouped": []}
    result["paths_agree"] = paths_agree(args.device)
    for path in args.paths.split(","):
        for name, model, ep in cases:
            result["cases"] += measure_case(name, model, ep, tokens, args.device, args.iters, path)
            Path(args.output).write_text(json.dumps(result, indent=1))
    if not args.no_gemms:
        result["grouped"] = grouped_vs_loop(args.device, 20)
    Path(args.output).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
