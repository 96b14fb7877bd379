"""Links and the placement of a communication group on them.

Link bandwidth is per GPU and per direction (NVLink: 600 GB/s bidirectional = 300 GB/s each
way on an A100; InfiniBand: one 200 Gb/s HDR NIC per GPU = 25 GB/s). `efficiency` is the
fraction a ring collective achieves (NCCL bus bandwidth over link bandwidth).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from costmodel.errors import ConfigError


@dataclass(frozen=True, slots=True, kw_only=True)
class Link:
    bandwidth_gb_per_s: float
    latency_us: float
    efficiency: float
    # fixed cost of issuing one collective, whatever its hops: framework dispatch and, where
    # processes share cores, the wait until every member is scheduled (0 for NCCL on GPUs)
    call_us: float = 0.0
    # NCCL also has a (double binary) tree all-reduce and picks it when it is faster: for small
    # messages its 2 log2(n) latency steps beat the ring's 2 (n - 1)
    tree_allreduce: bool = False

    def __post_init__(self) -> None:
        if self.call_us < 0:
            raise ConfigError(f"a link's call_us must be >= 0, got {self.call_us}")
        if self.bandwidth_gb_per_s <= 0 or self.latency_us < 0 or not 0 < self.efficiency <= 1:
            raise ConfigError(
                "a link needs bandwidth_gb_per_s > 0, latency_us >= 0 and 0 < efficiency <= 1, got "
                f"{self.bandwidth_gb_per_s}, {self.latency_us}, {self.efficiency}"
            )

    @property
    def bytes_per_s(self) -> float:
        return self.bandwidth_gb_per_s * 1e9 * self.efficiency

    @property
    def latency_s(self) -> float:
        return self.latency_us * 1e-6

    @property
    def call_s(self) -> float:
        return self.call_us * 1e-6


@dataclass(frozen=True, slots=True, kw_only=True)
class Group:
    """`size` ranks, `per_node` of them sharing a node (so size/per_node nodes take part)."""

    size: int
    per_node: int
    intra: Link
    inter: Link

    def __post_init__(self) -> None:
        if self.size < 1 or self.per_node < 1 or self.size % self.per_node:
            raise ConfigError(f"a group of {self.size} ranks cannot have {self.per_node} per node")

    @property
    def nodes(self) -> int:
        return self.size // self.per_node


def group_on_mesh(size: int, stride: int, gpus_per_node: int, intra: Link, inter: Link) -> Group:
    """Place a group of `size` ranks spaced `stride` apart in a rank order that fills nodes
    of `gpus_per_node` GPUs one after the other."""
    if size == 1:
        return Group(size=1, per_node=1, intra=intra, inter=inter)
    per_node = max(1, min(size, gpus_per_node // stride)) if stride < gpus_per_node else 1
    span = size * stride  # the ranks one group's block covers
    if stride < gpus_per_node and gpus_per_node % span and span % gpus_per_node:
        # groups do not line up with nodes (tp 4 on nodes of 6: ranks 4-7 sit on two nodes); the
        # collective runs at the pace of the group spread over the most nodes, counted per group
        period = math.lcm(span, gpus_per_node)
        spread = max(len({(block + j + i * stride) // gpus_per_node for i in range(size)})
                     for block in range(0, period, span) for j in range(stride))
        per_node = min(per_node, size // spread)
    while size % per_node:
        per_node -= 1
    return Group(size=size, per_node=per_node, intra=intra, inter=inter)
