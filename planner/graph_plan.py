"""planner.graph_plan: plan a module that is not a decoder-only language model, from its graph.

A stack of repeated blocks without attention (an MLP stack, say) has no `ModelSpec` for the
layer formulas to price, so it is planned on its traced graph alone, the Alpa way:

  candidates   tp (inside a node, dividing what the block splits) x dp (the rest), ZeRO 0 or 3
               over dp, the microbatch (dim 0 of the example inputs) dividing dp's share
  block        the sharding ILP of the repeated block on the tensor axis (`planner.intra_op`,
               the residual stream whole on each rank), in the memory the GPU leaves per block, priced
               on its graph (`planner.graph_cost`): one microbatch's forward and backward
  rest         the ops outside the blocks priced replicated on every GPU of a replica
  step         m microbatches x (blocks' forward + backward) + the exposed data-parallel
               traffic: ZeRO-0's gradient all-reduce per block behind the last backward,
               ZeRO-3's all-gathers ahead of each block and reduce-scatters behind it (the
               cost model's `overlap_s`), + the optimizer step at the runtime's bytes per
               parameter
  memory       parameters, gradients and optimizer states under ZeRO, the activations the ILP
               keeps for one microbatch, the device's fixed overhead and fragmentation

The fastest candidate that fits wins. `paraplan run` trains decoder-only language models, so
these plans are printed, not written.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import torch
from tqdm import tqdm

from costmodel.cluster import Cluster
from costmodel.collectives import all_gather_s, all_reduce_s, reduce_scatter_s
from costmodel.errors import ConfigError
from costmodel.hardware import GIB
from costmodel.memory import zero_model_state_bytes
from costmodel.ops import gemm_s, memory_bound_s
from costmodel.step import overlap_s, step_cluster
from costmodel.strategy import Precision, PrecisionPolicy, Strategy
from planner.graph_cost import price_block
from planner.intra_op import CostContext, IntraOpSolution, LogicalMesh, solve_block
from planner.pricing import at_batch, block_ops
from planner.search import MAX_MICROBATCH, divisors
from planner.trace import OpGraph, trace_module



@dataclass(frozen=True, slots=True, kw_only=True)
class GraphPlan:
    tp: int
    dp: int
    zero: int
    microbatch_size: int
    num_microbatches: int
    step_time_s: float
    time_s: dict[str, float]
    memory_gib: dict[str, float]
    fits: bool
    samples_per_s: float
    placements: dict[str, dict[str, str]]
    solution: IntraOpSolution

    def __post_init__(self) -> None:
        if self.tp < 1 or self.dp < 1 or self.microbatch_size < 1:
            raise ConfigError("a graph plan's tp, dp and microbatch size are positive")


def _outside_s(graph: OpGraph, cluster: Cluster, pol: PrecisionPolicy) -> tuple[float, int]:
    """(forward + backward seconds, parameters) of the ops outside every repeated block,
    replicated on each GPU of a replica."""
    inside = {n for names in graph.blocks.values() for n in names}
    seconds, params, e = 0.0, 0, pol.activation_bytes
    dev = cluster.device
    for name in graph.order:
        node = graph.node(name)
        if name in inside:
            continue
        preds = sorted(graph.graph.predecessors(name), key=lambda p: graph.graph.edges[p, name]["arg"])
        if node["kind"] == "param":
            params += node["numel"]
        elif node["kind"] in ("linear", "matmul") and len(preds) >= 2:
            x, w = graph.node(preds[0])["shape"], graph.node(preds[1])["shape"]
            n = w[0] if node["kind"] == "linear" else w[-1]
            seconds += 3 * gemm_s(dev, pol.compute_dtype, math.prod(x[:-1]), x[-1], n, e)
        elif node["kind"] in ("pointwise", "norm", "embedding", "reduce", "softmax", "cat", "other"):
            seconds += 3 * memory_bound_s(dev, e * (node["numel"] + sum(graph.node(p)["numel"] for p in preds)))
    return seconds, params


def plan_graph(module: torch.nn.Module, inputs: tuple, cluster: Cluster, global_batch: int, *,
               fixed: dict | None = None, progress: bool = False) -> list[GraphPlan]:
    """Every candidate layout of `module` (see the module docstring), fastest first."""
    fixed = fixed or {}
    unknown = sorted(set(fixed) - {"tp", "dp", "zero", "microbatch_size", "precision"})
    if unknown:
        raise ConfigError(f"--{unknown[0].replace('_', '-')} does not apply to a module planned from its graph "
                          "(it has no attention layers or pipeline stages); drop it")
    pol = PrecisionPolicy.of(Precision(fixed.get("precision", "bf16")))
    world, per_node = cluster.world_size, cluster.gpus_per_node
    graphs: dict[int, OpGraph] = {}

    def graph_at(batch: int) -> OpGraph:
        if batch not in graphs:
            graphs[batch] = trace_module(module, tuple(at_batch(x, batch) for x in inputs))
        return graphs[batch]

    base = graph_at(inputs[0].shape[0])
    kinds = base.block_kinds()
    if not kinds:
        raise ConfigError("the module has no repeated blocks (children 0..N-1 of a ModuleList/ModuleDict or "
                          "nn.Sequential) to plan")
    layers = len(max(kinds.values(), key=len))
    tps = [fixed["tp"]] if "tp" in fixed else [t for t in (1, 2, 4, 8) if t <= per_node and per_node % t == 0]
    out: list[GraphPlan] = []
    combos = []
    for tp in tps:
        if world % tp:
            continue
        dp = world // tp
        if ("dp" in fixed and fixed["dp"] != dp) or global_batch % dp:
            continue
        per_replica = global_batch // dp
        mbss = [fixed["microbatch_size"]] if "microbatch_size" in fixed else [
            b for b in divisors(per_replica) if b <= MAX_MICROBATCH]
        zeros = [fixed["zero"]] if "zero" in fixed else ([0, 3] if dp > 1 else [0])
        combos += [(tp, dp, z, b) for z, b in itertools.product(zeros, mbss) if per_replica % b == 0]
    if not combos:
        raise ConfigError(f"no layout of the given flags splits global batch {global_batch} over {world} GPUs; "
                          "use a batch that divides over the data-parallel ranks")
    for tp, dp, zero, mbs in tqdm(combos, desc="pricing", unit="layout", disable=not progress, leave=False):
        try:
            plan = _price(graph_at(mbs), layers, cluster, pol, tp, dp, zero, mbs, global_batch)
        except ConfigError:
            continue  # the block does not split over this tp
        out.append(plan)
    if not out:
        raise ConfigError(f"no layout of the module's blocks fits the mesh shapes of {cluster.name}")
    return sorted(out, key=lambda p: (not p.fits, p.step_time_s, p.tp, p.zero, -p.microbatch_size))


def _price(graph: OpGraph, layers: int, cluster: Cluster, pol: PrecisionPolicy, tp: int, dp: int, zero: int,
           mbs: int, global_batch: int) -> GraphPlan:
    s = Strategy(tp=tp, dp=dp, zero=zero, microbatch_size=mbs, global_batch=global_batch, seq_len=1,
                 sequence_parallel=False)
    cluster = step_cluster(s, cluster)
    dev, rt = cluster.device, cluster.cost_runtime
    m = global_batch // dp // mbs
    shard = dp if zero else 1
    per_param = sum(zero_model_state_bytes(1, shard, zero, param_bytes=pol.param_bytes, grad_bytes=pol.grad_bytes,
                                           optimizer_bytes=pol.optimizer_bytes))
    overhead = dev.memory_overhead
    capacity = (dev.hbm_bytes - overhead.fixed_gib * GIB) / (1 + overhead.fragmentation)
    mesh = LogicalMesh.on(cluster, (tp,), ("tp",), ("tensor",))
    # the residual stream whole on every tensor-parallel rank (sequence parallelism is not run on
    # py: modules: they may size themselves from their input)
    ctx = CostContext(cluster=cluster, policy=pol, num_microbatches=m, memory_budget_bytes=capacity / layers,
                      state_bytes_per_param=per_param, sequence_parallel=False)
    solution = solve_block(graph, block_ops(graph), mesh, ctx, time_limit_s=30)
    block = price_block(solution, cluster, bytes_per_value=pol.activation_bytes, compute_dtype=pol.compute_dtype)
    fwd = block.gemm_s + block.attention_forward_s + block.elementwise_s + block.tp_forward_s
    bwd = 2 * block.gemm_s + block.attention_backward_s + 2 * block.elementwise_s + block.tp_backward_s
    rest_s, rest_params = _outside_s(graph, cluster, pol)
    params = block.params * layers + rest_params  # on one GPU
    shard_group, dp_group = cluster.group(dp, tp), cluster.group(dp, tp)
    grads = block.params * pol.grad_bytes
    work = m * (layers * (fwd + bwd) + rest_s)  # compute and tensor-parallel traffic
    if zero == 3 and dp > 1:  # every microbatch: gathers ahead of each block, reduce-scatters behind its backward
        gather = all_gather_s(block.params * pol.param_bytes, shard_group)
        scatter = reduce_scatter_s(grads, shard_group)
        f_task = overlap_s([fwd] * layers, [gather] * layers, [])
        b_task = overlap_s([bwd] * layers, [gather] * layers, [scatter] * layers)
        dp_exposed = m * (f_task + b_task - layers * (fwd + bwd))
    elif dp > 1:  # gradients all-reduced per block behind the last microbatch's backward
        reduce = all_reduce_s(grads, dp_group)
        dp_exposed = overlap_s([bwd] * layers, [], [reduce] * layers) - layers * bwd
    else:
        dp_exposed = 0.0
    optimizer = dev.memory_s(params / shard * rt.optimizer_bytes_per_param)
    step = work + dp_exposed + optimizer
    p, g, o = zero_model_state_bytes(params, shard, zero, param_bytes=pol.param_bytes, grad_bytes=pol.grad_bytes,
                                     optimizer_bytes=pol.optimizer_bytes)
    acts = layers * sum(st.act_bytes for st in solution.choice.values())
    other = overhead.fixed_gib * GIB + overhead.fragmentation * (p + g + o + acts)
    memory = {"parameters": p / GIB, "gradients": g / GIB, "optimizer": o / GIB, "activations": acts / GIB,
              "other": other / GIB}
    memory["total"] = sum(memory.values())
    placements = {}
    for name, axes in sorted(solution.parameter_placements().items()):
        generic = ".".join("*" if part.isdigit() else part for part in name.split("."))
        if zero == 3 and dp > 1:
            axes = {**axes, "dp_shard": "Shard(0)"}
        placements[generic] = axes
    return GraphPlan(
        tp=tp, dp=dp, zero=zero, microbatch_size=mbs, num_microbatches=m, step_time_s=step,
        time_s={"compute": work - m * layers * (block.tp_forward_s + block.tp_backward_s),
                "tp_comm": m * layers * (block.tp_forward_s + block.tp_backward_s), "dp_comm_exposed": dp_exposed,
                "optimizer": optimizer},
        memory_gib=memory, fits=memory["total"] <= dev.hbm_gib, samples_per_s=global_batch / step,
        placements=placements, solution=solution,
    )
