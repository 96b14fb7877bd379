"""The built-in models as real `torch.nn.Module`s, from a `ModelSpec`.

One definition serves tracing (on the meta device) and training (CPU or GPU). GPT blocks
use learned positions, LayerNorm, a GELU MLP, biases and dropout; Llama blocks use RoPE,
RMSNorm, a SwiGLU MLP and grouped-query attention. Module names follow torchtitan
(`tok_embeddings`, `layers.N.attention.wq`, `feed_forward.w1`, `norm`, `output`) so that
the plan's placements can name parameters.
"""

from __future__ import annotations

import math
import zlib

import torch
import torch.nn.functional as F
from torch import nn

from costmodel.spec import Activation, ModelSpec, Norm, Position


def _norm(spec: ModelSpec) -> nn.Module:
    if spec.norm is Norm.RMSNORM:
        return nn.RMSNorm(spec.hidden, eps=1e-5)
    return nn.LayerNorm(spec.hidden, eps=1e-5)


def rope_tables(head_dim: int, seq_len: int, theta: float = 10000.0, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of the rotary angles, each (seq_len, head_dim // 2)."""
    inv = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim)
    angles = torch.outer(torch.arange(seq_len, device=device, dtype=torch.float32), inv)  # (T, hs/2)
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (x[..., :hs/2], x[..., hs/2:]) of x: (B, nh, T, hs)."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]  # (B, nh, T, hs/2) each
    cos, sin = cos[: x.shape[-2]].to(x.dtype), sin[: x.shape[-2]].to(x.dtype)  # (T, hs/2)
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)


class Attention(nn.Module):
    def __init__(self, spec: ModelSpec, dropout: float) -> None:
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = spec.heads, spec.kv_heads, spec.head_dim
        self.rope = spec.position is Position.ROPE
        self.wq = nn.Linear(spec.hidden, spec.heads * spec.head_dim, bias=spec.bias)
        self.wk = nn.Linear(spec.hidden, spec.kv_dim, bias=spec.bias)
        self.wv = nn.Linear(spec.hidden, spec.kv_dim, bias=spec.bias)
        self.wo = nn.Linear(spec.heads * spec.head_dim, spec.hidden, bias=spec.bias)
        self.dropout = dropout

    def forward(self, x: torch.Tensor, cos: torch.Tensor | None, sin: torch.Tensor | None) -> torch.Tensor:
        bsz, seq, _ = x.shape  # (B, T, C)
        # the head counts come from the weights, so tensor parallelism (fewer local heads) just works
        q = self.wq(x).view(bsz, seq, -1, self.head_dim).transpose(1, 2)  # (B, nh, T, hs)
        k = self.wk(x).view(bsz, seq, -1, self.head_dim).transpose(1, 2)  # (B, nkv, T, hs)
        v = self.wv(x).view(bsz, seq, -1, self.head_dim).transpose(1, 2)  # (B, nkv, T, hs)
        if self.rope:
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if k.shape[1] != q.shape[1]:
            repeat = q.shape[1] // k.shape[1]
            k = k.repeat_interleave(repeat, dim=1)  # (B, nh, T, hs)
            v = v.repeat_interleave(repeat, dim=1)  # (B, nh, T, hs)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=self.dropout if self.training else 0.0)
        y = y.transpose(1, 2).reshape(bsz, seq, -1)  # (B, T, nh * hs)
        return self.wo(y)


class FeedForward(nn.Module):
    def __init__(self, spec: ModelSpec) -> None:
        super().__init__()
        self.swiglu = spec.activation is Activation.SWIGLU
        self.w1 = nn.Linear(spec.hidden, spec.ffn_hidden, bias=spec.bias)
        self.w2 = nn.Linear(spec.ffn_hidden, spec.hidden, bias=spec.bias)
        self.w3 = nn.Linear(spec.hidden, spec.ffn_hidden, bias=spec.bias) if self.swiglu else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.swiglu:
            return self.w2(F.silu(self.w1(x)) * self.w3(x))
        return self.w2(F.gelu(self.w1(x), approximate="tanh"))


