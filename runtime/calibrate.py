"""The calibration loop: fit the few figures microbenchmarks cannot see to measured steps.

Microbenchmarks time a GEMM or a collective alone. A training step on processes that share a
host's cores also loses to what runs between them: ranks drift apart and wait for descheduled
peers at every collective, caches are shared, the framework's own work competes for the
cores. `paraplan profile` therefore runs a few reference plans of a small GPT with the real
runtime (`paraplan run`, gloo) and fits three figures of the profile's `calibration`:

    compute       the fraction of the microbenchmarks' compute and memory rates a step keeps
    latency_us    a collective hop's latency between compute (the link's alpha)
    host_wait_us  the extra wait per hop for each further process per core
    shared_compute  the fraction of its share of a core a process keeps when processes
                  outnumber cores (time slicing, shared caches, gloo's threads)
    call_us       a collective call's fixed cost, whatever its hops (DTensor and
                  functional-collective dispatch, the wait for every member)

Formulation, in two stages so that each figure is identified by the runs that depend on it:
`compute` minimises (log predicted - log measured)^2 of the one-process plan (no
communication, no sharing); then, with it fixed, (latency_us, host_wait_us, shared_compute, call_us) minimise the sum
of squared log errors over the parallel plans. Both over exhaustive grids (the simulator is
cheap), so each optimum is global on its grid. The reference model and plans differ from
those of bench/fidelity.py, which then measures the fit out of sample.
"""

from __future__ import annotations

import copy
import itertools
import json
import math
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import yaml

from costmodel import Strategy, predict
from costmodel.cluster import _cluster, load_profile_data
from costmodel.spec import ModelSpec

ROOT = Path(__file__).resolve().parent.parent
REFERENCE = ModelSpec(name="calibration-gpt", layers=2, hidden=320, heads=4, vocab=512, seq_len=256,
                      tied_embeddings=False, dropout=False)
REFERENCE_BATCH = 8
SINGLE = "single"
# name -> strategy fields: one process, then data, tensor and pipeline parallel at 1x, 2x, 4x the cores
REFERENCE_PLANS = {
    SINGLE: dict(microbatch_size=4),
    "tp2": dict(tp=2, microbatch_size=8),
    "dp4": dict(dp=4, microbatch_size=2),
    "tp4": dict(tp=4, microbatch_size=8),
    "pp2_dp2": dict(pp=2, dp=2, microbatch_size=1, schedule="1f1b"),
    "dp2_tp4": dict(dp=2, tp=4, microbatch_size=4),
    "dp2_tp2_sp": dict(dp=2, tp=2, sequence_parallel=True, microbatch_size=2),
}
COMPUTE = np.round(np.arange(0.40, 1.201, 0.05), 2)
LATENCY_US = np.geomspace(100, 10_000, 11)
WAIT_US = np.concatenate([[0.0], np.geomspace(50, 5_000, 7)])
SHARED_COMPUTE = np.round(np.arange(0.6, 1.001, 0.1), 2)
CALL_US = np.concatenate([[0.0], np.geomspace(100, 10_000, 7)])



def reference_strategy(name: str) -> Strategy:
    return Strategy(precision="fp32", global_batch=REFERENCE_BATCH, **REFERENCE_PLANS[name])


def measure_reference(profile_path: Path, steps: int, bar=None, repeats: int = 2) -> dict[str, float]:
    """Step seconds of each reference plan under `paraplan run`: the mean over `repeats`
    launches of each launch's median step (a shared VM's runs differ by 10-20%)."""
    from planner.plan import plan_from_strategy

    measured = {}
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    with tempfile.TemporaryDirectory() as tmp:
        for name in REFERENCE_PLANS:
            s = reference_strategy(name)
            cluster = f"{profile_path}:{s.world_size}"
            plan = plan_from_strategy(REFERENCE, s, cluster, {})
            path = Path(tmp) / f"{name}.yaml"
            path.write_text(plan.to_yaml())
            times = []
            for _ in range(repeats):
                out = subprocess.run([sys.executable, "-m", "cli", "run", str(path), "--steps", str(steps),
                                      "--json"], capture_output=True, text=True, env=env, cwd=ROOT, timeout=900)
                if out.returncode != 0:
                    raise RuntimeError(f"calibration run {name} failed: {out.stderr.strip().splitlines()[-1:]}")
                times.append(json.loads(out.stdout)["step_time_s"])
            measured[name] = sum(times) / len(times)
            if bar is not None:
                bar.update()
    return measured


def _predicted(profile: dict, name: str) -> float:
    s = reference_strategy(name)
    return predict(REFERENCE, s, _cluster(profile, "calibration", 1, s.world_size, {})).step_time_s


def _best(profile: dict, measured: dict[str, float], grid) -> tuple[dict, dict[str, float]]:
    best = None
    for cal in grid:
        trial = copy.deepcopy(profile)
        trial["calibration"] = cal
        logs = {n: math.log(_predicted(trial, n) / m) for n, m in measured.items()}
        loss = sum(v * v for v in logs.values())
        if best is None or loss < best[0]:
            best = (loss, cal, logs)
    return best[1], best[2]


def fit(profile: dict, measured: dict[str, float]) -> dict:
    """The two-stage least-squares fit (module docstring) and each reference plan's error."""
    single = {SINGLE: measured[SINGLE]}
    cal, _ = _best(profile, single, ({"compute": float(c)} for c in COMPUTE))
    compute = cal["compute"]
    parallel = {n: m for n, m in measured.items() if n != SINGLE}
    grid = ({"compute": compute, "latency_us": float(a), "host_wait_us": float(w), "shared_compute": float(e),
             "call_us": float(c)}
            for a, w, e, c in itertools.product(LATENCY_US, WAIT_US, SHARED_COMPUTE, CALL_US))
    cal, _ = _best(profile, parallel, grid)
    trial = copy.deepcopy(profile)
    trial["calibration"] = cal
    logs = {n: math.log(_predicted(trial, n) / m) for n, m in measured.items()}
    return {
        "compute": round(cal["compute"], 3),
        "latency_us": round(cal["latency_us"], 1),
        "host_wait_us": round(cal["host_wait_us"], 1),
        "shared_compute": cal["shared_compute"],
        "call_us": round(cal["call_us"], 1),
        "fitted_to": {n: {"measured_s": round(measured[n], 4), "error_pct": round(100 * math.expm1(v), 1)}
                      for n, v in logs.items()},
    }


def calibrate(profile_path: Path, steps: int = 10, bar=None) -> dict:
    """Run the reference plans on this machine and fit the calibration of `profile_path`."""
    measured = measure_reference(profile_path, steps, bar)
    data = load_profile_data(str(profile_path))
    data.pop("calibration", None)
    return fit(data, measured)


def main() -> None:
    """python -m runtime.calibrate PROFILE.yaml [--refit]: measure and fit, or (--refit) fit
    again to the measurements the profile's calibration recorded; write it back."""
    path = Path(sys.argv[1])
    if "--refit" in sys.argv:
        data = load_profile_data(str(path))
        measured = {n: v["measured_s"] for n, v in data.pop("calibration")["fitted_to"].items()}
        cal = fit(data, measured)
    else:
        cal = calibrate(path)
    data = yaml.safe_load(path.read_text())
    data["calibration"] = cal
    from planner.files import atomic_write_text

    atomic_write_text(path, yaml.safe_dump(data, sort_keys=False, default_flow_style=None, width=110))
    print(json.dumps(cal, indent=1))


if __name__ == "__main__":
    main()
