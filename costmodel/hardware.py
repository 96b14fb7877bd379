"""A device's compute and memory, as data: peaks, capacities and efficiency curves.

In the style of Calculon's `processor.py`: efficiency is data from the profile (size-dependent
curves), never a constant in code. Vendor figures are decimal (1 TFLOP/s = 1e12 FLOP/s,
1 GB/s = 1e9 B/s); capacities are GiB (2**30 bytes), as nvidia-smi reports them.
"""

from __future__ import annotations

import bisect
import math
from dataclasses import dataclass, field

from costmodel.errors import ConfigError

GIB = 2**30
SKINNY_ROWS = 64  # a GEMM with at most this many rows uses the skinny curve


@dataclass(frozen=True, slots=True)
class EfficiencyCurve:
    """Achieved fraction of peak as a function of work size (FLOPs or bytes), interpolated
    linearly in log10(size) between measured points and held flat beyond the ends."""

    points: tuple[tuple[float, float], ...]
    _xs: tuple[float, ...] = field(init=False, repr=False, compare=False)
    _ys: tuple[float, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        pts = tuple(sorted((float(x), float(y)) for x, y in self.points))
        if not pts:
            raise ConfigError("an efficiency curve needs at least one [size, efficiency] point")
        for x, y in pts:
            if x <= 0 or not 0 < y <= 1:
                raise ConfigError(f"efficiency point [{x}, {y}] is invalid: size must be > 0 and efficiency in (0, 1]")
        object.__setattr__(self, "points", pts)
        object.__setattr__(self, "_xs", tuple(math.log10(x) for x, _ in pts))
        object.__setattr__(self, "_ys", tuple(y for _, y in pts))

    def __call__(self, size: float) -> float:
        xs, ys = self._xs, self._ys
        if size <= 0:
            return ys[0]
        x = math.log10(size)
        i = bisect.bisect_left(xs, x)
        if i == 0:
            return ys[0]
        if i == len(xs):
            return ys[-1]
        x0, x1 = xs[i - 1], xs[i]
        return ys[i - 1] + (ys[i] - ys[i - 1]) * (x - x0) / (x1 - x0)


@dataclass(frozen=True, slots=True, kw_only=True)
class MemoryOverhead:
    """What a GPU loses beyond the model's tensors: CUDA context, library workspaces and
    communication buffers (fixed), and allocator fragmentation (a fraction of the rest)."""

    fixed_gib: float
    fragmentation: float

    def __post_init__(self) -> None:
        if self.fixed_gib < 0 or not 0 <= self.fragmentation < 1:
            raise ConfigError("memory_overhead needs fixed_gib >= 0 and 0 <= fragmentation < 1")


@dataclass(frozen=True, slots=True, kw_only=True)
class Device:
    name: str
    peak_tflops: dict[str, float]
    hbm_gib: float
    hbm_gb_per_s: float
    hbm_efficiency: float
    gemm_efficiency: EfficiencyCurve
    attention_efficiency: EfficiencyCurve
    memory_overhead: MemoryOverhead
    # host time of one transformer layer's operators that the device does not hide, (forward,
    # backward) per microbatch: ~0 on a GPU whose launch queue runs ahead; on a CPU the eager
    # dispatch of every op, and more for DTensor (tensor-parallel) ops, measured by the profiler
    layer_overhead_us: tuple[float, float] = (0.0, 0.0)
    tp_layer_overhead_us: tuple[float, float] = (0.0, 0.0)
    fsdp_layer_overhead_us: tuple[float, float] = (0.0, 0.0)  # FSDP2 hooks, on top of the above
    # host time per parameter tensor of gradient clipping plus the optimizer step, (plain
    # tensor, DTensor): a per-tensor loop is dispatch-bound on a CPU
    optimizer_overhead_us: tuple[float, float] = (0.0, 0.0)
    # decoding's shapes, where measured: GEMMs of few rows (one token per sequence) and
    # attention of one query over a cache run far below the square-GEMM curves
    skinny_gemm_efficiency: EfficiencyCurve | None = None  # GEMMs of <= SKINNY_ROWS rows
    decode_attention_efficiency: EfficiencyCurve | None = None
    # the fused attention's backward, where measured (its FLOPs: FLASH_BACKWARD_FLOPS_RATIO x
    # the forward's); otherwise the forward's curve
    attention_backward_efficiency: EfficiencyCurve | None = None
    arch: str = ""  # the GPU architecture (ampere, hopper, cpu): runtime profiles' figures are per architecture
    # set from the training runtime (costmodel.runtime): the share of the microbenchmarked
    # compute rates a training step sustains, and the best fraction of peak its attention
    # kernel reaches
    compute_sustained: float = 1.0
    attention_cap: float = 1.0
    serving_engine: str = ""  # set by costmodel.serving_engine.engine_cluster: the engine these rates are as run by
    # set with serving_engine: the engine's own all-reduce inside a node (vLLM's custom one-shot
    # and two-shot kernels over NVLink), per tensor-parallel degree: (degree, floor s, bytes/s)
    custom_all_reduce: tuple[tuple[int, float, float], ...] = ()
    # set with serving_engine: the share of the fp32 peak the engine's per-query-head decode
    # attention kernel reaches (0: its decode kernel groups a KV head's query heads on tensor
    # cores), and the query heads per KV head it has a grouped kernel for ("all" or a tuple)
    decode_fp32_share: float = 0.0
    grouped_decode_ratios: str | tuple[int, ...] = "all"
    # MFU's denominator: the datasheet's dense peak (a measured profile's peak_tflops is what
    # its GEMMs reached); and the best MFU published for this GPU type (0: none known)
    mfu_peak_tflops: dict[str, float] = field(default_factory=dict)
    best_published_mfu: float = 0.0

    def __post_init__(self) -> None:
        for field_name in ("layer_overhead_us", "tp_layer_overhead_us", "fsdp_layer_overhead_us",
                           "optimizer_overhead_us"):
            pair = getattr(self, field_name)
            if len(pair) != 2 or any(v < 0 for v in pair):
                raise ConfigError(f"device {self.name}: {field_name} must be [forward, backward] microseconds >= 0")
        if not self.peak_tflops or any(v <= 0 for v in self.peak_tflops.values()):
            raise ConfigError(f"device {self.name}: peak_tflops needs positive figures per dtype")
        if self.hbm_gib <= 0 or self.hbm_gb_per_s <= 0 or not 0 < self.hbm_efficiency <= 1:
            raise ConfigError(f"device {self.name}: hbm_gib, hbm_gb_per_s > 0 and 0 < hbm_efficiency <= 1 required")

    def layer_overhead_s(self, tensor_parallel: bool, fsdp: bool) -> tuple[float, float]:
        """(forward, backward) seconds of host overhead per layer and microbatch."""
        f, b = self.tp_layer_overhead_us if tensor_parallel else self.layer_overhead_us
        if fsdp:
            f, b = f + self.fsdp_layer_overhead_us[0], b + self.fsdp_layer_overhead_us[1]
        return f * 1e-6, b * 1e-6

    def optimizer_overhead_s(self, tensors: int, dtensor: bool) -> float:
        """Host seconds of clipping and the optimizer over `tensors` parameter tensors."""
        return tensors * self.optimizer_overhead_us[1 if dtensor else 0] * 1e-6

    def mfu_peak_flops(self, dtype: str) -> float:
        """The peak MFU is quoted against: the datasheet's, where the profile measured its own."""
        if dtype in self.mfu_peak_tflops:
            return self.mfu_peak_tflops[dtype] * 1e12
        return self.peak_flops(dtype)

    def peak_flops(self, dtype: str) -> float:
        try:
            return self.peak_tflops[dtype] * 1e12
        except KeyError:
            have = ", ".join(sorted(self.peak_tflops))
            raise ConfigError(f"device {self.name} has no {dtype} peak; it lists {have}: give --precision as one of "
                              "those (or a device profile that lists it)") from None

    @property
    def hbm_bytes(self) -> float:
        return self.hbm_gib * GIB

    def gemm_s(self, flops: float, bytes_moved: float, dtype: str, rows: int | None = None) -> float:
        """Roofline time of a matrix multiply at the size-dependent efficiency (the skinny curve
        for a GEMM of few rows, where the profile measured one)."""
        curve = self.gemm_efficiency
        if rows is not None and rows <= SKINNY_ROWS and self.skinny_gemm_efficiency is not None:
            curve = self.skinny_gemm_efficiency
        compute = flops / (self.peak_flops(dtype) * curve(flops) * self.compute_sustained)
        return max(compute, self.memory_s(bytes_moved))

    def attention_s(self, flops: float, bytes_moved: float, dtype: str, decode: bool = False,
                    backward: bool = False) -> float:
        """Roofline time of a fused (Flash) attention kernel (one query per sequence: `decode`;
        the backward kernels: `backward`)."""
        curve = self.attention_efficiency
        if decode and self.decode_attention_efficiency:
            curve = self.decode_attention_efficiency
        elif backward and self.attention_backward_efficiency:
            curve = self.attention_backward_efficiency
        compute = flops / (self.peak_flops(dtype) * min(curve(flops), self.attention_cap) * self.compute_sustained)
        return max(compute, self.memory_s(bytes_moved))

    def memory_s(self, bytes_moved: float) -> float:
        """Time of a memory-bound kernel (elementwise, norms, softmax, optimizer)."""
        return bytes_moved / (self.hbm_gb_per_s * 1e9 * self.hbm_efficiency)
