"""`paraplan run` trains the user's own module: tiny Hugging Face LlamaForCausalLM and
Qwen2ForCausalLM (GQA; tied and untied, as the small Qwen2 models are tied; Qwen2's q/k/v
biases), Qwen3, Phi-3 (fused projections, pipelined), Gemma-2 (eager attention in a sliding
window) and Gemma-3 (local and global layers), OLMo-2 (a model_type read off transformers'
class) and a py: module of its own naming, under every kind of split, with the losses and
the gradient norms of the same module on one process.

Tolerance: 1e-5 relative, fp32, as tests/test_runtime_parity.py argues: the layouts only
reorder floating-point sums (split matmuls, reduced gradients, averaged microbatches), a few
ulps per op; a lost microbatch or a module that is not the user's moves the loss by more than
1e-3 within two steps. A gradient of the wrong scale on some parameters barely moves AdamW's
losses (its update divides the scale out): the gradient norms say it (Gemma-2's post-norms
summed over tp ranks that saw the same tokens: 2e-4 off, where the layouts agree to 2e-6).
"""

import json

import pytest
import torch
import torch.nn.functional as F

transformers = pytest.importorskip("transformers")

from costmodel import Strategy  # noqa: E402
from runtime.data import TokenSource  # noqa: E402
from runtime_helpers import (BATCH, ROOT, assert_same_gradients, launch, launch_by_world, worker_env,  # noqa: E402
                             write_source_plan)

TOLERANCE = 1e-5
HF_MODULES = ("transformers.models.llama.modeling_llama", "transformers.models.qwen2.modeling_qwen2",
              "transformers.models.qwen3.modeling_qwen3", "transformers.models.phi3.modeling_phi3",
              "transformers.models.gemma2.modeling_gemma2", "transformers.models.gemma3.modeling_gemma3",
              "transformers.models.olmo2.modeling_olmo2")
STEPS = 4
SEQ = 32
SIZES = dict(num_hidden_layers=4, hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
             intermediate_size=128, vocab_size=256, max_position_embeddings=64)

