"""Hugging Face configs of model types the config reader does not size (OLMo-2, Granite, Gemma,
Phi-2, Falcon, ...) are read off transformers' own class, traced on the meta device; a model
directory is taken as it is given (`--model DIR`, as `vllm serve DIR` takes it); and the
module map leaves whole what tensor parallelism cannot split in such a class (OLMo-2's q/k
norms over all heads), so what `plan` writes, `check` accepts and `run` trains."""

import math
import sys
from pathlib import Path

import pytest
import yaml

from costmodel.errors import ConfigError
from planner.model_source import load_model, load_model_spec, module_map_of, source_of
from planner.module_map import ColumnGroup
from tests_helpers import paraplan

transformers = pytest.importorskip("transformers")
torch = pytest.importorskip("torch")

# the published models' config.json fields (sizes only); their published parameter counts (B) as the
# model cards give them, to two decimals
REAL = {
    # allenai/OLMo-2-0425-1B: post-norms only, q_norm / k_norm over all heads, tied? no
    "olmo2-1b": ("olmo2", dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=16,
                               num_key_value_heads=16, vocab_size=100352, max_position_embeddings=4096,
                               rope_theta=500000, tie_word_embeddings=False), 1.48),
    # ibm-granite/granite-3.0-2b-base: GQA, tied head, scaled residuals and logits (no weights of their own)
    "granite-3-2b": ("granite", dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=40,
                                     num_attention_heads=32, num_key_value_heads=8, vocab_size=49155,
                                     max_position_embeddings=4096, tie_word_embeddings=True,
                                     embedding_multiplier=12.0, logits_scaling=8.0, residual_multiplier=0.22,
                                     attention_multiplier=0.015625), 2.53),
    # google/gemma-2b: multi-query attention, 256-wide heads, GeGLU, tied head
    "gemma-2b": ("gemma", dict(hidden_size=2048, intermediate_size=16384, num_hidden_layers=18, num_attention_heads=8,
                               num_key_value_heads=1, head_dim=256, vocab_size=256000, max_position_embeddings=8192),
                 2.51),
    # microsoft/phi-2: parallel attention and MLP from one LayerNorm, GELU, biases, partial RoPE
    "phi-2": ("phi", dict(hidden_size=2560, intermediate_size=10240, num_hidden_layers=32, num_attention_heads=32,
                          vocab_size=51200, max_position_embeddings=2048, partial_rotary_factor=0.4), 2.78),
    # THUDM/GLM-4-9B-0414: gate and up in one projection (gate_up_proj), sandwich norms, half the head rotated;
    # its gate_up_proj was read as an ungated 27,392-wide MLP and the config refused (1.76B against 1.65B probed)
    "glm-4-9b": ("glm4", dict(hidden_size=4096, intermediate_size=13696, num_hidden_layers=40, num_attention_heads=32,
                              num_key_value_heads=2, head_dim=128, vocab_size=151552, max_position_embeddings=32768,
                              attention_bias=True, partial_rotary_factor=0.5, tie_word_embeddings=False,
                              pad_token_id=151329), 9.40),
}


def _save(root: Path, name: str, model_type: str, fields: dict) -> Path:
    transformers.AutoConfig.for_model(model_type, **fields).save_pretrained(root / name)
    return root / name


def _transformers_count(folder: Path) -> int:
    config = transformers.AutoConfig.from_pretrained(folder)
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(config)
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("name", sorted(REAL))
def test_other_model_types_are_read_off_transformers_class(tmp_path, name):
    model_type, fields, published_b = REAL[name]
    folder = _save(tmp_path, name, model_type, fields)
    spec = load_model_spec(f"hf:{folder}")
    real = _transformers_count(folder)
    assert abs(spec.num_params - real) <= 0.005 * real
    assert round(spec.num_params / 1e9, 2) == published_b
    assert (spec.layers, spec.hidden, spec.vocab) == (fields["num_hidden_layers"], fields["hidden_size"],
                                                      fields["vocab_size"])
    assert spec.heads == fields["num_attention_heads"]
    assert spec.kv_heads == fields.get("num_key_value_heads", fields["num_attention_heads"])
    assert spec.position == "rope" and spec.max_positions in (0, fields["max_position_embeddings"])
    if name == "gemma-2b":
        assert spec.head_dim == 256 and spec.activation == "geglu" and spec.tied_embeddings
    if name == "phi-2":
        assert spec.activation == "gelu" and spec.norm == "layernorm" and spec.bias and not spec.tied_embeddings
    if name == "granite-3-2b":
        assert spec.tied_embeddings and spec.activation == "swiglu"
    if name == "olmo2-1b":
        assert spec.rope_theta == 500000 and spec.norm == "rmsnorm"
    if name == "glm-4-9b":
        assert spec.activation == "swiglu" and spec.ffn_hidden == 13696


