"""LoRA in the runtime: only the adapters train, and LoRA plans under DP, FSDP, TP and TP with
sequence parallelism train a tiny Llama (GQA, SwiGLU) and a tiny GPT with the losses of a
single-process LoRA run (fp32, tolerance 1e-5 as in test_runtime_parity, whose docstring gives
the reasoning), and their gradient norms."""

import json
import os

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from costmodel import Strategy, load_cluster, predict
from planner.plan import Plan, plan_from_strategy
from planner.zoo import ZOO
from runtime_helpers import assert_same_gradients, launch, launch_by_world, read_results, write_source_plan

TOLERANCE = 1e-5
STEPS = 5
LAYOUTS = {
    "dp": dict(dp=2, microbatch_size=4),
    "fsdp": dict(dp=4, zero=3, microbatch_size=2),
    "tp": dict(tp=2, microbatch_size=8),
    "tp_dp": dict(tp=2, dp=2, microbatch_size=4),
    "tp_fsdp": dict(tp=2, dp=2, zero=3, microbatch_size=4),
    "tp_sp": dict(tp=2, dp=2, sequence_parallel=True, microbatch_size=4),
}
# the layouts each model trains under: every layout once, tensor parallelism on both
MODEL_LAYOUTS = {"tiny-gpt": ("dp", "tp_dp"), "tiny-llama": ("fsdp", "tp", "tp_fsdp", "tp_sp")}
CASES = [(m, layout) for m, layouts in MODEL_LAYOUTS.items() for layout in layouts]


def _lora_plan(directory, model: str, name: str, **fields) -> Plan:
    spec = ZOO[model]
    s = Strategy(precision="fp32", global_batch=8, lora_rank=4,
                 lora_targets=("q", "k", "v", "o", "up", "down") + (("gate",) if model == "tiny-llama" else ()), **fields)
    plan = plan_from_strategy(spec, s, f"cpu:{s.world_size}", predict(spec, s, load_cluster(f"cpu:{s.world_size}")).predicted())
    path = directory / f"{model}__{name}.yaml"
    path.write_text(plan.to_yaml())
    return path


def test_lora_with_sequence_parallelism_is_runnable(tmp_path):
    """Was refused ("its losses drift by 1e-5 to 1e-4"): SequenceParallel registered the norms'
    weights anew, trainable, so they trained; frozen again after tensor parallelism, it matches
    one process (test_lora_losses_match_single_process, layout tp_sp)."""
    from planner.contract import runnable_problems

    plan = Plan.from_yaml(_lora_plan(tmp_path, "tiny-llama", "sp", tp=2, sequence_parallel=True,
                                     microbatch_size=8).read_text())
    assert runnable_problems(plan) == []


def test_only_adapters_train(tmp_path):
    from runtime.mesh import build_mesh
    from runtime.train import build_parts

    plan = Plan.from_yaml(_lora_plan(tmp_path, "tiny-llama", "one", microbatch_size=8).read_text())
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT="29581")
    dist.init_process_group("gloo", rank=0, world_size=1)
    try:
        (model,), _ = build_parts(plan, build_mesh(plan.mesh, "cpu"), torch.device("cpu"), seed=0)
        trainable = {n for n, p in model.named_parameters() if p.requires_grad}
        assert trainable and all(n.endswith(("lora_a", "lora_b")) for n in trainable)
        assert len(trainable) == 2 * 7 * ZOO["tiny-llama"].layers  # 7 targets per block
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
        tokens = torch.randint(0, 256, (4, 33), generator=torch.Generator().manual_seed(0))
        for _ in range(3):
            loss = F.cross_entropy(model(tokens[:, :-1]).flatten(0, 1), tokens[:, 1:].flatten())
            loss.backward()
            opt.step()
            opt.zero_grad()
        for name, p in model.named_parameters():
            changed = not torch.equal(p.detach(), before[name])
            assert changed == (name in trainable), name
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    d = tmp_path_factory.mktemp("lora")
    results = {}
    by_world: dict[int, list] = {1: [_lora_plan(d, m, "reference", microbatch_size=8) for m in ("tiny-gpt", "tiny-llama")]}
    for m, name in CASES:
        fields = LAYOUTS[name]
        by_world.setdefault(Strategy(**fields).world_size, []).append(_lora_plan(d, m, name, **fields))
    results.update(launch_by_world(by_world, d, "--steps", str(STEPS)))
    return results


