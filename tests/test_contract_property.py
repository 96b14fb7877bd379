"""The plan -> check -> run contract, as a property over a seeded grid of requests.

Small models (GPT and Llama shapes, tied and untied, learned and rotary positions), CPU
clusters of 1 to 8 processes and random fixed flags: `paraplan plan` either refuses in one
line with exit status 2, or writes a plan that `paraplan check` accepts, that `paraplan
run`'s pre-launch refusal (the same function) lets through, and that trains 2 steps on real
gloo process groups (one launch per world size, the worker running its plans in turn).
The number of cases is printed (run pytest with -s to see it).
"""

from __future__ import annotations

import json
import random
from collections import Counter

import pytest
import yaml

from cli.main import main
from planner.plan import Plan
from runtime.launch import refuse_unrunnable
from runtime_helpers import launch, read_results

SEED = 12
CASES = 14

SHAPES = {
    "gpt": dict(layers=4, hidden=64, heads=4, vocab=256, seq_len=32, dropout=False),
    "gpt-tied": dict(layers=4, hidden=64, heads=4, vocab=256, seq_len=32, dropout=False, tied_embeddings=True),
    "llama": dict(layers=4, hidden=64, heads=4, kv_heads=2, ffn_hidden=176, vocab=256, seq_len=32,
                  activation="swiglu", norm="rmsnorm", position="rope", tied_embeddings=False, bias=False,
                  dropout=False),
    "llama-tied": dict(layers=6, hidden=64, heads=8, kv_heads=4, ffn_hidden=128, vocab=128, seq_len=16,
                       activation="swiglu", norm="rmsnorm", position="rope", tied_embeddings=True, bias=False,
                       dropout=False),
}
FLAGS = {
    "--tp": ["1", "2", "4", "3"],
    "--pp": ["1", "2", "4", "3"],
    "--zero": ["0", "1", "2", "3"],
    "--recompute": ["none", "selective", "full"],
    "--microbatch-size": ["1", "2", "4"],
    "--schedule": ["gpipe", "1f1b", "interleaved"],
    "--seq-len": ["16", "32", "64"],
    "--precision": ["fp32", "bf16"],
    "--sequence-parallel": [None],
    "--no-sequence-parallel": [None],
}


def _cases(tmp_path) -> list[tuple[str, list[str]]]:
    rng = random.Random(SEED)
    specs = {}
    for name, fields in SHAPES.items():
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump({"name": name, **fields}))
        specs[name] = str(path)
    out = []
    for k in range(CASES):
        shape = rng.choice(sorted(specs))
        world = rng.randint(1, 8)
        argv = ["plan", "--model", specs[shape], "--cluster", f"cpu-2core:{world}",
                "--global-batch", str(rng.choice([4, 8, 16])), "--no-timing"]
        for flag in rng.sample(sorted(FLAGS), rng.randint(0, 3)):
            if flag == "--no-sequence-parallel" and "--sequence-parallel" in argv:
                continue
            value = rng.choice(FLAGS[flag])
            argv += [flag] if value is None else [flag, value]
        out.append((f"case{k}_{shape}_w{world}", argv))
    return out


def test_every_plan_written_is_checked_and_runs(tmp_path, capsys):
    outcomes: Counter = Counter()
    by_world: dict[int, list] = {}
    for name, argv in _cases(tmp_path):
        path = tmp_path / f"{name}.plan.yaml"
        code = main([*argv, "-o", str(path), "--json"])
        out, err = capsys.readouterr()
        if code == 2:
            lines = err.strip().splitlines()
            assert len(lines) == 1 and lines[0].startswith("paraplan: error: "), (argv, err)
            assert "Traceback" not in err and not path.exists(), argv
            outcomes["refused"] += 1
            continue
        assert code == 0, (argv, err)
        assert json.loads(out)["plan"]
        assert main(["check", str(path)]) == 0, (argv, capsys.readouterr().err)
        capsys.readouterr()
        plan = Plan.load(path)
        refuse_unrunnable(plan)  # what `paraplan run` does before it launches
        by_world.setdefault(plan.world_size, []).append(path)
        outcomes["planned"] += 1
    for world, plans in sorted(by_world.items()):
        out = tmp_path / f"world{world}.jsonl"
        proc = launch(world, plans, out, "--steps", "2")
        assert proc.returncode == 0, proc.stderr[-3000:]
        results = read_results(out)
        assert len(results) == len(plans)
        for key, summary in results.items():
            assert len(summary["losses"]) == 2 and all(loss == loss for loss in summary["losses"]), key
    with capsys.disabled():
        print(f"\ncontract property: {CASES} cases ({outcomes['planned']} planned, checked and trained 2 steps on "
              f"{len(by_world)} world sizes; {outcomes['refused']} refused in one line)")
    assert outcomes["planned"] >= CASES // 3  # the grid exercises the runtime, not only the refusals
