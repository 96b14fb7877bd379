"""LoRA and QLoRA fine-tuning: frozen base weights, trained low-rank adapters.

A target linear W (in -> out) gains B A with A: r x in and B: out x r (Hu et al. 2021). Under
tensor parallelism the adapter follows its base: a column-parallel W keeps A whole and splits
B's rows; a row-parallel W splits A's columns and keeps B whole. So per tp rank:

    column-parallel (q, k, v, up, gate)   r * in + r * out / tp
    row-parallel    (o, down)             r * in / tp + r * out

Only adapters have gradients and optimizer states; data-parallel traffic carries only their
gradients. The frozen base keeps its weights in 16 bits, or in 4-bit NormalFloat (QLoRA,
Dettmers et al. 2023): blocks of 64 with double-quantized constants, 4.127 bits per weight,
dequantized to 16 bits (read 0.516 B, write 2 B per weight) at every use. The backward of a
frozen linear computes only the input gradient (no weight-gradient GEMM). Embeddings, norms
and the head stay frozen in 16 bits. A mixture of experts' routed experts are part of the
frozen base (the adapters go on attention and dense MLPs): held as the expert layout places
them, in the base precision, with no gradient or optimizer state.
"""

from __future__ import annotations

from costmodel.spec import ModelSpec

TARGETS = ("q", "k", "v", "o", "up", "gate", "down")
DEFAULT_TARGETS = ("q", "k", "v", "o")
NF4_BYTES_PER_WEIGHT = 4.127 / 8  # QLoRA, Sec. 3: 4-bit NF4 plus 0.127 bits of double-quantized constants
BASE_PRECISIONS = ("bf16", "nf4")
MODULES = {"q": "attention.wq", "k": "attention.wk", "v": "attention.wv", "o": "attention.wo",
           "up": "feed_forward.w1", "gate": "feed_forward.w3", "down": "feed_forward.w2"}


def target_shapes(spec: ModelSpec) -> dict[str, tuple[int, int, bool]]:
    """Target -> (in, out, column-parallel) for the linears of one block."""
    h, q, kv, f = spec.hidden, spec.q_dim, spec.kv_dim, spec.ffn_hidden
    shapes = {"q": (h, q, True), "k": (h, kv, True), "v": (h, kv, True), "o": (q, h, False),
              "up": (h, f, True), "down": (f, h, False)}
    if spec.gated:
        shapes["gate"] = (h, f, True)
    return shapes


def adapter_shapes(spec: ModelSpec, targets, rank: int, tp: int) -> list[tuple[int, int, int]]:
    """(in, r, out) per target on one tp rank: the two GEMMs x A^T then (x A^T) B^T."""
    out = []
    for name in targets:
        n_in, n_out, column = target_shapes(spec)[name]
        out.append((n_in, rank, n_out // tp) if column else (n_in // tp, rank, n_out))
    return out


def adapter_params_per_tp_rank(spec: ModelSpec, targets, rank: int, tp: int) -> int:
    return sum(rank * (a + b) for a, _, b in adapter_shapes(spec, targets, rank, tp))


def linear_weights_per_tp_rank(spec: ModelSpec, tp: int) -> int:
    """Weights of the block's linears on one tp rank (what QLoRA quantizes), the mean over the
    layers; a mixture of experts' routed experts aside (the expert layout holds them)."""
    kv_repeat = max(tp // spec.kv_heads, 1)
    routed = spec.moe_layers * spec.experts * spec.expert_params // spec.layers if spec.moe else 0
    return (spec.layer_params - routed - 2 * spec.norm_params + 2 * spec.hidden * spec.kv_dim * (kv_repeat - 1)) // tp


def bytes_per_weight(base_precision: str, bytes_16: int) -> float:
    """A frozen linear weight's bytes: NF4's (QLoRA) or the 16-bit base's."""
    return NF4_BYTES_PER_WEIGHT if base_precision == "nf4" else bytes_16


def frozen_layer_bytes(spec: ModelSpec, tp: int, base_precision: str, bytes_16: int) -> float:
    """Bytes of one block's frozen base on one tp rank: linears in the base precision, norms in 16 bits
    (routed experts aside)."""
    return linear_weights_per_tp_rank(spec, tp) * bytes_per_weight(base_precision, bytes_16) + 2 * spec.norm_params * bytes_16


def dequant_traffic(weights: float, base_precision: str) -> float:
    """Memory traffic to dequantize `weights` frozen weights once (0 for a 16-bit base)."""
    return weights * (NF4_BYTES_PER_WEIGHT + 2) if base_precision == "nf4" else 0.0


def dequant_bytes(spec: ModelSpec, tp: int, base_precision: str) -> float:
    """Memory traffic to dequantize one block's linears once (routed experts aside)."""
    return dequant_traffic(linear_weights_per_tp_rank(spec, tp), base_precision)
