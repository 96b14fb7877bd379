"""`paraplan replan PLAN --gpus N`: the same model, batch and precision planned for N GPUs
(a node lost or added). The new plan resumes from the old plan's checkpoints: they are keyed
by parameter name and DCP reshards them on load."""

from __future__ import annotations

import argparse
import sys

from costmodel import ConfigError, load_cluster
from cli.commands.simulate import format_table
from planner.files import atomic_write_text
from cli.commands.plan import plan_of_search
from planner.plan import Plan
from planner.model_source import module_map_of
from planner.search import SearchRequest, run_search


def resized_cluster(cluster: str, gpus: int) -> str:
    """DEVICE:COUNT with the new count; a cluster file needs --cluster."""
    device, sep, count = cluster.rpartition(":")
    if not sep or not device or not count.isdigit():
        raise ConfigError(f"the plan's cluster '{cluster}' is a file; give the new cluster with --cluster")
    return f"{device}:{gpus}"


def runtime_constraints(plan: Plan) -> dict:
    """Strategy flags that keep the new plan runnable and numerically the same run: the
    precision, sequence length and attention kernel stay (and expert parallelism's degree, which
    its checkpoints are written under); the runtime has no context parallelism and cannot split
    tied embeddings over pipeline stages."""
    fixed = {"precision": plan.precision, "seq_len": plan.seq_len, "flash_attention": plan.flash_attention, "cp": 1,
             "grad_dtype": plan.grad_dtype, "master_dtype": plan.master_dtype}
    if plan.spec.tied_embeddings:
        fixed["pp"] = 1
    if plan.mode == "lora":  # the same adapters
        fixed.update(lora_rank=int(plan.lora["rank"]), lora_targets=tuple(plan.lora["targets"]),
                     base_precision=str(plan.lora.get("base_precision", "bf16")))
    if int(plan.experts.get("ep", 1)) > 1:  # its checkpoints keep the experts per ep rank: resumed under the same ep
        fixed["ep"] = int(plan.experts["ep"])
    return fixed


def run_replan(args: argparse.Namespace) -> int:
    old = Plan.load(args.plan)
    if old.mode == "inference":  # re-planned as training it read its replicas as a global batch of 1
        raise ConfigError(f"{args.plan} is a serving plan and replan re-plans training; plan the serving again for the "
                          "new GPUs (`paraplan plan --mode inference ... --cluster DEVICE:N`)")
    if args.gpus is None and not args.cluster:
        raise ConfigError("replan needs --gpus N (the GPU count now available) or --cluster DEVICE:COUNT")
    if args.gpus is not None and args.gpus < 1:
        raise ConfigError(f"--gpus must be a positive GPU count, got {args.gpus}")
    cluster_text = args.cluster or resized_cluster(old.cluster, args.gpus)
    cluster = load_cluster(cluster_text, runtime=old.runtime)
    if args.gpus is None:  # the new cluster says how many
        args.gpus = cluster.world_size
    elif cluster.world_size != args.gpus:
        raise ConfigError(f"--cluster {cluster_text} has {cluster.world_size} GPUs, not --gpus {args.gpus}")
    spec = old.spec
    req = SearchRequest(spec=spec, cluster=cluster, global_batch=old.global_batch, fixed=runtime_constraints(old),
                        time_limit_s=args.time_limit, progress=sys.stderr.isatty() and not args.json,
                        source=old.source)
    found = run_search(req, module_map=module_map_of(old.source, spec) if old.source else None)
    plan = plan_of_search(spec, found, cluster_text, found.stats, cluster, old.source)
    if args.output:
        atomic_write_text(args.output, plan.to_yaml())
    if args.json:
        import json

        print(json.dumps({"plan": plan.to_dict()}, indent=2))
    else:
        print(f"re-planned {args.plan} ({old.world_size} processes) for {args.gpus} GPUs")
        print(format_table(spec, cluster_text, found.strategy, found.result, notes=(cluster.profile_note,)))
        if args.output:
            print(f"  plan written to {args.output}; `paraplan run {args.output} --resume --checkpoint-dir DIR` "
                  "continues from the old plan's checkpoints")
    return 0
