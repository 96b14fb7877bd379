"""Continuous batching on this machine: requests arrive at their times and a built-in model
serves them with iteration-level scheduling and a paged KV cache (planner.zoo.model.
PagedKVCache), the policy costmodel.traffic simulates — decodes first, then prompts in progress
in admission order, then waiting requests first come first served, within max_num_seqs, the
token budget (chunked prefill) and the free blocks; a request whose prefix_id was served before
starts with that prefix's full blocks (prefix caching). A decode that needs a block when none
is free preempts the most recently admitted running sequence that is not yet scheduled by
recompute, as vLLM does: its blocks are freed (a cached prefix's kept), it waits at the head of
the queue and later recomputes its prompt and what it had generated. Greedy tokens. Measured per
request: the first token's time and the finish, as wall-clock seconds from its arrival.

Not done here (the simulator prices them): preemption by swap, disaggregation, tensor
parallelism.
"""

from __future__ import annotations

import time
import zlib
from collections import deque
from dataclasses import dataclass, field

import numpy as np
import torch

from costmodel.errors import ConfigError
from costmodel.traffic import SchedulerConfig, request_latencies
from costmodel.workload import Request
from planner.zoo.model import PagedKVCache, Transformer


@dataclass(slots=True, eq=False)
class _Live:
    req: Request
    tokens: list[int]  # the prompt, then what was generated
    table: list[int] = field(default_factory=list)  # block ids (the leading ones may be a cached prefix's)
    computed: int = 0
    generated: int = 0
    first_token_s: float = float("nan")
    finish_s: float = float("nan")


@dataclass(frozen=True, slots=True, kw_only=True)
class Served:
    ttft_s: np.ndarray  # per request, in request order
    tpot_s: np.ndarray
    e2e_s: np.ndarray
    iterations: int
    prefix_hit_tokens: int
    texts: list[list[int]]  # the generated tokens of each request
    preemptions: int = 0


def prompt_tokens(req: Request, vocab: int, seed: int = 0) -> list[int]:
    """A request's prompt: its shared prefix's tokens (the same for every request naming that
    prefix) and then its own."""
    rng = np.random.default_rng([seed, req.id])
    own = rng.integers(0, vocab, req.prompt_tokens - req.prefix_tokens).tolist()
    if not req.prefix_tokens:
        return own
    shared = np.random.default_rng([seed, zlib.crc32(req.prefix_id.encode())]).integers(0, vocab, req.prefix_tokens)
    return shared.tolist() + own


