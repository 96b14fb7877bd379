"""A serving engine as data: how much of the GPU an inference engine gets.

The device profile says what the GPU can do (GEMM and attention rates, memory bandwidth); a
serving engine profile (`profiles/serving/NAME.yaml`) says how much of it an engine's
iterations reach, per GPU architecture, each figure sourced:

- `compute_sustained`: the share of the device's compute rates (its GEMM and attention
  curves) an iteration's compute-bound work runs at: prefill chunks and large batches.
- `memory_sustained`: the share of the device's memory rate (hbm_efficiency) its
  memory-bound work runs at: decode steps reading the weights and the KV cache.
- `custom_all_reduce`: per architecture and tensor-parallel degree, the engine's own
  all-reduce inside a node as `[floor_us, gb_per_s]` (seconds = floor + bytes / rate): vLLM's
  and SGLang's one-shot and two-shot kernels over NVLink, far below NCCL's latency for the
  small messages of decoding. A tensor-parallel all-reduce takes the faster of it and NCCL's
  (the engines fall back to NCCL past a size); a degree it does not list takes the next
  larger one listed, beyond the largest NCCL's alone.
- `block_sizes`: the KV block sizes (tokens a block) the engine takes; empty: any.
- `decode_fp32_share`: per architecture, where the engine decodes attention with a kernel that
  gives each query head its own thread block and computes on CUDA cores in fp32 (TensorRT-LLM's
  masked multi-head attention: each K and V value converted and multiplied-added once per query
  head): the share of the device's fp32 peak its FLOPs run at. A grouped-query model's decode is
  then compute-bound (a KV head read once serves 4-8 query heads' FLOPs). Not listed: the engine's
  decode kernel runs a KV head's query heads together on tensor cores (FlashAttention's and
  FlashInfer's decode, TensorRT-LLM's XQA), priced by the device's attention curves.
- `grouped_decode_ratios`: the query heads per KV head for which an engine with a per-head
  kernel has a grouped one as well and picks it ("all", or a list: TensorRT-LLM v0.9's XQA
  kernels were built for 8 only).
- `non_kv_gib`: GPU memory the engine keeps outside weights and KV cache inside its memory
  budget (CUDA context, non-torch allocations, the profiling run's peak activations):
  vLLM sizes its KV cache as gpu_memory_utilization x the GPU's memory minus weights minus
  this.

The iteration's time is the device's roofline on the derived device (`engine_device`);
which figures come from where (measured, fitted to published runs, assumed) is in the
profile's `sources`. An architecture the profile does not name gets 1.0 (the device's
rates as profiled).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from functools import lru_cache
from pathlib import Path

import yaml

from costmodel.errors import ConfigError

ENGINES_DIR = Path(__file__).resolve().parent.parent / "profiles" / "serving"
DEFAULT_ENGINE = "vllm"


@dataclass(frozen=True, slots=True, kw_only=True)
class ServingEngine:
    name: str
    description: str = ""
    compute_sustained: dict[str, float] = field(default_factory=dict)
    memory_sustained: dict[str, float] = field(default_factory=dict)
    non_kv_gib: float = 1.0
    custom_all_reduce: dict[str, dict[int, list[float]]] = field(default_factory=dict)
    # what the memory share (--gpu-memory-utilization) is a share of: "total", the GPU's memory for
    # weights, activations and cache together (vLLM), or "free", what those and the runtime leave
    # for the KV cache (TensorRT-LLM's free_gpu_memory_fraction)
    kv_share_of: str = "total"
    block_sizes: tuple[int, ...] = ()
    decode_fp32_share: dict[str, float] = field(default_factory=dict)
    grouped_decode_ratios: str | tuple[int, ...] = "all"
    sources: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        where = f"serving engine profile {self.name}"
        for key in ("compute_sustained", "memory_sustained", "decode_fp32_share"):
            table = getattr(self, key)
            if not isinstance(table, dict) or any(
                    isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 < v <= 1 for v in table.values()):
                raise ConfigError(f"{where}: {key} must map architectures to fractions in (0, 1]")
        if isinstance(self.non_kv_gib, bool) or not isinstance(self.non_kv_gib, (int, float)) \
                or not 0 <= self.non_kv_gib < 64:
            raise ConfigError(f"{where}: non_kv_gib must be GiB in [0, 64), got {self.non_kv_gib!r}")
        if not isinstance(self.block_sizes, (list, tuple)) or any(
                isinstance(b, bool) or not isinstance(b, int) or b < 1 for b in self.block_sizes):
            raise ConfigError(f"{where}: block_sizes must be a list of positive token counts")
        object.__setattr__(self, "block_sizes", tuple(self.block_sizes))
        ratios = self.grouped_decode_ratios
        if ratios != "all":
            if not isinstance(ratios, (list, tuple)) or any(
                    isinstance(r, bool) or not isinstance(r, int) or r < 1 for r in ratios):
                raise ConfigError(f"{where}: grouped_decode_ratios must be all or a list of query heads per KV head")
            object.__setattr__(self, "grouped_decode_ratios", tuple(ratios))
        if self.kv_share_of not in ("total", "free"):
            raise ConfigError(f"{where}: kv_share_of must be total or free, got {self.kv_share_of!r}")
        if not isinstance(self.custom_all_reduce, dict) or any(
                not isinstance(table, dict) or any(
                    isinstance(tp, bool) or not isinstance(tp, int) or tp < 2 or not _floor_rate(v)
                    for tp, v in table.items())
                for table in self.custom_all_reduce.values()):
            raise ConfigError(f"{where}: custom_all_reduce must map architectures to tensor-parallel degrees "
                              "(>= 2) and [floor_us >= 0, gb_per_s > 0]")

    def compute_of(self, arch: str) -> float:
        return float(self.compute_sustained.get(arch, 1.0))

    def memory_of(self, arch: str) -> float:
        return float(self.memory_sustained.get(arch, 1.0))

    def decode_fp32_share_of(self, arch: str) -> float:
        """The share of the fp32 peak its per-head decode kernel reaches on `arch` (0: it has none)."""
        return float(self.decode_fp32_share.get(arch, 0.0))

    def custom_all_reduce_of(self, arch: str) -> tuple[tuple[int, float, float], ...]:
        """(degree, floor seconds, bytes per second) of the engine's own all-reduce on `arch`,
        by degree."""
        table = self.custom_all_reduce.get(arch, {})
        return tuple((tp, floor_us * 1e-6, gb_per_s * 1e9) for tp, (floor_us, gb_per_s) in sorted(table.items()))


def _floor_rate(value) -> bool:
    """Whether `value` is [floor_us >= 0, gb_per_s > 0]."""
    return (isinstance(value, (list, tuple)) and len(value) == 2
            and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)
            and value[0] >= 0 and value[1] > 0)


@lru_cache(maxsize=1)
def engine_names() -> tuple[str, ...]:
    """The engine profiles shipped in profiles/serving (read once: they do not change in a run)."""
    return tuple(sorted(p.stem for p in ENGINES_DIR.glob("*.yaml")))


def check_engine_name(name: str) -> None:
    """One line naming the engines there are, where `name` is none of them (--engine)."""
    if name not in engine_names():
        raise ConfigError(f"--engine {name!r}; use one of {', '.join(engine_names())}")


@lru_cache(maxsize=16)
def load_engine(name: str) -> ServingEngine:
    """A serving engine profile by name (profiles/serving/NAME.yaml), parsed once per run: every
    simulation of a planner's search names one."""
    path = ENGINES_DIR / f"{name}.yaml"
    if not isinstance(name, str) or "/" in name or not path.exists():
        raise ConfigError(f"unknown serving engine {name!r}; use one of {', '.join(engine_names())}")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(f"serving engine profile {path} is not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"serving engine profile {path} must be a mapping")
    known = set(ServingEngine.__dataclass_fields__)
    extra = sorted(set(data) - known)
    if extra:
        raise ConfigError(f"serving engine profile {path}: unknown keys {', '.join(extra)}")
    return ServingEngine(**data)


def check_block_size(block_tokens: int, engine: str) -> None:
    """One line for a KV block size the engine would refuse (vLLM's --block-size choices), or for
    an engine there is no profile of; a size that is no positive integer is the request's own
    check to make."""
    check_engine_name(engine)
    sizes = load_engine(engine).block_sizes
    positive = isinstance(block_tokens, int) and not isinstance(block_tokens, bool) and block_tokens >= 1
    if positive and sizes and block_tokens not in sizes:
        raise ConfigError(f"--block-size {block_tokens}: {engine} takes {', '.join(map(str, sizes))} tokens a block")


def vllm_scheduler_defaults(device) -> tuple[int, int]:
    """(max_num_seqs, max_num_batched_tokens) that vLLM V1's OpenAI server takes by default on
    `device` (vllm/engine/arg_utils.py): 1024 and 8192 on a GPU of >= 70 GiB that is not an A100
    (H100, H200, B200), 256 and 2048 otherwise."""
    large = device.hbm_gib >= 70 and "a100" not in device.name.lower() and device.arch != "cpu"
    return (1024, 8192) if large else (256, 2048)


def engine_device(device, engine: ServingEngine):
    """The device as `engine` runs it: its compute rates scaled by the engine's sustained share,
    its memory rate likewise. On a GPU without fp8 tensor cores (A100) fp8 weights are served
    weight-only, as vLLM's FP8 Marlin kernels do: one byte a weight read, the GEMMs at the 16-bit
    rate (its fp8 peak is its bf16 one)."""
    peaks = device.peak_tflops
    if "fp8" not in peaks and "bf16" in peaks:
        peaks = {**peaks, "fp8": peaks["bf16"]}
    return replace(device, compute_sustained=device.compute_sustained * engine.compute_of(device.arch),
                   hbm_efficiency=device.hbm_efficiency * engine.memory_of(device.arch), peak_tflops=peaks)


def engine_cluster(cluster, engine: ServingEngine | str):
    """The cluster whose devices run as `engine` (a profile or its name) runs them
    (`engine_device`), with the engine's memory outside weights and KV cache. A cluster already
    priced for an engine is returned as it is, so that the serving model's functions may each
    take a raw cluster or one their caller derived."""
    if cluster.device.serving_engine:
        return cluster
    engine = load_engine(engine) if isinstance(engine, str) else engine
    device = engine_device(cluster.device, engine)
    device = replace(device, memory_overhead=replace(device.memory_overhead, fixed_gib=engine.non_kv_gib),
                     serving_engine=engine.name, custom_all_reduce=engine.custom_all_reduce_of(device.arch),
                     decode_fp32_share=engine.decode_fp32_share_of(device.arch),
                     grouped_decode_ratios=engine.grouped_decode_ratios)
    return replace(cluster, device=device)
