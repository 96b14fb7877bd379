"""planner.intra_op: the sharding of every operator of a block, chosen by an integer program.

Formulation (after Alpa, Zheng et al., OSDI 2022, Sec. 4; PyTorch AutoParallel's
optimize_sharding.py). For a block's operators V (its parameters and inputs included), its
data edges E, and a logical mesh with axes a = 1..A (a stage's data and tensor axes solved
together when the caller gives both):

  strategies   S_v = product over axes of the ways op v can run on one axis
               (planner.sharding.ways): output placement, input placements, split or not
  variables    x[v,s] in {0,1}                 op v runs strategy s
               y[u,v,s,t] in {0,1}             edge (u,v) joins u under s to v under t
               z[u,s,p,g] in {0,1}             u's output, held as s, is turned into placement p
                                               (once, whatever number of consumers need p; g:
                                               whether their gradients come back as partial sums)
  objective    min  sum_v sum_s x[v,s] (C[v,s] + M[v,s])          op costs      `_costed`
                  + sum_(u,s,p,g) z[u,s,p,g] R[u,s,p,g]            resharding    `transfers`
     C: compute of forward and backward (costmodel.ops: GEMMs at the device roofline, fused
        attention, memory-bound kernels), divided by the mesh axes that split the op;
     M: the op's own collectives (a replicated weight's gradient all-reduce over the axes
        that split the batch, once per step, so divided by the microbatches);
     R: the collectives turning u's output into p, forward and backward: partial sums
        all-reduced or reduce-scattered, shards gathered, re-sharded; the backward of a gather
        is a reduce-scatter only where the consumers' gradients are partial sums (a column-
        parallel linear's input), and a replicated input whose gradients are partial pays
        one all-reduce for all its consumers (q, k and v share one, as Megatron's fused QKV);
        a sharded parameter gathered for a replicated use pays FSDP's gather, re-gather and
        reduce-scatter.
  one-hot      sum_s x[v,s] = 1                          for all v     `add_one_hot_constraint`
  edges        sum_t y[u,v,s,t] = x[u,s]  for all s;
               sum_s y[u,v,s,t] = x[v,t]  for all t                    `add_edge_constraint`
  transfers    z[u,s,p,g] >= y[u,v,s,t]   for every edge whose consumer v under t needs p
               with gradients g                                        `add_transfer_constraint`
  chain        the block's output, as the next copy's input: the same y/z terms from the
               output's placement to the input's                       `add_chain_constraint`
  memory       sum_(params p) sum_s x[p,s] W[p,s] + sum_(v <= i) sum_s x[v,s] A[v,s] <= budget
               for every liveness step i of the forward (activations kept for the backward
               accumulate; parameters, gradients and optimizer states stay)
                                                                       `add_memory_constraint`
  fixed        x[v,s] = 0 for strategies the caller rules out: the batch input's placement on
               a data axis; on a tensor axis the residual stream arrives whole or, under
               sequence parallelism, split on the sequence (the caller fixes it or leaves it
               free); parameters the caller pins (a plan's placements)   `add_fixed_constraint`

The solver is HiGHS when highspy is installed, else CBC (shipped with PuLP); a time limit
that ends the solve without a solution is reported as such. `IntraOpSolution.explain(op)`
gives the op's real cost terms under the chosen strategy against the runner-up's, with its
neighbours' choices fixed.
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
from costmodel.ops import attention_s, gemm_s, memory_bound_s
from costmodel.strategy import PrecisionPolicy
from planner.sharding import Way, local_numel, to_dtensor, valid, ways
from planner.trace import OpGraph

SAVED_KINDS = {"linear", "sdpa", "norm", "embedding", "cat", "repeat", "matmul"}
STREAM_KINDS = {"pointwise", "norm"}  # memory-bound ops the residual stream runs through
SAVED_POINTWISE = {"aten.gelu.default", "aten.silu.default", "aten.mul.Tensor"}
COLLECTIVE_S = {"all_reduce": all_reduce_s, "all_gather": all_gather_s, "reduce_scatter": reduce_scatter_s,
                "all_to_all": all_to_all_s}


class IlpTimeout(ConfigError):
    """The solver's time limit ended the solve before any solution was found."""


