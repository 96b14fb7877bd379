"""LoRA adapters on the built-in models and on the user's module (a Hugging Face model: the
linears its module map names for each target, as PEFT's target_modules q_proj, ..., down_proj
name them): each target linear keeps its (frozen) weight under
its own name and gains `lora_a` (r x in) and `lora_b` (out x r), trained; y = W x + B (A x)
(Hu et al. 2021; scale alpha / r = 1, B starts at zero so training starts from the base).

Tensor parallelism splits an adapter like its base (costmodel.lora): a column-parallel
linear shards `lora_b` by rows and keeps `lora_a` whole (replicated); a row-parallel one
shards `lora_a` by columns and keeps `lora_b` whole. So the adapter adds no collective: the
column-parallel output is sharded like the base's, and the row-parallel one is a partial sum
reduced together with the base's.
"""

from __future__ import annotations

import math
import zlib

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed.tensor import Replicate, Shard, distribute_tensor
from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel

from costmodel.lora import MODULES
from planner.zoo.model import copy_full

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
    wrap_targets(model, list(model.layers.values()), {t: MODULES[t] for t in targets}, rank)


def wrap_targets(model: nn.Module, blocks, paths: dict[str, str], rank: int) -> None:
    """In every block, the linear at each of `paths` (target -> block-relative path) swapped for a
    LoRALinear of its shape, weight and bias under their own names (a checkpoint's names load
    into it); every parameter of `model` but the adapters frozen."""
    for block in blocks:
        for path in paths.values():
            parent_name, _, attr = path.rpartition(".")
            parent = block.get_submodule(parent_name) if parent_name else block
            old = getattr(parent, attr)
            if old is None:
                continue
            new = LoRALinear(old.in_features, old.out_features, old.bias is not None, rank, device=old.weight.device)
            setattr(parent, attr, new.to(old.weight.dtype))
    freeze_base(model)


def freeze_base(model: nn.Module) -> None:
    """Every parameter but the adapters frozen: again after tensor parallelism, whose styles
    (SequenceParallel on the norms, LocalShard) register each parameter anew, trainable (under
    sequence parallelism the norms trained, which one process keeps frozen)."""
    for name, p in model.named_parameters():
        p.requires_grad_(name.rsplit(".", 1)[-1] in ADAPTER_NAMES)


@torch.no_grad()
def init_adapters(model: nn.Module, seed: int, clean=lambda name: name) -> None:
    """Every LoRALinear's adapters as PEFT starts them: A Kaiming-uniform (a = sqrt(5), drawn from a
    generator seeded by (seed, the module's name): every rank and every split draws the same whole
    A), B zero, so training starts from the base model. `clean`: the name without wrappers."""
    for path, sub in model.named_modules():
        if not isinstance(sub, LoRALinear):
            continue
        name = clean(path)
        gen = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
        a = torch.empty(tuple(sub.lora_a.shape))
        nn.init.kaiming_uniform_(a, a=math.sqrt(5), generator=gen)
        copy_full(sub.lora_a, a)
        copy_full(sub.lora_b, torch.zeros(tuple(sub.lora_b.shape)))


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
