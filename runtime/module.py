"""The user's own module, run from a plan: a Hugging Face model (`hf:`) or any `py:` module.

Every rank builds the module the plan was made from on the meta device, cuts it to its
pipeline stages, parallelizes it from the plan (tensor and sequence parallelism from the
per-parameter placements and the module map, recomputation and FSDP2 per repeated block),
then allocates its shards and fills them: pretrained safetensors where the model directory
has them (each rank reads only its slices, through DCP's Hugging Face reader), otherwise the
model's own initialisation, the same values on any layout (Hugging Face: `_init_weights`
per submodule, seeded by its name; `py:`: the module built once on the CPU under the seed).

Tensor parallelism, per column group of the map (Megatron's f and g): the column linears
(q, k, v; gate, up) go column-parallel and read one DTensor (the norm's output, replicated;
gathered from sequence shards under sequence parallelism), so their input gradients add up
before one reduction; the row linear (o; down) goes row-parallel, reduced (or reduce-
scattered to sequence shards). The embedding and head go vocab-parallel where the plan
splits them; attention modules that keep head counts as attributes get their local counts.
"""

from __future__ import annotations

import copy
import inspect
import types
import zlib
from pathlib import Path

import torch
from torch import nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
from torch.distributed.tensor import DTensor, Replicate, Shard
from torch.distributed.tensor.parallel import (
    ColwiseParallel, RowwiseParallel, SequenceParallel, parallelize_module,
)

from costmodel.errors import ConfigError
from planner.contract import tp_placement
from planner.model_source import build_source_module, hf_model_type
from planner.module_map import ModuleMap, spans_width
from planner.plan import Plan
from planner.zoo.model import copy_full, this_ranks_experts
from runtime.activation_checkpoint import selective_context
from runtime.context_parallel import apply_hf_context_parallel, context_shard
from runtime.data_parallel import apply_data_parallel_blocks
from runtime.lora import (ADAPTER_NAMES, LoRAColwiseParallel, LoRALinear, LoRARowwiseParallel, freeze_base,
                          init_adapters, wrap_targets)
from runtime.mesh import data_parallel_mesh
from runtime.tensor_parallel import LocalShard
from runtime.expert_parallel import apply_hf_expert_parallel, expert_mesh, expert_slice, shard_experts

WRAPPED = "_checkpoint_wrapped_module."


def clean(name: str) -> str:
    """A parameter's name as the module has it (without the recompute wrapper's prefix)."""
    return name.replace(WRAPPED, "")


def logits_of(output) -> torch.Tensor:
    """Logits from what a causal LM returns: a tensor, a ModelOutput (.logits) or a tuple."""
    if isinstance(output, torch.Tensor):
        return output
    if hasattr(output, "logits"):
        return output.logits
    return output[0]


# -- building ---------------------------------------------------------------------------------
def build_meta(plan: Plan) -> nn.Module:
    with torch.device("meta"):
        module, _ = build_source_module(plan.source, plan.spec)
    return module


