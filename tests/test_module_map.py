"""The module map: where a module keeps its blocks, embedding and head, and which of its block
linears tensor parallelism splits column- and row-wise, read off one meta-device pass; plans
of a user's module name its own parameters, and what the runtime cannot run on it is refused."""

import json

import pytest

from planner.model_source import load_model, module_map_of, source_of
from planner.module_map import ColumnGroup, zoo_map
from planner.zoo import ZOO
from tests_helpers import paraplan

transformers = pytest.importorskip("transformers")


def _llama_dir(tmp_path, **extra):
    config = transformers.LlamaConfig(num_hidden_layers=2, hidden_size=64, num_attention_heads=4,
                                      num_key_value_heads=2, intermediate_size=128, vocab_size=256,
                                      max_position_embeddings=64, **extra)
    config.save_pretrained(tmp_path / "llama")
    return f"hf:{tmp_path / 'llama'}"


def test_a_hugging_face_llama_is_read_in_its_own_names(tmp_path):
    model = _llama_dir(tmp_path, tie_word_embeddings=True)
    spec, _ = load_model(model)
    mmap = module_map_of(source_of(model), spec)
    assert (mmap.blocks, mmap.layers, mmap.embedding, mmap.head, mmap.final_norm) == (
        "model.layers", 2, "model.embed_tokens", "lm_head", "model.norm")
    assert mmap.tied and mmap.head_weight == "model.embed_tokens.weight"
    assert mmap.groups == (
        ColumnGroup(source="input_layernorm", column=("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
                    row="self_attn.o_proj"),
        ColumnGroup(source="post_attention_layernorm", column=("mlp.gate_proj", "mlp.up_proj"), row="mlp.down_proj"))
    assert mmap.unsplittable == ()


def test_a_users_module_with_its_own_naming(tmp_path):
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parent))
    spec, _ = load_model("py:user_model:user_lm")
    mmap = module_map_of(source_of("py:user_model:user_lm"), spec)
    assert (mmap.blocks, mmap.embedding, mmap.head, mmap.final_norm, mmap.tied) == ("blocks", "embed", "head", "norm",
                                                                                   False)
    assert [(g.source, g.column, g.row) for g in mmap.groups] == [("norm1", ("q", "k", "v"), "o"),
                                                                   ("norm2", ("gate", "up"), "down")]
    assert mmap.head_attributes == {"": "nh,nkv"}  # the block sizes its heads from these: divided by tp


def test_the_zoos_map_gives_megatrons_layout_in_the_zoos_names():
    spec = ZOO["tiny-gpt"]
    assert zoo_map(spec).megatron() == {
        "tok_embeddings.weight": "Shard(0)", "output.weight": "Shard(0)",
        **{f"layers.*.attention.{p}.{leaf}": "Shard(0)" for p in ("wq", "wk", "wv") for leaf in ("weight", "bias")},
        "layers.*.attention.wo.weight": "Shard(1)",
        "layers.*.feed_forward.w1.weight": "Shard(0)", "layers.*.feed_forward.w1.bias": "Shard(0)",
        "layers.*.feed_forward.w2.weight": "Shard(1)"}


def test_gpt2s_conv1d_blocks_plan_without_tensor_parallelism(tmp_path):
    config = transformers.GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=256, n_positions=64)
    config.save_pretrained(tmp_path / "gpt2")
    out = paraplan("plan", "--model", f"hf:{tmp_path / 'gpt2'}", "--cluster", "cpu:4", "--global-batch", "8", "--json")
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["plan"]["mesh"]["tp"] == 1
    forced = paraplan("plan", "--model", f"hf:{tmp_path / 'gpt2'}", "--cluster", "cpu:4", "--global-batch", "8",
                      "--tp", "2")
    assert forced.returncode == 2 and len(forced.stderr.strip().splitlines()) == 1
    assert "splits nn.Linear projections" in forced.stderr


