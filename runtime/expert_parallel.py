"""Expert parallelism, folded into data parallelism: the built-in mixture-of-experts model and
Hugging Face experts modules (transformers 5's Mixtral, Qwen2-MoE, Qwen3-MoE layout: 3-D
`gate_up_proj` (experts, 2 f, h) and `down_proj` (experts, h, f) called as
`experts(hidden_states, top_k_index, top_k_weights)`).

The plan's `ep` ranks are adjacent ranks of a pipeline stage (costmodel.moe): its
data-parallel x context-parallel x tensor-parallel ranks (tp innermost; under tp the experts
stay whole and each sequence-parallel rank routes its own tokens; a cp rank routes its chunks')
cut into an expert mesh (pp, dp_replicate, dp_shard * cp * tp / ep, ep) (ZeRO-0: (pp,
dp * cp * tp / ep, 1, ep)). Each MoE layer's experts keep only
this rank's experts/ep of them, and its forward sends every token copy to the rank holding its
expert with `all_to_all_single` (the counts first, then the copies, and the outputs back: three
per forward, two in the backward). The experts are sharded by FSDP2 over the ranks holding the
same experts (the expert mesh's middle axes), before the blocks are: their gradients add the
token copies of every ep rank already, so the experts scale them by tp/ep (`grad_scale`) and
FSDP's mean over the rest makes the mean over all dp ranks, as the dense ones get.
"""

from __future__ import annotations

import types

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

from costmodel.errors import ConfigError
from planner.zoo.model import GroupedExperts, MoE, ScaleGrad, exchange_with_experts
from runtime.data_parallel import DTYPES

EXPERT_MESH_AXES = ("epp", "edp_replicate", "edp_shard", "ep")


