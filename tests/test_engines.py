"""Plans exported to torchtitan, Megatron-LM, DeepSpeed and vLLM, and those configs read back.

Every exported key is checked against the key lists copied from each engine's source
(tests/data/engines/keys.yaml names the file and commit); export then import gives back
the strategy, over plans the planner writes and a grid of hand-made ones; golden files fix
one export per engine."""

from __future__ import annotations

import json
import shlex
import tomllib
from pathlib import Path

import pytest
import yaml

from cli.main import main
from costmodel import Strategy, load_cluster, predict
from costmodel.errors import ConfigError
from costmodel.validate import stage_layer_counts
from costmodel.spec import ModelSpec
from engines import deepspeed, megatron, torchtitan, vllm
from planner.plan import Plan, plan_from_strategy
from planner.zoo import ZOO

DATA = Path(__file__).parent / "data" / "engines"
KEYS = yaml.safe_load((DATA / "keys.yaml").read_text())
REGEN = False  # set True once to rewrite the golden files after a deliberate change


def _plan(model: str, cluster: str, **fields) -> Plan:
    spec = ZOO[model]
    s = Strategy(**fields)
    return plan_from_strategy(spec, s, cluster, predict(spec, s, load_cluster(cluster)).predicted())


GRID = [
    ("llama3-8b", "h100-sxm:64", dict(dp=64, zero=3, microbatch_size=2, global_batch=512, seq_len=8192)),
    ("llama3-70b", "h100-sxm:256", dict(tp=8, pp=4, dp=8, zero=1, sequence_parallel=True, microbatch_size=1,
                                        global_batch=256, recompute="full")),
    ("gpt3-175b", "a100-80g:1024", dict(tp=8, pp=16, dp=8, zero=1, sequence_parallel=True, microbatch_size=1,
                                        global_batch=1536, schedule="interleaved", virtual_stages=3,
                                        recompute="selective")),
    ("gpt3-13b", "a100-80g:64", dict(tp=4, pp=4, dp=4, sequence_parallel=True, microbatch_size=2, global_batch=256,
                                     stage_layers=(9, 11, 11, 9))),
    ("gpt3-1.3b", "a100-80g:16", dict(dp=16, zero=2, microbatch_size=4, global_batch=512, precision="fp16")),
    ("llama2-7b", "a100-80g:32", dict(tp=2, dp=16, zero=3, shard_group=8, sequence_parallel=True, microbatch_size=1,
                                      global_batch=256)),
    ("llama2-13b", "a100-80g:8", dict(dp=8, microbatch_size=1, global_batch=64, recompute="full")),
    # torchtitan's InterleavedZeroBubble (two chunks a rank); Megatron-LM and DeepSpeed have no such schedule
    ("llama3-70b", "h100-sxm:256", dict(tp=8, pp=4, dp=8, zero=1, sequence_parallel=True, microbatch_size=1,
                                        global_batch=256, schedule="zero-bubble", virtual_stages=2)),
]


def _normal(s: Strategy, engine: str, spec) -> dict:
    """What an engine can say of a strategy: Megatron's distributed optimizer is ZeRO-1,
    torchtitan's FSDP shards gradients too (ZeRO-2) and always runs TP with sequence parallelism."""
    d = {k: getattr(s, k) for k in ("tp", "pp", "dp", "cp", "dp_shard", "microbatch_size", "global_batch",
                                     "virtual_stages", "seq_len")}
    d["stage_layers"] = stage_layer_counts(spec, s)
    d.update(recompute=s.recompute.value, schedule=s.schedule.value if s.pp > 1 else "-", precision=s.precision.value,
             sequence_parallel=s.sequence_parallel and s.tp > 1)
    zero = s.zero
    if engine == "megatron" and zero == 2:
        zero = 1
    if engine == "torchtitan":
        zero = 0 if s.dp_shard == 1 else (2 if zero in (1, 2) else zero)
    d["zero"] = zero
    if zero == 0:
        d["dp_shard"] = 1
    if s.pp == 1:
        d["microbatch_size"] = s.microbatch_size
    return d


def _import(engine: str, plan: Plan):
    world = plan.world_size
    if engine == "torchtitan":
        return torchtitan.import_(torchtitan.export(plan), world_size=world, spec=plan.spec)
    if engine == "megatron":
        return megatron.import_(megatron.export(plan), world_size=world)
    return deepspeed.import_(deepspeed.export_text(plan), world_size=world, seq_len=plan.seq_len)


