"""Where a decoder-only module keeps its parts, and how tensor parallelism may split them.

A `ModuleMap` names, in the module's own words, the repeated blocks (a ModuleList or
ModuleDict), the token embedding, the final norm and the output head, and inside one block
the linears Megatron splits column-wise (those that read a norm's output: q, k, v; gate and
up) and row-wise (those whose input another linear's output became: o; down), grouped as
they run (each column group with the row linear that closes it), and the norms whose output
the column groups read (sequence parallelism runs them on sequence shards).

It is read two ways: statically for paraplan's own `Transformer` (the zoo's names, for any
size), and for any other module (Hugging Face or `py:`) by running it once on the meta
device with hooks on its leaf modules: which module's output each linear read, and in what
order they ran. Nothing is allocated. The planner names its placements with it, the
contract checks placements against it, and the runtime parallelizes the module from it.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field

from costmodel.errors import ConfigError
from costmodel.spec import ModelSpec
from planner.trace import quiet_export

COLUMN, ROW = "Shard(0)", "Shard(1)"
# transformers' Llama-family linear names -> LoRA targets (PEFT's target_modules for these models)
LLAMA_LINEAR_NAMES = {"q_proj": "q", "k_proj": "k", "v_proj": "v", "o_proj": "o", "gate_proj": "gate",
                      "up_proj": "up", "down_proj": "down",
                      # DeepSeek's latent attention (kept whole: its projections are linears of their own)
                      "q_a_proj": "q_a", "q_b_proj": "q_b", "kv_a_proj_with_mqa": "kv_a", "kv_b_proj": "kv_b"}


@dataclass(frozen=True, slots=True, kw_only=True)
class ColumnGroup:
    """Linears that read one norm's output (column-parallel), and the row-parallel linear that
    brings the group back to the residual stream; paths relative to a block."""

    source: str  # the norm whose output the column linears read ("" when it is the block input)
    column: tuple[str, ...]
    row: str


@dataclass(frozen=True, slots=True, kw_only=True)
class ModuleMap:
    blocks: str  # path of the ModuleList / ModuleDict of repeated blocks ("layers", "model.layers")
    layers: int
    embedding: str  # the token embedding's path
    head: str  # the output linear's path
    final_norm: str = ""
    positions: str = ""  # a learned position embedding's path, if any
    tied: bool = False
    groups: tuple[ColumnGroup, ...] = ()
    biased: tuple[str, ...] = ()  # block-relative linears with a bias
    unsplittable: tuple[str, ...] = ()  # block linears neither column nor row (tensor parallelism refused)
    head_attributes: dict[str, str] = field(default_factory=dict)  # block-relative module -> its head-count attributes
    # block-relative modules with parameters that are neither a split linear nor a norm of the
    # residual stream (Qwen3's q_norm / k_norm act on each rank's local heads: under tp their
    # gradients are partial sums that transformers all-reduces, "replicated_with_grad_allreduce")
    others: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.layers < 1:
            raise ConfigError(f"a module map needs at least one block, got {self.layers}")
        if not self.blocks or not self.embedding or not self.head:
            raise ConfigError("a module map names its blocks, token embedding and output head")

    def to_dict(self) -> dict:
        return {"blocks": self.blocks, "layers": self.layers, "embedding": self.embedding, "head": self.head,
                "final_norm": self.final_norm, "positions": self.positions, "tied": self.tied,
                "groups": [{"source": g.source, "column": list(g.column), "row": g.row} for g in self.groups],
                "biased": list(self.biased), "unsplittable": list(self.unsplittable),
                "head_attributes": dict(self.head_attributes), "others": list(self.others)}

    @classmethod
    def from_dict(cls, data: dict) -> "ModuleMap":
        try:
            return cls(blocks=str(data["blocks"]), layers=int(data["layers"]), embedding=str(data["embedding"]),
                       head=str(data["head"]), final_norm=str(data.get("final_norm", "")),
                       positions=str(data.get("positions", "")), tied=bool(data.get("tied", False)),
                       groups=tuple(ColumnGroup(source=str(g["source"]), column=tuple(map(str, g["column"])),
                                                row=str(g["row"])) for g in data.get("groups", ())),
                       biased=tuple(map(str, data.get("biased", ()))),
                       unsplittable=tuple(map(str, data.get("unsplittable", ()))),
                       head_attributes={str(k): str(v) for k, v in dict(data.get("head_attributes", {})).items()},
                       others=tuple(map(str, data.get("others", ()))))
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise ConfigError(f"the plan's module map is malformed ({type(exc).__name__}: {exc}); re-plan") from None

    def lora_paths(self) -> dict[str, str]:
        """LoRA target (costmodel.lora.TARGETS) -> the block-relative linear it wraps: q, k, v
        and o from the group of three column linears and its row linear; gate and up (the
        column linear named gate, else the first called, as Llama's MLP calls gate_proj first)
        or up alone, and down, from a group of two or one; then, for targets no group gives
        (linears left whole), the linears named as transformers' Llama family names them
        (q_proj, ..., down_proj). A fused projection (Phi-3's qkv_proj) gives none of its parts."""
        out: dict[str, str] = {}
        for g in self.groups:
            if len(g.column) == 3:
                out.update(zip(("q", "k", "v"), g.column), o=g.row)
            elif len(g.column) == 2:
                gate = next((c for c in g.column if "gate" in c.rpartition(".")[2]), g.column[0])
                out.update(gate=gate, up=next(c for c in g.column if c != gate), down=g.row)
            elif len(g.column) == 1:
                out.update(up=g.column[0], down=g.row)
        for path in self.unsplittable:
            target = LLAMA_LINEAR_NAMES.get(path.rpartition(".")[2])
            if target and target not in out:
                out[target] = path
        return out

    def block_param(self, layer: int | str, path: str, leaf: str = "weight") -> str:
        return f"{self.blocks}.{layer}.{path}.{leaf}"

    @property
    def embedding_weight(self) -> str:
        return f"{self.embedding}.weight"

    @property
    def head_weight(self) -> str:
        """The head's parameter as the plan names it: a tied head is the embedding's weight."""
        return self.embedding_weight if self.tied else f"{self.head}.weight"

    def megatron(self) -> dict[str, str]:
        """Megatron-LM's tensor-parallel placements (glob over layers -> Shard(dim)):
        column-parallel groups, row-parallel closers, vocab-parallel embedding and head."""
        out = {self.embedding_weight: COLUMN}
        for g in self.groups:
            for path in g.column:
                out[self.block_param("*", path)] = COLUMN
                if path in self.biased:
                    out[self.block_param("*", path, "bias")] = COLUMN
            out[self.block_param("*", g.row)] = ROW
        if not self.tied:
            out[self.head_weight] = COLUMN
        return out


def zoo_map(spec: ModelSpec) -> ModuleMap:
    """paraplan's own `Transformer` (planner.zoo.model), read from its definition."""
    attention = ColumnGroup(source="attention_norm", column=("attention.wq", "attention.wk", "attention.wv"),
                            row="attention.wo")
    linears = [*attention.column, attention.row]
    groups: tuple[ColumnGroup, ...] = (attention,)
    if spec.moe_layers < spec.layers:  # a dense MLP in some layer (a mixture of experts' layers hold experts)
        mlp = ("feed_forward.w1", "feed_forward.w3") if spec.gated else ("feed_forward.w1",)
        groups += (ColumnGroup(source="ffn_norm", column=mlp, row="feed_forward.w2"),)
        linears += [*mlp, "feed_forward.w2"]
    return ModuleMap(blocks="layers", layers=spec.layers, embedding="tok_embeddings", head="output", final_norm="norm",
                     positions="pos_embeddings" if spec.position.value == "learned" else "", tied=spec.tied_embeddings,
                     groups=groups, biased=tuple(linears) if spec.bias else ())


HEAD_COUNT_NAMES = ("n_heads", "n_head", "nh", "num_heads", "n_kv_heads", "nkv", "num_kv_heads",
                    "num_key_value_heads", "n_local_heads", "n_local_kv_heads")


def traced_map(module, example_inputs: tuple, spec: ModelSpec) -> ModuleMap:
    """Run `module` once on the meta device and read its map off the calls (see the module
    docstring). `spec` is what the planner read of it (heads, kv heads, vocab)."""
    import torch
    from torch import nn

    container, layers = _block_container(module)
    calls: list[tuple[str, nn.Module, int, int]] = []  # (path, module, id(input), id(output)) in call order
    keep: list = []  # hold every recorded tensor so that no id is reused within the pass
    hooks = []
    for path, sub in module.named_modules():
        if not path or not any(True for _ in sub.parameters(recurse=False)):
            continue

        def hook(m, args, kwargs, out, path=path):
            first = args[0] if args else next((v for v in kwargs.values() if isinstance(v, torch.Tensor)), None)
            result = out[0] if isinstance(out, tuple) else out
            keep.extend([first, result])
            calls.append((path, m, id(first), id(result)))

        hooks.append(sub.register_forward_hook(hook, with_kwargs=True))
    entered: list[int] = []
    hooks.append(module.get_submodule(f"{container}.0").register_forward_pre_hook(
        lambda m, args, kwargs: entered.append(id(args[0] if args else next(iter(kwargs.values())))) or None,
        with_kwargs=True))
    try:
        # under torch.export (fake tensors), as planner.trace runs it: a model's own checks
        # that read values (Hugging Face's packed-sequence test) skip themselves while tracing
        kwargs = {"use_cache": False} if "use_cache" in _forward_args(module) else None
        with quiet_export():
            torch.export.export(module, tuple(example_inputs), kwargs=kwargs, strict=False)
    except Exception as exc:  # noqa: BLE001 - any failure of the user's forward on meta is the same bad input
        raise ConfigError(f"the module failed to run on the meta device ({type(exc).__name__}: "
                          f"{str(exc).splitlines()[0] if str(exc) else ''}); "
                          "paraplan reads its layout from one such pass") from None
    finally:
        for h in hooks:
            h.remove()
    embeddings = [c for c in calls if isinstance(c[1], nn.Embedding)]
    linears = [c for c in calls if isinstance(c[1], nn.Linear)]
    if not embeddings or not linears:
        raise ConfigError("the module has no token embedding or no linear head; paraplan runs decoder-only "
                          "language models (tokens -> logits)")
    head = linears[-1]
    tied = head[1].weight is embeddings[0][1].weight
    produced_by = {c[3]: c[0] for c in calls}
    prefix = f"{container}.0."
    in_block = [c for c in calls if c[0].startswith(prefix)]
    groups, unsplittable, biased = [], [], []
    current: list[str] = []
    source = ""
    group_input = None  # id of the tensor the current group's column linears read
    width = _width(in_block)
    for path, sub, arg, _out in in_block:
        if not isinstance(sub, nn.Linear):
            continue
        rel = path[len(prefix):]
        if sub.bias is not None:
            biased.append(rel)
        reader = produced_by.get(arg, "")
        from_norm = reader.startswith(prefix) and not isinstance(_module_at(module, reader), nn.Linear)
        from_input = bool(entered) and arg == entered[0]  # the block's own input (the residual stream)
        if from_norm or from_input:
            src = reader[len(prefix):] if from_norm else ""
            if current and src != source:
                unsplittable.extend(current)
                current = []
            source, group_input = src, arg
            current.append(rel)
        elif not reader and sub.in_features == width and (not current or arg == group_input):
            # the residual stream mid-block, made by an add (OLMo-2's MLP reads x + post_norm(attention)):
            # replicated on every rank (or, under sequence parallelism, its sequence shard), as a block input is
            if not current:
                source, group_input = "", arg
            current.append(rel)
        elif current and sub.out_features == width:
            if _fused(module, prefix, current, spec) or not _reads_a_column(module, prefix, current, sub):
                unsplittable.extend([*current, rel])
            else:
                groups.append(ColumnGroup(source=source, column=tuple(current), row=rel))
            current = []
        else:
            unsplittable.append(rel)
    unsplittable.extend(current)
    groups = _head_local_groups(module, prefix, in_block, produced_by, groups, unsplittable)
    known = {p for g in groups for p in (g.source, *g.column, g.row)} | set(unsplittable)
    others = tuple(dict.fromkeys(c[0][len(prefix):] for c in in_block
                                 if not isinstance(c[1], nn.Linear) and c[0][len(prefix):] not in known))
    heads = {}
    for path, sub in _module_at(module, f"{container}.0").named_modules():
        names = [n for n in HEAD_COUNT_NAMES if isinstance(getattr(sub, n, None), int)
                 and getattr(sub, n) in (spec.heads, spec.kv_heads)]
        if names:
            heads[path] = ",".join(names)
    # the final norm: what the head reads, or (a slice in between, as Hugging Face's
    # logits_to_keep) the last module with parameters to run before it outside the blocks
    before = [c for c in calls[:calls.index(head)] if not c[0].startswith(f"{container}.")
              and not isinstance(c[1], (nn.Linear, nn.Embedding))]
    norm = produced_by.get(head[2], "") or (before[-1][0] if before else "")
    positions = embeddings[1][0] if len(embeddings) > 1 else ""
    return ModuleMap(blocks=container, layers=layers, embedding=embeddings[0][0], head=head[0],
                     final_norm=norm if norm and not norm.startswith(f"{container}.") else "", positions=positions,
                     tied=tied, groups=tuple(groups), biased=tuple(biased), unsplittable=tuple(unsplittable),
                     head_attributes=heads, others=others)


def _head_local_groups(module, prefix: str, in_block, produced_by: dict, groups: list, unsplittable: list) -> list:
    """The groups whose column linears' outputs are only ever acted on head by head: a module with
    parameters that reads a column linear's whole output (OLMo-2's q_norm and k_norm: an RMSNorm
    over all heads' q, a weight of q_dim) would see one rank's columns with a full-width weight,
    so its group is not split (its linears join `unsplittable`). Qwen3's per-head q_norm (a weight
    of head_dim) leaves its group split."""
    from torch import nn

    whole = set()
    for path, sub, arg, _out in in_block:
        if isinstance(sub, nn.Linear):
            continue
        reader = produced_by.get(arg, "")
        if not reader.startswith(prefix) or not isinstance(_module_at(module, reader), nn.Linear):
            continue
        width = _module_at(module, reader).out_features
        if width > 1 and spans_width(sub, width):
            whole.add(reader[len(prefix):])
    kept = []
    for g in groups:
        if whole & set(g.column):
            unsplittable.extend([*g.column, g.row])
        else:
            kept.append(g)
    return kept


def spans_width(module, width: int) -> bool:
    """Whether one of a module's own parameters is `width` wide in its last dimension: a norm over a
    whole projection's output or the residual stream, not over one head (Qwen3's per-head q_norm)."""
    return any(p.dim() >= 1 and p.shape[-1] == width for p in module.parameters(recurse=False))


def _fused(module, prefix: str, column: list[str], spec: ModelSpec) -> bool:
    """Whether a group's one column linear computes several projections at once (Phi-3's
    qkv_proj, q_dim + 2 kv_dim rows; gate_up_proj, 2 ffn_hidden rows): split by contiguous rows
    over tp, a rank would get all of some parts and none of others, so it is not split."""
    if len(column) != 1:
        return False
    rows = _module_at(module, prefix + column[0]).out_features
    kv_dim = spec.kv_heads * spec.head_dim
    return rows == spec.q_dim + 2 * kv_dim or (spec.gated and rows == 2 * spec.ffn_hidden)


def _reads_a_column(module, prefix: str, column: list[str], row) -> bool:
    """Whether the row linear reads what one of the column linears writes (q's heads -> o, up's
    ffn -> down): split by the same columns, each rank's row shard reads its own columns. Multi-head
    latent attention's kv_a_proj_with_mqa writes a latent every head shares (kv_lora_rank + the
    rope dims), which o_proj (heads x v_head_dim) does not read: that group is not split."""
    return any(_module_at(module, prefix + c).out_features == row.in_features for c in column)


def _width(in_block) -> int:
    """The residual stream's width: the in-features of the block's first linear (0: none)."""
    from torch import nn

    first = next((c[1] for c in in_block if isinstance(c[1], nn.Linear)), None)
    return first.in_features if first is not None else 0


def _forward_args(module) -> set[str]:
    import inspect

    try:
        return set(inspect.signature(module.forward).parameters)
    except (TypeError, ValueError):
        return set()


def _module_at(root, path: str):
    return root.get_submodule(path) if path else root


def _block_container(module) -> tuple[str, int]:
    """The ModuleList / ModuleDict whose children 0..N-1 are one class: the repeated blocks
    (the one with the most children when several qualify)."""
    from torch import nn

    best = ("", 0)
    for path, sub in module.named_modules():
        if not isinstance(sub, (nn.ModuleList, nn.ModuleDict)) or len(sub) < 1:
            continue
        keys = list(sub._modules.keys())
        if keys != [str(i) for i in range(len(keys))]:
            continue
        if len({type(m) for m in sub._modules.values()}) == 1 and len(keys) > best[1]:
            best = (path, len(keys))
    if not best[0]:
        raise ConfigError("no repeated blocks (children 0..N-1 of one class in a ModuleList/ModuleDict) were found; "
                          "paraplan runs decoder-only transformers built from repeated layers")
    return best


def placement_of(placements: dict[str, dict[str, str]], name: str, axis: str = "tp") -> str | None:
    """The placement the plan gives parameter `name` (globs allowed) on `axis`, if any."""
    for pattern, axes in placements.items():
        if fnmatch.fnmatchcase(name, pattern) and axis in axes:
            return axes[axis]
    return None
