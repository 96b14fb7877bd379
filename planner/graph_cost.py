"""planner.graph_cost: price a block's traced graph under the sharding chosen for it.

The step simulator's layer comes from here when the plan's placements are known: every
operator of the repeated block, on the local shapes its chosen strategy leaves one GPU, timed
by the cost model's op-pricing functions (`costmodel.ops`), and the collectives those
strategies imply (`IntraOpSolution.transfers`), forward and backward:

  GEMMs        each linear / matmul at its local (m, k, n); the backward runs two (input and
               weight gradients)
  attention    each scaled_dot_product_attention at its local heads (K and V at their own
               width where the graph repeats them to the query heads first); causal when the
               op is or carries a mask
  memory-bound the graph's pointwise ops, norms, casts, concatenations, grouped as one fused
               kernel would run them: a region is a connected set of memory-bound ops at the
               same depth (the number of GEMM / attention ops before them), so that ops a GEMM
               separates never share a kernel; it reads the values entering it and writes
               those leaving it. Views, transposes, slices and dropout at p = 0 move nothing.
               The training runtime's profile then says how eager kernels compare with fused
               ones (`elementwise_traffic`, `rmsnorm_traffic` for regions with an RMSNorm,
               `rope_traffic` for rotations feeding attention, and K/V repeated before
               attention where the runtime does that, `gqa_repeat`), as the layer formulas do.
  collectives  each producer's output turned once into every placement its consumers need,
               the block's output into the next block's input; once-per-step terms (a
               replicated weight's gradient) spread over the microbatches.
"""

from __future__ import annotations

import math

from costmodel.cluster import Cluster
from costmodel.layer import BlockPrice
from costmodel.ops import attention_s, gemm_s, memory_bound_s
from planner.intra_op import IntraOpSolution, transfer_s
from planner.sharding import dim_of

COMPUTE = {"linear", "matmul", "sdpa", "embedding"}
LAYOUT = {"view", "transpose", "permute", "slice"}
MEMORY = {"pointwise", "norm", "cat", "repeat", "reduce", "softmax", "other"}


def _local(shape: tuple[int, ...], placement: tuple[str, ...], mesh: tuple[int, ...]) -> list[float]:
    local = list(shape)
    for p, n in zip(placement, mesh):
        d = dim_of(p)
        if d is not None and d < len(local):
            local[d] = local[d] / n
    return local


def _is_layout(node: dict, gqa_repeat: bool) -> bool:
    if node["kind"] in LAYOUT:
        return True
    if node["op"] == "aten.dropout.default" and node["args"].get("p", 0.5) == 0:
        return True
    return node["kind"] == "repeat" and not gqa_repeat


def price_block(solution: IntraOpSolution, cluster: Cluster, *, bytes_per_value: int, compute_dtype: str,
                kv_scale: int = 1) -> BlockPrice:
    """The block of `solution` (one microbatch, one GPU) as the step simulator's BlockPrice.
    `kv_scale`: the keys each query attends to over those in the traced block (context
    parallelism traces one rank's share of the sequence; its queries see every rank's keys)."""
    dev, rt, e = cluster.device, cluster.cost_runtime, bytes_per_value
    mesh = solution.mesh.shape
    nodes, choice, inputs = solution.nodes, solution.choice, solution.inputs
    ops = list(inputs)  # the block's ops in execution order
    consumers: dict[str, list[str]] = {}
    for v in ops:
        for u in inputs[v]:
            consumers.setdefault(u, []).append(v)

    def in_local(v: str, pos: int) -> list[float]:
        u = inputs[v][pos]
        return _local(nodes[u]["shape"], choice[v].ins[pos], mesh)

    gemms = attn_f = attn_b = 0.0
    for v in ops:
        kind = nodes[v]["kind"]
        if kind in ("linear", "matmul") and len(inputs[v]) >= 2:
            x, w = in_local(v, 0), in_local(v, 1)
            m = math.prod(x[:-1])
            n = w[0] if kind == "linear" else w[-1]
            gemms += gemm_s(dev, compute_dtype, m, x[-1], n, e)
        elif kind == "sdpa":
            b, heads, t, d = in_local(v, 0)
            k = in_local(v, 1)
            kv_width = k[1] * k[3]
            producer = inputs[v][1]
            while nodes[producer]["kind"] in LAYOUT and inputs.get(producer):
                producer = inputs[producer][0]
            if nodes[producer]["kind"] == "repeat" and inputs.get(producer):  # K before its copy to every query head
                before, after = nodes[inputs[producer][0]]["numel"], nodes[producer]["numel"]
                kv_width = max(k[1] * before / after, 1.0) * k[3]
            f, bk = attention_s(dev, compute_dtype, tokens=b * t, s_kv=k[2] * kv_scale, q_width=heads * d, kv_width=kv_width,
                                batch=b, bytes_per_value=e, causal=nodes[v]["args"].get("causal", True))
            attn_f += f
            attn_b += bk
    elementwise = sum(_region_bytes(r, solution, consumers, rt) for r in _regions(solution, rt.gqa_repeat))
    forward = backward = 0.0
    for _u, _src, _dst, t in solution.transfers():
        seconds = transfer_s(t, solution.mesh, solution.ctx)
        if t.phase == "forward":
            forward += seconds
        else:
            backward += seconds
    backward += sum(choice[v].comm_s for v in solution.choice)  # own collectives (per microbatch)
    params = sum(math.prod(_local(nodes[v]["shape"], choice[v].out, mesh))
                 for v in solution.choice if nodes[v]["kind"] == "param")
    return BlockPrice(
        gemm_s=gemms, attention_forward_s=attn_f, attention_backward_s=attn_b,
        elementwise_s=memory_bound_s(dev, e * elementwise * rt.elementwise_traffic),
        tp_forward_s=forward, tp_backward_s=backward, params=round(params), source="graph",
    )


