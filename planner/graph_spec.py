"""Read a `ModelSpec` off a traced decoder-only transformer (for `py:MODULE:CALLABLE`).

The cost model prices a transformer by its sizes; a user's module is traced like any other
and its sizes read from the graph: the repeated block (layers), the block's input width
(hidden), the attention op's inputs (heads, head_dim), the K projection (kv_heads), the widest
projection out of hidden (ffn_hidden, and SwiGLU when SiLU gates a product), the norm op,
biases, the embedding (vocab) and the token input (seq_len). The parameter count of the
spec is then checked against the module's own.
"""

from __future__ import annotations

import math

from costmodel.errors import ConfigError
from costmodel.spec import ModelSpec
from planner.trace import OpGraph


class NotADecoder(ConfigError):
    """A module of repeated blocks that is not a decoder-only transformer (no attention): the
    planner prices it from its graph (planner.graph_plan) rather than from a ModelSpec."""


def _norm_kind(ops: set[str]) -> str:
    """LayerNorm as its op or as mean, variance and subtraction; RMSNorm as its op or written
    out (Hugging Face's LlamaRMSNorm: pow(2), mean, rsqrt, mul, with no mean subtracted)."""
    if "aten.layer_norm.default" in ops or "aten.native_layer_norm.default" in ops:
        return "layernorm"
    if "aten.rms_norm.default" in ops or {"aten.pow.Tensor_Scalar", "aten.rsqrt.default"} <= ops \
            and "aten.var.correction" not in ops and "aten.var_mean.correction" not in ops:
        return "rmsnorm"
    return "layernorm"


def spec_from_graph(graph: OpGraph, *, name: str) -> ModelSpec:
    g = graph.graph
    kinds = graph.block_kinds()
    if not kinds:
        raise ConfigError(f"{name}: no repeated blocks (children 0..N-1 of a ModuleList/ModuleDict) were found; "
                          "paraplan plans decoder-only transformers built from repeated layers")
    copies = max(kinds.values(), key=len)
    block = graph.blocks[copies[0]]
    nodes = {n: g.nodes[n] for n in block}
    sdpa = [n for n in block if nodes[n]["kind"] == "sdpa"]
    if not sdpa:
        raise NotADecoder(f"{name}: its repeated blocks run no attention; it is planned from its graph alone")
    if len(sdpa) != 1:
        raise ConfigError(f"{name}: a layer must run scaled_dot_product_attention once (found {len(sdpa)})")
    q = next(iter(sorted(g.predecessors(sdpa[0]), key=lambda p: g.edges[p, sdpa[0]]["arg"])))
    _b, heads, _t, head_dim = g.nodes[q]["shape"]
    inputs = [p for n in block for p in g.predecessors(n)
              if p not in nodes and g.nodes[p]["kind"] not in ("param", "buffer")]
    if not inputs:
        raise ConfigError(f"{name}: could not find the activation entering a layer")
    hidden = g.nodes[inputs[0]]["shape"][-1]
    linears = [n for n in block if nodes[n]["kind"] == "linear"]
    widths = []
    for n in linears:
        preds = sorted(g.predecessors(n), key=lambda p: g.edges[p, n]["arg"])
        weight = g.nodes[preds[1]]["shape"]
        widths.append((weight[0], weight[1], len(preds) > 2))
    from_hidden = [w for w in widths if w[1] == hidden]
    if not from_hidden:
        raise ConfigError(f"{name}: its layers project the hidden state with no linear op (aten.linear: nn.Linear or "
                          "F.linear; a matmul against a weight is not read as one); write a spec YAML with its sizes")
    attn_widths = sorted(w[0] for w in from_hidden if w[0] <= heads * head_dim)  # q, k, v
    kv_heads = attn_widths[0] // head_dim if attn_widths else heads
    mlp_in = from_hidden
    fused = from_hidden[0][0] - heads * head_dim  # the layer's first projection wider than q: q, k and v in one
    if fused > 0 and fused % (2 * head_dim) == 0 and heads % (fused // (2 * head_dim)) == 0:  # (StarCoder's c_attn)
        kv_heads, mlp_in = fused // (2 * head_dim), from_hidden[1:] or from_hidden
    ffn = max(w[0] for w in mlp_in)
    ops = {nodes[n]["op"] for n in block}
    gated = sum(1 for w in mlp_in if w[0] == ffn) >= 2  # gate and up read the same input
    down = [w[1] for w in widths if w[0] == hidden and w[1] != heads * head_dim]  # the MLP's down projection
    if not gated and down and ffn == 2 * max(down):  # gate and up in one projection (GLM-4's gate_up_proj)
        gated, ffn = True, max(down)
    activation = ("swiglu" if "aten.silu.default" in ops else "geglu") if gated else "gelu"
    norm = _norm_kind(ops)
    rope = "aten.cat.default" in ops
    embeddings = [n for n in graph.order if g.nodes[n]["kind"] == "embedding"]
    if not embeddings:
        raise ConfigError(f"{name}: no token embedding found")
    emb_weight = next(p for p in g.predecessors(embeddings[0]) if g.nodes[p]["kind"] == "param")
    vocab = g.nodes[emb_weight]["shape"][0]
    tokens = [n for n in graph.order if g.nodes[n]["kind"] == "input"]
    seq_len = g.nodes[tokens[0]]["shape"][1] if tokens and len(g.nodes[tokens[0]]["shape"]) > 1 else 2048
    if not rope and len(embeddings) > 1:  # learned positions: as many as the position table holds
        table = next((p for p in g.predecessors(embeddings[1]) if g.nodes[p]["kind"] == "param"), None)
        seq_len = g.nodes[table]["shape"][0] if table is not None else seq_len
    tied = any(g.nodes[s]["kind"] == "linear" for s in g.successors(emb_weight))
    spec = ModelSpec(
        name=name, layers=len(copies), hidden=hidden, heads=heads, kv_heads=kv_heads, ffn_hidden=ffn, vocab=vocab,
        seq_len=seq_len, activation=activation, norm=norm, head_dim=head_dim if heads * head_dim != hidden else 0,
        position="rope" if rope else ("learned" if len(embeddings) > 1 else "none"),
        tied_embeddings=tied, bias=any(w[2] for w in widths), dropout="aten.dropout.default" in ops,
    )
    counted = sum(math.prod(d["shape"]) for _, d in g.nodes(data=True) if d["kind"] == "param")
    if abs(spec.num_params - counted) > 0.01 * counted:
        raise ConfigError(
            f"{name}: read as a decoder-only transformer it would have {spec.num_params:,} parameters but the module "
            f"has {counted:,}; paraplan's cost model covers GPT/Llama-style layers"
        )
    return spec
