"""planner.trace: any nn.Module -> an operator graph (networkx), traced on the meta device.

`torch.export.export(..., strict=False)` on meta tensors records every ATen op with the
FakeTensor of its output (shapes and dtypes) and the module path it ran in
(`nn_module_stack`); nothing is allocated, so a 175B model traces in seconds. Each node of
the `OpGraph` carries the op, its kind (linear, norm, pointwise, view, ...), output shape,
element count, forward FLOPs, the module path, the repeated block it belongs to, and for
parameters their name. Repeated blocks (children `N` of a ModuleList/ModuleDict of one
class, like `layers.0 .. layers.95`) are grouped by a structural signature, so one solve
serves every copy.
"""

from __future__ import annotations

import contextlib
import io
import logging
import math
import re
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING

import networkx as nx

from costmodel.errors import ConfigError

# torch is imported where a module is traced: the commands that only price a graph or a spec
# (simulate, plan of a built-in model) start without it (about 1 s of every command)
if TYPE_CHECKING:
    import torch

_BLOCK = re.compile(r"^(.*?)\.(\d+)$")

POINTWISE = {
    "aten.add.Tensor", "aten.sub.Tensor", "aten.mul.Tensor", "aten.div.Tensor", "aten.neg.default",
    "aten.gelu.default", "aten.silu.default", "aten.relu.default", "aten.tanh.default", "aten.dropout.default",
    "aten.to.dtype", "aten.to.dtype_layout", "aten._to_copy.default", "aten.clone.default", "aten.rsqrt.default",
    "aten.pow.Tensor_Scalar", "aten.exp.default", "aten.sigmoid.default", "aten.contiguous.default",
}
KINDS = {
    "aten.linear.default": "linear",
    "aten.embedding.default": "embedding",
    "aten.layer_norm.default": "norm",
    "aten.rms_norm.default": "norm",
    "aten.view.default": "view",
    "aten.reshape.default": "view",
    "aten._unsafe_view.default": "view",
    "aten.transpose.int": "transpose",
    "aten.permute.default": "permute",
    "aten.scaled_dot_product_attention.default": "sdpa",
    "aten.slice.Tensor": "slice",
    "aten.cat.default": "cat",
    "aten.repeat_interleave.self_int": "repeat",
    "aten.unsqueeze.default": "view",
    "aten.squeeze.dim": "view",
    "aten.expand.default": "repeat",  # K/V written out to every query head (transformers' repeat_kv)
    "aten.mean.dim": "reduce",
    "aten.sum.dim_IntList": "reduce",
    "aten.softmax.int": "softmax",
    "aten._softmax.default": "softmax",
    "aten.matmul.default": "matmul",
    "aten.bmm.default": "matmul",
    "aten.mm.default": "matmul",
}
SKIP = {"aten._assert_tensor_metadata.default", "aten.arange.default", "aten.arange.start"}


@dataclass(frozen=True, slots=True)
class Block:
    prefix: str  # e.g. "layers"
    index: int
    signature: int  # equal for structurally identical copies


class OpGraph:
    """A traced model: `graph` (networkx.DiGraph) in execution order, and its blocks."""

    def __init__(self, graph: nx.DiGraph, order: list[str], blocks: dict[tuple[str, int], list[str]]) -> None:
        self.graph = graph
        self.order = order
        self.blocks = blocks  # (prefix, index) -> node names in order

    def block_kinds(self) -> dict[int, list[tuple[str, int]]]:
        """Structural signature -> the blocks that share it."""
        kinds: dict[int, list[tuple[str, int]]] = {}
        for key in self.blocks:
            kinds.setdefault(self.graph.nodes[self.blocks[key][0]]["block_signature"], []).append(key)
        return kinds

    def node(self, name: str) -> dict:
        return self.graph.nodes[name]

    def subgraph(self, names: list[str]) -> nx.DiGraph:
        return self.graph.subgraph(names)

    def total_flops(self) -> float:
        return sum(d.get("flops", 0.0) for _, d in self.graph.nodes(data=True))


def _val_shape(node) -> tuple[tuple[int, ...], torch.dtype] | None:
    import torch

    val = node.meta.get("val")
    if isinstance(val, torch.Tensor):
        return tuple(int(s) for s in val.shape), val.dtype
    return None


def _flops(kind: str, target: str, shape: tuple[int, ...], in_shapes: list[tuple[int, ...]]) -> float:
    numel = math.prod(shape) if shape else 1
    if kind == "linear" and len(in_shapes) >= 2:
        k = in_shapes[0][-1]
        return 2.0 * numel * k
    if kind == "matmul" and len(in_shapes) >= 2:
        return 2.0 * numel * in_shapes[0][-1]
    if kind == "sdpa" and len(in_shapes) >= 3:
        b, h, t, d = in_shapes[0]
        s = in_shapes[1][2]
        return 4.0 * b * h * t * s * d
    if kind in ("norm",):
        return 5.0 * numel
    if kind == "pointwise":
        return float(numel)
    return 0.0


def _module_path(node) -> str:
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return ""
    return list(stack.values())[-1][0]


def _block_of(node, param_name: str | None) -> tuple[str, int] | None:
    """The outermost `prefix.N` module this node ran in (or a parameter belongs to)."""
    if param_name is not None:
        parts = param_name.split(".")
        for i in range(len(parts) - 1):
            if parts[i + 1].isdigit():
                return ".".join(parts[: i + 1]), int(parts[i + 1])
        return None
    stack = node.meta.get("nn_module_stack") or {}
    for path, _cls in stack.values():
        m = _BLOCK.match(path)
        if m:
            return m.group(1), int(m.group(2))
    return None


