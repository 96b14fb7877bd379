"""Serving: the traffic simulator against published engine runs.

    python bench/serving_fidelity.py [--fit] [--skip-cpu] [--measure | --profile PROFILE]

Rows: tests/data/serving_runs.yaml (TensorRT-LLM's published A100 FP16 runs: offline throughput
of a static batch at fixed prompt and output lengths, and the first-token latency of one
request; sources and readings in the file). Each throughput run is simulated as it ran: all
requests at time 0, at most `batch` sequences in an iteration, whole prompts (no chunking: the
engine's context phase runs the batch's prompts together), on the a100-80g profile; throughput
is output tokens per second per GPU. First-token rows are one request's TTFT. The device profile
is the one the training side uses; one figure of the tensorrt-llm engine profile is fitted
(--fit) to the v0.6.1 table, the share of the fp32 peak its per-query-head decode kernel reaches
(each release run with the query-head ratios its XQA kernel covered: TRT_GROUPED_RATIOS); v0.8's
and v0.9's tables are held out. Prints each row, then the median and 90th percentile of |error|
per kind.

Then vLLM (engine profile `vllm`): three labs' runs at request rate inf (GPUStack's vLLM 0.11,
Lambda's and the SGLang team's vLLM 0.6), each simulated with its engine arguments; the profile's
shares are fitted (`--fit`) to GPUStack's Qwen3-14B rows and Lambda's, the rest held out. Then
latency at a Poisson rate (the SGLang team's online runs) and at a concurrency limit (GPUStack's
four-in-flight runs), held out.

Then, measured here: `runtime.serve` (continuous batching, paged KV cache, prefix caching) serves
three small workloads on this CPU (one thread, fp32, a 4-layer Llama of 512 wide) and the
simulator predicts the same requests on a CPU profile (--measure: this machine measured first
with `paraplan profile --quick`; --profile PROFILE: one measured before; neither: the shipped
cpu-2core, which a VM's day-to-day drift leaves far off): p50/p90 TTFT and TPOT, predicted /
measured. Run it on an otherwise idle machine.
"""

from __future__ import annotations

import statistics
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import dataclasses  # noqa: E402
import math  # noqa: E402
import re  # noqa: E402

import numpy as np  # noqa: E402

from costmodel.cluster import load_cluster  # noqa: E402
from costmodel.serving import ServingRequest, evaluate  # noqa: E402
from costmodel.serving_engine import ServingEngine, engine_cluster, load_engine, vllm_scheduler_defaults  # noqa: E402
from costmodel.spec import Activation, ModelSpec  # noqa: E402
from costmodel.traffic import SchedulerConfig, ServingLayout, latency_percentiles, simulate_traffic  # noqa: E402
from costmodel.spec import llama_spec  # noqa: E402
from costmodel.workload import LengthDist, Request, Scenario, generate  # noqa: E402
from planner.zoo import ZOO  # noqa: E402

DATA = ROOT / "tests" / "data" / "serving_runs.yaml"
# GPT-J 6B as its config (EleutherAI/gpt-j-6b): the benchmark ran 2048 + 2048 tokens, past its 2048 positions
GPT_J = ModelSpec(name="gpt-j-6b", layers=28, hidden=4096, heads=16, ffn_hidden=16384, vocab=50400, seq_len=4096,
                  activation=Activation.GELU, tied_embeddings=False)


# Mistral 7B v0.1 as its config (mistralai/Mistral-7B-v0.1): Llama's shape with 8 KV heads and a 4,096-token
# sliding window (no row here reaches past it)
MISTRAL_7B = dataclasses.replace(
    llama_spec("mistral-7b", layers=32, hidden=4096, heads=32, kv_heads=8, ffn_hidden=14336, vocab=32000, seq_len=8192),
    attention_window=4096)


def spec_of(name: str) -> ModelSpec:
    return {GPT_J.name: GPT_J, MISTRAL_7B.name: MISTRAL_7B}.get(name) or ZOO[name]


