"""Placements and the per-axis sharding rules of each kind of operator.

A placement gives, for every mesh axis, how a tensor lies on it: "R" (replicated), "P"
(partial sums awaiting a reduction) or "S<d>" (split along tensor dim d). A rule lists, for
one mesh axis, the ways an operator can run: the placement of its output, the placement
each input must arrive in, and whether the work is divided over the axis. The ILP takes the
product of the per-axis ways over the mesh (`planner.intra_op`).
"""

from __future__ import annotations

import math
from typing import NamedTuple


class Way(NamedTuple):
    """One way to run an op on one mesh axis."""

    name: str
    out: str
    ins: tuple[str, ...]
    divides: bool  # is the op's work split over the axis?
    own_comm: str = ""  # "weight_grad_allreduce" (a replicated weight used by a batch-split op) | ""
    partial_grads: tuple[int, ...] = ()  # inputs whose gradient comes back as partial sums (a column linear's x)


def shard(d: int) -> str:
    return f"S{d}"


def dim_of(p: str) -> int | None:
    return int(p[1:]) if p.startswith("S") else None


def to_dtensor(p: str) -> str:
    """Our short form -> the plan's DTensor form."""
    if p == "R":
        return "Replicate()"
    if p == "P":
        return "Partial()"
    return f"Shard({p[1:]})"


def local_numel(numel: int, shape: tuple[int, ...], placement: tuple[str, ...], mesh: tuple[int, ...]) -> float:
    div = 1
    for p, n in zip(placement, mesh):
        if p.startswith("S"):
            div *= n
    return numel / div


def valid(shape: tuple[int, ...], placement: tuple[str, ...], mesh: tuple[int, ...]) -> bool:
    """Every sharded dim must divide evenly by the axes that split it."""
    per_dim: dict[int, int] = {}
    for p, n in zip(placement, mesh):
        d = dim_of(p)
        if d is not None:
            if d >= len(shape):
                return False
            per_dim[d] = per_dim.get(d, 1) * n
    return all(shape[d] % k == 0 for d, k in per_dim.items())


def view_map(in_shape: tuple[int, ...], out_shape: tuple[int, ...]) -> dict[int, int]:
    """Input dim -> output dim that keeps a Shard through a view/reshape: dims in groups of
    equal product; a split or merged group carries the shard of its outermost dim."""
    mapping: dict[int, int] = {}
    i = j = 0
    while i < len(in_shape) and j < len(out_shape):
        gi, gj = [i], [j]
        pi, pj = in_shape[i], out_shape[j]
        while pi != pj:
            if pi < pj:
                i += 1
                if i >= len(in_shape):
                    return mapping
                gi.append(i)
                pi *= in_shape[i]
            else:
                j += 1
                if j >= len(out_shape):
                    return mapping
                gj.append(j)
                pj *= out_shape[j]
        first_in = next((d for d in gi if in_shape[d] > 1), gi[0])
        first_out = next((d for d in gj if out_shape[d] > 1), gj[0])
        if in_shape[first_in] > 1:
            mapping[first_in] = first_out
        i += 1
        j += 1
    return mapping


LINEAR_POINTWISE = {"aten.add.Tensor", "aten.sub.Tensor"}
PARTIAL_UNARY = {"aten.dropout.default", "aten.to.dtype", "aten.to.dtype_layout", "aten._to_copy.default",
                 "aten.clone.default", "aten.neg.default", "aten.contiguous.default"}
BILINEAR = {"aten.mul.Tensor", "aten.div.Tensor"}


