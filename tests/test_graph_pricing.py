"""The step priced from the block's traced graph under the plan's placements (planner.pricing).

Under Megatron's layout the graph-priced step must agree with the layer formulas (within 3%,
so the published fidelity of those formulas carries over); under any other layout it must
price what the placements say."""

import json

import pytest
import yaml

from costmodel import build_step, load_cluster, simulate
from costmodel.strategy import Strategy
from planner.plan import megatron_placements
from planner.pricing import graph_price, price_step
from planner.zoo import ZOO
from tests_helpers import paraplan

LAYOUTS = [  # (tp, sequence parallel, microbatch)
    (1, False, 1),
    (4, False, 1),
    (8, True, 2),
]
# MoE: formula-priced (planner.pricing.unpriceable); Llama 3.1's 8B and 70B are Llama 3's shapes (longer positions)
BIG = [n for n in ZOO if not n.startswith(("tiny", "llama3.1")) and not ZOO[n].moe]


def _both(spec, tp, sp, mbs, cluster="a100-80g"):
    cl = load_cluster(f"{cluster}:{tp * 2}")
    s = Strategy(tp=tp, dp=2, sequence_parallel=sp, microbatch_size=mbs, global_batch=8 * mbs,
                 seq_len=min(spec.seq_len, 2048))
    priced = graph_price(spec, s, cl, megatron_placements(spec, s))
    formula = simulate(build_step(spec, s, cl), record_events=False)
    graph = simulate(build_step(spec, s, cl, priced.block), record_events=False)
    return formula, graph, priced


@pytest.mark.parametrize("name", BIG)
def test_graph_price_of_megatron_layout_matches_the_formulas(name):
    spec = ZOO[name]
    for tp, sp, mbs in LAYOUTS:
        if spec.heads % tp:
            continue
        formula, graph, priced = _both(spec, tp, sp, mbs)
        assert priced.block.source == "graph" and priced.pinned >= 6
        assert graph.step_time_s == pytest.approx(formula.step_time_s, rel=0.03), (name, tp, sp)
        assert graph.memory_gib["parameters"] == pytest.approx(formula.memory_gib["parameters"], rel=0.01)


@pytest.mark.parametrize("sp", [False, True])
def test_megatron_collectives_read_off_the_solved_graph(sp):
    """Two reductions forward and two backward per layer, as Korthikanti counts them."""
    _, _, priced = _both(ZOO["llama3-8b"], 8, sp, 1)
    kinds: dict[tuple[str, str], int] = {}
    for *_, t in priced.solution.transfers():
        kinds[(t.phase, t.kind)] = kinds.get((t.phase, t.kind), 0) + 1
    if sp:
        expected = {("forward", "all_gather"): 2, ("forward", "reduce_scatter"): 2,
                    ("backward", "all_gather"): 2, ("backward", "reduce_scatter"): 2}
    else:
        expected = {("forward", "all_reduce"): 2, ("backward", "all_reduce"): 2}
    assert kinds == expected


def test_hugging_face_module_priced_on_its_own_graph():
    pytest.importorskip("transformers")
    from planner.model_source import load_model, source_and_map

    where = "hf:tests/data/llama3_8b_config.json"
    spec, _ = load_model(where)
    source, mmap, _ = source_and_map(where, spec)
    assert source["kind"] == "hf"
    cl = load_cluster("h100-sxm:8")
    s = Strategy(tp=4, dp=2, sequence_parallel=False, global_batch=8, seq_len=4096)
    placements = megatron_placements(spec, s, mmap)
    priced = graph_price(spec, s, cl, placements, source=source)
    names = set(priced.solution.parameter_placements())
    assert "model.layers.0.self_attn.q_proj.weight" in names and priced.pinned == 9  # 7 linears, 2 norms
    assert priced.solution.parameter_placements()["model.layers.0.mlp.down_proj.weight"] == {"tp": "Shard(1)"}
    forward = sorted(k for k, *_ in priced.solution.forward_collectives())
    assert forward == ["all_reduce", "all_reduce"]
    formula = simulate(build_step(spec, s, cl), record_events=False)
    graph = simulate(build_step(spec, s, cl, priced.block), record_events=False)
    assert graph.step_time_s == pytest.approx(formula.step_time_s, rel=0.03)


