"""The goodput planner (planner.serving_search) and the serving-under-traffic commands."""

import json

import pytest
import yaml

from costmodel import ConfigError, load_cluster
from costmodel.traffic import SLO, SchedulerConfig, ServingLayout, simulate_traffic
from costmodel.workload import Request, mean_lengths
from planner.serving_search import (TrafficWorkload, deployment_key, meets, plan_traffic, unit_bound,
                                    unit_max_rate)
from planner.zoo import ZOO
from tests_helpers import paraplan as _paraplan

SPEC = ZOO["llama3-8b"]
SLO_CHAT = SLO.parse("ttft_p99=0.5,tpot_p99=30ms")


def paraplan(*args):
    out = _paraplan(*args)
    return out.returncode, out.stdout, out.stderr


def _main(capsys, *argv):
    """The command line in this process (the refusals: no interpreter start each)."""
    from cli.main import main

    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_the_bound_bounds_and_the_found_rate_is_served():
    cluster = load_cluster("h100-sxm:1")
    unit, cfg = ServingLayout(tp=1), SchedulerConfig()
    wl = TrafficWorkload.of("chat", requests=400)
    prompt, output = mean_lengths(wl.probe(1.0, SPEC.seq_len))
    bound = unit_bound(SPEC, cluster, unit, cfg, prompt, output, SLO_CHAT)
    top, probes = unit_max_rate(SPEC, cluster, unit, cfg, wl, SLO_CHAT, bound)
    assert probes == 6 and 0 < top < bound
    served = simulate_traffic(SPEC, cluster, wl.probe(top, SPEC.seq_len), unit, cfg, SLO_CHAT)
    over = simulate_traffic(SPEC, cluster, wl.probe(1.5 * top, SPEC.seq_len), unit, cfg, SLO_CHAT)
    assert meets(served, SLO_CHAT, 0.2) and not meets(over, SLO_CHAT, 0.2)  # the rate found is near the edge
    # a tighter TPOT target serves less; one below a lone request's decode step serves nothing
    tight = SLO.parse("ttft_p99=0.5,tpot_p99=15ms")
    assert 0 < unit_max_rate(SPEC, cluster, unit, cfg, wl, tight,
                             unit_bound(SPEC, cluster, unit, cfg, prompt, output, tight))[0] < top
    never = SLO.parse("ttft_p99=0.5,tpot_p99=1ms")
    assert unit_bound(SPEC, cluster, unit, cfg, prompt, output, never) == 0
    assert unit_max_rate(SPEC, cluster, unit, cfg, wl, never, 0.0) == (0.0, 0)