def _planned() -> list[Plan]:
    """Plans the planner writes (small searches)."""
    from cli.commands.plan import plan_of_search
    from planner.search import SearchRequest, run_search

    out = []
    for model, cluster, batch in (("llama3-8b", "h100-sxm:64", 512), ("gpt3-2.7b", "a100-80g:32", 256),
                                  ("llama2-13b", "a100-40g:32", 128), ("gpt3-6.7b", "a100-80g:64", 512)):
        c = load_cluster(cluster)
        found = run_search(SearchRequest(spec=ZOO[model], cluster=c, global_batch=batch))
        out.append(plan_of_search(ZOO[model], found, cluster, found.stats, c))
    return out


@pytest.fixture(scope="module")
def planned():
    return _planned()


@pytest.mark.parametrize("engine", ["torchtitan", "megatron", "deepspeed"])
def test_export_then_import_gives_back_the_strategy(engine, planned, capsys):
    plans = [_plan(m, c, **f) for m, c, f in GRID] + planned
    compared = refused = 0
    for plan in plans:
        try:
            back = _import(engine, plan)
        except ConfigError as exc:  # a plan the engine cannot express: one line saying why
            assert "\n" not in str(exc) and "re-plan" in str(exc) or "export" in str(exc), str(exc)
            refused += 1
            continue
        assert _normal(back.strategy, engine, plan.spec) == _normal(plan.strategy(), engine, plan.spec), \
            (engine, plan.model["name"])
        assert back.unknown == ()
        if back.spec is not None and engine == "megatron":
            assert back.spec.num_params == plan.spec.num_params
        compared += 1
    with capsys.disabled():
        print(f"\n{engine}: {compared} plans round-tripped, {refused} refused with the reason")
    assert compared >= 4


def test_every_exported_key_is_one_the_engine_reads():
    titan = KEYS["torchtitan"]
    for model, cluster, fields in GRID:
        plan = _plan(model, cluster, **fields)
        try:
            data = tomllib.loads(torchtitan.export(plan))
        except ConfigError:
            continue
        for section, values in data.items():
            assert set(values) <= set(titan["sections"][section]), (section, set(values) - set(titan["sections"][section]))
            for key, value in values.items():
                if key in titan["values"]:
                    assert value in titan["values"][key], (key, value)
        try:
            argv = megatron.export(plan)
        except ConfigError:
            pass
        else:
            flags = [a for a in argv if a.startswith("--")]
            assert set(flags) <= set(KEYS["megatron"]["flags"]), set(flags) - set(KEYS["megatron"]["flags"])
            for flag, allowed in KEYS["megatron"]["values"].items():
                if flag in argv:
                    assert argv[argv.index(flag) + 1] in allowed, (flag, argv[argv.index(flag) + 1])
        try:
            config = deepspeed.export(plan)
        except ConfigError:
            continue
        ds = KEYS["deepspeed"]
        assert set(config) <= set(ds["top"])
        for section in ("zero_optimization", "bf16", "fp16", "activation_checkpointing"):
            assert set(config.get(section, {})) <= set(ds[section]), section


def _serving_plan(tmp_path, capsys, *extra) -> Path:
    target = tmp_path / "serve.yaml"
    assert main(["plan", "--mode", "inference", "--model", "llama2-70b", "--cluster", "h100-sxm:8",
                 "--prompt-len", "512", "--output-len", "128", "-o", str(target), *extra]) == 0
    capsys.readouterr()
    return target


def test_vllm_serve_command(tmp_path, capsys):
    target = _serving_plan(tmp_path, capsys, "--draft-model", "llama2-7b", "--draft-len", "5")
    plan = Plan.load(target)
    cmd = vllm.export(plan)
    assert cmd[:3] == ["vllm", "serve", "meta-llama/Llama-2-70b-hf"]  # the built-in model's Hub checkpoint
    flags = [c for c in cmd if c.startswith("--")]
    assert set(flags) <= set(KEYS["vllm"]["flags"]), set(flags) - set(KEYS["vllm"]["flags"])
    assert cmd[cmd.index("--tensor-parallel-size") + 1] == str(plan.mesh["tp"])
    assert cmd[cmd.index("--max-model-len") + 1] == "640"
    assert cmd[cmd.index("--max-num-seqs") + 1] == str(plan.schedule["microbatch_size"])
    assert json.loads(cmd[cmd.index("--speculative-config") + 1]) == {"model": "meta-llama/Llama-2-7b-hf",
                                                                      "num_speculative_tokens": 5}
    assert main(["export", str(target), "--to", "vllm"]) == 0
    assert shlex.split(capsys.readouterr().out) == cmd


