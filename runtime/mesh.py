"""The DeviceMesh with the plan's named axes (outermost first: pp, dp_replicate, dp_shard, cp, tp),
and the data-parallel mesh FSDP2 runs on."""

from __future__ import annotations

from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from costmodel.strategy import MESH_AXES


def build_mesh(mesh: dict[str, int], device_type: str) -> DeviceMesh:
    return init_device_mesh(device_type, tuple(mesh[a] for a in MESH_AXES), mesh_dim_names=MESH_AXES)


def data_parallel_mesh(mesh: DeviceMesh, zero: int) -> DeviceMesh | None:
    """The (replicate, shard) mesh gradients are averaged over: (dp_replicate, dp_shard), with the
    context-parallel ranks (which hold the same parameters) folded in as the cost model counts
    them (costmodel.step: ZeRO shards over dp_shard x cp): into the shard axis under ZeRO 1-3
    (torchtitan's dp_shard_cp), into the replicate one under ZeRO 0 (dp_shard is 1 there); None
    where those ranks are one (nothing to average). Call once per mesh (a flattened axis is named once)."""
    if mesh["dp_replicate"].size() * mesh["dp_shard"].size() * mesh["cp"].size() == 1:
        return None
    if mesh["cp"].size() == 1:
        return mesh["dp_replicate", "dp_shard"]
    if zero > 0:
        mesh["dp_shard", "cp"]._flatten("dp_shard_cp")
        return mesh["dp_replicate", "dp_shard_cp"]
    mesh["dp_replicate", "cp"]._flatten("dp_replicate_cp")
    return mesh["dp_replicate_cp", "dp_shard"]