def ways(node: dict, in_shapes: list[tuple[int, ...]], role: str) -> list[Way]:
    """The ways to run `node` on one mesh axis. `role` restricts inputs: "data" (the batch is
    split on this axis), "tensor" (the batch is whole), "free" (the solver decides)."""
    kind, shape = node["kind"], node["shape"]
    n_in = len(in_shapes)
    R = ("R",) * n_in
    out = [Way("replicate", "R", R, False)]
    if kind == "input":  # the role is imposed by the ILP's fixed constraints
        return out + ([Way("batch", "S0", (), True)] if len(shape) > 0 and shape[0] > 1 else []) + (
            [Way("sequence", "S1", (), True)] if len(shape) >= 3 and shape[1] > 1 else [])
    if kind == "buffer":
        return out
    if kind == "param":
        return out + [Way(f"shard{d}", shard(d), (), True) for d in range(len(shape)) if shape[d] > 1]
    if kind == "linear":
        r = len(shape)
        extra = ("R",) * (n_in - 2)
        res = out + [Way(f"batch{d}", shard(d), (shard(d), "R") + extra, True, "weight_grad_allreduce")
                     for d in range(r - 1) if shape[d] > 1]
        res.append(Way("column", shard(r - 1), ("R", "S0") + ("S0",) * (n_in - 2), True, partial_grads=(0,)))
        res.append(Way("row", "P", (shard(r - 1), "S1") + extra, True))
        return res
    if kind == "matmul" and n_in >= 2:  # batched A @ B: split a shared batch dim, A's rows, B's columns or the contraction
        a, b = in_shapes[0], in_shapes[1]
        r = len(shape)
        res = list(out)
        if len(a) == len(b) == r >= 3:
            res += [Way(f"batch{d}", shard(d), (shard(d), shard(d)), True) for d in range(r - 2) if shape[d] > 1]
        if len(a) == r and shape[r - 2] > 1:
            res.append(Way("rows", shard(r - 2), (shard(r - 2), "R"), True, partial_grads=(1,)))
        if shape[r - 1] > 1:
            res.append(Way("cols", shard(r - 1), ("R", shard(len(b) - 1)), True, partial_grads=(0,)))
        res.append(Way("contract", "P", (shard(len(a) - 1), shard(len(b) - 2)), True))
        return res
    if kind == "embedding":
        return out + [
            *(Way(f"batch{d}", shard(d), ("R", shard(d)), True, "weight_grad_allreduce") for d in range(len(shape) - 1)),
            Way("vocab", "P", ("S0", "R"), True),
            Way("hidden", shard(len(shape) - 1), ("S1", "R"), True),
        ]
    if kind == "norm":
        k = node["args"].get("normalized_ndim", 1)
        return out + [Way(f"batch{d}", shard(d), (shard(d),) + ("R",) * (n_in - 1), True, "weight_grad_allreduce")
                      for d in range(len(shape) - k)]
    if kind == "sdpa":  # q, k, v split alike; a mask (4th input) broadcast over a dim of size 1 stays whole on it
        def along(d: int) -> tuple[str, ...]:
            return tuple(shard(d) if i < 3 or len(s) > d and s[d] > 1 else "R" for i, s in enumerate(in_shapes))
        return out + [Way("batch", "S0", along(0), True), Way("heads", "S1", along(1), True)]
    if kind in ("view",):
        m = view_map(in_shapes[0], shape)
        return out + [Way(f"split{d}", shard(e), (shard(d),), False) for d, e in m.items()] + [Way("partial", "P", ("P",), False)]
    if kind in ("transpose", "permute"):
        dims = node["args"]["dims"]
        if kind == "transpose":
            perm = list(range(len(shape)))
            perm[dims[0]], perm[dims[1]] = perm[dims[1]], perm[dims[0]]
        else:
            perm = dims
        return out + [Way(f"split{perm[j]}", shard(j), (shard(perm[j]),), False) for j in range(len(shape))] + [
            Way("partial", "P", ("P",), False)]
    if kind == "reduce":  # over some dims (kept as size 1): split on the others
        if len(in_shapes[0]) != len(shape):
            return out
        return out + [Way(f"split{d}", shard(d), (shard(d),), True) for d in range(len(shape))
                      if shape[d] == in_shapes[0][d] > 1]
    if kind == "softmax":  # along one dim: split on the others
        dim = node["args"].get("dim", -1) % max(len(shape), 1)
        return out + [Way(f"split{d}", shard(d), (shard(d),), True) for d in range(len(shape)) if d != dim and shape[d] > 1]
    if kind in ("slice", "cat", "repeat"):
        dim = node["args"].get("dim", 0) % max(len(shape), 1)
        dims = [d for d in range(len(shape)) if kind == "repeat" or d != dim]
        return out + [Way(f"split{d}", shard(d), (shard(d),) * n_in, kind != "slice") for d in dims]
    if kind == "pointwise":
        res = list(out)
        r = len(shape)
        for d in range(r):
            ins = []
            for s in in_shapes:
                di = d - (r - len(s))
                ins.append(shard(di) if di >= 0 and s[di] == shape[d] and s[di] > 1 else "R")
            if any(p != "R" for p in ins):
                res.append(Way(f"split{d}", shard(d), tuple(ins), True))
        op = node["op"]
        if op in LINEAR_POINTWISE and n_in >= 1:
            res.append(Way("partial", "P", ("P",) * n_in, False))
        elif op in PARTIAL_UNARY or (op in BILINEAR and n_in >= 1):
            res.append(Way("partial", "P", ("P",) + ("R",) * (n_in - 1), False))
        return res
    return out  # unknown ops run replicated


def is_sharded(p: tuple[str, ...]) -> bool:
    return any(x.startswith("S") for x in p)


def shard_factor(placement: tuple[str, ...], mesh: tuple[int, ...]) -> int:
    return math.prod(n for p, n in zip(placement, mesh) if p.startswith("S"))
