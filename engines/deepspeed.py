"""DeepSpeed (0.19): a plan as the `ds_config.json` it reads, and such a config read back.

DeepSpeed's config says data parallelism and ZeRO; tensor parallelism and pipeline stages
come from the model code (Megatron-DeepSpeed, `PipelineModule`), so plans with tp or pp are
refused with the reason. ZeRO-3 sharding within groups (HSDP) is ZeRO++'s
`zero_hpz_partition_size`, which keeps a secondary copy per group: not the same memory, refused.
"""

from __future__ import annotations

import json

from costmodel.errors import ConfigError
from costmodel.strategy import Strategy
from engines.common import Imported, json_object, positive_int, training_plan, uniform_recompute
from planner.plan import Plan

UNDERSTOOD = {"train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps",
              "zero_optimization", "bf16", "fp16", "activation_checkpointing"}


def export(plan: Plan) -> dict:
    """The plan as a DeepSpeed config (JSON-ready dict)."""
    training_plan(plan, "DeepSpeed")
    mesh, sched = plan.mesh, plan.schedule
    if mesh["tp"] > 1 or mesh["pp"] > 1 or mesh["cp"] > 1:
        raise ConfigError("a DeepSpeed config expresses data parallelism and ZeRO only (tensor, pipeline and "
                          "context parallelism live in the model code); re-plan with --tp 1 --pp 1 --cp 1")
    if plan.zero == 3 and mesh["dp_replicate"] > 1:
        raise ConfigError("DeepSpeed has no HSDP groups (ZeRO++'s hpZ keeps another copy); re-plan without "
                          "--shard-group")
    recompute = uniform_recompute(plan, "DeepSpeed")
    if recompute == "selective":
        raise ConfigError("DeepSpeed checkpoints whole blocks (the model code calls its checkpoint()); re-plan with "
                          "--recompute full or none")
    dp = mesh["dp_replicate"] * mesh["dp_shard"]
    config = {
        "train_batch_size": plan.global_batch,
        "train_micro_batch_size_per_gpu": sched["microbatch_size"],
        "gradient_accumulation_steps": plan.global_batch // (dp * sched["microbatch_size"]),
        "zero_optimization": {"stage": plan.zero, "overlap_comm": True, "contiguous_gradients": True},
        "bf16": {"enabled": plan.precision == "bf16"},
        "fp16": {"enabled": plan.precision == "fp16"},
    }
    if plan.precision == "fp8":
        raise ConfigError("DeepSpeed's config has no fp8 training; export a bf16 plan")
    if recompute == "full":
        config["activation_checkpointing"] = {"partition_activations": False, "contiguous_memory_optimization": False,
                                              "number_checkpoints": plan.spec.layers}
    return config


def export_text(plan: Plan) -> str:
    return json.dumps(export(plan), indent=2) + "\n"


def import_(text: str, *, world_size: int, seq_len: int) -> Imported:
    """A DeepSpeed config (JSON text) on `world_size` GPUs, all data-parallel -> the strategy."""
    data = json_object(text, "the DeepSpeed config")
    unknown = [k for k in data if k not in UNDERSTOOD]
    zero_cfg = data.get("zero_optimization", {})
    unknown += [f"zero_optimization.{k}" for k in zero_cfg if k not in ("stage", "overlap_comm", "contiguous_gradients",
                                                                       "reduce_scatter")]
    zero = int(zero_cfg.get("stage", 0))
    if zero not in (0, 1, 2, 3):
        raise ConfigError(f"zero_optimization.stage is {zero}; DeepSpeed takes 0-3")
    dp = world_size
    micro = data.get("train_micro_batch_size_per_gpu")
    accum = data.get("gradient_accumulation_steps")
    total = data.get("train_batch_size")
    if total is None and micro is None:
        raise ConfigError("the DeepSpeed config needs train_batch_size or train_micro_batch_size_per_gpu")
    micro = positive_int(micro, "train_micro_batch_size_per_gpu", "DeepSpeed") if micro is not None else None
    accum = positive_int(accum, "gradient_accumulation_steps", "DeepSpeed") if accum is not None else None
    if total is None:
        total = micro * (accum or 1) * dp
    total = positive_int(total, "train_batch_size", "DeepSpeed")
    if micro is None:
        micro = total // (dp * (accum or 1))
    if micro * (accum or total // (dp * micro)) * dp != total:
        raise ConfigError(f"train_batch_size {total} != micro batch {micro} x accumulation {accum} x {dp} GPUs; "
                          "DeepSpeed refuses this too")
    precision = "bf16" if data.get("bf16", {}).get("enabled") else "fp16" if data.get("fp16", {}).get("enabled") else "fp32"
    # the model code decides which blocks call checkpoint(); a config that sets it up is priced as every block
    recompute = "full" if "activation_checkpointing" in data else "none"
    strategy = Strategy(dp=dp, zero=zero, shard_group=dp if zero else 1, microbatch_size=micro, global_batch=total,
                        precision=precision, recompute=recompute, seq_len=seq_len)
    return Imported(engine="deepspeed", strategy=strategy, unknown=tuple(unknown))
