"""Serving: KV bytes (golden), GQA/MQA, paged blocks against contiguous allocation, beams,
prefill and decode rooflines, speculative decoding, the layout search and its command line."""

import json
from dataclasses import replace

import pytest
import yaml

from costmodel import ConfigError, load_cluster
from costmodel.serving import (
    ServingRequest, decode_step_s, evaluate, kv_budget, kv_bytes_per_token, kv_heads_per_gpu, layout_problems, plan_serving,
    prefill_s, speculative_speedup, verify_step_s, weights_bytes_per_gpu,
)
from costmodel.serving_engine import engine_cluster
from golden_data import KV_BYTES_PER_TOKEN_KIB
from planner.zoo import ZOO
from tests_helpers import paraplan

H100 = load_cluster("h100-sxm:8")
REQ = ServingRequest(prompt_len=1024, output_len=256)


@pytest.mark.parametrize("name", sorted(KV_BYTES_PER_TOKEN_KIB))
def test_kv_bytes_per_token_golden(name):
    # Llama-2-70B fp16: 80 layers x 8 KV heads x 128 x (K, V) x 2 bytes = 320 KiB; Llama-3-8B: 128 KiB
    assert kv_bytes_per_token(ZOO[name], 2) == KV_BYTES_PER_TOKEN_KIB[name] * 1024


def test_gqa_against_mha_memory_and_batch():
    gqa = ZOO["llama2-70b"]
    mha = replace(gqa, kv_heads=gqa.heads)
    assert kv_bytes_per_token(mha) / kv_bytes_per_token(gqa) == 8  # 64 query heads share 8 KV heads
    a, b = kv_budget(gqa, H100, REQ, 8, 1), kv_budget(mha, H100, REQ, 8, 1)
    assert b.kv_bytes_per_token_gpu == 8 * a.kv_bytes_per_token_gpu
    # MHA's larger K/V projections leave a little less memory, and each GiB holds 8x fewer tokens
    assert b.kv_gib < a.kv_gib
    assert a.capacity_tokens / b.capacity_tokens == pytest.approx(8 * a.kv_gib / b.kv_gib, rel=0.001)
    assert a.max_batch_paged > 8 * b.max_batch_paged


def test_tp_against_kv_heads():
    spec = ZOO["llama2-70b"]  # 8 KV heads
    assert kv_heads_per_gpu(spec, 4) == 2 and kv_heads_per_gpu(spec, 8) == 1
    mqa = replace(spec, kv_heads=1)
    assert kv_heads_per_gpu(mqa, 8) == 1  # replicated: the cache per GPU does not shrink with tp
    assert layout_problems(mqa, 8, 1) == []
    odd = replace(spec, heads=48, kv_heads=6, hidden=6144)
    assert any("do not nest" in p for p in layout_problems(odd, 8, 1))  # 8 GPUs cannot share 6 KV heads
    assert any("does not divide kv_heads" in p for p in layout_problems(odd, 4, 1))
    # tp 8 over 4 KV heads nests (each GPU keeps one, replicated twice)
    assert layout_problems(replace(spec, kv_heads=4), 8, 1) == []


def test_paged_blocks_against_contiguous():
    spec = ZOO["llama2-70b"]  # 4096-token context
    req = ServingRequest(prompt_len=1000, output_len=100, block_tokens=16)
    b = kv_budget(spec, H100, req, 8, 1)
    assert b.reserved_tokens_paged == 16 * (63 + 7) and b.used_tokens == 1100
    assert b.fragmentation_paged == pytest.approx(1 - 1100 / 1120)
    assert b.reserved_tokens_contiguous == 4096 and b.fragmentation_contiguous == pytest.approx(1 - 1100 / 4096)
    assert b.max_batch_paged == b.capacity_tokens // 1120 and b.max_batch_contiguous == b.capacity_tokens // 4096


def test_beams_multiply_the_cache_and_paged_blocks_share_the_prompt():
    spec = ZOO["llama2-70b"]
    one, four = (kv_budget(spec, H100, ServingRequest(prompt_len=1024, output_len=256, beam=k), 8, 1) for k in (1, 4))
    assert four.reserved_tokens_contiguous == 4 * one.reserved_tokens_contiguous
    assert four.reserved_tokens_paged == 1024 + 4 * 256  # one prompt, four outputs
    assert four.max_batch_paged < one.max_batch_paged and four.max_batch_contiguous == one.max_batch_contiguous // 4


