"""The model zoo: named `ModelSpec`s and the `nn.Module` that realises any of them.

Sizes are the published ones: GPT-3 (Brown et al. 2020, Table 2.1, with Megatron-LM's
head counts where the paper's do not divide the width, and its vocabulary padded to 51200),
the Megatron models of Korthikanti et al. 2022 (Table 3), Llama 2 (Touvron et al. 2023) and
Llama 3 / 3.1 (Dubey et al. 2024, Table 3) as in their Hugging Face config.json files;
mixtures of experts as in theirs: Mixtral 8x7B and 8x22B (mistralai), Qwen3-30B-A3B (Qwen),
DeepSeek-V3 (deepseek-ai; its multi-token-prediction module, not used by the main model's
training step, left out as the report's 671B count does).
"""

from __future__ import annotations

from dataclasses import replace

from costmodel.spec import ModelSpec, gpt_spec, llama_spec


def _mixtral(name: str, *, layers: int, hidden: int, heads: int, ffn_hidden: int, vocab: int, seq_len: int) -> ModelSpec:
    return replace(llama_spec(name, layers=layers, hidden=hidden, heads=heads, kv_heads=8, ffn_hidden=ffn_hidden,
                              vocab=vocab, seq_len=seq_len), experts=8, experts_per_token=2)

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
    # Llama 3 rotates with a base of 500,000 (its config's rope_theta), Qwen3 and Mixtral with 1,000,000
    replace(llama_spec("llama3-8b", layers=32, hidden=4096, heads=32, kv_heads=8, ffn_hidden=14336, vocab=128256,
                       seq_len=8192), rope_theta=500000.0),
    replace(llama_spec("llama3-70b", layers=80, hidden=8192, heads=64, kv_heads=8, ffn_hidden=28672, vocab=128256,
                       seq_len=8192), rope_theta=500000.0),
    # Llama 3.1 (and 3.3 70B): Llama 3's shapes read to 131,072 positions (Llama 3's RoPE scaling, 8 over
    # the 8,192 it was first trained at; trained here at 8,192)
    *(replace(llama_spec(name, layers=layers, hidden=hidden, heads=heads, kv_heads=8, ffn_hidden=ffn, vocab=128256,
                         seq_len=8192), max_positions=131072, rope_theta=500000.0, rope_scaling="llama3",
              rope_factor=8.0, rope_original_positions=8192)
      for name, layers, hidden, heads, ffn in (("llama3.1-8b", 32, 4096, 32, 14336),
                                               ("llama3.1-70b", 80, 8192, 64, 28672),
                                               ("llama3-405b", 126, 16384, 128, 53248))),
    # mixtures of experts: trained here at 4,096 tokens, served to their configs' max_position_embeddings
    replace(_mixtral("mixtral-8x7b", layers=32, hidden=4096, heads=32, ffn_hidden=14336, vocab=32000, seq_len=4096),
            max_positions=32768, rope_theta=1e6),
    replace(_mixtral("mixtral-8x22b", layers=56, hidden=6144, heads=48, ffn_hidden=16384, vocab=32768, seq_len=4096),
            max_positions=65536, rope_theta=1e6),
    replace(llama_spec("qwen3-30b-a3b", layers=48, hidden=2048, heads=32, kv_heads=4, ffn_hidden=6144, vocab=151936,
                       seq_len=4096), head_dim=128, v_head_dim=0, experts=128, experts_per_token=8, expert_ffn_hidden=768,
            max_positions=40960, rope_theta=1e6, qk_norm=True),
    replace(llama_spec("qwen3-235b-a22b", layers=94, hidden=4096, heads=64, kv_heads=4, ffn_hidden=12288,
                       vocab=151936, seq_len=4096), head_dim=128, v_head_dim=0, experts=128, experts_per_token=8,
            expert_ffn_hidden=1536, max_positions=40960, rope_theta=1e6, qk_norm=True),
    # DeepSeek-V3 (DeepSeek-AI 2024, arXiv:2412.19437): MLA, 1 shared + 256 routed experts (top-8), 3 dense layers
    replace(llama_spec("deepseek-v3", layers=61, hidden=7168, heads=128, kv_heads=128, ffn_hidden=18432,
                       vocab=129280, seq_len=4096), head_dim=192, v_head_dim=128, kv_lora_rank=512, q_lora_rank=1536,
            qk_rope_head_dim=64, experts=256, experts_per_token=8, expert_ffn_hidden=2048,
            shared_expert_ffn_hidden=2048, dense_layers=3, mtp_layers=1, max_positions=163840,
            # YaRN over 4,096 positions; sigmoid scores, top-8 within the best 4 of 8 groups, weights x 2.5,
            # a per-expert bias for balance (its config: noaux_tc)
            rope_scaling="yarn", rope_factor=40.0, rope_original_positions=4096, rope_mscale=1.0,
            rope_mscale_all_dim=1.0, router_score="sigmoid", router_groups=8, router_group_topk=4,
            router_topk_scale=2.5, router_expert_bias=True),
    # OpenAI's gpt-oss (arXiv 2508.10925; openai/gpt-oss-20b and -120b config.json): every layer's MLP routed
    # (top-4), q/k/v/o, expert and router biases, 64 query heads of 64 over 2880, a 128-token window in every
    # other layer; its checkpoints keep the experts in MXFP4 (hub_weights). Served here; trained at 4,096 tokens
    # (the runtime does not build biased experts: planner.contract.model_planned_only)
    *(replace(llama_spec(name, layers=layers, hidden=2880, heads=64, kv_heads=8, ffn_hidden=2880, vocab=201088,
                         seq_len=4096), head_dim=64, v_head_dim=64, bias=True, experts=experts, experts_per_token=4,
                 expert_ffn_hidden=2880, attention_window=128, windowed_layers=layers // 2, max_positions=131072,
                 rope_theta=150000.0, rope_scaling="yarn", rope_factor=32.0, rope_original_positions=4096)
      for name, layers, experts in (("gpt-oss-20b", 24, 32), ("gpt-oss-120b", 36, 128))),
    # tiny models for tests and CPU runs
    ModelSpec(name="tiny-gpt", layers=4, hidden=64, heads=4, vocab=256, seq_len=32, tied_embeddings=False),
    # GPT-2's tie of the token embedding and the output head (so do GPT-NeoX, Gemma and small Llamas)
    ModelSpec(name="tiny-gpt-tied", layers=4, hidden=64, heads=4, vocab=256, seq_len=32),
    llama_spec("tiny-llama", layers=4, hidden=64, heads=4, kv_heads=2, ffn_hidden=176, vocab=256, seq_len=32),
    # 4 experts (top-2) and a shared one in each of 2 layers; the first layer dense
    replace(llama_spec("tiny-moe", layers=3, hidden=64, heads=4, kv_heads=2, ffn_hidden=128, vocab=256, seq_len=32),
            experts=4, experts_per_token=2, expert_ffn_hidden=96, shared_expert_ffn_hidden=64, dense_layers=1),
]

