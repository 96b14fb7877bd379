"""The DeviceMesh with the plan's named axes (outermost first: pp, dp_replicate, dp_shard, cp, tp)."""

from __future__ import annotations

from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from costmodel.strategy import MESH_AXES


def build_mesh(mesh: dict[str, int], device_type: str) -> DeviceMesh:
    return init_device_mesh(device_type, tuple(mesh[a] for a in MESH_AXES), mesh_dim_names=MESH_AXES)
