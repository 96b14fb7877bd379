"""`paraplan profile`: the alpha-beta fit, profile composition, and a quick measured run."""

import pytest
import yaml

from costmodel import load_cluster
from costmodel.collectives import all_reduce_s
from costmodel.network import Group, Link
from costmodel import Strategy
from runtime.profiler import fit_alpha_beta, fit_in_situ_latency
from tests_helpers import paraplan


def test_alpha_beta_fit_recovers_the_link():
    link = Link(bandwidth_gb_per_s=2.0, latency_us=500.0, efficiency=1.0)
    rows = []
    for n in (2, 4):
        g = Group(size=n, per_node=n, intra=link, inter=link)
        for nbytes in (2**12, 2**16, 2**20, 2**22):
            rows.append(("all_reduce", n, nbytes, all_reduce_s(nbytes, g)))
    fit = fit_alpha_beta(rows)
    assert fit["bandwidth_gb_per_s"] == pytest.approx(2.0, rel=1e-3)
    assert fit["latency_us"] == pytest.approx(500.0, rel=1e-3)


def test_committed_measured_profile_composes_with_its_datasheet():
    data = yaml.safe_load(open("profiles/cpu-2core.yaml"))
    assert data["source"] == "measured" and data["extends"] == "cpu" and "torch" in data["measured"]
    assert data["host_cores"] == 2 and set(data["calibration"]) >= {"compute", "latency_us", "host_wait_us", "fitted_to"}
    cal = data["calibration"]
    peak = data["device"]["peak_tflops"]["fp32"] * 1e12 * cal["compute"]  # one thread, as a step sustains it
    two, four = load_cluster("cpu-2core:2"), load_cluster("cpu-2core:4")
    assert two.device.peak_flops("fp32") == pytest.approx(peak)  # a core each
    # two processes per core, each keeping `shared_compute` of its half
    assert four.device.peak_flops("fp32") == pytest.approx(peak / 2 * cal["shared_compute"])
    assert four.device.hbm_gib == pytest.approx(load_cluster("cpu:4").device.hbm_gib / 4)  # the host's RAM, shared
    assert two.intra.latency_us == pytest.approx(cal["latency_us"])
    assert four.intra.latency_us == pytest.approx(cal["latency_us"] + cal["host_wait_us"])
    assert (two.intra.call_us, four.intra.call_us) == (pytest.approx(cal["call_us"]), pytest.approx(2 * cal["call_us"]))
    assert four.intra.bandwidth_gb_per_s == pytest.approx(data["links"]["intra_node"]["bandwidth_gb_per_s"] / 2)
    assert four.device.layer_overhead_us == pytest.approx(tuple(2 * v for v in data["device"]["layer_overhead_us"]))
    assert not four.overlaps_comm and load_cluster("a100-80g:8").overlaps_comm
    # each reference plan's error at the fitted point is recorded, and small
    assert all(abs(v["error_pct"]) < 30 for v in cal["fitted_to"].values())


def test_in_situ_latency_fit_recovers_alpha_and_wait():
    alpha, wait = 900e-6, 300e-6
    rows = [(p, 2 * (p - 1) * (alpha + wait * (max(1, p / 2) - 1))) for p in (2, 4, 8)]
    assert fit_in_situ_latency(rows, 2) == (pytest.approx(900.0, rel=1e-6), pytest.approx(300.0, rel=1e-6))


def test_calibration_fit_recovers_the_figures_it_was_made_with():
    """Measurements made by the simulator itself with a known calibration are fitted back to
    that calibration (a grid point), each plan's error 0."""
    from costmodel.cluster import load_profile_data
    from runtime.calibrate import REFERENCE_PLANS, _predicted, fit

    profile = load_profile_data("cpu-2core")
    profile.pop("calibration")
    truth = {"compute": 0.8, "latency_us": 1000.0, "host_wait_us": 500.0, "shared_compute": 0.8, "call_us": 1000.0}
    measured = {n: _predicted({**profile, "calibration": truth}, n) for n in REFERENCE_PLANS}
    got = fit(profile, measured)
    assert got["compute"] == pytest.approx(0.8)
    assert got["latency_us"] == pytest.approx(1000.0, rel=1e-3)
    assert got["host_wait_us"] == pytest.approx(500.0, rel=1e-3)
    assert got["shared_compute"] == pytest.approx(0.8) and got["call_us"] == pytest.approx(1000.0, rel=1e-3)
    assert all(abs(v["error_pct"]) < 0.2 for v in got["fitted_to"].values())


def test_pipeline_bubbles_free_the_shared_cores():
    """On processes sharing a host, a rank idle in a bubble leaves its core to the busy ones:
    pp4 on 2 cores runs faster than the static share predicts, and pp1 is unchanged."""
    from dataclasses import replace

    from costmodel import build_step, simulate
    from planner.zoo import ZOO

    spec = replace(ZOO["tiny-gpt"], hidden=256, heads=8, seq_len=256)
    shared = load_cluster("cpu-2core:4")
    from costmodel.runtime import FUSED

    # same figures, no processor sharing (and the fused runtime, which adds nothing to a host's measured figures)
    static = replace(shared, host_cores=None, runtime=FUSED)
    pp = Strategy(precision="fp32", pp=4, global_batch=4, microbatch_size=1, schedule="1f1b")  # bubble 3/7
    fast, slow = simulate(build_step(spec, pp, shared)), simulate(build_step(spec, pp, static))
    assert fast.step_time_s < 0.85 * slow.step_time_s
    dp = Strategy(precision="fp32", dp=4, global_batch=8, microbatch_size=2)
    a, b = simulate(build_step(spec, dp, shared)), simulate(build_step(spec, dp, static))
    assert a.time_s["compute"] == pytest.approx(b.time_s["compute"])


def test_quick_profile_writes_a_loadable_profile(tmp_path):
    out = tmp_path / "here.yaml"
    run = paraplan("profile", "-o", str(out), "--quick")
    assert run.returncode == 0, run.stderr[-2000:]
    data = yaml.safe_load(out.read_text())
    curve = data["device"]["gemm_efficiency"]
    assert max(e for _, e in curve) == 1.0 and min(e for _, e in curve) > 0
    assert data["links"]["intra_node"]["bandwidth_gb_per_s"] > 0
    sim = paraplan("simulate", "--model", "tiny-gpt", "--cluster", f"{out}:4", "--json")  # a profile path as DEVICE
    assert sim.returncode == 0, sim.stderr


def test_profile_needs_a_yaml_path(tmp_path):
    out = paraplan("profile", "-o", str(tmp_path / "x.txt"), "--quick")
    assert out.returncode == 2 and ".yaml" in out.stderr
