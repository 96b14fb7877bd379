"""Discrete-event simulation of one training step over per-rank streams.

Each pipeline rank has a compute stream that runs its schedule's tasks in order (a task
starts when the stream is free and its input has arrived), a send stream that carries
activations forward and gradients back (asynchronous, as isend/irecv), and a data-parallel
stream that reduces gradient buckets as the last backward of each chunk produces them. The
optimizer runs once a rank's gradients are reduced. The bubble is what the compute streams
wait: it comes out of the schedule, not out of a formula.
"""

from __future__ import annotations

from dataclasses import dataclass

from costmodel.errors import ConfigError
from costmodel.result import Event, StepResult
from costmodel.runtime import UNCALIBRATED_BAND
from costmodel.step import StepModel
from costmodel.layer import Part


def _fresh(model: StepModel) -> tuple:
    """The streams' state before the step: arrivals (arrive_f[k][mb]: when the input of
    virtual stage k for microbatch mb is on its rank; NaN: not yet), free times, positions in
    the schedule, the last backward's start per stage, work done, sends, events."""
    s = model.strategy
    pp, m, k_stages = s.pp, s.num_microbatches, s.num_stages
    nan = float("nan")
    arrive_f = [[0.0] * m] + [[nan] * m for _ in range(k_stages - 1)]
    arrive_b = [[nan] * m for _ in range(k_stages)]
    return (arrive_f, arrive_b, [0.0] * pp, [0.0] * pp, [0.0] * pp, [0] * pp, [nan] * k_stages,
            [Part() for _ in range(pp)], [0.0] * pp, [])


def _deliver(model: StepModel, task, k: int, r: int, end: float, arrive_f, arrive_b, send_free_f, send_free_b,
             send_busy, events) -> None:
    """After a task of virtual stage k ends on rank r at `end`: send its activation on (or, at
    the last stage, start the backward here) or its gradient back, on the rank's send streams."""
    if task.weight:  # a weight gradient: nothing waits for it
        return
    mb, p2p = task.microbatch, model.p2p_s
    last = len(arrive_f) - 1
    if task.forward and k == last:
        arrive_b[k][mb] = end  # the loss: backward starts on the same rank
        return
    if not task.forward and k == 0:
        return
    free = send_free_f if task.forward else send_free_b
    send = max(end, free[r])
    free[r] = send + p2p
    send_busy[r] += p2p
    if task.forward:
        arrive_f[k + 1][mb] = send + p2p
    else:
        arrive_b[k - 1][mb] = send + p2p
    if events is not None and p2p:
        events.append(Event(r, "send", f"{'act' if task.forward else 'grad'} {mb}.{task.chunk}", send, p2p))


def _task_part(model: StepModel, task, k: int) -> Part:
    if task.forward:
        return model.forward_first[k] if task.microbatch == 0 else model.forward[k]
    return model.backward_weight[k] if task.weight else model.backward[k]


def _ready(task, k: int, arrive_f, arrive_b) -> float:
    """When the task's input is on its rank (NaN: not yet); a weight gradient's is its own
    rank's input gradient, run before it in the rank's order."""
    if task.weight:
        return 0.0
    return arrive_f[k][task.microbatch] if task.forward else arrive_b[k][task.microbatch]


def _label(task) -> str:
    return f"{'F' if task.forward else 'W' if task.weight else 'B'}{task.microbatch}.{task.chunk}"


def _last_gradients(model: StepModel, task) -> bool:
    """Whether the task makes its chunk's last weight gradients (the data-parallel reduction
    of the chunk's gradients starts with it): the last microbatch's backward, or its weight
    half where the backward is split."""
    split = bool(model.backward_weight)
    return not task.forward and task.microbatch == model.strategy.num_microbatches - 1 and task.weight == split


