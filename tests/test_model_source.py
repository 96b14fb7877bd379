"""--model: zoo names, spec files, Hugging Face config.json files and py: callables."""

import json
import re
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from costmodel.errors import ConfigError
from costmodel.spec import ModelSpec
from planner.model_source import load_model_spec, spec_from_hf_config
from planner.zoo import ZOO

DATA = Path(__file__).parent / "data"


def test_zoo_name():
    assert load_model_spec("llama3-70b") is ZOO["llama3-70b"]


def test_hf_llama_config_equals_the_zoo_entry():
    spec = load_model_spec(str(DATA / "llama3_8b_config.json"))
    zoo = ZOO["llama3-8b"]
    assert {k: v for k, v in spec.to_dict().items() if k != "name"} == {
        k: v for k, v in zoo.to_dict().items() if k != "name"
    }
    assert spec.num_params == zoo.num_params


def test_hf_gpt2_config_is_gpt2_small():
    spec = load_model_spec(str(DATA / "gpt2_config.json"))
    # GPT-2 small: 124,439,808 parameters (tied head, learned positions, biases)
    assert spec.num_params == 124_439_808


def test_spec_yaml_and_json(tmp_path):
    fields = {"layers": 2, "hidden": 128, "heads": 4, "vocab": 512, "seq_len": 64, "activation": "swiglu", "kv_heads": 2}
    (tmp_path / "m.json").write_text(json.dumps(fields))
    (tmp_path / "m.yaml").write_text("\n".join(f"{k}: {v}" for k, v in fields.items()))
    a, b = load_model_spec(str(tmp_path / "m.json")), load_model_spec(str(tmp_path / "m.yaml"))
    assert a == b and a.ffn_hidden == 512 and a.kv_heads == 2


def test_py_callable():
    sys.path.insert(0, str(Path(__file__).parent))
    spec = load_model_spec("py:user_model:build")
    assert spec.name == "user-gpt" and spec.layers == 6


@pytest.mark.parametrize(
    "text, needle",
    [
        ("py:user_model:not_a_transformer", "no repeated blocks"),
        ("py:no_such_module_xyz:build", "cannot import"),
        ("py:user_model", "py:MODULE:CALLABLE"),
        ("missing.yaml", "does not exist"),
        ("llama9", "unknown model"),
    ],
)
def test_bad_models(text, needle):
    sys.path.insert(0, str(Path(__file__).parent))
    with pytest.raises(ConfigError, match=needle):
        load_model_spec(text)


def test_unknown_spec_field_is_named(tmp_path):
    p = tmp_path / "m.yaml"
    p.write_text("layers: 2\nhidden: 64\nheads: 4\nvocab: 10\nseq_len: 8\nhiden: 3\n")
    with pytest.raises(ConfigError, match="unknown model field.*hiden"):
        load_model_spec(str(p))


def test_hf_config_with_wrong_types():
    with pytest.raises(ConfigError, match="num_hidden_layers"):
        spec_from_hf_config({"model_type": "llama", "num_hidden_layers": "32", "hidden_size": 4096,
                             "num_attention_heads": 32, "vocab_size": 10})
    assert isinstance(spec_from_hf_config({"model_type": "mistral", "num_hidden_layers": 2, "hidden_size": 64,
                                           "num_attention_heads": 4, "vocab_size": 10}), ModelSpec)


def test_any_module_is_traced_and_read():
    sys.path.insert(0, str(Path(__file__).parent))
    spec = load_model_spec("py:user_model:user_lm")
    assert (spec.layers, spec.hidden, spec.heads, spec.kv_heads, spec.ffn_hidden, spec.vocab, spec.seq_len) == (
        3, 128, 8, 2, 352, 1000, 64)
    assert spec.activation == "swiglu" and spec.norm == "rmsnorm" and not spec.tied_embeddings and not spec.bias
    import user_model

    assert spec.num_params == sum(p.numel() for p in user_model.UserLM().parameters())


def test_plan_of_a_user_module_names_the_parameters_of_what_runs(tmp_path):
    # `paraplan run` trains the module itself (runtime.module), so a tensor-parallel plan names
    # the module's own parameters, read off its module map (earlier: paraplan's rebuild's)
    from tests_helpers import paraplan

    target = tmp_path / "user.yaml"
    out = paraplan("plan", "--model", "py:user_model:user_lm", "--cluster", "cpu:4", "--global-batch", "8",
                   "--tp", "2", "--json", "-o", str(target))
    assert out.returncode == 0, out.stderr
    placements = json.loads(out.stdout)["plan"]["placements"]
    assert placements["blocks.*.up.weight"] == {"tp": "Shard(0)"}
    assert placements["blocks.*.down.weight"] == {"tp": "Shard(1)"}
    assert placements["embed.weight"] == {"tp": "Shard(0)"}
    plan = json.loads(out.stdout)["plan"]
    assert plan["source"]["kind"] == "py" and plan["source"]["target"] == "user_model:user_lm"
    assert plan["sequence_parallel"] is False  # not run on py: modules (they may size from their input)
    check = paraplan("check", str(target))
    assert check.returncode == 0, check.stderr


