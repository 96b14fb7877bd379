"""Fidelity of the simulator on this machine: plans of a small GPT run with `paraplan run`
(gloo, one process per simulated GPU) and predicted with the measured CPU profile
(`profiles/cpu-2core.yaml`). Prints predicted, measured and the error of each plan, and the
median and largest error. Run:
    python bench/fidelity.py [--profile cpu-2core] [--steps 12] [--save FILE | --measured FILE]

`--save` keeps the measured step times as JSON; `--measured` reuses such a file and only
re-predicts (for work on the cost model without rerunning the plans).
"""

from __future__ import annotations

import argparse
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

SPEC = ModelSpec(name="bench-gpt", layers=4, hidden=256, heads=8, vocab=1024, seq_len=256, tied_embeddings=False,
                 dropout=False)
BATCH = 8
PLANS = {
    "DP (dp4)": dict(dp=4, microbatch_size=2),
    "FSDP (dp4, ZeRO-3)": dict(dp=4, zero=3, microbatch_size=2),
    "TP (tp4)": dict(tp=4, microbatch_size=8),
    "TP+DP (dp2 x tp2)": dict(dp=2, tp=2, microbatch_size=4),
    "PP 1F1B (pp4, 8 microbatches)": dict(pp=4, microbatch_size=1, schedule="1f1b"),
    "PP interleaved (pp2 x dp2, v=2)": dict(pp=2, dp=2, microbatch_size=1, schedule="interleaved", virtual_stages=2),
    # the backward split into input and weight gradients (torch's ScheduleInterleavedZeroBubble)
    "PP zero bubble (pp4, 8 microbatches)": dict(pp=4, microbatch_size=1, schedule="zero-bubble"),
    "3D (pp2 x dp2 x tp2 + SP)": dict(pp=2, dp=2, tp=2, sequence_parallel=True, microbatch_size=1, schedule="1f1b"),
    # context parallelism: K and V all-gathered, the attention recomputed in the backward (runtime/context_parallel.py)
    "CP (cp2 x dp2)": dict(cp=2, dp=2, microbatch_size=2),
    "CP (cp4)": dict(cp=4, microbatch_size=4),
}


def strategy(name: str) -> Strategy:
    return Strategy(precision="fp32", global_batch=BATCH, **PLANS[name])


def measure(name: str, profile: str, steps: int, tmp: Path) -> float:
    s = strategy(name)
    cluster = f"{profile}:{s.world_size}"
    plan = plan_from_strategy(SPEC, s, cluster, predict(SPEC, s, load_cluster(cluster)).predicted())
    path = tmp / "plan.yaml"
    path.write_text(plan.to_yaml())
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-m", "cli", "run", str(path), "--steps", str(steps), "--json"],
                         capture_output=True, text=True, env=env, cwd=ROOT, check=True)
    return json.loads(out.stdout)["step_time_s"]


def predicted(name: str, profile: str) -> float:
    s = strategy(name)
    return predict(SPEC, s, load_cluster(f"{profile}:{s.world_size}")).step_time_s


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--profile", default="cpu-2core")
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--repeats", type=int, default=2, help="launches per plan; the mean of their median steps")
    ap.add_argument("--save", help="write the measured step times here (JSON)")
    ap.add_argument("--measured", help="reuse measured step times from this JSON instead of running")
    ap.add_argument("--only", help="run only the plans whose names contain this text (e.g. PP)")
    args = ap.parse_args()
    names = [n for n in PLANS if not args.only or args.only in n]
    if args.measured:
        measured = json.loads(Path(args.measured).read_text())
    else:
        measured = {}
        with tempfile.TemporaryDirectory() as tmp:
            for name in names:
                runs = [measure(name, args.profile, args.steps, Path(tmp)) for _ in range(args.repeats)]
                measured[name] = sum(runs) / len(runs)
                print(f"  ran {name}: {measured[name] * 1e3:.1f} ms/step", file=sys.stderr, flush=True)
        if args.save:
            Path(args.save).write_text(json.dumps(measured, indent=1))
    print(f"{SPEC.name}: {SPEC.layers} layers, hidden {SPEC.hidden}, seq {SPEC.seq_len}, "
          f"{SPEC.num_params / 1e6:.1f}M params, batch {BATCH}, fp32; profile {args.profile}")
    print("| plan | processes | predicted ms | measured ms | error |")
    print("|---|---|---|---|---|")
    errors = []
    for name in names:
        p, m = predicted(name, args.profile), measured[name]
        err = 100 * (p / m - 1)
        errors.append(abs(err))
        print(f"| {name} | {strategy(name).world_size} | {p * 1e3:.1f} | {m * 1e3:.1f} | {err:+.1f}% |")
    print(f"median |error| {statistics.median(errors):.1f}%, max |error| {max(errors):.1f}% "
          f"(target: median <= 15%, max <= 30%)")


if __name__ == "__main__":
    main()
