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
from planner.model_source import load_model
from planner.contract import RUNNABLE_RUNTIMES, plan_problems
from planner.plan import Plan, plan_from_strategy
from planner.search import SearchRequest, run_search


def plan_of_search(spec, found, cluster_text: str, stats: dict, cluster) -> Plan:
    """The plan of a search result, with the placements the ILP chose. A plan priced for
    paraplan's own runtime is written only if `check` would accept it (the same function)."""
    plan = plan_from_strategy(spec, found.strategy, cluster_text, found.result.predicted(), stats,
                              runtime=found.result.runtime, profile=found.result.profile)
    plan = replace(plan, placements=found.placements)
    if plan.runtime in RUNNABLE_RUNTIMES:
        problems, _ = plan_problems(plan, cluster)
        if problems:
            raise ConfigError(f"the best plan found would not run: {problems[0]}")
    return plan


def run_plan(args: argparse.Namespace) -> int:
    if getattr(args, "mode", "train") == "inference":
        from cli.commands.serve import run_serving

        return run_serving(args)
    if not args.model or not args.cluster or args.global_batch is None:
        raise ConfigError("plan needs --model, --cluster and --global-batch")
    if args.global_batch < 1:
        raise ConfigError(f"--global-batch must be a positive integer, got {args.global_batch}")
    if args.time_limit is not None and args.time_limit <= 0:
        raise ConfigError(f"--time-limit must be positive seconds, got {args.time_limit}")
    spec, graph = load_model(args.model)
    cluster = load_cluster(args.cluster, runtime=args.runtime or DEFAULT_RUNTIME)
    fixed = given_flags(args)
    if "virtual_stages" in fixed and fixed["virtual_stages"] > 1:
        fixed.setdefault("schedule", "interleaved")
    req = SearchRequest(spec=spec, cluster=cluster, global_batch=args.global_batch, fixed=fixed,
                        time_limit_s=args.time_limit, progress=sys.stderr.isatty() and not args.json)
    found = run_search(req, trace_graph=graph)
    stats = dict(found.stats)
    if args.no_timing:
        for key in [k for k in stats if k.endswith("time_s") or k == "trace_s"]:
            del stats[key]
    plan = plan_of_search(spec, found, args.cluster, stats, cluster)
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
