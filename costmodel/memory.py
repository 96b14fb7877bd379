"""Memory per GPU: model states under ZeRO and activations per Korthikanti et al.

Model states (Rajbhandari et al., ZeRO, SC 2020), for P parameters over a sharding group
of Nd ranks with p/g/k bytes per parameter of weights/gradients/optimizer:

    stage 0:  (p + g + k) P            stage 2:  p P + (g + k) P / Nd
    stage 1:  (p + g) P + k P / Nd     stage 3:  (p + g + k) P / Nd

Activations of one transformer layer (Korthikanti et al., "Reducing Activation Recomputation
in Large Transformer Models", Sec. 4), for s tokens, microbatch b, hidden h, a heads, tensor
parallel size t, 16-bit activations:

    no parallelism                 s b h (34 + 5 a s / h)
    tensor parallel                s b h (10 + 24/t + 5 a s / (h t))
    tensor + sequence parallel     s b h / t (34 + 5 a s / h)
    selective recompute            drops the 5 a s / h terms
    full recompute                 2 s b h (the layer input only)

`layer_activation_bytes` builds these from the tensors each op keeps, so that the same code
covers GQA (narrower K and V), SwiGLU (three ffn-wide tensors), no dropout, FlashAttention
(no s x s tensors) and fp32 activations; for GPT it reduces to the formulas above exactly.
"""

from __future__ import annotations

from costmodel.moe import EXPERT_LOAD_CV, rank_imbalance
from costmodel.spec import ModelSpec
from costmodel.strategy import Recompute


def moe_mlp_activation_bytes(spec: ModelSpec, *, seq: int, batch: int, tp: int, ep: int, expert_tp: int,
                             bytes_per_value: int = 2, expert_cv: float = EXPERT_LOAD_CV) -> float:
    """Bytes the sparse MLP of one MoE layer keeps for its backward on the busiest GPU: the
    router's fp32 logits, the dispatched token copies, the experts' up-projection and
    activation outputs, the copies before the combine; the shared experts like a dense MLP.
    With tp > 1 the layer runs sequence parallel (b s / tp tokens per rank; an expert split
    over etp ranks sees its tp group's gathered copies at 1/etp of the width)."""
    e, h = bytes_per_value, spec.hidden
    etp = expert_tp or tp
    t = seq * batch / tp
    copies = t * spec.experts_per_token * etp * rank_imbalance(spec.experts, ep, expert_cv)
    fe = spec.expert_ffn_hidden / etp
    up = (2 if spec.gated else 1) * fe
    routed = copies * e * (2 * h + up + fe)
    shared = seq * batch * (3 if spec.gated else 2) * e * spec.shared_expert_ffn_hidden / tp
    return t * spec.experts * 4 + routed + shared


def _mlp_bytes(spec: ModelSpec, dense: float, *, seq: int, batch: int, tp: int, ep: int, expert_tp: int, e: int,
               expert_cv: float) -> float:
    """A layer's MLP activations, the mean over the layers of a mixture of experts."""
    if not spec.moe:
        return dense
    share = spec.moe_share
    sparse = moe_mlp_activation_bytes(spec, seq=seq, batch=batch, tp=tp, ep=ep, expert_tp=expert_tp, bytes_per_value=e,
                                      expert_cv=expert_cv)
    return (1 - share) * dense + share * sparse


def zero_model_state_bytes(
    params: float, shard: int, zero: int, *, param_bytes: float, grad_bytes: float, optimizer_bytes: float
) -> tuple[float, float, float]:
    """(parameters, gradients, optimizer) bytes per GPU under ZeRO stage `zero` over `shard` ranks."""
    p = params * param_bytes / (shard if zero >= 3 else 1)
    g = params * grad_bytes / (shard if zero >= 2 else 1)
    k = params * optimizer_bytes / (shard if zero >= 1 else 1)
    return p, g, k