def test_a_language_model_without_example_inputs_gets_token_ids():
    sys.path.insert(0, str(Path(__file__).parent))
    spec = load_model_spec("py:user_model:user_lm_without_inputs")
    assert spec.seq_len == 2048 and spec == replace(load_model_spec("py:user_model:user_lm"), seq_len=2048,
                                                    name=spec.name)


def test_a_module_without_embedding_needs_example_inputs():
    sys.path.insert(0, str(Path(__file__).parent))
    with pytest.raises(ConfigError, match="example_inputs"):
        load_model_spec("py:user_model:mlp_stack_without_inputs")


def test_a_module_without_attention_is_planned_from_its_graph(tmp_path):
    """A stack of Linear-GELU-Linear blocks (was: refused, "a layer must run
    scaled_dot_product_attention once"): planned on its graph; under tensor parallelism each
    block is column-then-row with one all-reduce forward."""
    import torch

    from costmodel import load_cluster
    from planner.graph_plan import plan_graph
    from tests_helpers import paraplan
    from user_model import mlp_stack

    with torch.device("meta"):
        module, inputs = mlp_stack()
    plans = plan_graph(module, inputs, load_cluster("a100-80g:16"), 64, fixed={"tp": 8})
    best = plans[0]
    assert best.fits and best.tp == 8 and best.dp == 2
    assert best.placements["blocks.*.fc1.weight"]["tp"] == "Shard(0)"
    assert best.placements["blocks.*.fc2.weight"]["tp"] == "Shard(1)"
    assert [k for k, *_ in best.solution.forward_collectives()] == ["all_reduce"]  # one per block
    free = plan_graph(module, inputs, load_cluster("a100-80g:16"), 64)
    assert free[0].step_time_s <= best.step_time_s and free[0].fits
    sys.path.insert(0, str(Path(__file__).parent))
    out = paraplan("plan", "--model", "py:user_model:mlp_stack", "--cluster", "a100-80g:16", "--global-batch", "64",
                   "--json")
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["best"]["step_time_s"] == pytest.approx(free[0].step_time_s, rel=1e-6)
    refused = paraplan("plan", "--model", "py:user_model:mlp_stack", "--cluster", "a100-80g:16", "--global-batch",
                       "64", "-o", str(tmp_path / "p.yaml"))
    assert refused.returncode == 2 and len(refused.stderr.strip().splitlines()) == 1
    assert "drop -o" in refused.stderr and not (tmp_path / "p.yaml").exists()


@pytest.mark.parametrize("config,needle", [
    # MiniMax-Text-01's config.json (lightning attention beside softmax attention, experts): experts of a kind
    # the reader does not size (Mixtral's, OLMoE's and PhiMoE's, read since, were once planned as dense:
    # Mixtral as a 7.24B Mistral instead of 46.7B)
    ({"model_type": "minimax", "num_hidden_layers": 80, "hidden_size": 6144, "num_attention_heads": 64,
      "num_key_value_heads": 8, "intermediate_size": 9216, "vocab_size": 200064, "num_local_experts": 32,
      "num_experts_per_tok": 2, "rope_theta": 1e7, "rms_norm_eps": 1e-5, "hidden_act": "silu"},
     "mixture-of-experts model (num_local_experts = 32, model_type minimax)"),
    # Gemma (1): an architecture the reader does not size is refused by its model_type
    ({"model_type": "gemma", "num_hidden_layers": 28, "hidden_size": 3072, "num_attention_heads": 16,
      "num_key_value_heads": 16, "head_dim": 256, "intermediate_size": 24576, "vocab_size": 256000},
     "model_type 'gemma' is not one this reader sizes"),
    # an MLP activation it does not price
    ({"model_type": "llama", "num_hidden_layers": 2, "hidden_size": 64, "num_attention_heads": 4,
      "intermediate_size": 128, "vocab_size": 256, "hidden_act": "relu2"},
     "hidden_act 'relu2' is not a gated activation paraplan prices"),
])
def test_configs_it_would_misread_are_refused_by_name(config, needle):
    with pytest.raises(ConfigError, match=re.escape(needle)):
        spec_from_hf_config(config)


def test_written_out_rmsnorm_and_no_positions_are_read_as_such():
    # was: LlamaRMSNorm written out (pow, mean, rsqrt) read as layernorm, and a model without
    # positions read as RoPE
    import torch

    from planner.zoo.model import build_model

    sys.path.insert(0, str(Path(__file__).parent))
    for callable_name in ("user_lm", "user_lm_hand_norm"):
        spec = load_model_spec(f"py:user_model:{callable_name}")
        assert spec.norm == "rmsnorm" and spec.position == "none", callable_name
    model = build_model(spec, device="cpu")  # the rebuild `paraplan run` trains: no position table, no rotation
    model.init_weights(0)
    assert model.pos_embeddings is None and model.rope_cos is None
    assert model(torch.zeros(2, 16, dtype=torch.long)).shape == (2, 16, spec.vocab)
