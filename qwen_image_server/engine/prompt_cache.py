"""Prompt embeddings computed once: an LRU of the text encoder's output per prompt, per model.

The text encoder (Qwen2.5-VL-7B on the real model) runs for every prompt and for the negative
prompt of every image that uses CFG, and a busy server sees the same ones again and again (the
default negative prompt on nearly every request, `n>1`, retries, a batch of one prompt). The
cache keeps each prompt's embeddings (unpadded: `[tokens, hidden]`, on the device the encoder
wrote them to) and the batch is assembled from them, padded with zeros and masked as the pipeline
itself pads a batch.

Every prompt is encoded alone, with the cache on or off: a prompt's embeddings, and so its image,
never depend on the other prompts of its batch, and turning the cache off (`QWEN_IMAGE_PROMPT_CACHE_MB=0`)
changes no image. Entries are dropped, least recently used first, when their bytes pass the
budget; pinned prompts (the API's default negative prompt) are kept whatever the budget. Anything
that changes what the encoder computes (adapters on the text encoder) clears the cache
(`invalidate_unless`).
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

# prompt -> its embeddings, [tokens, hidden] (the encoder's padding mask is all ones for one prompt)
Encode = Callable[[str], "torch.Tensor"]


@dataclass(frozen=True, slots=True)
class PromptCacheStats:
    """Counts of one engine's prompt cache since it started (summed over its models)."""

    hits: int = 0  # prompts whose embeddings came from the cache
    misses: int = 0  # prompts the text encoder ran for
    entries: int = 0
    bytes: int = 0

    def __add__(self, other: PromptCacheStats) -> PromptCacheStats:
        return PromptCacheStats(self.hits + other.hits, self.misses + other.misses,
                                self.entries + other.entries, self.bytes + other.bytes)


class PromptCache:
    """Embeddings by prompt text, least recently used dropped first past `max_bytes` (0: no
    cache at all: every prompt is encoded every time, pinned ones too)."""

    def __init__(self, max_bytes: int, pinned: Sequence[str] = ()) -> None:
        self.max_bytes = max_bytes
        self.pinned = frozenset(pinned) if max_bytes > 0 else frozenset()
        self._entries: OrderedDict[str, torch.Tensor] = OrderedDict()
        self._bytes = 0
        self._pinned_bytes = 0
        self._state: Hashable = None  # what the encoder computed the entries with
        self._lock = threading.Lock()  # one engine thread uses it; stats are read from others
        self.hits = 0
        self.misses = 0

    @property
    def enabled(self) -> bool:
        return self.max_bytes > 0

    def stats(self) -> PromptCacheStats:
        with self._lock:
            return PromptCacheStats(self.hits, self.misses, len(self._entries), self._bytes)

    def invalidate_unless(self, state: Hashable) -> None:
        """Drop every entry when the encoder's `state` (e.g. its active adapters) is not the one
        the entries were computed with."""
        with self._lock:
            if state != self._state:
                self._entries.clear()
                self._bytes = self._pinned_bytes = 0
                self._state = state

    def embeddings(self, prompts: Sequence[str], encode: Encode) -> list[torch.Tensor]:
        """Each prompt's embeddings, in order; each distinct prompt encoded at most once."""
        found: dict[str, torch.Tensor] = {}
        for prompt in prompts:
            if prompt in found:  # n>1, or the same negative prompt on every image of a batch
                with self._lock:
                    self.hits += 1
                continue
            cached = self._get(prompt)
            if cached is None:
                cached = encode(prompt)
                self._put(prompt, cached)
            found[prompt] = cached
        return [found[p] for p in prompts]

    def _get(self, prompt: str) -> torch.Tensor | None:
        with self._lock:
            tensor = self._entries.get(prompt)
            if tensor is None:
                self.misses += 1
                return None
            self._entries.move_to_end(prompt)
            self.hits += 1
            return tensor

    def _put(self, prompt: str, tensor: torch.Tensor) -> None:
        if not self.enabled:
            return
        size = tensor.numel() * tensor.element_size()
        with self._lock:
            pinned = prompt in self.pinned
            if not pinned and size > self.max_bytes - self._pinned_bytes:
                return  # larger than all the room there is
            self._entries[prompt] = tensor
            self._bytes += size
            self._pinned_bytes += size if pinned else 0
            victims = (p for p in list(self._entries) if p not in self.pinned)
            while self._bytes > self.max_bytes:
                victim = next(victims, None)
                if victim is None:
                    break
                dropped = self._entries.pop(victim)
                self._bytes -= dropped.numel() * dropped.element_size()


def batch_embeddings(rows: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of `[tokens, hidden]` as the pipeline's `prompt_embeds` and `prompt_embeds_mask`:
    padded with zeros to the longest, the mask 1 on real tokens (as the pipeline builds them)."""
    import torch

    longest = max(row.shape[0] for row in rows)
    embeds = torch.stack([torch.cat([row, row.new_zeros(longest - row.shape[0], row.shape[1])]) for row in rows])
    mask = torch.stack([torch.cat([torch.ones(row.shape[0], dtype=torch.long, device=row.device),
                                   torch.zeros(longest - row.shape[0], dtype=torch.long, device=row.device)])
                        for row in rows])
    return embeds, mask
