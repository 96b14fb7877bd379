"""A closed-form estimate of the step, for searches that rank many candidates.

Same parts as the event simulation (`build_step`), but the pipeline is summed in closed form,
Alpa's stage-level formula with t_r the forward plus backward time of one microbatch on
pipeline rank r (all its chunks):

    GPipe / 1F1B:      T = sum_r t_r + (m - 1) max_r t_r
    interleaved (v):   T = m max_r t_r + (sum_r t_r - max_r t_r) / v
    zero bubble (v):   T = m max_r t_r + (sum_r (t_r - 2 w_r) - (t_s - 2 w_s)) / v

with w_r the weight-gradient half of rank r's backward and s the slowest rank (Qi et al.
2024: ZB-H1's bubble is (p - 1)(T_F + T_B - T_W), 1F1B's (p - 1)(T_F + T_B + T_W)),

plus the pipeline transfers on the critical path, the ZeRO-1/2 parameter gathers of the
first microbatch, the gradient reduction left after the last backward, and the optimizer.
The event simulator is the reference; tests hold the two within a few percent.
"""

from __future__ import annotations

from dataclasses import dataclass

from costmodel.hardware import GIB
from costmodel.step import StepModel


@dataclass(frozen=True, slots=True, kw_only=True)
class Estimate:
    step_time_s: float
    memory_gib: float  # worst rank
    fits: bool


def estimate(model: StepModel) -> Estimate:
    s = model.strategy
    pp, v, m = s.pp, s.virtual_stages, s.num_microbatches
    per_rank = [sum(model.forward[k].total + model.backward[k].total for k in range(r, s.num_stages, pp)) for r in range(pp)]
    slowest = max(per_rank)
    if model.backward_weight:  # zero bubble: the weight gradients fill the warm-up and cool-down
        weight = [sum(model.backward_weight[k].total for k in range(r, s.num_stages, pp)) for r in range(pp)]
        per_rank = [t + w for t, w in zip(per_rank, weight)]
        worst = max(range(pp), key=per_rank.__getitem__)
        slowest = per_rank[worst]
        fill = [max(0.0, t - 2 * w) for t, w in zip(per_rank, weight)]
        pipeline = m * slowest + (sum(fill) - fill[worst]) / v
    elif v > 1:
        pipeline = m * slowest + (sum(per_rank) - slowest) / v
    else:
        pipeline = sum(per_rank) + (m - 1) * slowest
    pipeline += 2 * (s.num_stages - 1) * model.p2p_s
    first = max(sum(model.forward_first[k].total - model.forward[k].total for k in range(r, s.num_stages, pp)) for r in range(pp))
    tail = 0.0
    for r in range(pp):
        last_backward = model.backward[r].total  # chunk 0 of rank r finishes the rank's step
        dp_free = 0.0
        for bucket in model.buckets[r]:
            dp_free = max(dp_free, bucket.ready_s) + bucket.comm_s
        tail = max(tail, max(0.0, dp_free - last_backward) + model.optimizer_s[r])
    memory = max(rm.total for rm in model.memory) / GIB
    return Estimate(step_time_s=pipeline + first + tail, memory_gib=memory, fits=memory <= model.cluster.device.hbm_gib)
