"""LoRA adapters on the built-in models: each target linear keeps its (frozen) weight under
its own name and gains `lora_a` (r x in) and `lora_b` (out x r), trained; y = W x + B (A x)
(Hu et al. 2021; scale alpha / r = 1, B starts at zero so training starts from the base).

Tensor parallelism splits an adapter like its base (costmodel.lora): a column-parallel
linear shards `lora_b` by rows and keeps `lora_a` whole (replicated); a row-parallel one
shards `lora_a` by columns and keeps `lora_b` whole. So the adapter adds no collective: the
column-parallel output is sharded like the base's, and the row-parallel one is a partial sum
reduced together with the base's.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed.tensor import Replicate, Shard, distribute_tensor
from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel

from costmodel.lora import MODULES

ADAPTER_NAMES = ("lora_a", "lora_b")


class LoRALinear(nn.Linear):
    def __init__(self, in_features: int, out_features: int, bias: bool, rank: int, device=None) -> None:
        super().__init__(in_features, out_features, bias=bias, device=device)
        self.rank = rank
        self.lora_a = nn.Parameter(torch.empty(rank, in_features, device=device))
        self.lora_b = nn.Parameter(torch.empty(out_features, rank, device=device))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias) + F.linear(F.linear(x, self.lora_a), self.lora_b)


def apply_lora(model: nn.Module, targets, rank: int) -> None:
    """Swap each block's target linears for LoRALinear and freeze everything but the adapters."""
    for block in model.layers.values():
        for target in targets:
            path = MODULES[target]
            parent_name, attr = path.rsplit(".", 1)
            parent = block.get_submodule(parent_name)
            old = getattr(parent, attr)
            if old is None:
                continue
            setattr(parent, attr, LoRALinear(old.in_features, old.out_features, old.bias is not None, rank,
                                             device=old.weight.device))
    for name, p in model.named_parameters():
        p.requires_grad_(name.rsplit(".", 1)[-1] in ADAPTER_NAMES)


def _distribute(module: nn.Module, mesh, placements: dict[str, list]) -> None:
    for name, param in list(module.named_parameters(recurse=False)):
        dist = distribute_tensor(param, mesh, placements[name])
        module.register_parameter(name, nn.Parameter(dist, requires_grad=param.requires_grad))


class LoRAColwiseParallel(ColwiseParallel):
    """Column-parallel base and `lora_b`; `lora_a` replicated."""

    def _partition_linear_fn(self, name, module, device_mesh):
        _distribute(module, device_mesh, {"weight": [Shard(0)], "bias": [Shard(0)], "lora_a": [Replicate()],
                                          "lora_b": [Shard(0)]})


class LoRARowwiseParallel(RowwiseParallel):
    """Row-parallel base and `lora_a`; `lora_b` (and the bias) replicated."""

    def _partition_linear_fn(self, name, module, device_mesh):
        _distribute(module, device_mesh, {"weight": [Shard(1)], "bias": [Replicate()], "lora_a": [Shard(1)],
                                          "lora_b": [Replicate()]})
