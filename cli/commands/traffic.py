"""`paraplan simulate --mode inference --workload W --rate R`: one serving layout under traffic
(costmodel.traffic), and `paraplan plan --mode inference --workload W --rate R --slo ...`: the
layout and scheduler settings with the most goodput per GPU (planner.serving_search)."""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import replace
from pathlib import Path


from costmodel import ConfigError, load_cluster
from costmodel.cluster import Cluster
from costmodel.serving import (GPU_MEMORY_UTILIZATION, ServingRequest, check_degrees, compute_dtype, evaluate,
                               kv_budget)
from costmodel.serving_engine import DEFAULT_ENGINE, check_block_size, vllm_scheduler_defaults
from costmodel.spec import ModelSpec, format_count
from costmodel.trace import serving_trace
from costmodel.traffic import SLO, SchedulerConfig, ServingLayout, TrafficResult, replica_room, simulate_traffic
from costmodel.workload import Request, context_note, mean_lengths, scenario_of, typical_request, workload
from planner.files import atomic_write_text
from planner.model_source import load_draft, load_model_spec
from planner.zoo import hub_weights, zoo_name_of_hub_id
from cli.commands.flags import first_given
from cli.commands.serve import (TRAINING_FLAGS, acceptance_at, draft_settings, memory_args, memory_section,
                                speculation_section, speculation_text)
from cli.commands.served import (load_served_spec, served_model_path, served_precision, weight_format_note,
                                 with_max_model_len)

DEFAULT_REQUESTS = 2000
# the steady-state serving model's request, batch and objectives
STEADY_STATE_ONLY = ("batch", "prompt_len", "output_len", "beam", "max_ttft_ms", "max_tpot_ms")


def refuse_other_flags(args: argparse.Namespace) -> None:
    """One line for a flag that serving under traffic does not take (was: training flags and the
    steady state's beam, draft model and latency caps silently ignored)."""
    flag = first_given(args, TRAINING_FLAGS)
    if flag:
        raise ConfigError(f"{flag} does not apply to serving under traffic (--workload); "
                          "give the layout with --tp, --pp, --replicas, --prefill-replicas")
    flag = first_given(args, STEADY_STATE_ONLY)
    if flag:
        raise ConfigError(f"{flag} is for the steady-state serving model (leave out --workload); under traffic the "
                          "requests come from the workload and the latency objectives from --slo")


SCHEDULER_FIELDS = ("max_num_seqs", "max_num_batched_tokens", "chunked_prefill", "prefix_caching", "preemption",
                    "evicted_prefix", "engine", "num_scheduler_steps", "kv_cache_dtype", "gpu_memory_utilization")


def engine_flags(args: argparse.Namespace, engine: str) -> dict:
    """The engine arguments the flags give (--block-size as block_tokens, checked against the block
    sizes of the flags' --engine, else `engine`)."""
    given = {k: getattr(args, k) for k in SCHEDULER_FIELDS if getattr(args, k, None) is not None}
    if getattr(args, "block_size", None) is not None:
        given["block_tokens"] = args.block_size
    if "block_tokens" in given:  # an engine takes the block sizes its kernels have
        check_block_size(given["block_tokens"], given.get("engine", engine))
    return given


def scheduler_config(args: argparse.Namespace, cluster: Cluster, spec: ModelSpec,
                     speculation: bool = True) -> SchedulerConfig:
    """The engine arguments given, the engine's defaults on this GPU for the rest (vLLM's sequence
    and token limits depend on the GPU: costmodel.serving_engine.vllm_scheduler_defaults); the
    speculative decoding the flags give where `speculation` (a vllm command gives its own)."""
    given = engine_flags(args, DEFAULT_ENGINE)
    if given.get("engine", DEFAULT_ENGINE) == "vllm":
        seqs, tokens = vllm_scheduler_defaults(cluster.device)
        given.setdefault("max_num_seqs", seqs)
        given.setdefault("max_num_batched_tokens", tokens)
    return SchedulerConfig(**given, **(speculation_args(args, spec) if speculation else {}))


