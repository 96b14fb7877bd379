"""Serving-simulator speed: 10,000 requests of each workload scenario through one layout
(target: under 10 s each on a 2-core machine). Run:
    python bench/traffic_speed.py
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from costmodel import load_cluster  # noqa: E402
from costmodel.traffic import ServingLayout, simulate_traffic  # noqa: E402
from costmodel.workload import generate  # noqa: E402
from planner.zoo import ZOO  # noqa: E402

CASES = (  # (model, cluster, layout, workload, rate): near each layout's capacity, where iterations are fullest
    ("llama3-8b", "h100-sxm:1", ServingLayout(tp=1), "chat", 30.0),
    ("llama3-8b", "h100-sxm:1", ServingLayout(tp=1), "long-context", 2.0),
    ("llama3-8b", "h100-sxm:1", ServingLayout(tp=1), "agent", 20.0),
    ("llama2-70b", "h100-sxm:8", ServingLayout(tp=4, replicas=2), "chat", 15.0),
)


def main() -> int:
    for model, cluster_text, layout, name, rate in CASES:
        spec, cluster = ZOO[model], load_cluster(cluster_text)
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
