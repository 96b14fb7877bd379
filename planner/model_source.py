"""`--model`: a zoo name, a YAML/JSON spec, a Hugging Face config.json, or py:MODULE:CALLABLE.

Everything becomes a `ModelSpec`. Hugging Face configs are read as plain JSON (transformers
is not needed): Llama-family configs (llama, mistral, qwen2, ...) and GPT-2 style configs.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import os
import sys
from dataclasses import replace
from pathlib import Path

import yaml

from costmodel.errors import ConfigError
from costmodel.spec import ModelSpec
from planner.zoo import ZOO


SYNTHETIC_TOKENS = 2048  # token ids made for a py: language model returned without example inputs
HF_TRAIN_SEQ_LEN = 8192  # a RoPE config's default training sequence (Llama 3's and torchtitan's; --seq-len overrides)


def load_model_spec(text: str) -> ModelSpec:
    return load_model(text)[0]


NGRAM = "ngram"  # --draft-model ngram: drafts looked up in the prompt (vLLM's n-gram proposer), no model
# --draft-model eagle:CHECKPOINT / eagle3:CHECKPOINT: an EAGLE head on the target's hidden states
# (vLLM's eagle and eagle3 methods), the checkpoint's Hub id or directory; EAGLE-3's heads predict a
# draft vocabulary of 32,000 tokens (the published heads' draft_vocab_size)
EAGLE_METHODS = {"eagle": None, "eagle3": 32_000}
# --draft-model mtp: the target's own next-token prediction module (vLLM's mtp method; DeepSeek-V3,
# GLM-4.5): one block of the target's shape (its experts where it has them) on the target's embedding
# and head, run once a drafted token
MTP = "mtp"


def load_draft(text: str, target: ModelSpec | None = None) -> ModelSpec | None:
    """A speculative-decoding draft model by name, None for n-gram proposals (`ngram`), an EAGLE
    head (`eagle:CHECKPOINT`, `eagle3:CHECKPOINT`) priced as one decoder layer of the target's
    shape and a head over its vocabulary (EAGLE-3's draft vocabulary), named as given, or the
    target's own next-token module (`mtp`): one block of its shape, experts included."""
    if text == NGRAM:
        return None
    if text == MTP:
        if target is None:
            raise ConfigError("--draft-model mtp drafts with the target's own next-token module: give --model")
        if not target.mtp_layers:
            raise ConfigError(f"--draft-model mtp: {target.name} carries no next-token prediction module (its "
                              "config's num_nextn_predict_layers, as DeepSeek-V3's and GLM-4.5's); use a draft model, "
                              "ngram or eagle3:HEAD")
        return replace(target, name=MTP, layers=1, dense_layers=0, windowed_layers=0, attention_window=0,
                       tied_embeddings=True, mtp_layers=0)  # one block as the target's sparse ones, its head shared
    method, sep, checkpoint = text.partition(":")
    if sep and method in EAGLE_METHODS:
        if not checkpoint:
            raise ConfigError(f"--draft-model {method}:CHECKPOINT names the EAGLE head's checkpoint (a Hub id or "
                              "directory), e.g. eagle3:yuhuili/EAGLE3-LLaMA3.1-Instruct-8B")
        if target is None:
            raise ConfigError(f"--draft-model {text}: an EAGLE head needs its target model (--model)")
        vocab = EAGLE_METHODS[method] or target.vocab
        return replace(target, name=text, layers=1, vocab=min(vocab, target.vocab), tied_embeddings=True,
                       windowed_layers=0, attention_window=0, ffn_hidden=target.ffn_hidden or 4 * target.hidden,
                       experts=0, experts_per_token=0, expert_ffn_hidden=0, shared_expert_ffn_hidden=0,
                       shared_expert_gate=False, dense_layers=0)  # a dense layer, whatever the target's
    try:
        return load_model_spec(text)
    except ConfigError as exc:
        raise ConfigError(f"{exc}; or --draft-model {NGRAM} for drafts looked up in the prompt, "
                          "eagle:CHECKPOINT / eagle3:CHECKPOINT for an EAGLE head, or mtp for the model's own "
                          "next-token module") from None


def hf_directory(text: str) -> str | None:
    """The directory a bare --model names where it is a folder (a downloaded Hugging Face model, as
    `vllm serve` and from_pretrained take one): read as hf:DIR; None for anything else. A folder
    without a config.json is a ConfigError naming what it lacks."""
    try:
        folder = not (text in ZOO or text.startswith(("hf:", "py:"))) and Path(text).is_dir()
    except (OSError, ValueError):  # a name too long for a path, or one with a NUL byte: not a folder
        folder = False
    if not folder:
        return None
    if not (Path(text) / "config.json").is_file():
        raise ConfigError(f"--model {text}: a folder without a config.json; give a Hugging Face model directory "
                          "(holding config.json), a config or spec file, or a built-in name")
    return text


def load_model(text: str):
    """(spec, traced graph or None): a py: module comes with the graph it was read from, so
    the planner's placements name the module's own parameters. A bare folder is hf:FOLDER."""
    if text in ZOO:
        return ZOO[text], None
    if text.startswith("py:"):
        return _from_python(text)
    if text.startswith("hf:"):
        return _from_hf(text[3:]), None
    folder = hf_directory(text)
    if folder is not None:
        return _from_hf(folder), None
    return _load_file_spec(text), None


# quantization_config methods of 8-bit float weights, which vLLM loads as such (its fp8 linear kernels)
FP8_METHODS = ("fp8", "fbgemm_fp8")


def checkpoint_weights(text: str) -> str | None:
    """The precision a Hugging Face checkpoint keeps its weights in, where its config says it
    is quantized (`quantization_config`, which vLLM reads to load it): "fp8" for 8-bit float
    weights (quant_method fp8 or fbgemm_fp8, or compressed-tensors with 8-bit float weights);
    "mxfp4" for MXFP4 experts (gpt-oss); None for an unquantized checkpoint or a model that is
    not a Hugging Face config; a ConfigError for a quantization paraplan does not price (4-bit
    AWQ, GPTQ and bitsandbytes weights, integer ones), naming it and the way to price 16-bit weights."""
    source = source_of(text) if not text.startswith("py:") else {}
    if source.get("kind") != "hf":
        return None
    path = Path(source["path"])
    config = path / "config.json" if path.is_dir() else path
    try:
        quant = json.loads(config.read_text()).get("quantization_config")
    except (OSError, json.JSONDecodeError, UnicodeDecodeError, AttributeError):
        return None
    if not isinstance(quant, dict):
        return None
    method = str(quant.get("quant_method", "")).lower()
    if method in FP8_METHODS:
        return "fp8"
    if method == "mxfp4":  # gpt-oss: the routed experts in MXFP4, the rest 16-bit (modules_to_not_convert)
        return "mxfp4"
    if method == "compressed-tensors":
        groups = quant.get("config_groups") or {}
        weights = [g.get("weights") or {} for g in groups.values() if isinstance(g, dict)]
        if weights and all(w.get("num_bits") == 8 and w.get("type") == "float" for w in weights):
            return "fp8"
    bits = quant.get("bits") or quant.get("w_bit") or next(
        (w.get("num_bits") for g in (quant.get("config_groups") or {}).values() if isinstance(g, dict)
         for w in [g.get("weights") or {}] if w.get("num_bits")), None)
    kind = f"{bits}-bit {method}" if bits else method or "quantized"
    raise ConfigError(f"{text}: the checkpoint's weights are {kind} (its quantization_config), which paraplan does "
                      "not price (16-bit and fp8 weights); serve a 16-bit or fp8 checkpoint, or give --precision bf16 "
                      "to price it as 16-bit weights")


def source_of(text: str) -> dict:
    """Where the module that `paraplan run` trains comes from, as a plan records it: {} for
    paraplan's own `Transformer` (a zoo name or a spec file), {"kind": "hf", "path": ...} for a
    Hugging Face config or model directory, {"kind": "py", "target": "MODULE:CALLABLE",
    "path": the folder it imports from} for a user's module whose spec was read off its graph."""
    if text in ZOO:
        return {}
    if text.startswith("hf:") or hf_directory(text) is not None:
        path = Path(text.removeprefix("hf:")).resolve()
        return {"kind": "hf", "path": str(path)}
    if text.startswith("py:"):
        target = text[3:]
        module_name = target.partition(":")[0]
        module = sys.modules.get(module_name) or importlib.import_module(module_name)
        fn = getattr(module, target.partition(":")[2])
        with _meta():
            built = fn()
        if isinstance(getattr(built, "spec", None), ModelSpec):
            return {}  # a paraplan Transformer: the built-in runs it
        root = Path(module.__file__).resolve().parents[module_name.count(".")]
        return {"kind": "py", "target": target, "path": str(root)}
    path = Path(text)
    if path.suffix == ".json" and path.is_file():
        try:
            data = json.loads(path.read_text())
        except (json.JSONDecodeError, OSError, UnicodeDecodeError):
            return {}
        if isinstance(data, dict) and is_hf_config(data):
            return {"kind": "hf", "path": str(path.resolve())}
    return {}


def _config_at(path: str) -> dict | None:
    """The fields of the Hugging Face config at `path` (a directory or its config.json); None where
    there is none or it is not a JSON mapping."""
    target = Path(path)
    config = target / "config.json" if target.is_dir() else target
    try:
        data = json.loads(config.read_text())
    except (OSError, ValueError, UnicodeDecodeError):
        return None
    return data if isinstance(data, dict) else None


def text_config_at(path: str) -> dict | None:
    """The fields of the language model's config at `path`: a multimodal config's text_config, a
    decoder's own; None where there is no config."""
    data = _config_at(path)
    return None if data is None else language_config(data) or data


def class_read_type(path: str) -> str | None:
    """The model_type of the Hugging Face config at `path` where it was read off transformers' class
    (spec_from_hf_graph: not one the config reader sizes), else None."""
    text = text_config_at(path)
    if text is None:
        return None
    model_type = str(text.get("model_type", ""))
    model_type = TEXT_ALIASES.get(model_type, model_type)
    return model_type if model_type and model_type not in READ_TYPES + MOE_TYPES + ("gpt2",) else None


# what a config the reader sizes has and the spec does not hold (it prices nothing, and the engine exports
# cannot write it), by model_type
UNHELD = {"granitemoe": "Granite's embedding, residual, attention and logit multipliers",
          "granitemoeshared": "Granite's embedding, residual, attention and logit multipliers",
          "phimoe": "its biases on the attention projections and the head",
          "llama4_text": "its chunked attention, layers without RoPE, weightless q/k norm and router weights applied "
                         "to the experts' input",
          "minimax_m2": "its q/k norms over all heads (not per head) and RoPE on part of each head (rotary_dim)"}


def unheld_features(path: str) -> str | None:
    """What the Hugging Face config at `path` builds that the spec read from it does not hold
    (UNHELD), in words; None where nothing is known to be left out."""
    return UNHELD.get(hf_model_type(path) or "")


def hf_model_type(path: str) -> str | None:
    """The model_type of the Hugging Face config at `path` (a multimodal one's language model's)."""
    text = text_config_at(path) or {}
    return str(text["model_type"]) if text.get("model_type") else None


def multimodal_type(path: str) -> str | None:
    """The model_type of a multimodal Hugging Face config at `path` (a directory or its
    config.json) whose language model paraplan reads (language_config), else None."""
    data = _config_at(path)
    if data is None or not (language_config(data) or isinstance(data.get("vision_config"), dict)):
        return None
    return str(data.get("model_type", "multimodal"))


def _meta():
    import torch

    return torch.device("meta")


def hf_config(path: str):
    """transformers' config object for a model directory or its config.json (eager SDPA
    attention, no generation cache: what training runs)."""
    try:
        import transformers
    except ImportError:
        raise ConfigError('running a Hugging Face model needs transformers: pip install "paraplan[hf]"') from None
    target = Path(path)
    config_file = target / "config.json" if target.is_dir() else target
    if not config_file.is_file():
        raise ConfigError(f"{path}: no config.json there; give a model directory or its config.json")
    data = json.loads(config_file.read_text())
    data = language_config(data) or data  # a multimodal model: its language model (transformers' text-only class)
    try:
        config = transformers.AutoConfig.for_model(**data)
    except Exception as exc:  # noqa: BLE001 - transformers raises many kinds for a config it cannot read
        raise ConfigError(f"transformers cannot read {config_file} ({type(exc).__name__}: "
                          f"{str(exc).splitlines()[0][:200] if str(exc) else ''})") from None
    config._attn_implementation = "sdpa"
    config.use_cache = False
    return config


def with_supported_attention(build, config):
    """`build(config)` with SDPA attention, or eager attention where transformers' class has no
    SDPA path (Gemma-2: its soft-capped attention logits) and refuses the SDPA config."""
    try:
        return build(config)
    except ValueError as exc:
        if "scaled_dot_product_attention" not in str(exc):
            raise
    config._attn_implementation = "eager"
    return build(config)


def build_source_module(source: dict, spec: ModelSpec, device: str = "meta", *, probe_layers: int | None = None):
    """(the source's module on `device` (meta: nothing allocated), example inputs for one pass
    over it). `probe_layers`: a Hugging Face model built only that many blocks deep (every
    block is the same; reading its layout or pricing a block needs no more), its RoPE the plain
    kind where the config's branches on position values (`_static_rope`)."""
    import torch

    tokens = (torch.zeros(1, min(spec.seq_len, 64), dtype=torch.long, device=device),)
    kind = source.get("kind")
    if kind == "hf":
        import transformers  # hf_config has said how to install it where it is missing

        config = hf_config(source["path"])
        depth = getattr(config, "num_hidden_layers", None)  # (a composite config keeps it in its text_config)
        if probe_layers is not None and isinstance(depth, int) and probe_layers < depth:
            for key, value in list(vars(config).items()):  # per-layer lists (Gemma-2's layer_types)
                if isinstance(value, list) and len(value) == config.num_hidden_layers:
                    setattr(config, key, value[:probe_layers])
            config.num_hidden_layers = probe_layers
        if probe_layers is not None:  # a probe reads sizes and ops, not values (the runtime's build keeps it)
            _static_rope(config)
        try:
            with torch.device(device):
                module = with_supported_attention(transformers.AutoModelForCausalLM.from_config, config)
        except Exception as exc:  # noqa: BLE001 - transformers raises many kinds for a model it cannot build
            raise ConfigError(f"transformers cannot build a causal LM from {source['path']} ({type(exc).__name__}: "
                              f"{str(exc).splitlines()[0][:200] if str(exc) else ''})") from None
        return module, tokens
    if kind == "py":
        if source.get("path") and source["path"] not in sys.path:
            sys.path.insert(0, source["path"])
        module_name, _, attr = source["target"].partition(":")
        try:
            fn = getattr(importlib.import_module(module_name), attr)
        except (ImportError, AttributeError) as exc:
            raise ConfigError(f"the plan's model py:{source['target']} cannot be imported from {source.get('path')} "
                              f"({exc}); run where the module is importable") from None
        with torch.device(device):
            built = fn()
        module, inputs = (built[0], built[1]) if isinstance(built, tuple) else (built, tokens)
        return module, inputs if isinstance(inputs, tuple) else (inputs,)
    from planner.zoo.model import build_model

    return build_model(spec), tokens


# RoPE kinds whose forward branches on the positions' values (Phi-3.5's longrope picks its short or long
# factors by the largest position): a meta-device pass cannot decide them
VALUE_DEPENDENT_ROPE = ("longrope", "dynamic")


def _static_rope(config) -> None:
    """A probe's RoPE made the plain kind where the config's branches on position values: the
    rotation's sizes and ops are the same (what a layout read or a price needs), and a
    meta-device pass has no values to branch on. Never the module a run trains."""
    for holder in (config, getattr(config, "text_config", None)):
        params = getattr(holder, "rope_parameters", None)
        if isinstance(params, dict) and params.get("rope_type") in VALUE_DEPENDENT_ROPE:
            kept = {k: v for k, v in params.items() if k in ("rope_theta", "partial_rotary_factor")}
            holder.rope_parameters = {**kept, "rope_type": "default"}


def _dense_experts_note(text: str, source: dict) -> str:
    """What `paraplan run` does beyond the plan's price on a Hugging Face class whose experts run
    densely: transformers' Llama 4 runs every token through every expert (Llama4TextExperts, one
    batched matmul over all of them, the unrouted weighted 0), the price routes each to its top-k."""
    text_data = text_config_at(source["path"]) or {}
    if text_data.get("model_type") != "llama4_text":
        return ""
    experts, k = text_data.get("num_local_experts"), text_data.get("num_experts_per_tok") or 1
    return (f"transformers' Llama 4 runs every token through all {experts} experts (unrouted ones weighted 0), so "
            f"`paraplan run` of {text} does {experts}/{k} times the routed expert work the plan prices; the price is "
            "the model's under an engine that routes (Megatron-LM, torchtitan)")


def source_and_map(text: str, spec: ModelSpec):
    """(source, module map, note) for `--model text`: the user's module where paraplan can build
    it; otherwise ({}, None, why), and `paraplan run` trains paraplan's rebuild of the spec (a
    Hugging Face config without transformers installed, or one transformers cannot build)."""
    source = source_of(text)
    if not source:
        shadowed = text in ZOO and (Path(text) / "config.json").is_file()
        return {}, None, (f"{text} names the built-in model; the folder {text} here is not read: give hf:{text} or "
                          f"./{text} for it") if shadowed else ""
    kind = multimodal_type(source["path"]) if source["kind"] == "hf" else None
    note = (f"{text} is a multimodal model ({kind}): its language model is planned, priced and run (transformers' "
            "text-only class), its vision tower and image tokens are not") if kind else ""
    dense = _dense_experts_note(text, source) if source["kind"] == "hf" else ""
    note = "; ".join(n for n in (note, dense) if n)
    try:
        mmap = module_map_of(source, spec)
        return {**source, "map": mmap.to_dict()}, mmap, note
    except ConfigError as exc:
        if source["kind"] == "py":
            raise
        return {}, None, (f"{text} is planned from its config, and `paraplan run` will train paraplan's own "
                          f"rebuild of it, not the Hugging Face module: {exc}")


def module_map_of(source: dict, spec: ModelSpec):
    """The `ModuleMap` of the module a plan runs: the zoo's read statically (any size); any
    other as the plan recorded it (`source["map"]`, written when it was planned) or read off
    one meta-device pass."""
    from planner.module_map import ModuleMap, traced_map, zoo_map

    if not source:
        return zoo_map(spec)
    if "map" in source:
        return ModuleMap.from_dict(source["map"])
    from dataclasses import replace

    if source.get("kind") == "hf":  # two blocks read, the model's count recorded
        module, inputs = build_source_module(source, spec, probe_layers=min(2, spec.layers))
        return replace(traced_map(module, inputs, spec), layers=spec.layers)
    module, inputs = build_source_module(source, spec)
    return traced_map(module, inputs, spec)


COUNT_TOLERANCE = 0.005  # the reader against transformers' own class (Qwen2's q/k/v biases: 0.01%)


def _from_hf(where: str) -> ModelSpec:
    """hf:DIR (a model directory holding config.json) or hf:FILE (the config.json itself):
    sized by the config reader and, where transformers is installed, checked against the
    parameter count of transformers' own class built from the config on the meta device: a
    config the reader would misprice is refused, naming both counts."""
    path = Path(where)
    config = path / "config.json" if path.is_dir() else path
    if not config.is_file():
        raise ConfigError(f"--model hf:{where}: no config.json there; give a model directory or its config.json")
    spec = _from_file(config) if config.suffix == ".json" else None
    if spec is None:
        raise ConfigError(f"--model hf:{where}: the config must be a .json file")
    name = path.name if path.is_dir() else path.parent.name or path.stem
    spec = replace(spec, name=name or spec.name)
    data = json.loads(config.read_text())
    real = _transformers_count(language_config(data) or data)
    if real is not None and abs(spec.num_params - real) > COUNT_TOLERANCE * real:
        raise ConfigError(f"--model hf:{where}: transformers builds {real:,} parameters from this config and the "
                          f"reader {spec.num_params:,}; it has fields the reader does not size: write a spec YAML")
    return spec


def _transformers_count(data: dict) -> int | None:
    """Parameters of transformers' causal-LM class for the config (meta device), or None
    without transformers (`pip install "paraplan[hf]"`) or for a config it cannot build."""
    try:
        import torch
        import transformers
    except ImportError:
        return None
    layers = data.get("num_hidden_layers", data.get("n_layer"))
    # built d1 and d2 = d1 + step blocks deep: past the first dense layers every `step` blocks
    # repeat (a mixture of experts' dense-then-sparse period), the rest is their difference
    step = data.get("decoder_sparse_step") or data.get("interleave_moe_layer_step") or 1
    first = (data.get("first_k_dense_replace") or 0) + step
    counts = []
    deep = isinstance(layers, int) and isinstance(step, int) and layers > first + step and (layers - first) % step == 0
    try:
        for depth in ((first, first + step) if deep else (None,)):
            config = transformers.AutoConfig.for_model(**data)
            if depth is not None:
                for key, value in list(vars(config).items()):  # per-layer lists (Gemma-2's layer_types)
                    if isinstance(value, list) and len(value) == layers:
                        setattr(config, key, value[:depth])
                config.num_hidden_layers = depth
            with torch.device("meta"):
                model = transformers.AutoModelForCausalLM.from_config(config)
            counts.append(sum(p.numel() for p in model.parameters()))
    except Exception:  # noqa: BLE001 - transformers raises many kinds; the reader's size stands
        return None
    return counts[0] if len(counts) == 1 else counts[0] + (layers - first) // step * (counts[1] - counts[0])


def _load_file_spec(text: str) -> ModelSpec:
    path = Path(text)
    if path.suffix in (".yaml", ".yml", ".json"):
        return _from_file(path)
    from planner.zoo import hub_weights, zoo_name_of_hub_id

    name = zoo_name_of_hub_id(text)
    if name:  # a Hub id: paraplan reads no Hub, but knows this architecture
        stored = hub_weights(text)
        how = f" (its checkpoint's {stored} weights: serve with --precision {stored})" if stored else ""
        raise ConfigError(f"unknown model '{text}': a Hugging Face Hub id of the built-in {name}'s architecture; give "
                          f"--model {name}{how}, or hf:DIR for a downloaded checkpoint")
    raise ConfigError(
        f"unknown model '{text}'; use a built-in name ({', '.join(ZOO)}), a spec .yaml/.json, "
        "a Hugging Face config.json, hf:MODEL_DIR or py:MODULE:CALLABLE"
    )


def _from_file(path: Path) -> ModelSpec:
    if not path.exists():
        raise ConfigError(f"model file {path} does not exist")
    try:
        text = path.read_text()
        data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as exc:
        line = getattr(exc, "lineno", None) or (getattr(getattr(exc, "problem_mark", None), "line", -1) + 1)
        raise ConfigError(f"{path} is not valid {'JSON' if path.suffix == '.json' else 'YAML'} (line {line}); fix its syntax") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read {path}: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a mapping of model fields")
    if is_hf_config(data):  # named for its model directory where the file is the usual config.json
        name = path.parent.name if path.name == "config.json" and path.parent.name else path.stem
        text = language_config(data)
        if text is not None:  # a multimodal model: its language model, read as any config is
            return spec_from_hf_config(text, name=name)
        try:
            return spec_from_hf_config(data, name=name)
        except UnreadType as exc:
            return spec_from_hf_graph(path, data, name=name, why=str(exc))
    return ModelSpec.from_dict(data, name=path.stem)


GRAPH_PROBE_LAYERS = 2  # blocks of transformers' class traced to read a model_type the config reader does not size


def spec_from_hf_graph(path: Path, data: dict, *, name: str, why: str) -> ModelSpec:
    """A `ModelSpec` of a Hugging Face config whose model_type the config reader does not size
    (OLMo-2, Granite, GPT-NeoX, StarCoder2, Gemma, Phi, Cohere, ...): transformers' own class is
    built from it on the meta device GRAPH_PROBE_LAYERS blocks deep, traced (torch.export) and read
    as any module is (planner.graph_spec: widths, heads, K/V heads, gating, norm, positions, tied
    head); the config gives the depth, the positions and RoPE's base. The whole model's size is
    checked against transformers' count of the full config: a class the graph reader misreads is
    refused. `why`: the reader's refusal, said where transformers cannot build or trace it."""
    from planner.graph_spec import NotADecoder, spec_from_graph
    from planner.trace import trace_module

    if importlib.util.find_spec("transformers") is None:
        raise ConfigError(f'{why}; or pip install "paraplan[hf]" to read it off transformers\' class')
    model_type = str(data.get("model_type", ""))
    read = f"model_type {model_type!r} (not one the config reader sizes), read off transformers' class"
    layers = _int(data, "num_hidden_layers", "n_layer", "num_layers")
    probe = {"kind": "hf", "path": str(path)}
    stand_in = ModelSpec(name=name, layers=1, hidden=64, heads=1, vocab=2, seq_len=SYNTHETIC_TOKENS)  # token count only
    try:
        module, inputs = build_source_module(probe, stand_in, probe_layers=min(GRAPH_PROBE_LAYERS, layers))
        spec = spec_from_graph(trace_module(module, inputs), name=name)
    except NotADecoder:
        raise ConfigError(f"{read}: its blocks run no scaled_dot_product_attention (attention written out as "
                          "matmuls, as Bloom's ALiBi is); write a spec YAML with its sizes") from None
    except ConfigError as exc:
        way_out = "" if "spec YAML" in str(exc) else (
            "; check that transformers builds and runs this config (AutoModelForCausalLM.from_config), or write a "
            "spec YAML with its sizes")
        raise ConfigError(f"{read}: {str(exc).rstrip('.')}{way_out}") from None
    positions = _int(data, "max_position_embeddings", "n_positions", "seq_length", default=2048)
    seq_len = min(positions, HF_TRAIN_SEQ_LEN) if spec.position.value == "rope" else positions
    spec = replace(spec, layers=layers, seq_len=seq_len, max_positions=positions if positions > seq_len else 0,
                   rope_theta=_rope_theta(data), **_window_of({**data, "num_hidden_layers": layers}, model_type))
    real = _transformers_count(data)
    if real is not None and abs(spec.num_params - real) > COUNT_TOLERANCE * real:
        raise ConfigError(f"{read}, has {spec.num_params:,} parameters where transformers builds {real:,}: its "
                          "layers hold more than a GPT/Llama block; write a spec YAML with its sizes")
    return spec


def language_config(data: dict) -> dict | None:
    """The language model's config inside a multimodal model's (`text_config`: Gemma 3, Mistral 3,
    LLaVA; the wrapper's tie_word_embeddings where the text config lacks its own), None for a
    decoder's own config. Its vision tower is neither planned nor priced (source_and_map says so)."""
    text = data.get("text_config")
    if not isinstance(text, dict) or any(k in data for k in ("num_hidden_layers", "n_layer")):
        return None
    out = dict(text)
    if "tie_word_embeddings" not in out and "tie_word_embeddings" in data:
        out["tie_word_embeddings"] = data["tie_word_embeddings"]
    return out


def is_hf_config(data: dict) -> bool:
    return any(k in data for k in ("model_type", "num_hidden_layers", "n_layer", "architectures"))


def _int(data: dict, *keys: str, default=None) -> int:
    for key in keys:
        if key in data and data[key] is not None:
            value = data[key]
            if not isinstance(value, int) or isinstance(value, bool):
                raise ConfigError(f"config field '{key}' must be an integer, got {value!r}")
            return value
    if default is not None:
        return default
    raise ConfigError(f"Hugging Face config lacks '{keys[0]}'; it is needed to size the model")


class UnreadType(ConfigError):
    """A config of a model_type the config reader does not size: read off transformers' own class
    instead (spec_from_hf_graph), where transformers can build it."""


READ_TYPES = ("gpt2", "llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3_text", "phi3")  # the dense decoders this reader sizes exactly
MOE_TYPES = ("mixtral", "qwen2_moe", "qwen3_moe", "deepseek_v2", "deepseek_v3", "glm4_moe", "gpt_oss", "olmoe",
             "phimoe", "granitemoe", "granitemoeshared", "llama4_text", "minimax_m2")  # and the mixtures of experts
GELU_ACTS = ("gelu", "gelu_new", "gelu_pytorch_tanh", "gelu_fast", "gelu_python")
EXPERT_FIELDS = ("num_local_experts", "n_routed_experts", "num_experts", "moe_num_experts")
ATTENTION_LAYER_TYPES = {"full_attention", "sliding_attention", "chunked_attention"}  # a config's layer_types read


def _understood(data: dict) -> None:
    """Refuse, naming the field, a config this reader would silently size as something else."""
    model_type = str(data.get("model_type", ""))
    types = data.get("layer_types") if isinstance(data.get("layer_types"), list) else []
    other = sorted({str(t) for t in types} - ATTENTION_LAYER_TYPES)
    if other or "mamba" in model_type or any(str(k).startswith("mamba_") for k in data):
        kinds = ", ".join(other) if other else "state-space (Mamba) layers"
        raise ConfigError(f"model_type {model_type or 'not given'}: its layers include {kinds}, which paraplan's cost "
                          "model does not price (it prices softmax-attention decoders); to plan it anyway write a spec "
                          "YAML of its sizes, whose layers are priced as attention layers (an over-estimate)")
    nested = data.get("ffn_config") if isinstance(data.get("ffn_config"), dict) else {}  # (DBRX keeps them there)
    for key in EXPERT_FIELDS:
        experts = data.get(key, nested.get(key))
        if model_type in MOE_TYPES:
            break
        if isinstance(experts, int) and not isinstance(experts, bool) and experts > 1:
            raise ConfigError(f"the config is a mixture-of-experts model ({key} = {experts}, model_type "
                              f"{model_type or 'not given'}) of a kind this reader does not size (it reads the "
                              f"experts of {', '.join(MOE_TYPES)}); read as dense it would count one expert of "
                              f"{experts}: write a spec YAML with experts, experts_per_token and expert_ffn_hidden")
    if model_type in ("qwen2_moe", "qwen3_moe") and data.get("mlp_only_layers"):
        raise ConfigError(f"mlp_only_layers {data['mlp_only_layers']}: dense layers at chosen places are not modelled "
                          "(paraplan's spec has dense_layers first and moe_every); write a spec YAML")
    if model_type == "llama4_text" and isinstance(data.get("moe_layers"), list):
        step = data.get("interleave_moe_layer_step") or 1
        layers = data.get("num_hidden_layers")
        if isinstance(layers, int) and isinstance(step, int) and step > 0 \
                and list(data["moe_layers"]) != list(range(step - 1, layers, step)):
            raise ConfigError(f"moe_layers {data['moe_layers']}: experts at layers other than every "
                              f"interleave_moe_layer_step ({step}) are not modelled; write a spec YAML with moe_every")
    if model_type in MOE_TYPES and data.get("moe_layer_freq", 1) != 1:
        raise ConfigError(f"moe_layer_freq {data['moe_layer_freq']} is not read; write a spec YAML with moe_every")
    if model_type and model_type not in READ_TYPES + MOE_TYPES:
        raise UnreadType(f"model_type {model_type!r} is not one this reader sizes (it reads "
                          f"{', '.join(READ_TYPES + MOE_TYPES)}); read as one of those it would be mispriced: write a spec "
                          "YAML with its sizes")
    act = data.get("hidden_activation") or data.get("hidden_act") or "silu"
    if model_type not in ("gpt2", "") and act not in ("silu", "swish", *GELU_ACTS):
        raise ConfigError(f"hidden_act {act!r} is not a gated activation paraplan prices (silu, gelu); write a spec "
                          "YAML with its sizes")


# the language models of vision-language configs, by the decoder they are (Qwen2-VL's and Qwen2.5-VL's
# a Qwen2 with multimodal RoPE sections, which rotate the same dimensions; Qwen3-VL's a Qwen3)
TEXT_ALIASES = {"qwen2_vl": "qwen2", "qwen2_vl_text": "qwen2", "qwen2_5_vl": "qwen2", "qwen2_5_vl_text": "qwen2",
                "qwen3_vl": "qwen3", "qwen3_vl_text": "qwen3"}


def spec_from_hf_config(data: dict, *, name: str = "hf-model") -> ModelSpec:
    """A `ModelSpec` from the fields of a Hugging Face config.json (dense GPT-2 and Llama-family
    decoders; anything else is refused by name rather than sized as one of them)."""
    if str(data.get("model_type", "")) in TEXT_ALIASES:
        data = {**data, "model_type": TEXT_ALIASES[str(data["model_type"])]}
    _understood(data)
    model_type = str(data.get("model_type", ""))
    if model_type == "gpt2" or "n_layer" in data:
        return ModelSpec(
            name=name,
            layers=_int(data, "n_layer", "num_hidden_layers"),
            hidden=_int(data, "n_embd", "hidden_size"),
            heads=_int(data, "n_head", "num_attention_heads"),
            vocab=_int(data, "vocab_size"),
            seq_len=_int(data, "n_positions", "max_position_embeddings", default=1024),
            ffn_hidden=_int(data, "n_inner", default=0),
        )
    heads = _int(data, "num_attention_heads")
    hidden = _int(data, "hidden_size")
    act = str(data.get("hidden_activation") or data.get("hidden_act") or "silu")
    # the Llama family and Gemma gate their MLP (gate, up, down); GELU gates Gemma's
    gated = act in ("silu", "swish") or model_type in ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2",
                                                       "gemma3_text")
    activation = ("geglu" if act in GELU_ACTS else "swiglu") if gated else "gelu"
    head_dim = data.get("head_dim")
    positions = _int(data, "max_position_embeddings", default=2048)
    seq_len = min(positions, HF_TRAIN_SEQ_LEN)
    window = data.get("sliding_window")
    if model_type == "gemma2" and isinstance(window, int) and 0 < window < seq_len:
        # every other layer attends within the window: Gemma-2 trains at the window's length
        seq_len = window
    return ModelSpec(
        name=name,
        layers=_int(data, "num_hidden_layers"),
        hidden=hidden,
        heads=heads,
        kv_heads=_int(data, "num_key_value_heads", default=heads) if "kv_lora_rank" not in data else heads,
        # Llama 4's dense layers' MLP is intermediate_size_mlp (its intermediate_size the experts')
        ffn_hidden=_int(data, "intermediate_size_mlp" if model_type == "llama4_text" else "intermediate_size", default=0),
        **_experts_of(data, model_type),
        **_window_of(data, model_type),
        vocab=_int(data, "vocab_size"),
        # RoPE models read up to max_position_embeddings (131072 for Qwen2.5) but pre-train shorter:
        # training runs at seq_len, serving fills up to max_positions
        seq_len=seq_len,
        max_positions=positions if positions > seq_len else 0,
        activation=activation,
        # (Phi-3.5-MoE's norms are LayerNorms with biases, its config's epsilon named rms_norm_eps)
        norm="rmsnorm" if ("rms_norm_eps" in data or gated) and model_type != "phimoe" else "layernorm",
        position="rope" if "rope_theta" in data or gated else "learned",
        tied_embeddings=bool(data.get("tie_word_embeddings", not gated or model_type.startswith("gemma"))),
        # GLM-4.5's attention_bias is q, k and v's only (as Qwen2's): not counted, as Qwen2's (0.001%)
        bias=model_type not in ("glm4_moe", "phimoe") and bool(data.get("attention_bias", data.get("mlp_bias", False))),
        dropout=False,
        rope_theta=_rope_theta(data),
        **_rope_scaling_of(data),
        **_router_of(data, model_type),
        # Qwen3's and Gemma 3's per-head q_norm / k_norm (GLM-4.5's where use_qk_norm says so; Llama 4's is an
        # L2 norm without weights, which neither the spec nor the exports hold)
        qk_norm=model_type in ("qwen3", "qwen3_moe", "gemma3_text") or (
            model_type not in ("llama4_text", "minimax_m2") and bool(data.get("use_qk_norm", False))),
        # latent attention's query head: its no-RoPE and RoPE parts (transformers 5 writes head_dim as the
        # RoPE part alone)
        head_dim=(_int(data, "qk_nope_head_dim") + _int(data, "qk_rope_head_dim") if "kv_lora_rank" in data
                  else _int(data, "head_dim") if isinstance(head_dim, int) and head_dim * heads != hidden else 0),
    )


