"""`paraplan report` (strategies compared, in a folder) and `paraplan compare` (plans side by side)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from costmodel import ConfigError, load_cluster
from planner.pricing import price_step
from costmodel.runtime import DEFAULT_RUNTIME
from planner.model_source import load_model_spec
from planner.plan import Plan


def run_report(args: argparse.Namespace) -> int:
    from reports.build import build_report

    formats = tuple(f.strip() for f in args.format.split(",") if f.strip())
    bad = [f for f in formats if f not in ("md", "html")]
    if bad or not formats:
        raise ConfigError(f"--format {args.format!r}: use md, html or md,html")
    if args.global_batch < 1:
        raise ConfigError(f"--global-batch must be a positive integer, got {args.global_batch}")
    out = Path(args.output)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"-o {out} is a file; give a folder for the report")
    spec = load_model_spec(args.model)
    cluster = load_cluster(args.cluster, runtime=args.runtime or DEFAULT_RUNTIME)
    summary = build_report(spec, cluster, args.global_batch, out, formats, progress=sys.stderr.isatty() and not args.json)
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        print(f"report of {summary['strategies']} strategies ({summary['fitting']} fit) in {out}/report.md; "
              f"best: {summary['best']}; {summary['seconds']:.1f} s")
    return 0


def run_compare(args: argparse.Namespace) -> int:
    rows = []
    for path in args.plans:
        plan = Plan.load(path)
        result = price_step(plan.spec, plan.strategy(), load_cluster(plan.cluster, runtime=plan.runtime), plan.placements,
                            plan.source).predicted()
        mesh = " x ".join(f"{k} {v}" for k, v in plan.mesh.items() if v > 1) or "1 GPU"
        rows.append({"plan": path, "model": plan.model.get("name"), "cluster": plan.cluster, "mesh": mesh,
                     "zero": plan.zero, "schedule": plan.schedule["name"], **{k: result[k] for k in (
                         "step_time_s", "tokens_per_s", "mfu", "bubble_fraction", "fits")},
                     "memory_gib": result["memory_gib"]["total"]})
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    keys = ["plan", "model", "cluster", "mesh", "zero", "schedule", "step_time_s", "tokens_per_s", "mfu",
            "bubble_fraction", "memory_gib", "fits"]
    width = max(len(k) for k in keys)
    for k in keys:
        cells = [f"{r[k]:.4g}" if isinstance(r[k], float) else str(r[k]) for r in rows]
        print(f"{k:<{width}}  " + "  ".join(f"{c:>24}" for c in cells))
    return 0
