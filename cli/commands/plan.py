"""`paraplan plan`: search for the fastest plan that fits and write it as YAML."""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace

from costmodel import ConfigError, load_cluster
from costmodel.runtime import DEFAULT_RUNTIME
from cli.commands.simulate import format_table, given_flags
from planner.files import atomic_write_text
from planner.graph_spec import NotADecoder
from planner.model_source import load_model, source_and_map
from planner.contract import RUNNABLE_RUNTIMES, model_planned_only, plan_problems, planned_only
from planner.plan import Plan, plan_from_strategy
from planner.search import SearchRequest, run_search
from cli.commands.serve import refuse_serving_flags


def plan_of_search(spec, found, cluster_text: str, stats: dict, cluster, source: dict | None = None) -> Plan:
    """The plan of a search result, with the placements the ILP chose. A plan priced for
    paraplan's own runtime is written only if `check` would accept it (the same function)."""
    plan = plan_from_strategy(spec, found.strategy, cluster_text, found.result.predicted(), stats,
                              runtime=found.result.runtime, profile=found.result.profile, source=source)
    plan = replace(plan, placements=found.placements)
    if plan.runtime in RUNNABLE_RUNTIMES:
        problems, _ = plan_problems(plan, cluster)
        # features the flags asked for, and models the runtime does not build: noted
        built = model_planned_only(spec, plan.source)
        asked = set(planned_only(found.strategy, plan.mode).values()) | set(built)
        hard = [p for p in problems if p not in asked] if not built else []
        if hard:
            raise ConfigError(f"the best plan found would not run: {hard[0]}")
        for p in problems:
            print(f"paraplan: note: `paraplan run` will refuse this plan: {p}", file=sys.stderr)
    return plan


def run_plan(args: argparse.Namespace) -> int:
    if getattr(args, "mode", "train") == "inference":
        from cli.commands.serve import run_serving

        return run_serving(args)
    refuse_serving_flags(args)
    if getattr(args, "from_engine", None):
        return run_plan_from(args)
    if not args.model or not args.cluster or args.global_batch is None:
        raise ConfigError("plan needs --model, --cluster and --global-batch")
    if args.global_batch < 1:
        raise ConfigError(f"--global-batch must be a positive integer, got {args.global_batch}")
    if args.time_limit is not None and args.time_limit <= 0:
        raise ConfigError(f"--time-limit must be positive seconds, got {args.time_limit}")
    try:
        spec, _ = load_model(args.model)
    except NotADecoder:
        return run_graph_plan(args)
    source, module_map, note = source_and_map(args.model, spec)
    cluster = load_cluster(args.cluster, runtime=args.runtime or DEFAULT_RUNTIME)
    fixed = given_flags(args)
    if module_map is not None and not module_map.groups:
        fixed.setdefault("tp", 1)  # no nn.Linear in its blocks for tensor parallelism to split (GPT-2's Conv1D)
    if "virtual_stages" in fixed and fixed["virtual_stages"] > 1:
        fixed.setdefault("schedule", "interleaved")
    req = SearchRequest(spec=spec, cluster=cluster, global_batch=args.global_batch, fixed=fixed,
                        time_limit_s=args.time_limit, progress=sys.stderr.isatty() and not args.json, source=source)
    found = run_search(req, module_map=module_map)
    if note:  # (said with a plan: a refusal is its one line)
        print(f"paraplan: note: {note}", file=sys.stderr)
    stats = dict(found.stats)
    if args.no_timing:
        for key in [k for k in stats if k.endswith("time_s") or k == "trace_s"]:
            del stats[key]
    plan = plan_of_search(spec, found, args.cluster, stats, cluster, source)
    if args.output:
        atomic_write_text(args.output, plan.to_yaml())
    if args.json:
        print(json.dumps({"plan": plan.to_dict()}, indent=2))
    else:
        print(format_table(spec, args.cluster, found.strategy, found.result, given=set(fixed) | ({"runtime"} if args.runtime else set()),
                           notes=(cluster.profile_note,)))
        print("  search       " + "  ".join(f"{k} {v}" for k, v in stats.items()))
        if args.output:
            print(f"  plan written to {args.output}")
    return 0


