"""`paraplan simulate` end to end: the table, JSON keys, traces, plans, and bad input."""

import json
import subprocess
import sys

import pytest

from tests_helpers import ROOT, paraplan

PREDICTED_KEYS = {
    "step_time_s", "tokens_per_s", "model_tflops_per_gpu", "hardware_tflops_per_gpu", "mfu", "bubble_fraction",
    "fits", "memory_gib", "time_s", "step_time_s_range", "calibrated",
}
MEMORY_KEYS = {"parameters", "gradients", "optimizer", "activations", "other", "total"}
TIME_KEYS = {"compute", "recompute", "tp_comm", "cp_comm", "pp_comm", "dp_comm", "exposed_comm", "bubble"}

BASE = ["simulate", "--model", "gpt3-175b", "--cluster", "a100-80g:1024", "--tp", "8", "--pp", "8",
        "--global-batch", "1536", "--recompute", "selective"]


def test_table_by_default():
    out = paraplan(*BASE)
    assert out.returncode == 0, out.stderr
    assert "step time" in out.stdout and "MFU" in out.stdout and "fits" in out.stdout


def test_json_has_the_design_keys():
    out = paraplan(*BASE, "--json")
    data = json.loads(out.stdout)
    pred = data["predicted"]
    assert set(pred) == PREDICTED_KEYS
    assert set(pred["memory_gib"]) == MEMORY_KEYS
    assert TIME_KEYS <= set(pred["time_s"])
    assert pred["fits"] is True and 0.3 < pred["mfu"] < 0.7
    assert data["strategy"]["dp"] == 16


def test_trace_file_is_chrome_trace(tmp_path):
    trace = tmp_path / "t.json"
    out = paraplan(*BASE, "--trace", str(trace))
    assert out.returncode == 0, out.stderr
    events = json.loads(trace.read_text())["traceEvents"]
    assert any(e.get("ph") == "X" and e["name"].startswith("F") for e in events)


def test_plan_round_trip_reproduces_predicted_exactly(tmp_path):
    plan = tmp_path / "plan.yaml"
    first = json.loads(paraplan(*BASE, "--virtual-stages", "3", "--zero", "1", "-o", str(plan), "--json").stdout)
    again = json.loads(paraplan("simulate", "--plan", str(plan), "--json").stdout)
    assert again["predicted"] == first["predicted"]
    assert again["strategy"] == first["strategy"]


def test_hf_config_and_spec_files(tmp_path):
    spec = tmp_path / "m.yaml"
    spec.write_text("layers: 24\nhidden: 2048\nheads: 16\nvocab: 51200\nseq_len: 2048\n")
    out = paraplan("simulate", "--model", str(spec), "--cluster", "a100-80g:8", "--json")
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["strategy"]["dp"] == 8


@pytest.mark.parametrize(
    "args, needle",
    [
        (["--model", "gpt5", "--cluster", "a100-80g:8"], "unknown model 'gpt5'"),
        (["--model", "gpt3-13b", "--cluster", "v100:8"], "unknown device 'v100'"),
        (["--model", "tests/data/broken.yaml", "--cluster", "a100-80g:8"], "not valid YAML"),
        (["--model", "gpt3-13b", "--cluster", "tests/data/broken.yaml"], "not valid YAML"),
        (["--model", "gpt3-175b", "--cluster", "a100-80g:64", "--tp", "7", "--dp", "1", "--pp", "1"], "world size"),
        (["--model", "gpt3-175b", "--cluster", "a100-80g:12"], "do not fill nodes"),
        (["--model", "gpt3-6.7b", "--cluster", "a100-80g:24", "--tp", "3"], "does not divide heads"),
        (["--model", "gpt3-13b", "--cluster", "a100-80g:64", "--tp", "8", "--pp", "4", "--dp", "4"], "!= world size 64"),
        (["--model", "gpt3-13b", "--cluster", "a100-80g:64", "--global-batch", "100"], "not a multiple of dp(64)"),
        (["--model", "gpt3-13b", "--cluster", "a100-80g:8", "--tp", "nine"], "invalid int value"),
        (["--model", "gpt3-13b", "--cluster", "a100-80g:8", "--frobnicate"], "unrecognized arguments"),
        (["--model", "gpt3-13b", "--cluster", "a100-80g:x"], "is not an integer"),
        (["--plan", "does/not/exist.yaml"], "does not exist"),
        (["--model", "gpt3-13b", "--cluster", "a100-80g:8", "--virtual-stages", "2"], "needs --pp 2"),
        (["--model", "gpt3-13b"], "needs --plan, --from ENGINE FILE, or --model and --cluster"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(args, needle):
    out = paraplan("simulate", *args)
    assert out.returncode == 2
    assert out.stdout == ""
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1, out.stderr
    assert "Traceback" not in out.stderr
    assert needle in lines[0]


def test_failed_run_writes_nothing(tmp_path):
    trace = tmp_path / "t.json"
    trace.write_text("old")
    out = paraplan("simulate", "--model", "gpt3-13b", "--cluster", "a100-80g:8", "--tp", "3", "--trace", str(trace))
    assert out.returncode == 2
    assert trace.read_text() == "old"
    out = paraplan(*BASE, "--trace", str(tmp_path / "missing" / "t.json"))
    assert out.returncode == 2 and "does not exist" in out.stderr
    assert list(tmp_path.iterdir()) == [trace]


def test_readme_test_command_is_the_ci_command():
    ci = (ROOT / ".ci" / "run").read_text()
    readme = (ROOT / "README.md").read_text()
    command = ci.split("TEST_COMMAND='")[1].split("'")[0]
    assert command in readme


def test_console_script_help_lists_simulate():
    out = subprocess.run([sys.executable, "-m", "cli", "--help"], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0 and "simulate" in out.stdout
