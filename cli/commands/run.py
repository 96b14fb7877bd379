"""`paraplan run PLAN`: the flags become a typed launch config for `runtime.launch`."""

from __future__ import annotations

import argparse

from runtime.launch import LaunchConfig, run


def run_run(args: argparse.Namespace) -> int:
    cfg = LaunchConfig(plan_path=args.plan, steps=args.steps, seed=args.seed, data=args.data,
                       checkpoint_dir=args.checkpoint_dir, checkpoint_every=args.checkpoint_every,
                       resume=args.resume, metrics=args.metrics, nnodes=args.nnodes or 1, node_rank=args.node_rank,
                       rdzv_endpoint=args.rdzv_endpoint, max_restarts=args.max_restarts, json=args.json)
    return run(cfg)
