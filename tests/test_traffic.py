"""Serving under traffic (costmodel.workload, costmodel.traffic): the workloads are what they
say, and the scheduler behaves as continuous batching must: one prefill at a low rate,
unbounded queues past capacity, chunked prefill and disaggregation shielding decodes from
long prompts, prefix caching skipping exactly the hit tokens, preemption when blocks run out."""

import json
import math
import re
from dataclasses import replace

import numpy as np
import pytest

from costmodel import ConfigError, load_cluster
from costmodel.serving import ServingRequest, decode_step_s, prefill_s
from costmodel.spec import llama_spec
from costmodel.traffic import SLO, IterationCost, SchedulerConfig, ServingLayout, simulate_traffic
from costmodel.workload import SCENARIOS, Request, arrivals, generate, load_trace, workload
from planner.zoo import ZOO

SPEC = ZOO["llama3-8b"]
CLUSTER = load_cluster("h100-sxm:8")


def _long_prompts(n: int, rate: float, seed: int = 0) -> list[Request]:
    """Prompts of 2,000-7,000 tokens, outputs of 100-400: prefills long enough to stall decodes."""
    rng = np.random.default_rng(seed)
    t, out = 0.0, []
    for i in range(n):
        t += rng.exponential(1 / rate)
        out.append(Request(id=i, arrival_s=t, prompt_tokens=int(rng.integers(2000, 7000)),
                           output_tokens=int(rng.integers(100, 400))))
    return out


def test_chat_lengths_have_sharegpts_means_and_arrivals_their_rate():
    reqs = generate("chat", rate=10, requests=20000, context=SPEC.seq_len, seed=0)
    prompts = np.array([r.prompt_tokens for r in reqs])
    outputs = np.array([r.output_tokens for r in reqs])
    assert prompts.mean() == pytest.approx(161, rel=0.06)  # ShareGPT, vLLM paper Fig. 11
    assert outputs.mean() == pytest.approx(338, rel=0.06)
    gaps = np.diff([r.arrival_s for r in reqs])
    assert gaps.mean() == pytest.approx(0.1, rel=0.03)
    assert gaps.std() / gaps.mean() == pytest.approx(1.0, rel=0.05)  # Poisson
    bursty = np.diff(arrivals(np.random.default_rng(1), 20000, 10.0, burst_cv=3.0))
    assert bursty.mean() == pytest.approx(0.1, rel=0.1) and bursty.std() / bursty.mean() == pytest.approx(3.0, rel=0.15)
    # a short sample comes at the rate asked for (unscaled, seed 0's 300 Poisson arrivals at 20/s came at 17.7/s),
    # its gaps as random as before
    for seed, cv in ((0, 1.0), (1, 1.0), (2, 3.0)):
        times = arrivals(np.random.default_rng(seed), 300, 20.0, burst_cv=cv)
        assert times[0] == 0 and times[-1] == pytest.approx(299 / 20.0)
        assert np.diff(times).std() / np.diff(times).mean() == pytest.approx(cv, rel=0.3)
    agent = generate("agent", rate=1, requests=50, context=SPEC.seq_len)
    assert all(r.prefix_id == "system" and r.prefix_tokens == 2000 < r.prompt_tokens for r in agent)
    assert all(r.prompt_tokens + r.output_tokens <= SPEC.seq_len for r in agent)
    assert set(SCENARIOS) == {"chat", "long-context", "agent"}


def test_traces_are_read_and_bad_ones_refused_in_one_line(tmp_path):
    csv = tmp_path / "t.csv"
    csv.write_text("arrival_s,prompt_tokens,output_tokens,prefix_id,prefix_tokens\n0.5,100,20,,\n0.1,300,5,sys,64\n")
    reqs = load_trace(csv)
    assert [(r.arrival_s, r.prompt_tokens, r.prefix_id, r.prefix_tokens) for r in reqs] == [
        (0.1, 300, "sys", 64), (0.5, 100, "", 0)]
    jl = tmp_path / "t.jsonl"
    jl.write_text("\n".join(json.dumps({"arrival_s": i, "prompt_tokens": 10, "output_tokens": 3}) for i in range(4)))
    assert len(workload(str(jl), rate=None, requests=1, context=2048)) == 4
    for text, needle in (("arrival_s,prompt_tokens\n1,2\n", "output_tokens"),
                         ("arrival_s,prompt_tokens,output_tokens\n1,0,2\n", "prompt_tokens must be a positive"),
                         ("arrival_s,prompt_tokens,output_tokens\n-1,5,2\n", "arrival_s"),
                         ("arrival_s,prompt_tokens,output_tokens\n1,5000,2\n", "context"),
                         # said once, in the trace's words (was "invalid literal for int() with base 10")
                         ("arrival_s,prompt_tokens,output_tokens\n1,abc,2\n",
                          "bad.csv: request 0: prompt_tokens must be an integer, got 'abc'$"),
                         ("arrival_s,prompt_tokens,output_tokens\n1,2,0\n",
                          "bad.csv: request 0: output_tokens must be a positive integer, got 0$"),
                         ('{"arrival_s": 0, "prompt_tokens": 1.5, "output_tokens": 3}', "must be an integer, got 1.5"),
                         ('{"arrival_s": 0, "prompt_tokens": 15, "output_tokens": true}', "must be an integer, got True"),
                         ('{"arrival_s": "nan", "prompt_tokens": 15, "output_tokens": 3}', "arrival_s must be a number")):
        bad = tmp_path / ("bad.jsonl" if text.startswith("{") else "bad.csv")
        bad.write_text(text)
        with pytest.raises(ConfigError, match=needle) as err:
            workload(str(bad), rate=None, requests=1, context=4096)
        assert "\n" not in str(err.value)
    with pytest.raises(ConfigError, match="unknown workload|no trace file"):
        workload("nonsense", rate=1, requests=1, context=4096)
    with pytest.raises(ConfigError, match="--rate"):
        workload("chat", rate=None, requests=1, context=4096)


