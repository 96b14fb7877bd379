"""The serving layout for traffic: replica shape, prefill/decode split and scheduler settings
that serve a rate within latency objectives on the fewest GPUs (DistServe's placement search, on
costmodel.traffic's simulator).

Formulation. A *unit* is what is replicated: one replica of tp x pp GPUs, or a disaggregated
group of 1 prefill replica and k decode replicas of that shape. For every unit u (tp within a
node dividing the heads, pp, k in {0 (mixed), 1, 2, 3}) and scheduler setting c (token budget
max_num_batched_tokens in TOKEN_BUDGETS, max_num_seqs in MAX_SEQS; chunked prefill on):

    rate*(u, c) = the largest arrival rate at which one unit meets every objective
                  (each named percentile of TTFT / TPOT / end-to-end latency within its target,
                  over the requests after a warm-up share WARMUP of the probe, every request
                  finished, and no queue growing: the last quarter's median normalized latency,
                  end-to-end seconds per output token, within GROWTH of the second quarter's), found by bisection (BISECT_STEPS) on [0, bound(u, c)], each probe a
                  simulation of PROBE_S seconds of arrivals (PROBE_REQUESTS bounds the count)
    bound(u, c) = BOUND_MARGIN x what the unit's iterations can do at all: its prefill
                  replicas' tokens per second at the full token budget over the mean prompt,
                  and its decode replicas' largest batch within the TPOT target (and the KV
                  cache) over the mean output (mixed replicas: the two times added per request);
                  a replica of pp stages runs pp virtual engines, each over 1/pp of its KV cache,
                  a traversal each at once (pp times the prompt and decode rates of one)
    goodput per GPU = rate* / GPUs(u)
    the steady-state planner's replica and batch (costmodel.serving.plan_serving at the mean
    lengths and the targets) join the grid, so the search contains the static choice;
    at the requested rate R, minimise (GPUs deployed = ceil(R / rate*) x GPUs(u), -goodput per
    GPU): the fewest GPUs that meet the objectives at R, the most headroom among those (at a
    rate many units serve this is the most goodput per GPU; at a low one, the smallest unit
    that serves it: 2 GPUs for 3 requests/s where a unit of 8 serves 78 at 1.5% more per GPU).
    Units are taken in order of bound per GPU and skipped where even their bound's key is no
    better than the best found (branch and bound: the skipped cannot win). With speculative
    decoding given (a draft model or n-gram proposals), the grid holds every candidate with it
    (pp 1 only: vLLM's proposers do not pipeline; the draft's weights and cache in the room) and
    without it, so the plan speculates where that serves the rate on fewer GPUs; a speculating
    candidate's decode bound is a check's tokens over a decode step's time (a check costs at
    least that: the bound stays a bound).

Units are independent under a load balancer that splits arrivals evenly (a Poisson stream split
n ways is n Poisson streams of rate R / n), so one unit's simulation gives the deployment's.
The optimum is exact over the grid up to the bisection's resolution (rate* within
2^-BISECT_STEPS of the bound) and the simulation's sampling.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

import numpy as np
from tqdm import tqdm

from costmodel.cluster import Cluster
from costmodel.errors import ConfigError
from costmodel.serving import (DEFAULT_ACCEPTANCE, GPU_MEMORY_UTILIZATION, SPECULATION_PP, ServingRequest, check_degrees,
                               layout_label, layout_problems, plan_serving, window_prefill)
from costmodel.serving_engine import DEFAULT_ENGINE, engine_cluster
from costmodel.spec import ModelSpec
from costmodel.traffic import (SLO, IterationCost, SchedulerConfig, ServingLayout, TrafficResult, replica_room,
                               replica_sequences, simulate_traffic)
from costmodel.workload import Request, generate, load_trace, mean_lengths, scenario_of, typical_request

BISECT_STEPS = 6
REQUESTS_PER_PROBE = 400  # a trace's requests, or a scenario's when the rate is given whole
PROBE_S = 15.0  # seconds of arrivals a probe simulates: long against a request's life, so a queue shows
PROBE_REQUESTS = (200, 1000)  # the fewest and most requests a probe simulates
GROWTH = 1.25  # a probe whose last quarter's median normalized latency exceeds its second quarter's by this is overloaded
WARMUP = 0.2  # the share of a probe's first requests left out of its percentiles (the empty start)
BOUND_MARGIN = 1.25
TOKEN_BUDGETS = (2048, 8192)
MAX_SEQS = (256, 1024)  # vLLM's default, and room for a long tail of decodes where the cache holds them
DECODE_PER_PREFILL = (0, 1, 2, 3)  # 0: mixed replicas


@dataclass(frozen=True, slots=True, kw_only=True)
class TrafficWorkload:
    """A scenario (generated at any rate) or a trace (its arrivals rescaled to the rate)."""

    name: str
    requests: int = REQUESTS_PER_PROBE
    seed: int = 0
    burst_cv: float = 1.0
    trace: tuple[Request, ...] = ()

    def __post_init__(self) -> None:
        if isinstance(self.requests, bool) or not isinstance(self.requests, int) or self.requests < 1:
            raise ConfigError(f"--requests must be a positive integer, got {self.requests!r}")
        if not self.burst_cv > 0:
            raise ConfigError(f"--burst-cv must be > 0 (1: Poisson), got {self.burst_cv}")

    @classmethod
    def of(cls, name: str, *, requests: int, seed: int = 0, burst_cv: float = 1.0) -> TrafficWorkload:
        if scenario_of(name) is not None:
            return cls(name=name, requests=requests, seed=seed, burst_cv=burst_cv)
        return cls(name=name, trace=tuple(load_trace(name)))

    def native_rate(self) -> float | None:
        """A trace's own rate (requests per second), None for a scenario."""
        if not self.trace:
            return None
        span = self.trace[-1].arrival_s - self.trace[0].arrival_s
        return (len(self.trace) - 1) / span if span > 0 else math.inf

    def probe(self, rate: float, context: int) -> list[Request]:
        """PROBE_S seconds of arrivals at `rate` (a trace: itself, rescaled)."""
        if self.trace:
            return self.at(rate, context)
        n = int(min(max(rate * PROBE_S, PROBE_REQUESTS[0]), PROBE_REQUESTS[1]))
        return generate(self.name, rate=rate, requests=n, context=context, seed=self.seed, burst_cv=self.burst_cv)

    def at(self, rate: float, context: int) -> list[Request]:
        if not self.trace:
            return generate(self.name, rate=rate, requests=self.requests, context=context, seed=self.seed,
                            burst_cv=self.burst_cv)
        native = self.native_rate()
        scale = native / rate if math.isfinite(native) else 0.0
        t0 = self.trace[0].arrival_s
        return [replace(r, arrival_s=(r.arrival_s - t0) * scale) for r in self.trace]


