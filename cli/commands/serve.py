"""`paraplan plan --mode inference`: the serving layout (tp x pp x replicas) and batch with
the most tokens per second within the latency targets, the KV cache in paged blocks."""

from __future__ import annotations

import argparse
import json

from costmodel import ConfigError, Strategy, load_cluster
from costmodel.serving import (DEFAULT_ACCEPTANCE, GPU_MEMORY_UTILIZATION, ServingPlan, ServingPoint, ServingRequest,
                               acceptance_of_length, check_degrees, compute_dtype, kv_bytes_per_token, layout_label,
                               plan_serving)
from costmodel.spec import ModelSpec, format_count
from costmodel.serving_engine import DEFAULT_ENGINE, check_block_size
from planner.files import atomic_write_text
from planner.model_source import NGRAM, load_draft
from planner.plan import plan_from_strategy
from cli.commands.flags import first_given
from cli.commands.served import load_served_spec, served_model_path, served_precision

SERVING_FLAGS = ("prompt_len", "output_len", "batch", "max_ttft_ms", "max_tpot_ms", "beam", "block_size",
                 "draft_model", "draft_len", "acceptance", "acceptance_length", "kv_cache_dtype", "gpu_memory_utilization")
# flags of training that a serving plan has no use for, and of serving under traffic (--workload)
TRAINING_FLAGS = ("dp", "cp", "ep", "expert_tp", "expert_load_cv", "ep_overlap", "zero", "shard_group",
                  "sequence_parallel", "recompute", "microbatch_size", "schedule", "virtual_stages", "seq_len",
                  "flash_attention", "grad_dtype", "master_dtype", "global_batch", "runtime", "lora_rank",
                  "lora_targets", "base_precision")
TRAFFIC_FLAGS = ("replicas", "prefill_replicas", "max_num_seqs", "max_num_batched_tokens", "chunked_prefill",
                 "prefix_caching", "preemption", "evicted_prefix", "requests", "concurrency", "burst_cv",
                 "workload_seed", "num_scheduler_steps")
# every flag of the serving groups (cli.main): a training or fine-tuning command refuses them
INFERENCE_FLAGS = SERVING_FLAGS + TRAFFIC_FLAGS + ("expert_parallel", "max_model_len", "workload", "rate", "slo",
                                                  "engine")


def refuse_serving_flags(args: argparse.Namespace) -> None:
    """One line for a serving flag given to a training (or fine-tuning) command."""
    flag = first_given(args, INFERENCE_FLAGS)
    if flag:
        raise ConfigError(f"{flag} is for serving: add --mode inference")


def refuse_other_flags(args: argparse.Namespace) -> None:
    """One line for a flag the steady-state serving model does not take."""
    for names, why in ((TRAINING_FLAGS, "is for training; serving takes --tp, --pp, --batch and the request's "
                                        "lengths (--engine for the serving engine)"),
                       (TRAFFIC_FLAGS, "is for serving under traffic: add --workload (and --rate)")):
        flag = first_given(args, names)
        if flag:
            raise ConfigError(f"{flag} {why}")


def draft_settings(args: argparse.Namespace) -> tuple[int, float]:
    """(drafts a check, acceptance of each) of speculative decoding: --draft-len (default 4) and
    the acceptance at it (`acceptance_at`); one line for either without --draft-model."""
    if not getattr(args, "draft_model", None):
        flag = first_given(args, ("draft_len", "acceptance", "acceptance_length"))
        if flag:
            raise ConfigError(f"{flag} goes with --draft-model (a draft model, ngram or eagle:HEAD)")
        return 0, DEFAULT_ACCEPTANCE
    k = 4 if args.draft_len is None else args.draft_len
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ConfigError(f"--draft-len must be a positive integer, got {k}")
    return k, acceptance_at(args, k)


def acceptance_at(args: argparse.Namespace, k: int) -> float:
    """The acceptance of each of `k` drafts: --acceptance, or --acceptance-length (vLLM's "Mean
    acceptance length" at k) solved for it, or DEFAULT_ACCEPTANCE; both given is one line."""
    length = getattr(args, "acceptance_length", None)
    if length is not None and args.acceptance is not None:
        raise ConfigError("give --acceptance (of each drafted token) or --acceptance-length (tokens a check), not both")
    if length is not None:
        return acceptance_of_length(length, k)
    return DEFAULT_ACCEPTANCE if args.acceptance is None else args.acceptance