def test_the_plan_meets_its_objectives_at_the_rate_with_the_fewest_gpus_of_its_unit():
    cluster = load_cluster("h100-sxm:2")
    wl = TrafficWorkload.of("chat", requests=400)
    found = plan_traffic(SPEC, cluster, wl, 30.0, SLO_CHAT)
    best = found.best
    # the fewest GPUs that serve 30/s: one H100 (tp1 x pp2 serves more per GPU, but needs two)
    served = [r for r in found.results if r.max_rate_rps > 0]
    assert deployment_key(30.0, best.max_rate_rps, best.gpus) == min(
        deployment_key(30.0, r.max_rate_rps, r.gpus) for r in served)
    assert found.deployment.gpus == 1 and best.goodput_per_gpu < max(r.goodput_per_gpu for r in served)
    # at a rate no one GPU serves, the most goodput per GPU decides among as many GPUs
    many = plan_traffic(SPEC, cluster, wl, 60.0, SLO_CHAT)
    assert many.deployment.gpus == 2
    assert many.best.goodput_per_gpu == max(r.goodput_per_gpu for r in many.results
                                            if deployment_key(60.0, r.max_rate_rps, r.gpus)[0] == 2)
    assert found.units == -(-30.0 // best.max_rate_rps)
    assert found.deployment.gpus == found.units * best.gpus
    assert meets(found.at_rate, SLO_CHAT, 0.2)
    # tp1, tp2, tp1 x pp2, and 1 prefill + 1 decode of tp1, at two token budgets and two sequence limits, and the
    # steady-state planner's replica and batch at both budgets: each priced or bounded out
    from planner.serving_search import MAX_SEQS, static_unit

    static = static_unit(SPEC, cluster, *mean_lengths(wl.probe(1.0, SPEC.seq_len)), SLO_CHAT)
    assert found.skipped + len(found.results) == 16 + (2 if static[1] not in MAX_SEQS else 0)


def test_commands(tmp_path, capsys):
    code, out, err = paraplan("simulate", "--mode", "inference", "--model", "llama3-8b", "--cluster", "h100-sxm:2",
                              "--workload", "chat", "--rate", "10", "--requests", "300", "--slo", "ttft_p99=1",
                              "--json", "--trace", str(tmp_path / "t.json"))
    assert code == 0, err
    p = json.loads(out)["predicted"]
    for key in ("ttft_p50_s", "ttft_p90_s", "ttft_p99_s", "tpot_p50_s", "tpot_p90_s", "tpot_p99_s", "e2e_p50_s",
                "e2e_p90_s", "e2e_p99_s", "throughput_tokens_per_s", "goodput_rps", "preemptions", "prefix_hit_rate",
                "ttft_s", "tpot_s", "kv_cache_bytes_per_token", "max_batch"):
        assert key in p, key
    assert p["ttft_p50_s"] <= p["ttft_p90_s"] <= p["ttft_p99_s"]
    trace = json.loads((tmp_path / "t.json").read_text())
    assert {e["ph"] for e in trace["traceEvents"]} >= {"M", "X", "C"}
    trace_file = tmp_path / "w.csv"
    trace_file.write_text("arrival_s,prompt_tokens,output_tokens\n0,100,10\n1,2000,50\n2,300,20\n")
    code, out, err = _main(capsys, "simulate", "--mode", "inference", "--model", "llama3-8b", "--cluster", "h100-sxm:1",
                           "--workload", str(trace_file), "--json")
    assert code == 0, err
    assert json.loads(out)["predicted"]["requests"] == 3
    for argv, needle in (
            (["--workload", "chat"], "--rate"),
            (["--workload", "chat", "--rate", "1", "--zero", "3"], "--zero"),
            (["--workload", "chat", "--rate", "-2"], "--rate"),
            (["--workload", "chat", "--rate", "1", "--slo", "ttft=1"], "--slo"),
            (["--workload", str(tmp_path / "missing.csv")], "no trace file"),
            (["--workload", "chat", "--rate", "1", "--tp", "3"], "tp(3)"),
            (["--workload", "chat", "--rate", "1", "--tp", "8", "--pp", "2"], "needs 16 GPUs; the cluster has 8"),
            (["--workload", "chat", "--rate", "1", "--workload-seed", "-1"], "--workload-seed must be"),
            (["--workload", "chat", "--rate", "1", "--block-size", "0"], "--block-size must be"),
            (["--workload", "chat", "--rate", "1", "--block-size", "24"], "--block-size 24: vllm takes 1, 8, 16"),
            (["--workload", "chat", "--rate", "1", "--block-size", "256", "--engine", "tensorrt-llm"],
             "tensorrt-llm takes 8, 16, 32, 64, 128")):
        code, out, err = _main(capsys, "simulate", "--mode", "inference", "--model", "llama3-8b", "--cluster",
                               "h100-sxm:8", *argv)
        assert code == 2 and needle in err and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    code, _, err = _main(capsys, "simulate", "--model", "llama3-8b", "--cluster", "h100-sxm:8", "--workload", "chat")
    assert code == 2 and "--mode inference" in err
    plan = tmp_path / "serve.yaml"
    code, out, err = paraplan("plan", "--mode", "inference", "--model", "llama3-8b", "--cluster", "h100-sxm:1",
                              "--workload", "chat", "--rate", "20", "--slo", "ttft_p99=0.5,tpot_p99=30ms", "-o", str(plan),
                              "--json")
    assert code == 0, err
    got = json.loads(out)
    serving = got["plan"]["serving"]
    assert serving["workload"] == "chat" and serving["rate"] == 20 and serving["replicas"] >= 1
    assert got["plan"]["predicted"]["goodput_rps_per_gpu"] == max(u["goodput_rps_per_gpu"] for u in got["units"])
    assert plan.exists()
    # exported to vLLM with the searched scheduler settings and the model's whole context
    from engines import vllm
    from planner.plan import Plan

    cmd = vllm.export(Plan.load(plan))
    assert cmd[cmd.index("--max-num-seqs") + 1] == str(serving["max_num_seqs"])
    assert cmd[cmd.index("--max-num-batched-tokens") + 1] == str(serving["max_num_batched_tokens"])
    assert cmd[cmd.index("--max-model-len") + 1] == str(SPEC.seq_len)
    assert "--enable-chunked-prefill" in cmd and "--enable-prefix-caching" in cmd
    code, _, err = _main(capsys, "plan", "--mode", "inference", "--model", "llama3-8b", "--cluster", "h100-sxm:2",
                         "--workload", "chat", "--rate", "20")
    assert code == 2 and "--slo" in err
    code, _, err = _main(capsys, "plan", "--mode", "inference", "--model", "llama3-8b", "--cluster", "h100-sxm:2",
                         "--workload", "chat", "--rate", "inf", "--slo", "ttft_p99=1")
    assert code == 2 and "finite --rate" in err and len(err.strip().splitlines()) == 1
    # a trace at another rate: its arrivals rescaled (three requests 1 s apart, at 100/s: 10 ms apart)
    code, out, err = _main(capsys, "simulate", "--mode", "inference", "--model", "llama3-8b", "--cluster", "h100-sxm:1",
                           "--workload", str(trace_file), "--rate", "100", "--json")
    assert code == 0, err
    assert json.loads(out)["predicted"]["duration_s"] < 1.0  # 1 s apart as written: over 2 s


def test_a_serving_plan_is_checked_repriced_and_not_trained(tmp_path, capsys):
    """A plan the traffic planner writes: `check` accepts it (its weights and KV cache on the GPUs),
    `simulate --plan` reprices it as planned (the deployment at its rate on the same requests: every
    predicted key equal but the search's own), `run` refuses it in one line (it is served, not
    trained); the steady-state planner's plan likewise, its predicted reproduced whole. `compare`
    sets them side by side, and refuses to set one beside a training plan."""
    traffic = tmp_path / "traffic.yaml"
    code, _, err = _main(capsys, "plan", "--mode", "inference", "--model", "llama3-8b", "--cluster", "h100-sxm:2",
                         "--workload", "chat", "--rate", "30", "--slo", "ttft_p99=1,tpot_p99=50ms", "-o", str(traffic))
    assert code == 0, err
    steady = tmp_path / "steady.yaml"
    code, _, err = _main(capsys, "plan", "--mode", "inference", "--model", "llama3-8b", "--cluster", "h100-sxm:1",
                         "--prompt-len", "512", "--output-len", "128", "-o", str(steady))
    assert code == 0, err
    import yaml

    for path, search_only in ((traffic, {"goodput_rps_per_gpu", "unit_max_rate_rps"}), (steady, set())):
        code, out, err = _main(capsys, "check", str(path))
        assert code == 0 and "OK" in out and "serving plan" in out, err
        code, out, err = _main(capsys, "simulate", "--plan", str(path), "--json")
        assert code == 0, err
        planned = yaml.safe_load(path.read_text())["predicted"]
        again = json.loads(out)["predicted"]
        assert set(planned) - set(again) == search_only
        assert {k: v for k, v in planned.items() if k not in search_only} == {k: again[k] for k in planned
                                                                                 if k not in search_only}
        code, _, err = _main(capsys, "run", str(path))
        assert code == 2 and "served, not trained" in err and len(err.strip().splitlines()) == 1, err
    # side by side, each priced again: the traffic plan's p99 TPOT at its rate, the steady state's TPOT
    code, out, err = _main(capsys, "compare", str(traffic), str(steady), "--json")
    assert code == 0, err
    rows = json.loads(out)
    assert [r["gpus"] for r in rows] == [1, 1]
    assert rows[0]["tpot_ms"] == 1e3 * yaml.safe_load(traffic.read_text())["predicted"]["tpot_p99_s"]
    assert rows[1]["tpot_ms"] == 1e3 * yaml.safe_load(steady.read_text())["predicted"]["tpot_s"]
    training = tmp_path / "train.yaml"
    assert _main(capsys, "simulate", "--model", "llama3-8b", "--cluster", "h100-sxm:8", "--dp", "8", "-o",
                 str(training))[0] == 0
    code, _, err = _main(capsys, "compare", str(steady), str(training))
    assert code == 2 and "serving plans with serving plans" in err


def test_a_damaged_serving_section_is_refused_in_one_line_by_every_command(tmp_path, capsys):
    """planner.serving_plan reads the section for check, simulate --plan and export --to vllm: a
    missing or wrong field is named, exit 2, nothing written."""
    import yaml

    good = tmp_path / "good.yaml"
    code, _, err = _main(capsys, "plan", "--mode", "inference", "--model", "llama3-8b", "--cluster", "h100-sxm:1",
                         "--workload", "chat", "--rate", "10", "--slo", "ttft_p99=1,tpot_p99=50ms", "-o", str(good))
    assert code == 0, err
    base = yaml.safe_load(good.read_text())
    for key, value, needle in (("rate", "abc", "rate must be a number"), ("max_num_seqs", -1, "--max-num-seqs"),
                               ("engine", "sglang", "--engine 'sglang'"), ("replicas", 3, "= 3 GPUs"),
                               ("chunked_prefill", "yes", "chunked_prefill must be true or false"),
                               ("prompt_len", None, "prompt_len is missing"), ("slo", {"a": 1}, "slo must be text"),
                               ("workload", None, "workload is missing"),
                               ("model_path", ["/m"], "model_path must be text")):
        damaged = dict(base, serving={**base["serving"], key: value})
        path = tmp_path / f"{key}.yaml"
        path.write_text(yaml.safe_dump(damaged))
        for argv in (["simulate", "--plan", str(path)], ["export", str(path), "--to", "vllm"]):
            code, out, err = _main(capsys, *argv)
            assert code == 2 and needle in err and len(err.strip().splitlines()) == 1 and not out, (argv, err)
        code, _, err = _main(capsys, "check", str(path))
        assert code == 2 and needle in err, err


def test_report_of_serving_under_traffic_and_in_the_steady_state(tmp_path, capsys):
    """`paraplan report --mode inference`: with --workload the goodput planner's unit against the
    steady-state planner's, with a latency-against-rate curve and a timeline; with prompt and
    output lengths the throughput-latency curves of every layout. Refusals in one line, nothing
    written."""
    out = tmp_path / "traffic"
    code, text, err = _main(capsys, "report", "--mode", "inference", "--model", "llama3-8b", "--cluster", "h100-sxm:1",
                            "--workload", "chat", "--rate", "10", "--slo", "ttft_p99=1,tpot_p99=50ms", "-o", str(out),
                            "--json")
    assert code == 0, err
    rows = json.loads(text)["rows"]
    assert {r["who"] for r in rows} == {"planner", "static"}
    planner = next(r for r in rows if r["who"] == "planner")
    assert planner["goodput_per_gpu"] >= max(r["goodput_per_gpu"] for r in rows) > 0
    assert {p.name for p in out.iterdir()} == {"README.md", "traffic.csv", "latency_vs_rate.png", "timeline.png"}
    steady = tmp_path / "steady"
    code, _, err = _main(capsys, "report", "--mode", "inference", "--model", "llama3-8b", "--cluster", "h100-sxm:2",
                         "--prompt-len", "1024", "--output-len", "256", "-o", str(steady))
    assert code == 0, err
    assert {"report.md", "serving.csv", "throughput_vs_latency.png", "kv_capacity.png"} <= {p.name for p in
                                                                                           steady.iterdir()}
    for argv, needle in ((["--mode", "inference"], "--prompt-len and --output-len"),
                         (["--mode", "inference", "--workload", str(tmp_path / "none.csv")], "no trace file"),
                         (["--workload", "chat"], "add --mode inference"),
                         ([], "needs --global-batch"),
                         (["--mode", "inference", "--prompt-len", "100", "--output-len", "10", "--global-batch", "8"],
                          "--global-batch is for training"),
                         (["--mode", "inference", "--prompt-len", "100", "--output-len", "10", "--runtime",
                           "megatron-core"], "a serving report takes --engine"),
                         (["--mode", "inference", "--prompt-len", "100", "--output-len", "10", "--format", "html"],
                          "serving reports are markdown")):
        target = tmp_path / "refused"
        code, _, err = _main(capsys, "report", "--model", "llama3-8b", "--cluster", "h100-sxm:1", "-o", str(target),
                             *argv)
        assert code == 2 and needle in err and len(err.strip().splitlines()) == 1 and not target.exists(), (argv, err)


def test_given_degrees_fix_the_traffic_planners_unit(capsys):
    """`plan --mode inference --workload W --tp 2`: every unit searched has tp 2 (given flags are
    fixed, the rest searched); a degree no unit can have is refused in one line naming those
    that fit."""
    code, out, err = _main(capsys, "plan", "--mode", "inference", "--model", "llama3-8b", "--cluster", "h100-sxm:4",
                           "--workload", "chat", "--rate", "30", "--slo", "ttft_p99=1,tpot_p99=50ms", "--tp", "2",
                           "--json")
    assert code == 0, err
    got = json.loads(out)
    assert got["plan"]["mesh"]["tp"] == 2 and {u["tp"] for u in got["units"]} == {2}
    code, out, err = _main(capsys, "plan", "--mode", "inference", "--model", "llama3-8b", "--cluster", "h100-sxm:4",
                           "--workload", "chat", "--rate", "30", "--slo", "ttft_p99=1,tpot_p99=50ms", "--tp", "8")
    assert code == 2 and "with tp 8 fits" in err and "tp4 x pp1" in err and len(err.strip().splitlines()) == 1



def test_simulate_takes_vllms_defaults_for_the_gpu(capsys):
    """Engine arguments not given are vLLM's for the GPU (its arg_utils): 1024 sequences and 8192
    tokens an iteration on an H100, 256 and 2048 on an A100; given ones are kept."""
    for cluster, want in (("h100-sxm:1", (1024, 8192)), ("a100-80g:1", (256, 2048))):
        code, out, err = _main(capsys, "simulate", "--mode", "inference", "--model", "llama3-8b", "--cluster", cluster,
                               "--workload", "chat", "--rate", "2", "--requests", "50", "--json")
        assert code == 0, err
        sched = json.loads(out)["scheduler"]
        assert (sched["max_num_seqs"], sched["max_num_batched_tokens"]) == want
    code, out, err = _main(capsys, "simulate", "--mode", "inference", "--model", "llama3-8b", "--cluster", "a100-80g:1",
                           "--workload", "chat", "--rate", "2", "--requests", "50", "--max-num-seqs", "64", "--json")
    assert code == 0 and json.loads(out)["scheduler"]["max_num_seqs"] == 64


def test_llama_3_1_checkpoints_read_their_long_context(capsys):
    """A vllm command serving a Llama 3.1 or 3.3 checkpoint is read as Llama 3's shape with its
    131,072 positions: --max-model-len 32768 is taken (it was refused as past Llama 3's 8,192),
    Llama 3's own checkpoints keep 8,192, and Llama 3.1 405B reads 131,072 too."""
    from planner.zoo import ZOO, zoo_name_of_hub_id

    for hub, name in (("meta-llama/Llama-3.1-8B-Instruct", "llama3.1-8b"), ("meta-llama/Meta-Llama-3.1-70B", "llama3.1-70b"),
                      ("meta-llama/Llama-3.3-70B-Instruct", "llama3.1-70b"), ("meta-llama/Meta-Llama-3-8B", "llama3-8b")):
        assert zoo_name_of_hub_id(hub) == name
    assert [ZOO[n].context_len for n in ("llama3-8b", "llama3.1-8b", "llama3.1-70b", "llama3-405b")] == [
        8192, 131072, 131072, 131072]
    assert ZOO["llama3.1-70b"].num_params == ZOO["llama3-70b"].num_params
    code, out, err = _main(capsys, "simulate", "--mode", "inference", "--from", "vllm",
                           "vllm serve meta-llama/Llama-3.1-8B-Instruct --max-model-len 32768", "--cluster", "h100-sxm:1",
                           "--workload", "chat", "--rate", "2", "--requests", "20", "--json")
    assert code == 0 and json.loads(out)["model"] == "llama3.1-8b", err
    code, _, err = _main(capsys, "simulate", "--mode", "inference", "--from", "vllm",
                         "vllm serve meta-llama/Meta-Llama-3-8B --max-model-len 32768", "--cluster", "h100-sxm:1",
                         "--workload", "chat", "--rate", "2", "--requests", "20")
    assert code == 2 and "exceeds llama3-8b's 8192 positions" in err


def test_a_vllm_serve_command_is_priced_as_it_runs(tmp_path, capsys):
    """`simulate --mode inference --from vllm COMMAND`: the layout and engine arguments of a `vllm
    serve` line (a file or the line itself). The command paraplan exports for a traffic plan reads
    back to the same layout and scheduler, priced the same as those flags given by hand; settings
    it does not price are named; a command that fits no GPU count or names no model is refused."""
    plan = tmp_path / "serve.yaml"
    code, _, err = _main(capsys, "plan", "--mode", "inference", "--model", "llama3-8b", "--cluster", "h100-sxm:2",
                         "--workload", "chat", "--rate", "30", "--slo", "ttft_p99=1,tpot_p99=50ms", "-o", str(plan))
    assert code == 0, err
    command = tmp_path / "serve.sh"
    assert _main(capsys, "export", str(plan), "--to", "vllm", "-o", str(command))[0] == 0
    run = ("simulate", "--mode", "inference", "--cluster", "h100-sxm:2", "--workload", "chat", "--rate", "30",
           "--requests", "300", "--json")
    code, out, err = _main(capsys, *run, "--from", "vllm", str(command))
    assert code == 0, err
    got = json.loads(out)
    import yaml

    sv = yaml.safe_load(plan.read_text())["serving"]
    mesh = yaml.safe_load(plan.read_text())["mesh"]
    assert (got["layout"]["tp"], got["layout"]["pp"]) == (mesh["tp"], mesh["pp"])
    assert (got["scheduler"]["max_num_seqs"], got["scheduler"]["max_num_batched_tokens"]) == (
        sv["max_num_seqs"], sv["max_num_batched_tokens"])
    code, out, err = _main(capsys, *run, "--model", "llama3-8b", "--tp", str(mesh["tp"]), "--pp", str(mesh["pp"]),
                           "--replicas", "1", "--max-num-seqs", str(sv["max_num_seqs"]),
                           "--max-num-batched-tokens", str(sv["max_num_batched_tokens"]))
    assert code == 0, err
    assert json.loads(out)["predicted"] == got["predicted"]
    line = ("python -m vllm.entrypoints.openai.api_server --model org/Llama-3-8B --num-scheduler-steps 10 --tensor 2 "
            "--kv-cache-dtype fp8_e4m3 --gpu-memory-utilization 0.8 --quantization awq --enforce-eager")
    code, out, err = _main(capsys, *run, "--from", "vllm", line, "--model", "llama3-8b")
    assert code == 0 and json.loads(out)["layout"]["tp"] == 2  # --tensor: argparse's unique prefix, as vLLM takes it
    scheduler = json.loads(out)["scheduler"]
    assert scheduler["num_scheduler_steps"] == 10  # vLLM 0.6's multi-step scheduling, priced
    assert (scheduler["kv_cache_dtype"], scheduler["gpu_memory_utilization"]) == ("fp8", 0.8)  # priced too
    assert "not understood, not priced: --quantization awq; --enforce-eager" in err  # no CUDA graphs: not priced
    # a built-in model's Hub checkpoint (base or chat-tuned) needs no --model; the export names it so
    for hub_id, name in (("Qwen/Qwen3-30B-A3B", "qwen3-30b-a3b"), ("meta-llama/Meta-Llama-3-8B-Instruct", "llama3-8b")):
        code, out, err = _main(capsys, *run, "--from", "vllm", f"vllm serve {hub_id} -tp 2")
        assert code == 0 and json.loads(out)["model"] == name, err
    for argv, needle in ((["--from", "vllm", line], "give --model for its shape"),
                         (["--from", "vllm", "vllm serve llama3-8b -tp 4"], "the cluster has 2"),
                         (["--from", "vllm", "vllm serve llama3-8b", "--tp", "2"], "drop --tp"),
                         (["--from", "megatron", "x"], "serving reads a vllm serve command")):
        code, _, err = _main(capsys, *run, *argv)
        assert code == 2 and needle in err and len(err.strip().splitlines()) == 1, (argv, err)


def test_a_deployment_sized_for_its_rate_leaves_gpus_free_and_check_accepts_it(tmp_path, capsys):
    """The goodput planner deploys the fewest units that carry the rate: 20 requests/s of
    fixed-length requests (vLLM's benchmark random dataset, `random:1024/128`) need fewer than
    the cluster's 8 GPUs, and `check` accepts the plan on the cluster (it was refused: the mesh of
    the deployment was held to the whole cluster); a cluster smaller than the deployment is
    refused in one line."""
    path = tmp_path / "serve.yaml"
    code, _, err = _main(capsys, "plan", "--mode", "inference", "--model", "llama3-8b", "--cluster", "h100-sxm:8",
                         "--workload", "random:1024/128", "--rate", "20", "--slo", "ttft_p99=2,tpot_p99=60ms",
                         "-o", str(path))
    assert code == 0, err
    import yaml

    plan = yaml.safe_load(path.read_text())
    gpus = plan["mesh"]["tp"] * plan["mesh"]["pp"] * plan["serving"]["replicas"]
    assert plan["serving"]["workload"] == "random:1024/128" and plan["serving"]["prompt_len"] == 1024
    assert gpus < 8
    code, out, err = _main(capsys, "check", str(path))
    assert code == 0 and f"a serving plan of {gpus} GPU" in out, err
    code, out, err = _main(capsys, "simulate", "--plan", str(path), "--json")
    assert code == 0 and json.loads(out)["predicted"]["requests"] == plan["predicted"]["requests"], err
    if gpus > 1:
        code, _, err = _main(capsys, "check", str(path), "--cluster", "h100-sxm:1")
        assert code == 2 and f"deploys {gpus} GPUs but h100-sxm:1 has 1" in err and len(err.strip().splitlines()) == 2


QWEN3_8B_CONFIG = {"architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "hidden_size": 4096,
                   "intermediate_size": 12288, "num_hidden_layers": 36, "num_attention_heads": 32,
                   "num_key_value_heads": 8, "head_dim": 128, "vocab_size": 151936, "max_position_embeddings": 40960,
                   "rms_norm_eps": 1e-6, "rope_theta": 1000000, "tie_word_embeddings": False, "hidden_act": "silu"}


def test_a_hugging_face_model_serves_its_whole_context_or_max_model_len(tmp_path, capsys):
    """A config's max_position_embeddings is what serving may fill (vLLM's default max_model_len),
    while training plans at the shorter length it pre-trains at: Qwen3-8B's 40,960 positions take a
    32,000-token prompt (refused before: its context was the 8,192-token training length);
    --max-model-len cuts it as vLLM's flag does (a --from vllm command's too), the cut shows in the
    exported command, and past the model's positions, or given to a training command, it is refused
    in one line."""
    from planner.model_source import load_model_spec

    cfg = tmp_path / "qwen3-8b" / "config.json"
    cfg.parent.mkdir()
    cfg.write_text(json.dumps(QWEN3_8B_CONFIG))
    spec = load_model_spec(str(cfg))
    assert (spec.seq_len, spec.context_len) == (8192, 40960)
    run = ("simulate", "--mode", "inference", "--model", str(cfg), "--cluster", "h100-sxm:1", "--requests", "4",
           "--rate", "inf", "--json")
    code, out, err = _main(capsys, *run, "--workload", "random:32000/100")
    assert code == 0, err
    assert json.loads(out)["predicted"]["ttft_p50_s"] > 1.0  # a 32K prefill of an 8B model on one H100
    code, _, err = _main(capsys, *run, "--workload", "random:32000/100", "--max-model-len", "16384")
    assert code == 2 and "exceed the model's context of 16384" in err
    code, _, err = _main(capsys, *run, "--workload", "chat", "--max-model-len", "50000")
    assert code == 2 and "--max-model-len 50000 exceeds" in err and "40960 positions" in err
    code, out, err = _main(capsys, "simulate", "--mode", "inference", "--from", "vllm",
                           "vllm serve Qwen/Qwen3-8B --max-model-len 4096", "--model", str(cfg), "--cluster",
                           "h100-sxm:1", "--workload", "random:4000/200", "--rate", "inf", "--requests", "4")
    assert code == 2 and "exceed the model's context of 4096" in err
    plan = tmp_path / "serve.yaml"
    code, _, err = _main(capsys, "plan", "--mode", "inference", "--model", str(cfg), "--cluster", "h100-sxm:1",
                         "--workload", "chat", "--rate", "2", "--slo", "ttft_p99=2,tpot_p99=100ms",
                         "--max-model-len", "16384", "-o", str(plan))
    assert code == 0, err
    code, out, err = _main(capsys, "export", str(plan), "--to", "vllm")
    assert code == 0 and "--max-model-len 16384" in out, err
    code, _, err = _main(capsys, "plan", "--model", str(cfg), "--cluster", "h100-sxm:8", "--global-batch", "8",
                         "--max-model-len", "4096")
    assert code == 2 and "--max-model-len is for serving: add --mode inference" in err
    # a context longer than the KV cache holds: vLLM would not start; the planner says how to cut it
    long = tmp_path / "qwen3-8b-1m" / "config.json"
    long.parent.mkdir()
    long.write_text(json.dumps({**QWEN3_8B_CONFIG, "max_position_embeddings": 1_000_000}))
    traffic = ("plan", "--mode", "inference", "--model", str(long), "--cluster", "h100-sxm:1", "--workload", "chat",
               "--rate", "2", "--slo", "ttft_p99=2,tpot_p99=100ms")
    code, _, err = _main(capsys, *traffic)
    assert code == 2 and "less than one 1000000-token sequence" in err and "(--max-model-len)" in err
    assert _main(capsys, *traffic, "--max-model-len", "32768")[0] == 0
    # simulated, the layout is priced for the workload, and the note says vLLM needs the cut to start
    code, out, err = _main(capsys, "simulate", "--mode", "inference", "--model", str(long), "--cluster", "h100-sxm:1",
                           "--workload", "chat", "--rate", "2", "--requests", "20")
    assert code == 0 and "note: vLLM would not start tp 1 x pp 1" in err and "--max-model-len" in err
    code, out, err = _main(capsys, "simulate", "--mode", "inference", "--model", str(long), "--cluster", "h100-sxm:1",
                           "--workload", "chat", "--rate", "2", "--requests", "20", "--max-model-len", "32768")
    assert code == 0 and "would not start" not in err


def test_a_served_mixture_of_experts_from_its_directory_is_checked_and_exported_as_served(tmp_path, capsys):
    """A Hugging Face mixture of experts planned for traffic with its experts whole over tp: `check`
    judges the replica as served (was: refused with the training rule that a mixture of experts
    under tp runs sequence parallel), and `export --to vllm` serves the directory it was read from
    (was: the directory's name, which `vllm serve` cannot load)."""
    import yaml

    folder = tmp_path / "Qwen3-30B-A3B"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({  # the model card's config.json, its sizing fields
        "architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe", "hidden_size": 2048,
        "intermediate_size": 6144, "moe_intermediate_size": 768, "num_attention_heads": 32, "num_key_value_heads": 4,
        "head_dim": 128, "num_hidden_layers": 48, "num_experts": 128, "num_experts_per_tok": 8,
        "decoder_sparse_step": 1, "mlp_only_layers": [], "norm_topk_prob": True, "vocab_size": 151936,
        "max_position_embeddings": 40960, "rms_norm_eps": 1e-6, "rope_theta": 1000000.0, "hidden_act": "silu",
        "tie_word_embeddings": False}))
    plan = tmp_path / "moe.yaml"
    code, _, err = _main(capsys, "plan", "--mode", "inference", "--model", f"hf:{folder}", "--cluster", "h100-sxm:8",
                         "--workload", "agent", "--rate", "15", "--slo", "ttft_p99=2,tpot_p99=50ms", "--tp", "2",
                         "-o", str(plan))
    assert code == 0, err
    data = yaml.safe_load(plan.read_text())
    assert data["mesh"]["tp"] == 2 and data["serving"]["model_path"] == str(folder.resolve())
    for ep in (False, True):  # each expert split over the two GPUs, or the experts whole over them
        data["serving"]["expert_parallel"] = ep
        plan.write_text(yaml.safe_dump(data))
        code, out, err = _main(capsys, "check", str(plan))
        assert code == 0 and "OK" in out, err
        code, out, err = _main(capsys, "export", str(plan), "--to", "vllm")
        assert code == 0 and out.startswith(f"vllm serve {folder.resolve()} --tensor-parallel-size 2 "), err
        assert ("--enable-expert-parallel" in out) == ep
    # the command read back prices the directory it serves (was: "unknown model" for a path)
    (tmp_path / "serve.sh").write_text(out)
    code, out, err = _main(capsys, "simulate", "--mode", "inference", "--from", "vllm", str(tmp_path / "serve.sh"),
                           "--cluster", "h100-sxm:8", "--workload", "chat", "--rate", "5", "--requests", "50", "--json")
    assert code == 0, err
    got = json.loads(out)
    assert got["model"] == "Qwen3-30B-A3B" and got["layout"]["tp"] == 2 and got["layout"]["expert_parallel"]


