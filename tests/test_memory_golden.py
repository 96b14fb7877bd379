"""Memory: Korthikanti's activation formulas (exact), ZeRO's example and Table 1 (exact to
the published rounding), Korthikanti Figure 1 (within 5%)."""

import itertools

import pytest

from costmodel import Strategy, build_step, load_cluster
from costmodel.memory import korthikanti_layer_bytes, layer_activation_bytes, zero_model_state_bytes
from costmodel.spec import gpt_spec, llama_spec
from costmodel.strategy import Recompute
from golden_data import KORTHIKANTI_FIGURE1_GIB, KORTHIKANTI_TABLE3, ZERO_EXAMPLE_7_5B_64_GB, ZERO_TABLE1_GB
from planner.zoo import ZOO

GIB = 2**30

SHAPES = [  # (s, b, h, a) from Table 3 plus a small one
    (2048, 4, 6144, 64), (2048, 1, 12288, 96), (2048, 1, 20480, 128), (2048, 1, 25600, 160), (512, 8, 1024, 16),
]


@pytest.mark.parametrize("shape, t", list(itertools.product(SHAPES, [1, 2, 4, 8])))
@pytest.mark.parametrize(
    "sp, recompute",
    [(False, "none"), (True, "none"), (False, "selective"), (True, "selective"), (False, "full")],
)
def test_activation_bytes_equal_korthikanti_formulas(shape, t, sp, recompute):
    s, b, h, a = shape
    spec = gpt_spec("x", layers=1, hidden=h, heads=a, seq_len=s)
    ours = layer_activation_bytes(
        spec, seq=s, batch=b, tp=t, sequence_parallel=sp, recompute=Recompute(recompute), flash_attention=False
    )
    assert ours == pytest.approx(korthikanti_layer_bytes(s, b, h, a, t, sp=sp, recompute=recompute), rel=1e-12)


def test_korthikanti_closed_forms_spelled_out():
    s, b, h, a, t = 2048, 1, 12288, 96, 8
    assert korthikanti_layer_bytes(s, b, h, a, 1, sp=False, recompute="none") == s * b * h * (34 + 5 * a * s / h)
    assert korthikanti_layer_bytes(s, b, h, a, t, sp=True, recompute="selective") == 34 * s * b * h / t
    assert korthikanti_layer_bytes(s, b, h, a, t, sp=False, recompute="full") == 2 * s * b * h


def test_flash_attention_drops_the_quadratic_term():
    spec = gpt_spec("x", layers=1, hidden=4096, heads=32, seq_len=4096)
    kw = dict(seq=4096, batch=1, tp=4, sequence_parallel=True, bytes_per_value=2)
    flash = layer_activation_bytes(spec, recompute=Recompute.NONE, flash_attention=True, **kw)
    selective = layer_activation_bytes(spec, recompute=Recompute.SELECTIVE, flash_attention=False, **kw)
    assert flash == selective


