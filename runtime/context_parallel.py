"""Context parallelism: the sequence split over `cp` ranks, attention over all of it.

Load-balanced as Megatron-LM and torchtitan split it: the sequence is cut into 2 * cp chunks
and cp rank r holds chunks r and 2 * cp - 1 - r, so that every rank attends to as many
(query, key) pairs under the causal mask. Every other op of a layer is per token and runs on
the rank's own tokens; its rotary (or learned) positions are the chunks' global positions.

Attention gathers K and V over the cp group (Llama 3's all-gather context parallelism, and
torch's default `_RotateMethod.ALL_GATHER`), not overlapped with compute; each of the rank's two
query chunks attends to the keys up to its own end under a causal mask aligned to the lower
right (`torch.nn.attention.bias.causal_lower_right`, which SDPA runs as Flash attention on a
GPU; under a sliding window, the keys of its window with a band mask; Gemma-2's soft-capped
scores as its eager attention computes them). The whole sequence's K and V are not kept for the
backward (cp times the layer's own): ContextAttention keeps the rank's q, k and v, and its backward gathers K and V again,
recomputes the attention and differentiates it, reduce-scattering the keys' gradients. Per
layer: an all-gather of K and V forward, another and a reduce-scatter backward, one more
attention forward; `costmodel.layer` prices that for runtimes whose profile says
`context_exchange: all-gather`.

Parameters are replicated over cp and their gradients averaged over cp with data parallelism's
(FSDP2 over the flattened dp_shard x cp ranks, runtime.mesh.data_parallel_mesh), so each rank's
mean loss over its own tokens trains the mean over the whole sequence.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.attention.bias import causal_lower_right

from costmodel.errors import ConfigError

# torch 2.13 renames the single-tensor collectives (the old names warn); earlier releases have only those
_all_gather = getattr(dist, "all_gather_single", dist.all_gather_into_tensor)
_reduce_scatter = getattr(dist, "reduce_scatter_single", dist.reduce_scatter_tensor)
HF_IMPLEMENTATION = "paraplan_context"  # the name the Hugging Face attention function is registered under


@dataclass(frozen=True, slots=True)
class ContextShard:
    """This rank's place on the cp group: which two of the 2 * size chunks it holds."""

    group: object  # the cp ProcessGroup
    rank: int
    size: int
    seq_len: int  # the whole sequence's tokens
    # each chunk's causal mask against the keys up to its end, aligned to the lower right; made
    # here, outside any dispatch mode (a tensor subclass cannot be made under recomputation's)
    masks: tuple = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not 0 <= self.rank < self.size or self.size < 2:
            raise ConfigError(f"context shard {self.rank} of {self.size}: cp must be at least 2 and the rank below it")
        if self.seq_len % (2 * self.size):
            raise ConfigError(f"context parallelism cuts the sequence ({self.seq_len}) into 2 * cp({self.size}) "
                              f"chunks, which it does not divide")
        c = self.seq_len // (2 * self.size)
        object.__setattr__(self, "masks", tuple(causal_lower_right(c, (g + 1) * c) for g in self.chunks))

    @property
    def chunks(self) -> tuple[int, int]:
        return self.rank, 2 * self.size - 1 - self.rank

    def shard(self, x: torch.Tensor, dim: int = 1) -> torch.Tensor:
        """This rank's two chunks of a whole-sequence tensor along `dim`."""
        if x.shape[dim] % (2 * self.size):
            raise ConfigError(f"context parallelism cuts the sequence ({x.shape[dim]}) into 2 * cp({self.size}) "
                              f"chunks, which it does not divide")
        parts = x.chunk(2 * self.size, dim=dim)
        return torch.cat([parts[g] for g in self.chunks], dim=dim)

    def positions(self, local_len: int, device=None) -> torch.Tensor:
        """(local_len,) global positions of this rank's tokens (its two chunks, in order)."""
        c = local_len // 2
        return torch.cat([torch.arange(g * c, (g + 1) * c, device=device) for g in self.chunks])

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float | None = None,
               dropout: float = 0.0, window: int | None = None, softcap: float | None = None) -> torch.Tensor:
        """Causal attention of this rank's queries over the whole sequence's keys (the last `window`
        of them, a query's own included, where a sliding window is given; scores soft-capped as
        cap * tanh(score / cap) where `softcap` is given, Gemma-2's).
        q (B, nh, t, hs), k and v (B, nkv, t, hs), t = 2 chunks of this rank -> (B, nh, t, hs_v)."""
        window = window if window and window < self.seq_len else None
        return ContextAttention.apply(q, k, v, self, scale, dropout, window, softcap or None)

    def window_mask(self, g: int, c: int, window: int, device) -> tuple[int, torch.Tensor]:
        """(first key, (c, keys) mask) of chunk g under a sliding window: query p sees keys j with
        p - window < j <= p (transformers' sliding_window_overlay), the keys from its chunk's first
        query's window on."""
        start = g * c
        # (from a multiple of 8 keys, the extra ones masked: a GPU's memory-efficient kernel takes a mask whose
        # rows are aligned so, where it would fall back to materialising the scores)
        first = max(0, start - window + 1) // 8 * 8
        q = start + torch.arange(c, device=device)[:, None]  # (c, 1) positions
        j = first + torch.arange((g + 1) * c - first, device=device)[None, :]  # (1, keys)
        return first, (j <= q) & (j > q - window)  # (c, keys)

    def attend_gathered(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None,
                        dropout: float, window: int | None = None, softcap: float | None = None) -> torch.Tensor:
        """`attend` as plain autograd: K and V gathered (GatherSequence), each of the two query
        chunks against the keys up to its end (from its window's start, under a window)."""
        k_all = GatherSequence.apply(k, self)  # (B, nkv, S, hs), S = cp * t, in sequence order
        v_all = GatherSequence.apply(v, self)  # (B, nkv, S, hs_v)
        if k_all.shape[1] != q.shape[1]:  # grouped K/V heads copied to their query heads: a GPU's Flash and
            repeat = q.shape[1] // k_all.shape[1]  # memory-efficient kernels both take that under a lower-right
            k_all = k_all.repeat_interleave(repeat, dim=1)  # mask (the latter no GQA); the copies live one
            v_all = v_all.repeat_interleave(repeat, dim=1)  # layer's pass long: (B, nh, S, hs)
        c = q.shape[2] // 2
        if 2 * c * self.size != self.seq_len:
            raise ConfigError(f"context parallelism was set up for {self.seq_len} tokens a sequence and gets "
                              f"{2 * c * self.size}; re-plan for this sequence length")
        out = []
        for i, (g, mask) in enumerate(zip(self.chunks, self.masks)):
            first, keys = 0, (g + 1) * c  # chunk g sees every key up to its own end
            if window is not None:
                first, mask = self.window_mask(g, c, window, q.device)
            q_g, k_g, v_g = q[:, :, i * c:(i + 1) * c], k_all[:, :, first:keys], v_all[:, :, first:keys]
            if softcap is not None:  # no fused kernel caps scores: as the model's own eager attention does
                if window is None:
                    mask = torch.ones(c, keys, dtype=torch.bool, device=q.device).tril(keys - c)  # (c, keys)
                out.append(_capped_attention(q_g, k_g, v_g, mask, scale, dropout, softcap))
                continue
            out.append(F.scaled_dot_product_attention(q_g, k_g, v_g, attn_mask=mask, dropout_p=dropout,
                                                      scale=scale))  # (B, nh, c, hs_v)
        return torch.cat(out, dim=2)  # (B, nh, t, hs_v)


