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
- context parallelism runs on paraplan's models and the Hugging Face types of CONTEXT_HF_TYPES
  (causal attention through transformers' attention interface);
- fp8 training and 4-bit QLoRA bases are planned, not run.
"""

from __future__ import annotations

import fnmatch

from costmodel.errors import ConfigError
from costmodel.spec import ModelSpec
from costmodel.strategy import Strategy
from costmodel.validate import strategy_problems
from planner.module_map import ModuleMap, placement_of
from planner.model_source import MOE_TYPES, module_map_of, text_config_at
from planner.plan import Plan, schedule_problems

SUPPORTED = ("Shard(0)", "Shard(1)", "Replicate()")
RUNNABLE_RUNTIMES = ("paraplan", "paraplan-compile")  # the runtime profiles that describe `paraplan run`


def tp_placement(placements: dict[str, dict[str, str]], name: str) -> str | None:
    """The tensor-parallel placement the plan gives parameter `name` (globs allowed), if any."""
    return placement_of(placements, name, "tp")


def layout_problems(mmap: ModuleMap, placements: dict[str, dict[str, str]], tp: int,
                    sequence_parallel: bool) -> list[str]:
    """Every reason the runtime cannot execute these placements on a mesh with this tp, for the
    module `mmap` describes (names as that module has them)."""
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
    if not mmap.groups:
        return problems + [f"tensor parallelism splits nn.Linear projections and the module's blocks have none the "
                           f"runtime can split ({', '.join(mmap.unsplittable) or 'no nn.Linear in a block'}); use --tp 1"]
    splittable = {f"{mmap.blocks}.*.{path}.{leaf}" for g in mmap.groups for path in (*g.column, g.row)
                  for leaf in ("weight", "bias")}
    for name in tp_named:
        generic = ".".join("*" if p.isdigit() else p for p in name.split("."))
        if generic not in splittable and name not in (mmap.embedding_weight, mmap.head_weight):
            problems.append(f"the runtime splits only block linears and the token embedding and head over tp, "
                            f"not {name}; drop its tp placement")
    for name in dict.fromkeys((mmap.embedding_weight, mmap.head_weight)):
        got = tp_placement(placements, name)
        if got not in (None, "Replicate()", "Shard(0)"):
            problems.append(f"{name} runs vocab-parallel (Shard(0)) or replicated over tp, not {got}")
    split_all = True
    for layer in range(mmap.layers):
        for g in mmap.groups:
            want = {p: "Shard(0)" for p in g.column} | {g.row: "Shard(1)"}
            got = {p: tp_placement(placements, mmap.block_param(layer, p)) or "Replicate()" for p in want}
            split = got == want
            if not (split or all(v == "Replicate()" for v in got.values())):
                shown = ", ".join(f"{p} {v}" for p, v in got.items())
                problems.append(f"layer {layer}'s {', '.join(want)} are split over tp as {shown}, which the runtime "
                                f"cannot run: it splits them as {', '.join(want.values())} or none of them")
                return problems
            split_all = split_all and split
    if sequence_parallel and (not split_all or mmap.unsplittable):
        problems.append("sequence parallelism needs every block linear tensor-parallel, and the plan replicates some; "
                        "re-plan with --no-sequence-parallel")
    return problems


def strategy_runtime_problems(spec: ModelSpec, s: Strategy, mode: str = "train") -> list[str]:
    """What `paraplan run` does not execute in a strategy, whatever its placements."""
    problems = schedule_problems(s.schedule.value, s.pp, s.num_microbatches)
    if spec.moe and s.tp > 1 and ((s.expert_tp or s.tp) != 1 or s.ep % s.tp):
        problems.append(f"{spec.name} is a mixture of experts: under tp({s.tp}) the runtime keeps experts whole and "
                        f"folds ep over the tp ranks (ep a multiple of tp, --expert-tp 1); re-plan with --expert-tp 1 "
                        f"--ep {s.tp * max(1, s.ep // s.tp)} or --tp 1")
    if s.schedule.value == "zero-bubble" and s.zero == 3 and s.dp * s.cp > 1:
        problems.append("the zero-bubble schedule under --zero 3 loses weight gradients across microbatches in torch's "
                        "FSDP2 (measured: 1e-4 off one process within 3 steps); use --zero 1 or 2 (torchtitan keeps "
                        "parameters gathered under pipelining too) or --schedule 1f1b")
    if s.tp > spec.kv_heads:
        problems.append(f"tp({s.tp}) is more than {spec.name}'s {spec.kv_heads} K/V heads: the runtime splits whole "
                        f"K/V heads (it does not copy them, as Megatron does); use --tp {spec.kv_heads} or less")
    return problems + list(planned_only(s, mode).values())


def model_planned_only(spec: ModelSpec, source: dict | None = None) -> list[str]:
    """What the cost model prices in a model and the runtime does not build: its plans are
    written (with a note) for prediction and export; `check` and `run` refuse them. `source`: the
    plan's (a user's module runs as it is: transformers' gpt-oss keeps its own biased experts, its
    DeepSeek its latent attention)."""
    if (source or {}).get("kind"):
        return []
    if spec.latent_attention:
        return [f"{spec.name} uses multi-head latent attention, which the cost model prices and the runtime does "
                "not build yet: its plans are for prediction and export"]
    if spec.moe and spec.bias:
        return [f"{spec.name}'s experts carry biases, which the cost model prices and the runtime's experts do not "
                "build yet: its plans are for prediction and export"]
    if spec.rope_scaling == "yarn":
        return [f"{spec.name} rotates by YaRN's scaled RoPE, which paraplan's built-in model does not (it builds "
                "Llama 3's): its plans are for prediction and export; train it from its Hugging Face config (hf:DIR)"]
    if spec.moe and spec.router_changes:
        return [f"{spec.name}'s router ({router_text(spec)}) is priced and exported, and paraplan's built-in model "
                "routes by a softmax top-k renormalised: its plans are for prediction and export; train it from its "
                "Hugging Face config (hf:DIR)"]
    return []


def router_text(spec: ModelSpec) -> str:
    """A mixture of experts' router in words: `sigmoid scores, top-8 within 4 of 8 groups, x2.5, a balancing bias`."""
    parts = [f"{spec.router_score} scores", f"top-{spec.experts_per_token}"
             + (f" within {spec.router_group_topk} of {spec.router_groups} groups" if spec.router_groups else "")
             + ("" if spec.router_renormalize else " not renormalised")]
    if spec.router_topk_scale != 1.0:
        parts.append(f"x{spec.router_topk_scale:g}")
    if spec.router_expert_bias:
        parts.append("a balancing bias")
    return ", ".join(parts)


