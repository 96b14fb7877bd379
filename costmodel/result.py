"""What a simulated step predicts: the `predicted` object of docs/ARCHITECTURE.md, plus the events."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple


class Event(NamedTuple):
    rank: int  # pipeline rank
    stream: str  # compute | send | dp | optimizer
    name: str
    start_s: float
    duration_s: float


@dataclass(frozen=True, slots=True, kw_only=True)
class StepResult:
    step_time_s: float
    tokens_per_s: float
    model_tflops_per_gpu: float
    hardware_tflops_per_gpu: float
    mfu: float
    bubble_fraction: float
    fits: bool
    memory_gib: dict[str, float]  # worst rank
    time_s: dict[str, float]  # the bottleneck rank
    rank_memory_gib: tuple[dict[str, float], ...] = ()  # every pipeline rank
    capacity_gib: float = 0.0
    events: tuple[Event, ...] = field(default=(), repr=False)
    # the range the step time should fall in (measured / predicted - 1 of the calibration
    # residuals of this runtime and GPU architecture), and whether the plan is inside them
    step_time_s_range: tuple[float, float] = (0.0, 0.0)
    calibrated: bool = False
    runtime: str = ""
    profile: str = ""
    best_published_mfu: float = 0.0  # of this GPU type (0: none known)

    @property
    def mfu_above_published(self) -> bool:
        return bool(self.best_published_mfu) and self.mfu > self.best_published_mfu

    def predicted(self) -> dict:
        """The docs/ARCHITECTURE.md keys, rounded so that a plan file reproduces them exactly."""
        return {
            "step_time_s": _r(self.step_time_s),
            "tokens_per_s": _r(self.tokens_per_s),
            "model_tflops_per_gpu": _r(self.model_tflops_per_gpu),
            "hardware_tflops_per_gpu": _r(self.hardware_tflops_per_gpu),
            "mfu": _r(self.mfu),
            "bubble_fraction": _r(self.bubble_fraction),
            "fits": bool(self.fits),
            "memory_gib": {k: _r(v) for k, v in self.memory_gib.items()},
            "time_s": {k: _r(v) for k, v in self.time_s.items()},
            "step_time_s_range": [_r(self.step_time_s_range[0]), _r(self.step_time_s_range[1])],
            "calibrated": bool(self.calibrated),
        }


def _r(x: float) -> float:
    return float(f"{x:.6g}")
