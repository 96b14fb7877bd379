"""torchtitan 0.2: a plan as the job config TOML it reads, and such a TOML read back.

torchtitan's FSDP2 mesh is (pp, dp_replicate, dp_shard, cp, tp), paraplan's own; with
dp_shard > 1 parameters are always sharded (ZeRO-3 when resharded after forward, ZeRO-2
when not: `fsdp_reshard_after_forward`); tensor parallelism always runs the norms
sequence-parallel. Without pipelining, gradient accumulation is global_batch_size /
(local_batch_size x dp); with it, local_batch_size / pipeline_parallel_microbatch_size
microbatches go through the schedule.
"""

from __future__ import annotations

import tomllib

from costmodel.errors import ConfigError
from costmodel.spec import ModelSpec
from costmodel.strategy import Strategy
from engines.common import Imported, positive_int, stage_layers, training_plan, uniform_recompute
from planner.plan import Plan
from planner.zoo import ZOO  # torchtitan's flavors are shaped as the zoo's models of the same name

SCHEDULES = {"gpipe": "GPipe", "1f1b": "1F1B", "interleaved": "Interleaved1F1B", "zero-bubble": "InterleavedZeroBubble"}
FLAVORS = {"llama3-8b": ("llama3", "8B"), "llama3-70b": ("llama3", "70B"), "llama3-405b": ("llama3", "405B")}
UNDERSTOOD = {
    "parallelism": {"data_parallel_replicate_degree", "data_parallel_shard_degree", "fsdp_reshard_after_forward",
                    "tensor_parallel_degree", "pipeline_parallel_degree", "pipeline_parallel_schedule",
                    "pipeline_parallel_microbatch_size", "pipeline_parallel_layers_per_stage",
                    "module_fqns_per_model_part", "context_parallel_degree", "expert_parallel_degree"},
    "activation_checkpoint": {"mode", "selective_ac_option"},
    "training": {"local_batch_size", "global_batch_size", "seq_len", "mixed_precision_param",
                 "mixed_precision_reduce"},
    "model": {"name", "flavor"},
}


def export(plan: Plan) -> str:
    """The plan as torchtitan's job config (TOML)."""
    training_plan(plan, "torchtitan")
    mesh, sched = plan.mesh, plan.schedule
    if mesh["tp"] > 1 and not plan.sequence_parallel:
        raise ConfigError("torchtitan runs tensor parallelism with sequence-parallel norms always; re-plan with "
                          "--sequence-parallel")
    if plan.zero in (1, 2) and mesh["dp_shard"] == 1 and mesh["dp_replicate"] > 1:
        raise ConfigError("torchtitan shards optimizer state only with FSDP (data_parallel_shard_degree > 1); "
                          "re-plan with --zero 0 or --zero 3")
    recompute = uniform_recompute(plan, "torchtitan")
    dp = mesh["dp_replicate"] * mesh["dp_shard"]
    model_name, flavor = flavor_of(plan.spec) or (plan.model.get("name", "custom"), "custom")
    parallelism: dict = {
        "data_parallel_replicate_degree": mesh["dp_replicate"],
        "data_parallel_shard_degree": mesh["dp_shard"],
        "fsdp_reshard_after_forward": "always" if plan.zero == 3 else "never",
        "tensor_parallel_degree": mesh["tp"],
        "pipeline_parallel_degree": mesh["pp"],
        "context_parallel_degree": mesh["cp"],
        "expert_parallel_degree": 1,
    }
    per_replica = plan.global_batch // dp
    if mesh["pp"] > 1:
        parallelism["pipeline_parallel_schedule"] = SCHEDULES[sched["name"]]
        parallelism["pipeline_parallel_microbatch_size"] = sched["microbatch_size"]
        counts = stage_layers(plan)
        if len(set(counts)) == 1:
            parallelism["pipeline_parallel_layers_per_stage"] = counts[0]
        else:  # an uneven cut: name each model part's modules
            parallelism["module_fqns_per_model_part"] = _model_parts(plan)
        local = per_replica
    else:
        local = sched["microbatch_size"]  # the rest is gradient accumulation
    training = {"local_batch_size": local, "global_batch_size": plan.global_batch, "seq_len": plan.seq_len,
                "mixed_precision_param": "float32" if plan.precision == "fp32" else "bfloat16",
                "mixed_precision_reduce": "float32"}
    if plan.precision not in ("bf16", "fp32"):
        raise ConfigError(f"torchtitan trains in bf16 or fp32 (fp8 through converters); the plan is {plan.precision}: "
                          "re-plan with --precision bf16")
    ac = {"mode": recompute}
    if recompute == "selective":
        ac["selective_ac_option"] = "op"  # per-op SAC: saves matmul outputs, recomputes the rest
    sections = {"model": {"name": model_name, "flavor": flavor}, "training": training, "parallelism": parallelism,
                "activation_checkpoint": ac}
    lines = [f"# torchtitan 0.2 job config of a paraplan plan: {plan.model.get('name')} on {plan.cluster}, "
             f"runtime {plan.runtime}"]
    for name, values in sections.items():
        lines.append(f"\n[{name}]")
        lines += [f"{k} = {_toml(v)}" for k, v in values.items()]
    return "\n".join(lines) + "\n"


