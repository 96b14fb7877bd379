"""The model zoo: named `ModelSpec`s and the `nn.Module` that realises any of them.

Sizes are the published ones: GPT-3 (Brown et al. 2020, Table 2.1, with Megatron-LM's
head counts where the paper's do not divide the width, and its vocabulary padded to 51200),
the Megatron models of Korthikanti et al. 2022 (Table 3), Llama 2 (Touvron et al. 2023) and
Llama 3 / 3.1 (Dubey et al. 2024, Table 3) as in their Hugging Face config.json files.
"""

from __future__ import annotations

from costmodel.spec import ModelSpec, gpt_spec, llama_spec

_SPECS = [
    gpt_spec("gpt3-1.3b", layers=24, hidden=2048, heads=16),
    gpt_spec("gpt3-2.7b", layers=32, hidden=2560, heads=32),
    gpt_spec("gpt3-6.7b", layers=32, hidden=4096, heads=32),
    gpt_spec("gpt3-13b", layers=40, hidden=5120, heads=40),
    gpt_spec("gpt3-175b", layers=96, hidden=12288, heads=96),
    gpt_spec("megatron-22b", layers=48, hidden=6144, heads=64),
    gpt_spec("megatron-530b", layers=105, hidden=20480, heads=128),
    gpt_spec("megatron-1t", layers=128, hidden=25600, heads=160),
    llama_spec("llama2-7b", layers=32, hidden=4096, heads=32, kv_heads=32, ffn_hidden=11008, vocab=32000, seq_len=4096),
    llama_spec("llama2-13b", layers=40, hidden=5120, heads=40, kv_heads=40, ffn_hidden=13824, vocab=32000, seq_len=4096),
    llama_spec("llama2-70b", layers=80, hidden=8192, heads=64, kv_heads=8, ffn_hidden=28672, vocab=32000, seq_len=4096),
    llama_spec("llama3-8b", layers=32, hidden=4096, heads=32, kv_heads=8, ffn_hidden=14336, vocab=128256, seq_len=8192),
    llama_spec("llama3-70b", layers=80, hidden=8192, heads=64, kv_heads=8, ffn_hidden=28672, vocab=128256, seq_len=8192),
    llama_spec("llama3-405b", layers=126, hidden=16384, heads=128, kv_heads=8, ffn_hidden=53248, vocab=128256, seq_len=8192),
    # tiny models for tests and CPU runs
    ModelSpec(name="tiny-gpt", layers=4, hidden=64, heads=4, vocab=256, seq_len=32, tied_embeddings=False),
    # GPT-2's tie of the token embedding and the output head (so do GPT-NeoX, Gemma and small Llamas)
    ModelSpec(name="tiny-gpt-tied", layers=4, hidden=64, heads=4, vocab=256, seq_len=32),
    llama_spec("tiny-llama", layers=4, hidden=64, heads=4, kv_heads=2, ffn_hidden=176, vocab=256, seq_len=32),
]

ZOO: dict[str, ModelSpec] = {spec.name: spec for spec in _SPECS}


def zoo_names() -> list[str]:
    return list(ZOO)