def speculation_args(args: argparse.Namespace, spec: ModelSpec) -> dict:
    """SchedulerConfig's speculative decoding from --draft-model (a model, `ngram` for
    prompt-lookup proposals, or an EAGLE head on `spec`), --draft-len and the drafts' acceptance
    (`draft_settings`)."""
    k, acceptance = draft_settings(args)
    if not k:
        return {}
    return {"speculative_tokens": k, "acceptance": acceptance, "draft": load_draft(args.draft_model, spec)}


def load_requests(args: argparse.Namespace, spec: ModelSpec) -> list[Request]:
    if not args.workload:
        raise ConfigError("serving under traffic needs --workload (chat, long-context, agent, random:PROMPT/OUTPUT "
                          "or a trace file)")
    requests = DEFAULT_REQUESTS if args.requests is None else args.requests
    reqs = workload(args.workload, rate=args.rate, requests=requests, context=spec.context_len,
                    seed=args.workload_seed or 0, burst_cv=1.0 if args.burst_cv is None else args.burst_cv)
    if args.rate is not None and not (args.rate > 0):
        raise ConfigError(f"--rate must be requests per second > 0 (or inf: all at once), got {args.rate}")
    if args.rate is not None and scenario_of(args.workload) is None:  # a trace at another rate: its arrivals rescaled
        from planner.serving_search import TrafficWorkload

        reqs = TrafficWorkload(name=args.workload, trace=tuple(reqs)).at(args.rate, spec.context_len)
    note = context_note(args.workload, reqs, spec.context_len)
    if note:
        print(f"paraplan: note: {note}", file=sys.stderr)
    return reqs


def layout_from_args(args: argparse.Namespace, cluster: Cluster) -> ServingLayout:
    check_degrees(tp=args.tp, pp=args.pp)  # a given 0 is refused, not taken for 1
    tp, pp = args.tp or 1, args.pp or 1
    if tp * pp > cluster.world_size:
        raise ConfigError(f"a replica of tp({tp}) x pp({pp}) needs {tp * pp} GPUs; the cluster has {cluster.world_size}: "
                          "give a larger cluster or smaller --tp/--pp")
    if args.replicas is None and cluster.world_size % (tp * pp):
        raise ConfigError(f"tp({tp}) x pp({pp}) does not divide the {cluster.world_size} GPUs; give --replicas")
    replicas = args.replicas if args.replicas is not None else cluster.world_size // (tp * pp)
    return ServingLayout(tp=tp, pp=pp, replicas=replicas, prefill_replicas=args.prefill_replicas or 0,
                         precision=args.precision or "bf16", expert_parallel=bool(getattr(args, "expert_parallel", False)))


def steady_state(spec: ModelSpec, cluster: Cluster, layout: ServingLayout, cfg: SchedulerConfig,
                 reqs: list[Request]) -> dict:
    """The steady-state model's keys (costmodel.serving) at the workload's mean lengths and the
    batch the scheduler allows."""
    from cli.commands.serve import predicted

    prompt, output = typical_request(*mean_lengths(reqs), spec.context_len)
    req = ServingRequest(prompt_len=prompt, output_len=output, block_tokens=cfg.block_tokens, precision=layout.precision,
                         engine=cfg.engine, kv_cache_dtype=cfg.kv_cache_dtype,
                         gpu_memory_utilization=cfg.gpu_memory_utilization)
    budget = kv_budget(spec, cluster, req, layout.tp, layout.pp)
    batch = max(1, min(cfg.max_num_seqs, budget.max_batch_paged))
    return predicted(spec, req, evaluate(spec, cluster, req, layout.tp, layout.pp, batch, budget,
                                         layout.expert_parallel))


def _ms(seconds: float) -> str:
    return "-" if math.isnan(seconds) else f"{seconds * 1e3:9.1f}"


