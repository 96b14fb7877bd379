"""`paraplan simulate`: predict one step of a plan, or of a strategy given by flags."""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace

from costmodel import ConfigError, Strategy, load_cluster, predict
from costmodel.lora import default_targets
from costmodel.runtime import DEFAULT_RUNTIME
from costmodel.spec import ModelSpec, format_count
from costmodel.trace import chrome_trace
from costmodel.validate import check_strategy, stage_layer_counts
from planner.files import atomic_write_text
from planner.model_source import load_model_spec, module_map_of, source_and_map
from planner.contract import plan_problems
from planner.plan import Plan, megatron_placements, plan_from_strategy
from planner.pricing import price_step
from cli.commands.flags import first_given
from cli.commands.serve import refuse_serving_flags

STRATEGY_FLAGS = ("tp", "pp", "dp", "cp", "ep", "expert_tp", "expert_load_cv", "ep_overlap", "zero", "shard_group", "sequence_parallel", "recompute", "microbatch_size",
                  "schedule", "virtual_stages", "seq_len", "precision", "flash_attention", "grad_dtype", "master_dtype")


def given_flags(args: argparse.Namespace) -> dict:
    """The strategy flags the user gave, with every degree and size checked positive."""
    given = {k: getattr(args, k) for k in STRATEGY_FLAGS if getattr(args, k, None) is not None}
    for name in ("tp", "pp", "cp", "dp", "ep", "expert_tp", "microbatch_size", "virtual_stages", "seq_len", "shard_group"):
        if name in given and given[name] < 1:
            raise ConfigError(f"--{name.replace('_', '-')} must be a positive integer, got {given[name]}")
    given.update(lora_flags(args))
    return given


def lora_flags(args: argparse.Namespace) -> dict:
    """The LoRA fields of the strategy under --mode lora (rank 16 on q,k,v,o by default)."""
    mode = getattr(args, "mode", "train")
    named = [f for f in ("lora_rank", "lora_targets", "base_precision") if getattr(args, f, None) is not None]
    if mode != "lora":
        if named:
            raise ConfigError(f"--{named[0].replace('_', '-')} needs --mode lora")
        return {}
    rank = 16 if args.lora_rank is None else args.lora_rank
    if rank < 1:
        raise ConfigError(f"--lora-rank must be a positive integer, got {rank}")
    out = {"lora_rank": rank, "base_precision": args.base_precision or "bf16"}
    if args.lora_targets:
        out["lora_targets"] = tuple(t.strip() for t in args.lora_targets.split(",") if t.strip())
    return out


def strategy_from_args(args: argparse.Namespace, spec: ModelSpec, world_size: int) -> Strategy:
    """A strategy from the flags, filling what is not given: dp from the world size, sequence
    parallelism on when tp > 1, the interleaved schedule when virtual stages are asked for."""
    given = given_flags(args)
    if given.get("lora_rank") and "lora_targets" not in given:
        given["lora_targets"] = default_targets(spec)
    tp, pp, cp = given.get("tp", 1), given.get("pp", 1), given.get("cp", 1)
    if "dp" not in given:
        if world_size % (tp * pp * cp):
            raise ConfigError(
                f"tp({tp}) * pp({pp}) * cp({cp}) = {tp * pp * cp} does not divide world size {world_size}; "
                "choose degrees that divide the GPU count"
            )
        given["dp"] = world_size // (tp * pp * cp)
    given.setdefault("sequence_parallel", tp > 1)
    if given.get("virtual_stages", 1) > 1:
        given.setdefault("schedule", "interleaved")
    mbs = given.setdefault("microbatch_size", 1)
    batch = args.global_batch if args.global_batch is not None else given["dp"] * mbs
    return Strategy(global_batch=batch, **given)


