"""The shape of a decoder-only transformer, as the cost model sees it.

One `ModelSpec` describes GPT-style models (learned positions, LayerNorm, GELU MLP, biases,
dropout) and Llama-style models (RoPE, RMSNorm, SwiGLU, grouped-query attention, no biases),
with two extensions of today's sparse models:

- mixture of experts (Mixtral, Qwen2/3-MoE, DeepSeek-V2/V3): `experts` routed expert MLPs of
  width `expert_ffn_hidden`, `experts_per_token` of them per token (top-k), a router (a linear
  h -> experts), optional shared experts every token runs (`shared_expert_ffn_hidden`, their
  summed width; Qwen2-MoE gates its shared expert with a sigmoid: `shared_expert_gate`), the
  first `dense_layers` layers dense (DeepSeek's first_k_dense_replace) and, after those, every
  `moe_every`-th layer sparse (Qwen2-MoE's decoder_sparse_step, Llama 4's interleave step);
  `capacity_factor` 0 is dropless routing;
- multi-head latent attention (DeepSeek-V2/V3, `kv_lora_rank` > 0): K and V come up from a
  compressed latent of `kv_lora_rank` values plus a shared RoPE key of `qk_rope_head_dim`,
  which is all the KV cache keeps; Q from an optional `q_lora_rank` latent; `head_dim` is the
  query/key head width (no-RoPE plus RoPE parts), `v_head_dim` the value head width.

Parameter counts here are exact for the zoo's `nn.Module` definitions and transformers'
classes (tested).
"""

from __future__ import annotations

import math

from dataclasses import dataclass, fields, replace
from enum import StrEnum

from costmodel.errors import ConfigError


class Activation(StrEnum):
    GELU = "gelu"
    SWIGLU = "swiglu"  # SiLU-gated MLP (gate, up, down): Llama
    GEGLU = "geglu"  # GELU-gated MLP (gate, up, down): Gemma


class Norm(StrEnum):
    LAYERNORM = "layernorm"
    RMSNORM = "rmsnorm"


class Position(StrEnum):
    LEARNED = "learned"
    ROPE = "rope"
    NONE = "none"  # no position signal beyond the causal mask (NoPE)


ROUTER_SCORES = ("softmax", "sigmoid", "sparsemixer")  # how a router scores the experts (ModelSpec.router_score)