def test_weights_fill_the_gpu_without_room_for_a_cache():
    spec = ZOO["llama2-70b"]
    assert weights_bytes_per_gpu(spec, 1, 1, 2) / 2**30 > 128  # 69B params in bf16 on one GPU
    with pytest.raises(ConfigError, match="no layout serves llama2-70b"):
        plan_serving(spec, load_cluster("h100-sxm:1"), REQ)


def test_latency_targets_no_layout_meets_say_how_near_the_nearest_came():
    """Every layout ran and none met the target: the lowest TPOT (or TTFT) any reached, where, and the
    target (it named the one-GPU layout the weights did not fit, which the target had nothing to do with)."""
    spec, cluster = ZOO["llama2-70b"], load_cluster("a100-80g:4")
    fastest = min(evaluate(spec, cluster, REQ, 4, 1, 1).tpot_s, evaluate(spec, cluster, REQ, 2, 2, 1).tpot_s)
    req = replace(REQ, max_tpot_ms=0.95 * fastest * 1e3)
    with pytest.raises(ConfigError) as info:
        plan_serving(spec, cluster, req)
    assert f"the lowest TPOT is {fastest * 1e3:.1f} ms (tp4 x pp1, batch 1) against" in str(info.value)
    assert "weights need" not in str(info.value)
    assert plan_serving(spec, cluster, replace(REQ, max_tpot_ms=1.01 * fastest * 1e3)).best.tp == 4


def test_decode_is_memory_bound_and_prefill_compute_bound():
    spec, dev = ZOO["llama2-70b"], engine_cluster(H100, REQ.engine).device  # the GPU as the engine runs it
    weights = weights_bytes_per_gpu(spec, 4, 1, 2)
    step = decode_step_s(spec, H100, REQ, 4, 1, batch=1, context=1024)
    read = dev.memory_s(weights)
    assert read < step < 1.6 * read  # reading the weights dominates one token at batch 1 (plus TP all-reduces)
    prefill = prefill_s(spec, H100, REQ, 4, 1)
    at_peak = 2 * spec.num_params * 1024 / 4 / (dev.peak_flops("bf16") * dev.compute_sustained)
    assert at_peak < prefill < 3 * at_peak  # the arithmetic at the GEMM efficiency, plus the TP all-reduces
    # 1024 tokens do 1024 FLOPs per weight byte, over H100's ridge (~295): compute-bound, several times the read
    assert prefill > 2.5 * read
    # decode time grows with the batch far slower than linearly (the weights are read once)
    assert decode_step_s(spec, H100, REQ, 4, 1, batch=64, context=1024) < 4 * step


def test_speculative_decoding_formula():
    # Leviathan et al. 2023: expected tokens per target step (1 - a^(g+1)) / (1 - a)
    assert speculative_speedup(0.7, 3, 0.0) == pytest.approx((1 - 0.7**4) / 0.3)  # 2.533 with a free draft
    assert speculative_speedup(0.8, 4, 0.05) == pytest.approx((1 - 0.8**5) / (0.2 * 1.2))
    assert speculative_speedup(0.0, 4, 0.1) < 1  # nothing accepted: the draft only costs
    req = ServingRequest(prompt_len=512, output_len=128, batch=1, draft=ZOO["llama2-7b"], draft_len=4, acceptance=0.8)
    spec = ZOO["llama2-70b"]
    plain = plan_serving(spec, H100, replace(req, draft=None)).best
    spec_dec = plan_serving(spec, H100, req).best
    assert spec_dec.speculative_speedup > 1.5 and spec_dec.tpot_s < plain.tpot_s / 1.5
    # the check of 4 drafts runs 5 rows a sequence: free while the weights' read bounds the step, dear
    # once the rows make it compute-bound; past a batch of about 100 on 8 H100s speculation slows decoding
    gains = [evaluate(spec, H100, replace(req, batch=b), 8, 1, b).speculative_speedup for b in (1, 32, 128, 256)]
    assert gains[0] > 2.0 > gains[1] > 1.2 and gains[2] < 1.0 and gains[3] < 0.8
    assert verify_step_s(spec, H100, req, 8, 1, 1, 600) < 1.1 * decode_step_s(spec, H100, req, 8, 1, 1, 600)
    # the draft's weights and cache share the GPUs: 13.5 GB over 8 GPUs, 32 of its layers' KV a token
    alone, both = kv_budget(spec, H100, replace(req, draft=None), 8, 1), kv_budget(spec, H100, req, 8, 1)
    draft_gib = weights_bytes_per_gpu(ZOO["llama2-7b"], 8, 1, 2) / 2**30
    assert both.weights_gib == pytest.approx(alone.weights_gib + draft_gib)
    assert both.capacity_tokens < 0.4 * alone.capacity_tokens  # its 32 MHA layers cache more a token than 80 GQA
    # vLLM's proposers do not pipeline: the search keeps to pp 1, a given pp 2 is one line
    assert all(pp == 1 for _, pp, _ in plan_serving(spec, H100, req).curves)
    with pytest.raises(ConfigError, match="pp 1"):
        plan_serving(spec, H100, req, pp=2)


