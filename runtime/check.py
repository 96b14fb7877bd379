"""What the runtime can execute: refuse a plan before launch, in one line, with the reason."""

from __future__ import annotations

from costmodel.errors import ConfigError
from planner.plan import Plan, schedule_problems

SUPPORTED = {"Shard(0)", "Shard(1)", "Replicate()"}


def runnable_problems(plan: Plan, world_size: int | None = None) -> list[str]:
    """Every reason the runtime cannot execute the plan (on `world_size` processes)."""
    problems: list[str] = []
    mesh = plan.mesh
    size = plan.world_size
    if world_size is not None and size != world_size:
        problems.append(
            f"plan mesh pp({mesh['pp']}) * dp_replicate({mesh['dp_replicate']}) * dp_shard({mesh['dp_shard']}) * "
            f"cp({mesh['cp']}) * tp({mesh['tp']}) = {size} != world size {world_size}; launch {size} processes"
        )
    problems += schedule_problems(plan.schedule["name"], mesh["pp"], int(plan.schedule["num_microbatches"]))
    if mesh["cp"] > 1:
        problems.append("context parallelism (cp > 1) is planned and simulated but the runtime does not run it yet; "
                        "re-plan with --cp 1")
    spec = plan.spec
    if spec.tied_embeddings and mesh["pp"] > 1:
        problems.append(f"{spec.name} ties its embedding and output weights, which the runtime cannot split across "
                        "pipeline stages; re-plan with --pp 1")
    if plan.mode == "inference":
        problems.append("a serving plan is not trained; `paraplan generate` runs the built-in models with a KV cache")
    if plan.mode == "lora" and plan.sequence_parallel and mesh["tp"] > 1:
        problems.append("LoRA with sequence parallelism is not run yet (its losses drift from the single-process "
                        "run by 1e-5 to 1e-4 after a few steps); re-plan with --no-sequence-parallel")
    if plan.mode == "lora" and plan.lora.get("base_precision") == "nf4":
        problems.append("QLoRA's 4-bit base is planned but not run; re-plan with --base-precision bf16")
    if plan.precision == "fp8":
        problems.append("fp8 training is planned but not run; re-plan with --precision bf16")
    for name, axes in plan.placements.items():
        for axis, placement in axes.items():
            if axis not in ("tp", "dp_shard"):
                problems.append(f"placement of {name} on axis '{axis}' is not executable; use tp or dp_shard")
            elif placement not in SUPPORTED:
                problems.append(f"placement {placement} of {name} has no sharding rule in the runtime "
                                f"(supported: {', '.join(sorted(SUPPORTED))})")
    tp_layers = {k for k, v in plan.placements.items() if k.startswith("layers.") and "tp" in v}
    if mesh["tp"] > 1 and plan.sequence_parallel:
        linears = {"wq", "wk", "wv", "wo", "w1", "w2"} | ({"w3"} if spec.activation == "swiglu" else set())
        missing = sorted(n for n in linears if not any(f".{n}.weight" in k for k in tp_layers))
        if missing:
            problems.append(f"sequence parallelism needs every block linear tensor-parallel; {', '.join(missing)} "
                            "are replicated in the plan; re-plan with --no-sequence-parallel")
    return problems


def check_runnable(plan: Plan, world_size: int | None = None) -> None:
    """Raise the first of `runnable_problems`, if any."""
    problems = runnable_problems(plan, world_size)
    if problems:
        raise ConfigError(problems[0])