def cut_stage(model: nn.Module, mmap: ModuleMap, first: int, end: int, *, has_embedding: bool, has_head: bool,
              seq_len: int, kind: str) -> nn.Module:
    """The module cut to layers [first, end): the blocks kept in a ModuleDict under their global
    index (so every name stays the module's own), the embedding on the first stage only, the
    final norm and head on the last; its forward drives the stage (tokens or hidden states in,
    hidden states or logits out) as the model's own forward does: a Hugging Face decoder's
    (rotary tables for the whole sequence, blocks called as its model calls them), or a `py:`
    module's read as embedding (+ positions) -> blocks -> norm -> head (`stage_driver_problem`
    checks that reading against the module's own forward before training)."""
    inner = model.get_submodule(mmap.blocks.rpartition(".")[0]) if "." in mmap.blocks else model
    blocks_attr = mmap.blocks.rpartition(".")[2]
    blocks = getattr(inner, blocks_attr)
    setattr(inner, blocks_attr, nn.ModuleDict({str(i): blocks[i] for i in range(first, end)}))
    if not has_embedding:
        _set(model, mmap.embedding, None)
        if mmap.positions:
            _set(model, mmap.positions, None)
    if not has_head:
        _set(model, mmap.head, None)
        if mmap.final_norm:
            _set(model, mmap.final_norm, None)

    if kind == "hf":  # each layer's attention kind, and whether the rotation is one per kind (Gemma 3's): read once
        kinds = layer_kinds(model.config, mmap.layers)
        rotary = getattr(inner, "rotary_emb", None)
        per_kind = rotary is not None and "layer_type" in inspect.signature(rotary.forward).parameters

    def hf_forward(self, x: torch.Tensor) -> torch.Tensor:
        embedding = part_at(self, mmap.embedding)
        context = getattr(self, "paraplan_context", None)  # context parallelism: this rank's chunks' positions
        positions = (torch.arange(seq_len, device=x.device) if context is None
                     else context.positions(x.shape[1], x.device)).unsqueeze(0)  # (1, T)
        if embedding is not None:
            h = embedding(x)  # (B, T, C) or its sequence shard
            learned = part_at(self, mmap.positions) if mmap.positions else None  # (StarCoder's wpe)
            h = _embedded(inner, h if learned is None else h + learned(positions))
        else:
            h = x
        if rotary is None:
            tables = dict.fromkeys(kinds)
        elif per_kind:
            tables = {layer: rotary(h, positions, layer) for layer in set(kinds)}
        else:
            tables = dict.fromkeys(kinds, rotary(h, positions))
        # cp: its attention masks itself (runtime.context_parallel)
        masks = dict.fromkeys(kinds) if context is not None else attention_masks(self.config, kinds, seq_len, h, positions)
        for key, block in getattr(inner, blocks_attr).items():
            layer = kinds[int(key)]
            out = block(h, attention_mask=masks[layer], position_ids=positions, position_embeddings=tables[layer])
            h = out[0] if isinstance(out, tuple) else out
        head = part_at(self, mmap.head)
        if head is None:
            return h
        # (a final norm without weights, OLMo's, is in no map: the model's own `norm`)
        norm = part_at(self, mmap.final_norm) if mmap.final_norm else getattr(inner, "norm", None)
        return _scaled_logits(self, head(norm(h) if norm is not None else h))  # (B, T, V)

    def py_forward(self, x: torch.Tensor) -> torch.Tensor:
        return drive(self, mmap, x)

    model.forward = types.MethodType(hf_forward if kind == "hf" else py_forward, model)
    return model


MASK_KINDS = ("full_attention", "sliding_attention")


def layer_kinds(config, layers: int) -> list[str]:
    """Each layer's attention kind as the model's own forward picks its mask: the config's
    layer_types (Qwen2/3, Gemma-2/3), else a sliding window on every layer where the config keeps
    one (Mistral, Phi-3, Mixtral, StarCoder2: their forwards' `mask_function`), else full."""
    kinds = getattr(config, "layer_types", None)
    if isinstance(kinds, (list, tuple)) and len(kinds) >= layers:
        unknown = sorted(set(kinds) - set(MASK_KINDS))
        if unknown:
            raise ConfigError(f"the model's layers attend as {', '.join(unknown)}, which pipeline stages do not mask "
                              "yet; re-plan with --pp 1")
        return list(kinds)
    return ["sliding_attention" if getattr(config, "sliding_window", None) else "full_attention"] * layers


def attention_masks(config, kinds: list[str], seq_len: int, h: torch.Tensor, positions: torch.Tensor) -> dict:
    """The mask each layer kind's attention takes, made by transformers' own builders as the model's
    forward makes them (None where SDPA's causal flag does it; the additive mask eager attention,
    Gemma-2's, needs), for the whole sequence (a sequence-parallel stage's input is a shard of it)."""
    from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

    shape = torch.empty((h.shape[0], seq_len, 1), dtype=h.dtype, device=h.device)  # (B, T, .): what the builders read
    build = {"full_attention": create_causal_mask, "sliding_attention": create_sliding_window_causal_mask}
    return {kind: build[kind](config=config, inputs_embeds=shape, attention_mask=None, cache=None,
                              position_ids=positions) for kind in set(kinds)}