def test_a_model_directory_is_taken_as_given(tmp_path):
    """`--model ./Llama-3.2-1B` (no hf:): was "unknown model"."""
    folder = _save(tmp_path, "olmo", "olmo2", dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                                   num_attention_heads=4, num_key_value_heads=2, vocab_size=256,
                                                   max_position_embeddings=128))
    assert source_of(str(folder)) == {"kind": "hf", "path": str(folder.resolve())}
    assert load_model_spec(str(folder)) == load_model_spec(f"hf:{folder}")
    out = paraplan("plan", "--model", str(folder), "--cluster", "cpu:2", "--global-batch", "4", "--seq-len", "32",
                   "-o", str(tmp_path / "p.yaml"))
    assert out.returncode == 0, out.stderr
    plan = yaml.safe_load((tmp_path / "p.yaml").read_text())
    assert plan["source"]["kind"] == "hf" and plan["source"]["path"] == str(folder.resolve())
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ConfigError, match="a folder without a config.json"):
        load_model(str(empty))
    # a name no file system takes (too long for a path): "unknown model", not the OSError of looking for a folder
    long = paraplan("plan", "--model", "x" * 5000, "--cluster", "cpu:2", "--global-batch", "4")
    assert long.returncode == 2 and "unknown model" in long.stderr and "Traceback" not in long.stderr


@pytest.mark.parametrize("model_type,fields,needle", [
    # Falcon's FalconLinear multiplies by its weight (no aten.linear): was a ValueError traceback
    ("falcon", dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, vocab_size=256, multi_query=True),
     "no linear op"),
    # Bloom's ALiBi attention is written out (baddbmm, softmax): was "it is planned from its graph alone", then exit 2
    ("bloom", dict(hidden_size=64, n_layer=2, n_head=4, vocab_size=256), "no scaled_dot_product_attention"),
    # sizes that do not fit together (o_proj reads hidden_size, q_proj writes heads x head_dim): the forward fails
    # on meta tensors, and torch's fake-tensor logger printed the whole traceback above the one line
    ("helium", dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=32,
                    intermediate_size=128, vocab_size=256), "torch.export could not trace the model"),
])
def test_a_class_the_graph_reader_cannot_read_is_refused_in_one_line(tmp_path, model_type, fields, needle):
    folder = _save(tmp_path, model_type, model_type, fields)
    out = paraplan("plan", "--model", str(folder), "--cluster", "cpu:2", "--global-batch", "4", "--seq-len", "32",
                   "-o", str(tmp_path / "p.yaml"))
    assert out.returncode == 2 and len(out.stderr.strip().splitlines()) == 1 and "Traceback" not in out.stderr
    assert f"model_type '{model_type}'" in out.stderr and needle in out.stderr and "spec YAML" in out.stderr
    assert not (tmp_path / "p.yaml").exists()


def test_starcoder_read_off_its_class_with_fused_multi_query_attention(tmp_path):
    """bigcode/starcoder (gpt_bigcode: q, k and v in one c_attn projection, one K/V head, 8,192 learned
    positions): its c_attn was not read as q plus one K/V head, and the position table was sized by the
    probe's 64 tokens; refused as 'would have ... parameters'. 15.5B as its card says, one K/V head (so
    tensor parallelism is refused, not run on a copy)."""
    folder = _save(tmp_path, "starcoder", "gpt_bigcode", dict(n_embd=6144, n_head=48, n_inner=24576, n_layer=40,
                                                             n_positions=8192, vocab_size=49152, multi_query=True))
    spec = load_model_spec(str(folder))
    assert (spec.layers, spec.hidden, spec.heads, spec.kv_heads, spec.seq_len) == (40, 6144, 48, 1, 8192)
    assert spec.position == "learned" and round(spec.num_params / 1e9, 1) == 15.5
    assert abs(spec.num_params - _transformers_count(folder)) < 0.005 * spec.num_params


def test_gpt_j_read_off_its_class_in_its_own_field_names(tmp_path):
    """EleutherAI/gpt-j-6b's config (n_layer, n_embd; parallel attention and MLP, partial RoPE,
    biased MLP and head): was "config lacks 'num_hidden_layers'". 6.05B, as its card says."""
    folder = _save(tmp_path, "gpt-j-6b", "gptj", dict(n_embd=4096, n_layer=28, n_head=16, rotary_dim=64,
                                                      vocab_size=50400, n_positions=2048))
    spec = load_model_spec(str(folder))
    assert (spec.layers, spec.hidden, spec.heads, spec.seq_len) == (28, 4096, 16, 2048)
    assert round(spec.num_params / 1e9, 2) == 6.05 and abs(spec.num_params - _transformers_count(folder)) < 0.005 * 6.05e9