def speculation_text(k: int, draft: ModelSpec | None, acceptance: float, args: argparse.Namespace | None,
                     per: str) -> str:
    """`k` drafts a `per` (check, decode), the proposer (`draft`, or n-gram lookup) and the
    acceptance as the output says it: defaulted (no --acceptance or --acceptance-length in
    `args`) it says so; `args` None: as a plan recorded it."""
    given = args is None or args.acceptance is not None or getattr(args, "acceptance_length", None) is not None
    return (f"{k} draft{'s' if k > 1 else ''} a {per} ({draft.name if draft else 'n-gram lookup'}), each accepted at "
            f"{acceptance:.2g}" + ("" if given else " (default; --acceptance or --acceptance-length)"))


def speculation_section(args: argparse.Namespace, k: int, acceptance: float) -> dict:
    """A plan's record of the speculative decoding it was planned with (k 0: none)."""
    return {"draft_model": args.draft_model, "draft_len": k, "acceptance": acceptance} if k else {}


def serving_request(args: argparse.Namespace, spec: ModelSpec) -> ServingRequest:
    if args.prompt_len is None or args.output_len is None:
        raise ConfigError("--mode inference needs --prompt-len and --output-len")
    draft = load_draft(args.draft_model, spec) if args.draft_model else None  # (an EAGLE head: the target's shape)
    draft_len, acceptance = draft_settings(args)
    engine = getattr(args, "engine", None) or DEFAULT_ENGINE
    if args.block_size is not None:
        check_block_size(args.block_size, engine)
    return ServingRequest(
        prompt_len=args.prompt_len, output_len=args.output_len, batch=args.batch, max_ttft_ms=args.max_ttft_ms,
        max_tpot_ms=args.max_tpot_ms, beam=1 if args.beam is None else args.beam,
        block_tokens=16 if args.block_size is None else args.block_size,
        precision=args.precision or "bf16", draft=draft, ngram=args.draft_model == NGRAM,
        draft_len=draft_len or 4, acceptance=acceptance,
        engine=engine, **memory_args(args),
    )


def memory_args(args: argparse.Namespace) -> dict:
    """--kv-cache-dtype and --gpu-memory-utilization where given (the engine's defaults otherwise)."""
    return {k: getattr(args, k) for k in ("kv_cache_dtype", "gpu_memory_utilization") if getattr(args, k, None) is not None}


def memory_section(req_or_cfg) -> dict:
    """What a serving plan records of the KV cache's dtype and the GPU's share: the fields that
    differ from the engine's defaults."""
    out = {}
    if req_or_cfg.kv_cache_dtype != "auto":
        out["kv_cache_dtype"] = req_or_cfg.kv_cache_dtype
    if req_or_cfg.gpu_memory_utilization != GPU_MEMORY_UTILIZATION:
        out["gpu_memory_utilization"] = req_or_cfg.gpu_memory_utilization
    return out


def predicted(spec, req: ServingRequest, p: ServingPoint) -> dict:
    """The plan's `predicted` for serving (docs/ARCHITECTURE.md): ttft_s, tpot_s, kv_cache_bytes_per_token,
    max_batch, and what else the point knows."""
    return {
        "ttft_s": p.ttft_s, "tpot_s": p.tpot_s, "kv_cache_bytes_per_token": kv_bytes_per_token(spec, req.kv_bytes_per_value),
        "max_batch": p.budget.max_batch_paged, "max_batch_contiguous": p.budget.max_batch_contiguous,
        "batch": p.batch, "throughput_tokens_per_s": p.throughput_tokens_per_s,
        "kv_capacity_tokens": p.budget.capacity_tokens, "weights_gib_per_gpu": p.budget.weights_gib,
        "kv_gib_per_gpu": p.budget.kv_gib, "fragmentation_paged": p.budget.fragmentation_paged,
        "fragmentation_contiguous": p.budget.fragmentation_contiguous, "speculative_speedup": p.speculative_speedup,
    }