@pytest.mark.parametrize("engine,suffix", [("torchtitan", "toml"), ("megatron", "sh"), ("deepspeed", "json")])
def test_golden_exports(engine, suffix, tmp_path, capsys):
    plan = _plan("llama3-70b", "h100-sxm:256", tp=8, pp=4, dp=8, zero=1, sequence_parallel=True, microbatch_size=1,
                 global_batch=256, recompute="full") if engine != "deepspeed" else \
        _plan("llama3-8b", "h100-sxm:64", dp=64, zero=3, microbatch_size=2, global_batch=512, recompute="full")
    path = tmp_path / "plan.yaml"
    path.write_text(plan.to_yaml())
    assert main(["export", str(path), "--to", engine]) == 0
    out = capsys.readouterr().out
    golden = DATA / f"golden_{engine}.{suffix}"
    if REGEN:
        golden.write_text(out)
    assert out == golden.read_text()


def test_golden_vllm(tmp_path, capsys):
    target = _serving_plan(tmp_path, capsys)
    assert main(["export", str(target), "--to", "vllm"]) == 0
    out = capsys.readouterr().out
    golden = DATA / "golden_vllm.sh"
    if REGEN:
        golden.write_text(out)
    assert out == golden.read_text()


@pytest.mark.parametrize("engine,plan_fields,reason", [
    ("deepspeed", dict(tp=8, dp=8, sequence_parallel=True, global_batch=64), "tensor, pipeline and context parallelism"),
    ("megatron", dict(pp=4, dp=16, zero=3, global_batch=64), "does not run with pipeline parallelism"),
    ("megatron", dict(pp=4, dp=16, zero=1, global_batch=64, schedule="zero-bubble"), "not zero-bubble"),
    ("torchtitan", dict(tp=8, dp=8, sequence_parallel=False, global_batch=64), "sequence-parallel norms always"),
    ("vllm", dict(dp=64, global_batch=64), "vLLM serves; this is a training plan"),
])
def test_refusals_are_one_line_exit_2(engine, plan_fields, reason, tmp_path, capsys):
    path = tmp_path / "plan.yaml"
    path.write_text(_plan("llama3-8b", "h100-sxm:64", **plan_fields).to_yaml())
    out = tmp_path / "out.txt"
    assert main(["export", str(path), "--to", engine, "-o", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and reason in err and not out.exists()


NARAYANAN_175B = ("torchrun pretrain_gpt.py --num-layers 96 --hidden-size 12288 --num-attention-heads 96 "
                  "--seq-length 2048 --max-position-embeddings 2048 --tensor-model-parallel-size 8 "
                  "--pipeline-model-parallel-size 16 --num-layers-per-virtual-pipeline-stage 2 --micro-batch-size 1 "
                  "--global-batch-size 1536 --fp16 --vocab-size 51200 --log-interval 10 --lr 6e-5")


def test_simulate_from_megatron_prices_the_published_175b_run(capsys):
    # Narayanan et al. 2021, Table 1: GPT-3 175B on 1024 A100s, (t, p) = (8, 16), batch 1536,
    # 140 TFLOP/s per GPU (44% of peak) -- the same plan as the zoo's strategy for it
    code = main(["simulate", "--from", "megatron", NARAYANAN_175B, "--cluster", "a100-80g:1024", "--json"])
    assert code == 0
    out = json.loads(capsys.readouterr().out)
    s = out["strategy"]
    assert (s["tp"], s["pp"], s["dp"], s["virtual_stages"], s["global_batch"]) == (8, 16, 8, 3, 1536)
    assert out["not_understood"] == ["--log-interval 10", "--lr 6e-5"]
    tflops = out["predicted"]["model_tflops_per_gpu"]
    assert abs(tflops - 140) / 140 < 0.1


def test_plan_from_says_what_to_change(capsys):
    # a 1.3B GPT run with needless tensor and pipeline parallelism on 16 GPUs
    args = ("--num-layers 24 --hidden-size 2048 --num-attention-heads 16 --seq-length 2048 --max-position-embeddings 2048 "
            "--tensor-model-parallel-size 4 --pipeline-model-parallel-size 2 --micro-batch-size 2 "
            "--global-batch-size 512 --bf16 --vocab-size 51200 --log-interval 10 --lr 6e-5")
    code = main(["plan", "--from", "megatron", args, "--cluster", "a100-80g:16", "--no-timing"])
    out = capsys.readouterr().out
    assert code == 0
    assert "your megatron config, priced" in out and "paraplan's plan:" in out
    assert "2 setting(s) not understood, not priced: --log-interval 10; --lr 6e-5" in out
    changes = {line.split()[0]: line.split()[1:] for line in out.split("paraplan's plan:")[1].splitlines()[1:] if line}
    assert changes["tp"] == ["4", "->", "1"] and changes["pp"] == ["2", "->", "1"]
    speedup = float(out.split("paraplan's plan:")[1].split("s:")[1].split("x")[0])
    assert speedup >= 1.0


def test_torchtitan_import_of_a_llama3_8b_job(tmp_path, capsys):
    config = tmp_path / "llama3_8b.toml"  # torchtitan's train_configs/llama3_8b.toml, parallelism as shipped
    config.write_text('[model]\nname = "llama3"\nflavor = "8B"\n[training]\nlocal_batch_size = 1\nseq_len = 8192\n'
                      'steps = 1000\n[parallelism]\ndata_parallel_replicate_degree = 1\ndata_parallel_shard_degree = -1\n'
                      'tensor_parallel_degree = 1\n[activation_checkpoint]\nmode = "selective"\n'
                      'selective_ac_option = "op"\n[metrics]\nlog_freq = 10\n')
    assert main(["simulate", "--from", "torchtitan", str(config), "--cluster", "h100-sxm:8", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["model"] == "llama3-8b"
    assert out["strategy"]["dp"] == 8 and out["strategy"]["zero"] == 3 and out["strategy"]["recompute"] == "selective"
    assert out["not_understood"] == ["training.steps", "metrics.log_freq"]


def test_deepspeed_import_needs_a_model_and_says_so(tmp_path, capsys):
    config = tmp_path / "ds.json"
    config.write_text(json.dumps({"train_batch_size": 256, "train_micro_batch_size_per_gpu": 4,
                                  "zero_optimization": {"stage": 3, "offload_optimizer": {"device": "cpu"}},
                                  "bf16": {"enabled": True}}))
    assert main(["simulate", "--from", "deepspeed", str(config), "--cluster", "a100-80g:16", "--seq-len", "2048"]) == 2
    assert "add --model" in capsys.readouterr().err
    assert main(["simulate", "--from", "deepspeed", str(config), "--cluster", "a100-80g:16", "--seq-len", "2048",
                 "--model", "gpt3-6.7b", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["strategy"]["zero"] == 3 and out["strategy"]["microbatch_size"] == 4
    assert out["not_understood"] == ["zero_optimization.offload_optimizer"]


@pytest.mark.parametrize("engine,content,needle", [
    ("torchtitan", "[parallelism\ntensor_parallel_degree = 2", "not valid TOML"),
    ("torchtitan", '[parallelism]\ntensor_parallel_degree = "two"', "must be an integer"),
    ("torchtitan", '[parallelism]\nfsdp_reshard_after_forward = "sometimes"', "default, always or never"),
    ("torchtitan", '[parallelism]\npipeline_parallel_degree = 2\npipeline_parallel_schedule = "ZBVZeroBubble"',
     "not priced by paraplan"),
    ("deepspeed", "{not json", "not valid JSON"),
    ("deepspeed", '{"train_batch_size": 100, "train_micro_batch_size_per_gpu": 3, "gradient_accumulation_steps": 2}',
     "DeepSpeed refuses this too"),
    ("deepspeed", '{"zero_optimization": {"stage": 5}, "train_batch_size": 64}', "takes 0-3"),
    ("megatron", "--num-layers 24 --tensor-model-parallel-size", "needs a value"),
    ("megatron", "--num-layers 24 --hidden-size 2048 --num-attention-heads 16 --tensor-model-parallel-size 3",
     "does not divide the 16 GPUs"),
    ("megatron", "--num-layers 24 --hidden-size 2048 --num-attention-heads 16 --seq-length 2048 "
                 "--expert-model-parallel-size 4", "mixture-of-experts"),
])
def test_bad_engine_configs_are_one_line_exit_2(engine, content, needle, tmp_path, capsys):
    source = content
    if engine != "megatron":
        path = tmp_path / f"config.{'toml' if engine == 'torchtitan' else 'json'}"
        path.write_text(content)
        source = str(path)
    code = main(["simulate", "--from", engine, source, "--cluster", "a100-80g:16", "--model", "gpt3-1.3b",
                 "--seq-len", "2048"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and needle in err, err


def test_export_of_a_missing_plan_and_an_unknown_engine(tmp_path, capsys):
    assert main(["export", str(tmp_path / "none.yaml"), "--to", "megatron"]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["export", str(tmp_path / "none.yaml"), "--to", "nemo"]) == 2
    assert "invalid choice: 'nemo'" in capsys.readouterr().err


def test_qwen3s_qk_norm_travels_from_the_config_to_megatron_and_back():
    """Qwen3 and Gemma 3 normalize each head's q and k (q_norm / k_norm): Megatron-LM builds that with
    --qk-layernorm (TransformerConfig.qk_layernorm), which Qwen3 conversions pass. The export lacked it:
    the same FLOPs, another model. A Llama has none."""
    from planner.model_source import spec_from_hf_config

    qwen3 = {"model_type": "qwen3", "hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4,
             "num_key_value_heads": 2, "head_dim": 16, "num_hidden_layers": 2, "vocab_size": 256,
             "max_position_embeddings": 64, "rms_norm_eps": 1e-6}
    assert spec_from_hf_config(qwen3).qk_norm and not spec_from_hf_config({**qwen3, "model_type": "llama"}).qk_norm
    assert spec_from_hf_config({**qwen3, "model_type": "gemma3_text"}).qk_norm
    assert ZOO["qwen3-30b-a3b"].qk_norm and not ZOO["llama3-70b"].qk_norm
    plan = _plan("qwen3-30b-a3b", "h100-sxm:16", tp=1, pp=1, dp=16, ep=8, zero=1, microbatch_size=1,
                 global_batch=256, recompute="full")
    argv = [str(a) for a in megatron.export(plan)]
    assert "--qk-layernorm" in argv and megatron.import_(argv, world_size=16).spec.qk_norm
    llama = _plan("llama3-70b", "h100-sxm:256", tp=8, pp=4, dp=8, zero=1, sequence_parallel=True, microbatch_size=1,
                  global_batch=256, recompute="full")
    assert "--qk-layernorm" not in [str(a) for a in megatron.export(llama)]
    assert ModelSpec.from_dict({**ZOO["qwen3-30b-a3b"].to_dict()}).qk_norm  # a spec file keeps it


def test_the_rope_base_travels_from_the_config_to_megatron_and_back():
    """Llama 3 rotates with a base of 500,000, Qwen3 and Mixtral with 1,000,000 (rope_theta; transformers 5 writes
    it under rope_parameters): the spec keeps it, the built-in model rotates with it, Megatron-LM's arguments carry
    it (--rotary-base, an int flag) and read it back. Exports wrote Megatron's default 10,000: the same FLOPs, not
    the same model."""
    import torch

    from planner.model_source import spec_from_hf_config
    from planner.zoo.model import rope_tables

    llama = {"model_type": "llama", "hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4,
             "num_hidden_layers": 2, "vocab_size": 256, "max_position_embeddings": 64, "rms_norm_eps": 1e-5}
    assert spec_from_hf_config({**llama, "rope_theta": 500000.0}).rope_theta == 500000.0
    assert spec_from_hf_config({**llama, "rope_parameters": {"rope_type": "default", "rope_theta": 1e6}}).rope_theta == 1e6
    assert spec_from_hf_config(llama).rope_theta == 0.0  # the classic 10,000
    assert ZOO["llama3-70b"].rope_theta == 500000.0 and ZOO["qwen3-30b-a3b"].rope_theta == 1e6
    plan = _plan("llama3-70b", "h100-sxm:256", tp=8, pp=4, dp=8, zero=1, sequence_parallel=True, microbatch_size=1,
                 global_batch=256, recompute="full")
    argv = [str(a) for a in megatron.export(plan)]
    assert argv[argv.index("--rotary-base") + 1] == "500000"
    assert megatron.import_(argv, world_size=256).spec.rope_theta == 500000.0
    from planner.zoo.model import Transformer

    with torch.device("meta"):
        model = Transformer(ZOO["tiny-llama"].__class__(**{**ZOO["tiny-llama"].to_dict(), "rope_theta": 500000.0}))
    model.to_empty(device="cpu")
    model.init_buffers()
    cos, _ = rope_tables(16, 32, 500000.0)
    assert torch.equal(model.rope_cos, cos) and not torch.equal(cos, rope_tables(16, 32)[0])


def test_llama_3_1s_rope_scaling_is_read_built_and_exported():
    """Llama 3.1 stretches RoPE's low frequencies by 8 over the 8,192 positions it was first trained
    at (rope_scaling, rope_type llama3; Llama 3.2 by 32). The reader kept only the base, the built-in
    model rotated without the scaling and the Megatron arguments said none (--use-rope-scaling):
    a Llama 3 checkpoint loaded there would rotate as another model. Read (both config layouts),
    built as transformers' LlamaRotaryEmbedding builds it, exported and read back."""
    import torch

    transformers = pytest.importorskip("transformers")
    from planner.model_source import spec_from_hf_config
    from planner.zoo.model import Transformer, rope_tables

    llama = {"model_type": "llama", "hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4,
             "num_hidden_layers": 2, "vocab_size": 256, "max_position_embeddings": 131072, "rms_norm_eps": 1e-5}
    scaling = {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8192}
    for layout in ({"rope_theta": 500000.0, "rope_scaling": scaling},  # transformers 4
                   {"rope_parameters": {**scaling, "rope_theta": 500000.0}}):  # transformers 5
        spec = spec_from_hf_config({**llama, **layout})
        assert (spec.rope_scaling, spec.rope_factor, spec.rope_original_positions) == ("llama3", 32.0, 8192)
    assert spec_from_hf_config({**llama, "rope_scaling": {"rope_type": "linear", "factor": 2.0}}).rope_scaling == ""
    with torch.device("meta"):
        model = Transformer(ModelSpec.from_dict({**ZOO["tiny-llama"].to_dict(), "seq_len": 20000, "rope_theta": 500000.0,
                                                 "rope_scaling": "llama3", "rope_factor": 32.0,
                                                 "rope_original_positions": 8192}))
    model.to_empty(device="cpu")
    model.init_buffers()
    config = transformers.LlamaConfig(hidden_size=64, num_attention_heads=4, max_position_embeddings=131072,
                                      rope_theta=500000.0, rope_scaling=scaling)
    rotary = transformers.models.llama.modeling_llama.LlamaRotaryEmbedding(config)
    cos, _ = rotary(torch.zeros(1, 4, 16), torch.arange(20000).unsqueeze(0))  # (1, T, head_dim)
    assert torch.allclose(model.rope_cos, cos[0, :, :8], atol=1e-6)
    assert not torch.allclose(rope_tables(16, 20000, 500000.0)[0], model.rope_cos, atol=1e-2)
    spec = ZOO["llama3.1-8b"]
    assert (spec.rope_scaling, spec.rope_factor, spec.rope_original_positions) == ("llama3", 8.0, 8192)
    plan = _plan("llama3.1-8b", "h100-sxm:64", dp=64, zero=3, microbatch_size=2, global_batch=512, seq_len=8192)
    argv = [str(a) for a in megatron.export(plan)]
    assert "--use-rope-scaling" in argv and argv[argv.index("--rope-scaling-factor") + 1] == "8.0"
    assert set(a for a in argv if a.startswith("--")) <= set(KEYS["megatron"]["flags"])
    back = megatron.import_(argv, world_size=64).spec
    assert (back.rope_scaling, back.rope_factor, back.rope_original_positions) == ("llama3", 8.0, 8192)
    assert megatron.import_([a for a in argv if a not in ("--use-rope-scaling",)], world_size=64).spec.rope_scaling == ""


def test_torchtitan_flavors_are_found_by_shape_and_a_model_without_one_is_said(tmp_path, capsys):
    """A Llama 3.1 8B read from its Hugging Face directory is named after the directory: the job config
    said name = "llama31-8b", flavor = "custom", which torchtitan has no model for. Its shape is
    torchtitan's llama3 8B; a shape torchtitan has no flavor of is written as before, with a note."""
    from dataclasses import replace

    s = Strategy(dp=64, zero=3, microbatch_size=2, global_batch=512, seq_len=8192)
    mine = plan_from_strategy(replace(ZOO["llama3.1-8b"], name="llama31-8b"), s, "h100-sxm:64", {})
    model = tomllib.loads(torchtitan.export(mine))["model"]
    assert (model["name"], model["flavor"]) == ("llama3", "8B") and torchtitan.export_notes(mine) == []
    other = plan_from_strategy(replace(ZOO["llama3-8b"], name="wide", ffn_hidden=16384), s, "h100-sxm:64", {})
    assert tomllib.loads(torchtitan.export(other))["model"] == {"name": "wide", "flavor": "custom"}
    target = tmp_path / "wide.yaml"
    target.write_text(other.to_yaml())
    assert main(["export", str(target), "--to", "torchtitan"]) == 0
    assert "torchtitan has no flavor of wide's shape" in capsys.readouterr().err