def test_every_layout_is_run():
    assert {layout for _, layout in CASES} == set(LAYOUTS)


@pytest.mark.parametrize(("model", "layout"), CASES)
def test_lora_losses_match_single_process(runs, model, layout):
    ours, ref = runs[f"{model}__{layout}"]["losses"], runs[f"{model}__reference"]["losses"]
    assert len(ours) == len(ref) == STEPS
    for step, (a, b) in enumerate(zip(ours, ref), 1):
        assert abs(a - b) <= TOLERANCE * abs(b), f"step {step}: {a} vs {b}"
    assert ours[-1] < ours[0]  # the adapters learn
    assert_same_gradients(runs[f"{model}__{layout}"], runs[f"{model}__reference"])


# --- LoRA on the user's module: a Hugging Face Llama from its checkpoint (PEFT's q_proj ... down_proj) ---
HF_LAYOUTS = {"dp": dict(dp=2, microbatch_size=4), "fsdp": dict(dp=4, zero=3, microbatch_size=2),
              "tp_fsdp": dict(tp=2, dp=2, zero=3, microbatch_size=4),
              "tp_sp": dict(tp=2, dp=2, sequence_parallel=True, microbatch_size=4),
              "pp": dict(pp=2, dp=2, microbatch_size=2, schedule="1f1b")}
HF_TARGETS = ("q", "k", "v", "o", "gate", "up", "down")


def _hf_llama(root):
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(num_hidden_layers=4, hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                                      intermediate_size=128, vocab_size=256, max_position_embeddings=64,
                                      tie_word_embeddings=False)
    torch.manual_seed(3)
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(root / "llama")  # a checkpoint to adapt
    return root / "llama"


def _hf_lora_plan(directory, folder, name: str, **fields):
    from runtime_helpers import write_source_plan

    s = Strategy(precision="fp32", global_batch=8, seq_len=32, lora_rank=4, lora_targets=HF_TARGETS, **fields)
    return write_source_plan(directory, f"hf:{folder}", s, f"hf-llama__{name}")


def test_lora_on_a_hugging_face_model_wraps_its_own_linears(tmp_path):
    """Every target linear of every block wrapped in its own name (the checkpoint's weight loads into
    it), only the adapters trainable, B zero: the first forward is the checkpoint's own model."""
    transformers = pytest.importorskip("transformers")
    from runtime.mesh import build_mesh
    from runtime.train import build_plan_parts

    folder = _hf_llama(tmp_path)
    plan = Plan.from_yaml(_hf_lora_plan(tmp_path, folder, "one", microbatch_size=8).read_text())
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT="29583")
    dist.init_process_group("gloo", rank=0, world_size=1)
    try:
        (model,), _, _ = build_plan_parts(plan, build_mesh(plan.mesh, "cpu"), torch.device("cpu"), seed=0)
        trainable = {n for n, p in model.named_parameters() if p.requires_grad}
        assert len(trainable) == 2 * len(HF_TARGETS) * 4
        assert "model.layers.0.self_attn.q_proj.lora_a" in trainable and "model.layers.3.mlp.down_proj.lora_b" in trainable
        assert all(n.endswith(("lora_a", "lora_b")) for n in trainable)
        assert all(float(p.detach().abs().sum()) == 0 for n, p in model.named_parameters() if n.endswith("lora_b"))
        assert all(float(p.detach().abs().sum()) > 0 for n, p in model.named_parameters() if n.endswith("lora_a"))
        original = transformers.AutoModelForCausalLM.from_pretrained(str(folder)).eval()
        tokens = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            torch.testing.assert_close(model.eval()(tokens).logits, original(tokens).logits, rtol=1e-5, atol=1e-5)
    finally:
        dist.destroy_process_group()