def test_the_search_meets_the_latency_target_and_prefers_throughput():
    spec = ZOO["llama2-70b"]
    free = plan_serving(spec, H100, REQ)
    tight = plan_serving(spec, H100, replace(REQ, max_tpot_ms=25.0))
    assert tight.best.tpot_s * 1e3 <= 25.0 < free.best.tpot_s * 1e3
    assert tight.best.throughput_tokens_per_s < free.best.throughput_tokens_per_s
    # every layout's curve: more batch, more throughput, more latency
    for points in free.curves.values():
        assert all(a.tpot_s <= b.tpot_s and a.throughput_tokens_per_s < b.throughput_tokens_per_s
                   for a, b in zip(points, points[1:]))


def test_command_line_writes_a_serving_plan(tmp_path):
    out = tmp_path / "serve.yaml"
    run = paraplan("plan", "--mode", "inference", "--model", "llama2-70b", "--cluster", "h100-sxm:8",
                   "--prompt-len", "1024", "--output-len", "256", "--max-tpot-ms", "40", "-o", str(out), "--json")
    assert run.returncode == 0, run.stderr
    plan = yaml.safe_load(out.read_text())
    assert plan["mode"] == "inference" and plan["serving"]["prompt_len"] == 1024
    p = plan["predicted"]
    assert p["kv_cache_bytes_per_token"] == 320 * 1024 and p["tpot_s"] <= 0.040 and p["ttft_s"] > p["tpot_s"]
    assert p["max_batch"] >= p["batch"] >= 1
    assert json.loads(run.stdout)["plan"]["mesh"]["tp"] * json.loads(run.stdout)["plan"]["mesh"]["dp_replicate"] <= 8
    bad = paraplan("plan", "--mode", "inference", "--model", "llama2-70b", "--cluster", "h100-sxm:8")
    assert bad.returncode == 2 and "--prompt-len" in bad.stderr
    never = paraplan("plan", "--mode", "inference", "--model", "llama2-70b", "--cluster", "h100-sxm:8",
                     "--prompt-len", "1024", "--output-len", "256", "--max-tpot-ms", "1")
    assert never.returncode == 2 and "latency targets" in never.stderr and "Traceback" not in never.stderr


