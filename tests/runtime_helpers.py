"""Plans and torchrun launches shared by the runtime tests."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from costmodel import Strategy, load_cluster, predict
from planner.plan import plan_from_strategy
from planner.zoo import ZOO

ROOT = Path(__file__).resolve().parent.parent
BATCH = 8

# name -> (strategy, world size). fp32 throughout: the parity tolerance is for fp32.
CONFIGS = {
    "dp": dict(dp=4, microbatch_size=2),
    "zero2": dict(dp=4, zero=2, microbatch_size=2),
    "fsdp": dict(dp=4, zero=3, microbatch_size=2),
    "fsdp_full_recompute": dict(dp=4, zero=3, microbatch_size=2, recompute="full"),
    "hsdp": dict(dp=4, zero=3, shard_group=2, microbatch_size=2),
    "tp": dict(tp=2, dp=2, microbatch_size=4),
    "tp_sp": dict(tp=2, dp=2, sequence_parallel=True, microbatch_size=4),
    "tp_sp_selective_recompute": dict(tp=2, dp=2, sequence_parallel=True, microbatch_size=4, recompute="selective"),
    "pp_gpipe": dict(pp=4, microbatch_size=2, schedule="gpipe"),
    "pp_1f1b": dict(pp=4, microbatch_size=2, schedule="1f1b"),
    "pp_1f1b_full_recompute": dict(pp=4, microbatch_size=2, schedule="1f1b", recompute="full"),
    "pp_interleaved": dict(pp=2, dp=2, microbatch_size=2, schedule="interleaved", virtual_stages=2),
    "3d": dict(pp=2, dp=2, tp=2, sequence_parallel=True, microbatch_size=2, schedule="1f1b"),
    "3d_interleaved_fsdp_recompute": dict(pp=2, dp=2, tp=2, zero=3, microbatch_size=2, schedule="interleaved",
                                          virtual_stages=2, recompute="full"),
    "pp_zero_bubble": dict(pp=4, microbatch_size=2, schedule="zero-bubble"),
    "pp_zero_bubble_interleaved_zero1": dict(pp=2, dp=2, zero=1, microbatch_size=2, schedule="zero-bubble",
                                             virtual_stages=2),
}
MODELS = ("tiny-gpt", "tiny-llama")


GRAD_NORM_TOLERANCE = 1e-5  # relative: the layouts reorder fp32 sums (measured within 2e-6 over 4 steps)


def assert_same_gradients(ours: dict, ref: dict, tolerance: float = GRAD_NORM_TOLERANCE) -> None:
    """Each step's global gradient norm before clipping (`grad_norms` of a run's result) equals the
    reference run's: AdamW's update is blind to a gradient's scale, so a parameter whose gradient a
    layout sums over ranks that hold the same tokens (twice the true gradient under tp 2) trains
    the same losses; its norm does not."""
    a, b = ours["grad_norms"], ref["grad_norms"]
    assert len(a) == len(b) > 0
    for step, (x, y) in enumerate(zip(a, b), 1):
        assert abs(x - y) <= tolerance * abs(y), f"gradient norm, step {step}: {x} vs {y}"


def strategy(name: str) -> Strategy:
    return Strategy(precision="fp32", global_batch=BATCH, **CONFIGS[name])


def write_plan(directory: Path, model: str, s: Strategy, name: str) -> Path:
    spec = ZOO[model]
    cluster = f"cpu:{s.world_size}"
    plan = plan_from_strategy(spec, s, cluster, predict(spec, s, load_cluster(cluster)).predicted())
    path = directory / f"{model}__{name}.yaml"
    path.write_text(plan.to_yaml())
    return path


def write_source_plan(directory: Path, model: str, s: Strategy, name: str) -> Path:
    """A plan for a user's module (`hf:DIR` or `py:MODULE:CALLABLE`), named as that module is."""
    from planner.model_source import load_model, source_and_map

    spec, _ = load_model(model)
    source, module_map, _ = source_and_map(model, spec)
    cluster = f"cpu:{s.world_size}"
    plan = plan_from_strategy(spec, s, cluster, predict(spec, s, load_cluster(cluster)).predicted(), source=source,
                              module_map=module_map)
    path = directory / f"{name}.yaml"
    path.write_text(plan.to_yaml())
    return path


def worker_env() -> dict[str, str]:
    """The environment of a test's worker processes: one thread each, the repository and tests importable."""
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / 'tests'}"}


def torchrun(nproc: int, plans: list[Path], out: Path, *extra: str, timeout: int = 900) -> subprocess.CompletedProcess:
    env = worker_env()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           "-m", "runtime.worker", *map(str, plans), "--out", str(out), *extra]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env, timeout=timeout)


def launch(nproc: int, plans: list[Path], out: Path, *extra: str, preload: tuple[str, ...] = (),
           timeout: int = 900) -> subprocess.CompletedProcess:
    """As `torchrun`, on ranks forked after one import of torch (tests/fork_launch.py): for the
    tests that train many plans; the ones about torchrun itself (restarts, `paraplan run`) use it."""
    env = worker_env()
    loads = [a for module in preload for a in ("--preload", module)]
    cmd = [sys.executable, str(ROOT / "tests" / "fork_launch.py"), str(nproc), *loads, *map(str, plans),
           "--out", str(out), *extra]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env, timeout=timeout)


def read_results(out: Path) -> dict[str, dict]:
    results = {}
    for line in out.read_text().splitlines():
        d = json.loads(line)
        results[Path(d["plan"]).stem] = d
    return results


def launch_by_world(by_world: dict[int, list[Path]], directory: Path, *extra: str,
                    preload: tuple[str, ...] = ()) -> dict[str, dict]:
    """Each world size's plans on one launch of that many processes (`launch`), in order of size;
    every plan's result by its name. A launch that fails fails the test with its stderr's tail."""
    results: dict[str, dict] = {}
    for world, plans in sorted(by_world.items()):
        out = directory / f"world{world}.jsonl"
        proc = launch(world, plans, out, *extra, preload=preload)
        assert proc.returncode == 0, proc.stderr[-3000:]
        results.update(read_results(out))
    return results
