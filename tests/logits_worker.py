"""Under torchrun: build a plan's model (as `paraplan run` does), load the model state of a
checkpoint, and save the logits of a batch (rank 0): the distributed model's own output."""

import sys

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.tensor import DTensor
from torch.distributed.checkpoint.state_dict import get_model_state_dict, set_model_state_dict

from planner.plan import Plan
from runtime.mesh import build_mesh
from runtime.module import logits_of
from runtime.train import build_plan_parts
from runtime.teardown import leave


def main(plan_path: str, checkpoint: str, tokens_path: str, out_path: str) -> None:
    dist.init_process_group("gloo")
    plan = Plan.load(plan_path)
    mesh = build_mesh(plan.mesh, "cpu")
    (model,), _, _ = build_plan_parts(plan, mesh, torch.device("cpu"), 0)
    state = get_model_state_dict(model)
    dcp.load({"train": {"model": state}}, checkpoint_id=checkpoint)
    set_model_state_dict(model, state)
    model.eval()
    with torch.no_grad():
        logits = logits_of(model(torch.load(tokens_path)))
    if isinstance(logits, DTensor):  # vocab-parallel logits (the loss never gathers them): whole here
        logits = logits.full_tensor()
    if dist.get_rank() == 0:
        torch.save(logits, out_path)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:5])
    leave(0)  # past gloo's teardown (runtime.teardown)
