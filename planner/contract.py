"""The plan -> check -> run contract: every reason a plan cannot run, in one function.

`paraplan check` prints `plan_problems`, `paraplan run` refuses on the same list before it
launches, the workers call it again on their world size, and the search keeps only
candidates whose layout passes `layout_problems`: so what `check` accepts, `run` starts, and
what `plan` writes, `check` accepts. The planner holds the rules (it must consult them
without importing the runtime); the runtime's executable layouts are written down here:

- tensor parallelism splits linears only (Shard(0) column-, Shard(1) row-parallel) and the
  token embedding (Shard(0), vocab-parallel); inside a block the attention projections go
  together (q, k, v column and o row, or all replicated), and so do the MLP's (w1, w3
  column and w2 row, or all replicated);
- sequence parallelism needs every block linear split; tp at most the K/V heads;
- context parallelism, fp8 training and 4-bit QLoRA bases are planned, not run.
"""

from __future__ import annotations

import fnmatch

from costmodel.errors import ConfigError
from costmodel.spec import ModelSpec
from costmodel.strategy import Strategy
from costmodel.validate import strategy_problems
from planner.plan import Plan, schedule_problems

SUPPORTED = ("Shard(0)", "Shard(1)", "Replicate()")
RUNNABLE_RUNTIMES = ("paraplan", "paraplan-compile")  # the runtime profiles that describe `paraplan run`


def _linears(spec: ModelSpec) -> dict[str, dict[str, str]]:
    """Block linears by sub-block, with the Megatron placement each takes under tp."""
    mlp = {"w1": "Shard(0)", "w2": "Shard(1)"} | ({"w3": "Shard(0)"} if spec.activation.value == "swiglu" else {})
    return {"attention": {"wq": "Shard(0)", "wk": "Shard(0)", "wv": "Shard(0)", "wo": "Shard(1)"},
            "feed_forward": mlp}


def tp_placement(placements: dict[str, dict[str, str]], name: str) -> str | None:
    """The tensor-parallel placement the plan gives parameter `name` (globs allowed), if any."""
    for pattern, axes in placements.items():
        if fnmatch.fnmatchcase(name, pattern) and "tp" in axes:
            return axes["tp"]
    return None


def layout_problems(spec: ModelSpec, placements: dict[str, dict[str, str]], tp: int,
                    sequence_parallel: bool) -> list[str]:
    """Every reason the runtime cannot execute these placements on a mesh with this tp."""
    problems: list[str] = []
    for name, axes in placements.items():
        for axis, placement in axes.items():
            if axis not in ("tp", "dp_shard"):
                problems.append(f"placement of {name} on axis '{axis}' is not executable; use tp or dp_shard")
            elif placement not in SUPPORTED:
                problems.append(f"placement {placement} of {name} has no sharding rule in the runtime "
                                f"(supported: {', '.join(SUPPORTED)})")
    tp_named = [k for k, v in placements.items() if v.get("tp", "Replicate()") != "Replicate()"]
    if tp == 1:
        if tp_named:
            problems.append(f"the mesh has tp 1 but the plan splits {tp_named[0]} over tp; drop its tp placement "
                            "or re-plan with --tp")
        return problems
    linears = _linears(spec)
    block_linear = {f"layers.*.{sub}.{n}.weight" for sub, names in linears.items() for n in names}
    for name in tp_named:
        generic = ".".join("*" if p.isdigit() else p for p in name.split("."))
        allowed = generic in block_linear or generic.endswith(".bias") or name in ("tok_embeddings.weight", "output.weight")
        if not allowed:
            problems.append(f"the runtime splits only linears and the token embedding over tp, not {name}; "
                            "drop its tp placement")
    for name in ("tok_embeddings.weight", "output.weight"):
        got = tp_placement(placements, name)
        if got not in (None, "Replicate()", "Shard(0)"):
            problems.append(f"{name} runs vocab-parallel (Shard(0)) or replicated over tp, not {got}")
    split_all = True
    for layer in range(spec.layers):
        for sub, names in linears.items():
            got = {n: tp_placement(placements, f"layers.{layer}.{sub}.{n}.weight") or "Replicate()" for n in names}
            split = all(got[n] == want for n, want in names.items())
            replicated = all(g == "Replicate()" for g in got.values())
            if not (split or replicated):
                shown = ", ".join(f"{n} {g}" for n, g in got.items())
                problems.append(f"layer {layer}'s {sub} is split over tp as {shown}, which the runtime cannot run: "
                                f"it splits {', '.join(names)} as {', '.join(names.values())} or none of them")
                return problems
            split_all = split_all and split
    if sequence_parallel and not split_all:
        problems.append("sequence parallelism needs every block linear tensor-parallel, and the plan replicates some; "
                        "re-plan with --no-sequence-parallel")
    return problems


def strategy_runtime_problems(spec: ModelSpec, s: Strategy, mode: str = "train") -> list[str]:
    """What `paraplan run` does not execute in a strategy, whatever its placements."""
    problems = schedule_problems(s.schedule.value, s.pp, s.num_microbatches)
    if s.tp > spec.kv_heads:
        problems.append(f"tp({s.tp}) is more than {spec.name}'s {spec.kv_heads} K/V heads: the runtime splits whole "
                        f"K/V heads (it does not copy them, as Megatron does); use --tp {spec.kv_heads} or less")
    return problems + list(planned_only(s, mode).values())