def test_olmo2s_attention_stays_whole_and_its_mlp_is_split(tmp_path):
    """OLMo-2 normalizes q and k over all heads (a weight as wide as q_proj's output): a column
    split would hand each rank half of q with the whole norm weight (the run crashed where `check`
    approved). Its MLP reads the residual stream made mid-block by an add: split like any block
    input. A search over tp 2 then plans without sequence parallelism, which needs every linear
    split, and `check` accepts what it writes."""
    folder = _save(tmp_path, "olmo", "olmo2", dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                                   num_attention_heads=4, num_key_value_heads=2, vocab_size=256,
                                                   max_position_embeddings=128))
    spec, _ = load_model(str(folder))
    mmap = module_map_of(source_of(str(folder)), spec)
    assert mmap.groups == (ColumnGroup(source="", column=("mlp.gate_proj", "mlp.up_proj"), row="mlp.down_proj"),)
    assert set(mmap.unsplittable) == {"self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj"}
    target = tmp_path / "tp.yaml"
    out = paraplan("plan", "--model", str(folder), "--cluster", "cpu:2", "--global-batch", "4", "--seq-len", "32",
                   "--tp", "2", "-o", str(target))
    assert out.returncode == 0, out.stderr
    plan = yaml.safe_load(target.read_text())
    assert plan["mesh"]["tp"] == 2 and plan["sequence_parallel"] is False
    assert not any("self_attn" in name for name in plan["placements"])
    check = paraplan("check", str(target), "--cluster", "cpu:2")
    assert check.returncode == 0, check.stdout + check.stderr
    forced = paraplan("plan", "--model", str(folder), "--cluster", "cpu:2", "--global-batch", "4", "--seq-len", "32",
                      "--tp", "2", "--sequence-parallel", "-o", str(tmp_path / "sp.yaml"))
    assert forced.returncode == 2 and "--no-sequence-parallel" in forced.stderr
    assert len(forced.stderr.strip().splitlines()) == 1 and not (tmp_path / "sp.yaml").exists()


def test_a_tied_head_traced_by_export_is_counted_once(tmp_path):
    """torch.export lifts a tied weight under both names and reads one: a py: module with a tied
    head (transformers' Llama, tie_word_embeddings) was refused as 1.5 times its size."""
    module = tmp_path / "tied_lm.py"
    module.write_text(
        "import transformers\n\n\n"
        "def build():\n"
        "    config = transformers.LlamaConfig(num_hidden_layers=2, hidden_size=64, num_attention_heads=4,\n"
        "                                      num_key_value_heads=2, intermediate_size=128, vocab_size=512,\n"
        "                                      max_position_embeddings=64, tie_word_embeddings=True)\n"
        "    return transformers.AutoModelForCausalLM.from_config(config)\n")
    sys.path.insert(0, str(tmp_path))
    try:
        spec, graph = load_model("py:tied_lm:build")
    finally:
        sys.path.remove(str(tmp_path))
    assert spec.tied_embeddings and spec.vocab == 512
    params = [d for _, d in graph.graph.nodes(data=True) if d["kind"] == "param"]
    assert sum(math.prod(d["shape"]) for d in params) == spec.num_params
    assert sum(d["shape"] == (512, 64) for d in params) == 1


def _tiny_mistral3(root: Path, weights: bool) -> Path:
    text = dict(model_type="mistral", hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, head_dim=16, vocab_size=256, max_position_embeddings=64, sliding_window=None,
                tie_word_embeddings=False)
    vision = dict(model_type="pixtral", hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                  image_size=28, patch_size=14)
    # (Mistral Small 3.1's head is its own: the wrapper's tie_word_embeddings, which transformers 5 follows,
    # defaults to True, so it is said here)
    config = transformers.AutoConfig.for_model("mistral3", text_config=text, vision_config=vision, image_token_index=5,
                                               tie_word_embeddings=False)
    folder = root / "mistral3"
    if weights:
        torch.manual_seed(2)
        transformers.Mistral3ForConditionalGeneration(config).save_pretrained(folder)
    else:
        config.save_pretrained(folder)
    return folder


