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
}
# Qwen2's q, k and v carry biases that the spec (one `bias` flag for every linear) leaves out
TOLERANCE = {name: 0.0 for name in CONFIGS} | {"Qwen/Qwen2.5-7B": 1e-4}


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_spec_counts_the_parameters_of_the_real_class(name):
    data = CONFIGS[name]
    config = transformers.AutoConfig.for_model(**data)
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(config)
    real = sum(p.numel() for p in model.parameters())  # tied weights counted once
    spec = spec_from_hf_config(data, name=name)
    assert abs(spec.num_params - real) <= TOLERANCE[name] * real, (spec.num_params, real)


def test_mixtral_is_refused_because_a_dense_reading_would_miss_seven_experts_in_eight():
    from costmodel.errors import ConfigError

    data = {"model_type": "mixtral", "num_hidden_layers": 32, "hidden_size": 4096, "num_attention_heads": 32,
            "num_key_value_heads": 8, "intermediate_size": 14336, "vocab_size": 32000, "num_local_experts": 8,
            "num_experts_per_tok": 2, "rope_theta": 1e6, "rms_norm_eps": 1e-5, "hidden_act": "silu",
            "max_position_embeddings": 32768, "tie_word_embeddings": False}
    config = transformers.AutoConfig.for_model(**data)
    with torch.device("meta"):
        real = sum(p.numel() for p in transformers.AutoModelForCausalLM.from_config(config).parameters())
    assert abs(real - 46.70e9) / 46.70e9 < 0.005  # the model card's 46.7B
    dense = spec_from_hf_config({**data, "model_type": "mistral", "num_local_experts": 1}).num_params
    assert abs(dense - 7.24e9) / 7.24e9 < 0.005  # what the old reader planned
    with pytest.raises(ConfigError, match="num_local_experts = 8"):
        spec_from_hf_config(data)


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