# torch's loggers that write a failed export's traceback or guard warnings to the terminal
EXPORT_LOGGERS = ("torch._subclasses.fake_tensor", "torch.fx.experimental.symbolic_shapes", "torch._export",
                  "torch.export", "torch._dynamo")


@contextlib.contextmanager
def quiet_export():
    """torch.export with its chatter kept off the terminal: a forward that fails on meta tensors
    (a config whose sizes do not fit together) logs the whole traceback at ERROR before raising,
    a data-dependent guard prints the partial graph, and a module assigning tensors during the
    pass warns; the user is owed one line (the caller's ConfigError), not that."""
    loggers = [logging.getLogger(name) for name in EXPORT_LOGGERS]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.CRITICAL)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), \
                contextlib.redirect_stderr(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


def trace_module(module: torch.nn.Module, example_inputs: tuple) -> OpGraph:
    """Trace `module` (on the meta device) into an OpGraph. A module whose forward takes
    `use_cache` (Hugging Face's) is traced with it off: its KV cache object is not a tensor
    torch.export can return, and training keeps no cache."""
    import inspect

    import torch

    try:
        takes_cache = "use_cache" in inspect.signature(module.forward).parameters
    except (TypeError, ValueError):
        takes_cache = False
    try:
        with quiet_export():
            exported = torch.export.export(module, example_inputs, kwargs={"use_cache": False} if takes_cache else None,
                                           strict=False)
    except Exception as exc:  # torch raises many kinds; the user needs one line
        raise ConfigError(f"torch.export could not trace the model: {type(exc).__name__}: {str(exc).splitlines()[0]}") from None
    param_names = {}
    for spec in exported.graph_signature.input_specs:
        if spec.kind.name in ("PARAMETER", "BUFFER"):
            param_names[spec.arg.name] = (spec.target, spec.kind.name.lower())
    g = nx.DiGraph()
    order: list[str] = []
    for node in exported.graph.nodes:
        if node.op not in ("placeholder", "call_function"):
            continue
        target = str(node.target) if node.op == "call_function" else "placeholder"
        if target in SKIP:
            continue
        shape_dtype = _val_shape(node)
        if shape_dtype is None:
            continue
        shape, dtype = shape_dtype
        inputs = [a for a in node.all_input_nodes if a.name in g]
        in_shapes = [g.nodes[a.name]["shape"] for a in inputs]
        if node.op == "placeholder":
            pname, pkind = param_names.get(node.name, (None, "input"))
            kind = {"parameter": "param", "buffer": "buffer"}.get(pkind, "input")
            if kind == "param" and not node.users:
                continue  # a tied weight's second name: export lifts both, the graph reads one
        else:
            pname = None
            kind = KINDS.get(target, "pointwise" if target in POINTWISE else "other")
        attrs = {
            "op": target, "kind": kind, "shape": shape, "dtype": str(dtype).replace("torch.", ""),
            "numel": math.prod(shape) if shape else 1, "module": _module_path(node), "param": pname,
            "flops": _flops(kind, target, shape, in_shapes), "args": _static_args(node),
        }
        block = _block_of(node, pname if kind == "param" else None)
        attrs["block"] = block
        g.add_node(node.name, **attrs)
        order.append(node.name)
        for pos, a in enumerate(inputs):
            g.add_edge(a.name, node.name, arg=pos)
    blocks: dict[tuple[str, int], list[str]] = {}
    for name in order:
        b = g.nodes[name]["block"]
        if b is not None:
            blocks.setdefault(b, []).append(name)
    for key, names in blocks.items():
        sig = hash(tuple((g.nodes[n]["op"], g.nodes[n]["shape"], g.nodes[n]["kind"]) for n in names))
        for n in names:
            g.nodes[n]["block_signature"] = sig
    return OpGraph(g, order, blocks)


def _static_args(node) -> dict:
    """The non-tensor arguments the sharding rules need (dims, shapes)."""
    t = str(node.target)
    a = node.args
    if t in ("aten.view.default", "aten.reshape.default", "aten._unsafe_view.default"):
        return {"shape": [int(x) for x in a[1]]}
    if t == "aten.transpose.int":
        return {"dims": [int(a[1]), int(a[2])]}
    if t == "aten.permute.default":
        return {"dims": [int(x) for x in a[1]]}
    if t == "aten.slice.Tensor":
        return {"dim": int(a[1]) if len(a) > 1 else 0}
    if t == "aten.cat.default":
        return {"dim": int(a[1]) if len(a) > 1 else 0}
    if t == "aten.repeat_interleave.self_int":
        return {"dim": int(node.kwargs.get("dim", a[2] if len(a) > 2 else 0))}
    if t in ("aten.layer_norm.default", "aten.rms_norm.default"):
        return {"normalized_ndim": len(a[1])}
    if t in ("aten.softmax.int", "aten._softmax.default"):
        return {"dim": int(a[1])}
    if t == "aten.dropout.default":
        return {"p": float(a[1]) if len(a) > 1 else 0.5}
    if t == "aten.scaled_dot_product_attention.default":
        masked = len(a) > 3 and a[3] is not None or node.kwargs.get("attn_mask") is not None
        causal = bool(node.kwargs.get("is_causal", a[5] if len(a) > 5 else False))
        return {"causal": causal or masked, "enable_gqa": bool(node.kwargs.get("enable_gqa", False))}
    return {}


def trace_spec(spec, *, batch: int = 1) -> OpGraph:
    """Trace the zoo's Transformer for a spec (meta device, `batch` sequences)."""
    import torch

    from planner.zoo.model import build_model

    model = build_model(spec, device="meta")
    tokens = torch.zeros(batch, spec.seq_len, dtype=torch.long, device="meta")
    return trace_module(model, (tokens,))
