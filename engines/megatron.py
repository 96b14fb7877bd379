"""Megatron-LM (core 0.20): a plan as `pretrain_gpt.py` arguments, and such arguments read back.

Megatron's distributed optimizer is ZeRO-1 (sharded optimizer state; ZeRO-2's gradient
sharding is what its reduce-scatter already does per bucket); full sharding is
`--use-torch-fsdp2`, which Megatron refuses with pipelining. Interleaving is
`--num-layers-per-virtual-pipeline-stage`; a cut whose first or last stage differs from the
even middle is `--decoder-first/last-pipeline-num-layers`.
"""

from __future__ import annotations

import re
import shlex

from costmodel.errors import ConfigError
from costmodel.spec import ModelSpec
from costmodel.strategy import Strategy
from engines.common import Imported, positive_int, stage_layers, training_plan, uniform_recompute
from planner.plan import Plan

VALUED = {"--tensor-model-parallel-size", "--pipeline-model-parallel-size", "--num-layers-per-virtual-pipeline-stage",
          "--context-parallel-size", "--expert-model-parallel-size", "--recompute-granularity", "--recompute-method",
          "--recompute-num-layers", "--micro-batch-size", "--global-batch-size", "--seq-length",
          "--decoder-first-pipeline-num-layers", "--decoder-last-pipeline-num-layers", "--num-layers", "--hidden-size",
          "--ffn-hidden-size", "--num-attention-heads", "--num-query-groups", "--max-position-embeddings",
          "--position-embedding-type", "--normalization", "--vocab-size", "--attention-backend",
          "--num-virtual-stages-per-pipeline-rank", "--kv-channels",
          # mixture of experts (Megatron-Core's MoE arguments) and multi-head latent attention
          "--num-experts", "--moe-router-topk", "--moe-ffn-hidden-size", "--expert-tensor-parallel-size",
          "--moe-shared-expert-intermediate-size", "--moe-layer-freq", "--moe-expert-capacity-factor",
          "--moe-token-dispatcher-type", "--q-lora-rank", "--kv-lora-rank", "--qk-head-dim", "--qk-pos-emb-head-dim",
          "--v-head-dim", "--rotary-base",
          # RoPE scaling (Llama 3's; YaRN's in latent attention) and the router's kind
          "--rope-scaling-factor", "--rotary-scaling-factor", "--mscale", "--mscale-all-dim",
          "--moe-router-score-function", "--moe-router-num-groups", "--moe-router-group-topk",
          "--moe-router-topk-scaling-factor"}
SWITCHES = {"--sequence-parallel", "--use-distributed-optimizer", "--overlap-grad-reduce", "--overlap-param-gather",
            "--bf16", "--fp16", "--group-query-attention", "--swiglu", "--untie-embeddings-and-output-weights",
            "--disable-bias-linear", "--use-flash-attn", "--use-torch-fsdp2", "--moe-grouped-gemm",
            "--overlap-moe-expert-parallel-comm", "--moe-router-force-load-balancing", "--multi-latent-attention",
            "--qk-layernorm", "--use-rope-scaling", "--moe-router-pre-softmax", "--moe-router-enable-expert-bias"}
MLA_ORIGINAL_POSITIONS = 4096  # Megatron-Core's MLATransformerConfig.original_max_position_embeddings (no flag)