def test_at_a_low_rate_ttft_is_one_prefill_and_tpot_one_decode_step():
    P, O = 1024, 128
    reqs = [Request(id=i, arrival_s=100.0 * i, prompt_tokens=P, output_tokens=O) for i in range(4)]
    r = simulate_traffic(SPEC, CLUSTER, reqs, ServingLayout(tp=1))
    one = IterationCost(SPEC, CLUSTER, 1, 1, "bf16", 8192).seconds(P, 1, 0, 0.0, P * (P + 1) / 2, P)
    assert np.allclose(r.ttft_s, one, rtol=1e-12)
    req = ServingRequest(prompt_len=P, output_len=O)
    assert one == pytest.approx(prefill_s(SPEC, CLUSTER, req, 1, 1), rel=0.03)  # the steady-state model's prefill
    assert np.allclose(r.tpot_s, decode_step_s(SPEC, CLUSTER, req, 1, 1, 1, P + O / 2), rtol=0.01)
    assert r.preemptions == 0 and r.finished == 4


def test_past_capacity_the_queue_and_ttft_grow_without_bound():
    def ttft_p90(rate, n):
        reqs = generate("chat", rate=rate, requests=n, context=SPEC.seq_len, seed=1)
        return simulate_traffic(SPEC, CLUSTER, reqs, ServingLayout(tp=1)).metrics()["ttft_p90_s"]

    below = ttft_p90(10, 500), ttft_p90(10, 1000)
    above = ttft_p90(150, 500), ttft_p90(150, 1000)
    assert below[1] < 1.3 * below[0] < 0.1  # a steady state: TTFT does not depend on how long it runs
    assert above[1] > 1.8 * above[0] > 0.5  # the queue grows with every request: TTFT with it


def test_chunked_prefill_lowers_p99_tpot_under_long_prompts():
    reqs = _long_prompts(300, rate=4)
    whole = simulate_traffic(SPEC, CLUSTER, reqs, ServingLayout(tp=1), SchedulerConfig(chunked_prefill=False)).metrics()
    chunked = simulate_traffic(SPEC, CLUSTER, reqs, ServingLayout(tp=1),
                               SchedulerConfig(chunked_prefill=True, max_num_batched_tokens=512)).metrics()
    assert chunked["tpot_p99_s"] < 0.75 * whole["tpot_p99_s"]
    assert chunked["ttft_p50_s"] > whole["ttft_p50_s"]  # the price: a prompt spread over several iterations


def test_prefix_caching_cuts_prefill_work_by_the_hit_rate():
    reqs = generate("agent", rate=5, requests=500, context=SPEC.seq_len, seed=2)
    total = sum(r.prompt_tokens for r in reqs)
    off = simulate_traffic(SPEC, CLUSTER, reqs, ServingLayout(tp=1), SchedulerConfig(prefix_caching=False))
    on = simulate_traffic(SPEC, CLUSTER, reqs, ServingLayout(tp=1), SchedulerConfig(prefix_caching=True))
    assert off.prefix_hit_rate == 0 and off.prefill_tokens == total
    assert on.prefix_hit_rate > 0.8  # 2,000 shared tokens of ~2,250 (the first request computes them)
    assert on.prefill_tokens == round(total * (1 - on.prefix_hit_rate))
    assert on.metrics()["ttft_p50_s"] < 0.5 * off.metrics()["ttft_p50_s"]


def test_disaggregation_removes_prefill_interference_from_tpot():
    reqs = _long_prompts(300, rate=4, seed=3)
    cfg = SchedulerConfig(chunked_prefill=False)
    mixed = simulate_traffic(SPEC, CLUSTER, reqs, ServingLayout(tp=1, replicas=2), cfg)
    split = simulate_traffic(SPEC, CLUSTER, reqs, ServingLayout(tp=1, replicas=2, prefill_replicas=1), cfg)
    assert split.finished == mixed.finished == 300
    assert split.metrics()["tpot_p99_s"] < mixed.metrics()["tpot_p99_s"]
    # the decoding replica ran no prompt token: all prefill work was on the prefill replica
    assert split.prefill_tokens_by_replica == (sum(r.prompt_tokens for r in reqs), 0)
    assert min(mixed.prefill_tokens_by_replica) > 0


def test_preemption_when_blocks_run_out_recomputes_or_swaps_and_every_request_finishes():
    reqs = generate("chat", rate=50, requests=300, context=SPEC.seq_len, seed=4)
    prompts = sum(r.prompt_tokens for r in reqs)
    recompute = simulate_traffic(SPEC, CLUSTER, reqs, ServingLayout(tp=1),
                                 SchedulerConfig(num_gpu_blocks_override=600))
    swap = simulate_traffic(SPEC, CLUSTER, reqs, ServingLayout(tp=1),
                            SchedulerConfig(num_gpu_blocks_override=600, preemption="swap"))
    roomy = simulate_traffic(SPEC, CLUSTER, reqs, ServingLayout(tp=1))
    assert roomy.preemptions == 0 and roomy.prefill_tokens == prompts
    assert recompute.preemptions > 0 and recompute.finished == 300
    assert recompute.prefill_tokens > prompts  # preempted sequences computed their tokens again
    assert swap.preemptions > 0 and swap.finished == 300 and swap.prefill_tokens == prompts
    assert min(recompute.metrics()["e2e_p90_s"], swap.metrics()["e2e_p90_s"]) > roomy.metrics()["e2e_p90_s"]


