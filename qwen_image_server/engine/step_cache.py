"""`QWEN_IMAGE_CACHE=cache-dit`: DBCache step caching, set up once and told each call's CFG mode.

cache-dit wraps the transformer's forward and counts steps by counting transformer calls. Two
things about that matter to a server:

- The wrapper must be in place before diffusers' model offload hooks: after every call diffusers
  removes and re-adds those hooks, and accelerate then restores the forward it found when the
  hooks were first added. Enabled first, that forward is cache-dit's.
- Qwen-Image's adapter assumes separate CFG passes (two transformer calls per step, told apart by
  parity). A call without CFG (true_cfg_scale <= 1, every Lightning request) makes one call per
  step, so the mode is set per call from the batch's CFG scale.
"""

from __future__ import annotations

from typing import Any

from qwen_image_server.errors import OptionUnavailable


def cache_config(options: dict[str, Any]) -> Any:
    """cache-dit's DBCacheConfig from QWEN_IMAGE_CACHE_OPTIONS; a knob it does not take is a
    startup error."""
    from cache_dit import DBCacheConfig

    try:
        return DBCacheConfig(**options)
    except TypeError as exc:
        raise OptionUnavailable(f"QWEN_IMAGE_CACHE_OPTIONS has a knob DBCacheConfig does not take: {exc}") from exc


def enable_step_cache(pipeline: Any, options: dict[str, Any]) -> None:
    """Wrap the pipeline's transformer with cache-dit (before any offload hooks are added)."""
    import cache_dit

    config = cache_config(options)
    blocks = len(pipeline.transformer.transformer_blocks)
    # cache-dit asserts this only inside the first forward; a request must never be the one
    # to find out.
    if config.Fn_compute_blocks + config.Bn_compute_blocks > blocks:
        raise OptionUnavailable(
            f"QWEN_IMAGE_CACHE_OPTIONS: Fn_compute_blocks ({config.Fn_compute_blocks}) + "
            f"Bn_compute_blocks ({config.Bn_compute_blocks}) must not exceed the transformer's "
            f"{blocks} blocks")
    cache_dit.enable_cache(pipeline, cache_config=config)


def set_cfg_mode(pipeline: Any, separate_cfg: bool) -> None:
    """Tell cache-dit whether the next call makes two transformer calls per step (CFG) or one.

    cache-dit builds each call's step context from the config it was enabled with, reading
    `enable_separate_cfg` on every step, so setting it before the call is enough.
    """
    context_kwargs = getattr(pipeline, "_context_kwargs", None)
    config = context_kwargs.get("cache_config") if isinstance(context_kwargs, dict) else None
    if config is not None:
        config.enable_separate_cfg = separate_cfg
