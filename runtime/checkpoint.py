"""Checkpoints with torch.distributed.checkpoint, written atomically.

Step t goes to DIR/step_t: every rank writes its shards into DIR/.step_t.tmp, then rank 0
adds a COMPLETE marker holding the size of every file and renames the folder. A folder
without the marker (a crash while writing) is never a candidate; one whose files no longer
match the marker (cut short or damaged afterwards), or that fails to load, is skipped with a
warning and the one before it is used. State is keyed by parameter name, so DCP reshards on
load: a checkpoint written under one plan resumes under another (TP, DP and PP may change).
Under expert parallelism each ep rank holds other experts under the same names: their shards
are saved as NAME.ep{r}of{n} (`expert_keys`), resumed under the same ep (the marker records it),
and put back together whole for one process (`whole_model_state`: export-weights, generate).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions, get_model_state_dict, get_optimizer_state_dict, set_model_state_dict, set_optimizer_state_dict,
)
from torch.distributed.checkpoint.stateful import Stateful

from costmodel.errors import ConfigError
from runtime.module import clean

MARKER = "COMPLETE"
EP_KEY = re.compile(r"^(?P<name>.+)\.ep(?P<rank>\d+)of(?P<size>\d+)$")


def expert_keys(module) -> dict[str, str]:
    """Parameter name (as state dicts give it) -> the name its shard is saved under, for the
    experts expert parallelism split (a module with ep_rank / ep_size > 1): NAME.ep{r}of{n}."""
    out = {}
    for path, sub in module.named_modules():
        size = getattr(sub, "ep_size", 1)
        if size > 1:
            for leaf, _ in sub.named_parameters(recurse=False):
                name = clean(f"{path}.{leaf}")  # (state dicts do not carry the recompute wrapper's prefix)
                out[name] = f"{name}.ep{sub.ep_rank}of{size}"
    return out


class TrainState(Stateful):
    """The model parts (one per pipeline stage on this rank), their optimizers and the step;
    `ep`: the plan's expert-parallel degree (the marker records it)."""

    def __init__(self, modules, optimizers, extra: dict, ep: int = 1) -> None:
        self.modules, self.optimizers, self.extra, self.ep = modules, optimizers, extra, ep

    def state_dict(self) -> dict:
        model, optim = {}, {}
        for m, o in zip(self.modules, self.optimizers):
            keys = expert_keys(m)
            model.update({keys.get(k, k): v for k, v in get_model_state_dict(m).items()})
            optim.update(_flatten(get_optimizer_state_dict(m, o), keys))
        return {"model": model, "optim": optim, "extra": dict(self.extra)}

    def load_state_dict(self, state: dict) -> None:
        for m, o in zip(self.modules, self.optimizers):
            keys = expert_keys(m)
            mine = get_model_state_dict(m)
            set_model_state_dict(m, {k: state["model"][keys.get(k, k)] for k in mine},
                                 options=StateDictOptions(strict=True))
            template = _flatten(get_optimizer_state_dict(m, o), keys)
            loaded = {k: state["optim"][k] for k in template if k != "param_groups"}
            # the param groups name this rank's parameters, which differ between layouts: keep
            # today's (the learning rate follows the restored step through the scheduler)
            loaded["param_groups"] = template["param_groups"]
            set_optimizer_state_dict(m, o, _unflatten(loaded, {v: k for k, v in keys.items()}))
        self.extra.update(state["extra"])


def _flatten(osd: dict, rename: dict[str, str] | None = None) -> dict:
    """Optimizer state {state: {fqn: {k: v}}, param_groups: [...]} -> flat keys DCP can reshard
    (an expert shard's fqn as `rename` gives it)."""
    flat = {}
    for fqn, entry in osd["state"].items():
        for k, v in entry.items():
            flat[f"state.{(rename or {}).get(fqn, fqn)}.{k}"] = v
    flat["param_groups"] = json.dumps(osd["param_groups"])
    return flat


def _unflatten(flat: dict, rename: dict[str, str] | None = None) -> dict:
    state: dict = {}
    for key, v in flat.items():
        if key == "param_groups":
            continue
        _, rest = key.split(".", 1)
        fqn, k = rest.rsplit(".", 1)
        state.setdefault((rename or {}).get(fqn, fqn), {})[k] = v
    return {"state": state, "param_groups": json.loads(flat["param_groups"])}


def whole_model_state(names: list[str], path: str | Path) -> dict[str, torch.Tensor]:
    """The checkpoint's model tensors of `names` (as a whole module names its parameters and
    buffers), loaded in this process: an expert-parallel run's shards (NAME.ep{r}of{n}) put back
    together in expert order. Names the checkpoint does not hold are left out."""
    metadata = dcp.FileSystemReader(str(path)).read_metadata().state_dict_metadata
    prefix = "train.model."
    shards: dict[str, dict[int, str]] = {}
    for key in metadata:
        match = EP_KEY.match(key[len(prefix):]) if key.startswith(prefix) else None
        if match:
            shards.setdefault(match["name"], {})[int(match["rank"])] = key[len(prefix):]
    def empty(key: str) -> torch.Tensor:  # as it was saved
        meta = metadata[prefix + key]
        return torch.empty(tuple(meta.size), dtype=meta.properties.dtype)

    wanted = {n: empty(n) for n in names if prefix + n in metadata}
    for name in names:
        for key in shards.get(name, {}).values():
            wanted[key] = empty(key)
    load_in_one_process({"train": {"model": wanted}}, path)
    for name, parts in shards.items():
        if name in names:
            wanted[name] = torch.cat([wanted.pop(parts[r]) for r in sorted(parts)], dim=0)
    return wanted


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


def _marker_ep(folder: Path) -> int:
    try:
        return int(json.loads((folder / MARKER).read_text()).get("ep", 1))
    except (OSError, ValueError, TypeError, AttributeError):
        return 1


def _warn(message: str) -> None:
    if not dist.is_initialized() or dist.get_rank() == 0:
        print(f"paraplan: warning: {message}", file=sys.stderr, flush=True)


def load_latest(directory: str | Path, state: "TrainState") -> Path | None:
    """Load the newest usable checkpoint into `state`, skipping (with a warning) any that is
    damaged or fails to load; None when there is none. Every rank decides alike: the files
    are checked on the shared folder and a failed load fails on all ranks (DCP gathers them)."""
    for path in candidates(directory):
        why = problem(path)
        written = _marker_ep(path)
        if why is None and written != state.ep:
            raise ConfigError(f"checkpoint {path} was written under expert parallelism ep {written}, and this plan "
                              f"runs ep {state.ep}: its experts are saved per ep rank; resume with a plan of ep {written} "
                              f"(re-plan with --ep {written})")
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
        (tmp / MARKER).write_text(json.dumps({"step": step, "ep": state.ep, "files": _manifest(tmp)}))
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