def planned_only(s: Strategy, mode: str = "train") -> dict[str, str]:
    """Features the cost model prices and `paraplan run` does not execute yet, by the flag
    that asks for them. The search never picks them on its own; a plan that asks for one
    (the flag given) is written with a note, and `check` and `run` refuse it, as they agree."""
    out: dict[str, str] = {}
    if s.cp > 1:
        out["cp"] = ("context parallelism (cp > 1) is planned and simulated but the runtime does not run it yet; "
                     "re-plan with --cp 1")
    if mode == "lora" and s.sequence_parallel and s.tp > 1:
        out["sequence_parallel"] = ("LoRA with sequence parallelism is not run yet (its losses drift from the "
                                    "single-process run by 1e-5 to 1e-4 after a few steps); re-plan with "
                                    "--no-sequence-parallel")
    if mode == "lora" and s.base_precision == "nf4":
        out["base_precision"] = "QLoRA's 4-bit base is planned but not run; re-plan with --base-precision bf16"
    if s.precision.value == "fp8":
        out["precision"] = "fp8 training is planned but not run; re-plan with --precision bf16"
    return out


def runnable_problems(plan: Plan, world_size: int | None = None) -> list[str]:
    """Every reason `paraplan run` cannot execute the plan (on `world_size` processes)."""
    problems: list[str] = []
    mesh = plan.mesh
    if world_size is not None and plan.world_size != world_size:
        problems.append(
            f"plan mesh pp({mesh['pp']}) * dp_replicate({mesh['dp_replicate']}) * dp_shard({mesh['dp_shard']}) * "
            f"cp({mesh['cp']}) * tp({mesh['tp']}) = {plan.world_size} != world size {world_size}; "
            f"launch {plan.world_size} processes"
        )
    if plan.mode == "inference":
        return problems + ["a serving plan is not trained; `paraplan generate` runs the built-in models with a KV cache"]
    spec = plan.spec
    problems += strategy_runtime_problems(spec, plan.strategy(), plan.mode)
    problems += layout_problems(spec, plan.placements, mesh["tp"], plan.sequence_parallel)
    return problems


def parameter_names(spec: ModelSpec) -> list[str]:
    """The parameter names of the model the runtime builds (meta device: nothing allocated)."""
    import torch

    from planner.zoo.model import build_model

    with torch.device("meta"):
        return [name for name, _ in build_model(spec).named_parameters()]


def plan_problems(plan: Plan, cluster) -> tuple[list[str], dict]:
    """(problems, facts): every reason the plan cannot run on `cluster` (a costmodel Cluster),
    and what was measured on the way. `paraplan check` prints it; `paraplan run` refuses on it."""
    from costmodel import predict

    problems: list[str] = []
    facts: dict = {"processes": plan.world_size, "cluster_gpus": cluster.world_size}
    if plan.world_size != cluster.world_size:
        problems.append(f"the plan's mesh has {plan.world_size} processes but {cluster.name} has "
                        f"{cluster.world_size} GPUs; re-plan with `paraplan replan --gpus {cluster.world_size}`")
    spec, strategy = plan.spec, plan.strategy()
    layout = strategy_problems(spec, strategy, plan.world_size)
    problems += layout
    if not layout and plan.mode == "inference":
        problems += _serving_memory(plan, spec, cluster, facts)
    elif not layout:
        try:
            result = predict(spec, strategy, cluster)
        except ConfigError as exc:
            problems.append(str(exc))
        else:
            facts["peak_memory_gib"] = round(result.memory_gib["total"], 2)
            facts["capacity_gib"] = cluster.device.hbm_gib
            for rank, mem in enumerate(result.rank_memory_gib):
                if mem["total"] > cluster.device.hbm_gib:
                    problems.append(
                        f"pipeline rank {rank} needs {mem['total']:.1f} GiB per GPU against {cluster.device.hbm_gib:g} "
                        f"GiB on {cluster.device.name}; add recomputation, ZeRO sharding or GPUs")
    problems += runnable_problems(plan)
    names = parameter_names(spec)
    for pattern in plan.placements:
        if not any(fnmatch.fnmatchcase(n, pattern) for n in names):
            problems.append(f"placement '{pattern}' matches no parameter of {spec.name} "
                            f"(names look like {names[min(2, len(names) - 1)]})")
    return [" ".join(p.split()) for p in dict.fromkeys(problems)], facts


def _serving_memory(plan: Plan, spec: ModelSpec, cluster, facts: dict) -> list[str]:
    """A serving plan's weights and KV cache against the GPU (costmodel.serving)."""
    from costmodel.serving import ServingRequest, kv_budget

    sv = plan.serving
    try:
        req = ServingRequest(prompt_len=int(sv["prompt_len"]), output_len=int(sv["output_len"]),
                             beam=int(sv.get("beam", 1)), block_tokens=int(sv.get("block_tokens", 16)),
                             precision=plan.precision)
    except (KeyError, TypeError, ValueError):
        return ["the serving plan lacks prompt_len and output_len under `serving`; re-plan with --mode inference"]
    budget = kv_budget(spec, cluster, req, plan.mesh["tp"], plan.mesh["pp"])
    batch = plan.schedule["microbatch_size"]
    facts.update(weights_gib_per_gpu=round(budget.weights_gib, 2), max_batch=budget.max_batch_paged)
    if batch > budget.max_batch_paged:
        return [f"batch {batch} needs more KV cache than the {budget.kv_gib:.1f} GiB per GPU left after "
                f"{budget.weights_gib:.1f} GiB of weights (at most {budget.max_batch_paged} sequences); lower --batch"]
    return []
