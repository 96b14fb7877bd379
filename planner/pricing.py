"""planner.pricing: a plan's step priced on its own graph and placements.

`graph_price(...)` traces the module the plan runs (paraplan's Transformer for zoo and spec
models, the Hugging Face class for `hf:`, the user's module for `py:`), two blocks deep at the
plan's microbatch and sequence, solves the block's sharding with the plan's parameter
placements pinned (so only the activations' placements are left to choose: the cheapest way
to run what the plan says), and prices the solved block (`planner.graph_cost`). The step
simulator then takes that block in place of the layer formulas; embedding, head and loss
stay on the formulas, which price Megatron's vocab-parallel ends as the runtime runs them.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from costmodel.cluster import Cluster
from costmodel.errors import ConfigError
from costmodel.layer import BlockPrice
from costmodel.spec import ModelSpec
from costmodel.step import step_cluster
from costmodel.strategy import Strategy
from planner.graph_cost import price_block
from planner.intra_op import CostContext, IntraOpSolution, LogicalMesh, solve_block
from planner.module_map import placement_of
from planner.sharding import shard
from planner.trace import OpGraph

PROBE_LAYERS = 2


def unpriceable(spec: ModelSpec, seq: int = 0) -> str:
    """Why the model's block cannot be priced from its graph ("" when it can)."""
    if spec.moe:
        return ("a mixture of experts routes tokens by their values, which torch.export cannot trace on the "
                "meta device: its blocks are priced by the formulas (costmodel.moe)")
    if spec.attention_window and spec.attention_window < (seq or spec.seq_len):
        return (f"sliding-window attention ({spec.attention_window} tokens) is priced by the formulas, which skip "
                "the blocks outside the window (the traced graph's mask is not read)")
    return ""


@dataclass(frozen=True, slots=True)
class GraphPrice:
    block: BlockPrice
    solution: IntraOpSolution
    pinned: int  # block parameters whose placement the plan fixed


def probe_spec(spec: ModelSpec, layers: int, seq_len: int) -> ModelSpec:
    """`spec` `layers` blocks deep at `seq_len`, its kinds of block kept in proportion: the
    sliding-window layers (Gemma-2's every other one: 1 of 2) and the dense layers before a
    mixture of experts' sparse ones (at least one sparse block left to price)."""
    windowed = spec.windowed_among(layers)
    dense = min(spec.dense_layers, layers - 1) if spec.moe else spec.dense_layers
    return replace(spec, layers=layers, seq_len=seq_len, windowed_layers=windowed, dense_layers=max(dense, 0),
                   attention_window=spec.attention_window if windowed else 0)


def probe_graph(spec: ModelSpec, strategy: Strategy, source: dict | None = None, *,
                batch: int | None = None) -> OpGraph:
    """The module the plan runs, `PROBE_LAYERS` blocks deep (every block is the same), traced
    on the meta device at the plan's microbatch and its sequence over cp (a context-parallel
    rank's queries; `graph_price` widens attention to the whole sequence's keys)."""
    import torch

    from planner.trace import trace_module, trace_spec

    seq = (strategy.seq_len or spec.seq_len) // strategy.cp  # a context-parallel rank's share of the sequence
    probe = probe_spec(spec, min(PROBE_LAYERS, spec.layers), seq)
    kind = (source or {}).get("kind")
    batch = batch or strategy.microbatch_size
    if kind in ("hf", "py"):
        from planner.model_source import build_source_module

        module, inputs = build_source_module(source, spec, probe_layers=probe.layers)
        if kind == "hf":  # at the plan's microbatch and sequence
            inputs = (torch.zeros(batch, seq, dtype=torch.long, device="meta"),)
        else:  # the user's example inputs at the plan's microbatch (dim 0); token ids at its sequence
            inputs = tuple(at_batch(x, batch, seq) for x in inputs)
        return trace_module(module, inputs)
    return trace_spec(probe, batch=batch)


