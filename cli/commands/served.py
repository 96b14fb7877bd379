"""The model a serving command serves: its spec, its context cut to --max-model-len."""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from pathlib import Path

from costmodel import ConfigError
from costmodel.serving import check_serving_precision
from costmodel.spec import ModelSpec
from planner.model_source import checkpoint_weights, load_model_spec
from planner.zoo import HUB_IDS, hub_weights


def with_max_model_len(spec: ModelSpec, max_model_len: int | None) -> ModelSpec:
    """`spec` serving sequences of at most `max_model_len` tokens, prompt and output (vLLM's
    --max-model-len; None: the model's own positions)."""
    if max_model_len is None:
        return spec
    if isinstance(max_model_len, bool) or not isinstance(max_model_len, int) or max_model_len < 2:
        raise ConfigError(f"--max-model-len must be an integer of at least 2 tokens, got {max_model_len!r}")
    if max_model_len > spec.context_len:
        raise ConfigError(f"--max-model-len {max_model_len} exceeds {spec.name}'s {spec.context_len} positions; "
                          f"give at most {spec.context_len}")
    return replace(spec, max_positions=max_model_len)


def load_served_spec(args: argparse.Namespace, model: str | None = None) -> ModelSpec:
    """The spec of `model` (default --model) with --max-model-len applied."""
    return with_max_model_len(load_model_spec(model or args.model), getattr(args, "max_model_len", None))


def served_precision(args: argparse.Namespace, model: str | None = None, spec: ModelSpec | None = None) -> str:
    """--precision, else what the checkpoint's quantization_config says its weights are (vLLM
    loads an fp8 checkpoint in fp8 without being told; a note says so): a Hugging Face
    directory's, or the Hub checkpoint's of a built-in model (DeepSeek-V3's fp8, gpt-oss's MXFP4
    experts); else bf16."""
    if getattr(args, "precision", None):
        return weight_format_note(args.precision, spec)
    name = model or args.model
    found = checkpoint_weights(name) if name else None
    where = "its quantization_config"
    if not found and name in HUB_IDS:
        found, where = hub_weights(HUB_IDS[name]), f"its checkpoint {HUB_IDS[name]}"
    if found:
        print(f"paraplan: note: {name} keeps its weights in {found} ({where}), as vLLM loads it: priced as "
              f"--precision {found} (give --precision bf16 for a 16-bit copy)", file=sys.stderr)
        return weight_format_note(found, spec)
    return "bf16"


def weight_format_note(precision: str, spec: ModelSpec | None = None) -> str:
    """`precision` (checked against `spec` where given), with a note on what its prediction is
    worth where it is a weight format (MXFP4 experts: priced at the bf16 GEMM rates, which vLLM's
    MXFP4 MoE kernels did not reach)."""
    if spec is not None:
        check_serving_precision(precision, spec)
    if precision == "mxfp4":
        print("paraplan: note: MXFP4 experts are priced as bf16 GEMMs reading 4.25-bit weights; vLLM 0.11 served "
              "gpt-oss-20b on an H100 29-77% slower than that (bench/serving_fidelity.py): read the prediction as "
              "optimistic", file=sys.stderr)
    return precision


def served_model_path(model: str) -> dict:
    """{"model_path": the Hugging Face model directory} that `vllm serve` loads, where --model
    named one (hf:DIR, hf:DIR/config.json, DIR/config.json, a bare DIR holding config.json); {} for a built-in name or a spec
    file (the export then names the model by its spec's name)."""
    text = model[3:] if model.startswith("hf:") else model
    path = Path(text)
    if path.is_file() and path.name == "config.json":
        path = path.parent
    elif not (path.is_dir() and (model.startswith("hf:") or (path / "config.json").is_file())):
        return {}
    return {"model_path": str(path.resolve())}
