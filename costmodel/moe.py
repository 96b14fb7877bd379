"""The sparse MLP of a mixture-of-experts layer on one GPU under expert parallelism.

Megatron-Core's "MoE parallel folding": the dp x cp x tp ranks of a pipeline stage that run
the attention are re-split for the experts into edp x ep x etp. `ep` ranks each hold
experts/ep routed experts; expert tensor parallelism `etp` is tp (each expert's FFN split
over the tensor-parallel group, Megatron's default) or 1 (experts whole, the ep group then
spans the tp ranks); the rest, edp = dp cp tp / (ep etp), hold the same experts and reduce
their gradients together.

With tp > 1 a MoE layer runs sequence parallel (as Megatron-Core requires), so every rank
holds t = b s / (cp tp) distinct tokens (t = b s / cp without tp). Per layer and microbatch:

  router         t x h x experts GEMM, top-k, a softmax over the experts (fp32)
  dispatch       one all-to-all over the ep group of t k h values out of each rank, the
                 (ep - 1)/ep of them that leave it crossing the links; with etp = tp the
                 expert's tp group then all-gathers them and reduce-scatters the outputs
  experts        experts/ep GEMMs per rank (grouped), each over the tokens its expert got:
                 t k ep etp / experts rows on average; FLOPs 2 t k (3 h f_e) / 1 per rank
  combine        the all-to-all back; the backward runs both all-to-alls again
  shared         the shared experts: a dense MLP of their width, like a dense layer's

A router is never perfectly balanced: the busiest rank gets `imbalance` times the mean, and
the step waits for it (its expert GEMMs and its all-to-all). `rank_imbalance` models it from
the spread of per-expert loads: with a coefficient of variation cv per expert and experts/ep
independent experts per rank, a rank's load varies by cv / sqrt(experts/ep) and the busiest
of ep ranks sits the expected maximum of ep standard normals above the mean (Blom's
approximation, Phi^-1((n - 0.375) / (n + 0.25))).

The GPU runs the sparse MLP no faster than the host launches its kernels: the router, the
permutation, the experts' GEMMs (one per expert in a runtime that loops over its experts, as
Transformer Engine's GroupedLinear and paraplan's CPU path do; one per projection with a
grouped GEMM), the activation, the combine, each way. A dropless dispatcher waits on the
per-expert token counts (a device-to-host copy that sizes the all-to-all and the GEMMs), so
the host cannot run ahead into the next layer: each pass of the sparse MLP takes
max(GPU time, host time), the host time `host_us` = [fixed, per local expert] x [forward,
backward] microseconds of the runtime (`TrainingRuntime.moe_host_us`, measured).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache
from statistics import NormalDist

from costmodel.collectives import all_gather_s, all_to_all_s, reduce_scatter_s
from costmodel.errors import ConfigError
from costmodel.network import Group
from costmodel.ops import gemm_s
from costmodel.spec import ModelSpec

# Coefficient of variation of the tokens each expert gets per step under auxiliary-loss (or
# DeepSeek-V3's bias-based) balancing: an assumption, stated (Strategy.expert_load_cv, which
# `--expert-load-cv` sets; 0 for force-balanced benchmarks); a measured router's figure replaces it.
EXPERT_LOAD_CV = 0.25


@lru_cache(maxsize=1024)
def rank_imbalance(experts: int, ep: int, expert_cv: float = EXPERT_LOAD_CV) -> float:
    """Busiest expert-parallel rank's tokens over the mean (1: perfectly balanced)."""
    if ep <= 1:
        return 1.0
    per_rank = experts / ep
    busiest = NormalDist().inv_cdf((ep - 0.375) / (ep + 0.25))
    return 1.0 + expert_cv / math.sqrt(per_rank) * busiest


@dataclass(frozen=True, slots=True, kw_only=True)
class ExpertLayout:
    """How a stage's ranks hold the experts."""

    ep: int
    etp: int
    edp: int  # ranks holding the same experts (their gradients reduce together)
    ep_group: Group
    etp_group: Group

    def __post_init__(self) -> None:
        for name in ("ep", "etp", "edp"):
            if getattr(self, name) < 1:
                raise ConfigError(f"expert layout {name} must be >= 1, got {getattr(self, name)}")