def run_simulate(args: argparse.Namespace) -> int:
    if getattr(args, "mode", "train") == "inference":
        if getattr(args, "workload", None):
            from cli.commands.traffic import run_traffic_simulate

            return run_traffic_simulate(args)
        if getattr(args, "prompt_len", None) is not None or getattr(args, "output_len", None) is not None:
            from cli.commands.serve import run_serving_simulate

            return run_serving_simulate(args)
        raise ConfigError("simulate --mode inference predicts serving under traffic (add --workload: chat, long-context, "
                          "agent or a trace file, and --rate) or in the steady state (add --prompt-len and --output-len)")
    if args.plan and getattr(args, "workload", None):  # a serving plan's deployment under this traffic
        from cli.commands.traffic import run_traffic_simulate

        return run_traffic_simulate(args)
    refuse_serving_flags(args)
    imported = None
    if getattr(args, "from_engine", None):
        from cli.commands.engines import read_engine_config

        if args.plan or not args.cluster:
            raise ConfigError("simulate --from ENGINE FILE needs --cluster (and no --plan)")
        flag = first_given(args, [k for k in STRATEGY_FLAGS if k != "seq_len"] + ["global_batch"])
        if flag:
            raise ConfigError(f"--from takes the strategy from the engine's config; drop {flag}")
        runtime = args.runtime or DEFAULT_RUNTIME
        cluster_text = args.cluster
        given_spec = load_model_spec(args.model) if args.model else None
        imported = read_engine_config(args.from_engine[0], args.from_engine[1], load_cluster(cluster_text), args.seq_len,
                                      given_spec)
        spec = given_spec or imported.spec
        if spec is None:
            raise ConfigError(f"the {args.from_engine[0]} config does not give the model's shape; add --model")
        strategy = imported.strategy
    elif args.plan:
        conflicting = [k for k in ("model", "cluster", "global_batch", *STRATEGY_FLAGS) if getattr(args, k, None) is not None]
        if conflicting:
            raise ConfigError(f"--plan fixes the model, cluster and strategy; drop --{conflicting[0].replace('_', '-')}")
        plan = Plan.load(args.plan)
        if plan.mode == "inference":  # served, not trained: priced as it was planned
            from cli.commands.traffic import simulate_serving_plan

            return simulate_serving_plan(plan, args)
        spec, cluster_text, strategy = plan.spec, plan.cluster, plan.strategy()
        runtime = args.runtime or plan.runtime  # --runtime re-prices the plan under another runtime
    else:
        if not args.model or not args.cluster:
            raise ConfigError("simulate needs --plan, --from ENGINE FILE, or --model and --cluster (with strategy flags)")
        spec, cluster_text = load_model_spec(args.model), args.cluster
        strategy, runtime = None, args.runtime or DEFAULT_RUNTIME
    cluster = load_cluster(cluster_text, runtime=runtime)
    if strategy is None:
        strategy = strategy_from_args(args, spec, cluster.world_size)
    check_strategy(spec, strategy, cluster.world_size)
    # resolved, so that what is printed and written names every choice
    strategy = strategy.replace(seq_len=strategy.seq_len or spec.seq_len, stage_layers=stage_layer_counts(spec, strategy),
                                grad_dtype=strategy.grad_dtype or cluster.runtime.grad_dtype)
    # a plan (read, or about to be written) is priced on its block's graph under its
    # placements; flags alone on the layer formulas (the fast analytic path)
    source, module_map, placements = {}, None, None
    if args.plan:
        source, placements = plan.source, plan.placements
        module_map = module_map_of(plan.source, spec) if plan.source and args.output else None
    elif args.output:
        source, module_map, note = source_and_map(args.model, spec) if args.model else ({}, None, "")
        if note:
            print(f"paraplan: note: {note}", file=sys.stderr)
        placements = megatron_placements(spec, strategy, module_map)
    if placements is not None:
        result = price_step(spec, strategy, cluster, placements, source, record_events=bool(args.trace))
    else:
        result = predict(spec, strategy, cluster, record_events=bool(args.trace))
    predicted = result.predicted()
    outputs = []
    if args.output:
        written = plan_from_strategy(spec, strategy, cluster_text, predicted, runtime=runtime, profile=cluster.profile,
                                     source=source, module_map=module_map)
        written = replace(written, placements=placements)
        outputs.append((args.output, written.to_yaml()))
        # a hand-given strategy is written as asked; say now what `check` and `run` will say
        for problem in plan_problems(written, cluster)[0]:
            print(f"paraplan: note: `paraplan run` will refuse {args.output}: {problem}", file=sys.stderr)
    if args.trace:
        outputs.append((args.trace, json.dumps(chrome_trace(result, title=f"{spec.name} on {cluster_text}"))))
    for target, text in outputs:
        atomic_write_text(target, text)
    if args.json:
        print(json.dumps({"model": spec.name, "cluster": cluster_text, "runtime": cluster.runtime.name,
                          "priced": "formula" if placements is None else "graph",
                          "profile": cluster.profile, "profile_note": cluster.profile_note, "strategy": strategy.to_dict(), "predicted": predicted,
                          **({"not_understood": list(imported.unknown)} if imported is not None else {})}, indent=2))
    else:
        print(format_table(spec, cluster_text, strategy, result, notes=(cluster.profile_note,)))
        if imported is not None:
            from cli.commands.engines import unknown_line

            print(unknown_line(imported))
    return 0