# The query heads per KV head each TensorRT-LLM release decoded with its grouped tensor-core kernel
# (XQA); every other ratio ran the masked multi-head attention kernel, one thread block per query
# head on CUDA cores (the engine profile's decode_fp32_share). v0.5 and v0.6.1 had no XQA; v0.8's
# was "experimental and not enabled by default" (its docs); v0.9's was on by default, its
# precompiled kernels built for 8 query heads per KV head only (decoderXQAImplPrecompiled's
# sXqaKernelMetaInfo: fp16, head size 128, beam 1, nqpkv 8), picked where batch x KV heads x 4
# >= the SMs (mayHavePerfGain: every row here). So: releases before 0.9, none; 0.9, 8 only; later
# ones as the shipped profile says, today's release: a grouped kernel for every ratio (assumed for
# 0.10 on; the releases between are not checked here).
TRT_GROUPED_RATIOS = (((0, 9), ()), ((0, 10), (8,)))  # (releases before, ratios): later ones, the profile's
TRT_FIT_SOURCE = "trtllm-0.6.1"  # the table the per-head kernel's fp32 share is fitted to (--fit)


def trt_engine(row: dict, base: ServingEngine | None = None) -> ServingEngine:
    """The tensorrt-llm engine profile as the row's release ran it (its source "trtllm-X.Y[.Z]";
    TRT_GROUPED_RATIOS), or as shipped where the source names no release."""
    base = base or load_engine("tensorrt-llm")
    release = re.fullmatch(r"trtllm-(\d+)\.(\d+)(?:\.\d+)?", row["source"])
    if not release:
        return base
    version = (int(release[1]), int(release[2]))
    ratios = next((r for before, r in TRT_GROUPED_RATIOS if version < before), base.grouped_decode_ratios)
    return dataclasses.replace(base, grouped_decode_ratios=ratios)


def offline_throughput(row: dict, base: ServingEngine | None = None) -> float:
    """Output tokens per second per GPU of the static batch."""
    spec = spec_of(row["model"])
    cluster = load_cluster(f"{row['gpu']}:{row['tp']}")
    reqs = [Request(id=i, arrival_s=0.0, prompt_tokens=row["input"], output_tokens=row["output"])
            for i in range(row["batch"])]
    cfg = SchedulerConfig(max_num_seqs=row["batch"], chunked_prefill=False,
                          max_num_batched_tokens=row["batch"] * row["input"], prefix_caching=False,
                          engine="tensorrt-llm")
    r = simulate_traffic(spec, cluster, reqs, ServingLayout(tp=row["tp"], precision="fp16"), cfg,
                         engine=trt_engine(row, base))
    return r.throughput_tokens_per_s / row["tp"]


def fit_trt(rows: list[dict], base: ServingEngine) -> ServingEngine:
    """The share of the A100's fp32 peak TensorRT-LLM's per-query-head decode kernel reaches,
    fitted to the throughput rows of TRT_FIT_SOURCE.

    Formulation: s = argmin over [0.02, 1] of the sum over the rows r of log(T_pred(s) / T_r)^2;
    a golden-section search on log s (the loss is unimodal in s: a row's predicted decode time
    falls monotonically as s rises, until the kernel is memory-bound and s no longer matters)."""
    mine = [r for r in rows if r["source"] == TRT_FIT_SOURCE and not past_roofline(r)]

    def loss(log_s: float) -> float:
        eng = dataclasses.replace(base, decode_fp32_share={"ampere": math.exp(log_s)})
        return sum(math.log(offline_throughput(r, eng) / r["tokens_per_s_gpu"]) ** 2 for r in mine)

    lo, hi, golden = math.log(0.02), 0.0, (math.sqrt(5) - 1) / 2
    for _ in range(30):
        a, b = hi - golden * (hi - lo), lo + golden * (hi - lo)
        lo, hi = (lo, b) if loss(a) < loss(b) else (a, hi)
    share = round(math.exp((lo + hi) / 2), 4)
    print(f"  ampere: decode_fp32_share {share} (fitted to {len(mine)} rows of {TRT_FIT_SOURCE}; "
          f"loss {loss(math.log(share)):.4f})")
    return dataclasses.replace(base, decode_fp32_share={"ampere": share})