@dataclass(frozen=True, slots=True, kw_only=True)
class LogicalMesh:
    """A stage's devices seen as an A-dimensional mesh; `roles[a]` is "data", "tensor" or "free"."""

    shape: tuple[int, ...]
    names: tuple[str, ...]
    roles: tuple[str, ...]
    groups: tuple[Group, ...]

    def __post_init__(self) -> None:
        if not (len(self.shape) == len(self.names) == len(self.roles) == len(self.groups)):
            raise ConfigError("a logical mesh needs one name, role and group per axis")
        if any(n < 1 for n in self.shape):
            raise ConfigError(f"a logical mesh's axes must be >= 1, got {self.shape}")
        bad = [r for r in self.roles if r not in ("data", "tensor", "free")]
        if bad:
            raise ConfigError(f"a mesh axis role is data, tensor or free, got {bad[0]!r}")

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
class OpStrategy:
    """One way to run an op on the whole mesh (one `planner.sharding.Way` per axis)."""

    name: str  # the ways' names joined by "|"
    out: tuple[str, ...]  # output placement per axis
    ins: tuple[tuple[str, ...], ...]  # placement each input must arrive in, per axis
    partial_grads: tuple[tuple[bool, ...], ...]  # per input, per axis: its gradient comes back as partial sums
    compute_s: float  # forward + backward on one device
    comm_s: float  # the op's own collectives per microbatch
    state_bytes: float  # parameters, gradients and optimizer states held per device
    act_bytes: float  # kept for the backward, per device


@dataclass(frozen=True, slots=True)
class Transfer:
    """A collective one edge's resharding issues: `phase` forward, backward or step (once per
    step, whatever the microbatches), `kind` as in COLLECTIVE_S, bytes on one device."""

    phase: str
    kind: str
    axis: int
    nbytes: float


@dataclass(frozen=True, slots=True, kw_only=True)
class CostContext:
    cluster: Cluster
    policy: PrecisionPolicy
    num_microbatches: int = 1
    memory_budget_bytes: float = math.inf
    activation_copies: float = 1.0  # microbatches a pipeline stage keeps in flight
    state_bytes_per_param: float | None = None  # default: the policy's weights + gradients + optimizer
    sequence_parallel: bool | None = None  # on tensor axes the residual stream arrives split on the sequence; None: free
    pinned: dict[str, tuple[str, ...]] = field(default_factory=dict)  # parameter name -> placement per axis

    def __post_init__(self) -> None:
        if self.num_microbatches < 1:
            raise ConfigError(f"num_microbatches must be >= 1, got {self.num_microbatches}")
        if not self.memory_budget_bytes > 0:
            raise ConfigError(f"the memory budget must be positive, got {self.memory_budget_bytes}")


