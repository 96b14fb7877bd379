"""The system object: a model, a strategy and a cluster composed into one step's tasks.

`build_step` turns the parts (device roofline, links and collectives, layer operators,
memory formulas, the pipeline schedule) into what the event simulator replays: for every
virtual stage the duration of a forward and of a backward of one microbatch, the pipeline
transfers, the data-parallel gradient buckets, the optimizer step, and the memory of every
pipeline rank. Ranks that differ only in their data- or tensor-parallel index behave alike,
so one pipeline of ranks stands for the whole cluster.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from costmodel.cluster import Cluster
from costmodel.collectives import all_gather_s, all_reduce_s, reduce_scatter_s, send_recv_s
from costmodel.flops import hardware_flops_per_step, model_flops_per_step
from costmodel.hardware import GIB
from costmodel.layer import BlockPrice, LayerCost, Part, ends_cost, layer_cost
from costmodel.memory import layer_activation_bytes, saved_matmul_outputs_bytes, zero_model_state_bytes
from costmodel.moe import expert_layout, expert_shard
from costmodel.network import Group
from costmodel.schedule import Task, build, peak_in_flight, split_backward
from costmodel.spec import ModelSpec
from costmodel.strategy import Recompute, Strategy
from costmodel.validate import check_strategy, stage_layer_counts

@dataclass(frozen=True, slots=True, kw_only=True)
class RankMemory:
    """Bytes one GPU of a pipeline rank holds at its peak."""

    parameters: float
    gradients: float
    optimizer: float
    activations: float
    other: float
    experts: float = 0.0  # of parameters + gradients + optimizer: the routed experts' share (shown, not added)

    @property
    def total(self) -> float:
        return self.parameters + self.gradients + self.optimizer + self.activations + self.other

    def gib(self) -> dict[str, float]:
        out = {
            "parameters": self.parameters / GIB, "gradients": self.gradients / GIB, "optimizer": self.optimizer / GIB,
            "activations": self.activations / GIB, "other": self.other / GIB, "total": self.total / GIB,
        }
        if self.experts:
            out["experts"] = self.experts / GIB
        return out


@dataclass(frozen=True, slots=True, kw_only=True)
class Bucket:
    ready_s: float  # after the start of the last backward of its chunk
    comm_s: float


@dataclass(frozen=True, slots=True, kw_only=True)
class StepModel:
    spec: ModelSpec
    strategy: Strategy
    cluster: Cluster
    layers: tuple[int, ...]  # per virtual stage
    orders: list[list[Task]]  # per pipeline rank
    forward: tuple[Part, ...]  # per virtual stage, one microbatch
    forward_first: tuple[Part, ...]  # the first microbatch (ZeRO-1/2 parameter all-gather)
    backward: tuple[Part, ...]  # under a split-backward schedule (zero bubble): its input-gradient half
    buckets: tuple[tuple[Bucket, ...], ...]  # per virtual stage, in its last backward
    p2p_s: float  # one activation (or its gradient) between neighbouring stages
    dp_comm_s: tuple[float, ...]  # per pipeline rank: all data-parallel traffic of a step
    optimizer_s: tuple[float, ...]  # per pipeline rank
    memory: tuple[RankMemory, ...]  # per pipeline rank
    model_flops: float
    hardware_flops: float
    tokens: int
    # under a split-backward schedule: per virtual stage, the weight-gradient half (its layers'
    # weight-gradient GEMMs), which no other stage waits for; empty otherwise
    backward_weight: tuple[Part, ...] = ()


def overlap_s(compute: list[float], pre: list[float], post: list[float]) -> float:
    """Duration of layers run on a compute stream while a communication stream fetches each
    layer's parameters one layer ahead (`pre`) and reduces its gradients after it (`post`)."""
    n = len(compute)
    comm_free = pre[0] if pre else 0.0
    ready_next = comm_free
    t = 0.0
    for i in range(n):
        start = max(t, ready_next)
        if pre and i + 1 < n:
            comm_free = max(comm_free, start) + pre[i + 1]
            ready_next = comm_free
        t = start + compute[i]
        if post:
            comm_free = max(comm_free, t) + post[i]
    return max(t, comm_free)


