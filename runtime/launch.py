"""`paraplan run`: refuse what `check` refuses, then train the plan under torchrun (started
here with the plan's process count, or the one already running: RANK set by torchrun or SLURM)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from costmodel.cluster import load_cluster
from costmodel.errors import ConfigError
from planner.contract import RUNNABLE_RUNTIMES, plan_problems
from planner.plan import Plan


@dataclass(frozen=True, slots=True, kw_only=True)
class LaunchConfig:
    """What `paraplan run` was asked: the plan file, the training loop's settings and torchrun's."""

    plan_path: str
    steps: int = 10
    seed: int = 0
    data: str | None = None
    checkpoint_dir: str | None = None
    checkpoint_every: int = 0
    resume: bool = False
    metrics: str | None = None
    nnodes: int = 1
    node_rank: int = 0
    rdzv_endpoint: str | None = None
    max_restarts: int = 0
    json: bool = False

    def __post_init__(self) -> None:
        if self.steps < 1:
            raise ConfigError(f"--steps must be a positive integer, got {self.steps}")
        if self.checkpoint_every < 0:
            raise ConfigError(f"--checkpoint-every must be 0 (never) or a positive step count, got {self.checkpoint_every}")
        if self.nnodes < 1 or not 0 <= self.node_rank < self.nnodes:
            raise ConfigError(f"--nnodes {self.nnodes} --node-rank {self.node_rank}: need nnodes >= 1 and "
                              "0 <= node-rank < nnodes")
        if self.nnodes > 1 and not self.rdzv_endpoint:
            raise ConfigError("a multi-node run needs --rdzv-endpoint HOST:PORT")
        if self.max_restarts < 0:
            raise ConfigError(f"--max-restarts must be 0 or more, got {self.max_restarts}")
        if (self.resume or self.checkpoint_every) and not self.checkpoint_dir:
            flag = "--resume" if self.resume else "--checkpoint-every"
            raise ConfigError(f"{flag} needs --checkpoint-dir DIR (where the checkpoints are written and read)")
        if self.checkpoint_dir:
            _check_writable(self.checkpoint_dir, "--checkpoint-dir", folder=True)
        if self.metrics:
            _check_writable(self.metrics, "--metrics", folder=False)

    def worker_args(self, out: str | None) -> list[str]:
        a = [self.plan_path, "--steps", str(self.steps), "--seed", str(self.seed)]
        for flag, value in (("--data", self.data), ("--checkpoint-dir", self.checkpoint_dir),
                            ("--metrics", self.metrics), ("--out", out)):
            if value:
                a += [flag, value]
        if self.checkpoint_every:
            a += ["--checkpoint-every", str(self.checkpoint_every)]
        if self.resume:
            a.append("--resume")
        if not self.json:
            a.append("--step-lines")
        return a


def _check_writable(path: str, flag: str, *, folder: bool) -> None:
    """One line where `path` cannot be written: a folder (made on the way) or a file in one,
    checked before any process starts (a rank's OSError came back as a torchrun traceback)."""
    target = Path(path)
    if target.exists() and target.is_dir() != folder:
        raise ConfigError(f"{flag} {path} is {'a file' if folder else 'a folder'}; give a {'folder' if folder else 'file'} path")
    parent = target if folder and target.exists() else target.parent
    while not parent.exists():  # the nearest folder that exists: the rest is made below it
        parent = parent.parent
    if not parent.is_dir() or not os.access(parent, os.W_OK):
        raise ConfigError(f"{flag} {path}: {parent} is not a folder this user can write into; give another path")


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


def refuse_unrunnable(plan: Plan) -> None:
    """Raise what `paraplan check` would print for the plan on its own cluster, if anything (and
    that a serving plan is served, not trained)."""
    if plan.mode == "inference":
        raise ConfigError("a serving plan is served, not trained: `paraplan export PLAN --to vllm` gives its vllm serve "
                          "command; `paraplan generate --workload W` serves a built-in model on this machine")
    problems, _ = plan_problems(plan, load_cluster(plan.cluster, runtime=plan.runtime))
    if problems:
        more = f" (and {len(problems) - 1} more: see `paraplan check`)" if len(problems) > 1 else ""
        raise ConfigError(problems[0] + more)


def machine_problem(plan: Plan, plan_path: str, per_node: int, cuda_gpus: int) -> str | None:
    """Why this machine cannot start the plan's processes, if it cannot: a plan for GPUs where
    there is no CUDA GPU (its ranks would fall back to the CPU, each building its share of a model
    sized for GPUs, until the host runs out of memory), or more processes on a node than it has
    GPUs. A plan for cpu:N runs anywhere (gloo)."""
    device = load_cluster(plan.cluster, runtime=plan.runtime).device
    if device.arch == "cpu":
        return None
    if cuda_gpus == 0:
        return (f"{plan_path} is planned for {plan.world_size} {device.name} GPUs and this machine has no CUDA GPU; run "
                f"it where they are, or plan for cpu:N (cpu-2core:N) to try the layout here")
    if cuda_gpus < per_node:
        return (f"{plan_path} starts {per_node} processes on this node, which has {cuda_gpus} GPU(s); run it over "
                f"nodes (--nnodes, --node-rank, --rdzv-endpoint) or re-plan for them (`paraplan replan {plan_path} "
                f"--gpus {cuda_gpus}`)")
    return None


def run(cfg: LaunchConfig) -> int:
    plan = Plan.load(cfg.plan_path)
    world = plan.world_size
    refuse_unrunnable(plan)
    import torch

    inside = "RANK" in os.environ or "SLURM_PROCID" in os.environ
    problem = machine_problem(plan, cfg.plan_path, 1 if inside else max(1, world // cfg.nnodes),
                              torch.cuda.device_count() if torch.cuda.is_available() else 0)
    if problem:
        raise ConfigError(problem)
    if cfg.data is not None:  # a bad data file is one line here, not a traceback from every rank
        from runtime.data import check_data, tokenizer_dir

        check_data(cfg.data, plan.spec.vocab, plan.seq_len,
                   tokenizer_dir(plan.source["path"]) if plan.source.get("kind") == "hf" else None)
    if plan.runtime not in RUNNABLE_RUNTIMES:  # priced for another framework: say what the comparison means
        print(f"paraplan: note: {cfg.plan_path} was priced for runtime {plan.runtime}; paraplan run executes "
              f"paraplan's runtime, so compare the measured step with `paraplan simulate --plan {cfg.plan_path} "
              "--runtime paraplan`", file=sys.stderr)
    _from_slurm(os.environ)
    if "RANK" in os.environ:  # already inside torchrun / SLURM: this process is a rank, and leaves as one
        from runtime.teardown import leave
        from runtime.worker import main as worker_main

        leave(worker_main(cfg.worker_args(None)))
    with tempfile.TemporaryDirectory() as tmp:
        out = str(Path(tmp) / "summary.jsonl")
        per_node = world // cfg.nnodes
        if per_node * cfg.nnodes != world:
            raise ConfigError(f"the plan's {world} processes do not split over {cfg.nnodes} nodes evenly")
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={per_node}", f"--nnodes={cfg.nnodes}"]
        if cfg.nnodes == 1:
            cmd.append("--standalone")
        else:
            cmd += [f"--node-rank={cfg.node_rank}", f"--rdzv-endpoint={cfg.rdzv_endpoint}", "--rdzv-backend=c10d"]
        if cfg.max_restarts:
            cmd.append(f"--max-restarts={cfg.max_restarts}")
        cmd += ["-m", "runtime.worker", *cfg.worker_args(out)]
        env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL if cfg.json else None, stderr=subprocess.PIPE,
                                text=True, errors="replace")
        said = pass_stderr(proc.stderr, sys.stderr)
        if proc.wait() != 0:
            if said:  # a worker said why, in one line: the rest is torchrun stopping the others
                return 2
            raise ConfigError(f"the run failed (torchrun exit {proc.returncode}); see the workers' messages above")
        summary = json.loads(Path(out).read_text().splitlines()[-1]) if Path(out).exists() else {}
    summary.pop("plan", None)
    if cfg.json:
        print(json.dumps(summary, indent=2))
    else:
        losses = summary.get("losses", [])
        print(f"{len(losses)} steps on {summary.get('world_size')} processes; loss {losses[0]:.4f} -> {losses[-1]:.4f}"
              if losses else "no steps run")
        print(f"step time {summary.get('step_time_s', 0):.4f} s measured, "
              f"{summary.get('predicted_step_time_s')} s predicted; {summary.get('tokens_per_s', 0):.0f} tokens/s")
        note = prediction_note(summary, plan)
        if note:
            print(note)
    return 0


def pass_stderr(lines, out) -> bool:
    """Copy the workers' stderr (through torchrun) to `out` as it comes, until a worker says
    `paraplan: error: ...`; after it, only other such lines: what follows is the run being stopped
    (torchrun's report of the failed workers and its traceback, other ranks' lost connections), not
    news. Whether an error was said."""
    said: set[str] = set()
    for line in lines:
        if line.startswith("paraplan: error:"):
            if line not in said:
                out.write(line)
                out.flush()
            said.add(line)
        elif not said:
            out.write(line)
            out.flush()
    return bool(said)


def prediction_note(summary: dict, plan: Plan) -> str:
    """A line where the measured step falls outside the plan's predicted range (and is more
    than 1.5x from the prediction): the profile that priced the plan and what to do about it."""
    measured, predicted = summary.get("step_time_s") or 0.0, summary.get("predicted_step_time_s") or 0.0
    low, high = (plan.predicted.get("step_time_s_range") or (predicted, predicted))[:2]
    if not (measured > 0 and predicted > 0) or (low <= measured <= high) or 1 / 1.5 <= measured / predicted <= 1.5:
        return ""
    try:
        why = load_cluster(plan.cluster, runtime=plan.runtime).profile_note
    except ConfigError:
        why = ""
    return (f"note: measured {measured / predicted:.1f}x the prediction, outside its range {low:.4g} - {high:.4g} s "
            f"(hardware profile {plan.profile or plan.cluster}): "
            + (why or "the profile is not this machine as it runs now (`paraplan profile -o here.yaml` measures it; "
                      "plan on here.yaml:N), or the steps after the first are still warming up (more --steps)"))
