"""`paraplan run`: check the plan, then train it under torchrun (started here with the plan's
process count, or the one already running: RANK set by torchrun or SLURM)."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from costmodel.errors import ConfigError
from planner.plan import Plan
from runtime.check import check_runnable

RUNNABLE_RUNTIMES = ("paraplan", "paraplan-compile")  # the runtime profiles that describe this runtime


def worker_args(args: argparse.Namespace, out: str | None) -> list[str]:
    a = [args.plan, "--steps", str(args.steps), "--seed", str(args.seed)]
    for flag, value in (("--data", args.data), ("--checkpoint-dir", args.checkpoint_dir),
                        ("--metrics", args.metrics), ("--out", out)):
        if value:
            a += [flag, value]
    if args.checkpoint_every:
        a += ["--checkpoint-every", str(args.checkpoint_every)]
    if args.resume:
        a.append("--resume")
    if not args.json:
        a.append("--step-lines")
    return a


def _from_slurm(env) -> None:
    """Inside `srun`, take rank and world from SLURM (MASTER_ADDR/PORT must be set by the job)."""
    if "RANK" in env or "SLURM_PROCID" not in env or "SLURM_NTASKS" not in env:
        return
    if "MASTER_ADDR" not in env:
        raise ConfigError("running under SLURM needs MASTER_ADDR (and MASTER_PORT) exported by the job script")
    env["RANK"] = env["SLURM_PROCID"]
    env["WORLD_SIZE"] = env["SLURM_NTASKS"]
    env["LOCAL_RANK"] = env.get("SLURM_LOCALID", "0")
    env.setdefault("MASTER_PORT", "29500")


def run(args: argparse.Namespace) -> int:
    path = Path(args.plan)
    if not path.exists():
        raise ConfigError(f"plan file {args.plan} does not exist")
    plan = Plan.from_yaml(path.read_text())
    if args.steps < 1:
        raise ConfigError(f"--steps must be a positive integer, got {args.steps}")
    world = plan.world_size
    check_runnable(plan)
    if plan.runtime not in RUNNABLE_RUNTIMES:  # priced for another framework: say what the comparison means
        print(f"paraplan: note: {args.plan} was priced for runtime {plan.runtime}; paraplan run executes paraplan's "
              f"runtime, so compare the measured step with `paraplan simulate --plan {args.plan} --runtime paraplan`",
              file=sys.stderr)
    _from_slurm(os.environ)
    if "RANK" in os.environ:  # already inside torchrun / SLURM
        from runtime.worker import main as worker_main

        return worker_main(worker_args(args, None))
    with tempfile.TemporaryDirectory() as tmp:
        out = str(Path(tmp) / "summary.jsonl")
        nnodes = args.nnodes or 1
        per_node = world // nnodes
        if per_node * nnodes != world:
            raise ConfigError(f"the plan's {world} processes do not split over {nnodes} nodes evenly")
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={per_node}", f"--nnodes={nnodes}"]
        if nnodes == 1:
            cmd.append("--standalone")
        else:
            cmd += [f"--node-rank={args.node_rank}", f"--rdzv-endpoint={args.rdzv_endpoint}", "--rdzv-backend=c10d"]
        if args.max_restarts:
            cmd.append(f"--max-restarts={args.max_restarts}")
        cmd += ["-m", "runtime.worker", *worker_args(args, out)]
        env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
        proc = subprocess.run(cmd, env=env, stdout=subprocess.DEVNULL if args.json else None)
        if proc.returncode != 0:
            raise ConfigError(f"the run failed (torchrun exit {proc.returncode}); see the workers' messages above")
        summary = json.loads(Path(out).read_text().splitlines()[-1]) if Path(out).exists() else {}
    summary.pop("plan", None)
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        losses = summary.get("losses", [])
        print(f"{len(losses)} steps on {summary.get('world_size')} processes; loss {losses[0]:.4f} -> {losses[-1]:.4f}"
              if losses else "no steps run")
        print(f"step time {summary.get('step_time_s', 0):.4f} s measured, "
              f"{summary.get('predicted_step_time_s')} s predicted; {summary.get('tokens_per_s', 0):.0f} tokens/s")
    return 0
