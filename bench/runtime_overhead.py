"""Runtime overhead: `paraplan run` of a dp x tp plan against a plain script that calls the
same torch APIs by hand (DeviceMesh, parallelize_module, fully_shard, AdamW), same model,
batch and steps: for paraplan's built-in GPT and for a Hugging Face LlamaForCausalLM given as
hf:DIR (the user's module, parallelized from the plan). Prints both median step times and the
overhead. Run:
    python bench/runtime_overhead.py            # both
    python bench/runtime_overhead.py hf         # the Hugging Face model only
    python bench/runtime_overhead.py zoo        # the built-in GPT only
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
VOCAB, SEQ, LOGITS = spec.vocab, spec.seq_len, model
'''

# the training loop both scripts end with (the same data, clipping and optimizer as `paraplan run`)
LOOP = r'''
times = []
dp_rank = mesh["dp_replicate"].get_local_rank()
for step in range(int(sys.argv[2])):
    t0 = time.perf_counter()
    gen = torch.Generator().manual_seed(step)
    seqs = torch.randint(0, VOCAB, (8, SEQ + 1), generator=gen)[dp_rank * 4:(dp_rank + 1) * 4]
    x, y = seqs[:, :-1], seqs[:, 1:]
    loss = F.cross_entropy(LOGITS(x).flatten(0, 1), y.flatten(0, 1))
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

HF_SIZES = dict(num_hidden_layers=4, hidden_size=256, num_attention_heads=8, num_key_value_heads=4,
                intermediate_size=688, vocab_size=1024, max_position_embeddings=256, tie_word_embeddings=False)

HF_HAND = r'''
import json, statistics, sys, time
import torch, torch.distributed as dist, torch.nn.functional as F, transformers
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import Replicate
from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module
dist.init_process_group("gloo")
config = transformers.AutoConfig.from_pretrained(sys.argv[1])
config._attn_implementation = "sdpa"; config.use_cache = False
mesh = init_device_mesh("cpu", (2, 1, 2), mesh_dim_names=("dp_replicate", "dp_shard", "tp"))
with torch.device("meta"):
    model = transformers.AutoModelForCausalLM.from_config(config)
parallelize_module(model, mesh["tp"], {
    "model.embed_tokens": RowwiseParallel(input_layouts=Replicate(), output_layouts=Replicate()),
    "lm_head": ColwiseParallel(output_layouts=Replicate())})
for block in model.model.layers:  # transformers' own tensor-parallel plan for Llama, by hand
    parallelize_module(block, mesh["tp"], {
        "self_attn.q_proj": ColwiseParallel(), "self_attn.k_proj": ColwiseParallel(),
        "self_attn.v_proj": ColwiseParallel(), "self_attn.o_proj": RowwiseParallel(),
        "mlp.gate_proj": ColwiseParallel(), "mlp.up_proj": ColwiseParallel(), "mlp.down_proj": RowwiseParallel()})
dp_mesh = mesh["dp_replicate", "dp_shard"]
for block in model.model.layers:
    fully_shard(block, mesh=dp_mesh, reshard_after_forward=False)
fully_shard(model, mesh=dp_mesh, reshard_after_forward=False)
model.to_empty(device="cpu")
model.apply(model._init_weights)
opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.1, foreach=False)
VOCAB, SEQ, LOGITS = config.vocab_size, int(sys.argv[3]), lambda x: model(x).logits
'''


def _hf_case(tmp: Path):
    """(plan, hand script, its arguments, label) for a Hugging Face Llama given as hf:DIR."""
    import transformers

    from planner.model_source import load_model, source_and_map

    folder = tmp / "hf-llama"
    transformers.LlamaConfig(**HF_SIZES).save_pretrained(folder)
    model = f"hf:{folder}"
    spec, _ = load_model(model)
    s = STRATEGY.replace(seq_len=SPEC.seq_len)
    source, module_map, _ = source_and_map(model, spec)
    plan = plan_from_strategy(spec, s, "cpu:4", predict(spec, s, load_cluster("cpu:4")).predicted(), source=source,
                              module_map=module_map)
    return plan, HF_HAND + LOOP, [str(folder), str(STEPS), str(SPEC.seq_len)], \
        f"dp2 x tp2, Hugging Face LlamaForCausalLM ({spec.num_params / 1e6:.1f}M params) as hf:DIR"


def main() -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    only_hf, only_zoo = sys.argv[1:] == ["hf"], sys.argv[1:] == ["zoo"]
    with tempfile.TemporaryDirectory() as tmp:
        cases = [] if only_hf else [(
            plan_from_strategy(SPEC, STRATEGY, "cpu:4", predict(SPEC, STRATEGY, load_cluster("cpu:4")).predicted()),
            HAND + LOOP, [json.dumps(SPEC.to_dict()), str(STEPS)],
            f"dp2 x tp2, {SPEC.name} ({SPEC.num_params / 1e6:.1f}M params)")]
        if not only_zoo:
            cases.append(_hf_case(Path(tmp)))
        for k, (plan, hand, hand_args, label) in enumerate(cases):
            _compare(Path(tmp), k, plan, hand, hand_args, label, env)


def _compare(tmp: Path, k: int, plan, hand: str, hand_args: list[str], label: str, env: dict) -> None:
    plan_path = tmp / f"plan{k}.yaml"
    plan_path.write_text(plan.to_yaml())
    hand_path = tmp / f"hand{k}.py"
    hand_path.write_text(hand)
    rows = []
    for round_ in range(3):  # alternate, so drift on a shared machine hits both alike
        ours = subprocess.run([sys.executable, "-m", "cli", "run", str(plan_path), "--steps", str(STEPS),
                               "--json"], capture_output=True, text=True, env=env, cwd=ROOT, check=True)
        ours_s = json.loads(ours.stdout)["step_time_s"]
        by_hand = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=4",
                                  str(hand_path), *hand_args],
                                 capture_output=True, text=True, env=env, cwd=ROOT, check=True)
        hand_s = json.loads(next(l for l in by_hand.stdout.splitlines() if l.startswith("{")))["step_time_s"]
        rows.append((ours_s, hand_s))
        print(f"round {round_ + 1}: paraplan run {ours_s * 1e3:.1f} ms/step, by hand {hand_s * 1e3:.1f} ms/step, "
              f"overhead {100 * (ours_s / hand_s - 1):+.1f}%")
    ours_s = min(r[0] for r in rows)
    hand_s = min(r[1] for r in rows)
    per_round = sorted(100 * (a / b - 1) for a, b in rows)
    print(f"{label}, fp32, gloo on 4 CPU processes: "
          f"best paraplan run {ours_s * 1e3:.1f} ms/step, best by hand {hand_s * 1e3:.1f} ms/step, "
          f"overhead of the bests {100 * (ours_s / hand_s - 1):+.1f}%, median round {per_round[len(rows) // 2]:+.1f}%")


if __name__ == "__main__":
    main()