def format_traffic(spec: ModelSpec, cluster_text: str, layout: ServingLayout, cfg: SchedulerConfig,
                   name: str, rate: float | None, r: TrafficResult, concurrency: int | None = None,
                   args: argparse.Namespace | None = None) -> str:
    """The run as text; `args`: the command's flags (a default it took is marked), None: as planned."""
    m = r.metrics()
    split = f", {layout.prefill_replicas} of them prefill only" if layout.prefill_replicas else ""
    memory = (f", {cfg.kv_cache_dtype} KV cache" if cfg.kv_cache_dtype != "auto" else "") + (
        f", {cfg.gpu_memory_utilization:g} of each GPU" if cfg.gpu_memory_utilization != GPU_MEMORY_UTILIZATION else "")
    lines = [
        f"{spec.name} ({format_count(spec.num_params)} params) serving {name}"
        f"{f' at {rate:g} requests/s' if rate is not None else ''}"
        f"{f', at most {concurrency} in flight' if concurrency else ''} on {cluster_text}: {r.requests} requests",
        f"  layout tp {layout.tp} x pp {layout.pp}{' (experts whole: EP)' if layout.expert_parallel else ''}, "
        f"{layout.replicas} replica(s){split}; max {cfg.max_num_seqs} "
        f"sequences and {cfg.max_num_batched_tokens} tokens an iteration, chunked prefill "
        f"{'on' if cfg.chunked_prefill else 'off'}, prefix caching {'on' if cfg.prefix_caching else 'off'}"
        f"{f', decodes in runs of {cfg.num_scheduler_steps} steps' if cfg.num_scheduler_steps > 1 else ''}"
        f"{memory}; engine {cfg.engine}" + (
            f"; speculative: {speculation_text(cfg.speculative_tokens, cfg.draft, cfg.acceptance, args, 'decode')}: "
            f"{cfg.tokens_per_check:.2f} tokens a check" if cfg.speculative_tokens else ""),
        "             p50 ms    p90 ms    p99 ms",
    ]
    for key in ("ttft", "tpot", "e2e"):
        lines.append(f"  {key.upper():6s} {_ms(m[f'{key}_p50_s'])} {_ms(m[f'{key}_p90_s'])} {_ms(m[f'{key}_p99_s'])}")
    lines.append(f"  throughput {m['throughput_tokens_per_s']:.0f} output tokens/s; {r.finished} of {r.requests} "
                 f"finished in {r.duration_s:.1f} s; preemptions {r.preemptions}; prefix-cache hits "
                 f"{100 * r.prefix_hit_rate:.1f}% of prompt tokens")
    if r.slo.targets:
        targets = ", ".join(f"{k}_p{p:g} <= {s * 1e3:g} ms" for k, p, s in r.slo.targets)
        lines.append(f"  objectives {targets}: {100 * r.slo_attainment:.1f}% of requests meet them; goodput "
                     f"{r.goodput_rps:.2f} requests/s ({r.goodput_rps / layout.gpus:.3f} per GPU)")
    if r.finished < r.requests:
        lines.append(f"  {r.requests - r.finished} requests did not finish: the rate is past what the layout serves")
    return "\n".join(lines)


def from_vllm_command(args: argparse.Namespace, cluster: Cluster) -> tuple[ModelSpec, ServingLayout, SchedulerConfig]:
    """`--from vllm FILE_OR_ARGS`: the model, layout and engine arguments of a `vllm serve`
    command (engines.vllm.import_serve); what the command leaves out, vLLM's defaults for the GPU."""
    from cli.commands.engines import config_text, not_understood
    from engines.vllm import import_serve

    engine, source = args.from_engine
    if engine != "vllm":
        raise ConfigError(f"--from {engine}: serving reads a vllm serve command (--from vllm FILE_OR_ARGS)")
    flag = first_given(args, ("tp", "pp", "replicas", "prefill_replicas", "max_num_seqs", "max_num_batched_tokens",
                              "chunked_prefill", "prefix_caching", "block_size", "expert_parallel", "num_scheduler_steps",
                              "max_model_len", "kv_cache_dtype", "gpu_memory_utilization", "draft_model", "draft_len"))
    if flag:
        raise ConfigError(f"--from vllm takes the layout and engine arguments from the command; drop {flag}")
    cmd = import_serve(config_text(source, engine, line_allowed=True, hint="give the vllm serve command or a file"))
    served = cmd.model if args.model else _model_text(cmd.model)
    try:
        spec = load_model_spec(args.model or served)
    except ConfigError as exc:
        raise ConfigError(f"{exc} (the vllm command serves {cmd.model!r}; give --model for its shape)") from None
    spec = with_max_model_len(spec, cmd.max_model_len)
    precision = vllm_precision(args, cmd, served, spec)
    layout = ServingLayout(tp=cmd.tp, pp=cmd.pp, replicas=cmd.dp, precision=precision,
                           expert_parallel=cmd.expert_parallel)
    cfg = scheduler_config(args, cluster, spec, speculation=False)  # the command's own, below (--acceptance with it)
    taken = {k: getattr(cmd, k) for k in ("max_num_seqs", "max_num_batched_tokens", "chunked_prefill", "prefix_caching",
                                          "num_scheduler_steps", "kv_cache_dtype", "gpu_memory_utilization")
             if getattr(cmd, k) is not None}
    if cmd.block_size is not None:
        check_block_size(cmd.block_size, "vllm")
        taken["block_tokens"] = cmd.block_size
    flag = None if cmd.draft_model else first_given(args, ("acceptance", "acceptance_length"))
    if flag:
        raise ConfigError(f"{flag}: the vllm command has no --speculative-config (no drafts to accept)")
    if cmd.draft_model:  # its draft by Hub id or directory, n-gram proposals or an EAGLE head ("eagle:HEAD")
        draft = cmd.draft_model if ":" in cmd.draft_model else _model_text(cmd.draft_model)
        try:
            taken["draft"] = load_draft(draft, spec)
        except ConfigError as exc:
            raise ConfigError(f"{exc} (the vllm command's speculative draft {cmd.draft_model!r})") from None
        taken["speculative_tokens"] = cmd.speculative_tokens
        taken["acceptance"] = acceptance_at(args, cmd.speculative_tokens)
    if cmd.unknown:
        print(f"paraplan: note: {not_understood(engine, cmd.unknown).strip()}", file=sys.stderr)
    return spec, layout, replace(cfg, **taken)


