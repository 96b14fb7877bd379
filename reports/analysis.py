"""Strategies simulated side by side: a pandas table, and a plain sentence on what binds
each one that loses (memory, bubble, communication, recomputation)."""

from __future__ import annotations

import pandas as pd

from costmodel import Strategy, predict
from costmodel.cluster import Cluster
from costmodel.result import StepResult
from costmodel.spec import ModelSpec

COLUMNS = ["strategy", "tokens_per_s", "mfu", "step_time_s", "memory_gib", "fits", "binds"]


def describe(s: Strategy) -> str:
    mesh = " x ".join(f"{k} {v}" for k, v in s.mesh.items() if v > 1) or "1 GPU"
    if s.ep > 1:
        mesh += f" (ep {s.ep}" + (", whole experts)" if s.expert_tp == 1 and s.tp > 1 else ")")
    sched = f", {s.schedule.value}" + (f" v={s.virtual_stages}" if s.virtual_stages > 1 else "") if s.pp > 1 else ""
    return f"{mesh}, zero {s.zero}{', SP' if s.sequence_parallel else ''}, recompute {s.recompute.value}{sched}, mb {s.microbatch_size}"


def what_binds(result: StepResult, best: StepResult | None = None) -> str:
    """One sentence: why this strategy is slower than the best (or why it does not run)."""
    if not result.fits:
        return (f"memory: needs {result.memory_gib['total']:.1f} GiB per GPU, more than the "
                f"{result.capacity_gib:g} GiB the GPU has")
    t = result.time_s
    step = result.step_time_s
    losses = {
        "the pipeline bubble": t["bubble"],
        "tensor-parallel communication": t["tp_comm"],
        "data-parallel communication left exposed": t["exposed_comm"],
        "context-parallel communication": t["cp_comm"],
        "expert-parallel all-to-all": t.get("ep_comm", 0.0),
        "recomputation": t["recompute"],
    }
    name, seconds = max(losses.items(), key=lambda kv: kv[1])
    if best is not None and result is not best and step <= best.step_time_s * (1 + 1e-6):
        return f"ties the fastest; its largest overhead is {name} ({100 * seconds / step:.0f}% of the step)"
    if best is not None and result is not best and seconds / step < 0.02:
        return f"compute: {100 * result.mfu:.0f}% MFU against the best's {100 * best.mfu:.0f}% (smaller, less efficient GEMMs)"
    if best is None or result is best:
        return f"fastest; its largest overhead is {name} ({100 * seconds / step:.0f}% of the step)"
    return f"{name}: {100 * seconds / step:.0f}% of the step"


def evaluate(spec: ModelSpec, cluster: Cluster, strategies: dict[str, Strategy]) -> tuple[pd.DataFrame, dict[str, StepResult]]:
    results = {name: predict(spec, s, cluster, record_events=False) for name, s in strategies.items()}
    fitting = [r for r in results.values() if r.fits]
    best = max(fitting, key=lambda r: r.tokens_per_s) if fitting else None
    rows = []
    for name, r in results.items():
        p = r.predicted()
        rows.append({
            "strategy": name, "tokens_per_s": p["tokens_per_s"], "mfu": p["mfu"], "step_time_s": p["step_time_s"],
            "memory_gib": p["memory_gib"]["total"], "fits": p["fits"], "binds": what_binds(r, best),
            "layout": describe(strategies[name]),
        })
    table = pd.DataFrame(rows)
    table = table.sort_values(["fits", "tokens_per_s"], ascending=[False, False], kind="stable").reset_index(drop=True)
    table.index += 1
    return table, results