def _run(model: StepModel, record_events: bool) -> _Pipeline:
    """Each rank's stream runs its tasks in order, each as soon as its input is there."""
    s = model.strategy
    pp, m = s.pp, s.num_microbatches
    arrive_f, arrive_b, free, send_free_f, send_free_b, pos, last_backward_start, busy, send_busy, events = _fresh(model)
    remaining = sum(len(o) for o in model.orders)
    while remaining:
        progressed = False
        for r in range(pp):
            order = model.orders[r]
            while pos[r] < len(order):
                task = order[pos[r]]
                k = task.chunk * pp + r
                ready = _ready(task, k, arrive_f, arrive_b)
                if ready != ready:  # not arrived yet
                    break
                part = _task_part(model, task, k)
                start = max(free[r], ready)
                if _last_gradients(model, task):
                    last_backward_start[k] = start
                end = start + part.total
                free[r] = end
                busy[r] = busy[r] + part
                if record_events:
                    events.append(Event(r, "compute", _label(task), start, part.total))
                pos[r] += 1
                remaining -= 1
                progressed = True
                _deliver(model, task, k, r, end, arrive_f, arrive_b, send_free_f, send_free_b, send_busy,
                         events if record_events else None)
        if not progressed:
            raise ConfigError(f"the {s.schedule.value} schedule deadlocks for pp={pp}, microbatches={m}")

    return _Pipeline(free, last_backward_start, busy, send_busy, events)


def _run_shared_host(model: StepModel, record_events: bool) -> _Pipeline:
    """The same schedule where the "GPUs" are processes sharing a host's cores: a fluid
    processor-sharing simulation. Task durations in the model assume every process busy (each
    gets cores / processes); when pipeline ranks idle in a bubble, the busy ones share the
    cores among fewer and run faster. With n of the pp ranks' process groups busy, a task
    progresses at rate slow / max(1, per_node * n / (pp * cores)) of its modelled speed, slow the
    static oversubscription."""
    s = model.strategy
    pp, m = s.pp, s.num_microbatches
    cluster = model.cluster
    slow = cluster.oversubscription
    arrive_f, arrive_b, free, send_free_f, send_free_b, pos, last_backward_start, busy, send_busy, events = _fresh(model)
    running: dict[int, list] = {}  # rank -> [task, k, part, remaining seconds at the modelled speed, start]
    now = 0.0
    while True:
        for r in range(pp):  # start what can start
            if r in running or pos[r] >= len(model.orders[r]):
                continue
            task = model.orders[r][pos[r]]
            k = task.chunk * pp + r
            ready = _ready(task, k, arrive_f, arrive_b)
            if ready == ready and ready <= now:
                part = _task_part(model, task, k)
                if _last_gradients(model, task):
                    last_backward_start[k] = now
                running[r] = [task, k, part, part.total, now]
        if not running:
            pending = [t for r in range(pp) if pos[r] < len(model.orders[r])
                       for t in [_ready_time(model, r, pos[r], arrive_f, arrive_b)] if t == t]
            if not any(pos[r] < len(model.orders[r]) for r in range(pp)):
                break
            if not pending:
                raise ConfigError(f"the {s.schedule.value} schedule deadlocks for pp={pp}, microbatches={m}")
            now = max(now, min(pending))
            continue
        rate = slow / max(1.0, cluster.gpus_per_node * len(running) / (pp * cluster.host_cores))
        finish = min(item[3] for item in running.values()) / rate
        arrivals = [t for r in range(pp) if r not in running and pos[r] < len(model.orders[r])
                    for t in [_ready_time(model, r, pos[r], arrive_f, arrive_b)] if t == t and t > now]
        step = min([finish] + [t - now for t in arrivals])
        now += step
        for r in list(running):
            item = running[r]
            item[3] -= step * rate
            if item[3] > 1e-12:
                continue
            task, k, part, _, start = running.pop(r)
            free[r] = now
            busy[r] = busy[r] + part
            if record_events:
                events.append(Event(r, "compute", _label(task), start, now - start))
            pos[r] += 1
            _deliver(model, task, k, r, now, arrive_f, arrive_b, send_free_f, send_free_b, send_busy,
                     events if record_events else None)
    return _Pipeline(free, last_backward_start, busy, send_busy, events)


def _ready_time(model: StepModel, r: int, i: int, arrive_f, arrive_b) -> float:
    task = model.orders[r][i]
    return _ready(task, task.chunk * model.strategy.pp + r, arrive_f, arrive_b)


@dataclass
class _Pipeline:
    """What the compute streams did: when each rank's stream went free, when the last
    microbatch's backward of each virtual stage started, the work done, the sends."""

    free: list[float]
    last_backward_start: list[float]
    busy: list[Part]
    send_busy: list[float]
    events: list[Event]