def test_replicating_the_mlp_by_hand_changes_the_prediction():
    spec = ZOO["llama2-7b"]
    cl = load_cluster("a100-80g:8")
    s = Strategy(tp=4, dp=2, sequence_parallel=False, global_batch=16, seq_len=2048)
    megatron = megatron_placements(spec, s)
    edited = {k: v for k, v in megatron.items() if ".feed_forward." not in k}
    a = price_step(spec, s, cl, megatron)
    b = price_step(spec, s, cl, edited)
    mlp = 3 * spec.hidden * spec.ffn_hidden
    per_layer = (b.memory_gib["parameters"] - a.memory_gib["parameters"]) * 2**30 / spec.layers
    # every rank now holds the whole MLP (bf16 weights over dp 2 unsharded: 2 bytes per parameter)
    assert per_layer == pytest.approx(mlp * (1 - 1 / 4) * s.policy.param_bytes, rel=0.02)
    # the cheapest way to run a replicated MLP on 4 ranks: each takes a quarter of the tokens
    # (its weights whole, their gradients all-reduced once a step) and the stream is gathered
    priced = graph_price(spec, s, cl, edited)
    assert all(not p for k, p in priced.solution.parameter_placements().items() if "feed_forward" in k)
    mlp_linears = [st.name for op, st in priced.solution.choice.items()
                   if priced.solution.nodes[op]["kind"] == "linear" and "feed_forward" in priced.solution.nodes[op]["module"]]
    assert mlp_linears and all(name.startswith("batch") for name in mlp_linears)
    assert b.step_time_s > a.step_time_s * 1.05


def test_simulate_plan_prices_the_edited_placements(tmp_path):
    plan_path = tmp_path / "plan.yaml"
    made = paraplan("simulate", "--model", "llama2-7b", "--cluster", "a100-80g:8", "--tp", "4", "--dp", "2",
                    "--global-batch", "16", "--seq-len", "2048", "--no-sequence-parallel", "-o", str(plan_path), "--json")
    assert made.returncode == 0, made.stderr
    written = json.loads(made.stdout)
    assert written["priced"] == "graph"
    again = json.loads(paraplan("simulate", "--plan", str(plan_path), "--json").stdout)
    assert again["predicted"] == written["predicted"]  # the plan reproduces its prediction
    plan = yaml.safe_load(plan_path.read_text())
    plan["placements"] = {k: v for k, v in plan["placements"].items() if ".feed_forward." not in k}
    plan_path.write_text(yaml.safe_dump(plan))
    edited = json.loads(paraplan("simulate", "--plan", str(plan_path), "--json").stdout)
    assert edited["predicted"]["step_time_s"] > written["predicted"]["step_time_s"] * 1.05
    assert edited["predicted"]["memory_gib"]["parameters"] > written["predicted"]["memory_gib"]["parameters"]


@pytest.mark.parametrize("cp", [2, 4])
def test_context_parallel_block_is_one_ranks_share_of_the_sequence(cp):
    """Each context-parallel rank runs its s/cp queries against all s keys: traced at s/cp,
    attention widened to the whole sequence's keys, as the formulas price it."""
    spec = ZOO["llama3-8b"]
    cl = load_cluster(f"h100-sxm:{8 * cp}")
    s = Strategy(tp=4, cp=cp, dp=2, sequence_parallel=True, global_batch=8, seq_len=16384)
    priced = graph_price(spec, s, cl, megatron_placements(spec, s))
    formula = simulate(build_step(spec, s, cl), record_events=False)
    graph = simulate(build_step(spec, s, cl, priced.block), record_events=False)
    assert graph.step_time_s == pytest.approx(formula.step_time_s, rel=0.03)


