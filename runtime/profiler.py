"""`paraplan profile`: measure this machine and write a profile the cost model reads.

GEMMs over a grid of sizes, fused attention (SDPA), a memory-bound copy, and collectives
(all-reduce, all-gather, reduce-scatter, all-to-all, send/recv) over group and message sizes
through torch.distributed (gloo on CPU, NCCL on GPU). The figures are fitted to the cost
model's terms: the best GEMM rate is the peak and each size's share of it the efficiency
curve; attention likewise; the copy's rate is the memory bandwidth; the ring collectives give
alpha (latency) and beta (bandwidth) by least squares. The profile `extends` a datasheet
profile, so it overrides only what was measured, and records device, torch version, date.
"""

from __future__ import annotations

import datetime
import os
import platform
import socket
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import yaml
from tqdm import tqdm

COLLECTIVES = ("all_reduce", "all_gather", "reduce_scatter", "all_to_all", "send_recv")


def _time(fn, reps: int) -> float:
    fn()  # warm-up
    samples = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            torch.cuda.synchronize()
        samples.append(time.perf_counter() - t0)
    return statistics.median(samples)


def measure_gemms(device: str, sizes: list[int], dtype: torch.dtype, reps: int, bar) -> list[tuple[float, float]]:
    """(FLOPs, seconds) of square GEMMs."""
    out = []
    for n in sizes:
        a = torch.randn(n, n, device=device, dtype=dtype)
        b = torch.randn(n, n, device=device, dtype=dtype)
        out.append((2.0 * n**3, _time(lambda: a @ b, reps)))
        bar.update()
    return out


def measure_attention(device: str, seqs: list[int], dtype: torch.dtype, reps: int, bar) -> list[tuple[float, float]]:
    """(FLOPs of the causal half, seconds) of SDPA forward, 8 heads of 64."""
    out = []
    for s in seqs:
        q = torch.randn(1, 8, s, 64, device=device, dtype=dtype)
        t = _time(lambda: torch.nn.functional.scaled_dot_product_attention(q, q, q, is_causal=True), reps)
        out.append((4.0 * 8 * s * s * 64 * 0.5, t))
        bar.update()
    return out