def test_gqa_and_swiglu_change_what_is_kept():
    mha = llama_spec("a", layers=1, hidden=4096, heads=32, kv_heads=32, ffn_hidden=11008, vocab=10, seq_len=4096)
    gqa = llama_spec("b", layers=1, hidden=4096, heads=32, kv_heads=8, ffn_hidden=11008, vocab=10, seq_len=4096)
    kw = dict(seq=4096, batch=1, tp=1, sequence_parallel=False, recompute=Recompute.NONE, flash_attention=True)
    s, h, f = 4096, 4096, 11008
    # K and V shrink from h to h/4 wide: 2 tensors * 2 bytes * s * (h - h/4)
    assert layer_activation_bytes(mha, **kw) - layer_activation_bytes(gqa, **kw) == 2 * 2 * s * (h - h // 4)
    # no dropout: 4 bytes*sbh of norms and inputs, Q/out 4sbh, K/V 4sbh, three ffn-wide tensors
    assert layer_activation_bytes(mha, **kw) == s * (8 * h + 4 * h + 4 * h + 3 * 2 * f)


def _gb(x):
    return x / 1e9


@pytest.mark.parametrize("stage, zero", [("baseline", 0), ("stage1", 1), ("stage2", 2), ("stage3", 3)])
def test_zero_example_7_5b_on_64(stage, zero):
    p, g, o = zero_model_state_bytes(7.5e9, 64, zero, param_bytes=2, grad_bytes=2, optimizer_bytes=12)
    published = ZERO_EXAMPLE_7_5B_64_GB[stage]
    decimals = len(str(published).split(".")[1]) if "." in str(published) else 0
    assert round(_gb(p + g + o), decimals) == pytest.approx(published)


@pytest.mark.parametrize(
    "params, nd", [(p, nd) for p, row in ZERO_TABLE1_GB.items() for nd in row]
)
def test_zero_table1(params, nd):
    for zero, published in zip((1, 2, 3), ZERO_TABLE1_GB[params][nd]):
        total = _gb(sum(zero_model_state_bytes(params, nd, zero, param_bytes=2, grad_bytes=2, optimizer_bytes=12)))
        text = str(published)
        decimals = len(text.split(".")[1]) if "." in text else 0
        # the table rounds (or truncates) to the digits it prints
        assert abs(total - published) <= 10**-decimals, (params, nd, zero, total, published)


@pytest.mark.parametrize("row", KORTHIKANTI_TABLE3, ids=[r[0] for r in KORTHIKANTI_TABLE3])
def test_korthikanti_figure1_memory(row):
    name, _a, _h, _l, tp, pp, gpus, batch, mb, v = row
    spec = ZOO[name]
    cluster = load_cluster(f"a100-80g:{gpus}", runtime="megatron-core")  # the paper ran Megatron-LM
    states_pub, act_none_pub, act_sel_pub = KORTHIKANTI_FIGURE1_GIB[name]
    base = dict(tp=tp, pp=pp, global_batch=batch, microbatch_size=mb, virtual_stages=v, flash_attention=False,
                schedule="interleaved" if v > 1 else "1f1b")
    none = build_step(spec, Strategy(recompute="none", sequence_parallel=False, **base), cluster)
    sel = build_step(spec, Strategy(recompute="selective", sequence_parallel=True, **base), cluster)
    # activations of the first pipeline stage, which holds the most in flight
    assert none.memory[0].activations / GIB == pytest.approx(act_none_pub, rel=0.05)
    assert sel.memory[0].activations / GIB == pytest.approx(act_sel_pub, rel=0.05)
    # Figure 1's model states count the transformer layers: 18 bytes per parameter (Megatron's
    # bf16 weights, fp32 gradients, fp32 master weights and Adam moments)
    layers_on_rank = sum(none.layers[k] for k in range(0, pp * v, pp))
    layer_params = spec.layer_params // tp  # within 0.01% of the per-rank count (norms replicated)
    p, g, o = zero_model_state_bytes(layers_on_rank * layer_params, 1, 0, param_bytes=2, grad_bytes=4, optimizer_bytes=12)
    assert (p + g + o) / GIB == pytest.approx(states_pub, rel=0.05)
    # and the simulator's model states (embedding included) stay within 12% of that
    rm = none.memory[0]
    assert (rm.parameters + rm.gradients + rm.optimizer) / GIB == pytest.approx(states_pub, rel=0.12)


def test_zero_stages_shrink_memory_in_order():
    spec, cluster = ZOO["gpt3-13b"], load_cluster("a100-80g:64")
    totals = []
    for zero in range(4):
        m = build_step(spec, Strategy(dp=64, zero=zero, global_batch=64, recompute="full"), cluster)
        rm = m.memory[0]
        totals.append((rm.parameters, rm.gradients, rm.optimizer))
    assert totals[1][2] < totals[0][2] and totals[1][:2] == totals[0][:2]
    assert totals[2][1] < totals[1][1] and totals[2][0] == totals[1][0]
    assert totals[3][0] < totals[2][0]


def test_hsdp_shards_within_groups_only():
    spec, cluster = ZOO["gpt3-13b"], load_cluster("a100-80g:64")
    fsdp = build_step(spec, Strategy(dp=64, zero=3, global_batch=64), cluster).memory[0]
    hsdp = build_step(spec, Strategy(dp=64, zero=3, shard_group=8, global_batch=64), cluster).memory[0]
    assert hsdp.parameters == pytest.approx(fsdp.parameters * 8)
    assert hsdp.optimizer == pytest.approx(fsdp.optimizer * 8)


def test_pipeline_in_flight_microbatches():
    spec, cluster = ZOO["gpt3-13b"], load_cluster("a100-80g:8")
    base = dict(pp=8, global_batch=32, recompute="none")
    gpipe = build_step(spec, Strategy(schedule="gpipe", **base), cluster)
    ofob = build_step(spec, Strategy(schedule="1f1b", **base), cluster)
    # 1F1B: rank r keeps pp - r microbatches; GPipe keeps all 32 on every rank
    per_mb = ofob.memory[3].activations / 5
    assert ofob.memory[7].activations < ofob.memory[0].activations
    assert gpipe.memory[3].activations == pytest.approx(per_mb * 32, rel=1e-9)


def test_per_stage_recompute_trades_memory_on_the_early_stages():
    from costmodel import simulate

    spec, cluster = ZOO["gpt3-13b"], load_cluster("a100-80g:8")
    base = dict(pp=8, global_batch=64, schedule="1f1b")
    none = build_step(spec, Strategy(recompute="none", **base), cluster)
    full = build_step(spec, Strategy(recompute="full", **base), cluster)
    mixed = build_step(spec, Strategy(recompute="none", stage_recompute=("full",) * 4 + ("none",) * 4, **base), cluster)
    assert mixed.memory[0].activations < none.memory[0].activations  # rank 0 keeps 8 microbatches
    assert mixed.memory[7].activations == none.memory[7].activations
    t = [simulate(m, record_events=False).step_time_s for m in (none, mixed, full)]
    assert t[0] <= t[1] <= t[2]