MFU_CONVENTION = ("model FLOPs 6 x (non-embedding weights + output head) x tokens + 12 x layers x hidden x seq "
                  "x tokens (attention over the full s x s, not halved for causality; Megatron-LM, torchtitan and "
                  "llm-foundry count the same) over the datasheet's dense peak")


def format_table(spec: ModelSpec, cluster_text: str, s: Strategy, r, *, given: set[str] | None = None,
                 notes: tuple[str, ...] = ()) -> str:
    """The prediction as text. `given`: the strategy flags the user fixed; the settings that
    change the answer and were defaulted say so."""
    def default(flag: str, hint: str) -> str:
        return f" (default; {hint})" if given is not None and flag not in given else ""

    mesh = " x ".join(f"{k} {v}" for k, v in s.mesh.items() if v > 1) or "1 GPU"
    sched = s.schedule.value + (f" (v={s.virtual_stages})" if s.virtual_stages > 1 else "")
    low, high = r.step_time_s_range
    sure = "calibrated" if r.calibrated else "outside the calibration data: wide"
    lines = [
        f"{spec.name} ({format_count(spec.num_params)} params" + (
            f", {format_count(spec.active_params())} active: {spec.experts_per_token} of {spec.experts} experts"
            if spec.moe else "") + f") on {cluster_text}",
        *([f"  attention    {'chunks' if spec.attention_chunked else 'a sliding window'} of {spec.attention_window} "
           f"tokens in {spec.windowed_layers} of {spec.layers} layers (priced: the kernel skips the blocks outside "
           f"{'its chunk' if spec.attention_chunked else 'it'})"] if spec.attention_window else []),
        *([f"  experts      ep {s.ep} (folded into data parallelism), expert tp {s.expert_tp or s.tp}; "
           f"{spec.experts // s.ep} experts per GPU, {r.memory_gib.get('experts', 0.0):.2f} GiB of expert states per "
           f"GPU; all-to-all {r.time_s.get('ep_comm', 0.0):.3f} s of the step"] if spec.moe else []),
        f"  priced with runtime {r.runtime}{default('runtime', '--runtime')} on hardware profile {r.profile}",
        f"  mesh {mesh}; zero {s.zero}; sequence parallel {'on' if s.sequence_parallel else 'off'}; "
        f"recompute {s.recompute.value}; {sched}, {s.num_microbatches} microbatches of {s.microbatch_size}",
        f"  sequence length {s.seq_len or spec.seq_len}{default('seq_len', '--seq-len')}; precision "
        f"{s.precision.value}{default('precision', '--precision')}; gradients {s.grad_dtype or 'fp32'}"
        f"{default('grad_dtype', '--grad-dtype')}; master weights {s.master_dtype}",
        "",
        f"  step time        {r.step_time_s:10.4f} s   (range {low:.4g} - {high:.4g} s, {sure})",
        f"  tokens/s         {r.tokens_per_s:10.0f}",
        f"  model TFLOP/s    {r.model_tflops_per_gpu:10.1f} per GPU   (MFU {100 * r.mfu:.1f}%)",
        f"  hardware TFLOP/s {r.hardware_tflops_per_gpu:10.1f} per GPU",
        f"  bubble           {100 * r.bubble_fraction:10.1f} %",
    ]
    lines += [f"  note: {n}" for n in notes if n]
    if r.mfu_above_published:
        lines.append(f"  note: MFU {100 * r.mfu:.1f}% is above the best published for this GPU type "
                     f"({100 * r.best_published_mfu:.1f}%): treat the prediction as optimistic")
    lines += [
        "",
        "  time (s)     " + "  ".join(f"{k} {v:.3f}" for k, v in r.time_s.items()),
        "  memory (GiB) " + "  ".join(f"{k} {v:.2f}" for k, v in r.memory_gib.items())
        + f"  of {r.capacity_gib:g}: {'fits' if r.fits else 'DOES NOT FIT'}",
        f"  MFU counts {MFU_CONVENTION}",
    ]
    return "\n".join(lines)
