"""planner.intra_op: the sharding of every operator of a block, chosen by an integer program.

Formulation (after Alpa, Zheng et al., OSDI 2022, Sec. 4; PyTorch AutoParallel's
optimize_sharding.py). For a block's operators V (its parameters and inputs included), its
data edges E, and a logical mesh with axes a = 1..A:

  strategies   S_v = product over axes of the ways op v can run on one axis
               (planner.sharding.ways): output placement, input placements, split or not
  variables    x[v,s] in {0,1}                 op v runs strategy s
               y[u,v,s,t] in {0,1}             edge (u,v) joins u under s to v under t
                                               (only pairs with a finite resharding cost)
  objective    min  sum_v sum_s x[v,s] (C[v,s] + M[v,s])          op costs      `_op_costs`
                  + sum_(u,v) sum_(s,t) y[u,v,s,t] R[u,v,s,t]      resharding    `_reshard_s`
     C: compute of forward and backward at the device roofline, divided by the mesh axes
        that split the op; M: the op's own collectives (a column-parallel linear's input-
        gradient all-reduce; a replicated weight's gradient all-reduce over the axes that
        split the batch, once per step, so divided by the microbatches); R: the collectives
        turning u's output placement into the one v needs, forward and backward (a sharded
        parameter gathered for a replicated use pays FSDP's gather, re-gather and
        reduce-scatter).
  one-hot      sum_s x[v,s] = 1                          for all v     `add_one_hot_constraint`
  edges        sum_t y[u,v,s,t] = x[u,s]  for all s;
               sum_s y[u,v,s,t] = x[v,t]  for all t                    `add_edge_constraint`
  memory       sum_(params p) sum_s x[p,s] W[p,s] + sum_(v <= i) sum_s x[v,s] A[v,s] <= budget
               for every liveness step i of the forward (activations kept for the backward
               accumulate; parameters, gradients and optimizer states stay)
                                                                       `add_memory_constraint`
  fixed        x[v,s] = 0 for strategies the caller rules out (the batch input's placement
               on a data axis)                                         `add_fixed_constraint`

The solver is HiGHS when highspy is installed, else CBC (shipped with PuLP).
`IntraOpSolution.explain(op)` says why an op got its strategy: its cost against the
runner-up's, and what the difference came from.
"""

from __future__ import annotations

import contextlib
import itertools
import math
import os
import sys
import time
from dataclasses import dataclass, field

import pulp

from costmodel.cluster import Cluster
from costmodel.collectives import all_gather_s, all_reduce_s, all_to_all_s, reduce_scatter_s
from costmodel.errors import ConfigError
from costmodel.network import Group
from costmodel.strategy import PrecisionPolicy
from planner.sharding import Way, local_numel, to_dtensor, valid, ways
from planner.trace import OpGraph

FLASH_BACKWARD = 2.5
SAVED_KINDS = {"linear", "sdpa", "norm", "embedding", "cat", "repeat"}
SAVED_POINTWISE = {"aten.gelu.default", "aten.silu.default", "aten.mul.Tensor"}


@dataclass(frozen=True, slots=True, kw_only=True)
class LogicalMesh:
    """A stage's devices seen as an A-dimensional mesh; `roles[a]` is "data", "tensor" or "free"."""

    shape: tuple[int, ...]
    names: tuple[str, ...]
    roles: tuple[str, ...]
    groups: tuple[Group, ...]

    @classmethod
    def on(cls, cluster: Cluster, shape: tuple[int, ...], names: tuple[str, ...], roles: tuple[str, ...]) -> "LogicalMesh":
        """Axes laid out outermost first (the last axis is innermost, inside a node if it fits)."""
        if not (len(shape) == len(names) == len(roles)):
            raise ConfigError("a logical mesh needs one name and one role per axis")
        groups, stride = [], 1
        for n in reversed(shape):
            groups.append(cluster.group(n, stride))
            stride *= n
        return cls(shape=shape, names=names, roles=roles, groups=tuple(reversed(groups)))


@dataclass(frozen=True, slots=True, kw_only=True)
class Strategy:
    name: str
    out: tuple[str, ...]
    ins: tuple[tuple[str, ...], ...]
    compute_s: float
    comm_s: float
    state_bytes: float  # parameters, gradients and optimizer states held per device
    act_bytes: float  # kept for the backward, per device