def test_a_target_the_module_has_no_linear_for_is_refused_in_one_line(tmp_path):
    """Phi-3 fuses q, k and v in one qkv_proj: LoRA on q alone has nothing to wrap."""
    transformers = pytest.importorskip("transformers")
    from tests_helpers import paraplan

    transformers.Phi3Config(num_hidden_layers=2, hidden_size=64, num_attention_heads=4, num_key_value_heads=4,
                            intermediate_size=128, vocab_size=256, max_position_embeddings=64, pad_token_id=0,
                            ).save_pretrained(tmp_path / "phi3")
    out = paraplan("plan", "--model", str(tmp_path / "phi3"), "--mode", "lora", "--lora-rank", "4", "--lora-targets",
                   "q,o", "--cluster", "cpu:2", "--global-batch", "4", "--seq-len", "32", "-o", str(tmp_path / "p.yaml"))
    assert out.returncode == 2 and len(out.stderr.strip().splitlines()) == 1 and "Traceback" not in out.stderr
    assert "LoRA target q:" in out.stderr and "--lora-targets o" in out.stderr and not (tmp_path / "p.yaml").exists()


def test_lora_on_a_hugging_face_model_matches_one_process(tmp_path):
    """The checkpoint adapted under DP, FSDP, TP x FSDP and PP x DP, and a py: module of its own
    naming (q, k, v, o, gate, up, down) under TP x FSDP: losses and gradient norms those of one
    process (1e-5), and the adapters learn."""
    from runtime_helpers import write_source_plan

    folder = _hf_llama(tmp_path)
    ref = _hf_lora_plan(tmp_path, folder, "reference", microbatch_size=8)
    plans = [_hf_lora_plan(tmp_path, folder, name, **fields) for name, fields in HF_LAYOUTS.items()]
    user = "py:user_model:user_lm_tp"
    user_plan = lambda name, **f: write_source_plan(  # noqa: E731
        tmp_path, user, Strategy(precision="fp32", global_batch=8, seq_len=32, lora_rank=4, lora_targets=HF_TARGETS, **f),
        f"user__{name}")
    ref_user, user_tp = user_plan("reference", microbatch_size=8), user_plan("tp_fsdp", **HF_LAYOUTS["tp_fsdp"])
    by_world = {1: [ref, ref_user], 4: [p for p in plans if "__dp." not in str(p)] + [user_tp], 2: [plans[0]]}
    results = launch_by_world(by_world, tmp_path, "--steps", str(STEPS),
                              preload=("transformers.models.llama.modeling_llama",))
    base = results["hf-llama__reference"]
    assert base["losses"][-1] < base["losses"][0]
    for name in HF_LAYOUTS:
        ours = results[f"hf-llama__{name}"]
        for step, (a, b) in enumerate(zip(ours["losses"], base["losses"]), 1):
            assert abs(a - b) <= TOLERANCE * abs(b), f"{name} step {step}: {a} vs {b}"
        assert_same_gradients(ours, base)
    ours, base = results["user__tp_fsdp"], results["user__reference"]
    for step, (a, b) in enumerate(zip(ours["losses"], base["losses"]), 1):
        assert abs(a - b) <= TOLERANCE * abs(b), f"py: module step {step}: {a} vs {b}"
    assert_same_gradients(ours, base)


