"""FLOPs of a training step in the Megatron-LM convention (for MFU and HFU).

Per token and layer the forward runs 2 FLOPs per matmul weight plus 4 s h for attention
(QK^T and AV over the full s x s, not halved for causality), and the logits 2 h V; a step is
three times the forward (Narayanan et al. 2021; Korthikanti et al. 2022 write it for GPT as
72 B L s h^2 (1 + s/(6h) + V/(12 h L))). Hardware FLOPs add what recomputation re-runs.
"""

from __future__ import annotations

from costmodel.spec import ModelSpec
from costmodel.strategy import Recompute


def layer_matmul_weights(spec: ModelSpec) -> int:
    h, f = spec.hidden, spec.ffn_hidden
    mlp = (3 if spec.gated else 2) * h * f
    return 2 * h * spec.q_dim + 2 * h * spec.kv_dim + mlp


def forward_flops_per_token(spec: ModelSpec, seq: int) -> tuple[float, float, float]:
    """(matmul FLOPs of one layer, attention FLOPs of one layer, logits FLOPs) per token."""
    return 2.0 * layer_matmul_weights(spec), 4.0 * seq * spec.q_dim, 2.0 * spec.hidden * spec.vocab


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
