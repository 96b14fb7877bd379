"""Any strategy either is refused with a ConfigError or gives a finite, consistent result."""

import math

from hypothesis import given, settings
from hypothesis import strategies as st

from costmodel import ConfigError, Strategy, build_step, load_cluster, simulate
from costmodel.analytic import estimate
from planner.zoo import ZOO

CLUSTERS = {n: load_cluster(n) for n in ("a100-80g:8", "a100-80g:64", "h100-sxm:32", "cpu:4")}
MODELS = ["tiny-gpt", "tiny-llama", "gpt3-1.3b", "llama3-8b", "llama2-70b"]


@settings(max_examples=300, deadline=None)
@given(
    model=st.sampled_from(MODELS),
    cluster=st.sampled_from(sorted(CLUSTERS)),
    tp=st.sampled_from([1, 2, 3, 4, 8]),
    pp=st.sampled_from([1, 2, 4, 8]),
    cp=st.sampled_from([1, 2]),
    zero=st.integers(0, 3),
    shard=st.sampled_from([0, 1, 2, 4]),
    sp=st.booleans(),
    recompute=st.sampled_from(["none", "selective", "full"]),
    mbs=st.sampled_from([1, 2, 3]),
    batch_mult=st.integers(1, 8),
    schedule=st.sampled_from(["gpipe", "1f1b", "interleaved"]),
    v=st.integers(1, 3),
    flash=st.booleans(),
)
def test_strategy_is_refused_or_simulated(model, cluster, tp, pp, cp, zero, shard, sp, recompute, mbs, batch_mult,
                                           schedule, v, flash):
    c = CLUSTERS[cluster]
    world = c.world_size
    try:
        dp = max(1, world // (tp * pp * cp))
        s = Strategy(tp=tp, pp=pp, cp=cp, dp=dp, zero=zero, shard_group=shard, sequence_parallel=sp,
                     recompute=recompute, microbatch_size=mbs, global_batch=dp * mbs * batch_mult * pp,
                     schedule=schedule, virtual_stages=v if schedule == "interleaved" else 1, flash_attention=flash)
        model_ = build_step(ZOO[model], s, c)
    except ConfigError as exc:
        assert str(exc) and "\n" not in str(exc)
        return
    r = simulate(model_)
    assert math.isfinite(r.step_time_s) and r.step_time_s > 0
    assert 0 <= r.bubble_fraction < 1
    assert 0 < r.mfu < 1
    assert r.memory_gib["total"] > 0 and all(v >= 0 for v in r.memory_gib.values())
    assert all(v >= 0 for v in r.time_s.values())
    # every second of the bottleneck rank is accounted for
    accounted = sum(r.time_s[k] for k in ("compute", "recompute", "tp_comm", "cp_comm", "exposed_comm", "bubble"))
    assert accounted >= r.step_time_s * (1 - 1e-9)
    assert estimate(model_).step_time_s > 0
