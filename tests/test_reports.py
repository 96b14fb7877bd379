"""Reports: the files and pictures, numbers equal to `paraplan simulate --json`, compare."""

import csv
import json

import pytest

from costmodel import load_cluster
from planner.zoo import ZOO
from reports.build import build_report
from reports.strategies import canonical
from tests_helpers import paraplan

MODEL, CLUSTER, BATCH = "gpt3-1.3b", "a100-80g:16", 64


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = tmp_path_factory.mktemp("report")
    summary = build_report(ZOO[MODEL], load_cluster(CLUSTER), BATCH, out, ("md", "html"))
    return out, summary


def test_report_files(report):
    out, summary = report
    for name in ("report.md", "report.html", "strategies.csv", "memory.png", "throughput_vs_memory.png",
                 "scaling.png", "timeline.png", "breakdown.png"):
        assert (out / name).exists() and (out / name).stat().st_size > 1000, name
    assert (out / "memory.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = (out / "report.md").read_text()
    assert "planner's choice" in md and "![timeline](timeline.png)" in md
    assert summary["strategies"] >= 20 and summary["fitting"] >= 1


def test_every_loser_says_what_binds(report):
    out, _ = report
    rows = list(csv.DictReader((out / "strategies.csv").open()))
    assert rows[0]["binds"].startswith("fastest")
    for row in rows[1:]:
        assert row["binds"].split(":")[0] in ("memory", "compute", "the pipeline bubble",
                                               "tensor-parallel communication", "data-parallel communication left exposed",
                                               "context-parallel communication", "recomputation"), row


def _flags(s) -> list[str]:
    d = s.to_dict()
    flags = ["--tp", d["tp"], "--pp", d["pp"], "--dp", d["dp"], "--cp", d["cp"], "--zero", d["zero"],
             "--recompute", d["recompute"], "--microbatch-size", d["microbatch_size"], "--schedule", d["schedule"],
             "--virtual-stages", d["virtual_stages"], "--precision", d["precision"],
             "--sequence-parallel" if d["sequence_parallel"] else "--no-sequence-parallel",
             "--flash-attention" if d["flash_attention"] else "--no-flash-attention"]
    if d["zero"]:
        flags += ["--shard-group", d["shard_group"]]
    return [str(f) for f in flags]


def test_report_numbers_equal_simulate_json(report):
    out, _ = report
    rows = {r["strategy"]: r for r in csv.DictReader((out / "strategies.csv").open())}
    strategies = canonical(ZOO[MODEL], load_cluster(CLUSTER), BATCH)
    checked = 0
    for name in ("FSDP (ZeRO-3), none recompute", "TP8+SP, full recompute", "PP8 interleaved, none recompute",
                 "HSDP, selective recompute (no FlashAttention)"):
        if name not in strategies:
            continue
        sim = paraplan("simulate", "--model", MODEL, "--cluster", CLUSTER, "--global-batch", str(BATCH),
                       *_flags(strategies[name]), "--json")
        assert sim.returncode == 0, sim.stderr
        pred = json.loads(sim.stdout)["predicted"]
        row = rows[name]
        assert float(row["tokens_per_s"]) == pred["tokens_per_s"]
        assert float(row["step_time_s"]) == pred["step_time_s"]
        assert float(row["mfu"]) == pred["mfu"]
        assert float(row["memory_gib"]) == pred["memory_gib"]["total"]
        checked += 1
    assert checked >= 3


def test_compare_plans_side_by_side(tmp_path):
    a, b = tmp_path / "a.yaml", tmp_path / "b.yaml"
    assert paraplan("simulate", "--model", MODEL, "--cluster", CLUSTER, "--tp", "2", "--global-batch", "32",
                    "-o", str(a)).returncode == 0
    assert paraplan("simulate", "--model", MODEL, "--cluster", CLUSTER, "--zero", "3", "--global-batch", "32",
                    "-o", str(b)).returncode == 0
    out = paraplan("compare", str(a), str(b), "--json")
    rows = json.loads(out.stdout)
    assert [r["zero"] for r in rows] == [0, 3] and rows[0]["mesh"] != rows[1]["mesh"]
    text = paraplan("compare", str(a), str(b))
    assert "step_time_s" in text.stdout and str(a) in text.stdout


def test_report_bad_format(tmp_path):
    out = paraplan("report", "--model", MODEL, "--cluster", CLUSTER, "--global-batch", "8", "-o", str(tmp_path),
                   "--format", "pdf")
    assert out.returncode == 2 and "--format" in out.stderr


def test_a_report_of_a_plan_ranks_it_among_the_rest(tmp_path):
    """`paraplan report PLAN`: the plan's model, cluster and batch, the plan itself in the table,
    ranked among the strategies that fit (a tie shares the better rank; a plan edited past the
    GPU's memory says what binds); a serving plan reports its own setup; a flag the plan already
    says is one line, and without a plan --model and --cluster are asked for."""
    tp2, edited = tmp_path / "tp2.yaml", tmp_path / "edited.yaml"
    assert paraplan("simulate", "--model", MODEL, "--cluster", CLUSTER, "--tp", "2", "--global-batch", "32",
                    "-o", str(tp2)).returncode == 0
    out = paraplan("report", str(tp2), "-o", str(tmp_path / "r"), "--json")
    summary = json.loads(out.stdout)
    rank = summary["ranks"]["the plan tp2.yaml"]
    assert (summary["model"], summary["cluster"], summary["global_batch"]) == (MODEL, CLUSTER, 32)
    rows = list(csv.DictReader((tmp_path / "r" / "strategies.csv").open()))
    mine = next(r for r in rows if r["strategy"] == "the plan tp2.yaml")
    faster = sum(float(r["step_time_s"]) < float(mine["step_time_s"]) * (1 - 1e-6) for r in rows if r["fits"] == "True")
    assert rank == 1 + faster > 1 and "tp 2" in mine["layout"]
    assert f"ranks {rank} of the {summary['fitting']} that fit" in (tmp_path / "r" / "report.md").read_text()
    import yaml

    data = yaml.safe_load(tp2.read_text())
    data["mesh"].update(tp=1, dp_replicate=16, dp_shard=1)
    data["global_batch"], data["schedule"]["microbatch_size"] = 1024, 64
    edited.write_text(yaml.safe_dump(data))
    out = paraplan("report", str(edited), "-o", str(tmp_path / "e"))
    assert out.returncode == 0 and "the plan edited.yaml does not fit" in out.stdout, out.stderr
    serving = tmp_path / "serve.yaml"
    assert paraplan("plan", "--mode", "inference", "--model", "llama3-8b", "--cluster", "h100-sxm:1", "--prompt-len",
                    "512", "--output-len", "128", "-o", str(serving)).returncode == 0
    out = paraplan("report", str(serving), "-o", str(tmp_path / "s"))
    assert out.returncode == 0 and (tmp_path / "s" / "report.md").exists() and "h100-sxm:1: tp1 x pp1" in out.stdout
    lora = tmp_path / "lora.yaml"
    assert paraplan("plan", "--mode", "lora", "--model", "llama3-8b", "--cluster", "a100-80g:1", "--global-batch", "8",
                    "-o", str(lora)).returncode == 0
    broken = yaml.safe_load(serving.read_text())
    del broken["serving"]["prompt_len"]
    (tmp_path / "broken.yaml").write_text(yaml.safe_dump(broken))
    for argv, needle in (((str(tp2), "--global-batch", "8"), "--global-batch comes from the plan"),
                         ((str(tmp_path / "broken.yaml"),), "its `serving` section: prompt_len is missing"),
                         ((str(lora),), "is a LoRA plan and a report ranks full-training strategies"),
                         ((str(tp2), "--mode", "inference"), "--mode comes from the plan"),
                         ((), "report needs --model and --cluster (or a plan")):
        out = paraplan("report", *argv, "-o", str(tmp_path / "x"))
        assert out.returncode == 2 and needle in out.stderr and len(out.stderr.strip().splitlines()) == 1, out.stderr
