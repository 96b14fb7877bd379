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
    runs); GPUStack's Qwen3-32B rows (other weights, a KV cache a fifth as large) and a third lab's
    runs (the SGLang team's vLLM 0.6: Llama 3.1 8B on an A100, 70B on 4 H100s) are held out.
    Measured: fitted rows median 6.5%, worst 23% (the two labs' H100s disagree by ~25%); held out
    median 19.9%, worst 27.8% (GPUStack's A100 32K); the third lab's two runs -5.0% and -17.4%."""
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
    assert len(held) == 10 and held[len(held) // 2] < math.log(1.25) and held[-1] < math.log(1.40)
    assert len(third_lab) == 2 and max(third_lab) < math.log(1.25)


def test_published_latencies_at_a_poisson_rate_are_predicted():
    """The SGLang team's online runs (held out): ShareGPT requests at 4 and 8 a second to SGLang 0.3
    and vLLM 0.6 serving Llama 3.1 8B on an A100 and 70B on 4 H100s. Median TPOT and end-to-end
    latency, predicted against published: measured within 20% each, medians of |error| 8-10%;
    median TTFT of the SGLang rows within 17%, 10-17% low (vLLM 0.6's multi-step TTFT is not
    modelled)."""
    engine = load_engine("vllm")
    errs = {"tpot": [], "e2e": [], "ttft": []}
    for row in DATA["rate_latency"]:
        got = serving_fidelity.rate_run(row, DATA["models"], engine)
        for key in errs:
            if key != "ttft" or row["engine"].startswith("sglang"):
                errs[key].append(abs(math.log(got[f"{key}_median_ms"] / row[f"{key}_median_ms"])))
    assert len(errs["tpot"]) == 8 and len(errs["ttft"]) == 4
    for key, median_bound in (("tpot", 1.12), ("e2e", 1.12), ("ttft", 1.20)):
        assert max(errs[key]) < math.log(1.25), key
        assert statistics.median(errs[key]) < math.log(median_bound), key


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