TEXT = "the quick brown fox jumps over the lazy dog while the cat sleeps " * 40
LAYOUTS = {  # name -> strategy flags (world size 4, or 8 for 3d)
    "dp": dict(dp=4, microbatch_size=2),
    "fsdp": dict(dp=4, zero=3, microbatch_size=2),
    "hsdp": dict(dp=4, zero=3, shard_group=2, microbatch_size=2),
    "tp": dict(tp=2, dp=2, microbatch_size=4),
    "tp_sp": dict(tp=2, dp=2, sequence_parallel=True, microbatch_size=4, recompute="selective"),
    "pp_1f1b": dict(pp=2, dp=2, microbatch_size=2, schedule="1f1b", recompute="full"),
    "pp_interleaved": dict(pp=2, dp=2, microbatch_size=2, schedule="interleaved", virtual_stages=2),
    "3d": dict(pp=2, dp=2, tp=2, zero=3, sequence_parallel=True, microbatch_size=2, schedule="1f1b"),
    "pp_zero_bubble": dict(pp=2, dp=2, zero=1, microbatch_size=2, schedule="zero-bubble", virtual_stages=2),
}
MODELS = {  # name -> (config class, extra fields, with pretrained weights, layouts run)
    # every layout once on a Llama (tied or not); ties under each kind of split; Qwen2's q/k/v biases
    "llama": ("LlamaConfig", dict(tie_word_embeddings=False), False, ("dp", "hsdp", "tp", "pp_interleaved", "3d")),
    "llama_tied": ("LlamaConfig", dict(tie_word_embeddings=True), True, ("fsdp", "tp_sp", "pp_1f1b", "3d")),
    "qwen2_tied": ("Qwen2Config", dict(tie_word_embeddings=True), False, ("tp_sp", "pp_interleaved", "pp_zero_bubble")),
    # q_norm / k_norm on each rank's local heads (runtime.tensor_parallel.LocalShard)
    "qwen3": ("Qwen3Config", dict(tie_word_embeddings=False, head_dim=16), False, ("tp", "tp_sp")),
    # a model_type the config reader does not size (read off transformers' class): q_norm / k_norm over
    # all heads (attention left whole under tp), post-norms only, its MLP reading the residual stream
    # mid-block (split over tp): tensor parallel without sequence parallelism
    "olmo2": ("Olmo2Config", dict(tie_word_embeddings=False, pad_token_id=0, eos_token_id=1, bos_token_id=1), False,
              ("tp",)),
    # read off transformers' class: GLM-4's gate and up in one projection (the MLP left whole under tp, its
    # attention split), sandwich norms, half-rotated heads; StarCoder's q, k and v in one c_attn, one K/V
    # head, learned positions (both refused by the graph reader before), the positions added by its first stage
    "glm4": ("Glm4Config", dict(head_dim=16, attention_bias=False, tie_word_embeddings=False, pad_token_id=0,
                                eos_token_id=1, bos_token_id=1), False, ("tp",)),
    "starcoder": ("GPTBigCodeConfig", dict(n_layer=4, n_embd=64, n_head=4, n_positions=64, multi_query=True,
                                           attn_pdrop=0.0, resid_pdrop=0.0, embd_pdrop=0.0), False,
                  ("fsdp", "pp_1f1b")),
    # fused qkv_proj / gate_up_proj: pipelined (never split over tp: tests/test_module_map.py)
    "phi3": ("Phi3Config", dict(tie_word_embeddings=False, pad_token_id=0, eos_token_id=1, bos_token_id=1), False,
             ("pp_1f1b",)),
    # no SDPA path in transformers (soft-capped logits): eager attention, a 16-token window on every other
    # layer, four norms a layer (sequence parallel), and its embedding scale a buffer the weights do not carry
    "gemma2": ("Gemma2Config", dict(head_dim=16, sliding_window=16, pad_token_id=0, eos_token_id=1, bos_token_id=1),
               True, ("tp", "tp_sp")),
    # pipelined (were refused): Gemma-2's eager attention given the causal mask it gets from its model's forward
    # (its blocks attended to every token under --pp, masked by nothing), Granite's multipliers and logit
    # scaling, GPT-NeoX's own names (embed_in, final_layer_norm, embed_out) and embedding dropout
    # (its 16-token window on every other layer, shorter than the sequence: refused under --pp before the
    # stages built each layer kind's mask)
    "gemma2_pp": ("Gemma2Config", dict(head_dim=16, sliding_window=16, pad_token_id=0, eos_token_id=1, bos_token_id=1),
                  False, ("pp_1f1b",)),
    "granite": ("GraniteConfig", dict(embedding_multiplier=12.0, logits_scaling=6.0, residual_multiplier=0.22,
                                      attention_multiplier=0.0625, pad_token_id=0, eos_token_id=1, bos_token_id=1),
                False, ("pp_interleaved",)),
    "gpt_neox": ("GPTNeoXConfig", dict(tie_word_embeddings=False, pad_token_id=0, eos_token_id=1, bos_token_id=1),
                 False, ("pp_1f1b",)),
    # one global layer to every local one here (sliding_window_pattern 2), q_norm / k_norm on the local heads;
    # pipelined (was refused): a rotation per layer kind (local and global theta) and the window's mask
    "gemma3": ("Gemma3TextConfig", dict(head_dim=16, sliding_window=16, sliding_window_pattern=2, pad_token_id=0,
                                        eos_token_id=1, bos_token_id=1), False, ("tp_sp", "pp_1f1b")),
}


def _model_dir(root, name):
    cls, extra, weights, _ = MODELS[name]
    sizes = SIZES if "n_layer" not in extra else dict(vocab_size=SIZES["vocab_size"])  # (GPT-2's own field names)
    config = getattr(transformers, cls)(**sizes, **extra)
    folder = root / name
    if weights:
        torch.manual_seed(1)
        transformers.AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    else:
        config.save_pretrained(folder)
    return folder


def strategy(**flags):
    return Strategy(precision="fp32", global_batch=BATCH, seq_len=SEQ, **flags)