def export(plan: Plan) -> list[str]:
    """The plan as Megatron-LM arguments (model shape, parallelism, batch, precision)."""
    training_plan(plan, "Megatron-LM", experts=True, latent=True)
    spec, mesh, sched = plan.spec, plan.mesh, plan.schedule
    if plan.zero == 3 and mesh["pp"] > 1:
        raise ConfigError("Megatron-LM's FSDP (--use-torch-fsdp2) does not run with pipeline parallelism; "
                          "re-plan with --zero 1 or --pp 1")
    if mesh["dp_replicate"] > 1 and mesh["dp_shard"] > 1:
        raise ConfigError("Megatron-LM shards over the whole data-parallel group, not in HSDP groups; re-plan "
                          "without --shard-group")
    recompute = uniform_recompute(plan, "Megatron-LM")
    args = ["--num-layers", spec.layers, "--hidden-size", spec.hidden, "--ffn-hidden-size", spec.ffn_hidden,
            "--num-attention-heads", spec.heads]
    if spec.activation.value == "geglu":
        raise ConfigError("Megatron-LM's arguments have no GELU-gated MLP (only --swiglu); export this model to "
                          "torchtitan or train it with paraplan run")
    if spec.latent_attention:  # Megatron-Core's MLA: q_head_dim = qk_head_dim + qk_pos_emb_head_dim; its
        # --qk-layernorm is the latent's RMSNorms (DeepSeek's kv_a_layernorm, and q_a_layernorm with a q rank)
        args += ["--multi-latent-attention", "--kv-lora-rank", spec.kv_lora_rank,
                 "--qk-head-dim", spec.head_dim - spec.qk_rope_head_dim, "--qk-pos-emb-head-dim", spec.qk_rope_head_dim,
                 "--v-head-dim", spec.v_head_dim] + (["--q-lora-rank", spec.q_lora_rank] if spec.q_lora_rank else [])
        args.append("--qk-layernorm")
    elif spec.q_dim != spec.hidden:
        args += ["--kv-channels", spec.head_dim]
    if spec.kv_heads != spec.heads:
        args += ["--group-query-attention", "--num-query-groups", spec.kv_heads]
    args += ["--max-position-embeddings", spec.seq_len if spec.position.value == "learned" else max(spec.seq_len,
                                                                                                    plan.seq_len),
             "--position-embedding-type", {"learned": "learned_absolute"}.get(spec.position.value, spec.position.value),
             "--normalization", "LayerNorm" if spec.norm.value == "layernorm" else "RMSNorm",
             "--vocab-size", spec.vocab]
    if spec.position.value == "rope" and spec.rope_theta:  # Megatron-LM's default base is 10,000 (an int flag)
        args += ["--rotary-base", round(spec.rope_theta)]
    if spec.rope_scaling == "llama3":  # Llama 3.1's; Megatron-LM fixes its low/high frequency factors at 1 and 4
        args += ["--use-rope-scaling", "--rope-scaling-factor", spec.rope_factor]
    elif spec.rope_scaling == "yarn" and spec.latent_attention:  # MLA rotates by YaRN over 4,096 positions
        args += ["--rotary-scaling-factor", spec.rope_factor]
        if spec.rope_mscale:
            args += ["--mscale", spec.rope_mscale]
        if spec.rope_mscale_all_dim:
            args += ["--mscale-all-dim", spec.rope_mscale_all_dim]
    if spec.qk_norm and not spec.latent_attention:  # Megatron-Core's q_layernorm / k_layernorm on each head
        args.append("--qk-layernorm")
    if spec.activation.value == "swiglu":
        args.append("--swiglu")
    if not spec.tied_embeddings:
        args.append("--untie-embeddings-and-output-weights")
    if not spec.bias:
        args.append("--disable-bias-linear")
    args += ["--tensor-model-parallel-size", mesh["tp"], "--pipeline-model-parallel-size", mesh["pp"],
             "--context-parallel-size", mesh["cp"]]
    if spec.moe:  # Megatron-Core's MoE arguments; its alltoall dispatcher and grouped GEMM, dropless
        args += ["--num-experts", spec.experts, "--moe-router-topk", spec.experts_per_token,
                 "--moe-ffn-hidden-size", spec.expert_ffn_hidden,
                 "--expert-model-parallel-size", plan.experts.get("ep", 1),
                 "--expert-tensor-parallel-size", plan.experts.get("expert_tp", mesh["tp"]),
                 "--moe-token-dispatcher-type", "alltoall", "--moe-grouped-gemm"]
        if spec.moe_every != 1:  # the pattern as a list, one 0/1 per layer
            args += ["--moe-layer-freq", "[" + ",".join("1" if spec.is_moe_layer(i) else "0"
                                                        for i in range(spec.layers)) + "]"]
        elif spec.dense_layers:
            args += ["--moe-layer-freq", f"([0]*{spec.dense_layers}+[1]*{spec.layers - spec.dense_layers})"]
        if spec.shared_expert_ffn_hidden:
            args += ["--moe-shared-expert-intermediate-size", spec.shared_expert_ffn_hidden]
        if spec.capacity_factor:
            args += ["--moe-expert-capacity-factor", spec.capacity_factor]
        if plan.experts.get("overlap"):
            args.append("--overlap-moe-expert-parallel-comm")
        args += _router_args(spec)
    if plan.sequence_parallel and mesh["tp"] > 1:
        args.append("--sequence-parallel")
    if mesh["pp"] > 1:
        counts = stage_layers(plan)
        if sched["name"] == "interleaved":
            if len(set(counts)) > 1:
                raise ConfigError("Megatron-LM interleaves equal virtual stages only; this plan's cut is uneven: "
                                  "re-plan with --schedule 1f1b")
            args += ["--num-layers-per-virtual-pipeline-stage", counts[0]]
        elif sched["name"] in ("gpipe", "zero-bubble"):
            raise ConfigError(f"Megatron-LM runs 1F1B (or interleaved) pipelines, not {sched['name']}; re-plan with "
                              "--schedule 1f1b")
        elif len(set(counts)) > 1:
            middle = counts[1:-1]
            if len(set(middle)) > 1:
                raise ConfigError(f"Megatron-LM cuts the middle stages evenly; this plan's cut is {counts}: re-plan "
                                  "with a --pp that divides the layers")
            even = middle[0] if middle else None
            if even is None or counts[0] != even:
                args += ["--decoder-first-pipeline-num-layers", counts[0]]
            if even is None or counts[-1] != even:
                args += ["--decoder-last-pipeline-num-layers", counts[-1]]
    if plan.zero == 3:
        args.append("--use-torch-fsdp2")
    elif plan.zero in (1, 2):
        args += ["--use-distributed-optimizer", "--overlap-grad-reduce", "--overlap-param-gather"]
    elif mesh["dp_replicate"] * mesh["dp_shard"] > 1:
        args.append("--overlap-grad-reduce")
    if recompute == "full":
        args += ["--recompute-granularity", "full", "--recompute-method", "uniform", "--recompute-num-layers", 1]
    elif recompute == "selective":
        args += ["--recompute-granularity", "selective"]
    args += ["--micro-batch-size", sched["microbatch_size"], "--global-batch-size", plan.global_batch,
             "--seq-length", plan.seq_len]
    if plan.precision in ("bf16", "fp16"):
        args.append(f"--{plan.precision}")
    elif plan.precision == "fp8":
        raise ConfigError("fp8 in Megatron-LM needs Transformer Engine's --fp8-format; export a bf16 plan")
    if plan.flash_attention:
        args += ["--attention-backend", "flash"]
    return [str(a) for a in args]