def measure_copy(device: str, mib: int, reps: int) -> float:
    """Bytes per second of a large copy (read + write)."""
    x = torch.empty(mib * 2**20 // 4, device=device)
    y = torch.empty_like(x)
    t = _time(lambda: y.copy_(x), reps)
    return 2 * x.numel() * 4 / t


def _collective_worker(rank: int, world: int, port: int, sizes: list[int], reps: int, backend: str, out_path: str):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group(backend, rank=rank, world_size=world)
    device = f"cuda:{rank}" if backend == "nccl" else "cpu"
    gather = getattr(dist, "all_gather_single", dist.all_gather_into_tensor)  # renamed in newer torch
    scatter = getattr(dist, "reduce_scatter_single", dist.reduce_scatter_tensor)
    rows = []
    for nbytes in sizes:
        n = max(world, nbytes // 4 // world * world)  # fp32 elements, divisible by the world
        full = torch.randn(n, device=device)
        part = torch.empty(n // world, device=device)
        ops = {
            "all_reduce": lambda: dist.all_reduce(full),
            "all_gather": lambda: gather(full, part),
            "reduce_scatter": lambda: scatter(part, full),
            "all_to_all": lambda: dist.all_to_all_single(torch.empty_like(full), full),
            "send_recv": (lambda: dist.send(full, 1) if rank == 0 else dist.recv(full, 0) if rank == 1 else None),
        }
        for name, fn in ops.items():
            dist.barrier()
            t = _time(fn, reps)
            rows.append((name, world, n * 4, t))
    if rank == 0:
        Path(out_path).write_text(yaml.safe_dump(rows))
    dist.barrier()
    dist.destroy_process_group()


def measure_collectives(worlds: list[int], sizes: list[int], reps: int, backend: str, bar) -> list[tuple]:
    rows = []
    for world in worlds:
        with tempfile.TemporaryDirectory() as tmp, socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
            s.close()
            out = str(Path(tmp) / "rows.yaml")
            mp.start_processes(_collective_worker, args=(world, port, sizes, reps, backend, out), nprocs=world,
                               join=True, start_method="spawn")
            rows += [tuple(r) for r in yaml.safe_load(Path(out).read_text())]
        bar.update()
    return rows


def fit_alpha_beta(rows: list[tuple]) -> dict:
    """Ring model: t = steps * alpha + factor * bytes / bw (planner's costmodel.collectives)."""
    xs, ys = [], []
    for name, n, nbytes, t in rows:
        if name == "all_reduce":
            steps, factor = 2 * (n - 1), 2 * (n - 1) / n
        elif name in ("all_gather", "reduce_scatter", "all_to_all"):
            steps, factor = n - 1, (n - 1) / n
        else:
            steps, factor = 1, 1.0
        xs.append([steps, factor * nbytes])
        ys.append(t)
    (alpha, inv_bw), *_ = np.linalg.lstsq(np.array(xs), np.array(ys), rcond=None)
    alpha = max(float(alpha), 1e-7)
    bw = 1.0 / max(float(inv_bw), 1e-15)
    return {"bandwidth_gb_per_s": round(bw / 1e9, 4), "latency_us": round(alpha * 1e6, 2), "efficiency": 1.0}


def _curve(points: list[tuple[float, float]], peak_flops: float) -> list[list[float]]:
    return [[float(f"{f:.4g}"), round(min(1.0, f / t / peak_flops), 4)] for f, t in sorted(points)]


def profile(out: Path, *, device: str = "cpu", quick: bool = False, base: str | None = None) -> dict:
    if device == "cuda" and not torch.cuda.is_available():
        from costmodel.errors import ConfigError

        raise ConfigError("--device cuda: no CUDA device here; use --device cpu")
    sizes = [128, 256, 512, 1024] if quick else [64, 128, 256, 512, 1024, 1536, 2048]
    seqs = [256, 512, 1024] if quick else [128, 256, 512, 1024, 2048]
    reps = 3 if quick else 7
    worlds = [2, 4] if device == "cpu" else [torch.cuda.device_count()]
    msgs = [2**14, 2**18, 2**21] if quick else [2**12, 2**14, 2**16, 2**18, 2**20, 2**22]
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    total = len(sizes) + len(seqs) + len(worlds) + 1
    with tqdm(total=total, desc="profiling", unit="step", disable=None) as bar:
        gemms = measure_gemms(device, sizes, dtype, reps, bar)
        attn = measure_attention(device, seqs, dtype, reps, bar)
        copy_bps = measure_copy(device, 64 if quick else 256, reps)
        bar.update()
        rows = measure_collectives(worlds, msgs, reps, "nccl" if device == "cuda" else "gloo", bar)
    peak = max(f / t for f, t in gemms)
    dname = "fp32" if dtype == torch.float32 else "bf16"
    link = fit_alpha_beta(rows)
    name = torch.cuda.get_device_name() if device == "cuda" else (platform.processor() or platform.machine())
    data = {
        "name": out.stem,
        "extends": base or ("cpu" if device == "cpu" else "h100-sxm"),
        "description": f"measured on {name}, {os.cpu_count()} CPUs" if device == "cpu" else f"measured on {name}",
        "source": "measured",
        "measured": {"device": name, "torch": str(torch.__version__), "date": datetime.date.today().isoformat(),
                     "host": platform.node(), "quick": quick},
        "device": {
            "peak_tflops": {dname: round(peak / 1e12, 6), **({"bf16": round(peak / 1e12, 6)} if dname == "fp32" else {})},
            "hbm_gb_per_s": round(copy_bps / 1e9, 3),
            "hbm_efficiency": 1.0,
            "gemm_efficiency": _curve(gemms, peak),
            "attention_efficiency": _curve(attn, peak),
        },
        "links": {"intra_node": link, "inter_node": dict(link)},
        "sources": {
            "peak_tflops": f"best rate of {len(gemms)} square {dname} GEMMs [measured]",
            "gemm_efficiency": "each GEMM size's rate over the best [measured]",
            "attention_efficiency": "SDPA forward, causal, 8 heads of 64, over the GEMM peak [measured]",
            "hbm_gb_per_s": "a large tensor copy, read plus write [measured]",
            "intra_node": f"least-squares alpha-beta fit of {len(rows)} gloo/NCCL collective timings [measured]",
        },
        "raw": {"gemm_flops_s": [[f, float(f"{t:.4g}")] for f, t in gemms],
                "attention_flops_s": [[f, float(f"{t:.4g}")] for f, t in attn],
                "collectives_op_ranks_bytes_s": [[o, n, b, float(f"{t:.4g}")] for o, n, b, t in rows]},
    }
    text = yaml.safe_dump(data, sort_keys=False, default_flow_style=None, width=110)
    from planner.files import atomic_write_text

    atomic_write_text(out, text)
    return data
