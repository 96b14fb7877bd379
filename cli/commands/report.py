"""`paraplan report` (strategies compared, in a folder) and `paraplan compare` (plans side by side)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from costmodel import ConfigError, load_cluster
from planner.pricing import price_step
from costmodel.runtime import DEFAULT_RUNTIME
from costmodel.spec import ModelSpec
from planner.model_source import load_model_spec
from planner.plan import Plan
from cli.commands.flags import first_given
from cli.commands.serve import INFERENCE_FLAGS, memory_args
from cli.commands.served import load_served_spec, served_precision


def run_serving_report(args: argparse.Namespace, out: Path, spec: ModelSpec | None = None) -> int:
    """`paraplan report --mode inference`: under traffic (--workload: reports.traffic) or in the
    steady state (--prompt-len/--output-len: reports.serving)."""
    if args.global_batch is not None:
        raise ConfigError("--global-batch is for training reports; serving reports take --prompt-len/--output-len "
                          "or --workload")
    if args.runtime is not None:
        raise ConfigError("--runtime prices training; a serving report takes --engine (vllm or tensorrt-llm)")
    if args.format != "md":
        raise ConfigError(f"--format {args.format!r}: serving reports are markdown (md)")
    spec = spec or load_served_spec(args)
    if args.workload:
        from costmodel.traffic import SLO
        from planner.serving_search import TrafficWorkload
        from reports.traffic import WORKLOADS, build_traffic_report

        wl = TrafficWorkload.of(args.workload, requests=400)  # a trace file is read (and refused) here
        slo_text, rate = WORKLOADS.get(args.workload, (None, wl.native_rate()))
        slo_text, rate = args.slo or slo_text, args.rate if args.rate is not None else rate
        if not slo_text or rate is None:
            raise ConfigError(f"a report of workload {args.workload} needs --slo and --rate (requests per second)")
        SLO.parse(slo_text)
        load_cluster(args.cluster)
        table = build_traffic_report(spec, args.cluster, out, {args.workload: (slo_text, rate)},
                                     engine=args.engine, memory=memory_args(args),
                                     precision=served_precision(args, spec=spec))
        rows = table.to_dict("records")
        if args.json:
            print(json.dumps({"report": str(out / "README.md"), "rows": rows}, indent=2))
        else:
            for r in rows:
                print(f"  {r['who']:8s} {r['unit']:48s} {r['max_rate_rps']:8.2f} requests/s, "
                      f"{r['goodput_per_gpu']:.3f} per GPU")
            print(f"report in {out}/README.md (latency against rate, a timeline)")
        return 0
    from costmodel.serving import ServingRequest
    from costmodel.serving_engine import DEFAULT_ENGINE
    from reports.serving import build_serving_report

    if args.prompt_len is None or args.output_len is None:
        raise ConfigError("report --mode inference needs --prompt-len and --output-len (the steady state), or "
                          "--workload (under traffic)")
    req = ServingRequest(prompt_len=args.prompt_len, output_len=args.output_len, max_ttft_ms=args.max_ttft_ms,
                         max_tpot_ms=args.max_tpot_ms, engine=args.engine or DEFAULT_ENGINE, **memory_args(args),
                         precision=served_precision(args, spec=spec))
    best = build_serving_report(spec, [args.cluster], req, out)
    if args.json:
        print(json.dumps({"report": str(out / "report.md"), "best": best}, indent=2))
    else:
        for cluster, d in best.items():
            print(f"  {cluster}: tp{d['tp']} x pp{d['pp']}, batch {d['batch']}, "
                  f"{d['throughput_tokens_per_s']:.0f} tokens/s")
        print(f"report in {out}/report.md (throughput against latency per layout, KV capacity)")
    return 0


def plan_report_args(args: argparse.Namespace) -> tuple[Plan, ModelSpec]:
    """A report of a plan: its model, cluster and batch, or its serving setup (the steady
    state's lengths, or the workload, rate and objectives it was planned for), set on `args`;
    a flag that says them again is one line."""
    flag = first_given(args, ("model", "cluster", "global_batch", "runtime", "prompt_len", "output_len", "workload",
                              "rate", "slo", "engine", "precision", "max_model_len"))
    if flag or args.mode != "train":
        raise ConfigError(f"{flag or '--mode'} comes from the plan {args.plan}; drop it (or leave out the plan and "
                          "give --model and --cluster)")
    plan = Plan.load(args.plan)
    if plan.mode == "lora":
        raise ConfigError(f"{args.plan} is a LoRA plan and a report ranks full-training strategies; `paraplan simulate "
                          f"--plan {args.plan}` prices it, `paraplan compare` sets LoRA plans side by side")
    spec = plan.spec
    args.cluster = plan.cluster
    if plan.mode != "inference":
        args.global_batch, args.runtime = plan.global_batch, plan.runtime
        return plan, spec
    from planner.serving_plan import serving_setup

    serving_setup(plan, args.plan)  # a section that is missing a field or wrong: one line naming it
    sv = plan.serving
    args.mode, args.engine, args.precision = "inference", sv.get("engine"), plan.precision
    if sv.get("workload"):
        args.workload, args.rate = sv["workload"], sv.get("rate")
        args.slo = ",".join(f"{k}={v}" for k, v in sv["slo"].items()) if isinstance(sv.get("slo"), dict) else sv.get("slo")
    else:
        args.prompt_len, args.output_len = sv.get("prompt_len"), sv.get("output_len")
    for name in ("kv_cache_dtype", "gpu_memory_utilization"):
        if name in sv:
            setattr(args, name, sv[name])
    return plan, spec


def run_report(args: argparse.Namespace) -> int:
    from reports.build import build_report

    plan, spec = plan_report_args(args) if args.plan else (None, None)
    if not plan and (not args.model or not args.cluster):
        raise ConfigError("report needs --model and --cluster (or a plan: `paraplan report PLAN -o DIR`)")
    formats = tuple(f.strip() for f in args.format.split(",") if f.strip())
    bad = [f for f in formats if f not in ("md", "html")]
    if bad or not formats:
        raise ConfigError(f"--format {args.format!r}: use md, html or md,html")
    out = Path(args.output)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"-o {out} is a file; give a folder for the report")
    if getattr(args, "mode", "train") == "inference":
        return run_serving_report(args, out, spec)
    flag = first_given(args, INFERENCE_FLAGS + ("precision",))  # (those of them report takes)
    if flag:
        raise ConfigError(f"{flag} is for serving reports: add --mode inference")
    if args.global_batch is None:
        raise ConfigError("a training report needs --global-batch (sequences per step); for serving add "
                          "--mode inference")
    if args.global_batch < 1:
        raise ConfigError(f"--global-batch must be a positive integer, got {args.global_batch}")
    spec = spec or load_model_spec(args.model)
    cluster = load_cluster(args.cluster, runtime=args.runtime or DEFAULT_RUNTIME)
    extra = {f"the plan {Path(args.plan).name}": plan.strategy()} if plan else None
    summary = build_report(spec, cluster, args.global_batch, out, formats, progress=sys.stderr.isatty() and not args.json,
                           extra=extra)
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        print(f"report of {summary['strategies']} strategies ({summary['fitting']} fit) in {out}/report.md; "
              f"best: {summary['best']}; {summary['seconds']:.1f} s"
              + "".join(f"; {name} " + (f"ranks {rank} of {summary['fitting']}" if rank else "does not fit")
                        for name, rank in summary.get("ranks", {}).items()))
    return 0


def compare_serving(plans: list[tuple[str, Plan]], as_json: bool) -> int:
    """Serving plans side by side, each priced again as planned (cli.commands.traffic): under
    traffic the p99 latencies at the plan's rate, in the steady state its TTFT and TPOT."""
    from cli.commands.traffic import price_serving_plan

    rows = []
    for path, plan in plans:
        p, _ = price_serving_plan(plan, path)
        traffic = "ttft_p99_s" in p
        rows.append({"plan": path, "model": plan.model.get("name"), "cluster": plan.cluster,
                     "layout": f"tp {plan.mesh['tp']} x pp {plan.mesh['pp']}",
                     "replicas": plan.serving.get("replicas", 1), "gpus": plan.world_size,
                     "engine": plan.serving.get("engine"),
                     "workload": f"{plan.serving['workload']} at {plan.serving['rate']:g}/s" if traffic else "steady state",
                     "throughput_tokens_per_s": p["throughput_tokens_per_s"],
                     "ttft_ms": 1e3 * (p["ttft_p99_s"] if traffic else p["ttft_s"]),
                     "tpot_ms": 1e3 * (p["tpot_p99_s"] if traffic else p["tpot_s"]),
                     "goodput_rps": p.get("goodput_rps", float("nan"))})
    if as_json:
        print(json.dumps(rows, indent=2))
        return 0
    print("(ttft_ms and tpot_ms: p99 at the plan's rate under traffic, the steady state's otherwise)")
    _print_columns(rows, list(rows[0]))
    return 0


def _print_columns(rows: list[dict], keys: list[str]) -> None:
    """One plan a column, one key a line."""
    width = max(len(k) for k in keys)
    for k in keys:
        cells = [f"{r[k]:.4g}" if isinstance(r[k], float) else str(r[k]) for r in rows]
        print(f"{k:<{width}}  " + "  ".join(f"{c:>24}" for c in cells))


def run_compare(args: argparse.Namespace) -> int:
    plans = [(path, Plan.load(path)) for path in args.plans]
    serving = [path for path, plan in plans if plan.mode == "inference"]
    if serving and len(serving) < len(plans):
        raise ConfigError(f"{serving[0]} is a serving plan and the others are not; compare serving plans with serving "
                          "plans, training plans with training plans")
    if serving:
        return compare_serving(plans, args.json)
    rows = []
    for path, plan in plans:
        result = price_step(plan.spec, plan.strategy(), load_cluster(plan.cluster, runtime=plan.runtime), plan.placements,
                            plan.source).predicted()
        mesh = " x ".join(f"{k} {v}" for k, v in plan.mesh.items() if v > 1) or "1 GPU"
        rows.append({"plan": path, "model": plan.model.get("name"), "cluster": plan.cluster, "mesh": mesh,
                     "zero": plan.zero, "schedule": plan.schedule["name"], **{k: result[k] for k in (
                         "step_time_s", "tokens_per_s", "mfu", "bubble_fraction", "fits")},
                     "memory_gib": result["memory_gib"]["total"]})
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    _print_columns(rows, ["plan", "model", "cluster", "mesh", "zero", "schedule", "step_time_s", "tokens_per_s", "mfu",
                          "bubble_fraction", "memory_gib", "fits"])
    return 0
