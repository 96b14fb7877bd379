"""Tensor and sequence parallelism with DTensor, from the plan's placements.

A linear whose weight is Shard(0) on `tp` runs column-parallel, Shard(1) row-parallel
(Megatron); the token embedding Shard(0) is vocab-parallel. With sequence parallelism the
norms run on sequence shards and each attention / MLP gathers its input (torchtitan's plan).
"""

from __future__ import annotations

from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_module
from torch.distributed.tensor.parallel import (
    ColwiseParallel, ParallelStyle, PrepareModuleInput, RowwiseParallel, SequenceParallel, parallelize_module,
)

from planner.contract import tp_placement
from planner.zoo.model import MoE
from runtime.lora import LoRAColwiseParallel, LoRALinear, LoRARowwiseParallel


class LocalShard(ParallelStyle):
    """A module that acts on this rank's own rows (Qwen3's q_norm, k_norm on the local heads; a
    router or shared expert on the local tokens of a sequence-parallel mixture of experts): its
    parameters replicated over tp, its input taken as this rank's shard (dim 0) of the whole,
    its output local. Its parameters' gradients come out as partial sums over the ranks' rows,
    and DTensor all-reduces them over tp (transformers' "replicated_with_grad_allreduce")."""

    def _apply(self, module: nn.Module, mesh) -> nn.Module:
        def take_shard(mod, args, mesh_):
            return (DTensor.from_local(args[0], mesh_, [Shard(0)], run_check=False), *args[1:])

        def give_local(mod, out, mesh_):  # (a router's output: scores, weights, indices, each local)
            if isinstance(out, tuple):
                return tuple(t.to_local() if isinstance(t, DTensor) else t for t in out)
            return out.to_local()

        return distribute_module(module, mesh, input_fn=take_shard, output_fn=give_local)


def apply_tensor_parallel(model: nn.Module, tp_mesh: DeviceMesh, placements: dict[str, dict[str, str]],
                          sequence_parallel: bool) -> None:
    sp = sequence_parallel
    top: dict[str, object] = {}
    if model.tok_embeddings is not None and tp_placement(placements, "tok_embeddings.weight") == "Shard(0)":
        top["tok_embeddings"] = RowwiseParallel(input_layouts=Replicate(), output_layouts=Shard(1) if sp else Replicate())
        if model.pos_embeddings is not None:  # positions split like the sequence, rows of the table
            top["pos_embeddings"] = RowwiseParallel(input_layouts=Replicate(), output_layouts=Shard(0) if sp else Replicate())
    if model.output is not None:
        if sp:
            top["norm"] = SequenceParallel()
        # a tied head is the embedding's own weight: vocab-parallel with it (the plan names it once)
        head = "tok_embeddings.weight" if model.spec.tied_embeddings else "output.weight"
        if tp_placement(placements, head) == "Shard(0)":
            # vocab-parallel logits, left sharded: the loss reduces over tp (runtime.train.loss_fn), no gather
            top["output"] = ColwiseParallel(input_layouts=Shard(1) if sp else Replicate(), output_layouts=Shard(-1),
                                            use_local_output=False)
        elif sp:
            top["output"] = PrepareModuleInput(input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),),
                                               use_local_output=True)
    if top:
        parallelize_module(model, tp_mesh, top)
    for index, block in model.layers.items():
        plan: dict[str, object] = {}
        for path, module in block.named_modules():
            if not isinstance(module, nn.Linear):
                continue
            placement = tp_placement(placements, f"layers.{index}.{path}.weight")
            adapted = isinstance(module, LoRALinear)
            if placement == "Shard(0)":
                plan[path] = LoRAColwiseParallel() if adapted else ColwiseParallel()
            elif placement == "Shard(1)":
                row = LoRARowwiseParallel if adapted else RowwiseParallel
                plan[path] = row(output_layouts=Shard(1) if sp else Replicate())
        # each tensor-parallel sub-block takes its input as one DTensor, so the gradients of its
        # column-parallel projections (q, k, v; w1, w3) add up before one reduction (Megatron's f)
        arrive = Shard(1) if sp else Replicate()
        if any(k.startswith("attention.") for k in plan):
            plan["attention"] = PrepareModuleInput(input_layouts=(arrive, None, None),
                                                   desired_input_layouts=(Replicate(), None, None))
        if block.attention.q_norm is not None and "attention.wq" in plan:  # on each rank's own heads
            plan["attention.q_norm"] = LocalShard()
            plan["attention.k_norm"] = LocalShard()
        if any(k.startswith("feed_forward.") for k in plan):
            plan["feed_forward"] = PrepareModuleInput(input_layouts=(arrive,), desired_input_layouts=(Replicate(),))
        if isinstance(block.feed_forward, MoE):
            # sequence parallel: each rank routes its own tokens; the router and shared expert are
            # replicated (their gradients reduced over tp), the experts split over ep (runtime.expert_parallel)
            plan["feed_forward"] = PrepareModuleInput(input_layouts=(Shard(1),), desired_input_layouts=(Shard(1),),
                                                      use_local_output=True)
            plan["feed_forward.router"] = LocalShard()
            if block.feed_forward.shared_expert is not None:
                plan["feed_forward.shared_expert"] = LocalShard()
        if sp:
            plan["attention_norm"] = SequenceParallel()
            plan["ffn_norm"] = SequenceParallel()
        if plan:
            parallelize_module(block, tp_mesh, plan)