def _embedded(inner: nn.Module, h: torch.Tensor) -> torch.Tensor:
    """What a Hugging Face decoder does to its token embeddings before the first block, as its own
    forward does: Granite's embedding_multiplier, Phi's, GPT-NeoX's and StarCoder's embedding
    dropout, StarCoder2's (functional) one."""
    if isinstance(getattr(inner, "embedding_multiplier", None), (int, float)):
        h = h * inner.embedding_multiplier
    for name in ("embed_dropout", "emb_dropout", "drop"):
        if isinstance(getattr(inner, name, None), nn.Dropout):
            h = getattr(inner, name)(h)
    if isinstance(getattr(inner, "embedding_dropout", None), float):
        h = nn.functional.dropout(h, p=inner.embedding_dropout, training=inner.training)
    return h


def _scaled_logits(model: nn.Module, logits: torch.Tensor) -> torch.Tensor:
    """What a Hugging Face causal LM does to its head's output, as its own forward does: Granite's
    division by logits_scaling, Cohere's logit_scale, Gemma-2's final soft-capping."""
    config = model.config
    if isinstance(getattr(config, "logits_scaling", None), (int, float)):
        logits = logits / config.logits_scaling
    if isinstance(getattr(model, "logit_scale", None), (int, float)):
        logits = logits * model.logit_scale
    cap = getattr(config, "final_logit_softcapping", None)
    if isinstance(cap, (int, float)) and cap:
        logits = torch.tanh(logits / cap) * cap
    return logits


def drive(model: nn.Module, mmap: ModuleMap, x: torch.Tensor) -> torch.Tensor:
    """A `py:` module's forward read off its map: tokens (B, T) -> embedding (+ learned
    positions) -> blocks in order -> final norm -> head -> logits (B, T, V); a part without
    the embedding takes and one without the head returns hidden states (B, T, C)."""
    embedding, head = part_at(model, mmap.embedding), part_at(model, mmap.head)
    h = x
    if embedding is not None:
        h = embedding(x)  # (B, T, C)
        positions = part_at(model, mmap.positions) if mmap.positions else None
        if positions is not None:
            h = h + positions(torch.arange(x.shape[1], device=x.device))  # (B, T, C)
    for block in blocks_of(model, mmap).children():
        out = block(h)
        h = out[0] if isinstance(out, tuple) else out
    if head is None:
        return h
    norm = part_at(model, mmap.final_norm) if mmap.final_norm else None
    return head(norm(h) if norm is not None else h)


def stage_driver_problem(plan: Plan, mmap: ModuleMap, seed: int) -> str | None:
    """Why a `py:` module cannot be pipelined as `drive` reads it (its own forward does more,
    or other, than embedding -> blocks -> norm -> head), or None: both run on the CPU on a
    batch of the plan's length and must agree."""
    torch.manual_seed(seed)
    whole, _ = build_source_module(plan.source, plan.spec, device="cpu")
    tokens = torch.randint(0, plan.spec.vocab, (1, plan.seq_len))  # (1, T)
    with torch.no_grad():
        own = logits_of(whole(tokens))
        driven = drive(whole, mmap, tokens)
    if own.shape != driven.shape or not torch.allclose(own, driven, rtol=1e-5, atol=1e-6):
        return (f"the module's forward is not embedding -> its {mmap.blocks} in order -> {mmap.final_norm or 'norm'} -> "
                f"{mmap.head} (its logits differ from that reading), so its pipeline stages cannot be cut; "
                "re-plan with --pp 1")
    return None


def _set(root: nn.Module, path: str, value) -> None:
    parent, _, name = path.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, name, value)


def part_at(root: nn.Module, path: str):
    """The submodule at `path`, or None where this part does not hold it (a pipeline stage)."""
    try:
        return root.get_submodule(path)
    except AttributeError:
        return None


def tie(model: nn.Module, mmap: ModuleMap) -> None:
    """Share the embedding's weight with the head (a tied model) where this part holds both;
    tensor parallelism and `to_empty` give each its own copy."""
    emb, head = part_at(model, mmap.embedding), part_at(model, mmap.head)
    if mmap.tied and emb is not None and head is not None and head.weight is not emb.weight:
        head.weight = emb.weight