def roofline_tokens_per_s_gpu(row: dict) -> float:
    """The most output tokens a second a GPU of the row's static batch can give in 16 bits: every
    decode step reads each GPU's share of the weights once at the HBM's full nominal rate (a mixture
    of experts: the experts the batch's tokens are expected to reach, each token choosing k of E
    uniformly), nothing else (no prefill, no KV cache, no compute). A published row above it did not
    run as its table states."""
    spec = spec_of(row["model"])
    weights = spec.blocks_params + spec.vocab * spec.hidden  # the blocks and the output projection
    if spec.moe:  # experts no token of the batch reaches are not read
        reached = 1 - (1 - spec.experts_per_token / spec.experts) ** row["batch"]
        weights -= spec.moe_layers * spec.experts * spec.expert_params * (1 - reached)
    step_s = 2 * weights / row["tp"] / (load_cluster(f"{row['gpu']}:1").device.hbm_gb_per_s * 1e9)
    return row["batch"] / step_s / row["tp"]


def past_roofline(row: dict) -> bool:
    return "batch" in row and row["tokens_per_s_gpu"] > roofline_tokens_per_s_gpu(row)


def steady_state_throughput(row: dict, base: ServingEngine | None = None) -> float:
    """The steady-state model's (costmodel.serving.evaluate: what `paraplan plan --mode inference`
    ranks layouts by) output tokens per second per GPU at the row's batch, lengths and tp."""
    req = ServingRequest(prompt_len=row["input"], output_len=row["output"], batch=row["batch"], precision="fp16",
                         engine="tensorrt-llm")
    cluster = engine_cluster(load_cluster(f"{row['gpu']}:{row['tp']}"), trt_engine(row, base))
    point = evaluate(spec_of(row["model"]), cluster, req, row["tp"], 1, row["batch"])
    return point.throughput_tokens_per_s / row["tp"]


def first_token_ms(row: dict) -> float:
    spec = spec_of(row["model"])
    cluster = load_cluster(f"{row['gpu']}:{row['tp']}")
    r = simulate_traffic(spec, cluster, [Request(id=0, arrival_s=0.0, prompt_tokens=row["input"], output_tokens=1)],
                         ServingLayout(tp=row["tp"], precision="fp16"),
                         SchedulerConfig(prefix_caching=False, engine="tensorrt-llm"))
    return float(r.ttft_s[0]) * 1e3


def summary(errors: list[float], optimistic_sign: int = 1) -> str:
    """Median and 90th percentile of |error|; `optimistic_sign` +1 where more is better (throughput),
    -1 where less is (latency)."""
    a = sorted(abs(e) for e in errors)
    p90 = a[min(len(a) - 1, round(0.9 * (len(a) - 1)))]
    optimistic = sum(e * optimistic_sign > 0 for e in errors)
    return f"median |error| {statistics.median(a):.1f}%, p90 {p90:.1f}%, {optimistic} of {len(a)} optimistic"


CPU_MODEL = llama_spec("bench-llama", layers=4, hidden=512, heads=8, kv_heads=2, ffn_hidden=1408, vocab=2048,
                       seq_len=1024)
CPU_WORKLOADS = (  # scaled to a CPU: (scenario, requests per second), 30 requests each
    (Scenario(name="chat", prompt=LengthDist(median=64, sigma=0.5), output=LengthDist(median=24, sigma=0.5)), 6.0),
    (Scenario(name="long-context", prompt=LengthDist(median=512, sigma=0.2), output=LengthDist(median=8, sigma=0.3)),
     2.0),
    (Scenario(name="agent", prompt=LengthDist(median=32, sigma=0.5), output=LengthDist(median=16, sigma=0.5),
              shared_prefix_tokens=256), 6.0),
)


