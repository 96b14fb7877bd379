"""Mixture-of-experts training throughput: predicted against published runs.

    python bench/moe_fidelity.py

Rows: tests/data/moe_runs.yaml (Megatron-Core's published performance tables for DeepSeek-V3,
Qwen3-30B-A3B and Qwen3-235B-A22B on GB200, B200 and H100, and DeepSeek-V3's own run on 2048
H800, each with its source and settings). Each run is priced with its own layout (tp, pp,
virtual stages, ep folded into data parallelism, the distributed optimizer as ZeRO-1) on the
`megatron-core` runtime profile; force-balanced benchmarks with a balanced router (load spread
0), DeepSeek's own run with the default spread. Prints per run the predicted and published
tokens/s per GPU and the error, then the median and 90th percentile of |error|.

Then one MoE layer on one GPU, measured: paraplan's own MoE module (grouped GEMMs) on an H200
for the busiest rank of those layouts (bench/data/moe_layer_h200.json, written by
bench/device/moe_layer.py) against `costmodel.moe.moe_cost` on the measured H200 profile with
the paraplan runtime's terms (its memory-bound traffic and the host floor): forward + backward
wall time per token count, and the median and 90th percentile of |error|.
"""

from __future__ import annotations

import json
import statistics
import sys
import tempfile
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from costmodel import Strategy, predict  # noqa: E402
from costmodel.cluster import load_cluster  # noqa: E402
from costmodel.moe import EXPERT_LOAD_CV, ExpertLayout, moe_cost  # noqa: E402
from costmodel.runtime import load_runtime  # noqa: E402
from planner.zoo import ZOO  # noqa: E402

DATA = ROOT / "tests" / "data" / "moe_runs.yaml"
MEASURED = ROOT / "bench" / "data" / "moe_layer_h200.json"


def case(row: dict):
    spec = ZOO[row["model"]]
    dp = row["gpus"] // (row["tp"] * row["pp"])
    strategy = Strategy(
        tp=row["tp"], pp=row["pp"], dp=dp, ep=row["ep"], zero=1, sequence_parallel=row["tp"] > 1,
        microbatch_size=row["mbs"], global_batch=row["gbs"], seq_len=row["seq"], precision=row["precision"],
        schedule="interleaved" if row["vp"] > 1 else "1f1b", virtual_stages=row["vp"],
        expert_load_cv=0.0 if row["balanced"] else EXPERT_LOAD_CV, ep_overlap=bool(row.get("a2a_overlap", False)),
    )
    text = f"{row['gpu']}:{row['gpus']}"
    if row["gpu"] == "gb200" and row["gpus"] > 64:
        # a power-of-two job on NVL72 racks runs 64 GPUs of each rack's NVLink domain (an assumption)
        path = Path(tempfile.mkdtemp()) / "gb200.yaml"
        path.write_text(yaml.safe_dump({"device": "gb200", "nodes": row["gpus"] // 64, "gpus_per_node": 64}))
        text = str(path)
    cluster = load_cluster(text, runtime="megatron-core")
    return spec, strategy, cluster


def percentiles(errs: list[float]) -> tuple[float, float]:
    """(median, 90th percentile) of |error|."""
    abs_errs = sorted(abs(e) for e in errs)
    return statistics.median(abs_errs), abs_errs[min(len(abs_errs) - 1, int(round(0.9 * (len(abs_errs) - 1))))]


def layer_rows(measured: dict, runtime: str = "paraplan") -> list[tuple[dict, float]]:
    """(measured row, predicted forward + backward seconds) of each grouped-GEMM case of one GPU."""
    from bench.device.moe_layer import case_spec  # the layer the measurement ran

    cluster = load_cluster("h200-measured:1")
    rt = load_runtime(runtime)
    one = cluster.group(1, 1)
    layout = ExpertLayout(ep=1, etp=1, edp=1, ep_group=one, etp_group=one)
    out = []
    for row in measured["cases"]:
        if row["path"] != "auto":
            continue
        spec = case_spec(row["model"], row["ep"])
        cost = moe_cost(spec, device=cluster.device, dtype="bf16", bytes_per_value=2, batch=1,
                        seq_local=row["tokens"], tp=1, layout=layout, expert_cv=0.0,
                        elementwise_traffic=rt.elementwise_traffic, host_us=rt.moe_host_us)
        out.append((row, cost.forward_s + cost.backward_s))
    return out


def main() -> int:
    rows = yaml.safe_load(DATA.read_text())["rows"]
    errs = []
    print(f"{'run':58s} {'predicted':>10s} {'published':>10s} {'error':>7s}  fits  ep_comm share")
    for row in rows:
        spec, strategy, cluster = case(row)
        r = predict(spec, strategy, cluster)
        per_gpu = r.tokens_per_s / cluster.world_size
        err = per_gpu / row["tokens_per_s_gpu"] - 1
        errs.append(err)
        name = (f"{row['model']} {row['gpu']}:{row['gpus']} {row['precision']} pp{row['pp']}v{row['vp']} "
                f"ep{row['ep']} ({row['source']})")
        share = r.time_s.get("ep_comm", 0.0) / r.step_time_s
        print(f"{name:58s} {per_gpu:10.0f} {row['tokens_per_s_gpu']:10d} {100 * err:+6.1f}%  {str(r.fits):5s} "
              f"{100 * share:5.1f}%")
    median, p90 = percentiles(errs)
    print(f"\n{len(errs)} runs: median |error| {100 * median:.1f}%, 90th percentile "
          f"{100 * p90:.1f}%, optimistic {sum(e > 0 for e in errs)} of {len(errs)}")
    measured = json.loads(MEASURED.read_text())
    print(f"\nOne MoE layer on one {measured['device']} (paraplan's module, torch {measured['torch']}, bf16, "
          "forward + backward), measured against predicted:")
    print(f"{'case':22s} {'tokens':>7s} {'measured ms':>12s} {'predicted ms':>13s} {'error':>7s}")
    errs = []
    for row, predicted_s in layer_rows(measured):
        err = predicted_s / row["wall_s"] - 1
        errs.append(err)
        print(f"{row['case']:22s} {row['tokens']:7d} {1e3 * row['wall_s']:12.2f} {1e3 * predicted_s:13.2f} "
              f"{100 * err:+6.1f}%")
    median, p90 = percentiles(errs)
    print(f"{len(errs)} layer runs: median |error| {100 * median:.1f}%, 90th percentile {100 * p90:.1f}%, "
          f"optimistic {sum(e < 0 for e in errs)} of {len(errs)} (faster than measured)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