def test_flags_serving_under_traffic_does_not_take_are_refused(capsys):
    """Under traffic the requests come from the workload and the objectives from --slo: the steady
    state's request, batch, beam and latency caps, and training's flags, are one line each (they
    were silently ignored: --beam 2 priced nothing); speculative decoding's settings go with a
    draft (--draft-model MODEL or ngram)."""
    base = ("--mode", "inference", "--model", "llama3-8b", "--cluster", "h100-sxm:1", "--workload", "chat",
            "--rate", "2")
    for flag, value, needle in (("--beam", "2", "is for the steady-state serving model"),
                                ("--acceptance", "0.6", "--acceptance goes with --draft-model"),
                                ("--acceptance-length", "2", "--acceptance-length goes with --draft-model"),
                                ("--draft-len", "3", "--draft-len goes with --draft-model"),
                                ("--max-tpot-ms", "50", "latency objectives from --slo"),
                                ("--seq-len", "4096", "does not apply to serving under traffic"),
                                ("--runtime", "paraplan", "does not apply to serving under traffic")):
        for command in (("simulate", "--requests", "20"), ("plan", "--slo", "ttft_p99=1")):
            code, out, err = _main(capsys, command[0], *base, *command[1:], flag, value)
            assert code == 2 and needle in err and len(err.strip().splitlines()) == 1 and not out, (command, flag, err)
    # a degree given as 0 is refused, under traffic and in the steady state (simulate took it for 1)
    for argv in (base + ("--requests", "20"), ("--mode", "inference", "--model", "llama3-8b", "--cluster",
                                                 "h100-sxm:1", "--prompt-len", "100", "--output-len", "10")):
        for flag in ("--tp", "--pp"):
            code, out, err = _main(capsys, "simulate", *argv, flag, "0")
            assert code == 2 and f"{flag} must be a positive integer, got 0" in err and not out, (argv, err)