def _router_args(spec: ModelSpec) -> list:
    """Megatron-Core's router flags for the spec's router: softmax over the top-k logits (renormalised)
    by default, over all experts first without --moe-router-pre-softmax's renormalisation; sigmoid
    scores (renormalised over the top-k), expert groups, the weights' scale and the balancing bias."""
    args: list = []
    if spec.router_score == "sigmoid":
        args += ["--moe-router-score-function", "sigmoid"]
    elif not spec.router_renormalize:
        args.append("--moe-router-pre-softmax")
    if spec.router_groups:
        args += ["--moe-router-num-groups", spec.router_groups, "--moe-router-group-topk", spec.router_group_topk]
    if spec.router_topk_scale != 1.0:
        args += ["--moe-router-topk-scaling-factor", spec.router_topk_scale]
    if spec.router_expert_bias:
        args.append("--moe-router-enable-expert-bias")
    return args


def export_notes(plan: Plan) -> list[str]:
    """What of the model the arguments do not carry, to say beside them."""
    spec, notes = plan.spec, []
    if spec.rope_scaling == "yarn" and not spec.latent_attention:
        notes.append(f"{spec.name} rotates by YaRN (factor {spec.rope_factor:g} over {spec.rope_original_positions} "
                     "positions), which Megatron-LM's arguments give for latent attention only: these arguments "
                     "rotate without it")
    elif spec.rope_scaling == "yarn" and spec.rope_original_positions != MLA_ORIGINAL_POSITIONS:
        notes.append(f"{spec.name}'s YaRN scaling is over {spec.rope_original_positions} positions; Megatron-Core's "
                     f"latent attention takes {MLA_ORIGINAL_POSITIONS} (MLATransformerConfig, no flag)")
    if spec.moe and spec.router_score == "sigmoid" and not spec.router_renormalize:
        notes.append(f"{spec.name}'s sigmoid router does not renormalise its top-k weights; Megatron-Core's does")
    if spec.moe and spec.router_score == "sparsemixer":
        notes.append(f"{spec.name} routes by SparseMixer (Phi-3.5-MoE's), which Megatron-Core has no flag for: "
                     "these arguments route by a softmax top-k")
    return notes