def test_a_multimodal_models_language_model_is_planned_and_run(tmp_path):
    """Mistral Small 3.1 and Gemma 3 ship as multimodal models (text_config and vision_config; no
    num_hidden_layers of their own): was "config lacks 'num_hidden_layers'". Their language model
    is planned, priced and trained from the checkpoint's own tensors (transformers 5 names them
    model.language_model.*); the vision tower is said to be left out. The first step's loss is
    the multimodal model's own on the same text batch."""
    from runtime.data import TokenSource
    from runtime_helpers import launch, read_results, write_source_plan
    from costmodel import Strategy

    folder = _tiny_mistral3(tmp_path, weights=True)
    spec = load_model_spec(str(folder))
    assert (spec.layers, spec.hidden, spec.kv_heads, spec.vocab, spec.tied_embeddings) == (2, 64, 2, 256, False)
    planned = paraplan("plan", "--model", str(folder), "--cluster", "cpu:2", "--global-batch", "4", "--seq-len", "32",
                       "-o", str(tmp_path / "p.yaml"))
    assert planned.returncode == 0, planned.stderr
    assert "multimodal model (mistral3)" in planned.stderr and "vision tower" in planned.stderr
    assert paraplan("check", str(tmp_path / "p.yaml")).returncode == 0
    data = tmp_path / "data.txt"
    data.write_text("the quick brown fox jumps over the lazy dog " * 40)
    plan = write_source_plan(tmp_path, str(folder), Strategy(precision="fp32", global_batch=4, seq_len=32,
                                                             microbatch_size=4), "one")
    proc = launch(1, [plan], tmp_path / "out.jsonl", "--steps", "1", "--data", str(data))
    assert proc.returncode == 0, proc.stderr[-3000:]
    first = read_results(tmp_path / "out.jsonl")["one"]["losses"][0]
    # its language model (a Mistral) is pipelined as a Mistral is: the contract read the wrapper's model_type
    # (mistral3) and refused --pp
    piped = paraplan("plan", "--model", str(folder), "--cluster", "cpu:2", "--global-batch", "4", "--seq-len", "32",
                     "--pp", "2", "--precision", "fp32", "-o", str(tmp_path / "pp.yaml"))
    assert piped.returncode == 0, piped.stderr
    proc = launch(2, [tmp_path / "pp.yaml"], tmp_path / "pp.jsonl", "--steps", "1", "--data", str(data))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert abs(next(iter(read_results(tmp_path / "pp.jsonl").values()))["losses"][0] - first) <= 1e-5 * first
    whole = transformers.AutoModelForImageTextToText.from_pretrained(str(folder)).eval()
    x, y = TokenSource(256, 32, str(data), 0).batch(0, 4)
    with torch.no_grad():
        plain = float(torch.nn.functional.cross_entropy(whole(input_ids=x).logits.flatten(0, 1), y.flatten()))
    assert abs(first - plain) <= 1e-5 * plain


def test_qwen_vl_configs_are_read_as_their_qwen_language_model(tmp_path):
    """Qwen2.5-VL's config, as transformers 4 wrote it (the text fields at the top beside
    vision_config, model_type qwen2_5_vl) and as transformers 5 does (text_config, model_type
    qwen2_5_vl_text): its language model is a Qwen2 (multimodal RoPE rotates the same dimensions).
    The 4.x form raised an AttributeError traceback building the module map; transformers has no
    causal-LM class of it, so `run` trains paraplan's rebuild, as the note says."""
    text = dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                num_key_value_heads=4, vocab_size=152064, max_position_embeddings=128000, rope_theta=1e6,
                rms_norm_eps=1e-6, hidden_act="silu", tie_word_embeddings=False)
    vision = dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, out_hidden_size=3584)
    qwen2 = load_model_spec(str(_write(tmp_path / "qwen2.json", {**text, "model_type": "qwen2"})))
    flat = _write(tmp_path / "vl4" / "config.json", {**text, "model_type": "qwen2_5_vl", "vision_config": vision})
    nested = _write(tmp_path / "vl5" / "config.json", {"model_type": "qwen2_5_vl", "vision_config": vision,
                                                       "text_config": {**text, "model_type": "qwen2_5_vl_text"}})
    for config in (flat, nested):
        spec = load_model_spec(str(config.parent))
        # Qwen2.5-7B's card: 7.61B; the VL model's 8.29B adds its 0.67B vision tower
        assert spec.num_params == qwen2.num_params and abs(spec.num_params / 1e9 - 7.61) < 0.01
        assert spec.rope_theta == 1e6 and spec.kv_heads == 4
    small = {**text, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
             "num_key_value_heads": 2, "vocab_size": 256}
    tiny = _write(tmp_path / "tiny" / "config.json", {**small, "model_type": "qwen2_5_vl", "vision_config": vision})
    out = paraplan("plan", "--model", str(tiny.parent), "--cluster", "cpu:2", "--global-batch", "4", "--seq-len", "32",
                   "-o", str(tmp_path / "p.yaml"))
    assert out.returncode == 0 and "Traceback" not in out.stderr, out.stderr
    assert "paraplan's own rebuild" in out.stderr
    assert paraplan("check", str(tmp_path / "p.yaml")).returncode == 0


def _write(path: Path, data: dict) -> Path:
    import json

    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))
    return path


