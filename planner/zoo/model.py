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


LLAMA3_LOW_FREQ_FACTOR, LLAMA3_HIGH_FREQ_FACTOR = 1.0, 4.0  # every Llama 3.1-3.3 config's rope_scaling


def rope_tables(head_dim: int, seq_len: int, theta: float = 10000.0, device=None,
                llama3: tuple[float, int] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of the rotary angles, each (seq_len, head_dim // 2). `llama3`: (factor, original
    positions) of Llama 3.1's scaling (as transformers' _compute_llama3_parameters): frequencies whose
    wavelength exceeds original / 1 are divided by the factor, those under original / 4 kept, those
    between blended linearly in original / wavelength."""
    inv = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim)
    if llama3 is not None:
        factor, original = llama3
        wavelength = 2 * math.pi / inv
        smooth = (original / wavelength - LLAMA3_LOW_FREQ_FACTOR) / (LLAMA3_HIGH_FREQ_FACTOR - LLAMA3_LOW_FREQ_FACTOR)
        blended = (1 - smooth) * inv / factor + smooth * inv
        inv = torch.where(wavelength > original / LLAMA3_LOW_FREQ_FACTOR, inv / factor,
                          torch.where(wavelength < original / LLAMA3_HIGH_FREQ_FACTOR, inv, blended))
    angles = torch.outer(torch.arange(seq_len, device=device, dtype=torch.float32), inv)  # (T, hs/2)
    return angles.cos(), angles.sin()


def spec_rope_tables(spec: ModelSpec, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """The rotary tables of `spec` over its training length: its base, and Llama 3's scaling where it has it."""
    llama3 = (spec.rope_factor, spec.rope_original_positions) if spec.rope_scaling == "llama3" else None
    return rope_tables(spec.head_dim, spec.seq_len, spec.rope_theta or 10000.0, device=device, llama3=llama3)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (x[..., :hs/2], x[..., hs/2:]) of x: (B, nh, T, hs) by the angles' cos, sin (T, hs/2)."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]  # (B, nh, T, hs/2) each
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, start: int = 0) -> torch.Tensor:
    """RoPE on x: (B, nh, T, hs) at positions start..start+T-1."""
    end = start + x.shape[-2]
    return _rotate(x, cos[start:end], sin[start:end])