SHAPE_FIELDS = ("layers", "hidden", "heads", "kv_heads", "head_dim", "ffn_hidden", "vocab", "activation", "norm",
                "position", "tied_embeddings", "bias", "rope_theta", "experts", "kv_lora_rank", "qk_norm")


def flavor_of(spec: ModelSpec) -> tuple[str, str] | None:
    """torchtitan's (model name, flavor) of the model shaped as `spec` (a Llama 3 or 3.1 of its sizes,
    by whatever name it was planned: a Hugging Face directory's, say), or None where it has none."""
    for zoo_name, flavor in FLAVORS.items():
        if all(getattr(spec, f) == getattr(ZOO[zoo_name], f) for f in SHAPE_FIELDS):
            return flavor
    return None


def export_notes(plan: Plan) -> list[str]:
    """What the job config cannot say of the model, to say beside it."""
    if flavor_of(plan.spec):
        return []
    spec = plan.spec
    return [f"torchtitan has no flavor of {spec.name}'s shape: [model] names it name = \"{spec.name}\", flavor = "
            f"\"custom\", which torchtitan must be given (register a flavor of {spec.layers} layers, hidden "
            f"{spec.hidden}, {spec.heads} heads ({spec.kv_heads} K/V), FFN {spec.ffn_hidden}, vocabulary {spec.vocab})"]


def _model_parts(plan: Plan) -> list[list[str]]:
    parts = []
    ordered = sorted(plan.stages, key=lambda s: s.virtual_stage)
    for k, st in enumerate(ordered):
        names = ["tok_embeddings"] if k == 0 else []
        names += [f"layers.{i}" for i in range(*st.layers)]
        if k == len(ordered) - 1:
            names += ["norm", "output"]
        parts.append(names)
    return parts


def _toml(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, list):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    raise TypeError(f"no TOML for {type(value).__name__}")