def test_an_export_of_a_model_read_off_its_class_says_what_it_leaves_out(tmp_path):
    """OLMo-2's post-norms and all-head q/k norms are not in the spec, so a Megatron-LM export of it
    describes a pre-norm Llama of its sizes: said in a note; a Llama's export has none."""
    olmo = _save(tmp_path, "olmo", "olmo2", dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                                 num_attention_heads=4, num_key_value_heads=2, vocab_size=256,
                                                 max_position_embeddings=128))
    llama = _save(tmp_path, "llama", "llama", dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                                   num_attention_heads=4, num_key_value_heads=2, vocab_size=256,
                                                   max_position_embeddings=128))
    for folder, noted in ((olmo, True), (llama, False)):
        plan = tmp_path / f"{folder.name}.yaml"
        assert paraplan("plan", "--model", str(folder), "--cluster", "cpu:2", "--global-batch", "4", "--seq-len",
                        "32", "-o", str(plan)).returncode == 0
        out = paraplan("export", str(plan), "--to", "megatron")
        assert out.returncode == 0 and "--num-layers 2" in out.stdout
        assert ("read off transformers' class" in out.stderr and "post-norms" in out.stderr) == noted, out.stderr


def test_olmoe_is_read_with_its_experts(tmp_path):
    """allenai/OLMoE-1B-7B's config (64 experts, 8 a token, num_experts as Qwen2-MoE names it):
    was refused as a mixture of experts of a kind the reader does not size. 6.9B parameters, 1.3B
    active, as its card says; transformers' count within 0.5% (its all-head q/k norms uncounted)."""
    spec = load_model_spec(str(_write(tmp_path / "olmoe" / "config.json", {
        "model_type": "olmoe", "hidden_size": 2048, "intermediate_size": 1024, "num_hidden_layers": 16,
        "num_attention_heads": 16, "num_key_value_heads": 16, "vocab_size": 50304, "max_position_embeddings": 4096,
        "num_experts": 64, "num_experts_per_tok": 8, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
        "tie_word_embeddings": False, "hidden_act": "silu"}).parent))
    assert (spec.experts, spec.experts_per_token, spec.expert_ffn_hidden) == (64, 8, 1024)
    assert round(spec.num_params / 1e9, 1) == 6.9 and round(spec.active_params() / 1e9, 1) == 1.3


# the published configs' fields (sizes only), from the checkpoints' config.json
PHI35_MOE = {"model_type": "phimoe", "hidden_size": 4096, "intermediate_size": 6400, "num_hidden_layers": 32,
             "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 32064, "max_position_embeddings": 131072,
             "num_local_experts": 16, "num_experts_per_tok": 2, "attention_bias": True, "lm_head_bias": True,
             "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "sliding_window": 131072, "tie_word_embeddings": False,
             "hidden_act": "silu", "rope_scaling": {"type": "longrope", "short_factor": [1.0] * 64,
                                                    "long_factor": [1.0] * 64, "short_mscale": 1.243,
                                                    "long_mscale": 1.243, "original_max_position_embeddings": 4096}}
GRANITE_MOE = {"model_type": "granitemoe", "hidden_size": 1536, "intermediate_size": 512, "num_hidden_layers": 32,
               "num_attention_heads": 24, "num_key_value_heads": 8, "vocab_size": 49155, "max_position_embeddings": 131072,
               "num_local_experts": 40, "num_experts_per_tok": 8, "rms_norm_eps": 1e-6, "rope_theta": 10000000.0,
               "tie_word_embeddings": True, "hidden_act": "silu", "embedding_multiplier": 12.0, "logits_scaling": 6.0,
               "residual_multiplier": 0.22, "attention_multiplier": 0.015625}
LLAMA4_SCOUT_TEXT = {"model_type": "llama4_text", "hidden_size": 5120, "intermediate_size": 8192,
                     "intermediate_size_mlp": 16384, "num_hidden_layers": 48, "num_attention_heads": 40,
                     "num_key_value_heads": 8, "head_dim": 128, "vocab_size": 202048,
                     "max_position_embeddings": 10485760, "num_local_experts": 16, "num_experts_per_tok": 1,
                     "interleave_moe_layer_step": 1, "use_qk_norm": True, "attention_chunk_size": 8192,
                     "rope_theta": 500000.0, "rms_norm_eps": 1e-5, "hidden_act": "silu",
                     "rope_scaling": {"factor": 16.0, "high_freq_factor": 1.0, "low_freq_factor": 1.0,
                                      "original_max_position_embeddings": 8192, "rope_type": "llama3"}}


def _multimodal(text: dict) -> dict:
    return {"model_type": "llama4", "text_config": text, "tie_word_embeddings": False,
            "vision_config": {"model_type": "llama4_vision_model", "hidden_size": 1408, "num_hidden_layers": 34}}


