"""Chrome / Perfetto trace of a simulated step (open in ui.perfetto.dev or chrome://tracing)."""

from __future__ import annotations

from costmodel.result import StepResult

STREAMS = ("compute", "send", "dp", "optimizer")


def chrome_trace(result: StepResult, *, title: str = "paraplan step") -> dict:
    """The Trace Event Format: one process per pipeline rank, one thread per stream."""
    events = []
    ranks = sorted({e.rank for e in result.events})
    for rank in ranks:
        events.append({"name": "process_name", "ph": "M", "pid": rank, "args": {"name": f"pipeline rank {rank}"}})
        for tid, stream in enumerate(STREAMS):
            events.append({"name": "thread_name", "ph": "M", "pid": rank, "tid": tid, "args": {"name": stream}})
    for e in result.events:
        events.append({
            "name": e.name, "cat": e.stream, "ph": "X", "pid": e.rank, "tid": STREAMS.index(e.stream),
            "ts": round(e.start_s * 1e6, 3), "dur": round(e.duration_s * 1e6, 3),
        })
    return {"traceEvents": events, "displayTimeUnit": "ms", "otherData": {"title": title, **result.predicted()}}


def serving_trace(timeline, roles, *, title: str = "paraplan serving", predicted: dict | None = None) -> dict:
    """The iterations of a traffic simulation (costmodel.traffic): one process per replica,
    an event per iteration (or run of repeated decode iterations) with its batch, and a
    counter of the KV cache in use and the sequences running."""
    events = []
    for pid, (iterations, role) in enumerate(zip(timeline, roles)):
        events.append({"name": "process_name", "ph": "M", "pid": pid, "args": {"name": f"replica {pid} ({role})"}})
        events.append({"name": "thread_name", "ph": "M", "pid": pid, "tid": 0, "args": {"name": "iterations"}})
        for start_s, seconds, kv_share, running, scheduled, repeats in iterations:
            ts = round(start_s * 1e6, 3)
            events.append({"name": "decode" if repeats > 1 else "iteration", "cat": role, "ph": "X", "pid": pid,
                           "tid": 0, "ts": ts, "dur": round(seconds * 1e6, 3),
                           "args": {"sequences": scheduled, "iterations": repeats}})
            events.append({"name": "kv cache", "ph": "C", "pid": pid, "ts": ts,
                           "args": {"in use %": round(100 * kv_share, 2), "running": running}})
    return {"traceEvents": events, "displayTimeUnit": "ms", "otherData": {"title": title, **(predicted or {})}}
