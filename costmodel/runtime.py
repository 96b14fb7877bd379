"""A training runtime as data: what the software does with the hardware.

The device profile says what the GPU can do (GEMM and attention rates measured by
microbenchmarks, memory bandwidth, links). A runtime profile (`profiles/runtimes/NAME.yaml`)
says how much of it a training framework gets, term by term, each figure sourced:

- `attention_peak_fraction`: the best fraction of the GPU's dense peak its attention kernel
  reaches, per GPU architecture (FlashAttention-2 reaches about 70% on an A100 and 35% on an
  H100, which it cannot program with Hopper's instructions); caps the device's attention curve.
- `gemm_sustained`: the fraction of the microbenchmarked compute rates a training step
  sustains where data-parallel collectives run beside the compute (dp > 1), per
  architecture: the SMs NCCL's kernels take while FSDP's gathers and reductions overlap the
  GEMMs, and clocks under the sustained load of a multi-GPU job.
- `elementwise_traffic`: memory-bound bytes of a layer (norms, residual adds, activation,
  RoPE, casts, layout copies) relative to one fused kernel per op (Megatron-LM's fused
  kernels: 1.0); an eager runtime launches several kernels per op and keeps the residual
  stream or the norms' outputs in fp32.
- `cross_entropy_bytes_per_logit`: HBM bytes per logit of the loss, forward and backward
  (a fused vocabulary-parallel loss reads the 16-bit logits once; an eager `.float()` +
  log-softmax + NLL writes and reads fp32 copies).
- `loss_activation_bytes_per_logit`: memory per logit the loss holds at its peak.
- `selective_recompute`: what `--recompute selective` recomputes in this runtime.
- `optimizer_bytes_per_param`: HBM bytes per parameter of the optimizer step (a fused or
  foreach AdamW: 32; a per-tensor loop of unfused ops: more).
- `layer_overhead_us`: host time per layer and microbatch the GPU does not hide (eager
  dispatch, FSDP hooks), forward and backward.
- `moe_host_us`: host time of one MoE layer's sparse MLP per microbatch, [fixed, per local
  expert] x [forward, backward] microseconds: a floor under the layer's GPU time (the GPU
  runs no faster than the host launches its kernels, and the dispatcher's synchronization on
  the per-expert token counts keeps the host from running ahead into the next layer); a
  runtime that runs one GEMM per expert pays per local expert.
- `grad_dtype`: the gradients' dtype when the plan does not say (`--grad-dtype`).
- `context_exchange`: how context parallelism moves K and V: `ring` (Megatron-Core and
  TransformerEngine: each rank's K and V passed round the cp ranks point to point, overlapped
  with the attention blocks) or `all-gather` (gathered whole before the attention and again in
  the backward, which recomputes the attention, their gradients reduce-scattered; not
  overlapped: runtime/context_parallel.py).
- `band`: the calibration residuals (measured / predicted - 1) of this runtime per GPU
  architecture: the prediction's range where the plan is inside what was calibrated.

A measured CPU profile (`host_cores`) was calibrated by running paraplan's own runtime, so it
already prices that runtime: the runtime's GPU terms do not apply to it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import yaml

from costmodel.errors import ConfigError

RUNTIMES_DIR = Path(__file__).resolve().parent.parent / "profiles" / "runtimes"
DEFAULT_RUNTIME = "paraplan"
GRAD_DTYPES = ("fp32", "bf16")
CONTEXT_EXCHANGES = ("ring", "all-gather")
UNCALIBRATED_BAND = (-0.15, 0.35)  # no data for this runtime on this architecture: wide, and slower more likely


@dataclass(frozen=True, slots=True, kw_only=True)
class TrainingRuntime:
    name: str
    description: str = ""
    attention_kernel: str = "flash-attention-2"
    attention_peak_fraction: dict[str, float] = field(default_factory=dict)
    gemm_sustained: dict[str, float] = field(default_factory=dict)
    elementwise_traffic: float = 1.0
    rmsnorm_traffic: float = 1.0  # RMSNorm's bytes over a fused norm's (eager nn.RMSNorm is composite)
    rope_traffic: float = 1.0  # RoPE's bytes over one fused rotation (eager: slices, four products, cat)
    gqa_repeat: bool = False  # K and V copied to every query head before attention (repeat_interleave)
    # HBM bytes per parameter and microbatch of casting weights to the compute dtype and the
    # gradients back, (forward, backward), [without data parallelism, under FSDP]
    weight_cast_bytes_per_param: tuple[tuple[float, float], tuple[float, float]] = ((0.0, 0.0), (0.0, 0.0))
    cross_entropy_bytes_per_logit: float = 0.0  # 0: fused (the logits read once, three fp32 passes: e + 12 each way)
    # bytes per logit the loss holds at its peak (fused: the fp32 logits; eager: the 16-bit logits, their
    # fp32 copy and the log-softmax output)
    loss_activation_bytes_per_logit: float = 4.0
    # what selective recomputation recomputes: "attention" (Megatron: the attention core, free with
    # FlashAttention) or "save-matmuls" (op-level: keep matmul and attention outputs, recompute the rest)
    selective_recompute: str = "attention"
    fsdp_param_dtype: str = ""  # dtype FSDP gathers the parameters in ("": the compute dtype; fp32: FSDP1 with fp32 params)
    optimizer_bytes_per_param: float = 32.0  # fused AdamW: fp32 master, grad, two moments read; master, moments, 16-bit copy written
    layer_overhead_us: tuple[float, float] = (0.0, 0.0)
    # [fixed, per local expert] x [forward, backward] host microseconds of a MoE layer's sparse MLP
    moe_host_us: tuple[tuple[float, float], tuple[float, float]] = ((0.0, 0.0), (0.0, 0.0))
    grad_dtype: str = "fp32"
    context_exchange: str = "ring"  # ring (overlapped point to point) or all-gather (exposed, recomputed backward)
    band: dict[str, tuple[float, float]] = field(default_factory=dict)
    calibrated_axes: tuple[str, ...] = ()  # the parallelisms the calibration runs used (dp, tp, pp, cp)
    sources: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        where = f"runtime profile {self.name}"
        for key, table in (("attention_peak_fraction", self.attention_peak_fraction),
                           ("gemm_sustained", self.gemm_sustained)):
            if not isinstance(table, dict) or any(not 0 < float(v) <= 1 for v in table.values()):
                raise ConfigError(f"{where}: {key} must map architectures to fractions in (0, 1]")
        if not 0.5 <= self.elementwise_traffic <= 10:
            raise ConfigError(f"{where}: elementwise_traffic must be in [0.5, 10], got {self.elementwise_traffic}")
        if not 0 <= self.cross_entropy_bytes_per_logit < 1000:
            raise ConfigError(f"{where}: cross_entropy_bytes_per_logit must be a number of bytes >= 0 (0: fused)")
        for key in ("optimizer_bytes_per_param", "loss_activation_bytes_per_logit"):
            if not 0 < getattr(self, key) < 1000:
                raise ConfigError(f"{where}: {key} must be a positive number of bytes")
        if len(self.weight_cast_bytes_per_param) != 2 or any(
                len(pair) != 2 or any(v < 0 for v in pair) for pair in self.weight_cast_bytes_per_param):
            raise ConfigError(f"{where}: weight_cast_bytes_per_param must be [[forward, backward] without data "
                              "parallelism, [forward, backward] under FSDP], bytes >= 0")
        if not 0.5 <= self.rmsnorm_traffic <= 20 or not 0.5 <= self.rope_traffic <= 20:
            raise ConfigError(f"{where}: rmsnorm_traffic and rope_traffic must be in [0.5, 20]")
        if len(self.layer_overhead_us) != 2 or any(v < 0 for v in self.layer_overhead_us):
            raise ConfigError(f"{where}: layer_overhead_us must be [forward, backward] microseconds >= 0")
        if len(self.moe_host_us) != 2 or any(len(pair) != 2 or any(v < 0 for v in pair) for pair in self.moe_host_us):
            raise ConfigError(f"{where}: moe_host_us must be [[forward, backward] fixed, [forward, backward] per local "
                              "expert] microseconds >= 0")
        if self.selective_recompute not in ("attention", "save-matmuls"):
            raise ConfigError(f"{where}: selective_recompute must be attention or save-matmuls")
        if self.fsdp_param_dtype not in ("",) + GRAD_DTYPES:
            raise ConfigError(f"{where}: fsdp_param_dtype must be one of {', '.join(GRAD_DTYPES)}")
        if self.context_exchange not in CONTEXT_EXCHANGES:
            raise ConfigError(f"{where}: context_exchange must be one of {', '.join(CONTEXT_EXCHANGES)}")
        if self.grad_dtype not in GRAD_DTYPES:
            raise ConfigError(f"{where}: grad_dtype must be one of {', '.join(GRAD_DTYPES)}")
        for arch, pair in self.band.items():
            if len(pair) != 2 or not -1 < pair[0] <= pair[1]:
                raise ConfigError(f"{where}: band of {arch} must be [low, high] with -1 < low <= high")

    def weight_cast_bytes(self, sharded: bool) -> tuple[float, float]:
        return tuple(self.weight_cast_bytes_per_param[1 if sharded else 0])

    def attention_cap(self, arch: str) -> float:
        return float(self.attention_peak_fraction.get(arch, 1.0))

    def gemm_scale(self, arch: str) -> float:
        return float(self.gemm_sustained.get(arch, 1.0))

    def band_of(self, arch: str) -> tuple[tuple[float, float], bool]:
        """(low, high) relative error of a prediction on `arch`, and whether it was calibrated."""
        if arch in self.band:
            return tuple(self.band[arch]), True
        return UNCALIBRATED_BAND, False


# every term at its fused value: the layer formulas as written (Megatron-class kernels), what a
# measured host (calibrated with the runtime that ran on it) and a serving engine's prefill add nothing to
FUSED = TrainingRuntime(name="fused", description="fused kernels, fused Adam, bf16 weights: the layer formulas as written")


def available_runtimes(runtimes_dir: Path = RUNTIMES_DIR) -> list[str]:
    return sorted(p.stem for p in runtimes_dir.glob("*.yaml"))


def load_runtime(name_or_path: str = DEFAULT_RUNTIME, runtimes_dir: Path = RUNTIMES_DIR) -> TrainingRuntime:
    """A runtime profile by name (profiles/runtimes/NAME.yaml) or YAML path."""
    known = ", ".join(available_runtimes(runtimes_dir))
    if not isinstance(name_or_path, str) or not name_or_path or "\n" in name_or_path or len(name_or_path) > 255:
        raise ConfigError(f"--runtime must be one of {known} or a runtime YAML path")
    path = Path(name_or_path)
    if not (path.suffix in (".yaml", ".yml") and path.is_file()):
        path = runtimes_dir / f"{name_or_path}.yaml"
    if not path.is_file():
        raise ConfigError(f"unknown runtime '{name_or_path}'; known runtimes: {known} (or give a runtime YAML path)")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError:
        raise ConfigError(f"{path} is not valid YAML; fix the file's syntax") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a mapping of runtime fields")
    allowed = set(TrainingRuntime.__dataclass_fields__) | {"fit"}
    unknown = sorted(set(data) - allowed)
    if unknown:
        raise ConfigError(f"runtime {path.stem}: unknown field(s) {', '.join(unknown)}")
    data.pop("fit", None)
    data.setdefault("name", path.stem)
    try:
        if "layer_overhead_us" in data:
            data["layer_overhead_us"] = tuple(float(v) for v in data["layer_overhead_us"])
        for key in ("weight_cast_bytes_per_param", "moe_host_us"):
            if key in data:
                data[key] = tuple(tuple(float(x) for x in pair) for pair in data[key])
        if "calibrated_axes" in data:
            data["calibrated_axes"] = tuple(str(a) for a in data["calibrated_axes"])
        if "band" in data:
            data["band"] = {str(k): tuple(float(x) for x in v) for k, v in data["band"].items()}
        for key in ("elementwise_traffic", "cross_entropy_bytes_per_logit", "optimizer_bytes_per_param",
                    "rmsnorm_traffic", "rope_traffic", "loss_activation_bytes_per_logit"):
            if key in data:
                data[key] = float(data[key])
        for key in ("attention_peak_fraction", "gemm_sustained"):
            if key in data:
                data[key] = {str(k): float(v) for k, v in data[key].items()}
        return TrainingRuntime(**data)
    except ConfigError:
        raise
    except (TypeError, ValueError, AttributeError):
        raise ConfigError(f"runtime {path.stem}: figures must be numbers (pairs for layer_overhead_us and bands)") from None
