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
