"""planner.search: the outer loop over mesh shapes, ZeRO level, recomputation, microbatch
size and schedule; ranks by the cost model and returns the fastest plan that fits.

1. Enumerate candidates over what the user did not fix: tp (within a node, dividing the
   heads), cp, pp, dp (the rest), ZeRO 0-3 and HSDP shard groups, recomputation,
   microbatch size, schedule and virtual stages. Sequence parallelism is on with tp > 1
   (same traffic as tensor parallelism, less memory and work).
2. Estimate each with the analytic path (`costmodel.analytic`); drop those that do not fit.
3. For the best few: cut layers into stages with the inter-op DP (`planner.inter_op`) and
   replay the step in the event simulator; the fastest that fits wins.
4. For the winner: trace the module it runs (two blocks, its microbatch), solve the block's
   sharding ILP on the tensor-parallel axis in the memory the simulation leaves
   (`planner.intra_op`), take its placements where the runtime executes them (Megatron's
   otherwise), and price the step again on the block's graph under those placements
   (`planner.pricing`): the plan's prediction is the price of what it says.
"""

from __future__ import annotations

import itertools
import math
import time
from dataclasses import dataclass, field

import numpy as np
from tqdm import tqdm

from costmodel import ConfigError, Strategy, build_step, simulate
from costmodel.analytic import estimate
from costmodel.cluster import Cluster
from costmodel.hardware import GIB
from costmodel.memory import zero_model_state_bytes
from costmodel.moe import expert_shard
from costmodel.result import StepResult
from costmodel.schedule import peak_in_flight
from costmodel.serving import WEIGHT_FORMATS
from costmodel.lora import default_targets
from costmodel.spec import ModelSpec, format_count
from costmodel.strategy import Schedule
from costmodel.validate import strategy_problems
from planner.contract import (
    RUNNABLE_RUNTIMES, expert_parallel_runs, layout_problems, planned_only, source_strategy_problems,
    strategy_runtime_problems,
)
from planner.inter_op import partition_layers
from planner.plan import megatron_placements, schedule_problems
from planner.intra_op import CostContext, IlpTimeout, IntraOpSolution, LogicalMesh, solve_block
from planner.pricing import block_ops, graph_price, probe_graph, unpriceable

SIMULATE_TOP = 8
MAX_MICROBATCH = 8


@dataclass(frozen=True, slots=True, kw_only=True)
class SearchRequest:
    spec: ModelSpec
    cluster: Cluster
    global_batch: int
    fixed: dict = field(default_factory=dict)  # strategy flags the user gave
    time_limit_s: float | None = None
    progress: bool = False
    source: dict = field(default_factory=dict)  # the module `paraplan run` builds (planner.model_source.source_of)


@dataclass(slots=True, kw_only=True)
class SearchResult:
    strategy: Strategy
    result: StepResult
    placements: dict[str, dict[str, str]]
    stats: dict
    ilp: IntraOpSolution | None = None


def divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def enumerate_candidates(req: SearchRequest, rejected: list[str] | None = None,
                         nearest: list[str] | None = None, module_map=None) -> list[Strategy]:
    """Every strategy of the given flags that the model, the cluster and (for plans priced
    for paraplan's own runtime) `paraplan run` accept; why the others were dropped goes to
    `rejected`, and (to `nearest` too) why those the model and cluster accept were dropped.
    `module_map`: the user's module's (None: paraplan's own Transformer, which splits every
    linear): tensor parallelism only where its blocks have linears the runtime splits, sequence
    parallelism by default only where it splits them all."""
    rejected = [] if rejected is None else rejected
    nearest = [] if nearest is None else nearest
    spec, cluster, fixed = req.spec, req.cluster, req.fixed
    world, per_node = cluster.world_size, cluster.gpus_per_node
    seq = fixed.get("seq_len") or spec.seq_len
    unsplit = module_map is not None and bool(module_map.unsplittable)  # some block linear stays whole
    # tensor-parallel groups inside a node: a tp that does not divide the node would straddle two
    tps = [fixed["tp"]] if "tp" in fixed else [t for t in (1, 2, 4, 8, 16)
                                               if t <= per_node and per_node % t == 0 and spec.heads % t == 0]
    cps = [fixed["cp"]] if "cp" in fixed else ([1, 2, 4, 8] if seq >= 65536 else [1, 2, 4] if seq >= 16384
                                              else [1, 2] if seq >= 8192 else [1])
    out: list[Strategy] = []
    # `paraplan run` will execute the plan (a model it cannot build at all is planned for prediction)
    runnable = cluster.runtime.name in RUNNABLE_RUNTIMES and not (spec.latent_attention and not req.source.get("kind"))
    zero_bubble = cluster.runtime.name == "paraplan"  # torch's zero-bubble schedule, which torch.compile does not take
    # a module whose experts the runtime does not split (gpt-oss's): ep 1, even where it holds more
    # experts per GPU than the search's cap would otherwise let it try
    expert_fixed = fixed if "ep" in fixed or not runnable or expert_parallel_runs(req.source) else {**fixed, "ep": 1}
    for tp, cp in itertools.product(tps, cps):
        if world % (tp * cp):
            degrees = f"tp({tp}) * cp({cp}) = {tp * cp}" if cp > 1 else f"tp({tp})"
            rejected.append(f"{degrees} does not divide the {world} GPUs of {cluster.name}; "
                            "use degrees that divide the GPU count")
            continue
        rest = world // (tp * cp)
        pps = [fixed["pp"]] if "pp" in fixed else [p for p in divisors(rest) if p <= min(spec.layers, 128)]
        if not pps:
            rejected.append(f"{world} GPUs: every pipeline depth that divides {rest} exceeds {spec.name}'s "
                            f"{spec.layers} layers, and dp or tp cannot take the rest; use another GPU count")
        for pp in pps:
            if rest % pp:
                rejected.append(f"pp({pp}) does not divide the {rest} GPUs left by tp({tp}) * cp({cp}) on "
                                f"{cluster.name}; use a pp that divides {rest}")
                continue
            dp = rest // pp
            if "dp" in fixed and fixed["dp"] != dp:
                rejected.append(f"--dp {fixed['dp']} leaves pp({pp}) * tp({tp}) * cp({cp}) = {pp * tp * cp} for "
                                f"{world} GPUs; give degrees whose product is {world}")
                continue
            if req.global_batch % dp:
                rejected.append(f"global batch {req.global_batch} does not split over dp({dp}) on {world} GPUs; "
                                f"use a multiple of {dp} or fix --pp/--tp to leave a dp that divides it")
                continue
            per_replica = req.global_batch // dp
            mbss = [fixed["microbatch_size"]] if "microbatch_size" in fixed else [
                b for b in divisors(per_replica) if b <= MAX_MICROBATCH]
            zeros = [fixed["zero"]] if "zero" in fixed else ([0, 1, 2, 3] if dp * cp > 1 else [0])
            for zero, rc, mbs in itertools.product(zeros, _recomputes(fixed), mbss):
                groups = [fixed["shard_group"]] if "shard_group" in fixed else _shard_groups(zero, dp, tp * cp, per_node)
                for group, (sched, v), (ep, etp) in itertools.product(
                        groups, _schedules(fixed, pp, per_replica // mbs, spec.layers, zero_bubble),
                        _expert_degrees(spec, expert_fixed, dp, cp, tp)):
                    for stage_rc in _stage_recomputes(fixed, rc, pp, sched):
                        try:
                            s = Strategy(
                                tp=tp, pp=pp, dp=dp, cp=cp, ep=ep, expert_tp=etp, zero=zero, shard_group=group,
                                sequence_parallel=fixed.get("sequence_parallel", tp > 1 and req.source.get("kind") != "py"
                                                            and not unsplit),
                                recompute=rc,
                                stage_recompute=stage_rc, microbatch_size=mbs, global_batch=req.global_batch,
                                schedule=sched, virtual_stages=v, precision=fixed.get("precision", "bf16"),
                                flash_attention=fixed.get("flash_attention", True), seq_len=seq,
                                lora_rank=fixed.get("lora_rank", 0),
                                lora_targets=fixed.get("lora_targets") or (
                                    default_targets(spec) if fixed.get("lora_rank") else ()),
                                base_precision=fixed.get("base_precision", "bf16"),
                                grad_dtype=fixed.get("grad_dtype", cluster.runtime.grad_dtype),
                                master_dtype=fixed.get("master_dtype", "fp32"),
                            )
                        except ConfigError as exc:
                            rejected.append(str(exc))
                            continue
                        problems = strategy_problems(spec, s, world)
                        mode = "lora" if s.lora else "train"
                        # what the user's module cannot run, whether the model and cluster take the strategy
                        # or not; first where it names a flag the user gave (no other flag changes that)
                        source = source_strategy_problems(req.source, s, mode) if runnable else []
                        flagged = [p for p in source if _names_a_flag(p, fixed)]
                        if runnable and not problems:  # what the user asked for by a flag stays, with a note
                            asked = {msg for flag, msg in planned_only(s, mode).items() if flag in fixed}
                            problems = source + [p for p in strategy_runtime_problems(spec, s, mode) if p not in asked]
                            if not problems and module_map is not None and s.tp > 1:
                                problems = layout_problems(module_map, megatron_placements(spec, s, module_map),
                                                           s.tp, s.sequence_parallel)
                            if problems:
                                nearest.append((flagged or problems)[0])
                        if problems:  # each once: the module's under a flag the user gave, the first, the rest
                            rejected.extend(dict.fromkeys(flagged + problems[:1] + source))
                        else:
                            out.append(s)
    return out


def _names_a_flag(problem: str, fixed: dict) -> bool:
    """Whether `problem` says to change a parallel degree the user gave (`re-plan with --pp 1` for
    --pp): what the module cannot run under it (a LoRA target it lacks is the validation's to name)."""
    return any(f"--{flag} " in problem for flag in ("tp", "pp", "ep", "cp", "dp") if flag in fixed)


def main_reason(reasons: list[str]) -> str:
    """The most frequent reason (a candidate gives each of its reasons once: the one every
    candidate met wins), in the words of the rule that gave it (the first of a tie)."""
    return max(set(reasons), key=lambda r: (reasons.count(r), -reasons.index(r)))


def states_floor_gib(spec: ModelSpec, s: Strategy) -> float:
    """A floor under the fullest GPU's memory: the model states of the mean pipeline rank
    (parameters over tp and pp, routed experts over pp, ep and expert tp, sharded as ZeRO
    shards them), which the fullest rank holds at least, with no activations counted."""
    if s.lora:  # a frozen base holds weights only (costmodel.lora): no floor from training states
        return 0.0
    pol = s.policy
    kw = dict(param_bytes=pol.param_bytes, grad_bytes=pol.grad_bytes, optimizer_bytes=pol.optimizer_bytes)
    experts = spec.moe_layers * spec.experts * spec.expert_params
    shard = s.dp_shard * s.cp
    zero = s.zero if shard > 1 else 0
    dense = sum(zero_model_state_bytes((spec.num_params - experts) / (s.tp * s.pp), shard, zero, **kw))
    if not experts:
        return dense / GIB
    eshard = expert_shard(s)
    sparse = sum(zero_model_state_bytes(experts / (s.pp * s.ep * (s.expert_tp or s.tp)), eshard,
                                        s.zero if eshard > 1 else 0, **kw))
    return (dense + sparse) / GIB


# the search holds at most this many routed experts per GPU (Megatron-Core's and DeepSeek-V3's
# runs hold 1 to 8), or as few as the GPUs allow: fewer ranks per expert group only grow the
# expert states per GPU
MAX_LOCAL_EXPERTS = 8


def _expert_degrees(spec: ModelSpec, fixed: dict, dp: int, cp: int, tp: int) -> list[tuple[int, int]]:
    """(ep, expert tp) pairs to try: for a mixture of experts every ep dividing both the experts
    and the ranks it may fold over, experts split over tp or whole; (1, 0) for a dense model."""
    if not spec.moe:
        return [(fixed.get("ep", 1), fixed.get("expert_tp", 0))]
    # experts whole under tp (Megatron-Core's MoE guideline 4: EP over TP for expert layers: larger
    # local GEMMs, less communication); --expert-tp asks for split experts
    etps = [fixed["expert_tp"]] if "expert_tp" in fixed else ([1] if tp > 1 else [0])
    if "expert_tp" not in fixed and tp > 1 and fixed.get("ep", tp) % tp:  # an ep whole experts cannot fold over tp
        etps = [tp]  # (ep 1 where the runtime splits no experts): the experts split over tp as the dense layers
    out = []
    for etp in etps:
        fold = dp * cp * (tp if etp == 1 else 1)
        if "ep" in fixed:
            out += [(fixed["ep"], etp)]
            continue
        feasible = [e for e in divisors(spec.experts) if fold % e == 0]
        # where no ep brings the local experts down to the cap (Qwen3-30B-A3B's 128 on 8 GPUs), the
        # widest ep there is
        cap = max(MAX_LOCAL_EXPERTS, min(spec.experts // e for e in feasible))
        out += [(e, etp) for e in feasible if spec.experts // e <= cap]
    return out


def _stage_recomputes(fixed: dict, rc: str, pp: int, schedule: str) -> list[tuple[str, ...]]:
    """Uniform recomputation, and under 1F1B full recomputation on only the first stages,
    which keep the most microbatches in flight (pp - r on rank r)."""
    options: list[tuple[str, ...]] = [()]
    if "recompute" in fixed or rc != "full" or schedule != "1f1b" or pp < 4:
        return options
    for k in sorted({pp // 4, pp // 2, 3 * pp // 4} - {0, pp}):
        options.append(("full",) * k + ("none",) * (pp - k))
    return options


def _shard_groups(zero: int, dp: int, inner: int, per_node: int) -> list[int]:
    if zero == 0:
        return [1]
    groups = [dp]
    node_group = per_node // inner if inner < per_node else 1
    if zero == 3 and 1 < node_group < dp and dp % node_group == 0:
        groups.append(node_group)  # HSDP: shard inside a node, replicate across nodes
    return groups


def _recomputes(fixed: dict) -> list[str]:
    if "recompute" in fixed:
        return [fixed["recompute"]]
    if fixed.get("flash_attention", True):
        return ["none", "full"]  # with FlashAttention, selective recomputation keeps nothing less
    return ["none", "selective", "full"]


def _schedules(fixed: dict, pp: int, m: int, layers: int, zero_bubble: bool = True) -> list[tuple[str, int]]:
    """The (schedule, virtual stages) to try: those the runtime's pipelining accepts; the zero-bubble
    schedule unasked only where `zero_bubble` (paraplan's runtime runs torch's; Megatron-Core has none)."""
    return [(name, v) for name, v in _schedule_choices(fixed, pp, m, layers)
            if not schedule_problems(name, pp, m) and (zero_bubble or name != "zero-bubble" or "schedule" in fixed)]


def _schedule_choices(fixed: dict, pp: int, m: int, layers: int) -> list[tuple[str, int]]:
    if pp == 1:
        return [(fixed.get("schedule", "1f1b"), 1)] if fixed.get("schedule", "1f1b") != "interleaved" else []
    zb = [fixed["virtual_stages"]] if "virtual_stages" in fixed else [1, 2]
    zero_bubble = [("zero-bubble", v) for v in zb if layers >= pp * v]
    if "schedule" in fixed:
        sched = fixed["schedule"]
        if sched == "zero-bubble":
            return zero_bubble
        if sched != "interleaved":
            return [(sched, 1)]
        vs = [fixed["virtual_stages"]] if "virtual_stages" in fixed else [2, 3, 4]
        return [("interleaved", v) for v in vs if layers >= pp * v]
    vs = [fixed["virtual_stages"]] if "virtual_stages" in fixed else [2, 3, 4, 6]
    return [("1f1b", 1)] + [("interleaved", v) for v in vs if v > 1 and layers >= pp * v] + zero_bubble


def _partition(spec: ModelSpec, s: Strategy, cluster: Cluster) -> Strategy:
    """Cut the layers with the inter-op DP for a non-interleaved pipeline."""
    if s.pp == 1 or s.schedule is Schedule.INTERLEAVED or s.virtual_stages > 1:
        return s
    model = build_step(spec, s, cluster)
    # per-layer figures from the balanced model: a middle stage has only transformer layers
    counts = model.layers
    mid = max(range(len(counts)), key=lambda k: (0 < k < len(counts) - 1, counts[k]))
    per_layer_t = (model.forward[mid].total + model.backward[mid].total) / counts[mid]
    first_t = model.forward[0].total + model.backward[0].total - per_layer_t * counts[0]
    last_t = model.forward[-1].total + model.backward[-1].total - per_layer_t * counts[-1]
    mem_mid = model.memory[mid]
    # microbatches whose activations each rank holds at its peak (1F1B: pp - rank; zero bubble: pp)
    in_flight = np.array([peak_in_flight(s.schedule, s.pp, s.num_microbatches, 1, i, [1.0]) for i in range(s.pp)],
                         dtype=float)
    states_per_layer = (mem_mid.parameters + mem_mid.gradients + mem_mid.optimizer) / counts[mid]
    act_per_layer = mem_mid.activations / counts[mid] / in_flight[mid]
    overhead = cluster.device.memory_overhead
    capacity = (cluster.device.hbm_bytes - overhead.fixed_gib * GIB) / (1 + overhead.fragmentation)
    first_mem, last_mem = model.memory[0], model.memory[-1]
    embed_bytes = first_mem.parameters + first_mem.gradients + first_mem.optimizer - states_per_layer * counts[0]
    head_bytes = last_mem.parameters + last_mem.gradients + last_mem.optimizer - states_per_layer * counts[-1]
    L = spec.layers
    part = partition_layers(
        np.full(L, per_layer_t), np.full(L, states_per_layer), np.full(L, act_per_layer),
        stages=s.pp, microbatches=s.num_microbatches, in_flight=in_flight,
        embed_s=max(first_t, 0.0), head_s=max(last_t, 0.0), embed_bytes=max(embed_bytes, 0.0),
        head_bytes=max(head_bytes, 0.0), capacity_bytes=capacity,
    )
    return s.replace(stage_layers=part.layers) if part else s


def run_search(req: SearchRequest, *, module_map=None) -> SearchResult:
    """The fastest plan that fits: every candidate estimated, the best simulated in full, the
    block's ILP solved for the chosen one on the module `paraplan run` builds (traced at the
    plan's microbatch: `req.source`), and the step priced again on its graph. `module_map`:
    that module's map (None: paraplan's own Transformer), whose names the placements take."""
    t_start = time.perf_counter()
    spec, cluster = req.spec, req.cluster
    # a compute dtype the GPU has no tensor cores for is said first, not as "does not fit" behind the
    # candidates too large to price (a QLoRA base's nf4 is storage, computed in bf16: not checked)
    dtype = req.fixed.get("precision")
    if dtype in WEIGHT_FORMATS:
        raise ConfigError(f"--precision {dtype} is a serving weight format (a mixture of experts' stored experts); "
                          "training computes in one of fp32, bf16, fp16, fp8: plan serving with --mode inference")
    if dtype and dtype not in cluster.device.peak_tflops:
        cluster.device.peak_flops(dtype)  # raises, naming the GPU's dtypes
    rejected: list[str] = []
    nearest: list[str] = []
    candidates = enumerate_candidates(req, rejected, nearest, module_map)
    if not candidates:
        if rejected:  # why the candidates nearest to running were dropped (those the model and cluster accept)
            raise ConfigError(main_reason(nearest or rejected))
        raise ConfigError(
            f"no strategy of the given flags fits {cluster.world_size} GPUs for global batch {req.global_batch}; "
            "loosen a flag or change the batch"
        )
    scored: list[tuple[float, int, Strategy]] = []
    unpriced: list[str] = []  # why candidates could not be estimated
    smallest_gib = math.inf
    estimated = floored = 0
    timed_out = False
    bar = tqdm(candidates, desc="estimating", unit="cand", disable=not req.progress, leave=False)
    for i, s in enumerate(bar):
        # past the time limit, stop at once a plan that fits is in hand
        if scored and req.time_limit_s is not None and time.perf_counter() - t_start > req.time_limit_s * 0.5:
            timed_out = True
            break
        floor_gib = states_floor_gib(spec, s)
        if floor_gib > cluster.device.hbm_gib:  # its model states alone overflow every GPU: not worth pricing
            smallest_gib = min(smallest_gib, floor_gib)
            floored += 1
            continue
        try:
            est = estimate(build_step(spec, s, cluster))
        except ConfigError as exc:
            unpriced.append(str(exc))
            continue
        estimated += 1
        smallest_gib = min(smallest_gib, est.memory_gib)
        if est.fits:
            scored.append((est.step_time_s, i, s))
    bar.close()
    if not scored and estimated == 0 and not floored and unpriced:  # nothing could be priced: say why, not "inf GiB"
        raise ConfigError(main_reason(unpriced))
    if not scored:
        raise ConfigError(
            f"{spec.name} ({format_count(spec.num_params)} parameters) does not fit on {cluster.name}: the smallest plan "
            f"found needs {smallest_gib:.1f} GiB per GPU against {cluster.device.hbm_gib:g} GiB; use more GPUs"
        )
    scored.sort(key=lambda x: (x[0], x[1]))
    best: tuple[float, Strategy, StepResult] | None = None
    simulated = 0
    for est_s, _i, s in tqdm(scored[:SIMULATE_TOP], desc="simulating", unit="plan", disable=not req.progress, leave=False):
        if best is not None and est_s > best[0] * 1.5:
            break
        s = _partition(spec, s, cluster)
        try:
            result = simulate(build_step(spec, s, cluster), record_events=False)
        except ConfigError:
            continue
        simulated += 1
        if not result.fits:
            continue
        if best is None or result.step_time_s < best[0]:
            best = (result.step_time_s, s, result)
    if best is None:
        raise ConfigError(
            f"{spec.name} does not fit on {cluster.name} once simulated in full; use more GPUs or a smaller batch"
        )
    _, strategy, result = best
    # the block's ILP for the chosen plan (tp > 1: a tensor axis to place on), traced at its
    # microbatch with the memory its simulation leaves; then the plan's step priced again on
    # the block's graph under the placements it will carry
    solution, ilp_time = None, 0.0
    t0 = time.perf_counter()
    why_not = unpriceable(spec, strategy.seq_len)
    graph = None if why_not else probe_graph(spec, strategy, req.source)  # the module `run` builds, at its microbatch
    trace_s = time.perf_counter() - t0
    ilp_status = "none (tp 1)" if not why_not else "none (formula-priced)"
    if strategy.tp > 1 and graph is not None:
        t0 = time.perf_counter()
        try:  # None: infeasible under its memory
            solution = _solve_stage_mesh(graph, spec, strategy, cluster, result, req.time_limit_s or 30, req.source)
            ilp_status = solution.status if solution is not None else "infeasible"
        except IlpTimeout:
            ilp_status = "timed out"
        ilp_time = time.perf_counter() - t0
    placements, source = placements_for(spec, strategy, solution, module_map)
    t0 = time.perf_counter()
    formula_s = result.step_time_s
    try:
        if why_not:
            raise ConfigError(why_not)
        try:
            priced = graph_price(spec, strategy, cluster, placements, graph=graph, time_limit_s=req.time_limit_s or 30)
        except ConfigError:
            if source != "ilp":
                raise
            # the ILP's placements do not price as the runtime would run them: Megatron's, which do
            placements, source = placements_for(spec, strategy, None, module_map)
            priced = graph_price(spec, strategy, cluster, placements, graph=graph, time_limit_s=req.time_limit_s or 30)
        result = simulate(build_step(spec, strategy, cluster, priced.block), record_events=False)
        priced_by = "graph"
    except ConfigError as exc:  # the formulas' price stands, and the plan says why
        priced_by = f"formula ({exc})" if why_not else f"formula (the graph could not be priced: {exc})"
    graph_time = time.perf_counter() - t0
    stats = {
        "time_s": round(time.perf_counter() - t_start, 3),
        "candidates": len(candidates),
        "estimated": estimated,
        "simulated": simulated,
        "ilp_solves": int(strategy.tp > 1 and graph is not None),
        "ilp_infeasible": int(ilp_status == "infeasible"),
        "ilp_status": ilp_status,
        "ilp_mesh": " x ".join(f"{n} {k}" for n, k in zip(solution.mesh.names, solution.mesh.shape)) if solution else "",
        "ilp_time_s": round(ilp_time, 3),
        "trace_s": round(trace_s, 3),
        "graph_pricing_time_s": round(graph_time, 3),
        "priced": priced_by,
        "formula_step_s": round(formula_s, 6),
        "timed_out": timed_out,
        "placements": source,
    }
    return SearchResult(strategy=strategy, result=result, placements=placements, stats=stats, ilp=solution)


def _solve_stage_mesh(graph, spec: ModelSpec, s: Strategy, cluster: Cluster, result: StepResult,
                      time_limit_s: float = 30, source: dict | None = None) -> IntraOpSolution | None:
    """The block's ILP on the stage's mesh, with the memory one layer may use. Under ZeRO-3
    both axes are solved at once, (dp_shard, tp): the data axis splits the batch and the ILP
    chooses which parameters FSDP shards on it, their states counted whole where replicated;
    otherwise the tensor axis alone, the states per parameter as ZeRO leaves them."""
    layers_per_rank = max(math.ceil(spec.layers / s.pp), 1)
    worst = max(result.rank_memory_gib, key=lambda m: m["total"])
    left_gib = cluster.device.hbm_gib - worst["activations"] - worst["other"]
    budget = left_gib * GIB / layers_per_rank
    if not budget > 0:
        return None
    pol = s.policy
    shard = s.dp_shard * s.cp
    both = s.zero == 3 and shard > 1 and (source or {}).get("kind") != "py"
    if both:  # the block at the whole data-parallel batch, split by the data axis
        graph = probe_graph(spec, s, source, batch=s.microbatch_size * shard)
        mesh = LogicalMesh.on(cluster, (shard, s.tp), ("dp_shard", "tp"), ("data", "tensor"))
        per_param = pol.param_bytes + pol.grad_bytes + pol.optimizer_bytes
    else:
        mesh = LogicalMesh.on(cluster, (s.tp,), ("tp",), ("tensor",))
        per_param = sum(zero_model_state_bytes(1, shard, s.zero, param_bytes=pol.param_bytes,
                                               grad_bytes=pol.grad_bytes, optimizer_bytes=pol.optimizer_bytes))
    # Activations follow the strategy's recompute and sequence-parallel policies, which the
    # simulator prices (Korthikanti); the ILP places the parameters in the memory they leave.
    ctx = CostContext(cluster=cluster, policy=pol, num_microbatches=s.num_microbatches,
                      memory_budget_bytes=budget, activation_copies=0.0, state_bytes_per_param=per_param,
                      sequence_parallel=s.sequence_parallel)
    try:
        return solve_block(graph, block_ops(graph), mesh, ctx, time_limit_s=time_limit_s)
    except IlpTimeout:
        raise
    except ConfigError:
        return None


def placements_for(spec: ModelSpec, s: Strategy, solution: IntraOpSolution | None,
                   module_map=None) -> tuple[dict[str, dict[str, str]], str]:
    """(per-parameter placements, where they come from: "ilp", "megatron" or none at tp 1),
    named as in the module `paraplan run` builds (`module_map`; paraplan's own Transformer when
    None). The ILP's for the repeated block where the runtime executes them and they split
    what the step was priced with (every block linear when tp > 1, as the cost model's
    Megatron layer assumes); Megatron's layout otherwise. ZeRO-3 adds FSDP's Shard(0)."""
    from planner.module_map import zoo_map

    mmap = module_map or zoo_map(spec)
    megatron = megatron_placements(spec, s, mmap)
    if s.tp == 1:
        return dict(sorted(megatron.items())), "none on tp (tp 1)"
    if solution is None:
        return dict(sorted(megatron.items())), "megatron"
    ilp = _ilp_placements(s, solution, megatron, mmap)
    if layout_problems(mmap, ilp, s.tp, sequence_parallel=True):  # every linear split, as priced
        return dict(sorted(megatron.items())), "megatron"
    return ilp, "ilp"


def _ilp_placements(s: Strategy, solution: IntraOpSolution, megatron: dict, mmap) -> dict[str, dict[str, str]]:
    """The ILP's block placements (layer index written `*`) with Megatron's embedding and head."""
    out = {k: v for k, v in megatron.items() if not k.startswith(f"{mmap.blocks}.")}
    chosen = solution.parameter_placements()
    for name, placement in sorted(chosen.items()):
        parts = name.split(".")
        generic = ".".join("*" if p.isdigit() else p for p in parts)
        axes = {k: v for k, v in placement.items() if k != "dp_shard"}
        owner = name[: -len(".bias")] + ".weight" if name.endswith(".bias") else None
        if owner in chosen:
            # a linear's bias is split as the runtime splits it with its weight (ColwiseParallel
            # shards it, RowwiseParallel keeps it whole): the ILP may leave it whole beside a
            # column-split weight (a free local slice), which the pinned pricing would refuse
            axes.pop("tp", None)
            if chosen[owner].get("tp") == "Shard(0)":
                axes["tp"] = "Shard(0)"
        if s.zero == 3 and s.dp_shard * s.cp > 1:
            # FSDP2 shards every parameter of a block on dim 0; the ILP's data-axis choice (which
            # to shard, on which dim) prices the same bytes, and the runtime shards them all
            axes["dp_shard"] = "Shard(0)"
        if axes:
            out[generic] = axes
    return dict(sorted(out.items()))
