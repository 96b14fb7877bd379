"""Checkpoints with torch.distributed.checkpoint, written atomically.

Step t goes to DIR/step_t: every rank writes its shards into DIR/.step_t.tmp, then rank 0
adds a COMPLETE marker holding the size of every file and renames the folder. A folder
without the marker (a crash while writing) is never a candidate; one whose files no longer
match the marker (cut short or damaged afterwards), or that fails to load, is skipped with a
warning and the one before it is used. State is keyed by parameter name, so DCP reshards on
load: a checkpoint written under one plan resumes under another (TP, DP and PP may change).
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import warnings
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
            loaded = {k: state["optim"][k] for k in template if k != "param_groups"}
            # the param groups name this rank's parameters, which differ between layouts: keep
            # today's (the learning rate follows the restored step through the scheduler)
            loaded["param_groups"] = template["param_groups"]
            set_optimizer_state_dict(m, o, _unflatten(loaded))
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


def _manifest(folder: Path) -> dict[str, int]:
    return {str(p.relative_to(folder)): p.stat().st_size for p in sorted(folder.rglob("*"))
            if p.is_file() and p.name != MARKER}


def problem(folder: Path) -> str | None:
    """Why a checkpoint folder cannot be used, or None."""
    marker = folder / MARKER
    if not marker.exists():
        return "no COMPLETE marker (written when a crash cut the save short)"
    try:
        want = json.loads(marker.read_text())["files"]
    except (ValueError, KeyError, TypeError):
        return "its COMPLETE marker is unreadable"
    have = _manifest(folder)
    for name, size in want.items():
        if name not in have:
            return f"{name} is missing"
        if have[name] != size:
            return f"{name} has {have[name]} bytes, {size} were written"
    return None


def candidates(directory: str | Path) -> list[Path]:
    """Finished checkpoints (those with a marker), newest first."""
    d = Path(directory)
    if not d.exists():
        return []
    done = [(int(p.name[5:]), p) for p in d.glob("step_*") if p.name[5:].isdigit() and (p / MARKER).exists()]
    return [p for _, p in sorted(done, reverse=True)]


def latest(directory: str | Path) -> Path | None:
    """The newest checkpoint whose files match its marker."""
    return next((p for p in candidates(directory) if problem(p) is None), None)


def _warn(message: str) -> None:
    if not dist.is_initialized() or dist.get_rank() == 0:
        print(f"paraplan: warning: {message}", file=sys.stderr, flush=True)


def load_latest(directory: str | Path, state: "TrainState") -> Path | None:
    """Load the newest usable checkpoint into `state`, skipping (with a warning) any that is
    damaged or fails to load; None when there is none. Every rank decides alike: the files
    are checked on the shared folder and a failed load fails on all ranks (DCP gathers them)."""
    for path in candidates(directory):
        why = problem(path)
        if why is None:
            try:
                load(path, state)
                return path
            except Exception as exc:  # noqa: BLE001 - any failure to read means: use the one before
                why = f"it failed to load ({type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''})"
        _warn(f"checkpoint {path} is unusable: {why}; trying the one before")
    return None


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
        (tmp / MARKER).write_text(json.dumps({"step": step, "files": _manifest(tmp)}))
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    dist.barrier()
    return final


def load_in_one_process(state: dict, path: str | Path) -> None:
    """DCP's load of a checkpoint into `state` in this process alone (export, generate): its
    warning that no process group exists says what is meant, so it is not printed."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.load(state, checkpoint_id=str(path), no_dist=True)


def load(path: Path, state: TrainState) -> None:
    dcp.load({"train": state}, checkpoint_id=str(path))
