"""Serving: the traffic simulator against published engine runs.

    python bench/serving_fidelity.py

Rows: tests/data/serving_runs.yaml (TensorRT-LLM's published A100 FP16 runs: offline throughput
of a static batch at fixed prompt and output lengths, and the first-token latency of one
request; sources and readings in the file). Each throughput run is simulated as it ran: all
requests at time 0, at most `batch` sequences in an iteration, whole prompts (no chunking: the
engine's context phase runs the batch's prompts together), on the a100-80g profile; throughput
is output tokens per second per GPU. First-token rows are one request's TTFT. Nothing is fitted
to these rows: the profile is the one the training side uses. Prints each row, then the median
and 90th percentile of |error| per kind.
"""

from __future__ import annotations

import statistics
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from costmodel.cluster import load_cluster  # noqa: E402
from costmodel.spec import Activation, ModelSpec  # noqa: E402
from costmodel.traffic import SchedulerConfig, ServingLayout, simulate_traffic  # noqa: E402
from costmodel.workload import Request  # noqa: E402
from planner.zoo import ZOO  # noqa: E402

DATA = ROOT / "tests" / "data" / "serving_runs.yaml"
# GPT-J 6B as its config (EleutherAI/gpt-j-6b): the benchmark ran 2048 + 2048 tokens, past its 2048 positions
GPT_J = ModelSpec(name="gpt-j-6b", layers=28, hidden=4096, heads=16, ffn_hidden=16384, vocab=50400, seq_len=4096,
                  activation=Activation.GELU, tied_embeddings=False)


def spec_of(name: str) -> ModelSpec:
    return GPT_J if name == GPT_J.name else ZOO[name]


def offline_throughput(row: dict) -> float:
    """Output tokens per second per GPU of the static batch."""
    spec = spec_of(row["model"])
    cluster = load_cluster(f"{row['gpu']}:{row['tp']}")
    reqs = [Request(id=i, arrival_s=0.0, prompt_tokens=row["input"], output_tokens=row["output"])
            for i in range(row["batch"])]
    cfg = SchedulerConfig(max_num_seqs=row["batch"], chunked_prefill=False,
                          max_num_batched_tokens=row["batch"] * row["input"], prefix_caching=False)
    r = simulate_traffic(spec, cluster, reqs, ServingLayout(tp=row["tp"], precision="fp16"), cfg)
    return r.throughput_tokens_per_s / row["tp"]


def first_token_ms(row: dict) -> float:
    spec = spec_of(row["model"])
    cluster = load_cluster(f"{row['gpu']}:{row['tp']}")
    r = simulate_traffic(spec, cluster, [Request(id=0, arrival_s=0.0, prompt_tokens=row["input"], output_tokens=1)],
                         ServingLayout(tp=row["tp"], precision="fp16"), SchedulerConfig(prefix_caching=False))
    return float(r.ttft_s[0]) * 1e3


def summary(errors: list[float], optimistic_sign: int = 1) -> str:
    """Median and 90th percentile of |error|; `optimistic_sign` +1 where more is better (throughput),
    -1 where less is (latency)."""
    a = sorted(abs(e) for e in errors)
    p90 = a[min(len(a) - 1, round(0.9 * (len(a) - 1)))]
    optimistic = sum(e * optimistic_sign > 0 for e in errors)
    return f"median |error| {statistics.median(a):.1f}%, p90 {p90:.1f}%, {optimistic} of {len(a)} optimistic"


def main() -> int:
    data = yaml.safe_load(DATA.read_text())
    print("offline throughput, output tokens/s per GPU (predicted / published)")
    errors = []
    for row in data["throughput"]:
        pred = offline_throughput(row)
        err = 100 * (pred / row["tokens_per_s_gpu"] - 1)
        errors.append(err)
        print(f"  {row['model']:11s} {row['gpu']} tp{row['tp']} batch {row['batch']:5d} {row['input']:5d}/{row['output']:<5d}"
              f" {pred:8.0f} / {row['tokens_per_s_gpu']:6d}  {err:+6.1f}%  ({row['source']})")
    print(f"  {summary(errors)}")
    print("first-token latency of one request, ms (predicted / published)")
    ttft_errors = []
    for row in data["first_token"]:
        pred = first_token_ms(row)
        err = 100 * (pred / row["ttft_ms"] - 1)
        ttft_errors.append(err)
        print(f"  {row['model']:11s} {row['gpu']} tp{row['tp']} prompt {row['input']:5d} {pred:7.1f} / {row['ttft_ms']:4d}"
              f"  {err:+6.1f}%  ({row['source']})")
    print(f"  {summary(ttft_errors, optimistic_sign=-1)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
