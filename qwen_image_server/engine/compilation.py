"""`QWEN_IMAGE_COMPILE`: regional torch.compile of the transformer blocks, and the warm-up calls
that compile every shape the server will batch before any request does.

torch.compile specializes a graph on its input shapes and compiles again when one changes; after
the second distinct size of a dimension it makes that dimension dynamic. A server's shapes vary in
the batch size (1 to QWEN_IMAGE_MAX_BATCH_SIZE), in the prompt length (text tokens), in whether a
padding mask is passed (a batch of prompts of different lengths has one, a single prompt or equal
lengths none) and in the image size. The warm-up varies each of these at every warmed-up size, so
live traffic compiles nothing new (`bench/gpu.py` counts it).
"""

from __future__ import annotations

from typing import Any

import torch

# dynamo keeps at most this many compiled variants per code object (default 8). All blocks share
# one code object, and the variants above (batch 1 vs dynamic batch, with and without a mask,
# static then dynamic lengths, for every warmed-up size) need more; past the limit a fullgraph
# compile fails the request instead of running it.
RECOMPILE_LIMIT = 64

WARMUP_PROMPT = "warm-up"


def compile_blocks(pipeline: Any, *, cached: bool) -> None:
    """Compile the transformer blocks regionally: one graph reused by all 60 identical blocks
    compiles in a minute rather than the many a whole-model compile takes, for nearly the same
    speed."""
    if cached:
        import cache_dit

        cache_dit.set_compile_configs()  # cache-dit's dynamo settings for its wrapped blocks
    config = torch._dynamo.config
    config.recompile_limit = max(config.recompile_limit, RECOMPILE_LIMIT)
    # cache-dit's wrapper calls back into Python between blocks, which a full graph cannot hold.
    pipeline.transformer.compile_repeated_blocks(fullgraph=not cached)


def _prompt(words: int) -> str:
    return WARMUP_PROMPT + " x" * words  # one token per " x": a length of our choosing


def warmup_prompt_batches(width: int, height: int, max_batch_size: int, max_batch_pixels: int) -> list[list[str]]:
    """The prompts of each warm-up call at one image size, so that every batch size the scheduler
    may form there (the same limit as its batches: size and pixel budget) is compiled with and
    without a padding mask, and prompt lengths are dynamic in both."""
    limit = max(1, min(max_batch_size, max_batch_pixels // (width * height)))
    calls = [[_prompt(0)], [_prompt(3)]]  # batch 1: no mask; two lengths make the length dynamic
    for size in range(2, limit + 1):
        # Mixed lengths (a mask) twice, with different longest prompts; then equal lengths (no mask).
        calls += [[_prompt(i * step) for i in range(size)] for step in (2, 7)]
        calls.append([_prompt(size)] * size)
    return calls


def compiled_graphs() -> int:
    """Graphs dynamo has compiled in this process so far (each compilation and recompilation)."""
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])
