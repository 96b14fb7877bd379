"""Serving a model: KV cache, paged blocks, prefill and decode, replicas, speculative decoding.

Per replica of tp x pp GPUs (Megatron's split of each layer, layers cut into pp stages):

    KV bytes per token   2 * layers * kv_heads * head_dim * bytes  (K and V of every layer)
                         per GPU: layers/pp layers and kv_heads/tp heads; when tp exceeds
                         kv_heads each GPU keeps one head (GQA/MQA heads are replicated)
    KV capacity          usable memory (vLLM's gpu_memory_utilization 0.9 of the GPU) minus
                         weights and the prefill workspace, over KV bytes per token per GPU
    per sequence         contiguous: the model's whole context reserved up front, per beam;
                         paged: blocks of `block_tokens` on demand, the prompt's blocks shared
                         by the beams (Kwon et al. 2023, vLLM); fragmentation = 1 - used/held
    prefill              a prompt through every layer: compute-bound, the training cost model's
                         forward (costmodel.layer) with the logits of the last token
    decode step          memory-bound: every weight and the KV cache read once per token
                         (roofline of the bytes and of 2 * params * batch FLOPs), plus two
                         tensor-parallel all-reduces of (batch, hidden) per layer and the
                         pipeline hops; a token goes through the stages one after the other
    continuous batching (Orca, vLLM): a request is admitted between decode steps, so
    TTFT = prefill of its prompt + one decode step of the running batch; TPOT = the decode
    step at the mean context P + O/2; a replica serves `batch` sequences of O tokens in
    O decode steps plus their `batch` prefills:
    throughput = replicas * batch * O / (O * TPOT + batch * prefill / m)
    pipeline parallel (vLLM's virtual engines): the batch runs as m = min(batch, pp) micro-
                         batches in flight, each stage on another's: TPOT is the step of one
                         micro-batch of ceil(batch / pp) (a traversal of the stages), and m
                         prompts are prefilled at once

Expert parallelism (vLLM's --enable-expert-parallel): a mixture of experts' routed experts are
held whole, experts/tp of them on each GPU of the replica, instead of each expert split over
tp; attention stays tensor-parallel, so every GPU has every token, runs the copies routed to
its own experts (the busiest GPU's share: `costmodel.moe.rank_imbalance`) and the outputs are
summed by the all-reduce that closes the layer either way. The same weight bytes per GPU; the
experts' GEMMs run at full width, on the experts the batch reaches on that GPU.

Speculative decoding (Leviathan et al. 2023): a draft model proposes gamma tokens, the target
checks them in one step; with acceptance rate alpha and draft/check step cost ratio c the
expected speedup over a check is (1 - alpha^(gamma+1)) / ((1 - alpha) * (gamma * c + 1)), times
a decode step's time over the check's: the check runs gamma + 1 rows a sequence, as cheap as a
decode step while reading the weights bounds it (small batches) and up to gamma + 1 times dearer
once the rows make it compute-bound, where speculation stops paying.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from costmodel.cluster import Cluster, with_runtime
from costmodel.collectives import all_reduce_s, send_recv_s
from costmodel.errors import ConfigError
from costmodel.kv_groups import KVGroups
from costmodel.layer import _params_per_tp_rank, layer_cost
from costmodel.moe import EXPERT_LOAD_CV, rank_imbalance
from costmodel.ops import gemm_s
from costmodel.spec import ModelSpec
from costmodel.runtime import FUSED
from costmodel.serving_engine import DEFAULT_ENGINE, check_engine_name, engine_cluster, load_engine
from costmodel.strategy import Strategy

# the tokens an engine prefills in one iteration by default: vLLM's max_num_batched_tokens on a
# large GPU, TensorRT-LLM's max_num_tokens
PREFILL_TOKENS = 8192
GPU_MEMORY_UTILIZATION = 0.9  # vLLM's default share of the GPU it may use
BYTES = {"fp32": 4, "bf16": 2, "fp16": 2, "fp8": 1}
# weight formats whose routed experts are stored narrower than they are computed: MXFP4 (OCP
# Microscaling: 4-bit E2M1 values and one 8-bit scale per 32, 4.25 bits a weight), gpt-oss's
# checkpoints' experts (their attention, router, embedding and head 16-bit), which vLLM's MoE
# kernels dequantize to bf16 on the way in (weight-only on Hopper and Ampere)
WEIGHT_FORMATS = {"mxfp4": ("bf16", 4.25 / 8)}
SERVING_PRECISIONS = (*BYTES, *WEIGHT_FORMATS)
# the KV cache's values (vLLM's --kv-cache-dtype): "auto" as the model's activations
KV_CACHE_DTYPES = ("auto", "bf16", "fp16", "fp8")


def check_kv_cache(kv_cache_dtype: str, gpu_memory_utilization: float) -> None:
    """One line for a KV cache dtype or a GPU memory share the engine would not take."""
    if kv_cache_dtype not in KV_CACHE_DTYPES:
        raise ConfigError(f"--kv-cache-dtype {kv_cache_dtype!r}; use one of {', '.join(KV_CACHE_DTYPES)}")
    if isinstance(gpu_memory_utilization, bool) or not isinstance(gpu_memory_utilization, (int, float)) or not (
            0 < gpu_memory_utilization <= 1):
        raise ConfigError(f"--gpu-memory-utilization must be a share of the GPU's memory in (0, 1], got "
                          f"{gpu_memory_utilization!r}")


def compute_dtype(precision: str) -> str:
    """The dtype a serving precision computes in (a weight format's: bf16 for MXFP4 experts)."""
    return WEIGHT_FORMATS[precision][0] if precision in WEIGHT_FORMATS else precision


def expert_weight_bytes(precision: str) -> float:
    """Bytes of one routed-expert weight as the precision stores it (MXFP4: 4.25 bits)."""
    return WEIGHT_FORMATS[precision][1] if precision in WEIGHT_FORMATS else BYTES[precision]


def check_serving_precision(precision: str, spec: ModelSpec | None = None) -> None:
    """One line for a precision serving does not price, or a weight format for experts on a
    model without them."""
    if precision not in SERVING_PRECISIONS:
        raise ConfigError(f"serving precision {precision!r}; use one of {', '.join(SERVING_PRECISIONS)}")
    if precision in WEIGHT_FORMATS and spec is not None and not spec.moe:
        raise ConfigError(f"--precision {precision} stores a mixture of experts' routed experts (gpt-oss's checkpoints); "
                          f"{spec.name} has none: use bf16 or fp8")


def kv_value_bytes(precision: str, kv_cache_dtype: str = "auto") -> int:
    """Bytes of one cached K/V value: the KV cache's own dtype, or with "auto" the model's
    activations (bf16 under fp8 weights: vLLM's --quantization fp8 and TensorRT-LLM's fp8
    engines keep a 16-bit cache unless it is asked for in fp8, --kv-cache-dtype / --fp8_kv_cache)."""
    if kv_cache_dtype == "auto":
        return BYTES["bf16"] if precision == "fp8" else BYTES[compute_dtype(precision)]
    return BYTES[kv_cache_dtype]


def cli_flag(field: str) -> str:
    """The command line's name of a serving field (block_tokens is --block-size)."""
    return "block-size" if field == "block_tokens" else field.replace("_", "-")


def check_degrees(**degrees: int | None) -> None:
    """One line for a given parallel degree (--tp, --pp) that is not a positive integer."""
    for name, value in degrees.items():
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ConfigError(f"--{name} must be a positive integer, got {value!r}")


# The acceptance a draft's token gets where none is given: mean acceptance lengths vLLM measured on
# chat prompts (MT-bench) with trained proposers, as (1 - a^(k+1)) / (1 - a) = L solved for a: an EAGLE
# head on Llama 3 8B, 1.89 tokens a check at k 2 and 2.08 at k 4 (a 0.57, 0.54; vLLM pull request
# 16035); an EAGLE-3 head on MiniCPM3, 2.47 at k 5 (a 0.62; pull request 24243). Prompt-lookup (n-gram)
# drafts on chat accept less; on edits of the prompt more (4.59 at k 5 where a match was found, pull
# request 24344). A run's own figure (vLLM's "Mean acceptance length") is better: --acceptance-length.
DEFAULT_ACCEPTANCE = 0.6


@dataclass(frozen=True, slots=True, kw_only=True)
class ServingRequest:
    prompt_len: int
    output_len: int
    batch: int | None = None  # sequences per replica; None: the largest that meets the targets
    max_ttft_ms: float | None = None
    max_tpot_ms: float | None = None
    beam: int = 1
    block_tokens: int = 16
    precision: str = "bf16"  # weights and KV cache (or a weight format: costmodel.serving.WEIGHT_FORMATS)
    draft: ModelSpec | None = None
    ngram: bool = False  # speculative decoding's drafts looked up in the prompt (vLLM's n-gram proposer): no draft model
    draft_len: int = 4
    acceptance: float = DEFAULT_ACCEPTANCE
    engine: str = DEFAULT_ENGINE  # the serving engine profile (costmodel.serving_engine)
    kv_cache_dtype: str = "auto"  # vLLM's --kv-cache-dtype: fp8 halves a bf16 cache (capacity and reads)
    gpu_memory_utilization: float = GPU_MEMORY_UTILIZATION  # vLLM's share of the GPU for weights, activations, KV

    def __post_init__(self) -> None:
        for name in ("prompt_len", "output_len", "beam", "block_tokens", "draft_len"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"--{cli_flag(name)} must be a positive integer, got {value!r}")
        if self.batch is not None and (isinstance(self.batch, bool) or not isinstance(self.batch, int) or self.batch < 1):
            raise ConfigError(f"--batch must be a positive integer, got {self.batch!r}")
        for name in ("max_ttft_ms", "max_tpot_ms"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise ConfigError(f"--{name.replace('_', '-')} must be positive milliseconds, got {value!r}")
        check_serving_precision(self.precision)
        if not 0 <= self.acceptance < 1:
            raise ConfigError(f"--acceptance must be in [0, 1), got {self.acceptance}")
        if self.ngram and self.draft is not None:
            raise ConfigError("speculative decoding takes a draft model or n-gram proposals, not both")
        check_engine_name(self.engine)
        check_kv_cache(self.kv_cache_dtype, self.gpu_memory_utilization)

    @property
    def speculative(self) -> bool:
        """Whether decodes speculate (a draft model, or n-gram proposals)."""
        return self.draft is not None or self.ngram

    @property
    def bytes_per_value(self) -> int:
        """Bytes of an activation, and of a weight outside the routed experts."""
        return BYTES[compute_dtype(self.precision)]

    @property
    def kv_bytes_per_value(self) -> int:
        return kv_value_bytes(self.precision, self.kv_cache_dtype)


def kv_bytes_per_token(spec: ModelSpec, bytes_per_value: int = 2) -> int:
    """K and V of every layer for one token, the whole model (multi-head latent attention:
    the compressed latent and the RoPE key)."""
    return spec.layers * spec.kv_cache_values_per_token * bytes_per_value


def kv_values_per_token_gpu(spec: ModelSpec, tp: int) -> int:
    """Values one layer caches per token on one tensor-parallel GPU: its KV heads; the whole
    latent under multi-head latent attention (every rank's heads are expanded from it)."""
    if spec.latent_attention:
        return spec.kv_cache_values_per_token
    return kv_heads_per_gpu(spec, tp) * (spec.head_dim + spec.v_head_dim)


def expert_weights_per_gpu(spec: ModelSpec, tp: int, layers: int) -> float:
    """Routed-expert parameters of `layers` layers on one GPU, the experts split over tp (as
    vLLM's fused MoE runs them without expert parallelism): every expert is held, however few
    a token uses."""
    if not spec.moe:
        return 0.0
    return layers * spec.moe_share * spec.experts * spec.expert_params / tp


def kv_heads_per_gpu(spec: ModelSpec, tp: int) -> int:
    """KV heads one tensor-parallel GPU keeps (one, replicated, when tp exceeds kv_heads)."""
    return max(spec.kv_heads // tp, 1)


def layout_label(tp: int, pp: int, expert_parallel: bool = False) -> str:
    """A serving layout as the commands and reports name it: tp2 x pp1, tp2 x pp1 EP."""
    return f"tp{tp} x pp{pp}" + (" EP" if expert_parallel else "")


def layout_problems(spec: ModelSpec, tp: int, pp: int, expert_parallel: bool = False) -> list[str]:
    """Why tp x pp cannot serve the model (the query heads split; KV heads split or replicate;
    the experts split over tp, whole under expert parallelism)."""
    problems = []
    if expert_parallel and not spec.moe:
        problems.append(f"--expert-parallel: {spec.name} has no experts; leave it out")
    elif expert_parallel and tp < 2:
        problems.append("--expert-parallel spreads the experts over the tensor-parallel GPUs; give --tp 2 or more")
    elif expert_parallel and spec.experts % tp:
        problems.append(f"tp({tp}) does not divide experts({spec.experts}) for expert parallelism")
    elif spec.moe and not expert_parallel and spec.expert_ffn_hidden % tp:
        problems.append(f"tp({tp}) does not divide expert_ffn_hidden({spec.expert_ffn_hidden}); try "
                        "--expert-parallel")
    if spec.heads % tp:
        problems.append(f"tp({tp}) does not divide heads({spec.heads})")
    if tp > spec.kv_heads and tp % spec.kv_heads:
        problems.append(f"tp({tp}) and kv_heads({spec.kv_heads}) do not nest: tp must divide kv_heads or be a "
                        "multiple of it (then each KV head is replicated)")
    elif tp <= spec.kv_heads and spec.kv_heads % tp:
        problems.append(f"tp({tp}) does not divide kv_heads({spec.kv_heads})")
    if spec.layers < pp:
        problems.append(f"layers({spec.layers}) < pp({pp})")
    return problems


def expected_tokens(acceptance: float, proposed: int) -> float:
    """Tokens a speculative step emits on average with `proposed` drafts each accepted with
    `acceptance` until the first rejection: (1 - a^(k+1)) / (1 - a) = 1 + a + ... + a^k."""
    return (1 - acceptance ** (proposed + 1)) / (1 - acceptance)


def acceptance_of_length(length: float, proposed: int) -> float:
    """The acceptance a of each drafted token that gives `length` tokens a check on average with
    `proposed` drafts (vLLM's spec-decode metric "Mean acceptance length": accepted drafts a check
    plus the target's own token).

    Formulation: solve L(a) = (1 - a^(k+1)) / (1 - a) = 1 + a + ... + a^k = `length` for a in [0, 1);
    L rises strictly from 1 at a = 0 towards k + 1, so the root is unique for 1 <= length < k + 1:
    bisection to 1e-12."""
    if isinstance(proposed, bool) or not isinstance(proposed, int) or proposed < 1:
        raise ConfigError(f"--draft-len must be a positive integer, got {proposed!r}")
    if isinstance(length, bool) or not isinstance(length, (int, float)) or not 1 <= length < proposed + 1:
        raise ConfigError(f"--acceptance-length must be tokens a check in [1, {proposed + 1}) with {proposed} drafts "
                          f"(--draft-len), got {length!r}")
    low, high = 0.0, 1.0
    while high - low > 1e-12:
        mid = (low + high) / 2
        if expected_tokens(mid, proposed) < length:
            low = mid
        else:
            high = mid
    return low


def speculative_speedup(alpha: float, gamma: int, cost_ratio: float) -> float:
    """Expected decode speedup of speculative decoding (Leviathan et al. 2023, Theorem 3.8)."""
    if not 0 <= alpha < 1 or gamma < 1 or cost_ratio < 0:
        raise ConfigError("speculative decoding needs 0 <= alpha < 1, gamma >= 1 and a cost ratio >= 0")
    return expected_tokens(alpha, gamma) / (gamma * cost_ratio + 1)


@dataclass(frozen=True, slots=True, kw_only=True)
class KVBudget:
    weights_gib: float  # per GPU
    workspace_gib: float
    kv_gib: float  # per GPU, what is left for the cache
    kv_bytes_per_token_gpu: float
    capacity_tokens: int  # per replica
    reserved_tokens_contiguous: int  # per sequence
    reserved_tokens_paged: int
    used_tokens: int  # per sequence at its end
    max_batch_contiguous: int
    max_batch_paged: int
    # the paged pool: blocks of block_tokens tokens of one KV cache group's layers (costmodel.kv_groups;
    # every layer of a stage where none is windowed), and the bytes of one on one GPU
    pool_blocks: int = 0
    pool_block_bytes: float = 0.0

    @property
    def fragmentation_contiguous(self) -> float:
        return 1 - self.used_tokens / self.reserved_tokens_contiguous

    @property
    def fragmentation_paged(self) -> float:
        return 1 - self.used_tokens / self.reserved_tokens_paged


def weights_bytes_per_gpu(spec: ModelSpec, tp: int, pp: int, bytes_per_value: float,
                          expert_bytes: float | None = None) -> float:
    """The largest stage's weights on one GPU: its layers split over tp, plus the embedding
    or the head (vocab-parallel); the routed experts at `expert_bytes` a weight (a weight
    format's; bytes_per_value by default)."""
    layers = math.ceil(spec.layers / pp)
    vocab = -(-spec.vocab // tp) * spec.hidden
    ends = vocab if pp > 1 else vocab * (1 if spec.tied_embeddings else 2)
    experts = expert_weights_per_gpu(spec, tp, layers) * (bytes_per_value if expert_bytes is None else expert_bytes)
    return (layers * _params_per_tp_rank(spec, tp) + ends + spec.norm_params) * bytes_per_value + experts


def kv_budget(spec: ModelSpec, cluster: Cluster, req: ServingRequest, tp: int, pp: int) -> KVBudget:
    check_serving_precision(req.precision, spec)
    cluster = engine_cluster(cluster, req.engine)
    e = req.bytes_per_value
    weights = weights_bytes_per_gpu(spec, tp, pp, e, expert_weight_bytes(req.precision))
    if req.draft is not None:  # speculative decoding's draft model on the same GPUs, split over tp
        weights += weights_bytes_per_gpu(req.draft, tp, 1, e, expert_weight_bytes(req.precision))
    # prefill workspace: one sequence's prompt through a layer (residual, q/k/v, MLP) and its logits
    workspace = req.prompt_len * (4 * spec.hidden + 2 * spec.ffn_hidden // tp) * e + spec.vocab // tp * 4
    fixed = cluster.device.memory_overhead.fixed_gib * 2**30
    # the engine the cluster is priced for (engine_cluster keeps one already priced)
    if load_engine(cluster.device.serving_engine).kv_share_of == "free":  # of what weights, activations, runtime leave
        kv = max(0.0, req.gpu_memory_utilization * (cluster.device.hbm_bytes - fixed - weights - workspace))
    else:  # a share of the GPU for all of it
        kv = max(0.0, cluster.device.hbm_bytes * req.gpu_memory_utilization - fixed - weights - workspace)
    per_token = math.ceil(spec.layers / pp) * kv_values_per_token_gpu(spec, tp) * req.kv_bytes_per_value
    if req.draft is not None:  # and its cache of every token beside the target's
        per_token += req.draft.layers * kv_values_per_token_gpu(req.draft, tp) * req.kv_bytes_per_value
    capacity = int(kv // per_token)
    P, O, b = req.prompt_len, req.output_len, req.block_tokens
    if P + O > spec.context_len:
        raise ConfigError(f"prompt {P} + output {O} tokens exceed the model's context of {spec.context_len}")
    contiguous = req.beam * spec.context_len  # the whole context reserved per beam
    paged = b * (math.ceil(P / b) + req.beam * math.ceil(O / b))  # the prompt's blocks shared by the beams
    used = P + req.beam * O
    groups = KVGroups.of(spec, pp)
    block_bytes = per_token * b * groups.group_layers / math.ceil(spec.layers / pp)  # (a draft's share with it)
    blocks = int(kv // block_bytes) if groups.hybrid else capacity // b
    if groups.hybrid:  # sliding-window layers keep their window's blocks only (costmodel.kv_groups)
        window = groups.held(P + O, P + O - 1, b) - groups.full_groups * math.ceil((P + O) / b)
        per_sequence = groups.full_groups * paged // b + req.beam * window
        max_batch_paged = blocks // max(1, per_sequence)
    else:
        max_batch_paged = capacity // paged
    return KVBudget(
        weights_gib=weights / 2**30, workspace_gib=workspace / 2**30, kv_gib=kv / 2**30,
        kv_bytes_per_token_gpu=per_token, capacity_tokens=capacity, reserved_tokens_contiguous=contiguous,
        reserved_tokens_paged=paged, used_tokens=used, max_batch_contiguous=capacity // contiguous,
        max_batch_paged=max_batch_paged, pool_blocks=blocks, pool_block_bytes=block_bytes,
    )


def prefill_s(spec: ModelSpec, cluster: Cluster, req: ServingRequest, tp: int, pp: int, batch: int = 1,
              expert_parallel: bool = False) -> float:
    """`batch` prompts through every stage, and the logits of their last tokens (under expert
    parallelism the experts whole over tp: the training model's ep = tp with whole experts)."""
    cluster = engine_cluster(cluster, req.engine)
    ep = {"ep": tp, "expert_tp": 1} if expert_parallel else {}
    s = Strategy(tp=tp, precision=compute_dtype(req.precision), microbatch_size=batch, global_batch=batch,
                 seq_len=req.prompt_len, sequence_parallel=False, **ep)
    # serving engines (vLLM, TensorRT-LLM) run fused kernels over bf16 weights, whatever runtime priced training
    cluster = with_runtime(cluster, FUSED)
    tp_group, cp_group = cluster.group(tp, 1), cluster.group(1, tp)
    per_layer = layer_cost(spec.with_seq_len(req.prompt_len), s, cluster, tp_group, cp_group).forward.total
    dev, e = cluster.device, req.bytes_per_value
    logits = dev.gemm_s(2.0 * batch * spec.hidden * spec.vocab / tp, e * spec.hidden * spec.vocab / tp,
                        compute_dtype(req.precision))
    hops = (pp - 1) * send_recv_s(batch * req.prompt_len * spec.hidden * e, cluster.p2p_link(tp))
    return spec.layers * per_layer + logits + hops


def token_layer_s(spec: ModelSpec, cluster: Cluster, dtype: str, tp: int, rows: float,
                  expert_parallel: bool = False) -> float:
    """One layer's work that scales with the `rows` tokens of an iteration (every sequence's
    new tokens: decodes and prefill chunks alike), attention aside: the weight GEMMs (skinny at
    few rows: at the device's efficiency for their size, bounded below by reading the weights;
    a mixture of experts reads the experts the rows reach), norms, residuals and activation,
    host dispatch, and two tensor-parallel all-reduces of (rows, hidden). `dtype`: the serving
    precision (a weight format computes in its dtype, its experts read at their stored width)."""
    dtype, xe = compute_dtype(dtype), expert_weight_bytes(dtype)
    dev, e = cluster.device, BYTES[dtype]
    q, kv = spec.q_dim // tp, kv_heads_per_gpu(spec, tp) * spec.head_dim
    f = spec.ffn_hidden // tp
    up = 2 * f if spec.gated else f
    gemms = sum(gemm_s(dev, dtype, rows, k, n, e) for k, n in ((spec.hidden, q + 2 * kv), (q, spec.hidden)))
    dense_mlp = gemm_s(dev, dtype, rows, spec.hidden, up, e) + gemm_s(dev, dtype, rows, f, spec.hidden, e)
    if spec.moe:  # the experts the batch's tokens reach: each read once, over its share of the rows
        E, k = spec.experts, spec.experts_per_token
        if expert_parallel:  # the busiest GPU's copies over its experts/tp whole experts
            local = E / tp
            copies = rows * k / tp * rank_imbalance(E, tp, EXPERT_LOAD_CV)
            touched = local * (1 - (1 - 1 / local) ** copies)
            fe = spec.expert_ffn_hidden
        else:
            copies = rows * k
            touched = E * (1 - (1 - k / E) ** rows)
            fe = spec.expert_ffn_hidden // tp
        sparse = sum(grouped_gemm_s(dev, dtype, copies, touched, kk, n, e, xe)
                     for kk, n in ((spec.hidden, 2 * fe if spec.gated else fe), (fe, spec.hidden)))
        sparse += gemm_s(dev, dtype, rows, spec.hidden, E, e)  # the router
        if spec.shared_expert_ffn_hidden:
            fs = spec.shared_expert_ffn_hidden // tp
            sparse += (gemm_s(dev, dtype, rows, spec.hidden, 2 * fs if spec.gated else fs, e)
                       + gemm_s(dev, dtype, rows, fs, spec.hidden, e))
        share = spec.moe_share
        gemms += share * sparse + (1 - share) * dense_mlp
    else:
        gemms += dense_mlp
    elementwise = dev.memory_s(rows * (10 * spec.hidden + 3 * f) * e)  # norms, residuals, activation, rope
    layer = gemms + elementwise + dev.layer_overhead_s(tensor_parallel=tp > 1, fsdp=False)[0]
    if tp > 1:
        layer += 2 * tensor_all_reduce_s(rows * spec.hidden * e, cluster, tp)
    return layer


def grouped_gemm_s(dev, dtype: str, copies: float, experts: float, k: int, n: int, e: float,
                   weight_bytes: float | None = None) -> float:
    """One fused MoE projection (vLLM's fused_moe, TensorRT-LLM's MoE plugin: one kernel over
    every expert): `copies` token rows, each through one of `experts` (k x n) weights. Its
    FLOPs at the device's efficiency for the launch's whole size (the experts' tiles share the
    SMs in one wave), bounded below by reading each reached expert's weights once (at
    `weight_bytes` each: a weight format's stored width, `e` by default), every row's input and
    writing its output; the skinny curve where the experts get few rows each."""
    flops = 2.0 * copies * k * n
    moved = (e if weight_bytes is None else weight_bytes) * experts * k * n + e * copies * (k + n)
    return dev.gemm_s(flops, moved, dtype, rows=int(copies / experts) if experts else 0)


def tensor_all_reduce_s(nbytes: float, cluster: Cluster, tp: int) -> float:
    """One all-reduce of `nbytes` over a replica's tp GPUs: NCCL's, or the serving engine's
    own kernel inside a node where it is faster (costmodel.serving_engine: custom_all_reduce)."""
    group = cluster.group(tp, 1)
    nccl = all_reduce_s(nbytes, group)
    if group.nodes > 1 or nbytes <= 0:
        return nccl
    for degree, floor_s, bytes_per_s in cluster.device.custom_all_reduce:
        if degree >= tp:
            return min(nccl, floor_s + nbytes / bytes_per_s)
    return nccl


def decode_attention_s(spec: ModelSpec, cluster: Cluster, dtype: str, tp: int, rows: float, context: float,
                       kv_bytes: int | None = None) -> float:
    """A layer's attention of `rows` single-token queries, each over `context` cached tokens
    (its K and V, or latent, read once, `kv_bytes` a value: the activations' width by default):
    memory-bound. The mean over the layers: a sliding-window layer reads the last
    attention_window tokens only (the kernel skips the rest, whatever the cache holds).

    An engine whose decode kernel gives each query head its own thread block on CUDA cores
    (device.decode_fp32_share > 0: TensorRT-LLM's masked multi-head attention) computes the same
    FLOPs at that share of the fp32 peak, unless it has a grouped kernel for the model's query
    heads per KV head (device.grouped_decode_ratios): bound by reading the cache for multi-head
    attention (one FLOP a byte in 16 bits), by the CUDA cores where a KV head serves several
    query heads. Latent attention (kv_lora_rank) keeps the fused kernel."""
    width = kv_values_per_token_gpu(spec, tp) * (kv_bytes or kv_value_bytes(dtype))
    dtype = compute_dtype(dtype)
    dev, e = cluster.device, BYTES[dtype]
    q = spec.q_dim // tp
    per_head_rate = per_head_decode_flops_per_s(spec, dev, tp)

    def one(keys: float) -> float:
        flops = 4.0 * rows * keys * q
        fused = dev.attention_s(flops, rows * keys * width + 2 * rows * q * e, dtype, decode=True)
        return max(fused, flops / per_head_rate) if per_head_rate else fused

    windowed = spec.windowed_layers / spec.layers if spec.attention_window and context > spec.attention_window else 0.0
    full = one(context)
    # (a chunked layer's query sees its chunk so far: half a chunk on average over the sequences)
    near = spec.attention_window / 2 if spec.attention_chunked else spec.attention_window
    return full if not windowed else (1 - windowed) * full + windowed * one(near)


def per_head_decode_flops_per_s(spec: ModelSpec, dev, tp: int) -> float:
    """The FLOP rate of the engine's per-query-head decode kernel for `spec` at `tp` (its share
    of the device's fp32 peak), or 0 where the engine decodes it with a grouped tensor-core
    kernel: it has no per-head one, it has a grouped one for the query heads per KV head a GPU
    holds, or the model's attention is latent."""
    fp32_tflops = dev.peak_tflops.get("fp32", 0.0)  # (a profile without it: the fused kernel's pricing)
    if not dev.decode_fp32_share or not fp32_tflops or spec.kv_lora_rank:
        return 0.0
    ratio = (spec.heads // tp) // kv_heads_per_gpu(spec, tp)
    grouped = ratio > 1 if dev.grouped_decode_ratios == "all" else ratio in dev.grouped_decode_ratios
    if grouped:
        return 0.0
    return fp32_tflops * 1e12 * dev.decode_fp32_share


def window_prefill(spec: ModelSpec, computed: float, take: float) -> tuple[float, float]:
    """(query-key pairs, keys read) of a prefill chunk of `take` tokens after `computed` cached
    ones in a sliding-window layer: each query sees at most attention_window keys (its own
    included), in a chunked layer the keys of its attention chunk from its start (the keys read:
    the chunks the positions span); a full-attention layer's are (take (computed + (take + 1) / 2),
    computed + take)."""
    w = spec.attention_window
    full = (take * (computed + (take + 1) / 2), computed + take)
    if not w or computed + take <= w:
        return full
    first, last = computed + 1, computed + take  # the chunk's positions (1-based)
    if spec.attention_chunked:  # each position sees its own attention chunk from that chunk's start
        return spec.chunked_pairs(last) - spec.chunked_pairs(first - 1), last - (first - 1) // w * w
    below = max(0.0, min(last, w) - first + 1)  # positions that still see every key before them
    pairs = below * (first + first + below - 1) / 2 + (take - below) * w
    return pairs, min(computed, w) + take


def head_s(spec: ModelSpec, cluster: Cluster, dtype: str, tp: int, rows: float) -> float:
    """The logits of `rows` tokens (vocab-parallel over tp)."""
    dtype = compute_dtype(dtype)
    return gemm_s(cluster.device, dtype, rows, spec.hidden, -(-spec.vocab // tp), BYTES[dtype])


def decode_step_s(spec: ModelSpec, cluster: Cluster, req: ServingRequest, tp: int, pp: int, batch: int,
                  context: float, expert_parallel: bool = False) -> float:
    """One token for every sequence of the batch with `context` tokens cached (per beam): per
    layer the token work (token_layer_s) and attention reading the cache; the head; the
    pipeline hops (a token goes through the stages one after the other)."""
    return _queries_step_s(spec, cluster, req, tp, pp, batch, context, expert_parallel, queries=1)


def verify_step_s(spec: ModelSpec, cluster: Cluster, req: ServingRequest, tp: int, pp: int, batch: int,
                  context: float, expert_parallel: bool = False) -> float:
    """The target model's check of draft_len proposed tokens for every sequence of the batch
    (speculative decoding): draft_len + 1 query rows a sequence through the weights and the head
    (the token work grows with them: compute-bound at a large batch), its cache read once by its
    queries together (FlashAttention's decode over a short query run)."""
    return _queries_step_s(spec, cluster, req, tp, pp, batch, context, expert_parallel, queries=req.draft_len + 1)


def _queries_step_s(spec: ModelSpec, cluster: Cluster, req: ServingRequest, tp: int, pp: int, batch: int,
                    context: float, expert_parallel: bool, queries: int) -> float:
    """A step of `queries` query rows for every sequence (per beam) of the batch over `context`
    cached tokens: the rows through each layer's token work and the head, each sequence's cache
    read once, the rows' activations across the stages."""
    cluster = engine_cluster(cluster, req.engine)
    dtype, e = req.precision, req.bytes_per_value
    seqs = batch * req.beam
    rows = seqs * queries
    layer = (token_layer_s(spec, cluster, dtype, tp, rows, expert_parallel)
             + decode_attention_s(spec, cluster, dtype, tp, seqs, context, req.kv_bytes_per_value))
    hops = (pp - 1) * send_recv_s(rows * spec.hidden * e, cluster.p2p_link(tp))
    return spec.layers * layer + head_s(spec, cluster, dtype, tp, rows) + hops


@dataclass(frozen=True, slots=True, kw_only=True)
class ServingPoint:
    tp: int
    pp: int
    replicas: int
    batch: int
    ttft_s: float
    tpot_s: float
    throughput_tokens_per_s: float  # the whole cluster
    budget: KVBudget
    speculative_speedup: float = 1.0
    expert_parallel: bool = False  # the experts whole, experts/tp per GPU (vLLM --enable-expert-parallel)

    @property
    def gpus(self) -> int:
        return self.tp * self.pp * self.replicas

    @property
    def label(self) -> str:
        return layout_label(self.tp, self.pp, self.expert_parallel)

    def to_dict(self) -> dict:
        b = self.budget
        return {
            "tp": self.tp, "pp": self.pp, "replicas": self.replicas, "batch": self.batch,
            "expert_parallel": self.expert_parallel,
            "ttft_ms": round(self.ttft_s * 1e3, 3), "tpot_ms": round(self.tpot_s * 1e3, 3),
            "throughput_tokens_per_s": round(self.throughput_tokens_per_s, 1),
            "speculative_speedup": round(self.speculative_speedup, 3),
            "weights_gib_per_gpu": round(b.weights_gib, 2), "kv_gib_per_gpu": round(b.kv_gib, 2),
            "kv_capacity_tokens": b.capacity_tokens, "max_batch_paged": b.max_batch_paged,
            "max_batch_contiguous": b.max_batch_contiguous,
            "fragmentation_paged": round(b.fragmentation_paged, 4),
            "fragmentation_contiguous": round(b.fragmentation_contiguous, 4),
        }


def evaluate(spec: ModelSpec, cluster: Cluster, req: ServingRequest, tp: int, pp: int, batch: int,
             budget: KVBudget | None = None, expert_parallel: bool = False) -> ServingPoint:
    cluster = engine_cluster(cluster, req.engine)
    budget = budget or kv_budget(spec, cluster, req, tp, pp)
    prefill = prefill_s(spec, cluster, req, tp, pp, expert_parallel=expert_parallel)
    # the engine prefills prompts together up to its token budget (PREFILL_TOKENS)
    group = max(1, min(batch, PREFILL_TOKENS // req.prompt_len))
    prefills = batch / group  # (on average: the groups of a steady stream of requests)
    prefill_group = prefill if group == 1 else prefill_s(spec, cluster, req, tp, pp, group, expert_parallel)
    # pp > 1: the batch runs as pp micro-batches in flight (vLLM's virtual engines), each token of
    # one a traversal of the stages while the others' fill the stages; so do the prompts
    micro, in_flight = -(-batch // pp), min(prefills, pp)
    tpot = decode_step_s(spec, cluster, req, tp, pp, micro, req.prompt_len + req.output_len / 2, expert_parallel)
    ttft = prefill + tpot
    speedup = 1.0
    if req.speculative:
        # a round: draft_len draft steps (none for n-gram proposals) and the target's check of
        # them (draft_len + 1 rows a sequence: a decode step's cost while the weights' read bounds
        # it, more once the rows make it compute-bound), expected (1 - a^(g+1)) / (1 - a) tokens
        # (Leviathan et al.)
        context = req.prompt_len + req.output_len / 2
        draft = 0.0 if req.ngram else decode_step_s(req.draft, cluster, req, tp, 1, micro, context)
        verify = verify_step_s(spec, cluster, req, tp, pp, micro, context, expert_parallel)
        speedup = speculative_speedup(req.acceptance, req.draft_len, draft / verify) * tpot / verify
        tpot /= speedup
    replicas = cluster.world_size // (tp * pp)
    total = req.output_len * tpot + prefills * prefill_group / in_flight
    return ServingPoint(tp=tp, pp=pp, replicas=replicas, batch=batch, ttft_s=ttft, tpot_s=tpot,
                        throughput_tokens_per_s=replicas * batch * req.output_len / total, budget=budget,
                        speculative_speedup=speedup, expert_parallel=expert_parallel)


@dataclass(frozen=True, slots=True, kw_only=True)
class ServingPlan:
    best: ServingPoint
    # (tp, pp, expert_parallel) -> the points by batch
    curves: dict[tuple[int, int, bool], list[ServingPoint]] = field(default_factory=dict)
    refused: dict[tuple[int, int, bool], str] = field(default_factory=dict)


def _batches(limit: int) -> list[int]:
    out, b = [], 1
    while b < limit:
        out.append(b)
        b *= 2
    return out + [limit]


SPECULATION_PP = "speculative decoding runs with pp 1 (vLLM's proposers do not pipeline); give --tp instead"


def speculation_problems(pp: int, speculative: bool) -> list[str]:
    """Why a replica of `pp` stages cannot speculate (vLLM's draft, n-gram and EAGLE proposers
    run on an unpipelined replica)."""
    return [SPECULATION_PP] if speculative and pp > 1 else []


def plan_serving(spec: ModelSpec, cluster: Cluster, req: ServingRequest, *, tp: int | None = None,
                 pp: int | None = None) -> ServingPlan:
    """Search tp (within a node) x pp x replicas, expert parallelism for a mixture of experts,
    and the batch: the most tokens per second whose TTFT and TPOT meet the targets, with the KV
    cache in paged blocks. A given `tp` or `pp` is fixed.

    Formulation: enumerate every layout tp * pp dividing the GPU count with tp <= GPUs per
    node and the heads splitting (layout_problems), for a mixture of experts with tp > 1 each
    with its experts split over tp and held whole (expert parallelism); for each, batches 1, 2,
    4, ... up to the paged KV capacity (or the requested batch); keep the points meeting
    max_ttft/max_tpot; maximise cluster throughput. Exhaustive, so the optimum over the grid is
    exact."""
    cluster = engine_cluster(cluster, req.engine)
    n = cluster.world_size
    want_tp, want_pp = tp, pp  # (the loop below names each layout's tp and pp)
    check_degrees(tp=want_tp, pp=want_pp)
    if want_pp is not None and speculation_problems(want_pp, req.speculative):
        raise ConfigError(SPECULATION_PP)
    if n % ((want_tp or 1) * (want_pp or 1)) or (want_tp or 1) > cluster.gpus_per_node:
        raise ConfigError(f"tp({want_tp or 1}) x pp({want_pp or 1}) must divide the {n} GPUs of {cluster.name}, tp "
                          f"within a node of {cluster.gpus_per_node}; choose degrees that do")
    curves, refused, best = {}, {}, None
    layouts = [(t, p, ep) for t in [d for d in range(1, min(n, cluster.gpus_per_node) + 1) if n % d == 0]
               for p in [d for d in range(1, n // t + 1) if (n // t) % d == 0]
               for ep in ((False, True) if spec.moe and t > 1 else (False,))
               if (want_tp is None or t == want_tp) and (want_pp is None or p == want_pp)]
    for tp, pp, ep in layouts:
        why = layout_problems(spec, tp, pp, ep) + speculation_problems(pp, req.speculative)
        if why:
            refused[(tp, pp, ep)] = "; ".join(why)
            continue
        budget = kv_budget(spec, cluster, req, tp, pp)
        if budget.max_batch_paged < 1:
            refused[(tp, pp, ep)] = (f"weights need {budget.weights_gib:.1f} GiB per GPU, leaving no room for one "
                                     f"sequence's KV cache on {cluster.device.hbm_gib:g} GiB")
            continue
        if req.batch is not None and req.batch > budget.max_batch_paged:
            refused[(tp, pp, ep)] = (f"batch {req.batch} exceeds the KV capacity of {budget.max_batch_paged} "
                                     "sequences")
            continue
        batches = [req.batch] if req.batch is not None else _batches(budget.max_batch_paged)
        points = [evaluate(spec, cluster, req, tp, pp, b, budget, ep) for b in batches]
        curves[(tp, pp, ep)] = points
        for p in points:
            if req.max_ttft_ms is not None and p.ttft_s * 1e3 > req.max_ttft_ms:
                continue
            if req.max_tpot_ms is not None and p.tpot_s * 1e3 > req.max_tpot_ms:
                continue
            if best is None or p.throughput_tokens_per_s > best.throughput_tokens_per_s:
                best = p
    if best is None:
        points = [(layout, p) for layout, ps in curves.items() for p in ps]
        if points:  # every layout ran, none within the targets: how near each target came
            nearest = []
            for name, cap, of in (("TTFT", req.max_ttft_ms, lambda p: p.ttft_s), ("TPOT", req.max_tpot_ms, lambda p: p.tpot_s)):
                if cap is not None:
                    layout, p = min(points, key=lambda lp: of(lp[1]))
                    nearest.append(f"the lowest {name} is {of(p) * 1e3:.1f} ms ({layout_label(*layout)}, batch {p.batch}) "
                                   f"against {cap:g} ms")
            reasons = "; ".join(nearest)
        else:
            reasons = "; ".join(f"{layout_label(*layout)}: {why}" for layout, why in list(refused.items())[:3])
        targets = " within the latency targets" if req.max_ttft_ms or req.max_tpot_ms else ""
        raise ConfigError(f"no layout serves {spec.name} on {cluster.name}{targets}"
                          f"{' (' + reasons + ')' if reasons else ''}; add GPUs, shorten the sequences or relax the targets")
    return ServingPlan(best=best, curves=curves, refused=refused)