def format_serving(spec, cluster_text: str, req: ServingRequest, found: ServingPlan,
                   args: argparse.Namespace | None = None) -> str:
    p, b = found.best, found.best.budget
    lines = [
        f"{spec.name} ({format_count(spec.num_params)} params) serving on {cluster_text}: prompt {req.prompt_len}, "
        f"output {req.output_len} tokens{f', beam {req.beam}' if req.beam > 1 else ''}",
        f"  layout tp {p.tp} x pp {p.pp}{' (experts whole over tp: expert parallel)' if p.expert_parallel else ''}, "
        f"{p.replicas} replica(s); batch {p.batch} sequences per replica",
        f"  TTFT {p.ttft_s * 1e3:9.1f} ms   TPOT {p.tpot_s * 1e3:7.2f} ms   throughput {p.throughput_tokens_per_s:9.0f} "
        f"tokens/s" + (f"   (speculative x{p.speculative_speedup:.2f}: "
                      f"{speculation_text(req.draft_len, req.draft, req.acceptance, args, 'check')})"
                      if req.speculative else ""),
        f"  KV cache {kv_bytes_per_token(spec, req.kv_bytes_per_value) / 1024:.0f} KiB per token; per GPU: weights "
        f"{b.weights_gib:.1f} GiB, cache {b.kv_gib:.1f} GiB = {b.capacity_tokens} tokens per replica",
        f"  batch limit: paged ({req.block_tokens}-token blocks) {b.max_batch_paged} sequences, fragmentation "
        f"{100 * b.fragmentation_paged:.1f}%; contiguous {b.max_batch_contiguous}, fragmentation "
        f"{100 * b.fragmentation_contiguous:.1f}%",
        "",
        "  layout      batch   TPOT ms   tokens/s   (the throughput-latency curve of each layout)",
    ]
    for _, points in sorted(found.curves.items()):
        for q in points:
            lines.append(f"  {q.label:11s} {q.batch:6d} {q.tpot_s * 1e3:9.2f} {q.throughput_tokens_per_s:10.0f}")
    for layout, why in sorted(found.refused.items()):
        lines.append(f"  {layout_label(*layout)}: {why}")
    return "\n".join(lines)


def run_serving(args: argparse.Namespace) -> int:
    if getattr(args, "workload", None) or getattr(args, "rate", None) is not None or getattr(args, "slo", None):
        from cli.commands.traffic import run_traffic_plan

        return run_traffic_plan(args)
    if not args.model or not args.cluster:
        raise ConfigError("plan --mode inference needs --model and --cluster")
    if getattr(args, "expert_parallel", None):
        raise ConfigError("plan searches --expert-parallel (with and without, for a mixture of experts); leave it out")
    refuse_other_flags(args)
    spec = load_served_spec(args)
    args.precision = served_precision(args, spec=spec)
    cluster = load_cluster(args.cluster)
    req = serving_request(args, spec)
    found = plan_serving(spec, cluster, req, tp=args.tp, pp=args.pp)  # given degrees are fixed
    best = found.best
    s = Strategy(tp=best.tp, pp=best.pp, dp=best.replicas, microbatch_size=best.batch,
                 global_batch=best.batch * best.replicas, precision=compute_dtype(req.precision), seq_len=spec.seq_len,
                 sequence_parallel=False)
    plan = plan_from_strategy(spec, s, args.cluster, predicted(spec, req, best))
    plan = plan.__class__(**{**{f: getattr(plan, f) for f in plan.__slots__}, "mode": "inference",
                             "precision": req.precision,  # (a weight format: the compute dtype's strategy above)
                             "serving": {"prompt_len": req.prompt_len, "output_len": req.output_len, "beam": req.beam,
                                         "block_tokens": req.block_tokens, "replicas": best.replicas,
                                         "engine": req.engine, **served_model_path(args.model), **memory_section(req),
                                         **({"expert_parallel": True} if best.expert_parallel else {}),
                                         **speculation_section(args, req.draft_len if req.speculative else 0,
                                                               req.acceptance)}})
    if args.output:
        atomic_write_text(args.output, plan.to_yaml())
    if args.json:
        print(json.dumps({"plan": plan.to_dict(), "curves": {f"tp{tp}_pp{pp}{'_ep' if ep else ''}": [
            q.to_dict() for q in pts] for (tp, pp, ep), pts in found.curves.items()}}, indent=2))
    else:
        print(format_serving(spec, args.cluster, req, found, args))
        if args.output:
            print(f"  plan written to {args.output}")
    return 0


def run_serving_simulate(args: argparse.Namespace) -> int:
    """`paraplan simulate --mode inference --prompt-len P --output-len O [--tp T --pp P --batch B]`:
    one layout in the steady state (tp and pp 1 unless given; the batch the largest the KV cache
    holds within the targets, or --batch)."""
    check_degrees(tp=args.tp, pp=args.pp)  # a given 0 is refused, not taken for 1
    args.tp, args.pp = args.tp or 1, args.pp or 1
    return run_serving(args)