def vllm_precision(args: argparse.Namespace, cmd, served: str, spec: ModelSpec) -> str:
    """The weights' precision as vLLM serves the command: paraplan's --precision; else an fp8
    checkpoint's (its config.json's quantization_config, or the Hub id of one: vLLM loads it in fp8
    whatever --dtype says, a note says so); else --quantization fp8 or --dtype; else bf16."""
    if getattr(args, "precision", None):
        return args.precision
    hub = None if args.model else hub_weights(cmd.model)
    if hub:
        print(f"paraplan: note: {cmd.model} keeps its weights in {hub} (its quantization_config), as vLLM loads it: "
              f"priced as --precision {hub}", file=sys.stderr)
        return weight_format_note(hub, spec)
    stored = served_precision(args, args.model or served, spec)  # a checkpoint directory's config (with a note), or bf16
    return stored if stored == "fp8" else cmd.precision or stored


def _model_text(served: str) -> str:
    """paraplan's name for a model a vllm command serves: a directory as hf:DIR, a built-in
    model's Hub checkpoint as its built-in name, another name as it is (engines.vllm writes the
    other way)."""
    if (Path(served) / "config.json").is_file():
        return f"hf:{served}"
    return zoo_name_of_hub_id(served) or served


# what a serving plan fixes (simulate --plan PLAN --workload W takes its deployment)
PLAN_FIXED = ("model", "cluster", "tp", "pp", "replicas", "prefill_replicas", "expert_parallel", "precision",
              "from_engine", "max_model_len", "draft_model", "draft_len", "acceptance", "acceptance_length")


def plan_deployment(args: argparse.Namespace) -> tuple[ModelSpec, str, ServingLayout, SchedulerConfig]:
    """(model, cluster, layout, engine arguments) of the serving plan `args.plan`, for another
    workload or rate: a traffic plan's scheduler, or a steady-state plan's engine defaults on its
    GPU (with its speculation and KV cache settings); engine flags given override them."""
    from planner.plan import Plan
    from planner.serving_plan import serving_setup

    flag = first_given(args, PLAN_FIXED)
    if flag:
        raise ConfigError(f"--plan fixes the model, cluster and layout; drop {flag}")
    plan = Plan.load(args.plan)
    setup, spec = serving_setup(plan, str(args.plan)), plan.spec
    cluster = load_cluster(plan.cluster)
    cfg = setup.scheduler
    if cfg is None:  # a steady-state plan: the engine's defaults, the plan's request settings
        req = setup.request
        seqs, tokens = (vllm_scheduler_defaults(cluster.device) if req.engine == "vllm" else (256, 8192))
        cfg = SchedulerConfig(max_num_seqs=seqs, max_num_batched_tokens=tokens, block_tokens=req.block_tokens,
                              engine=req.engine, kv_cache_dtype=req.kv_cache_dtype,
                              gpu_memory_utilization=req.gpu_memory_utilization,
                              **({"speculative_tokens": req.draft_len, "acceptance": req.acceptance, "draft": req.draft}
                                 if req.speculative else {}))
    return spec, plan.cluster, setup.layout, replace(cfg, **engine_flags(args, cfg.engine))


