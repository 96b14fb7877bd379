"""`paraplan generate`: text from a built-in model with a KV cache (one process).

The prompt runs once through the model (prefill), filling the cache; then each step feeds
only the newest token (decode), reading every cached key and value. Greedy, or sampling with
temperature, top-k and top-p (nucleus). Tokens are bytes (the built-in models' vocabularies
start with the 256 byte values), so a text prompt is its UTF-8 bytes. Weights: seeded like
`paraplan run` initialises them, or the model of a `paraplan run` checkpoint.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from costmodel.errors import ConfigError
from costmodel.spec import ModelSpec
from planner.zoo.model import KVCache, Transformer, build_model


@dataclass(frozen=True, slots=True, kw_only=True)
class Sampling:
    greedy: bool = False
    temperature: float = 1.0
    top_k: int = 0  # 0: all
    top_p: float = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        if not self.temperature > 0:
            raise ConfigError(f"--temperature must be positive, got {self.temperature}")
        if self.top_k < 0:
            raise ConfigError(f"--top-k must be 0 (all) or positive, got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"--top-p must be in (0, 1], got {self.top_p}")


def next_tokens(logits: torch.Tensor, sampling: Sampling, gen: torch.Generator) -> torch.Tensor:
    """logits (B, V) of the last position -> the next token of each sequence (B,)."""
    if sampling.greedy:
        return logits.argmax(dim=-1)
    logits = logits.float() / sampling.temperature
    if sampling.top_k:
        kth = torch.topk(logits, min(sampling.top_k, logits.shape[-1]), dim=-1).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if sampling.top_p < 1:
        ordered, index = torch.sort(logits, dim=-1, descending=True)  # (B, V)
        probs = ordered.softmax(dim=-1)
        before = probs.cumsum(dim=-1) - probs  # mass of the tokens ranked above each
        ordered = ordered.masked_fill(before >= sampling.top_p, float("-inf"))  # the first token always stays
        logits = torch.full_like(logits, float("-inf")).scatter(-1, index, ordered)
    return torch.multinomial(logits.softmax(dim=-1), 1, generator=gen).squeeze(-1)


@dataclass(frozen=True, slots=True, kw_only=True)
class Generation:
    tokens: torch.Tensor  # (B, P + O)
    prefill_s: float
    decode_step_s: float  # median over the decode steps
    cache_bytes: int


def available_memory_bytes() -> int | None:
    """What this machine can still give a process (Linux's MemAvailable), or None where unknown."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def load_model(spec: ModelSpec, *, checkpoint: str | None = None, seed: int = 0) -> Transformer:
    need = 4 * spec.num_params  # fp32 weights on this machine's CPU
    free = available_memory_bytes()
    if free is not None and need > 0.8 * free:
        raise ConfigError(f"{spec.name} needs {need / 2**30:.1f} GiB of fp32 weights to run here, and this machine has "
                          f"{free / 2**30:.1f} GiB free; generate with a small built-in model (tiny-llama, tiny-gpt) "
                          "or price the large one with `paraplan simulate --mode inference`")
    model = build_model(spec, device="cpu")
    model.init_weights(seed)
    if checkpoint:
        from runtime.checkpoint import latest, whole_model_state

        found = latest(checkpoint) if not (Path(checkpoint) / "COMPLETE").exists() else Path(checkpoint)
        if found is None:
            raise ConfigError(f"no complete checkpoint in {checkpoint}; give a `paraplan run --checkpoint-dir` folder")
        try:  # an expert-parallel run's experts put back together
            state = whole_model_state(list(model.state_dict()), found)
            model.load_state_dict(state)
        except Exception as exc:  # noqa: BLE001 - a checkpoint of another model, or damaged
            raise ConfigError(f"cannot load the model from {found}: {str(exc).splitlines()[0][:200]}") from None
    return model.eval()


@torch.no_grad()
def generate(model: Transformer, prompt: torch.Tensor, max_new_tokens: int, sampling: Sampling) -> Generation:
    """prompt (B, P) token ids -> Generation with B sequences of P + max_new_tokens."""
    spec = model.spec
    bsz, plen = prompt.shape
    if plen + max_new_tokens > spec.seq_len:
        raise ConfigError(f"prompt {plen} + {max_new_tokens} new tokens exceed {spec.name}'s context of {spec.seq_len}")
    cache = KVCache(spec, bsz, plen + max_new_tokens, dtype=next(model.parameters()).dtype)
    gen = torch.Generator().manual_seed(sampling.seed)
    t0 = time.perf_counter()
    logits = model(prompt, cache)  # (B, P, V)
    prefill = time.perf_counter() - t0
    out = [prompt]
    steps = []
    token = next_tokens(logits[:, -1], sampling, gen)  # (B,)
    for i in range(max_new_tokens):
        out.append(token[:, None])
        if i == max_new_tokens - 1:
            break
        t0 = time.perf_counter()
        logits = model(token[:, None], cache)  # (B, 1, V)
        token = next_tokens(logits[:, -1], sampling, gen)
        steps.append(time.perf_counter() - t0)
    return Generation(tokens=torch.cat(out, dim=1), prefill_s=prefill,
                      decode_step_s=statistics.median(steps) if steps else 0.0, cache_bytes=cache.nbytes)


@torch.no_grad()
def generate_hf(model, prompt: torch.Tensor, max_new_tokens: int, sampling: Sampling) -> Generation:
    """The same loop on a Hugging Face causal LM, with its own KV cache (DynamicCache): the
    prompt once (prefill), then one token per step against the cache."""
    limit = getattr(model.config, "max_position_embeddings", None)
    bsz, plen = prompt.shape
    if limit is not None and plen + max_new_tokens > limit:
        raise ConfigError(f"prompt {plen} + {max_new_tokens} new tokens exceed the model's {limit} positions")
    import inspect

    cache_arg = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    gen = torch.Generator().manual_seed(sampling.seed)
    t0 = time.perf_counter()
    out = model(prompt, use_cache=True)
    prefill = time.perf_counter() - t0
    cache = getattr(out, cache_arg)
    tokens, steps = [prompt], []
    token = next_tokens(out.logits[:, -1], sampling, gen)  # (B,)
    for i in range(max_new_tokens):
        tokens.append(token[:, None])
        if i == max_new_tokens - 1:
            break
        t0 = time.perf_counter()
        out = model(token[:, None], use_cache=True, **{cache_arg: cache})
        cache = getattr(out, cache_arg)
        token = next_tokens(out.logits[:, -1], sampling, gen)
        steps.append(time.perf_counter() - t0)
    cache_bytes = sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values)
                      if isinstance(t, torch.Tensor)) if hasattr(cache, "layers") else 0
    return Generation(tokens=torch.cat(tokens, dim=1), prefill_s=prefill,
                      decode_step_s=statistics.median(steps) if steps else 0.0, cache_bytes=cache_bytes)


def encode(text: str, vocab: int) -> list[int]:
    data = list(text.encode("utf-8"))
    if vocab < 256 and any(b >= vocab for b in data):
        raise ConfigError(f"the model's vocabulary has {vocab} tokens, fewer than the prompt's bytes need")
    return data


def decode(tokens: list[int]) -> str:
    return bytes(t for t in tokens if t < 256).decode("utf-8", errors="replace")