def export_text(plan: Plan) -> str:
    args = export(plan)
    lines, i = [], 0
    while i < len(args):  # one flag (and its value) per line
        if i + 1 < len(args) and not args[i + 1].startswith("--"):
            lines.append(f"{args[i]} {shlex.quote(args[i + 1])}")
            i += 2
        else:
            lines.append(args[i])
            i += 1
    return " \\\n".join(lines) + "\n"


def _float(values: dict, name: str, default: float) -> float:
    try:
        return float(values.get(name, default))
    except ValueError:
        raise ConfigError(f"the Megatron-LM arguments' {name} {values[name]!r} is not a number") from None


def _rope_scaling_fields(values: dict, switches: set) -> dict:
    """RoPE scaling as ModelSpec fields: --use-rope-scaling (Llama 3's, over 8,192 positions) or, in latent
    attention, YaRN where --rotary-scaling-factor exceeds 1 (over 4,096 positions)."""
    if "--use-rope-scaling" in switches:
        return {"rope_scaling": "llama3", "rope_factor": _float(values, "--rope-scaling-factor", 8.0),
                "rope_original_positions": 8192}
    factor = _float(values, "--rotary-scaling-factor", 1.0)
    if "--multi-latent-attention" in switches and factor > 1:
        return {"rope_scaling": "yarn", "rope_factor": factor, "rope_original_positions": MLA_ORIGINAL_POSITIONS,
                "rope_mscale": _float(values, "--mscale", 1.0), "rope_mscale_all_dim": _float(values, "--mscale-all-dim", 0.0)}
    return {}


def _router_fields(values: dict, switches: set, num) -> dict:
    """The router flags as ModelSpec fields ({} for Megatron-Core's default: softmax top-k renormalised)."""
    if "--num-experts" not in values:
        return {}
    score = values.get("--moe-router-score-function", "softmax")
    if score not in ("softmax", "sigmoid"):
        raise ConfigError(f"--moe-router-score-function {score}: Megatron-Core takes softmax or sigmoid")
    groups = num("--moe-router-num-groups", 0)
    return {"router_score": score, "router_renormalize": score == "sigmoid" or "--moe-router-pre-softmax" not in switches,
            "router_groups": groups if groups > 1 else 0,
            "router_group_topk": num("--moe-router-group-topk", 1) if groups > 1 else 0,
            "router_topk_scale": _float(values, "--moe-router-topk-scaling-factor", 1.0),
            "router_expert_bias": "--moe-router-enable-expert-bias" in switches}


def _attention_fields(values: dict, switches: set, num) -> dict:
    """Head width and multi-head latent attention of the arguments, as ModelSpec fields."""
    if "--multi-latent-attention" not in switches:
        return {"head_dim": num("--kv-channels")} if "--kv-channels" in values else {}
    rope = num("--qk-pos-emb-head-dim", 64)
    return {"kv_lora_rank": num("--kv-lora-rank", 512), "q_lora_rank": num("--q-lora-rank", 0), "head_dim": num("--qk-head-dim", 128) + rope, "qk_rope_head_dim": rope,
            "v_head_dim": num("--v-head-dim", 128)}


def _expert_fields(values: dict, num, layers: int) -> dict:
    """Megatron-Core's MoE arguments as ModelSpec fields ({} for a dense model)."""
    if "--num-experts" not in values:
        return {}
    fields = {"experts": num("--num-experts"), "experts_per_token": num("--moe-router-topk", 2),
              "expert_ffn_hidden": num("--moe-ffn-hidden-size", num("--ffn-hidden-size", 0)),
              "shared_expert_ffn_hidden": num("--moe-shared-expert-intermediate-size", 0)}
    if "--moe-expert-capacity-factor" in values:
        try:
            fields["capacity_factor"] = float(values["--moe-expert-capacity-factor"])
        except ValueError:
            raise ConfigError(f"--moe-expert-capacity-factor must be a number, got "
                              f"{values['--moe-expert-capacity-factor']!r}") from None
    fields.update(_layer_pattern(values.get("--moe-layer-freq", "1"), layers))
    return fields