def cpu_runs(profile: str = "cpu-2core") -> None:
    import torch

    from runtime.generate import load_model
    from runtime.serve import serve

    torch.set_num_threads(1)
    model, cluster = load_model(CPU_MODEL), load_cluster(f"{profile}:1")
    print(f"continuous batching on this CPU ({CPU_MODEL.name}, fp32, one thread) against the simulator on {profile}, "
          "ms predicted / measured")
    errors = []
    for scenario, rate in CPU_WORKLOADS:
        reqs = generate(scenario, rate=rate, requests=30, context=CPU_MODEL.seq_len, seed=0)
        got = serve(model, reqs, SchedulerConfig(), blocks=2048)
        pred = simulate_traffic(CPU_MODEL, cluster, reqs, ServingLayout(precision="fp32"),
                                SchedulerConfig(num_gpu_blocks_override=2048))
        measured = latency_percentiles(got.ttft_s, got.tpot_s, got.e2e_s, [len(t) for t in got.texts])
        cells = []
        for key in ("ttft", "tpot"):
            for p in (50, 90):
                m, q = measured[f"{key}_p{p}_s"] * 1e3, pred.metrics()[f"{key}_p{p}_s"] * 1e3
                errors.append(100 * (q / m - 1))
                cells.append(f"{key.upper()} p{p} {q:7.1f} / {m:7.1f} ({errors[-1]:+.0f}%)")
        print(f"  {scenario.name:12s} at {rate:g}/s: " + "; ".join(cells))
    print(f"  {summary(errors, optimistic_sign=-1)}")


def compare(title: str, rows: list[dict], predict, published: str, label, optimistic_sign: int) -> list[float]:
    """Print each row's predicted / published value and error, then the summary; the errors (%) of
    the rows a 16-bit run can reach (a throughput above roofline_tokens_per_s_gpu is printed, not
    counted)."""
    print(title)
    errors = []
    for row in rows:
        pred = predict(row)
        err = 100 * (pred / row[published] - 1)
        beyond = past_roofline(row)
        if not beyond:
            errors.append(err)
        print(f"  {row['model']:12s} {row['gpu']} tp{row['tp']} {label(row)} {pred:8.1f} / {row[published]:6g}  "
              f"{err:+6.1f}%  ({row['source']})"
              + (f"  left out: past the HBM roofline ({roofline_tokens_per_s_gpu(row):.0f})" if beyond else ""))
    print(f"  {summary(errors, optimistic_sign)}")
    return errors


# --- vLLM under a burst: GPUStack's vLLM 0.11 runs and Lambda's and the SGLang team's vLLM 0.6 runs ---
# (tests/data/serving_runs.yaml, vllm_offline and vllm_0_6). The vLLM profile's shares are fitted to two labs'
# rows: GPUStack's Qwen3-14B runs and Lambda's; GPUStack's Qwen3-32B runs and the SGLang team's runs (another
# lab, its own H100s and A100) are held out.
FIT_MODEL = "qwen3-14b"
FIT_SOURCES = ("lambda-vllm-0.6",)  # whole sources the shares are fitted to, besides GPUStack's FIT_MODEL rows
HOST_BOUND_INPUT = 128  # 128-token prompts, 4 tokens out: the API server's per-request work bounds these


QWEN3_EXTRA = ("head_dim", "experts", "experts_per_token", "expert_ffn_hidden")  # beyond llama_spec's fields


def qwen3_spec(name: str, fields: dict) -> ModelSpec:
    spec = llama_spec(name, **{k: v for k, v in fields.items() if k not in QWEN3_EXTRA})
    extra = {k: fields[k] for k in QWEN3_EXTRA[1:] if k in fields}
    return dataclasses.replace(spec, head_dim=fields["head_dim"], v_head_dim=fields["head_dim"], **extra)


def sharegpt_lengths(requests: int, mean_prompt: float, mean_output: float, seed: int = 0) -> tuple[np.ndarray, ...]:
    """Prompt and output lengths with the published means: log-normal of spread 1.0 (the chat
    scenario's), kept as vLLM's ShareGPT sampler keeps them (each >= 4, prompt <= 1024, prompt +
    output <= 2048), the medians scaled until the kept lengths' means are the published ones."""
    def draw(med_p: float, med_o: float) -> tuple[np.ndarray, np.ndarray]:
        rng = np.random.default_rng(seed)
        p = np.maximum(4, np.round(np.exp(rng.normal(math.log(med_p), 1.0, 4 * requests))))
        o = np.maximum(4, np.round(np.exp(rng.normal(math.log(med_o), 1.0, 4 * requests))))
        keep = (p <= 1024) & (p + o <= 2048)
        return p[keep][:requests].astype(int), o[keep][:requests].astype(int)
    mp, mo = mean_prompt, mean_output
    for _ in range(30):
        p, o = draw(mp, mo)
        mp, mo = mp * mean_prompt / p.mean(), mo * mean_output / o.mean()
    return draw(mp, mo)


