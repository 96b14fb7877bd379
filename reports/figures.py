"""The report's pictures (matplotlib, PNG): memory against capacity, throughput against
memory with the Pareto front, scaling with GPU count, the pipeline timeline of the best plan,
and where each strategy's step time goes."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402

from costmodel.result import StepResult  # noqa: E402

MEMORY_PARTS = ["parameters", "gradients", "optimizer", "activations", "other"]
TIME_PARTS = ["compute", "recompute", "tp_comm", "cp_comm", "ep_comm", "exposed_comm", "bubble"]
COLORS = {"parameters": "#4C72B0", "gradients": "#55A868", "optimizer": "#C44E52", "activations": "#8172B2",
          "other": "#937860", "compute": "#4C72B0", "recompute": "#8172B2", "tp_comm": "#DD8452",
          "cp_comm": "#DA8BC3", "ep_comm": "#8C613C", "exposed_comm": "#C44E52", "bubble": "#BBBBBB"}


def _short(name: str) -> str:
    return name.replace(" recompute", "").replace(" (no FlashAttention)", "*")


def _stacked_bars(rows: dict[str, dict[str, float]], order: list[str], parts: list[str], path: Path, *,
                  xlabel: str, title: str, capacity: float | None = None) -> None:
    """One horizontal bar per strategy, stacked by part, legend outside the plot."""
    fig, ax = plt.subplots(figsize=(10, 0.32 * len(order) + 1.5))
    left = [0.0] * len(order)
    for part in parts:
        values = [rows[n].get(part, 0.0) for n in order]  # ep_comm: mixtures of experts only
        ax.barh([_short(n) for n in order], values, left=left, color=COLORS[part], label=part.replace("_", " "))
        left = [a + b for a, b in zip(left, values)]
    if capacity is not None:
        ax.axvline(capacity, color="black", linestyle="--", linewidth=1)
        ax.text(capacity, -0.9, f" {capacity:g} GiB", va="bottom", fontsize=8)
        limit = 3 * capacity  # keep the bars near the capacity readable; longer ones are cut and labelled
        if max(left) > limit:
            ax.set_xlim(0, limit)
            for y, total in enumerate(left):
                if total > limit:
                    ax.text(limit, y, f"{total:,.0f} GiB → ", ha="right", va="center", fontsize=7, color="white")
    ax.set_xlabel(xlabel)
    ax.invert_yaxis()
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8)
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def memory_bars(results: dict[str, StepResult], order: list[str], path: Path) -> None:
    _stacked_bars({n: results[n].memory_gib for n in order}, order, MEMORY_PARTS, path,
                  xlabel="memory per GPU (GiB), worst rank", title="Memory of each strategy against the GPU's capacity",
                  capacity=results[order[0]].capacity_gib)


def pareto(table: pd.DataFrame, capacity_gib: float, path: Path) -> None:
    fig, ax = plt.subplots(figsize=(8, 5))
    fits = table[table["fits"]]
    ax.scatter(table["memory_gib"], table["tokens_per_s"], c=["#4C72B0" if f else "#BBBBBB" for f in table["fits"]], s=25)
    front, best = [], -1.0
    for _, row in fits.sort_values("memory_gib").iterrows():
        if row["tokens_per_s"] > best:
            front.append(row)
            best = row["tokens_per_s"]
    if front:
        ax.plot([r["memory_gib"] for r in front], [r["tokens_per_s"] for r in front], color="#C44E52", marker="o",
                label="Pareto front")
        for r in front:
            ax.annotate(_short(r["strategy"]), (r["memory_gib"], r["tokens_per_s"]), fontsize=7,
                        xytext=(4, 4), textcoords="offset points")
    ax.axvline(capacity_gib, color="black", linestyle="--", linewidth=1, label=f"capacity {capacity_gib:g} GiB")
    ax.set_xscale("log")
    ax.set_xlabel("memory per GPU (GiB, log)")
    ax.set_ylabel("tokens/s (cluster)")
    ax.set_title("Throughput against memory (grey: does not fit)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def scaling(curves: dict[str, list[tuple[int, float]]], path: Path) -> None:
    fig, ax = plt.subplots(figsize=(8, 5))
    for name, points in curves.items():
        if points:
            ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=_short(name))
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("GPUs")
    ax.set_ylabel("tokens/s (cluster)")
    ax.set_title("Scaling with GPU count, same global batch")
    if any(curves.values()):
        ax.legend(fontsize=7)
    else:  # nothing fits at any size: say so on the figure (a legend of nothing warned on stderr)
        ax.text(0.5, 0.5, "no strategy fits at any GPU count", transform=ax.transAxes, ha="center")
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def timeline(result: StepResult, path: Path, title: str) -> None:
    ranks = sorted({e.rank for e in result.events})
    fig, ax = plt.subplots(figsize=(11, 0.45 * len(ranks) + 1.5))
    colors = {"F": "#4C72B0", "B": "#55A868"}
    for e in result.events:
        if e.stream == "compute":
            ax.barh(e.rank, e.duration_s, left=e.start_s, color=colors[e.name[0]], edgecolor="white", linewidth=0.2)
        elif e.stream == "dp":
            ax.barh(e.rank + 0.35, e.duration_s, left=e.start_s, height=0.2, color="#C44E52")
        elif e.stream == "optimizer":
            ax.barh(e.rank, e.duration_s, left=e.start_s, color="#937860")
    ax.set_yticks(ranks, [f"stage {r}" for r in ranks])
    ax.invert_yaxis()
    ax.set_xlabel("time (s)")
    handles = [plt.Rectangle((0, 0), 1, 1, color=c) for c in ("#4C72B0", "#55A868", "#C44E52", "#937860")]
    ax.legend(handles, ["forward", "backward", "gradient reduction", "optimizer"], fontsize=8, loc="lower right")
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def breakdown(results: dict[str, StepResult], order: list[str], path: Path) -> None:
    _stacked_bars({n: results[n].time_s for n in order}, order, TIME_PARTS, path,
                  xlabel="seconds per step (bottleneck rank)", title="Where the step time goes (strategies that fit)")