def test_what_the_runtime_does_not_run_on_a_users_module_is_refused_in_one_line(tmp_path):
    model = _llama_dir(tmp_path)
    target = tmp_path / "pp.yaml"
    out = paraplan("simulate", "--model", model, "--cluster", "cpu:4", "--pp", "2", "--dp", "2",
                   "--microbatch-size", "2", "--global-batch", "8", "--seq-len", "32", "-o", str(target))
    assert out.returncode == 0, out.stderr
    assert paraplan("check", str(target)).returncode == 0  # a Llama decoder pipelines
    import yaml

    data = yaml.safe_load(target.read_text())
    assert data["source"]["kind"] == "hf" and data["source"]["map"]["blocks"] == "model.layers"
    data["source"]["kind"] = "onnx"
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(data))
    refused = paraplan("check", str(bad))
    assert refused.returncode == 2 and "source kind 'onnx' is unknown" in refused.stderr
    # LoRA on the module's own linears (was refused: built-in models only); a target it lacks is one line
    lora = paraplan("plan", "--model", model, "--cluster", "cpu:4", "--global-batch", "8", "--seq-len", "32",
                    "--mode", "lora", "-o", str(tmp_path / "lora.yaml"))
    assert lora.returncode == 0, lora.stderr
    assert paraplan("check", str(tmp_path / "lora.yaml")).returncode == 0


def test_a_malformed_source_is_one_line():
    from costmodel import ConfigError, Strategy, load_cluster, predict
    from planner.plan import Plan, plan_from_strategy

    spec = ZOO["tiny-llama"]
    s = Strategy(precision="fp32", global_batch=8, microbatch_size=8)
    good = plan_from_strategy(spec, s, "cpu:1", predict(spec, s, load_cluster("cpu:1")).predicted()).to_dict()
    for source, words in (({"kind": "onnx"}, "kind 'onnx' is unknown"), ({"kind": "hf"}, "lacks path"),
                          ({"kind": "py", "target": "m:f"}, "lacks path"),
                          ({"kind": "hf", "path": "/x", "map": 3}, "map must be a mapping")):
        with pytest.raises(ConfigError, match=words):
            Plan.from_dict({**good, "source": source})
    from planner.model_source import module_map_of

    with pytest.raises(ConfigError, match="module map is malformed"):
        module_map_of({"kind": "hf", "path": "/x", "map": {"blocks": "model.layers"}}, spec)


@pytest.mark.parametrize("config_class", ["LlamaConfig", "MistralConfig", "Qwen2Config", "Qwen3Config"])
def test_the_map_rediscovers_transformers_own_tensor_parallel_plan(tmp_path, config_class):
    """The column/row split read off the module equals the `base_model_tp_plan` transformers ships
    for the model (colwise -> Shard(0), rowwise -> Shard(1)); what that plan keeps replicated with
    an all-reduce of its gradients (Qwen3's q_norm, k_norm) the map finds too (runtime.module runs
    them as LocalShard; tests/test_runtime_comm.py checks their gradients agree over tp)."""
    cls = getattr(transformers, config_class)
    config = cls(num_hidden_layers=2, hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                 intermediate_size=128, vocab_size=256, max_position_embeddings=64, head_dim=16)
    config.save_pretrained(tmp_path / "m")
    model = f"hf:{tmp_path / 'm'}"
    spec, _ = load_model(model)
    mmap = module_map_of(source_of(model), spec)
    ours = {k.removeprefix("model.").rpartition(".")[0]: v for k, v in mmap.megatron().items()
            if k.startswith(f"{mmap.blocks}.")}  # by module (weight and bias alike, as transformers' plan names them)
    words = {"colwise": "Shard(0)", "rowwise": "Shard(1)"}
    theirs = {k: words[v] for k, v in cls.base_model_tp_plan.items() if v in words}
    assert ours == theirs
    others = {k.removeprefix("layers.*.") for k, v in cls.base_model_tp_plan.items() if v not in words}
    assert set(mmap.others) == others


