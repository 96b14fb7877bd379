"""Single-GPU fidelity: `paraplan run` of bf16 plans of 1-1.3B models on one GPU against the
cost model's prediction.

    python bench/gpu_fidelity.py measure -o FILE        (on a GPU: runs the plans, writes JSON)
    python bench/gpu_fidelity.py [--measured FILE] [--profile P] [--runtime R]   (anywhere: re-predicts)

`measure` runs each plan with `paraplan run` (one process, NCCL) and records the median step
time, the peak memory torch allocated, the GPU and the torch version. Without `measure` the
committed measurements (bench/data/gpu_fidelity_h200.json, measured on an H200) are
predicted again with the chosen hardware profile (default: the one measured on that same GPU
by `paraplan profile --device cuda`) and training-runtime profile, and the table printed.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from costmodel import Strategy, load_cluster, predict  # noqa: E402
from costmodel.spec import ModelSpec  # noqa: E402
from planner.plan import plan_from_strategy  # noqa: E402

MEASURED = ROOT / "bench" / "data" / "gpu_fidelity_h200.json"
GPT = dict(name="gpt-1.3b", layers=24, hidden=2048, heads=16, vocab=50368, seq_len=2048, tied_embeddings=True,
           bias=False, dropout=False)  # MPT-1B's shape (llm-foundry), learned positions, GELU
LLAMA = dict(name="llama-1b", layers=16, hidden=2048, heads=32, kv_heads=8, ffn_hidden=8192, vocab=128256,
             seq_len=2048, activation="swiglu", norm="rmsnorm", position="rope", tied_embeddings=True, bias=False,
             dropout=False)  # Llama-3.2-1B's shape
QWEN3_MOE = dict(name="qwen3-moe-3.2b", layers=8, hidden=2048, heads=32, kv_heads=4, head_dim=128, ffn_hidden=6144,
                 experts=64, experts_per_token=8, expert_ffn_hidden=768, vocab=151936, seq_len=2048,
                 activation="swiglu", norm="rmsnorm", position="rope", tied_embeddings=False, bias=False,
                 dropout=False)  # Qwen3-30B-A3B's layer (128 experts there), 8 layers
PLANS = {
    "gpt-1.3b mb8 x2, no recompute": (GPT, dict(microbatch_size=8, global_batch=16, recompute="none")),
    "gpt-1.3b mb8 x2, full recompute": (GPT, dict(microbatch_size=8, global_batch=16, recompute="full")),
    "gpt-1.3b mb4 x4, seq 4096, full": ({**GPT, "seq_len": 4096}, dict(microbatch_size=4, global_batch=16,
                                                                       recompute="full")),
    "llama-1b mb4 x2, no recompute": (LLAMA, dict(microbatch_size=4, global_batch=8, recompute="none")),
    "llama-1b mb4 x2, full recompute": (LLAMA, dict(microbatch_size=4, global_batch=8, recompute="full")),
    "gpt-1.3b mb1 x4, seq 8192, full": ({**GPT, "seq_len": 8192}, dict(microbatch_size=1, global_batch=4,
                                                                       recompute="full")),
    "llama-1b mb1 x4, seq 8192, no recompute": ({**LLAMA, "seq_len": 8192}, dict(microbatch_size=1, global_batch=4,
                                                                                 recompute="none")),
    "gpt-1.3b mb8 x2, selective recompute": (GPT, dict(microbatch_size=8, global_batch=16, recompute="selective")),
    "llama-1b mb4 x2, selective recompute": (LLAMA, dict(microbatch_size=4, global_batch=8, recompute="selective")),
    "gpt-1.3b mb8 x2, no recompute, compiled": (GPT, dict(microbatch_size=8, global_batch=16, recompute="none")),
    "llama-1b mb4 x2, no recompute, compiled": (LLAMA, dict(microbatch_size=4, global_batch=8, recompute="none")),
    "llama-1b mb4 x2, full recompute, compiled": (LLAMA, dict(microbatch_size=4, global_batch=8, recompute="full")),
    "qwen3-moe-3.2b mb4 x2, no recompute": (QWEN3_MOE, dict(microbatch_size=4, global_batch=8, recompute="none")),
    "qwen3-moe-3.2b mb4 x2, full recompute": (QWEN3_MOE, dict(microbatch_size=4, global_batch=8, recompute="full")),
}


def runtime_of(name: str) -> str:
    """The training runtime a plan runs (and is priced) with."""
    return "paraplan-compile" if name.endswith(", compiled") else "paraplan"


def spec_and_strategy(name: str) -> tuple[ModelSpec, Strategy]:
    model, flags = PLANS[name]
    return ModelSpec(**model), Strategy(precision="bf16", **flags)


def measure_one(name: str, profile: str, steps: int, tmp: Path) -> dict:
    spec, s = spec_and_strategy(name)
    cluster, runtime = f"{profile}:1", runtime_of(name)
    plan = plan_from_strategy(spec, s, cluster, predict(spec, s, load_cluster(cluster, runtime=runtime)).predicted(),
                              runtime=runtime)
    path, metrics = tmp / "plan.yaml", tmp / f"metrics-{len(list(tmp.iterdir()))}.jsonl"
    path.write_text(plan.to_yaml())
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    out = subprocess.run([sys.executable, "-m", "cli", "run", str(path), "--steps", str(steps), "--json",
                          "--metrics", str(metrics)], capture_output=True, text=True, env=env, cwd=ROOT)
    if out.returncode:
        return {"error": (out.stderr or out.stdout).strip().splitlines()[-12:]}
    lines = [json.loads(x) for x in metrics.read_text().splitlines()]
    times = [x["step_time_s"] for x in lines[3:]]  # the first three: allocator, autotuning, compilation
    return {"step_time_s": statistics.median(times), "step_times_s": [round(t, 5) for t in times],
            "peak_memory_gib": max(x.get("peak_memory_gib", 0.0) for x in lines),
            "loss_first_last": [lines[0]["loss"], lines[-1]["loss"]]}


def run_measure(args) -> None:
    import torch

    if not torch.cuda.is_available():
        sys.exit("bench/gpu_fidelity.py measure: no CUDA device here")
    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
              "date": datetime.date.today().isoformat(), "steps": args.steps, "runs": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for name in [p for p in PLANS if not args.only or any(part in p for part in args.only.split("|"))]:
            result["runs"][name] = measure_one(name, args.profile, args.steps, Path(tmp))
            print(f"  {name}: {result['runs'][name]}", file=sys.stderr, flush=True)
            Path(args.output).write_text(json.dumps(result, indent=1))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="command")
    m = sub.add_parser("measure")
    m.add_argument("-o", "--output", required=True)
    m.add_argument("--steps", type=int, default=10)
    m.add_argument("--profile", default="h200", help="the profile written into the plans (not what is measured)")
    m.add_argument("--only", help="run only the plans whose name contains one of these |-separated parts")
    ap.add_argument("--measured", default=str(MEASURED))
    ap.add_argument("--profile", default="h200-measured")
    ap.add_argument("--runtime", default=None, help="training-runtime profile (default: each plan's own)")
    args = ap.parse_args()
    if args.command == "measure":
        return run_measure(args)
    data = json.loads(Path(args.measured).read_text())
    print(f"measured on {data['device']} (torch {data['torch']}, {data['date']}); predicted with profile "
          f"{args.profile}" + (f", runtime {args.runtime}" if args.runtime else ""))
    print("| plan | runtime | predicted ms | measured ms | error | predicted GiB | peak allocated GiB |")
    print("|---|---|---|---|---|---|---|")
    errors = []
    for name, run in data["runs"].items():
        if "step_time_s" not in run:
            print(f"| {name} | {runtime_of(name)} | | failed: {run.get('error', ['?'])[-1]} | | | |")
            continue
        spec, s = spec_and_strategy(name)
        r = predict(spec, s, load_cluster(f"{args.profile}:1", runtime=args.runtime or runtime_of(name)))
        err = 100 * (r.step_time_s / run["step_time_s"] - 1)
        errors.append(err)
        print(f"| {name} | {args.runtime or runtime_of(name)} | {r.step_time_s * 1e3:.1f} | {run['step_time_s'] * 1e3:.1f} | {err:+.1f}% | "
              f"{r.memory_gib['total']:.1f} | {run['peak_memory_gib']:.1f} |")
    if errors:
        print(f"median |error| {statistics.median(abs(e) for e in errors):.1f}%, "
              f"max |error| {max(abs(e) for e in errors):.1f}%")


if __name__ == "__main__":
    main()