def _rope_theta(data: dict) -> float:
    """RoPE's base: rope_theta, where transformers 5 writes it too (rope_parameters); 0 where neither."""
    params = data.get("rope_parameters")
    theta = _number(data.get("rope_theta", params.get("rope_theta") if isinstance(params, dict) else None))
    return theta if theta > 0 else 0.0


def _number(value, default: float = 0.0) -> float:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else default


def _rope_scaling_of(data: dict) -> dict:
    """RoPE's scaling where it is Llama 3's or YaRN (rope_scaling, or transformers 5's rope_parameters:
    rope_type or type, factor, original_max_position_embeddings, YaRN's mscale and mscale_all_dim).
    Another kind (linear, dynamic, longrope) is not held: it changes no size and no cost."""
    scaling = data.get("rope_scaling") or data.get("rope_parameters")
    if not isinstance(scaling, dict):
        return {}
    kind = scaling.get("rope_type", scaling.get("type"))
    factor = _number(scaling.get("factor"))
    original = scaling.get("original_max_position_embeddings")
    if kind not in ("llama3", "yarn") or factor < 1 or not isinstance(original, int) or original <= 0:
        return {}
    out = {"rope_scaling": kind, "rope_factor": factor, "rope_original_positions": original}
    if kind == "yarn":
        out.update(rope_mscale=max(0.0, _number(scaling.get("mscale"))),
                   rope_mscale_all_dim=max(0.0, _number(scaling.get("mscale_all_dim"))))
    return out