def planned_only(s: Strategy, mode: str = "train") -> dict[str, str]:
    """Features the cost model prices and `paraplan run` does not execute yet, by the flag
    that asks for them. The search never picks them on its own; a plan that asks for one
    (the flag given) is written with a note, and `check` and `run` refuse it, as they agree."""
    out: dict[str, str] = {}
    if mode == "lora" and s.base_precision == "nf4":
        out["base_precision"] = "QLoRA's 4-bit base is planned but not run; re-plan with --base-precision bf16"
    if s.ep_overlap:
        out["ep_overlap"] = ("overlapping the all-to-alls with another microbatch (--ep-overlap) is priced, not run; "
                             "re-plan with --no-ep-overlap")
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
    problems += model_planned_only(spec, plan.source)
    if not plan.source and spec.attention_window and spec.attention_window < plan.seq_len:
        problems.append(f"paraplan's built-in model attends to the whole sequence, not a sliding window of "
                        f"{spec.attention_window} tokens; train {spec.name} from its Hugging Face config (hf:DIR) "
                        f"or with --seq-len {spec.attention_window}")
    problems += strategy_runtime_problems(spec, plan.strategy(), plan.mode)
    if plan.runtime == "paraplan-compile" and plan.schedule.get("name") == "zero-bubble":
        problems.append("the zero-bubble schedule splits each backward outside torch.compile's graphs, which torch "
                        "does not support; re-plan with --runtime paraplan or --schedule 1f1b")
    from_source = source_problems(plan)
    if from_source:
        return problems + from_source
    problems += layout_problems(module_map_of(plan.source, spec), plan.placements, mesh["tp"], plan.sequence_parallel)
    return problems


