"""The operators of one transformer layer (and of the embedding and head) on one GPU:
FLOPs and bytes of each, timed by the device's roofline, plus the tensor- and
context-parallel collectives the layer issues.

Per GPU, a layer sees T = b * s/cp tokens; tensor parallelism splits heads and the ffn width
(Megatron's column-then-row split), sequence parallelism splits the norms and elementwise
ops over the tokens. Backward runs two GEMMs (input and weight gradient) per forward GEMM,
2.5x the FLOPs of a fused attention forward (FlashAttention-2), and twice the traffic of
each memory-bound op.
"""

from __future__ import annotations

from dataclasses import dataclass

from costmodel import lora
from costmodel.cluster import Cluster
from costmodel.ops import attention_s, gemm_s
from costmodel.collectives import all_gather_s, all_reduce_s, reduce_scatter_s, send_recv_s
from costmodel.errors import ConfigError
from costmodel.moe import ExpertLayout, expert_layout, moe_cost
from costmodel.network import Group
from costmodel.spec import ModelSpec, Norm, Position
from costmodel.strategy import Recompute, Strategy


@dataclass(frozen=True, slots=True, kw_only=True)
class Part:
    """Seconds spent in each kind of work by one task (a forward or backward of some layers)."""

    compute: float = 0.0
    recompute: float = 0.0
    tp_comm: float = 0.0
    cp_comm: float = 0.0
    exposed_comm: float = 0.0  # data-parallel / FSDP traffic the compute did not hide
    ep_comm: float = 0.0  # expert-parallel all-to-alls (dispatch, combine), on the critical path

    @property
    def total(self) -> float:
        return self.compute + self.recompute + self.tp_comm + self.cp_comm + self.exposed_comm + self.ep_comm

    def __add__(self, other: "Part") -> "Part":
        return Part(
            compute=self.compute + other.compute,
            recompute=self.recompute + other.recompute,
            tp_comm=self.tp_comm + other.tp_comm,
            cp_comm=self.cp_comm + other.cp_comm,
            exposed_comm=self.exposed_comm + other.exposed_comm,
            ep_comm=self.ep_comm + other.ep_comm,
        )

    def scaled(self, k: float) -> "Part":
        return Part(
            compute=self.compute * k, recompute=self.recompute * k, tp_comm=self.tp_comm * k,
            cp_comm=self.cp_comm * k, exposed_comm=self.exposed_comm * k, ep_comm=self.ep_comm * k,
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class LayerCost:
    """One transformer layer for one microbatch on one GPU."""

    forward: Part
    backward: Part  # recompute included
    wgrad_s: float  # weight-gradient GEMM time inside the backward (overlap budget)
    params: int  # trained parameters of the layer on one tp rank (all of them; LoRA: the adapters)
    frozen_bytes: float = 0.0  # bytes of frozen weights on one tp rank (LoRA's base)
    # a mixture of experts, the mean over the layers: routed-expert parameters on one GPU (not
    # in `params`; sharded and reduced over the expert data-parallel ranks)
    expert_params: float = 0.0
    frozen_expert_bytes: float = 0.0  # LoRA: the routed experts on one GPU, frozen in the base precision


@dataclass(frozen=True, slots=True)
class _Shape:
    tokens: int  # T = b * s_local
    rows: int  # tokens seen by norms and elementwise ops (T / tp with sequence parallelism)
    b: int
    s: int  # local sequence (s / cp)
    s_kv: int  # keys each query may attend to (whole sequence)
    h: int
    q: int  # query width per tp rank
    o: int  # attention output width per tp rank (heads x v_head_dim)
    kv: int  # K (or V) width per tp rank
    f: int  # ffn width per tp rank
    heads: int  # attention heads per tp rank
    e: int  # bytes per activation value


def _shape(spec: ModelSpec, strategy: Strategy) -> _Shape:
    tp, cp = strategy.tp, strategy.cp
    b = strategy.microbatch_size
    seq = strategy.seq_len or spec.seq_len
    s = seq // cp
    tokens = b * s
    kv_heads_local = max(spec.kv_heads // tp, 1)
    return _Shape(
        tokens=tokens,
        rows=tokens // tp if strategy.sequence_parallel else tokens,
        b=b, s=s, s_kv=seq, h=spec.hidden, q=spec.q_dim // tp, o=spec.o_dim // tp, kv=kv_heads_local * spec.head_dim,
        f=spec.ffn_hidden // tp, heads=spec.heads // tp, e=strategy.policy.activation_bytes,
    )


def _attention_core(spec: ModelSpec, strategy: Strategy, cluster: Cluster, sh: _Shape) -> tuple[float, float]:
    """(forward, backward) seconds of softmax(QK^T)V for one microbatch."""
    dev, dtype, e = cluster.device, strategy.policy.compute_dtype, sh.e
    if strategy.flash_attention:
        # QK^T over head_dim, AV over v_head_dim: the mean width gives both GEMMs' FLOPs
        full = attention_s(dev, dtype, tokens=sh.tokens, s_kv=sh.s_kv, q_width=(sh.q + sh.o) / 2, kv_width=sh.kv,
                           batch=sh.b, bytes_per_value=e, causal=True)
        windowed = spec.windowed_layers / spec.layers if spec.attention_window < sh.s_kv else 0.0
        if not windowed:
            return full
        # a sliding window: the kernel skips the blocks outside it, as a causal one skips the upper triangle
        keys = 2 * spec.windowed_keys(sh.s_kv)  # the causal kernel's s_kv that does as much work
        near = attention_s(dev, dtype, tokens=sh.tokens, s_kv=keys, q_width=(sh.q + sh.o) / 2, kv_width=sh.kv,
                           batch=sh.b, bytes_per_value=e, causal=True)
        return tuple((1 - windowed) * f + windowed * w for f, w in zip(full, near))
    scores = sh.b * sh.heads * sh.s * sh.s_kv  # (b, heads, s, s_kv) values per tp rank
    bmm = dev.gemm_s(2.0 * sh.tokens * sh.s_kv * sh.q, e * (2 * sh.tokens * sh.q + scores), dtype)
    mask_bytes = 1 if spec.dropout else 0
    # fused scale-mask-softmax (read, write) and dropout (read, write, mask)
    softmax_fwd = dev.memory_s(scores * (2 * e + (2 * e + mask_bytes if spec.dropout else 0)))
    fwd = 2 * bmm + softmax_fwd
    bwd = 4 * bmm + 1.5 * softmax_fwd
    return fwd, bwd


@dataclass(frozen=True, slots=True, kw_only=True)
class BlockPrice:
    """The operators of one transformer block for one microbatch on one GPU, before the
    runtime's host time, weight casts, context parallelism and recomputation are added: from
    the layer formulas (`block_price`) or from the block's traced graph under the sharding the
    ILP chose (`planner.graph_cost`)."""

    gemm_s: float  # forward GEMMs (the backward runs twice their time)
    attention_forward_s: float
    attention_backward_s: float
    elementwise_s: float  # memory-bound kernels of the forward (the backward moves twice the bytes)
    tp_forward_s: float  # tensor-parallel collectives of the forward
    tp_backward_s: float
    params: int  # parameters of the block on one GPU of its tensor-parallel group
    source: str = "formula"  # "formula" | "graph"

    def __post_init__(self) -> None:
        for name in ("gemm_s", "attention_forward_s", "attention_backward_s", "elementwise_s", "tp_forward_s",
                     "tp_backward_s"):
            value = getattr(self, name)
            if not value >= 0:
                raise ConfigError(f"a block's {name} must be >= 0 seconds, got {value!r}")
        if self.params < 0:
            raise ConfigError(f"a block's parameters must be >= 0, got {self.params}")


def block_price(spec: ModelSpec, strategy: Strategy, cluster: Cluster, tp_group: Group) -> BlockPrice:
    """Megatron's layer (column-then-row tensor parallelism, Korthikanti's sequence
    parallelism) priced from the spec's sizes."""
    dev, dtype = cluster.device, strategy.policy.compute_dtype
    sh = _shape(spec, strategy)
    T, e, h = sh.tokens, sh.e, sh.h
    if spec.latent_attention:
        # Megatron's MLA: the down projections (to the latents) replicated, the up projections
        # column-parallel, the output row-parallel
        tp = strategy.tp
        latents = {spec.q_lora_rank, spec.kv_lora_rank + spec.qk_rope_head_dim}
        qkv = sum(gemm_s(dev, dtype, T, a, b if b in latents else b // tp, e)
                  for a, b in spec.attention_weight_shapes()[:-1])
        proj = gemm_s(dev, dtype, T, sh.o, h, e)
    else:
        qkv = gemm_s(dev, dtype, T, h, sh.q + 2 * sh.kv, e)
        proj = gemm_s(dev, dtype, T, sh.q, h, e)
    up_width = 2 * sh.f if spec.gated else sh.f
    dense_share = 1.0 - spec.moe_share  # a MoE layer's MLP: costmodel.moe
    fc1 = dense_share * gemm_s(dev, dtype, T, h, up_width, e)
    fc2 = dense_share * gemm_s(dev, dtype, T, sh.f, h, e)
    attn_f, attn_b = _attention_core(spec, strategy, cluster, sh)
    rt = cluster.cost_runtime
    row_bytes = sh.rows * h * e
    norm_traffic = rt.rmsnorm_traffic if spec.norm is Norm.RMSNORM else 1.0
    elementwise = 2 * 2 * row_bytes * norm_traffic  # two norms: read + write
    elementwise += 2 * 3 * row_bytes  # two fused bias-dropout-residual adds: two reads, one write
    elementwise += dense_share * (3 if spec.gated else 2) * T * sh.f * e  # activation
    if spec.position is Position.ROPE:
        elementwise += 2 * T * (sh.q + sh.kv) * e * rt.rope_traffic
    if rt.gqa_repeat and sh.kv < sh.q:  # K and V copied out to every query head
        elementwise += 2 * T * (sh.kv + sh.q) * e
    # tensor-parallel collectives of one (b, s, h) activation each (tp_collectives_per_layer)
    act_bytes = T * h * e
    calls = tp_collectives_per_layer(strategy) if tp_group.size > 1 else {"forward": {}, "backward": {}}
    timed = {"all_reduce": all_reduce_s, "all_gather_into_tensor": all_gather_s, "reduce_scatter_tensor": reduce_scatter_s}
    return BlockPrice(
        gemm_s=qkv + proj + fc1 + fc2, attention_forward_s=attn_f, attention_backward_s=attn_b,
        elementwise_s=dev.memory_s(elementwise * rt.elementwise_traffic),
        tp_forward_s=sum(n * timed[op](act_bytes, tp_group) for op, n in calls["forward"].items()),
        tp_backward_s=sum(n * timed[op](act_bytes, tp_group) for op, n in calls["backward"].items()),
        params=_params_per_tp_rank(spec, strategy.tp),
    )


def layer_cost(spec: ModelSpec, strategy: Strategy, cluster: Cluster, tp_group: Group, cp_group: Group,
               price: BlockPrice | None = None, experts: ExpertLayout | None = None) -> LayerCost:
    """One layer: the block's operators (`price`, the formulas' when None) with the runtime's
    host time and weight casts, LoRA's adapters, context parallelism and recomputation; under
    a mixture of experts the mean layer, its sparse MLPs priced by `costmodel.moe` on the
    expert layout (`experts`, the strategy's on `cluster` when None)."""
    dev, dtype = cluster.device, strategy.policy.compute_dtype
    sh = _shape(spec, strategy)
    T, e = sh.tokens, sh.e
    price = price or block_price(spec, strategy, cluster, tp_group)
    gemms, attn_f, attn_b, elem_f = price.gemm_s, price.attention_forward_s, price.attention_backward_s, price.elementwise_s
    # host dispatch the device does not hide (the runtime wraps every block in FSDP2 when dp > 1)
    host_f, host_b = dev.layer_overhead_s(tensor_parallel=strategy.tp > 1, fsdp=strategy.dp > 1)
    # the runtime's own host time, and the weights cast to the compute dtype at each use and
    # their gradients cast back
    rt = cluster.cost_runtime
    cast_f, cast_b = rt.weight_cast_bytes(sharded=strategy.dp > 1)
    params = price.params
    host_f += rt.layer_overhead_us[0] * 1e-6 + dev.memory_s(cast_f * params)
    host_b += rt.layer_overhead_us[1] * 1e-6 + dev.memory_s(cast_b * params)
    if strategy.lora:  # frozen base: input gradients only; adapters: both; QLoRA dequantizes at each use
        adapters = sum(gemm_s(dev, dtype, T, a, r, e) + gemm_s(dev, dtype, T, r, b, e)
                       for a, r, b in lora.adapter_shapes(spec, strategy.lora_targets, strategy.lora_rank, strategy.tp))
        dequant = dev.memory_s(lora.dequant_bytes(spec, strategy.tp, strategy.base_precision))
        fwd_compute = gemms + adapters + dequant + attn_f + elem_f + host_f
        bwd_compute = gemms + 2 * adapters + dequant + attn_b + 2 * elem_f + host_b
        wgrad = adapters
    else:
        fwd_compute = gemms + attn_f + elem_f + host_f
        bwd_compute = 2 * gemms + attn_b + 2 * elem_f + host_b
        wgrad = gemms
    tp_f, tp_b = price.tp_forward_s, price.tp_backward_s
    ep_f = ep_b = 0.0
    expert_params = frozen_experts = 0.0
    if spec.moe:
        share = spec.moe_share
        layout = experts or expert_layout(spec, strategy, cluster)
        sparse = moe_cost(spec, device=dev, dtype=dtype, bytes_per_value=e, batch=sh.b, seq_local=sh.s,
                          tp=strategy.tp, layout=layout, expert_cv=strategy.expert_load_cv,
                          elementwise_traffic=rt.elementwise_traffic, host_us=rt.moe_host_us,
                          frozen=strategy.lora)
        fwd_compute += share * sparse.forward_s
        bwd_compute += share * sparse.backward_s
        wgrad += share * sparse.wgrad_s
        ep_f, ep_b = share * sparse.all_to_all_forward_s, share * sparse.all_to_all_backward_s
        if strategy.ep_overlap:  # hidden behind another microbatch's pass, up to the length of the pass
            ep_f, ep_b = max(0.0, ep_f - fwd_compute), max(0.0, ep_b - bwd_compute)
        local = share * sparse.expert_params
        if strategy.lora:  # the experts are frozen base: no gradient or state; at each use QLoRA dequantizes
            frozen_experts = local * lora.bytes_per_weight(strategy.base_precision, strategy.policy.param_bytes)
            use = (dev.memory_s(lora.dequant_traffic(local, strategy.base_precision)) if strategy.base_precision == "nf4"
                   else dev.memory_s(cast_f * local))  # them, a 16-bit base casts them
            fwd_compute += use
            bwd_compute += use
        else:
            expert_params = local
            fwd_compute += dev.memory_s(cast_f * expert_params)  # the experts' weights cast at use, gradients back
            bwd_compute += dev.memory_s(cast_b * expert_params)
    # -- context parallel: K and V of every cp rank to every other
    cp_f = cp_b = 0.0
    if cp_group.size > 1:
        kv_chunk = 2 * sh.b * sh.s * sh.kv * e  # K and V of one cp rank
        if rt.context_exchange == "all-gather":  # gathered whole, not overlapped; the backward gathers
            gather = all_gather_s(cp_group.size * kv_chunk, cp_group)  # again, recomputes the attention
            cp_f = gather  # and reduce-scatters dK, dV (runtime/context_parallel.py)
            cp_b = gather + reduce_scatter_s(cp_group.size * kv_chunk, cp_group)
            bwd_compute += attn_f
        else:  # a ring of point-to-point exchanges, overlapped with the attention blocks
            link = cp_group.inter if cp_group.nodes > 1 else cp_group.intra
            ring_f = (cp_group.size - 1) * send_recv_s(kv_chunk, link)
            cp_f = max(0.0, ring_f - attn_f)
            cp_b = max(0.0, 2 * ring_f - attn_b)  # K, V forward again and dK, dV back
    # -- recomputation before the backward
    recompute = Recompute(strategy.recompute)
    re_ep = 0.0
    if recompute is Recompute.FULL:  # (the forward's K and V exchange too)
        re_compute, re_tp, re_ep = fwd_compute, tp_f + cp_f, ep_f
    elif recompute is Recompute.SELECTIVE and rt.selective_recompute == "save-matmuls":
        re_compute, re_tp = elem_f, 0.0  # op-level: the memory-bound ops run again, matmuls and attention do not
    elif recompute is Recompute.SELECTIVE and not strategy.flash_attention:
        re_compute, re_tp = attn_f, 0.0
    else:
        re_compute, re_tp = 0.0, 0.0
    frozen = 0.0
    if strategy.lora:
        frozen = lora.frozen_layer_bytes(spec, strategy.tp, strategy.base_precision, strategy.policy.param_bytes)
        params = lora.adapter_params_per_tp_rank(spec, strategy.lora_targets, strategy.lora_rank, strategy.tp)
    return LayerCost(
        forward=Part(compute=fwd_compute, tp_comm=tp_f, cp_comm=cp_f, ep_comm=ep_f),
        backward=Part(compute=bwd_compute, recompute=re_compute, tp_comm=tp_b + re_tp, cp_comm=cp_b,
                      ep_comm=ep_b + re_ep),
        wgrad_s=wgrad,
        params=params,
        frozen_bytes=frozen,
        expert_params=expert_params,
        frozen_expert_bytes=frozen_experts,
    )


def tp_collectives_per_layer(strategy: Strategy) -> dict[str, dict[str, int]]:
    """Megatron's collectives of one layer on the tensor-parallel group, each of a (b, s, h)
    activation: without sequence parallelism an all-reduce after each row-parallel linear
    (forward) and before each column-parallel linear (backward); with it, an all-gather
    before and a reduce-scatter after, each way (Korthikanti et al. 2022, Sec. 4.2.2)."""
    if strategy.tp == 1:
        return {"forward": {}, "backward": {}}
    if strategy.sequence_parallel:
        both = {"all_gather_into_tensor": 2, "reduce_scatter_tensor": 2}
        return {"forward": dict(both), "backward": dict(both)}
    return {"forward": {"all_reduce": 2}, "backward": {"all_reduce": 2}}


def _params_per_tp_rank(spec: ModelSpec, tp: int) -> int:
    """Layer parameters on one tp rank, routed experts left out (a mixture of experts: the
    mean over the layers): matmul weights split, norms and the router replicated (K/V
    replicated when tp exceeds kv_heads)."""
    kv_repeat = max(tp // spec.kv_heads, 1)
    norms = 2 * spec.norm_params
    attention = spec.attention_params + 2 * spec.hidden * spec.kv_dim * (kv_repeat - 1)
    if not spec.moe:
        return (attention + spec.mlp_params) // tp + norms
    share = spec.moe_share
    mlp = (1 - share) * spec.mlp_params / tp + share * (spec.router_params + spec.shared_expert_params / tp)
    return int(attention / tp + mlp + norms)


@dataclass(frozen=True, slots=True, kw_only=True)
class EndsCost:
    """Embedding (first stage) and final norm + logits + loss (last stage), one microbatch."""

    embed_forward: Part
    embed_backward: Part
    head_forward: Part
    head_backward: Part
    embed_params: int  # per tp rank (vocab-parallel)
    head_params: int  # per tp rank; with tied embeddings on pp > 1 the last stage keeps a copy
    embed_frozen_bytes: float = 0.0  # LoRA: the ends are frozen
    head_frozen_bytes: float = 0.0


def ends_cost(spec: ModelSpec, strategy: Strategy, cluster: Cluster, tp_group: Group) -> EndsCost:
    dev, dtype = cluster.device, strategy.policy.compute_dtype
    sh = _shape(spec, strategy)
    T, e, h, tp = sh.tokens, sh.e, sh.h, strategy.tp
    vocab_local = -(-spec.vocab // tp)
    act_bytes = T * h * e
    # embedding: gather rows, add positions, dropout; vocab-parallel needs a reduction over tp
    embed_f = dev.memory_s(3 * sh.rows * h * e)
    embed_b = dev.memory_s(T * h * 4 + sh.rows * h * e)
    reduce = 0.0
    if tp_group.size > 1:
        reduce = reduce_scatter_s(act_bytes, tp_group) if strategy.sequence_parallel else all_reduce_s(act_bytes, tp_group)
    # head: final norm, logits GEMM (vocab split over tp), vocab-parallel cross-entropy in fp32
    logits = gemm_s(dev, dtype, T, h, vocab_local, e)
    rt = cluster.cost_runtime
    norm = dev.memory_s(2 * sh.rows * h * e * rt.elementwise_traffic)
    # the loss over fp32 logits, forward and backward alike (half the runtime's bytes each)
    xent_bytes = rt.cross_entropy_bytes_per_logit / 2 if rt.cross_entropy_bytes_per_logit else e + 3 * 4
    xent = dev.memory_s(T * vocab_local * xent_bytes)
    gather = 0.0
    if tp_group.size > 1:
        gather = all_gather_s(act_bytes, tp_group) if strategy.sequence_parallel else all_reduce_s(act_bytes, tp_group)
        gather += 3 * all_reduce_s(T * 4, tp_group)  # max, sum-exp, target logit
    cast_f, cast_b = rt.weight_cast_bytes(sharded=strategy.dp > 1)  # the output weight's cast, its gradient's
    head_f = Part(compute=norm + logits + dev.memory_s(cast_f * vocab_local * h) + xent, tp_comm=gather)
    head_b = Part(compute=2 * norm + 2 * logits + dev.memory_s(cast_b * vocab_local * h) + xent, tp_comm=gather)
    embed_params = vocab_local * h + (spec.seq_len * h if spec.position is Position.LEARNED else 0)
    head_params = spec.norm_params + (vocab_local * h if not spec.tied_embeddings or strategy.pp > 1 else 0)
    frozen = (0.0, 0.0)
    if strategy.lora:  # frozen ends: no gradient or optimizer state, no weight-gradient GEMM
        head_b = Part(compute=2 * norm + logits + xent, tp_comm=gather)
        embed_b = 0.0
        frozen = (embed_params * strategy.policy.param_bytes, head_params * strategy.policy.param_bytes)
        embed_params = head_params = 0
    return EndsCost(
        embed_forward=Part(compute=embed_f, tp_comm=reduce),
        embed_backward=Part(compute=embed_b),
        head_forward=head_f,
        head_backward=head_b,
        embed_params=embed_params,
        head_params=head_params,
        embed_frozen_bytes=frozen[0],
        head_frozen_bytes=frozen[1],
    )
