"""GPU profiles taken from datasheets (H800, B200, GB200 NVL72, B300, GB300 NVL72): every figure sourced and
tagged, flagged as not measured, and behaving as the hardware differs from the H100's.

Datasheet figures (dense; NVIDIA quotes sparse Tensor Core rates, twice these):
- H800 SXM5: H100 SXM5 compute and memory, NVLink 400 GB/s bidirectional.
- HGX/DGX B200: 2.25 PFLOP/s bf16, 4.5 fp8, 180 GB HBM3e at 8 TB/s, NVLink 5 1.8 TB/s.
- GB200 NVL72: 180 PF bf16 / 360 PF fp8 dense for 72 GPUs, 13.4 TB at 576 TB/s, 72 GPUs on
  one NVLink 5 domain (130 TB/s).
- HGX/DGX B300 (Blackwell Ultra): B200's bf16/fp8 rates, 288 GB HBM3e at 8 TB/s, 800 Gb/s ConnectX-8.
- GB300 NVL72: GB200 NVL72's fp8 (360 PF for 72), 288 GB HBM3e per GPU, 800 Gb/s ConnectX-8."""

import re
from pathlib import Path

import pytest
import yaml

from costmodel import load_cluster, predict
from costmodel.collectives import all_reduce_s
from costmodel.strategy import Strategy
from planner.zoo import ZOO

PROFILES = Path(__file__).resolve().parent.parent / "profiles"
EXPECTED = {  # name: (bf16 TFLOP/s, fp8, HBM GB, HBM TB/s, NVLink GB/s per direction, GPUs per NVLink domain)
    # HBM as nvidia-smi reports it: NVIDIA's "80 GB" (H100) is 81559 MiB = 79.6 GiB
    "h800": (989.4, 1978.9, 79.6, 3.35, 200, 8),
    "b200": (2250.0, 4500.0, 180 * 79.6 / 80, 8.0, 900, 8),
    "gb200": (2500.0, 5000.0, 186 * 79.6 / 80, 8.0, 900, 72),
    "b300": (2250.0, 4500.0, 288 * 79.6 / 80, 8.0, 900, 8),
    "gb300": (2500.0, 5000.0, 288 * 79.6 / 80, 8.0, 900, 72),
}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_datasheet_profile_figures_and_sources(name):
    data = yaml.safe_load((PROFILES / f"{name}.yaml").read_text())
    assert data["source"] == "datasheet" and "not measured" in data["description"]
    for key, text in data["sources"].items():
        assert re.search(r"\[(datasheet|assumed|published|documented)[^\]]*\]\s*$", text), (key, text)
    assert "[measured]" not in " ".join(data["sources"].values())
    bf16, fp8, hbm_gib, tb_s, nvlink, domain = EXPECTED[name]
    cluster = load_cluster(f"{name}:{domain}")
    dev = cluster.device
    assert dev.peak_flops("bf16") == pytest.approx(bf16 * 1e12)
    assert dev.peak_flops("fp8") == pytest.approx(fp8 * 1e12)
    assert dev.hbm_gib == pytest.approx(hbm_gib, rel=0.01)
    assert dev.hbm_gb_per_s == pytest.approx(tb_s * 1000)
    assert cluster.group(2, 1).intra.bandwidth_gb_per_s == nvlink
    assert cluster.gpus_per_node == domain


def test_h800_differs_from_h100_only_in_nvlink():
    h100, h800 = load_cluster("h100-sxm:64"), load_cluster("h800:64")
    assert h800.device.peak_flops("bf16") == h100.device.peak_flops("bf16")
    gib = 2**30
    # a tensor-parallel all-reduce inside the node: NVLink-bound, over twice as slow
    assert all_reduce_s(gib, h800.group(8, 1)) > 2 * all_reduce_s(gib, h100.group(8, 1))
    # a data-parallel one across nodes: the same InfiniBand
    assert all_reduce_s(gib, h800.group(8, 8)) == pytest.approx(all_reduce_s(gib, h100.group(8, 8)), rel=0.05)
    s = Strategy(tp=8, dp=8, global_batch=64, seq_len=4096)
    assert predict(ZOO["llama2-70b"], s, h800).step_time_s > predict(ZOO["llama2-70b"], s, h100).step_time_s


def test_blackwell_is_faster_and_roomier_than_hopper():
    s = Strategy(tp=2, dp=32, zero=3, global_batch=256, seq_len=8192)
    h100 = predict(ZOO["llama3-8b"], s, load_cluster("h100-sxm:64"))
    b200 = predict(ZOO["llama3-8b"], s, load_cluster("b200:64"))
    assert 1.8 < h100.step_time_s / b200.step_time_s < 2.6  # 2.27x the dense bf16 peak, 2.4x the HBM bandwidth
    # an NVL72 domain holds tensor-parallel groups of up to 72 GPUs on NVLink
    assert load_cluster("gb200:144").group(36, 1).nodes == 1 and load_cluster("b200:144").group(32, 1).nodes == 4


def test_fp8_recipes_keep_attention_in_16_bits_and_pay_the_input_casts():
    """Transformer Engine's fp8 recipes: GEMMs at the fp8 peak on an fp8 copy (and transpose) of
    their input written by its producer; dot-product attention stays in bf16."""
    from costmodel.ops import FP8_CAST_BYTES_PER_INPUT, attention_s, gemm_s

    dev = load_cluster("h100-sxm:8").device
    kw = dict(tokens=8192, s_kv=4096, q_width=4096, kv_width=1024, batch=2, bytes_per_value=2)
    assert attention_s(dev, "fp8", **kw) == attention_s(dev, "bf16", **kw)
    m, k, n = 8192, 4096, 14336
    pure = dev.gemm_s(2.0 * m * k * n, 2 * (m * k + k * n + m * n), "fp8", rows=m)
    assert gemm_s(dev, "fp8", m, k, n, 2) == pytest.approx(pure + dev.memory_s(FP8_CAST_BYTES_PER_INPUT * m * k))
    assert gemm_s(dev, "bf16", m, k, n, 2) > gemm_s(dev, "fp8", m, k, n, 2)