def test_a_speculative_serving_plan_goes_through_check_export_and_back(tmp_path):
    """Planned for traffic with a draft model: the planner keeps to pp 1 (vLLM's proposers do not
    pipeline), the plan records the draft and the acceptance its --acceptance-length (vLLM's mean
    acceptance length) means, check passes, simulate --plan prices it, the vLLM command carries it
    in --speculative-config and reads back to the same speculation (the acceptance, which the
    command does not say, defaulted and marked so, or given as the plan had it); n-gram
    proposals export as vLLM's ngram method; EAGLE is read as not priced."""
    plan = tmp_path / "spec.yaml"
    code, stdout, err = paraplan("plan", "--mode", "inference", "--model", "llama3-70b", "--cluster", "h100-sxm:8", "--workload",
                   "chat", "--rate", "4", "--slo", "ttft_p99=1,tpot_p99=30ms", "--draft-model", "llama3-8b",
                   "--draft-len", "3", "--acceptance-length", "2.2", "-o", str(plan), "--json")
    assert code == 0, err
    got = json.loads(stdout)
    assert {u["pp"] for u in got["units"] if u["speculative_tokens"]} == {1}
    sv = yaml.safe_load(plan.read_text())["serving"]
    assert (sv["draft_model"], sv["draft_len"]) == ("llama3-8b", 3)
    assert 1 + sv["acceptance"] + sv["acceptance"] ** 2 + sv["acceptance"] ** 3 == pytest.approx(2.2)  # a 0.61
    assert paraplan("check", str(plan))[0] == 0
    edited = yaml.safe_load(plan.read_text())  # pipelined by hand: vLLM would not speculate on it
    edited["mesh"].update(tp=2, pp=2)
    piped = tmp_path / "piped.yaml"
    piped.write_text(yaml.safe_dump(edited))
    code, out, err = paraplan("check", str(piped))
    assert code != 0 and "pp 1" in out + err and "Traceback" not in err
    code, _, err = paraplan("simulate", "--plan", str(plan), "--json")
    assert code == 0, err
    code, exported, _ = paraplan("export", str(plan), "--to", "vllm")
    assert code == 0
    assert """--speculative-config '{"model":"meta-llama/Meta-Llama-3-8B","num_speculative_tokens":3}'""" in exported
    code, back, err = paraplan("simulate", "--mode", "inference", "--from", "vllm", exported.strip(), "--cluster",
                               "h100-sxm:8", "--workload", "chat", "--rate", "4", "--requests", "50", "--json")
    assert code == 0, err
    scheduler = json.loads(back)["scheduler"]
    assert (scheduler["speculative_tokens"], scheduler["draft_model"], scheduler["acceptance"]) == (3, "llama3-8b", 0.6)
    code, back, err = paraplan("simulate", "--mode", "inference", "--from", "vllm", exported.strip(), "--cluster",
                               "h100-sxm:8", "--workload", "chat", "--rate", "4", "--requests", "50",
                               "--acceptance-length", "2.2")
    assert code == 0 and f"each accepted at {sv['acceptance']:.2g}: 2.20 tokens a check" in back, err
    code, back, err = paraplan("simulate", "--mode", "inference", "--from", "vllm", exported.strip(), "--cluster",
                               "h100-sxm:8", "--workload", "chat", "--rate", "4", "--requests", "50")
    assert code == 0 and "each accepted at 0.6 (default; --acceptance or --acceptance-length)" in back, err
    from engines.vllm import import_serve

    ngram = tmp_path / "ngram.yaml"
    assert paraplan("plan", "--mode", "inference", "--model", "llama3-8b", "--cluster", "h100-sxm:1", "--prompt-len",
                    "512", "--output-len", "128", "--draft-model", "ngram", "-o", str(ngram))[0] == 0
    line = paraplan("export", str(ngram), "--to", "vllm")[1]
    assert '"method":"ngram","num_speculative_tokens":4,"prompt_lookup_max":4' in line
    assert import_serve(line).draft_model == "ngram" and import_serve(line).speculative_tokens == 4
    medusa = import_serve("""vllm serve m --speculative-config '{"method":"medusa","model":"e","num_speculative_tokens":2}'""")
    assert medusa.draft_model is None and medusa.unknown and "medusa" in medusa.unknown[0]
    # an EAGLE-3 head: one decoder layer of the target's shape and a 32,000-token draft vocabulary; planned,
    # exported as vLLM's eagle3 method and read back; it cuts a lone request's TPOT as a draft model does
    head = "eagle3:yuhuili/EAGLE3-LLaMA3.1-Instruct-8B"
    from planner.model_source import load_draft

    eagle = load_draft(head, ZOO["llama3-8b"])
    assert (eagle.layers, eagle.vocab, eagle.hidden, eagle.name) == (1, 32_000, 4096, head)
    with pytest.raises(ConfigError, match="CHECKPOINT"):
        load_draft("eagle:", ZOO["llama3-8b"])
    heads = tmp_path / "eagle.yaml"
    assert paraplan("plan", "--mode", "inference", "--model", "llama3-8b", "--cluster", "h100-sxm:1", "--workload",
                    "chat", "--rate", "5", "--slo", "ttft_p99=1,tpot_p99=8ms", "--draft-model", head, "--draft-len",
                    "3", "-o", str(heads))[0] == 0
    line = paraplan("export", str(heads), "--to", "vllm")[1]
    assert '"method":"eagle3","model":"yuhuili/EAGLE3-LLaMA3.1-Instruct-8B","num_speculative_tokens":3' in line
    assert import_serve(line).draft_model == head
    code, back, err = paraplan("simulate", "--mode", "inference", "--from", "vllm", line.strip(), "--cluster",
                               "h100-sxm:1", "--workload", "chat", "--rate", "1", "--requests", "20", "--json")
    assert code == 0 and json.loads(back)["scheduler"]["draft_model"] == head, err
    alone = [Request(id=0, arrival_s=0.0, prompt_tokens=300, output_tokens=201)]
    plain, drafted = (simulate_traffic(SPEC, load_cluster("h100-sxm:1"), alone, ServingLayout(),
                                       SchedulerConfig(**kw)).tpot_s[0]
                      for kw in ({}, dict(speculative_tokens=3, acceptance=0.7, draft=eagle)))
    assert drafted < plain / 2
    code, _, err = paraplan("simulate", "--mode", "inference", "--model", "llama3-8b", "--cluster", "h100-sxm:1",
                            "--workload", "chat", "--rate", "4", "--draft-model", "ngram", "--draft-len", "0")
    assert code == 2 and "--draft-len must be a positive integer, got 0" in err  # (0 would be no speculation)
    code, _, err = paraplan("simulate", "--mode", "inference", "--model", "llama3-8b", "--cluster", "h100-sxm:1",
                            "--workload", "chat", "--rate", "4", "--draft-model", "ngram", "--acceptance", "0.5",
                            "--acceptance-length", "2")
    assert code == 2 and "not both" in err and len(err.strip().splitlines()) == 1
    code, _, err = paraplan("plan", "--mode", "inference", "--model", "llama3-8b", "--cluster", "h100-sxm:8", "--workload",
                   "chat", "--rate", "4", "--slo", "ttft_p99=1", "--draft-model", "ngram", "--pp", "2")
    assert code == 2 and "runs with pp 1" in err and "Traceback" not in err