ZOO: dict[str, ModelSpec] = {spec.name: spec for spec in _SPECS}

# the Hugging Face Hub checkpoints of the built-in models that were published as one (what `vllm
# serve` loads), and their chat-tuned twins of the same architecture
HUB_IDS: dict[str, str] = {
    "llama2-7b": "meta-llama/Llama-2-7b-hf", "llama2-13b": "meta-llama/Llama-2-13b-hf",
    "llama2-70b": "meta-llama/Llama-2-70b-hf", "llama3-8b": "meta-llama/Meta-Llama-3-8B",
    "llama3-70b": "meta-llama/Meta-Llama-3-70B", "llama3.1-8b": "meta-llama/Llama-3.1-8B",
    "llama3.1-70b": "meta-llama/Llama-3.1-70B", "llama3-405b": "meta-llama/Llama-3.1-405B",
    "mixtral-8x7b": "mistralai/Mixtral-8x7B-v0.1", "mixtral-8x22b": "mistralai/Mixtral-8x22B-v0.1",
    "qwen3-30b-a3b": "Qwen/Qwen3-30B-A3B", "qwen3-235b-a22b": "Qwen/Qwen3-235B-A22B",
    "deepseek-v3": "deepseek-ai/DeepSeek-V3", "gpt-oss-20b": "openai/gpt-oss-20b", "gpt-oss-120b": "openai/gpt-oss-120b",
}
_TUNED = {"meta-llama/Llama-2-7b-chat-hf": "llama2-7b", "meta-llama/Llama-2-13b-chat-hf": "llama2-13b",
          "meta-llama/Llama-2-70b-chat-hf": "llama2-70b", "meta-llama/Meta-Llama-3-8B-Instruct": "llama3-8b",
          "meta-llama/Meta-Llama-3-70B-Instruct": "llama3-70b", "meta-llama/Llama-3.1-405B-Instruct": "llama3-405b",
          "meta-llama/Llama-3.1-8B-Instruct": "llama3.1-8b", "meta-llama/Meta-Llama-3.1-8B": "llama3.1-8b",
          "meta-llama/Meta-Llama-3.1-8B-Instruct": "llama3.1-8b", "meta-llama/Llama-3.1-70B-Instruct": "llama3.1-70b",
          "meta-llama/Meta-Llama-3.1-70B": "llama3.1-70b", "meta-llama/Meta-Llama-3.1-70B-Instruct": "llama3.1-70b",
          "meta-llama/Llama-3.3-70B-Instruct": "llama3.1-70b", "meta-llama/Meta-Llama-3.1-405B": "llama3-405b",
          "mistralai/Mixtral-8x7B-Instruct-v0.1": "mixtral-8x7b", "mistralai/Mixtral-8x22B-Instruct-v0.1": "mixtral-8x22b"}