@pytest.fixture(scope="module")
def hf_runs(tmp_path_factory):
    d = tmp_path_factory.mktemp("hf")
    by_world: dict[int, list] = {1: []}
    dirs = {}
    for name, (_, _, _, layouts) in MODELS.items():
        dirs[name] = _model_dir(d, name)
        by_world[1].append(write_source_plan(d, f"hf:{dirs[name]}", strategy(microbatch_size=BATCH), f"{name}__reference"))
        for layout in layouts:
            s = strategy(**LAYOUTS[layout])
            by_world.setdefault(s.world_size, []).append(write_source_plan(d, f"hf:{dirs[name]}", s, f"{name}__{layout}"))
    user = "py:user_model:user_lm_tp"
    by_world[1].append(write_source_plan(d, user, strategy(microbatch_size=BATCH), "user__reference"))
    by_world[4].append(write_source_plan(d, user, strategy(tp=2, dp=2, zero=3, microbatch_size=4), "user__tp_fsdp"))
    by_world[4].append(write_source_plan(d, user, strategy(**LAYOUTS["pp_1f1b"]), "user__pp_1f1b"))
    data = d / "data.txt"  # text (bytes as tokens) that a model can learn, unlike uniform random tokens
    data.write_text(TEXT)
    return launch_by_world(by_world, d, "--steps", str(STEPS), "--data", str(data), preload=HF_MODULES), dirs, data


CASES = [(m, layout) for m, (_, _, _, layouts) in MODELS.items() for layout in layouts] + [
    ("user", "tp_fsdp"), ("user", "pp_1f1b")]


@pytest.mark.parametrize(("model", "layout"), CASES)
def test_user_module_matches_one_process(hf_runs, model, layout):
    results, _, _ = hf_runs
    ours, ref = results[f"{model}__{layout}"]["losses"], results[f"{model}__reference"]["losses"]
    assert len(ours) == len(ref) == STEPS
    for step, (a, b) in enumerate(zip(ours, ref), 1):
        assert abs(a - b) <= TOLERANCE * abs(b), f"step {step}: {a} vs {b}"
    assert ours[-1] < ours[0]  # it trains
    assert_same_gradients(results[f"{model}__{layout}"], results[f"{model}__reference"])


def test_step_one_is_the_transformers_modules_loss(hf_runs):
    """The loss of the first step, distributed (tp2 x dp2, SP, and 3D on 8 processes), equals
    what the plain transformers module computes from the same pretrained weights on the same
    batch: the module trained is the user's, with the user's weights."""
    results, dirs, data = hf_runs
    model = transformers.AutoModelForCausalLM.from_pretrained(str(dirs["llama_tied"])).eval()
    x, y = TokenSource(SIZES["vocab_size"], SEQ, str(data), 0).batch(0, BATCH)
    with torch.no_grad():
        plain = float(F.cross_entropy(model(x).logits.flatten(0, 1), y.flatten()))
    for layout in ("tp_sp", "3d", "pp_1f1b"):
        assert abs(results[f"llama_tied__{layout}"]["losses"][0] - plain) <= TOLERANCE * plain
    gemma = transformers.AutoModelForCausalLM.from_pretrained(str(dirs["gemma2"])).eval()
    with torch.no_grad():
        plain_gemma = float(F.cross_entropy(gemma(x).logits.flatten(0, 1), y.flatten()))
    for name in ("gemma2__reference", "gemma2__tp_sp"):  # was: no SDPA, so paraplan's rebuild, which has no window
        assert abs(results[name]["losses"][0] - plain_gemma) <= TOLERANCE * plain_gemma
    # and a module initialised by paraplan is another model: the losses differ from step 1
    assert abs(results["llama__reference"]["losses"][0] - plain) > 1e-3


