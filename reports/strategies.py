"""The canonical strategies a report compares, for a model, a cluster and a global batch:
pure data parallelism, ZeRO-1/2/3 (FSDP), HSDP, tensor parallelism (with and without
sequence parallelism), pipelines (1F1B, interleaved, zero bubble), 3D combinations, under each recompute
policy. Candidates that cannot be formed (divisibility) are left out."""

from __future__ import annotations

from costmodel import ConfigError, Strategy
from costmodel.cluster import Cluster
from costmodel.spec import ModelSpec
from costmodel.validate import check_strategy


def canonical(spec: ModelSpec, cluster: Cluster, global_batch: int, skipped: dict[str, str] | None = None) -> dict[str, Strategy]:
    """The strategies that can be formed; `skipped` collects the others with the reason."""
    skipped = {} if skipped is None else skipped
    n, node = cluster.world_size, cluster.gpus_per_node
    tp = max(t for t in (1, 2, 4, 8) if t <= node and spec.heads % t == 0 and n % t == 0)
    pp_alone = next((p for p in (8, 4, 2) if n % p == 0 and spec.layers >= 2 * p), 1)
    pp = next((p for p in (8, 4, 2) if n % (tp * p) == 0 and spec.layers >= 2 * p), 1)
    shapes: dict[str, dict] = {
        "DP": dict(dp=n),
        "ZeRO-1": dict(dp=n, zero=1),
        "ZeRO-2": dict(dp=n, zero=2),
        "FSDP (ZeRO-3)": dict(dp=n, zero=3),
        "HSDP": dict(dp=n, zero=3, shard_group=min(node, n)),
        f"TP{tp}": dict(tp=tp, dp=n // tp, sequence_parallel=False),
        f"TP{tp}+SP": dict(tp=tp, dp=n // tp, sequence_parallel=True),
        f"PP{pp_alone} 1F1B": dict(pp=pp_alone, dp=n // pp_alone),
        f"PP{pp_alone} interleaved": dict(pp=pp_alone, dp=n // pp_alone, schedule="interleaved", virtual_stages=2),
        f"3D TP{tp} PP{pp}": dict(tp=tp, pp=pp, dp=n // (tp * pp), sequence_parallel=True),
        f"3D TP{tp} PP{pp} ZeRO-1": dict(tp=tp, pp=pp, dp=n // (tp * pp), sequence_parallel=True, zero=1),
        f"3D TP{tp} PP{pp} interleaved": dict(tp=tp, pp=pp, dp=n // (tp * pp), sequence_parallel=True,
                                             schedule="interleaved", virtual_stages=2),
        f"3D TP{tp} PP{pp} zero bubble": dict(tp=tp, pp=pp, dp=n // (tp * pp), sequence_parallel=True,
                                             schedule="zero-bubble"),
    }
    if spec.moe:  # expert parallelism inside a node (Megatron-Core's guideline 2), folded into data parallelism
        ep = max(e for e in range(1, min(node, spec.experts) + 1) if spec.experts % e == 0 and n % e == 0)
        if ep > 1:
            shapes[f"EP{ep} + ZeRO-1"] = dict(dp=n, zero=1, ep=ep)
            shapes[f"EP{ep} + FSDP"] = dict(dp=n, zero=3, ep=ep)
            if (n // (tp * pp)) * tp % ep == 0:
                shapes[f"3D TP{tp} PP{pp} EP{ep} ZeRO-1"] = dict(tp=tp, pp=pp, dp=n // (tp * pp), sequence_parallel=True,
                                                              zero=1, ep=ep, expert_tp=1)
    shapes = {k: v for k, v in shapes.items()
              if not ((v.get("pp", 1) == 1 and ("PP" in k)) or (v.get("tp", 1) == 1 and "TP" in k))}
    out: dict[str, Strategy] = {}
    for name, shape in shapes.items():
        for recompute in ("none", "selective", "full"):
            label = f"{name}, {recompute} recompute" + (" (no FlashAttention)" if recompute == "selective" else "")
            s = _fit_batch(shape, recompute, global_batch)
            if s is None:
                dp = shape.get("dp", 1)
                skipped[name] = (f"global batch {global_batch} is not a multiple of dp {dp}" if global_batch % dp
                                 else "too few microbatches for the pipeline")
                continue
            try:
                check_strategy(spec, s, n)
            except ConfigError as exc:
                skipped[name] = str(exc)
                continue
            out[label] = s
    return out


def _fit_batch(shape: dict, recompute: str, global_batch: int) -> Strategy | None:
    """Microbatches of one sequence, accumulated (the textbook setting; the planner searches
    larger ones); a pipeline needs at least 2 pp microbatches."""
    dp = shape.get("dp", 1)
    if global_batch % dp:
        return None
    per_replica = global_batch // dp
    for mbs in (1,):
        m = per_replica // mbs
        if per_replica % mbs or (shape.get("pp", 1) > 1 and m < 2 * shape["pp"]):
            continue
        try:
            return Strategy(global_batch=global_batch, microbatch_size=mbs, recompute=recompute,
                            flash_attention=recompute != "selective", **shape)
        except ConfigError:
            return None
    return None