def vllm_requests(row: dict, arrivals_s: np.ndarray | None = None) -> list[Request]:
    n = row["requests"]
    if row["dataset"] == "sharegpt":
        prompts, outputs = sharegpt_lengths(n, row["input_tokens"] / n, row["output_tokens"] / n)
    else:  # the outputs the run produced: a request stops at its end-of-sequence token before its length
        q, r = divmod(min(row["output_tokens"], n * row["output"]), n)
        prompts, outputs = np.full(n, row["input"]), np.array([q + 1] * r + [q] * (n - r))
    arrivals_s = np.zeros(n) if arrivals_s is None else arrivals_s
    return [Request(id=i, arrival_s=float(a), prompt_tokens=int(p), output_tokens=int(o))
            for i, (a, p, o) in enumerate(zip(arrivals_s, prompts, outputs))]


def published_duration_s(row: dict) -> float:
    """The run's length: as published, or its output tokens over its published output throughput."""
    return row["duration_s"] if "duration_s" in row else row["output_tokens"] / row["output_tokens_per_s"]


def row_spec(row: dict, models: dict) -> ModelSpec:
    return qwen3_spec(row["model"], models[row["model"]]) if row["model"] in models else ZOO[row["model"]]


def row_scheduler(row: dict, engine: str) -> SchedulerConfig:
    """The engine arguments the run had: vLLM 0.11's defaults for its GPU (chunked prefill and prefix
    caching on; 8192 tokens and 1024 sequences on a GPU of >= 70 GiB that is not an A100, 2048 and 256
    otherwise), or the row's own (vLLM 0.6: whole prompts, no prefix caching)."""
    if "max_num_seqs" in row:
        return SchedulerConfig(max_num_seqs=row["max_num_seqs"], max_num_batched_tokens=row["max_num_batched_tokens"],
                               chunked_prefill=False, prefix_caching=False, engine=engine,
                               num_scheduler_steps=row.get("num_scheduler_steps", 1))
    seqs, tokens = vllm_scheduler_defaults(load_cluster(f"{row['gpu']}:1").device)
    return SchedulerConfig(max_num_batched_tokens=tokens, max_num_seqs=seqs, engine=engine)


def vllm_run(row: dict, models: dict, engine: ServingEngine, arrivals_s: np.ndarray | None = None) -> dict:
    """The run as vLLM ran it, with its engine arguments (and the client's concurrency limit, where it
    had one): (duration s, median TTFT, TPOT and end-to-end latency ms)."""
    tp = row.get("tp", 1)
    r = simulate_traffic(row_spec(row, models), load_cluster(f"{row['gpu']}:{tp}"), vllm_requests(row, arrivals_s),
                         ServingLayout(precision=row.get("precision", "bf16"), tp=tp), row_scheduler(row, engine.name),
                         engine=engine,
                         concurrency=row.get("concurrency"))
    m = r.metrics()
    return {"duration_s": r.duration_s, "ttft_median_ms": m["ttft_p50_s"] * 1e3, "tpot_median_ms": m["tpot_p50_s"] * 1e3,
            "e2e_median_ms": m["e2e_p50_s"] * 1e3}


def vllm_rows(data: dict) -> list[dict]:
    return data["vllm_offline"] + data["vllm_moe"] + data["vllm_0_6"]


def row_kind(row: dict) -> str:
    if row.get("input") == HOST_BOUND_INPUT:
        return "host-bound"
    fitted = row["source"] in FIT_SOURCES or (row["source"].startswith("gpustack") and row["model"] == FIT_MODEL)
    return "fitted" if fitted else "held-out"