def test_given_degrees_are_fixed_and_other_flags_refused(capsys):
    """`plan --mode inference --tp 4` searches only tp 4 layouts (given flags are fixed, as in
    training); `simulate --mode inference` with the request's lengths prices one layout in the
    steady state (tp and pp 1 unless given); a training flag, or a flag of serving under traffic
    without --workload, is refused in one line."""
    from cli.main import main
    from costmodel.serving import evaluate

    def run(*argv):
        code = main(list(argv))
        out, err = capsys.readouterr()
        return code, out, err

    base = ("--mode", "inference", "--model", "llama3-70b", "--cluster", "h100-sxm:8", "--prompt-len", "1024",
            "--output-len", "256")
    code, out, err = run("plan", *base, "--tp", "4", "--json")
    assert code == 0, err
    got = json.loads(out)
    assert got["plan"]["mesh"]["tp"] == 4 and set(got["curves"]) == {"tp4_pp1", "tp4_pp2"}
    code, out, err = run("simulate", *base, "--tp", "4", "--batch", "64", "--json")
    assert code == 0, err
    plan = json.loads(out)["plan"]
    assert (plan["mesh"]["tp"], plan["mesh"]["pp"], plan["mesh"]["dp_replicate"]) == (4, 1, 2)
    want = evaluate(ZOO["llama3-70b"], H100, REQ, 4, 1, 64)
    assert plan["predicted"]["tpot_s"] == want.tpot_s and plan["predicted"]["batch"] == 64
    for extra, needle in ((("--zero", "3"), "--zero is for training"),
                          (("--max-num-seqs", "8"), "--max-num-seqs is for serving under traffic"),
                          (("--tp", "3"), "must divide the 8 GPUs"), (("--beam", "0"), "--beam must be"),
                          (("--block-size", "0"), "--block-size must be"),
                          (("--block-size", "12"), "--block-size 12: vllm takes 1, 8, 16, 32, 64, 128, 256")):
        for command in ("plan", "simulate"):
            code, out, err = run(command, *base, *extra)
            assert code == 2 and needle in err and len(err.strip().splitlines()) == 1 and not out, (command, err)


def test_check_weighs_a_serving_plan_by_its_kv_cache(tmp_path):
    out = tmp_path / "serve.yaml"
    assert paraplan("plan", "--mode", "inference", "--model", "llama2-70b", "--cluster", "h100-sxm:8", "--prompt-len",
                    "1024", "--output-len", "256", "-o", str(out)).returncode == 0
    data = yaml.safe_load(out.read_text())
    data["schedule"]["microbatch_size"] = 5000  # far beyond the KV capacity
    data["global_batch"] = 5000 * data["mesh"]["dp_replicate"]
    out.write_text(yaml.safe_dump(data))
    r = paraplan("check", str(out), "--json")
    report = json.loads(r.stdout)
    assert r.returncode == 2 and report["max_batch"] < 5000
    assert any("batch 5000 needs more KV cache" in p for p in report["problems"])


def test_a_fused_moe_runs_its_experts_as_one_launch():
    """vLLM's fused_moe (and TensorRT-LLM's MoE plugin) run a projection of every expert in one
    kernel: Mixtral's 8,192-token chunk on 2 H100s (2,048 rows an expert, 7,168 columns a GPU) is
    priced as one grouped GEMM, faster than eight GEMMs of an expert's shape one by one (each at
    the smaller size's efficiency), no faster than its FLOPs at the device's best efficiency, and
    bounded below by reading each expert's weights and every row's input and output once; a
    decode's few rows read the experts they reach, as before."""
    from costmodel.cluster import with_runtime
    from costmodel.ops import gemm_s
    from costmodel.runtime import FUSED
    from costmodel.serving import grouped_gemm_s

    spec = ZOO["mixtral-8x7b"]
    dev = with_runtime(engine_cluster(load_cluster("h100-sxm:2"), "vllm"), FUSED).device
    rows, tp, h = 8192, 2, spec.hidden
    copies, fe = rows * spec.experts_per_token, spec.expert_ffn_hidden // tp
    one = grouped_gemm_s(dev, "bf16", copies, spec.experts, h, 2 * fe, 2)
    looped = spec.experts * gemm_s(dev, "bf16", copies / spec.experts, h, 2 * fe, 2)
    flops = 2.0 * copies * h * 2 * fe
    best = flops / (dev.peak_flops("bf16") * dev.gemm_efficiency(1e15) * dev.compute_sustained)
    assert best <= one < 0.97 * looped
    floor = dev.memory_s(2 * (spec.experts * h * 2 * fe + copies * (h + 2 * fe)))
    assert grouped_gemm_s(dev, "bf16", 8, 8, h, 2 * fe, 2) == pytest.approx(
        dev.memory_s(2 * (8 * h * 2 * fe + 8 * (h + 2 * fe))))  # a decode of 4 rows: the 8 experts read
    assert one >= floor


