"""The sharding ILP on real Hugging Face modules rediscovers the tensor-parallel layout their
maintainers ship (`base_model_tp_plan` in transformers' config classes): colwise q/k/v and
gate/up, rowwise o and down, norms never split on the hidden width.

Each architecture is built at two published sizes (the shapes of their config.json files),
two blocks deep on the meta device, and solved on a tensor-parallel axis of 4 or 8 with the
memory Megatron's layout of that block would need (plus 10%), as the search gives it the
memory the rest of the step leaves: the ILP may not hold more than the known layout, and must
find the fastest layout within that."""

import pytest
import torch

from costmodel import load_cluster
from costmodel.strategy import Precision, PrecisionPolicy
from planner.intra_op import CostContext, LogicalMesh, solve_block
from planner.pricing import block_ops
from planner.trace import trace_module

transformers = pytest.importorskip("transformers")
BF16 = PrecisionPolicy.of(Precision.BF16)
STATE_BYTES = 16  # bf16 weight and gradient, fp32 master and two Adam moments, unsharded over data

SIZES = [  # (architecture, hidden, ffn, heads, kv heads, head_dim or None, tp): published model shapes
    ("llama", 4096, 11008, 32, 32, None, 8),  # Llama-2-7B
    ("llama", 8192, 28672, 64, 8, None, 8),  # Llama-3-70B
    ("mistral", 4096, 14336, 32, 8, None, 8),  # Mistral-7B
    ("mistral", 5120, 14336, 32, 8, 128, 8),  # Mistral-Nemo-12B
    ("qwen2", 1536, 8960, 12, 2, None, 2),  # Qwen2-1.5B
    ("qwen2", 3584, 18944, 28, 4, None, 4),  # Qwen2-7B
    ("gemma2", 2304, 9216, 8, 4, 256, 4),  # Gemma-2-2B
    ("gemma2", 3584, 14336, 16, 8, 256, 8),  # Gemma-2-9B
]
CONFIGS = {"llama": "LlamaConfig", "mistral": "MistralConfig", "qwen2": "Qwen2Config", "gemma2": "Gemma2Config"}
SPLIT = {"colwise": "Shard(0)", "rowwise": "Shard(1)"}


def _graph(arch, hidden, ffn, heads, kv, head_dim):
    extra = {"head_dim": head_dim} if head_dim else {}
    config = getattr(transformers, CONFIGS[arch])(
        hidden_size=hidden, intermediate_size=ffn, num_attention_heads=heads, num_key_value_heads=kv,
        num_hidden_layers=2, vocab_size=32000, **extra)
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(config)
    return config, trace_module(model, (torch.zeros(1, 1024, dtype=torch.long, device="meta"),))


def _expected(config) -> dict[str, str]:
    return {f"model.{k.replace('*', '0')}.weight": SPLIT[v] for k, v in config.base_model_tp_plan.items() if v in SPLIT}


@pytest.mark.parametrize("arch,hidden,ffn,heads,kv,head_dim,tp", SIZES,
                         ids=[f"{s[0]}-{s[1]}" for s in SIZES])
def test_ilp_finds_transformers_tp_plan(arch, hidden, ffn, heads, kv, head_dim, tp):
    config, graph = _graph(arch, hidden, ffn, heads, kv, head_dim)
    expected = _expected(config)
    assert len(expected) == 7
    cluster = load_cluster(f"a100-80g:{tp}")
    mesh = LogicalMesh.on(cluster, (tp,), ("tp",), ("tensor",))
    ops = block_ops(graph)
    pinned = {name: (p.replace("Shard(", "S").rstrip(")"),) for name, p in expected.items()}
    known = solve_block(graph, ops, mesh, CostContext(cluster=cluster, policy=BF16, num_microbatches=8,
                                                      state_bytes_per_param=STATE_BYTES, pinned=pinned))
    budget = 1.1 * sum(s.state_bytes for s in known.choice.values())
    free = solve_block(graph, ops, mesh, CostContext(cluster=cluster, policy=BF16, num_microbatches=8,
                                                     state_bytes_per_param=STATE_BYTES, memory_budget_bytes=budget,
                                                     activation_copies=0.0))
    placements = free.parameter_placements()
    found = {name: placements[name].get("tp") for name in expected}
    assert found == expected
    norms = [n for n in placements if "norm" in n and n.startswith("model.layers.0.")]
    assert norms and all(not placements[n] for n in norms)  # never split on the hidden width
    assert free.objective_s <= known.objective_s * (1 + 1e-6)
