"""The defects a new user's first hour found, each a plan `check` approved and `run` crashed
on (or an answer that misled); every test here failed before its fix."""

import json

import pytest
import yaml

from cli.main import main
from costmodel import Strategy, load_cluster, predict
from costmodel.errors import ConfigError
from planner.contract import layout_problems, plan_problems
from planner.module_map import zoo_map
from planner.plan import Plan
from planner.zoo import ZOO
from runtime.launch import machine_problem, prediction_note, refuse_unrunnable


def _run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_a_sequence_longer_than_learned_positions_is_refused_at_plan_time(tmp_path, capsys):
    # was: check OK, then run died with "IndexError: index out of range in self" (positions stop at 32)
    target = tmp_path / "p.yaml"
    code, _, err = _run(capsys, "plan", "--model", "tiny-gpt", "--cluster", "cpu:2", "--global-batch", "4",
                        "--seq-len", "128", "-o", str(target))
    assert code == 2 and not target.exists()
    assert err.strip() == ("paraplan: error: sequence length 128 is longer than tiny-gpt's 32 learned positions; "
                           "use --seq-len 32 or less")
    # rotary positions have no table to run off: a longer sequence plans (and runs: the tables grow)
    assert _run(capsys, "plan", "--model", "tiny-llama", "--cluster", "cpu:2", "--global-batch", "4",
                "--seq-len", "64")[0] == 0


def test_a_tensor_parallel_plan_passes_its_own_check(tmp_path, capsys):
    # was: the ILP replicated the block's linears while sequence parallelism stayed on, and check refused
    target = tmp_path / "p.yaml"
    assert _run(capsys, "plan", "--model", "tiny-llama", "--cluster", "cpu:4", "--global-batch", "8", "--tp", "2",
                "-o", str(target))[0] == 0
    plan = Plan.load(target)
    assert plan.mesh["tp"] == 2 and plan.sequence_parallel
    assert plan.placements["layers.*.attention.wq.weight"] == {"tp": "Shard(0)"}
    assert plan.placements["layers.*.feed_forward.w2.weight"] == {"tp": "Shard(1)"}
    code, out, _ = _run(capsys, "check", str(target))
    assert code == 0 and "OK" in out


def test_tp_1_writes_no_tensor_parallel_placements(tmp_path, capsys):
    # was: wq Shard(1), ffn_norm Shard(0) on a tp axis of size 1
    target = tmp_path / "p.yaml"
    assert _run(capsys, "plan", "--model", "tiny-llama", "--cluster", "cpu:4", "--global-batch", "8", "--tp", "1",
                "-o", str(target))[0] == 0
    plan = Plan.load(target)
    assert not any("tp" in axes for axes in plan.placements.values()), plan.placements


def test_a_hand_edited_layout_the_runtime_cannot_run_is_refused_by_check_and_run_alike(tmp_path, capsys):
    # was: the tp-1 placements with the mesh edited to tp 4 passed check and crashed run
    # ("aten.mm.default got mixed torch.Tensor and DTensor")
    s = Strategy(precision="fp32", tp=4, global_batch=8, microbatch_size=8, sequence_parallel=False)
    spec = ZOO["tiny-llama"]
    from planner.plan import plan_from_strategy
    from dataclasses import replace

    plan = plan_from_strategy(spec, s, "cpu:4", predict(spec, s, load_cluster("cpu:4")).predicted())
    plan = replace(plan, placements={"layers.*.attention.wq.weight": {"tp": "Shard(1)"},
                                     "layers.*.ffn_norm.weight": {"tp": "Shard(0)"}})
    target = tmp_path / "edited.yaml"
    target.write_text(plan.to_yaml())
    code, _, err = _run(capsys, "check", str(target))
    assert code == 2
    assert ("the runtime splits only block linears and the token embedding and head over tp, not "
            "layers.*.ffn_norm.weight") in err
    assert ("layer 0's attention.wq, attention.wk, attention.wv, attention.wo are split over tp as attention.wq "
            "Shard(1), attention.wk Replicate(), attention.wv Replicate(), attention.wo Replicate()") in err
    problems, _ = plan_problems(Plan.load(target), load_cluster("cpu:4"))
    with pytest.raises(ConfigError) as exc:  # `paraplan run` refuses on the same list, first problem first
        refuse_unrunnable(Plan.load(target))
    assert str(exc.value).startswith(problems[0])
    code, _, err = _run(capsys, "run", str(target), "--steps", "1")
    assert code == 2 and len(err.strip().splitlines()) == 1 and problems[0] in err


