"""FLOPs of a training step in the Megatron-LM convention (for MFU and HFU).

Per token and layer the forward runs 2 FLOPs per matmul weight plus 4 s h for attention
(QK^T and AV over the full s x s, not halved for causality), and the logits 2 h V; a step is
three times the forward (Narayanan et al. 2021; Korthikanti et al. 2022 write it for GPT as
72 B L s h^2 (1 + s/(6h) + V/(12 h L))). Hardware FLOPs add what recomputation re-runs.
"""

from __future__ import annotations

from costmodel.spec import ModelSpec
from costmodel.strategy import Recompute


def layer_matmul_weights(spec: ModelSpec) -> float:
    """Matmul weights one token runs through in one layer, the mean over the layers: under a
    mixture of experts the router, its experts_per_token routed experts and the shared ones."""
    h = spec.hidden
    ffn = 3 if spec.gated else 2
    attention = sum(a * b for a, b in spec.attention_weight_shapes())
    dense = ffn * h * spec.ffn_hidden
    if not spec.moe:
        return attention + dense
    sparse = (h * spec.experts + ffn * h * (spec.experts_per_token * spec.expert_ffn_hidden
                                            + spec.shared_expert_ffn_hidden))
    return attention + spec.moe_share * sparse + (1 - spec.moe_share) * dense


def forward_flops_per_token(spec: ModelSpec, seq: int) -> tuple[float, float, float]:
    """(matmul FLOPs of one layer, attention FLOPs of one layer, logits FLOPs) per token. The
    attention's QK^T runs over query/key heads of head_dim, its AV over value heads of
    v_head_dim (the two differ under multi-head latent attention)."""
    return 2.0 * layer_matmul_weights(spec), 2.0 * seq * (spec.q_dim + spec.o_dim), 2.0 * spec.hidden * spec.vocab


def model_flops_per_step(spec: ModelSpec, tokens: int, seq: int) -> float:
    matmul, attn, logits = forward_flops_per_token(spec, seq)
    return 3.0 * tokens * (spec.layers * (matmul + attn) + logits)


def hardware_flops_per_step(spec: ModelSpec, tokens: int, seq: int, recompute: dict[Recompute, int], flash: bool) -> float:
    """`recompute`: how many layers run under each recompute policy."""
    matmul, attn, _ = forward_flops_per_token(spec, seq)
    extra = tokens * recompute.get(Recompute.FULL, 0) * (matmul + attn)
    if not flash:
        extra += tokens * recompute.get(Recompute.SELECTIVE, 0) * attn
    return model_flops_per_step(spec, tokens, seq) + extra
