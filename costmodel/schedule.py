"""The order in which each pipeline rank runs its forward and backward tasks.

A task is (forward?, microbatch, chunk); chunk c on pipeline rank r is virtual stage
c * pp + r (Megatron's interleaving: rank r holds chunks r, r + pp, r + 2 pp, ...).

- GPipe: every forward, then every backward.
- 1F1B (PipeDream-Flush): rank r runs pp - r - 1 warm-up forwards, then alternates one
  forward and one backward, then drains the remaining backwards.
- Interleaved 1F1B (Narayanan et al. 2021): warm-up of 2 (pp - r - 1) + (v - 1) pp virtual
  microbatches; the k-th forward runs chunk (k // pp) % v of microbatch
  (k // (pp v)) pp + k % pp, the k-th backward the chunks in reverse.
- Zero bubble (ZB1P, Qi et al. 2024, as torch.distributed.pipelining's
  ScheduleInterleavedZeroBubble orders it): a backward is split into its input gradient (B,
  which the previous stage waits for) and its weight gradient (W, which nothing waits for).
  Warm-up of (v - 1) R + pp - r - 1 forwards (R microbatches a round: pp when m is a multiple of
  pp); then one F and one B at a time, rank r running the W of its j-th B after its (j + r)-th,
  so the W's fill what 1F1B leaves idle; the cool-down's B's, then the W's left. Every rank
  holds up to pp microbatches' activations (a microbatch's until its W), 1F1B's peak on rank 0.
"""

from __future__ import annotations

from functools import lru_cache
from typing import NamedTuple

from costmodel.strategy import Schedule


class Task(NamedTuple):
    forward: bool
    microbatch: int
    chunk: int
    weight: bool = False  # the weight-gradient half of a split backward (zero bubble); its input half has False


def split_backward(schedule: Schedule) -> bool:
    """Whether the schedule splits each backward into its input and weight gradients."""
    return schedule is Schedule.ZERO_BUBBLE


def gpipe(pp: int, m: int) -> list[list[Task]]:
    return [[Task(True, i, 0) for i in range(m)] + [Task(False, i, 0) for i in range(m)] for _ in range(pp)]


def one_f_one_b(pp: int, m: int) -> list[list[Task]]:
    orders = []
    for rank in range(pp):
        warmup = min(pp - rank - 1, m)
        order = [Task(True, i, 0) for i in range(warmup)]
        for i in range(m - warmup):
            order += [Task(True, warmup + i, 0), Task(False, i, 0)]
        order += [Task(False, i, 0) for i in range(m - warmup, m)]
        orders.append(order)
    return orders


def interleaved_1f1b(pp: int, m: int, v: int) -> list[list[Task]]:
    total = m * v

    def forward(k: int) -> Task:
        return Task(True, (k // (pp * v)) * pp + k % pp, (k // pp) % v)

    def backward(k: int) -> Task:
        return Task(False, (k // (pp * v)) * pp + k % pp, v - 1 - (k // pp) % v)

    orders = []
    for rank in range(pp):
        warmup = min(2 * (pp - rank - 1) + (v - 1) * pp, total)
        order = [forward(k) for k in range(warmup)]
        for k in range(total - warmup):
            order += [forward(warmup + k), backward(k)]
        order += [backward(k) for k in range(total - warmup, total)]
        orders.append(order)
    return orders


def zero_bubble(pp: int, m: int, v: int) -> list[list[Task]]:
    rounds = max(1, m // pp)
    per_round = m // rounds
    total = m * v
    orders = []
    for rank in range(pp):
        warmup = min((v - 1) * per_round + pp - 1 - rank, total)
        next_mb = {kind: [0] * v for kind in "FBW"}

        def task(kind: str, chunk: int) -> Task:
            mb = next_mb[kind][chunk]
            next_mb[kind][chunk] += 1
            return Task(kind == "F", mb, chunk, kind == "W")

        order: list[Task] = []
        b_chunks: list[int] = []  # the chunk of every B issued, in order: W's follow them
        for op in range(total + warmup):
            if op < total:  # a forward: warm-up, or the steady state's F before its B
                order.append(task("F", (op // per_round) % v))
            if op >= warmup:
                b_chunks.append(v - 1 - ((op - warmup) // per_round) % v)
                order.append(task("B", b_chunks[-1]))
                if op - warmup >= rank:
                    order.append(task("W", b_chunks[len(b_chunks) - 1 - rank]))
        order += [task("W", c) for c in b_chunks[max(0, len(b_chunks) - rank):]]  # the W's left
        orders.append(order)
    return orders


@lru_cache(maxsize=256)
def build(schedule: Schedule, pp: int, m: int, v: int = 1) -> tuple[tuple[Task, ...], ...]:
    """Per pipeline rank, its tasks in order (memoized: a pure function of its arguments)."""
    if schedule is Schedule.GPIPE:
        orders = gpipe(pp, m)
    elif schedule is Schedule.ZERO_BUBBLE:
        orders = zero_bubble(pp, m, v)
    elif schedule is Schedule.ONE_F_ONE_B or v == 1:
        orders = one_f_one_b(pp, m)
    else:
        orders = interleaved_1f1b(pp, m, v)
    return tuple(tuple(order) for order in orders)


@lru_cache(maxsize=1024)
def in_flight_peaks(schedule: Schedule, pp: int, m: int, v: int, rank: int) -> tuple[tuple[int, ...], ...]:
    """The counts, per chunk, of microbatches whose forward has run and backward has not, at
    every moment just before a backward frees one: the candidates for a rank's peak."""
    held = [0] * v
    peaks = set()
    split = split_backward(schedule)  # then a microbatch's activations go with its W, not its B
    for task in build(schedule, pp, m, v)[rank]:
        if task.forward:
            held[task.chunk] += 1
        elif task.weight or not split:
            peaks.add(tuple(held))
            held[task.chunk] -= 1
    # only vectors no other vector dominates can be the peak for non-negative weights; a
    # vector can only be dominated by one with a larger sum, so scan by decreasing sum
    frontier: list[tuple[int, ...]] = []
    for p in sorted(peaks, key=lambda c: (-sum(c), c)):
        if not any(all(a >= b for a, b in zip(q, p)) for q in frontier):
            frontier.append(p)
    return tuple(sorted(frontier))


def peak_in_flight(schedule: Schedule, pp: int, m: int, v: int, rank: int, weights: list[float]) -> float:
    """Largest weighted count of forwards whose backward has not run yet on one rank;
    `weights[chunk]` is what one microbatch of that chunk keeps (bytes, say)."""
    return max(sum(w * n for w, n in zip(weights, counts)) for counts in in_flight_peaks(schedule, pp, m, v, rank))