def fit_vllm(rows: list[dict], models: dict, base: ServingEngine) -> ServingEngine:
    """The compute and memory shares per architecture that fit the fit rows' durations and
    median TPOTs, each lab weighing as much as the other.

    Formulation: per architecture a, (c_a, m_a) = argmin over [0.2, 1]^2 of the sum over the fit
    sources s with rows on a of (1 / n_s,a) x the sum over those rows r of log(D_pred(c, m) / D_r)^2
    + log(TPOT_pred(c, m) / TPOT_r)^2 (the TPOT term where the row publishes one); searched on a
    5 x 5 grid around (0.6, 0.6) of step 0.2, refined twice around the best (steps 0.05, 0.0125)."""
    compute, memory = {}, {}
    for arch, gpu in (("hopper", "h100-sxm"), ("ampere", "a100-80g")):
        mine = [r for r in rows if r["gpu"] == gpu and row_kind(r) == "fitted"]
        per_source = {r["source"]: sum(x["source"] == r["source"] for x in mine) for r in mine}

        def loss(c: float, m: float) -> float:
            eng = dataclasses.replace(base, compute_sustained={arch: c}, memory_sustained={arch: m})
            total = 0.0
            for row in mine:
                got = vllm_run(row, models, eng)
                term = math.log(got["duration_s"] / published_duration_s(row)) ** 2
                if "tpot_median_ms" in row:
                    term += math.log(got["tpot_median_ms"] / row["tpot_median_ms"]) ** 2
                total += term / per_source[row["source"]]
            return total

        best, step = (0.6, 0.6), 0.2
        for _ in range(3):
            grid = {(round(min(1.0, max(0.2, best[0] + i * step)), 4), round(min(1.0, max(0.2, best[1] + j * step)), 4))
                    for i in (-2, -1, 0, 1, 2) for j in (-2, -1, 0, 1, 2)}
            best = min(sorted(grid), key=lambda cm: loss(*cm))
            step /= 4
        compute[arch], memory[arch] = best
        print(f"  {arch}: compute_sustained {best[0]:.3f}, memory_sustained {best[1]:.3f} (fitted to {len(mine)} rows "
              f"of {', '.join(sorted(per_source))}; loss {loss(*best):.4f})")
    return dataclasses.replace(base, compute_sustained=compute, memory_sustained=memory)


def vllm_fidelity(data: dict, engine: ServingEngine) -> list[float]:
    models = data["models"]
    print(f"vLLM under a burst (rate inf), engine profile {engine.name}: duration s, median TPOT ms, "
          "predicted / published; * = a row the profile was fitted to")
    errors: dict[str, list[float]] = {"held-out": [], "fitted": [], "host-bound": []}
    by_source: dict[str, list[float]] = {}
    for row in vllm_rows(data):
        got = vllm_run(row, models, engine)
        duration = published_duration_s(row)
        tput = 100 * (duration / got["duration_s"] - 1)  # throughput error: more is optimistic
        kind = row_kind(row)
        errors[kind].append(tput)
        if kind == "held-out":
            moe = "experts" in models.get(row["model"], {})
            by_source.setdefault(f"{row['source']}{' (mixture of experts)' if moe else ''}", []).append(tput)
        shape = "sharegpt" if row["dataset"] == "sharegpt" else f"{row['input']}/{row['output']}"
        tpot = (f"{got['tpot_median_ms']:7.1f} / {row['tpot_median_ms']:7.1f} ms "
                f"({100 * (got['tpot_median_ms'] / row['tpot_median_ms'] - 1):+6.1f}%)") if "tpot_median_ms" in row else ""
        print(f"  {'*' if kind == 'fitted' else ' '} {row['source']:18s} {row['model']:15s} {row['gpu']:9s} "
              f"tp{row.get('tp', 1)} {shape:9s} x{row['requests']:<5d} {got['duration_s']:8.1f} / {duration:8.1f} s "
              f"(throughput {tput:+6.1f}%)   TPOT {tpot}")
    for kind, errs in errors.items():
        if errs:
            print(f"  offline throughput, {kind} rows: {summary(errs, optimistic_sign=1)}")
    for source, errs in by_source.items():
        print(f"    held out, {source}: {summary(errs, optimistic_sign=1)}")
    return errors["held-out"]