@pytest.mark.parametrize("name, config, total_b, active_b", [
    # microsoft/Phi-3.5-MoE-instruct: "16x3.8B parameters with 6.6B active", 41.9B in all
    ("Phi-3.5-MoE-instruct", PHI35_MOE, 41.87, 6.64),
    # ibm-granite/granite-3.1-3b-a800m-instruct: 3.3B, 800M active (beside its tied 75M embedding)
    ("granite-3.1-3b-a800m", GRANITE_MOE, 3.30, 0.88),
    # meta-llama/Llama-4-Scout-17B-16E-Instruct (its language model): 17B active of 109B with the vision tower
    ("Llama-4-Scout-17B-16E", _multimodal(LLAMA4_SCOUT_TEXT), 107.77, 17.17),
    # MiniMaxAI/MiniMax-M2: 256 experts, 8 a token, sigmoid router with a balancing bias; "230B total, 10B
    # active" on its card (beside its 1.2B of embedding and head)
    ("MiniMax-M2", {"model_type": "minimax_m2", "hidden_size": 3072, "intermediate_size": 1536,
                    "num_hidden_layers": 62, "num_attention_heads": 48, "num_key_value_heads": 8, "head_dim": 128,
                    "rotary_dim": 64, "vocab_size": 200064, "max_position_embeddings": 196608,
                    "num_local_experts": 256, "num_experts_per_tok": 8, "rope_theta": 5000000.0,
                    "rms_norm_eps": 1e-6, "tie_word_embeddings": False, "hidden_act": "silu",
                    "scoring_func": "sigmoid", "use_routing_bias": True, "use_qk_norm": True}, 228.69, 11.03),
    # meta-llama/Llama-4-Maverick-17B-128E-Instruct: experts every other layer, 17B active of 400B
    ("Llama-4-Maverick-17B-128E", _multimodal({**LLAMA4_SCOUT_TEXT, "num_local_experts": 128,
                                               "interleave_moe_layer_step": 2}), 400.71, 17.18),
])
def test_phi_granite_and_llama4_experts_are_read(tmp_path, name, config, total_b, active_b):
    """Phi-3.5-MoE, Granite 3 MoE, MiniMax-M2 and Llama 4 were refused as experts of a kind the reader does not
    size. Read now: their totals and active counts as the cards give them, equal to transformers' own
    class within the reader's tolerance (hf: checks it; Maverick's dense layers between the sparse
    ones counted by its interleave step); Llama 4's dense layers' MLP is intermediate_size_mlp, a
    shared expert beside the routed one, and three layers in four attend within 8,192-token chunks."""
    spec = load_model_spec(f"hf:{_write(tmp_path / name / 'config.json', config).parent}")
    assert (round(spec.num_params / 1e9, 2), round(spec.active_params() / 1e9, 2)) == (total_b, active_b)
    if config.get("model_type") == "llama4":
        assert (spec.ffn_hidden, spec.expert_ffn_hidden, spec.shared_expert_ffn_hidden) == (16384, 8192, 8192)
        assert (spec.attention_window, spec.windowed_layers, spec.attention_chunked) == (8192, 36, True)
        assert (spec.router_score, spec.router_renormalize, spec.qk_norm) == ("sigmoid", False, False)
    if config.get("model_type") == "phimoe":
        assert (spec.norm, spec.router_score) == ("layernorm", "sparsemixer")
    if config.get("model_type") == "minimax_m2":
        assert (spec.router_score, spec.router_renormalize, spec.router_expert_bias) == ("sigmoid", True, True)


def test_a_position_dependent_rope_is_read_and_planned_quietly(tmp_path):
    """Phi-3.5-MoE's longrope picks its factors by the largest position, which a meta-device pass
    cannot decide: the plan printed torch's partial graph and a multi-line guard error, and fell
    back to paraplan's rebuild (which `run` then refused). Its layout is read with the plain
    rotation (same ops and sizes): the plan records the Hugging Face module and prints no graph."""
    small = {**PHI35_MOE, "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2, "num_attention_heads": 4,
             "num_key_value_heads": 2, "vocab_size": 256, "num_local_experts": 4}
    small["rope_scaling"] = {**PHI35_MOE["rope_scaling"], "short_factor": [1.0] * 8, "long_factor": [1.0] * 8}
    folder = _write(tmp_path / "phi" / "config.json", small).parent
    out = paraplan("plan", "--model", str(folder), "--cluster", "cpu:2", "--global-batch", "4", "--seq-len", "32",
                   "-o", str(tmp_path / "plan.yaml"))
    assert out.returncode == 0, out.stderr
    assert "def forward" not in out.stdout + out.stderr and "rebuild" not in out.stderr, out.stderr[:2000]
    assert yaml.safe_load((tmp_path / "plan.yaml").read_text())["source"]["kind"] == "hf"
    # the probe's rotation only: the module a run trains keeps its longrope
    from planner.model_source import build_source_module

    spec = load_model_spec(str(folder))
    trained, _ = build_source_module(source_of(str(folder)), spec)
    probe, _ = build_source_module(source_of(str(folder)), spec, probe_layers=1)
    assert trained.config.rope_parameters["rope_type"] == "longrope"
    assert probe.config.rope_parameters["rope_type"] == "default"


