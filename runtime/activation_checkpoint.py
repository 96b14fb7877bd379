"""Activation recomputation per block: full (keep only the block input) or selective (keep
the matmul and attention outputs, recompute the cheap elementwise ops, as torchtitan's
op-level selective checkpointing)."""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts

_SAVE = {
    torch.ops.aten.mm.default, torch.ops.aten.addmm.default, torch.ops.aten.bmm.default,
    torch.ops.aten._scaled_dot_product_efficient_attention.default,
    torch.ops.aten._scaled_dot_product_flash_attention.default,
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default,
}


def _policy(ctx, op, *args, **kwargs):
    return CheckpointPolicy.MUST_SAVE if op in _SAVE else CheckpointPolicy.PREFER_RECOMPUTE


def selective_context():
    """The context pair of selective recomputation (torchtitan's op-level policy)."""
    return create_selective_checkpoint_contexts(_policy)


def apply_recompute(model: nn.Module, policy_by_layer: dict[str, str]) -> None:
    for index in list(model.layers.keys()):
        policy = policy_by_layer.get(index, "none")
        if policy == "none":
            continue
        block = model.layers[index]
        if policy == "full":
            wrapped = checkpoint_wrapper(block, preserve_rng_state=False)
        else:
            wrapped = checkpoint_wrapper(block, preserve_rng_state=False,
                                         context_fn=selective_context)
        model.layers[index] = wrapped
