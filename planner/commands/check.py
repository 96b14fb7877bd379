"""`paraplan check PLAN --cluster C`: every reason a plan cannot run on a cluster, at once.

Checks the world size against the cluster, the strategy's divisibility rules, the memory of
every pipeline rank against the GPU's capacity (the cost model's prediction), what the
runtime can execute, and that each placement names parameters of the model.
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import sys
from pathlib import Path

from costmodel import ConfigError, load_cluster, predict
from costmodel.cluster import Cluster
from costmodel.validate import strategy_problems
from planner.plan import Plan


def parameter_names(plan: Plan) -> list[str]:
    """The parameter names of the model the runtime builds from the plan (meta device)."""
    import torch

    from planner.zoo.model import build_model

    with torch.device("meta"):
        return [name for name, _ in build_model(plan.spec).named_parameters()]


def plan_problems(plan: Plan, cluster: Cluster) -> tuple[list[str], dict]:
    """(problems, facts): every problem found, and what was measured on the way."""
    from runtime.check import runnable_problems

    problems: list[str] = []
    facts: dict = {"processes": plan.world_size, "cluster_gpus": cluster.world_size}
    if plan.world_size != cluster.world_size:
        problems.append(f"the plan's mesh has {plan.world_size} processes but {cluster.name} has "
                        f"{cluster.world_size} GPUs; re-plan with `paraplan replan --gpus {cluster.world_size}`")
    try:
        spec, strategy = plan.spec, plan.strategy()
    except ConfigError as exc:
        return problems + [str(exc)], facts
    layout = strategy_problems(spec, strategy, plan.world_size)
    problems += layout
    if not layout and plan.mode == "inference":
        problems += _serving_memory(plan, spec, cluster, facts)
    elif not layout:
        try:
            result = predict(spec, strategy, cluster)
        except ConfigError as exc:
            problems.append(str(exc))
        else:
            facts["peak_memory_gib"] = round(result.memory_gib["total"], 2)
            facts["capacity_gib"] = cluster.device.hbm_gib
            for rank, mem in enumerate(result.rank_memory_gib):
                if mem["total"] > cluster.device.hbm_gib:
                    problems.append(
                        f"pipeline rank {rank} needs {mem['total']:.1f} GiB per GPU against {cluster.device.hbm_gib:g} "
                        f"GiB on {cluster.device.name}; add recomputation, ZeRO sharding or GPUs")
    problems += runnable_problems(plan)
    names = parameter_names(plan)
    for pattern in plan.placements:
        if not any(fnmatch.fnmatchcase(n, pattern) for n in names):
            problems.append(f"placement '{pattern}' matches no parameter of {spec.name} "
                            f"(names look like {names[min(2, len(names) - 1)]})")
    return problems, facts


def _serving_memory(plan: Plan, spec, cluster: Cluster, facts: dict) -> list[str]:
    """A serving plan's weights and KV cache against the GPU (costmodel.serving)."""
    from costmodel.serving import ServingRequest, kv_budget

    sv = plan.serving
    try:
        req = ServingRequest(prompt_len=int(sv["prompt_len"]), output_len=int(sv["output_len"]),
                             beam=int(sv.get("beam", 1)), block_tokens=int(sv.get("block_tokens", 16)),
                             precision=plan.precision)
    except (KeyError, TypeError, ValueError):
        return ["the serving plan lacks prompt_len and output_len under `serving`; re-plan with --mode inference"]
    budget = kv_budget(spec, cluster, req, plan.mesh["tp"], plan.mesh["pp"])
    batch = plan.schedule["microbatch_size"]
    facts.update(weights_gib_per_gpu=round(budget.weights_gib, 2), max_batch=budget.max_batch_paged)
    if batch > budget.max_batch_paged:
        return [f"batch {batch} needs more KV cache than the {budget.kv_gib:.1f} GiB per GPU left after "
                f"{budget.weights_gib:.1f} GiB of weights (at most {budget.max_batch_paged} sequences); lower --batch"]
    return []


def run_check(args: argparse.Namespace) -> int:
    path = Path(args.plan)
    if not path.exists():
        raise ConfigError(f"plan file {args.plan} does not exist")
    plan = Plan.from_yaml(path.read_text())
    cluster_text = args.cluster or plan.cluster
    cluster = load_cluster(cluster_text, runtime=plan.runtime)
    problems, facts = plan_problems(plan, cluster)
    problems = [" ".join(p.split()) for p in problems]  # one line each, whatever names they quote
    if args.json:
        print(json.dumps({"ok": not problems, "problems": problems, **facts}, indent=2))
    elif problems:
        print(f"paraplan: error: {args.plan} cannot run on {cluster_text}: {len(problems)} problem(s)", file=sys.stderr)
        for p in problems:
            print(f"  - {p}", file=sys.stderr)
    else:
        mem = f", peak {facts['peak_memory_gib']} of {facts['capacity_gib']:g} GiB per GPU" if "peak_memory_gib" in facts else ""
        print(f"{args.plan}: OK on {cluster_text} ({plan.world_size} processes{mem})")
    return 2 if problems else 0