def quantized_fidelity(data: dict, engine: ServingEngine) -> None:
    """vLLM serving quantized weights (gpt-oss-20b's MXFP4 experts): outside the 16-bit target,
    shown apart, nothing fitted to them."""
    print("vLLM with MXFP4 experts (outside the 16-bit target; held out): duration s, median TPOT ms, predicted / published")
    errs = []
    for row in data["vllm_mxfp4"]:
        got = vllm_run(row, data["models"], engine)
        duration = published_duration_s(row)
        errs.append(100 * (duration / got["duration_s"] - 1))
        shape = "sharegpt" if row["dataset"] == "sharegpt" else f"{row['input']}/{row['output']}"
        print(f"    {row['source']:18s} {row['model']:15s} {row['gpu']:9s} {shape:9s} x{row['requests']:<5d} "
              f"{got['duration_s']:8.1f} / {duration:8.1f} s (throughput {errs[-1]:+6.1f}%)   TPOT "
              f"{got['tpot_median_ms']:7.1f} / {row['tpot_median_ms']:7.1f} ms")
    print(f"  offline throughput, MXFP4 rows: {summary(errs, optimistic_sign=1)}")


SHAREGPT_MEANS = (221.5, 194.3)  # prompt and output tokens a request (vllm_0_6's note in the data file)


def rate_run(row: dict, models: dict, engine: ServingEngine) -> dict:
    """A rate_latency row as it ran: Poisson arrivals at its rate (seed 0), ShareGPT lengths of the
    means above, vLLM 0.6's scheduler (whole prompts, 256 sequences, 4096 tokens) or SGLang's
    (chunked prefill)."""
    n = row["requests"]
    run = dict(row, dataset="sharegpt", input_tokens=round(SHAREGPT_MEANS[0] * n),
               output_tokens=round(SHAREGPT_MEANS[1] * n))
    if row["engine"].startswith("vllm"):
        run.update(max_num_seqs=256, max_num_batched_tokens=4096, num_scheduler_steps=10)
    times = np.cumsum(np.random.default_rng(0).exponential(1.0 / row["rate"], n))
    return vllm_run(run, models, engine, arrivals_s=times)


def rate_fidelity(data: dict, engine: ServingEngine) -> None:
    """Latency at a Poisson rate (the SGLang team's runs, held out): medians predicted / published.
    Both engines are priced with the vLLM profile (SGLang 0.3's offline throughput is within 4% of
    vLLM 0.6's in the same runs) and each run's scheduler: vLLM 0.6 whole prompts and 10-step
    decode runs, SGLang chunked."""
    print(f"latency at a Poisson rate (ShareGPT, medians in ms; engine profile {engine.name}): predicted / published, "
          "held out")
    errors: dict[str, list[float]] = {"tpot": [], "e2e": [], "ttft": []}
    for row in data["rate_latency"]:
        got = rate_run(row, data["models"], engine)
        cells = []
        for key in ("ttft", "tpot", "e2e"):
            err = 100 * (got[f"{key}_median_ms"] / row[f"{key}_median_ms"] - 1)
            errors[key].append(err)
            cells.append(f"{key.upper()} {got[f'{key}_median_ms']:7.1f} / {row[f'{key}_median_ms']:7.1f} ({err:+5.1f}%)")
        print(f"  {row['engine']:12s} {row['model']:10s} {row['gpu']:9s} tp{row['tp']} {row['rate']:g}/s   "
              + "   ".join(cells))
    for key, errs in errors.items():
        print(f"  median {key.upper()}: {summary(errs, optimistic_sign=-1)}")


def concurrency_fidelity(data: dict) -> None:
    """Latency under a closed loop: four users, each sending its next request when the last ends."""
    print("latency at a concurrency limit (GPUStack, Qwen3-8B, H100, ShareGPT x100, 4 in flight): predicted / "
          "published, held out")
    for row in data["vllm_concurrency"]:
        got = vllm_run(row, data["models"], load_engine(row["engine"]))
        cells = [f"{key} {got[key]:8.2f} / {row[key]:8.2f} ({100 * (got[key] / row[key] - 1):+5.1f}%)"
                 for key in ("duration_s", "ttft_median_ms", "tpot_median_ms")]
        print(f"  {row['engine']:12s} " + "   ".join(cells))


