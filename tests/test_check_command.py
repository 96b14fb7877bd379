"""`paraplan check PLAN --cluster C`: a good plan passes; a bad one gets every problem at once."""

import yaml

from costmodel import Strategy, load_cluster, predict
from planner.plan import plan_from_strategy
from planner.zoo import ZOO
from tests_helpers import paraplan


def _plan(tmp_path, model, strategy, cluster, name="plan.yaml"):
    spec = ZOO[model]
    plan = plan_from_strategy(spec, strategy, cluster, predict(spec, strategy, load_cluster(cluster)).predicted())
    path = tmp_path / name
    path.write_text(plan.to_yaml())
    return path


def test_a_good_plan_passes(tmp_path):
    path = _plan(tmp_path, "tiny-llama", Strategy(precision="fp32", dp=2, tp=2, global_batch=8, microbatch_size=2), "cpu:4")
    out = paraplan("check", str(path))
    assert out.returncode == 0, out.stderr
    assert "OK on cpu:4" in out.stdout and "4 processes" in out.stdout


def test_every_problem_is_listed_at_once(tmp_path):
    path = _plan(tmp_path, "tiny-llama", Strategy(precision="fp32", dp=2, tp=2, global_batch=8, microbatch_size=2), "cpu:4")
    data = yaml.safe_load(path.read_text())
    data["mesh"]["tp"] = 3  # 3 does not divide 4 heads, nor 2 kv heads; mesh is now 6 processes
    data["placements"]["layers.*.attention.wq.weight"] = {"tp": "Shard(0)", "ep": "Shard(0)"}  # unknown axis
    data["placements"]["layers.*.attn.q_proj.weight"] = {"tp": "Shard(0)"}  # names no parameter
    path.write_text(yaml.safe_dump(data))
    out = paraplan("check", str(path), "--cluster", "cpu:8")
    assert out.returncode == 2
    err = out.stderr
    assert "Traceback" not in err
    assert "has 8 GPUs" in err and "replan --gpus 8" in err  # world size
    assert "tp(3) does not divide heads(4)" in err  # divisibility
    assert "axis 'ep' is not executable" in err  # runtime placements
    assert "'layers.*.attn.q_proj.weight' matches no parameter" in err
    assert "5 problem(s)" in err or "problem(s)" in err
    assert len([l for l in err.splitlines() if l.startswith("  - ")]) >= 5


def test_memory_per_gpu_is_checked(tmp_path):
    # llama2-70b on 8 A100-80G with plain data parallelism: ~1.1 TB of model state per GPU
    path = _plan(tmp_path, "llama2-70b", Strategy(dp=8, global_batch=8, microbatch_size=1), "a100-80g:8")
    out = paraplan("check", str(path), "--json")
    assert out.returncode == 2
    import json

    report = json.loads(out.stdout)
    assert not report["ok"] and report["peak_memory_gib"] > 1000
    assert any("pipeline rank 0 needs" in p and "GiB per GPU against 80 GiB" in p for p in report["problems"])


def test_the_planner_writes_only_schedules_the_runtime_accepts(tmp_path):
    """`plan --model tiny-llama --cluster cpu-2core:4 --global-batch 8` wrote pp 4 with one
    microbatch of 8 under 1F1B; `check` said OK and every rank of `run` died in
    Schedule1F1B ("Number of microbatches (1) must be greater than or equal to the number of
    stages (4)"). Now the search skips it and `check` refuses such a plan."""
    path = tmp_path / "p.yaml"
    out = paraplan("plan", "--model", "tiny-llama", "--cluster", "cpu-2core:4", "--global-batch", "8", "-o", str(path))
    assert out.returncode == 0, out.stderr
    plan = yaml.safe_load(path.read_text())
    pp, m = plan["mesh"]["pp"], plan["schedule"]["num_microbatches"]
    assert pp == 1 or (m >= pp if plan["schedule"]["name"] == "1f1b" else True)
    assert paraplan("check", str(path)).returncode == 0
    bad = _plan(tmp_path, "tiny-llama", Strategy(precision="fp32", pp=4, global_batch=8, microbatch_size=8), "cpu:4",
                "bad.yaml")
    out = paraplan("check", str(bad))
    assert out.returncode == 2 and "1F1B needs at least as many microbatches as pipeline stages" in out.stdout + out.stderr