def test_a_lora_checkpoint_exports_the_adapted_model(tmp_path):
    """`export-weights` of a LoRA run writes the fine-tuned model, adapters merged (W + B A), not
    the base it started from (the adapters were dropped: the export was the checkpoint's base).
    Checked against the run's own module, adapters apart, loaded from the same checkpoint."""
    transformers = pytest.importorskip("transformers")
    from runtime.checkpoint import latest, load_in_one_process
    from runtime.hf_weights import export_weights
    from runtime.mesh import build_mesh
    from runtime.train import build_plan_parts

    folder = _hf_llama(tmp_path)
    plan_path = _hf_lora_plan(tmp_path, folder, "tp", tp=2, microbatch_size=8)
    ckpt = tmp_path / "ckpt"
    proc = launch(2, [plan_path], tmp_path / "out.jsonl", "--steps", "3", "--checkpoint-dir", str(ckpt),
                  "--checkpoint-every", "3")
    assert proc.returncode == 0, proc.stderr[-3000:]
    exported = export_weights(ckpt, tmp_path / "export", Plan.from_yaml(plan_path.read_text()))
    merged = transformers.AutoModelForCausalLM.from_pretrained(str(exported)).eval()
    base = transformers.AutoModelForCausalLM.from_pretrained(str(folder)).eval()
    one = Plan.from_yaml(_hf_lora_plan(tmp_path, folder, "one", microbatch_size=8).read_text())
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT="29585")
    dist.init_process_group("gloo", rank=0, world_size=1)
    try:
        (adapted,), _, _ = build_plan_parts(one, build_mesh(one.mesh, "cpu"), torch.device("cpu"), seed=0)
        state = adapted.state_dict()
        load_in_one_process({"train": {"model": state}}, latest(ckpt))
        adapted.load_state_dict(state)
        tokens = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(1))
        with torch.no_grad():
            want = adapted.eval()(tokens).logits
            torch.testing.assert_close(merged(tokens).logits, want, rtol=1e-5, atol=1e-5)
            assert float((base(tokens).logits - want).abs().max()) > 1e-4  # the adapters moved it
    finally:
        dist.destroy_process_group()


def test_lora_on_a_mixture_of_experts_under_expert_parallelism_leaves_the_experts_frozen(tmp_path):
    """LoRA on the built-in tiny-moe and on a Hugging Face Mixtral under ep 2 x dp 2: expert
    parallelism makes the experts' parameters anew, and LoRA froze them before it did, so the
    experts trained (gradient norm 3.2x and 1.9x one process's; the losses within 1e-4, which
    AdamW's small steps hid). Frozen after it: losses and gradient norms those of one process."""
    transformers = pytest.importorskip("transformers")
    from runtime_helpers import write_plan, write_source_plan

    config = transformers.MixtralConfig(num_hidden_layers=2, hidden_size=64, num_attention_heads=4,
                                        num_key_value_heads=2, intermediate_size=128, vocab_size=256,
                                        max_position_embeddings=64, num_local_experts=4, num_experts_per_tok=2)
    config.save_pretrained(tmp_path / "mixtral")
    lora = dict(precision="fp32", global_batch=8, lora_rank=4, lora_targets=("q", "k", "v", "o"))
    refs = [write_plan(tmp_path, "tiny-moe", Strategy(microbatch_size=8, **lora), "reference"),
            write_source_plan(tmp_path, f"hf:{tmp_path / 'mixtral'}", Strategy(seq_len=32, microbatch_size=8, **lora),
                              "mixtral__reference")]
    eps = [write_plan(tmp_path, "tiny-moe", Strategy(dp=2, ep=2, microbatch_size=4, **lora), "ep"),
           write_source_plan(tmp_path, f"hf:{tmp_path / 'mixtral'}",
                             Strategy(seq_len=32, dp=2, ep=2, microbatch_size=4, **lora), "mixtral__ep")]
    # DeepSeek-V3's latent attention adapted on its own projections (q_a, q_b, kv_a, kv_b, o)
    from test_moe import TINY_HF_MOE

    (tmp_path / "deepseek").mkdir()
    (tmp_path / "deepseek" / "config.json").write_text(json.dumps(TINY_HF_MOE["deepseek_v3"]))
    mla = {**lora, "lora_targets": ("q_a", "q_b", "kv_a", "kv_b", "o")}
    refs.append(write_source_plan(tmp_path, f"hf:{tmp_path / 'deepseek'}",
                                  Strategy(seq_len=32, microbatch_size=8, **mla), "deepseek__reference"))
    eps.append(write_source_plan(tmp_path, f"hf:{tmp_path / 'deepseek'}",
                                 Strategy(seq_len=32, dp=2, ep=2, microbatch_size=4, **mla), "deepseek__ep"))
    results = {}
    for world, todo in ((1, refs), (2, eps)):
        out = tmp_path / f"w{world}.jsonl"
        proc = launch(world, todo, out, "--steps", str(STEPS))
        assert proc.returncode == 0, proc.stderr[-3000:]
        results.update(read_results(out))
    for model in ("tiny-moe", "mixtral", "deepseek"):
        ours, base = results[f"{model}__ep"], results[f"{model}__reference"]
        for step, (a, b) in enumerate(zip(ours["losses"], base["losses"]), 1):
            assert abs(a - b) <= TOLERANCE * abs(b), f"{model} step {step}: {a} vs {b}"
        assert_same_gradients(ours, base)