def main() -> int:
    data = yaml.safe_load(DATA.read_text())
    batch = lambda r: f"batch {r['batch']:5d} {r['input']:5d}/{r['output']:<5d}"  # noqa: E731
    trt_base = load_engine("tensorrt-llm")
    if "--fit" in sys.argv:
        print(f"fitting the tensorrt-llm profile's per-head decode kernel to {TRT_FIT_SOURCE}'s rows")
        trt_base = fit_trt(data["throughput"], trt_base)
    offline = lambda r: offline_throughput(r, trt_base)  # noqa: E731
    fitted = compare(f"offline throughput, output tokens/s per GPU (predicted / published; {TRT_FIT_SOURCE}: the "
                     "per-head decode kernel's share fitted to these)", data["throughput"], offline,
                     "tokens_per_s_gpu", batch, optimistic_sign=1)
    steady = lambda r: steady_state_throughput(r, trt_base)  # noqa: E731
    compare("the same, by the steady-state model (planner's ranking)", data["throughput"], steady,
            "tokens_per_s_gpu", batch, optimistic_sign=1)
    compare("first-token latency of one request, ms (predicted / published)", data["first_token"], first_token_ms,
            "ttft_ms", lambda r: f"prompt {r['input']:5d}", optimistic_sign=-1)
    trt = compare("TensorRT-LLM v0.8.0's A100 FP16 tables, held out: offline throughput, output tokens/s per GPU",
                  data["throughput_0_8"], offline, "tokens_per_s_gpu", batch, optimistic_sign=1)
    compare("TensorRT-LLM v0.8.0, first-token latency of one request, ms", data["first_token_0_8"], first_token_ms,
            "ttft_ms", lambda r: f"prompt {r['input']:5d}", optimistic_sign=-1)
    trt += compare("TensorRT-LLM v0.9.0's A100 FP16 tables, held out: offline throughput, output tokens/s per GPU",
                   data["throughput_0_9"], offline, "tokens_per_s_gpu", batch, optimistic_sign=1)
    compare("the same, by the steady-state model", data["throughput_0_9"], steady, "tokens_per_s_gpu",
            batch, optimistic_sign=1)
    compare("TensorRT-LLM v0.9.0, first-token latency of one request, ms", data["first_token_0_9"], first_token_ms,
            "ttft_ms", lambda r: f"prompt {r['input']:5d}", optimistic_sign=-1)
    if "--fit" in sys.argv:
        print("fitting the vLLM profile's shares to GPUStack's Qwen3-14B rows and Lambda's rows")
        engine = fit_vllm(vllm_rows(data), data["models"], load_engine("vllm"))
    else:
        engine = load_engine("vllm")
    held = vllm_fidelity(data, engine)
    print(f"offline throughput of every published run held out (TensorRT-LLM's {len(trt)}, vLLM's {len(held)}): "
          f"{summary(trt + held, optimistic_sign=1)}")
    print(f"  and with TensorRT-LLM's {len(fitted)} fitted rows: {summary(fitted + trt + held, optimistic_sign=1)}")
    quantized_fidelity(data, engine)
    rate_fidelity(data, engine)
    concurrency_fidelity(data)
    if "--skip-cpu" in sys.argv:
        return 0
    if "--profile" in sys.argv:
        cpu_runs(sys.argv[sys.argv.index("--profile") + 1])
    elif "--measure" in sys.argv:  # this machine measured now: the simulator against the same day's host
        import tempfile

        from runtime.profiler import profile as measure

        with tempfile.TemporaryDirectory() as tmp:
            host = Path(tmp) / "host.yaml"
            print("measuring this machine (paraplan profile --quick) for the CPU runs", flush=True)
            measure(host, quick=True)
            cpu_runs(str(host))
    else:
        print("note: the CPU runs below are priced on the shipped cpu-2core profile, not this machine measured "
              "today (a VM's speed drifts): their errors say how far this machine is from that profile; add "
              "--measure (or --profile host.yaml) for the simulator's own error")
        cpu_runs("cpu-2core")
    return 0


if __name__ == "__main__":
    sys.exit(main())