class KVCache:
    """Keys and values of every layer for a batch, preallocated for `max_len` tokens: per layer
    two (B, kv_heads, max_len, head_dim) tensors, so 2 * layers * kv_heads * head_dim * bytes
    per token (GQA keeps the narrow K/V, before they are repeated for the query heads)."""

    def __init__(self, spec: ModelSpec, batch: int, max_len: int, *, dtype=torch.float32, device=None) -> None:
        if max_len > spec.seq_len:
            raise ValueError(f"a cache of {max_len} tokens exceeds the model's context of {spec.seq_len}")
        shape = (batch, spec.kv_heads, max_len, spec.head_dim)
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(spec.layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(spec.layers)]
        self.length = 0  # tokens cached so far
        self.max_len = max_len

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.keys, *self.values))

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k, v (B, nkv, T, hs) at the current position; all cached so far (B, nkv, S, hs)."""
        end = self.length + k.shape[2]
        if end > self.max_len:
            raise ValueError(f"the cache holds {self.max_len} tokens; {end} were asked for")
        self.keys[layer][:, :, self.length:end] = k
        self.values[layer][:, :, self.length:end] = v
        return self.keys[layer][:, :, :end], self.values[layer][:, :, :end]


class PagedKVCache:
    """Keys and values in a pool of fixed-size blocks, as vLLM pages them (Kwon et al. 2023): per
    layer K and V of (blocks, kv_heads, block_tokens, head_dim); a sequence owns a table of
    block ids, so sequences of any length share one pool and a prefix's blocks can be shared.

    An iteration packs the new tokens of several sequences into one row (1, N) — continuous
    batching — after `begin([(table, cached, new), ...])` names, per sequence in packing order,
    its block table, the tokens it has cached and the tokens it brings now."""

    packed = True

    def __init__(self, spec: ModelSpec, blocks: int, block_tokens: int = 16, *, dtype=torch.float32,
                 device=None) -> None:
        shape = (blocks, spec.kv_heads, block_tokens, spec.head_dim)
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(spec.layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(spec.layers)]
        self.block_tokens = block_tokens
        self.entries: list[tuple[list[int], int, int]] = []
        self.positions = torch.zeros(0, dtype=torch.long)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.keys, *self.values))

    def _slots(self, table: list[int], start: int, end: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(block, offset) of positions start..end-1 of a sequence with block table `table`."""
        pos = torch.arange(start, end)
        return torch.tensor(table, dtype=torch.long)[pos // self.block_tokens], pos % self.block_tokens

    def begin(self, entries: list[tuple[list[int], int, int]]) -> None:
        """Index the iteration once for every layer: where each packed token is written, and
        what each sequence reads (single-token decodes together, padded to the longest)."""
        for table, cached, new in entries:
            if -(-(cached + new) // self.block_tokens) > len(table):
                raise ValueError(f"a block table of {len(table)} blocks cannot hold {cached + new} tokens")
        self.entries = entries
        self.positions = torch.cat([torch.arange(c, c + n) for _, c, n in entries])  # (N,)
        writes = [self._slots(table, c, c + n) for table, c, n in entries]
        self.write_at = (torch.cat([w[0] for w in writes]), torch.cat([w[1] for w in writes]))  # (N,), (N,)
        self.decodes = [i for i, (_, _, n) in enumerate(entries) if n == 1]
        self.prompts = [(i, self._slots(table, 0, c + n)) for i, (table, c, n) in enumerate(entries) if n > 1]
        self.starts = [0, *torch.cumsum(torch.tensor([n for _, _, n in entries]), 0).tolist()]
        if self.decodes:
            longest = max(entries[i][1] + 1 for i in self.decodes)
            blocks = torch.zeros(len(self.decodes), longest, dtype=torch.long)
            offsets = torch.zeros(len(self.decodes), longest, dtype=torch.long)
            for row, i in enumerate(self.decodes):
                table, c, _ = entries[i]
                blocks[row, :c + 1], offsets[row, :c + 1] = self._slots(table, 0, c + 1)
            lengths = torch.tensor([entries[i][1] + 1 for i in self.decodes])
            self.decode_read = (blocks, offsets)  # (n, S) each, padded
            self.decode_mask = (torch.arange(longest)[None, :] < lengths[:, None])[:, None, None, :]  # (n, 1, 1, S)
            self.decode_rows = torch.tensor([self.starts[i] for i in self.decodes])  # their packed positions

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Store the packed tokens' k, v (1, nkv, N, hs) in their blocks; each sequence's queries
        q (1, nh, N, hs) attend to its cached tokens and its new ones up to themselves: the
        single-token decodes in one call over their padded caches, prompts one by one."""
        keys, values = self.keys[layer], self.values[layer]
        keys[self.write_at[0], :, self.write_at[1]] = k[0].transpose(0, 1)  # (N, nkv, hs)
        values[self.write_at[0], :, self.write_at[1]] = v[0].transpose(0, 1)
        out = torch.empty_like(q)  # (1, nh, N, hs)
        gqa = keys.shape[1] != q.shape[1]
        if self.decodes:
            blocks, offsets = self.decode_read
            kd = keys[blocks, :, offsets].permute(0, 2, 1, 3)  # (n, nkv, S, hs)
            vd = values[blocks, :, offsets].permute(0, 2, 1, 3)  # (n, nkv, S, hs)
            qd = q[0, :, self.decode_rows].transpose(0, 1)[:, :, None]  # (n, nh, 1, hs)
            yd = F.scaled_dot_product_attention(qd, kd, vd, attn_mask=self.decode_mask, enable_gqa=gqa)  # (n, nh, 1, hs)
            out[0, :, self.decode_rows] = yd[:, :, 0].transpose(0, 1)
        for i, (blocks, offsets) in self.prompts:
            _, cached, new = self.entries[i]
            at = self.starts[i]
            kp = keys[blocks, :, offsets].transpose(0, 1)[None]  # (1, nkv, S, hs)
            vp = values[blocks, :, offsets].transpose(0, 1)[None]  # (1, nkv, S, hs)
            mask = torch.arange(cached + new)[None, :] <= (cached + torch.arange(new))[:, None]  # (new, S)
            out[:, :, at:at + new] = F.scaled_dot_product_attention(q[:, :, at:at + new], kp, vp, attn_mask=mask,
                                                                    enable_gqa=gqa)
        return out


def rope_at(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """RoPE with a position per token: x (B, nh, T, hs), positions (T,)."""
    return _rotate(x, cos[positions], sin[positions])


class Attention(nn.Module):
    def __init__(self, spec: ModelSpec, dropout: float) -> None:
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = spec.heads, spec.kv_heads, spec.head_dim
        self.rope = spec.position is Position.ROPE
        self.wq = nn.Linear(spec.hidden, spec.heads * spec.head_dim, bias=spec.bias)
        self.wk = nn.Linear(spec.hidden, spec.kv_dim, bias=spec.bias)
        self.wv = nn.Linear(spec.hidden, spec.kv_dim, bias=spec.bias)
        self.wo = nn.Linear(spec.heads * spec.head_dim, spec.hidden, bias=spec.bias)
        # Qwen3's per-head q / k RMSNorm before RoPE (spec.qk_norm); eps as Qwen3's config
        self.q_norm = nn.RMSNorm(spec.head_dim, eps=1e-6) if spec.qk_norm else None
        self.k_norm = nn.RMSNorm(spec.head_dim, eps=1e-6) if spec.qk_norm else None
        self.dropout = dropout
        # context parallelism (set by the runtime): an object whose attend(q, k, v, scale=, dropout=)
        # attends this rank's queries over the whole sequence's keys (runtime.context_parallel)
        self.context = None

    def forward(self, x: torch.Tensor, cos: torch.Tensor | None, sin: torch.Tensor | None,
                cache: KVCache | None = None, layer: int = 0) -> torch.Tensor:
        bsz, seq, _ = x.shape  # (B, T, C)
        # the head counts come from the weights, so tensor parallelism (fewer local heads) just works
        q = self.wq(x).view(bsz, seq, -1, self.head_dim).transpose(1, 2)  # (B, nh, T, hs)
        k = self.wk(x).view(bsz, seq, -1, self.head_dim).transpose(1, 2)  # (B, nkv, T, hs)
        v = self.wv(x).view(bsz, seq, -1, self.head_dim).transpose(1, 2)  # (B, nkv, T, hs)
        if self.q_norm is not None:  # over each head's hs values
            q, k = self.q_norm(q), self.k_norm(k)
        if getattr(cache, "packed", False):  # continuous batching: several sequences packed in one row
            if self.rope:
                q, k = rope_at(q, cos, sin, cache.positions), rope_at(k, cos, sin, cache.positions)
            y = cache.attend(layer, q, k, v).transpose(1, 2).reshape(bsz, seq, -1)  # (1, N, nh * hs)
            return self.wo(y)
        start = cache.length if cache is not None else 0
        if self.rope:
            q, k = apply_rope(q, cos, sin, start), apply_rope(k, cos, sin, start)
        mask, causal = None, True
        if cache is not None:
            k, v = cache.update(layer, k, v)  # (B, nkv, S, hs), S = start + T
            if start:  # the new tokens see every cached one and the new ones up to themselves
                causal = False
                pos = torch.arange(k.shape[2], device=x.device)
                mask = pos[None, :] <= (start + torch.arange(seq, device=x.device))[:, None]  # (T, S)
        if self.context is not None and cache is None:  # this rank's chunks of the sequence, against all of it
            y = self.context.attend(q, k, v, dropout=self.dropout if self.training else 0.0)  # (B, nh, T, hs)
            return self.wo(y.transpose(1, 2).reshape(bsz, seq, -1))  # (B, T, nh * hs)
        gqa = k.shape[1] != q.shape[1]
        if gqa and cache is None:  # training (DTensor-friendly): repeat K/V for the query heads
            repeat = q.shape[1] // k.shape[1]
            k = k.repeat_interleave(repeat, dim=1)  # (B, nh, S, hs)
            v = v.repeat_interleave(repeat, dim=1)  # (B, nh, S, hs)
            gqa = False
        # generation reads the narrow cache directly (SDPA's grouped-query attention)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, enable_gqa=gqa,
                                           dropout_p=self.dropout if self.training else 0.0)
        y = y.transpose(1, 2).reshape(bsz, seq, -1)  # (B, T, nh * hs)
        return self.wo(y)


class FeedForward(nn.Module):
    def __init__(self, spec: ModelSpec, width: int = 0) -> None:
        super().__init__()
        self.swiglu = spec.gated  # gate (w1), up (w3), down (w2)
        self.geglu = spec.activation is Activation.GEGLU
        f = width or spec.ffn_hidden
        self.w1 = nn.Linear(spec.hidden, f, bias=spec.bias)
        self.w2 = nn.Linear(f, spec.hidden, bias=spec.bias)
        self.w3 = nn.Linear(spec.hidden, f, bias=spec.bias) if self.swiglu else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.swiglu:
            gate = F.gelu(self.w1(x), approximate="tanh") if self.geglu else F.silu(self.w1(x))
            return self.w2(gate * self.w3(x))
        return self.w2(F.gelu(self.w1(x), approximate="tanh"))


class ScaleGrad(torch.autograd.Function):
    """Identity forward; the gradient scaled by `factor` on its way back."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, factor: float) -> torch.Tensor:
        ctx.factor = factor
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad * ctx.factor, None


class GroupedExperts(nn.Module):
    """The routed experts' MLPs held as one tensor per projection: w1, w3 (experts, h, f_e)
    and w2 (experts, f_e, h) (torchtitan's layout). Under expert parallelism a rank holds the
    experts [ep_rank * n, (ep_rank + 1) * n) of them (`runtime.expert_parallel`)."""

    def __init__(self, spec: ModelSpec) -> None:
        super().__init__()
        self.gated = spec.gated
        self.geglu = spec.activation is Activation.GEGLU
        h, f, n = spec.hidden, spec.expert_ffn_hidden, spec.experts
        self.w1 = nn.Parameter(torch.empty(n, h, f))
        self.w2 = nn.Parameter(torch.empty(n, f, h))
        self.w3 = nn.Parameter(torch.empty(n, h, f)) if self.gated else None
        self.ep_rank, self.ep_size = 0, 1
        self.grad_scale = 1.0  # runtime.expert_parallel.grad_scale under expert parallelism

    def forward(self, x: torch.Tensor, counts: list[int]) -> torch.Tensor:
        """x (M, C): token copies sorted by local expert, counts[i] of them for expert i -> (M, C)."""
        w1, w2, w3 = self.w1, self.w2, self.w3
        if self.grad_scale != 1.0:  # the copies of ep ranks' tokens: their gradients add up over the ep group already
            w1, w2 = ScaleGrad.apply(w1, self.grad_scale), ScaleGrad.apply(w2, self.grad_scale)
            w3 = ScaleGrad.apply(w3, self.grad_scale) if w3 is not None else None
        if grouped_mm_applies(x, w1, w2):
            # bf16 operands (autocast does not cover the grouped GEMM: cast as it casts a matmul's)
            x, w1, w2 = x.to(torch.bfloat16), w1.to(torch.bfloat16), w2.to(torch.bfloat16)
            w3 = w3.to(torch.bfloat16) if w3 is not None else None
            offs = torch.tensor(counts, device=x.device).cumsum(0).to(torch.int32)  # (experts,) end of each group
            up = torch._grouped_mm(x, w1, offs=offs)  # (M, f_e)
            hidden = self._activate(up, torch._grouped_mm(x, w3, offs=offs) if self.gated else None)
            return torch._grouped_mm(hidden, w2, offs=offs)  # (M, C)
        # one view per expert taken once: indexing w[i] per expert would make autograd write a whole
        # (experts, ...) zero gradient for each expert (experts^2 x the weights' bytes); unbind's backward
        # stacks the experts' gradients once
        w1s, w2s = w1.unbind(0), w2.unbind(0)
        w3s = w3.unbind(0) if self.gated else None
        outs = []
        for i, part in enumerate(torch.split(x, counts, dim=0)):  # (m_i, C) each
            hidden = self._activate(part @ w1s[i], part @ w3s[i] if self.gated else None)  # (m_i, f_e)
            outs.append(hidden @ w2s[i])  # (m_i, C)
        return torch.cat(outs, dim=0) if outs else x[:0]

    def _activate(self, up: torch.Tensor, gate: torch.Tensor | None) -> torch.Tensor:
        hidden = F.silu(up) if self.gated and not self.geglu else F.gelu(up, approximate="tanh")
        return hidden * gate if gate is not None else hidden


def grouped_mm_applies(x: torch.Tensor, *weights: torch.Tensor) -> bool:
    """Whether the experts run as one grouped GEMM per projection (torch._grouped_mm, as torchtitan
    does): a CUDA GPU computing in bf16 (bf16 tensors, or bf16 autocast), rows whose bytes are
    16-byte aligned. Elsewhere (CPU, fp32) a loop of one GEMM per expert."""
    if not (x.is_cuda and hasattr(torch, "_grouped_mm")):
        return False
    autocast = torch.is_autocast_enabled("cuda")
    dtypes = {torch.get_autocast_dtype("cuda")} if autocast else {x.dtype, *(w.dtype for w in weights)}
    return dtypes == {torch.bfloat16} and all(d % 8 == 0 for w in weights for d in w.shape[1:])


class MoE(nn.Module):
    """A sparse MLP: a router (linear h -> experts), top-k of the softmax (renormalised over
    the chosen, Mixtral's rule), every token's copies through its experts, their outputs
    summed by the router's weights; shared experts every token runs. Dropless: every copy is
    computed. `ep_group` (set by `runtime.expert_parallel`) sends each copy to the rank holding
    its expert and back with two all-to-alls (and one of the counts first)."""

    def __init__(self, spec: ModelSpec) -> None:
        super().__init__()
        self.top_k = spec.experts_per_token
        self.num_experts = spec.experts
        self.router = nn.Linear(spec.hidden, spec.experts, bias=False)
        self.experts = GroupedExperts(spec)
        self.shared_expert = FeedForward(spec, spec.shared_expert_ffn_hidden) if spec.shared_expert_ffn_hidden else None
        self.ep_group = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape  # (B, T, C)
        flat = x.reshape(-1, shape[-1])  # (N, C)
        probs = torch.softmax(self.router(flat).float(), dim=-1)  # (N, E), routed in fp32
        weights, chosen = probs.topk(self.top_k, dim=-1)  # (N, k) each
        weights = (weights / weights.sum(dim=-1, keepdim=True)).to(x.dtype)
        slots = chosen.reshape(-1)  # (N k,) the expert of each copy
        order = slots.argsort(stable=True)  # copies sorted by expert
        copies = flat[order // self.top_k]  # (N k, C)
        counts = torch.bincount(slots, minlength=self.num_experts)  # (E,)
        if self.ep_group is None:
            out = self.experts(copies, counts.tolist())
        else:
            out = self._expert_parallel(copies, counts)
        unsorted = out[order.argsort()]  # (N k, C) back in (token, slot) order
        y = (unsorted.view(-1, self.top_k, shape[-1]) * weights.unsqueeze(-1)).sum(dim=1)  # (N, C)
        if self.shared_expert is not None:
            y = y + self.shared_expert(flat)
        return y.view(shape)

    def _expert_parallel(self, copies: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        return exchange_with_experts(copies, counts, self.experts.ep_size, self.ep_group, self.experts)


def exchange_with_experts(copies: torch.Tensor, counts: torch.Tensor, ep: int, group, experts) -> torch.Tensor:
    """Expert parallelism's round trip: token copies (N k, C) sorted by expert, `counts` (E,)
    of them per expert, sent to the ranks holding their experts (the counts first, then the
    copies, one all_to_all_single each), run by this rank's `experts(x, counts)` on the copies
    it received grouped by its local expert, and sent back (the third): (N k, C) in the same
    order. The copies' exchanges carry gradients (torch.distributed.nn)."""
    import torch.distributed as dist
    from torch.distributed.nn.functional import all_to_all_single

    local = counts.numel() // ep
    received_counts = torch.empty_like(counts)  # (ep * local,): [source rank, my local expert]
    dist.all_to_all_single(received_counts, counts, group=group)
    send = counts.view(ep, local).sum(dim=1).tolist()
    by_source = received_counts.view(ep, local)  # (ep, local)
    recv = by_source.sum(dim=1).tolist()
    arrived = all_to_all_single(copies.new_empty(sum(recv), copies.shape[1]), copies, recv, send,
                                group=group)  # (M, C) by source rank, then local expert
    expert_of = torch.arange(local, device=copies.device).repeat(ep).repeat_interleave(by_source.reshape(-1))
    regroup = expert_of.argsort(stable=True)  # (M,) copies by local expert
    out = experts(arrived[regroup], by_source.sum(dim=0).tolist())[regroup.argsort()]  # (M, C)
    return all_to_all_single(copies.new_empty(copies.shape), out, send, recv, group=group)  # (N k, C)


class Block(nn.Module):
    def __init__(self, spec: ModelSpec, dropout: float, index: int = 0) -> None:
        super().__init__()
        self.attention_norm = _norm(spec)
        self.attention = Attention(spec, dropout)
        self.ffn_norm = _norm(spec)
        self.feed_forward = MoE(spec) if spec.is_moe_layer(index) else FeedForward(spec)
        self.attention_dropout = nn.Dropout(dropout)  # one module per call site (module trackers need it)
        self.ffn_dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, cos: torch.Tensor | None = None, sin: torch.Tensor | None = None,
                cache: KVCache | None = None, layer: int = 0) -> torch.Tensor:
        h = self.attention_norm(x)
        # tensor parallelism's input hook on `attention` expects exactly (x, cos, sin): pass the cache only when decoding
        attended = self.attention(h, cos, sin) if cache is None else self.attention(h, cos, sin, cache, layer)
        x = x + self.attention_dropout(attended)
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
        self.layers = nn.ModuleDict({str(i): Block(spec, drop, i) for i in range(spec.layers)})
        self.norm = _norm(spec)
        self.output = nn.Linear(spec.hidden, spec.vocab, bias=False)
        if spec.tied_embeddings:
            self.output.weight = self.tok_embeddings.weight
        if spec.position is Position.ROPE:
            cos, sin = spec_rope_tables(spec)
            self.register_buffer("rope_cos", cos, persistent=False)
            self.register_buffer("rope_sin", sin, persistent=False)
        else:
            self.rope_cos = self.rope_sin = None
        self.context = None  # context parallelism (set by the runtime): its positions(T, device) are this rank's

    def tie_weights(self) -> None:
        """Share the token embedding with the output head (a tied model). `to_empty` and
        tensor parallelism's parameter swaps leave the two apart; call this after them."""
        if self.spec.tied_embeddings and self.tok_embeddings is not None and self.output is not None \
                and self.output.weight is not self.tok_embeddings.weight:
            self.output.weight = self.tok_embeddings.weight

    def init_buffers(self) -> None:
        """Recompute the rotary tables (after `to_empty` from the meta device)."""
        if self.rope_cos is not None:
            cos, sin = spec_rope_tables(self.spec, device=self.rope_cos.device)
            self.rope_cos.copy_(cos)
            self.rope_sin.copy_(sin)

    def init_weights(self, seed: int = 0) -> None:
        """GPT-2 style initialisation (std 0.02, output projections scaled by 1/sqrt(2 layers)),
        drawn per parameter from a generator seeded by (seed, parameter name): every copy of
        the model, whole or cut into pipeline stages and sharded, gets the same values."""
        scaled = 0.02 / math.sqrt(2 * self.spec.layers)
        with torch.no_grad():
            self.init_buffers()
            for raw, p in self.named_parameters():
                name = raw.replace("_checkpoint_wrapped_module.", "")
                if name == "output.weight" and self.spec.tied_embeddings:  # a last pipeline stage's copy of the tie
                    name = "tok_embeddings.weight"
                if p.dim() == 1 or name.endswith("lora_b"):  # LoRA's B starts at zero: training starts at the base
                    full = torch.ones(p.shape) if name.endswith("weight") else torch.zeros(p.shape)
                else:
                    gen = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
                    std = scaled if name.endswith(("wo.weight", "w2.weight", "experts.w2")) else 0.02
                    owner = self.get_submodule(raw.rpartition(".")[0])
                    if isinstance(owner, GroupedExperts) and owner.ep_size > 1:  # this rank's experts of the whole
                        whole = torch.randn((self.spec.experts, *p.shape[1:]), generator=gen) * std
                        full = this_ranks_experts(whole, owner.ep_rank, owner.ep_size)
                    else:
                        full = torch.randn(tuple(p.shape), generator=gen) * std
                copy_full(p, full)

    def forward(self, tokens: torch.Tensor, cache: KVCache | PagedKVCache | None = None,
                logits_at: torch.Tensor | None = None) -> torch.Tensor:
        """tokens (B, T) -> logits (B, T, V). A pipeline stage without the embedding takes and
        one without the head returns hidden states (B, T, C). With a cache, the tokens follow
        the cached ones (generation) and are added to it. `logits_at` (K,): the head runs on
        those positions only (B, K, V), as serving engines run it on each sequence's last token."""
        packed = getattr(cache, "packed", False)
        start = cache.length if cache is not None and not packed else 0
        cos, sin = self.rope_cos, self.rope_sin
        context = self.context if cache is None else None
        mine = context.positions(tokens.shape[1], tokens.device) if context is not None else None  # (T,) global
        if mine is not None and cos is not None:  # the rotation at this rank's positions, row t for its token t
            cos, sin = cos[mine], sin[mine]  # (T, hs/2) each
        if self.tok_embeddings is not None:
            seq = tokens.shape[1]
            x = self.tok_embeddings(tokens)  # (B, T, C)
            if self.pos_embeddings is not None:
                positions = (mine if mine is not None else cache.positions if packed
                             else torch.arange(start, start + seq, device=tokens.device))
                x = x + self.pos_embeddings(positions)  # (B, T, C)
            x = self.embed_dropout(x)
        else:
            x = tokens
        for i, block in enumerate(self.layers.values()):
            x = block(x, cos, sin) if cache is None else block(x, cos, sin, cache, i)
        if cache is not None and not packed:
            cache.length += x.shape[1]
        if self.output is None:
            return x
        if logits_at is not None:
            x = x[:, logits_at]  # (B, K, C)
        return self.output(self.norm(x))  # (B, T, V)


def this_ranks_experts(whole: torch.Tensor, rank: int, ep: int) -> torch.Tensor:
    """Expert-parallel rank `rank`'s experts of a tensor holding all of them along dim 0."""
    share = whole.shape[0] // ep
    return whole[rank * share:(rank + 1) * share]


def copy_full(param: torch.Tensor, full: torch.Tensor) -> None:
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