def test_fused_projections_are_left_whole(tmp_path):
    """Phi-3 computes q, k and v in one qkv_proj and gate and up in one gate_up_proj: split by
    contiguous rows over tp, a rank would hold all of q and none of v (transformers' own plan
    gathers their outputs: colwise_gather_output). The map leaves them whole, the planner plans
    without tp, a forced --tp is one line; pipelining runs (tests/test_runtime_hf.py)."""
    config = transformers.Phi3Config(num_hidden_layers=2, hidden_size=64, num_attention_heads=4,
                                     num_key_value_heads=2, intermediate_size=128, vocab_size=256,
                                     max_position_embeddings=64, pad_token_id=0, eos_token_id=1, bos_token_id=1)
    config.save_pretrained(tmp_path / "phi3")
    model = f"hf:{tmp_path / 'phi3'}"
    spec, _ = load_model(model)
    mmap = module_map_of(source_of(model), spec)
    assert mmap.groups == ()
    assert mmap.unsplittable == ("self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj")
    out = paraplan("plan", "--model", model, "--cluster", "cpu:4", "--global-batch", "8", "--seq-len", "32", "--json")
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["plan"]["mesh"]["tp"] == 1
    forced = paraplan("plan", "--model", model, "--cluster", "cpu:4", "--global-batch", "8", "--seq-len", "32",
                      "--tp", "2")
    assert forced.returncode == 2 and len(forced.stderr.strip().splitlines()) == 1
    assert "self_attn.qkv_proj" in forced.stderr and "use --tp 1" in forced.stderr
    # a Llama's separate q, k, v and gate, up (the same widths) stay split
    llama = _llama_dir(tmp_path)
    assert len(module_map_of(source_of(llama), load_model(llama)[0]).groups) == 2


def test_latent_attention_is_left_whole(tmp_path):
    """DeepSeek-V3's attention: q through a low-rank q_a_proj / q_b_proj, K and V through one latent
    (kv_a_proj_with_mqa, kv_lora_rank + rope dims, shared by every head) that kv_b_proj expands; o_proj
    reads heads x v_head_dim. The map grouped kv_a_proj_with_mqa (it reads the block's norm) with o_proj
    as column and row, a split that would hand each rank a slice of the shared latent. The attention's
    linears stay whole, the MLP is split; LoRA's o and the latent projections find their linears (o took
    the group's "down" before)."""
    from test_moe import TINY_HF_MOE

    (tmp_path / "v3").mkdir()
    (tmp_path / "v3" / "config.json").write_text(json.dumps(TINY_HF_MOE["deepseek_v3"]))
    model = f"hf:{tmp_path / 'v3'}"
    spec, _ = load_model(model)
    mmap = module_map_of(source_of(model), spec)
    assert mmap.groups == (ColumnGroup(source="post_attention_layernorm", column=("mlp.gate_proj", "mlp.up_proj"),
                                       row="mlp.down_proj"),)
    assert set(mmap.unsplittable) == {f"self_attn.{p}" for p in ("q_a_proj", "q_b_proj", "kv_a_proj_with_mqa",
                                                                  "kv_b_proj", "o_proj")}
    assert mmap.lora_paths() == {"gate": "mlp.gate_proj", "up": "mlp.up_proj", "down": "mlp.down_proj",
                                 "o": "self_attn.o_proj", "q_a": "self_attn.q_a_proj", "q_b": "self_attn.q_b_proj",
                                 "kv_a": "self_attn.kv_a_proj_with_mqa", "kv_b": "self_attn.kv_b_proj"}


@pytest.mark.parametrize("name", ["mixtral-8x7b", "deepseek-v3"])
def test_the_zoos_map_of_a_mixture_of_experts_names_only_parameters_it_has(name):
    """Mixtral's every layer holds experts (no feed_forward.w1): a plan that placed the dense MLP's
    linears on it was refused by `check` ("matches no parameter"), so `plan` wrote nothing at tp > 1;
    DeepSeek-V3's first three layers are dense MLPs and keep their Megatron placements."""
    import dataclasses
    import fnmatch

    import torch

    from planner.zoo.model import Transformer

    spec = dataclasses.replace(ZOO[name], layers=4)
    with torch.device("meta"):
        names = [n for n, _ in Transformer(spec).named_parameters()]
    patterns = zoo_map(spec).megatron()
    assert all(any(fnmatch.fnmatchcase(n, p) for n in names) for p in patterns)
    assert ("layers.*.feed_forward.w1.weight" in patterns) == (spec.dense_layers > 0)


def test_a_mixture_of_experts_plans_with_tensor_parallelism(tmp_path):
    target = tmp_path / "mixtral.yaml"
    out = paraplan("plan", "--model", "mixtral-8x7b", "--cluster", "h100-sxm:16", "--global-batch", "512",
                   "-o", str(target))
    assert out.returncode == 0, out.stderr
    checked = paraplan("check", str(target), "--cluster", "h100-sxm:16")
    assert checked.returncode == 0 and "OK" in checked.stdout, checked.stdout + checked.stderr