def run_graph_plan(args: argparse.Namespace) -> int:
    """`plan` of a module without attention layers: priced from its graph (planner.graph_plan)
    and printed; `paraplan run` trains decoder-only language models, so no plan file."""
    from planner.graph_plan import plan_graph
    from planner.model_source import python_module

    if args.output:
        raise ConfigError(f"{args.model} has no attention layers: paraplan plans it from its graph and prints the "
                          "plan, but `paraplan run` trains decoder-only language models, so no plan file is written; "
                          "drop -o")
    module, inputs = python_module(args.model)
    cluster = load_cluster(args.cluster, runtime=args.runtime or DEFAULT_RUNTIME)
    plans = plan_graph(module, inputs, cluster, args.global_batch, fixed=given_flags(args),
                       progress=sys.stderr.isatty() and not args.json)
    best = plans[0]
    if not best.fits:
        raise ConfigError(f"{args.model} does not fit on {cluster.name}: the smallest layout needs "
                          f"{min(p.memory_gib['total'] for p in plans):.1f} GiB per GPU against "
                          f"{cluster.device.hbm_gib:g} GiB; use more GPUs")
    rows = [{"tp": p.tp, "dp": p.dp, "zero": p.zero, "microbatch_size": p.microbatch_size,
             "step_time_s": round(p.step_time_s, 6), "samples_per_s": round(p.samples_per_s, 3),
             "memory_gib": round(p.memory_gib["total"], 3), "fits": p.fits} for p in plans]
    if args.json:
        print(json.dumps({"model": args.model, "cluster": args.cluster, "priced": "graph",
                          "best": {**rows[0], "time_s": best.time_s, "memory_gib": best.memory_gib,
                                   "placements": best.placements}, "candidates": rows}, indent=2))
        return 0
    print(f"{args.model} on {args.cluster}: no attention layers, planned from its graph (not runnable by "
          "`paraplan run`, which trains decoder-only language models)")
    print(f"  mesh         dp {best.dp} x tp {best.tp}; zero {best.zero}; {best.num_microbatches} microbatches of "
          f"{best.microbatch_size}")
    print(f"  step time    {best.step_time_s:.4g} s   ({best.samples_per_s:.4g} samples/s)")
    print("  time (s)     " + "  ".join(f"{k} {v:.4g}" for k, v in best.time_s.items()))
    print("  memory (GiB) " + "  ".join(f"{k} {v:.2f}" for k, v in best.memory_gib.items()))
    for name, axes in best.placements.items():
        print(f"  placement    {name}: {axes or 'replicated'}")
    print(f"  layouts      {len(plans)} priced; next best: " + "; ".join(
        f"dp {p.dp} x tp {p.tp} zero {p.zero} mb {p.microbatch_size} {p.step_time_s:.4g} s" for p in plans[1:3]))
    return 0


def run_plan_from(args: argparse.Namespace) -> int:
    """`plan --from ENGINE FILE`: price the user's config, search from its model, batch,
    sequence and precision, and say what changes and by how much."""
    from cli.commands.engines import read_engine_config, unknown_line
    from costmodel import predict

    if not args.cluster:
        raise ConfigError("plan --from ENGINE FILE needs --cluster")
    cluster = load_cluster(args.cluster, runtime=args.runtime or DEFAULT_RUNTIME)
    given_spec = load_model(args.model)[0] if args.model else None
    imported = read_engine_config(args.from_engine[0], args.from_engine[1], cluster, args.seq_len, given_spec)
    spec = given_spec or imported.spec
    if spec is None:
        raise ConfigError(f"the {args.from_engine[0]} config does not give the model's shape; add --model")
    theirs = imported.strategy
    current = predict(spec, theirs, cluster)
    fixed = {**given_flags(args), "seq_len": theirs.seq_len, "precision": theirs.precision.value}
    req = SearchRequest(spec=spec, cluster=cluster, global_batch=args.global_batch or theirs.global_batch, fixed=fixed,
                        time_limit_s=args.time_limit, progress=sys.stderr.isatty() and not args.json)
    found = run_search(req)
    plan = plan_of_search(spec, found, args.cluster, dict(found.stats), cluster)
    changes = strategy_changes(theirs, found.strategy)
    speedup = current.step_time_s / found.result.step_time_s
    if args.output:
        atomic_write_text(args.output, plan.to_yaml())
    if args.json:
        print(json.dumps({"from": args.from_engine[0], "current": current.predicted(), "plan": plan.to_dict(),
                          "changes": changes, "speedup": speedup, "not_understood": list(imported.unknown)}, indent=2))
        return 0
    print(f"{spec.name} on {args.cluster}: your {args.from_engine[0]} config, priced")
    print(format_table(spec, args.cluster, theirs, current, notes=(cluster.profile_note,)))
    print(unknown_line(imported))
    print()
    fits = "" if current.fits else " (yours does not fit)"
    print(f"paraplan's plan: {found.result.step_time_s:.4g} s/step against {current.step_time_s:.4g} s: "
          f"{speedup:.2f}x{fits}")
    for name, (old, new) in changes.items():
        print(f"  {name:<18} {old!s:>12} -> {new!s}")
    if not changes:
        print("  nothing: your config is the best paraplan finds")
    if args.output:
        print(f"  plan written to {args.output}")
    return 0


def strategy_changes(old, new) -> dict[str, tuple]:
    """The settings two strategies differ in, as (old, new)."""
    keys = ("tp", "pp", "dp", "cp", "zero", "dp_shard", "sequence_parallel", "recompute", "microbatch_size",
            "schedule", "virtual_stages")
    out = {}
    for k in keys:
        a, b = getattr(old, k), getattr(new, k)
        a, b = getattr(a, "value", a), getattr(b, "value", b)
        if a != b:
            out[k] = (a, b)
    return out
