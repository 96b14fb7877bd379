"""LoRA and QLoRA fine-tuning: frozen base weights, trained low-rank adapters.

A target linear W (in -> out) gains B A with A: r x in and B: out x r (Hu et al. 2021). Under
tensor parallelism the adapter follows its base: a column-parallel W keeps A whole and splits
B's rows; a row-parallel W splits A's columns and keeps B whole. So per tp rank:

    column-parallel (q, k, v, up, gate)   r * in + r * out / tp
    row-parallel    (o, down)             r * in / tp + r * out

(latent attention's down projections q_a and kv_a stay whole on every rank: r * (in + out); its
q_b and kv_b are column-parallel).

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

TARGETS = ("q", "k", "v", "o", "up", "gate", "down", "q_a", "q_b", "kv_a", "kv_b")
# multi-head latent attention's own projections (DeepSeek's q_a_proj, q_b_proj, kv_a_proj_with_mqa,
# kv_b_proj, as PEFT's target_modules name them for it); q is its q_proj where it has no q rank
LATENT_TARGETS = ("q_a", "q_b", "kv_a", "kv_b")
DEFAULT_TARGETS = ("q", "k", "v", "o")
NF4_BYTES_PER_WEIGHT = 4.127 / 8  # QLoRA, Sec. 3: 4-bit NF4 plus 0.127 bits of double-quantized constants
BASE_PRECISIONS = ("bf16", "nf4")
MODULES = {"q": "attention.wq", "k": "attention.wk", "v": "attention.wv", "o": "attention.wo",
           "up": "feed_forward.w1", "gate": "feed_forward.w3", "down": "feed_forward.w2"}


def default_targets(spec: ModelSpec) -> tuple[str, ...]:
    """The adapters' targets where none are given: q, k, v, o; latent attention's own projections
    for a model with it (q or q_a and q_b, kv_a, kv_b, o: what PEFT users target on DeepSeek)."""
    if spec.latent_attention:
        return (("q_a", "q_b") if spec.q_lora_rank else ("q",)) + ("kv_a", "kv_b", "o")
    return DEFAULT_TARGETS


def target_shapes(spec: ModelSpec) -> dict[str, tuple[int, int, str]]:
    """Target -> (in, out, split over tp: "column", "row" or "whole") for the linears of one
    block. Latent attention has no k or v of its own: q (without a q rank) or q_a -> q_b, kv_a
    (the latent and the rope key, whole on every rank as Megatron-Core keeps the down projections),
    kv_b (each head's no-RoPE key and value from the latent), o (heads x v_head_dim in)."""
    h, q, kv, f = spec.hidden, spec.q_dim, spec.kv_dim, spec.ffn_hidden
    if spec.latent_attention:
        rope, v = spec.qk_rope_head_dim, spec.heads * spec.v_head_dim
        attention = {"kv_a": (h, spec.kv_lora_rank + rope, "whole"),
                     "kv_b": (spec.kv_lora_rank, spec.heads * (spec.head_dim - rope) + v, "column"),
                     "o": (v, h, "row")}
        attention.update({"q_a": (h, spec.q_lora_rank, "whole"), "q_b": (spec.q_lora_rank, q, "column")}
                         if spec.q_lora_rank else {"q": (h, q, "column")})
    else:
        attention = {"q": (h, q, "column"), "k": (h, kv, "column"), "v": (h, kv, "column"), "o": (q, h, "row")}
    shapes = {**attention, "up": (h, f, "column"), "down": (f, h, "row")}
    if spec.gated:
        shapes["gate"] = (h, f, "column")
    return shapes


def adapter_shapes(spec: ModelSpec, targets, rank: int, tp: int) -> list[tuple[int, int, int]]:
    """(in, r, out) per target on one tp rank: the two GEMMs x A^T then (x A^T) B^T."""
    out = []
    for name in targets:
        n_in, n_out, split = target_shapes(spec)[name]
        out.append((n_in, rank, n_out // tp) if split == "column" else (n_in // tp, rank, n_out) if split == "row"
                   else (n_in, rank, n_out))
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
