"""Serving engine profiles (costmodel.serving_engine): the share of the GPU an inference engine's
iterations reach, and the published vLLM runs it was fitted to and checked against."""

import math
import statistics
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import yaml

from costmodel import ConfigError, load_cluster
from costmodel.serving import ServingRequest, decode_step_s, kv_budget, prefill_s
from costmodel.serving_engine import ServingEngine, engine_cluster, engine_names, load_engine
from costmodel.traffic import IterationCost, SchedulerConfig
from planner.zoo import ZOO
from tests_helpers import paraplan

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
import serving_fidelity  # noqa: E402

DATA = yaml.safe_load((ROOT / "tests" / "data" / "serving_runs.yaml").read_text())
H100 = load_cluster("h100-sxm:1")


def test_profiles_load_and_bad_ones_are_refused():
    assert {"vllm", "tensorrt-llm"} <= set(engine_names())
    vllm = load_engine("vllm")
    assert 0 < vllm.compute_of("hopper") < 1 and vllm.compute_of("cpu") == 1.0
    with pytest.raises(ConfigError, match="unknown serving engine 'sglang'; use one of"):
        load_engine("sglang")
    with pytest.raises(ConfigError, match="fractions in"):
        ServingEngine(name="x", compute_sustained={"hopper": 1.5})
    with pytest.raises(ConfigError, match="--engine 'nope'"):
        SchedulerConfig(engine="nope")


def test_engine_scales_prefill_by_its_compute_share_and_decode_by_its_memory_share():
    spec = ZOO["llama3-8b"]
    vllm, trt = load_engine("vllm"), load_engine("tensorrt-llm")
    req = ServingRequest(prompt_len=4096, output_len=128, engine="tensorrt-llm")
    fast = prefill_s(spec, H100, req, 1, 1)
    slow = prefill_s(spec, H100, replace(req, engine="vllm"), 1, 1)
    # a 4096-token prefill is compute-bound: its time scales by the inverse compute share
    assert slow / fast == pytest.approx(1 / vllm.compute_of("hopper"), rel=0.05)
    one = decode_step_s(spec, H100, req, 1, 1, batch=1, context=512)
    one_vllm = decode_step_s(spec, H100, replace(req, engine="vllm"), 1, 1, batch=1, context=512)
    # batch-1 decode reads the weights: scales by the inverse memory share
    assert one_vllm / one == pytest.approx(1 / vllm.memory_of("hopper"), rel=0.1)
    assert trt.compute_of("hopper") == 1.0


def test_engine_cluster_is_applied_once():
    once = engine_cluster(H100, "vllm")
    assert once.device.serving_engine == "vllm"
    assert engine_cluster(once, "vllm") is once  # a cluster priced for an engine is not priced again
    cost = IterationCost(ZOO["llama3-8b"], once, 1, 1, "bf16", 8192)
    again = IterationCost(ZOO["llama3-8b"], H100, 1, 1, "bf16", 8192, engine="vllm")
    assert cost.seconds(2048, 1, 0, 0.0, 2048 * 2049 / 2, 2048) == again.seconds(2048, 1, 0, 0.0, 2048 * 2049 / 2, 2048)


def test_the_engines_memory_outside_the_cache_sizes_the_kv_cache():
    spec = ZOO["llama3-70b"]
    req = ServingRequest(prompt_len=2048, output_len=128)
    b = kv_budget(spec, load_cluster("h100-sxm:4"), req, 4, 1)
    usable = 79.6 * 0.9 - load_engine(req.engine).non_kv_gib
    assert b.kv_gib == pytest.approx(usable - b.weights_gib - b.workspace_gib, abs=1e-6)


