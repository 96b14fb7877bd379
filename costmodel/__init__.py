"""paraplan's cost model: pure functions of (model spec, strategy, hardware) -> time, memory.

Imports nothing else of paraplan and never touches a live device.
"""

from costmodel.cluster import Cluster, load_cluster
from costmodel.errors import ConfigError
from costmodel.layer import BlockPrice
from costmodel.result import StepResult
from costmodel.simulate import simulate
from costmodel.spec import ModelSpec
from costmodel.step import StepModel, build_step
from costmodel.strategy import Precision, Recompute, Schedule, Strategy


def predict(spec: ModelSpec, strategy: Strategy, cluster: Cluster, *, record_events: bool = False,
            block: BlockPrice | None = None) -> StepResult:
    """Simulate one training step of `spec` under `strategy` on `cluster` (`block`: the repeated
    block priced from its graph; the layer formulas when None)."""
    return simulate(build_step(spec, strategy, cluster, block), record_events=record_events)


__all__ = [
    "BlockPrice", "Cluster", "ConfigError", "ModelSpec", "Precision", "Recompute", "Schedule", "StepModel", "StepResult",
    "Strategy", "build_step", "load_cluster", "predict", "simulate",
]
