"""LoRA and QLoRA in the cost model and the planner: adapter counts, frozen-base memory, the
missing weight-gradient GEMMs, data-parallel traffic of adapters only, and what fits."""

import pytest

from costmodel import ConfigError, Strategy, build_step, load_cluster, predict
from costmodel.lora import NF4_BYTES_PER_WEIGHT, adapter_params_per_tp_rank, linear_weights_per_tp_rank
from planner.zoo import ZOO
from tests_helpers import paraplan

A100 = load_cluster("a100-80g:1")


def test_adapter_parameter_counts():
    # peft's print_trainable_parameters for Llama-2-7B with r=8 on q_proj, v_proj: 4,194,304
    spec = ZOO["llama2-7b"]
    assert spec.layers * adapter_params_per_tp_rank(spec, ("q", "v"), 8, 1) == 4_194_304
    # Llama-3-8B (GQA: k and v are 1024 wide), r=16 on q, k, v, o: 16 * (8192 + 5120 + 5120 + 8192) * 32
    spec = ZOO["llama3-8b"]
    assert spec.layers * adapter_params_per_tp_rank(spec, ("q", "k", "v", "o"), 16, 1) == 13_631_488
    # under tensor parallelism each rank keeps the unsplit half of every adapter whole
    one = adapter_params_per_tp_rank(spec, ("q", "o"), 16, 1)
    four = adapter_params_per_tp_rank(spec, ("q", "o"), 16, 4)
    assert one / 4 < four < one
    assert four == 16 * (4096 + 4096 // 4) + 16 * (4096 // 4 + 4096)


def test_lora_of_llama3_8b_fits_one_a100_where_full_fine_tuning_does_not():
    spec = ZOO["llama3-8b"]
    base = dict(global_batch=8, microbatch_size=1, recompute="full", seq_len=2048)
    full = predict(spec, Strategy(**base), A100)
    lora = predict(spec, Strategy(lora_rank=16, **base), A100)
    qlora = predict(spec, Strategy(lora_rank=16, base_precision="nf4", **base), A100)
    assert not full.fits and full.memory_gib["total"] > 120  # 18 bytes per weight: ~135 GiB of model state
    assert lora.fits and lora.memory_gib["optimizer"] < 0.5 and lora.memory_gib["gradients"] < 0.1
    assert qlora.fits and qlora.memory_gib["parameters"] < 0.4 * lora.memory_gib["parameters"]
    # the 4-bit base: linears at 4.127 bits, embeddings and head in 16 bits
    linears = spec.layers * linear_weights_per_tp_rank(spec, 1)
    saved = (lora.memory_gib["parameters"] - qlora.memory_gib["parameters"]) * 2**30
    assert saved == pytest.approx(linears * (2 - NF4_BYTES_PER_WEIGHT), rel=0.01)
    assert paraplan("plan", "--mode", "lora", "--model", "llama3-8b", "--cluster", "a100-80g:1",
                    "--global-batch", "8").returncode == 0
    refused = paraplan("plan", "--model", "llama3-8b", "--cluster", "a100-80g:1", "--global-batch", "8")
    assert refused.returncode == 2 and "does not fit" in refused.stderr


def test_frozen_weights_skip_weight_gradients_and_their_traffic():
    spec = ZOO["llama3-8b"]
    c = load_cluster("a100-80g:8")
    base = dict(dp=8, global_batch=64, microbatch_size=1, recompute="full", seq_len=2048)
    full, lora = build_step(spec, Strategy(**base), c), build_step(spec, Strategy(lora_rank=16, **base), c)
    # backward: input gradients of the frozen base, both gradients of the small adapters
    assert lora.backward[0].compute < 0.8 * full.backward[0].compute
    assert lora.forward[0].compute > full.forward[0].compute  # the adapter GEMMs
    # data-parallel traffic carries adapter gradients only
    assert lora.dp_comm_s[0] < 0.01 * full.dp_comm_s[0]
    qlora = build_step(spec, Strategy(lora_rank=16, base_precision="nf4", **base), c)
    assert qlora.forward[0].compute > lora.forward[0].compute  # dequantising the 4-bit base


def test_lora_flags_are_checked():
    with pytest.raises(ConfigError, match="--lora-targets"):
        Strategy(lora_rank=8, lora_targets=("q", "attn"))
    with pytest.raises(ConfigError, match="needs LoRA"):
        Strategy(base_precision="nf4")
    gpt = paraplan("simulate", "--model", "tiny-gpt", "--cluster", "cpu:1", "--mode", "lora", "--lora-targets", "gate")
    assert gpt.returncode == 2 and "no gate projection" in gpt.stderr
    stray = paraplan("simulate", "--model", "tiny-gpt", "--cluster", "cpu:1", "--lora-rank", "8")
    assert stray.returncode == 2 and "needs --mode lora" in stray.stderr


def test_a_lora_plan_round_trips(tmp_path):
    out = tmp_path / "lora.yaml"
    run = paraplan("plan", "--mode", "lora", "--model", "llama3-8b", "--cluster", "a100-80g:8", "--global-batch", "64",
                   "--lora-rank", "8", "--lora-targets", "q,v", "--base-precision", "nf4", "-o", str(out), "--no-timing")
    assert run.returncode == 0, run.stderr
    sim = paraplan("simulate", "--plan", str(out), "--json")
    assert sim.returncode == 0, sim.stderr
    import json

    import yaml

    plan = yaml.safe_load(out.read_text())
    assert plan["mode"] == "lora" and plan["lora"] == {"rank": 8, "targets": ["q", "v"], "base_precision": "nf4"}
    assert json.loads(sim.stdout)["predicted"]["step_time_s"] == pytest.approx(plan["predicted"]["step_time_s"])
    assert json.loads(sim.stdout)["strategy"]["lora_rank"] == 8


def test_a_mixture_of_experts_fine_tunes_with_its_experts_frozen():
    """LoRA on Mixtral: the routed experts are frozen base like the rest (the adapters go on attention;
    the runtime freezes every weight but the adapters). They were priced as trained (gradients and
    AdamW states) and again inside the frozen base on every GPU: QLoRA of Mixtral 8x7B on two A100s
    needed 414 GiB a GPU, where QLoRA's 4-bit base (46.7B weights at 4.127 bits, 24 GB) fits one."""
    spec = ZOO["mixtral-8x7b"]
    base = dict(global_batch=8, microbatch_size=1, recompute="full", seq_len=2048)
    lora = predict(spec, Strategy(lora_rank=16, **base), load_cluster("a100-80g:1"))
    qlora = predict(spec, Strategy(lora_rank=16, base_precision="nf4", **base), load_cluster("a100-80g:1"))
    assert lora.memory_gib["gradients"] < 0.1 and lora.memory_gib["optimizer"] < 0.3
    routed = spec.moe_layers * spec.experts * spec.expert_params
    assert lora.memory_gib["experts"] * 2**30 == pytest.approx(routed * 2, rel=1e-6)  # 16-bit, no states
    assert qlora.memory_gib["experts"] * 2**30 == pytest.approx(routed * NF4_BYTES_PER_WEIGHT, rel=1e-6)
    # every weight counted once: the base's linears at 4.127 bits, embeddings and head in 16
    linears = spec.layers * linear_weights_per_tp_rank(spec, 1) + routed
    ends = 2 * spec.vocab * spec.hidden * 2
    assert qlora.memory_gib["parameters"] * 2**30 == pytest.approx(linears * NF4_BYTES_PER_WEIGHT + ends, rel=0.02)
    assert qlora.fits and not lora.fits  # 93 GB of 16-bit weights do not fit one 80 GB GPU
    # frozen experts run the backward's input gradients only: the step is shorter than training them
    one = load_cluster("a100-80g:1")
    full_step, lora_step = build_step(spec, Strategy(**base), one), build_step(spec, Strategy(lora_rank=16, **base), one)
    assert lora_step.backward[0].compute < 0.75 * full_step.backward[0].compute


def test_lora_on_routed_experts_is_refused_in_one_line():
    out = paraplan("plan", "--mode", "lora", "--model", "mixtral-8x7b", "--cluster", "a100-80g:8", "--global-batch",
                   "64", "--lora-targets", "q,v,up,down")
    assert out.returncode == 2 and len(out.stderr.strip().splitlines()) == 1
    assert "--lora-targets up,down" in out.stderr and "routed experts" in out.stderr