def blocks_of(model: nn.Module, mmap: ModuleMap) -> nn.Module:
    return model.get_submodule(mmap.blocks)


# -- tensor and sequence parallelism ---------------------------------------------------------
def _replicate_output(mesh, sequence_parallel: bool, local: bool):
    """A forward hook: a norm's output as one replicated tensor (gathered from sequence shards
    under sequence parallelism), a DTensor its column linears share, or local."""
    def hook(module, args, out):
        if sequence_parallel:
            out = out if isinstance(out, DTensor) else DTensor.from_local(out, mesh, [Shard(1)], run_check=False)
            out = out.redistribute(mesh, [Replicate()])
        elif not isinstance(out, DTensor):
            out = DTensor.from_local(out, mesh, [Replicate()], run_check=False)
        return out.to_local() if local else out
    return hook


def _scatter_sequence(mesh):
    """A forward pre-hook on the first block: its input, replicated, cut to this rank's
    sequence shard (the residual stream runs sequence-parallel from here)."""
    def hook(module, args, kwargs):
        def cut(x):
            return DTensor.from_local(x, mesh, [Replicate()], run_check=False).redistribute(mesh, [Shard(1)]).to_local()
        if args:
            return (cut(args[0]), *args[1:]), kwargs
        key = "hidden_states" if "hidden_states" in kwargs else next(iter(kwargs))
        return args, {**kwargs, key: cut(kwargs[key])}
    return hook


