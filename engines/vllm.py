"""vLLM: a serving plan as the `vllm serve` command line.

The serving model prices vLLM's paged KV cache with `gpu_memory_utilization` 0.9 of the GPU
(costmodel.serving), so that is what is exported; replicas are separate `vllm serve`
processes (or `--data-parallel-size`), one per replica.
"""

from __future__ import annotations

import json
import shlex

from costmodel.errors import ConfigError
from planner.plan import Plan

GPU_MEMORY_UTILIZATION = 0.9  # what costmodel.serving's KV capacity assumes


def export(plan: Plan, *, model_path: str | None = None) -> list[str]:
    """The `vllm serve` command for a serving plan."""
    if plan.mode != "inference":
        raise ConfigError("vLLM serves; this is a training plan: export it --to torchtitan, megatron or deepspeed "
                          "(or plan with --mode inference)")
    sv = plan.serving
    try:
        prompt, output = int(sv["prompt_len"]), int(sv["output_len"])
    except (KeyError, TypeError, ValueError):
        raise ConfigError("the serving plan lacks prompt_len and output_len; re-plan with --mode inference") from None
    cmd = ["vllm", "serve", model_path or str(plan.model.get("name", "MODEL")),
           "--tensor-parallel-size", plan.mesh["tp"], "--pipeline-parallel-size", plan.mesh["pp"],
           "--max-num-seqs", plan.schedule["microbatch_size"], "--max-model-len", prompt + output,
           "--block-size", int(sv.get("block_tokens", 16)), "--gpu-memory-utilization", GPU_MEMORY_UTILIZATION,
           "--dtype", "bfloat16" if plan.precision == "bf16" else "float16" if plan.precision == "fp16" else "auto"]
    replicas = int(sv.get("replicas", 1))
    if replicas > 1:
        cmd += ["--data-parallel-size", replicas]
    if sv.get("draft_model"):
        cmd += ["--speculative-config", json.dumps({"model": sv["draft_model"],
                                                    "num_speculative_tokens": int(sv.get("draft_len", 4))},
                                                   separators=(",", ":"))]
    return [str(c) for c in cmd]


def export_text(plan: Plan) -> str:
    return " ".join(shlex.quote(c) for c in export(plan)) + "\n"