def _router_of(data: dict, model_type: str) -> dict:
    """A mixture of experts' router as transformers' class of `model_type` runs it: Mixtral and
    gpt-oss renormalise the top-k softmax; Qwen2/3-MoE and OLMoE as norm_topk_prob says;
    DeepSeek-V2/V3 score by scoring_func, pick within topk_group of n_group groups
    (group_limited_greedy, noaux_tc), scale by routed_scaling_factor, and noaux_tc steers by a
    per-expert bias; GLM-4.5 is DeepSeek-V3's router (sigmoid, bias); Phi-3.5-MoE's is SparseMixer
    (its top-2 weights each a softmax of the logits masked near the chosen one); Llama 4's the sigmoid
    of each top-k logit, not renormalised; MiniMax-M2's sigmoid scores picked with a balancing bias,
    renormalised."""
    if model_type in ("mixtral", "gpt_oss", "granitemoe", "granitemoeshared"):  # (Granite: softmax of the top-k logits)
        return {}
    if model_type == "phimoe":
        return {"router_score": "sparsemixer"}
    if model_type == "llama4_text":  # each top-k logit's sigmoid, scaling the expert's input
        return {"router_score": "sigmoid", "router_renormalize": False}
    if model_type == "minimax_m2":  # sigmoid scores, chosen with a balancing bias, the top-k renormalised
        return {"router_score": "sigmoid", "router_expert_bias": True}
    if model_type in ("qwen2_moe", "qwen3_moe", "olmoe"):
        return {"router_renormalize": bool(data.get("norm_topk_prob", False))}
    if model_type not in ("deepseek_v2", "deepseek_v3", "glm4_moe"):
        return {}
    method = str(data.get("topk_method", "noaux_tc" if model_type != "deepseek_v2" else "greedy"))
    groups = _int(data, "n_group", default=1) if method in ("group_limited_greedy", "noaux_tc") else 1
    return {"router_score": "sigmoid" if model_type == "glm4_moe" else str(data.get("scoring_func", "softmax")),
            "router_renormalize": bool(data.get("norm_topk_prob", False)),
            "router_groups": groups if groups > 1 else 0,
            "router_group_topk": _int(data, "topk_group", default=1) if groups > 1 else 0,
            "router_topk_scale": _number(data.get("routed_scaling_factor"), 1.0),
            "router_expert_bias": method == "noaux_tc"}