def test_llama4_says_its_experts_run_densely(tmp_path):
    """transformers' Llama 4 runs every token through every expert: the plan says what `run` of it costs."""
    small = {**LLAMA4_SCOUT_TEXT, "hidden_size": 64, "intermediate_size": 96, "intermediate_size_mlp": 128,
             "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16,
             "vocab_size": 256, "num_local_experts": 4, "attention_chunk_size": 16, "max_position_embeddings": 64}
    folder = _write(tmp_path / "l4" / "config.json", small).parent
    out = paraplan("plan", "--model", str(folder), "--cluster", "cpu:2", "--global-batch", "4", "--seq-len", "32",
                   "-o", str(tmp_path / "plan.yaml"))
    assert out.returncode == 0 and "through all 4 experts" in out.stderr and "4/1 times" in out.stderr, out.stderr


@pytest.mark.parametrize("config, kinds", [
    # Qwen3-Next (Gated DeltaNet beside attention, experts) and MiniMax-Text-01 (lightning attention): refused
    # as "experts of a kind the reader does not size: write a spec YAML with experts ...", which would not price them
    ({"model_type": "qwen3_next", "num_hidden_layers": 4, "num_experts": 512,
      "layer_types": ["linear_attention", "linear_attention", "linear_attention", "full_attention"]}, "linear_attention"),
    # Jamba (Mamba layers, experts); Mamba itself was "attention written out as matmuls, as Bloom's ALiBi is"
    ({"model_type": "jamba", "num_hidden_layers": 4, "num_experts": 16, "mamba_d_state": 16}, "state-space (Mamba)"),
    ({"model_type": "mamba", "num_hidden_layers": 4, "state_size": 16}, "state-space (Mamba)"),
])
def test_layers_other_than_attention_are_refused_as_such(tmp_path, config, kinds):
    folder = _write(tmp_path / "m" / "config.json", config).parent
    out = paraplan("plan", "--model", str(folder), "--cluster", "cpu:2", "--global-batch", "4")
    assert out.returncode == 2 and len(out.stderr.strip().splitlines()) == 1, out.stderr
    assert f"its layers include {kinds}" in out.stderr and "spec YAML" in out.stderr


def test_an_export_says_what_of_a_read_config_it_leaves_out(tmp_path):
    """Granite 3 MoE's multipliers and Phi-3.5-MoE's SparseMixer router are in transformers' classes, not in
    the spec nor in Megatron-LM's arguments: the export says so beside them (it wrote them silently)."""
    from test_moe import TINY_HF_MOE

    for name, needle in (("granitemoe", "logit multipliers"), ("phimoe", "SparseMixer")):
        folder = _write(tmp_path / name / "config.json", TINY_HF_MOE[name]).parent
        plan = tmp_path / f"{name}.yaml"
        assert paraplan("plan", "--model", str(folder), "--cluster", "cpu:2", "--global-batch", "4", "--seq-len", "32",
                        "-o", str(plan)).returncode == 0
        out = paraplan("export", str(plan), "--to", "megatron")
        assert out.returncode == 0 and "--num-experts 4" in out.stdout and needle in out.stderr, out.stderr


def test_the_refusal_named_is_the_one_every_candidate_meets(tmp_path):
    """Llama 4 with --pp 2 was refused for context parallelism the user never asked for ("re-plan with
    --cp 1"), with --tp 2 for "--expert-tp 1 with tp(2) and cp(2) ... use --expert-tp {tp}" (a literal
    {tp}); Phi-3.5-MoE with --tp 2 for "give --sequence-parallel", which is refused next. The reason
    given is the one every candidate meets: what the user's module cannot run under the flag given."""
    small = {**LLAMA4_SCOUT_TEXT, "hidden_size": 64, "intermediate_size": 96, "intermediate_size_mlp": 128,
             "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16,
             "vocab_size": 256, "num_local_experts": 4, "attention_chunk_size": 16, "max_position_embeddings": 64}
    llama4 = _write(tmp_path / "l4" / "config.json", _multimodal(small)).parent
    from test_moe import TINY_HF_MOE

    phi = _write(tmp_path / "phi" / "config.json", TINY_HF_MOE["phimoe"]).parent
    for folder, flag, needle in ((llama4, "--pp", "pipelining a Hugging Face llama4_text is not run yet"),
                                 (llama4, "--tp", "tensor parallelism on a Hugging Face llama4_text is not run"),
                                 (phi, "--tp", "tensor parallelism on a Hugging Face phimoe is not run")):
        out = paraplan("plan", "--model", str(folder), "--cluster", "cpu:8", "--global-batch", "8", "--seq-len", "32",
                       flag, "2")
        assert out.returncode == 2 and needle in out.stderr and f"re-plan with {flag} 1" in out.stderr, out.stderr
        assert len(out.stderr.strip().splitlines()) == 1  # (the note on Llama 4's dense experts comes with a plan)
    from costmodel import ModelSpec
    from costmodel.moe import expert_layout_problems

    spec = ModelSpec(layers=2, hidden=64, heads=4, vocab=256, seq_len=32, experts=4, experts_per_token=2)
    problems = expert_layout_problems(spec, ep=2, expert_tp=1, tp=2, dp=2, cp=2, sequence_parallel=True, shard=2)
    assert any("use --expert-tp 2" in p for p in problems), problems