def test_mtp_drafts_with_the_models_own_next_token_module(tmp_path):
    """vLLM's mtp method: DeepSeek-V3's (and GLM-4.5's) checkpoint carries a next-token module
    (num_nextn_predict_layers) that drafts for it: `--draft-model mtp` is one block of the
    target's shape, its experts and latent attention included, on the target's head; recorded by
    the reader (not counted in the model's parameters), exported as {"method":"mtp"}, read back
    from mtp and deepseek_mtp; a model without one is one line; a lone request's TPOT drops."""
    from engines.vllm import import_serve
    from planner.model_source import load_draft, spec_from_hf_config
    from test_moe import GLM_4_5_AIR

    target = ZOO["deepseek-v3"]
    draft = load_draft("mtp", target)
    assert (draft.layers, draft.dense_layers, draft.experts, draft.kv_lora_rank, draft.mtp_layers) == (1, 0, 256, 512, 0)
    glm = spec_from_hf_config(GLM_4_5_AIR)
    assert glm.mtp_layers == 1 and glm.num_params == spec_from_hf_config({**GLM_4_5_AIR, "num_nextn_predict_layers": 0}).num_params
    with pytest.raises(ConfigError, match="llama3-8b carries no next-token prediction module"):
        load_draft("mtp", ZOO["llama3-8b"])
    plan = tmp_path / "mtp.yaml"
    code, _, err = paraplan("plan", "--mode", "inference", "--model", "deepseek-v3", "--cluster", "h200:8", "--precision",
                            "fp8", "--prompt-len", "1000", "--output-len", "200", "--batch", "1", "--draft-model", "mtp",
                            "--draft-len", "1", "--acceptance", "0.85", "-o", str(plan))
    assert code == 0, err
    line = paraplan("export", str(plan), "--to", "vllm")[1]
    assert """--speculative-config '{"method":"mtp","num_speculative_tokens":1}'""" in line
    for method in ("mtp", "deepseek_mtp"):
        cmd = import_serve(f"""vllm serve deepseek-ai/DeepSeek-V3 -tp 8 --speculative-config '{{"method":"{method}","num_speculative_tokens":2}}'""")
        assert (cmd.draft_model, cmd.speculative_tokens) == ("mtp", 2) and not cmd.unknown
    alone = [Request(id=0, arrival_s=0.0, prompt_tokens=1000, output_tokens=201)]
    h200 = load_cluster("h200:8")
    plain, drafted = (simulate_traffic(target, h200, alone, ServingLayout(tp=8, precision="fp8"),
                                       SchedulerConfig(**kw)).tpot_s[0]
                      for kw in ({}, dict(speculative_tokens=1, acceptance=0.85, draft=draft)))
    assert drafted < plain / 1.3
    code, _, err = paraplan("simulate", "--mode", "inference", "--model", "llama3-8b", "--cluster", "h100-sxm:1",
                            "--workload", "chat", "--rate", "1", "--draft-model", "mtp")
    assert code == 2 and "carries no next-token prediction module" in err and len(err.strip().splitlines()) == 1


