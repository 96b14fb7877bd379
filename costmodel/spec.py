"""The shape of a decoder-only transformer, as the cost model sees it.

One `ModelSpec` describes GPT-style models (learned positions, LayerNorm, GELU MLP, biases,
dropout) and Llama-style models (RoPE, RMSNorm, SwiGLU, grouped-query attention, no biases).
Parameter counts here are exact for the zoo's `nn.Module` definitions (tested).
"""

from __future__ import annotations

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

    def __post_init__(self) -> None:
        for name in ("layers", "hidden", "heads", "vocab", "seq_len"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"model field '{name}' must be a positive integer, got {value!r}")
        for name in ("ffn_hidden", "kv_heads", "head_dim"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ConfigError(f"model field '{name}' must be a positive integer, got {value!r}")
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
        """Width of K (and of V): kv_heads * head_dim."""
        return self.kv_heads * self.head_dim

    @property
    def norm_params(self) -> int:
        return 2 * self.hidden if self.norm is Norm.LAYERNORM else self.hidden

    @property
    def attention_params(self) -> int:
        h, q, kv = self.hidden, self.q_dim, self.kv_dim
        weights = 2 * h * q + 2 * h * kv  # q: h x q, o: q x h; k, v: h x kv
        biases = (q + h + 2 * kv) if self.bias else 0
        return weights + biases

    @property
    def mlp_params(self) -> int:
        h, f = self.hidden, self.ffn_hidden
        if self.gated:
            return 3 * h * f + ((2 * f + h) if self.bias else 0)
        return 2 * h * f + ((f + h) if self.bias else 0)

    @property
    def layer_params(self) -> int:
        """Parameters of one transformer block (attention, MLP, two norms)."""
        return self.attention_params + self.mlp_params + 2 * self.norm_params

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
        linears = 4 + (3 if self.gated else 2)
        per_norm = 2 if self.norm is Norm.LAYERNORM else 1
        return linears * (2 if self.bias else 1) + 2 * per_norm

    @property
    def ends_tensors(self) -> tuple[int, int]:
        """Parameter tensors of the embedding (first stage) and of the final norm and head (last)."""
        embed = 2 if self.position is Position.LEARNED else 1
        head = (2 if self.norm is Norm.LAYERNORM else 1) + (0 if self.tied_embeddings else 1)
        return embed, head

    @property
    def num_params(self) -> int:
        return self.layers * self.layer_params + self.embedding_params + self.head_params

    # -- conversions -----------------------------------------------------------------
    def with_seq_len(self, seq_len: int) -> "ModelSpec":
        return replace(self, seq_len=seq_len)

    def to_dict(self) -> dict:
        out = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name == "head_dim" and value * self.heads == self.hidden:
                continue  # the default: written only where it differs
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