def test_layout_rules():
    spec = ZOO["tiny-llama"]
    megatron = {f"layers.*.attention.{n}.weight": {"tp": "Shard(0)"} for n in ("wq", "wk", "wv")}
    megatron |= {"layers.*.attention.wo.weight": {"tp": "Shard(1)"}}
    assert layout_problems(zoo_map(spec), megatron, 2, sequence_parallel=False) == []
    assert "sequence parallelism needs every block linear" in layout_problems(zoo_map(spec), megatron, 2, True)[0]
    assert "mesh has tp 1" in layout_problems(zoo_map(spec), megatron, 1, False)[0]
    assert layout_problems(zoo_map(spec), {}, 2, sequence_parallel=False) == []  # all replicated: runs


def test_heads_that_tp_does_not_split_are_the_message(tmp_path, capsys):
    # was: "does not fit ... needs inf GiB per GPU"
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"model_type": "gpt2", "n_layer": 48, "n_embd": 1600, "n_head": 25,
                                  "vocab_size": 50257, "n_positions": 1024}))  # GPT-2 XL
    code, _, err = _run(capsys, "plan", "--model", str(config), "--cluster", "a100-80g:8", "--global-batch", "64",
                        "--tp", "2")
    assert code == 2
    assert err.strip() == "paraplan: error: tp(2) does not divide heads(25); use a tp that divides 25"


def test_hf_rope_configs_train_at_a_sensible_length_and_say_so(tmp_path, capsys):
    # was: seq_len = max_position_embeddings (131072 for Qwen2.5): a 2396 s "step" for 72B
    config = tmp_path / "config.json"
    config.write_text(json.dumps({  # Qwen2.5-72B's config.json (the fields that size it)
        "model_type": "qwen2", "num_hidden_layers": 80, "hidden_size": 8192, "num_attention_heads": 64,
        "num_key_value_heads": 8, "intermediate_size": 29568, "vocab_size": 152064,
        "max_position_embeddings": 131072, "rope_theta": 1000000.0, "rms_norm_eps": 1e-6, "hidden_act": "silu"}))
    code, out, _ = _run(capsys, "simulate", "--model", str(config), "--cluster", "h100-sxm:64", "--tp", "8",
                        "--zero", "3", "--global-batch", "64")
    assert code == 0
    assert "sequence length 8192 (default; --seq-len)" not in out  # simulate prints no marks without `given`
    code, out, _ = _run(capsys, "plan", "--model", str(config), "--cluster", "h100-sxm:64", "--global-batch", "64",
                        "--no-timing")
    assert code == 0 and "sequence length 8192 (default; --seq-len)" in out
    assert "precision bf16 (default; --precision)" in out and "runtime paraplan (default; --runtime)" in out
    step_s = float(out.split("step time")[1].split()[0])
    assert step_s < 60


def _cluster_yaml(tmp_path, nodes, per_node):
    path = tmp_path / f"c{nodes}x{per_node}.yaml"
    path.write_text(yaml.safe_dump({"name": f"c{nodes}x{per_node}", "nodes": nodes, "gpus_per_node": per_node,
                                    "device": "h100-sxm"}))
    return str(path)