def _save_tokenizer(folder) -> object:
    """A word-level tokenizer (the tokenizers library) saved as a model directory's tokenizer."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator([TEXT], trainers.WordLevelTrainer(vocab_size=64, special_tokens=["[UNK]"]))
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]")
    fast.save_pretrained(folder)
    return fast


def test_text_is_tokenized_by_the_models_tokenizer(tmp_path):
    from runtime.data import tokenizer_dir

    fast = _save_tokenizer(tmp_path)
    (tmp_path / "data.txt").write_text(TEXT)
    source = TokenSource(256, 8, str(tmp_path / "data.txt"), 0, tokenizer=tokenizer_dir(tmp_path))
    assert source.tokens[:9].tolist() == fast("the quick brown fox jumps over the lazy dog")["input_ids"]
    assert int(source.tokens.max()) < 64  # word ids, not bytes (the bytes of "t" alone are 116)
    (tmp_path / "bare").mkdir()
    assert tokenizer_dir(tmp_path / "bare") is None


def test_pretrained_round_trip(tmp_path):
    """save_pretrained -> 3 steps under tp2 x dp2 on text tokenized by the model's tokenizer ->
    export-weights -> from_pretrained: the reloaded model's logits equal the distributed
    model's (1e-5), and the tokenizer travels with the export."""
    from cli.main import main

    folder = _model_dir(tmp_path, "llama_tied")
    _save_tokenizer(folder)
    (tmp_path / "data.txt").write_text(TEXT)
    plan = write_source_plan(tmp_path, f"hf:{folder}", strategy(tp=2, dp=2, microbatch_size=4), "rt")
    ckpt, out = tmp_path / "ckpt", tmp_path / "exported"
    proc = launch(4, [plan], tmp_path / "rt.jsonl", "--steps", "3", "--checkpoint-dir", str(ckpt),
                    "--checkpoint-every", "3", "--data", str(tmp_path / "data.txt"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    tokens = tmp_path / "x.pt"
    x, _ = TokenSource(SIZES["vocab_size"], SEQ, None, 7).batch(0, 4)
    torch.save(x, tokens)
    assert main(["export-weights", str(ckpt), "-o", str(out)]) == 0
    import subprocess
    import sys

    env = worker_env()
    got = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=4",
                          str(ROOT / "tests" / "logits_worker.py"), str(plan), str(ckpt / "step_3"), str(tokens),
                          str(tmp_path / "logits.pt")], capture_output=True, text=True, cwd=ROOT, env=env, timeout=600)
    assert got.returncode == 0, got.stderr[-3000:]
    distributed = torch.load(tmp_path / "logits.pt")
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(str(out)).eval()
    with torch.no_grad():
        logits = reloaded(x).logits
    assert torch.allclose(logits, distributed, rtol=1e-5, atol=1e-5 * float(logits.abs().max()))
    start = transformers.AutoModelForCausalLM.from_pretrained(str(folder)).eval()
    with torch.no_grad():
        assert not torch.allclose(start(x).logits, logits, atol=1e-4)  # the export holds the trained weights
    assert (out / "tokenizer.json").is_file()
    assert main(["export-weights", str(ckpt), "-o", str(out)]) == 2  # never over a folder with files in it
    losses = json.loads((tmp_path / "rt.jsonl").read_text().splitlines()[-1])["losses"]
    assert len(losses) == 3