def test_the_planner_speculates_where_it_pays():
    """Given a proposer, the search holds every unit with and without it: n-gram drafts that are
    hardly ever accepted (0.05) never pay for their check, and the plan does not speculate; at 0.9
    they carry a 10 ms TPOT target to three times the rate, and the plan speculates."""
    wl = TrafficWorkload.of("chat", requests=200)
    slo = SLO.parse("ttft_p99=1,tpot_p99=10ms")
    cluster = load_cluster("h100-sxm:1")
    plain = plan_traffic(SPEC, cluster, wl, 10.0, slo)
    rare = plan_traffic(SPEC, cluster, wl, 10.0, slo, speculative_tokens=4, acceptance=0.05)
    assert rare.best.scheduler.speculative_tokens == 0 and rare.best.max_rate_rps == plain.best.max_rate_rps
    assert any(r.scheduler.speculative_tokens for r in rare.results)  # it tried
    often = plan_traffic(SPEC, cluster, wl, 10.0, slo, speculative_tokens=4, acceptance=0.9)
    assert often.best.scheduler.speculative_tokens == 4 and often.best.max_rate_rps > 2.5 * plain.best.max_rate_rps
    assert "speculating 4" in often.best.name()


def test_a_serving_plans_deployment_is_simulated_under_other_traffic(tmp_path, capsys):
    """`simulate --plan PLAN --workload W --rate R`: the plan's layout and engine arguments under
    another workload or rate (it said "add --mode inference", and with it "not --plan"). Engine
    flags override the plan's; what the plan fixes (model, cluster, layout) is refused in one line,
    as is a training plan."""
    traffic = tmp_path / "traffic.yaml"
    code, _, err = _main(capsys, "plan", "--mode", "inference", "--model", "llama3-8b", "--cluster", "h100-sxm:2",
                         "--workload", "chat", "--rate", "30", "--slo", "ttft_p99=1,tpot_p99=50ms", "-o", str(traffic))
    assert code == 0, err
    planned = yaml.safe_load(traffic.read_text())
    code, out, err = _main(capsys, "simulate", "--plan", str(traffic), "--workload", "long-context", "--rate", "0.5",
                           "--requests", "60", "--json")
    assert code == 0, err
    got = json.loads(out)
    assert got["cluster"] == "h100-sxm:2" and got["workload"] == "long-context"
    assert got["layout"]["tp"] == planned["mesh"]["tp"] and got["layout"]["replicas"] == planned["serving"]["replicas"]
    assert got["scheduler"]["max_num_seqs"] == planned["serving"]["max_num_seqs"]
    assert got["predicted"]["requests"] == 60
    # the same as simulating the layout by flags
    code, out, err = _main(capsys, "simulate", "--mode", "inference", "--model", "llama3-8b", "--cluster", "h100-sxm:2",
                           "--tp", str(planned["mesh"]["tp"]), "--replicas", str(planned["serving"]["replicas"]),
                           "--max-num-seqs", str(planned["serving"]["max_num_seqs"]),
                           "--max-num-batched-tokens", str(planned["serving"]["max_num_batched_tokens"]),
                           "--workload", "long-context", "--rate", "0.5", "--requests", "60", "--json")
    assert code == 0, err
    assert json.loads(out)["predicted"] == got["predicted"]
    code, out, err = _main(capsys, "simulate", "--plan", str(traffic), "--workload", "chat", "--rate", "5",
                           "--requests", "50", "--max-num-seqs", "8", "--json")
    assert code == 0 and json.loads(out)["scheduler"]["max_num_seqs"] == 8, err
    code, _, err = _main(capsys, "simulate", "--plan", str(traffic), "--workload", "chat", "--rate", "5", "--tp", "2")
    assert code == 2 and "--plan fixes the model, cluster and layout; drop --tp" in err
    training = tmp_path / "train.yaml"
    assert _main(capsys, "simulate", "--model", "llama3-8b", "--cluster", "h100-sxm:8", "--dp", "8", "-o",
                 str(training))[0] == 0
    code, _, err = _main(capsys, "simulate", "--plan", str(training), "--workload", "chat", "--rate", "5")
    assert code == 2 and "is a training plan, not a serving plan" in err and len(err.strip().splitlines()) == 1


