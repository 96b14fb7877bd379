"""The serving-under-traffic report: for a model on a cluster and each workload, the goodput
planner's unit (planner.serving_search) against the best static layout (the steady-state
planner's pick, costmodel.serving.plan_serving, at the workload's mean lengths and the same
latency targets), each unit's goodput per GPU, their latency against the arrival rate, and a
timeline of the planner's unit (KV cache in use and sequences running). Markdown, a CSV and
pictures.

    python -m reports.traffic --model llama3-8b --cluster h100-sxm:8 -o DIR
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from costmodel import load_cluster  # noqa: E402
from costmodel.spec import ModelSpec  # noqa: E402
from costmodel.serving_engine import DEFAULT_ENGINE  # noqa: E402
from costmodel.traffic import SLO, SchedulerConfig, simulate_traffic  # noqa: E402
from costmodel.workload import mean_lengths  # noqa: E402
from planner.model_source import load_model_spec  # noqa: E402
from planner.files import make_output_dir  # noqa: E402
from planner.serving_search import (TrafficWorkload, meets, plan_traffic, static_unit,  # noqa: E402
                                    unit_bound, unit_max_rate)

# per workload: latency objectives (our choice: interactive chat and agents within a second to
# the first token and 50 ms a token; a long document may take 5 s to read) and a rate to deploy for
WORKLOADS = {
    "chat": ("ttft_p99=1,tpot_p99=50ms", 20.0),
    "long-context": ("ttft_p99=5,tpot_p99=50ms", 2.0),
    "agent": ("ttft_p99=1,tpot_p99=50ms", 20.0),
}


@dataclass(frozen=True, slots=True)
class Row:
    workload: str
    who: str  # "planner" or "static"
    unit: str
    gpus: int
    max_rate_rps: float
    goodput_per_gpu: float


def rate_curve(spec, cluster, unit, cfg, wl, slo, top: float, points: int = 6) -> list[dict]:
    rows = []
    for share in np.linspace(0.25, 1.5, points):
        rate = max(top, 0.05) * share
        r = simulate_traffic(spec, cluster, wl.probe(rate, spec.context_len), unit, cfg, slo)
        m = r.metrics()
        rows.append({"rate_rps": rate, "ttft_p99_s": m["ttft_p99_s"], "tpot_p99_s": m["tpot_p99_s"],
                     "meets": meets(r, slo, 0.2)})
    return rows


def build_traffic_report(model: str | ModelSpec, cluster_text: str, out_dir: Path, workloads=WORKLOADS,
                         engine: str | None = None, memory: dict | None = None,
                         precision: str = "bf16") -> pd.DataFrame:
    """`model`: a name or file (load_model_spec), or the spec itself (a served context cut);
    `memory`: the KV cache's dtype and the GPU's share (SchedulerConfig's fields) where given;
    `precision`: the weights' (an fp8 checkpoint's fp8)."""
    spec = model if isinstance(model, ModelSpec) else load_model_spec(model)
    cluster = load_cluster(cluster_text)
    engine, memory = engine or DEFAULT_ENGINE, memory or {}
    rows, curves, timelines = [], {}, {}
    for name, (slo_text, rate) in workloads.items():
        slo, wl = SLO.parse(slo_text), TrafficWorkload.of(name, requests=400)
        found = plan_traffic(spec, cluster, wl, rate, slo, engine=engine, precision=precision, **memory)
        best = found.best
        rows.append(Row(name, "planner", best.name(), best.gpus, best.max_rate_rps, best.goodput_per_gpu))
        prompt, output = mean_lengths(wl.probe(1.0, spec.context_len))
        curves[name] = {"planner": rate_curve(spec, cluster, best.unit, best.scheduler, wl, slo, best.max_rate_rps),
                        "slo": slo}
        static = static_unit(spec, cluster, prompt, output, slo, precision, engine=engine, **memory)
        if static is not None:  # the steady-state planner may find no layout within the targets
            unit, cfg = static[0], SchedulerConfig(max_num_seqs=static[1], engine=engine, **memory)
            top, _ = unit_max_rate(spec, cluster, unit, cfg, wl, slo,
                                   unit_bound(spec, cluster, unit, cfg, prompt, output, slo))
            rows.append(Row(name, "static", f"tp{unit.tp} x pp{unit.pp}, batch {cfg.max_num_seqs}", unit.gpus, top,
                            top / unit.gpus))
            curves[name]["static"] = rate_curve(spec, cluster, unit, cfg, wl, slo, top)
        timelines[name] = simulate_traffic(spec, cluster, wl.probe(best.max_rate_rps, spec.context_len), best.unit,
                                           best.scheduler, slo)
    table = pd.DataFrame([asdict(r) for r in rows])
    make_output_dir(out_dir)  # once everything is priced: a refusal leaves nothing behind
    table.to_csv(out_dir / "traffic.csv", index=False)
    _curves_figure(curves, out_dir / "latency_vs_rate.png", f"{spec.name} on {cluster_text}")
    _timeline_figure(timelines, out_dir / "timeline.png", f"{spec.name} on {cluster_text}: the planner's unit at its rate")
    lines = [f"# {spec.name} serving under traffic on {cluster_text}", "",
             "The goodput planner's unit (`paraplan plan --mode inference --workload W --rate R --slo ...`) against "
             "the best static layout (the steady-state planner's layout and batch at the workload's mean lengths and "
             "the same targets), each served by the traffic simulator at the largest rate that meets the objectives. "
             "Generated by `paraplan report --mode inference --workload W` (or `python -m reports.traffic`); predictions, not "
             "measurements.", "",
             "| workload | objectives | who | unit | GPUs | max rate (req/s) | goodput per GPU |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r.workload} | {workloads[r.workload][0]} | {r.who} | {r.unit} | {r.gpus} | "
                     f"{r.max_rate_rps:.2f} | {r.goodput_per_gpu:.3f} |")
    lines += ["", "![latency against rate](latency_vs_rate.png)", "", "![timeline](timeline.png)", ""]
    (out_dir / "README.md").write_text("\n".join(lines))
    return table


def _curves_figure(curves: dict, path: Path, title: str) -> None:
    fig, axes = plt.subplots(2, len(curves), figsize=(5 * len(curves), 7), squeeze=False)
    for col, (name, c) in enumerate(curves.items()):
        targets = {m: s for m, _, s in c["slo"].targets}
        for row, key in enumerate(("ttft_p99_s", "tpot_p99_s")):
            ax = axes[row][col]
            for who, style in (("planner", "o-"), ("static", "s--")):
                if who not in c:
                    continue
                pts = c[who]
                ax.plot([p["rate_rps"] for p in pts], [p[key] * 1e3 for p in pts], style, label=who)
            metric = key.split("_")[0]
            if metric in targets:
                ax.axhline(targets[metric] * 1e3, color="black", linewidth=1, linestyle=":")
            ax.set_yscale("log")
            ax.set_xlabel("arrival rate per unit (requests/s)")
            ax.set_ylabel(f"{metric.upper()} p99 (ms)")
            ax.set_title(name)
            ax.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _timeline_figure(results: dict, path: Path, title: str) -> None:
    fig, axes = plt.subplots(len(results), 1, figsize=(10, 2.6 * len(results)), squeeze=False)
    for ax, (name, r) in zip(axes[:, 0], results.items()):
        for i, (iterations, role) in enumerate(zip(r.timeline, r.roles)):
            if not iterations:
                continue
            t = [it[0] for it in iterations]
            ax.plot(t, [100 * it[2] for it in iterations], linewidth=0.8, label=f"replica {i} ({role}) KV %")
            ax.plot(t, [it[3] for it in iterations], linewidth=0.8, linestyle="--", label=f"replica {i} running")
        ax.set_title(name)
        ax.set_xlabel("time (s)")
        ax.legend(fontsize=7, ncol=2, loc="upper left")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m reports.traffic")
    p.add_argument("--model", required=True)
    p.add_argument("--cluster", required=True)
    p.add_argument("-o", "--output", required=True)
    args = p.parse_args(argv)
    print(build_traffic_report(args.model, args.cluster, Path(args.output)).to_string(index=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
