"""Pipeline parallelism with torch.distributed.pipelining: the model cut at the plan's layer
ranges (one module per virtual stage this rank holds: stages r, r + pp, ...), and the plan's
schedule (GPipe, 1F1B, interleaved 1F1B, zero bubble: ScheduleInterleavedZeroBubble, whose
order costmodel.schedule.zero_bubble prices)."""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.pipelining import (PipelineStage, Schedule1F1B, ScheduleGPipe, ScheduleInterleaved1F1B,
                                         ScheduleInterleavedZeroBubble)

from costmodel.spec import ModelSpec
from planner.plan import Plan
from planner.zoo.model import Transformer, build_model


def stage_module(spec: ModelSpec, first: int, end: int, *, has_embedding: bool, has_head: bool) -> Transformer:
    """The model with only layers [first, end), on the meta device; the embedding only on the
    first stage and the final norm and head only on the last. Layer names keep their global
    index, so checkpoints and placements name the same parameters whatever the cut."""
    model = build_model(spec, device="meta")
    for key in list(model.layers.keys()):
        if not first <= int(key) < end:
            del model.layers[key]
    if not has_embedding:
        model.tok_embeddings = None
        model.pos_embeddings = None
    if not has_head:
        model.norm = None
        model.output = None
    return model


def my_stages(plan: Plan, pp_rank: int) -> list[tuple[int, int, int]]:
    """(virtual stage, first layer, end layer) of the stages this pipeline rank runs."""
    return [(s.virtual_stage, s.layers[0], s.layers[1]) for s in sorted(plan.stages, key=lambda s: s.virtual_stage)
            if s.pp_rank == pp_rank]


def build_schedule(plan: Plan, modules: list[nn.Module], stage_ids: list[int], device: torch.device, pp_group, loss_fn):
    num_stages = len(plan.stages)
    stages = [PipelineStage(m, k, num_stages, device, group=pp_group) for m, k in zip(modules, stage_ids)]
    m = plan.schedule["num_microbatches"]
    name = plan.schedule["name"]
    if name == "interleaved":
        return ScheduleInterleaved1F1B(stages, n_microbatches=m, loss_fn=loss_fn)
    if name == "zero-bubble":
        return ScheduleInterleavedZeroBubble(stages, n_microbatches=m, loss_fn=loss_fn)
    cls = ScheduleGPipe if name == "gpipe" else Schedule1F1B
    return cls(stages[0], n_microbatches=m, loss_fn=loss_fn)
