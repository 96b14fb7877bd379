"""Serving under traffic: a discrete-event simulation of replicas running an iteration-level
scheduler as vLLM does, priced by the serving cost model (costmodel.serving).

Per replica (tp x pp GPUs), each iteration (Orca's iteration-level scheduling, vLLM's V1
scheduler):

    1. the running sequences, decodes first (one token each), then prompts in progress in
       admission order, each the rest of its prompt up to the token budget (chunked prefill;
       without it a prompt runs whole, in an iteration of prefills only, as vLLM V0 did);
       a sequence whose next tokens need a KV block when none is free first evicts cached
       blocks nobody uses (least recently freed first, a prefix's last blocks before its
       first), then preempts the most recently admitted sequence: by recompute (its blocks
       freed; it waits at the head of the queue and recomputes its prompt and what it
       generated; with prefix caching its full blocks stay cached until evicted, as vLLM V1
       keeps a freed block's hash, so it recomputes only what was evicted meanwhile) or by
       swap (its blocks copied to host memory and back)
    2. then the waiting requests first come, first served while the budget
       (max_num_batched_tokens), max_num_seqs and free blocks allow; a request whose prefix
       (prefix_id) is cached starts with those blocks computed (prefix caching: hit tokens
       are not recomputed; blocks offloaded to host come back over PCIe); an iteration that
       preempts admits nothing (vLLM V1), one that preempted all it ran is scheduled again
       at once (vLLM's next step), and under
       multi-step scheduling (num_scheduler_steps k, vLLM 0.6) decodes run k steps at a
       time with no admission between them
    3. the iteration's time (IterationCost): the token work of every scheduled token
       (GEMMs, norms, all-reduces: costmodel.serving.token_layer_s), the attention of the
       decodes (reading their caches) and of the prefill chunks (causal, over what each has
       computed), the logits of the sequences that emit a token, the pipeline hops
    4. a sequence whose prompt is computed emits a token per iteration (its blocks within its
       shared prefix join the prefix cache then); it finishes at its output length and gives
       its full blocks to the prefix cache under its prefix_id

A replica of pp > 1 stages runs pp virtual engines (vLLM V0's, one scheduler each over 1/pp of
the KV blocks; V1 keeps pp batches in flight the same way): each iteration of one is a traversal
of the stages (the pipeline hops included), each stage taking 1/pp of it as soon as the stage is
free of the other engines' batches (in the order the iterations start). With every engine busy
and their batches alike the stages are full: a replica's throughput is pp batches per traversal
while a token's latency is one traversal; unequal batches leave bubbles. A run of repeated
decode steps waits for the stages on its first traversal only (its later ones take 1/pp of each
stage, the rest left to the other engines), and ends where a sibling engine with requests
queued ends its iteration, so that their prompts share the stages with its next steps.

Replicas (and virtual engines) share the arrivals (each to the one with the fewest requests in
it). With
disaggregation (DistServe, Splitwise) prefill replicas run prompts only and send each
request's KV cache to the decode replica with the fewest requests over the inter-node link;
its first token comes from the prefill replica.

Metrics (per request): TTFT = first token - arrival; TPOT = (finish - first token) /
(output - 1); end-to-end = finish - arrival. Goodput (DistServe): requests per second that
meet every latency objective. Throughput: output tokens per second from the first arrival to
the last finish.

Simplifications, stated: a replica's stages are equal (each 1/pp of the traversal; the first
stage's embedding and the last's head are not told apart); a sliding-window layer's attention
reads and pairs within its window (costmodel.serving.window_prefill, decode_attention_s) and its
KV blocks are freed past the window as vLLM V1's hybrid allocator frees them (costmodel.kv_groups:
the pool counts group-blocks), but a prefix cache entry holds its full-attention layers' blocks
only (a hit takes the window's blocks before it as cached; every layer windowed: an entry costs
nothing) and a hit or a preempted sequence's own cached blocks do not recompute the window's; a
prefill replica's KV
transfers queue on its GPUs' links, one after another, but a decode replica receives any number
at once; the host link's bandwidth is the PCIe datasheet's (HOST_LINK_GB_PER_S).
"""

from __future__ import annotations

import bisect
import heapq
import math
from collections import OrderedDict, deque
from dataclasses import dataclass, replace

import numpy as np

from costmodel.cluster import Cluster, with_runtime
from costmodel.collectives import send_recv_s
from costmodel.errors import ConfigError
from costmodel.kv_groups import KVGroups
from costmodel.runtime import FUSED
from costmodel.serving_engine import DEFAULT_ENGINE, ServingEngine, check_engine_name, engine_cluster
from costmodel.serving import (BYTES, DEFAULT_ACCEPTANCE, GPU_MEMORY_UTILIZATION, SPECULATION_PP, KVBudget,
                               ServingRequest, check_kv_cache, check_serving_precision, cli_flag, compute_dtype,
                               decode_attention_s, expected_tokens, head_s,
                               kv_budget, kv_bytes_per_token, kv_value_bytes, kv_values_per_token_gpu, layout_label,
                               layout_problems, speculation_problems, token_layer_s, window_prefill)
from costmodel.spec import ModelSpec
from costmodel.workload import Request

# host <-> GPU copies (swap, offloaded prefixes): PCIe x16 datasheet figures per direction, GB/s
# (Gen4 on A100, Gen5 on H100/H200/B200; GB200's NVLink-C2C 450 GB/s per direction); not measured
HOST_LINK_GB_PER_S = {"ampere": 32.0, "hopper": 64.0, "blackwell": 64.0, "grace-blackwell": 450.0}
DEFAULT_HOST_LINK_GB_PER_S = 32.0
PREEMPTION_MODES = ("recompute", "swap")
OWN = "own"  # the prefix cache's key for a preempted sequence's own blocks: (OWN, its index)
CACHE_EVICTION = ("drop", "host")  # an evicted cached prefix: forgotten, or kept in host memory


@dataclass(frozen=True, slots=True, kw_only=True)
class SchedulerConfig:
    """vLLM's engine arguments that shape an iteration (their defaults as of vLLM V1)."""

    max_num_seqs: int = 256
    max_num_batched_tokens: int = 8192
    chunked_prefill: bool = True
    prefix_caching: bool = True
    block_tokens: int = 16
    preemption: str = "recompute"
    evicted_prefix: str = "drop"  # "host": evicted cached prefixes go to host memory (LMCache-style offload)
    num_gpu_blocks_override: int | None = None  # vLLM's flag: KV blocks per replica instead of what memory allows
    # vLLM V0's multi-step scheduling (--num-scheduler-steps, 0.6-0.10): the decodes run this
    # many steps at a time and waiting requests are admitted only between such runs
    num_scheduler_steps: int = 1
    engine: str = DEFAULT_ENGINE  # the serving engine profile (profiles/serving): what share of the GPU it reaches
    kv_cache_dtype: str = "auto"  # --kv-cache-dtype: "auto" the layout's precision, or fp8 (half a bf16 cache)
    gpu_memory_utilization: float = GPU_MEMORY_UTILIZATION  # the share of each GPU the engine may use
    # speculative decoding (vLLM's --speculative-config): a decode proposes this many tokens (0: off),
    # each accepted with `acceptance`, proposed by `draft` (a model run on the replica's GPUs) or by
    # n-gram lookup in the prompt (draft None: no GPU work)
    speculative_tokens: int = 0
    acceptance: float = DEFAULT_ACCEPTANCE
    draft: ModelSpec | None = None

    def __post_init__(self) -> None:
        if self.num_gpu_blocks_override is not None and (isinstance(self.num_gpu_blocks_override, bool) or not isinstance(
                self.num_gpu_blocks_override, int) or self.num_gpu_blocks_override < 1):
            raise ConfigError(f"--num-gpu-blocks-override must be a positive integer, got {self.num_gpu_blocks_override!r}")
        for name in ("max_num_seqs", "max_num_batched_tokens", "block_tokens", "num_scheduler_steps"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"--{cli_flag(name)} must be a positive integer, got {value!r}")
        if self.preemption not in PREEMPTION_MODES:
            raise ConfigError(f"--preemption {self.preemption!r}; use one of {', '.join(PREEMPTION_MODES)}")
        check_engine_name(self.engine)
        check_kv_cache(self.kv_cache_dtype, self.gpu_memory_utilization)
        if self.evicted_prefix not in CACHE_EVICTION:
            raise ConfigError(f"--evicted-prefix {self.evicted_prefix!r}; use one of {', '.join(CACHE_EVICTION)}")
        k = self.speculative_tokens
        if isinstance(k, bool) or not isinstance(k, int) or k < 0:
            raise ConfigError(f"--draft-len must be a positive integer, got {k!r}")
        if isinstance(self.acceptance, bool) or not isinstance(self.acceptance, (int, float)) or not (
                0 <= self.acceptance < 1):
            raise ConfigError(f"--acceptance must be in [0, 1), got {self.acceptance!r}")
        if self.draft is not None and not k:
            raise ConfigError("a draft model needs speculative tokens (--draft-len)")
        if k and self.num_scheduler_steps > 1:
            raise ConfigError("--num-scheduler-steps > 1 does not run with speculative decoding (vLLM refuses both)")

    @property
    def tokens_per_check(self) -> float:
        """Tokens a decode emits a step on average: the accepted drafts and the target's own
        (Leviathan et al. 2023: (1 - a^(k+1)) / (1 - a)); 1 without speculation."""
        return expected_tokens(self.acceptance, self.speculative_tokens)