def _layer_pattern(text: str, layers: int) -> dict:
    """--moe-layer-freq as dense_layers / moe_every: 1 (every layer), a list of 0/1 per layer or
    Megatron's ([0]*k+[1]*n); the patterns the spec holds (dense first, or every k-th layer)."""
    text = text.strip().replace(" ", "")
    if text == "1":
        return {}
    match = re.fullmatch(r"\(?\[0\]\*(\d+)\+\[1\]\*(\d+)\)?", text)
    if match:
        flags = [0] * int(match.group(1)) + [1] * int(match.group(2))
    elif re.fullmatch(r"\[[01](,[01])*\]", text):
        flags = [int(c) for c in text[1:-1].split(",")]
    else:
        raise ConfigError(f"--moe-layer-freq {text}: paraplan reads 1, a list of 0/1 per layer or ([0]*k+[1]*n); "
                          "give the list")
    if len(flags) != layers:
        raise ConfigError(f"--moe-layer-freq gives {len(flags)} layers, --num-layers {layers}")
    dense = flags.index(1) if 1 in flags else layers
    if flags == [0] * dense + [1] * (layers - dense):
        return {"dense_layers": dense}
    every = next((k for k in range(2, layers + 1) if flags == [int((i + 1) % k == 0) for i in range(layers)]), None)
    if every is None:
        raise ConfigError("--moe-layer-freq: experts on dense-first layers or every k-th layer are what paraplan "
                          "prices; this pattern is neither")
    return {"moe_every": every}


