"""The Plan: the one contract between planning and running, serialised as YAML.

A plan names the model (its full spec, so it stands alone), the cluster, the mesh (named
axis -> size), the ZeRO level, sequence parallelism, the pipeline schedule, the stages
(layer ranges per virtual stage and their recompute policy), per-parameter placements
(parameter name or glob -> {mesh axis: Shard(dim) | Replicate()}; axes left out are
replicated), what the cost model predicts, and search statistics.
`paraplan simulate --plan` reproduces `predicted` exactly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from costmodel.errors import ConfigError
from costmodel.runtime import load_runtime
from costmodel.spec import ModelSpec
from costmodel.strategy import MESH_AXES, Strategy
from costmodel.validate import stage_layer_counts
from costmodel.serving import compute_dtype

SCHEMA_VERSION = 1
MODES = ("train", "lora", "inference")


@dataclass(frozen=True, slots=True, kw_only=True)
class StagePlan:
    virtual_stage: int
    pp_rank: int
    layers: tuple[int, int]  # [first, end) transformer layers
    recompute: str


@dataclass(frozen=True, slots=True, kw_only=True)
class Plan:
    schema_version: int = SCHEMA_VERSION
    model: dict
    cluster: str
    global_batch: int
    seq_len: int
    precision: str
    flash_attention: bool
    mesh: dict[str, int]
    zero: int
    sequence_parallel: bool
    schedule: dict
    stages: tuple[StagePlan, ...]
    placements: dict[str, dict[str, str]]
    predicted: dict = field(default_factory=dict)
    search: dict = field(default_factory=dict)
    mode: str = "train"  # train | lora | inference
    serving: dict = field(default_factory=dict)  # inference: prompt_len, output_len, beam, block_tokens, replicas
    lora: dict = field(default_factory=dict)  # lora: rank, targets, base_precision
    grad_dtype: str = "fp32"  # gradients (and their reduction)
    master_dtype: str = "fp32"  # the optimizer's copy of the weights
    runtime: str = "paraplan"  # the training-runtime profile that priced the plan (profiles/runtimes/)
    profile: str = ""  # the hardware profile that priced it
    # the module `paraplan run` builds: {} paraplan's own Transformer from `model`; {"kind": "hf",
    # "path": DIR or config.json} a Hugging Face model; {"kind": "py", "target": "MODULE:CALLABLE",
    # "path": its import folder} a user's nn.Module (planner.model_source.source_of); with "map",
    # its planner.module_map.ModuleMap as read when it was planned
    source: dict = field(default_factory=dict)
    # a mixture of experts: {"ep": expert-parallel degree, "expert_tp": 1 or tp} (costmodel.moe)
    experts: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ConfigError(f"plan mode {self.mode!r} is unknown; use one of {', '.join(MODES)}")
        if self.schema_version != SCHEMA_VERSION:
            raise ConfigError(
                f"plan schema_version {self.schema_version} is not supported (this paraplan reads {SCHEMA_VERSION}); "
                "re-run paraplan plan to write a current plan"
            )
        missing = [a for a in MESH_AXES if a not in self.mesh]
        if missing:
            raise ConfigError(f"plan mesh lacks axis {', '.join(missing)}; a mesh names {', '.join(MESH_AXES)}")
        bad = [f"{a}={v}" for a, v in self.mesh.items() if v < 1]
        if bad:
            raise ConfigError(f"plan mesh sizes must be positive, got {', '.join(bad)}")
        if self.source and self.source.get("kind") not in ("hf", "py"):
            raise ConfigError(f"plan source kind {self.source.get('kind')!r} is unknown; use hf or py (or no source)")
        needs = {"hf": ("path",), "py": ("target", "path")}.get(self.source.get("kind"), ())
        lacking = [k for k in needs if not isinstance(self.source.get(k), str) or not self.source[k]]
        if lacking:
            raise ConfigError(f"plan source of kind {self.source['kind']} lacks {', '.join(lacking)}; re-plan "
                              "with --model hf:DIR or py:MODULE:CALLABLE")
        if "map" in self.source and not isinstance(self.source["map"], dict):
            raise ConfigError("plan source map must be a mapping (blocks, embedding, head, ...); re-plan")
        for name, axes in self.placements.items():
            if not isinstance(axes, dict) or not all(isinstance(v, str) for v in axes.values()):
                raise ConfigError(f"placement of {name} must map mesh axes to Shard(dim) or Replicate()")
        self.spec  # the model and the strategy validate themselves: a plan that loads is whole
        self.strategy()

    @property
    def world_size(self) -> int:
        return math.prod(self.mesh[a] for a in MESH_AXES)

    @property
    def spec(self) -> ModelSpec:
        return ModelSpec.from_dict(self.model)

    def strategy(self) -> Strategy:
        mesh = self.mesh
        ordered = sorted(self.stages, key=lambda x: x.virtual_stage)
        recomputes = [st.recompute for st in ordered]
        uniform = len(set(recomputes)) <= 1
        sched = self.schedule
        return Strategy(
            tp=mesh["tp"], pp=mesh["pp"], cp=mesh["cp"], dp=mesh["dp_replicate"] * mesh["dp_shard"],
            zero=self.zero, shard_group=mesh["dp_shard"] if self.zero > 0 else 1,
            sequence_parallel=self.sequence_parallel, recompute=recomputes[0] if recomputes else "none",
            stage_recompute=() if uniform else tuple(recomputes),
            microbatch_size=sched["microbatch_size"], global_batch=self.global_batch,
            schedule=sched["name"], virtual_stages=sched.get("virtual_stages", 1),
            precision=compute_dtype(self.precision),  # (a serving plan's weight format: its compute dtype)
            flash_attention=self.flash_attention, seq_len=self.seq_len,
            stage_layers=tuple(st.layers[1] - st.layers[0] for st in ordered),
            lora_rank=int(self.lora.get("rank", 0)), lora_targets=tuple(self.lora.get("targets", ())),
            base_precision=str(self.lora.get("base_precision", "bf16")),
            grad_dtype=self.grad_dtype, master_dtype=self.master_dtype,
            ep=int(self.experts.get("ep", 1)), expert_tp=int(self.experts.get("expert_tp", 0)),
            **({"expert_load_cv": float(self.experts["load_cv"])} if "load_cv" in self.experts else {}),
            ep_overlap=bool(self.experts.get("overlap", False)),
        )

    # -- YAML ----------------------------------------------------------------------------
    def to_dict(self) -> dict:
        return {
            "schema_version": self.schema_version,
            "model": dict(self.model),
            "cluster": self.cluster,
            "global_batch": self.global_batch,
            "seq_len": self.seq_len,
            "precision": self.precision,
            "flash_attention": self.flash_attention,
            "mesh": {a: self.mesh[a] for a in MESH_AXES},
            "zero": self.zero,
            "sequence_parallel": self.sequence_parallel,
            "schedule": dict(self.schedule),
            "stages": [
                {"virtual_stage": s.virtual_stage, "pp_rank": s.pp_rank, "layers": list(s.layers), "recompute": s.recompute}
                for s in self.stages
            ],
            "placements": {k: dict(v) for k, v in self.placements.items()},
            "predicted": self.predicted,
            "search": self.search,
            "mode": self.mode,
            "grad_dtype": self.grad_dtype,
            "master_dtype": self.master_dtype,
            "runtime": self.runtime,
            "profile": self.profile,
            **({"source": dict(self.source)} if self.source else {}),
            **({"serving": dict(self.serving)} if self.serving else {}),
            **({"lora": dict(self.lora)} if self.lora else {}),
            **({"experts": dict(self.experts)} if self.experts else {}),
        }

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False, default_flow_style=None, width=100)

    @classmethod
    def from_dict(cls, data: dict) -> "Plan":
        if not isinstance(data, dict):
            raise ConfigError("a plan file must hold a mapping (see docs/ARCHITECTURE.md: schema_version, model, mesh, ...)")
        version = data.get("schema_version")
        if version != SCHEMA_VERSION:
            raise ConfigError(
                f"plan schema_version {version!r} is not supported (this paraplan reads {SCHEMA_VERSION}); "
                "re-run paraplan plan to write a current plan"
            )
        required = ("model", "cluster", "global_batch", "mesh", "zero", "sequence_parallel", "schedule", "stages")
        missing = [k for k in required if k not in data]
        if missing:
            raise ConfigError(f"plan lacks field(s) {', '.join(missing)}")
        try:
            stages = tuple(
                StagePlan(virtual_stage=int(s["virtual_stage"]), pp_rank=int(s["pp_rank"]),
                          layers=(int(s["layers"][0]), int(s["layers"][1])), recompute=str(s["recompute"]))
                for s in data["stages"]
            )
            if not isinstance(data["model"], dict):
                raise ConfigError("plan field 'model' must be a mapping of model fields (layers, hidden, ...)")
            model = dict(data["model"])
            return cls(
                schema_version=version, model=model, cluster=str(data["cluster"]),
                global_batch=int(data["global_batch"]), seq_len=int(data.get("seq_len", model.get("seq_len", 0))),
                precision=str(data.get("precision", "bf16")), flash_attention=bool(data.get("flash_attention", True)),
                mesh={k: int(v) for k, v in dict(data["mesh"]).items()}, zero=int(data["zero"]),
                sequence_parallel=bool(data["sequence_parallel"]), schedule=dict(data["schedule"]), stages=stages,
                placements={str(k): dict(v) for k, v in dict(data.get("placements") or {}).items()},
                predicted=dict(data.get("predicted") or {}), search=dict(data.get("search") or {}),
                mode=str(data.get("mode", "train")), serving=dict(data.get("serving") or {}),
                lora=dict(data.get("lora") or {}),
                grad_dtype=str(data.get("grad_dtype", "fp32")), master_dtype=str(data.get("master_dtype", "fp32")),
                runtime=str(data.get("runtime", "paraplan")), profile=str(data.get("profile", "")),
                source=dict(data.get("source") or {}), experts=dict(data.get("experts") or {}),
            )
        except (KeyError, TypeError, ValueError, IndexError) as exc:
            if isinstance(exc, ConfigError):
                raise
            raise ConfigError(f"plan field is malformed ({type(exc).__name__}: {exc}); compare with docs/ARCHITECTURE.md's plan format") from None

    @classmethod
    def load(cls, path: str | Path) -> "Plan":
        """The plan in a YAML file; a missing or unreadable file is bad input."""
        target = Path(path)
        if not target.is_file():
            raise ConfigError(f"plan file {path} does not exist; write one with `paraplan plan ... -o {path}`")
        try:
            text = target.read_text()
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"plan file {path} cannot be read ({type(exc).__name__}); give a plan YAML") from None
        return cls.from_yaml(text)

    @classmethod
    def from_yaml(cls, text: str) -> "Plan":
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f" at line {mark.line + 1}" if mark is not None else ""
            raise ConfigError(f"plan is not valid YAML{where}; fix its syntax") from None
        return cls.from_dict(data)


def schedule_problems(name: str, pp: int, microbatches: int) -> list[str]:
    """What torch.distributed.pipelining refuses in a pipeline schedule (Schedule1F1B needs at
    least as many microbatches as stages; ScheduleInterleaved1F1B a multiple of the stages, as
    the search plans it; ScheduleInterleavedZeroBubble a multiple of its rounds, max(1, m // pp)).
    The search emits only schedules without problems, and `check` and `run` refuse the rest, so
    the three agree."""
    if pp == 1:
        return []
    if name == "1f1b" and microbatches < pp:
        return [f"1F1B needs at least as many microbatches as pipeline stages: {microbatches} microbatches for "
                f"pp {pp}; raise the global batch, lower the microbatch size or use --schedule gpipe"]
    if name == "interleaved" and microbatches % pp:
        return [f"the interleaved schedule needs the microbatches ({microbatches}) to be a multiple of pp ({pp}); "
                "change the global batch or the microbatch size"]
    rounds = max(1, microbatches // pp)
    if name == "zero-bubble" and microbatches % rounds:
        return [f"the zero-bubble schedule runs the microbatches in rounds of about pp ({pp}) and needs "
                f"{microbatches} microbatches to be a multiple of the {rounds} rounds; use a multiple of pp"]
    return []


def megatron_placements(spec: ModelSpec, strategy: Strategy, module_map=None) -> dict[str, dict[str, str]]:
    """Megatron-LM's tensor-parallel layout (column-parallel Q/K/V and gate/up, row-parallel
    output projections, vocab-parallel embedding and head) named as in the module that runs
    (`module_map`; paraplan's own `Transformer` when None), plus FSDP's dim-0 sharding at
    ZeRO-3. The intra-op ILP replaces this with what it finds."""
    from planner.module_map import zoo_map

    mmap = module_map or zoo_map(spec)
    shard = strategy.zero == 3 and strategy.dp_shard * strategy.cp > 1
    out: dict[str, dict[str, str]] = {}
    for name, placement in mmap.megatron().items():
        axes = {"tp": placement} if strategy.tp > 1 else {}
        if shard:
            axes["dp_shard"] = "Shard(0)"
        if axes:
            out[name] = axes
    return out


def plan_from_strategy(
    spec: ModelSpec, strategy: Strategy, cluster: str, predicted: dict, search: dict | None = None, *,
    runtime: str = "paraplan", profile: str = "", source: dict | None = None, module_map=None,
) -> Plan:
    counts = stage_layer_counts(spec, strategy)
    stages, start = [], 0
    for k, n in enumerate(counts):
        stages.append(StagePlan(virtual_stage=k, pp_rank=k % strategy.pp, layers=(start, start + n),
                                recompute=strategy.recompute_of(k).value))
        start += n
    return Plan(
        model=spec.to_dict(), cluster=cluster, global_batch=strategy.global_batch,
        seq_len=strategy.seq_len or spec.seq_len, precision=strategy.precision.value,
        flash_attention=strategy.flash_attention, mesh=strategy.mesh, zero=strategy.zero,
        sequence_parallel=strategy.sequence_parallel,
        schedule={"name": strategy.schedule.value, "microbatch_size": strategy.microbatch_size,
                  "num_microbatches": strategy.num_microbatches, "virtual_stages": strategy.virtual_stages},
        stages=tuple(stages), placements=megatron_placements(spec, strategy, module_map), predicted=predicted,
        source=dict(source or {}),
        search=search or {}, mode="lora" if strategy.lora else "train",
        lora={"rank": strategy.lora_rank, "targets": list(strategy.lora_targets),
              "base_precision": strategy.base_precision} if strategy.lora else {},
        grad_dtype=strategy.grad_dtype or load_runtime(runtime).grad_dtype, master_dtype=strategy.master_dtype, runtime=runtime, profile=profile,
        experts={"ep": strategy.ep, "expert_tp": strategy.expert_tp or strategy.tp,
                 "load_cv": strategy.expert_load_cv, "overlap": strategy.ep_overlap} if spec.moe else {},
    )
