"""planner.inter_op: layers into pipeline stages, by dynamic programming (Alpa, Sec. 5).

Alpa's objective for a pipeline of S stages over B microbatches, t_i the time of stage i
for one microbatch (forward and backward):

    T* = min over partitions  sum_i t_i + (B - 1) * max_j t_j

Enumerating t_max (the slowest stage) turns it into a shortest-path DP per t_max:

    f[i][k] = min_{j < k} f[i-1][j] + t(j, k)   if t(j, k) <= t_max and mem_i(j, k) <= capacity
    T*(t_max) = f[S][L] + (B - 1) * t_max

where t(j, k) is the time of layers j..k-1 as one stage (plus the embedding when j = 0 and
the head when k = L) and mem_i(j, k) its memory as the i-th stage, whose in-flight
microbatches the schedule fixes (1F1B: S - i). Candidates for t_max are the distinct stage
times, in increasing order; the loop stops once (B - 1) * t_max alone exceeds the best T*.
Every stage runs on the same submesh (the runtime's mesh is uniform), so the DP chooses
where the cuts go: non-uniform stages where the ends are heavier.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True, slots=True)
class StagePartition:
    layers: tuple[int, ...]  # layers per stage, in order
    stage_times_s: tuple[float, ...]
    objective_s: float


def partition_layers(
    layer_s: np.ndarray,  # (L,) time of each layer, one microbatch, forward + backward
    layer_states_bytes: np.ndarray,  # (L,) parameters + gradients + optimizer states of each layer
    layer_act_bytes: np.ndarray,  # (L,) activations one microbatch of each layer keeps
    *,
    stages: int,
    microbatches: int,
    in_flight: np.ndarray,  # (S,) microbatches stage i keeps in flight
    embed_s: float,
    head_s: float,
    embed_bytes: float,
    head_bytes: float,
    capacity_bytes: float,
) -> StagePartition | None:
    """The best partition of L layers into `stages` contiguous stages, or None if no
    partition fits in memory."""
    L, S, B = len(layer_s), stages, microbatches
    if S > L:
        return None
    inf = np.inf
    # prefix sums: cum[k] = sum of the first k layers
    cum_t = np.concatenate([[0.0], np.cumsum(layer_s)])
    cum_w = np.concatenate([[0.0], np.cumsum(layer_states_bytes)])
    cum_a = np.concatenate([[0.0], np.cumsum(layer_act_bytes)])
    j = np.arange(L + 1)[:, None]  # (L+1, 1): first layer of the stage
    k = np.arange(L + 1)[None, :]  # (1, L+1): one past its last layer
    empty = k <= j
    # t[j, k]: stage of layers j..k-1, with the embedding on the first and the head on the last
    t = cum_t[k] - cum_t[j] + np.where(j == 0, embed_s, 0.0) + np.where(k == L, head_s, 0.0)
    t = np.where(empty, inf, t)
    states = cum_w[k] - cum_w[j] + np.where(j == 0, embed_bytes, 0.0) + np.where(k == L, head_bytes, 0.0)
    acts = cum_a[k] - cum_a[j]
    # fits[i, j, k]: the stage fits in memory as stage i
    fits = states[None] + in_flight[:, None, None] * acts[None] <= capacity_bytes  # (S, L+1, L+1)
    candidates = np.unique(t[np.isfinite(t) & fits.any(axis=0)])
    best: tuple[float, list[int]] | None = None
    for t_max in candidates:
        if best is not None and (B - 1) * t_max >= best[0]:
            break
        allowed = (t <= t_max)[None] & fits  # (S, L+1, L+1)
        f = np.full((S + 1, L + 1), inf)  # f[i, k]: first k layers in i stages
        arg = np.zeros((S + 1, L + 1), dtype=int)  # arg[i, k]: the cut j that achieves it
        f[0, 0] = 0.0
        for i in range(1, S + 1):
            cost = f[i - 1][:, None] + np.where(allowed[i - 1], t, inf)  # (L+1 j, L+1 k)
            arg[i] = np.argmin(cost, axis=0)
            f[i] = cost[arg[i], np.arange(L + 1)]
        if not np.isfinite(f[S, L]):
            continue
        total = f[S, L] + (B - 1) * t_max
        if best is None or total < best[0] - 1e-12:
            cuts, kk = [], L
            for i in range(S, 0, -1):
                jj = int(arg[i, kk])
                cuts.append(kk - jj)
                kk = jj
            best = (float(total), cuts[::-1])
    if best is None:
        return None
    counts = best[1]
    bounds = np.concatenate([[0], np.cumsum(counts)])
    times = tuple(float(t[bounds[i], bounds[i + 1]]) for i in range(S))
    return StagePartition(layers=tuple(int(c) for c in counts), stage_times_s=times, objective_s=best[0])