@dataclass(frozen=True, slots=True, kw_only=True)
class CostContext:
    cluster: Cluster
    policy: PrecisionPolicy
    num_microbatches: int = 1
    memory_budget_bytes: float = math.inf
    activation_copies: float = 1.0  # microbatches a pipeline stage keeps in flight
    state_bytes_per_param: float | None = None  # default: the policy's weights + gradients + optimizer


@dataclass(slots=True)
class IntraOpSolution:
    mesh: LogicalMesh
    choice: dict[str, Strategy]  # op -> chosen strategy
    candidates: dict[str, list[Strategy]]
    objective_s: float
    solve_s: float
    status: str
    nodes: dict[str, dict] = field(default_factory=dict)
    edges: list[tuple[str, str, tuple[str, ...], tuple[str, ...]]] = field(default_factory=list)

    def forward_collectives(self) -> list[tuple[str, str, str, str]]:
        """(collective, axis, producer, consumer) that the forward issues on the chosen edges:
        partial sums resolved (all-reduce / reduce-scatter), shards gathered, re-sharded."""
        out = []
        for u, v, src, dst in self.edges:
            for axis, s, d in zip(self.mesh.names, src, dst):
                if s == d or (s == "R" and d != "R"):
                    continue  # slicing a replicated value is local
                if s == "P":
                    kind = "all_reduce" if d == "R" else "reduce_scatter"
                elif d in ("R", "P"):
                    kind = "all_gather"
                else:
                    kind = "all_to_all"
                out.append((kind, axis, u, v))
        return out

    def placement(self, op: str) -> dict[str, str]:
        """The op's output placement as {axis name: DTensor placement} (replicated axes left out)."""
        return {n: to_dtensor(p) for n, p in zip(self.mesh.names, self.choice[op].out) if p != "R"}

    def parameter_placements(self) -> dict[str, dict[str, str]]:
        return {self.nodes[op]["param"]: self.placement(op) for op in self.choice if self.nodes[op]["kind"] == "param"}

    def explain(self, op: str) -> str:
        chosen = self.choice[op]
        others = sorted((s for s in self.candidates[op] if s is not chosen), key=lambda s: s.compute_s + s.comm_s)
        node = self.nodes[op]
        where = node["param"] or node["module"] or op
        line = (f"{op} ({node['kind']} {node['op']} at {where}): '{chosen.name}' -> output "
                f"{dict(zip(self.mesh.names, chosen.out))}; compute {chosen.compute_s * 1e3:.3f} ms, own comm "
                f"{chosen.comm_s * 1e3:.3f} ms, states {chosen.state_bytes / 2**20:.1f} MiB, kept "
                f"{chosen.act_bytes / 2**20:.1f} MiB")
        if others:
            alt = others[0]
            line += (f"; cheapest alternative '{alt.name}' costs compute {alt.compute_s * 1e3:.3f} ms, comm "
                     f"{alt.comm_s * 1e3:.3f} ms, states {alt.state_bytes / 2**20:.1f} MiB - the choice also saves "
                     "the resharding its neighbours would need or the memory the budget forbids")
        return line

    def uses(self, way_name: str) -> set[str]:
        """Axis names on which some op runs a way whose name starts with `way_name`."""
        found = set()
        for s in self.choice.values():
            for axis, part in zip(self.mesh.names, s.name.split("|")):
                if part.startswith(way_name):
                    found.add(axis)
        return found


