"""Alpha-beta collectives and the placement of mesh axes on nodes."""

import pytest

from costmodel import load_cluster
from costmodel.collectives import (
    Collective, all_gather_s, all_reduce_s, all_to_all_s, collective_s, reduce_scatter_s, send_recv_s,
)
from costmodel.network import Group, Link

NVLINK = Link(bandwidth_gb_per_s=300, latency_us=8, efficiency=0.77)
IB = Link(bandwidth_gb_per_s=25, latency_us=12, efficiency=0.85)


def test_ring_all_reduce_is_the_alpha_beta_formula():
    g = Group(size=8, per_node=8, intra=NVLINK, inter=IB)
    nbytes = 1e9
    expected = 2 * 7 * 8e-6 + 2 * 7 / 8 * nbytes / (300e9 * 0.77)
    assert all_reduce_s(nbytes, g) == pytest.approx(expected)
    # an all-reduce is a reduce-scatter followed by an all-gather
    assert all_reduce_s(nbytes, g) == pytest.approx(reduce_scatter_s(nbytes, g) + all_gather_s(nbytes, g))


def test_bus_bandwidth_of_the_profile_is_nccl_tests():
    # nccl-tests' busbw for all-reduce is B * 2(n-1)/n / t: 230 GB/s on a DGX A100 (calibration.yaml)
    g = Group(size=8, per_node=8, intra=NVLINK, inter=IB)
    nbytes = 8e9  # large enough that latency vanishes
    busbw = nbytes * 2 * 7 / 8 / all_reduce_s(nbytes, g)
    assert busbw / 1e9 == pytest.approx(231, rel=0.01)


def test_hierarchical_all_reduce_uses_every_nic():
    flat_inter = Group(size=16, per_node=1, intra=NVLINK, inter=IB)
    two_level = Group(size=16, per_node=8, intra=NVLINK, inter=IB)
    nbytes = 1e9
    # 8 GPUs per node split the inter-node share 8 ways
    assert all_reduce_s(nbytes, two_level) < all_reduce_s(nbytes, flat_inter) / 4
    expected = (
        7 * 8e-6 + 7 / 8 * nbytes / NVLINK.bytes_per_s  # reduce-scatter in the node
        + 2 * 1 * 12e-6 + 2 * 1 / 2 * (nbytes / 8) / IB.bytes_per_s  # all-reduce of 1/8 across 2 nodes
        + 7 * 8e-6 + 7 / 8 * nbytes / NVLINK.bytes_per_s  # all-gather in the node
    )
    assert all_reduce_s(nbytes, two_level) == pytest.approx(expected)


def test_trivial_groups_cost_nothing():
    single = Group(size=1, per_node=1, intra=NVLINK, inter=IB)
    for kind in (Collective.ALL_REDUCE, Collective.ALL_GATHER, Collective.REDUCE_SCATTER, Collective.ALL_TO_ALL):
        assert collective_s(kind, 1e9, single) == 0.0
    assert send_recv_s(0, IB) == 0.0


def test_all_to_all_sends_the_remote_share_over_the_network():
    g = Group(size=16, per_node=8, intra=NVLINK, inter=IB)
    t = all_to_all_s(1.6e9, g)
    assert t > 0.5 * 1.6e9 / IB.bytes_per_s  # half of the data leaves the node


def test_mesh_places_tp_inside_nodes_and_dp_across():
    cluster = load_cluster("a100-80g:64")
    tp = cluster.group(8, 1)
    assert (tp.size, tp.per_node, tp.nodes) == (8, 8, 1)
    dp = cluster.group(8, 8)  # stride tp = 8: one rank per node
    assert (dp.per_node, dp.nodes) == (1, 8)
    mixed = cluster.group(16, 2)  # tp 2 inside: 4 ranks of the group per node
    assert (mixed.per_node, mixed.nodes) == (4, 4)
    assert cluster.p2p_link(8) is cluster.inter and cluster.p2p_link(2) is cluster.intra


def test_small_clusters_fit_in_one_node():
    cluster = load_cluster("h100-sxm:4")
    assert (cluster.nodes, cluster.gpus_per_node) == (1, 4)
    assert cluster.device.peak_flops("bf16") == pytest.approx(989.4e12)