@dataclass(slots=True)
class IntraOpSolution:
    mesh: LogicalMesh
    choice: dict[str, OpStrategy]  # op -> chosen strategy
    candidates: dict[str, list[OpStrategy]]
    objective_s: float
    solve_s: float
    status: str  # "optimal" | "feasible (time limit)" | "fixed" (every op had one strategy)
    nodes: dict[str, dict] = field(default_factory=dict)
    inputs: dict[str, list[str]] = field(default_factory=dict)  # op -> its producers in argument order
    chain: tuple[str, str] | None = None  # (block output, block input) joined by the next copy
    ctx: CostContext | None = None

    def transfers(self) -> list[tuple[str, str, str, Transfer]]:
        """(producer, its output placement's name, the placement made of it, transfer) of the
        chosen strategies: each producer's output turned once into each placement its
        consumers need (the chain's included)."""
        needs: dict[tuple[str, tuple[str, ...]], list[bool]] = {}
        for v, preds in self.inputs.items():
            for pos, u in enumerate(preds):
                key = (u, self.choice[v].ins[pos])
                flags = needs.setdefault(key, [False] * len(self.mesh.shape))
                for a, g in enumerate(self.choice[v].partial_grads[pos]):
                    flags[a] = flags[a] or g
        if self.chain is not None:
            out, into = self.chain
            needs.setdefault((out, self.choice[into].out), [False] * len(self.mesh.shape))
        found = []
        for (u, need), flags in needs.items():
            for t in transfers(self.nodes[u], self.choice[u].out, need, tuple(flags), self.mesh, self.ctx):
                found.append((u, "".join(self.choice[u].out), "".join(need), t))
        return found

    def forward_collectives(self) -> list[tuple[str, str, str]]:
        """(collective, axis name, producer) that the forward issues."""
        return [(t.kind, self.mesh.names[t.axis], u) for u, _, _, t in self.transfers() if t.phase == "forward"]

    def placement(self, op: str) -> dict[str, str]:
        """The op's output placement as {axis name: DTensor placement} (replicated axes left out)."""
        return {n: to_dtensor(p) for n, p in zip(self.mesh.names, self.choice[op].out) if p != "R"}

    def parameter_placements(self) -> dict[str, dict[str, str]]:
        return {self.nodes[op]["param"]: self.placement(op) for op in self.choice if self.nodes[op]["kind"] == "param"}

    def cost_terms(self, op: str, s: OpStrategy) -> dict[str, float]:
        """The objective's terms that depend on `op` running `s`, its neighbours as chosen."""
        ctx = self.ctx
        reshard_in = reshard_out = 0.0
        for pos, u in enumerate(self.inputs.get(op, [])):
            reshard_in += sum(transfer_s(t, self.mesh, ctx) for t in transfers(
                self.nodes[u], self.choice[u].out, s.ins[pos], s.partial_grads[pos], self.mesh, ctx))
        for v, preds in self.inputs.items():
            for pos, u in enumerate(preds):
                if u == op:
                    sv = self.choice[v]
                    reshard_out += sum(transfer_s(t, self.mesh, ctx) for t in transfers(
                        self.nodes[op], s.out, sv.ins[pos], sv.partial_grads[pos], self.mesh, ctx))
        return {"compute": s.compute_s, "own comm": s.comm_s, "resharding in": reshard_in, "resharding out": reshard_out}

    def explain(self, op: str) -> str:
        """Why `op` runs its strategy: its cost terms against the cheapest other strategy's,
        every other op as chosen (resharding counted per edge)."""
        chosen = self.choice[op]
        node = self.nodes[op]
        where = node["param"] or node["module"] or op
        mine = self.cost_terms(op, chosen)

        def fmt(terms: dict[str, float]) -> str:
            return ", ".join(f"{k} {v * 1e3:.3f} ms" for k, v in terms.items()) + f" = {sum(terms.values()) * 1e3:.3f} ms"

        line = (f"{op} ({node['kind']} {node['op']} at {where}): '{chosen.name}' -> output "
                f"{dict(zip(self.mesh.names, chosen.out))}: {fmt(mine)}; states {chosen.state_bytes / 2**20:.1f} MiB, "
                f"kept {chosen.act_bytes / 2**20:.1f} MiB")
        others = [(sum(self.cost_terms(op, s).values()), s) for s in self.candidates[op] if s is not chosen]
        if others:
            cost, alt = min(others, key=lambda x: x[0])
            line += f"; runner-up '{alt.name}': {fmt(self.cost_terms(op, alt))}"
            if cost < sum(mine.values()):
                line += (f", cheaper here but not chosen: the memory budget or the resharding of ops further away "
                         f"(states {alt.state_bytes / 2**20:.1f} MiB, kept {alt.act_bytes / 2**20:.1f} MiB)")
        return line

    def uses(self, way_name: str) -> set[str]:
        """Axis names on which some op runs a way whose name starts with `way_name`."""
        found = set()
        for s in self.choice.values():
            for axis, part in zip(self.mesh.names, s.name.split("|")):
                if part.startswith(way_name):
                    found.add(axis)
        return found


def transfer_s(t: Transfer, mesh: LogicalMesh, ctx: CostContext) -> float:
    """A transfer's seconds per microbatch (a step's once-only collective amortised)."""
    seconds = COLLECTIVE_S[t.kind](t.nbytes, mesh.groups[t.axis])
    return seconds / ctx.num_microbatches if t.phase == "step" else seconds


