"""Under torchrun (4 processes): context-parallel attention and a Hugging Face model's forward
under it, each against the same computation on the whole sequence in one process; prints one
JSON line of the largest differences (rank 0)."""

import json
import sys

import torch
import torch.distributed as dist
import torch.nn.functional as F

from runtime.context_parallel import ContextShard, apply_hf_context_parallel


def attention_errors(shard: ContextShard, heads: int, kv_heads: int, seq: int, window: int | None = None,
                     softcap: float | None = None) -> dict[str, float]:
    """cp attention (fp64) of this rank's chunks against SDPA over the whole sequence (in a sliding
    window of `window` keys, a query's own included, where given; with Gemma-2's soft-capped scores
    against its eager formula, where `softcap` is given): output and gradients."""
    gen = torch.Generator().manual_seed(7)
    q = torch.randn(2, heads, seq, 8, dtype=torch.float64, generator=gen, requires_grad=True)
    k = torch.randn(2, kv_heads, seq, 8, dtype=torch.float64, generator=gen, requires_grad=True)
    v = torch.randn(2, kv_heads, seq, 8, dtype=torch.float64, generator=gen, requires_grad=True)
    w = torch.randn(2, heads, seq, 8, dtype=torch.float64, generator=gen)
    if softcap is not None:  # transformers' Gemma-2 eager_attention_forward, causal
        rep = heads // kv_heads
        scores = q @ k.repeat_interleave(rep, 1).transpose(2, 3) * 8 ** -0.5
        scores = torch.tanh(scores / softcap) * softcap
        scores = scores.masked_fill(torch.ones(seq, seq, dtype=torch.bool).triu(1), float("-inf"))
        whole = scores.softmax(-1) @ v.repeat_interleave(rep, 1)
    elif window is None:
        whole = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=heads != kv_heads)
    else:
        i, j = torch.arange(seq)[:, None], torch.arange(seq)[None, :]
        band = (j <= i) & (j > i - window)  # (seq, seq)
        whole = F.scaled_dot_product_attention(q, k, v, attn_mask=band, enable_gqa=heads != kv_heads)
    (whole * w).sum().backward()
    mine = [shard.shard(t.detach(), dim=2).requires_grad_() for t in (q, k, v)]
    out = shard.attend(*mine, window=window, softcap=softcap)
    (out * shard.shard(w, dim=2)).sum().backward()
    errors = {"out": (out - shard.shard(whole.detach(), dim=2)).abs().max().item()}
    for name, local, full in zip("qkv", mine, (q, k, v)):
        errors[f"d{name}"] = (local.grad - shard.shard(full.grad, dim=2)).abs().max().item()
    return errors


def hf_logits_error(shard: ContextShard, seq: int) -> float:
    """A tiny LlamaForCausalLM's logits for this rank's tokens under cp against the whole model's."""
    import transformers

    torch.manual_seed(3)
    config = transformers.LlamaConfig(num_hidden_layers=2, hidden_size=32, num_attention_heads=4,
                                      num_key_value_heads=2, intermediate_size=64, vocab_size=128,
                                      max_position_embeddings=64, attn_implementation="sdpa")
    model = transformers.AutoModelForCausalLM.from_config(config).double()
    tokens = torch.randint(0, 128, (2, seq), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        whole = model(tokens).logits  # (2, seq, V)
        apply_hf_context_parallel(model, shard)
        mine = model(shard.shard(tokens)).logits  # (2, seq / cp, V): its positions from the hook
    return (mine - shard.shard(whole)).abs().max().item()


def main() -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    seq = 8 * world
    shard = ContextShard(dist.group.WORLD, rank, world, seq)
    result = {"mha": attention_errors(shard, 4, 4, seq), "gqa": attention_errors(shard, 4, 2, seq),
              "window": attention_errors(shard, 4, 2, seq, window=5),  # (a window across the 8-token chunks)
              "softcap": attention_errors(shard, 4, 2, seq, softcap=0.5),  # (scores of about 1: the cap bites)
              "positions": shard.positions(seq // world).tolist()}
    if len(sys.argv) > 1 and sys.argv[1] == "--hf":
        result["hf_logits"] = hf_logits_error(shard, seq)
    gathered = [None] * world
    dist.all_gather_object(gathered, result)
    if rank == 0:
        print(json.dumps(gathered))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