@dataclass(frozen=True, slots=True, kw_only=True)
class ModelSpec:
    """Sizes of a decoder-only transformer. `ffn_hidden` defaults to 4*hidden, `kv_heads` to
    heads (multi-head attention) and `head_dim` to hidden/heads (Gemma and Qwen3 give their
    own: the attention's width heads*head_dim need not be hidden)."""

    name: str = "custom"
    layers: int
    hidden: int
    heads: int
    vocab: int
    seq_len: int
    ffn_hidden: int = 0
    kv_heads: int = 0
    activation: Activation = Activation.GELU
    norm: Norm = Norm.LAYERNORM
    position: Position = Position.LEARNED
    tied_embeddings: bool = True
    bias: bool = True
    dropout: bool = True
    head_dim: int = 0
    # mixture of experts (experts 0: dense)
    experts: int = 0
    experts_per_token: int = 0
    expert_ffn_hidden: int = 0
    shared_expert_ffn_hidden: int = 0
    shared_expert_gate: bool = False
    dense_layers: int = 0
    moe_every: int = 1
    capacity_factor: float = 0.0
    # sliding-window attention: a query sees the last attention_window tokens (0: all before it), in
    # windowed_layers of the layers (0 with a window: all; Gemma-2 alternates, Qwen2 windows the top ones)
    attention_window: int = 0
    windowed_layers: int = 0
    # the windowed layers attend within fixed chunks of attention_window tokens instead (Llama 4's chunked
    # attention: a query sees the keys of its own chunk, from the chunk's start), keeping a chunk's KV
    attention_chunked: bool = False
    # multi-head latent attention (kv_lora_rank 0: none)
    kv_lora_rank: int = 0
    q_lora_rank: int = 0
    qk_rope_head_dim: int = 0
    v_head_dim: int = 0
    # the longest sequence the model reads (Hugging Face's max_position_embeddings, vLLM's default
    # max_model_len): what serving may fill; 0: seq_len (which is what training runs at)
    max_positions: int = 0
    # next-token prediction modules the checkpoint carries beside the model (DeepSeek-V3's and
    # GLM-4.5's num_nextn_predict_layers): not in the model's own forward or its parameter count;
    # vLLM's mtp proposer drafts with them
    mtp_layers: int = 0
    # RoPE's base (a config's rope_theta): 0 is the classic 10,000. It prices nothing; the built-in
    # model rotates with it and the engine exports write it (Llama 3's 500,000, Qwen3's 1,000,000)
    rope_theta: float = 0.0
    # an RMSNorm on each head's query and key before RoPE (Qwen3, Gemma 3; Megatron-LM's
    # --qk-layernorm): 2 x head_dim weights a layer; the built-in model builds it and the engine
    # exports write it, or they describe another model
    qk_norm: bool = False
    # RoPE's scaling (a config's rope_scaling, transformers 5's rope_parameters): "" none; "llama3" (Llama
    # 3.1-3.3: low frequencies stretched by rope_factor over rope_original_positions, 8 over 8,192);
    # "yarn" (DeepSeek-V2/V3, gpt-oss: rope_factor over rope_original_positions, with the attention
    # temperature terms rope_mscale and rope_mscale_all_dim, 0 where the config gives none). It prices
    # nothing: the model's numbers, which the engine exports write (Megatron-LM's --use-rope-scaling,
    # --rotary-scaling-factor) or a checkpoint loaded there would rotate otherwise
    rope_scaling: str = ""
    rope_factor: float = 0.0
    rope_original_positions: int = 0
    rope_mscale: float = 0.0
    rope_mscale_all_dim: float = 0.0
    # a mixture of experts' router: each expert's score ("softmax" over the experts, or "sigmoid" each,
    # DeepSeek-V3's; "sparsemixer", Phi-3.5-MoE's masked softmaxes of its top-2), the top-k weights
    # renormalised to sum to 1 (Mixtral, Qwen3-MoE) or not (Qwen2-MoE, DeepSeek-V2), the top-k taken
    # within the best router_group_topk of router_groups expert groups (DeepSeek-V3: 4 of 8; 0: no
    # groups), the weights scaled by router_topk_scale (its 2.5) and a
    # per-expert bias that steers the choice only (auxiliary-loss-free balancing). Prices nothing;
    # the exports write it (Megatron-Core's --moe-router-* flags)
    router_score: str = "softmax"
    router_renormalize: bool = True
    router_groups: int = 0
    router_group_topk: int = 0
    router_topk_scale: float = 1.0
    router_expert_bias: bool = False

    def __post_init__(self) -> None:
        for name in ("layers", "hidden", "heads", "vocab", "seq_len"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"model field '{name}' must be a positive integer, got {value!r}")
        for name in ("ffn_hidden", "kv_heads", "head_dim", "experts", "experts_per_token", "expert_ffn_hidden",
                     "shared_expert_ffn_hidden", "dense_layers", "kv_lora_rank", "q_lora_rank", "qk_rope_head_dim",
                     "v_head_dim", "attention_window", "windowed_layers", "max_positions", "mtp_layers",
                     "rope_original_positions", "router_groups", "router_group_topk"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ConfigError(f"model field '{name}' must be a positive integer, got {value!r}")
        for name in ("qk_norm", "router_renormalize", "router_expert_bias", "attention_chunked"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"model field '{name}' must be true or false, got {getattr(self, name)!r}")
        if isinstance(self.rope_theta, bool) or not isinstance(self.rope_theta, (int, float)) or not (
                self.rope_theta >= 0 and math.isfinite(self.rope_theta)):
            raise ConfigError(f"model field 'rope_theta' must be a positive number (0: 10,000), got {self.rope_theta!r}")
        self._check_rope_scaling()
        self._check_router()
        if self.ffn_hidden == 0:
            object.__setattr__(self, "ffn_hidden", 4 * self.hidden)
        if self.kv_heads == 0:
            object.__setattr__(self, "kv_heads", self.heads)
        explicit_head_dim = self.head_dim != 0
        for name, kind in (("activation", Activation), ("norm", Norm), ("position", Position)):
            value = getattr(self, name)
            try:
                object.__setattr__(self, name, kind(value))
            except ValueError:
                allowed = "|".join(k.value for k in kind)
                raise ConfigError(f"model field '{name}' is {value!r}; use one of {allowed}") from None
        if not explicit_head_dim and self.hidden % self.heads:
            raise ConfigError(
                f"hidden ({self.hidden}) is not a multiple of heads ({self.heads}); "
                "pick sizes where hidden = heads * head_dim, or give head_dim"
            )
        if not explicit_head_dim:
            object.__setattr__(self, "head_dim", self.hidden // self.heads)
        if self.heads % self.kv_heads:
            raise ConfigError(
                f"heads ({self.heads}) is not a multiple of kv_heads ({self.kv_heads}); "
                "grouped-query attention needs whole groups"
            )
        self._check_experts()
        self._check_latent_attention()
        if (self.windowed_layers or self.attention_chunked) and not self.attention_window:
            raise ConfigError("model fields windowed_layers and attention_chunked need attention_window > 0 (the "
                              "window's or chunk's tokens)")
        if self.windowed_layers > self.layers:
            raise ConfigError(f"windowed_layers ({self.windowed_layers}) exceeds layers ({self.layers})")
        if self.attention_window and not self.windowed_layers:
            object.__setattr__(self, "windowed_layers", self.layers)

    def _check_rope_scaling(self) -> None:
        for name in ("rope_factor", "rope_mscale", "rope_mscale_all_dim"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not (value >= 0 and math.isfinite(value)):
                raise ConfigError(f"model field '{name}' must be a number >= 0, got {value!r}")
        if self.rope_scaling not in ("", "llama3", "yarn"):
            raise ConfigError(f"model field 'rope_scaling' is {self.rope_scaling!r}; use llama3, yarn or leave it out")
        if self.rope_scaling and not (self.rope_factor >= 1 and self.rope_original_positions > 0):
            raise ConfigError(f"rope_scaling {self.rope_scaling} needs rope_factor >= 1 and rope_original_positions "
                              "(the context the model was first trained at)")
        if not self.rope_scaling and (self.rope_factor or self.rope_original_positions or self.rope_mscale
                                      or self.rope_mscale_all_dim):
            raise ConfigError("model fields rope_factor, rope_original_positions and rope_mscale* need rope_scaling "
                              "(llama3 or yarn)")

    def _check_router(self) -> None:
        value = self.router_topk_scale
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not (value > 0 and math.isfinite(value)):
            raise ConfigError(f"model field 'router_topk_scale' must be a positive number, got {value!r}")
        if self.router_score not in ROUTER_SCORES:
            raise ConfigError(f"model field 'router_score' is {self.router_score!r}; use {', '.join(ROUTER_SCORES)}")
        if self.router_groups and (self.experts % self.router_groups or not 0 < self.router_group_topk <= self.router_groups):
            raise ConfigError(f"router_groups {self.router_groups} must divide experts ({self.experts}) and "
                              f"router_group_topk ({self.router_group_topk}) be 1..router_groups")
        if not self.router_groups and self.router_group_topk:
            raise ConfigError("model field router_group_topk needs router_groups (expert groups)")
        if self.router_changes and not self.experts:
            raise ConfigError(f"model field(s) {', '.join(self.router_changes)} need experts > 0 (a mixture-of-experts "
                              "model)")

    @property
    def router_changes(self) -> list[str]:
        """The router fields that differ from a softmax top-k renormalised (the default router)."""
        return [f.name for f in fields(self) if f.name.startswith("router_") and getattr(self, f.name) != f.default]

    def _check_experts(self) -> None:
        if not isinstance(self.moe_every, int) or isinstance(self.moe_every, bool) or self.moe_every < 1:
            raise ConfigError(f"model field 'moe_every' must be a positive integer, got {self.moe_every!r}")
        if not isinstance(self.capacity_factor, (int, float)) or isinstance(self.capacity_factor, bool) or not (
                self.capacity_factor == 0 or self.capacity_factor >= 1):
            raise ConfigError(f"model field 'capacity_factor' must be 0 (dropless) or >= 1, got {self.capacity_factor!r}")
        if not self.experts:
            extras = [n for n in ("experts_per_token", "expert_ffn_hidden", "shared_expert_ffn_hidden", "dense_layers")
                      if getattr(self, n)]
            if extras:
                raise ConfigError(f"model field(s) {', '.join(extras)} need experts > 0 (a mixture-of-experts model)")
            return
        if self.experts < 2:
            raise ConfigError(f"experts {self.experts}: a mixture of experts needs 2 or more (0 for a dense model)")
        if not 1 <= self.experts_per_token <= self.experts:
            raise ConfigError(f"experts_per_token must be between 1 and experts ({self.experts}), "
                              f"got {self.experts_per_token}; give the router's top-k")
        if self.expert_ffn_hidden == 0:
            object.__setattr__(self, "expert_ffn_hidden", self.ffn_hidden)
        if self.dense_layers > self.layers:
            raise ConfigError(f"dense_layers ({self.dense_layers}) exceeds layers ({self.layers})")
        if self.moe_layers == 0:
            raise ConfigError(f"no layer is sparse: dense_layers {self.dense_layers} and moe_every {self.moe_every} "
                              f"leave none of {self.layers} layers with experts; give experts 0 for a dense model")

    def _check_latent_attention(self) -> None:
        if not self.kv_lora_rank:
            if self.q_lora_rank or self.qk_rope_head_dim:
                raise ConfigError("model fields q_lora_rank and qk_rope_head_dim need kv_lora_rank > 0 "
                                  "(multi-head latent attention)")
            if self.v_head_dim == 0:
                object.__setattr__(self, "v_head_dim", self.head_dim)
            elif self.v_head_dim != self.head_dim:
                raise ConfigError(f"v_head_dim ({self.v_head_dim}) differs from head_dim ({self.head_dim}) only in "
                                  "multi-head latent attention: give kv_lora_rank")
            return
        if self.kv_heads != self.heads:
            raise ConfigError(f"multi-head latent attention has one K/V per query head: kv_heads ({self.kv_heads}) "
                              f"must equal heads ({self.heads})")
        if not 0 < self.qk_rope_head_dim < self.head_dim:
            raise ConfigError(f"qk_rope_head_dim ({self.qk_rope_head_dim}) must be positive and below head_dim "
                              f"({self.head_dim}, the no-RoPE and RoPE parts of a query head together)")
        if self.v_head_dim == 0:
            object.__setattr__(self, "v_head_dim", self.head_dim)

    def windowed_among(self, layers: int) -> int:
        """The sliding-window layers among `layers` of this model's, in proportion (at least one
        where it has any): a probe's few blocks, a pipeline stage's."""
        if not self.windowed_layers:
            return 0
        return max(1, min(layers, round(self.windowed_layers * layers / self.layers)))

    # -- mixture of experts ----------------------------------------------------------
    @property
    def moe(self) -> bool:
        return self.experts > 0

    def is_moe_layer(self, index: int) -> bool:
        """Layer `index` (0-based) has experts: past the dense layers, every moe_every-th."""
        return self.moe and index >= self.dense_layers and (index + 1) % self.moe_every == 0

    @property
    def moe_share(self) -> float:
        """The share of the layers that have experts (0 for a dense model)."""
        return self.moe_layers / self.layers

    @property
    def moe_layers(self) -> int:
        """Layers with experts: the multiples of moe_every among layers dense_layers+1 .. layers (1-based)."""
        if not self.moe:
            return 0
        return self.layers // self.moe_every - min(self.dense_layers, self.layers) // self.moe_every

    @property
    def latent_attention(self) -> bool:
        return self.kv_lora_rank > 0

    def windowed_keys(self, seq: int) -> float:
        """Keys a query attends to on average in a windowed layer of a causal sequence of `seq`
        tokens (seq / 2 without a window): w - w^2 / (2 seq) once seq passes the window w; in a
        chunked layer the mean over its positions of the keys from its chunk's start (about w / 2)."""
        w = self.attention_window
        if not w or seq <= w:
            return seq / 2
        if self.attention_chunked:
            return self.chunked_pairs(seq) / seq
        return w - w * w / (2 * seq)

    def chunked_pairs(self, last: float) -> float:
        """Query-key pairs of positions 1..`last` of a chunked layer (each position p sees
        (p - 1) mod w + 1 keys, w the chunk): whole chunks w (w + 1) / 2 each, then the rest's."""
        w = self.attention_window
        whole, rest = divmod(last, w)
        return whole * w * (w + 1) / 2 + rest * (rest + 1) / 2

    # -- derived sizes ---------------------------------------------------------------
    @property
    def q_dim(self) -> int:
        """Width of Q (and of the attention's output): heads * head_dim."""
        return self.heads * self.head_dim

    @property
    def gated(self) -> bool:
        """A gated MLP: gate and up projections, their product into down (SwiGLU, GeGLU)."""
        return self.activation in (Activation.SWIGLU, Activation.GEGLU)

    @property
    def kv_dim(self) -> int:
        """Width of K: kv_heads * head_dim (V's is kv_heads * v_head_dim)."""
        return self.kv_heads * self.head_dim

    @property
    def o_dim(self) -> int:
        """Width of the attention's output (the output projection's input): heads * v_head_dim."""
        return self.heads * self.v_head_dim

    @property
    def kv_cache_values_per_token(self) -> int:
        """Values one layer caches per token: K and V of every KV head; under multi-head latent
        attention the compressed latent and the shared RoPE key only."""
        if self.latent_attention:
            return self.kv_lora_rank + self.qk_rope_head_dim
        return self.kv_heads * (self.head_dim + self.v_head_dim)

    @property
    def norm_params(self) -> int:
        return 2 * self.hidden if self.norm is Norm.LAYERNORM else self.hidden

    def attention_weight_shapes(self) -> list[tuple[int, int]]:
        """(in, out) of every matmul weight of the attention, in the order the forward runs them."""
        h, q = self.hidden, self.q_dim
        if not self.latent_attention:
            return [(h, q), (h, self.kv_dim), (h, self.kv_heads * self.v_head_dim), (self.o_dim, h)]
        nope = self.head_dim - self.qk_rope_head_dim
        qs = [(h, self.q_lora_rank), (self.q_lora_rank, q)] if self.q_lora_rank else [(h, q)]
        return qs + [(h, self.kv_lora_rank + self.qk_rope_head_dim),
                     (self.kv_lora_rank, self.heads * (nope + self.v_head_dim)), (self.o_dim, h)]

    @property
    def attention_params(self) -> int:
        weights = sum(a * b for a, b in self.attention_weight_shapes())
        if self.latent_attention:  # the latents' RMSNorms
            return weights + self.kv_lora_rank + self.q_lora_rank
        biases = (self.q_dim + self.hidden + self.kv_dim + self.kv_heads * self.v_head_dim) if self.bias else 0
        return weights + biases + (2 * self.head_dim if self.qk_norm else 0)

    @staticmethod
    def _ffn_params(h: int, f: int, gated: bool, bias: bool) -> int:
        if gated:
            return 3 * h * f + ((2 * f + h) if bias else 0)
        return 2 * h * f + ((f + h) if bias else 0)

    @property
    def mlp_params(self) -> int:
        """The dense MLP (of a dense layer)."""
        return self._ffn_params(self.hidden, self.ffn_hidden, self.gated, self.bias)

    @property
    def expert_params(self) -> int:
        """One routed expert."""
        return self._ffn_params(self.hidden, self.expert_ffn_hidden, self.gated, self.bias) if self.moe else 0

    @property
    def router_params(self) -> int:
        return self.hidden * self.experts

    @property
    def shared_expert_params(self) -> int:
        """The shared experts together, with Qwen2-MoE's gate on them."""
        if not self.shared_expert_ffn_hidden:
            return 0
        return (self._ffn_params(self.hidden, self.shared_expert_ffn_hidden, self.gated, self.bias)
                + (self.hidden if self.shared_expert_gate else 0))

    @property
    def moe_mlp_params(self) -> int:
        """The sparse MLP of one MoE layer: router, every routed expert, the shared ones."""
        return self.router_params + self.experts * self.expert_params + self.shared_expert_params

    @property
    def dense_layer_params(self) -> int:
        """Parameters of one dense transformer block (attention, MLP, two norms)."""
        return self.attention_params + self.mlp_params + 2 * self.norm_params

    @property
    def moe_layer_params(self) -> int:
        return self.attention_params + self.moe_mlp_params + 2 * self.norm_params if self.moe else 0

    @property
    def layer_params(self) -> int:
        """Parameters of one transformer block: a dense model's block; for a mixture of experts
        the mean over its layers (rounded down; `num_params` sums them exactly)."""
        if not self.moe:
            return self.dense_layer_params
        return self.blocks_params // self.layers

    @property
    def blocks_params(self) -> int:
        """Parameters of all transformer blocks."""
        sparse = self.moe_layers
        return sparse * self.moe_layer_params + (self.layers - sparse) * self.dense_layer_params

    @property
    def expert_fraction(self) -> float:
        """Share of the blocks' parameters held by routed experts (what expert parallelism splits)."""
        return self.moe_layers * self.experts * self.expert_params / self.blocks_params

    def active_params(self, *, input_embedding: bool = True) -> int:
        """Parameters one token's forward uses: the routed experts it is sent to
        (experts_per_token of them), not all of them. `input_embedding` False leaves out the
        token embedding (a lookup; DeepSeek's "activated parameters" count it out, Mistral's
        count for Mixtral in)."""
        unused = self.moe_layers * (self.experts - self.experts_per_token) * self.expert_params
        total = self.num_params - unused
        if not input_embedding:
            total -= self.vocab * self.hidden
            if self.tied_embeddings:  # the table is the head too: still used
                total += self.vocab * self.hidden
        return total

    @property
    def embedding_params(self) -> int:
        """Token embedding plus learned positions (first pipeline stage)."""
        positions = self.seq_len * self.hidden if self.position is Position.LEARNED else 0
        return self.vocab * self.hidden + positions

    @property
    def head_params(self) -> int:
        """Final norm plus the output projection when it is not tied (last stage)."""
        return self.norm_params + (0 if self.tied_embeddings else self.vocab * self.hidden)

    @property
    def layer_tensors(self) -> int:
        """Parameter tensors of one block (what a per-tensor optimizer loop visits)."""
        ffn = 3 if self.gated else 2
        attention = len(self.attention_weight_shapes())
        per_norm = 2 if self.norm is Norm.LAYERNORM else 1
        latent_norms = (1 if self.latent_attention else 0) + (1 if self.q_lora_rank else 0) + (2 if self.qk_norm else 0)
        dense = (attention + ffn) * (2 if self.bias else 1) + 2 * per_norm + latent_norms
        if not self.moe:
            return dense
        # a grouped-GEMM runtime holds each projection of all experts as one tensor
        sparse = dense + 1 + (ffn if self.shared_expert_ffn_hidden else 0) + (1 if self.shared_expert_gate else 0)
        return round((self.moe_layers * sparse + (self.layers - self.moe_layers) * dense) / self.layers)

    @property
    def ends_tensors(self) -> tuple[int, int]:
        """Parameter tensors of the embedding (first stage) and of the final norm and head (last)."""
        embed = 2 if self.position is Position.LEARNED else 1
        head = (2 if self.norm is Norm.LAYERNORM else 1) + (0 if self.tied_embeddings else 1)
        return embed, head

    @property
    def num_params(self) -> int:
        return self.blocks_params + self.embedding_params + self.head_params

    # -- conversions -----------------------------------------------------------------
    def with_seq_len(self, seq_len: int) -> "ModelSpec":
        return replace(self, seq_len=seq_len)

    @property
    def context_len(self) -> int:
        """Tokens a served sequence may hold, prompt and output: max_positions, else seq_len."""
        return self.max_positions or self.seq_len

    def to_dict(self) -> dict:
        out = {}
        defaults = {"v_head_dim": self.head_dim, "expert_ffn_hidden": self.ffn_hidden if self.moe else 0,
                    "windowed_layers": self.layers if self.attention_window else 0}
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name == "head_dim" and value * self.heads == self.hidden:
                continue  # the default: written only where it differs
            if f.name in defaults and value == defaults[f.name]:
                continue
            if f.name in MOE_AND_MLA_FIELDS and f.name not in defaults and value == f.default:
                continue  # a dense model's spec reads as before
            if f.name in ("max_positions", "mtp_layers", "rope_theta", "qk_norm") and not value:
                continue
            if f.name in ROPE_AND_ROUTER_FIELDS and value == f.default:
                continue  # written only where the model has them
            out[f.name] = value.value if isinstance(value, StrEnum) else value
        return out

    @classmethod
    def from_dict(cls, data: dict, *, name: str | None = None) -> "ModelSpec":
        if not isinstance(data, dict):
            raise ConfigError(f"a model spec must be a mapping of fields, not {type(data).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(str(k) for k in set(data) - known)
        if unknown:
            raise ConfigError(
                f"unknown model field(s) {', '.join(unknown)}; known fields: {', '.join(sorted(known))}"
            )
        missing = [k for k in ("layers", "hidden", "heads", "vocab", "seq_len") if k not in data]
        if missing:
            raise ConfigError(f"model spec lacks {', '.join(missing)}; a spec needs layers, hidden, heads, vocab, seq_len")
        kwargs = dict(data)
        if name is not None and "name" not in kwargs:
            kwargs["name"] = name
        return cls(**kwargs)


ROPE_AND_ROUTER_FIELDS = ("rope_scaling", "rope_factor", "rope_original_positions", "rope_mscale",
                          "rope_mscale_all_dim", "router_score", "router_renormalize", "router_groups",
                          "router_group_topk", "router_topk_scale", "router_expert_bias")
MOE_AND_MLA_FIELDS = ("experts", "experts_per_token", "expert_ffn_hidden", "shared_expert_ffn_hidden",
                      "shared_expert_gate", "dense_layers", "moe_every", "capacity_factor", "kv_lora_rank",
                      "q_lora_rank", "qk_rope_head_dim", "v_head_dim", "attention_window", "windowed_layers",
                      "attention_chunked")


def gpt_spec(name: str, *, layers: int, hidden: int, heads: int, vocab: int = 51200, seq_len: int = 2048) -> ModelSpec:
    """GPT-3 / Megatron style: learned positions, LayerNorm, GELU 4h MLP, biases, dropout, tied head."""
    return ModelSpec(name=name, layers=layers, hidden=hidden, heads=heads, vocab=vocab, seq_len=seq_len)


def llama_spec(
    name: str, *, layers: int, hidden: int, heads: int, kv_heads: int, ffn_hidden: int, vocab: int, seq_len: int
) -> ModelSpec:
    """Llama style: RoPE, RMSNorm, SwiGLU, grouped-query attention, no biases or dropout, untied head."""
    return ModelSpec(
        name=name, layers=layers, hidden=hidden, heads=heads, kv_heads=kv_heads, ffn_hidden=ffn_hidden,
        vocab=vocab, seq_len=seq_len, activation=Activation.SWIGLU, norm=Norm.RMSNORM,
        position=Position.ROPE, tied_embeddings=False, bias=False, dropout=False,
    )


def format_count(n: float) -> str:
    """A parameter count with a unit that fits: 1.32B, 350.2M, 42.5K."""
    for unit, size in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.2f}{unit}"
    return f"{n:.0f}"
