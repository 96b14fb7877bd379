"""What every engine translation shares: the facts of a plan an engine config can say, and
the result of reading an engine's config back (a strategy, the model where the config names
one, and the settings paraplan does not understand)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from costmodel.errors import ConfigError
from costmodel.spec import ModelSpec
from costmodel.strategy import Strategy
from planner.plan import Plan


@dataclass(frozen=True, slots=True, kw_only=True)
class Imported:
    """An engine config read back: the strategy it runs, its model when the config gives the
    shape (Megatron's flags) or names a known one (torchtitan's flavor), and every setting
    that was not understood, listed rather than dropped."""

    engine: str
    strategy: Strategy
    spec: ModelSpec | None = None
    unknown: tuple[str, ...] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        if self.engine not in ENGINES:
            raise ConfigError(f"unknown engine {self.engine!r}; use one of {', '.join(ENGINES)}")


ENGINES = ("torchtitan", "megatron", "deepspeed", "vllm")


def json_object(text: str, what: str) -> dict:
    """`text` as a JSON object; one line naming `what` it is where it is not JSON or not an
    object."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{what} is not valid JSON (line {exc.lineno}: {exc.msg}); fix its syntax") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{what} must be a JSON object")
    return data


def uniform_recompute(plan: Plan, engine: str) -> str:
    """The plan's recomputation when every stage does the same (engines set one policy)."""
    kinds = {s.recompute for s in plan.stages}
    if len(kinds) > 1:
        raise ConfigError(f"{engine} sets one recomputation policy for every stage, and this plan recomputes "
                          f"{' / '.join(s.recompute for s in sorted(plan.stages, key=lambda s: s.virtual_stage))} "
                          "per stage; re-plan with --recompute none|selective|full")
    return kinds.pop() if kinds else "none"


def stage_layers(plan: Plan) -> list[int]:
    """Layers per virtual stage, in pipeline order."""
    return [s.layers[1] - s.layers[0] for s in sorted(plan.stages, key=lambda s: s.virtual_stage)]


def training_plan(plan: Plan, engine: str, *, experts: bool = False, latent: bool = False) -> None:
    """Refuse a serving plan where a training config is asked for, and a mixture of experts,
    latent attention or a sliding window where the exporter (`experts`: it writes experts;
    `latent`: it writes latent attention) does not write them: read as dense it would train
    another model."""
    if plan.mode == "inference":
        raise ConfigError(f"{engine} trains; this is a serving plan: export it --to vllm")
    if plan.mode == "lora":
        raise ConfigError(f"a LoRA plan has no {engine} training config here; export a pre-training plan")
    spec = plan.spec
    if spec.moe and not experts:
        raise ConfigError(f"exporting a mixture of experts to {engine} is not written yet (its config would train a "
                          "dense model); export it --to megatron")
    if (spec.latent_attention and not latent) or spec.attention_window:
        raise ConfigError(f"{spec.name}'s {'latent attention' if spec.latent_attention else 'sliding window'} is not "
                          f"written to {engine}'s config yet; its export would train another model")


def positive_int(value, name: str, engine: str, *, leftover: bool = False) -> int:
    """An integer setting of an engine config, checked (`leftover`: -1 also, "the ranks left")."""
    try:
        out = int(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{engine} setting {name} must be an integer, got {value!r}") from None
    if out < 1 and not (leftover and out == -1):
        raise ConfigError(f"{engine} setting {name} must be positive, got {out}")
    return out
