"""The `paraplan-compile` runtime runs: each block under torch.compile (Inductor on the CPU),
after activation checkpointing and before FSDP, trains like eager paraplan under FSDP (two
gloo processes, fp32). Compiled kernels reassociate floating-point sums, so the tolerance is
1e-4 relative (eager parity tests use 1e-5)."""

from dataclasses import replace

import pytest

from costmodel import Strategy, load_cluster, predict
from planner.plan import plan_from_strategy
from planner.zoo import ZOO
from runtime_helpers import read_results, torchrun


def test_compiled_blocks_train_like_eager_under_fsdp(tmp_path):
    spec = ZOO["tiny-llama"]
    s = Strategy(precision="fp32", global_batch=4, dp=2, zero=3, microbatch_size=2, recompute="full")
    plans = []
    for runtime in ("paraplan", "paraplan-compile"):
        cluster = load_cluster("cpu:2", runtime=runtime)
        plan = plan_from_strategy(spec, s, "cpu:2", predict(spec, s, cluster).predicted(), runtime=runtime)
        path = tmp_path / f"{runtime}.yaml"
        path.write_text(plan.to_yaml())
        plans.append(path)
    out = tmp_path / "out.jsonl"
    proc = torchrun(2, plans, out, "--steps", "3")
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = read_results(out)
    eager, compiled = res["paraplan"]["losses"], res["paraplan-compile"]["losses"]
    assert len(compiled) == 3
    assert compiled == pytest.approx(eager, rel=1e-4)