def test_published_vllm_runs_held_out_of_the_fit_are_predicted():
    """Published vLLM runs at request rate inf (tests/data/serving_runs.yaml): the profile's shares
    were fitted to two labs' rows (GPUStack's vLLM 0.11 Qwen3-14B runs, Lambda's vLLM 0.6 Llama 3.1
    runs); GPUStack's Qwen3-32B rows (other weights, a KV cache a fifth as large), its Qwen3-235B-A22B
    rows (a mixture of experts on eight GPUs) and a third lab's runs (the SGLang team's vLLM 0.6:
    Llama 3.1 8B on an A100, 70B on 4 H100s) are held out. Measured: fitted rows median 5.1%, worst
    15%; held out median 17.6%, worst 27% (GPUStack's MoE on A100, 4000/200); the third lab's two runs
    -0.5% and -10.4%."""
    engine, models = load_engine("vllm"), DATA["models"]
    errors = {"fitted": [], "held-out": []}
    third_lab = []
    for row in serving_fidelity.vllm_rows(DATA):
        kind = serving_fidelity.row_kind(row)
        if kind == "host-bound":
            continue  # the API server's per-request work bounds these (not modelled)
        got = serving_fidelity.vllm_run(row, models, engine)
        err = abs(math.log(serving_fidelity.published_duration_s(row) / got["duration_s"]))
        errors[kind].append(err)
        if row["source"] == "sglang-vllm-0.6":
            third_lab.append(err)
    fitted, held = sorted(errors["fitted"]), sorted(errors["held-out"])
    assert len(fitted) == 10 and fitted[len(fitted) // 2] < math.log(1.10) and fitted[-1] < math.log(1.30)
    assert len(held) == 18 and held[len(held) // 2] < math.log(1.25) and held[-1] < math.log(1.40)
    assert len(third_lab) == 2 and max(third_lab) < math.log(1.25)


def test_published_latencies_at_a_poisson_rate_are_predicted():
    """The SGLang team's online runs (held out): ShareGPT requests at 4 and 8 a second to SGLang 0.3
    and vLLM 0.6 serving Llama 3.1 8B on an A100 and 70B on 4 H100s. Median TPOT and end-to-end
    latency, predicted against published: within 20% each, medians of |error| under 12%; median
    TTFT within 25% each and every one low (the HTTP front end and tokenization are not modelled),
    vLLM 0.6's included now that its multi-step scheduling is (a request waits out the 10-step
    decode run under way: 75% low without it)."""
    engine = load_engine("vllm")
    errs = {"tpot": [], "e2e": [], "ttft": []}
    for row in DATA["rate_latency"]:
        got = serving_fidelity.rate_run(row, DATA["models"], engine)
        assert got["ttft_median_ms"] < row["ttft_median_ms"]
        for key in errs:
            errs[key].append(abs(got[f"{key}_median_ms"] / row[f"{key}_median_ms"] - 1))
    assert len(errs["tpot"]) == 8 and len(errs["ttft"]) == 8
    for key, most, median_bound in (("tpot", 0.20, 0.12), ("e2e", 0.20, 0.12), ("ttft", 0.25, 0.20)):
        assert max(errs[key]) < most, key
        assert statistics.median(errs[key]) < median_bound, key


def test_tensorrt_llms_published_offline_throughput_is_reproduced():
    """TensorRT-LLM's A100 FP16 tables (v0.6.1 docs, tests/data/serving_runs.yaml; nothing fitted:
    engine tensorrt-llm runs at the device profile's rates): the simulator and the steady-state
    model the serving planner ranks layouts by. Measured: simulator median |error| 3.2%, steady
    state 4.2% (whose prompts are prefilled together up to the engine's 8192-token budget), each row
    within 10% but Llama-2 70B at 128/2048 and batch 240 (+59%, +64%: the one row far off, not
    understood; left out here and reported by the bench)."""
    rows = DATA["throughput"]
    outlier = [r for r in rows if r["model"] == "llama2-70b" and r["output"] == 2048]
    assert len(outlier) == 1
    for predict in (serving_fidelity.offline_throughput, serving_fidelity.steady_state_throughput):
        errs = [abs(math.log(predict(r) / r["tokens_per_s_gpu"])) for r in rows if r not in outlier]
        assert len(errs) == 10 and statistics.median(errs) < math.log(1.06) and max(errs) < math.log(1.11), predict


def test_tensorrt_llm_v0_9s_tables_held_out_are_predicted():
    """TensorRT-LLM v0.9.0's A100 FP16 tables (20 static batches of GPT-J 6B, Mistral 7B, Mixtral
    8x7B, Llama-2 7B and 70B; nothing fitted to them): simulator median |error| 7.6%, steady state
    6.7%; every row within 17% but four: Mistral's two long decodes +34% and +50% (its 8 KV heads:
    v0.9 ran its GQA decode kernel only where it helped, and which rows is not said), Mixtral's
    128/128 at batch 512 +28%, and its 2048/2048 at batch 32 -44% (published faster than reading
    its experts once a step at the A100's full HBM rate)."""
    rows = DATA["throughput_0_9"]
    far = {("mistral-7b", 128, 2048), ("mistral-7b", 2048, 2048), ("mixtral-8x7b", 128, 128), ("mixtral-8x7b", 2048, 2048)}
    for predict in (serving_fidelity.offline_throughput, serving_fidelity.steady_state_throughput):
        errs = {(r["model"], r["input"], r["output"]): abs(math.log(predict(r) / r["tokens_per_s_gpu"])) for r in rows}
        assert len(errs) == 20 and statistics.median(errs.values()) < math.log(1.10), predict
        assert max(e for k, e in errs.items() if k not in far) < math.log(1.17), predict


def test_only_a_row_faster_than_reading_its_weights_is_past_the_roofline():
    """The bench counts a published static batch only if a 16-bit run can reach it: each decode step
    reads every GPU's share of the weights it uses at least once. Of the 46 TensorRT-LLM rows only
    Mixtral's 2048/2048 at batch 32 (801 tok/s/GPU) is past it: its batch reaches every expert, 46.7 GB
    a GPU at tp 2 is 22.9 ms a step at the A100's nominal 2,039 GB/s, 701 tok/s/GPU at most."""
    rows = DATA["throughput"] + DATA["throughput_0_8"] + DATA["throughput_0_9"]
    past = [(r["model"], r["batch"], r["input"], r["output"]) for r in rows if serving_fidelity.past_roofline(r)]
    assert len(rows) == 47 and past == [("mixtral-8x7b", 32, 2048, 2048)]
    mixtral = next(r for r in rows if (r["model"], r["batch"], r["output"]) == ("mixtral-8x7b", 32, 2048))
    assert serving_fidelity.roofline_tokens_per_s_gpu(mixtral) == pytest.approx(16 / 22.9e-3, rel=0.01)
    # a batch of one reaches two experts of eight in each layer: far less is read, the bound far higher
    assert serving_fidelity.roofline_tokens_per_s_gpu(dict(mixtral, batch=1)) > 2.5 * 701 / 32


def test_tensorrt_llm_v0_8s_tables_held_out_are_predicted():
    """TensorRT-LLM v0.8.0's A100 FP16 tables (16 static batches of GPT-J 6B, Mistral 7B, Llama-2 7B
    and 70B; nothing fitted to them): median |error| 6.3%, every row within 15% but the long decodes
    of the grouped-query models (Mistral's 128/2048 +48% and 2048/2048 +32%, Llama-2 70B's 128/2048
    +33%): v0.8's GQA decode kernel was "experimental and not enabled by default", and its generic
    kernel reads a KV head once per query head, some of it from L2 (how much is not published)."""
    rows = DATA["throughput_0_8"]
    gqa_long = {("mistral-7b", 128, 2048), ("mistral-7b", 2048, 2048), ("llama2-70b", 128, 2048)}
    errs = {(r["model"], r["input"], r["output"]): math.log(serving_fidelity.offline_throughput(r) / r["tokens_per_s_gpu"])
            for r in rows}
    assert len(errs) == 16 and statistics.median(map(abs, errs.values())) < math.log(1.10)
    assert max(abs(e) for k, e in errs.items() if k not in gqa_long) < math.log(1.15)
    assert all(errs[k] > math.log(1.25) for k in gqa_long)  # optimistic: the kernel read less than it did


def test_cli_names_the_engine_and_refuses_an_unknown_one(tmp_path):
    out = paraplan("simulate", "--model", "llama3-8b", "--cluster", "h100-sxm:1", "--mode", "inference",
                   "--workload", "chat", "--rate", "5", "--requests", "200", "--engine", "tensorrt-llm")
    assert out.returncode == 0 and "engine tensorrt-llm" in out.stdout
    bad = paraplan("simulate", "--model", "llama3-8b", "--cluster", "h100-sxm:1", "--mode", "inference",
                   "--workload", "chat", "--rate", "5", "--engine", "sglang")
    assert bad.returncode == 2 and "--engine 'sglang'; use one of" in bad.stderr
    assert len(bad.stderr.strip().splitlines()) == 1 and "Traceback" not in bad.stderr


def test_a_plan_records_its_engine_and_the_engine_prices_it(tmp_path):
    """The steady-state planner under each engine: the plan says which priced it, and TensorRT-LLM
    (the profiles' rates) serves more than vLLM 0.11 on an H100."""
    from cli.main import main

    got = {}
    for engine in ("vllm", "tensorrt-llm"):
        target = tmp_path / f"{engine}.yaml"
        assert main(["plan", "--mode", "inference", "--model", "llama3-8b", "--cluster", "h100-sxm:1", "--prompt-len",
                     "512", "--output-len", "128", "--engine", engine, "-o", str(target)]) == 0
        plan = yaml.safe_load(target.read_text())
        assert plan["serving"]["engine"] == engine
        got[engine] = plan["predicted"]["throughput_tokens_per_s"]
    assert got["tensorrt-llm"] > 1.3 * got["vllm"]


def test_an_engines_own_all_reduce_prices_decodings_small_messages():
    """vLLM's custom all-reduce inside a node (the SGLang team's H100 measurements: ~9.5 us at
    4 KB and ~40 us at 1 MB on four GPUs) instead of NCCL's ring/tree latency; NCCL where it is
    faster (large prefill messages) and across nodes; an engine without one (tensorrt-llm's
    profile) keeps NCCL's."""
    from costmodel.collectives import all_reduce_s
    from costmodel.serving import tensor_all_reduce_s
    node = load_cluster("h100-sxm:8")
    vllm, trt = engine_cluster(node, "vllm"), engine_cluster(node, "tensorrt-llm")
    nccl_small = all_reduce_s(4096, node.group(4, 1))
    assert tensor_all_reduce_s(4096, vllm, 4) == pytest.approx(9.55e-6 + 4096 / 32.7e9, rel=1e-6)
    assert tensor_all_reduce_s(4096, vllm, 4) < nccl_small / 2
    assert tensor_all_reduce_s(2**20, vllm, 4) == pytest.approx(40.2e-6, rel=0.1)  # published 0.0402 ms
    assert tensor_all_reduce_s(4096, trt, 4) == pytest.approx(nccl_small)
    big = 64 * 2**20  # a prefill chunk's activations: NCCL's bandwidth wins
    assert tensor_all_reduce_s(big, vllm, 4) == pytest.approx(all_reduce_s(big, node.group(4, 1)))
    six = engine_cluster(load_cluster("h100-sxm:6"), "vllm")  # a degree not listed: the next one's figures
    assert tensor_all_reduce_s(4096, six, 6) == pytest.approx(tensor_all_reduce_s(4096, vllm, 8))
    two_nodes = engine_cluster(load_cluster("h100-sxm:16"), "vllm")
    assert tensor_all_reduce_s(4096, two_nodes, 16) == pytest.approx(all_reduce_s(4096, two_nodes.group(16, 1)))
    with pytest.raises(ConfigError, match="custom_all_reduce must map"):
        ServingEngine(name="x", custom_all_reduce={"hopper": {1: [5.0, 30.0]}})
    with pytest.raises(ConfigError, match="custom_all_reduce must map"):
        ServingEngine(name="x", custom_all_reduce={"hopper": {4: [5.0, 0]}})
