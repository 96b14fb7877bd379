"""`paraplan check PLAN --cluster C`: every reason a plan cannot run on a cluster, at once.

The list is `planner.contract.plan_problems`, the same function `paraplan run` refuses on:
world size against the cluster, the strategy's divisibility rules, the memory of every
pipeline rank (the cost model's prediction), what the runtime executes, and that each
placement names parameters of the model. A serving plan is checked for what serving needs
(the layout, its weights and KV cache on the GPU).
"""

from __future__ import annotations

import argparse
import json
import sys

from costmodel import load_cluster
from planner.contract import plan_problems
from planner.plan import Plan


def run_check(args: argparse.Namespace) -> int:
    plan = Plan.load(args.plan)
    cluster_text = args.cluster or plan.cluster
    cluster = load_cluster(cluster_text, runtime=plan.runtime)
    problems, facts = plan_problems(plan, cluster)
    if args.json:
        print(json.dumps({"ok": not problems, "problems": problems, **facts}, indent=2))
    elif problems:
        print(f"paraplan: error: {args.plan} cannot run on {cluster_text}: {len(problems)} problem(s)", file=sys.stderr)
        for p in problems:
            print(f"  - {p}", file=sys.stderr)
    elif plan.mode == "inference":
        print(f"{args.plan}: OK on {cluster_text} (a serving plan of {plan.world_size} GPU{'s' if plan.world_size > 1 else ''}: weights "
              f"{facts['weights_gib_per_gpu']} GiB per GPU, up to {facts['max_batch']} sequences a replica; serve it "
              f"with `paraplan export {args.plan} --to vllm`)")
    else:
        mem = f", peak {facts['peak_memory_gib']} of {facts['capacity_gib']:g} GiB per GPU" if "peak_memory_gib" in facts else ""
        print(f"{args.plan}: OK on {cluster_text} ({plan.world_size} processes{mem})")
    return 2 if problems else 0