def test_tensor_parallel_groups_that_straddle_nodes_are_priced_so_and_not_searched(tmp_path, capsys):
    # was: tp 4 on nodes of 6 GPUs priced as intra-node (ranks 4-7 sit on two nodes)
    s = Strategy(tp=4, dp=3, global_batch=12, microbatch_size=1)
    spec = ZOO["gpt3-1.3b"]
    six = predict(spec, s, load_cluster(_cluster_yaml(tmp_path, 2, 6)))
    twelve = predict(spec, s, load_cluster(_cluster_yaml(tmp_path, 1, 12)))
    assert six.time_s["tp_comm"] > 1.5 * twelve.time_s["tp_comm"]
    code, out, _ = _run(capsys, "plan", "--model", "gpt3-1.3b", "--cluster", _cluster_yaml(tmp_path, 2, 6),
                        "--global-batch", "12", "--json")
    assert code == 0 and 6 % json.loads(out)["plan"]["mesh"]["tp"] == 0


def test_the_datasheet_cpu_profile_says_it_is_not_this_host(capsys):
    # was: cpu:4 predicted 3.7 ms for a step that takes 168 ms here, and said nothing
    code, out, _ = _run(capsys, "simulate", "--model", "tiny-llama", "--cluster", "cpu:4")
    assert code == 0 and "hardware profile cpu" in out and "without the host's overheads" in out
    code, out, _ = _run(capsys, "simulate", "--model", "tiny-llama", "--cluster", "cpu-2core:4")
    assert code == 0 and "hardware profile cpu-2core" in out and "without the host's overheads" not in out


def test_a_run_far_from_its_prediction_says_which_profile_priced_it(tmp_path, capsys):
    """`paraplan run` ends with the measured step beside the predicted one; where the measured
    falls outside the prediction's range and 1.5x from it, a line names the profile and the way
    out (the datasheet CPU profile's own note; else measuring this machine or more steps). It
    printed a 28x gap on cpu:4 without a word."""
    target = tmp_path / "p.yaml"
    assert _run(capsys, "plan", "--model", "tiny-llama", "--cluster", "cpu:4", "--global-batch", "8",
                "-o", str(target))[0] == 0
    plan = Plan.load(target)
    predicted = plan.predicted["step_time_s"]
    low, high = plan.predicted["step_time_s_range"]
    assert prediction_note({"step_time_s": high, "predicted_step_time_s": predicted}, plan) == ""
    note = prediction_note({"step_time_s": 28 * predicted, "predicted_step_time_s": predicted}, plan)
    assert note.startswith("note: measured 28.0x the prediction") and "datasheet guess" in note
    gpu = tmp_path / "g.yaml"
    assert _run(capsys, "plan", "--model", "gpt3-1.3b", "--cluster", "a100-80g:8", "--global-batch", "64",
                "-o", str(gpu))[0] == 0
    plan = Plan.load(gpu)
    note = prediction_note({"step_time_s": plan.predicted["step_time_s"] / 3,
                            "predicted_step_time_s": plan.predicted["step_time_s"]}, plan)
    assert "0.3x the prediction" in note and "a100-80g" in note and "paraplan profile" in note


def test_a_plan_for_gpus_is_not_started_where_they_are_not(tmp_path, capsys):
    """`paraplan run` of a plan for 16 H100s on a machine without CUDA started 16 CPU ranks, each
    building its share of Mixtral, until the host killed them (SIGKILL, a torchrun traceback); a
    node with fewer GPUs than the plan's processes on it is refused likewise. cpu:N plans run anywhere."""
    gpu = tmp_path / "g.yaml"
    assert _run(capsys, "plan", "--model", "gpt3-1.3b", "--cluster", "a100-80g:8", "--global-batch", "64",
                "-o", str(gpu))[0] == 0
    plan = Plan.load(gpu)
    assert "this machine has no CUDA GPU" in machine_problem(plan, "g.yaml", 8, 0)
    assert "starts 8 processes on this node, which has 4 GPU(s)" in machine_problem(plan, "g.yaml", 8, 4)
    assert machine_problem(plan, "g.yaml", 8, 8) is None
    cpu = tmp_path / "c.yaml"
    assert _run(capsys, "plan", "--model", "tiny-llama", "--cluster", "cpu:4", "--global-batch", "8",
                "-o", str(cpu))[0] == 0
    assert machine_problem(Plan.load(cpu), "c.yaml", 4, 0) is None
    import torch

    if not torch.cuda.is_available():
        code, _, err = _run(capsys, "run", str(gpu))
        assert code == 2 and "no CUDA GPU" in err and len(err.strip().splitlines()) == 1, err