def _window_of(data: dict, model_type: str) -> dict:
    """Sliding-window attention as transformers' classes apply it: Mistral, Mixtral and Phi-3 in
    every layer; Qwen2/3 (and their MoE) only with use_sliding_window, from layer max_window_layers up;
    Gemma-2 in every other layer, Gemma-3 in five of every six; `layer_types` where the config
    lists them."""
    layers = _int(data, "num_hidden_layers")
    if model_type == "llama4_text":
        return _chunks_of(data, layers)
    window = data.get("sliding_window")
    if not isinstance(window, int) or isinstance(window, bool) or window <= 0:
        return {}
    listed = _listed_layers(data, layers, "sliding_attention")
    if listed is not None:
        windowed = listed
    elif model_type in ("mistral", "mixtral", "phi3"):
        windowed = layers
    elif model_type in ("qwen2", "qwen3", "qwen2_moe", "qwen3_moe"):
        if not data.get("use_sliding_window", False):
            return {}
        windowed = layers - min(layers, int(data.get("max_window_layers", layers) or 0))
    elif model_type == "gemma2":
        windowed = (layers + 1) // 2  # layers 0, 2, 4, ...
    elif model_type == "gemma3_text":  # every `sliding_window_pattern`-th layer global (5 local : 1 global)
        pattern = data.get("sliding_window_pattern") or 6
        windowed = layers - layers // pattern if isinstance(pattern, int) and pattern > 0 else 0
    else:
        return {}
    return {"attention_window": window, "windowed_layers": windowed} if windowed else {}


