"""`paraplan profile`: the alpha-beta fit, profile composition, and a quick measured run."""

import pytest
import yaml

from costmodel import load_cluster
from costmodel.collectives import all_reduce_s
from costmodel.network import Group, Link
from runtime.profiler import fit_alpha_beta
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
    cluster = load_cluster("cpu-2core:4")
    data = yaml.safe_load(open("profiles/cpu-2core.yaml"))
    assert data["source"] == "measured" and data["extends"] == "cpu" and "torch" in data["measured"]
    assert cluster.device.peak_flops("fp32") == pytest.approx(data["device"]["peak_tflops"]["fp32"] * 1e12)
    assert cluster.device.hbm_gib == load_cluster("cpu:4").device.hbm_gib  # inherited, not measured
    assert cluster.intra.latency_us == data["links"]["intra_node"]["latency_us"]


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