def test_built_in_mixtures_of_experts_serve_their_configs_context():
    """The zoo's mixtures of experts train at 4,096 tokens but serve to their Hugging Face configs'
    max_position_embeddings (long-context traffic was cut at 4,096)."""
    assert [ZOO[n].context_len for n in ("mixtral-8x7b", "mixtral-8x22b", "qwen3-30b-a3b", "qwen3-235b-a22b",
                                         "deepseek-v3")] == [32768, 65536, 40960, 40960, 163840]
    assert all(ZOO[n].seq_len == 4096 for n in ("mixtral-8x7b", "qwen3-30b-a3b", "deepseek-v3"))


def test_fp8_checkpoints_by_hub_id_are_served_in_fp8_and_hub_ids_point_at_the_built_in(capsys):
    """DeepSeek-V3/R1's Hub checkpoints keep their weights in fp8 (and `-FP8` twins of built-in models):
    vLLM serves them so, whatever --dtype says. `vllm serve deepseek-ai/DeepSeek-V3 -tp 8` on eight H200s
    was priced in bf16, 156 GiB of weights a GPU: "holds 0 tokens of KV cache". A Hub id given as
    --model says which built-in model has its architecture (it was "unknown model")."""
    from planner.zoo import hub_weights, zoo_name_of_hub_id

    assert zoo_name_of_hub_id("deepseek-ai/DeepSeek-R1") == "deepseek-v3" and hub_weights("deepseek-ai/DeepSeek-R1") == "fp8"
    assert zoo_name_of_hub_id("Qwen/Qwen3-235B-A22B-FP8") == "qwen3-235b-a22b"
    assert hub_weights("meta-llama/Llama-3.1-8B-Instruct") is None and hub_weights("someone/unknown-FP8") is None
    code, out, err = _main(capsys, "simulate", "--mode", "inference", "--from", "vllm",
                           "vllm serve deepseek-ai/DeepSeek-V3 -tp 8 --dtype bfloat16 --max-model-len 32768",
                           "--cluster", "h200:8", "--workload", "chat", "--rate", "2", "--requests", "30", "--json")
    assert code == 0, err
    assert json.loads(out)["layout"]["precision"] == "fp8" and "keeps its weights in fp8" in err
    code, _, err = _main(capsys, "plan", "--model", "meta-llama/Llama-3.1-8B-Instruct", "--cluster", "h100-sxm:8",
                         "--global-batch", "64")
    assert code == 2 and "the built-in llama3.1-8b's architecture; give --model llama3.1-8b" in err