def test_expert_parallel_serving_holds_experts_whole_at_the_same_weight():
    """vLLM's --enable-expert-parallel: DeepSeek-V3's 256 experts whole, 32 on each of 8 H200s,
    against each expert split 8 ways. The same weight bytes per GPU; a prefill runs the experts'
    GEMMs at full width (2048 columns, not 256) and is faster; a decode step reads the same
    touched experts and is within a few percent; what cannot split is refused by name."""
    spec, h200 = ZOO["deepseek-v3"], load_cluster("h200:8")
    req = ServingRequest(prompt_len=2048, output_len=256, precision="fp8")
    assert weights_bytes_per_gpu(spec, 8, 1, 1) > 70 * 2**30  # 671B of fp8 over 8
    split, whole = (prefill_s(spec, h200, req, 8, 1, expert_parallel=ep) for ep in (False, True))
    assert whole < 0.9 * split
    d_split, d_whole = (decode_step_s(spec, h200, req, 8, 1, 64, 2176, expert_parallel=ep) for ep in (False, True))
    assert d_whole == pytest.approx(d_split, rel=0.05)
    assert "llama3-8b has no experts" in layout_problems(ZOO["llama3-8b"], 2, 1, expert_parallel=True)[0]
    assert "does not divide experts(8)" in layout_problems(ZOO["mixtral-8x7b"], 16, 1, expert_parallel=True)[-1]
    assert "give --tp 2 or more" in layout_problems(spec, 1, 1, expert_parallel=True)[0]


def test_the_serving_search_tries_expert_parallelism_for_a_mixture_of_experts(tmp_path):
    found = plan_serving(ZOO["mixtral-8x7b"], H100, REQ)
    assert {ep for (_, _, ep) in found.curves} == {False, True}
    assert not any(ep for (tp, _, ep) in found.curves if tp == 1)  # one GPU holds every expert anyway
    dense = plan_serving(ZOO["llama3-8b"], H100, REQ)
    assert not any(ep for (_, _, ep) in dense.curves)
    # an expert-parallel plan exports as one vLLM instance per replica: with --data-parallel-size vLLM would
    # spread the experts over every replica's GPUs
    out = paraplan("plan", "--mode", "inference", "--model", "qwen3-30b-a3b", "--cluster", "h100-sxm:8",
                   "--prompt-len", "1024", "--output-len", "256", "-o", str(tmp_path / "p.yaml"))
    assert out.returncode == 0, out.stderr
    plan = yaml.safe_load((tmp_path / "p.yaml").read_text())
    text = paraplan("export", str(tmp_path / "p.yaml"), "--to", "vllm").stdout
    if plan["serving"].get("expert_parallel"):
        command = text.strip().splitlines()[-1]
        assert "--enable-expert-parallel" in command and "--data-parallel-size" not in command
        assert f"{plan['serving']['replicas']} instances of this command" in text or plan["serving"]["replicas"] == 1
    else:
        assert "--enable-expert-parallel" not in text
    for args, says in ((("plan", "--mode", "inference", "--model", "mixtral-8x7b", "--cluster", "h100-sxm:8",
                         "--prompt-len", "64", "--output-len", "64", "--expert-parallel"), "plan searches --expert-parallel"),
                       (("simulate", "--model", "llama3-8b", "--cluster", "h100-sxm:2", "--expert-parallel"),
                        "--expert-parallel is for serving")):
        bad = paraplan(*args)
        assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and says in bad.stderr, bad.stderr


def test_serving_under_traffic_prices_expert_parallel_replicas():
    from costmodel.traffic import ServingLayout, simulate_traffic
    from costmodel.workload import workload

    spec, cluster = ZOO["qwen3-30b-a3b"], load_cluster("h100-sxm:2")
    reqs = workload("long-context", rate=2.0, requests=60, context=spec.seq_len, seed=0)
    split, whole = (simulate_traffic(spec, cluster, reqs, ServingLayout(tp=2, expert_parallel=ep)).metrics()
                    for ep in (False, True))
    # long prompts: prefill-bound, where whole experts run full-width GEMMs
    assert whole["ttft_p50_s"] < split["ttft_p50_s"]
    with pytest.raises(ConfigError, match="llama3-8b has no experts"):
        simulate_traffic(ZOO["llama3-8b"], cluster, reqs, ServingLayout(tp=2, expert_parallel=True))