@torch.no_grad()
def serve(model: Transformer, requests: list[Request], cfg: SchedulerConfig = SchedulerConfig(), *,
          blocks: int = 1024, seed: int = 0, clock=time.perf_counter, sleep=time.sleep) -> Served:
    """Serve `requests` (arrival_s from now) with continuous batching; see the module docstring."""
    spec = model.spec
    if any(r.prompt_tokens + r.output_tokens > spec.seq_len for r in requests):
        raise ConfigError(f"a request exceeds {spec.name}'s context of {spec.seq_len} tokens")
    B = cfg.block_tokens
    if max(-(-(r.prompt_tokens + r.output_tokens) // B) for r in requests) > blocks:
        raise ConfigError(f"{blocks} KV blocks of {B} tokens cannot hold the longest request; give more blocks")
    cache = PagedKVCache(spec, blocks, B, dtype=next(model.parameters()).dtype)
    free = list(range(blocks))
    prefixes: dict[str, list[int]] = {}  # prefix_id -> its full blocks (kept for the run)
    pending = deque(sorted(requests, key=lambda r: r.arrival_s))
    waiting: deque[_Live] = deque()
    running: list[_Live] = []
    done: dict[int, _Live] = {}
    hits = iterations = preemptions = 0
    t0 = clock()

    def grow(live: _Live, tokens: int) -> bool:
        need = -(-tokens // B) - len(live.table)
        if need > len(free):
            return False
        live.table += [free.pop() for _ in range(need)]
        return True

    def release(live: _Live) -> None:
        kept = set(prefixes.get(live.req.prefix_id, [])) if live.req.prefix_id else set()
        free.extend(b for b in live.table if b not in kept)

    def grow_or_preempt(live: _Live, tokens: int) -> bool:
        """Blocks for `live`, preempting (by recompute) the running sequences admitted after it,
        the most recent first, until they are free or none is left."""
        nonlocal preemptions
        while not grow(live, tokens):
            victim = running[-1]
            if victim is live:
                return False
            running.pop()
            release(victim)
            victim.table, victim.computed = [], 0
            waiting.appendleft(victim)
            preemptions += 1
        return True

    while pending or waiting or running:
        now = clock() - t0
        while pending and pending[0].arrival_s <= now:
            req = pending.popleft()
            waiting.append(_Live(req=req, tokens=prompt_tokens(req, spec.vocab, seed)))
        if not waiting and not running:
            sleep(max(0.0, pending[0].arrival_s - now))
            continue
        budget, chosen = cfg.max_num_batched_tokens, []
        i = 0  # decodes first, in admission order (a preemption takes from the list's end), then prompts in progress
        while i < len(running):
            live = running[i]
            if live.computed == len(live.tokens) - 1 and budget > 0 and grow_or_preempt(live, live.computed + 1):
                chosen.append((live, 1))
                budget -= 1
            i += 1
        for live in running:
            need = len(live.tokens) - live.computed
            if need > 1 and budget > 0:
                take = min(need, budget) if cfg.chunked_prefill else need
                if (take <= budget or not chosen) and grow(live, live.computed + take):
                    chosen.append((live, take))
                    budget -= take
        while waiting and budget > 0 and len(running) < cfg.max_num_seqs:
            live = waiting[0]
            req = live.req
            cached = prefixes.get(req.prefix_id, []) if cfg.prefix_caching and req.prefix_id else []
            hit = min(len(cached), min(req.prefix_tokens, req.prompt_tokens - 1) // B)
            need = len(live.tokens) - hit * B  # the prompt (and, preempted, what it had generated)
            take = min(need, budget) if cfg.chunked_prefill else need
            if not cfg.chunked_prefill and take > budget and chosen:
                break
            live.table, live.computed = list(cached[:hit]), hit * B
            if not grow(live, live.computed + take):
                live.table, live.computed = [], 0
                break
            hits += hit * B
            waiting.popleft()
            running.append(live)
            chosen.append((live, take))
            budget -= take
        if not chosen:
            raise ConfigError("the KV blocks ran out with nothing left to run; give serve more blocks")
        cache.begin([(live.table, live.computed, take) for live, take in chosen])
        packed = torch.tensor([[t for live, take in chosen for t in live.tokens[live.computed:live.computed + take]]])
        ends = torch.as_tensor(np.cumsum([take for _, take in chosen]) - 1)  # each sequence's last packed position
        logits = model(packed, cache, logits_at=ends)  # (1, K, V)
        iterations += 1
        nxt = logits[0].argmax(dim=-1).tolist()
        now = clock() - t0
        for (live, take), token in zip(chosen, nxt):
            live.computed += take
            if live.computed < len(live.tokens):
                continue  # a prompt chunk
            live.tokens.append(token)
            live.generated += 1
            if live.generated == 1:
                live.first_token_s = now
                req = live.req
                if cfg.prefix_caching and req.prefix_id and len(prefixes.get(req.prefix_id, [])) < req.prefix_tokens // B:
                    prefixes[req.prefix_id] = live.table[:req.prefix_tokens // B]  # kept: not freed below
            if live.generated >= live.req.output_tokens:
                live.finish_s = now
                release(live)
                done[live.req.id] = live
        running = [live for live in running if live.req.id not in done]
    order = sorted(done.values(), key=lambda live: live.req.id)
    ttft, tpot, e2e = request_latencies([live.req.arrival_s for live in order], [live.first_token_s for live in order],
                                        [live.finish_s for live in order], [live.req.output_tokens for live in order])
    return Served(ttft_s=ttft, tpot_s=tpot, e2e_s=e2e, iterations=iterations, prefix_hit_tokens=hits,
                  texts=[live.tokens[live.req.prompt_tokens:] for live in order], preemptions=preemptions)