class IntraOpProblem:
    """The ILP of one block on one logical mesh (see the module docstring)."""

    def __init__(self, graph: OpGraph, ops: list[str], mesh: LogicalMesh, ctx: CostContext) -> None:
        self.g = graph.graph
        self.mesh = mesh
        self.ctx = ctx
        self.ops = list(ops)
        inside = set(self.ops)
        # producers outside the block become its inputs
        self.inputs: dict[str, list[str]] = {}
        extra: list[str] = []
        for op in self.ops:
            preds = sorted(self.g.predecessors(op), key=lambda p: self.g.edges[p, op]["arg"])
            self.inputs[op] = preds
            for p in preds:
                if p not in inside and p not in extra:
                    extra.append(p)
        self.nodes = {}
        for p in extra:
            d = dict(self.g.nodes[p])
            if d["kind"] not in ("param", "buffer"):
                d["kind"] = "input"
            self.nodes[p] = d
            self.inputs[p] = []
        for op in self.ops:
            self.nodes[op] = self.g.nodes[op]
        self.order = extra + self.ops
        self.strategies = {op: self._strategies(op) for op in self.order}
        self.prob = pulp.LpProblem("intra_op", pulp.LpMinimize)
        self.x: dict[str, list[pulp.LpVariable]] = {}
        self.y: dict[tuple[str, str], dict[tuple[int, int], pulp.LpVariable]] = {}
        self.edge_cost: dict[tuple[str, str], dict[tuple[int, int], float]] = {}

    # -- strategies ------------------------------------------------------------------
    def _strategies(self, op: str) -> list[Strategy]:
        node = self.nodes[op]
        in_shapes = [self.nodes[p]["shape"] if p in self.nodes else self.g.nodes[p]["shape"] for p in self.inputs[op]]
        per_axis = [ways(node, in_shapes, role) for role in self.mesh.roles]
        out: list[Strategy] = []
        for combo in itertools.product(*per_axis):
            placement = tuple(w.out for w in combo)
            if not valid(node["shape"], placement, self.mesh.shape):
                continue
            ins = tuple(tuple(w.ins[i] for w in combo) for i in range(len(in_shapes)))
            if any(not valid(s, p, self.mesh.shape) for s, p in zip(in_shapes, ins)):
                continue
            if sum(p == "P" for p in placement) > 1 and node["kind"] not in ("linear", "embedding"):
                continue
            out.append(self._costed(op, node, combo, placement, ins, in_shapes))
        if not out:
            raise ConfigError(f"no sharding of op {op} ({node['op']}) fits the mesh {self.mesh.shape}")
        return out

    def _costed(self, op, node, combo: tuple[Way, ...], placement, ins, in_shapes) -> Strategy:
        dev, pol, mesh = self.ctx.cluster.device, self.ctx.policy, self.mesh.shape
        div = math.prod(n for w, n in zip(combo, mesh) if w.divides)
        e = pol.activation_bytes
        kind = node["kind"]
        flops = node["flops"] / div
        numel_out = node["numel"]
        moved = e * (numel_out + sum(math.prod(s) for s in in_shapes)) / div
        if kind == "linear":
            compute = 3 * dev.gemm_s(flops, moved, pol.compute_dtype)
        elif kind == "sdpa":
            causal = 0.5
            compute = (1 + FLASH_BACKWARD) * dev.attention_s(flops * causal, moved, pol.compute_dtype)
        elif kind in ("norm", "pointwise", "embedding", "cat", "repeat"):
            compute = 3 * dev.memory_s(moved)
        else:
            compute = 0.0
        comm = 0.0
        for a, w in enumerate(combo):
            group = self.mesh.groups[a]
            if w.own_comm == "input_grad_allreduce":
                x_shape = in_shapes[0]
                comm += all_reduce_s(e * local_numel(math.prod(x_shape), x_shape, ins[0], mesh), group)
            elif w.own_comm == "weight_grad_allreduce":
                w_shape = in_shapes[1] if kind == "linear" or kind == "norm" else in_shapes[0]
                w_place = ins[1] if kind in ("linear", "norm") else ins[0]
                grads = pol.grad_bytes * local_numel(math.prod(w_shape), w_shape, w_place, mesh)
                comm += all_reduce_s(grads, group) / self.ctx.num_microbatches
        state = act = 0.0
        if kind == "param":
            per_param = self.ctx.state_bytes_per_param or (pol.param_bytes + pol.grad_bytes + pol.optimizer_bytes)
            state = per_param * local_numel(numel_out, node["shape"], placement, mesh)
        elif kind in SAVED_KINDS or node["op"] in SAVED_POINTWISE:
            act = e * local_numel(numel_out, node["shape"], placement, mesh)
        name = "|".join(w.name for w in combo)
        return Strategy(name=name, out=placement, ins=ins, compute_s=compute, comm_s=comm, state_bytes=state, act_bytes=act)

    def _reshard_s(self, producer: str, src: tuple[str, ...], dst: tuple[str, ...]) -> float:
        """Forward and backward collectives turning `src` into `dst` for `producer`'s output."""
        if src == dst:
            return 0.0
        node = self.nodes[producer]
        pol, mesh = self.ctx.policy, self.mesh.shape
        is_param = node["kind"] == "param"
        e = pol.param_bytes if is_param else pol.activation_bytes
        total = 0.0
        for a, (s, d) in enumerate(zip(src, dst)):
            if s == d:
                continue
            group = self.mesh.groups[a]
            # bytes of the tensor on one device before this axis' change (other axes as src)
            nbytes = e * local_numel(node["numel"], node["shape"], src[:a] + ("R",) + src[a + 1:], mesh)
            if s == "P":
                if d == "R":
                    total += all_reduce_s(nbytes, group)
                else:
                    total += reduce_scatter_s(nbytes, group) + all_gather_s(nbytes, group)
            elif s == "R":
                if d.startswith("S"):
                    if is_param:  # each device updates a replicated weight from a slice's gradient
                        grads = pol.grad_bytes / pol.param_bytes * nbytes
                        total += all_gather_s(grads, group) / self.ctx.num_microbatches
                    else:
                        total += all_gather_s(nbytes, group)  # backward: gradients gathered
                # R -> P is free
            else:  # sharded source
                if d == "R" or d == "P":
                    if is_param:  # FSDP: gather forward, gather again backward, reduce-scatter gradients
                        grads = pol.grad_bytes / pol.param_bytes * nbytes
                        total += 2 * all_gather_s(nbytes, group) + reduce_scatter_s(grads, group)
                    else:
                        total += all_gather_s(nbytes, group) + reduce_scatter_s(nbytes, group)
                else:
                    total += 2 * all_to_all_s(nbytes, group)
        return total

    # -- the program -----------------------------------------------------------------
    def build(self) -> None:
        for op in self.order:
            self.x[op] = [self.prob.add_variable(f"x_{op}_{i}", cat="Binary") for i in range(len(self.strategies[op]))]
        objective = []
        for op in self.order:
            for var, s in zip(self.x[op], self.strategies[op]):
                objective.append((s.compute_s + s.comm_s) * var)
        self.add_one_hot_constraint()
        for op in self.ops:
            for pos, producer in enumerate(self.inputs[op]):
                objective += self.add_edge_constraint(producer, op, pos)
        objective += self.add_chain_constraint()
        self.add_memory_constraint()
        self.add_fixed_constraint()
        self.prob += pulp.lpSum(objective)

    def add_chain_constraint(self) -> list:
        """A repeated block's output feeds the next copy's input: charge the resharding from
        the output's placement to the input's (so a Partial output pays its all-reduce)."""
        activations = [p for p in self.order if self.nodes[p]["kind"] == "input"]
        outputs = [op for op in self.ops if all(c not in self.nodes for c in self.g.successors(op))]
        if len(activations) != 1 or len(outputs) != 1:
            return []
        src, dst = outputs[0], activations[0]
        return self._link(src, dst, -1, lambda sd: sd.out, "chain")

    def add_one_hot_constraint(self) -> None:
        for op in self.order:
            self.prob += pulp.lpSum(self.x[op]) == 1, f"one_hot_{op}"

    def add_edge_constraint(self, u: str, v: str, pos: int) -> list:
        """Link y[u,v,s,t] to x[u,s] and x[v,t]; returns the resharding terms."""
        return self._link(u, v, pos, lambda sv: sv.ins[pos], "edge")

    def _link(self, u: str, v: str, pos: int, needs, family: str) -> list:
        """y variables for the finite-cost pairs of (u's strategy, v's strategy), where v
        needs `needs(v's strategy)` from u, tied to the x of both ends by named constraints."""
        ys, costs, terms = {}, {}, []
        for i, su in enumerate(self.strategies[u]):
            for j, sv in enumerate(self.strategies[v]):
                c = self._reshard_s(u, su.out, needs(sv))
                if math.isinf(c):
                    continue
                var = self.prob.add_variable(f"y_{family}_{u}_{v}_{pos}_{i}_{j}", cat="Binary")
                ys[(i, j)] = var
                costs[(i, j)] = c
                if c:
                    terms.append(c * var)
        for i, xv in enumerate(self.x[u]):
            self.prob += pulp.lpSum(var for (a, _), var in ys.items() if a == i) == xv, f"{family}_out_{u}_{v}_{pos}_{i}"
        for j, xv in enumerate(self.x[v]):
            self.prob += pulp.lpSum(var for (_, b), var in ys.items() if b == j) == xv, f"{family}_in_{u}_{v}_{pos}_{j}"
        self.y[(u, v, pos)] = ys
        self.edge_cost[(u, v, pos)] = costs
        return terms

    def add_memory_constraint(self) -> None:
        budget = self.ctx.memory_budget_bytes
        if math.isinf(budget):
            return
        states = [s.state_bytes * var for op in self.order for var, s in zip(self.x[op], self.strategies[op]) if s.state_bytes]
        kept: list = []
        for step, op in enumerate(self.ops):
            copies = self.ctx.activation_copies
            kept += [copies * s.act_bytes * var for var, s in zip(self.x[op], self.strategies[op]) if s.act_bytes]
            if kept and (step == len(self.ops) - 1 or self.nodes[op]["kind"] in SAVED_KINDS):
                self.prob += pulp.lpSum(states + kept) <= budget, f"memory_step_{step}_{op}"
        if not kept:
            self.prob += pulp.lpSum(states) <= budget, "memory_states"

    def add_fixed_constraint(self) -> None:
        for op in self.order:
            if self.nodes[op]["kind"] != "input":
                continue
            for a, role in enumerate(self.mesh.roles):
                for var, s in zip(self.x[op], self.strategies[op]):
                    if (role == "tensor" and s.out[a] != "R") or (role == "data" and s.out[a] != "S0"):
                        self.prob += var == 0, f"fixed_{op}_{a}_{s.name.replace('|', '_')}"

    def solve(self, time_limit_s: float | None = None) -> IntraOpSolution:
        self.build()
        solver = _solver(time_limit_s)
        t0 = time.perf_counter()
        with _quiet_stdout():
            self.prob.solve(solver)
        solve_s = time.perf_counter() - t0
        status = pulp.LpStatus[self.prob.status]
        if status not in ("Optimal",):
            raise ConfigError(
                f"the sharding ILP on mesh {self.mesh.shape} is {status.lower()}: no sharding fits the memory budget "
                f"of {self.ctx.memory_budget_bytes / 2**20:.1f} MiB; use more devices per stage"
            )
        choice = {}
        for op in self.order:
            vals = [v.value() or 0.0 for v in self.x[op]]
            choice[op] = self.strategies[op][max(range(len(vals)), key=vals.__getitem__)]
        edges = []
        for op in self.ops:
            for pos, producer in enumerate(self.inputs[op]):
                edges.append((producer, op, choice[producer].out, choice[op].ins[pos]))
        chain = [k for k in self.y if k[2] == -1]
        for src, dst, _ in chain:
            edges.append((src, dst, choice[src].out, choice[dst].out))
        return IntraOpSolution(
            mesh=self.mesh, choice=choice, candidates=self.strategies, objective_s=pulp.value(self.prob.objective) or 0.0,
            solve_s=solve_s, status=status, nodes=self.nodes, edges=edges,
        )


@contextlib.contextmanager
def _quiet_stdout():
    """HiGHS prints a banner from C on creation; keep stdout clean for --json."""
    sys.stdout.flush()
    saved = os.dup(1)
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 1)
        yield
    finally:
        os.dup2(saved, 1)
        os.close(saved)
        os.close(devnull)


def _solver(time_limit_s: float | None):
    if "HiGHS" in pulp.listSolvers(onlyAvailable=True):
        return pulp.HiGHS(msg=False, timeLimit=time_limit_s)
    return pulp.PULP_CBC_CMD(msg=False, timeLimit=time_limit_s)


def solve_block(graph: OpGraph, ops: list[str], mesh: LogicalMesh, ctx: CostContext,
                time_limit_s: float | None = None) -> IntraOpSolution:
    return IntraOpProblem(graph, ops, mesh, ctx).solve(time_limit_s)

