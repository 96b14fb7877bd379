"""Every input surface, fuzzed: command-line flags, model specs, cluster files, Hugging Face
configs and plan YAML. Whatever comes in, the command line answers with exit 0 or with exit 2
and one line on stderr that starts `paraplan: error:`; never a traceback (an exception out of
`main` fails these tests)."""

import json
import tempfile
from pathlib import Path

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from costmodel import Strategy, load_cluster, predict
from cli.main import main
from planner.plan import plan_from_strategy
from planner.zoo import ZOO

FUZZ = settings(max_examples=200, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.function_scoped_fixture])

# values of every type YAML can hold, including the awkward ones
scalars = st.one_of(
    st.none(), st.booleans(), st.integers(-10**6, 10**6), st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12), st.sampled_from(["gelu", "swiglu", "rope", "rmsnorm", "Shard(0)", "1e3", "-1", "8"]),
)
values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner,
                                                                                                max_size=3), max_leaves=6)


def _call(argv: list[str], capsys) -> int:
    code = main(argv)
    err = capsys.readouterr().err
    assert code in (0, 2), (argv, code, err)
    if code == 2:
        lines = [line for line in err.splitlines() if line.strip()]
        assert lines and lines[0].startswith("paraplan: error:"), err
        # one line; `check` lists every problem it found under its heading, one per line
        assert len(lines) == 1 or (argv[0] == "check" and all(line.startswith("  - ") for line in lines[1:])), err
    return code


def _write(tmp: Path, name: str, data) -> str:
    path = tmp / name
    path.write_text(json.dumps(data, default=str) if name.endswith(".json") else yaml.safe_dump(data))
    return str(path)


FLAG_VALUES = {
    "--tp": ["0", "1", "2", "3", "-4", "x", "64"], "--pp": ["1", "2", "5", "0"], "--dp": ["1", "2", "0", "1000"],
    "--cp": ["1", "2", "3"], "--zero": ["0", "3", "4", "-1"], "--microbatch-size": ["1", "2", "0", "7"],
    "--schedule": ["1f1b", "interleaved", "zigzag"], "--virtual-stages": ["1", "2", "0"],
    "--recompute": ["none", "full", "some"], "--precision": ["fp32", "bf16", "fp8", "int4"],
    "--global-batch": ["8", "0", "-8", "3", "nan"], "--seq-len": ["32", "0", "33", "x"],
    "--cluster": ["cpu:4", "cpu:0", "cpu:x", "nosuch:8", "cpu", "a100-80g:12", "cluster.yaml", ":8"],
    "--model": ["tiny-gpt", "tiny-llama", "nosuch", "spec.yaml", "py:nosuch:f", "py:os:getcwd", "config.json"],
    "--shard-group": ["1", "2", "0"], "--json": None, "--sequence-parallel": None, "--no-flash-attention": None,
    "--bogus": None, "--plan": ["missing.yaml"],
}


@FUZZ
@given(command=st.sampled_from(["simulate", "plan", "check", "compare", "nosuch"]),
       flags=st.lists(st.sampled_from(sorted(FLAG_VALUES)), max_size=6, unique=True), data=st.data())
def test_command_line_flags(command, flags, data, capsys):
    argv = [command] if command != "compare" else [command, "missing.yaml"]
    if command == "check":
        argv.append("missing.yaml")
    for flag in flags:
        argv.append(flag)
        choices = FLAG_VALUES[flag]
        if choices is not None:
            argv.append(data.draw(st.sampled_from(choices)))
    if command == "plan" and "--cluster" in argv:  # searches stay small: tiny models on few GPUs
        argv[argv.index("--cluster") + 1] = data.draw(st.sampled_from(["cpu:2", "cpu:4", "cpu:x", "nosuch:2"]))
        if "--model" in argv:
            argv[argv.index("--model") + 1] = data.draw(st.sampled_from(["tiny-gpt", "tiny-llama", "nosuch"]))
        else:
            argv += ["--model", "tiny-gpt"]
    _call(argv, capsys)


SPEC_FIELDS = ["name", "layers", "hidden", "heads", "vocab", "seq_len", "ffn_hidden", "kv_heads", "activation", "norm",
               "position", "tied_embeddings", "bias", "dropout", "surprise"]


@FUZZ
@given(base=st.sampled_from(["tiny-gpt", "tiny-llama"]), drop=st.lists(st.sampled_from(SPEC_FIELDS), max_size=2),
       changes=st.dictionaries(st.sampled_from(SPEC_FIELDS), values, max_size=3), as_json=st.booleans())
def test_model_spec_files(base, drop, changes, as_json, capsys):
    data = ZOO[base].to_dict()
    for k in drop:
        data.pop(k, None)
    data.update(changes)
    with tempfile.TemporaryDirectory() as tmp:
        path = _write(Path(tmp), "spec.json" if as_json else "spec.yaml", data)
        _call(["simulate", "--model", path, "--cluster", "cpu:4"], capsys)


HF_FIELDS = ["model_type", "num_hidden_layers", "hidden_size", "num_attention_heads", "num_key_value_heads",
             "intermediate_size", "vocab_size", "max_position_embeddings", "hidden_act", "rms_norm_eps", "rope_theta",
             "tie_word_embeddings", "n_layer", "n_embd", "n_head", "n_positions"]


@FUZZ
@given(drop=st.lists(st.sampled_from(HF_FIELDS), max_size=3),
       changes=st.dictionaries(st.sampled_from(HF_FIELDS), values, max_size=3))
