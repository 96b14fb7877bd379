"""A Hugging Face model whole on one process: from its directory (config, safetensors) and,
optionally, the model of a `paraplan run` checkpoint; and back out as a Hugging Face
directory (`save_pretrained`: config.json + model.safetensors, the tokenizer files copied)
that `AutoModelForCausalLM.from_pretrained` loads.

DCP checkpoints keep the module's own parameter names (`model.layers.0.self_attn.q_proj.weight`),
so a checkpoint written under any layout loads here by name. This path materialises the whole
model in host memory (export and generation run on one process).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

from costmodel.errors import ConfigError
from planner.model_source import hf_config, multimodal_type, with_supported_attention
from planner.plan import Plan

PLAN_FILE = "plan.yaml"  # `paraplan run --checkpoint-dir DIR` keeps the plan it trained here
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "vocab.json", "merges.txt")


def model_dir(path: str | Path) -> Path:
    p = Path(path)
    return p if p.is_dir() else p.parent


def resolve_checkpoint(checkpoint: str | Path) -> Path:
    """A checkpoint folder (DIR/step_N), or the newest complete one under a run's DIR."""
    from runtime.checkpoint import MARKER, latest

    path = Path(checkpoint)
    if (path / MARKER).exists():
        return path
    found = latest(path)
    if found is None:
        raise ConfigError(f"no complete checkpoint in {checkpoint}; give a `paraplan run --checkpoint-dir` folder "
                          "or one of its step_N folders")
    return found


def plan_of_checkpoint(checkpoint: Path) -> Plan:
    """The plan a checkpoint was trained under (kept beside its step folders)."""
    for folder in (checkpoint, checkpoint.parent):
        if (folder / PLAN_FILE).is_file():
            return Plan.load(folder / PLAN_FILE)
    raise ConfigError(f"{checkpoint} holds no {PLAN_FILE} (written by `paraplan run --checkpoint-dir`); "
                      "give the plan with --plan")


def load_hf_model(path: str | Path, *, checkpoint: Path | None = None, seed: int = 0, dtype=torch.float32):
    """The Hugging Face model of a directory on the CPU: its pretrained weights (or its own
    initialisation under `seed`), then the model state of `checkpoint` if given."""
    import transformers

    config = hf_config(str(path))
    folder = model_dir(path)
    kind = multimodal_type(str(path))
    if kind and any(folder.glob("*.safetensors")):
        raise ConfigError(f"{folder} holds a multimodal {kind} checkpoint: generate and export-weights read a "
                          "language model's own checkpoint; `paraplan run` trains its language model")
    if any(folder.glob("*.safetensors")):
        model = with_supported_attention(
            lambda c: transformers.AutoModelForCausalLM.from_pretrained(str(folder), config=c, dtype=dtype), config)
    else:
        torch.manual_seed(seed)
        model = with_supported_attention(lambda c: transformers.AutoModelForCausalLM.from_config(c, dtype=dtype), config)
    if checkpoint is not None:
        load_model_state(model, checkpoint)
    return model.eval()


def load_model_state(model: torch.nn.Module, checkpoint: Path) -> None:
    """The model part of a training checkpoint (`train.model.<name>`) into a whole module. A LoRA
    run's adapters are merged into the weights they adapt (W + B A, LoRA's scale 1: what PEFT's
    merge_and_unload gives), so the module is the fine-tuned model as it is."""
    import torch.distributed.checkpoint as dcp

    from runtime.checkpoint import whole_model_state

    metadata = dcp.FileSystemReader(str(checkpoint)).read_metadata().state_dict_metadata
    adapters = [key[len("train.model."):] for key in metadata
                if key.startswith("train.model.") and key.endswith((".lora_a", ".lora_b"))]
    try:  # an expert-parallel run's experts put back together
        state = whole_model_state([*model.state_dict(), *adapters], checkpoint)
    except Exception as exc:  # noqa: BLE001 - a damaged checkpoint or another model's
        raise ConfigError(f"cannot load the model from {checkpoint}: {str(exc).splitlines()[0][:200]}") from None
    missing = [n for n, _ in model.named_parameters() if n not in state]
    if missing:
        raise ConfigError(f"checkpoint {checkpoint} lacks {missing[0]} (and {len(missing) - 1} more); it was "
                          "written for another model")
    adapters = {name: state.pop(name) for name in adapters}
    model.load_state_dict(state, strict=False)
    with torch.no_grad():
        for name, a in adapters.items():
            if name.endswith(".lora_a"):
                linear = name[: -len(".lora_a")]
                weight = model.get_parameter(f"{linear}.weight")
                weight.add_((adapters[f"{linear}.lora_b"] @ a).to(weight.dtype))


def export_weights(checkpoint: str | Path, output: str | Path, plan: Plan | None = None) -> Path:
    """Write the model of a training checkpoint as a Hugging Face directory."""
    step = resolve_checkpoint(checkpoint)
    plan = plan or plan_of_checkpoint(step)
    if plan.source.get("kind") != "hf":
        raise ConfigError("export-weights writes Hugging Face models (plans made with --model hf:DIR or a "
                          "config.json); this plan trains paraplan's built-in model or a py: module")
    out = Path(output)
    if out.exists() and any(out.iterdir()):
        raise ConfigError(f"{out} exists and is not empty; give a new folder")
    model = load_hf_model(plan.source["path"], checkpoint=step)
    tmp = out.with_name(out.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    model.save_pretrained(str(tmp), safe_serialization=True)
    source = model_dir(plan.source["path"])
    for name in TOKENIZER_FILES:
        if (source / name).is_file():
            shutil.copy2(source / name, tmp / name)
    if out.exists():
        out.rmdir()
    tmp.rename(out)
    return out