def _listed_layers(data: dict, layers: int, kind: str) -> int | None:
    """How many of the `layers` the config's layer_types lists as `kind`; None where it lists none."""
    types = data.get("layer_types")
    return sum(t == kind for t in types) if isinstance(types, list) and len(types) == layers else None


def _chunks_of(data: dict, layers: int) -> dict:
    """Llama 4's chunked attention: a query of a chunked layer sees the keys of its own
    attention_chunk_size chunk from its start (three layers in four, the RoPE ones; every fourth
    global, no RoPE), and a server keeps a chunk's KV of those layers."""
    chunk = data.get("attention_chunk_size")
    if not isinstance(chunk, int) or isinstance(chunk, bool) or chunk <= 0:
        return {}
    chunked = _listed_layers(data, layers, "chunked_attention")
    if chunked is None:  # transformers' default: every no_rope_layer_interval-th layer global
        interval = data.get("no_rope_layer_interval") or 4
        chunked = layers - layers // interval if isinstance(interval, int) and interval > 0 else layers
    return {"attention_window": chunk, "windowed_layers": chunked, "attention_chunked": True} if chunked else {}


def _experts_of(data: dict, model_type: str) -> dict:
    """The mixture-of-experts and latent-attention fields of a config (transformers' names)."""
    out: dict = {}
    if model_type in ("mixtral", "gpt_oss", "olmoe", "phimoe", "granitemoe", "granitemoeshared", "minimax_m2"):
        # every layer's MLP routed (gpt-oss: biased experts and router); Granite's shared MLP beside them
        out = dict(experts=_int(data, "num_local_experts", "num_experts"),
                   experts_per_token=_int(data, "num_experts_per_tok"), expert_ffn_hidden=_int(data, "intermediate_size"))
        if model_type == "granitemoeshared":
            out["shared_expert_ffn_hidden"] = _int(data, "shared_intermediate_size", default=0)
    elif model_type == "llama4_text":  # every interleave_moe_layer_step-th layer routed, a shared expert beside
        out = dict(experts=_int(data, "num_local_experts"), experts_per_token=_int(data, "num_experts_per_tok"),
                   expert_ffn_hidden=_int(data, "intermediate_size"),
                   shared_expert_ffn_hidden=_int(data, "intermediate_size"),
                   moe_every=_int(data, "interleave_moe_layer_step", default=1))
    elif model_type in ("qwen2_moe", "qwen3_moe"):
        # (transformers 5 writes Qwen3-MoE's num_experts as num_local_experts)
        out = dict(experts=_int(data, "num_experts", "num_local_experts"),
                   experts_per_token=_int(data, "num_experts_per_tok"),
                   expert_ffn_hidden=_int(data, "moe_intermediate_size"),
                   moe_every=_int(data, "decoder_sparse_step", default=1))
        if model_type == "qwen2_moe":  # one shared expert behind a sigmoid gate
            out.update(shared_expert_ffn_hidden=_int(data, "shared_expert_intermediate_size", default=0),
                       shared_expert_gate=True)
    elif model_type in ("deepseek_v2", "deepseek_v3"):
        shared = _int(data, "n_shared_experts", default=0)
        out = dict(experts=_int(data, "n_routed_experts"), experts_per_token=_int(data, "num_experts_per_tok"),
                   expert_ffn_hidden=_int(data, "moe_intermediate_size"),
                   shared_expert_ffn_hidden=shared * _int(data, "moe_intermediate_size"),
                   dense_layers=_int(data, "first_k_dense_replace", default=0))
        out.update(kv_lora_rank=_int(data, "kv_lora_rank"), q_lora_rank=_int(data, "q_lora_rank", default=0),
                   qk_rope_head_dim=_int(data, "qk_rope_head_dim"), v_head_dim=_int(data, "v_head_dim"),
                   mtp_layers=_int(data, "num_nextn_predict_layers", default=0))
    elif model_type == "glm4_moe":  # GLM-4.5 / 4.6: DeepSeek-V3's experts (shared, first layers dense), grouped-query
        shared = _int(data, "n_shared_experts", default=0)  # attention; its next-token module is not the model's
        out = dict(experts=_int(data, "n_routed_experts"), experts_per_token=_int(data, "num_experts_per_tok"),
                   expert_ffn_hidden=_int(data, "moe_intermediate_size"),
                   shared_expert_ffn_hidden=shared * _int(data, "moe_intermediate_size"),
                   dense_layers=_int(data, "first_k_dense_replace", default=0),
                   mtp_layers=_int(data, "num_nextn_predict_layers", default=0))
    return out