def test_hugging_face_configs(drop, changes, capsys):
    data = {"model_type": "llama", "num_hidden_layers": 2, "hidden_size": 64, "num_attention_heads": 4,
            "num_key_value_heads": 2, "intermediate_size": 128, "vocab_size": 256, "max_position_embeddings": 32,
            "hidden_act": "silu", "rms_norm_eps": 1e-5, "rope_theta": 10000.0}
    for k in drop:
        data.pop(k, None)
    data.update(changes)
    with tempfile.TemporaryDirectory() as tmp:
        path = _write(Path(tmp), "config.json", data)
        _call(["simulate", "--model", path, "--cluster", "cpu:4"], capsys)


CLUSTER_FIELDS = ["name", "nodes", "gpus_per_node", "device", "intra_node", "inter_node", "extra"]
LINK_FIELDS = ["bandwidth_gb_per_s", "latency_us", "efficiency"]


@FUZZ
@given(drop=st.lists(st.sampled_from(CLUSTER_FIELDS), max_size=2),
       changes=st.dictionaries(st.sampled_from(CLUSTER_FIELDS), values, max_size=2),
       link=st.dictionaries(st.sampled_from(LINK_FIELDS), values, max_size=2), garbage=st.booleans())
def test_cluster_files(drop, changes, link, garbage, capsys):
    data = {"nodes": 1, "gpus_per_node": 4, "device": "cpu",
            "intra_node": {"bandwidth_gb_per_s": 4, "latency_us": 50, "efficiency": 0.5}}
    for k in drop:
        data.pop(k, None)
    data.update(changes)
    if isinstance(data.get("intra_node"), dict):
        data["intra_node"] = {**data["intra_node"], **link}
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(_write(Path(tmp), "cluster.yaml", data))
        if garbage:
            path.write_text("nodes: [1, 2\n  device: {")
        _call(["simulate", "--model", "tiny-gpt", "--cluster", str(path)], capsys)


def _valid_plan() -> dict:
    s = Strategy(precision="fp32", dp=2, tp=2, global_batch=8, microbatch_size=2)
    spec = ZOO["tiny-llama"]
    return plan_from_strategy(spec, s, "cpu:4", predict(spec, s, load_cluster("cpu:4")).predicted()).to_dict()


PLAN_PATHS = [("schema_version",), ("model",), ("model", "heads"), ("model", "layers"), ("cluster",), ("global_batch",),
              ("seq_len",), ("precision",), ("mesh",), ("mesh", "tp"), ("mesh", "pp"), ("zero",), ("schedule",),
              ("schedule", "name"), ("schedule", "microbatch_size"), ("stages",), ("placements",),
              ("sequence_parallel",), ("flash_attention",)]


@FUZZ
@given(edits=st.lists(st.tuples(st.sampled_from(PLAN_PATHS), st.one_of(st.just("<drop>"), values)), max_size=3),
       command=st.sampled_from(["check", "simulate"]))
def test_plan_files(edits, command, capsys):
    data = _valid_plan()
    for path, value in edits:
        target = data
        for key in path[:-1]:
            target = target.get(key) if isinstance(target, dict) else None
        if not isinstance(target, dict):
            continue
        if value == "<drop>":
            target.pop(path[-1], None)
        else:
            target[path[-1]] = value
    with tempfile.TemporaryDirectory() as tmp:
        path = _write(Path(tmp), "plan.yaml", data)
        argv = ["check", path] if command == "check" else ["simulate", "--plan", path]
        _call(argv, capsys)


def test_an_older_plan_is_refused_with_the_reason(tmp_path, capsys):
    data = _valid_plan()
    data["schema_version"] = 0
    path = _write(tmp_path, "old.yaml", data)
    assert main(["check", path]) == 2
    err = capsys.readouterr().err
    assert "schema_version 0 is not supported" in err and "re-run paraplan plan" in err


SERVING_FIELDS = ["prompt_len", "output_len", "beam", "block_tokens", "replicas", "prefill_replicas", "workload", "rate",
                  "slo", "max_num_seqs", "max_num_batched_tokens", "chunked_prefill", "prefix_caching", "engine",
                  "requests", "workload_seed", "burst_cv", "expert_parallel", "draft_model"]
_SERVING_PLAN: dict = {}


def _valid_serving_plan(capsys) -> dict:
    """A plan the traffic planner writes (tiny-llama on 2 CPU processes), made once."""
    if not _SERVING_PLAN:
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "serve.yaml"
            assert main(["plan", "--mode", "inference", "--model", "tiny-llama", "--cluster", "cpu:2", "--workload", "chat",
                         "--rate", "5", "--slo", "ttft_p99=1", "-o", str(path), "--json"]) == 0
            capsys.readouterr()
            _SERVING_PLAN.update(yaml.safe_load(path.read_text()))
    return json.loads(json.dumps(_SERVING_PLAN))


@settings(max_examples=150, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(edits=st.lists(st.tuples(st.sampled_from(SERVING_FIELDS), st.one_of(st.just("<drop>"), values)), max_size=3),
       command=st.sampled_from(["check", "simulate", "export"]))
def test_serving_plan_files(edits, command, capsys):
    """A serving plan's section, damaged: check, simulate --plan and export --to vllm answer with
    exit 0 or one line (planner.serving_plan reads it for all three)."""
    data = _valid_serving_plan(capsys)
    for field, value in edits:
        if value == "<drop>":
            data["serving"].pop(field, None)
        else:
            data["serving"][field] = value
    with tempfile.TemporaryDirectory() as tmp:
        path = _write(Path(tmp), "serve.yaml", data)
        argv = {"check": ["check", path], "simulate": ["simulate", "--plan", path],
                "export": ["export", path, "--to", "vllm"]}[command]
        _call(argv, capsys)
