"""Planner rediscovery: the sharding ILP finds Megatron, DP/TP splits, DP and FSDP by itself."""

import pytest
import torch
from torch import nn

from costmodel import ConfigError, load_cluster
from costmodel.spec import gpt_spec, llama_spec
from costmodel.strategy import Precision, PrecisionPolicy
from planner.intra_op import CostContext, IlpTimeout, IntraOpProblem, LogicalMesh, solve_block
from planner.trace import trace_module, trace_spec

BF16 = PrecisionPolicy.of(Precision.BF16)
MiB, GiB = 2**20, 2**30


class MLP(nn.Module):
    def __init__(self, h: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(h, 4 * h)
        self.fc2 = nn.Linear(4 * h, h)

    def forward(self, x):
        return self.fc2(nn.functional.gelu(self.fc1(x)))


def _block(graph):
    return [n for n in graph.blocks[("layers", 0)] if graph.node(n)["kind"] not in ("param", "buffer")]


def _solve(graph, ops, cluster, shape, names, roles, budget=float("inf"), m=8, **ctx):
    c = load_cluster(cluster)
    mesh = LogicalMesh.on(c, shape, names, roles)
    return solve_block(graph, ops, mesh, CostContext(cluster=c, policy=BF16, num_microbatches=m, memory_budget_bytes=budget,
                                                     **ctx))


def _all_reduces_forward(sol) -> int:
    return sum(1 for kind, *_ in sol.forward_collectives() if kind == "all_reduce")


def _forward(sol) -> dict[str, int]:
    counts: dict[str, int] = {}
    for kind, *_ in sol.forward_collectives():
        counts[kind] = counts.get(kind, 0) + 1
    return counts


def test_mlp_with_tp8_is_column_then_row():
    with torch.device("meta"):
        graph = trace_module(MLP(4096), (torch.zeros(1, 2048, 4096),))
    ops = [n for n in graph.order if graph.node(n)["kind"] not in ("param", "input")]
    sol = _solve(graph, ops, "a100-80g:8", (8,), ("tp",), ("tensor",))
    placements = sol.parameter_placements()
    assert placements["fc1.weight"] == {"tp": "Shard(0)"}
    assert placements["fc2.weight"] == {"tp": "Shard(1)"}
    assert _all_reduces_forward(sol) == 1  # fc2's partial sums, all-reduced once
    assert "column" in sol.explain("linear") and "fc1" in sol.explain("linear")


@pytest.mark.parametrize("spec", [
    gpt_spec("g", layers=2, hidden=4096, heads=32, seq_len=2048),
    llama_spec("l", layers=2, hidden=4096, heads=32, kv_heads=8, ffn_hidden=14336, vocab=32000, seq_len=2048),
], ids=["gpt", "llama-gqa"])
def test_attention_splits_heads_and_rows(spec):
    graph = trace_spec(spec)
    sol = _solve(graph, _block(graph), "a100-80g:8", (8,), ("tp",), ("tensor",))
    p = sol.parameter_placements()
    for proj in ("wq", "wk", "wv"):
        assert p[f"layers.0.attention.{proj}.weight"] == {"tp": "Shard(0)"}  # by heads
    assert p["layers.0.attention.wo.weight"] == {"tp": "Shard(1)"}  # by rows
    sdpa = [op for op in sol.choice if sol.nodes[op]["kind"] == "sdpa"][0]
    assert sol.choice[sdpa].out == ("S1",)  # attention runs head-parallel
    # left free, the residual stream runs split on the sequence: Korthikanti's sequence
    # parallelism, the same bytes as Megatron's two all-reduces and a share of the norms' work
    assert _forward(sol) == {"reduce_scatter": 2, "all_gather": 2}
    plain = _solve(graph, _block(graph), "a100-80g:8", (8,), ("tp",), ("tensor",), sequence_parallel=False)
    assert _forward(plain) == {"all_reduce": 2}  # Megatron without SP: two per layer forward
    assert plain.parameter_placements() == p


@pytest.mark.parametrize("sp", [False, True])
def test_backward_reductions_are_counted_once(sp):
    """q, k and v read one norm output: their input gradients are summed and reduced once
    (as Megatron's fused QKV and paraplan's runtime do), and under sequence parallelism the
    reduce-scatter that undoes the all-gather is that reduction, not a second one."""
    spec = llama_spec("l", layers=2, hidden=4096, heads=32, kv_heads=8, ffn_hidden=14336, vocab=32000, seq_len=2048)
    graph = trace_spec(spec)
    sol = _solve(graph, _block(graph), "a100-80g:8", (8,), ("tp",), ("tensor",), sequence_parallel=sp)
    backward: dict[str, int] = {}
    for _u, _src, _dst, t in sol.transfers():
        if t.phase == "backward":
            backward[t.kind] = backward.get(t.kind, 0) + 1
    assert backward == ({"reduce_scatter": 2, "all_gather": 2} if sp else {"all_reduce": 2})
    # under SP the norms run on sequence shards with replicated weights: their weight gradients
    # are all-reduced over tp (Megatron's allreduce of layernorm grads), the op's own term
    norms = [s for op, s in sol.choice.items() if sol.nodes[op]["kind"] == "norm"]
    assert all((s.comm_s > 0) == sp for s in norms)


def test_2d_mesh_large_batch_splits_into_data_and_tensor_axes():
    # two nodes of eight: axis a0 crosses InfiniBand, a1 is NVLink; the solver chooses both roles
    graph = trace_spec(gpt_spec("g", layers=2, hidden=8192, heads=64, seq_len=2048), batch=8)
    sol = _solve(graph, _block(graph), "a100-80g:16", (2, 8), ("a0", "a1"), ("free", "free"), budget=6 * GiB)
    linears = [s.name for op, s in sol.choice.items() if sol.nodes[op]["kind"] == "linear"]
    assert all(name.split("|")[0] == "batch0" for name in linears)  # a0: data parallel
    assert {name.split("|")[1] for name in linears} == {"column", "row"}  # a1: tensor parallel
    assert sol.uses("batch") >= {"a0"} and sol.uses("column") == {"a1"}


SMALL = gpt_spec("s", layers=2, hidden=256, heads=8, vocab=1000, seq_len=512)


def test_small_model_without_memory_pressure_is_pure_data_parallel():
    graph = trace_spec(SMALL, batch=64)
    sol = _solve(graph, _block(graph), "a100-80g:8", (8,), ("a",), ("free",))
    assert all(s.name.startswith(("batch", "split", "replicate")) for s in sol.choice.values())
    assert all(not p for p in sol.parameter_placements().values())  # every weight replicated
    assert sol.uses("column") == set() and sol.uses("row") == set()


def test_same_model_under_memory_pressure_shards_parameters_fsdp_style():
    graph = trace_spec(SMALL, batch=64)
    free = _solve(graph, _block(graph), "a100-80g:8", (8,), ("a",), ("free",))
    used = sum(s.state_bytes for s in free.choice.values()) + sum(s.act_bytes for s in free.choice.values())
    tight = _solve(graph, _block(graph), "a100-80g:8", (8,), ("a",), ("free",), budget=used * 0.9)
    sharded = {k: v for k, v in tight.parameter_placements().items() if v}
    assert sharded, "some parameters must be sharded to fit"
    # FSDP: weights stored sharded over the data axis while every linear still runs data parallel
    linears = [s.name for op, s in tight.choice.items() if tight.nodes[op]["kind"] == "linear"]
    assert all(n.startswith("batch") for n in linears)
    assert sum(s.state_bytes for s in tight.choice.values()) < sum(s.state_bytes for s in free.choice.values())


def test_impossible_budget_is_one_clear_error():
    graph = trace_spec(SMALL, batch=64)
    with pytest.raises(ConfigError, match="infeasible.*memory budget"):
        _solve(graph, _block(graph), "a100-80g:8", (8,), ("a",), ("free",), budget=1 * MiB)


def test_formulation_names_its_constraints():
    graph = trace_spec(SMALL, batch=8)
    c = load_cluster("a100-80g:8")
    prob = IntraOpProblem(graph, _block(graph), LogicalMesh.on(c, (8,), ("tp",), ("tensor",)),
                          CostContext(cluster=c, policy=BF16, memory_budget_bytes=GiB, sequence_parallel=True))
    prob.build()
    names = {c.name for c in prob.prob.constraints()} if callable(prob.prob.constraints) else set(prob.prob.constraints)
    for family in ("one_hot_", "edge_out_", "edge_in_", "transfer_", "memory_step_", "fixed_", "chain_out_"):
        assert any(n.startswith(family) for n in names), family


def test_a_time_out_is_reported_as_a_time_out():
    graph = trace_spec(gpt_spec("g", layers=2, hidden=8192, heads=64, seq_len=2048), batch=8)
    c = load_cluster("a100-80g:16")
    mesh = LogicalMesh.on(c, (2, 8), ("a0", "a1"), ("free", "free"))
    ctx = CostContext(cluster=c, policy=BF16, num_microbatches=8, memory_budget_bytes=6 * GiB)
    with pytest.raises(IlpTimeout, match="timed out: its 0.001 s time limit ended it"):
        solve_block(graph, _block(graph), mesh, ctx, time_limit_s=0.001)


def test_explain_gives_the_real_cost_terms():
    with torch.device("meta"):
        graph = trace_module(MLP(4096), (torch.zeros(1, 2048, 4096),))
    ops = [n for n in graph.order if graph.node(n)["kind"] not in ("param", "input")]
    sol = _solve(graph, ops, "a100-80g:8", (8,), ("tp",), ("tensor",), sequence_parallel=False)
    text = sol.explain("linear")  # fc1, column-parallel: its input's gradient all-reduced on the way back
    chosen = sol.choice["linear"]
    terms = sol.cost_terms("linear", chosen)
    assert terms["resharding in"] > 0 and f"= {sum(terms.values()) * 1e3:.3f} ms" in text
    assert "runner-up" in text and f"compute {chosen.compute_s * 1e3:.3f} ms" in text


def test_both_mesh_axes_in_one_solve_find_fsdp_and_megatron():
    """gpt3-175b's block on (dp_shard 128, tp 8) in the memory one layer may hold: the data
    axis splits the batch, the ILP shards the weights over it (FSDP) and splits them
    Megatron's way over the tensor axis, in one solve."""
    spec = gpt_spec("g", layers=2, hidden=12288, heads=96, seq_len=2048)
    graph = trace_spec(spec, batch=6 * 128)
    c = load_cluster("a100-80g:1024")
    mesh = LogicalMesh.on(c, (128, 8), ("dp_shard", "tp"), ("data", "tensor"))
    sol = solve_block(graph, _block(graph), mesh, CostContext(
        cluster=c, policy=BF16, num_microbatches=2, memory_budget_bytes=0.3 * GiB, state_bytes_per_param=16,
        activation_copies=0.0, sequence_parallel=True))
    p = sol.parameter_placements()
    for name, tp in (("wq", "Shard(0)"), ("wo", "Shard(1)"), ("w1", "Shard(0)"), ("w2", "Shard(1)")):
        module = "attention" if name.startswith("w") and name[1] in "qo" else "feed_forward"
        axes = p[f"layers.0.{module}.{name}.weight"]
        assert axes["tp"] == tp and axes["dp_shard"].startswith("Shard(")
    assert all(not v for k, v in p.items() if "norm" in k)  # small: replicated on both axes
    # replicated weights would hold 16 bytes a parameter of 1.8B / 8 per layer: over the budget
    unsharded = _solve(graph, _block(graph), "a100-80g:1024", (128, 8), ("dp_shard", "tp"), ("data", "tensor"),
                       m=2, sequence_parallel=True)
    assert all("dp_shard" not in v for v in unsharded.parameter_placements().values())  # no pressure: DDP