@dataclass(frozen=True, slots=True, kw_only=True)
class SLO:
    """Latency objectives on percentiles of TTFT, TPOT and end-to-end latency, in seconds."""

    targets: tuple[tuple[str, float, float], ...] = ()  # (metric, percentile, seconds)

    @classmethod
    def parse(cls, text: str | None) -> SLO:
        """'ttft_p99=0.5,tpot_p99=0.05' (seconds; a 'ms' suffix for milliseconds)."""
        if not text:
            return cls()
        out = []
        for part in text.split(","):
            key, _, value = part.strip().partition("=")
            metric, _, pct = key.partition("_p")
            if metric not in ("ttft", "tpot", "e2e") or not pct.isdigit() or not 0 < int(pct) <= 100 or not value:
                raise ConfigError(f"--slo {part.strip()!r}: write METRIC_pNN=SECONDS with METRIC ttft, tpot or e2e, "
                                  "e.g. ttft_p99=0.5,tpot_p99=50ms")
            try:
                seconds = float(value[:-2]) / 1e3 if value.endswith("ms") else float(value.rstrip("s"))
            except ValueError:
                raise ConfigError(f"--slo {part.strip()!r}: {value!r} is not a time (seconds, or ms)") from None
            if not seconds > 0:
                raise ConfigError(f"--slo {part.strip()!r}: the target must be positive")
            out.append((metric, float(pct), seconds))
        return cls(targets=tuple(out))

    def met_by(self, ttft: float, tpot: float, e2e: float) -> bool:
        """Whether one request meets every target (each percentile's target applies to every
        request, as DistServe counts goodput: the share that meets it must reach the percentile)."""
        values = {"ttft": ttft, "tpot": tpot, "e2e": e2e}
        return all(values[m] <= s for m, _, s in self.targets)


class IterationCost:
    """Seconds of one iteration on a tp x pp replica from its composition. The token work is
    tabulated at powers of two of the token count and interpolated linearly between them
    (GEMM time is piecewise linear in rows between the efficiency curve's points)."""

    def __init__(self, spec: ModelSpec, cluster: Cluster, tp: int, pp: int, precision: str, max_tokens: int,
                 expert_parallel: bool = False, engine: ServingEngine | str = DEFAULT_ENGINE,
                 kv_cache_dtype: str = "auto"):
        check_serving_precision(precision, spec)
        # the GPU as the serving engine runs it (a cluster already priced for one stays as it is),
        # with fused kernels whatever runtime priced training
        cluster = with_runtime(engine_cluster(cluster, engine), FUSED)
        self.spec, self.cluster, self.tp, self.pp, self.dtype = spec, cluster, tp, pp, compute_dtype(precision)
        self.e = BYTES[self.dtype]
        grid = [1]
        while grid[-1] < max_tokens:
            grid.append(grid[-1] * 2)
        self._grid = grid
        link = cluster.p2p_link(tp)
        self._token = [spec.layers * token_layer_s(spec, cluster, precision, tp, n, expert_parallel)
                       + (pp - 1) * send_recv_s(n * spec.hidden * self.e, link) for n in grid]
        self._head = [head_s(spec, cluster, precision, tp, n) for n in grid]
        self._q = spec.q_dim // tp
        self._kv_bytes = kv_value_bytes(precision, kv_cache_dtype)  # (a weight format's cache: its compute dtype's)
        self._kv_token_layer = kv_values_per_token_gpu(spec, tp) * self._kv_bytes  # bytes per cached token, one layer

    def _interp(self, table: list[float], n: float) -> float:
        if n <= 0:
            return 0.0
        grid = self._grid
        if n >= grid[-1]:
            return table[-1] * n / grid[-1]
        i = bisect.bisect_left(grid, n)
        if grid[i] == n or i == 0:
            return table[i] * (n / grid[i] if i == 0 else 1.0)
        lo, hi = grid[i - 1], grid[i]
        return table[i - 1] + (table[i] - table[i - 1]) * (n - lo) / (hi - lo)

    def seconds(self, tokens: int, logits: int, decode_rows: int, decode_context: float,
                prefill_pairs: float, prefill_kv_tokens: float, window_pairs: float | None = None,
                window_kv_tokens: float | None = None) -> float:
        """`tokens` scheduled in all; `logits` sequences emitting a token; `decode_rows`
        single-token queries over `decode_context` cached tokens in all; prefill chunks whose
        causal query-key pairs sum to `prefill_pairs` over `prefill_kv_tokens` keys in all, and
        in a sliding-window layer to `window_pairs` over `window_kv_tokens` (costmodel.serving.
        window_prefill; the full figures where not given)."""
        t = self._interp(self._token, tokens) + self._interp(self._head, logits)
        layers, dev = self.spec.layers, self.cluster.device
        if decode_rows:
            t += layers * decode_attention_s(self.spec, self.cluster, self.dtype, self.tp, decode_rows,
                                             decode_context / decode_rows, self._kv_bytes)
        if prefill_pairs:
            def attention(pairs: float, kv_tokens: float) -> float:
                moved = 2 * (tokens - decode_rows) * self._q * self.e + kv_tokens * self._kv_token_layer
                return dev.attention_s(4.0 * pairs * self._q, moved, self.dtype)

            windowed = self.spec.windowed_layers
            t += (layers - windowed) * attention(prefill_pairs, prefill_kv_tokens)
            if windowed:
                t += windowed * attention(prefill_pairs if window_pairs is None else window_pairs,
                                          prefill_kv_tokens if window_kv_tokens is None else window_kv_tokens)
        return t


@dataclass(slots=True, eq=False)
class _Seq:
    req: Request
    index: int  # position in the simulation's list
    prompt: int  # the request's prompt tokens
    output: int  # and its output tokens
    computed: int = 0  # tokens whose KV is in the cache (or elsewhere, see kv_at)
    generated: int = 0
    own_blocks: int = 0
    prefix_hit_blocks: int = 0  # shared blocks referenced from the prefix cache
    kv_at: str = ""  # "host": swapped out (copied back on admission); "remote": sent by a prefill replica
    preempted_hit_blocks: int = 0  # shared prefix blocks it referenced when preempted (its own cached ones follow them)
    units: int = 0  # group-blocks of the pool it holds (costmodel.kv_groups; own_blocks where no layer is windowed)
    alloc_from: int = 0  # its computed tokens when its slots were last allocated (a window frees from there)
    window_past: bool = False  # in the decode aggregate: frees a window block every block it decodes
    accepted: float = 0.0  # speculative decoding: expected tokens emitted so far one by one (their fractions carried)
    first_token_s: float = math.nan
    finish_s: float = math.nan
    arrival_s: float = math.nan  # when the client sent it: its trace time, or under a concurrency limit when let go
    admitted: int = 0  # admission counter (0: never admitted)
    # decoding, kept in the replica's aggregate: computed = c0 + P(tick), generated = g0 + P(tick) (P: the
    # tokens a decode emits in `tick` steps, tick itself without speculation)
    lazy: bool = False
    c0: int = 0
    g0: int = 0

    @property
    def total(self) -> int:
        """Tokens the sequence has: the prompt and what it generated."""
        return self.prompt + self.generated

    @property
    def decoding(self) -> bool:
        """Whether its next step is a decode: it generated, and only its last token is not cached."""
        return self.generated > 0 and self.computed + 1 == self.prompt + self.generated