def test_slo_goodput_and_bad_input():
    slo = SLO.parse("ttft_p99=0.5,tpot_p90=20ms")
    assert slo.targets == (("ttft", 99.0, 0.5), ("tpot", 90.0, 0.02))
    reqs = generate("chat", rate=20, requests=400, context=SPEC.seq_len, seed=5)
    r = simulate_traffic(SPEC, CLUSTER, reqs, ServingLayout(tp=1), slo=slo)
    m = r.metrics()
    met = np.sum((r.ttft_s <= 0.5) & (r.tpot_s <= 0.02))
    assert m["slo_attainment"] == met / 400
    assert m["goodput_rps"] == pytest.approx(met / (reqs[-1].arrival_s - reqs[0].arrival_s))
    assert m["goodput_rps"] == pytest.approx(20 * met / 399)  # the rate asked for x the share that met them
    strict = simulate_traffic(SPEC, CLUSTER, reqs, ServingLayout(tp=1), slo=SLO.parse("tpot_p99=1ms"))
    assert strict.goodput_rps == 0
    for text in ("ttft=1", "ttft_p99=", "foo_p90=1", "tpot_p99=-1", "e2e_p99=abc"):
        with pytest.raises(ConfigError, match="--slo"):
            SLO.parse(text)
    # a replica too small says why and the smallest tp that holds the request (70B: 128 GiB of bf16 weights)
    with pytest.raises(ConfigError, match=r"holds 0 tokens .*\(its weights take 128\.\d GiB .*give --tp 2 \(it holds"):
        simulate_traffic(ZOO["llama2-70b"], CLUSTER, reqs[:3], ServingLayout(tp=1))
    long_8b = replace(SPEC, max_positions=4_000_000)  # a 40 GB A100 holds 158,544 tokens of its KV, tp 4 1,012,544
    for prompt, way in ((1_000_000, "give --tp 4 (it holds 1012544 tokens)"), (3_000_000, "--pp across nodes")):
        with pytest.raises(ConfigError, match=rf"holds 158544 tokens of KV cache, fewer .* {prompt + 1000}; .*{re.escape(way)}"):
            simulate_traffic(long_8b, load_cluster("a100-40g:8"), [Request(id=0, arrival_s=0.0, prompt_tokens=prompt,
                                                                           output_tokens=1000)], ServingLayout(tp=1))
    with pytest.raises(ConfigError, match="prefill-replicas"):
        ServingLayout(replicas=2, prefill_replicas=2)
    again = simulate_traffic(SPEC, CLUSTER, reqs, ServingLayout(tp=1), slo=slo)
    assert again.metrics() == m and not math.isnan(m["ttft_p99_s"])


def test_a_conversations_kv_between_turns_kept_offloaded_or_dropped():
    """60 conversations of 3 turns 30 s apart, each turn's prompt the conversation so far (its
    prefix, prefix_id = the conversation) plus 200 new tokens. With room, the earlier turns stay
    cached; with a small GPU cache they are evicted between turns: dropped (recomputed) or
    offloaded to host memory and copied back (evicted_prefix 'host')."""
    reqs, rid = [], 0
    for c in range(60):
        context, t = 0, 0.5 * c
        for _ in range(3):
            reqs.append(Request(id=rid, arrival_s=t, prompt_tokens=context + 200, output_tokens=150,
                                prefix_id=f"conversation {c}", prefix_tokens=context))
            rid, context, t = rid + 1, context + 350, t + 30.0
    prompts = sum(r.prompt_tokens for r in reqs)
    cluster = load_cluster("h100-sxm:1")

    def run(**kw):
        return simulate_traffic(SPEC, cluster, reqs, ServingLayout(), SchedulerConfig(**kw))

    kept, dropped = run(), run(num_gpu_blocks_override=400)
    offloaded = run(num_gpu_blocks_override=400, evicted_prefix="host")
    assert run(prefix_caching=False).prefill_tokens == prompts
    assert kept.prefix_hit_rate > 0.6 and kept.prefill_tokens == round(prompts * (1 - kept.prefix_hit_rate))
    assert dropped.prefix_hit_rate == 0 and dropped.prefill_tokens == prompts  # 6,400 tokens of cache: gone by the next turn
    assert offloaded.prefix_hit_rate > 0.55 and offloaded.prefill_tokens < 0.5 * prompts
    # copying back over PCIe costs less than recomputing, more than keeping
    ttft = {k: r.metrics()["ttft_p50_s"] for k, r in (("kept", kept), ("dropped", dropped), ("offloaded", offloaded))}
    assert ttft["kept"] < ttft["offloaded"] < ttft["dropped"]


def test_a_concurrency_limit_is_a_closed_loop():
    """`vllm bench serve --max-concurrency`: with one request in flight each starts when the last
    ends (TTFT one prefill every time, the run the sum of the requests alone); a limit as large as
    the workload is the open loop; bad limits are refused."""
    reqs = [Request(id=i, arrival_s=0.0, prompt_tokens=512, output_tokens=64) for i in range(12)]
    alone = simulate_traffic(SPEC, CLUSTER, reqs[:1], ServingLayout(tp=1))
    one = simulate_traffic(SPEC, CLUSTER, reqs, ServingLayout(tp=1), concurrency=1)
    assert np.allclose(one.ttft_s, alone.ttft_s[0], rtol=1e-9)
    assert one.duration_s == pytest.approx(12 * alone.duration_s, rel=1e-9)
    four = simulate_traffic(SPEC, CLUSTER, reqs, ServingLayout(tp=1), concurrency=4)
    burst = simulate_traffic(SPEC, CLUSTER, reqs, ServingLayout(tp=1))
    assert burst.duration_s < four.duration_s < one.duration_s  # batching four at a time, then all at once
    assert float(np.median(four.ttft_s)) < float(np.median(burst.ttft_s))  # no queue behind the client's limit
    same = simulate_traffic(SPEC, CLUSTER, reqs, ServingLayout(tp=1), concurrency=12)
    assert np.array_equal(same.ttft_s, burst.ttft_s) and same.duration_s == burst.duration_s
    with pytest.raises(ConfigError, match="--concurrency must be a positive integer"):
        simulate_traffic(SPEC, CLUSTER, reqs, ServingLayout(tp=1), concurrency=0)