def test_chunked_attention_is_priced_as_chunks():
    """Llama 4's chunked layers were priced as sliding windows of the chunk: a query sees its chunk from
    the chunk's start, about half a window's keys past the chunk's length, and the same before it."""
    from dataclasses import replace

    from costmodel import ModelSpec
    from costmodel.serving import window_prefill

    window = ModelSpec(layers=4, hidden=64, heads=4, vocab=256, seq_len=64, attention_window=16, windowed_layers=3)
    chunked = replace(window, attention_chunked=True)
    assert chunked.windowed_keys(16) == window.windowed_keys(16) == 8  # within one chunk: causal
    assert chunked.windowed_keys(64) == pytest.approx(8.5)  # each chunk's positions see 1..16 keys
    assert window.windowed_keys(64) == pytest.approx(16 - 16 * 16 / 128)
    # a prefill chunk of positions 33..40 (32 cached): keys 1..8 of the third attention chunk, which it reads
    assert window_prefill(chunked, 32, 8) == (36, 8)
    assert window_prefill(window, 32, 8) == (8 * 16, 16 + 8)
    assert window_prefill(chunked, 0, 16) == window_prefill(window, 0, 16) == (16 * 17 / 2, 16)
    with pytest.raises(ConfigError, match="attention_chunked need attention_window"):
        ModelSpec(layers=4, hidden=64, heads=4, vocab=256, seq_len=64, attention_chunked=True)


def test_a_folder_named_as_a_built_in_model_is_said_to_be_left_unread(tmp_path):
    """`--model gpt-oss-20b` in a folder holding a downloaded ./gpt-oss-20b plans the built-in model (the
    name wins, as before) and now says so, with the way to the folder; ./gpt-oss-20b reads the folder."""
    import os
    import subprocess

    from tests_helpers import ROOT

    folder = _write(tmp_path / "llama3-8b" / "config.json", GRANITE_MOE).parent

    def here(*args):  # the command line run in the folder holding the download
        env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / 'tests'}"}
        return subprocess.run([sys.executable, "-m", "cli", *args], capture_output=True, text=True, cwd=tmp_path,
                              env=env)

    out = here("plan", "--model", "llama3-8b", "--cluster", "h100-sxm:8", "--global-batch", "8", "-o", "p.yaml")
    assert out.returncode == 0 and "the folder llama3-8b here is not read: give hf:llama3-8b" in out.stderr
    assert "8.03B params" in out.stdout
    own = here("plan", "--model", f"./{folder.name}", "--cluster", "h100-sxm:8", "--global-batch", "8", "-o", "q.yaml")
    assert own.returncode == 0 and "3.30B params" in own.stdout and "not read" not in own.stderr


def test_lora_on_a_fused_attention_names_the_targets_the_module_has(tmp_path):
    """StarCoder's q, k and v are one c_attn: LoRA's default q, k, v, o was refused with "plan full
    fine-tuning" though its MLP's linears take adapters; the line names them as the way out."""
    folder = _save(tmp_path, "starcoder", "gpt_bigcode", dict(n_layer=2, n_embd=64, n_head=4, n_positions=64,
                                                             vocab_size=256, multi_query=True))
    out = paraplan("plan", "--model", str(folder), "--mode", "lora", "--cluster", "cpu:2", "--global-batch", "4",
                   "--seq-len", "32")
    assert out.returncode == 2 and "re-plan with --lora-targets up,down" in out.stderr, out.stderr
    ok = paraplan("plan", "--model", str(folder), "--mode", "lora", "--lora-targets", "up,down", "--cluster", "cpu:2",
                  "--global-batch", "4", "--seq-len", "32", "-o", str(tmp_path / "p.yaml"))
    assert ok.returncode == 0 and paraplan("check", str(tmp_path / "p.yaml")).returncode == 0


def test_ep_on_a_dense_hugging_face_model_says_it_has_no_experts(tmp_path):
    """--ep 2 on a dense Gemma-2 said expert parallelism on its experts was not run yet."""
    folder = _save(tmp_path, "gemma2", "gemma2", dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                                      num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                                      vocab_size=256, max_position_embeddings=64))
    out = paraplan("plan", "--model", str(folder), "--cluster", "cpu:4", "--global-batch", "8", "--seq-len", "32",
                   "--ep", "2")
    assert out.returncode == 2 and "has no experts to split; use --ep 1" in out.stderr, out.stderr