@dataclass(frozen=True, slots=True, kw_only=True)
class MoeCost:
    """The sparse MLP of one MoE layer for one microbatch on one GPU."""

    forward_s: float  # router, permutation, the busiest rank's expert GEMMs, shared experts (>= the host's time)
    backward_s: float
    host_bound_s: float  # of forward_s + backward_s, the time the GPU waits for the host's launches
    wgrad_s: float  # expert and shared weight-gradient GEMMs (overlap budget)
    all_to_all_forward_s: float  # dispatch + combine (+ the expert tp gather/scatter)
    all_to_all_backward_s: float
    expert_params: float  # routed-expert parameters of the layer on this GPU


def all_to_all_calls(ep: int) -> dict[str, int]:
    """all_to_all_single calls of one MoE layer per microbatch as paraplan's runtime issues
    them: forward the per-expert counts (a few bytes), the dispatch and the combine; backward
    the two token exchanges again (the counts carry no gradient)."""
    if ep <= 1:
        return {"forward": 0, "backward": 0}
    return {"forward": 3, "backward": 2}


def local_tokens(batch: int, seq_local: int, tp: int) -> int:
    """Distinct tokens one rank routes: the microbatch's, split over tp (sequence parallel)."""
    return batch * seq_local // tp


def moe_cost(spec: ModelSpec, *, device, dtype: str, bytes_per_value: int, batch: int, seq_local: int, tp: int,
             layout: ExpertLayout, expert_cv: float = EXPERT_LOAD_CV, elementwise_traffic: float = 1.0,
             host_us: tuple[tuple[float, float], tuple[float, float]] = ((0.0, 0.0), (0.0, 0.0)),
             frozen: bool = False) -> MoeCost:
    """`elementwise_traffic`: the runtime's memory-bound bytes over one fused kernel per op;
    `host_us`: its host time of the sparse MLP ([fixed, per local expert] x [forward, backward]);
    `frozen`: the experts are part of a frozen base (LoRA): their backward computes the input
    gradients only, no weight-gradient GEMM."""
    if not spec.moe:
        raise ConfigError(f"{spec.name} has no experts")
    e, h, k, E = bytes_per_value, spec.hidden, spec.experts_per_token, spec.experts
    ep, etp = layout.ep, layout.etp
    t = local_tokens(batch, seq_local, tp)
    imbalance = rank_imbalance(E, ep, expert_cv)
    fe = spec.expert_ffn_hidden // etp
    up = 2 * fe if spec.gated else fe
    local_experts = E // ep
    rows = t * k * ep * etp / E * imbalance  # tokens the busiest rank's experts each see
    experts_fwd = local_experts * (gemm_s(device, dtype, rows, h, up, e) + gemm_s(device, dtype, rows, fe, h, e))
    router = gemm_s(device, dtype, t, h, E, e) + device.memory_s(t * E * 4 * 3)  # logits, softmax, top-k in fp32
    copies = t * k * etp * imbalance  # token copies through the busiest rank's experts
    # permute before the experts and unpermute after (read + write each), the activation, the weighted sum
    moved = 2 * 2 * copies * h * e + (3 if spec.gated else 2) * copies * fe * e + 2 * t * k * h * e
    elementwise = device.memory_s(moved * elementwise_traffic)
    shared_fwd = 0.0
    if spec.shared_expert_ffn_hidden:
        fs = spec.shared_expert_ffn_hidden // tp
        T = t * tp  # the shared experts run on the gathered tokens like a dense MLP
        shared_fwd = (gemm_s(device, dtype, T, h, 2 * fs if spec.gated else fs, e) + gemm_s(device, dtype, T, fs, h, e)
                      + device.memory_s((3 if spec.gated else 2) * T * fs * e))
    gpu_fwd = experts_fwd + router + elementwise + shared_fwd
    wgrad = 0.0 if frozen else experts_fwd + shared_fwd
    gpu_bwd = experts_fwd + shared_fwd + wgrad + router * 2 + 2 * elementwise
    (fixed_f, fixed_b), (per_f, per_b) = host_us
    host_f, host_b = (fixed_f + per_f * local_experts) * 1e-6, (fixed_b + per_b * local_experts) * 1e-6
    host_bound = max(0.0, host_f - gpu_fwd) + max(0.0, host_b - gpu_bwd)
    fwd, bwd = max(gpu_fwd, host_f), max(gpu_bwd, host_b)
    # dispatch and combine: t k h values per rank each way; the busiest rank receives imbalance x
    a2a_bytes = t * k * h * e * imbalance
    a2a = 2 * all_to_all_s(a2a_bytes, layout.ep_group)
    etp_comm = 0.0
    if etp > 1:  # the expert's tp group gathers the dispatched tokens and reduce-scatters the outputs
        etp_comm = (all_gather_s(a2a_bytes * etp, layout.etp_group)
                    + reduce_scatter_s(a2a_bytes * etp, layout.etp_group))
    expert_params = spec.expert_params * local_experts / etp
    return MoeCost(
        forward_s=fwd, backward_s=bwd, host_bound_s=host_bound, wgrad_s=wgrad,
        all_to_all_forward_s=a2a + etp_comm, all_to_all_backward_s=a2a + etp_comm,
        expert_params=expert_params,
    )


