"""`paraplan report`: the planner's choice next to the canonical strategies, simulated, as
Markdown (and HTML) with a CSV table and pictures."""

from __future__ import annotations

import html
import time
from dataclasses import replace
from pathlib import Path

from costmodel import ConfigError, Strategy, predict
from costmodel.cluster import Cluster
from costmodel.spec import ModelSpec, format_count
from planner.files import make_output_dir
from planner.search import SearchRequest, run_search
from reports import figures
from reports.analysis import describe, evaluate, what_binds
from reports.strategies import canonical

PLANNER = "planner's choice"


def cluster_of_size(cluster: Cluster, gpus: int) -> Cluster:
    per_node = min(cluster.gpus_per_node, gpus)
    return replace(cluster, name=f"{cluster.device.name}:{gpus}", nodes=gpus // per_node, gpus_per_node=per_node)


def scaling_curves(spec: ModelSpec, cluster: Cluster, strategies: dict[str, Strategy]) -> dict[str, list[tuple[int, float]]]:
    """Tokens/s of each strategy as the data-parallel degree follows the GPU count."""
    sizes = [n for n in (8 * 2**k for k in range(20)) if n <= cluster.world_size]
    curves = {}
    for name, s in strategies.items():
        points = []
        inner = s.tp * s.pp * s.cp
        for n in sizes:
            if n % inner:
                continue
            dp = n // inner
            group = min(s.shard_group, dp) if s.zero > 0 else 1
            try:
                scaled = s.replace(dp=dp, shard_group=group if dp % group == 0 else dp)
                r = predict(spec, scaled, cluster_of_size(cluster, n))
            except ConfigError:
                continue
            if r.fits:
                points.append((n, r.tokens_per_s))
        curves[name] = points
    return curves


def best_at_each_size(spec: ModelSpec, cluster: Cluster, global_batch: int) -> list[tuple[int, float]]:
    """The fastest canonical strategy that fits, re-chosen at every GPU count."""
    points = []
    for n in (8 * 2**k for k in range(20)):
        if n > cluster.world_size:
            break
        sized = cluster_of_size(cluster, n)
        options = canonical(spec, sized, global_batch)
        rates = []
        for s in options.values():
            r = predict(spec, s, sized)
            if r.fits:
                rates.append(r.tokens_per_s)
        if rates:
            points.append((n, max(rates)))
    return points


def build_report(spec: ModelSpec, cluster: Cluster, global_batch: int, out_dir: Path,
                 formats: tuple[str, ...] = ("md",), progress: bool = False,
                 extra: dict[str, Strategy] | None = None) -> dict:
    """The report of `spec` on `cluster`: the canonical strategies, the planner's and `extra`
    (a user's plan, by name) ranked together."""
    t0 = time.perf_counter()
    make_output_dir(out_dir)
    skipped: dict[str, str] = {}
    strategies = {**(extra or {}), **canonical(spec, cluster, global_batch, skipped)}
    try:
        found = run_search(SearchRequest(spec=spec, cluster=cluster, global_batch=global_batch, progress=progress))
        strategies = {PLANNER: found.strategy, **strategies}
    except ConfigError as exc:
        found = None
        planner_note = str(exc)
    table, results = evaluate(spec, cluster, strategies)
    table.to_csv(out_dir / "strategies.csv", index_label="rank")
    order = list(table["strategy"])
    fitting = [n for n in order if results[n].fits]
    figures.memory_bars(results, order, out_dir / "memory.png")
    figures.pareto(table, cluster.device.hbm_gib, out_dir / "throughput_vs_memory.png")
    top = {n: strategies[n] for n in fitting[:4]}
    curves = {"best canonical strategy at each size": best_at_each_size(spec, cluster, global_batch),
              **scaling_curves(spec, cluster, top)}
    figures.scaling(curves, out_dir / "scaling.png")
    if fitting:
        best = fitting[0]
        with_events = predict(spec, strategies[best], cluster, record_events=True)
        figures.timeline(with_events, out_dir / "timeline.png", f"Pipeline timeline of the best plan: {best}")
        figures.breakdown(results, fitting, out_dir / "breakdown.png")
    summary = {"model": spec.name, "cluster": cluster.name, "runtime": cluster.runtime.name, "profile": cluster.profile,
               "global_batch": global_batch, "strategies": len(order),
               "fitting": len(fitting), "best": fitting[0] if fitting else None, "seconds": time.perf_counter() - t0,
               # a given plan's rank among the strategies that fit (ties share the better rank); None: it does not fit
               **({"ranks": {name: 1 + sum(results[n].step_time_s < results[name].step_time_s * (1 - 1e-6)
                                            for n in fitting) if name in fitting else None
                             for name in extra}} if extra else {})}
    md = _markdown(spec, cluster, global_batch, table, results, strategies, fitting,
                   None if found else planner_note, summary, skipped)
    if "md" in formats:
        (out_dir / "report.md").write_text(md)
    if "html" in formats:
        (out_dir / "report.html").write_text(_html(spec, cluster, table, summary))
    summary["seconds"] = round(time.perf_counter() - t0, 2)
    return summary


def _markdown(spec, cluster, batch, table, results, strategies, fitting, planner_note, summary, skipped) -> str:
    lines = [f"# {spec.name} on {cluster.name}, global batch {batch}", ""]
    lines.append(f"{spec.name}: {format_count(spec.num_params)} parameters, {spec.layers} layers, hidden {spec.hidden}, "
                 f"{spec.heads} heads ({spec.kv_heads} KV), sequence {spec.seq_len}. {cluster.world_size} x "
                 f"{cluster.device.name} ({cluster.device.hbm_gib:g} GiB), {cluster.gpus_per_node} per node. "
                 f"Priced with the training runtime `{cluster.runtime.name}` on the hardware profile "
                 f"`{cluster.profile}`; MFU counts attention over the full s x s, over the datasheet's peak.")
    lines.append("")
    if fitting:
        best = fitting[0]
        r = results[best]
        lines.append(f"**Best: {best}** ({describe(strategies[best])}): {r.tokens_per_s:,.0f} tokens/s, "
                     f"MFU {100 * r.mfu:.1f}%, {r.step_time_s:.3f} s per step, {r.memory_gib['total']:.1f} GiB per GPU."
                     + (f" A mixture of experts ({spec.experts_per_token} of {spec.experts} routed, "
                        f"{format_count(spec.active_params())} of {format_count(spec.num_params)} parameters active "
                        f"per token): expert states {r.memory_gib.get('experts', 0.0):.1f} GiB per GPU, all-to-alls "
                        f"{r.time_s.get('ep_comm', 0.0):.3f} s of the step." if spec.moe else ""))
    else:
        lines.append("**No strategy fits in memory.**")
    if planner_note:
        lines.append(f"The planner found nothing: {planner_note}")
    for name, rank in summary.get("ranks", {}).items():
        lines.append(f"**{name}** ({describe(strategies[name])}) " + (
            f"ranks {rank} of the {summary['fitting']} that fit." if rank else f"does not fit: {what_binds(results[name])}."))
    lines += ["", f"{summary['strategies']} strategies simulated, {summary['fitting']} fit.", "",
              "## Ranked strategies", "", "(also in `strategies.csv`; * = selective recompute without FlashAttention)", "",
              "| # | strategy | tokens/s | MFU | step s | GiB/GPU | fits | what binds |", "|---|---|---|---|---|---|---|---|"]
    for i, row in table.iterrows():
        lines.append(f"| {i} | {row['strategy']} | {row['tokens_per_s']:,.0f} | {100 * row['mfu']:.1f}% | "
                     f"{row['step_time_s']:.3f} | {row['memory_gib']:.1f} | {'yes' if row['fits'] else 'no'} | {row['binds']} |")
    if skipped:
        lines += ["", "Not formed on this cluster: " + "; ".join(f"{k} ({v})" for k, v in skipped.items()) + "."]
    lines += ["", "## Memory against capacity", "", "![memory](memory.png)", "",
              "## Throughput against memory", "", "![pareto](throughput_vs_memory.png)", "",
              "## Scaling with GPU count", "", "The best canonical strategy that fits at each GPU count, and the four "
              "best strategies here with data parallelism following the GPU count; same global batch.", "", "![scaling](scaling.png)", ""]
    if fitting:
        lines += ["## Pipeline timeline of the best plan", "", "![timeline](timeline.png)", "",
                  "## Where the step time goes", "", "![breakdown](breakdown.png)", ""]
    return "\n".join(lines)


def _html(spec, cluster, table, summary) -> str:
    images = "".join(f'<h2>{t}</h2><img src="{f}" style="max-width:100%">' for t, f in (
        ("Memory against capacity", "memory.png"), ("Throughput against memory", "throughput_vs_memory.png"),
        ("Scaling with GPU count", "scaling.png"), ("Pipeline timeline of the best plan", "timeline.png"),
        ("Where the step time goes", "breakdown.png")))
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(spec.name)} on "
            f"{html.escape(cluster.name)}</title><style>body{{font-family:sans-serif;max-width:1100px;margin:auto}}"
            f"table{{border-collapse:collapse;font-size:13px}}td,th{{border:1px solid #ccc;padding:3px 6px}}</style>"
            f"</head><body><h1>{html.escape(spec.name)} on {html.escape(cluster.name)}</h1>"
            f"<p>Best: {html.escape(str(summary['best']))}</p>{table.to_html(float_format=lambda x: f'{x:.4g}')}"
            f"{images}</body></html>")