def _from_python(text: str):
    """py:MODULE:CALLABLE, called on the meta device, returning a paraplan `Transformer` or
    (module, example_inputs) for any module, which is traced and read (planner.graph_spec)."""
    model, inputs = python_module(text)
    spec = getattr(model, "spec", None)
    if isinstance(spec, ModelSpec):
        return spec, None
    from planner.graph_spec import spec_from_graph
    from planner.trace import trace_module

    graph = trace_module(model, inputs)
    return spec_from_graph(graph, name=text.rpartition(":")[2]), graph


def python_module(text: str):
    """(module on the meta device, example inputs) of py:MODULE:CALLABLE. A module returned
    without inputs whose first op is a token embedding gets token ids: one sequence of
    SYNTHETIC_TOKENS."""
    _, _, rest = text.partition(":")
    module_name, sep, attr = rest.partition(":")
    if not sep or not module_name or not attr:
        raise ConfigError(f"--model '{text}' must look like py:MODULE:CALLABLE")
    if os.getcwd() not in sys.path:  # like `python -m`: modules in the working directory import
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigError(f"cannot import {module_name} for --model {text}: {exc}") from None
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise ConfigError(f"{module_name} has no callable '{attr}' for --model {text}")
    import torch

    with torch.device("meta"):
        built = fn()
    model, inputs = (built[0], built[1]) if isinstance(built, tuple) else (built, None)
    if not isinstance(model, torch.nn.Module):
        raise ConfigError(f"--model {text} returned a {type(model).__name__}, not an nn.Module")
    if isinstance(getattr(model, "spec", None), ModelSpec):
        return model, None
    if inputs is None:
        first = next((m for m in model.modules() if not list(m.children())), None)
        if not isinstance(first, torch.nn.Embedding):
            raise ConfigError(f"--model {text}: return (module, example_inputs) so the module can be traced (its "
                              "first layer is not a token embedding, so paraplan cannot make token ids for it)")
        inputs = torch.zeros(1, SYNTHETIC_TOKENS, dtype=torch.long, device="meta")
    return model, inputs if isinstance(inputs, tuple) else (inputs,)
