"""One torchrun worker: join the process group, train the plan, report (rank 0).

    python -m runtime.worker PLAN.yaml [--steps N] [--out FILE] ...   (under torchrun)
"""

from __future__ import annotations

import argparse
import datetime
import faulthandler
import signal
import json
import os
import sys

import torch
import torch.distributed as dist

from costmodel.errors import ConfigError
from planner.plan import Plan
from runtime.teardown import leave
from runtime.train import RunConfig, train


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="runtime.worker")
    p.add_argument("plans", nargs="+", help="plan YAML files, run one after the other")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data")
    p.add_argument("--checkpoint-dir")
    p.add_argument("--checkpoint-every", type=int, default=0)
    p.add_argument("--resume", action="store_true")
    p.add_argument("--metrics")
    p.add_argument("--stop-after", type=int)
    p.add_argument("--out", help="rank 0 writes one JSON line per plan here")
    p.add_argument("--step-lines", action="store_true", help="print a line per step (rank 0)")
    return p.parse_args(argv)


def _init_process_group(backend: str, timeout: datetime.timedelta) -> None:
    """Join the group. After torchrun restarts a worker group (--max-restarts) its store still
    holds the dead group's gloo addresses under the same keys, and the new group would connect
    to them (refused, or hanging): give each incarnation its own key prefix."""
    restart = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    if restart and os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
        world, rank = int(os.environ["WORLD_SIZE"]), int(os.environ["RANK"])
        store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world, is_master=False,
                              timeout=timeout)
        dist.init_process_group(backend, store=dist.PrefixStore(f"paraplan/restart_{restart}", store), rank=rank,
                                world_size=world, timeout=timeout)
    else:
        dist.init_process_group(backend, timeout=timeout)


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    faulthandler.register(signal.SIGUSR1, all_threads=True)  # `kill -USR1 PID` prints where a worker is stuck
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    _init_process_group(backend, datetime.timedelta(minutes=10))
    try:
        for path in args.plans:
            plan = Plan.load(path)
            # a worker group torchrun restarted (--max-restarts) goes on from the last checkpoint
            restarted = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) > 0
            cfg = RunConfig(steps=args.steps, seed=args.seed, data=args.data, checkpoint_dir=args.checkpoint_dir,
                            checkpoint_every=args.checkpoint_every, resume=args.resume or restarted,
                            metrics_path=args.metrics,
                            stop_after=args.stop_after, log=args.step_lines)
            summary = train(plan, cfg)
            if dist.get_rank() == 0:
                line = json.dumps({"plan": path, **summary})
                if args.out:
                    with open(args.out, "a") as f:
                        f.write(line + "\n")
                else:
                    print(line, flush=True)
    except ConfigError as exc:
        return refuse(exc)
    dist.barrier()  # no rank tears gloo down while another still talks (C++ terminate otherwise)
    dist.destroy_process_group()
    return 0


ARRIVAL_TIMEOUT = datetime.timedelta(seconds=30)


def refuse(exc: ConfigError, arrival: datetime.timedelta = ARRIVAL_TIMEOUT) -> int:
    """Exit status 2 with the error said once. A problem of the plan stops every rank at the same
    point: they meet, rank 0 says it, the group is torn down. A problem of one rank's own part (its
    pipeline stage's modules) stops that rank alone while the others wait in a collective for it (a
    barrier here would wait for them for the group's whole timeout): where they do not all arrive
    within `arrival` (gloo), the rank says its error itself and leaves, and torchrun stops the rest
    (`paraplan run` shows the error, not the other ranks' lost connections: runtime.launch)."""
    rank = dist.get_rank()
    if dist.get_backend() == "gloo":  # (NCCL's wait does not block the host: its barrier as before)
        try:
            dist.barrier(async_op=True).wait(timeout=arrival)
        except RuntimeError:  # some rank did not come: this one's problem is its own
            print(f"paraplan: error: {exc}", file=sys.stderr)
            leave(2)
    else:
        dist.barrier()
    if rank == 0:
        print(f"paraplan: error: {exc}", file=sys.stderr)
    dist.destroy_process_group()
    return 2


if __name__ == "__main__":
    leave(main())