def test_an_fp8_kv_cache_and_the_gpu_share_size_the_cache_as_vllm_does():
    """vLLM's --kv-cache-dtype fp8 stores a value in one byte (twice the tokens of a bf16 cache, and
    a decode reads half the bytes) and --gpu-memory-utilization is the share of the GPU its weights,
    activations and cache take: the capacity is that share less the weights and workspace, over
    the bytes a token takes."""
    spec, cluster = ZOO["llama3-8b"], load_cluster("h100-sxm:1")
    req = ServingRequest(prompt_len=4000, output_len=500)
    bf16, fp8 = (kv_budget(spec, cluster, replace(req, kv_cache_dtype=d), 1, 1) for d in ("auto", "fp8"))
    assert fp8.kv_gib == bf16.kv_gib and fp8.kv_bytes_per_token_gpu * 2 == bf16.kv_bytes_per_token_gpu
    assert fp8.capacity_tokens == pytest.approx(2 * bf16.capacity_tokens, abs=1)
    half = kv_budget(spec, cluster, replace(req, gpu_memory_utilization=0.5), 1, 1)
    assert (bf16.kv_gib - half.kv_gib) * 2**30 == pytest.approx(0.4 * cluster.device.hbm_bytes)
    # a decode step over a long context reads the cache at its own width: fp8 saves half its bytes
    full, light = (decode_step_s(spec, cluster, replace(req, kv_cache_dtype=d), 1, 1, 64, 32_000)
                   for d in ("auto", "fp8"))
    cache_s = 64 * 32_000 * spec.layers * 2 * spec.kv_heads * spec.head_dim / (
        cluster.device.hbm_gb_per_s * 1e9 * cluster.device.hbm_efficiency)  # one byte a value, at the engine's rate
    assert 0.5 * cache_s < full - light < 1.5 * cache_s
    # fp8 weights (vLLM's --quantization fp8) keep a 16-bit cache unless it is asked for in fp8
    w8 = kv_budget(spec, cluster, replace(req, precision="fp8"), 1, 1)
    assert w8.kv_bytes_per_token_gpu == bf16.kv_bytes_per_token_gpu and w8.weights_gib < 0.51 * bf16.weights_gib
    assert kv_budget(spec, cluster, replace(req, precision="fp8", kv_cache_dtype="fp8"), 1, 1).kv_bytes_per_token_gpu \
        == fp8.kv_bytes_per_token_gpu
    from engines.vllm import import_serve

    cmd = import_serve("vllm serve m --dtype bfloat16 --quantization fp8 --kv-cache-dtype fp8_e5m2")
    assert (cmd.precision, cmd.kv_cache_dtype, cmd.unknown) == ("fp8", "fp8", ())
    assert import_serve("vllm serve m --quantization gptq").unknown == ("--quantization gptq",)
    for bad, needle in ((dict(kv_cache_dtype="fp4"), "--kv-cache-dtype 'fp4'"),
                        (dict(gpu_memory_utilization=1.2), "--gpu-memory-utilization must be a share")):
        with pytest.raises(ConfigError, match=needle):
            replace(req, **bad)