def import_(argv: list[str], *, world_size: int) -> Imported:
    """Megatron-LM arguments on `world_size` GPUs -> the strategy (and the model) they run."""
    values: dict[str, str] = {}
    switches: set[str] = set()
    unknown: list[str] = []
    i = 0
    while i < len(argv):
        flag = argv[i].split("=", 1)
        name = flag[0].replace("_", "-")
        if name in VALUED:
            if len(flag) == 2:
                values[name] = flag[1]
            elif i + 1 < len(argv):
                values[name] = argv[i + 1]
                i += 1
            else:
                raise ConfigError(f"Megatron-LM flag {name} needs a value")
        elif name in SWITCHES:
            switches.add(name)
        elif name.startswith("--"):
            has_value = len(flag) == 2 or (i + 1 < len(argv) and not argv[i + 1].startswith("--"))
            unknown.append(argv[i] + (f" {argv[i + 1]}" if has_value and len(flag) == 1 else ""))
            i += 1 if has_value and len(flag) == 1 else 0
        else:
            unknown.append(argv[i])
        i += 1

    def num(name: str, default: int | None = None) -> int:
        if name not in values:
            if default is None:
                raise ConfigError(f"the Megatron-LM arguments lack {name}; it is needed to price the run")
            return default
        return positive_int(values[name], name, "Megatron-LM")

    spec = None
    if "--num-experts" not in values and any(f in values for f in ("--moe-router-topk", "--moe-ffn-hidden-size")):
        raise ConfigError("the Megatron-LM arguments give MoE settings without --num-experts; add it (or drop them)")
    if "--num-layers" in values:
        heads = num("--num-attention-heads")
        position = values.get("--position-embedding-type", "learned_absolute")
        spec = ModelSpec(
            name="megatron-model", layers=num("--num-layers"), hidden=num("--hidden-size"), heads=heads,
            kv_heads=num("--num-query-groups", heads) if "--group-query-attention" in switches else heads,
            ffn_hidden=num("--ffn-hidden-size", 0), vocab=num("--vocab-size", 51200),
            seq_len=num("--max-position-embeddings", num("--seq-length", 2048)),
            activation="swiglu" if "--swiglu" in switches else "gelu",
            norm="rmsnorm" if values.get("--normalization", "LayerNorm") == "RMSNorm" else "layernorm",
            position={"rope": "rope", "none": "none"}.get(position, "learned"),
            tied_embeddings="--untie-embeddings-and-output-weights" not in switches,
            bias="--disable-bias-linear" not in switches, dropout=True,
            rope_theta=_float(values, "--rotary-base", 0.0),  # 0: Megatron-LM's default base, 10,000
            qk_norm="--qk-layernorm" in switches and "--multi-latent-attention" not in switches,
            **_rope_scaling_fields(values, switches), **_router_fields(values, switches, num),
            **_attention_fields(values, switches, num), **_expert_fields(values, num, num("--num-layers")))
    elif "--num-experts" in values or "--multi-latent-attention" in switches:
        raise ConfigError("the Megatron-LM arguments describe experts or latent attention but not the model's size; "
                          "add --num-layers, --hidden-size and --num-attention-heads")
    tp, pp, cp = num("--tensor-model-parallel-size", 1), num("--pipeline-model-parallel-size", 1), \
        num("--context-parallel-size", 1)
    ep = num("--expert-model-parallel-size", 1)
    if ep > 1 and "--num-experts" not in values:
        raise ConfigError("--expert-model-parallel-size > 1 needs --num-experts (a mixture-of-experts model)")
    if world_size % (tp * pp * cp):
        raise ConfigError(f"tp {tp} x pp {pp} x cp {cp} does not divide the {world_size} GPUs of the cluster")
    dp = world_size // (tp * pp * cp)
    zero = 3 if "--use-torch-fsdp2" in switches else (1 if "--use-distributed-optimizer" in switches else 0)
    granularity = values.get("--recompute-granularity")
    if granularity not in (None, "full", "selective"):
        raise ConfigError(f"--recompute-granularity {granularity}: Megatron-LM takes full or selective")
    if granularity == "full" and values.get("--recompute-method", "uniform") == "block":
        unknown.append(f"--recompute-method block --recompute-num-layers {values.get('--recompute-num-layers')} "
                       "(priced as full recomputation of every layer)")
    fields: dict = dict(tp=tp, pp=pp, cp=cp, dp=dp, zero=zero, shard_group=dp if zero else 1,
                        sequence_parallel="--sequence-parallel" in switches and tp > 1,
                        recompute=granularity or "none", microbatch_size=num("--micro-batch-size", 1),
                        global_batch=num("--global-batch-size", num("--micro-batch-size", 1) * dp),
                        seq_len=num("--seq-length"),
                        precision="bf16" if "--bf16" in switches else "fp16" if "--fp16" in switches else "fp32",
                        flash_attention=values.get("--attention-backend", "flash" if "--use-flash-attn" in switches
                                                   else "auto") in ("flash", "auto"))
    if "--num-experts" in values:
        fields.update(ep=ep, ep_overlap="--overlap-moe-expert-parallel-comm" in switches)
        if "--expert-tensor-parallel-size" in values and num("--expert-tensor-parallel-size") != tp:
            fields["expert_tp"] = num("--expert-tensor-parallel-size")
        if "--moe-router-force-load-balancing" in switches:
            fields["expert_load_cv"] = 0.0
        dispatcher = values.get("--moe-token-dispatcher-type", "allgather")
        if dispatcher != "alltoall":
            unknown.append(f"--moe-token-dispatcher-type {dispatcher} (priced as the alltoall dispatcher)")
    if pp > 1:
        layers = spec.layers if spec else None
        if "--num-layers-per-virtual-pipeline-stage" in values:
            if layers is None:
                raise ConfigError("--num-layers-per-virtual-pipeline-stage needs --num-layers")
            fields.update(schedule="interleaved",
                          virtual_stages=layers // (num("--num-layers-per-virtual-pipeline-stage") * pp))
        elif "--num-virtual-stages-per-pipeline-rank" in values:
            fields.update(schedule="interleaved", virtual_stages=num("--num-virtual-stages-per-pipeline-rank"))
        first, last = values.get("--decoder-first-pipeline-num-layers"), values.get("--decoder-last-pipeline-num-layers")
        if (first or last) and layers is not None:
            f = positive_int(first, "--decoder-first-pipeline-num-layers", "Megatron-LM") if first else None
            l_ = positive_int(last, "--decoder-last-pipeline-num-layers", "Megatron-LM") if last else None
            middle_count = pp - (f is not None) - (l_ is not None)
            rest = layers - (f or 0) - (l_ or 0)
            if middle_count < 0 or (middle_count and rest % middle_count) or (not middle_count and rest):
                raise ConfigError(f"--decoder-first/last-pipeline-num-layers leave {rest} layers for {middle_count} "
                                  "middle stages, which do not split evenly")
            mid = [rest // middle_count] * middle_count if middle_count else []
            fields["stage_layers"] = tuple(([f] if f is not None else []) + mid + ([l_] if l_ is not None else []))
    try:
        strategy = Strategy(**fields)
    except ConfigError as exc:
        raise ConfigError(f"the Megatron-LM arguments do not make a strategy: {exc}") from None
    return Imported(engine="megatron", strategy=strategy, spec=spec, unknown=tuple(unknown))
