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


def commands(plan: Plan, *, model_path: str | None = None) -> list[list[str]]:
    """The `vllm serve` command of each kind of instance the serving plan runs: one, or a
    prefill and a decode instance for a disaggregated plan (vLLM's disaggregated prefill over a
    KV connector, experimental there; a proxy sends each request to a prefill instance, then to
    a decode one)."""
    if plan.mode != "inference":
        raise ConfigError("vLLM serves; this is a training plan: export it --to torchtitan, megatron or deepspeed "
                          "(or plan with --mode inference)")
    from planner.serving_plan import serving_setup

    setup = serving_setup(plan, "the serving plan")  # refuses a missing or wrong field in one line
    sv = plan.serving
    prompt, output = setup.request.prompt_len, setup.request.output_len
    traffic = setup.traffic  # planned for a workload: requests of any length up to the context
    max_len = plan.spec.seq_len if traffic else prompt + output
    cmd = ["vllm", "serve", model_path or str(plan.model.get("name", "MODEL")),
           "--tensor-parallel-size", plan.mesh["tp"], "--pipeline-parallel-size", plan.mesh["pp"],
           "--max-num-seqs", sv.get("max_num_seqs", plan.schedule["microbatch_size"]), "--max-model-len", max_len,
           "--block-size", int(sv.get("block_tokens", 16)), "--gpu-memory-utilization", GPU_MEMORY_UTILIZATION,
           "--dtype", "bfloat16" if plan.precision == "bf16" else "float16" if plan.precision == "fp16" else "auto"]
    if traffic:
        cmd += ["--max-num-batched-tokens", sv["max_num_batched_tokens"],
                "--enable-chunked-prefill" if sv.get("chunked_prefill", True) else "--no-enable-chunked-prefill",
                "--enable-prefix-caching" if sv.get("prefix_caching", True) else "--no-enable-prefix-caching"]
    if sv.get("expert_parallel"):  # the experts whole over the tp GPUs (costmodel.serving)
        cmd += ["--enable-expert-parallel"]
    if sv.get("draft_model"):
        cmd += ["--speculative-config", json.dumps({"model": sv["draft_model"],
                                                    "num_speculative_tokens": int(sv.get("draft_len", 4))},
                                                   separators=(",", ":"))]
    replicas, prefill = int(sv.get("replicas", 1)), int(sv.get("prefill_replicas", 0))

    def data_parallel(count: int) -> list:
        # under expert parallelism vLLM spreads the experts over data-parallel x tp GPUs: the plan's
        # replicas (experts whole within each) are then separate instances, one per replica
        return ["--data-parallel-size", count] if count > 1 and not sv.get("expert_parallel") else []

    if not prefill:
        return [[str(c) for c in cmd + data_parallel(replicas)]]
    kv = ["--kv-transfer-config", json.dumps({"kv_connector": "NixlConnector", "kv_role": "kv_both"},
                                             separators=(",", ":"))]
    out = []
    for count in (prefill, replicas - prefill):
        out.append([str(c) for c in cmd + kv + data_parallel(count)])
    return out


def export(plan: Plan, *, model_path: str | None = None) -> list[str]:
    """The `vllm serve` command for a serving plan (a disaggregated plan's prefill instance)."""
    return commands(plan, model_path=model_path)[0]


def export_text(plan: Plan) -> str:
    runs = commands(plan)
    sv = plan.serving
    if len(runs) == 1:
        replicas = int(sv.get("replicas", 1))
        each = (f"# {replicas} instances of this command, one per replica (with --data-parallel-size vLLM would "
                "spread the experts over every replica's GPUs)\n" if sv.get("expert_parallel") and replicas > 1 else "")
        return each + " ".join(shlex.quote(c) for c in runs[0]) + "\n"
    return (f"# prefill instances ({sv['prefill_replicas']} replica(s)); a proxy sends each request here first\n"
            + " ".join(shlex.quote(c) for c in runs[0]) + "\n"
            + f"# decode instances ({int(sv['replicas']) - int(sv['prefill_replicas'])} replica(s))\n"
            + " ".join(shlex.quote(c) for c in runs[1]) + "\n")
