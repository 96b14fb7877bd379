"""How a paged KV cache holds a model whose layers attend differently: full attention beside
sliding-window attention (Gemma-2 and -3, gpt-oss, Mistral 7B v0.1, Phi-3).

vLLM V1's hybrid KV cache manager (0.10 and later; its sliding-window manager alone before)
puts the layers of one kind in groups of equal size and gives every group a block table over
one shared pool; a block is `block_tokens` tokens of one group's layers. A full-attention
group keeps every block of a sequence; a sliding-window group frees the blocks whose tokens
have left the window (those before `computed - window + 1` when it schedules the next tokens:
vLLM's remove_skipped_blocks), so a long sequence keeps about window / block_tokens of them.
The group size is the smaller count of layers of one kind (Gemma-3's 5:1 gives groups of its
full layers' count, the sliding layers padded to whole groups), the larger one where the two
are within 25% of each other (vLLM's kv_cache_utils). A model of one kind is one group of
every layer. TensorRT-LLM's cyclic per-layer windows hold the same per layer.

Units: a pool's blocks are group-blocks (`group_layers` layers x `block_tokens` tokens); a
sequence's blocks are position-blocks (`block_tokens` positions of every layer), as the
scheduler counts them; `held` converts.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from costmodel.errors import ConfigError


@dataclass(frozen=True, slots=True)
class KVGroups:
    group_layers: int  # layers a group-block holds
    full_groups: int  # groups of full-attention layers (padded to whole groups)
    window_groups: int  # groups of sliding-window layers
    window: int  # tokens a sliding-window layer attends to (0: none)

    def __post_init__(self) -> None:
        counts = (self.group_layers, self.full_groups, self.window_groups, self.window)
        if any(isinstance(v, bool) or not isinstance(v, int) or v < 0 for v in counts) or self.group_layers < 1 \
                or self.full_groups + self.window_groups < 1 or (self.window_groups > 0) != (self.window > 0):
            raise ConfigError(f"KV cache groups need a group size >= 1, at least one group and a window exactly "
                              f"where there are sliding-window groups, got {counts}")

    @classmethod
    def of(cls, spec, pp: int = 1) -> KVGroups:
        """The groups of one pipeline stage of `spec` (its layers' kinds in proportion)."""
        stage = math.ceil(spec.layers / pp)
        windowed = spec.windowed_among(stage)
        full = stage - windowed
        if not windowed:
            return cls(group_layers=stage, full_groups=1, window_groups=0, window=0)
        if not full:
            return cls(group_layers=stage, full_groups=0, window_groups=1, window=spec.attention_window)
        fewer, more = min(full, windowed), max(full, windowed)
        size = more if more < 1.25 * fewer else fewer
        return cls(group_layers=size, full_groups=-(-full // size), window_groups=-(-windowed // size),
                   window=spec.attention_window)

    @property
    def hybrid(self) -> bool:
        """Whether some layers free their blocks past the window."""
        return self.window_groups > 0

    def held(self, total: int, computed: int, block: int, hit: int = 0) -> int:
        """Group-blocks a sequence holds of its own once `total` tokens have slots: every
        group's blocks past the first `hit` (shared prefix blocks, the prefix cache's), a
        sliding-window group's only from the block of token `computed - window + 1` on (those
        before it freed when the tokens after `computed` were scheduled)."""
        n = -(-total // block)
        units = self.full_groups * max(0, n - hit)
        if self.window_groups:
            first = max(hit, max(0, computed - self.window + 1) // block)
            units += self.window_groups * max(0, n - first)
        return units

    def peak(self, tokens: int, block: int, chunk: int) -> int:
        """Group-blocks one sequence of `tokens` tokens needs at its most: its last prefill
        chunk of up to `chunk` tokens beside the window before it, or its last decode."""
        last_chunk = max(0, tokens - max(1, chunk))
        return max(self.held(tokens, last_chunk, block), self.held(tokens, tokens - 1, block))

    def longest(self, blocks: int, block: int, chunk: int) -> float:
        """The most tokens one sequence may reach in `blocks` group-blocks (0: not one token;
        inf: any, every layer windowed; within a block where the window's blocks come and go)."""
        if not self.window_groups:
            return blocks // self.full_groups * block
        if not self.full_groups:  # every layer windowed: a sequence that fits its window fits at any length
            return math.inf if self.peak(10**12, block, chunk) <= blocks else self._search(blocks, block, chunk)
        return self._search(blocks, block, chunk)

    def _search(self, blocks: int, block: int, chunk: int) -> int:
        lo, hi = 0, 1
        while self.peak(hi, block, chunk) <= blocks and hi < 10**12:
            lo, hi = hi, hi * 2
        while hi - lo > 1:  # peak is non-decreasing in tokens
            mid = (lo + hi) // 2
            lo, hi = (mid, hi) if self.peak(mid, block, chunk) <= blocks else (lo, mid)
        return lo
