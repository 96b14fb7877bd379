"""Expert parallelism for the built-in mixture-of-experts model, folded into data parallelism.

The plan's `ep` ranks are adjacent data-parallel ranks (costmodel.moe): rank r of the
stage's data-parallel ranks is (replica, i, j) of an expert mesh (dp_replicate,
dp_shard / ep, ep) (ZeRO-0: (dp / ep, 1, ep)), j its expert-parallel index. Each MoE layer's
grouped experts keep only this rank's experts/ep of them, and its forward sends every token
copy to the rank holding its expert with `all_to_all_single` (the counts first, then the
copies, and the outputs back: three per forward, two in the backward). The experts are
sharded by FSDP2 over the ranks holding the same experts (the expert mesh's first two
axes), before the blocks are: their gradients add the token copies of every ep rank already,
so the experts scale them by 1/ep and FSDP's mean over the rest makes the mean over all dp
ranks, as the dense ones get.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

from planner.zoo.model import GroupedExperts, MoE
from runtime.data_parallel import DTYPES

EXPERT_MESH_AXES = ("edp_replicate", "edp_shard", "ep")


def expert_mesh(mesh_sizes: dict[str, int], zero: int, ep: int, device_type: str) -> DeviceMesh:
    """The (edp_replicate, edp_shard, ep) mesh over the data-parallel ranks (pp = tp = cp = 1)."""
    if zero > 0:
        shape = (mesh_sizes["dp_replicate"], mesh_sizes["dp_shard"] // ep, ep)
    else:
        shape = (mesh_sizes["dp_replicate"] * mesh_sizes["dp_shard"] // ep, 1, ep)
    return init_device_mesh(device_type, shape, mesh_dim_names=EXPERT_MESH_AXES)


def moe_layers(model: nn.Module) -> list[MoE]:
    return [m for m in model.modules() if isinstance(m, MoE)]


def apply_expert_parallel(model: nn.Module, emesh: DeviceMesh) -> None:
    """Keep this rank's experts (on the meta device, before allocation) and route over `ep`."""
    ep = emesh["ep"].size()
    rank = emesh["ep"].get_local_rank()
    group = emesh.get_group("ep")
    for moe in moe_layers(model):
        experts: GroupedExperts = moe.experts
        local = moe.num_experts // ep
        for name in ("w1", "w2", "w3"):
            weight = getattr(experts, name)
            if weight is not None:
                setattr(experts, name, nn.Parameter(torch.empty(local, *weight.shape[1:], device=weight.device)))
        experts.ep_rank, experts.ep_size = rank, ep
        moe.ep_group = group


def shard_experts(model: nn.Module, emesh: DeviceMesh, zero: int, precision: str) -> None:
    """FSDP2 over the ranks holding the same experts (which average their gradients over
    them; the experts' forward scales theirs by 1/ep, so all dp ranks divide them, as FSDP
    divides the dense ones: FSDP's own divide factor needs PREMUL_SUM, which gloo lacks)."""
    mp = MixedPrecisionPolicy(param_dtype=DTYPES.get(precision, torch.float32), reduce_dtype=torch.float32)
    for moe in moe_layers(model):
        fully_shard(moe.experts, mesh=emesh["edp_replicate", "edp_shard"], reshard_after_forward=zero == 3,
                    mp_policy=mp)


def is_expert_param(name: str) -> bool:
    return ".experts.w" in name