def _task(parts: list[Part], layer: Part, n: int, pre: list[float], post: list[float], overlap: bool = True) -> Part:
    """A task's parts (`n` of them the same transformer layer) with the exposed share of its
    FSDP traffic added (all of it where communication cannot overlap compute)."""
    total = layer.scaled(n)
    for p in parts:
        if p is not layer:
            total = total + p
    if not pre and not post:
        return total
    busy = total.total
    if not overlap:
        return total + Part(exposed_comm=sum(pre) + sum(post))
    exposed = overlap_s([p.total for p in parts], pre, post) - busy
    return total + Part(exposed_comm=max(0.0, exposed))


def step_cluster(strategy: Strategy, cluster: Cluster) -> Cluster:
    """The cluster a step of `strategy` is priced on: with data parallelism the GEMMs run at
    the runtime's sustained rate (FSDP/DDP collectives beside the compute take SMs, clocks sag)."""
    sustained = cluster.cost_runtime.gemm_scale(cluster.device.arch)
    if strategy.dp > 1 and sustained != 1.0:
        return replace(cluster, device=replace(cluster.device, compute_sustained=sustained))
    return cluster


def build_step(spec: ModelSpec, strategy: Strategy, cluster: Cluster, block: BlockPrice | None = None) -> StepModel:
    """The step's tasks. `block`: the repeated block's operators priced from its traced graph
    under the sharding chosen for it (`planner.graph_cost`); the layer formulas when None."""
    check_strategy(spec, strategy, cluster.world_size)
    s = strategy if strategy.grad_dtype else strategy.replace(grad_dtype=cluster.runtime.grad_dtype)
    cluster = step_cluster(s, cluster)
    rt = cluster.cost_runtime
    if s.seq_len and s.seq_len != spec.seq_len:
        spec = spec.with_seq_len(s.seq_len)
    pol = s.policy
    shard = s.dp_shard * s.cp  # ZeRO/FSDP shard over data and context parallel ranks alike
    tp_group = cluster.group(s.tp, 1)
    cp_group = cluster.group(s.cp, s.tp)
    shard_group = cluster.group(shard, s.tp)
    replicate_group = cluster.group(s.dp_replicate, s.tp * shard)
    p2p_link = cluster.p2p_link(s.tp * s.cp * s.dp)
    # routed experts: sharded over the expert data-parallel ranks (edp), reduced over them
    layout = expert_layout(spec, s, cluster) if spec.moe else None
    eshard = expert_shard(s) if spec.moe else 1
    eshard_group = cluster.group(eshard, s.ep * layout.etp) if spec.moe else shard_group
    # the replicas of an expert shard: the dense replicas under ZeRO (each holds every expert shard
    # once), every rank holding the same experts (layout.edp of them) without it
    ereplicate_group = (cluster.group(layout.edp // eshard, s.ep * layout.etp * eshard) if spec.moe
                        else replicate_group)
    layers_by_policy = {
        rc: layer_cost(spec, s.replace(recompute=rc, stage_recompute=()), cluster, tp_group, cp_group, block, layout)
        for rc in {s.recompute_of(k) for k in range(s.num_stages)}
    }
    layer = layers_by_policy[s.recompute_of(0)]
    ends = ends_cost(spec, s, cluster, tp_group)
    counts = stage_layer_counts(spec, s)
    k_stages, pp, m = s.num_stages, s.pp, s.num_microbatches

    gathers: dict[tuple[int, float], float] = {}
    scatters: dict[int, float] = {}
    # per parameter: the compute dtype, or fp32 where the runtime gathers fp32 weights
    gather_bytes = 4 if rt.fsdp_param_dtype == "fp32" else pol.param_bytes

    def gather_s(params: int, frozen: float = 0.0, experts: float = 0.0, frozen_experts: float = 0.0) -> float:
        """One all-gather of a layer's weights (frozen ones in bytes)."""
        key = (params, frozen, experts, frozen_experts)
        if key not in gathers:
            gathers[key] = (all_gather_s(params * gather_bytes + frozen, shard_group)
                            + all_gather_s(experts * gather_bytes + frozen_experts, eshard_group))
        return gathers[key]

    def scatter_s(params: int, experts: float = 0.0) -> float:  # one reduce-scatter of a layer's gradients
        if (params, experts) not in scatters:
            scatters[(params, experts)] = (reduce_scatter_s(params * pol.grad_bytes, shard_group)
                                           + reduce_scatter_s(experts * pol.grad_bytes, eshard_group))
        return scatters[(params, experts)]

    fwd, fwd_first, bwd, buckets, sharded_comm, bwd_weight = [], [], [], [], [], []
    split = split_backward(s.schedule)
    ov = cluster.overlaps_comm
    zero = s.zero if shard > 1 else 0
    stages: dict[tuple, tuple] = {}  # stages alike (ends held, layers, recompute) are priced once
    for k, n in enumerate(counts):
        first, last = k == 0, k == k_stages - 1
        key = (first, last, n, s.recompute_of(k))
        if key not in stages:
            layer = layers_by_policy[s.recompute_of(k)]
            f_parts = ([ends.embed_forward] if first else []) + [layer.forward] * n + ([ends.head_forward] if last else [])
            b_parts = ([ends.head_backward] if last else []) + [layer.backward] * n + ([ends.embed_backward] if first else [])
            params = ([ends.embed_params] if first else []) + [layer.params] * n + ([ends.head_params] if last else [])
            frozen = ([ends.embed_frozen_bytes] if first else []) + [layer.frozen_bytes] * n + (
                [ends.head_frozen_bytes] if last else [])
            experts = ([0.0] if first else []) + [layer.expert_params] * n + ([0.0] if last else [])
            frozen_x = [layer.frozen_expert_bytes if zero >= 3 else 0.0] * len(experts)
            # FSDP gathers the frozen weights too; ZeRO-1/2 gather only what the optimizer updated
            gather = ([gather_s(p, f if zero >= 3 else 0.0, x, fx) for p, f, x, fx in zip(params, frozen, experts, frozen_x)]
                      if zero >= 1 else [])
            scatter = [scatter_s(p, x) for p, x in zip(params, experts)] if zero >= 2 else []
            root = ([True] if last else []) + [False] * n + ([True] if first else [])  # FSDP2's root unit holds the ends
            stages[key] = (
                _task(f_parts, layer.forward, n, gather if zero == 3 else [], [], ov),
                _task(f_parts, layer.forward, n, gather if zero >= 1 else [], [], ov),
                _task(b_parts, layer.backward, n, gather[::-1] if zero == 3 else [], scatter[::-1] if zero >= 2 else [], ov),
                _grad_buckets(b_parts, params[::-1], root, s, pol.grad_bytes, shard_group, replicate_group, ov,
                              experts[::-1], eshard_group, ereplicate_group),
                # FSDP traffic of every microbatch: gathers in forward and backward, reduce-scatters
                m * ((2 * sum(gather) if zero == 3 else 0.0) + (sum(scatter) if zero >= 2 else 0.0)),
            )
        f, f1, b, bk, sc = stages[key]
        if split:  # the layers' weight-gradient GEMMs leave the backward for its own task
            w = Part(compute=min(n * layers_by_policy[s.recompute_of(k)].wgrad_s, b.compute))
            b = replace(b, compute=b.compute - w.compute)
            bwd_weight.append(w)
        fwd.append(f)
        fwd_first.append(f1)
        bwd.append(b)
        buckets.append(bk)
        sharded_comm.append(sc)
    layer = layers_by_policy[s.recompute_of(k_stages - 1)]  # its params and buffers: alike under every policy

    orders = build(s.schedule, pp, m, s.virtual_stages)
    per_layer_bytes: dict[Recompute, float] = {}  # a layer's activations under each policy, worked out once
    memory = tuple(_rank_memory(spec, s, cluster, layer, ends, counts, r, per_layer_bytes) for r in range(pp))
    per_policy: dict[Recompute, int] = {}
    for k, n in enumerate(counts):
        per_policy[s.recompute_of(k)] = per_policy.get(s.recompute_of(k), 0) + n
    act = pol.activation_bytes * spec.hidden * s.microbatch_size * (spec.seq_len // s.cp)
    p2p = send_recv_s(act / s.tp, p2p_link) if pp > 1 else 0.0  # Megatron's scatter-gather: 1/tp each
    dp_comm, optim = [], []
    for r in range(pp):
        chunks = range(r, k_stages, pp)
        params = _rank_params(counts, layer, ends, r, pp)
        comm = sum(b.comm_s for k in chunks for b in buckets[k]) + sum(sharded_comm[k] for k in chunks)
        experts = sum(counts[k] * layer.expert_params for k in chunks)
        comm += _gather_total(params, gather_bytes, shard, shard_group, s.zero)
        comm += _gather_total(experts, gather_bytes, eshard, eshard_group, s.zero)
        dp_comm.append(comm)
        optim.append(cluster.device.memory_s((params / (shard if s.zero >= 1 else 1)
                                              + experts / (eshard if s.zero >= 1 else 1)) * rt.optimizer_bytes_per_param)
                     + cluster.device.optimizer_overhead_s(_rank_tensors(spec, s, counts, r, pp), dtensor=s.dp * s.tp * s.cp > 1))
    tokens = s.global_batch * spec.seq_len
    flops_share = 2 / 3 if s.lora else 1.0  # frozen weights skip the weight-gradient GEMMs: 4 N T, not 6 N T
    return StepModel(
        spec=spec, strategy=s, cluster=cluster, layers=counts, orders=orders,
        forward=tuple(fwd), forward_first=tuple(fwd_first), backward=tuple(bwd), buckets=tuple(buckets),
        p2p_s=p2p, dp_comm_s=tuple(dp_comm), optimizer_s=tuple(optim), memory=memory,
        model_flops=flops_share * model_flops_per_step(spec, tokens, spec.seq_len),
        hardware_flops=flops_share * hardware_flops_per_step(spec, tokens, spec.seq_len, per_policy, s.flash_attention),
        tokens=tokens, backward_weight=tuple(bwd_weight),
    )


def _gather_total(params: float, param_bytes: int, shard: int, group: Group, zero: int) -> float:
    """Per-step parameter all-gather traffic of ZeRO-1/2 (once) and ZeRO-3 (counted in tasks)."""
    if shard <= 1 or zero not in (1, 2):
        return 0.0
    return all_gather_s(params * param_bytes, group)


def _grad_buckets(
    b_parts: list[Part], params: list[int], root: list[bool], s: Strategy, grad_bytes: int, shard_group: Group,
    replicate_group: Group, overlap: bool = True, experts: list[float] | None = None,
    expert_group: Group | None = None, expert_replicate_group: Group | None = None,
) -> tuple[Bucket, ...]:
    """Gradient reduction issued during the last backward of a chunk, one per FSDP2 unit as
    the runtime wraps them: each block as its backward ends, the root unit (embedding, final
    norm, head: the parts marked `root`) after the whole backward. ZeRO-0 all-reduces over all
    data-parallel ranks, ZeRO-1 reduce-scatters over the shard group; sharded gradients (and
    ZeRO-2/3) are then all-reduced across HSDP replicas. Without overlap every reduction
    waits for the end of the backward. Routed experts' gradients (`experts`, per part) reduce
    over the ranks holding the same experts (`expert_group` shards them, `expert_replicate_group`
    holds their replicas)."""
    zero = s.zero if shard_group.size > 1 else 0
    if shard_group.size * replicate_group.size == 1 or (zero >= 2 and replicate_group.size == 1):
        return ()
    everyone = _merged(shard_group, replicate_group)
    expert_replicas = expert_replicate_group or replicate_group
    expert_everyone = _merged(expert_group, expert_replicas) if expert_group is not None else everyone
    seen: dict[tuple, float] = {}

    def reduce(full: float, expert: float) -> float:
        if (full, expert) not in seen:
            if zero == 0:
                comm = all_reduce_s(full, everyone) + all_reduce_s(expert, expert_everyone)
            else:
                comm = reduce_scatter_s(full, shard_group) if zero == 1 else 0.0
                comm += all_reduce_s(full / shard_group.size, replicate_group)
                if expert:
                    comm += reduce_scatter_s(expert, expert_group) if zero == 1 else 0.0
                    comm += all_reduce_s(expert / expert_group.size, expert_replicas)
            seen[(full, expert)] = comm
        return seen[(full, expert)]

    end = sum(part.total for part in b_parts)
    out, root_bytes, ready = [], 0.0, 0.0
    for part, p, is_root, x in zip(b_parts, params, root, experts or [0.0] * len(params)):
        ready += part.total
        if is_root:
            root_bytes += p * grad_bytes
        else:
            out.append(Bucket(ready_s=ready if overlap else end, comm_s=reduce(p * grad_bytes, x * grad_bytes)))
    if root_bytes:
        out.append(Bucket(ready_s=end, comm_s=reduce(root_bytes, 0.0)))
    return tuple(out)


def _merged(inner: Group, outer: Group) -> Group:
    """The group of all ranks of `inner` times `outer` (inner ranks adjacent)."""
    size = inner.size * outer.size
    per_node = inner.per_node * (outer.per_node if inner.per_node == inner.size else 1)
    return Group(size=size, per_node=per_node, intra=inner.intra, inter=inner.inter)


def _rank_params(counts, layer: LayerCost, ends, rank: int, pp: int) -> int:
    """Parameters (per tp rank) of the chunks pipeline rank `rank` holds, ends included."""
    chunks = range(rank, len(counts), pp)
    params = sum(counts[k] * layer.params for k in chunks)
    return params + (ends.embed_params if 0 in chunks else 0) + (ends.head_params if len(counts) - 1 in chunks else 0)


def _rank_tensors(spec: ModelSpec, s: Strategy, counts, rank: int, pp: int) -> int:
    """Parameter tensors the optimizer of pipeline rank `rank` visits (LoRA: two per adapter)."""
    chunks = range(rank, len(counts), pp)
    if s.lora:
        return sum(counts[k] for k in chunks) * 2 * len(s.lora_targets)
    embed, head = spec.ends_tensors
    return (sum(counts[k] for k in chunks) * spec.layer_tensors + (embed if 0 in chunks else 0)
            + (head if len(counts) - 1 in chunks else 0))


def _rank_memory(spec, s: Strategy, cluster: Cluster, layer: LayerCost, ends, counts, rank,
                 per_layer_bytes: dict | None = None) -> RankMemory:
    """Pipeline rank `rank`'s memory; `per_layer_bytes` memoizes a layer's activations by its
    recomputation policy across the ranks of one step."""
    per_layer_bytes = {} if per_layer_bytes is None else per_layer_bytes
    pol = s.policy
    k_stages = s.num_stages
    shard = s.dp_shard * s.cp
    seq = spec.seq_len // s.cp
    chunks = list(range(rank, k_stages, s.pp))
    params = _rank_params(counts, layer, ends, rank, s.pp)
    p, g, o = zero_model_state_bytes(
        params, shard, s.zero if shard > 1 else 0,
        param_bytes=pol.param_bytes, grad_bytes=pol.grad_bytes, optimizer_bytes=pol.optimizer_bytes,
    )
    expert_states = 0.0
    if spec.moe:  # routed experts: split over ep (and etp), their states sharded over the expert shard group
        eshard = expert_shard(s)
        xp, xg, xo = zero_model_state_bytes(
            sum(counts[k] * layer.expert_params for k in chunks), eshard, s.zero if eshard > 1 else 0,
            param_bytes=pol.param_bytes, grad_bytes=pol.grad_bytes, optimizer_bytes=pol.optimizer_bytes,
        )
        # LoRA: the experts are frozen base (no states above), their weights sharded the same way
        frozen_x = sum(counts[k] for k in chunks) * layer.frozen_expert_bytes / (eshard if s.zero == 3 and eshard > 1 else 1)
        p, g, o, expert_states = p + xp + frozen_x, g + xg, o + xo, xp + xg + xo + frozen_x
    if s.lora:  # the frozen base: weights only, sharded by FSDP (ZeRO-3)
        frozen = (sum(counts[k] for k in chunks) * layer.frozen_bytes + (ends.embed_frozen_bytes if 0 in chunks else 0)
                  + (ends.head_frozen_bytes if k_stages - 1 in chunks else 0))
        p += frozen / (shard if s.zero == 3 and shard > 1 else 1)
    op_level = cluster.cost_runtime.selective_recompute == "save-matmuls"

    def per_layer(policy: Recompute) -> float:
        if policy not in per_layer_bytes:
            per_layer_bytes[policy] = layer_bytes(policy)
        return per_layer_bytes[policy]

    def layer_bytes(policy: Recompute) -> float:
        if op_level and policy is Recompute.SELECTIVE:
            return saved_matmul_outputs_bytes(spec, seq=seq, batch=s.microbatch_size, tp=s.tp,
                                              sequence_parallel=s.sequence_parallel, bytes_per_value=pol.activation_bytes,
                                              ep=s.ep, expert_tp=s.expert_tp, expert_cv=s.expert_load_cv)
        return layer_activation_bytes(
            spec, seq=seq, batch=s.microbatch_size, tp=s.tp, sequence_parallel=s.sequence_parallel,
            recompute=policy, flash_attention=s.flash_attention, bytes_per_value=pol.activation_bytes,
            ep=s.ep, expert_tp=s.expert_tp, expert_cv=s.expert_load_cv,
        )

    e, b, h = pol.activation_bytes, s.microbatch_size, spec.hidden
    sp_div = s.tp if s.sequence_parallel else 1
    embed_act = (seq * b * h * 0.5 * e / sp_div) if spec.dropout else 0.0  # embedding dropout mask
    head_act = seq * b * (h * e / sp_div + -(-spec.vocab // s.tp) * cluster.cost_runtime.loss_activation_bytes_per_logit)  # final norm input, the loss's logits
    weights = [0.0] * s.virtual_stages
    for c, k in enumerate(chunks):
        weights[c] = counts[k] * per_layer(s.recompute_of(k)) + (embed_act if k == 0 else 0.0) + (head_act if k == k_stages - 1 else 0.0)
    activations = peak_in_flight(s.schedule, s.pp, s.num_microbatches, s.virtual_stages, rank, weights)
    if any(s.recompute_of(k) is Recompute.FULL for k in chunks):  # the layer being recomputed holds its full activations
        activations += per_layer(Recompute.NONE)
    overhead = cluster.device.memory_overhead
    buffers = 0.0
    if s.zero == 3 and shard > 1:  # two layers gathered (current, prefetched) and one unsharded gradient
        params_whole = layer.params + layer.expert_params
        buffers = (2 * (params_whole * pol.param_bytes + layer.frozen_bytes + layer.frozen_expert_bytes)
                   + params_whole * pol.grad_bytes)
    other = overhead.fixed_gib * GIB + buffers + overhead.fragmentation * (p + g + o + activations)
    return RankMemory(parameters=p, gradients=g, optimizer=o, activations=activations, other=other,
                      experts=expert_states)
