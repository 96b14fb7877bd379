"""How one training step is split: the strategy the cost model evaluates.

The device mesh has five named axes, outermost first: pp, dp_replicate, dp_shard, cp, tp
(tp innermost, so a tensor-parallel group sits inside a node when it can). `dp` is the
whole data-parallel degree; `zero` says what is sharded over `dp_shard`:
0 nothing (DDP), 1 optimizer states, 2 plus gradients, 3 plus parameters (FSDP).
`shard_group` (HSDP) shards within groups of that size and replicates across them.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from enum import StrEnum

from costmodel.errors import ConfigError
from costmodel.moe import EXPERT_LOAD_CV

MESH_AXES = ("pp", "dp_replicate", "dp_shard", "cp", "tp")


class Recompute(StrEnum):
    NONE = "none"
    SELECTIVE = "selective"
    FULL = "full"


class Schedule(StrEnum):
    GPIPE = "gpipe"
    ONE_F_ONE_B = "1f1b"
    INTERLEAVED = "interleaved"
    ZERO_BUBBLE = "zero-bubble"  # ZB1P (Qi et al. 2024): backward split into input and weight gradients


class Precision(StrEnum):
    FP32 = "fp32"
    BF16 = "bf16"
    FP16 = "fp16"
    FP8 = "fp8"


@dataclass(frozen=True, slots=True, kw_only=True)
class PrecisionPolicy:
    """Bytes per element of each kind of state, and the dtype whose peak the GEMMs run at.

    16-bit mixed precision follows Megatron-LM: 16-bit weights, fp32 gradient accumulation,
    fp32 master weights and two Adam moments (2 + 4 + 12 = 18 bytes per parameter).
    """

    compute_dtype: str
    param_bytes: int
    grad_bytes: int
    optimizer_bytes: int
    activation_bytes: int

    @classmethod
    def of(cls, precision: Precision, grad_dtype: str = "fp32", master_dtype: str = "fp32") -> "PrecisionPolicy":
        """`grad_dtype` bf16: 16-bit gradients (ZeRO's paper, DeepSpeed's fp16/bf16 default:
        2 + 2 + 12 bytes per parameter); `master_dtype` bf16: no fp32 copy of the weights,
        the optimizer keeps only its two fp32 moments."""
        if precision is Precision.FP32:
            return cls(compute_dtype="fp32", param_bytes=4, grad_bytes=4, optimizer_bytes=8, activation_bytes=4)
        dtype = "fp8" if precision is Precision.FP8 else "bf16"
        return cls(compute_dtype=dtype, param_bytes=2, grad_bytes=2 if grad_dtype == "bf16" else 4,
                   optimizer_bytes=8 if master_dtype == "bf16" else 12, activation_bytes=2)


def _positive(name: str, value) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ConfigError(f"--{name.replace('_', '-')} must be a positive integer, got {value!r}")


@dataclass(frozen=True, slots=True, kw_only=True)
class Strategy:
    tp: int = 1
    pp: int = 1
    dp: int = 1
    cp: int = 1
    ep: int = 1  # expert parallel: folded into the data-parallel ranks (costmodel.moe)
    expert_tp: int = 0  # experts' tensor parallel degree: 0 = tp, or 1 (whole experts)
    # spread of the tokens per expert (coefficient of variation; costmodel.moe.EXPERT_LOAD_CV);
    # 0: perfectly balanced routing (Megatron's benchmarks force-balance it)
    expert_load_cv: float = EXPERT_LOAD_CV
    # the dispatch and combine all-to-alls of one microbatch overlapped with another's compute
    # (Megatron-Core's 1F1B A2A overlap, DeepSeek-V3's DualPipe); paraplan's runtime does not
    ep_overlap: bool = False
    zero: int = 0
    shard_group: int = 0
    sequence_parallel: bool = False
    recompute: Recompute = Recompute.NONE
    microbatch_size: int = 1
    global_batch: int = 1
    schedule: Schedule = Schedule.ONE_F_ONE_B
    virtual_stages: int = 1
    precision: Precision = Precision.BF16
    flash_attention: bool = True
    seq_len: int = 0
    stage_layers: tuple[int, ...] = ()
    stage_recompute: tuple[Recompute, ...] = ()  # per virtual stage; empty: `recompute` everywhere
    # LoRA fine-tuning (costmodel.lora): rank 0 trains every weight
    lora_rank: int = 0
    lora_targets: tuple[str, ...] = ()
    base_precision: str = "bf16"
    # gradients and master weights: "" takes the training runtime's default (costmodel.runtime)
    grad_dtype: str = ""
    master_dtype: str = "fp32"

    def __post_init__(self) -> None:
        from costmodel.lora import BASE_PRECISIONS, DEFAULT_TARGETS, TARGETS

        if isinstance(self.lora_rank, bool) or not isinstance(self.lora_rank, int) or self.lora_rank < 0:
            raise ConfigError(f"--lora-rank must be a positive integer, got {self.lora_rank!r}")
        targets = tuple(self.lora_targets) or (DEFAULT_TARGETS if self.lora_rank else ())
        unknown = [t for t in targets if t not in TARGETS]
        if unknown:
            raise ConfigError(f"--lora-targets {','.join(map(str, unknown))} unknown; use some of {','.join(TARGETS)}")
        if len(set(targets)) != len(targets):
            raise ConfigError(f"--lora-targets {','.join(targets)} names a target twice")
        object.__setattr__(self, "lora_targets", targets)
        if self.base_precision not in BASE_PRECISIONS:
            raise ConfigError(f"--base-precision {self.base_precision!r} is not one of {', '.join(BASE_PRECISIONS)}")
        if self.base_precision == "nf4" and not self.lora_rank:
            raise ConfigError("--base-precision nf4 (QLoRA) needs LoRA adapters: give --mode lora")
        if self.grad_dtype not in ("", "fp32", "bf16"):
            raise ConfigError(f"--grad-dtype {self.grad_dtype!r} is not one of fp32, bf16")
        if self.master_dtype not in ("fp32", "bf16"):
            raise ConfigError(f"--master-dtype {self.master_dtype!r} is not one of fp32, bf16")
        if isinstance(self.expert_tp, bool) or not isinstance(self.expert_tp, int) or self.expert_tp < 0:
            raise ConfigError(f"--expert-tp must be a positive integer, got {self.expert_tp!r}")
        if isinstance(self.expert_load_cv, bool) or not isinstance(self.expert_load_cv, (int, float)) \
                or not 0 <= self.expert_load_cv <= 4:
            raise ConfigError(f"--expert-load-cv must be between 0 (balanced) and 4, got {self.expert_load_cv!r}")
        for name in ("tp", "pp", "dp", "cp", "ep", "microbatch_size", "global_batch", "virtual_stages"):
            _positive(name, getattr(self, name))
        if self.zero not in (0, 1, 2, 3):
            raise ConfigError(f"--zero must be 0, 1, 2 or 3, got {self.zero!r}")
        if not isinstance(self.seq_len, int) or self.seq_len < 0:
            raise ConfigError(f"--seq-len must be a positive integer, got {self.seq_len!r}")
        for name, kind in (("recompute", Recompute), ("schedule", Schedule), ("precision", Precision)):
            value = getattr(self, name)
            try:
                object.__setattr__(self, name, kind(value))
            except ValueError:
                allowed = ", ".join(k.value for k in kind)
                raise ConfigError(f"--{name} {value!r} is not one of {allowed}") from None
        if self.shard_group == 0:
            object.__setattr__(self, "shard_group", self.dp if self.zero > 0 else 1)
        _positive("shard_group", self.shard_group)
        if self.zero == 0 and self.shard_group != 1:
            raise ConfigError(f"--shard-group {self.shard_group} needs --zero 1, 2 or 3 (nothing is sharded at zero 0)")
        if self.dp % self.shard_group:
            raise ConfigError(
                f"--shard-group {self.shard_group} does not divide dp ({self.dp}); "
                f"use a divisor of {self.dp}"
            )
        if self.virtual_stages > 1 and self.schedule not in (Schedule.INTERLEAVED, Schedule.ZERO_BUBBLE):
            raise ConfigError(
                f"--virtual-stages {self.virtual_stages} needs --schedule interleaved or zero-bubble "
                f"(got {self.schedule.value})"
            )
        if self.schedule in (Schedule.INTERLEAVED, Schedule.ZERO_BUBBLE) and self.pp == 1:
            raise ConfigError(f"--schedule {self.schedule.value} needs --pp 2 or more")
        object.__setattr__(self, "stage_layers", tuple(self.stage_layers))
        try:
            object.__setattr__(self, "stage_recompute", tuple(Recompute(r) for r in self.stage_recompute))
        except ValueError:
            raise ConfigError(f"stage recompute {list(self.stage_recompute)} must use none, selective or full") from None
        if self.stage_recompute and len(self.stage_recompute) != self.pp * self.virtual_stages:
            raise ConfigError(
                f"{len(self.stage_recompute)} per-stage recompute policies for pp({self.pp}) * "
                f"virtual_stages({self.virtual_stages}) = {self.pp * self.virtual_stages} stages"
            )

    # -- the mesh --------------------------------------------------------------------
    @property
    def world_size(self) -> int:
        return self.pp * self.dp * self.cp * self.tp

    @property
    def dp_shard(self) -> int:
        return self.shard_group

    @property
    def dp_replicate(self) -> int:
        return self.dp // self.shard_group

    @property
    def mesh(self) -> dict[str, int]:
        """Named axis -> size, outermost first."""
        return {"pp": self.pp, "dp_replicate": self.dp_replicate, "dp_shard": self.dp_shard, "cp": self.cp, "tp": self.tp}

    @property
    def num_stages(self) -> int:
        """Virtual pipeline stages: pp * virtual_stages (model chunks in pipeline order)."""
        return self.pp * self.virtual_stages

    @property
    def num_microbatches(self) -> int:
        return self.global_batch // (self.dp * self.microbatch_size)

    def recompute_of(self, stage: int) -> Recompute:
        """The recompute policy of virtual stage `stage`."""
        return self.stage_recompute[stage] if self.stage_recompute else self.recompute

    @property
    def lora(self) -> bool:
        return self.lora_rank > 0

    @property
    def policy(self) -> PrecisionPolicy:
        return PrecisionPolicy.of(self.precision, self.grad_dtype or "fp32", self.master_dtype)

    def replace(self, **changes) -> "Strategy":
        return replace(self, **changes)

    def to_dict(self) -> dict:
        out = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, tuple):
                value = [v.value if isinstance(v, StrEnum) else v for v in value]
            out[f.name] = value.value if isinstance(value, StrEnum) else value
        return out