# Hugging Face decoders whose model forward is the embedding -> layers (rotary_emb's tables, per layer
# kind for Gemma 3; each layer kind's causal or sliding-window mask) -> final norm -> head, with what
# runtime.module.cut_stage repeats of their own forwards around that chain (Granite's multipliers,
# Cohere's logit scale, Gemma-2's soft-capping, Phi's, GPT-NeoX's and StarCoder2's embedding dropout,
# StarCoder's learned positions). tests/test_runtime_hf.py checks each against the model's own forward,
# with windows shorter than the sequence where the config has one.
PIPELINED_HF_TYPES = ("llama", "mistral", "qwen2", "qwen3", "phi3", "olmo2", "mixtral", "qwen2_moe", "qwen3_moe",
                      "olmoe", "deepseek_v2", "deepseek_v3", "glm4_moe", "phimoe", "gemma", "gemma2", "granite",
                      "granitemoe", "granitemoeshared", "cohere", "starcoder2", "phi", "gpt_neox", "stablelm",
                      "glm4", "olmo", "minimax_m2", "gpt_bigcode", "gemma3_text")
# Hugging Face decoders whose attention runs through transformers' attention interface as causal softmax
# attention, in a sliding window or not, its scores soft-capped or not (Gemma-2's): under context
# parallelism runtime.context_parallel attends each rank's chunks over the gathered keys.
# tests/test_runtime_context.py checks them against one process.
CONTEXT_HF_TYPES = ("llama", "mistral", "qwen2", "qwen3", "phi3", "olmo2", "granite", "gemma", "glm4", "stablelm",
                    "gpt_neox", "gemma2", "gemma3_text", "starcoder2", "mixtral", "qwen2_moe", "qwen3_moe", "olmoe",
                    "deepseek_v2", "deepseek_v3", "glm4_moe")
# mixtures of experts run under tensor parallelism: attention split over tp, the residual stream
# sequence-parallel, and each tp rank's router and experts (over ep, a multiple of tp: experts whole)
# on its own tokens, the router's and norm's gradients summed over tp (runtime.tensor_parallel.LocalShard),
# as paraplan's own mixture of experts runs; not those with a shared expert (split as a dense MLP of
# (tokens, hidden) rows inside the block, which sequence parallelism's row shards do not fit yet)
MOE_TP_HF_TYPES = ("mixtral", "qwen3_moe", "granitemoe")
# mixtures of experts whose experts modules runtime.expert_parallel splits (transformers' fused layout:
# gate_up_proj (experts, 2 ffn, hidden), down_proj (experts, hidden, ffn), called with the router's top-k);
# not gpt-oss (biased experts) nor Llama 4 (transposed, and its forward runs every token through every expert)
MOE_HF_TYPES = ("mixtral", "qwen2_moe", "qwen3_moe", "deepseek_v2", "deepseek_v3", "glm4_moe", "olmoe", "phimoe",
                "granitemoe", "granitemoeshared", "minimax_m2")


def source_problems(plan: Plan) -> list[str]:
    """What `paraplan run` does not execute on a user's module (hf: or py:) yet."""
    if not plan.source.get("kind"):
        return []
    problems = source_strategy_problems(plan.source, plan.strategy(), plan.mode)
    if plan.runtime == "paraplan-compile":
        problems.append("the compiled runtime runs paraplan's built-in models only; re-plan with --runtime paraplan")
    return problems


def expert_parallel_runs(source: dict, hf_type: str | None = None) -> bool:
    """Whether `paraplan run` splits the experts of the module of `source` over ep: paraplan's own
    mixture of experts and transformers' experts modules of MOE_HF_TYPES (not a `py:` module's, nor
    gpt-oss's biased ones). `hf_type`: a Hugging Face config's model_type where the caller has read it."""
    kind = source.get("kind")
    if kind == "hf":
        return (hf_type or _hf_fields(source["path"], "model_type")[0]) in MOE_HF_TYPES
    return kind != "py"


