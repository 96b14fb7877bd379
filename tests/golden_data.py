"""Published figures used by the golden tests, each with its source (the paper and table
named above each figure)."""

# Korthikanti et al., "Reducing Activation Recomputation in Large Transformer Models"
# (MLSys 2023, arXiv 2205.05198). Table 3 configurations (seq 2048, vocab 51200, dp 1,
# A100-SXM4-80GB, bf16), Table 5 iteration times (s), Figure 1 memory per GPU (GiB).
KORTHIKANTI_TABLE3 = [
    # zoo name, heads, hidden, layers, tp, pp, gpus, global batch, microbatch, interleaved stages
    ("megatron-22b", 64, 6144, 48, 8, 1, 8, 4, 4, 1),
    ("gpt3-175b", 96, 12288, 96, 8, 8, 64, 64, 1, 3),
    ("megatron-530b", 128, 20480, 105, 8, 35, 280, 280, 1, 3),
    ("megatron-1t", 160, 25600, 128, 8, 64, 512, 512, 1, 1),
]
KORTHIKANTI_TABLE5_S = {  # full recompute, sequence parallel + selective recompute
    "megatron-22b": (1.42, 1.10),
    "gpt3-175b": (18.13, 13.75),
    "megatron-530b": (49.05, 37.83),
    "megatron-1t": (94.42, 71.49),
}
KORTHIKANTI_TABLE4_22B_MS = {  # one layer of the 22B model, forward / backward (ms)
    "baseline": (7.7, 11.9),
    "sequence_parallel": (7.2, 11.8),
    "full_recompute": (7.7, 19.5),
    "selective_recompute": (7.7, 13.2),
    "selective_plus_sequence_parallel": (7.2, 13.1),
}
KORTHIKANTI_FIGURE1_GIB = {  # parameters+optimizer, activations without recompute, with SP+selective
    "megatron-22b": (45.56, 59.25, 9.56),
    "gpt3-175b": (45.56, 66.84, 12.35),
    "megatron-530b": (31.64, 114.02, 23.08),
    "megatron-1t": (32.96, 131.25, 26.56),
}

# Rajbhandari et al., "ZeRO: Memory Optimizations Toward Training Trillion Parameter Models"
# (SC 2020): Figure 1 example and Table 1 (GB, decimal), K = 12, fp16 params and grads.
ZERO_EXAMPLE_7_5B_64_GB = {"baseline": 120, "stage1": 31.4, "stage2": 16.6, "stage3": 1.88}
ZERO_TABLE1_GB = {  # params -> {dp degree: (stage1, stage2, stage3)}
    7.5e9: {1: (120, 120, 120), 4: (52.5, 41.3, 30), 16: (35.6, 21.6, 7.5), 64: (31.4, 16.6, 1.88), 1024: (30.1, 15.1, 0.12)},
    128e9: {1: (2048, 2048, 2048), 4: (896, 704, 512), 16: (608, 368, 128), 64: (536, 284, 32), 1024: (513, 257, 2)},
    1e12: {1: (16000, 16000, 16000), 4: (7000, 5500, 4000), 16: (4750, 2875, 1000), 64: (4187, 2218, 250),
           1024: (4011, 2013, 15.6)},
}

# Published parameter counts of the Llama models, as the Hugging Face model pages give them
# (safetensors "Model size"): Llama-2-70b-hf 69.0B, Meta-Llama-3-8B 8.03B,
# Meta-Llama-3-70B 70.6B, Llama-3.1-405B 406B; Llama 2 paper (Touvron et al. 2023) 7B/13B.
LLAMA_PUBLISHED_PARAMS = {
    "llama2-7b": 6.74e9,
    "llama2-13b": 13.0e9,
    "llama2-70b": 69.0e9,
    "llama3-8b": 8.03e9,
    "llama3-70b": 70.6e9,
    "llama3-405b": 406e9,
}

# KV cache (calibration.yaml kv_cache): 2 * layers * kv_heads * head_dim * bytes.
KV_BYTES_PER_TOKEN_KIB = {"llama2-70b": 320, "llama3-8b": 128}


def published_strategy(row, recompute: str):
    """The configuration Korthikanti et al. ran for a Table 3 row: full recompute, or sequence
    parallelism with selective recompute; Megatron-LM without FlashAttention."""
    from costmodel import Strategy

    _name, _a, _h, _l, tp, pp, _gpus, batch, mb, v = row
    return Strategy(tp=tp, pp=pp, global_batch=batch, microbatch_size=mb, virtual_stages=v,
                    schedule="interleaved" if v > 1 else "1f1b", recompute=recompute,
                    sequence_parallel=recompute == "selective", flash_attention=False)