def expert_mesh(mesh_sizes: dict[str, int], zero: int, ep: int, device_type: str) -> DeviceMesh:
    """The (pp, edp_replicate, edp_shard, ep) mesh: within a pipeline stage, its data-parallel
    x context-parallel (x tensor-parallel: whole experts fold over tp too) ranks cut into ep
    adjacent ranks, as costmodel.moe folds them."""
    inner = mesh_sizes["cp"] * mesh_sizes["tp"]  # (cp and tp lie inside dp_shard: the folded ranks stay adjacent)
    if zero > 0:
        shape = (mesh_sizes["pp"], mesh_sizes["dp_replicate"], mesh_sizes["dp_shard"] * inner // ep, ep)
    else:
        shape = (mesh_sizes["pp"], mesh_sizes["dp_replicate"] * mesh_sizes["dp_shard"] * inner // ep, 1, ep)
    return init_device_mesh(device_type, shape, mesh_dim_names=EXPERT_MESH_AXES)


def grad_scale(emesh: DeviceMesh, tp: int) -> float:
    """What the experts' gradients are scaled by: they add the copies of every ep rank's tokens
    and FSDP divides by the edp ranks holding the same experts, where the dense ones are divided
    by all dp x cp ranks: edp / (dp cp) = tp / ep."""
    return tp / emesh["ep"].size()


def moe_layers(model: nn.Module) -> list[MoE]:
    return [m for m in model.modules() if isinstance(m, MoE)]


def apply_expert_parallel(model: nn.Module, emesh: DeviceMesh, tp: int = 1) -> None:
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
        experts.ep_rank, experts.ep_size, experts.grad_scale = rank, ep, grad_scale(emesh, tp)
        moe.ep_group = group


def hf_experts(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(path, module) of the Hugging Face experts modules: 3-D gate_up_proj and down_proj."""
    return [(path, m) for path, m in model.named_modules()
            if isinstance(getattr(m, "gate_up_proj", None), nn.Parameter) and getattr(m, "gate_up_proj").dim() == 3
            and isinstance(getattr(m, "down_proj", None), nn.Parameter)]


def apply_hf_expert_parallel(model: nn.Module, emesh: DeviceMesh, tp: int = 1, whole: bool = True) -> None:
    """This rank's experts/ep of each Hugging Face experts module (meta device, before
    allocation), its forward replaced by expert parallelism's round trip. `whole`: the model is
    all there (a pipeline stage may hold only dense layers: DeepSeek's first ones)."""
    ep = emesh["ep"].size()
    rank = emesh["ep"].get_local_rank()
    group = emesh.get_group("ep")
    found = hf_experts(model)
    if not found and whole:
        raise ConfigError("the plan splits experts over ep, but the module has no experts in transformers' layout "
                          "(gate_up_proj and down_proj of experts x ...); re-plan with --ep 1")
    for _path, experts in found:
        if getattr(experts, "has_bias", False) or getattr(experts, "is_transposed", False) \
                or not getattr(experts, "is_concatenated", True) or not getattr(experts, "has_gate", True):
            raise ConfigError(f"{type(experts).__name__} stores its experts in a layout expert parallelism does not "
                              "split yet (biases, transposed or interleaved gate/up); re-plan with --ep 1")
        total = experts.gate_up_proj.shape[0]
        if total % ep:
            raise ConfigError(f"ep({ep}) does not divide the module's {total} experts; re-plan with a divisor")
        for name in ("gate_up_proj", "down_proj"):
            weight = getattr(experts, name)
            setattr(experts, name, nn.Parameter(torch.empty(total // ep, *weight.shape[1:], device=weight.device)))
        experts.ep_rank, experts.ep_size, experts.ep_total, experts.ep_group = rank, ep, total, group
        experts.grad_scale = grad_scale(emesh, tp)
        experts.forward = types.MethodType(_hf_expert_parallel_forward(group), experts)


def _hf_expert_parallel_forward(group):
    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor):
        n, k = top_k_index.shape  # hidden_states (N, C); top_k_* (N, k)
        slots = top_k_index.reshape(-1)  # (N k,)
        order = slots.argsort(stable=True)
        copies = hidden_states[order // k]  # (N k, C) sorted by expert
        counts = torch.bincount(slots, minlength=self.ep_total)  # (E,)
        gate_up = ScaleGrad.apply(self.gate_up_proj, self.grad_scale)  # see grad_scale
        down = ScaleGrad.apply(self.down_proj, self.grad_scale)

        def run(x: torch.Tensor, local_counts: list[int]) -> torch.Tensor:
            outs = []
            for i, part in enumerate(torch.split(x, local_counts, dim=0)):  # (m_i, C)
                gate, up = nn.functional.linear(part, gate_up[i]).chunk(2, dim=-1)  # (m_i, f) each
                outs.append(nn.functional.linear(self.act_fn(gate) * up, down[i]))  # (m_i, C)
            return torch.cat(outs, dim=0) if outs else x[:0]

        back = exchange_with_experts(copies, counts, self.ep_size, group, run)  # (N k, C)
        unsorted = back[order.argsort()].view(n, k, -1)  # (N, k, C)
        return (unsorted * top_k_weights.unsqueeze(-1).to(unsorted.dtype)).sum(dim=1).to(hidden_states.dtype)
    return forward


def expert_slice(module: nn.Module) -> tuple[int, int] | None:
    """(rank, ep) of a module whose experts expert parallelism split, else None."""
    size = getattr(module, "ep_size", 1)
    return (module.ep_rank, size) if size > 1 else None


def shard_experts(model: nn.Module, emesh: DeviceMesh, zero: int, precision: str) -> None:
    """FSDP2 over the ranks holding the same experts (which average their gradients over
    them; the experts' forward scales theirs by 1/ep, so all dp ranks divide them, as FSDP
    divides the dense ones: FSDP's own divide factor needs PREMUL_SUM, which gloo lacks)."""
    mp = MixedPrecisionPolicy(param_dtype=DTYPES.get(precision, torch.float32), reduce_dtype=torch.float32)
    split = [moe.experts for moe in moe_layers(model)] + [m for _, m in hf_experts(model) if expert_slice(m)]
    for experts in split:
        fully_shard(experts, mesh=emesh["edp_replicate", "edp_shard"], reshard_after_forward=zero == 3, mp_policy=mp)


def is_expert_param(name: str) -> bool:
    return ".experts." in name


def ep_group_of(modules) -> object | None:
    """The expert-parallel process group of the parts (None without expert parallelism)."""
    for m in modules:
        for sub in m.modules():
            if getattr(sub, "ep_group", None) is not None:
                return sub.ep_group
    return None