def run_traffic_simulate(args: argparse.Namespace) -> int:
    refuse_other_flags(args)
    cluster_text = args.cluster
    if args.plan:
        spec, cluster_text, layout, cfg = plan_deployment(args)
        cluster = load_cluster(cluster_text)
    elif getattr(args, "from_engine", None):
        if not args.cluster:
            raise ConfigError("simulate --from vllm COMMAND needs --cluster")
        cluster = load_cluster(args.cluster)
        spec, layout, cfg = from_vllm_command(args, cluster)
    else:
        if not args.model or not args.cluster:
            raise ConfigError("simulate --mode inference needs --model and --cluster")
        spec = load_served_spec(args)
        args.precision = served_precision(args, spec=spec)
        cluster = load_cluster(args.cluster)
        cfg = scheduler_config(args, cluster, spec)
        layout = layout_from_args(args, cluster)
    slo = SLO.parse(args.slo)
    reqs = load_requests(args, spec)
    result = simulate_traffic(spec, cluster, reqs, layout, cfg, slo, concurrency=args.concurrency)
    room = replica_room(spec, cluster, layout, cfg, per_engine=False)
    if room < spec.context_len:  # vLLM checks the whole context at start-up, whatever the requests
        print(f"paraplan: note: vLLM would not start tp {layout.tp} x pp {layout.pp} with {spec.name}'s "
              f"{spec.context_len}-token context (its KV cache holds {room} tokens); serve it with --max-model-len "
              f"{room} or less, as simulated here (the workload's requests fit)", file=sys.stderr)
    predicted = {**steady_state(spec, cluster, layout, cfg, reqs), **result.metrics()}
    outputs = []
    if args.trace:
        outputs.append((args.trace, json.dumps(serving_trace(result.timeline, result.roles, predicted=predicted,
                                                             title=f"{spec.name} on {cluster_text}"))))
    for path, text in outputs:
        atomic_write_text(path, text)
    if args.json:
        print(json.dumps({"model": spec.name, "cluster": cluster_text, "workload": args.workload, "rate": args.rate,
                          "concurrency": args.concurrency,
                          "layout": {"tp": layout.tp, "pp": layout.pp, "replicas": layout.replicas,
                                     "prefill_replicas": layout.prefill_replicas, "precision": layout.precision,
                                     "expert_parallel": layout.expert_parallel},
                          "scheduler": {"max_num_seqs": cfg.max_num_seqs,
                                        "max_num_batched_tokens": cfg.max_num_batched_tokens,
                                        "chunked_prefill": cfg.chunked_prefill, "prefix_caching": cfg.prefix_caching,
                                        "block_tokens": cfg.block_tokens, "preemption": cfg.preemption,
                                        "num_scheduler_steps": cfg.num_scheduler_steps, "engine": cfg.engine,
                                        "kv_cache_dtype": cfg.kv_cache_dtype,
                                        "gpu_memory_utilization": cfg.gpu_memory_utilization,
                                        **({"speculative_tokens": cfg.speculative_tokens, "acceptance": cfg.acceptance,
                                            "draft_model": cfg.draft.name if cfg.draft else "ngram"}
                                           if cfg.speculative_tokens else {})},
                          "predicted": predicted}, indent=2))
    else:
        print(format_traffic(spec, cluster_text, layout, cfg, args.workload, args.rate, result, args.concurrency, args))
        if args.trace:
            print(f"  trace written to {args.trace} (open in ui.perfetto.dev)")
    return 0


