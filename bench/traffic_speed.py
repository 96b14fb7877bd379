"""Serving-simulator speed: 10,000 requests of each workload scenario through one layout
(target: under 10 s each on a 2-core machine). Run:
    python bench/traffic_speed.py
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import dataclasses  # noqa: E402

from costmodel import load_cluster  # noqa: E402
from costmodel.spec import llama_spec  # noqa: E402
from costmodel.traffic import ServingLayout, simulate_traffic  # noqa: E402
from costmodel.workload import generate  # noqa: E402
from planner.zoo import ZOO  # noqa: E402

CASES = (  # (model, cluster, layout, workload, rate): near each layout's capacity, where iterations are fullest
    ("llama3-8b", "h100-sxm:1", ServingLayout(tp=1), "chat", 30.0),
    ("llama3-8b", "h100-sxm:1", ServingLayout(tp=1), "long-context", 2.0),
    ("llama3-8b", "h100-sxm:1", ServingLayout(tp=1), "agent", 20.0),
    ("llama2-70b", "h100-sxm:8", ServingLayout(tp=4, replicas=2), "chat", 15.0),
    # sliding-window layers freeing their blocks (costmodel.kv_groups): Gemma-3-27B's shape, 52 local layers of 62
    ("gemma3-27b-like", "h100-sxm:2", ServingLayout(tp=2), "long-context", 1.0),
    ("gemma3-27b-like", "h100-sxm:2", ServingLayout(tp=2), "agent", 8.0),
)
# Gemma-3-27B's text config (google/gemma-3-27b-it): a 1,024-token window in 5 of every 6 layers
GEMMA3_LIKE = dataclasses.replace(
    llama_spec("gemma3-27b-like", layers=62, hidden=5376, heads=32, kv_heads=16, ffn_hidden=21504, vocab=262_208,
               seq_len=131_072), head_dim=128, v_head_dim=128, attention_window=1024, windowed_layers=52)


def main() -> int:
    for model, cluster_text, layout, name, rate in CASES:
        spec, cluster = (GEMMA3_LIKE if model == GEMMA3_LIKE.name else ZOO[model]), load_cluster(cluster_text)
        reqs = generate(name, rate=rate, requests=10_000, context=spec.seq_len, seed=0)
        t0 = time.perf_counter()
        r = simulate_traffic(spec, cluster, reqs, layout)
        dt = time.perf_counter() - t0
        m = r.metrics()
        print(f"{model} {name} at {rate:g}/s on {cluster_text} tp{layout.tp} x {layout.replicas}: 10,000 requests in "
              f"{dt:.2f} s ({r.iterations} iterations; TTFT p99 {m['ttft_p99_s'] * 1e3:.0f} ms, TPOT p99 "
              f"{m['tpot_p99_s'] * 1e3:.1f} ms)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