def test_lora_on_latent_attention_wraps_its_own_projections_as_priced(tmp_path):
    """DeepSeek has no k or v projection: LoRA's default q, k, v, o was refused ("no linear of their
    own"). Its default is its own projections now (q_a, q_b, kv_a, kv_b, o; q without a q rank), a
    target it lacks is one line naming those it has, and the adapters the runtime makes are the
    ones the cost model prices (parameter for parameter)."""
    from costmodel.lora import adapter_params_per_tp_rank, default_targets
    from planner.model_source import load_model
    from runtime.mesh import build_mesh
    from runtime.train import build_plan_parts
    from test_moe import TINY_HF_MOE
    from tests_helpers import paraplan

    (tmp_path / "v3").mkdir()
    (tmp_path / "v3" / "config.json").write_text(json.dumps(TINY_HF_MOE["deepseek_v3"]))
    model = f"hf:{tmp_path / 'v3'}"
    spec, _ = load_model(model)
    assert default_targets(spec) == ("q_a", "q_b", "kv_a", "kv_b", "o")
    out = paraplan("plan", "--model", model, "--mode", "lora", "--cluster", "cpu:2", "--global-batch", "4",
                   "--seq-len", "32", "-o", str(tmp_path / "p.yaml"))
    assert out.returncode == 0, out.stderr
    plan = Plan.from_yaml((tmp_path / "p.yaml").read_text())
    assert plan.lora["targets"] == ["q_a", "q_b", "kv_a", "kv_b", "o"]
    bad = paraplan("plan", "--model", model, "--mode", "lora", "--lora-targets", "q,k", "--cluster", "cpu:2",
                   "--global-batch", "4", "--seq-len", "32")
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1
    assert "use some of kv_a,kv_b,o,q_a,q_b" in bad.stderr
    one = Plan.from_yaml(write_source_plan(tmp_path, model, Strategy(
        precision="fp32", global_batch=4, microbatch_size=4, seq_len=32, lora_rank=4,
        lora_targets=default_targets(spec)), "one").read_text())
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT="29587")
    dist.init_process_group("gloo", rank=0, world_size=1)
    try:
        (built,), _, _ = build_plan_parts(one, build_mesh(one.mesh, "cpu"), torch.device("cpu"), seed=0)
        trainable = sum(p.numel() for p in built.parameters() if p.requires_grad)
    finally:
        dist.destroy_process_group()
    assert trainable == spec.layers * adapter_params_per_tp_rank(spec, default_targets(spec), 4, 1)