def source_strategy_problems(source: dict, s: Strategy, mode: str = "train") -> list[str]:
    """What the runtime does not execute of strategy `s` on the module of `source` (the search
    drops such candidates; check and run refuse them)."""
    kind = source.get("kind")
    problems = []
    if kind and mode == "lora":
        paths = ModuleMap.from_dict(source["map"]).lora_paths() if "map" in source else {}
        missing = [t for t in s.lora_targets if t not in paths]
        if missing:
            kept = ",".join(t for t in s.lora_targets if t in paths)
            problems.append(f"LoRA target{'s' if len(missing) > 1 else ''} {', '.join(missing)}: the module's blocks "
                            f"have no linear of {'their' if len(missing) > 1 else 'its'} own that the runtime wraps "
                            f"(it finds {', '.join(paths) or 'none'}; a fused projection is not cut into its parts); "
                            + (f"re-plan with --lora-targets {kept or ','.join(paths)}" if kept or paths
                               else "plan full fine-tuning"))
    if s.ep > 1 and kind == "py":
        problems.append("expert parallelism runs on paraplan's built-in mixture of experts and transformers' experts "
                        "modules (Mixtral, Qwen2-MoE, Qwen3-MoE, ...) so far; re-plan with --ep 1")
    # the config read once (the search asks this of every candidate)
    hf_type = _hf_fields(source["path"], "model_type")[0] if kind == "hf" else None
    if kind == "hf" and s.tp > 1 and hf_type in MOE_TYPES and hf_type not in MOE_TP_HF_TYPES:
        problems.append(f"tensor parallelism on a Hugging Face {hf_type} is not run yet (it runs on the mixtures of "
                        f"experts without shared experts: {', '.join(MOE_TP_HF_TYPES)}); re-plan with --tp 1")
    if kind == "hf" and s.ep > 1 and hf_type in MOE_TYPES and not expert_parallel_runs(source, hf_type):
        problems.append(f"expert parallelism on a Hugging Face {hf_type or 'model'}'s experts is not run yet (it splits "
                        f"the experts modules of {', '.join(MOE_HF_TYPES)}); re-plan with --ep 1")
    if s.cp > 1 and kind == "py":
        problems.append("context parallelism on a py: module is not run (its attention is its own, not one the runtime "
                        "can gather over cp); re-plan with --cp 1")
    if s.sequence_parallel and s.tp > 1 and kind == "py":
        problems.append("sequence parallelism on a py: module is not run (its blocks may size themselves from "
                        "their sequence-sharded input); re-plan with --no-sequence-parallel")
    if kind == "hf":  # the types each runs on, as the runtime and its tests know them
        for degree, flag, what, types, how in (
                (s.cp, "cp", "context parallelism on", CONTEXT_HF_TYPES, "it runs the causal attention of"),
                (s.pp, "pp", "pipelining", PIPELINED_HF_TYPES, "stages are driven for")):
            if degree > 1 and hf_type not in types:
                problems.append(f"{what} a Hugging Face {hf_type or 'model'} is not run yet ({how} "
                                f"{', '.join(types)}); re-plan with --{flag} 1")
    return problems


def _hf_fields(path: str, *keys: str) -> tuple:
    """Fields of a Hugging Face config.json (None where absent or unreadable): a multimodal
    config's language model's (its text_config), as the runtime builds that alone."""
    data = text_config_at(path) or {}
    return tuple(data.get(k) for k in keys)


def parameter_names(plan: Plan) -> list[str]:
    """The parameter names of the module the runtime builds (meta device: nothing allocated)."""
    import torch

    from planner.model_source import build_source_module

    with torch.device("meta"):
        module, _ = build_source_module(plan.source, plan.spec)
        return [name for name, _ in module.named_parameters(remove_duplicate=False)]