def _depths(solution: IntraOpSolution) -> dict[str, int]:
    """GEMM / attention ops on the longest path from the block's inputs to each op."""
    depth: dict[str, int] = {}
    for v in solution.inputs:
        depth[v] = max((depth.get(u, 0) + (solution.nodes[u]["kind"] in COMPUTE) for u in solution.inputs[v]), default=0)
    return depth


def _regions(solution: IntraOpSolution, gqa_repeat: bool) -> list[set[str]]:
    """Connected sets of memory-bound ops at equal depth that hold some work."""
    nodes, depth = solution.nodes, _depths(solution)
    fusible = {v for v in solution.inputs if nodes[v]["kind"] in MEMORY | LAYOUT}
    parent = {v: v for v in fusible}

    def find(v: str) -> str:
        while parent[v] != v:
            parent[v] = parent[parent[v]]
            v = parent[v]
        return v

    for v in fusible:
        if nodes[v]["kind"] == "repeat" and gqa_repeat:
            continue  # a copy of its own: K and V written out to every query head
        for u in solution.inputs[v]:
            if u in fusible and depth[u] == depth[v] and not (nodes[u]["kind"] == "repeat" and gqa_repeat):
                parent[find(u)] = find(v)
    groups: dict[str, set[str]] = {}
    for v in fusible:
        groups.setdefault(find(v), set()).add(v)
    return [g for g in groups.values() if any(not _is_layout(nodes[v], gqa_repeat) for v in g)]


def _region_bytes(region: set[str], solution: IntraOpSolution, consumers: dict[str, list[str]], rt) -> float:
    """Values (elements on one GPU) a fused kernel over `region` reads and writes, scaled by
    the runtime's eager traffic for norms and rotations."""
    nodes, choice, mesh = solution.nodes, solution.choice, solution.mesh.shape
    read: dict[str, float] = {}
    for v in region:
        for pos, u in enumerate(solution.inputs[v]):
            if u not in region and nodes[u]["kind"] not in ("param", "buffer"):
                read[u] = max(read.get(u, 0.0), math.prod(_local(nodes[u]["shape"], choice[v].ins[pos], mesh)))
    written = 0.0
    for v in region:
        outside = [c for c in consumers.get(v, []) if c not in region]
        if outside or not consumers.get(v) or (solution.chain and v == solution.chain[0]):
            written += math.prod(_local(nodes[v]["shape"], choice[v].out, mesh))
    total = sum(read.values()) + written
    ops = {nodes[v]["op"] for v in region}
    rms = "aten.rms_norm.default" in ops or ("aten.rsqrt.default" in ops and "aten.var_mean.correction" not in ops
                                              and "aten.var.correction" not in ops)
    if rms and rt.rmsnorm_traffic != 1.0:  # the norm's own read and write, at the runtime's eager traffic
        norm_in = max((read.get(u, 0.0) for v in region for u in solution.inputs[v] if u in read), default=0.0)
        total += (rt.rmsnorm_traffic - 1.0) * 2 * norm_in
    feeds_attention = any(nodes[c]["kind"] == "sdpa" or nodes[c]["kind"] == "repeat"
                          for v in region for c in consumers.get(v, []) if c not in region)
    if feeds_attention and any(nodes[v]["kind"] == "cat" for v in region):
        total *= rt.rope_traffic
    return total
