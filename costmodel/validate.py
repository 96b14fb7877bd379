"""Checks that a strategy can run a model on a cluster, each failing with the arithmetic.

Style after torchtitan's ParallelDims: `pp(2) * dp(4) * cp(1) * tp(8) = 64 != world size 32`.
"""

from __future__ import annotations

from costmodel.errors import ConfigError
from costmodel.lora import target_shapes
from costmodel.moe import expert_layout_problems
from costmodel.spec import ModelSpec
from costmodel.strategy import Schedule, Strategy


def strategy_problems(spec: ModelSpec, strategy: Strategy, world_size: int) -> list[str]:
    """Every reason the strategy cannot run the model on `world_size` GPUs (empty: it can)."""
    s = strategy
    problems: list[str] = []
    # the model's own first: a target it does not have fails every layout alike
    absent = [t for t in s.lora_targets if t not in target_shapes(spec) and t not in ("up", "gate", "down")]
    if absent:
        have = ",".join(t for t in target_shapes(spec) if t not in ("up", "gate", "down"))
        problems.append(f"--lora-targets {','.join(absent)}: {spec.name}'s attention has no such projection"
                        + (" (multi-head latent attention: K and V come from one latent)" if spec.latent_attention else "")
                        + f"; use some of {have}")
    if s.world_size != world_size:
        problems.append(
            f"pp({s.pp}) * dp({s.dp}) * cp({s.cp}) * tp({s.tp}) = {s.world_size} != world size {world_size}; "
            "choose degrees whose product is the GPU count"
        )
    if spec.heads % s.tp:
        problems.append(f"tp({s.tp}) does not divide heads({spec.heads}); use a tp that divides {spec.heads}")
    if s.tp > spec.kv_heads and s.tp % spec.kv_heads:
        problems.append(
            f"tp({s.tp}) and kv_heads({spec.kv_heads}) do not nest: tp must divide kv_heads or be a multiple of it"
        )
    if s.tp <= spec.kv_heads and spec.kv_heads % s.tp:
        problems.append(f"tp({s.tp}) does not divide kv_heads({spec.kv_heads}); use a divisor of {spec.kv_heads}")
    if spec.ffn_hidden % s.tp and (not spec.moe or spec.moe_layers < spec.layers):
        problems.append(f"tp({s.tp}) does not divide ffn_hidden({spec.ffn_hidden}); use a divisor of it")
    if spec.shared_expert_ffn_hidden % s.tp:
        problems.append(f"tp({s.tp}) does not divide shared_expert_ffn_hidden({spec.shared_expert_ffn_hidden})")
    problems += expert_layout_problems(spec, ep=s.ep, expert_tp=s.expert_tp, tp=s.tp, dp=s.dp, cp=s.cp,
                                       sequence_parallel=s.sequence_parallel,
                                       shard=(s.dp_shard if s.zero > 0 else s.dp) * s.cp)
    seq = s.seq_len or spec.seq_len
    if spec.position.value == "learned" and seq > spec.seq_len:
        problems.append(f"sequence length {seq} is longer than {spec.name}'s {spec.seq_len} learned positions; "
                        f"use --seq-len {spec.seq_len} or less")
    if seq % (2 * s.cp if s.cp > 1 else 1):
        problems.append(
            f"seq_len({seq}) is not a multiple of 2 * cp({s.cp}); load-balanced context parallelism "
            "splits the sequence into 2*cp chunks"
        )
    if s.sequence_parallel and seq // s.cp % s.tp:
        problems.append(f"sequence parallelism splits seq_len/cp ({seq // s.cp}) over tp({s.tp}), which does not divide it")
    mlp_targets = [t for t in s.lora_targets if t in ("up", "gate", "down")]
    if spec.moe and mlp_targets:
        problems.append(f"--lora-targets {','.join(mlp_targets)}: {spec.name}'s MLPs are routed experts, frozen with "
                        "the base (adapters go on attention); use some of q,k,v,o")
    elif "gate" in s.lora_targets and spec.activation.value != "swiglu":
        problems.append(f"--lora-targets gate: {spec.name} has no gate projection (a {spec.activation.value} MLP); "
                        "use q,k,v,o,up,down")
    per_replica = s.dp * s.microbatch_size
    if s.global_batch % per_replica:
        problems.append(
            f"global batch {s.global_batch} is not a multiple of dp({s.dp}) * microbatch_size({s.microbatch_size}) "
            f"= {per_replica}; use a multiple of {per_replica}"
        )
    if s.schedule is Schedule.INTERLEAVED and s.num_microbatches % s.pp:
        problems.append(
            f"interleaved 1F1B needs microbatches ({s.num_microbatches}) to be a multiple of pp({s.pp}); "
            "change the global batch or the microbatch size"
        )
    if spec.layers < s.num_stages:
        problems.append(
            f"layers({spec.layers}) < pp({s.pp}) * virtual_stages({s.virtual_stages}) = {s.num_stages}; "
            "every pipeline stage needs at least one layer"
        )
    if s.stage_layers:
        if len(s.stage_layers) != s.num_stages or sum(s.stage_layers) != spec.layers or min(s.stage_layers) < 1:
            problems.append(
                f"stage_layers {list(s.stage_layers)} must give {s.num_stages} positive counts summing to "
                f"layers({spec.layers})"
            )
    return problems


def check_strategy(spec: ModelSpec, strategy: Strategy, world_size: int) -> None:
    """Raise the first of `strategy_problems`, if any."""
    problems = strategy_problems(spec, strategy, world_size)
    if problems:
        raise ConfigError(problems[0])


def stage_layer_counts(spec: ModelSpec, strategy: Strategy) -> tuple[int, ...]:
    """Layers per virtual stage, in pipeline order; balanced with the remainder on the middle stages
    (the ends also carry the embedding and the head)."""
    if strategy.stage_layers:
        return strategy.stage_layers
    k = strategy.num_stages
    base, extra = divmod(spec.layers, k)
    counts = [base] * k
    # give the extra layers to stages away from both ends first
    order = sorted(range(k), key=lambda i: (min(i, k - 1 - i) == 0, -min(i, k - 1 - i), i))
    for i in order[:extra]:
        counts[i] += 1
    return tuple(counts)