def expert_layout(spec: ModelSpec, strategy, cluster) -> ExpertLayout:
    """The expert mesh of `strategy` on `cluster` (ep ranks tp apart with etp = tp, adjacent
    with whole experts)."""
    tp, cp, dp = strategy.tp, strategy.cp, strategy.dp
    etp = strategy.expert_tp or tp
    ep = strategy.ep
    return ExpertLayout(ep=ep, etp=etp, edp=max(1, dp * cp * tp // (ep * etp)),
                        ep_group=cluster.group(ep, tp if etp == tp else 1), etp_group=cluster.group(etp, 1))


def expert_shard(strategy) -> int:
    """Ranks that shard one expert's model states under ZeRO/FSDP: the shard group (data and
    context ranks, and the tp ranks when experts are whole) over ep."""
    s = strategy
    etp = s.expert_tp or s.tp
    return max(1, s.dp_shard * s.cp * (s.tp // etp) // s.ep)


def expert_layout_problems(spec: ModelSpec, *, ep: int, expert_tp: int, tp: int, dp: int, cp: int,
                           sequence_parallel: bool, shard: int) -> list[str]:
    """Why the expert degrees cannot split the model over the stage's ranks (empty: they can).
    `shard`: the data-parallel ranks that shard model states (dp_shard; dp under ZeRO-0)."""
    problems = []
    if not spec.moe:
        if ep > 1:
            problems.append(f"--ep {ep}: {spec.name} has no experts to split; use --ep 1")
        elif expert_tp not in (0, tp):
            problems.append(f"--expert-tp {expert_tp}: {spec.name} has no experts; leave --expert-tp out")
        return problems
    etp = expert_tp or tp
    if etp not in (1, tp):
        problems.append(f"--expert-tp {etp} must be 1 or tp ({tp}): experts split over the tensor-parallel group "
                        "or kept whole")
        return problems
    if spec.experts % ep:
        problems.append(f"ep({ep}) does not divide experts({spec.experts}); use a divisor of {spec.experts}")
    if spec.expert_ffn_hidden % etp:
        problems.append(f"expert tp({etp}) does not divide expert_ffn_hidden({spec.expert_ffn_hidden})")
    if tp > 1 and not sequence_parallel:
        problems.append(f"a mixture-of-experts layer under tp({tp}) runs sequence parallel (Megatron-Core requires "
                        "it); give --sequence-parallel")
    folded = shard * (tp // etp)  # ranks the ep group may span: data ranks (x tp when experts are whole)
    if etp == 1 and tp > 1 and cp > 1:
        problems.append(f"--expert-tp 1 with tp({tp}) and cp({cp}): whole experts fold over tp only without "
                        f"context parallelism; use --expert-tp {tp}")
    elif folded % ep:
        where = f"dp_shard({shard})" + (f" * tp({tp})" if etp == 1 and tp > 1 else "")
        problems.append(f"ep({ep}) does not divide {where} = {folded}: expert parallelism folds into the "
                        "data-parallel ranks that shard the model; use a divisor")
    elif etp == 1 and tp > 1 and ep % tp:
        problems.append(f"ep({ep}) with whole experts (--expert-tp 1) must be a multiple of tp({tp})")
    return problems
