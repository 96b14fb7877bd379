"""Runtime overhead: `paraplan run` of a dp x tp plan against a plain script that calls the
same torch APIs by hand (DeviceMesh, parallelize_module, fully_shard, AdamW), same model,
batch and steps. Prints both median step times and the overhead. Run:
    python bench/runtime_overhead.py
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from costmodel import Strategy, load_cluster, predict  # noqa: E402
from costmodel.spec import ModelSpec  # noqa: E402
from planner.plan import plan_from_strategy  # noqa: E402

SPEC = ModelSpec(name="bench-gpt", layers=4, hidden=256, heads=8, vocab=1024, seq_len=256, tied_embeddings=False)
STRATEGY = Strategy(precision="fp32", dp=2, tp=2, global_batch=8, microbatch_size=4)
STEPS = 30

HAND = r'''
import json, statistics, sys, time
import torch, torch.distributed as dist, torch.nn.functional as F
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import Replicate
from torch.distributed.tensor.parallel import ColwiseParallel, PrepareModuleInput, RowwiseParallel, parallelize_module
from costmodel.spec import ModelSpec
from planner.zoo.model import build_model
dist.init_process_group("gloo")
spec = ModelSpec(**json.loads(sys.argv[1]))
mesh = init_device_mesh("cpu", (2, 1, 2), mesh_dim_names=("dp_replicate", "dp_shard", "tp"))
model = build_model(spec)
parallelize_module(model, mesh["tp"], {"tok_embeddings": RowwiseParallel(input_layouts=Replicate(), output_layouts=Replicate()),
    "pos_embeddings": RowwiseParallel(input_layouts=Replicate(), output_layouts=Replicate()),
    "output": ColwiseParallel(output_layouts=Replicate())})
for block in model.layers.values():
    parallelize_module(block, mesh["tp"], {
        "attention": PrepareModuleInput(input_layouts=(Replicate(), None, None), desired_input_layouts=(Replicate(), None, None)),
        "feed_forward": PrepareModuleInput(input_layouts=(Replicate(),), desired_input_layouts=(Replicate(),)),
        "attention.wq": ColwiseParallel(), "attention.wk": ColwiseParallel(), "attention.wv": ColwiseParallel(),
        "attention.wo": RowwiseParallel(), "feed_forward.w1": ColwiseParallel(), "feed_forward.w2": RowwiseParallel()})
dp_mesh = mesh["dp_replicate", "dp_shard"]  # HSDP with shards of one: data parallel, as ZeRO-0
for block in model.layers.values():
    fully_shard(block, mesh=dp_mesh, reshard_after_forward=False)
fully_shard(model, mesh=dp_mesh, reshard_after_forward=False)
model.to_empty(device="cpu"); model.init_weights(0)
opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.1, foreach=False)
times = []
dp_rank = mesh["dp_replicate"].get_local_rank()
for step in range(int(sys.argv[2])):
    t0 = time.perf_counter()
    gen = torch.Generator().manual_seed(step)
    seqs = torch.randint(0, spec.vocab, (8, spec.seq_len + 1), generator=gen)[dp_rank * 4:(dp_rank + 1) * 4]
    x, y = seqs[:, :-1], seqs[:, 1:]
    loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten(0, 1))
    loss.backward()
    # clip_grad_norm_ cannot stack norms of DTensors on different meshes: sum squares by hand
    sq = sum((torch.linalg.vector_norm(p.grad) ** 2).full_tensor() for p in model.parameters())
    coef = min(1.0, 1.0 / (float(sq) ** 0.5 + 1e-6))
    if coef < 1.0:
        for p in model.parameters():
            p.grad.mul_(coef)
    opt.step(); opt.zero_grad(set_to_none=True)
    times.append(time.perf_counter() - t0)
if dist.get_rank() == 0:
    print(json.dumps({"step_time_s": statistics.median(times[1:])}))
dist.destroy_process_group()
'''


def main() -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    with tempfile.TemporaryDirectory() as tmp:
        plan_path = Path(tmp) / "plan.yaml"
        plan = plan_from_strategy(SPEC, STRATEGY, "cpu:4", predict(SPEC, STRATEGY, load_cluster("cpu:4")).predicted())
        plan_path.write_text(plan.to_yaml())
        hand_path = Path(tmp) / "hand.py"
        hand_path.write_text(HAND)
        rows = []
        for round_ in range(3):  # alternate, so drift on a shared machine hits both alike
            ours = subprocess.run([sys.executable, "-m", "cli", "run", str(plan_path), "--steps", str(STEPS),
                                   "--json"], capture_output=True, text=True, env=env, cwd=ROOT, check=True)
            ours_s = json.loads(ours.stdout)["step_time_s"]
            hand = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=4",
                                   str(hand_path), json.dumps(SPEC.to_dict()), str(STEPS)],
                                  capture_output=True, text=True, env=env, cwd=ROOT, check=True)
            hand_s = json.loads(next(l for l in hand.stdout.splitlines() if l.startswith("{")))["step_time_s"]
            rows.append((ours_s, hand_s))
            print(f"round {round_ + 1}: paraplan run {ours_s * 1e3:.1f} ms/step, by hand {hand_s * 1e3:.1f} ms/step, "
                  f"overhead {100 * (ours_s / hand_s - 1):+.1f}%")
        ours_s = min(r[0] for r in rows)
        hand_s = min(r[1] for r in rows)
        per_round = sorted(100 * (a / b - 1) for a, b in rows)
        print(f"dp2 x tp2, {SPEC.name} ({SPEC.num_params / 1e6:.1f}M params), fp32, gloo on 4 CPU processes: "
              f"best paraplan run {ours_s * 1e3:.1f} ms/step, best by hand {hand_s * 1e3:.1f} ms/step, "
              f"overhead of the bests {100 * (ours_s / hand_s - 1):+.1f}%, median round {per_round[len(rows) // 2]:+.1f}%")


if __name__ == "__main__":
    main()
