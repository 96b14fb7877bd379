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

from costmodel.cluster import oversubscription
from runtime.teardown import leave

COLLECTIVES = ("all_reduce", "all_gather", "reduce_scatter", "all_to_all", "send_recv")


def _time(fn, reps: int) -> float:
    """Median seconds of `fn` (CUDA: device events around `inner` calls, so launch gaps of
    small kernels are what a stream of them sees; CPU: the wall clock)."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        return _time_cuda(fn, reps)
    fn()  # warm-up
    samples = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            torch.cuda.synchronize()
        samples.append(time.perf_counter() - t0)
    return statistics.median(samples)


def _time_cuda(fn, reps: int, inner: int = 5) -> float:
    for _ in range(2):
        fn()  # warm-up: library handles, autotuning
    torch.cuda.synchronize()
    samples = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(inner):
            fn()
        end.record()
        end.synchronize()
        samples.append(start.elapsed_time(end) * 1e-3 / inner)
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


def measure_attention(device: str, seqs: list[int], dtype: torch.dtype, reps: int, bar,
                      heads: int = 8, head_dim: int = 64, tokens: int = 0) -> list[tuple[float, float, float]]:
    """(FLOPs of the causal half, forward seconds, backward seconds) of causal SDPA; with
    `tokens` the batch is tokens // seq (a training microbatch's shape), else 1. The backward's
    FLOPs are 2.5 times the forward's (FlashAttention-2: 5 matmuls against 2)."""
    out = []
    for s in seqs:
        b = max(1, tokens // s) if tokens else 1
        q, k, v = (torch.randn(b, heads, s, head_dim, device=device, dtype=dtype, requires_grad=True) for _ in range(3))
        sdpa = torch.nn.functional.scaled_dot_product_attention
        fwd = _time(lambda: sdpa(q, k, v, is_causal=True), reps)
        o = sdpa(q, k, v, is_causal=True)
        g = torch.randn_like(o)
        both = _time(lambda: torch.autograd.grad(sdpa(q, k, v, is_causal=True), (q, k, v), g), reps)
        out.append((4.0 * b * heads * s * s * head_dim * 0.5, fwd, max(both - fwd, 1e-9)))
        bar.update()
    return out


def measure_skinny_gemms(device: str, dtype: torch.dtype, reps: int) -> list[tuple[float, float]]:
    """(FLOPs, seconds) of GEMMs of few rows (decoding: one token per sequence) against square weights."""
    out = []
    for n in (256, 1024, 2048):
        w = torch.randn(n, n, device=device, dtype=dtype)
        for rows in (1, 4, 16, 64):
            x = torch.randn(rows, n, device=device, dtype=dtype)
            out.append((2.0 * rows * n * n, _time(lambda: x @ w, reps * 3)))
    return out


def measure_decode_attention(device: str, dtype: torch.dtype, reps: int) -> list[tuple[float, float]]:
    """(FLOPs, seconds) of SDPA with one query per sequence over a cache: 8 heads of 64."""
    out = []
    for batch, cached in ((1, 256), (4, 256), (1, 2048), (16, 256), (4, 2048), (16, 2048)):
        q = torch.randn(batch, 8, 1, 64, device=device, dtype=dtype)
        k = torch.randn(batch, 8, cached, 64, device=device, dtype=dtype)
        t = _time(lambda: torch.nn.functional.scaled_dot_product_attention(q, k, k), reps * 3)
        out.append((4.0 * batch * 8 * cached * 64, t))
    return out


def measure_elementwise(device: str, reps: int, rows: int = 2048, width: int = 1024,
                        dtype: torch.dtype = torch.float32) -> float:
    """Bytes per second (read + write) of the memory-bound ops of a layer: a norm, the MLP's
    activation, a softmax; the median over them."""
    F = torch.nn.functional
    x = torch.randn(rows, width, device=device, dtype=dtype)
    w = torch.ones(width, device=device, dtype=dtype)
    ops = [lambda: F.layer_norm(x, (width,), w, w), lambda: F.gelu(x), lambda: x.softmax(-1)]
    return statistics.median(2 * x.numel() * x.element_size() / _time(op, reps) for op in ops)


def measure_copy(device: str, mib: int, reps: int) -> float:
    """Bytes per second of a large copy (read + write)."""
    x = torch.empty(mib * 2**20 // 4, device=device)
    y = torch.empty_like(x)
    t = _time(lambda: y.copy_(x), reps)
    return 2 * x.numel() * 4 / t


def _collective_worker(rank: int, world: int, sizes: list[int], reps: int, backend: str, port: int, out_path: str):
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
    leave(0)  # past gloo's teardown (runtime.teardown)


def _in_situ_worker(rank: int, world: int, iters: int, port: int, out_path: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    a = torch.randn(384, 384)
    small = torch.randn(256)
    times = []
    for collective in (False, True, False, True):
        dist.barrier()
        t0 = time.perf_counter()
        for _ in range(iters):
            a @ a
            a @ a
            if collective:
                dist.all_reduce(small)
        dist.barrier()
        times.append((time.perf_counter() - t0) / iters)
    if rank == 0:
        cost = (times[1] + times[3] - times[0] - times[2]) / 2
        Path(out_path).write_text(yaml.safe_dump([world, max(cost, 0.0)]))
    dist.destroy_process_group()
    leave(0)


def measure_in_situ(worlds: list[int], iters: int, bar) -> list[tuple[int, float]]:
    """(ranks, seconds) a small all-reduce adds to a loop of GEMMs on every rank: the latency
    a training step sees, where ranks drift apart and wait for descheduled peers, which a
    lockstep microbenchmark of the collective alone hides."""
    rows = []
    for world in worlds:
        rows.append(tuple(_spawn(_in_situ_worker, world, world, iters)))
        bar.update()
    return rows


def fit_in_situ_latency(rows: list[tuple[int, float]], host_cores: int) -> tuple[float, float]:
    """Least squares of cost = 2 (p - 1) * (alpha + wait * (max(1, p/c) - 1)) over the
    in-situ all-reduce costs of p ranks on c cores: (alpha, wait) in microseconds, >= 0."""
    xs = [[2 * (p - 1), 2 * (p - 1) * (oversubscription(p, host_cores) - 1)] for p, _ in rows]
    ys = [t for _, t in rows]
    if all(x[1] == 0 for x in xs):  # no oversubscribed point: latency only
        alpha = sum(ys) / sum(x[0] for x in xs)
        return round(alpha * 1e6, 2), 0.0
    (alpha, wait), *_ = np.linalg.lstsq(np.array(xs, dtype=float), np.array(ys), rcond=None)
    return round(max(float(alpha), 1e-7) * 1e6, 2), round(max(float(wait), 0.0) * 1e6, 2)


def _spawn(worker, nprocs: int, *args):
    """Run `worker(rank, *args, port, out_path)` on `nprocs` spawned processes; what rank 0
    wrote to out_path (YAML)."""
    with tempfile.TemporaryDirectory() as tmp, socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
        s.close()
        out = str(Path(tmp) / "out.yaml")
        mp.start_processes(worker, args=(*args, port, out), nprocs=nprocs, join=True, start_method="spawn")
        return yaml.safe_load(Path(out).read_text())


def measure_collectives(worlds: list[int], sizes: list[int], reps: int, backend: str, bar) -> list[tuple]:
    rows = []
    for world in worlds:
        rows += [tuple(r) for r in _spawn(_collective_worker, world, world, sizes, reps, backend)]
        bar.update()
    return rows


def fit_alpha_beta(rows: list[tuple], host_cores: int | None = None) -> dict:
    """Ring model: t = slow * (steps * alpha + factor * bytes / bw), the terms of
    costmodel.collectives, with slow = max(1, ranks / host_cores) where the ranks share a
    host's cores (costmodel.cluster.oversubscription), so alpha and beta are those of
    ranks that each have a core. Least squares over all rows."""
    xs, ys = [], []
    for name, n, nbytes, t in rows:
        if name == "all_reduce":
            steps, factor = 2 * (n - 1), 2 * (n - 1) / n
        elif name in ("all_gather", "reduce_scatter", "all_to_all"):
            steps, factor = n - 1, (n - 1) / n
        else:
            steps, factor = 1, 1.0
        slow = oversubscription(n, host_cores)
        xs.append([slow * steps, slow * factor * nbytes])
        ys.append(t)
    (alpha, inv_bw), *_ = np.linalg.lstsq(np.array(xs), np.array(ys), rcond=None)
    alpha = max(float(alpha), 1e-7)
    bw = 1.0 / max(float(inv_bw), 1e-15)
    return {"bandwidth_gb_per_s": round(bw / 1e9, 4), "latency_us": round(alpha * 1e6, 2), "efficiency": 1.0}


def _layer_seconds(layers: int, tensor_parallel: bool, reps: int, fsdp: bool = False) -> tuple[float, float]:
    """Median (forward, backward) seconds of a step of the built-in GPT at a size where the
    arithmetic is negligible: what is left is the host's dispatch of its operators."""
    from costmodel.spec import ModelSpec
    from planner.zoo.model import build_model

    spec = ModelSpec(name="overhead", layers=layers, hidden=64, heads=4, vocab=64, seq_len=8, tied_embeddings=False)
    model = build_model(spec)
    if tensor_parallel:
        from torch.distributed.device_mesh import init_device_mesh

        from runtime.tensor_parallel import apply_tensor_parallel

        mesh = init_device_mesh("cpu", (1,), mesh_dim_names=("tp",))
        placements = {"layers.*.attention.w[qkv].weight": {"tp": "Shard(0)"},
                      "layers.*.attention.wo.weight": {"tp": "Shard(1)"},
                      "layers.*.feed_forward.w1.weight": {"tp": "Shard(0)"},
                      "layers.*.feed_forward.w2.weight": {"tp": "Shard(1)"}}
        apply_tensor_parallel(model, mesh, placements, sequence_parallel=False)
    if fsdp:
        from torch.distributed.device_mesh import init_device_mesh

        from runtime.data_parallel import apply_data_parallel

        apply_data_parallel(model, init_device_mesh("cpu", (1,), mesh_dim_names=("dp",)), 0, "fp32")
    model.to_empty(device="cpu")
    model.init_weights(0)
    x = torch.randint(0, spec.vocab, (1, spec.seq_len))
    fwd, bwd = [], []
    for i in range(reps + 3):
        t0 = time.perf_counter()
        loss = model(x).float().mean()
        t1 = time.perf_counter()
        loss.backward()
        if i >= 3:
            fwd.append(t1 - t0)
            bwd.append(time.perf_counter() - t1)
    return statistics.median(fwd), statistics.median(bwd)


def _optimizer_seconds(dtensor: bool, reps: int, tensors: int = 64) -> float:
    """Seconds per parameter tensor of what the runtime does after the backward: a norm per
    gradient (clipping), AdamW without foreach, zero_grad; tiny tensors, so dispatch only."""
    params = [torch.nn.Parameter(torch.randn(16)) for _ in range(tensors)]
    if dtensor:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.tensor import Replicate, distribute_tensor

        mesh = init_device_mesh("cpu", (1,), mesh_dim_names=("dp",))
        params = [torch.nn.Parameter(distribute_tensor(p.detach(), mesh, [Replicate()])) for p in params]
    opt = torch.optim.AdamW(params, lr=1e-3, foreach=False)

    def step() -> None:
        for p in params:
            p.grad = torch.ones_like(p)
        torch.nn.utils.get_total_norm([p.grad for p in params], foreach=False)
        opt.step()
        opt.zero_grad(set_to_none=True)

    return _time(step, reps) / tensors


def _overhead_worker(rank: int, reps: int, port: int, out_path: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=0, world_size=1)
    result = {}
    for key, tp, fsdp in (("layer_overhead_us", False, False), ("tp_layer_overhead_us", True, False),
                          ("fsdp_layer_overhead_us", False, True)):
        one, three = _layer_seconds(1, tp, reps, fsdp), _layer_seconds(3, tp, reps, fsdp)
        result[key] = [max(0.0, (b - a) / 2) * 1e6 for a, b in zip(one, three)]
    # FSDP's hooks on top of the eager dispatch
    result["fsdp_layer_overhead_us"] = [max(0.0, f - e) for f, e in zip(result["fsdp_layer_overhead_us"],
                                                                       result["layer_overhead_us"])]
    result["optimizer_overhead_us"] = [_optimizer_seconds(False, reps) * 1e6, _optimizer_seconds(True, reps) * 1e6]
    result = {k: [round(v, 1) for v in pair] for k, pair in result.items()}
    Path(out_path).write_text(yaml.safe_dump(result))
    dist.destroy_process_group()
    leave(0)


def measure_layer_overhead(reps: int) -> dict:
    """Host overhead per transformer layer and microbatch, (forward, backward) microseconds,
    eager and with DTensor tensor parallelism (a one-rank mesh: the dispatch without the
    collectives): the difference between a 3-layer and a 1-layer model, over two."""
    return _spawn(_overhead_worker, 1, reps)


def _curve(points: list[tuple[float, float]], peak_flops: float) -> list[list[float]]:
    return [[float(f"{f:.4g}"), max(1e-4, round(min(1.0, f / t / peak_flops), 4))] for f, t in sorted(points)]


# datasheet profile a measured GPU extends, by the name torch reports
GPU_BASES = (("H200", "h200"), ("H100", "h100-sxm"), ("A100-SXM4-40GB", "a100-40g"), ("A100", "a100-80g"))


def gpu_base(name: str) -> str:
    """The datasheet profile of the GPU torch names `name` (h100-sxm where none matches)."""
    return next((base for key, base in GPU_BASES if key in name), "h100-sxm")


def _datasheet_peaks(base: str) -> dict:
    from costmodel.cluster import load_profile_data

    return dict(load_profile_data(base).get("device", {}).get("peak_tflops", {}))


def profile(out: Path, *, device: str = "cpu", quick: bool = False, base: str | None = None) -> dict:
    if device == "cuda" and not torch.cuda.is_available():
        from costmodel.errors import ConfigError

        raise ConfigError("--device cuda: no CUDA device here; use --device cpu")
    gpu = device == "cuda"
    if gpu:  # sizes a GPU fills: GEMMs up to 8192^3, attention at a microbatch's shape (16 heads of 128)
        sizes = [512, 1024, 2048, 4096, 8192] if quick else [256, 512, 1024, 2048, 3072, 4096, 6144, 8192]
        seqs = [512, 2048, 8192] if quick else [512, 1024, 2048, 4096, 8192]
        attn_shape = {"heads": 16, "head_dim": 128, "tokens": 16384}
    else:
        sizes = [128, 256, 512, 1024] if quick else [64, 128, 256, 512, 1024, 1536, 2048]
        seqs = [256, 512, 1024] if quick else [128, 256, 512, 1024, 2048]
        attn_shape = {}
    reps = 3 if quick else 7
    # one GPU has no collective to measure: its links stay the datasheet's
    worlds = [2, 4] if not gpu else ([torch.cuda.device_count()] if torch.cuda.device_count() > 1 else [])
    msgs = [2**14, 2**18, 2**21] if quick else [2**12, 2**14, 2**16, 2**18, 2**20, 2**22]
    if gpu:
        msgs = [2**16, 2**20, 2**24, 2**27]
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    # a CPU "GPU" is one single-threaded process (torchrun sets OMP_NUM_THREADS=1): measure one
    # thread, and record how many cores the processes of a run share
    host_cores = len(os.sched_getaffinity(0)) if device == "cpu" else None
    threads = torch.get_num_threads()
    if device == "cpu":
        torch.set_num_threads(1)
    situ_worlds = [2] + [k * host_cores for k in (2, 4) if k * host_cores <= 16] if host_cores else []
    total = len(sizes) + len(seqs) + len(worlds) + len(situ_worlds) + 2
    try:
        with tqdm(total=total, desc="profiling", unit="step", disable=None) as bar:
            if gpu:
                torch.cuda.init()
            gemms = measure_gemms(device, sizes, dtype, reps, bar)
            attn3 = measure_attention(device, seqs, dtype, reps, bar, **attn_shape)
            copy_bps = measure_copy(device, 2048 if gpu else 64 if quick else 256, reps)
            elementwise_bps = (measure_elementwise(device, reps, 16384, 4096, torch.bfloat16) if gpu
                               else measure_elementwise(device, reps))
            skinny = measure_skinny_gemms(device, dtype, reps)
            decode_attn = measure_decode_attention(device, dtype, reps)
            bar.update()
            overhead = measure_layer_overhead(10 if quick else 30) if device == "cpu" else {}
            bar.update()
            rows = measure_collectives(worlds, msgs, reps, "nccl" if device == "cuda" else "gloo", bar) if worlds else []
            situ = measure_in_situ(situ_worlds, 20 if quick else 60, bar)
    finally:
        torch.set_num_threads(threads)
    attn = [(f, t) for f, t, _ in attn3]
    attn_bwd = [(2.5 * f, tb) for f, _, tb in attn3]
    peak = max(f / t for f, t in gemms)
    dname = "fp32" if dtype == torch.float32 else "bf16"
    link = fit_alpha_beta(rows, host_cores) if rows else None
    wait_us = None
    if situ:  # the latency a step sees replaces the lockstep one; the bandwidth stays
        link["latency_us"], wait_us = fit_in_situ_latency(situ, host_cores)
    name = torch.cuda.get_device_name() if device == "cuda" else (platform.processor() or platform.machine())
    data = {
        "name": out.stem,
        "extends": base or ("cpu" if device == "cpu" else gpu_base(torch.cuda.get_device_name())),
        "description": f"measured on {name}, {os.cpu_count()} CPUs" if device == "cpu" else f"measured on {name}",
        "source": "measured",
        **({"host_cores": host_cores, "host_wait_us": wait_us} if host_cores else {}),
        "measured": {"device": name, "torch": str(torch.__version__), "date": datetime.date.today().isoformat(),
                     "host": platform.node(), "quick": quick},
        "device": {
            "peak_tflops": {dname: round(peak / 1e12, 6), **({"bf16": round(peak / 1e12, 6)} if dname == "fp32" else {})},
            # MFU stays quoted against the datasheet's peak, not what these GEMMs reached
            **({"mfu_peak_tflops": _datasheet_peaks(base or gpu_base(name))} if gpu else {}),
            "hbm_gb_per_s": round(copy_bps / 1e9, 3),
            "hbm_efficiency": round(min(1.0, elementwise_bps / copy_bps), 4),
            "gemm_efficiency": _curve(gemms, peak),
            "attention_efficiency": _curve(attn, peak),
            "attention_backward_efficiency": _curve(attn_bwd, peak),
            "skinny_gemm_efficiency": _curve(skinny, peak),
            "decode_attention_efficiency": _curve(decode_attn, peak),
            **overhead,
        },
        **({"links": {"intra_node": link, "inter_node": dict(link)}} if link else {}),
        "sources": {
            "peak_tflops": f"best rate of {len(gemms)} square {dname} GEMMs"
                           f"{' on one thread' if device == 'cpu' else ''} [measured]",
            **({"layer_overhead_us": "per layer and microbatch, [forward, backward]: a 3-layer minus a 1-layer "
                                     "tiny GPT step, over two, eager, with DTensor TP, and FSDP2's extra [measured]",
                "optimizer_overhead_us": "per parameter tensor, [tensor, DTensor]: a gradient norm, AdamW "
                                         "(foreach off), zero_grad on 64 tiny tensors [measured]"} if overhead else {}),
            "gemm_efficiency": "each GEMM size's rate over the best [measured]",
            "attention_efficiency": f"SDPA forward, causal, {attn_shape.get('heads', 8)} heads of "
                                    f"{attn_shape.get('head_dim', 64)}, over the GEMM peak [measured]",
            "attention_backward_efficiency": "the same SDPA's backward (forward+backward minus forward), "
                                             "2.5x the forward's FLOPs, over the GEMM peak [measured]",
            "hbm_gb_per_s": "a large tensor copy, read plus write [measured]",
            "skinny_gemm_efficiency": "GEMMs of 1-64 rows against 256-2048 square weights, over the peak [measured]",
            "decode_attention_efficiency": "SDPA of one query over 256-2048 cached tokens, 8 heads of 64 [measured]",
            "hbm_efficiency": "median of layer_norm, gelu, softmax bytes/s over the copy's [measured]",
            **({"intra_node": f"bandwidth: least-squares alpha-beta fit of {len(rows)} gloo/NCCL collective "
                              "timings; " + ("latency: all-reduce between GEMMs on 2.. ranks, fitted with host_wait_us "
                                             "[measured]" if situ else "latency: the same fit [measured]")}
               if rows else {"intra_node": "one GPU: no collective measured, the links are the datasheet profile's"}),
        },
        "raw": {"gemm_flops_s": [[f, float(f"{t:.4g}")] for f, t in gemms],
                "attention_flops_s": [[f, float(f"{t:.4g}")] for f, t in attn],
                "attention_backward_flops_s": [[f, float(f"{t:.4g}")] for f, t in attn_bwd],
                "copy_bytes_per_s": float(f"{copy_bps:.4g}"), "elementwise_bytes_per_s": float(f"{elementwise_bps:.4g}"),
                "collectives_op_ranks_bytes_s": [[o, n, b, float(f"{t:.4g}")] for o, n, b, t in rows],
                "in_situ_all_reduce_ranks_s": [[n, float(f"{t:.4g}")] for n, t in situ]},
    }
    from planner.files import atomic_write_text

    atomic_write_text(out, yaml.safe_dump(data, sort_keys=False, default_flow_style=None, width=110))
    if device == "cpu" and not quick:  # the calibration loop runs the runtime against this very profile
        from runtime.calibrate import REFERENCE_PLANS, calibrate

        with tqdm(total=len(REFERENCE_PLANS), desc="calibrating", unit="plan", disable=None) as bar:
            data["calibration"] = calibrate(out, bar=bar)
        data["sources"]["calibration"] = ("fitted to `paraplan run` of reference plans of a small GPT, each "
                                          "plan's error in fitted_to (runtime/calibrate.py) [fitted]")
        atomic_write_text(out, yaml.safe_dump(data, sort_keys=False, default_flow_style=None, width=110))
    return data
