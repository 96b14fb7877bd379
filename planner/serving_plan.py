"""A serving plan's `serving` section read back, validated: the request shape, the replica
layout and, for a plan made for traffic, the scheduler, the workload, the rate and the
objectives. One reader for every command that takes a serving plan (`check`, `simulate
--plan`, `export --to vllm`), so that a hand-edited or damaged section is refused in one
line naming the field, and what `simulate --plan` reprices is what the planner priced.
"""

from __future__ import annotations

from dataclasses import dataclass

from costmodel.errors import ConfigError
from costmodel.serving import DEFAULT_ACCEPTANCE, GPU_MEMORY_UTILIZATION, ServingRequest
from costmodel.serving_engine import DEFAULT_ENGINE
from costmodel.traffic import SLO, SchedulerConfig, ServingLayout
from planner.plan import Plan
from planner.serving_search import REQUESTS_PER_PROBE, TrafficWorkload


@dataclass(frozen=True, slots=True, kw_only=True)
class ServingSetup:
    request: ServingRequest  # the steady state's shape (a traffic plan's: its workload's typical request)
    layout: ServingLayout  # the whole deployment
    scheduler: SchedulerConfig | None = None  # a traffic plan's engine arguments
    workload: TrafficWorkload | None = None  # and its workload (the same requests the planner simulated)
    rate: float | None = None
    slo: SLO = SLO()

    @property
    def traffic(self) -> bool:
        return self.workload is not None


def _int(sv: dict, key: str, default=None) -> int:
    value = sv.get(key, default)
    if value is None:
        raise ConfigError(f"{key} is missing")
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{key} must be an integer, got {value!r}")
    return value


def _number(sv: dict, key: str, default=None) -> float:
    value = sv.get(key, default)
    if value is None:
        raise ConfigError(f"{key} is missing")
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"{key} must be a number, got {value!r}")
    return float(value)


def _text(sv: dict, key: str, default: str | None = None) -> str | None:
    value = sv.get(key, default)
    if value is not None and not isinstance(value, str):
        raise ConfigError(f"{key} must be text, got {value!r}")
    return value


def _flag(sv: dict, key: str, default: bool) -> bool:
    value = sv.get(key, default)
    if not isinstance(value, bool):
        raise ConfigError(f"{key} must be true or false, got {value!r}")
    return value


def serving_setup(plan: Plan, where: str = "the plan") -> ServingSetup:
    """The plan's serving section as the serving model's objects; a ConfigError naming the field
    and the way out where it is missing or wrong."""
    if plan.mode != "inference":
        raise ConfigError(f"{where} is a training plan, not a serving plan; plan one with --mode inference")
    sv, mesh = plan.serving, plan.mesh
    try:
        if not isinstance(sv, dict):
            raise ConfigError("it is not a mapping")
        engine = _text(sv, "engine", DEFAULT_ENGINE)
        _text(sv, "model_path")  # the Hugging Face directory `vllm serve` loads, where one was read
        draft, ngram = None, False
        if _text(sv, "draft_model"):
            from planner.model_source import NGRAM, load_draft

            draft, ngram = load_draft(sv["draft_model"], plan.spec), sv["draft_model"] == NGRAM
        memory = dict(kv_cache_dtype=_text(sv, "kv_cache_dtype", "auto"),
                      gpu_memory_utilization=_number(sv, "gpu_memory_utilization", GPU_MEMORY_UTILIZATION))
        request = ServingRequest(prompt_len=_int(sv, "prompt_len"), output_len=_int(sv, "output_len"),
                                 beam=_int(sv, "beam", 1), block_tokens=_int(sv, "block_tokens", 16),
                                 precision=plan.precision, engine=engine, draft=draft, ngram=ngram,
                                 draft_len=_int(sv, "draft_len", 4),
                                 acceptance=_number(sv, "acceptance", DEFAULT_ACCEPTANCE),
                                 **memory)
        expert_parallel = _flag(sv, "expert_parallel", False)
        replicas = _int(sv, "replicas", 1)
        layout = ServingLayout(tp=mesh["tp"], pp=mesh["pp"], replicas=replicas,
                               prefill_replicas=_int(sv, "prefill_replicas", 0), precision=plan.precision,
                               expert_parallel=expert_parallel)
        if layout.gpus != plan.world_size:
            raise ConfigError(f"replicas {replicas} x tp {mesh['tp']} x pp {mesh['pp']} = {layout.gpus} GPUs, but the "
                              f"plan's mesh has {plan.world_size}")
        if "workload" not in sv:
            return ServingSetup(request=request, layout=layout)
        scheduler = SchedulerConfig(max_num_seqs=_int(sv, "max_num_seqs"),
                                    max_num_batched_tokens=_int(sv, "max_num_batched_tokens"),
                                    chunked_prefill=_flag(sv, "chunked_prefill", True),
                                    prefix_caching=_flag(sv, "prefix_caching", True),
                                    block_tokens=request.block_tokens, engine=engine, **memory,
                                    **({"speculative_tokens": request.draft_len, "acceptance": request.acceptance,
                                        "draft": draft} if request.speculative else {}))
        if _text(sv, "workload") is None:
            raise ConfigError("workload is missing")
        workload = TrafficWorkload.of(sv["workload"], requests=_int(sv, "requests", REQUESTS_PER_PROBE),
                                      seed=_int(sv, "workload_seed", 0), burst_cv=_number(sv, "burst_cv", 1.0))
        rate = _number(sv, "rate")
        if not rate > 0 or rate == float("inf"):
            raise ConfigError(f"rate must be requests per second > 0, got {rate}")
        slo = SLO.parse(_text(sv, "slo"))
    except ConfigError as exc:
        raise ConfigError(f"{where}: its `serving` section: {exc}; re-plan with `paraplan plan --mode inference`") \
            from None
    return ServingSetup(request=request, layout=layout, scheduler=scheduler, workload=workload, rate=rate, slo=slo)