def test_pipeline_stages_overlap_as_virtual_engines():
    """A replica of pp stages runs pp virtual engines (vLLM's), each over 1/pp of its KV blocks, the
    stages shared: a compute-bound burst of long prompts goes through tp4 x pp2 about as fast as
    through two tp4 replicas on the same 8 GPUs (each stage works on another engine's batch; 1%
    slower measured: the bubbles of unequal batches), where stages run one after the other it would
    take twice as long; one request alone still waits for the whole traversal."""
    spec, cluster = ZOO["llama3-70b"], load_cluster("h100-sxm:8")
    burst = [Request(id=i, arrival_s=0.0, prompt_tokens=4000, output_tokens=50) for i in range(200)]
    two = simulate_traffic(spec, cluster, burst, ServingLayout(tp=4, replicas=2), SchedulerConfig())
    piped = simulate_traffic(spec, cluster, burst, ServingLayout(tp=4, pp=2), SchedulerConfig())
    one = simulate_traffic(spec, cluster, burst, ServingLayout(tp=4), SchedulerConfig())
    assert piped.duration_s == pytest.approx(two.duration_s, rel=0.05)
    assert one.duration_s > 1.8 * piped.duration_s
    assert len(piped.timeline) == 2 and min(piped.prefill_tokens_by_replica) > 0  # both engines worked
    alone = [Request(id=0, arrival_s=0.0, prompt_tokens=4000, output_tokens=50)]
    ttft = {pp: simulate_traffic(spec, cluster, alone, ServingLayout(tp=4, pp=pp), SchedulerConfig()).ttft_s[0]
            for pp in (1, 2)}
    # the traversal: the same layers at the same tp, plus the hop between the stages
    assert ttft[1] < ttft[2] < 1.02 * ttft[1]


def test_the_steady_state_pipelines_its_micro_batches():
    """The steady-state model prices pp > 1 as pp micro-batches in flight: a compute-bound batch
    (long prompts) serves about as many tokens per second per GPU at tp1 x pp2 as at tp1 x pp1,
    and a token's latency is one traversal of a micro-batch."""
    req = ServingRequest(prompt_len=4096, output_len=16)
    from costmodel.serving import evaluate
    flat = evaluate(SPEC, load_cluster("h100-sxm:1"), req, 1, 1, 8)
    piped = evaluate(SPEC, load_cluster("h100-sxm:2"), req, 1, 2, 8)
    assert piped.throughput_tokens_per_s == pytest.approx(2 * flat.throughput_tokens_per_s, rel=0.1)
    assert piped.tpot_s == pytest.approx(decode_step_s(SPEC, load_cluster("h100-sxm:2"), req, 1, 2, 4, 4096 + 8),
                                         rel=1e-9)


def test_a_prefill_replicas_kv_transfers_queue_on_its_links():
    """Disaggregated: the prompts one prefill iteration finishes send their KV one after another
    over the prefill replica's links, so on a slow link the k-th waits for k transfers. Sixteen
    512-token prompts prefilled together: the last starts decoding ~15 transfers after the first."""
    from dataclasses import replace

    slow = replace(CLUSTER, intra=replace(CLUSTER.intra, bandwidth_gb_per_s=0.5, efficiency=1.0, latency_us=0.0))
    reqs = [Request(id=i, arrival_s=0.0, prompt_tokens=512, output_tokens=2) for i in range(16)]
    cfg = SchedulerConfig(max_num_batched_tokens=8192)
    r = simulate_traffic(SPEC, slow, reqs, ServingLayout(tp=1, replicas=2, prefill_replicas=1), cfg)
    one_s = 512 * 128 * 1024 / 0.5e9  # llama3-8b: 128 KiB of KV a token, over 0.5 GB/s
    decode_wait = np.sort(r.e2e_s - r.ttft_s)  # the KV's journey and one decode step, per request
    assert r.finished == 16 and np.allclose(r.ttft_s, r.ttft_s[0])  # one prefill iteration for all
    assert decode_wait[-1] - decode_wait[0] == pytest.approx(15 * one_s, rel=0.05)


def test_a_long_prefill_in_one_virtual_engine_holds_up_the_others_decodes():
    """tp1 x pp2: a decoding request on one virtual engine and an 8,000-token prompt arriving on the
    other share the two stages, so the decode waits while the prompt passes through them (about
    one prefill's traversal, vLLM's pipeline bubble); alone it would not."""
    cluster = load_cluster("h100-sxm:2")
    decoding = Request(id=0, arrival_s=0.0, prompt_tokens=100, output_tokens=400)
    prompt = Request(id=1, arrival_s=0.5, prompt_tokens=8000, output_tokens=2)
    layout, cfg = ServingLayout(tp=1, pp=2), SchedulerConfig()
    alone = simulate_traffic(SPEC, cluster, [decoding], layout, cfg)
    shared = simulate_traffic(SPEC, cluster, [decoding, prompt], layout, cfg)
    assert shared.prefill_tokens_by_replica == (100, 8000)  # one request on each engine
    prefill = shared.ttft_s[1]  # the prompt's traversal (and its first token's step)
    delay = shared.e2e_s[0] - alone.e2e_s[0]
    assert 0.5 * prefill < delay < 1.1 * prefill


def test_virtual_engines_decoding_alike_share_the_stages_without_waiting():
    """tp2 x pp2 at a low rate serves like tp2 x pp1 (a token's latency is one traversal either
    way): two engines decoding one sequence each use half of every stage, which leaves the other
    half to the other. Was: a run of repeated decodes booked the stages for its whole length, so
    the sibling engine's decodes and prompts queued behind it (Llama-2 70B chat at 0.25/s: TTFT
    p99 7.5 s against 0.12 s at pp 1; two identical decodes 7.8 and 11.7 ms a token)."""
    spec, cluster = ZOO["llama2-70b"], load_cluster("h100-sxm:8")
    reqs = generate("chat", rate=0.25, requests=100, context=spec.context_len, seed=0)
    piped = simulate_traffic(spec, cluster, reqs, ServingLayout(tp=2, pp=2)).metrics()
    flat = simulate_traffic(spec, cluster, reqs, ServingLayout(tp=2, pp=1)).metrics()
    assert piped["ttft_p99_s"] < 1.2 * flat["ttft_p99_s"]
    assert piped["tpot_p99_s"] == pytest.approx(flat["tpot_p99_s"], rel=0.03)
    twins = [Request(id=i, arrival_s=i * 1e-3, prompt_tokens=100, output_tokens=3000) for i in range(2)]
    r = simulate_traffic(SPEC, load_cluster("h100-sxm:2"), twins, ServingLayout(tp=1, pp=2), SchedulerConfig())
    assert r.prefill_tokens_by_replica == (100, 100) and r.tpot_s[1] == pytest.approx(r.tpot_s[0], rel=1e-3)