def plan_problems(plan: Plan, cluster) -> tuple[list[str], dict]:
    """(problems, facts): every reason the plan cannot run on `cluster` (a costmodel Cluster),
    and what was measured on the way. `paraplan check` prints it; `paraplan run` refuses on it."""
    from planner.pricing import price_step

    problems: list[str] = []
    facts: dict = {"processes": plan.world_size, "cluster_gpus": cluster.world_size}
    if plan.mode == "inference" and plan.world_size <= cluster.world_size:
        pass  # a deployment sized for its rate may leave GPUs of the cluster free
    elif plan.mode == "inference":
        problems.append(f"the serving plan deploys {plan.world_size} GPUs but {cluster.name} has {cluster.world_size}; "
                        f"plan again for this cluster (`paraplan plan --mode inference ... --cluster {cluster.name}`)")
    elif plan.world_size != cluster.world_size:
        problems.append(f"the plan's mesh has {plan.world_size} processes but {cluster.name} has "
                        f"{cluster.world_size} GPUs; re-plan with `paraplan replan --gpus {cluster.world_size}`")
    spec, strategy = plan.spec, plan.strategy()
    # a serving plan's replica is checked as it is served (its heads, KV heads and experts over
    # tp, its layers over pp), not as training would split it (a mixture of experts trained
    # under tp runs sequence parallel; a served one has no sequence to split)
    layout = (_serving_layout(plan, spec) if plan.mode == "inference"
              else strategy_problems(spec, strategy, plan.world_size))
    problems += layout
    if not layout and plan.mode == "inference":
        problems += _serving_memory(plan, spec, cluster, facts)
    elif not layout:
        try:
            try:
                result = price_step(spec, strategy, cluster, plan.placements, plan.source)
            except ConfigError:
                if not layout_problems(module_map_of(plan.source, spec), plan.placements, strategy.tp,
                                       strategy.sequence_parallel):
                    raise
                # placements the runtime has no rule for (said below) cannot be priced on the graph
                from costmodel import predict

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
    if plan.mode == "inference":  # served (export --to vllm, generate), not run: what serving needs is above
        facts["serve_with"] = "paraplan export PLAN --to vllm"
        return [" ".join(p.split()) for p in dict.fromkeys(problems)], facts
    problems += runnable_problems(plan)
    names = parameter_names(plan)
    for pattern in plan.placements:
        if not any(fnmatch.fnmatchcase(n, pattern) for n in names):
            problems.append(f"placement '{pattern}' matches no parameter of {spec.name} "
                            f"(names look like {names[min(2, len(names) - 1)]})")
    return [" ".join(p.split()) for p in dict.fromkeys(problems)], facts


def _serving_layout(plan: Plan, spec: ModelSpec) -> list[str]:
    """Why a serving plan's replica cannot serve the model (costmodel.serving.layout_problems)."""
    from costmodel.serving import layout_problems as serving_layout_problems, speculation_problems
    from planner.serving_plan import serving_setup

    try:
        setup = serving_setup(plan, "the serving plan")
    except ConfigError as exc:
        return [str(exc)]
    layout = setup.layout
    return (serving_layout_problems(spec, layout.tp, layout.pp, layout.expert_parallel)
            + speculation_problems(layout.pp, setup.request.speculative))


def _serving_memory(plan: Plan, spec: ModelSpec, cluster, facts: dict) -> list[str]:
    """A serving plan's section read back (planner.serving_plan) and its weights and KV cache
    against the GPU (costmodel.serving)."""
    from costmodel.serving import kv_budget
    from planner.serving_plan import serving_setup

    try:
        req = serving_setup(plan, "the serving plan").request
    except ConfigError as exc:
        return [str(exc)]
    budget = kv_budget(spec, cluster, req, plan.mesh["tp"], plan.mesh["pp"])
    batch = plan.schedule["microbatch_size"]
    facts.update(weights_gib_per_gpu=round(budget.weights_gib, 2), max_batch=budget.max_batch_paged)
    if batch > budget.max_batch_paged:
        return [f"batch {batch} needs more KV cache than the {budget.kv_gib:.1f} GiB per GPU left after "
                f"{budget.weights_gib:.1f} GiB of weights (at most {budget.max_batch_paged} sequences); lower --batch"]
    return []
