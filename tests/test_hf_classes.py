"""The config.json reader against transformers' own model classes: the parameter count the
spec gives equals the count of the real `*ForCausalLM` built from the same config on the
meta device (nothing allocated), for the architectures the reader sizes. Configs are the
published ones' sizing fields (Hugging Face model cards' config.json)."""

import pytest

transformers = pytest.importorskip("transformers")
torch = pytest.importorskip("torch")

from planner.model_source import spec_from_hf_config  # noqa: E402

CONFIGS = {
    "meta-llama/Meta-Llama-3-8B": {
        "model_type": "llama", "num_hidden_layers": 32, "hidden_size": 4096, "num_attention_heads": 32,
        "num_key_value_heads": 8, "intermediate_size": 14336, "vocab_size": 128256,
        "max_position_embeddings": 8192, "rope_theta": 500000.0, "rms_norm_eps": 1e-5, "hidden_act": "silu",
        "tie_word_embeddings": False},
    "mistralai/Mistral-7B-v0.3": {
        "model_type": "mistral", "num_hidden_layers": 32, "hidden_size": 4096, "num_attention_heads": 32,
        "num_key_value_heads": 8, "intermediate_size": 14336, "vocab_size": 32768,
        "max_position_embeddings": 32768, "rope_theta": 1000000.0, "rms_norm_eps": 1e-5, "hidden_act": "silu",
        "tie_word_embeddings": False},
    "meta-llama/Llama-3.2-1B (tied)": {
        "model_type": "llama", "num_hidden_layers": 16, "hidden_size": 2048, "num_attention_heads": 32,
        "num_key_value_heads": 8, "intermediate_size": 8192, "vocab_size": 128256,
        "max_position_embeddings": 131072, "rope_theta": 500000.0, "rms_norm_eps": 1e-5, "hidden_act": "silu",
        "tie_word_embeddings": True},
    "openai-community/gpt2-medium": {
        "model_type": "gpt2", "n_layer": 24, "n_embd": 1024, "n_head": 16, "vocab_size": 50257, "n_positions": 1024},
    "Qwen/Qwen2.5-7B": {
        "model_type": "qwen2", "num_hidden_layers": 28, "hidden_size": 3584, "num_attention_heads": 28,
        "num_key_value_heads": 4, "intermediate_size": 18944, "vocab_size": 152064,
        "max_position_embeddings": 131072, "rope_theta": 1000000.0, "rms_norm_eps": 1e-6, "hidden_act": "silu",
        "tie_word_embeddings": False},
    # head_dim 256 (not hidden / heads), a GELU-gated MLP, tied head, four norms per layer
    "google/gemma-2-9b": {
        "model_type": "gemma2", "num_hidden_layers": 42, "hidden_size": 3584, "num_attention_heads": 16,
        "num_key_value_heads": 8, "head_dim": 256, "intermediate_size": 14336, "vocab_size": 256000,
        "max_position_embeddings": 8192, "rope_theta": 10000.0, "rms_norm_eps": 1e-6,
        "hidden_activation": "gelu_pytorch_tanh", "sliding_window": 4096, "attn_logit_softcapping": 50.0,
        "final_logit_softcapping": 30.0, "query_pre_attn_scalar": 256},
    "google/gemma-2-2b": {
        "model_type": "gemma2", "num_hidden_layers": 26, "hidden_size": 2304, "num_attention_heads": 8,
        "num_key_value_heads": 4, "head_dim": 256, "intermediate_size": 9216, "vocab_size": 256000,
        "max_position_embeddings": 8192, "rope_theta": 10000.0, "rms_norm_eps": 1e-6,
        "hidden_activation": "gelu_pytorch_tanh", "sliding_window": 4096, "attn_logit_softcapping": 50.0,
        "final_logit_softcapping": 30.0, "query_pre_attn_scalar": 256},
    # head_dim 128 with hidden 1024 over 16 heads
    "Qwen/Qwen3-0.6B": {
        "model_type": "qwen3", "num_hidden_layers": 28, "hidden_size": 1024, "num_attention_heads": 16,
        "num_key_value_heads": 8, "head_dim": 128, "intermediate_size": 3072, "vocab_size": 151936,
        "max_position_embeddings": 40960, "rope_theta": 1000000.0, "rms_norm_eps": 1e-6, "hidden_act": "silu",
        "tie_word_embeddings": True},
    # five local (512-token window) layers to one global, q_norm / k_norm, one KV head, tied
    "google/gemma-3-1b-it": {
        "model_type": "gemma3_text", "num_hidden_layers": 26, "hidden_size": 1152, "num_attention_heads": 4,
        "num_key_value_heads": 1, "head_dim": 256, "intermediate_size": 6912, "vocab_size": 262144,
        "max_position_embeddings": 32768, "rope_theta": 1000000, "rope_local_base_freq": 10000,
        "rms_norm_eps": 1e-6, "hidden_activation": "gelu_pytorch_tanh", "sliding_window": 512,
        "sliding_window_pattern": 6, "query_pre_attn_scalar": 256, "attn_logit_softcapping": None,
        "final_logit_softcapping": None, "pad_token_id": 0, "bos_token_id": 2, "eos_token_id": [1, 106]},
    # fused qkv_proj and gate_up_proj (the same sizes as Llama's split ones); a sliding window in every layer
    "microsoft/Phi-3-mini-4k-instruct": {
        "model_type": "phi3", "num_hidden_layers": 32, "hidden_size": 3072, "num_attention_heads": 32,
        "num_key_value_heads": 32, "intermediate_size": 8192, "vocab_size": 32064,
        "max_position_embeddings": 4096, "rope_theta": 10000.0, "rms_norm_eps": 1e-5, "hidden_act": "silu",
        "sliding_window": 2047, "tie_word_embeddings": False, "pad_token_id": 32000, "eos_token_id": 32000},
    "microsoft/phi-4": {
        "model_type": "phi3", "num_hidden_layers": 40, "hidden_size": 5120, "num_attention_heads": 40,
        "num_key_value_heads": 10, "intermediate_size": 17920, "vocab_size": 100352,
        "max_position_embeddings": 16384, "rope_theta": 250000.0, "rms_norm_eps": 1e-5, "hidden_act": "silu",
        "sliding_window": None, "tie_word_embeddings": False, "pad_token_id": 100349, "eos_token_id": 100265},
}
# Qwen2's q, k and v carry biases that the spec (one `bias` flag for every linear) leaves out;
# Gemma-2's two extra norms per layer (before and after the MLP) and Qwen3's and Gemma-3's q_norm /
# k_norm (head_dim each) are left out too
TOLERANCE = {name: 0.0 for name in CONFIGS} | {"Qwen/Qwen2.5-7B": 1e-4, "google/gemma-2-9b": 1e-4,
                                              "google/gemma-2-2b": 1e-4, "Qwen/Qwen3-0.6B": 1e-4,
                                              "google/gemma-3-1b-it": 1e-4}