def meets(result: TrafficResult, slo: SLO, warmup: float = 0.0) -> bool:
    """Every objective's percentile within its target over the requests after the first
    `warmup` share (in arrival order), every request finished."""
    if result.finished < result.requests:
        return False
    n = result.finished
    if n >= 40:  # a queue that grows: the last quarter waits longer than the second (median normalized latency)
        per_token = result.e2e_s / result.outputs  # end-to-end seconds per output token (Kwon et al. 2023)
        if float(np.median(per_token[3 * n // 4:])) > GROWTH * float(np.median(per_token[n // 4: n // 2])):
            return False
    skip = int(warmup * n)
    several = result.outputs[skip:] > 1  # TPOT of the requests with a second token
    values = {"ttft": result.ttft_s[skip:], "tpot": result.tpot_s[skip:][several], "e2e": result.e2e_s[skip:]}
    return all(not len(values[m]) or float(np.percentile(values[m], p)) <= s for m, p, s in slo.targets)


@dataclass(frozen=True, slots=True, kw_only=True)
class UnitResult:
    unit: ServingLayout  # replicas = the unit's replicas (1, or 1 + k decode)
    scheduler: SchedulerConfig
    max_rate_rps: float  # the most one unit serves within the objectives
    probes: int

    @property
    def gpus(self) -> int:
        return self.unit.gpus

    @property
    def goodput_per_gpu(self) -> float:
        return self.max_rate_rps / self.gpus

    def units_for(self, rate: float) -> int:
        return units_needed(rate, self.max_rate_rps)

    def name(self) -> str:
        u = self.unit
        shape = u.label
        split = f"1 prefill + {u.replicas - 1} decode of {shape}" if u.prefill_replicas else shape
        k = self.scheduler.speculative_tokens
        return (f"{split}, {self.scheduler.max_num_seqs} seqs, budget {self.scheduler.max_num_batched_tokens}"
                + (f", speculating {k}" if k else ""))


@dataclass(frozen=True, slots=True, kw_only=True)
class TrafficPlan:
    best: UnitResult
    rate: float
    units: int  # of best, for the rate
    deployment: ServingLayout
    at_rate: TrafficResult  # the deployment simulated at the rate
    results: list[UnitResult] = field(default_factory=list)
    refused: dict[str, str] = field(default_factory=dict)
    cluster_gpus: int = 0
    skipped: int = 0  # candidates whose bound could not beat the best found

    @property
    def fits_cluster(self) -> bool:
        """Whether the deployment for the rate fits the GPUs given."""
        return self.deployment.gpus <= self.cluster_gpus


def unit_bound(spec: ModelSpec, cluster: Cluster, unit: ServingLayout, cfg: SchedulerConfig, prompt: float,
               output: float, slo: SLO) -> float:
    """An upper bound on the requests per second one unit serves (see the formulation)."""
    cluster = engine_cluster(cluster, cfg.engine)
    cost = IterationCost(spec, cluster, unit.tp, unit.pp, unit.precision, cfg.max_num_batched_tokens,
                         unit.expert_parallel, kv_cache_dtype=cfg.kv_cache_dtype)  # the cluster is the engine's already
    chunk = cfg.max_num_batched_tokens
    # a replica's pp virtual engines each run a traversal at once (costmodel.traffic)
    prefill_tokens_s = unit.pp * chunk / cost.seconds(chunk, 1, 0, 0.0, chunk * (chunk + 1) / 2, chunk,
                                                      *window_prefill(spec, 0, chunk))
    most = max(1, min(cfg.max_num_seqs, replica_sequences(spec, cluster, unit, cfg, prompt + output)))
    tpot = min((s for m, _, s in slo.targets if m == "tpot"), default=math.inf)
    context = prompt + output / 2

    def step(b: int) -> float:  # per token of each sequence; a speculative check costs at least a decode step
        return cost.seconds(b, b, b, b * context, 0.0, 0.0) / cfg.tokens_per_check

    batch = most
    if step(1) > tpot:
        return 0.0
    while batch > 1 and step(batch) > tpot:
        batch = max(1, batch * 3 // 4)
    decode_s_per_request = output * step(batch) / (batch * unit.pp)
    prefill_s_per_request = prompt / prefill_tokens_s
    if unit.prefill_replicas:
        decoders = unit.replicas - unit.prefill_replicas
        rate = min(unit.prefill_replicas / prefill_s_per_request, decoders / decode_s_per_request)
    else:
        rate = unit.replicas / (prefill_s_per_request + decode_s_per_request)
    return BOUND_MARGIN * rate


def unit_max_rate(spec: ModelSpec, cluster: Cluster, unit: ServingLayout, cfg: SchedulerConfig, wl: TrafficWorkload,
                  slo: SLO, bound: float) -> tuple[float, int]:
    """(the largest rate one unit serves within the objectives, probes run): bisection on [0, bound]
    (a bound of 0, objectives no rate meets, is returned without a probe)."""
    probes = 0
    if not bound > 0:
        return 0.0, 0

    def ok(rate: float) -> bool:
        nonlocal probes
        probes += 1
        reqs = wl.probe(rate, spec.context_len)
        return meets(simulate_traffic(spec, cluster, reqs, unit, cfg, slo), slo, WARMUP)

    lo, hi = 0.0, bound
    for _ in range(BISECT_STEPS):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if ok(mid) else (lo, mid)
    return lo, probes


def units(spec: ModelSpec, cluster: Cluster, precision: str, engine: str = DEFAULT_ENGINE,
          **engine_args) -> tuple[list[ServingLayout], dict[str, str], bool]:
    """Every unit shape the cluster can hold, why the others cannot be, and whether one of those
    holds its weights but not one whole-context sequence (a shorter --max-model-len would let it
    serve); `engine_args`: SchedulerConfig's KV cache dtype, GPU share and speculative decoding
    (a draft model's weights and cache take room)."""
    out, refused, short_context = [], {}, False
    n = cluster.world_size
    shapes = [(tp, pp, ep) for tp in [d for d in (1, 2, 4, 8, 16) if d <= min(n, cluster.gpus_per_node)]
              for pp in (1, 2, 4) for ep in ((False, True) if spec.moe and tp > 1 else (False,))]
    cfg = SchedulerConfig(engine=engine, **engine_args)
    for tp, pp, ep in shapes:
        name = layout_label(tp, pp, ep)
        why = layout_problems(spec, tp, pp, ep)
        if tp * pp > n or why:
            if why:
                refused[name] = "; ".join(why)
            continue
        room = replica_room(spec, cluster, ServingLayout(tp=tp, pp=pp, precision=precision), cfg, per_engine=False)
        if room < spec.context_len:
            refused[name] = ("its weights fill the memory a GPU may use" if not room else
                             f"room for {room} tokens of KV cache, less than one {spec.context_len}-token sequence")
            short_context = short_context or room > 0
            continue
        for k in DECODE_PER_PREFILL:
            if (1 + k) * tp * pp <= n:
                out.append(ServingLayout(tp=tp, pp=pp, replicas=1 + k, prefill_replicas=1 if k else 0,
                                         precision=precision, expert_parallel=ep))
    # pp > 1 where pp 1 fits too: its virtual engines serve about as much as pp replicas would
    # (costmodel.traffic) and its GPUs hold 1/pp of the weights each, more room for the KV cache
    return out, refused, short_context


def static_unit(spec: ModelSpec, cluster: Cluster, prompt: float, output: float, slo: SLO,
                precision: str = "bf16", engine: str = DEFAULT_ENGINE, **request) -> tuple[ServingLayout, int] | None:
    """The steady-state planner's replica and batch (costmodel.serving.plan_serving) at the mean
    lengths and the TTFT/TPOT targets, or None where it finds none; `request`: ServingRequest's
    KV cache and speculative-decoding settings."""
    p, o = typical_request(prompt, output, spec.context_len)
    targets = {m: sec for m, _, sec in slo.targets}
    req = ServingRequest(prompt_len=p, output_len=o, precision=precision, engine=engine, **request,
                         max_ttft_ms=targets["ttft"] * 1e3 if "ttft" in targets else None,
                         max_tpot_ms=targets["tpot"] * 1e3 if "tpot" in targets else None)
    try:
        best = plan_serving(spec, cluster, req).best
    except ConfigError:
        return None
    return ServingLayout(tp=best.tp, pp=best.pp, precision=precision, expert_parallel=best.expert_parallel), best.batch


def units_needed(rate: float, unit_rate: float) -> int:
    """ceil(rate / unit_rate): the units of `unit_rate` requests/s each that serve `rate` (0 for
    a unit that serves nothing)."""
    return math.ceil(rate / unit_rate - 1e-9) if unit_rate > 0 else 0


def deployment_key(rate: float, unit_rate: float, gpus: int) -> tuple[float, float]:
    """What the search minimises for a unit of `gpus` GPUs serving `unit_rate` requests/s within
    the objectives: the GPUs of the units that serve `rate` (units_needed), then the goodput per
    GPU (negated: more headroom on as many GPUs)."""
    return units_needed(rate, unit_rate) * gpus, -unit_rate / gpus


def plan_traffic(spec: ModelSpec, cluster: Cluster, wl: TrafficWorkload, rate: float, slo: SLO, *,
                 precision: str = "bf16", progress: bool = False, engine: str = DEFAULT_ENGINE,
                 tp: int | None = None, pp: int | None = None, kv_cache_dtype: str = "auto",
                 gpu_memory_utilization: float = GPU_MEMORY_UTILIZATION, speculative_tokens: int = 0,
                 acceptance: float = DEFAULT_ACCEPTANCE, draft: ModelSpec | None = None) -> TrafficPlan:
    """The unit and scheduler settings that serve `rate` on the fewest GPUs, the most goodput
    per GPU among those (the module's formulation); a given `tp` or `pp` is fixed; speculative
    decoding with `speculative_tokens` drafts (of `draft`, or n-gram proposals) where given."""
    if not slo.targets:
        raise ConfigError("plan --mode inference --workload needs --slo (e.g. ttft_p99=0.5,tpot_p99=50ms): goodput "
                          "counts the requests that meet it")
    if not (rate > 0) or math.isinf(rate):
        raise ConfigError(f"plan --mode inference needs a finite --rate in requests per second > 0 (goodput is planned "
                          f"for a rate; a trace of simultaneous arrivals has none), got {rate}; for offline throughput "
                          "use `paraplan simulate --mode inference --rate inf`")
    memory = dict(kv_cache_dtype=kv_cache_dtype, gpu_memory_utilization=gpu_memory_utilization)
    speculation = dict(speculative_tokens=speculative_tokens, acceptance=acceptance, draft=draft)
    SchedulerConfig(**speculation)  # one line for a bad setting, before the search
    check_degrees(tp=tp, pp=pp)
    if speculative_tokens and pp not in (None, 1):
        raise ConfigError(SPECULATION_PP)
    shapes, refused, short_context = units(spec, cluster, precision, engine, **memory)
    # the grid's unit shapes with each engine setting: without speculation, and with it where given
    grids = [({}, shapes)]
    if speculative_tokens:
        with_draft = units(spec, cluster, precision, engine, **memory, **speculation)[0]
        grids.append((speculation, [u for u in with_draft if u.pp == 1]))
    for name, value in (("tp", tp), ("pp", pp)):
        if value is not None:
            kept = [(args, [u for u in grid if getattr(u, name) == value]) for args, grid in grids]
            if not any(grid for _, grid in kept):
                raise ConfigError(f"no replica of {spec.name} with {name} {value} fits {cluster.name} (the shapes "
                                  f"that do: {', '.join(sorted({u.label for u in shapes})) or 'none'}); give another "
                                  f"--{name} or leave it to the search")
            grids = kept
    if not any(grid for _, grid in grids):
        reasons = "; ".join(f"{k}: {v}" for k, v in list(refused.items())[::-1][:3])  # the largest shapes first
        shorter = " or a shorter context (--max-model-len)" if short_context else ""
        raise ConfigError(f"no replica of {spec.name} fits {cluster.name} ({reasons}); add GPUs, serve in fp8{shorter}")
    shapes = sorted({u for _, grid in grids for u in grid}, key=lambda u: (u.gpus, u.tp, u.pp, u.replicas))
    prompt, output = mean_lengths(wl.probe(1.0, spec.context_len))
    candidates = []
    for args, grid in grids:
        for u in grid:
            for b in TOKEN_BUDGETS:
                for seqs in MAX_SEQS:
                    cfg = SchedulerConfig(max_num_batched_tokens=b, max_num_seqs=seqs, engine=engine, **memory, **args)
                    candidates.append((unit_bound(spec, cluster, u, cfg, prompt, output, slo) / u.gpus, u, cfg))
    static = static_unit(spec, cluster, prompt, output, slo, precision, engine, **memory,
                         **(dict(draft=draft, ngram=draft is None, draft_len=speculative_tokens, acceptance=acceptance)
                            if speculative_tokens else {}))
    fits = {(u.tp, u.pp) for u in shapes}
    if static is not None and (static[0].tp, static[0].pp) in fits and static[1] not in MAX_SEQS:
        for b in TOKEN_BUDGETS:  # the steady-state planner's pick, searched too
            cfg = SchedulerConfig(max_num_batched_tokens=b, max_num_seqs=static[1], engine=engine, **memory,
                                  **speculation)
            candidates.append((unit_bound(spec, cluster, static[0], cfg, prompt, output, slo) / static[0].gpus,
                               static[0], cfg))
    candidates.sort(key=lambda c: -c[0])
    results, skipped = [], 0
    incumbent = (math.inf, 0.0)  # the best key found: (GPUs deployed at the rate, -goodput per GPU)
    shown = None if progress else True  # None: on a terminal only
    for bound_per_gpu, unit, cfg in tqdm(candidates, desc="simulating", unit="layout", disable=shown, leave=False):
        if bound_per_gpu <= 0 or deployment_key(rate, bound_per_gpu * unit.gpus, unit.gpus) >= incumbent:
            skipped += 1  # even at its bound it deploys more GPUs, or as many with less headroom
            continue
        top, probes = unit_max_rate(spec, cluster, unit, cfg, wl, slo, bound_per_gpu * unit.gpus)
        results.append(UnitResult(unit=unit, scheduler=cfg, max_rate_rps=top, probes=probes))
        if top > 0:
            incumbent = min(incumbent, deployment_key(rate, top, unit.gpus))
    served = [r for r in results if r.max_rate_rps > 0]
    if not served:
        raise ConfigError(f"no layout of {spec.name} on {cluster.device.name} meets the objectives even at a trickle "
                          "of requests; relax --slo or use faster GPUs")
    best = min(served, key=lambda r: (*deployment_key(rate, r.max_rate_rps, r.gpus), r.gpus))
    need = best.units_for(rate)
    deployment = replace(best.unit, replicas=best.unit.replicas * need, prefill_replicas=best.unit.prefill_replicas * need)
    # the deployment as one simulation (every unit's share of the rate, with the load balancer), on as
    # many nodes of the cluster's kind as it needs (it may need more than given)
    whole = replace(cluster, nodes=max(cluster.nodes, -(-deployment.gpus // cluster.gpus_per_node)))
    at_rate = simulate_traffic(spec, whole, wl.probe(rate, spec.context_len), deployment, best.scheduler, slo)
    return TrafficPlan(best=best, rate=rate, units=need, deployment=deployment, at_rate=at_rate, results=results,
                       refused=refused, cluster_gpus=cluster.world_size, skipped=skipped)