def test_a_scenario_cut_to_a_short_context_is_said():
    """A scenario's requests are cut to the model's context, the prompt cut and the output kept (a
    client truncates its document to leave room for the answer); where that halves their mean
    length the commands say so in a note: chat on a 32-token model, long documents on llama2-70b's
    4,096 tokens (their answers whole: the median 64 tokens, not one); on llama3-8b chat nothing is
    cut."""
    from costmodel.workload import context_note

    short = generate("chat", rate=5, requests=50, context=32, seed=0)
    assert all(r.prompt_tokens + r.output_tokens <= 32 for r in short)
    note = context_note("chat", short, 32)
    assert note is not None and "cut to the model's context of 32 tokens" in note
    assert context_note("chat", generate("chat", rate=5, requests=200, context=SPEC.seq_len, seed=0), SPEC.seq_len) is None
    docs = generate("long-context", rate=1, requests=400, context=4096, seed=0)
    assert all(r.prompt_tokens + r.output_tokens <= 4096 for r in docs)
    assert np.median([r.output_tokens for r in docs]) == pytest.approx(64, rel=0.15)
    assert min(r.prompt_tokens for r in docs) > 1000 and "mean prompt" in context_note("long-context", docs, 4096)


def test_tpot_percentiles_leave_out_single_token_requests():
    """A request of one output token has no time per output token: TPOT's percentiles (and the
    planner's objectives) are over the requests of two or more, as vLLM's benchmark counts them.
    Half the requests of one token used to put TPOT p50 at 0."""
    reqs = [Request(id=i, arrival_s=0.1 * i, prompt_tokens=200, output_tokens=1 if i % 2 else 50) for i in range(40)]
    r = simulate_traffic(SPEC, load_cluster("h100-sxm:1"), reqs, ServingLayout(), SchedulerConfig())
    m = r.metrics()
    several = r.tpot_s[r.outputs > 1]
    assert m["tpot_p50_s"] == pytest.approx(float(np.percentile(several, 50))) and m["tpot_p50_s"] > 0.001
    from planner.serving_search import meets

    assert meets(r, SLO.parse(f"tpot_p50={m['tpot_p50_s'] * 1.01}"))
    assert not meets(r, SLO.parse(f"tpot_p50={m['tpot_p50_s'] * 0.99}"))


def test_a_sequence_preempted_by_recompute_keeps_its_cached_blocks_with_prefix_caching():
    """vLLM V1 frees a preempted sequence's blocks with their hashes: until another sequence
    takes them, its recompute finds them cached. A 3,000-token prompt chunked in beside a
    decoding request outgrows 200 blocks and is preempted; with prefix caching it recomputes
    only the blocks the decode took meanwhile, without it everything it had computed."""
    reqs = [Request(id=0, arrival_s=0.0, prompt_tokens=1000, output_tokens=400),
            Request(id=1, arrival_s=0.01, prompt_tokens=3000, output_tokens=10)]

    def run(caching: bool):
        return simulate_traffic(SPEC, CLUSTER, reqs, ServingLayout(tp=1),
                                SchedulerConfig(num_gpu_blocks_override=200, max_num_batched_tokens=512,
                                                prefix_caching=caching))

    cached, dropped = run(True), run(False)
    assert cached.preemptions >= 1 and dropped.preemptions >= 1
    assert cached.finished == dropped.finished == 2
    redone_cached = cached.prefill_tokens - 4000
    redone_dropped = dropped.prefill_tokens - 4000
    # the decode grows by at most 400 tokens: 25 blocks it may take from the preempted prompt's
    assert 0 <= redone_cached <= 25 * 16 + 16
    assert redone_dropped >= 1500  # the preempted prompt had some 2,000 tokens computed
    assert cached.duration_s < dropped.duration_s


def test_multi_step_scheduling_makes_an_arrival_wait_out_the_decode_run():
    """vLLM 0.6's --num-scheduler-steps k: decodes run k steps at a time and a request arriving
    meanwhile is admitted only when the run ends. A request arriving while another decodes alone
    gets its first token up to k decode steps later than with single-step scheduling, the
    decoding request's tokens come no slower, and without arrivals nothing changes."""
    steps = 10
    step_s = decode_step_s(SPEC, CLUSTER, ServingRequest(prompt_len=1000, output_len=1000), 1, 1, batch=1,
                           context=1100)

    def run(reqs, k):
        return simulate_traffic(SPEC, CLUSTER, reqs, ServingLayout(tp=1),
                                SchedulerConfig(chunked_prefill=False, num_scheduler_steps=k))

    waits = []
    for j in range(steps):  # arrivals over one run's length: each phase of the run
        late = [Request(id=0, arrival_s=0.0, prompt_tokens=1000, output_tokens=1000),
                Request(id=1, arrival_s=0.5 + (j + 0.5) * step_s, prompt_tokens=500, output_tokens=50)]
        one, multi = run(late, 1), run(late, steps)
        waits.append((multi.ttft_s[1] - one.ttft_s[1]) / step_s)
        assert multi.tpot_s[0] <= one.tpot_s[0] * 1.001
    # the wait is what is left of the run: 0 to k - 1 steps, (k - 1) / 2 on average
    assert min(waits) >= -0.01 and max(waits) <= steps and 3 < sum(waits) / steps < 6
    alone = late[:1]
    assert run(alone, steps).e2e_s[0] == pytest.approx(run(alone, 1).e2e_s[0], rel=1e-9)
    with pytest.raises(ConfigError, match="--num-scheduler-steps must be a positive integer"):
        SchedulerConfig(num_scheduler_steps=0)


