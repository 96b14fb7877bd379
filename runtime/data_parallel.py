"""Data parallelism with FSDP2 (`fully_shard`) per block and at the root.

ZeRO level -> FSDP2: 3 reshards parameters after forward (full sharding); 2 and 1 keep them
gathered between forward and backward (SHARD_GRAD_OP; FSDP2 has no optimizer-only mode, so
ZeRO-1 runs as ZeRO-2, numerically the same); 0 shards over a group of one and replicates
over the rest (HSDP with shard size 1 is DDP). A 2D (dp_replicate, dp_shard) mesh is HSDP.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def apply_data_parallel(model: nn.Module, dp_mesh: DeviceMesh, zero: int, precision: str) -> None:
    apply_data_parallel_blocks(model, list(model.layers.values()), dp_mesh, zero, precision)


def apply_data_parallel_blocks(model: nn.Module, blocks: list[nn.Module], dp_mesh: DeviceMesh, zero: int,
                               precision: str) -> None:
    """fully_shard each repeated block, then the root (the embedding, final norm and head)."""
    reshard = zero == 3
    mp = MixedPrecisionPolicy(param_dtype=DTYPES.get(precision, torch.float32), reduce_dtype=torch.float32)
    for block in blocks:
        fully_shard(block, mesh=dp_mesh, reshard_after_forward=reshard, mp_policy=mp)
    fully_shard(model, mesh=dp_mesh, reshard_after_forward=reshard, mp_policy=mp)
