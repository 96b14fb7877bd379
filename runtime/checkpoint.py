"""Checkpoints with torch.distributed.checkpoint, written atomically.

Step t goes to DIR/step_t: every rank writes its shards into DIR/.step_t.tmp, then rank 0
adds a COMPLETE marker and renames the folder. A folder without the marker (a crash while
writing) is never the latest. State is keyed by parameter name, so DCP reshards on load.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions, get_model_state_dict, get_optimizer_state_dict, set_model_state_dict, set_optimizer_state_dict,
)
from torch.distributed.checkpoint.stateful import Stateful

MARKER = "COMPLETE"


class TrainState(Stateful):
    """The model parts (one per pipeline stage on this rank), their optimizers and the step."""

    def __init__(self, modules, optimizers, extra: dict) -> None:
        self.modules, self.optimizers, self.extra = modules, optimizers, extra

    def state_dict(self) -> dict:
        model, optim = {}, {}
        for m, o in zip(self.modules, self.optimizers):
            model.update(get_model_state_dict(m))
            optim.update(_flatten(get_optimizer_state_dict(m, o)))
        return {"model": model, "optim": optim, "extra": dict(self.extra)}

    def load_state_dict(self, state: dict) -> None:
        for m, o in zip(self.modules, self.optimizers):
            mine = get_model_state_dict(m)
            set_model_state_dict(m, {k: state["model"][k] for k in mine}, options=StateDictOptions(strict=True))
            template = _flatten(get_optimizer_state_dict(m, o))
            set_optimizer_state_dict(m, o, _unflatten({k: state["optim"][k] for k in template}))
        self.extra.update(state["extra"])


def _flatten(osd: dict) -> dict:
    """Optimizer state {state: {fqn: {k: v}}, param_groups: [...]} -> flat keys DCP can reshard."""
    flat = {}
    for fqn, entry in osd["state"].items():
        for k, v in entry.items():
            flat[f"state.{fqn}.{k}"] = v
    flat["param_groups"] = json.dumps(osd["param_groups"])
    return flat


def _unflatten(flat: dict) -> dict:
    state: dict = {}
    for key, v in flat.items():
        if key == "param_groups":
            continue
        _, rest = key.split(".", 1)
        fqn, k = rest.rsplit(".", 1)
        state.setdefault(fqn, {})[k] = v
    return {"state": state, "param_groups": json.loads(flat["param_groups"])}


def latest(directory: str | Path) -> Path | None:
    """The newest complete checkpoint; incomplete ones are skipped (and reported)."""
    d = Path(directory)
    if not d.exists():
        return None
    done = []
    for p in d.glob("step_*"):
        if (p / MARKER).exists() and p.name[5:].isdigit():
            done.append((int(p.name[5:]), p))
    return max(done)[1] if done else None


def save(directory: str | Path, step: int, state: TrainState) -> Path:
    d = Path(directory)
    final = d / f"step_{step}"
    tmp = d / f".step_{step}.tmp"
    rank0 = dist.get_rank() == 0
    if rank0:
        d.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)
    dist.barrier()
    dcp.save({"train": state}, checkpoint_id=str(tmp))
    dist.barrier()
    if rank0:
        (tmp / MARKER).write_text(str(step))
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    dist.barrier()
    return final


def load(path: Path, state: TrainState) -> None:
    dcp.load({"train": state}, checkpoint_id=str(path))