def import_(text: str, *, world_size: int, spec: ModelSpec | None = None) -> Imported:
    """A torchtitan job config (TOML text) on `world_size` GPUs -> the strategy it runs. The
    model is `spec` if given, else the zoo's entry for a known model.name/flavor."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"the torchtitan config is not valid TOML ({exc}); fix its syntax") from None
    unknown = [f"{section}.{key}" for section, values in data.items() if isinstance(values, dict)
               for key in values if key not in UNDERSTOOD.get(section, set())]
    unknown += [k for k, v in data.items() if not isinstance(v, dict)]
    par, tr, ac = data.get("parallelism", {}), data.get("training", {}), data.get("activation_checkpoint", {})

    def num(section: dict, key: str, default: int, leftover: bool = False) -> int:
        return positive_int(section.get(key, default), key, "torchtitan", leftover=leftover)

    tp, pp, cp = num(par, "tensor_parallel_degree", 1), num(par, "pipeline_parallel_degree", 1), \
        num(par, "context_parallel_degree", 1)
    rep = num(par, "data_parallel_replicate_degree", 1)
    shard = num(par, "data_parallel_shard_degree", -1, leftover=True)
    if shard == -1:  # the ranks left over
        rest = world_size // (tp * pp * cp * rep)
        if rest < 1 or rest * tp * pp * cp * rep != world_size:
            raise ConfigError(f"torchtitan degrees tp {tp} x pp {pp} x cp {cp} x dp_replicate {rep} do not divide "
                              f"the {world_size} GPUs; give data_parallel_shard_degree")
        shard = rest
    if num(par, "expert_parallel_degree", 1) > 1:
        raise ConfigError("expert_parallel_degree > 1 needs a mixture-of-experts model, which paraplan does not "
                          "price yet; set it to 1")
    dp = rep * shard
    reshard = par.get("fsdp_reshard_after_forward", "default")
    if reshard not in ("default", "always", "never"):
        raise ConfigError(f"fsdp_reshard_after_forward is {reshard!r}; torchtitan takes default, always or never")
    zero = 0 if shard == 1 else (2 if reshard == "never" or (reshard == "default" and pp > 1) else 3)
    seq = num(tr, "seq_len", 2048)
    local = num(tr, "local_batch_size", 8)
    global_batch = tr.get("global_batch_size", -1)
    global_batch = local * dp if global_batch in (-1, None) else positive_int(global_batch, "global_batch_size",
                                                                             "torchtitan")
    mode = ac.get("mode", "selective")
    if mode not in ("none", "selective", "full"):
        raise ConfigError(f"activation_checkpoint.mode is {mode!r}; torchtitan takes none, selective or full")
    if mode == "selective" and str(ac.get("selective_ac_option", "2")) != "op":
        mode = "full"  # an integer option checkpoints every n-th block whole; the closest uniform policy
        unknown.append(f"activation_checkpoint.selective_ac_option={ac.get('selective_ac_option', '2')} "
                       "(every n-th block: priced as full)")
    fields: dict = dict(tp=tp, pp=pp, cp=cp, dp=dp, zero=zero, shard_group=shard if zero else 1,
                        sequence_parallel=tp > 1, recompute=mode, global_batch=global_batch, seq_len=seq,
                        precision="fp32" if tr.get("mixed_precision_param") == "float32" else "bf16")
    per_stage = None  # interleaved layers per stage: virtual stages follow from the model's layers
    if pp > 1:
        name = str(par.get("pipeline_parallel_schedule", "1F1B"))
        back = {v.lower(): k for k, v in SCHEDULES.items()}
        if name.lower() not in back:
            raise ConfigError(f"pipeline_parallel_schedule {name} is not priced by paraplan; use "
                              f"{', '.join(SCHEDULES.values())}")
        fields["schedule"] = back[name.lower()]
        fields["microbatch_size"] = num(par, "pipeline_parallel_microbatch_size", 1)
        parts = par.get("module_fqns_per_model_part")
        if parts:
            fields["stage_layers"] = tuple(sum(1 for n in part if str(n).startswith("layers.")) for part in parts)
            fields["virtual_stages"] = len(parts) // pp
        elif fields["schedule"] in ("interleaved", "zero-bubble") and "pipeline_parallel_layers_per_stage" in par:
            per_stage = num(par, "pipeline_parallel_layers_per_stage", 1)
    else:
        fields["microbatch_size"] = local
    model = data.get("model", {})
    from planner.zoo import ZOO

    zoo_name = next((z for z, nf in FLAVORS.items() if nf == (model.get("name"), model.get("flavor"))), None)
    spec = spec or (ZOO.get(zoo_name) if zoo_name else None)
    if per_stage is not None:
        if spec is None:
            raise ConfigError("pipeline_parallel_layers_per_stage needs the model's layer count; name a known "
                              "model.flavor or give --model")
        fields["virtual_stages"] = max(1, spec.layers // (per_stage * pp))
    try:
        strategy = Strategy(**fields)
    except ConfigError as exc:
        raise ConfigError(f"the torchtitan config does not make a strategy: {exc}") from None
    return Imported(engine="torchtitan", strategy=strategy, spec=spec, unknown=tuple(unknown))