def test_gpt_oss_serves_with_its_experts_in_mxfp4(tmp_path, capsys):
    """gpt-oss's checkpoints keep their routed experts in MXFP4 (4-bit values, an 8-bit scale per 32:
    4.25 bits), the rest bf16, and vLLM serves them so: gpt-oss-120b's weights fit one 80 GB GPU
    (they do not in bf16), decoding reads its experts at 4.25 bits, and the note says how far
    vLLM's MXFP4 kernels fell behind this pricing. `vllm serve openai/gpt-oss-120b` was "unknown
    model"; a checkpoint directory's mxfp4 quantization_config was refused."""
    from costmodel.serving import ServingRequest, kv_budget, token_layer_s
    from costmodel.serving_engine import engine_cluster

    spec, h100 = ZOO["gpt-oss-120b"], load_cluster("h100-sxm:1")
    req = ServingRequest(prompt_len=1024, output_len=256, precision="mxfp4")
    fits = kv_budget(spec, h100, req, 1, 1)
    routed = spec.moe_layers * spec.experts * spec.expert_params
    assert fits.weights_gib * 2**30 == pytest.approx(routed * 4.25 / 8 + (spec.num_params - routed) * 2, rel=0.01)
    assert fits.max_batch_paged > 0 and kv_budget(spec, h100, ServingRequest(prompt_len=1024, output_len=256), 1,
                                                   1).max_batch_paged == 0
    cl = engine_cluster(h100, "vllm")
    step4, step16 = (spec.layers * token_layer_s(spec, cl, p, 1, 64) for p in ("mxfp4", "bf16"))
    assert step4 < 0.45 * step16  # a decode of 64 rows reads the experts it reaches: 4.25 bits against 16
    code, out, err = _main(capsys, "simulate", "--mode", "inference", "--from", "vllm", "vllm serve openai/gpt-oss-120b",
                           "--cluster", "h100-sxm:1", "--workload", "chat", "--rate", "1", "--requests", "30", "--json")
    assert code == 0, err
    assert json.loads(out)["layout"]["precision"] == "mxfp4" and "read the prediction as optimistic" in err
    # a checkpoint directory says so in its config; a plan writes it; the vllm command reads it back
    oss = tmp_path / "oss"
    oss.mkdir()
    config = {"model_type": "gpt_oss", "hidden_size": 2880, "intermediate_size": 2880, "num_hidden_layers": 24,
              "num_attention_heads": 64, "num_key_value_heads": 8, "head_dim": 64, "num_local_experts": 32,
              "num_experts_per_tok": 4, "vocab_size": 201088, "max_position_embeddings": 131072, "sliding_window": 128,
              "layer_types": ["sliding_attention", "full_attention"] * 12, "rope_theta": 150000,
              "tie_word_embeddings": False, "hidden_act": "silu", "rms_norm_eps": 1e-5, "attention_bias": True,
              "quantization_config": {"quant_method": "mxfp4"}}
    (oss / "config.json").write_text(json.dumps(config))
    plan = tmp_path / "oss.yaml"
    code, _, err = _main(capsys, "plan", "--mode", "inference", "--model", f"hf:{oss}", "--cluster", "h100-sxm:1",
                         "--prompt-len", "1000", "--output-len", "200", "-o", str(plan))
    assert code == 0 and "keeps its weights in mxfp4" in err, err
    assert yaml.safe_load(plan.read_text())["precision"] == "mxfp4"
    assert _main(capsys, "check", str(plan))[0] == 0
    code, out, err = _main(capsys, "export", str(plan), "--to", "vllm")
    assert code == 0 and "--quantization" not in out, out
    from engines.vllm import import_serve

    assert import_serve("vllm serve openai/gpt-oss-20b --quantization mxfp4").precision == "mxfp4"
    # a model without experts, or training, in MXFP4: one line each
    code, _, err = _main(capsys, "simulate", "--mode", "inference", "--model", "llama3-8b", "--cluster", "h100-sxm:1",
                         "--workload", "chat", "--rate", "1", "--precision", "mxfp4")
    assert code == 2 and len(err.strip().splitlines()) == 1 and "llama3-8b has none" in err
    code, _, err = _main(capsys, "plan", "--model", "gpt-oss-20b", "--cluster", "h100-sxm:8", "--global-batch", "64",
                         "--precision", "mxfp4")
    assert code == 2 and "serving weight format" in err


def test_a_deployment_past_the_cluster_is_written_for_whole_nodes(tmp_path, capsys):
    """A rate that needs 10 GPUs of 8-GPU nodes: the plan named the cluster h100-sxm:10, which check
    and simulate --plan refused ("10 GPUs do not fill nodes of 8"); it names whole nodes now."""
    target = tmp_path / "t.yaml"
    code, out, err = _main(capsys, "plan", "--mode", "inference", "--model", "llama3-8b", "--cluster", "h100-sxm:8",
                           "--workload", "chat", "--rate", "400", "--requests", "100", "--slo", "ttft_p99=1,tpot_p99=50ms",
                           "-o", str(target))
    assert code == 0 and "more than the 8 given" in out, err
    plan = yaml.safe_load(target.read_text())
    assert plan["cluster"] == "h100-sxm:16" and 8 < plan["serving"]["replicas"] * plan["mesh"]["tp"] * plan["mesh"]["pp"] <= 16
    assert _main(capsys, "check", str(target))[0] == 0
    assert _main(capsys, "simulate", "--plan", str(target))[0] == 0


def test_a_built_in_model_serves_in_its_checkpoints_format_unless_told(capsys):
    """`--model gpt-oss-120b` (its checkpoint's experts MXFP4) and `--model deepseek-v3` (fp8) are served
    as vLLM loads their checkpoints, with a note; --precision bf16 prices a 16-bit copy. gpt-oss-120b on
    one H100 was refused: 217.6 GiB of bf16 weights."""
    code, out, err = _main(capsys, "simulate", "--mode", "inference", "--model", "gpt-oss-120b", "--cluster",
                           "h100-sxm:1", "--workload", "chat", "--rate", "1", "--requests", "20", "--json")
    assert code == 0 and json.loads(out)["layout"]["precision"] == "mxfp4", err
    assert "its checkpoint openai/gpt-oss-120b" in err
    code, _, err = _main(capsys, "simulate", "--mode", "inference", "--model", "gpt-oss-120b", "--cluster",
                         "h100-sxm:1", "--workload", "chat", "--rate", "1", "--requests", "20", "--precision", "bf16")
    assert code == 2 and "217.6 GiB" in err
    code, out, err = _main(capsys, "simulate", "--mode", "inference", "--model", "llama3-8b", "--cluster", "h100-sxm:1",
                           "--workload", "chat", "--rate", "1", "--requests", "20", "--json")
    assert code == 0 and json.loads(out)["layout"]["precision"] == "bf16" and "keeps its weights" not in err
