"""Simulator speed: one event-simulated step of gpt3-175b on 1024 A100s (1F1B, 96
microbatches; target under 0.5 s), and a search-sized loop of 10,000 analytic evaluations
over a grid of strategies (target under 10 s). Run:
    python bench/simulator_speed.py
"""

from __future__ import annotations

import itertools
import time

from costmodel import ConfigError, Strategy, build_step, load_cluster, simulate
from costmodel.analytic import estimate
from planner.zoo import ZOO


def main() -> None:
    spec, cluster = ZOO["gpt3-175b"], load_cluster("a100-80g:1024")
    one = Strategy(tp=8, pp=8, dp=16, global_batch=1536, schedule="1f1b", recompute="selective", sequence_parallel=True)
    for label, strategy in (("1f1b, 96 microbatches", one),
                            ("interleaved v=3, pp 16, 192 microbatches", one.replace(pp=16, dp=8, schedule="interleaved", virtual_stages=3)),
                            ("1f1b, pp 32, 384 microbatches", one.replace(pp=32, dp=4))):
        t0 = time.perf_counter()
        result = simulate(build_step(spec, strategy, cluster), record_events=True)
        dt = time.perf_counter() - t0
        print(f"event simulation, gpt3-175b on 1024 A100-80G, {label}: {dt * 1e3:.1f} ms "
              f"({len(result.events)} events; step {result.step_time_s:.2f} s, MFU {100 * result.mfu:.1f}%)")

    grid = itertools.product(
        (1, 2, 4, 8), (1, 2, 4, 8, 16, 32), (1, 2), (0, 1, 2, 3), ("none", "selective", "full"),
        (1, 2, 4), ("1f1b", "gpipe", "interleaved"),
    )
    candidates = []
    for tp, pp, cp, zero, rc, mbs, sched in grid:
        dp = 1024 // (tp * pp * cp)
        v = 2 if sched == "interleaved" else 1
        if sched == "interleaved" and pp == 1:
            continue
        try:
            candidates.append(Strategy(tp=tp, pp=pp, cp=cp, dp=dp, zero=zero, recompute=rc, microbatch_size=mbs,
                                       schedule=sched, virtual_stages=v, global_batch=1536 * 4 // 4,
                                       sequence_parallel=tp > 1))
        except ConfigError:
            pass
    evaluated = valid = 0
    t0 = time.perf_counter()
    while evaluated < 10_000:
        for s in candidates:
            try:
                estimate(build_step(spec, s, cluster))
                valid += 1
            except ConfigError:
                pass
            evaluated += 1
            if evaluated == 10_000:
                break
    dt = time.perf_counter() - t0
    print(f"analytic path: {evaluated} evaluations ({valid} valid strategies, {len(candidates)} distinct) "
          f"in {dt:.2f} s = {dt / evaluated * 1e3:.3f} ms each")


if __name__ == "__main__":
    main()