def layer_activation_bytes(
    spec: ModelSpec,
    *,
    seq: int,
    batch: int,
    tp: int,
    sequence_parallel: bool,
    recompute: Recompute,
    flash_attention: bool,
    bytes_per_value: int = 2,
    ep: int = 1,
    expert_tp: int = 0,
    expert_cv: float = EXPERT_LOAD_CV,
) -> float:
    """Bytes one transformer layer keeps from its forward to its backward, per GPU (a mixture
    of experts: the mean layer)."""
    s, b, h, a = seq, batch, spec.hidden, spec.heads
    e = bytes_per_value
    sp_div = tp if sequence_parallel else 1
    if recompute is Recompute.FULL:
        return e * s * b * h / sp_div
    kv = spec.kv_dim * (max(spec.kv_heads, tp) / spec.kv_heads)  # K/V width summed over the tp ranks
    f = spec.ffn_hidden
    mask = 0.5 * e if spec.dropout else 0.0  # one byte per value for a dropout mask at e = 2
    # kept whole on every tp rank unless sequence parallel: two norm inputs, QKV and fc1 inputs,
    # the two dropout masks after the projections
    replicated = s * b * h * (4 * e + 2 * mask)
    # split over tp: Q, K, V, the attention output; the MLP's ffn-wide tensors
    ffn_tensors = 3 if spec.gated else 2
    q, o = spec.q_dim, spec.o_dim
    mlp = _mlp_bytes(spec, s * b * ffn_tensors * e * f / tp, seq=s, batch=b, tp=tp, ep=ep, expert_tp=expert_tp, e=e,
                     expert_cv=expert_cv)
    sharded = s * b * (e * q + 2 * e * kv + e * o) + mlp * tp
    # the s x s tensors: softmax output, and with dropout its mask and output
    scores = 0.0
    if not flash_attention and recompute is Recompute.NONE:
        scores = a * s * s * b * (e + (mask + e if spec.dropout else 0.0))
    return replicated / sp_div + (sharded + scores) / tp


def saved_matmul_outputs_bytes(spec: ModelSpec, *, seq: int, batch: int, tp: int, sequence_parallel: bool,
                               bytes_per_value: int = 2, ep: int = 1, expert_tp: int = 0,
                               expert_cv: float = EXPERT_LOAD_CV) -> float:
    """Bytes a layer keeps under op-level selective checkpointing that saves the outputs of
    the matmuls and of fused attention and recomputes everything else (torchtitan's "op"
    policy; paraplan's runtime): the block input, Q/K/V, the attention output and its
    log-sum-exp, the projections' outputs (whole h on every tp rank: saved before the
    reduction), the MLP's up projection."""
    s, b, h, e = seq, batch, spec.hidden, bytes_per_value
    sp_div = tp if sequence_parallel else 1
    kv = spec.kv_dim * (max(spec.kv_heads, tp) / spec.kv_heads)
    up = (2 if spec.gated else 1) * spec.ffn_hidden
    mlp = _mlp_bytes(spec, s * b * e * up / tp, seq=s, batch=b, tp=tp, ep=ep, expert_tp=expert_tp, e=e,
                     expert_cv=expert_cv)
    per_token = e * (h / sp_div + (spec.q_dim + 2 * kv + spec.o_dim) / tp + 2 * h) + 4 * spec.heads / tp
    return s * b * per_token + mlp


def korthikanti_layer_bytes(s: int, b: int, h: int, a: int, t: int, *, sp: bool, recompute: str) -> float:
    """The paper's closed forms (Table 2), for golden tests against `layer_activation_bytes`."""
    if recompute == "full":
        return 2 * s * b * h
    if sp:
        return s * b * h / t * (34 + (0 if recompute == "selective" else 5 * a * s / h))
    return s * b * h * (10 + 24 / t + (0 if recompute == "selective" else 5 * a * s / (h * t)))


def interleaved_first_stage_factor(pp: int, virtual_stages: int) -> float:
    """Korthikanti Eq. 5: with interleaving the first stage keeps L (1 + (p-1)/(p v)) layers' worth."""
    return 1 + (pp - 1) / (pp * virtual_stages) if virtual_stages > 1 else 1.0