def test_tiny_models_print_counts_with_a_unit_that_fits(capsys):
    code, out, _ = _run(capsys, "simulate", "--model", "tiny-llama", "--cluster", "cpu-2core:1")
    assert code == 0 and out.startswith("tiny-llama (217.66K params)")


def test_a_missing_plan_is_one_line_for_every_command(tmp_path, capsys):
    missing = str(tmp_path / "nope.yaml")
    for argv in (["check", missing], ["run", missing], ["simulate", "--plan", missing], ["compare", missing],
                 ["replan", missing, "--gpus", "2"]):
        code, _, err = _run(capsys, *argv)
        assert code == 2 and err.strip() == (f"paraplan: error: plan file {missing} does not exist; write one with "
                                             f"`paraplan plan ... -o {missing}`"), argv


def test_an_output_folder_that_cannot_be_made_is_one_line(tmp_path, capsys):
    """`report -o` under a file (or anywhere the folder cannot be made) was a FileNotFoundError traceback."""
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    code, _, err = _run(capsys, "report", "--model", "tiny-llama", "--cluster", "cpu:2", "--global-batch", "4",
                        "-o", str(blocker / "rep"))
    assert code == 2 and err.startswith("paraplan: error: cannot write into") and len(err.strip().splitlines()) == 1
    code, _, err = _run(capsys, "plan", "--model", "tiny-llama", "--cluster", "cpu:2", "--global-batch", "4",
                        "-o", str(blocker / "p.yaml"))
    assert code == 2 and "cannot write" in err and len(err.strip().splitlines()) == 1


def test_zero_bubble_is_planned_where_it_runs_and_refused_where_it_does_not(tmp_path, capsys):
    """The zero-bubble schedule runs on paraplan's runtime (tests/test_runtime_parity.py) but not
    under --zero 3 with data parallelism (torch's FSDP2 then drifts 1e-4 off one process within 3
    steps, measured) nor under torch.compile: `plan` never emits those, `check` lists them as the
    plan's problems, and a plan asked for with --schedule zero-bubble passes its own check."""
    from planner.contract import strategy_runtime_problems

    spec = ZOO["tiny-llama"]
    fsdp = Strategy(pp=2, dp=2, zero=3, global_batch=8, microbatch_size=2, schedule="zero-bubble")
    assert any("zero-bubble schedule under --zero 3" in p for p in strategy_runtime_problems(spec, fsdp))
    assert not strategy_runtime_problems(spec, fsdp.replace(zero=1))
    out = tmp_path / "zb.yaml"
    code, _, err = _run(capsys, "plan", "--model", "tiny-llama", "--cluster", "cpu:4", "--global-batch", "8",
                        "--pp", "2", "--schedule", "zero-bubble", "-o", str(out))
    assert code == 0, err
    plan = yaml.safe_load(out.read_text())
    assert plan["schedule"]["name"] == "zero-bubble" and plan["zero"] != 3
    assert _run(capsys, "check", str(out))[0] == 0
    compiled = tmp_path / "compiled.yaml"
    compiled.write_text(out.read_text().replace("runtime: paraplan\n", "runtime: paraplan-compile\n"))
    code, _, err = _run(capsys, "check", str(compiled))
    assert code == 2 and "cannot run" in err and "torch.compile" in err  # the plan's problems, listed