def test_a_serving_plan_keeps_its_kv_cache_dtype_and_gpu_share_through_export_and_back(tmp_path):
    """Planned for traffic with --kv-cache-dtype fp8 --gpu-memory-utilization 0.85: the plan records
    both, check and simulate --plan price them, `export --to vllm` writes them and the command read
    back (--from vllm) prices the same engine arguments; a training command refuses them."""
    plan = tmp_path / "fp8.yaml"
    out = paraplan("plan", "--mode", "inference", "--model", "llama3-8b", "--cluster", "h100-sxm:1", "--workload",
                   "chat", "--rate", "5", "--slo", "ttft_p99=1,tpot_p99=50ms", "--kv-cache-dtype", "fp8",
                   "--gpu-memory-utilization", "0.85", "-o", str(plan))
    assert out.returncode == 0, out.stderr
    sv = yaml.safe_load(plan.read_text())["serving"]
    assert (sv["kv_cache_dtype"], sv["gpu_memory_utilization"]) == ("fp8", 0.85)
    assert paraplan("check", str(plan)).returncode == 0
    again = paraplan("simulate", "--plan", str(plan), "--json")
    assert again.returncode == 0, again.stderr
    assert json.loads(again.stdout)["predicted"]["kv_capacity_tokens"] == yaml.safe_load(
        plan.read_text())["predicted"]["kv_capacity_tokens"]
    exported = paraplan("export", str(plan), "--to", "vllm")
    assert exported.returncode == 0 and "--gpu-memory-utilization 0.85" in exported.stdout
    assert "--kv-cache-dtype fp8" in exported.stdout
    back = paraplan("simulate", "--mode", "inference", "--from", "vllm", exported.stdout.strip(), "--model",
                    "llama3-8b", "--cluster", "h100-sxm:1", "--workload", "chat", "--rate", "5", "--requests", "50",
                    "--json")
    assert back.returncode == 0, back.stderr
    scheduler = json.loads(back.stdout)["scheduler"]
    assert (scheduler["kv_cache_dtype"], scheduler["gpu_memory_utilization"]) == ("fp8", 0.85)
    refused = paraplan("plan", "--model", "llama3-8b", "--cluster", "h100-sxm:8", "--global-batch", "8",
                       "--kv-cache-dtype", "fp8")
    assert refused.returncode == 2 and "kv-cache-dtype is for serving" in refused.stderr
    w8 = tmp_path / "w8.yaml"  # fp8 weights: vLLM quantizes the checkpoint as it loads it
    assert paraplan("plan", "--mode", "inference", "--model", "llama3-8b", "--cluster", "h100-sxm:1", "--prompt-len",
                    "512", "--output-len", "128", "--precision", "fp8", "-o", str(w8)).returncode == 0
    exported = paraplan("export", str(w8), "--to", "vllm")
    assert exported.returncode == 0 and "--dtype auto --quantization fp8" in exported.stdout, exported.stderr


def test_tensorrt_llm_gives_its_kv_cache_a_share_of_the_free_memory():
    """vLLM's --gpu-memory-utilization is a share of the whole GPU (weights, activations and cache
    within it); TensorRT-LLM's free_gpu_memory_fraction is a share of what is free once the
    weights and activations are in place: Llama-2 70B over two H100s keeps 6.3 GiB of cache under
    vLLM and about twice that under TensorRT-LLM, each as its own formula gives."""
    spec, cluster = ZOO["llama2-70b"], load_cluster("h100-sxm:8")
    req = ServingRequest(prompt_len=1000, output_len=100)
    vllm, trt = (kv_budget(spec, cluster, replace(req, engine=e), 2, 1) for e in ("vllm", "tensorrt-llm"))
    hbm = cluster.device.hbm_bytes / 2**30
    assert vllm.weights_gib == trt.weights_gib
    assert vllm.kv_gib == pytest.approx(0.9 * hbm - 1.0 - vllm.weights_gib - vllm.workspace_gib)
    assert trt.kv_gib == pytest.approx(0.9 * (hbm - 1.0 - trt.weights_gib - trt.workspace_gib))
    assert 1.9 < trt.kv_gib / vllm.kv_gib < 2.2


