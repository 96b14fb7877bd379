"""Faults and elastic re-planning on CPU with gloo: a rank killed mid-step is restarted by
torchrun and the run goes on from its last good checkpoint; a damaged latest checkpoint is
skipped with a warning; a run re-planned for fewer processes resumes from the old plan's
checkpoint, resharded by DCP. Each compares its losses with a run that never stopped."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from costmodel import Strategy
from planner.plan import Plan
from runtime_helpers import ROOT, torchrun, worker_env, write_plan
from tests_helpers import paraplan


def _losses(metrics: Path) -> dict[int, float]:
    out = {}
    for line in metrics.read_text().splitlines():
        d = json.loads(line)
        out[d["step"]] = d["loss"]  # a resumed run rewrites the steps after its checkpoint
    return out


def _workers(plan: Path) -> list[int]:
    """PIDs of the torchrun workers training `plan` (not torchrun itself)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmd = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"runtime.worker" in cmd and str(plan).encode() in cmd and b"torch.distributed.run" not in cmd:
            pids.append(int(entry.name))
    return pids


def test_sigkill_of_one_rank_is_restarted_by_torchrun_from_the_last_checkpoint(tmp_path):
    steps = 10
    plan = write_plan(tmp_path, "tiny-gpt", Strategy(precision="fp32", dp=2, global_batch=8, microbatch_size=4), "dp2")
    straight = tmp_path / "straight.jsonl"
    assert torchrun(2, [plan], tmp_path / "o1.jsonl", "--steps", str(steps), "--metrics", str(straight)).returncode == 0
    metrics, ckpt = tmp_path / "killed.jsonl", tmp_path / "ckpt"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-m", "cli", "run", str(plan), "--steps", str(steps), "--metrics",
                             str(metrics), "--checkpoint-dir", str(ckpt), "--checkpoint-every", "3", "--max-restarts", "1"],
                            cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while time.time() < deadline and not (metrics.exists() and len(metrics.read_text().splitlines()) >= 5):
        time.sleep(0.05)
    victims = _workers(plan)
    assert len(victims) == 2, victims
    os.kill(victims[-1], signal.SIGKILL)  # one rank dies mid-run; torchrun tears the group down and restarts it
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    lines = metrics.read_text().splitlines()
    assert len(lines) > steps, "no step was run twice: the kill came too late to test a restart"
    got, want = _losses(metrics), _losses(straight)
    assert sorted(got) == list(range(1, steps + 1))
    assert got == want  # bit for bit: the restarted group resumed the exact state


def test_a_damaged_latest_checkpoint_is_skipped_with_a_warning(tmp_path):
    steps = 6
    plan = write_plan(tmp_path, "tiny-gpt", Strategy(precision="fp32", dp=2, global_batch=8, microbatch_size=4), "dp2")
    straight, metrics, ckpt = tmp_path / "straight.jsonl", tmp_path / "m.jsonl", tmp_path / "ckpt"
    assert torchrun(2, [plan], tmp_path / "o1.jsonl", "--steps", str(steps), "--metrics", str(straight)).returncode == 0
    first = torchrun(2, [plan], tmp_path / "o2.jsonl", "--steps", str(steps), "--metrics", str(metrics),
                     "--checkpoint-dir", str(ckpt), "--checkpoint-every", "2", "--stop-after", "4")
    assert first.returncode == 0, first.stderr[-2000:]
    assert sorted(p.name for p in ckpt.glob("step_*")) == ["step_2", "step_4"]
    shard = max((ckpt / "step_4").glob("*.distcp"), key=lambda p: p.stat().st_size)
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])  # cut short after it was marked complete
    resumed = torchrun(2, [plan], tmp_path / "o3.jsonl", "--steps", str(steps), "--metrics", str(metrics),
                       "--checkpoint-dir", str(ckpt), "--resume")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "checkpoint" in resumed.stderr and "step_4 is unusable" in resumed.stderr
    got = _losses(metrics)
    assert json.loads((tmp_path / "o3.jsonl").read_text())["first_step"] == 3  # went on from step_2
    assert got == _losses(straight)


