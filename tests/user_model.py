"""A user module for `--model py:user_model:build` tests."""

from costmodel.spec import gpt_spec
from planner.zoo.model import Transformer


def build():
    return Transformer(gpt_spec("user-gpt", layers=6, hidden=256, heads=8, vocab=1000, seq_len=128))


def not_a_transformer():
    import torch

    return torch.nn.Linear(4, 4), (torch.zeros(2, 4),)


class _Block(__import__("torch").nn.Module):
    """A Llama-like layer written the way a user would, without paraplan's classes."""

    def __init__(self, h, nh, nkv, f):
        import torch.nn as nn

        super().__init__()
        self.nh, self.nkv, self.hd = nh, nkv, h // nh
        self.norm1, self.norm2 = nn.RMSNorm(h), nn.RMSNorm(h)
        self.q = nn.Linear(h, h, bias=False)
        self.k = nn.Linear(h, nkv * self.hd, bias=False)
        self.v = nn.Linear(h, nkv * self.hd, bias=False)
        self.o = nn.Linear(h, h, bias=False)
        self.gate = nn.Linear(h, f, bias=False)
        self.up = nn.Linear(h, f, bias=False)
        self.down = nn.Linear(f, h, bias=False)

    def forward(self, x):
        import torch.nn.functional as F

        b, t, h = x.shape
        y = self.norm1(x)
        q = self.q(y).view(b, t, self.nh, self.hd).transpose(1, 2)  # (B, nh, T, hs)
        k = self.k(y).view(b, t, self.nkv, self.hd).transpose(1, 2)  # (B, nkv, T, hs)
        v = self.v(y).view(b, t, self.nkv, self.hd).transpose(1, 2)  # (B, nkv, T, hs)
        k = k.repeat_interleave(self.nh // self.nkv, dim=1)
        v = v.repeat_interleave(self.nh // self.nkv, dim=1)
        a = self.merge_heads(F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2), h)
        x = x + self.o(a)
        y = self.norm2(x)
        return x + self.down(F.silu(self.gate(y)) * self.up(y))

    def merge_heads(self, a, h):
        """(B, T, nh, hs) -> (B, T, h): sized from the model's hidden width."""
        return a.reshape(a.shape[0], a.shape[1], h)


class UserLM(__import__("torch").nn.Module):
    def __init__(self, layers=3, h=128, nh=8, nkv=2, f=352, vocab=1000):
        import torch.nn as nn

        super().__init__()
        self.embed = nn.Embedding(vocab, h)
        self.blocks = nn.ModuleList(_Block(h, nh, nkv, f) for _ in range(layers))
        self.norm = nn.RMSNorm(h)
        self.head = nn.Linear(h, vocab, bias=False)

    def forward(self, tokens):
        x = self.embed(tokens)
        for blk in self.blocks:
            x = blk(x)
        return self.head(self.norm(x))


def user_lm():
    import torch

    return UserLM(), (torch.zeros(1, 64, dtype=torch.long),)


class _TPBlock(_Block):
    """The same layer, merging its attention heads with -1 (its local heads under tensor
    parallelism) as Hugging Face's and torchtitan's layers do."""

    def merge_heads(self, a, h):
        return a.reshape(a.shape[0], a.shape[1], -1)  # (B, T, nh * hs)


def user_lm_tp():
    """UserLM with its own block class (_TPBlock), vocabulary 256 and 4 layers: run by the tests."""
    import torch

    model = UserLM(layers=4, h=64, nh=4, nkv=2, f=128, vocab=256)
    model.blocks = torch.nn.ModuleList(_TPBlock(64, 4, 2, 128) for _ in range(4))
    return model, (torch.zeros(1, 32, dtype=torch.long),)


def user_lm_without_inputs():
    return UserLM()


class _HandRMSNorm(__import__("torch").nn.Module):
    """RMSNorm written out as Hugging Face's LlamaRMSNorm is: pow(2), mean, rsqrt, mul."""

    def __init__(self, h, eps=1e-6):
        import torch

        super().__init__()
        self.weight = torch.nn.Parameter(torch.ones(h))
        self.eps = eps

    def forward(self, x):
        import torch

        variance = x.float().pow(2).mean(-1, keepdim=True)
        return self.weight * (x.float() * torch.rsqrt(variance + self.eps)).to(x.dtype)


def user_lm_hand_norm():
    import torch

    model = UserLM()
    for blk in model.blocks:
        blk.norm1, blk.norm2 = _HandRMSNorm(128), _HandRMSNorm(128)
    model.norm = _HandRMSNorm(128)
    return model, (torch.zeros(1, 64, dtype=torch.long),)


def hf_llama():
    """A Hugging Face LlamaForCausalLM (needs transformers), as a user would pass it."""
    import torch
    import transformers

    config = transformers.LlamaConfig(num_hidden_layers=2, hidden_size=256, num_attention_heads=8,
                                      num_key_value_heads=2, intermediate_size=512, vocab_size=1000,
                                      max_position_embeddings=128)
    return transformers.LlamaForCausalLM(config), (torch.zeros(1, 64, dtype=torch.long),)


class _ScaledLM(UserLM):
    """Scales its embedding by sqrt(hidden) in its own forward (as Gemma does): not the plain
    embedding -> blocks -> norm -> head chain that pipeline stages are cut from."""

    def forward(self, tokens):
        x = self.embed(tokens) * 8.0
        for blk in self.blocks:
            x = blk(x)
        return self.head(self.norm(x))


def user_lm_scaled():
    import torch

    model = _ScaledLM(layers=4, h=64, nh=4, nkv=2, f=128, vocab=256)
    model.blocks = torch.nn.ModuleList(_TPBlock(64, 4, 2, 128) for _ in range(4))
    return model, (torch.zeros(1, 32, dtype=torch.long),)


class _MLPBlock(__import__("torch").nn.Module):
    """Linear-GELU-Linear with a residual: no attention anywhere."""

    def __init__(self, h):
        import torch

        super().__init__()
        self.fc1 = torch.nn.Linear(h, 4 * h)
        self.fc2 = torch.nn.Linear(4 * h, h)

    def forward(self, x):
        import torch

        return x + self.fc2(torch.nn.functional.gelu(self.fc1(x)))


class _MLPStack(__import__("torch").nn.Module):
    def __init__(self, h, layers):
        import torch

        super().__init__()
        self.blocks = torch.nn.ModuleList(_MLPBlock(h) for _ in range(layers))

    def forward(self, x):
        for block in self.blocks:
            x = block(x)
        return x


def mlp_stack():
    """24 blocks of 8192 -> 32768 -> 8192 (12.9B parameters), inputs (batch 1, 2048 tokens, 8192)."""
    import torch

    return _MLPStack(8192, 24), (torch.zeros(1, 2048, 8192),)


def mlp_stack_without_inputs():
    return _MLPStack(64, 2)


def hf_llama_70b_shape():
    """transformers' LlamaForCausalLM with Llama-2-70B's layer (hidden 8192, 64 heads, 8 KV
    heads, ffn 28672), four layers deep, given as a py: module with its token inputs."""
    import torch
    import transformers

    config = transformers.LlamaConfig(hidden_size=8192, intermediate_size=28672, num_attention_heads=64,
                                      num_key_value_heads=8, num_hidden_layers=4, vocab_size=32000,
                                      max_position_embeddings=4096)
    return transformers.LlamaForCausalLM(config), (torch.zeros(1, 4096, dtype=torch.long),)