def transfers(node: dict, src: tuple[str, ...], dst: tuple[str, ...], partial_grads: tuple[bool, ...],
              mesh: LogicalMesh, ctx: CostContext) -> list[Transfer]:
    """The collectives turning a value held as `src` into `dst`, forward and backward, axis by
    axis (`partial_grads[a]`: the consumers' gradients come back as partial sums on axis a)."""
    if src == dst and not any(g and s == "R" for g, s in zip(partial_grads, src)):
        return []
    pol, shape = ctx.policy, mesh.shape
    is_param = node["kind"] == "param"
    e = pol.param_bytes if is_param else pol.activation_bytes
    out: list[Transfer] = []
    for a, (s, d) in enumerate(zip(src, dst)):
        g = partial_grads[a] if a < len(partial_grads) else False
        # bytes of the whole value on one device of this axis (the other axes as held)
        nbytes = e * local_numel(node["numel"], node["shape"], src[:a] + ("R",) + src[a + 1:], shape)
        if s == d:
            if s == "R" and g and not is_param:  # partial input gradients summed over the axis
                out.append(Transfer("backward", "all_reduce", a, nbytes))
            continue
        if s == "P":
            if d == "R":
                out.append(Transfer("forward", "all_reduce", a, nbytes))
                if g and not is_param:  # the partial sums' gradient must be whole: the consumers' partials summed
                    out.append(Transfer("backward", "all_reduce", a, nbytes))
            else:
                out += [Transfer("forward", "reduce_scatter", a, nbytes), Transfer("backward", "all_gather", a, nbytes)]
        elif s == "R":
            if d.startswith("S"):
                if is_param:  # each device updates a replicated weight from a slice's gradient
                    out.append(Transfer("step", "all_gather", a, pol.grad_bytes / pol.param_bytes * nbytes))
                else:
                    out.append(Transfer("backward", "all_gather", a, nbytes))  # gradients gathered
            # R -> P is free
        elif d in ("R", "P"):  # sharded source gathered
            if is_param:  # FSDP: gather forward, gather again backward, reduce-scatter gradients
                out += [Transfer("forward", "all_gather", a, nbytes), Transfer("backward", "all_gather", a, nbytes),
                        Transfer("backward", "reduce_scatter", a, pol.grad_bytes / pol.param_bytes * nbytes)]
            else:
                out.append(Transfer("forward", "all_gather", a, nbytes))
                if g:
                    out.append(Transfer("backward", "reduce_scatter", a, nbytes))
        else:
            out += [Transfer("forward", "all_to_all", a, nbytes), Transfer("backward", "all_to_all", a, nbytes)]
    return out


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
        unknown = set(ctx.pinned) - {self.nodes[op]["param"] for op in self.order if self.nodes[op]["kind"] == "param"}
        if unknown:
            raise ConfigError(f"placement pinned for {sorted(unknown)[0]}, which is not a parameter of the block")
        activations = [p for p in extra if self.nodes[p]["kind"] == "input"]
        outputs = [op for op in self.ops if all(c not in self.nodes for c in self.g.successors(op))]
        self.chain = (outputs[0], activations[0]) if len(activations) >= 1 and len(outputs) == 1 else None
        # the residual stream: the input shaped as the block's output
        self.stream = next((p for p in activations if self.chain and self.nodes[p]["shape"] ==
                            self.nodes[self.chain[0]]["shape"]), None)
        if self.chain and self.stream is not None:
            self.chain = (self.chain[0], self.stream)
        self.strategies = {op: self._strategies(op) for op in self.order}
        self.prob = pulp.LpProblem("intra_op", pulp.LpMinimize)
        self.x: dict[str, list[pulp.LpVariable]] = {}
        self.y: dict[tuple[str, str, int], dict[tuple[int, int], pulp.LpVariable]] = {}
        self.z: dict[tuple, pulp.LpVariable] = {}

    # -- strategies ------------------------------------------------------------------
    def _strategies(self, op: str) -> list[OpStrategy]:
        node = self.nodes[op]
        in_shapes = [self.nodes[p]["shape"] if p in self.nodes else self.g.nodes[p]["shape"] for p in self.inputs[op]]
        per_axis = [self._axis_ways(node, in_shapes, role, n) for role, n in zip(self.mesh.roles, self.mesh.shape)]
        out: list[OpStrategy] = []
        for combo in itertools.product(*per_axis):
            placement = tuple(w.out for w in combo)
            if not valid(node["shape"], placement, self.mesh.shape):
                continue
            ins = tuple(tuple(w.ins[i] for w in combo) for i in range(len(in_shapes)))
            if any(not valid(s, p, self.mesh.shape) for s, p in zip(in_shapes, ins)):
                continue
            if sum(p == "P" for p in placement) > 1 and node["kind"] not in ("linear", "embedding"):
                continue
            out.append(self._costed(node, combo, placement, ins, in_shapes))
        if not out:
            raise ConfigError(f"no sharding of op {op} ({node['op']}) fits the mesh {self.mesh.shape}")
        return out

    @staticmethod
    def _axis_ways(node: dict, in_shapes, role: str, size: int) -> list[Way]:
        """The ways on one axis: none but replication on an axis of one device; on a data axis
        the activations stay split on the batch (dim 0) wherever they carry it, while
        parameters may be replicated or sharded (DDP or FSDP, the solver's choice)."""
        if size == 1:
            return [Way("replicate", "R", ("R",) * len(in_shapes), False)]
        found = ways(node, in_shapes, role)
        if role == "data" and node["kind"] not in ("param", "buffer"):
            batch = [w for w in found if w.out == "S0"]
            return batch or found
        return found

    def _costed(self, node, combo: tuple[Way, ...], placement, ins, in_shapes) -> OpStrategy:
        dev, pol, mesh = self.ctx.cluster.device, self.ctx.policy, self.mesh.shape
        div = math.prod(n for w, n in zip(combo, mesh) if w.divides)
        e = pol.activation_bytes
        kind = node["kind"]
        numel_out = node["numel"]
        compute = 0.0
        if kind in ("linear", "matmul") and len(in_shapes) >= 2:
            k = in_shapes[0][-1]
            n = in_shapes[1][0] if kind == "linear" else in_shapes[1][-1]
            m = node["flops"] / (2.0 * k * n) if k and n else 0.0
            compute = 3 * gemm_s(dev, pol.compute_dtype, m / div, k, n, e) if m else 0.0
        elif kind == "sdpa" and len(in_shapes) >= 3:
            b, heads, t, d = in_shapes[0]
            s_kv, kv_width = in_shapes[1][2], in_shapes[1][1] * in_shapes[1][3]
            f, bk = attention_s(dev, pol.compute_dtype, tokens=b * t / div, s_kv=s_kv, q_width=heads * d,
                                kv_width=kv_width, batch=b / div, bytes_per_value=e,
                                causal=node["args"].get("causal", True))
            compute = f + bk
        elif kind in ("norm", "pointwise", "embedding", "cat", "repeat", "reduce", "softmax", "other"):
            moved = e * (numel_out + sum(math.prod(s) for s in in_shapes)) / div
            compute = 3 * memory_bound_s(dev, moved)
        comm = 0.0
        for a, w in enumerate(combo):
            if w.own_comm == "weight_grad_allreduce":
                w_shape = in_shapes[1] if kind in ("linear", "norm") else in_shapes[0]
                w_place = ins[1] if kind in ("linear", "norm") else ins[0]
                grads = pol.grad_bytes * local_numel(math.prod(w_shape), w_shape, w_place, mesh)
                comm += all_reduce_s(grads, self.mesh.groups[a]) / self.ctx.num_microbatches
        state = act = 0.0
        if kind == "param":
            per_param = self.ctx.state_bytes_per_param or (pol.param_bytes + pol.grad_bytes + pol.optimizer_bytes)
            state = per_param * local_numel(numel_out, node["shape"], placement, mesh)
        elif kind in SAVED_KINDS or node["op"] in SAVED_POINTWISE:
            act = e * local_numel(numel_out, node["shape"], placement, mesh)
        partial = tuple(tuple(i in w.partial_grads for w in combo) for i in range(len(in_shapes)))
        return OpStrategy(name="|".join(w.name for w in combo), out=placement, ins=ins, partial_grads=partial,
                          compute_s=compute, comm_s=comm, state_bytes=state, act_bytes=act)

    def _transfer_s(self, producer: str, src, dst, partial) -> float:
        return sum(transfer_s(t, self.mesh, self.ctx) for t in transfers(self.nodes[producer], src, dst, partial, self.mesh, self.ctx))

    # -- the program -----------------------------------------------------------------
    def build(self) -> None:
        for op in self.order:
            self.x[op] = [self.prob.add_variable(f"x_{op}_{i}", cat="Binary") for i in range(len(self.strategies[op]))]
        objective = []
        for op in self.order:
            for var, s in zip(self.x[op], self.strategies[op]):
                if s.compute_s + s.comm_s:
                    objective.append((s.compute_s + s.comm_s) * var)
        self.add_one_hot_constraint()
        uses: dict[tuple, list[pulp.LpVariable]] = {}  # (u, s, need, partial) -> y variables
        for op in self.ops:
            for pos, producer in enumerate(self.inputs[op]):
                self.add_edge_constraint(producer, op, pos, uses)
        self.add_chain_constraint(uses)
        objective += self.add_transfer_constraint(uses)
        self.add_memory_constraint()
        self.add_fixed_constraint()
        self.prob += pulp.lpSum(objective)

    def add_chain_constraint(self, uses: dict) -> None:
        """A repeated block's output feeds the next copy's input: charge the resharding from
        the output's placement to the input's (so a Partial output pays its all-reduce)."""
        if self.chain is None:
            return
        src, dst = self.chain
        self._link(src, dst, -1, lambda sd: sd.out, lambda sd: (False,) * len(self.mesh.shape), "chain", uses)

    def add_one_hot_constraint(self) -> None:
        for op in self.order:
            self.prob += pulp.lpSum(self.x[op]) == 1, f"one_hot_{op}"

    def add_edge_constraint(self, u: str, v: str, pos: int, uses: dict) -> None:
        """Link y[u,v,s,t] to x[u,s] and x[v,t]; record which transfer each pair needs."""
        self._link(u, v, pos, lambda sv: sv.ins[pos], lambda sv: sv.partial_grads[pos], "edge", uses)

    def _link(self, u: str, v: str, pos: int, needs, partial, family: str, uses: dict) -> None:
        """y variables for the pairs of (u's strategy, v's strategy), where v needs
        `needs(v's strategy)` from u, tied to the x of both ends by named constraints."""
        su_all, sv_all = self.strategies[u], self.strategies[v]
        if len(su_all) == 1 and len(sv_all) == 1:  # nothing to choose: the transfer is a constant
            key = (u, 0, needs(sv_all[0]), partial(sv_all[0]))
            uses.setdefault(key, [])
            return
        ys = {}
        for i, _su in enumerate(su_all):
            for j, sv in enumerate(sv_all):
                var = self.prob.add_variable(f"y_{family}_{u}_{v}_{pos}_{i}_{j}", cat="Continuous", lowBound=0)
                ys[(i, j)] = var
                uses.setdefault((u, i, needs(sv), partial(sv)), []).append(var)
        for i, xv in enumerate(self.x[u]):
            self.prob += pulp.lpSum(var for (a, _), var in ys.items() if a == i) == xv, f"{family}_out_{u}_{v}_{pos}_{i}"
        for j, xv in enumerate(self.x[v]):
            self.prob += pulp.lpSum(var for (_, b), var in ys.items() if b == j) == xv, f"{family}_in_{u}_{v}_{pos}_{j}"
        self.y[(u, v, pos)] = ys

    def add_transfer_constraint(self, uses: dict) -> list:
        """One z per (producer strategy, placement needed, partial gradients) with a cost,
        bounded below by every y that needs it; returns the objective's resharding terms."""
        terms = []
        for n, ((u, i, need, partial), ys) in enumerate(uses.items()):
            cost = self._transfer_s(u, self.strategies[u][i].out, need, partial)
            if not cost:
                continue
            if not ys:  # both ends fixed
                terms.append(cost)
                continue
            z = self.prob.add_variable(f"z_{u}_{n}", cat="Continuous", lowBound=0)
            self.z[(u, i, need, partial)] = z
            for k, y in enumerate(ys):
                self.prob += z >= y, f"transfer_{u}_{n}_{k}"
            terms.append(cost * z)
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

    def _allowed(self, op: str, s: OpStrategy) -> bool:
        node = self.nodes[op]
        pinned = self.ctx.pinned
        if node["kind"] == "param" and node["param"] in pinned:
            return s.out == pinned[node["param"]]
        for pos, u in enumerate(self.inputs[op]):  # a pinned weight is used as it is held, as DTensor runs it
            if self.nodes[u]["kind"] == "param" and self.nodes[u]["param"] in pinned and s.ins[pos] != pinned[self.nodes[u]["param"]]:
                return False
        sp = self.ctx.sequence_parallel
        if node["kind"] in STREAM_KINDS and sp is not None and self.stream is not None \
                and node["shape"] == self.nodes[self.stream]["shape"]:
            # the residual stream between the block's GEMMs: whole on every tensor-parallel rank,
            # or split on the sequence under sequence parallelism (Korthikanti et al. 2022)
            return all(role != "tensor" or p in (("S1", "P") if sp else ("R", "P"))
                       for role, p in zip(self.mesh.roles, s.out))
        if node["kind"] != "input":
            return True
        for a, role in enumerate(self.mesh.roles):
            p = s.out[a]
            if role == "data" and p != "S0":
                return False
            if role == "tensor":
                if op != self.stream:  # other inputs (rotary tables, masks) arrive whole
                    if p != "R":
                        return False
                elif not (p == "R" and not sp or p == "S1" and sp is not False and len(node["shape"]) >= 3):
                    return False
        return True

    def add_fixed_constraint(self) -> None:
        for op in self.order:
            for var, s in zip(self.x[op], self.strategies[op]):
                if not self._allowed(op, s):
                    self.prob += var == 0, f"fixed_{op}_{s.name.replace('|', '_')}"

    def solve(self, time_limit_s: float | None = None) -> IntraOpSolution:
        """The optimum (or, past `time_limit_s`, the best solution found so far)."""
        t0 = time.perf_counter()
        allowed = {op: [s for s in self.strategies[op] if self._allowed(op, s)] for op in self.order}
        if any(not v for v in allowed.values()):
            op = next(o for o, v in allowed.items() if not v)
            node = self.nodes[op]
            if node["kind"] == "param" and node["param"] in self.ctx.pinned:
                raise ConfigError(f"placement {', '.join(to_dtensor(p) for p in self.ctx.pinned[node['param']])} of {node['param']} does not fit "
                                  f"its shape {tuple(node['shape'])} on mesh {self.mesh.shape}; shard a dimension the "
                                  "mesh divides (Shard(0) or Shard(1) for a linear's weight) or replicate it")
            raise ConfigError(f"no strategy of op {op} ({node['op']}) is allowed on mesh {self.mesh.shape} under the "
                              "pinned placements; re-plan, or pin placements its inputs allow")
        if all(len(v) == 1 for v in allowed.values()):  # every op fixed: nothing to solve
            choice = {op: v[0] for op, v in allowed.items()}
            return self._solution(choice, 0.0, time.perf_counter() - t0, "fixed")
        self.build()
        solver = _solver(time_limit_s)
        with _quiet_stdout():
            self.prob.solve(solver)
        solve_s = time.perf_counter() - t0
        status = pulp.LpStatus[self.prob.status]
        found = self.prob.sol_status in (pulp.LpSolutionOptimal, pulp.LpSolutionIntegerFeasible)
        if status == "Infeasible" or self.prob.sol_status == pulp.LpSolutionInfeasible:
            raise ConfigError(
                f"the sharding ILP on mesh {self.mesh.shape} is infeasible: no sharding fits the memory budget "
                f"of {self.ctx.memory_budget_bytes / 2**20:.1f} MiB; use more devices per stage"
            )
        if not found:
            limit = f"its {time_limit_s:g} s time limit" if time_limit_s else "the solver"
            raise IlpTimeout(f"the sharding ILP on mesh {self.mesh.shape} timed out: {limit} ended it after "
                              f"{solve_s:.1f} s without a solution; raise --time-limit or plan a smaller mesh")
        choice = {}
        for op in self.order:
            vals = [v.value() or 0.0 for v in self.x[op]]
            choice[op] = self.strategies[op][max(range(len(vals)), key=vals.__getitem__)]
        state = "optimal" if self.prob.sol_status == pulp.LpSolutionOptimal else "feasible (time limit)"
        return self._solution(choice, pulp.value(self.prob.objective) or 0.0, solve_s, state)

    def _solution(self, choice, objective_s: float, solve_s: float, status: str) -> IntraOpSolution:
        return IntraOpSolution(
            mesh=self.mesh, choice=choice, candidates=self.strategies, objective_s=objective_s, solve_s=solve_s,
            status=status, nodes=self.nodes, inputs={op: list(self.inputs[op]) for op in self.ops},
            chain=self.chain, ctx=self.ctx,
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