class ContextAttention(torch.autograd.Function):
    """`ContextShard.attend` keeping only this rank's q, k, v for the backward, which gathers K
    and V again and recomputes the attention before differentiating it (the whole sequence's K
    and V held per layer would cost cp times the layer's own; the RNG state is replayed so a
    dropout draws the same mask)."""

    @staticmethod
    def forward(ctx, q, k, v, shard: ContextShard, scale, dropout, window, softcap):
        ctx.shard, ctx.scale, ctx.dropout, ctx.window, ctx.softcap = shard, scale, dropout, window, softcap
        ctx.rng = _rng_state(q.device) if dropout else None
        ctx.save_for_backward(q, k, v)
        with torch.no_grad():
            return shard.attend_gathered(q, k, v, scale, dropout, window, softcap)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        q, k, v = (t.detach().requires_grad_(t.requires_grad) for t in ctx.saved_tensors)
        with torch.random.fork_rng(devices=[q.device] if q.device.type == "cuda" else [], enabled=ctx.rng is not None):
            if ctx.rng is not None:
                _set_rng_state(q.device, ctx.rng)
            with torch.enable_grad():
                out = ctx.shard.attend_gathered(q, k, v, ctx.scale, ctx.dropout, ctx.window, ctx.softcap)
        inputs = [t for t in (q, k, v) if t.requires_grad]
        grads = iter(torch.autograd.grad(out, inputs, grad))
        return (*(next(grads) if t.requires_grad else None for t in (q, k, v)), None, None, None, None, None)


def _capped_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, scale: float | None,
                      dropout: float, softcap: float) -> torch.Tensor:
    """Attention with soft-capped scores, as Gemma-2's eager attention computes it: q (B, nh, c, hs),
    k, v (B, nh, keys, hs), mask (c, keys) True where a query sees a key -> (B, nh, c, hs_v)."""
    scores = q @ k.transpose(2, 3) * (scale if scale is not None else q.shape[-1] ** -0.5)  # (B, nh, c, keys)
    scores = torch.tanh(scores / softcap) * softcap
    scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
    weights = F.softmax(scores, dim=-1, dtype=torch.promote_types(q.dtype, torch.float32)).to(q.dtype)  # (fp32 at least)
    return F.dropout(weights, p=dropout, training=dropout > 0) @ v  # (B, nh, c, hs_v)