def at_batch(x, batch: int, seq: int | None = None):
    """An example input at `batch` rows (and, for token ids (b, s), `seq` tokens), on meta."""
    import torch

    if not isinstance(x, torch.Tensor) or x.dim() == 0:
        return x
    shape = (batch, *x.shape[1:])
    if seq is not None and x.dim() == 2 and not x.dtype.is_floating_point:
        shape = (batch, seq)
    return torch.zeros(shape, dtype=x.dtype, device="meta")


def block_ops(graph: OpGraph) -> list[str]:
    """The operators of the first copy of the block the most layers share."""
    kinds = graph.block_kinds()
    if not kinds:
        raise ConfigError("the traced model has no repeated blocks to price")
    key = max(kinds.values(), key=len)[0]
    return [n for n in graph.blocks[key] if graph.node(n)["kind"] not in ("param", "buffer")]


def tensor_placement(p: str | None) -> str:
    """A plan's placement of one parameter on the tensor-parallel axis (None: not split), in
    the ILP's form."""
    p = p or "Replicate()"
    if p.startswith("Shard("):
        return shard(int(p[len("Shard("):-1]))
    if p == "Replicate()":
        return "R"
    raise ConfigError(f"placement {p!r} on tp is not one paraplan prices; use Shard(d) or Replicate()")


def pinned_placements(graph: OpGraph, ops: list[str], placements: dict[str, dict[str, str]]) -> dict[str, tuple[str, ...]]:
    """The block's parameters -> their tensor-axis placement under the plan's `placements`
    (keys may name layers by glob, `layers.*.attention.wq.weight`), read as the contract reads
    them (`module_map.placement_of`)."""
    pinned = {}
    for op in ops:
        for u in graph.graph.predecessors(op):
            node = graph.node(u)
            if node["kind"] != "param" or node["param"] in pinned:
                continue
            pinned[node["param"]] = (tensor_placement(placement_of(placements, node["param"])),)
    return pinned


def graph_price(spec: ModelSpec, strategy: Strategy, cluster: Cluster, placements: dict[str, dict[str, str]] | None,
                *, graph: OpGraph | None = None, source: dict | None = None,
                time_limit_s: float | None = 30) -> GraphPrice:
    """The repeated block of the plan priced from its graph. `placements`: the plan's (None:
    the ILP chooses every placement on the tensor axis)."""
    graph = graph or probe_graph(spec, strategy, source)
    cluster = step_cluster(strategy, cluster)  # priced as build_step prices the formulas' block
    ops = block_ops(graph)
    pinned = pinned_placements(graph, ops, placements) if placements is not None else {}
    mesh = LogicalMesh.on(cluster, (strategy.tp,), ("tp",), ("tensor",))
    pol = strategy.policy
    ctx = CostContext(cluster=cluster, policy=pol, num_microbatches=strategy.num_microbatches,
                      sequence_parallel=strategy.sequence_parallel if strategy.tp > 1 else False, pinned=pinned)
    solution = solve_block(graph, ops, mesh, ctx, time_limit_s=time_limit_s)
    block = price_block(solution, cluster, bytes_per_value=pol.activation_bytes, compute_dtype=pol.compute_dtype,
                        kv_scale=strategy.cp)
    return GraphPrice(block=block, solution=solution, pinned=len(pinned))


def price_step(spec: ModelSpec, strategy: Strategy, cluster: Cluster, placements: dict[str, dict[str, str]],
               source: dict | None = None, *, record_events: bool = False):
    """The step of a plan (its strategy, placements and source) simulated with its block
    priced from the graph: what `simulate --plan`, `check` and `report compare` predict."""
    from costmodel import build_step, simulate

    if unpriceable(spec, strategy.seq_len):
        return simulate(build_step(spec, strategy, cluster), record_events=record_events)
    block = graph_price(spec, strategy, cluster, placements, source=source).block
    return simulate(build_step(spec, strategy, cluster, block), record_events=record_events)
