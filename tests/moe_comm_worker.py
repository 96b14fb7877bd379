"""Under torchrun: count the all-to-alls one MoE layer of the built-in model issues forward and
backward (CommDebugMode) and print them as JSON (rank 0)."""

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.tensor.debug import CommDebugMode

from planner.plan import Plan
from runtime.mesh import build_mesh
from runtime.train import build_plan_parts
from runtime.teardown import leave


def main() -> None:
    dist.init_process_group("gloo")
    plan = Plan.from_yaml(Path(sys.argv[1]).read_text())
    mesh = build_mesh(plan.mesh, "cpu")
    (model,), _, _ = build_plan_parts(plan, mesh, torch.device("cpu"), seed=0)
    spec = plan.spec
    index = next(i for i in range(spec.layers) if spec.is_moe_layer(i))
    block = model.layers[str(index)]
    x = torch.randn(plan.schedule["microbatch_size"], plan.seq_len, spec.hidden, requires_grad=True)
    with CommDebugMode() as fwd:
        out = block(x, model.rope_cos, model.rope_sin)
    with CommDebugMode() as bwd:
        out.sum().backward()
    counts = {phase: {str(op).split(".")[-1]: n for op, n in mode.get_comm_counts().items()}
              for phase, mode in (("forward", fwd), ("backward", bwd))}
    if dist.get_rank() == 0:
        print(json.dumps(counts))
    dist.barrier()  # no rank tears gloo down while another still talks (C++ terminate otherwise)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
    leave(0)  # past gloo's teardown (runtime.teardown)
