"""One alpha-beta function per collective; hierarchical when a group spans nodes.

Ring algorithms on one level of n ranks over a link of bandwidth bw and latency alpha, for a
buffer of B bytes (the full, unsharded size):

    all-reduce        2(n-1) alpha + 2(n-1)/n * B / bw
    all-gather        (n-1) alpha  + (n-1)/n * B / bw       (B = gathered output)
    reduce-scatter    (n-1) alpha  + (n-1)/n * B / bw       (B = unreduced input)
    all-to-all        (n-1) alpha  + (n-1)/n * B / bw
    send/recv         alpha + B / bw

(all-reduce: the faster of the ring and a tree, 2 ceil(log2 n) alpha + 2 B / bw, where the
link has NCCL's tree) plus the link's fixed `call` cost once per collective (dispatch, and on shared hosts the wait
for every member to be scheduled).

A group with k ranks on each of m nodes runs the NCCL-style two-level form: all-reduce =
reduce-scatter inside nodes, all-reduce of B/k across nodes (every GPU on its own NIC),
all-gather inside nodes; all-gather and reduce-scatter likewise.
"""

from __future__ import annotations

import math
from enum import StrEnum

from costmodel.network import Group, Link


class Collective(StrEnum):
    ALL_REDUCE = "all_reduce"
    ALL_GATHER = "all_gather"
    REDUCE_SCATTER = "reduce_scatter"
    ALL_TO_ALL = "all_to_all"
    SEND_RECV = "send_recv"


def _ring(n: int, nbytes: float, link: Link, passes: int) -> float:
    if n <= 1 or nbytes <= 0:
        return 0.0
    return passes * (n - 1) * link.latency_s + passes * (n - 1) / n * nbytes / link.bytes_per_s


def _call_s(group: Group, nbytes: float) -> float:
    if group.size <= 1 or nbytes <= 0:
        return 0.0
    return (group.inter if group.nodes > 1 else group.intra).call_s


def _tree(n: int, nbytes: float, link: Link) -> float:
    """Tree all-reduce: reduce up and broadcast down a tree, 2 ceil(log2 n) latency steps and
    the whole buffer over the link each way."""
    if n <= 1 or nbytes <= 0:
        return 0.0
    return 2 * math.ceil(math.log2(n)) * link.latency_s + 2 * nbytes / link.bytes_per_s


def all_reduce_s(nbytes: float, group: Group) -> float:
    k, m = group.per_node, group.nodes
    if m == 1:
        ring = _ring(k, nbytes, group.intra, 2)
        if group.intra.tree_allreduce:
            ring = min(ring, _tree(k, nbytes, group.intra))
        return _call_s(group, nbytes) + ring
    return (_call_s(group, nbytes) + _ring(k, nbytes, group.intra, 1) + _ring(m, nbytes / k, group.inter, 2)
            + _ring(k, nbytes, group.intra, 1))


def all_gather_s(nbytes: float, group: Group) -> float:
    k, m = group.per_node, group.nodes
    return _call_s(group, nbytes) + _ring(m, nbytes / k, group.inter, 1) + _ring(k, nbytes, group.intra, 1)


def reduce_scatter_s(nbytes: float, group: Group) -> float:
    return all_gather_s(nbytes, group)


def all_to_all_s(nbytes: float, group: Group) -> float:
    n, k = group.size, group.per_node
    if n <= 1 or nbytes <= 0:
        return 0.0
    local = (k - 1) / n * nbytes / group.intra.bytes_per_s
    remote = (n - k) / n * nbytes / group.inter.bytes_per_s if n > k else 0.0
    return _call_s(group, nbytes) + (n - 1) * (group.inter.latency_s if n > k else group.intra.latency_s) + local + remote


def send_recv_s(nbytes: float, link: Link) -> float:
    if nbytes <= 0:
        return 0.0
    return link.call_s + link.latency_s + nbytes / link.bytes_per_s


def collective_s(kind: Collective, nbytes: float, group: Group) -> float:
    if kind is Collective.ALL_REDUCE:
        return all_reduce_s(nbytes, group)
    if kind is Collective.ALL_GATHER:
        return all_gather_s(nbytes, group)
    if kind is Collective.REDUCE_SCATTER:
        return reduce_scatter_s(nbytes, group)
    if kind is Collective.ALL_TO_ALL:
        return all_to_all_s(nbytes, group)
    return send_recv_s(nbytes, group.inter if group.nodes > 1 else group.intra)