def test_a_quantized_checkpoint_is_served_in_the_precision_its_config_says(tmp_path):
    """vLLM reads a checkpoint's quantization_config and loads fp8 weights as fp8 unasked
    (DeepSeek-V3's and Qwen3-*-FP8's quant_method fp8, RedHat's compressed-tensors FP8): serving
    commands price them so, with a note, and the export leaves out --quantization (vLLM refuses a
    flag that names another method than the config's); 4-bit weights (AWQ here) are refused in one
    line unless --precision says how to price them."""
    from pathlib import Path

    from planner.model_source import checkpoint_weights

    base = json.loads((Path(__file__).parent / "data" / "llama3_8b_config.json").read_text())
    quantized = {
        "fp8": {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "weight_block_size": [128, 128]},
        "ct": {"quant_method": "compressed-tensors", "config_groups": {"group_0": {
            "weights": {"num_bits": 8, "type": "float", "strategy": "channel"}, "targets": ["Linear"]}}},
        "awq": {"quant_method": "awq", "bits": 4, "group_size": 128, "zero_point": True},
    }
    dirs = {}
    for name, quant in {**quantized, "plain": None}.items():
        d = tmp_path / name
        d.mkdir()
        (d / "config.json").write_text(json.dumps({**base, **({"quantization_config": quant} if quant else {})}))
        dirs[name] = f"hf:{d}"
    assert [checkpoint_weights(dirs[k]) for k in ("fp8", "ct", "plain")] == ["fp8", "fp8", None]
    assert checkpoint_weights("llama3-8b") is None
    with pytest.raises(ConfigError, match=r"4-bit awq .* --precision bf16"):
        checkpoint_weights(dirs["awq"])
    args = ("--mode", "inference", "--cluster", "h100-sxm:1", "--prompt-len", "512", "--output-len", "128", "--json")
    runs = {k: paraplan("simulate", "--model", dirs[k], *args) for k in ("fp8", "plain")}
    assert all(r.returncode == 0 for r in runs.values()), runs["fp8"].stderr
    assert "keeps its weights in fp8" in runs["fp8"].stderr
    weights = {k: json.loads(r.stdout)["plan"]["predicted"]["weights_gib_per_gpu"] for k, r in runs.items()}
    assert weights["fp8"] == pytest.approx(weights["plain"] / 2, rel=0.01)
    refused = paraplan("simulate", "--model", dirs["awq"], *args)
    assert refused.returncode == 2 and "4-bit awq" in refused.stderr and len(refused.stderr.strip().splitlines()) == 1
    assert paraplan("simulate", "--model", dirs["awq"], *args, "--precision", "bf16").returncode == 0
    plan = tmp_path / "fp8.yaml"
    assert paraplan("plan", "--model", dirs["fp8"], *args[:-1], "-o", str(plan)).returncode == 0
    line = paraplan("export", str(plan), "--to", "vllm").stdout
    assert "--dtype auto" in line and "--quantization" not in line
    back = paraplan("simulate", "--mode", "inference", "--from", "vllm", line.strip(), "--cluster", "h100-sxm:1",
                    "--workload", "chat", "--rate", "2", "--requests", "20")
    assert back.returncode == 0 and "keeps its weights in fp8" in back.stderr, back.stderr
    report = ("report", "--mode", "inference", "--cluster", "h100-sxm:1", "--prompt-len", "512", "--output-len", "128")
    done = paraplan(*report, "--model", dirs["fp8"], "-o", str(tmp_path / "r8"))
    assert done.returncode == 0 and "keeps its weights in fp8" in done.stderr, done.stderr
    assert paraplan(*report, "--model", dirs["awq"], "-o", str(tmp_path / "r4")).returncode == 2
    assert not (tmp_path / "r4").exists()  # nothing half-written
    assert paraplan(*report, "--model", dirs["awq"], "--precision", "bf16", "-o", str(tmp_path / "r4")).returncode == 0


def test_fp8_weights_on_a_gpu_without_fp8_tensor_cores_are_weight_only():
    """An A100 has no fp8 tensor cores: vLLM serves fp8 weights there weight-only (its FP8 Marlin
    kernels), one byte a weight read and the GEMMs at the 16-bit rate: a decode step of Llama 3 8B
    reads about half the bytes and the prefill computes as in bf16. Training in fp8 there is one
    line naming the GPU's dtypes (it read as "does not fit" behind the candidates too large to price)."""
    a100 = load_cluster("a100-80g:1")
    spec = ZOO["llama3-8b"]
    bf16, fp8 = (ServingRequest(prompt_len=2048, output_len=128, precision=p) for p in ("bf16", "fp8"))
    step = {r.precision: decode_step_s(spec, a100, r, 1, 1, 8, 2100) for r in (bf16, fp8)}
    assert 0.5 < step["fp8"] / step["bf16"] < 0.6
    assert prefill_s(spec, a100, fp8, 1, 1) == pytest.approx(prefill_s(spec, a100, bf16, 1, 1), rel=0.05)
    out = paraplan("plan", "--model", "llama3-8b", "--cluster", "a100-80g:8", "--global-batch", "64", "--precision",
                   "fp8")
    assert out.returncode == 2 and "has no fp8 peak" in out.stderr and "--precision" in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1