@dataclass(slots=True)
class _CacheEntry:
    blocks: int = 0  # on the GPU: the first `blocks` blocks of the prefix (evicted from the end)
    host_blocks: int = 0  # offloaded
    refs: int = 0


class _Replica:
    """One replica's scheduler state. Sequences that decode are kept in aggregate (their count,
    the sum of their cached tokens, how many sit at each offset within a block, a heap of the
    iterations they finish at): an iteration of n decodes costs O(block size), not O(n). The
    others (prompts in progress; every sequence when blocks run short) are handled one by one.

    Under speculative decoding a decode step schedules 1 + k tokens (slots for them: vLLM's
    lookahead) and emits P(t + 1) - P(t) of them, P(t) = floor(t E) with E the expected tokens a
    check emits, the same for every aggregate sequence; without it P(t) = t."""

    def __init__(self, index: int, role: str, cost: IterationCost, blocks: int, cfg: SchedulerConfig,
                 host_gb_per_s: float, block_bytes: float, groups: KVGroups | None = None,
                 draft_cost: IterationCost | None = None):
        self.index, self.role, self.cost, self.cfg = index, role, cost, cfg
        # the pool in group-blocks (costmodel.kv_groups): a sequence's position-blocks hold every
        # group's, a sliding-window group's only within the window; a prefix cache entry holds
        # its full-attention groups' blocks (full_units a position-block)
        self.groups = groups or KVGroups(group_layers=1, full_groups=1, window_groups=0, window=0)
        self.full_units = self.groups.full_groups
        self.total_blocks = blocks
        self.free = blocks
        # speculative decoding: k proposed tokens a decode, E emitted on average, the draft's cost
        self.spec = cfg.speculative_tokens
        self.per_check = cfg.tokens_per_check
        self.draft_cost = draft_cost
        self.waiting: deque[_Seq] = deque()
        self.running: dict[_Seq, None] = {}  # in admission order: the last is preempted first
        self.active: list[_Seq] = []  # the running sequences handled one by one
        self.tick = 0  # decode iterations the aggregate has run
        self.n_lazy = 0
        self.sum_c0 = 0
        self.residues = [0] * cfg.block_tokens  # aggregate sequences by c0 mod block_tokens
        self.finishes: list[tuple[int, int, _Seq, int]] = []  # (tick it finishes at, index, sequence, its g0)
        # sliding-window groups: aggregate sequences whose window has left their shared prefix, by
        # c0 mod block_tokens, and a heap of the ticks the others get there at
        self.past_residues = [0] * cfg.block_tokens
        self.window_heap: list[tuple[int, int, _Seq, int]] = []  # (tick, index, sequence, its c0)
        # LRU, least recently used first: shared prefixes by prefix_id, and by (OWN, index) the
        # blocks a sequence preempted by recompute computed beyond its shared prefix
        self.cache: OrderedDict[str | tuple[str, int], _CacheEntry] = OrderedDict()
        self.busy = False
        self.host_s_per_block = block_bytes / (host_gb_per_s * 1e9)
        self.admissions = 0
        self.steps_left = 0  # decode steps left in a multi-step run (num_scheduler_steps): no admissions
        self.running_preempted = False  # the last schedule() preempted and scheduled nothing
        self.preemptions = 0
        self.hit_tokens = 0
        self.prompt_tokens = 0
        self.computed_prompt_tokens = 0  # prompt (and recomputed) tokens run through the model
        self.iterations = 0
        # per iteration (or run of repeated decodes): start s, seconds, KV share in use, running
        # sequences, sequences scheduled, iterations
        self.usage: list[tuple[float, float, float, int, int, int]] = []

    @property
    def load(self) -> int:
        return len(self.waiting) + len(self.running)

    # -- the decode aggregate ---------------------------------------------------------------
    def progress(self, tick: int) -> int:
        """P(tick): the tokens an aggregate decode emits in `tick` steps."""
        return tick if not self.spec else math.floor(tick * self.per_check)

    def _ticks_for(self, tokens: int) -> int:
        """The fewest steps t with P(t) >= tokens."""
        if not self.spec:
            return tokens
        t = math.ceil(tokens / self.per_check) - 1
        while self.progress(t) < tokens:
            t += 1
        return t

    def _held_at(self, seq: _Seq, c0: int, tick: int) -> int:
        """Group-blocks an aggregate sequence holds once step `tick` is scheduled: the slots of
        its 1 + k tokens, its window freed up to what it had computed."""
        c = c0 + self.progress(tick)
        return self.groups.held(c + 1 + self.spec, c, self.cfg.block_tokens, seq.prefix_hit_blocks)

    def _to_lazy(self, seq: _Seq) -> None:
        done = self.progress(self.tick)
        c0 = seq.computed - done
        seq.c0, seq.g0, seq.lazy = c0, seq.generated - done, True
        self.n_lazy += 1
        self.sum_c0 += c0
        B = self.cfg.block_tokens
        self.residues[c0 % B] += 1
        heapq.heappush(self.finishes, (self._ticks_for(seq.output - seq.g0), seq.index, seq, seq.g0))
        # it holds what the aggregate's steps before this one would have it hold (the charges of
        # the steps to come are the differences)
        units = self._held_at(seq, c0, self.tick - 1)
        self.free += seq.units - units
        seq.units, seq.alloc_from = units, c0 + self.progress(self.tick - 1)
        if self.groups.hybrid:  # its window frees blocks of its own once computed >= W - 1 + hit B
            at = self._ticks_for(self.groups.window - 1 + seq.prefix_hit_blocks * B - c0) + 1
            if at <= self.tick:
                seq.window_past = True
                self.past_residues[c0 % B] += 1
            else:
                heapq.heappush(self.window_heap, (at, seq.index, seq, c0))

    def _materialize(self, seq: _Seq) -> None:
        B = self.cfg.block_tokens
        seq.generated = min(seq.output, seq.g0 + self.progress(self.tick))
        seq.computed, seq.lazy = seq.prompt + seq.generated - 1, False
        # what the aggregate charged it: the slots of its last step, its window freed up to it
        seq.alloc_from = seq.c0 + self.progress(self.tick - 1)
        seq.own_blocks = -(-(seq.alloc_from + 1 + self.spec) // B) - seq.prefix_hit_blocks
        seq.units = self._held_at(seq, seq.c0, self.tick - 1)
        self.n_lazy -= 1
        self.sum_c0 -= seq.c0
        self.residues[seq.c0 % B] -= 1
        if seq.window_past:
            seq.window_past = False
            self.past_residues[seq.c0 % B] -= 1

    def _materialize_all(self) -> None:
        for seq in self.running:
            if seq.lazy:
                self._materialize(seq)
        self.active = list(self.running)

    def _next_finish(self) -> int | None:
        """The tick the first aggregate sequence finishes at (stale heap entries dropped)."""
        while self.finishes:
            tick, _, seq, g0 = self.finishes[0]
            if seq.lazy and seq.g0 == g0:
                return tick
            heapq.heappop(self.finishes)
        return None

    def _boundaries(self, steps: int) -> int:
        """Group-blocks the aggregate takes over its next `steps` iterations: a sequence of c
        cached tokens holds the blocks of c + 1 + k slots in every group, a sliding-window group's
        from the block of token c - W + 1 on (telescoped over the steps, by c0 mod block)."""
        B, lookahead = self.cfg.block_tokens, self.spec
        before, after = self.progress(self.tick - 1), self.progress(self.tick + steps - 1)
        grown = sum(count * ((r + after + lookahead) // B - (r + before + lookahead) // B)
                    for r, count in enumerate(self.residues) if count)
        groups = self.groups
        total = (groups.full_groups + groups.window_groups) * grown
        if groups.hybrid:
            total -= groups.window_groups * self._window_frees(steps, before, after)
        return total

    def _window_frees(self, steps: int, before: int, after: int) -> int:
        """Window blocks of their own the aggregate's sequences free over the next `steps`
        iterations (P moving from `before` to `after`): those past their shared prefix by
        c0 mod block, those getting there meanwhile one by one."""
        B, W = self.cfg.block_tokens, self.groups.window
        heap = self.window_heap
        while heap and heap[0][0] <= self.tick:  # past: into the residues
            _, _, seq, c0 = heapq.heappop(heap)
            if seq.lazy and seq.c0 == c0 and not seq.window_past:
                seq.window_past = True
                self.past_residues[c0 % B] += 1
        frees = sum(count * ((r + after - W + 1) // B - (r + before - W + 1) // B)
                    for r, count in enumerate(self.past_residues) if count)
        crossing = []
        while heap and heap[0][0] <= self.tick + steps:
            entry = heapq.heappop(heap)
            _, _, seq, c0 = entry
            if seq.lazy and seq.c0 == c0 and not seq.window_past:
                crossing.append(entry)
                hit = seq.prefix_hit_blocks
                frees += (max(hit, max(0, c0 + after - W + 1) // B) - max(hit, max(0, c0 + before - W + 1) // B))
        for entry in crossing:
            heapq.heappush(heap, entry)
        return frees

    # -- blocks ---------------------------------------------------------------------------
    def _evict(self, need: int, keep: dict | None = None) -> float:
        """Free cached blocks nobody uses, least recently used prefix first and its last blocks
        first (vLLM frees a sequence's blocks last to first), until `need` group-blocks are free,
        each entry keeping at least `keep[key]` blocks (those a sequence being admitted is about
        to use); seconds of copying shared prefixes' blocks to host memory (evicted_prefix 'host')."""
        seconds = 0.0
        per = self.full_units  # group-blocks a cached position-block holds
        for key in list(self.cache):
            if self.free >= need or not per:
                break
            entry = self.cache[key]
            spare = entry.blocks - (keep.get(key, 0) if keep else 0)
            if entry.refs or spare <= 0:
                continue
            take = min(spare, -(-(need - self.free) // per))
            self.free += per * take
            if self.cfg.evicted_prefix == "host" and not isinstance(key, tuple):
                entry.host_blocks = max(entry.host_blocks, entry.blocks)  # host holds [blocks - take, blocks) too
                seconds += per * take * self.host_s_per_block
            entry.blocks -= take
            if not entry.blocks and not entry.host_blocks:
                del self.cache[key]
        return seconds

    def _recharge(self, seq: _Seq, total: int, computed: int) -> None:
        """`seq` holds the slots of `total` tokens, its window freed up to `computed` (its hit
        and own blocks as they are now): the pool gives or takes the difference."""
        units = self.groups.held(total, computed, self.cfg.block_tokens, seq.prefix_hit_blocks)
        self.free += seq.units - units
        seq.units, seq.alloc_from = units, computed

    def _release(self, seq: _Seq) -> None:
        self.free += seq.units
        seq.units = 0
        seq.own_blocks = 0
        if seq.prefix_hit_blocks:
            self.cache[seq.req.prefix_id].refs -= 1
        seq.prefix_hit_blocks = 0

    def _preempt(self, victim: _Seq) -> float:
        """Take `victim` off the GPU; seconds of copying its blocks out (swap)."""
        if victim.lazy:
            self._materialize(victim)
        del self.running[victim]
        if victim in self.active:
            self.active.remove(victim)
        self.preemptions += 1
        seconds = 0.0
        if self.cfg.preemption == "swap":
            seconds = victim.units * self.host_s_per_block
            victim.kv_at = "host"  # a shared prefix it used stays cached; it comes back as its own blocks
        else:
            if self.cfg.prefix_caching:  # its full blocks keep their hashes until evicted
                full = victim.computed // self.cfg.block_tokens - victim.prefix_hit_blocks
                keep = max(0, min(full, victim.own_blocks))
                if keep:
                    self.cache[(OWN, victim.index)] = _CacheEntry(blocks=keep)
                    self.free -= self.full_units * keep  # the cache holds them now (released below)
                    victim.own_blocks -= keep
                victim.preempted_hit_blocks = victim.prefix_hit_blocks
            victim.computed = 0
        self._release(victim)
        self.waiting.appendleft(victim)
        return seconds

    def _prefix_hit(self, seq: _Seq) -> tuple[int, float]:
        """(cached blocks of the request's prefix it can use, seconds of bringing offloaded
        ones back over the host link)."""
        req = seq.req
        if not (self.cfg.prefix_caching and req.prefix_id) or seq.computed:
            return 0, 0.0
        entry = self.cache.get(req.prefix_id)
        usable = min(req.prefix_tokens, req.prompt_tokens - 1) // self.cfg.block_tokens  # the last prompt token runs
        if entry is None or not usable:
            return 0, 0.0
        seconds = 0.0
        back = min(entry.host_blocks, usable) - entry.blocks
        units = self.full_units * back
        if back > 0:  # offloaded: back over the host link
            seconds += self._evict(units, keep={req.prefix_id: entry.blocks})
            if self.free >= units:
                self.free -= units
                entry.blocks += back
                seconds += units * self.host_s_per_block
        return min(entry.blocks, usable), seconds

    def _donate(self, seq: _Seq) -> None:
        """A finished sequence's full blocks go to the prefix cache under its prefix_id (the
        next turn of a conversation, or another request with the same system prompt, finds
        them); the rest are freed."""
        req = seq.req
        if self.cfg.prefix_caching and req.prefix_id:
            entry = self.cache.setdefault(req.prefix_id, _CacheEntry())
            self.cache.move_to_end(req.prefix_id)
            full = seq.computed // self.cfg.block_tokens
            # positions [max(entry, hit), full) come from the sequence's own blocks
            keep = max(0, min(full, seq.prefix_hit_blocks + seq.own_blocks) - max(entry.blocks, seq.prefix_hit_blocks))
            entry.blocks += keep
            self.free -= self.full_units * keep  # the cache holds them now (released below)
            seq.own_blocks -= keep
        self._release(seq)

    def _share_prefix(self, seq: _Seq) -> None:
        """A prompt just computed: its full blocks within the shared prefix join the prefix
        cache at once (vLLM caches a block as soon as it is full), the sequence now referencing
        them there."""
        req = seq.req
        if not (self.cfg.prefix_caching and req.prefix_id):
            return
        entry = self.cache.setdefault(req.prefix_id, _CacheEntry())
        hit = seq.prefix_hit_blocks
        if entry.blocks != hit:  # another sequence cached them first (or more): this one keeps its own
            return
        keep = min(seq.computed, req.prefix_tokens) // self.cfg.block_tokens - hit
        if keep <= 0:
            return
        entry.blocks += keep
        self.free -= self.full_units * keep  # the cache holds them now
        if not hit:
            entry.refs += 1
        seq.prefix_hit_blocks += keep
        seq.own_blocks -= keep
        self._recharge(seq, seq.computed, seq.alloc_from)  # its own blocks start past them
        self.cache.move_to_end(req.prefix_id)

    # -- one iteration ----------------------------------------------------------------------
    def _own_hit(self, seq: _Seq, hit: int) -> int:
        """Blocks `seq` computed beyond its shared prefix before a preemption by recompute that
        are still cached and follow the `hit` shared blocks it finds now (the last prompt token
        runs again). Its cached blocks that cannot serve (those the shared hit covers now, those
        past what it may reuse) are freed, so that the entry starts where the hit ends."""
        key = (OWN, seq.index)
        entry = self.cache.get(key)
        if entry is None or seq.computed:
            return 0
        if hit < seq.preempted_hit_blocks:  # the shared blocks it followed were evicted: useless
            self.free += self.full_units * entry.blocks
            del self.cache[key]
            return 0
        after = entry.blocks - min(entry.blocks, hit - seq.preempted_hit_blocks)  # its positions past `hit`
        own = max(0, min(after, (seq.total - 1) // self.cfg.block_tokens - hit))
        self.free += self.full_units * (entry.blocks - own)
        entry.blocks, seq.preempted_hit_blocks = own, hit
        if not own:
            del self.cache[key]
        return own

    def _admit(self, budget: int, whole: bool, first: bool) -> tuple[_Seq, int, float] | None:
        """Admit the head of the queue for up to `budget` tokens (all of what it has to compute
        when `whole`, however long if it is the iteration's `first`): (sequence, tokens, seconds
        of host copies), or None when it does not fit."""
        seq = self.waiting[0]
        hit, copies = self._prefix_hit(seq)
        own = self._own_hit(seq, hit)
        computed = (hit + own) * self.cfg.block_tokens if hit or own else seq.computed
        need = seq.total - computed
        take = min(need, budget)
        if whole and take < need:
            if not first:
                return None
            take = need  # a prompt longer than the budget runs alone
        want = -(-(computed + take) // self.cfg.block_tokens) - hit - own
        # group-blocks the pool gives: all it will hold but its own cached blocks, the cache's now
        held = self.groups.held(computed + take, computed, self.cfg.block_tokens, hit)
        units = held - self.full_units * own
        if units > self.free:  # the cached blocks it would use are not evicted to make room for it
            copies += self._evict(units, keep={seq.req.prefix_id: hit, (OWN, seq.index): own})
        if units > self.free:
            return None
        self.waiting.popleft()
        if hit:
            self.cache[seq.req.prefix_id].refs += 1
            self.cache.move_to_end(seq.req.prefix_id)
            seq.prefix_hit_blocks = hit
        if hit or own:
            seq.computed = computed
        if own:  # its cached blocks are its own again
            del self.cache[(OWN, seq.index)]
        if seq.kv_at == "host":
            copies += self.groups.held(seq.computed, seq.computed - 1, self.cfg.block_tokens, hit) * self.host_s_per_block
        seq.kv_at = ""
        self.free -= units
        seq.own_blocks = want + own
        seq.units, seq.alloc_from = held, computed
        if not seq.admitted:  # the prefix-cache hit rate counts first admissions
            self.prompt_tokens += seq.req.prompt_tokens
            self.hit_tokens += hit * self.cfg.block_tokens
        self.admissions += 1
        seq.admitted = self.admissions
        self.running[seq] = None
        self.active.append(seq)
        return seq, take, copies

    def schedule(self) -> tuple[list[tuple[_Seq, int]], bool, float]:
        """The iteration: (the sequences handled one by one and their tokens, whether the
        aggregate decodes run, seconds of host copies). Decodes first, then prompts in progress
        in admission order, then waiting requests (the stall-free order of Sarathi-Serve and of
        vLLM's chunked prefill)."""
        cfg, budget = self.cfg, self.cfg.max_num_batched_tokens
        chosen: list[tuple[_Seq, int]] = []
        copies = 0.0
        hold = self.steps_left > 0 and bool(self.running)  # within a multi-step run: decodes only
        if not cfg.chunked_prefill and self.role != "decode" and not hold:
            # vLLM V0: an iteration of whole prompts whenever one waits and fits, else decodes
            copies, budget = self._admit_queue(chosen, budget, whole=True, may_lead=True)
            if chosen:
                return chosen, False, copies
        lazy = False
        if self.n_lazy:
            want = self._boundaries(1)
            if want > self.free:
                copies += self._evict(want)
            if want <= self.free and self.n_lazy * (1 + self.spec) <= budget:
                self.free -= want
                budget -= self.n_lazy * (1 + self.spec)
                lazy = True
            else:  # blocks short (or a budget below the decodes): one by one, preempting as vLLM does
                self._materialize_all()
        preempted = False
        self.running_preempted = False
        chunked, B = cfg.chunked_prefill, cfg.block_tokens
        for seq in list(self.active):
            if budget <= 0:
                break
            if seq not in self.running:  # preempted for an earlier one
                continue
            computed = seq.computed
            need = seq.prompt + seq.generated - computed
            if self.spec and seq.decoding:  # a decode proposes k more (fewer if the budget is short)
                need = min(1 + self.spec, budget)
            take = need if need < budget else budget
            if take < need and not chunked:
                continue
            want = -(-(computed + take) // B) - seq.prefix_hit_blocks - seq.own_blocks
            units = self.groups.held(computed + take, computed, B, seq.prefix_hit_blocks) - seq.units
            if units > self.free:
                copies += self._evict(units)
            if units > self.free:
                if lazy:  # the decodes hold the blocks this iteration; the prompt waits for a finish
                    break
                lost = False
                while units > self.free and not lost:
                    victim = next(reversed(self.running))  # the latest admitted: not scheduled yet, or this one
                    copies += self._preempt(victim)
                    preempted = True
                    lost = victim is seq
                if lost:
                    break
            if want > 0:
                seq.own_blocks += want
            self.free -= units
            seq.units += units
            seq.alloc_from = computed
            chosen.append((seq, take))
            budget -= take
        self.running_preempted = preempted and not chosen and not lazy
        if not preempted and not hold and (cfg.chunked_prefill or self.role == "decode"):  # (a decode replica's arrivals need one token)
            more, budget = self._admit_queue(chosen, budget, whole=not cfg.chunked_prefill, may_lead=not lazy)
            copies += more
        return chosen, lazy, copies

    def _admit_queue(self, chosen: list[tuple[_Seq, int]], budget: int, *, whole: bool,
                     may_lead: bool) -> tuple[float, int]:
        """Admit waiting requests first come, first served into `chosen` while the budget,
        max_num_seqs and the blocks allow (a prompt longer than the budget runs alone when it would
        lead the iteration and `may_lead`): (seconds of host copies, the budget left)."""
        copies = 0.0
        while self.waiting and budget > 0 and len(self.running) < self.cfg.max_num_seqs:
            got = self._admit(budget, whole=whole, first=may_lead and not chosen)
            if got is None:
                break
            seq, take, more = got
            chosen.append((seq, take))
            copies += more
            budget -= take
        return copies, budget

    def iteration_s(self, chosen: list[tuple[_Seq, int]], lazy: bool) -> tuple[float, float]:
        """(seconds of the iteration, the cached tokens its decodes read)."""
        tokens = logits = decode_rows = decode_tokens = checks = 0
        decode_ctx = pairs = kv_tokens = window_pairs = window_kv = 0.0
        spec = self.cost.spec
        for seq, take in chosen:
            tokens += take
            computed = seq.computed
            if seq.decoding:  # a decode (and its drafts' check)
                logits += take
                decode_rows += 1
                decode_tokens += take
                decode_ctx += computed + 1
                checks += take > 1
            else:
                if computed + take == seq.prompt + seq.generated:
                    logits += 1
                pairs += take * (computed + (take + 1) / 2)
                kv_tokens += computed + take
                if spec.windowed_layers:  # (IterationCost reads the window's figures only where there is one)
                    wp, wk = window_prefill(spec, computed, take)
                    window_pairs, window_kv = window_pairs + wp, window_kv + wk
        prompt_tokens = tokens - decode_tokens
        self.computed_prompt_tokens += prompt_tokens
        if lazy:
            n = self.n_lazy
            tokens += n * (1 + self.spec)
            logits += n * (1 + self.spec)
            decode_rows += n
            checks += n if self.spec else 0
            decode_ctx += self.sum_c0 + n * (self.progress(self.tick) + 1)
        seconds = self.cost.seconds(tokens, logits, decode_rows, decode_ctx, pairs, kv_tokens, window_pairs, window_kv)
        return seconds + self._draft_s(checks, decode_ctx, prompt_tokens, pairs, kv_tokens), decode_ctx

    def _draft_s(self, checks: int, context: float, prompt_tokens: int, pairs: float, kv_tokens: float) -> float:
        """The draft model's share of an iteration: k decode steps for the `checks` speculating
        sequences (their caches of `context` tokens in all), and the prompt tokens' prefill
        (the draft keeps its own cache of every sequence); none for n-gram proposals."""
        if self.draft_cost is None:
            return 0.0
        seconds = self.spec * self.draft_cost.seconds(checks, checks, checks, context, 0.0, 0.0) if checks else 0.0
        if prompt_tokens:
            seconds += self.draft_cost.seconds(prompt_tokens, 0, 0, 0.0, pairs, kv_tokens)
        return seconds

    def decode_run_s(self, n: int, context: float) -> float:
        """One step of the aggregate's n decodes over `context` cached tokens in all (with their
        drafts' proposals and check)."""
        rows = n * (1 + self.spec)
        return self.cost.seconds(rows, rows, n, context, 0.0, 0.0) + self._draft_s(n if self.spec else 0, context, 0,
                                                                                      0.0, 0.0)

    def end(self, now: float, chosen: list[tuple[_Seq, int]], lazy: bool, repeats: int,
            finished: list[_Seq], handed: list[_Seq]) -> None:
        """Apply an iteration (of `repeats` aggregate decode iterations) ending at `now`: tokens
        computed and generated, first tokens, finishes (into `finished`), sequences a prefill
        replica hands on (into `handed`)."""
        if lazy:
            if repeats > 1:  # the blocks of the repeated decodes (the first's were taken at schedule)
                self.free -= self._boundaries(repeats) - self._boundaries(1)
            self.tick += repeats
        emitted = False  # a sequence that emits leaves the one-by-one list: finished, handed on or decoding
        for seq, take in chosen:
            if take > 1 and seq.decoding:
                # a check of take - 1 drafts: the accepted ones and the target's own token, as
                # many as expected on average (the fractions carried from step to step)
                before = seq.accepted
                seq.accepted += expected_tokens(self.cfg.acceptance, take - 1)
                got = min(seq.output - seq.generated, math.floor(seq.accepted) - math.floor(before))
                seq.computed += got
                seq.generated += got
                emitted = True
            else:
                seq.computed += take
                if seq.computed < seq.prompt + seq.generated:
                    continue  # a prefill chunk
                emitted = True
                seq.generated += 1
            if seq.generated == 1:
                seq.first_token_s = now
                self._share_prefix(seq)
            if seq.generated >= seq.output:
                seq.finish_s = now
                del self.running[seq]
                self._donate(seq)
                finished.append(seq)
            elif self.role == "prefill":  # the KV cache goes to a decode replica
                del self.running[seq]
                self._donate(seq)
                handed.append(seq)
            else:
                self._to_lazy(seq)
        if emitted:
            self.active = [seq for seq in self.active if seq in self.running and not seq.lazy]
        tick = self._next_finish()
        while tick is not None and tick <= self.tick:
            _, _, seq, _ = heapq.heappop(self.finishes)
            self._materialize(seq)
            seq.finish_s = now
            del self.running[seq]
            self._donate(seq)
            finished.append(seq)
            tick = self._next_finish()


@dataclass(frozen=True, slots=True, kw_only=True)
class TrafficResult:
    ttft_s: np.ndarray  # per finished request, in request order
    tpot_s: np.ndarray
    e2e_s: np.ndarray
    outputs: np.ndarray  # output tokens of each finished request
    duration_s: float  # first arrival to last finish
    finished: int
    requests: int
    preemptions: int
    prefix_hit_rate: float
    prefill_tokens_by_replica: tuple[int, ...]  # prompt tokens computed (recomputation included, cache hits
    #                                              not), per replica (prefill replicas first; per virtual
    #                                              engine where pp > 1, a replica's side by side)
    iterations: int
    # per replica (virtual engine), its iterations: (start s, seconds, KV share in use, running, scheduled,
    # repeats)
    timeline: tuple[list[tuple[float, float, float, int, int, int]], ...] = ()
    roles: tuple[str, ...] = ()
    # per replica (virtual engine), its KV pool when the run ends: (blocks, free, held by the prefix
    # cache); what is neither is held by the sequences still running (none once all finished)
    pool_end: tuple[tuple[int, int, int], ...] = ()
    slo: SLO = SLO()
    goodput_rps: float = 0.0
    slo_attainment: float = 0.0

    @property
    def output_tokens(self) -> int:
        return int(self.outputs.sum())

    @property
    def prefill_tokens(self) -> int:
        """Prompt tokens computed on every replica."""
        return sum(self.prefill_tokens_by_replica)

    @property
    def throughput_tokens_per_s(self) -> float:
        return self.output_tokens / self.duration_s if self.duration_s > 0 else 0.0

    def metrics(self) -> dict:
        """The `predicted` keys of serving under traffic."""
        out = latency_percentiles(self.ttft_s, self.tpot_s, self.e2e_s, self.outputs)
        out.update(throughput_tokens_per_s=self.throughput_tokens_per_s, goodput_rps=self.goodput_rps,
                   slo_attainment=self.slo_attainment, preemptions=self.preemptions,
                   prefix_hit_rate=self.prefix_hit_rate, prefill_tokens=self.prefill_tokens, requests=self.requests,
                   finished=self.finished, duration_s=self.duration_s, iterations=self.iterations)
        return out


@dataclass(frozen=True, slots=True, kw_only=True)
class ServingLayout:
    """Replicas of tp x pp GPUs; with `prefill_replicas` > 0 that many of them run prompts only
    and the rest decode (disaggregated); `expert_parallel`: a mixture of experts' experts held
    whole over the tp GPUs (costmodel.serving)."""

    tp: int = 1
    pp: int = 1
    replicas: int = 1
    prefill_replicas: int = 0
    precision: str = "bf16"
    expert_parallel: bool = False

    def __post_init__(self) -> None:
        for name in ("tp", "pp", "replicas"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"--{name} must be a positive integer, got {value!r}")
        if self.prefill_replicas < 0 or (self.prefill_replicas and self.prefill_replicas >= self.replicas):
            raise ConfigError(f"--prefill-replicas ({self.prefill_replicas}) must leave at least one of the "
                              f"{self.replicas} replicas to decode")
        check_serving_precision(self.precision)
        if not isinstance(self.expert_parallel, bool):
            raise ConfigError(f"expert_parallel must be true or false, got {self.expert_parallel!r}")

    @property
    def gpus(self) -> int:
        return self.tp * self.pp * self.replicas

    @property
    def label(self) -> str:
        """One replica's shape (costmodel.serving.layout_label)."""
        return layout_label(self.tp, self.pp, self.expert_parallel)


def replica_budget(spec: ModelSpec, cluster: Cluster, layout: ServingLayout, cfg: SchedulerConfig) -> KVBudget:
    """A replica's GPU memory (costmodel.serving.kv_budget) with the engine's arguments: its
    workspace one full token budget of prompt, its KV cache of the configured dtype and share,
    a speculative draft model's weights and cache beside the target's."""
    chunk = max(1, min(cfg.max_num_batched_tokens, spec.context_len - 1))
    req = ServingRequest(prompt_len=chunk, output_len=1, precision=layout.precision, block_tokens=cfg.block_tokens,
                         engine=cfg.engine, kv_cache_dtype=cfg.kv_cache_dtype,
                         gpu_memory_utilization=cfg.gpu_memory_utilization, draft=cfg.draft)
    return kv_budget(spec, cluster, req, layout.tp, layout.pp)


def replica_blocks(spec: ModelSpec, cluster: Cluster, layout: ServingLayout, cfg: SchedulerConfig) -> tuple[int, float]:
    """(KV blocks a replica holds, bytes of one block on one GPU) after weights and workspace: a
    block is block_tokens tokens of one KV cache group's layers (costmodel.kv_groups; every
    layer of a stage where none is windowed)."""
    budget = replica_budget(spec, cluster, layout, cfg)  # (a draft model's weights and cache with the target's)
    blocks = budget.pool_blocks if cfg.num_gpu_blocks_override is None else cfg.num_gpu_blocks_override
    return blocks, budget.pool_block_bytes


def prefill_chunk(cfg: SchedulerConfig) -> int:
    """The most prompt tokens a sequence schedules at once (a whole prompt without chunking)."""
    return cfg.max_num_batched_tokens if cfg.chunked_prefill else 10**12


def replica_room(spec: ModelSpec, cluster: Cluster, layout: ServingLayout, cfg: SchedulerConfig,
                 per_engine: bool = True) -> float:
    """The longest sequence a replica holds alone, in tokens: in one virtual engine's share of
    the blocks, or (`per_engine` False) in all of them, as the engine checks at its start that
    one max_model_len sequence fits; a sliding-window layer keeps its window and the chunk past
    it; inf: any length, every layer windowed."""
    blocks = replica_blocks(spec, cluster, layout, cfg)[0] // (layout.pp if per_engine else 1)
    return KVGroups.of(spec, layout.pp).longest(blocks, cfg.block_tokens, prefill_chunk(cfg))


def replica_sequences(spec: ModelSpec, cluster: Cluster, layout: ServingLayout, cfg: SchedulerConfig,
                      tokens: float) -> int:
    """How many sequences of `tokens` tokens (a mean) one virtual engine of a replica holds at
    once, decoding."""
    blocks = replica_blocks(spec, cluster, layout, cfg)[0] // layout.pp
    groups = KVGroups.of(spec, layout.pp)
    if not groups.hybrid:
        return int(blocks * cfg.block_tokens // tokens)
    whole = math.ceil(tokens)
    return blocks // max(1, groups.held(whole, whole - 1, cfg.block_tokens))


def _too_small_why(spec: ModelSpec, cluster: Cluster, layout: ServingLayout, cfg: SchedulerConfig) -> str:
    """Why a replica holds no KV cache at all: its weights (and the prefill workspace) fill
    the memory a GPU may use."""
    budget = replica_budget(spec, cluster, layout, cfg)
    if budget.kv_gib > 0:
        return ""
    return f" (its weights take {budget.weights_gib:.1f} GiB of each GPU's {cluster.device.hbm_gib:g} GiB)"


def _roomier_layout(spec: ModelSpec, cluster: Cluster, layout: ServingLayout, cfg: SchedulerConfig,
                    longest: int) -> str:
    """The way out of a replica too small for a request: the smallest tp within a node (the
    same pp) whose KV cache holds it, else more pipeline stages."""
    tp = layout.tp * 2
    while tp <= cluster.gpus_per_node:
        bigger = replace(layout, tp=tp, replicas=1, prefill_replicas=0)
        if not layout_problems(spec, tp, layout.pp, layout.expert_parallel):
            room = replica_room(spec, cluster, bigger, cfg)
            if room >= longest:
                held = "sequences of any length" if math.isinf(room) else f"{room} tokens"
                return f"give --tp {tp} (it holds {held}) or more GPUs per replica"
        tp *= 2
    return "give more GPUs per replica (--pp across nodes) or shorter requests"


def host_link_gb_per_s(cluster: Cluster) -> float:
    return HOST_LINK_GB_PER_S.get(cluster.device.arch, DEFAULT_HOST_LINK_GB_PER_S)


def simulate_traffic(spec: ModelSpec, cluster: Cluster, requests: list[Request], layout: ServingLayout,
                     cfg: SchedulerConfig = SchedulerConfig(), slo: SLO = SLO(), *,
                     horizon_s: float | None = None, engine: ServingEngine | None = None,
                     concurrency: int | None = None) -> TrafficResult:
    """Serve `requests` on `layout`: the event loop over arrivals, iteration ends and KV
    transfers; `horizon_s` stops it (an overloaded system's queue never drains); `engine`: a
    serving engine profile to use instead of the one `cfg.engine` names (fitting one);
    `concurrency`: at most that many requests in flight, as a benchmark client with a
    concurrency limit sends them (`vllm bench serve --max-concurrency`): a request is sent at
    its time or, when the limit is reached, as soon as one in flight finishes (closed loop)."""
    if layout.gpus > cluster.world_size:
        raise ConfigError(f"the layout needs {layout.gpus} GPUs (tp {layout.tp} x pp {layout.pp} x "
                          f"{layout.replicas} replicas); the cluster has {cluster.world_size}")
    if not requests:
        raise ConfigError("the workload has no requests")
    if concurrency is not None and (isinstance(concurrency, bool) or not isinstance(concurrency, int)
                                    or concurrency < 1):
        raise ConfigError(f"--concurrency must be a positive integer, got {concurrency!r}")
    cluster = engine_cluster(cluster, engine or cfg.engine)
    blocks, block_bytes = replica_blocks(spec, cluster, layout, cfg)
    blocks //= layout.pp  # each virtual engine schedules over its share of the replica's blocks
    groups = KVGroups.of(spec, layout.pp)
    longest = max(r.prompt_tokens + r.output_tokens for r in requests)
    room = groups.longest(blocks, cfg.block_tokens, prefill_chunk(cfg))
    if room < longest:
        share = f" (each of its {layout.pp} virtual engines)" if layout.pp > 1 else ""
        raise ConfigError(f"a replica of tp {layout.tp} x pp {layout.pp}{share} holds {room} tokens "
                          f"of KV cache, fewer than the longest request's {longest}"
                          f"{_too_small_why(spec, cluster, layout, cfg)}; {_roomier_layout(spec, cluster, layout, cfg, longest)}")
    why = layout_problems(spec, layout.tp, layout.pp, layout.expert_parallel)
    if why:
        raise ConfigError(f"{spec.name} cannot be served as tp {layout.tp} x pp {layout.pp}: {'; '.join(why)}")
    cost = IterationCost(spec, cluster, layout.tp, layout.pp, layout.precision, cfg.max_num_batched_tokens,
                         layout.expert_parallel, kv_cache_dtype=cfg.kv_cache_dtype)  # the cluster is the engine's already
    if speculation_problems(layout.pp, cfg.speculative_tokens > 0):
        raise ConfigError(SPECULATION_PP)
    draft_cost = None if cfg.draft is None else IterationCost(
        cfg.draft, cluster, layout.tp, 1, layout.precision, cfg.max_num_batched_tokens, kv_cache_dtype=cfg.kv_cache_dtype)
    host = host_link_gb_per_s(cluster)
    roles = ["prefill"] * layout.prefill_replicas + ["decode" if layout.prefill_replicas else "mixed"] * (
        layout.replicas - layout.prefill_replicas)
    roles = [role for role in roles for _ in range(layout.pp)]  # a replica's virtual engines, side by side
    replicas = [_Replica(i, role, cost, blocks, cfg, host, block_bytes, groups, draft_cost)
                for i, role in enumerate(roles)]
    entry = [r for r in replicas if r.role != "decode"]
    decoders = [r for r in replicas if r.role == "decode"]
    kv_token_bytes = kv_bytes_per_token(spec, kv_value_bytes(layout.precision, cfg.kv_cache_dtype))
    transfer_link = cluster.inter if cluster.nodes > 1 else cluster.intra

    seqs = [_Seq(req=r, index=i, prompt=r.prompt_tokens, output=r.output_tokens, arrival_s=r.arrival_s)
            for i, r in enumerate(sorted(requests, key=lambda r: r.arrival_s))]
    limited = concurrency is not None and concurrency < len(seqs)
    if limited:
        for seq in seqs[concurrency:]:
            seq.arrival_s = math.inf  # held by the client until one in flight finishes
    released = min(concurrency or len(seqs), len(seqs))  # seqs[:released] have been let go
    events: list[tuple[float, int, int]] = []  # (time, counter, index): index >= 0 a replica's iteration ends,
    counter = 0                                  # index < 0 the KV of sequence -1 - index reaches the decoders
    transfers: list[float] = []  # times of the KV transfers under way
    sending: dict[int, float] = {}  # prefill replica -> when its links finish the transfers queued on them
    stage_free: dict[int, list[float]] = {}  # replica of pp > 1 stages -> when each stage is next free
    ending: dict[int, float] = {}  # replica (virtual engine) -> when its iteration under way ends
    in_flight: dict[int, tuple[list[tuple[_Seq, int]], bool, int]] = {}  # replica -> (one by one, aggregate, repeats)
    finished: list[_Seq] = []
    limit = math.inf if horizon_s is None else horizon_s
    arrived = 0  # seqs[:arrived] have arrived

    def start(rep: _Replica, now: float) -> None:
        nonlocal counter
        if rep.busy or not (rep.waiting or rep.running):
            return
        chosen, lazy, copies = rep.schedule()
        while not chosen and not lazy and rep.running_preempted:
            # every sequence it ran was preempted: the blocks are free now, and vLLM's next step
            # (at once) admits from the queue
            chosen, lazy, more = rep.schedule()
            copies += more
        if not chosen and not lazy:
            return
        rep.busy = True
        took, context = rep.iteration_s(chosen, lazy)
        took += copies
        repeats = 1
        steps = cfg.num_scheduler_steps
        decodes_only = all(take == 1 and seq.generated for seq, take in chosen)
        if steps > 1 and decodes_only and not rep.steps_left:
            rep.steps_left = steps  # a multi-step run starts
        if lazy and not chosen and not copies and rep.role != "prefill":
            # decodes only: the next iterations are the same batch one token further, until a
            # sequence finishes, the blocks run short or something arrives; priced in one go
            n = rep.n_lazy
            most = rep._next_finish() - rep.tick
            while most > 1 and rep._boundaries(most) - rep._boundaries(1) > rep.free:
                most //= 2
            until = min(seqs[arrived].arrival_s if arrived < len(seqs) and rep.steps_left <= 1 else math.inf,
                        transfers[0] if transfers else math.inf)  # an arrival waits out a multi-step run
            if rep.steps_left > 1:
                most = min(most, rep.steps_left)
            if (decoders or limited) and events:  # a prefill under way may send a sequence here when it
                # ends; under a concurrency limit any finish may let a request go
                until = min(until, events[0][0])
            if layout.pp > 1:  # a sibling engine with requests queued starts them when its iteration
                # ends, and its prompts then share the stages with this run's later steps
                base = rep.index - rep.index % layout.pp
                until = min([until] + [ending[sib.index] for sib in replicas[base:base + layout.pp]
                                       if sib is not rep and sib.busy and sib.waiting])
            done = rep.progress(rep.tick)
            if 1 < most <= 8:
                while repeats < most and now + took < until:
                    context += n * (rep.progress(rep.tick + repeats) - rep.progress(rep.tick + repeats - 1))
                    took += rep.decode_run_s(n, context)
                    repeats += 1
            elif most > 1 and now + took < until:
                first = context
                # step j (2..most) reads first + n (P(tick + j - 1) - P(tick)) cached tokens; its time
                # is linear in that between the exact ends (the decode attention is memory-bound)
                lo = rep.decode_run_s(n, first + n * (rep.progress(rep.tick + 1) - done))
                hi = rep.decode_run_s(n, first + n * (rep.progress(rep.tick + most - 1) - done))
                steps = np.linspace(lo, hi, most - 1) if most > 2 else np.array([lo])
                ends = took + np.cumsum(steps)  # the end of steps 2..most
                # a step starts while nothing has arrived: those ending before `until`, and one more
                repeats = 1 + min(most - 1, int(np.searchsorted(ends, until - now, side="left")) + 1)
                took = float(ends[repeats - 2])
        rep.iterations += repeats
        rep.steps_left = max(0, rep.steps_left - repeats) if decodes_only else 0
        in_flight[rep.index] = (chosen, lazy, repeats)
        end = now + took
        if layout.pp > 1:
            # the replica's virtual engines share its stages: each stage runs its share of a
            # traversal when it is free, in the order the iterations start. A run of repeated
            # decodes waits at the stages on its first traversal; its later ones follow, each
            # stage busy for 1/pp of every traversal, the rest of it left to the other engines
            # (which is all they need when their batches are alike). Booked whole, an engine
            # prefilling a prompt that came in meanwhile waited out the entire run (seconds)
            free_at = stage_free.setdefault(rep.index // layout.pp, [0.0] * layout.pp)
            traversal = took / repeats
            share = traversal / layout.pp
            end = now
            for s in range(layout.pp):
                end = max(end, free_at[s]) + share
                free_at[s] = end
            end += took - traversal
        ending[rep.index] = end
        heapq.heappush(events, (end, counter, rep.index))
        counter += 1
        rep.usage.append((now, end - now, 1 - rep.free / rep.total_blocks, len(rep.running),
                          len(chosen) + (rep.n_lazy if lazy else 0), repeats))

    while events or arrived < len(seqs):
        if arrived < len(seqs) and (not events or seqs[arrived].arrival_s <= events[0][0]):
            seq = seqs[arrived]
            now = seq.arrival_s
            if math.isinf(now):  # nothing in flight to let it go: cannot happen while requests are served
                break
            arrived += 1
            if now > limit:
                break
            rep = min(entry, key=lambda r: r.load)
            rep.waiting.append(seq)
            woken = {rep.index: rep}
            while arrived < len(seqs) and seqs[arrived].arrival_s <= now:  # arriving together: scheduled together
                rep = min(entry, key=lambda r: r.load)
                rep.waiting.append(seqs[arrived])
                woken[rep.index] = rep
                arrived += 1
            for rep in woken.values():
                start(rep, now)
            continue
        now, _, index = heapq.heappop(events)
        if now > limit:
            break
        if index < 0:
            heapq.heappop(transfers)
            seq = seqs[-1 - index]
            rep = min(decoders, key=lambda r: r.load)
            seq.kv_at = "remote"  # its blocks are allocated on admission; the copy was the transfer
            rep.waiting.append(seq)
            start(rep, now)
            continue
        rep = replicas[index]
        rep.busy = False
        chosen, lazy, repeats = in_flight.pop(index)
        handed: list[_Seq] = []
        done_before = len(finished)
        rep.end(now, chosen, lazy, repeats, finished, handed)
        if limited:  # each finish lets the client send the next request
            for _ in range(len(finished) - done_before):
                if released < len(seqs):
                    seqs[released].arrival_s = max(seqs[released].req.arrival_s, now)
                    released += 1
        for seq in handed:
            # each of the tp x pp GPUs sends its share of the prompt's KV at once, over its own
            # link; a prefill replica's transfers queue on those links, one after another
            at = max(now, sending.get(index, now)) + send_recv_s(
                seq.computed * kv_token_bytes / (layout.tp * layout.pp), transfer_link)
            sending[index] = at
            heapq.heappush(events, (at, counter, -1 - seq.index))
            heapq.heappush(transfers, at)
            counter += 1
        start(rep, now)
    return _result(seqs, finished, replicas, slo)


def request_latencies(arrivals, first_tokens, finishes, outputs) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(TTFT, TPOT, end-to-end) seconds per request from its arrival, first-token and finish
    times and its output tokens: TPOT = (finish - first token) / (output - 1), 0 for one token.
    The one definition the simulator and a measured run (runtime.serve) share."""
    arrivals, first, finish = (np.asarray(a, dtype=float) for a in (arrivals, first_tokens, finishes))
    outputs = np.asarray(outputs)
    tpot = np.divide(finish - first, outputs - 1, out=np.zeros_like(finish), where=outputs > 1)
    return first - arrivals, tpot, finish - arrivals


def latency_percentiles(ttft_s, tpot_s, e2e_s, outputs=None) -> dict[str, float]:
    """p50, p90 and p99 of each, keyed ttft_p50_s ... e2e_p99_s (nan where there are none); TPOT
    over the requests of two or more output tokens where `outputs` is given (one token has no time
    per output token: vLLM's benchmark leaves those out the same way)."""
    out = {}
    if outputs is not None:
        tpot_s = np.asarray(tpot_s)[np.asarray(outputs) > 1]
    for name, values in (("ttft", ttft_s), ("tpot", tpot_s), ("e2e", e2e_s)):
        for p in (50, 90, 99):
            out[f"{name}_p{p}_s"] = float(np.percentile(values, p)) if len(values) else math.nan
    return out


def _result(seqs: list[_Seq], finished: list[_Seq], replicas: list[_Replica], slo: SLO) -> TrafficResult:
    done = sorted(finished, key=lambda s: s.req.id)
    outputs = np.array([s.output for s in done], dtype=int)
    ttft, tpot, e2e = request_latencies([s.arrival_s for s in done], [s.first_token_s for s in done],
                                        [s.finish_s for s in done], outputs)
    sent = [s.arrival_s for s in seqs if not math.isinf(s.arrival_s)]
    first = min(sent)
    end = max((s.finish_s for s in done), default=first)
    duration = end - first
    met = sum(slo.met_by(a, b, c) for a, b, c in zip(ttft, tpot, e2e)) if slo.targets else len(done)
    # goodput: requests meeting the objectives per second of arrivals (all at once: of the run)
    window = max(sent) - first
    window = window if window > 0 else duration
    prompt_tokens = sum(r.prompt_tokens for r in replicas)
    return TrafficResult(
        ttft_s=ttft, tpot_s=tpot, e2e_s=e2e, outputs=outputs, duration_s=duration,
        finished=len(done), requests=len(seqs), preemptions=sum(r.preemptions for r in replicas),
        prefix_hit_rate=sum(r.hit_tokens for r in replicas) / prompt_tokens if prompt_tokens else 0.0,
        prefill_tokens_by_replica=tuple(r.computed_prompt_tokens for r in replicas),
        iterations=sum(r.iterations for r in replicas), timeline=tuple(r.usage for r in replicas),
        roles=tuple(r.role for r in replicas), slo=slo,
        pool_end=tuple((r.total_blocks, r.free, r.full_units * sum(e.blocks for e in r.cache.values()))
                       for r in replicas),
        goodput_rps=met / window if window > 0 else 0.0, slo_attainment=met / len(seqs))