def price_serving_plan(plan, where: str) -> tuple[dict, str]:
    """(predicted, text): the serving plan priced again as it was planned: a traffic plan's
    deployment simulated at its rate on the same requests (its workload, seed and probe), a
    steady-state plan's layout at its batch (costmodel.serving.evaluate)."""
    from planner.serving_plan import serving_setup

    setup, spec = serving_setup(plan, where), plan.spec
    cluster = load_cluster(plan.cluster)
    layout, req = setup.layout, setup.request
    if setup.traffic:
        cfg, rate = setup.scheduler, setup.rate
        result = simulate_traffic(spec, cluster, setup.workload.probe(rate, spec.context_len), layout, cfg, setup.slo)
        one = replace(layout, replicas=1, prefill_replicas=0)
        predicted = {**steady_state(spec, cluster, one, cfg, setup.workload.at(rate, spec.context_len)), **result.metrics()}
        text = format_traffic(spec, plan.cluster, layout, cfg, setup.workload.name, rate, result)
    else:
        from cli.commands.serve import predicted as steady_keys

        point = evaluate(spec, cluster, req, layout.tp, layout.pp, plan.schedule["microbatch_size"],
                         expert_parallel=layout.expert_parallel)
        predicted = steady_keys(spec, req, point)
        text = (f"{spec.name} ({format_count(spec.num_params)} params) serving on {plan.cluster}: prompt "
                f"{req.prompt_len}, output {req.output_len} tokens; layout tp {point.tp} x pp {point.pp}, "
                f"{point.replicas} replica(s), batch {point.batch} (engine {req.engine})\n"
                f"  TTFT {point.ttft_s * 1e3:9.1f} ms   TPOT {point.tpot_s * 1e3:7.2f} ms   throughput "
                f"{point.throughput_tokens_per_s:9.0f} tokens/s")
    return predicted, text


def simulate_serving_plan(plan, args: argparse.Namespace) -> int:
    """`paraplan simulate --plan SERVING_PLAN` (price_serving_plan)."""
    predicted, text = price_serving_plan(plan, str(args.plan))
    spec = plan.spec
    if args.json:
        print(json.dumps({"model": spec.name, "cluster": plan.cluster, "mode": "inference", "predicted": predicted},
                         indent=2))
    else:
        print(text)
    return 0


def format_traffic_plan(spec: ModelSpec, cluster_text: str, name: str, found) -> str:
    best, d = found.best, found.deployment
    split = f" ({d.prefill_replicas} prefill-only)" if d.prefill_replicas else ""
    lines = [
        f"{spec.name} serving {name} at {found.rate:g} requests/s on {cluster_text}, objectives "
        + ", ".join(f"{k}_p{p:g} <= {s * 1e3:g} ms" for k, p, s in found.at_rate.slo.targets),
        f"  best unit: {best.name()}: {best.max_rate_rps:.2f} requests/s within the objectives = "
        f"{best.goodput_per_gpu:.3f} per GPU",
        f"  for {found.rate:g} requests/s: {found.units} unit(s) = {d.replicas} replica(s){split} of tp {d.tp} x pp {d.pp}"
        f"{' EP' if d.expert_parallel else ''},"
        f" {d.gpus} GPUs" + ("" if found.fits_cluster else f" (more than the {found.cluster_gpus} given)"),
    ]
    m = found.at_rate.metrics()
    lines.append(f"  simulated at the rate: TTFT p99 {m['ttft_p99_s'] * 1e3:.1f} ms, TPOT p99 {m['tpot_p99_s'] * 1e3:.2f} ms,"
                 f" {100 * m['slo_attainment']:.1f}% meet the objectives, goodput {m['goodput_rps']:.2f} requests/s")
    lines += ["", "  unit                                              max rate/s   per GPU"]
    for r in sorted(found.results, key=lambda r: -r.goodput_per_gpu):
        lines.append(f"  {r.name():48s} {r.max_rate_rps:10.2f} {r.goodput_per_gpu:9.3f}")
    for shape, why in found.refused.items():
        lines.append(f"  {shape}: {why}")
    return "\n".join(lines)


