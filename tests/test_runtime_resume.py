"""Checkpoints and resume: a run killed with SIGKILL mid-way and restarted from its last
checkpoint ends with exactly the losses of an uninterrupted run (CPU, fp32); a planned run
end to end; plans the runtime cannot execute are refused before launch."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from costmodel import Strategy
from runtime_helpers import ROOT, write_plan
from tests_helpers import paraplan

STEPS = 9


def _losses(metrics) -> dict[int, float]:
    out = {}
    for line in metrics.read_text().splitlines():
        d = json.loads(line)
        out[d["step"]] = d["loss"]  # a resumed run rewrites the steps after its checkpoint
    return out


def _run(plan, *args, **kw):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    return subprocess.Popen([sys.executable, "-m", "cli", "run", str(plan), *args], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, **kw)


def test_sigkill_then_resume_gives_the_uninterrupted_losses(tmp_path):
    plan = write_plan(tmp_path, "tiny-llama", Strategy(precision="fp32", tp=2, global_batch=8, microbatch_size=4,
                                                        sequence_parallel=True), "resume")
    straight = tmp_path / "straight.jsonl"
    first = _run(plan, "--steps", str(STEPS), "--metrics", str(straight))
    assert first.wait(timeout=600) == 0, first.stderr.read()[-3000:]  # the workers' messages, where it failed
    metrics, ckpt = tmp_path / "killed.jsonl", tmp_path / "ckpt"
    proc = _run(plan, "--steps", str(STEPS), "--metrics", str(metrics), "--checkpoint-dir", str(ckpt),
                "--checkpoint-every", "3", start_new_session=True)
    deadline = time.time() + 600
    while time.time() < deadline:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= 5:
            break
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    reached = len(metrics.read_text().splitlines())
    assert reached < STEPS, "the run ended before it could be killed"
    done = sorted(p.name for p in ckpt.glob("step_*"))
    assert done and all((ckpt / n / "COMPLETE").exists() for n in done)
    resumed = _run(plan, "--steps", str(STEPS), "--metrics", str(metrics), "--checkpoint-dir", str(ckpt), "--resume")
    assert resumed.wait(timeout=600) == 0, resumed.stderr.read()[-2000:]
    want, got = _losses(straight), _losses(metrics)
    assert sorted(got) == list(range(1, STEPS + 1))
    assert got == want  # bit for bit: same data, same optimizer state, same order of operations


def test_planned_run_end_to_end(tmp_path):
    plan = tmp_path / "plan.yaml"
    out = paraplan("plan", "--model", "tiny-llama", "--cluster", "cpu:4", "--global-batch", "8", "--precision", "fp32",
                   "-o", str(plan))
    assert out.returncode == 0, out.stderr
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    run = subprocess.run([sys.executable, "-m", "cli", "run", str(plan), "--steps", "5", "--json"],
                         capture_output=True, text=True, cwd=ROOT, env=env, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    summary = json.loads(run.stdout)
    assert len(summary["losses"]) == 5 and summary["world_size"] == 4
    assert summary["step_time_s"] > 0 and summary["predicted_step_time_s"] > 0


def test_paraplan_run_under_the_users_own_torchrun(tmp_path):
    """`torchrun --nproc-per-node 2 -m cli run PLAN`: each process is a rank (RANK set), trains,
    and leaves as a rank does (past the interpreter's teardown), exit status 0."""
    plan = tmp_path / "plan.yaml"
    out = paraplan("plan", "--model", "tiny-llama", "--cluster", "cpu:2", "--global-batch", "4", "--precision", "fp32",
                   "-o", str(plan))
    assert out.returncode == 0, out.stderr
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "-m",
                          "cli", "run", str(plan), "--steps", "2"], capture_output=True, text=True, cwd=ROOT, env=env,
                         timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    summary = json.loads(run.stdout.strip().splitlines()[-1])
    assert len(summary["losses"]) == 2 and summary["world_size"] == 2


@pytest.mark.parametrize("changes, needle", [
    ({"mesh": {"pp": 1, "dp_replicate": 1, "dp_shard": 1, "cp": 2, "tp": 2}, "seq_len": 30},
     "is not a multiple of 2 * cp(2)"),
    ({"placements": {"layers.*.attention.wq.weight": {"tp": "Shard(2)"}}}, "no sharding rule"),
    ({"schema_version": 0}, "schema_version 0 is not supported"),
])
def test_unrunnable_plans_are_refused_before_launch(tmp_path, changes, needle):
    import yaml

    path = write_plan(tmp_path, "tiny-gpt", Strategy(precision="fp32", tp=2, dp=2, global_batch=8), "bad")
    data = yaml.safe_load(path.read_text())
    data.update(changes)
    path.write_text(yaml.safe_dump(data))
    out = paraplan("run", str(path))
    assert out.returncode == 2 and needle in out.stderr and "Traceback" not in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1
