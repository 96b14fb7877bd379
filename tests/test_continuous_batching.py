"""`runtime.serve`: continuous batching with a paged KV cache on the built-in models. Several
requests arriving over time, packed into shared iterations (prompt chunks beside decodes, a
prefix's blocks shared), generate exactly the greedy tokens each would alone with a
contiguous cache; `paraplan generate --workload` runs it and prints the simulator's prediction."""

import json
from dataclasses import replace

import pytest
import torch

from costmodel.traffic import SchedulerConfig
from costmodel.workload import Request
from planner.zoo import ZOO
from runtime.generate import Sampling, generate, load_model
from runtime.serve import prompt_tokens, serve
from tests_helpers import paraplan


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-gpt"])
def test_packed_paged_iterations_generate_what_each_request_would_alone(name):
    torch.set_num_threads(1)
    spec = ZOO[name]
    model = load_model(spec)
    # odd requests share an 8-token prefix (two 4-token blocks); a 10-token budget chunks prompts;
    # three arrive together (their iterations are shared however fast this machine runs them), the
    # rest over time
    reqs = [Request(id=i, arrival_s=0.0 if i < 3 else 0.01 * i, prompt_tokens=9 + 2 * i, output_tokens=4 + i,
                    prefix_id="sys" if i % 2 else "", prefix_tokens=8 if i % 2 else 0) for i in range(6)]
    out = serve(model, reqs, SchedulerConfig(max_num_batched_tokens=10, block_tokens=4), blocks=200)
    for r, got in zip(reqs, out.texts):
        alone = generate(model, torch.tensor([prompt_tokens(r, spec.vocab)]), r.output_tokens, Sampling(greedy=True))
        assert got == alone.tokens[0, r.prompt_tokens:].tolist(), r
    assert out.prefix_hit_tokens in (8, 16)  # the later sharers start with the prefix's 2 blocks
    assert out.iterations < sum(r.output_tokens for r in reqs)  # iterations were shared
    assert (out.ttft_s > 0).all() and (out.e2e_s >= out.ttft_s).all()


def test_generate_workload_prints_measured_and_predicted(tmp_path):
    trace = tmp_path / "t.csv"
    trace.write_text("arrival_s,prompt_tokens,output_tokens\n0,10,5\n0.01,12,6\n0.02,8,4\n")
    out = paraplan("generate", "--model", "tiny-llama", "--workload", str(trace), "--json")
    assert out.returncode == 0, out.stderr
    got = json.loads(out.stdout)
    assert got["requests"] == 3
    for side in ("measured", "predicted"):
        assert got[side]["ttft_p50_s"] > 0 and got[side]["e2e_p90_s"] >= got[side]["ttft_p50_s"]
    bad = paraplan("generate", "--model", "tiny-llama", "--workload", "agent", "--rate", "1")
    assert bad.returncode == 2 and "context" in bad.stderr and "Traceback" not in bad.stderr


def test_when_blocks_run_out_the_latest_sequence_is_preempted_and_recomputed():
    """Twelve 4-token blocks for six requests that need up to five each: decodes preempt the most
    recently admitted sequences (by recompute), which later recompute their prompt and tokens;
    every request still generates exactly what it would alone. The simulator, given the same
    blocks, preempts too."""
    torch.set_num_threads(1)
    spec = ZOO["tiny-llama"]
    model = load_model(spec)
    reqs = [Request(id=i, arrival_s=0.0, prompt_tokens=9 + i, output_tokens=6 + i) for i in range(6)]
    cfg = SchedulerConfig(max_num_batched_tokens=32, block_tokens=4, prefix_caching=False)
    out = serve(model, reqs, cfg, blocks=12)
    assert out.preemptions > 0
    for r, got in zip(reqs, out.texts):
        alone = generate(model, torch.tensor([prompt_tokens(r, spec.vocab)]), r.output_tokens, Sampling(greedy=True))
        assert got == alone.tokens[0, r.prompt_tokens:].tolist(), r
    from costmodel import load_cluster
    from costmodel.traffic import ServingLayout, simulate_traffic

    sim = simulate_traffic(spec, load_cluster("cpu-2core:1"), reqs, ServingLayout(precision="fp32"),
                           replace(cfg, num_gpu_blocks_override=12))
    assert sim.preemptions > 0 and sim.finished == 6