def _rng_state(device: torch.device):
    return torch.cuda.get_rng_state(device) if device.type == "cuda" else torch.get_rng_state()


def _set_rng_state(device: torch.device, state) -> None:
    if device.type == "cuda":
        torch.cuda.set_rng_state(state, device)
    else:
        torch.set_rng_state(state)


class GatherSequence(torch.autograd.Function):
    """All-gather of a (B, H, t, D) tensor's two chunks over cp into the whole sequence
    (B, H, cp * t, D) in order; the backward reduce-scatters the gradient back (each rank's
    keys were used by every rank's queries)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, shard: ContextShard) -> torch.Tensor:
        ctx.shard = shard
        n, c = shard.size, x.shape[2] // 2
        flat = x.new_empty((n * x.shape[0], *x.shape[1:]))  # (cp * B, H, t, D): rank j's block j
        _all_gather(flat, x.contiguous(), group=shard.group)
        blocks = flat.view(n, *x.shape)  # (cp, B, H, t, D)
        order = [blocks[g][:, :, :c] if g < n else blocks[2 * n - 1 - g][:, :, c:] for g in range(2 * n)]
        return torch.cat(order, dim=2)  # (B, H, 2 cp c, D)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        shard = ctx.shard
        n = shard.size
        parts = grad.chunk(2 * n, dim=2)  # 2 cp chunks of (B, H, c, D)
        per_rank = torch.cat([torch.cat([parts[j], parts[2 * n - 1 - j]], dim=2) for j in range(n)])  # (cp * B, H, t, D)
        out = grad.new_empty((grad.shape[0], grad.shape[1], 2 * parts[0].shape[2], grad.shape[3]))  # (B, H, t, D)
        _reduce_scatter(out, per_rank.contiguous(), group=shard.group)
        return out, None


def context_shard(mesh, seq_len: int) -> ContextShard:
    """This rank's ContextShard on the runtime mesh's cp axis, for sequences of `seq_len` tokens."""
    return ContextShard(mesh["cp"].get_group(), mesh["cp"].get_local_rank(), mesh["cp"].size(), seq_len)


def apply_context_parallel(model: nn.Module, shard: ContextShard) -> None:
    """paraplan's built-in Transformer (a whole model or a pipeline stage): its attention
    modules attend over the cp group, its forward takes the chunks' positions."""
    from planner.zoo.model import Attention

    model.context = shard
    for module in model.modules():
        if isinstance(module, Attention):
            module.context = shard


def hf_context_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                         attention_mask, dropout: float = 0.0, scaling: float | None = None, **kwargs):
    """transformers' attention-function interface under context parallelism: query (B, nh, t, hs),
    key and value (B, nkv, t, hs), after RoPE -> ((B, t, nh, hs_v), None). The causal mask is
    made here from the chunks' global positions (the model's own, for its local tokens, is not
    what this rank's queries need)."""
    shard = getattr(module, "paraplan_context", None)
    if shard is None:
        raise ConfigError(f"{type(module).__name__} was called under context parallelism without its cp group; "
                          "re-plan with --cp 1")
    out = shard.attend(query, key, value, scale=scaling, dropout=dropout, window=kwargs.get("sliding_window"),
                       softcap=kwargs.get("softcap"))  # (B, nh, t, hs_v)
    return out.transpose(1, 2).contiguous(), None  # (B, t, nh, hs_v)


def _no_mask(*args, **kwargs):
    """The mask a model's forward would build for its local tokens: none (hf_context_attention makes its own)."""
    return None


def apply_hf_context_parallel(model: nn.Module, shard: ContextShard) -> None:
    """A Hugging Face causal LM (a whole model or a pipeline stage, runtime.module.cut_stage):
    its attention runs `hf_context_attention` (registered with transformers' AttentionInterface,
    its documented extension point), and its forward takes the chunks' positions."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(HF_IMPLEMENTATION, hf_context_attention)
    AttentionMaskInterface.register(HF_IMPLEMENTATION, _no_mask)
    model.paraplan_context = shard
    for module in model.modules():
        config = getattr(module, "config", None)
        if config is not None and hasattr(config, "_attn_implementation"):
            config._attn_implementation = HF_IMPLEMENTATION
        if type(module).__name__.endswith("Attention"):
            module.paraplan_context = shard

    def with_positions(module, args, kwargs):
        tokens = args[0] if args else kwargs.get("input_ids")
        if kwargs.get("position_ids") is None and isinstance(tokens, torch.Tensor) and tokens.dim() == 2:
            kwargs["position_ids"] = shard.positions(tokens.shape[1], tokens.device)[None]  # (1, t)
        return args, kwargs

    # (a pipeline stage's own forward, runtime.module.cut_stage, reads model.paraplan_context)
    if getattr(model.forward, "__func__", None) is type(model).forward:
        model.register_forward_pre_hook(with_positions, with_kwargs=True)