def apply_module_tp(model: nn.Module, mmap: ModuleMap, mesh, placements: dict, sequence_parallel: bool,
                    tp: int) -> None:
    sp = sequence_parallel
    emb, head = part_at(model, mmap.embedding), part_at(model, mmap.head)
    norm = part_at(model, mmap.final_norm) if mmap.final_norm else None
    top: dict[str, object] = {}
    if emb is not None and tp_placement(placements, mmap.embedding_weight) == "Shard(0)":
        # the whole sequence leaves the embedding: the model's own forward sizes positions and
        # masks from it; the first block then takes its sequence shard
        top[mmap.embedding] = RowwiseParallel(input_layouts=Replicate(), output_layouts=Replicate())
    head_split = head is not None and tp_placement(placements, mmap.head_weight) == "Shard(0)"
    if head_split:
        # vocab-parallel logits, left sharded: the loss reduces over tp (runtime.train.loss_fn), no gather
        top[mmap.head] = ColwiseParallel(output_layouts=Shard(-1), use_local_output=False)
    if norm is not None and sp:
        top[mmap.final_norm] = SequenceParallel()
    if top:
        parallelize_module(model, mesh, top)
    if norm is not None and (sp or head_split):
        norm.register_forward_hook(_replicate_output(mesh, sp, local=not head_split))
    blocks = blocks_of(model, mmap)
    for key, block in blocks.named_children():
        plan: dict[str, object] = {}
        sources = []
        split = set()  # the modules holding a split group's column linears (self_attn)
        # the residual stream's width: what the block's first linear reads
        width = next((m.in_features for m in block.modules() if isinstance(m, nn.Linear)), 0)
        for g in mmap.groups:
            if tp_placement(placements, mmap.block_param(key, g.column[0])) != "Shard(0)":
                continue  # a replicated group (the contract allows all or none)
            split.update(column.rpartition(".")[0] for column in g.column)
            for path in g.column:
                column = LoRAColwiseParallel if isinstance(block.get_submodule(path), LoRALinear) else ColwiseParallel
                plan[path] = column(input_layouts=Shard(1) if sp and not g.source else Replicate())
            row = LoRARowwiseParallel if isinstance(block.get_submodule(g.row), LoRALinear) else RowwiseParallel
            plan[g.row] = row(output_layouts=Shard(1) if sp else Replicate())
            if g.source:
                sources.append(g.source)
                if sp:
                    plan[g.source] = SequenceParallel()
        if not plan:
            continue
        for path in mmap.others:
            if expert_slice(block.get_submodule(path)):  # experts split over ep run on this rank's tokens already
                continue
            local_heads = path.rpartition(".")[0] in split and not spans_width(block.get_submodule(path), width)
            if sp or local_heads:
                # rank-local input: its sequence shard under sequence parallelism, else the heads of a split
                # group beside it (Qwen3's q_norm): its gradient a partial sum over tp
                plan[path] = LocalShard()
            # else it sees what every rank sees (Gemma-2's post-norms without sequence parallelism, OLMo-2's
            # k_norm beside whole attention): replicated, its gradient whole already (not summed over tp)
        parallelize_module(block, mesh, plan)
        for path in dict.fromkeys(sources):
            block.get_submodule(path).register_forward_hook(_replicate_output(mesh, sp, local=False))
        for path, names in mmap.head_attributes.items():
            if path not in split:  # a module left whole keeps its heads (multi-head latent attention's under tp)
                continue
            sub = block.get_submodule(path) if path else block
            for attr in names.split(","):
                setattr(sub, attr, getattr(sub, attr) // tp)
    if sp and emb is not None:
        first = blocks[next(iter(blocks._modules))] if isinstance(blocks, nn.ModuleDict) else blocks[0]
        first.register_forward_pre_hook(_scatter_sequence(mesh), with_kwargs=True)


def apply_module_recompute(model: nn.Module, mmap: ModuleMap, policy_by_layer: dict[str, str]) -> None:
    blocks = blocks_of(model, mmap)
    for key, block in list(blocks.named_children()):
        policy = policy_by_layer.get(key, "none")
        if policy == "none":
            continue
        kwargs = {} if policy == "full" else {"context_fn": selective_context}
        wrapped = checkpoint_wrapper(block, preserve_rng_state=False, **kwargs)
        if isinstance(blocks, nn.ModuleDict):
            blocks[key] = wrapped
        else:
            blocks[int(key)] = wrapped


# -- values -----------------------------------------------------------------------------------
def safetensors_files(plan: Plan) -> list[Path]:
    if plan.source.get("kind") != "hf":
        return []
    path = Path(plan.source["path"])
    folder = path if path.is_dir() else path.parent
    return sorted(folder.glob("*.safetensors"))


def _by_name(model: nn.Module) -> dict[str, torch.Tensor]:
    """This part's parameters by the module's own names (a tied copy under each name it has)."""
    return {clean(n): p for n, p in model.named_parameters(remove_duplicate=False)}


def _join(path: str, name: str) -> str:
    return f"{path}.{name}" if path else name


@torch.no_grad()
def initialise(model: nn.Module, pristine: nn.Module, plan: Plan, mmap: ModuleMap, seed: int) -> None:
    """Fill this part's parameters with the model's own initialisation (see the module docstring)."""
    mine = _by_name(model)
    if plan.source.get("kind") == "py":
        torch.manual_seed(seed)
        whole, _ = build_source_module(plan.source, plan.spec, device="cpu")
        full = dict(whole.named_parameters(remove_duplicate=False))
        for name, p in mine.items():
            if name.rpartition(".")[2] not in ADAPTER_NAMES:  # LoRA's adapters: runtime.lora.init_adapters
                copy_full(p, full[name].detach())
        return
    tied_head = f"{mmap.head}.weight" if mmap.tied else None
    split = {clean(path): expert_slice(sub) for path, sub in model.named_modules() if expert_slice(sub)}
    for path, sub in pristine.named_modules():
        direct = [n for n, _ in sub.named_parameters(recurse=False)
                  if _join(path, n) in mine and _join(path, n) != tied_head]
        if direct:
            _init_submodule(pristine, path, seed, {n: mine[_join(path, n)] for n in direct}, split.get(path))
    if tied_head and tied_head in mine and mmap.embedding_weight not in mine:
        # a last pipeline stage's copy of a tied head starts as the embedding does
        _init_submodule(pristine, mmap.embedding, seed, {"weight": mine[tied_head]})


@torch.no_grad()
def _init_submodule(pristine: nn.Module, path: str, seed: int, targets: dict[str, torch.Tensor],
                    experts: tuple[int, int] | None = None) -> None:
    """Hugging Face's `_init_weights` on a CPU copy of one submodule (its own parameters only),
    seeded by its path, copied into this rank's shards of `targets`; `experts` (rank, ep): the
    submodule's experts split over ep, this rank keeping its experts/ep of the whole."""
    local = copy.copy(pristine.get_submodule(path))
    local._modules = {}  # this submodule's own parameters only
    local._parameters = {n: None if p is None else nn.Parameter(torch.empty(p.shape, dtype=p.dtype),
                                                                  requires_grad=p.requires_grad)
                         for n, p in local._parameters.items()}
    torch.manual_seed(seed * 1_000_003 + zlib.crc32(path.encode()))
    pristine._init_weights(local)
    for n, target in targets.items():
        full = local._parameters[n].detach()
        copy_full(target, this_ranks_experts(full, *experts) if experts is not None else full)


# a fused experts parameter of transformers 5 (`...experts.gate_up_proj`: (experts, 2 f, h), gate
# before up; `...experts.down_proj`: (experts, h, f)) and the per-expert tensors checkpoints keep for
# it (`...experts.N.gate_proj.weight`; Mixtral's `...block_sparse_moe.experts.N.w1.weight`)
EXPERT_PARTS = {"gate_up_proj": (("gate_proj", "w1"), ("up_proj", "w3")), "down_proj": (("down_proj", "w2"),)}


def checkpoint_key(name: str, keys: set[str]) -> str | None:
    """The checkpoint's name of a module tensor: its own, or Mixtral's older `block_sparse_moe`
    for transformers 5's `mlp`, or a multimodal checkpoint's name of its language model's tensor
    (transformers 5's `model.language_model.*`, 4's `language_model.model.*`); None if none is
    stored."""
    inner = name.removeprefix("model.")
    for key in (name, name.replace(".mlp.", ".block_sparse_moe."), f"model.language_model.{inner}",
                f"language_model.{name}"):
        if key in keys:
            return key
    return None


def renamed_keys(keys: set[str], model_type: str | None) -> dict[str, str]:
    """{the module's name: the checkpoint's} for a checkpoint that keeps tensors under older names
    which transformers renames as it loads them (its conversion mapping's renamings for
    `model_type`: Phi-3.5-MoE's `block_sparse_moe.gate`, Granite MoE's `input_linear`, ...);
    empty where transformers keeps none. The experts it merges from per-expert tensors are
    `fused_experts`' job."""
    try:
        from transformers.conversion_mapping import WeightRenaming, get_checkpoint_conversion_mapping
    except ImportError:
        return {}
    renamings = [t for t in (get_checkpoint_conversion_mapping(model_type) or []) if isinstance(t, WeightRenaming)] \
        if model_type else []
    out: dict[str, str] = {}
    for key in keys:
        name = key
        for renaming in renamings:
            name, _ = renaming.rename_source_key(name)
        if name != key:
            out[name] = key
    return out


def fused_experts(name: str, shape: torch.Size, keys: dict[str, Path], first: int = 0) -> torch.Tensor | None:
    """The whole fused experts parameter `name` of `shape` (its shape[0] experts from the
    checkpoint's expert `first` on: an expert-parallel rank's share) assembled on the CPU from
    the checkpoint's per-expert tensors (each expert's projections stacked, gate before up);
    None if `name` is not one or the checkpoint lacks any of its tensors."""
    from safetensors import safe_open

    prefix, _, leaf = name.rpartition(".")
    if not prefix.endswith(".experts") or leaf not in EXPERT_PARTS or len(shape) != 3:
        return None
    for base in (prefix, prefix.replace(".mlp.", ".block_sparse_moe.")):
        for alias in range(2):  # transformers' names, then Mixtral's w1 / w3 / w2
            wanted = [[f"{base}.{e}.{part[alias]}.weight" for part in EXPERT_PARTS[leaf]]
                      for e in range(first, first + shape[0])]
            if all(k in keys for row in wanted for k in row):
                tensors: dict[str, torch.Tensor] = {}
                for file in {keys[k] for row in wanted for k in row}:  # each file opened once
                    with safe_open(str(file), "pt") as f:
                        tensors.update({k: f.get_tensor(k) for row in wanted for k in row if keys[k] == file})
                # one expert: its projections concatenated along the output rows
                return torch.stack([torch.cat([tensors[k] for k in row], dim=0) for row in wanted])  # (experts, rows, cols)
    return None


def load_pretrained(model: nn.Module, plan: Plan, mmap: ModuleMap) -> set[str]:
    """Read this part's slices of the model directory's safetensors (DCP's Hugging Face reader:
    each rank reads what its shards hold), parameters and persistent buffers (a router's score
    correction). A tied head not stored under its own name (as `save_pretrained` writes a tied
    model) reads the embedding's tensor; a checkpoint's per-expert tensors fill transformers 5's
    fused experts (`fused_experts`; under expert parallelism this rank's share of them), and
    Mixtral's `block_sparse_moe` names its `mlp`. A weight
    the checkpoint does not hold is one line, not DCP's traceback; the persistent buffers it does
    not hold are returned, for the model's own initialisation (as from_pretrained does)."""
    import torch.distributed.checkpoint as dcp
    from safetensors import safe_open

    files = safetensors_files(plan)
    keys: dict[str, Path] = {}
    for file in files:
        with safe_open(str(file), "pt") as f:
            keys.update({k: file for k in f.keys()})
    persistent = {_join(path, n): b for path, sub in model.named_modules() for n, b in sub._buffers.items()
                  if b is not None and n not in sub._non_persistent_buffers_set}
    state: dict[str, torch.Tensor] = {}
    fused: list[tuple[str, torch.Tensor, str | None]] = []
    missing: set[str] = set()
    seen: set[int] = set()
    buffers, stored = {clean(n) for n in persistent}, set(keys)
    renamed = renamed_keys(stored, hf_model_type(plan.source["path"]) if plan.source.get("kind") == "hf" else None)
    split = {clean(path): expert_slice(sub) for path, sub in model.named_modules() if expert_slice(sub)}
    for name, p in {**_by_name(model), **{clean(n): b for n, b in persistent.items()}}.items():
        if id(p) in seen or name.rpartition(".")[2] in ADAPTER_NAMES:  # LoRA's adapters start fresh
            continue
        seen.add(id(p))
        own = mmap.embedding_weight if mmap.tied and name == f"{mmap.head}.weight" else name
        key = checkpoint_key(own, stored) or renamed.get(own)
        if key is not None and name.rpartition(".")[0] in split:  # a fused tensor of all the experts, this rank's share
            fused.append((name, p, key))
        elif key is not None:
            state[key] = p
        elif name.rpartition(".")[2] in EXPERT_PARTS:
            fused.append((name, p, None))
        elif name in buffers:
            missing.add(name)
        else:
            raise ConfigError(f"the checkpoint in {files[0].parent} holds no tensor for the module's {name}; plan "
                              "from the config alone (a folder without *.safetensors) to train from initialisation")
    dcp.load(state, storage_reader=dcp.HuggingFaceStorageReader(str(files[0].parent)))
    with torch.no_grad():
        for name, p, key in fused:
            rank, _ = split.get(name.rpartition(".")[0], (0, 1))  # under ep: this rank's experts of them all
            first = rank * p.shape[0]
            if key is not None:
                with safe_open(str(keys[key]), "pt") as f:
                    full = f.get_slice(key)[first:first + p.shape[0]]  # (local experts, rows, cols)
            else:
                full = fused_experts(name, p.shape, keys, first=first)
            if full is None:
                raise ConfigError(f"the checkpoint in {files[0].parent} holds neither {name} nor its experts' "
                                  "gate_proj / up_proj / down_proj (or w1 / w3 / w2) tensors")
            copy_full(p, full)
    return missing


# -- the whole build --------------------------------------------------------------------------
def build_user_parts(plan: Plan, mesh, device: torch.device, seed: int, mmap: ModuleMap, stages):
    """The parts of the user's module this rank runs (one per virtual stage), parallelized per
    the plan and filled; `stages`: (virtual stage, first layer, end layer) of this rank."""
    pp, tp = plan.mesh["pp"], plan.mesh["tp"]
    dp_mesh = data_parallel_mesh(mesh, plan.zero)  # (None: dp x cp is one rank, nothing to average over)
    last = len(plan.stages) - 1 if pp > 1 else 0
    recompute = {s.virtual_stage: s.recompute for s in plan.stages}
    pretrained = bool(safetensors_files(plan))
    ep = int(plan.experts.get("ep", 1))
    emesh = expert_mesh(plan.mesh, plan.zero, ep, device.type) if ep > 1 else None
    if pp > 1 and plan.source["kind"] == "py":
        problem = stage_driver_problem(plan, mmap, seed)
        if problem:
            raise ConfigError(problem)
    parts, ids = [], []
    for k, first, end in stages:
        model = build_meta(plan)
        pristine = copy.deepcopy(model) if not pretrained else None
        if pp > 1:
            model = cut_stage(model, mmap, first, end, has_embedding=k == 0, has_head=k == last, seq_len=plan.seq_len,
                              kind=plan.source["kind"])
        if emesh is not None:
            apply_hf_expert_parallel(model, emesh, tp, whole=pp == 1)
        if plan.mode == "lora":  # the targets' linears wrapped, all else frozen (the pristine copy keeps the base;
            paths = mmap.lora_paths()  # after expert parallelism, whose experts are new parameters)
            wrap_targets(model, list(blocks_of(model, mmap).children()),
                         {t: paths[t] for t in plan.lora["targets"]}, int(plan.lora["rank"]))
        if tp > 1:
            apply_module_tp(model, mmap, mesh["tp"], plan.placements, plan.sequence_parallel, tp)
            if plan.mode == "lora":
                freeze_base(model)
        tie(model, mmap)
        apply_module_recompute(model, mmap, {key: recompute.get(k, "none") for key, _ in
                                             blocks_of(model, mmap).named_children()})
        if dp_mesh is not None:
            if emesh is not None:
                shard_experts(model, emesh, plan.zero, plan.precision)
            apply_data_parallel_blocks(model, list(blocks_of(model, mmap).children()),
                                       dp_mesh, plan.zero, plan.precision)
        model.to_empty(device=device)
        tie(model, mmap)
        if pretrained:
            unread = load_pretrained(model, plan, mmap)
        else:
            initialise(model, pristine, plan, mmap, seed)
            unread = None  # no weights: every persistent buffer from the model's init
        if plan.mode == "lora":
            init_adapters(model, seed, clean)
        _restore_buffers(model, plan, unread)
        if plan.mesh["cp"] > 1 and plan.source["kind"] == "hf":  # (a py: module's is refused by the contract)
            apply_hf_context_parallel(model, context_shard(mesh, plan.seq_len))
        model.train()
        parts.append(model)
        ids.append(k)
    return parts, ids


def _restore_buffers(model: nn.Module, plan: Plan, unread: frozenset[str] | set[str] | None = frozenset()) -> None:
    """Buffers after `to_empty`: Hugging Face's init recomputes them (a rotary embedding's
    tables; Gemma-2's embedding scale, sqrt(hidden); the persistent ones the weights did not
    bring, `unread` by name, every one of them where None: a router's score correction), run on
    a copy of each submodule whose parameters are throwaway CPU tensors, so that the weights
    already filled stay; a py: module's come from its CPU build."""
    if plan.source.get("kind") == "hf":
        with torch.no_grad():
            for path, sub in model.named_modules():
                mine = {n: b for n, b in sub._buffers.items() if b is not None and (
                    n in sub._non_persistent_buffers_set or unread is None or clean(_join(path, n)) in unread)}
                if not mine:
                    continue
                local = copy.copy(sub)
                local._modules, local._buffers = {}, dict(mine)
                local._parameters = {n: None if p is None else nn.Parameter(torch.empty(p.shape, dtype=p.dtype),
                                                                              requires_grad=False)
                                     for n, p in sub._parameters.items()}
                model._init_weights(local)
                for n, b in mine.items():  # set in place, or rebound on the copy
                    if local._buffers[n] is not b:
                        b.copy_(local._buffers[n].to(b.device))
        return
    buffers = list(model.named_buffers())
    if buffers:
        whole, _ = build_source_module(plan.source, plan.spec, device="cpu")
        full = dict(whole.named_buffers())
        with torch.no_grad():
            for name, b in buffers:
                b.copy_(full[clean(name)].to(b.device))