def test_replan_for_fewer_processes_resumes_from_the_old_checkpoint(tmp_path):
    """4 steps on dp2 x tp2 (4 processes), re-plan for 2, resume: the next losses equal those of
    a run that never changed (fp32; the layouts add their reductions in different orders)."""
    steps = 6
    old = write_plan(tmp_path, "tiny-llama", Strategy(precision="fp32", dp=2, tp=2, zero=3, global_batch=8,
                                                      microbatch_size=2), "dp2tp2")
    straight, metrics, ckpt = tmp_path / "straight.jsonl", tmp_path / "m.jsonl", tmp_path / "ckpt"
    assert torchrun(4, [old], tmp_path / "o1.jsonl", "--steps", str(steps), "--metrics", str(straight)).returncode == 0
    first = torchrun(4, [old], tmp_path / "o2.jsonl", "--steps", str(steps), "--metrics", str(metrics),
                     "--checkpoint-dir", str(ckpt), "--checkpoint-every", "4", "--stop-after", "4")
    assert first.returncode == 0, first.stderr[-2000:]
    new = tmp_path / "new.yaml"
    out = paraplan("replan", str(old), "--gpus", "2", "-o", str(new))
    assert out.returncode == 0, out.stderr
    new_plan, old_plan = Plan.from_yaml(new.read_text()), Plan.from_yaml(old.read_text())
    assert new_plan.world_size == 2 and new_plan.mesh != old_plan.mesh
    assert (new_plan.global_batch, new_plan.precision, new_plan.model) == (8, "fp32", old_plan.model)
    resumed = torchrun(2, [new], tmp_path / "o3.jsonl", "--steps", str(steps), "--metrics", str(metrics),
                       "--checkpoint-dir", str(ckpt), "--resume")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    got, want = _losses(metrics), _losses(straight)
    assert sorted(got) == list(range(1, steps + 1))
    for step in range(5, steps + 1):
        assert got[step] == pytest.approx(want[step], rel=1e-5), (step, got, want)
    assert got[5] != got[4]  # training went on
    # the same checkpoint also resumes cut into pipeline stages (tiny-llama is untied)
    piped = write_plan(tmp_path, "tiny-llama", Strategy(precision="fp32", pp=2, global_batch=8, microbatch_size=2,
                                                        schedule="1f1b"), "pp2")
    metrics_pp = tmp_path / "pp.jsonl"
    resumed = torchrun(2, [piped], tmp_path / "o4.jsonl", "--steps", str(steps), "--metrics", str(metrics_pp),
                       "--checkpoint-dir", str(ckpt), "--resume")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    got = _losses(metrics_pp)
    assert sorted(got) == list(range(5, steps + 1))  # went on from step 4
    for step in range(5, steps + 1):
        assert got[step] == pytest.approx(want[step], rel=1e-5), (step, got, want)


def test_replan_refuses_what_it_cannot_do(tmp_path):
    old = write_plan(tmp_path, "tiny-gpt", Strategy(precision="fp32", dp=2, global_batch=8, microbatch_size=4), "dp2")
    out = paraplan("replan", str(old), "--gpus", "0")
    assert out.returncode == 2 and "--gpus" in out.stderr and "Traceback" not in out.stderr
    out = paraplan("replan", str(old))
    assert out.returncode == 2 and "--gpus N" in out.stderr and "--cluster DEVICE:COUNT" in out.stderr
    out = paraplan("replan", str(old), "--cluster", "cpu:4", "--json")  # the count is the new cluster's
    assert out.returncode == 0 and json.loads(out.stdout)["plan"]["cluster"] == "cpu:4", out.stderr
    data = yaml.safe_load(old.read_text())
    data["cluster"] = "my-cluster.yaml"
    old.write_text(yaml.safe_dump(data))
    out = paraplan("replan", str(old), "--gpus", "2")
    assert out.returncode == 2 and "--cluster" in out.stderr
    # a serving plan is served, not trained: re-planned as training it read its replicas as a global batch of 1
    serving = tmp_path / "serve.yaml"
    assert paraplan("plan", "--mode", "inference", "--model", "llama3-8b", "--cluster", "h100-sxm:8", "--prompt-len",
                    "512", "--output-len", "128", "-o", str(serving)).returncode == 0
    out = paraplan("replan", str(serving), "--gpus", "16")
    assert out.returncode == 2 and "is a serving plan" in out.stderr and len(out.stderr.strip().splitlines()) == 1


def test_an_error_of_one_ranks_own_part_is_said_and_the_run_stops(tmp_path):
    """A ConfigError that one rank meets alone (its pipeline stage's modules: an interleaved stage of
    DeepSeek's dense first layer had no experts) left it waiting at the worker's closing barrier while
    the others waited for it in a collective: `paraplan run` hung for the process group's 10-minute
    timeout, silent where the rank was not rank 0. It says its error and leaves; torchrun stops the rest."""
    start = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                           str(ROOT / "tests" / "refuse_worker.py")], capture_output=True, text=True, cwd=ROOT,
                          env=worker_env(), timeout=300)
    assert proc.returncode != 0
    assert proc.stderr.count("paraplan: error: rank 1's own part cannot be built") == 1, proc.stderr[-3000:]
    assert time.monotonic() - start < 120


def test_a_workers_refusal_is_one_line_from_paraplan_run(tmp_path):
    """A refusal every worker meets (a py: module whose forward is not the chain its pipeline stages are
    cut by, checked as the workers build their stages) printed its line and then torchrun's report of the
    failed workers: a traceback, a table, and "the run failed (torchrun exit 1)". `paraplan run` passes
    the workers' stderr on until a worker says its error."""
    from runtime_helpers import write_source_plan

    plan = write_source_plan(tmp_path, "py:user_model:user_lm_scaled", Strategy(
        precision="fp32", pp=2, dp=2, microbatch_size=2, global_batch=8, seq_len=32, schedule="1f1b"), "scaled")
    out = paraplan("run", str(plan), "--steps", "1")
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and "its pipeline stages cannot be cut; re-plan with --pp 1" in lines[0], out.stderr