def test_hf_llama_given_as_py_is_planned_and_priced_as_it_runs(tmp_path):
    """Was: a Hugging Face LlamaForCausalLM (70B shape, GQA) given as py: was planned with
    q/k/v split on their input width and one norm sharded, while the prediction priced
    Megatron's layout. Now the placements are the module's own linears split column/row, its
    norms whole, and the prediction is the price of those placements on its graph."""
    pytest.importorskip("transformers")
    target = tmp_path / "plan.yaml"
    out = paraplan("plan", "--model", "py:user_model:hf_llama_70b_shape", "--cluster", "a100-80g:16",
                   "--global-batch", "64", "--tp", "4", "--no-timing", "-o", str(target), "--json")
    assert out.returncode == 0, out.stderr
    plan = json.loads(out.stdout)["plan"]
    placements = plan["placements"]
    for name in ("q_proj", "k_proj", "v_proj"):
        assert placements[f"model.layers.*.self_attn.{name}.weight"]["tp"] == "Shard(0)"
    assert placements["model.layers.*.self_attn.o_proj.weight"]["tp"] == "Shard(1)"
    assert placements["model.layers.*.mlp.down_proj.weight"]["tp"] == "Shard(1)"
    assert not any("tp" in v for k, v in placements.items() if "layernorm" in k)
    assert plan["search"]["priced"] == "graph"
    assert plan["predicted"]["step_time_s"] == pytest.approx(plan["search"]["formula_step_s"], rel=0.03)
    again = json.loads(paraplan("simulate", "--plan", str(target), "--json").stdout)
    assert again["predicted"] == plan["predicted"]


def test_a_placement_that_does_not_fit_is_named_in_one_line():
    from costmodel import ConfigError

    spec = ZOO["tiny-llama"]
    s = Strategy(tp=2, dp=1, global_batch=2)
    bad = {**megatron_placements(spec, s), "layers.*.attention.wq.weight": {"tp": "Shard(5)"}}
    with pytest.raises(ConfigError, match=r"placement Shard\(5\) of layers\.0\.attention\.wq\.weight does not fit"):
        price_step(spec, s, load_cluster("cpu:2"), bad)


def test_a_mixture_of_experts_is_priced_by_the_formulas_and_says_so():
    """Routing is data-dependent: torch.export cannot trace it on the meta device, so the plan's
    step comes from costmodel.moe and the plan says why."""
    from costmodel import Strategy, load_cluster, predict
    from planner.pricing import price_step, unpriceable

    spec, cluster = ZOO["tiny-moe"], load_cluster("cpu:4")
    s = Strategy(dp=4, ep=2, global_batch=8, microbatch_size=2, precision="fp32")
    assert "torch.export" in unpriceable(spec) and not unpriceable(ZOO["tiny-llama"])
    assert price_step(spec, s, cluster, {}).step_time_s == predict(spec, s, cluster).step_time_s


def test_a_biased_models_ilp_placements_split_each_bias_with_its_weight(tmp_path):
    """GPT-3 13B on 8 H100s (tp 2 x pp 4): the block's ILP left q's and k's biases whole beside
    their column-split weights (a free local slice in its costs), which the pinned pricing, and so
    `check`, refused ("no strategy of op linear ... under the pinned placements"): `plan` wrote
    nothing. A bias now follows its weight as ColwiseParallel / RowwiseParallel run it."""
    target = tmp_path / "g13.yaml"
    out = paraplan("plan", "--model", "gpt3-13b", "--cluster", "h100-sxm:8", "--global-batch", "512", "--json",
                   "-o", str(target))
    assert out.returncode == 0, out.stderr
    got = json.loads(out.stdout)
    assert got["plan"]["search"]["priced"] == "graph" and got["plan"]["mesh"]["tp"] == 2
    placements = got["plan"]["placements"]
    for name, axes in placements.items():
        if name.endswith(".bias"):
            weight = placements.get(name[: -len(".bias")] + ".weight", {})
            assert axes.get("tp") == "Shard(0)" == weight.get("tp"), name
    checked = paraplan("check", str(target))
    assert checked.returncode == 0 and "OK" in checked.stdout, checked.stdout + checked.stderr