def run_traffic_plan(args: argparse.Namespace) -> int:
    from planner.plan import plan_from_strategy
    from planner.serving_search import TrafficWorkload, plan_traffic
    from costmodel import Strategy

    refuse_other_flags(args)
    flag = first_given(args, ("replicas", "prefill_replicas", "max_num_seqs", "max_num_batched_tokens",
                              "expert_parallel", "concurrency"))
    if flag:
        raise ConfigError(f"plan searches {flag}; to price one layout use `paraplan simulate "
                          "--mode inference --workload ...`")
    if not args.model or not args.cluster:
        raise ConfigError("plan --mode inference needs --model and --cluster")
    if not args.workload:
        raise ConfigError("plan --mode inference --rate needs --workload (chat, long-context, agent or a trace file)")
    spec = load_served_spec(args)
    cluster = load_cluster(args.cluster)
    slo = SLO.parse(args.slo)
    wl = TrafficWorkload.of(args.workload, requests=400 if args.requests is None else args.requests,
                            seed=args.workload_seed or 0,
                            burst_cv=1.0 if args.burst_cv is None else args.burst_cv)
    rate = args.rate if args.rate is not None else wl.native_rate()
    if rate is None:
        raise ConfigError(f"workload {args.workload} needs --rate (requests per second)")
    precision = args.precision = served_precision(args, spec=spec)
    found = plan_traffic(spec, cluster, wl, rate, slo, precision=precision, progress=not args.json,
                         engine=args.engine or DEFAULT_ENGINE, tp=args.tp, pp=args.pp,  # given degrees are fixed
                         **memory_args(args), **speculation_args(args, spec))
    d, best = found.deployment, found.best
    reqs = wl.at(rate, spec.context_len)
    one = replace(best.unit, replicas=1, prefill_replicas=0)
    predicted = {**steady_state(spec, cluster, one, best.scheduler, reqs),
                 **found.at_rate.metrics(), "goodput_rps_per_gpu": best.goodput_per_gpu,
                 "unit_max_rate_rps": best.max_rate_rps}
    s = Strategy(tp=d.tp, pp=d.pp, dp=d.replicas, microbatch_size=1, global_batch=d.replicas,
                 precision=compute_dtype(precision), seq_len=spec.seq_len, sequence_parallel=False)
    mean_prompt, mean_output = typical_request(*mean_lengths(reqs), spec.context_len)
    need = max(d.gpus, cluster.world_size)  # past the cluster: its GPUs in whole nodes, as a cluster is given
    if need > cluster.gpus_per_node:
        need = -(-need // cluster.gpus_per_node) * cluster.gpus_per_node
    plan = plan_from_strategy(spec, s, f"{cluster.profile or cluster.device.name}:{need}"
                              if not found.fits_cluster else args.cluster, predicted)
    plan = plan.__class__(**{**{f: getattr(plan, f) for f in plan.__slots__}, "mode": "inference",
                             "precision": precision, "serving": {
        "prompt_len": mean_prompt, "output_len": mean_output, "beam": 1, "block_tokens": best.scheduler.block_tokens,
        "replicas": d.replicas, "prefill_replicas": d.prefill_replicas, "workload": args.workload, "rate": rate,
        "slo": args.slo, "max_num_seqs": best.scheduler.max_num_seqs,
        "max_num_batched_tokens": best.scheduler.max_num_batched_tokens,
        "chunked_prefill": best.scheduler.chunked_prefill, "prefix_caching": best.scheduler.prefix_caching,
        "engine": best.scheduler.engine, "requests": wl.requests, "workload_seed": wl.seed, "burst_cv": wl.burst_cv,
        **served_model_path(args.model), **memory_section(best.scheduler),
        **speculation_section(args, best.scheduler.speculative_tokens, best.scheduler.acceptance),
        **({"expert_parallel": True} if d.expert_parallel else {})}})
    if args.output:
        atomic_write_text(args.output, plan.to_yaml())
    if args.json:
        print(json.dumps({"plan": plan.to_dict(), "units": [
            {"unit": r.name(), "tp": r.unit.tp, "pp": r.unit.pp, "replicas": r.unit.replicas,
             "expert_parallel": r.unit.expert_parallel,
             "prefill_replicas": r.unit.prefill_replicas, "max_num_batched_tokens": r.scheduler.max_num_batched_tokens,
             "speculative_tokens": r.scheduler.speculative_tokens,
             "max_rate_rps": r.max_rate_rps, "goodput_rps_per_gpu": r.goodput_per_gpu} for r in found.results]},
            indent=2))
    else:
        print(format_traffic_plan(spec, args.cluster, args.workload, found))
        if args.output:
            print(f"  plan written to {args.output}")
    return 0