MODEL_CARD = {"google/gemma-2-9b": 9.24e9, "google/gemma-2-2b": 2.61e9, "Qwen/Qwen3-0.6B": 0.596e9,
              "google/gemma-3-1b-it": 1.0e9}


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_spec_counts_the_parameters_of_the_real_class(name):
    data = CONFIGS[name]
    config = transformers.AutoConfig.for_model(**data)
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(config)
    real = sum(p.numel() for p in model.parameters())  # tied weights counted once
    spec = spec_from_hf_config(data, name=name)
    assert abs(spec.num_params - real) <= TOLERANCE[name] * real, (spec.num_params, real)


def test_mixtral_is_read_with_its_experts_not_as_a_dense_mistral():
    data = {"model_type": "mixtral", "num_hidden_layers": 32, "hidden_size": 4096, "num_attention_heads": 32,
            "num_key_value_heads": 8, "intermediate_size": 14336, "vocab_size": 32000, "num_local_experts": 8,
            "num_experts_per_tok": 2, "rope_theta": 1e6, "rms_norm_eps": 1e-5, "hidden_act": "silu",
            "max_position_embeddings": 32768, "tie_word_embeddings": False}
    config = transformers.AutoConfig.for_model(**data)
    with torch.device("meta"):
        real = sum(p.numel() for p in transformers.AutoModelForCausalLM.from_config(config).parameters())
    assert abs(real - 46.70e9) / 46.70e9 < 0.005  # the model card's 46.7B
    dense = spec_from_hf_config({**data, "model_type": "mistral", "num_local_experts": 1}).num_params
    assert abs(dense - 7.24e9) / 7.24e9 < 0.005  # what the reader once planned
    spec = spec_from_hf_config(data)
    assert spec.num_params == real and (spec.experts, spec.experts_per_token) == (8, 2)


