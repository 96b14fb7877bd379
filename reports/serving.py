"""The serving report: for a model on one or more cluster sizes, every tp x pp layout's
throughput against time per output token as the batch grows, its KV capacity and batch
limits (paged blocks against contiguous allocation), and the best layout within latency
targets. Markdown with a CSV and two pictures.

    python -m reports.serving --model llama2-70b --cluster h100-sxm:4 --cluster h100-sxm:8 -o DIR
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402

from costmodel import load_cluster  # noqa: E402
from costmodel.serving import ServingRequest, kv_bytes_per_token, plan_serving  # noqa: E402
from costmodel.spec import ModelSpec  # noqa: E402
from planner.files import make_output_dir  # noqa: E402


def serving_table(spec: ModelSpec, clusters: list[str], req: ServingRequest) -> tuple[pd.DataFrame, dict]:
    rows, best = [], {}
    for text in clusters:
        found = plan_serving(spec, load_cluster(text), req)
        best[text] = found.best
        for _, points in sorted(found.curves.items()):
            for p in points:
                rows.append({"cluster": text, "layout": p.label, **p.to_dict()})
    return pd.DataFrame(rows), best


def curves_figure(table: pd.DataFrame, path: Path, title: str, max_tpot_ms: float | None) -> None:
    clusters = list(dict.fromkeys(table["cluster"]))
    layouts = list(dict.fromkeys(table["layout"]))
    colors = {name: plt.get_cmap("tab10")(i % 10) for i, name in enumerate(layouts)}  # one color per layout everywhere
    fig, axes = plt.subplots(1, len(clusters), figsize=(6 * len(clusters), 4.5), sharey=True, squeeze=False)
    for ax, text in zip(axes[0], clusters):
        sub = table[table["cluster"] == text]
        for layout, g in sub.groupby("layout", sort=False):
            ax.plot(g["tpot_ms"], g["throughput_tokens_per_s"], marker="o", markersize=3, label=layout,
                    color=colors[layout])
        ax.legend(fontsize=8, loc="lower right")
        if max_tpot_ms:
            ax.axvline(max_tpot_ms, color="black", linestyle="--", linewidth=1)
        ax.set_xlabel("time per output token (ms)")
        ax.set_title(text)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("output tokens/s (cluster)")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def capacity_figure(table: pd.DataFrame, path: Path, title: str) -> None:
    last = table.groupby(["cluster", "layout"], sort=False).tail(1)  # the largest batch: capacity
    labels = [f"{c}\n{l}" for c, l in zip(last["cluster"], last["layout"])]
    fig, ax = plt.subplots(figsize=(max(6, 0.8 * len(labels)), 4.5))
    x = range(len(labels))
    ax.bar([i - 0.2 for i in x], last["max_batch_paged"], width=0.4, label="paged blocks")
    ax.bar([i + 0.2 for i in x], last["max_batch_contiguous"], width=0.4, label="contiguous (whole context)")
    ax.set_xticks(list(x), labels, fontsize=7)
    ax.set_ylabel("sequences per replica")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def build_serving_report(spec: ModelSpec, clusters: list[str], req: ServingRequest, out_dir: Path) -> dict:
    table, best = serving_table(spec, clusters, req)
    make_output_dir(out_dir)  # once everything is priced: a refusal leaves nothing behind
    table.to_csv(out_dir / "serving.csv", index=False)
    targets = ", ".join(t for t in (f"TTFT <= {req.max_ttft_ms:g} ms" if req.max_ttft_ms else "",
                                    f"TPOT <= {req.max_tpot_ms:g} ms" if req.max_tpot_ms else "") if t) or "none"
    curves_figure(table, out_dir / "throughput_vs_latency.png",
                  f"{spec.name}: prompt {req.prompt_len}, output {req.output_len}", req.max_tpot_ms)
    capacity_figure(table, out_dir / "kv_capacity.png", f"{spec.name}: batch limit from the KV cache")
    lines = [
        f"# Serving {spec.name} on {' and '.join(clusters)}", "",
        f"Prompt {req.prompt_len} tokens, output {req.output_len}, {req.precision} weights and KV cache, "
        f"{req.block_tokens}-token KV blocks; latency targets: {targets}. KV cache "
        f"{kv_bytes_per_token(spec, req.kv_bytes_per_value) / 1024:.0f} KiB per token "
        f"({spec.kv_heads} KV heads of {spec.head_dim} for {spec.heads} query heads).", "",
        "## Best layout per cluster", "",
        "| cluster | layout | replicas | batch | TTFT ms | TPOT ms | tokens/s | KV tokens per replica | "
        "max batch paged | max batch contiguous |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for text, p in best.items():
        d = p.to_dict()
        lines.append(f"| {text} | tp{p.tp} x pp{p.pp} | {p.replicas} | {p.batch} | {d['ttft_ms']:.1f} | {d['tpot_ms']:.2f} | "
                     f"{d['throughput_tokens_per_s']:.0f} | {d['kv_capacity_tokens']} | {d['max_batch_paged']} | "
                     f"{d['max_batch_contiguous']} |")
    lines += ["", "![throughput against latency](throughput_vs_latency.png)", "",
              "Each curve is one layout with the batch doubling along it up to what its KV cache holds.", "",
              "![KV capacity](kv_capacity.png)", "",
              "Paged blocks hold a sequence's tokens as it grows (the prompt's blocks shared by beams); a contiguous "
              "allocator reserves the model's whole context per sequence, so it fits fewer.", "",
              "## Every layout and batch", "", "(also in `serving.csv`)", "",
              "| cluster | layout | batch | TTFT ms | TPOT ms | tokens/s |", "|---|---|---|---|---|---|"]
    lines += [f"| {r.cluster} | {r.layout} | {r.batch} | {r.ttft_ms:.1f} | {r.tpot_ms:.2f} | {r.throughput_tokens_per_s:.0f} |"
              for r in table.itertuples()]
    lines.append("")
    (out_dir / "report.md").write_text("\n".join(lines))
    return {cluster: p.to_dict() for cluster, p in best.items()}


def main(argv: list[str] | None = None) -> int:
    from planner.model_source import load_model_spec

    ap = argparse.ArgumentParser(prog="python -m reports.serving", description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--cluster", action="append", required=True)
    ap.add_argument("--prompt-len", type=int, default=1024)
    ap.add_argument("--output-len", type=int, default=256)
    ap.add_argument("--max-tpot-ms", type=float)
    ap.add_argument("-o", "--output", required=True)
    args = ap.parse_args(argv)
    req = ServingRequest(prompt_len=args.prompt_len, output_len=args.output_len, max_tpot_ms=args.max_tpot_ms)
    best = build_serving_report(load_model_spec(args.model), args.cluster, req, Path(args.output))
    for cluster, d in best.items():
        print(f"{cluster}: {d}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