def simulate(model: StepModel, *, record_events: bool = True) -> StepResult:
    s = model.strategy
    pp, k_stages = s.pp, s.num_stages
    if model.cluster.host_cores and pp > 1:
        pipe = _run_shared_host(model, record_events)
    else:
        pipe = _run(model, record_events)
    free, last_backward_start, busy, send_busy, events = (
        pipe.free, pipe.last_backward_start, pipe.busy, pipe.send_busy, pipe.events)

    # data-parallel gradient buckets and the optimizer, per rank
    rank_end, dp_exposed = [], []
    for r in range(pp):
        dp_free = 0.0
        for k in range(r, k_stages, pp):
            t0 = last_backward_start[k]
            for i, bucket in enumerate(model.buckets[k]):
                start = max(dp_free, t0 + bucket.ready_s)
                dp_free = start + bucket.comm_s
                if record_events:
                    events.append(Event(r, "dp", f"grad bucket {k}.{i}", start, bucket.comm_s))
        grads_done = max(free[r], dp_free)
        dp_exposed.append(grads_done - free[r])
        if record_events:
            events.append(Event(r, "optimizer", "optimizer", grads_done, model.optimizer_s[r]))
        rank_end.append(grads_done + model.optimizer_s[r])
    step = max(rank_end)

    # the bottleneck rank: most compute-stream work
    worst = max(range(pp), key=lambda r: busy[r].total + dp_exposed[r] + model.optimizer_s[r])
    b = busy[worst]
    exposed = b.exposed_comm + dp_exposed[worst]
    working = b.compute + b.recompute + b.tp_comm + b.cp_comm + b.ep_comm + exposed + model.optimizer_s[worst]
    time_s = {
        "compute": b.compute + model.optimizer_s[worst],
        "recompute": b.recompute,
        "tp_comm": b.tp_comm,
        "cp_comm": b.cp_comm,
        **({"ep_comm": b.ep_comm} if model.spec.moe else {}),
        "pp_comm": send_busy[worst],
        "dp_comm": model.dp_comm_s[worst],
        "exposed_comm": exposed,
        "bubble": step - working if step - working > 1e-9 * step else 0.0,  # no float residue without a pipeline
    }
    mem = [rm.gib() for rm in model.memory]
    worst_mem = max(mem, key=lambda d: d["total"])
    cluster = model.cluster
    world = cluster.world_size
    peak = cluster.device.mfu_peak_flops(s.policy.compute_dtype)
    model_tflops = model.model_flops / step / world / 1e12
    (low, high), calibrated = prediction_band(model)
    return StepResult(
        step_time_s=step,
        tokens_per_s=model.tokens / step,
        model_tflops_per_gpu=model_tflops,
        hardware_tflops_per_gpu=model.hardware_flops / step / world / 1e12,
        mfu=model_tflops * 1e12 / peak,
        bubble_fraction=time_s["bubble"] / step,
        fits=worst_mem["total"] <= cluster.device.hbm_gib,
        memory_gib=worst_mem,
        time_s=time_s,
        rank_memory_gib=tuple(mem),
        capacity_gib=cluster.device.hbm_gib,
        events=tuple(events),
        step_time_s_range=(step * (1 + low), step * (1 + high)),
        calibrated=calibrated,
        runtime=cluster.runtime.name,
        profile=cluster.profile,
        best_published_mfu=cluster.device.best_published_mfu,
    )


def prediction_band(model: StepModel) -> tuple[tuple[float, float], bool]:
    """(low, high) of measured / predicted step time - 1, and whether the plan is inside what
    was calibrated: the runtime's residuals on this GPU architecture (a measured host: its
    own fidelity residuals), twice as wide where the plan uses a parallelism the runtime's
    calibration runs did not (`calibrated_axes`)."""
    cluster, s = model.cluster, model.strategy
    if cluster.host_cores:
        band = cluster.host_band
        return (band, True) if band else (UNCALIBRATED_BAND, False)
    band, calibrated = cluster.runtime.band_of(cluster.device.arch)
    used = {axis for axis, degree in (("tp", s.tp), ("pp", s.pp), ("cp", s.cp), ("dp", s.dp)) if degree > 1}
    if calibrated and not used <= set(cluster.runtime.calibrated_axes):
        return (2 * band[0], 2 * band[1]), False
    return band, calibrated