def test_hf_input_reads_a_model_directory_and_checks_it_against_transformers(tmp_path, monkeypatch):
    import json

    from costmodel.errors import ConfigError
    from planner import model_source

    model_dir = tmp_path / "Meta-Llama-3-8B"
    model_dir.mkdir()
    (model_dir / "config.json").write_text(json.dumps(CONFIGS["meta-llama/Meta-Llama-3-8B"]))
    spec, graph = model_source.load_model(f"hf:{model_dir}")
    assert spec.name == "Meta-Llama-3-8B" and graph is None
    assert spec.num_params == 8_030_261_248  # the model card's 8.03B, counted by transformers above
    assert model_source.load_model(f"hf:{model_dir / 'config.json'}")[0].num_params == spec.num_params
    with pytest.raises(ConfigError, match="no config.json there"):
        model_source.load_model(f"hf:{tmp_path / 'nothing'}")
    # a config whose real class the reader would misprice is refused with both counts
    monkeypatch.setattr(model_source, "_transformers_count", lambda data: 9_000_000_000)
    with pytest.raises(ConfigError, match="transformers builds 9,000,000,000 parameters from this config and the "
                                          "reader 8,030,261,248"):
        model_source.load_model(f"hf:{model_dir}")


def test_a_hugging_face_module_traces_without_the_user_turning_its_cache_off():
    # was: "torch.export could not trace the model: ... DynamicCache ... not a known type"
    import sys
    from pathlib import Path

    from planner.model_source import load_model

    sys.path.insert(0, str(Path(__file__).parent))
    import user_model

    spec, graph = load_model("py:user_model:hf_llama")
    with torch.device("meta"):
        real = sum(p.numel() for p in user_model.hf_llama()[0].parameters())
    assert spec.num_params == real
    assert (spec.norm, spec.position, spec.activation, spec.kv_heads) == ("rmsnorm", "rope", "swiglu", 2)
    params = {d["param"] for _, d in graph.graph.nodes(data=True) if d["kind"] == "param"}
    assert "model.layers.0.self_attn.q_proj.weight" in params  # the module's own names, traced


@pytest.mark.parametrize("name", sorted(MODEL_CARD))
def test_head_dim_and_gated_gelu_models_match_their_model_cards(name):
    spec = spec_from_hf_config(CONFIGS[name], name=name)
    assert spec.num_params == pytest.approx(MODEL_CARD[name], rel=0.005)
    assert spec.q_dim == CONFIGS[name]["num_attention_heads"] * CONFIGS[name]["head_dim"] != spec.hidden
    assert spec.activation.value == ("geglu" if "gemma" in name else "swiglu")


def test_a_gemma2_config_is_planned_and_checked(tmp_path):
    """Gemma-2-9B from its config.json: its module built (eager attention: transformers has no SDPA
    path for its soft-capped logits) and priced two blocks deep, one of them windowed (was: the
    two-block probe kept all 21 windowed layers and was refused, "windowed_layers (21) exceeds
    layers (2)"); the plan written passes check."""
    import json

    from tests_helpers import paraplan

    folder = tmp_path / "gemma-2-9b"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(CONFIGS["google/gemma-2-9b"]))
    out = paraplan("plan", "--model", f"hf:{folder}", "--cluster", "h100-sxm:64", "--global-batch", "256",
                   "-o", str(tmp_path / "p.yaml"))
    assert out.returncode == 0, out.stderr
    assert "note:" not in out.stderr  # the Hugging Face module itself, not paraplan's rebuild
    assert "a sliding window of 4096 tokens in 21 of 42 layers" in out.stdout
    check = paraplan("check", str(tmp_path / "p.yaml"))
    assert check.returncode == 0 and "OK" in check.stdout, check.stderr


def test_gemma3s_windows_are_five_of_every_six_layers():
    """Gemma-3's text config: a 512-token window in five of every six layers (layer_types as
    transformers builds them from sliding_window_pattern), global attention in the sixth."""
    data = CONFIGS["google/gemma-3-1b-it"]
    spec = spec_from_hf_config(data)
    types = transformers.AutoConfig.for_model(**data).layer_types
    assert (spec.attention_window, spec.windowed_layers) == (512, types.count("sliding_attention")) == (512, 22)