def test_generate_on_a_hugging_face_model(tmp_path, capsys):
    """`paraplan generate --model hf:DIR --greedy` gives the tokens transformers' own greedy
    generate() gives, through the model's KV cache."""
    from cli.main import main

    folder = _model_dir(tmp_path, "llama_tied")
    assert main(["generate", "--model", f"hf:{folder}", "--prompt-tokens", "5,17,99", "--max-new-tokens", "6",
                 "--greedy", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    ours = out["tokens"][0]
    # the cache holds the prompt and the tokens fed back (not the last one sampled): 8 tokens (was predicted as 9)
    assert out["kv_cache_bytes"] == out["predicted_kv_cache_bytes"] > 0
    model = transformers.AutoModelForCausalLM.from_pretrained(str(folder)).eval()
    theirs = model.generate(torch.tensor([[5, 17, 99]]), max_new_tokens=6, do_sample=False)[0].tolist()
    assert ours == theirs


def test_a_py_module_whose_forward_is_not_the_chain_is_not_pipelined(tmp_path):
    """Pipeline stages of a py: module are driven as embedding -> blocks -> norm -> head; a module
    whose forward does more (here: scales its embedding) is refused in one line before training."""
    plan = write_source_plan(tmp_path, "py:user_model:user_lm_scaled", strategy(**LAYOUTS["pp_1f1b"]), "scaled")
    proc = launch(4, [plan], tmp_path / "scaled.jsonl", "--steps", "1")
    assert proc.returncode != 0
    line = next(l for l in proc.stderr.splitlines() if l.startswith("paraplan: error:"))
    assert "its pipeline stages cannot be cut; re-plan with --pp 1" in line


# the sizes some types need beside SIZES: Gemma's 256-wide heads by default, GLM-4's q/k/v biases and
# OLMo's weightless norms (past the reader's 0.5% count tolerance at this size)
STAGE_SIZES = {"gemma": dict(head_dim=16), "gemma2": dict(head_dim=16), "glm4": dict(head_dim=16, attention_bias=False),
               "gemma3_text": dict(head_dim=16, sliding_window_pattern=2),
               "olmo": dict(hidden_size=256, num_attention_heads=8, num_key_value_heads=8, intermediate_size=512),
               "gpt_bigcode": dict(n_layer=4, n_embd=64, n_head=4, n_positions=64, multi_query=True)}


def test_pipeline_stages_are_driven_as_each_models_own_forward(tmp_path):
    """`paraplan run` drives a Hugging Face model's pipeline stages itself (runtime.module.cut_stage:
    embed_tokens -> layers with rotary_emb's tables and the causal mask -> norm -> lm_head), for the
    types planner.contract.PIPELINED_HF_TYPES names. The whole model cut as one stage gives the
    logits of the model's own forward, for every type on that list (a type whose forward does more,
    as Gemma's embedding scale or Cohere's logit scale, would differ by far more than 1e-6). Where the
    config keeps a sliding window, it is 8 tokens of the 16 (Qwen's on layers 2-3, Gemma-2's and
    Gemma 3's every other layer, with Gemma 3's local rotation): the stages were refused under a
    window shorter than the sequence, then build each layer kind's mask as the model's forward does."""
    from planner.contract import PIPELINED_HF_TYPES
    from planner.model_source import build_source_module, load_model, module_map_of, source_of
    from runtime.module import cut_stage, logits_of
    from test_moe import TINY_HF_MOE

    checked, windowed = [], []
    for model_type in PIPELINED_HF_TYPES:
        config = TINY_HF_MOE.get(model_type) or transformers.AutoConfig.for_model(
            model_type, **{**SIZES, **STAGE_SIZES.get(model_type, {})}, pad_token_id=0, eos_token_id=1,
            bos_token_id=1).to_dict()
        if "sliding_window" in transformers.AutoConfig.for_model(model_type).to_dict():
            config = {**config, "sliding_window": 8, "use_sliding_window": True, "max_window_layers": 2}
            config.pop("layer_types", None)  # (made again from the window's fields)
            windowed.append(model_type)
        folder = tmp_path / model_type
        folder.mkdir()
        (folder / "config.json").write_text(json.dumps(config))
        model = f"hf:{folder}"
        spec, _ = load_model(model)
        source = source_of(model)
        torch.manual_seed(0)
        whole, _ = build_source_module(source, spec, device="cpu")
        x = torch.randint(0, spec.vocab, (2, 16))  # (B, T)
        with torch.no_grad():
            own = logits_of(whole.eval()(x))
            cut = cut_stage(whole, module_map_of(source, spec), 0, spec.layers, has_embedding=True, has_head=True,
                            seq_len=16, kind="hf")
            driven = cut(x)
        assert torch.allclose(own, driven, rtol=1e-5, atol=1e-6), model_type
        checked.append(model_type)
    assert len(checked) == len(PIPELINED_HF_TYPES) >= 29
    assert {"mistral", "qwen2", "qwen2_moe", "gemma2", "gemma3_text", "starcoder2"} <= set(windowed)