# checkpoints of a built-in model's architecture that keep their weights in 8-bit floats (block-scaled
# e4m3: quant_method fp8 in their config.json), which vLLM serves as such without being told
_FP8_CHECKPOINTS = {"deepseek-ai/DeepSeek-V3": "deepseek-v3", "deepseek-ai/DeepSeek-V3-0324": "deepseek-v3",
                    "deepseek-ai/DeepSeek-V3.1": "deepseek-v3", "deepseek-ai/DeepSeek-R1": "deepseek-v3",
                    "deepseek-ai/DeepSeek-R1-0528": "deepseek-v3"}
FP8_SUFFIX = "-fp8"  # a quantized twin's Hub id: Qwen/Qwen3-235B-A22B-FP8, ...-Instruct-FP8
# checkpoints whose routed experts are MXFP4 (quant_method mxfp4), the rest 16-bit
_MXFP4_CHECKPOINTS = {"openai/gpt-oss-20b", "openai/gpt-oss-120b"}


def zoo_name_of_hub_id(hub_id: str) -> str | None:
    """The built-in model a Hub id names (its base or chat-tuned checkpoint, an fp8 checkpoint of
    it; case aside), or None."""
    known = ({v.lower(): k for k, v in HUB_IDS.items()} | {k.lower(): v for k, v in _TUNED.items()}
             | {k.lower(): v for k, v in _FP8_CHECKPOINTS.items()})
    key = hub_id.lower()
    if key not in known and key.endswith(FP8_SUFFIX):
        key = key[: -len(FP8_SUFFIX)]
    return known.get(key)


def hub_weights(hub_id: str) -> str | None:
    """The stored weights of a built-in model's Hub checkpoint where they are not 16-bit: "fp8"
    (8-bit floats), "mxfp4" (MXFP4 experts); None otherwise."""
    if not zoo_name_of_hub_id(hub_id):
        return None
    key = hub_id.lower()
    if key in {k.lower() for k in _MXFP4_CHECKPOINTS}:
        return "mxfp4"
    return "fp8" if key in {k.lower() for k in _FP8_CHECKPOINTS} or key.endswith(FP8_SUFFIX) else None


def zoo_names() -> list[str]:
    return list(ZOO)