class Block(nn.Module):
    def __init__(self, spec: ModelSpec, dropout: float) -> None:
        super().__init__()
        self.attention_norm = _norm(spec)
        self.attention = Attention(spec, dropout)
        self.ffn_norm = _norm(spec)
        self.feed_forward = FeedForward(spec)
        self.attention_dropout = nn.Dropout(dropout)  # one module per call site (module trackers need it)
        self.ffn_dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, cos: torch.Tensor | None = None, sin: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.attention_dropout(self.attention(self.attention_norm(x), cos, sin))
        return x + self.ffn_dropout(self.feed_forward(self.ffn_norm(x)))


class Transformer(nn.Module):
    """A decoder-only language model: tokens (B, T) -> logits (B, T, V)."""

    def __init__(self, spec: ModelSpec, *, dropout: float = 0.0) -> None:
        super().__init__()
        self.spec = spec
        drop = dropout if spec.dropout else 0.0
        self.tok_embeddings = nn.Embedding(spec.vocab, spec.hidden)
        self.pos_embeddings = nn.Embedding(spec.seq_len, spec.hidden) if spec.position is Position.LEARNED else None
        self.embed_dropout = nn.Dropout(drop)
        self.layers = nn.ModuleDict({str(i): Block(spec, drop) for i in range(spec.layers)})
        self.norm = _norm(spec)
        self.output = nn.Linear(spec.hidden, spec.vocab, bias=False)
        if spec.tied_embeddings:
            self.output.weight = self.tok_embeddings.weight
        if spec.position is Position.ROPE:
            cos, sin = rope_tables(spec.head_dim, spec.seq_len)
            self.register_buffer("rope_cos", cos, persistent=False)
            self.register_buffer("rope_sin", sin, persistent=False)
        else:
            self.rope_cos = self.rope_sin = None

    def init_buffers(self) -> None:
        """Recompute the rotary tables (after `to_empty` from the meta device)."""
        if self.rope_cos is not None:
            cos, sin = rope_tables(self.spec.head_dim, self.spec.seq_len, device=self.rope_cos.device)
            self.rope_cos.copy_(cos)
            self.rope_sin.copy_(sin)

    def init_weights(self, seed: int = 0) -> None:
        """GPT-2 style initialisation (std 0.02, output projections scaled by 1/sqrt(2 layers)),
        drawn per parameter from a generator seeded by (seed, parameter name): every copy of
        the model, whole or cut into pipeline stages and sharded, gets the same values."""
        scaled = 0.02 / math.sqrt(2 * self.spec.layers)
        with torch.no_grad():
            self.init_buffers()
            for name, p in self.named_parameters():
                name = name.replace("_checkpoint_wrapped_module.", "")
                if p.dim() == 1 or name.endswith("lora_b"):  # LoRA's B starts at zero: training starts at the base
                    full = torch.ones(p.shape) if name.endswith("weight") else torch.zeros(p.shape)
                else:
                    gen = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
                    std = scaled if name.endswith(("wo.weight", "w2.weight")) else 0.02
                    full = torch.randn(tuple(p.shape), generator=gen) * std
                _copy_full(p, full)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens (B, T) -> logits (B, T, V). A pipeline stage without the embedding takes and
        one without the head returns hidden states (B, T, C)."""
        if self.tok_embeddings is not None:
            seq = tokens.shape[1]
            x = self.tok_embeddings(tokens)  # (B, T, C)
            if self.pos_embeddings is not None:
                x = x + self.pos_embeddings(torch.arange(seq, device=tokens.device))  # (B, T, C)
            x = self.embed_dropout(x)
        else:
            x = tokens
        for block in self.layers.values():
            x = block(x, self.rope_cos, self.rope_sin)
        if self.output is None:
            return x
        return self.output(self.norm(x))  # (B, T, V)


def _copy_full(param: torch.Tensor, full: torch.Tensor) -> None:
    """Copy a whole tensor into a parameter, which may be a DTensor sharded over a mesh."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    if isinstance(param, DTensor):
        local = distribute_tensor(full.to(param.dtype), param.device_mesh, param.placements).to_local()
        param.to_local().copy_(local.to(param.to_local().device))
    else:
        param.copy_(full.to(param.dtype).to(param.device))


def build_model(spec: ModelSpec, *, device: str | torch.device = "meta", dropout: float = 0.0) -> Transformer:
    """The model on `device` ("meta" allocates nothing: a 405B model builds in seconds)."""
    with torch.device(device):
        return Transformer(spec, dropout=dropout)
