"""`paraplan export PLAN --to ENGINE` and the `--from ENGINE FILE_OR_ARGS` of simulate and plan:
plans in the configs of torchtitan, Megatron-LM, DeepSpeed and vLLM, and those configs priced."""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

from costmodel import ConfigError
from costmodel.cluster import Cluster
from costmodel.spec import ModelSpec
from engines import deepspeed, megatron, torchtitan, vllm
from engines.common import Imported
from planner.files import atomic_write_text
from planner.model_source import class_read_type, unheld_features
from planner.plan import Plan

EXPORTERS = {"torchtitan": torchtitan.export, "megatron": megatron.export_text, "deepspeed": deepspeed.export_text,
             "vllm": vllm.export_text}
IMPORTABLE = ("torchtitan", "megatron", "deepspeed")


def run_export(args: argparse.Namespace) -> int:
    plan = Plan.load(args.plan)
    text = EXPORTERS[args.to](plan)
    read_type = class_read_type(plan.source["path"]) if plan.source.get("kind") == "hf" else None
    notes = {"megatron": megatron.export_notes, "torchtitan": torchtitan.export_notes}.get(args.to)
    for note in notes(plan) if notes else []:
        print(f"paraplan: note: {note}", file=sys.stderr)
    if read_type and args.to in ("torchtitan", "megatron"):
        print(f"paraplan: note: {plan.spec.name} ({read_type}) was read off transformers' class: the {args.to} config "
              "gives its sizes, attention, MLP and norm kind, not what the spec does not hold (post-norms, norms "
              "over all heads, partial rotary, scaled residuals); check the engine's own model of it", file=sys.stderr)
    unheld = unheld_features(plan.source["path"]) if plan.source.get("kind") == "hf" else None
    if unheld and args.to in ("torchtitan", "megatron", "deepspeed"):
        print(f"paraplan: note: {plan.spec.name}'s {args.to} config describes its sizes, attention and experts, not "
              f"{unheld}; check the engine's own model of it", file=sys.stderr)
    if args.output:
        atomic_write_text(args.output, text)
        print(f"{args.plan} -> {args.output} ({args.to})")
    else:
        sys.stdout.write(text)
    return 0


def config_text(source: str, engine: str, *, line_allowed: bool, hint: str = "give a text config file") -> str:
    """The text of an engine's config: the file `source` names or, for an engine whose config is
    a command line (Megatron's arguments, a `vllm serve` line), `source` itself."""
    path = Path(source)
    try:
        is_file = "\n" not in source and path.is_file()
    except OSError:  # a line of arguments longer than a file name may be
        is_file = False
    if not line_allowed and not is_file:
        raise ConfigError(f"--from {engine} {source}: no such file; give the {engine} config file")
    try:
        return path.read_text() if is_file else source
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read {source} ({type(exc).__name__}); {hint}") from None


def read_engine_config(engine: str, source: str, cluster: Cluster, seq_len: int | None,
                       spec: ModelSpec | None = None) -> Imported:
    """An engine's config from a file (or, for Megatron, the arguments themselves) on `cluster`."""
    if engine not in IMPORTABLE:
        raise ConfigError(f"--from {engine}: paraplan reads {', '.join(IMPORTABLE)} configs")
    text = config_text(source, engine, line_allowed=engine == "megatron")
    if engine == "torchtitan":
        return torchtitan.import_(text, world_size=cluster.world_size, spec=spec)
    if engine == "deepspeed":
        if seq_len is None:
            raise ConfigError("a DeepSpeed config has no sequence length; give --seq-len")
        return deepspeed.import_(text, world_size=cluster.world_size, seq_len=seq_len)
    try:
        tokens = shlex.split(text.replace("\\\n", " "), comments=True)
    except ValueError as exc:
        raise ConfigError(f"the Megatron-LM arguments do not parse as a shell line ({exc})") from None
    first = next((i for i, t in enumerate(tokens) if t.startswith("--")), len(tokens))  # skip `torchrun ... x.py`
    return megatron.import_(tokens[first:], world_size=cluster.world_size)


def unknown_line(imported: Imported) -> str:
    return not_understood(imported.engine, imported.unknown)


def not_understood(engine: str, unknown: tuple[str, ...]) -> str:
    """The settings of an engine's config that paraplan read but does not price, in one line."""
    if not unknown:
        return f"  from {engine}: every setting understood"
    return f"  from {engine}: {len(unknown)} setting(s) not understood, not priced: " + "; ".join(unknown)
