"""LoRA in the runtime: only the adapters train, and LoRA plans under DP, FSDP and TP train a
tiny Llama (GQA, SwiGLU) and a tiny GPT with the losses of a single-process LoRA run (fp32,
tolerance 1e-5 as in test_runtime_parity, whose docstring gives the reasoning)."""

import os

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from costmodel import Strategy, load_cluster, predict
from planner.plan import Plan, plan_from_strategy
from planner.zoo import ZOO
from runtime_helpers import launch, read_results

TOLERANCE = 1e-5
STEPS = 5
LAYOUTS = {
    "dp": dict(dp=2, microbatch_size=4),
    "fsdp": dict(dp=4, zero=3, microbatch_size=2),
    "tp": dict(tp=2, microbatch_size=8),
    "tp_dp": dict(tp=2, dp=2, microbatch_size=4),
    "tp_fsdp": dict(tp=2, dp=2, zero=3, microbatch_size=4),
}
# the layouts each model trains under: every layout once, tensor parallelism on both
MODEL_LAYOUTS = {"tiny-gpt": ("dp", "tp_dp"), "tiny-llama": ("fsdp", "tp", "tp_fsdp")}
CASES = [(m, layout) for m, layouts in MODEL_LAYOUTS.items() for layout in layouts]


def _lora_plan(directory, model: str, name: str, **fields) -> Plan:
    spec = ZOO[model]
    s = Strategy(precision="fp32", global_batch=8, lora_rank=4,
                 lora_targets=("q", "k", "v", "o", "up", "down") + (("gate",) if model == "tiny-llama" else ()), **fields)
    plan = plan_from_strategy(spec, s, f"cpu:{s.world_size}", predict(spec, s, load_cluster(f"cpu:{s.world_size}")).predicted())
    path = directory / f"{model}__{name}.yaml"
    path.write_text(plan.to_yaml())
    return path


def test_lora_with_sequence_parallelism_is_refused_before_launch(tmp_path):
    from planner.contract import runnable_problems

    plan = Plan.from_yaml(_lora_plan(tmp_path, "tiny-llama", "sp", tp=2, sequence_parallel=True,
                                     microbatch_size=8).read_text())
    assert any("sequence parallelism" in p and "--no-sequence-parallel" in p for p in runnable_problems(plan))


def test_only_adapters_train(tmp_path):
    from runtime.mesh import build_mesh
    from runtime.train import build_parts

    plan = Plan.from_yaml(_lora_plan(tmp_path, "tiny-llama", "one", microbatch_size=8).read_text())
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT="29581")
    dist.init_process_group("gloo", rank=0, world_size=1)
    try:
        (model,), _ = build_parts(plan, build_mesh(plan.mesh, "cpu"), torch.device("cpu"), seed=0)
        trainable = {n for n, p in model.named_parameters() if p.requires_grad}
        assert trainable and all(n.endswith(("lora_a", "lora_b")) for n in trainable)
        assert len(trainable) == 2 * 7 * ZOO["tiny-llama"].layers  # 7 targets per block
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
        tokens = torch.randint(0, 256, (4, 33), generator=torch.Generator().manual_seed(0))
        for _ in range(3):
            loss = F.cross_entropy(model(tokens[:, :-1]).flatten(0, 1), tokens[:, 1:].flatten())
            loss.backward()
            opt.step()
            opt.zero_grad()
        for name, p in model.named_parameters():
            changed = not torch.equal(p.detach(), before[name])
            assert changed == (name in trainable), name
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    d = tmp_path_factory.mktemp("lora")
    results = {}
    by_world: dict[int, list] = {1: [_lora_plan(d, m, "reference", microbatch_size=8) for m in ("tiny-gpt", "tiny-llama")]}
    for m, name in CASES:
        fields = LAYOUTS[name]
        by_world.setdefault(Strategy(**fields).world_size, []).append(_lora_plan(d, m, name, **fields))
    for world, plans in sorted(by_world.items()):
        out = d / f"world{world}.jsonl"
        proc = launch(world, plans, out, "--steps", str(STEPS))
        assert proc.returncode == 0, proc.stderr[-3000:]
        results.update(read_results(out))
    return results


def test_every_layout_is_run():
    assert {layout for _, layout in CASES} == set(LAYOUTS)


@pytest.mark.parametrize(("model", "layout"), CASES)
def test_lora_losses_match_single_process(runs, model, layout):
    ours, ref = runs[f"{model}__{layout}"]["losses"], runs[f"{model}__reference"]["losses"]
    assert len(ours) == len(ref) == STEPS
    for step, (a, b) in enumerate(zip(ours, ref), 1):
        assert abs(a - b) <= TOLERANCE * abs(b), f"step {step}: {a} vs {b}"
    assert ours[-1] < ours[0]  # the adapters learn