def test_every_request_finishes_under_any_scheduler_and_tight_memory():
    """A simulation under memory pressure must drain: 80 random deployments (one replica, pp 2,
    disaggregated; few KV blocks, down to the longest request's; chunked or whole prompts; prefix
    caching; recompute or swap; dropped or offloaded prefixes; multi-step runs; a concurrency
    limit) of chat, agent and long-context requests. An iteration that preempted every sequence
    it ran used to leave its replica idle with a queue (and a prefix evicted while a request was
    admitted onto it raised a KeyError)."""
    import random

    rng = random.Random(7)
    for trial in range(80):
        name = rng.choice(("chat", "agent", "long-context"))
        reqs = generate(name, rate=rng.choice((5, 40, 200)), requests=rng.choice((40, 120)), context=4096, seed=trial)
        longest = max(r.prompt_tokens + r.output_tokens for r in reqs)
        layout = rng.choice((ServingLayout(tp=1), ServingLayout(tp=1, pp=2),
                             ServingLayout(tp=1, replicas=2, prefill_replicas=1)))
        cfg = SchedulerConfig(num_gpu_blocks_override=-(-longest // 16) * layout.pp + rng.choice((0, 5, 50, 300)),
                              max_num_batched_tokens=rng.choice((256, 2048, 8192)), max_num_seqs=rng.choice((4, 64, 1024)),
                              chunked_prefill=rng.random() < 0.6, prefix_caching=rng.random() < 0.7,
                              preemption=rng.choice(("recompute", "swap")), evicted_prefix=rng.choice(("drop", "host")),
                              num_scheduler_steps=rng.choice((1, 1, 4, 10)))
        r = simulate_traffic(SPEC, CLUSTER, reqs, layout, cfg, concurrency=rng.choice((None, None, 8)))
        assert r.finished == len(reqs), (trial, name, layout, cfg)
        assert np.all(np.isfinite(r.e2e_s)) and np.all(r.ttft_s > 0)


def test_a_random_workload_has_fixed_lengths_as_vllms_benchmark_dataset():
    """`random:P/O`: every request P prompt and O output tokens (vLLM's `--dataset-name random`
    without spread), at a rate or all at once; a malformed name or lengths past the model's
    context are refused in one line."""
    reqs = workload("random:1024/128", rate=math.inf, requests=50, context=SPEC.seq_len)
    assert len(reqs) == 50 and {(r.prompt_tokens, r.output_tokens, r.arrival_s) for r in reqs} == {(1024, 128, 0.0)}
    timed = workload("random:1024/128", rate=10, requests=400, context=SPEC.seq_len, seed=2)
    assert 400 / timed[-1].arrival_s == pytest.approx(10, rel=0.15)
    for bad, needle in (("random:1024", "write random:PROMPT/OUTPUT"), ("random:0/5", "write random:PROMPT/OUTPUT"),
                        ("random:8000/1000", "exceed the model's context of 8192")):
        with pytest.raises(ConfigError, match=needle):
            workload(bad, rate=1.0, requests=5, context=SPEC.seq_len)


def test_an_fp8_kv_cache_serves_a_memory_bound_burst_with_fewer_preemptions():
    """300 requests of 4,000 prompt and 500 output tokens at once on one H100: a bf16 cache runs out
    and preempts, an fp8 one holds twice the tokens (more sequences a step, fewer preemptions,
    more throughput); a smaller share of the GPU (--gpu-memory-utilization 0.5) holds fewer."""
    burst = [Request(id=i, arrival_s=0.0, prompt_tokens=4000, output_tokens=500) for i in range(300)]
    runs = {name: simulate_traffic(SPEC, load_cluster("h100-sxm:1"), burst, ServingLayout(tp=1), SchedulerConfig(**kw))
            for name, kw in (("bf16", {}), ("fp8", {"kv_cache_dtype": "fp8"}),
                             ("half", {"gpu_memory_utilization": 0.5}))}
    assert runs["fp8"].preemptions < runs["bf16"].preemptions < runs["half"].preemptions
    assert runs["fp8"].throughput_tokens_per_s > 1.2 * runs["bf16"].throughput_tokens_per_s
    assert runs["half"].throughput_tokens_per_s < runs["bf16"].throughput_tokens_per_s


def test_sliding_window_layers_read_and_attend_within_their_window():
    """A sliding-window layer's kernel reads only the last attention_window keys of a decode and
    pairs each prompt query with at most that many: a 4,096-token window in every other layer
    (Gemma-2's pattern) changes nothing up to the window, and past it a decode at 16,000 tokens of
    context reads (1/2 + 1/2 x 4,096 / 16,000) of the cache; a 16,000-token prompt's windowed
    attention pairs are W (s - W) + W (W + 1) / 2, not s (s + 1) / 2."""
    from costmodel.serving import decode_attention_s, window_prefill

    full = replace(SPEC, max_positions=32_768)
    windowed = replace(full, attention_window=4096, windowed_layers=SPEC.layers // 2)
    assert decode_attention_s(windowed, CLUSTER, "bf16", 1, 64, 4000) == decode_attention_s(full, CLUSTER, "bf16", 1, 64,
                                                                                            4000)
    long = decode_attention_s(windowed, CLUSTER, "bf16", 1, 64, 16_000) / decode_attention_s(full, CLUSTER, "bf16", 1,
                                                                                             64, 16_000)
    assert long == pytest.approx(0.5 + 0.5 * 4096 / 16_000, rel=0.02)
    pairs, keys = window_prefill(windowed, 0, 16_000)
    assert pairs == 4096 * (16_000 - 4096) + 4096 * 4097 / 2 and keys == 16_000
    assert window_prefill(windowed, 2000, 1000) == (1000 * (2000 + 1001 / 2), 3000)  # within the window: all of it
    assert window_prefill(windowed, 10_000, 100) == (100 * 4096, 4096 + 100)
    # served: a burst of long prompts prefills and decodes faster with the window, the same without one past it
    book = [Request(id=i, arrival_s=0.0, prompt_tokens=16_000, output_tokens=200) for i in range(8)]
    runs = {name: simulate_traffic(spec, CLUSTER, book, ServingLayout(tp=1), SchedulerConfig())
            for name, spec in (("full", full), ("windowed", windowed),
                               ("wide", replace(full, attention_window=32_768, windowed_layers=SPEC.layers // 2)))}
    assert runs["windowed"].duration_s < 0.95 * runs["full"].duration_s
    assert float(np.median(runs["windowed"].tpot_s)) < float(np.median(runs["full"].tpot_s))
    assert runs["wide"].duration_s == pytest.approx(runs["full"].duration_s, rel=1e-9)


def test_kv_cache_groups_are_vllms_and_a_window_holds_its_blocks_only():
    """vLLM V1's hybrid allocator: layers of one kind in groups of the smaller kind's count (the
    larger where they are within 25%), a sliding-window group keeping the blocks of its window
    (and of a prefill chunk past it) only."""
    from costmodel.kv_groups import KVGroups

    gemma3 = replace(SPEC, layers=62, attention_window=1024, windowed_layers=52)  # Gemma-3-27B: 52 local, 10 global
    g = KVGroups.of(gemma3)
    assert (g.group_layers, g.full_groups, g.window_groups, g.window) == (10, 1, 6, 1024)  # 52 local padded to 60
    gpt_oss = replace(SPEC, layers=24, attention_window=128, windowed_layers=12)  # alternating, gpt-oss-20b
    assert (KVGroups.of(gpt_oss).group_layers, KVGroups.of(gpt_oss).full_groups) == (12, 1)
    assert KVGroups.of(replace(SPEC, layers=25, attention_window=128, windowed_layers=12)).group_layers == 13
    mistral = replace(SPEC, attention_window=4096)  # every layer windowed: one group
    assert (KVGroups.of(mistral).full_groups, KVGroups.of(mistral).window_groups) == (0, 1)
    assert (KVGroups.of(SPEC).group_layers, KVGroups.of(SPEC).window_groups) == (32, 0)
    assert KVGroups.of(gemma3, pp=2).group_layers == 5  # a stage of 31 layers, 26 of them local
    # a 32,000-token decode: every block of the global group, 64 of each local one (its last 1,024 tokens)
    assert g.held(32_000, 31_999, 16) == 2000 + 6 * 64
    assert g.held(32_000, 32_000 - 8192, 16) == 2000 + 6 * (2000 - (32_000 - 8192 - 1023) // 16)  # a chunk past it
    assert g.held(500, 499, 16) == 7 * 32  # within the window: all of it
    assert g.held(32_000, 31_999, 16, hit=100) == 1900 + 6 * 64  # a shared prefix's blocks are the cache's
    full = KVGroups.of(SPEC)
    assert full.held(32_000, 31_999, 16) == 2000 and full.longest(4000, 16, 8192) == 64_000
    assert g.peak(32_000, 16, 8192) == 2000 + 6 * 576  # its last 8,192-token chunk beside the window before it
    assert g.longest(2000 + 6 * 576, 16, 8192) == pytest.approx(32_000, abs=16)
    with pytest.raises(ConfigError):
        KVGroups(group_layers=0, full_groups=1, window_groups=0, window=0)


def test_a_hybrid_models_window_layers_free_their_blocks_and_hold_more_sequences():
    """Gemma-3-27B's shape on one H100: 16.7 GiB of KV cache is 35,000 tokens of every layer, two
    16,000-token requests at a time if the local layers kept every token; freeing their blocks
    past the 1,024-token window it holds all eight of a burst at once (vLLM V1). The pool's
    accounting leaks nothing: long requests sharing a prefix, preempted and swapped, served three
    times a day apart, run the second and third time alike (the first finds the cache cold), and
    once all finished only the prefix cache holds blocks."""
    gemma3 = replace(llama_spec("gemma3-27b-like", layers=62, hidden=5376, heads=32, kv_heads=16, ffn_hidden=21504,
                                vocab=262_208, seq_len=131_072), head_dim=128, v_head_dim=128, attention_window=1024,
                     windowed_layers=52)
    cluster = load_cluster("h100-sxm:1")
    burst = [Request(id=i, arrival_s=0.0, prompt_tokens=16_000, output_tokens=100) for i in range(8)]
    r = simulate_traffic(gemma3, cluster, burst, ServingLayout(tp=1), SchedulerConfig(prefix_caching=False))
    assert r.finished == 8 and max(u[3] for u in r.timeline[0]) == 8
    dense = replace(gemma3, attention_window=0, windowed_layers=0)  # every layer global
    d = simulate_traffic(dense, cluster, burst, ServingLayout(tp=1), SchedulerConfig(prefix_caching=False))
    assert max(u[3] for u in d.timeline[0]) <= 3 and d.duration_s > 1.4 * r.duration_s
    # the steady state's batch limit likewise; within the window the local layers' padding to
    # groups of ten (52 as 60) costs a tenth
    from costmodel.serving import kv_budget
    for prompt, hybrid, every in ((16_000, 9, 2), (500, 46, 51)):
        req = ServingRequest(prompt_len=prompt, output_len=200)
        assert (kv_budget(gemma3, cluster, req, 1, 1).max_batch_paged,
                kv_budget(dense, cluster, req, 1, 1).max_batch_paged) == (hybrid, every)
    rng = np.random.default_rng(0)
    reqs = [Request(id=i, arrival_s=0.05 * i, prompt_tokens=int(rng.integers(4000, 30_000)),
                    output_tokens=int(rng.integers(50, 2000)), prefix_id="sys" if i % 2 else "",
                    prefix_tokens=3000 if i % 2 else 0) for i in range(100)]
    thrice = reqs + [replace(q, id=q.id + 100 * k, arrival_s=q.arrival_s + 10**5 * k) for k in (1, 2) for q in reqs]
    for preemption in ("recompute", "swap"):
        t = simulate_traffic(gemma3, cluster, thrice, ServingLayout(tp=1), SchedulerConfig(preemption=preemption))
        assert t.finished == 300 and t.preemptions >= 3 and t.prefix_hit_rate > 0
        assert all(0 <= u[2] <= 1 for u in t.timeline[0])
        np.testing.assert_allclose(t.e2e_s[100:200], t.e2e_s[200:], rtol=1e-9)
        (blocks, free, cached), = t.pool_end
        assert free + cached == blocks and cached > 0  # all finished: only the prefix cache holds blocks


def test_an_acceptance_length_is_the_acceptance_it_means():
    """vLLM reports speculation as a mean acceptance length L (tokens a check: the drafts accepted
    plus the target's own); paraplan's acceptance a of each draft gives L = (1 - a^(k+1)) / (1 - a)
    with k drafts, and --acceptance-length is solved for it: the published lengths behind the
    default (an EAGLE head on Llama 3 8B, 2.08 at k 4; EAGLE-3 on MiniCPM3, 2.47 at k 5) come out
    at 0.54 and 0.62, each gives back its length, and a length a check cannot emit is one line."""
    from costmodel.serving import DEFAULT_ACCEPTANCE, acceptance_of_length
    from costmodel.traffic import expected_tokens

    assert acceptance_of_length(2.08, 4) == pytest.approx(0.5416, abs=1e-4)
    assert acceptance_of_length(2.47, 5) == pytest.approx(0.6176, abs=1e-4)
    for length, k in ((1.0, 1), (1.5, 1), (2.2, 3), (4.59, 5), (7.9, 8)):
        assert expected_tokens(acceptance_of_length(length, k), k) == pytest.approx(length, abs=1e-9)
    assert SchedulerConfig().acceptance == DEFAULT_ACCEPTANCE == 0.6
    for length, k in ((0.9, 3), (4.0, 3), (True, 3)):
        with pytest.raises(ConfigError, match="--acceptance-length must be tokens a check in \\[1, 4\\)"):
            acceptance_of_length(length, k)
    with pytest.raises(ConfigError, match="--draft-len"):
        acceptance_of_length(2.0, 0)


def test_speculative_decoding_under_traffic_pays_alone_and_not_in_a_crowd():
    """A decode that speculates k = 4 tokens accepted at 0.8 emits (1 - 0.8^5) / 0.2 = 3.36 tokens
    a check: alone, n-gram proposals (no draft model) cut Llama-2 70B's TPOT on 8 H100s by that
    much less the check's extra rows, and a 7B draft model's TPOT is the steady state's (the same
    check and draft steps); with 1,000 chat requests at once every check runs 5 rows a sequence,
    compute-bound, and the median TPOT is worse than without. Every request gets exactly its
    tokens, and under preemption (recompute and swap) the pool is free but for the prefix cache
    once all finished."""
    from costmodel.serving import evaluate
    from costmodel.traffic import expected_tokens

    spec, draft = ZOO["llama2-70b"], ZOO["llama2-7b"]
    plain = SchedulerConfig(max_num_seqs=1024)
    ngram, drafted = (replace(plain, speculative_tokens=4, acceptance=0.8),
                      replace(plain, speculative_tokens=4, acceptance=0.8, draft=draft))
    assert ngram.tokens_per_check == expected_tokens(0.8, 4) == pytest.approx(3.3616)
    one = [Request(id=0, arrival_s=0.0, prompt_tokens=512, output_tokens=129)]
    runs = {name: simulate_traffic(spec, CLUSTER, one, ServingLayout(tp=8), cfg)
            for name, cfg in (("plain", plain), ("ngram", ngram), ("draft", drafted))}
    assert runs["plain"].iterations == 129 and runs["ngram"].iterations == 1 + math.ceil(128 / 3.3616)
    cost = IterationCost(spec, CLUSTER, 8, 1, "bf16", 8192)
    check = cost.seconds(5, 5, 1, 600, 0.0, 0.0) / cost.seconds(1, 1, 1, 600, 0.0, 0.0)
    assert runs["ngram"].tpot_s[0] == pytest.approx(runs["plain"].tpot_s[0] * check / 3.3616, rel=0.03)
    req = ServingRequest(prompt_len=512, output_len=129, batch=1, draft=draft, draft_len=4, acceptance=0.8)
    assert runs["draft"].tpot_s[0] == pytest.approx(evaluate(spec, CLUSTER, req, 8, 1, 1).tpot_s, rel=0.05)
    assert runs["draft"].ttft_s[0] > runs["plain"].ttft_s[0]  # the draft prefills the prompt too
    crowd = generate("chat", rate=math.inf, requests=1000, context=spec.seq_len, seed=0)
    tpot = {name: float(np.median(simulate_traffic(spec, CLUSTER, crowd, ServingLayout(tp=8), cfg).tpot_s))
            for name, cfg in (("plain", plain), ("ngram", ngram))}
    assert tpot["ngram"] > tpot["plain"]
    # exact outputs, and no leak under tight memory (preemptions, a shared prefix cached): once every
    # request finished the pool is free but for the prefix cache's blocks
    reqs = generate("agent", rate=20, requests=200, context=spec.seq_len, seed=3)
    for cfg in (replace(drafted, num_gpu_blocks_override=400), replace(ngram, num_gpu_blocks_override=300,
                                                                        acceptance=0.6, preemption="swap")):
        r = simulate_traffic(spec, CLUSTER, reqs, ServingLayout(tp=8), cfg)
        assert r.finished == 200 and r.preemptions > 0 and list(r.outputs) == [q.output_tokens for q in reqs]
        (blocks, free, cached), = r.pool_end
        assert free + cached == blocks and cached > 0
    for bad, needle in ((dict(num_scheduler_steps=4), "--num-scheduler-steps"), (dict(acceptance=1.0), "--acceptance"),
                        (dict(speculative_tokens=0), "speculative tokens")):
        with pytest.raises(ConfigError, match=needle):
            replace(drafted, **bad)
    with pytest.raises(ConfigError, match="runs with pp 1"):
        simulate_traffic(spec, CLUSTER, one, ServingLayout(tp=4, pp=2), ngram)
