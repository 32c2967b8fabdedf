"""What a layered model's call needs besides guided.layered_inputs: captions for pictures sent
without a prompt, and the layers' latents laid side by side for a latent preview.

QwenImageLayeredPipeline captions a picture itself only when its whole `prompt` is empty (one
string, not a list), so a batch is captioned here, one picture at a time, the way the pipeline
would (the same instruction, the picture at the layers' size, greedy decoding by the resident
text encoder), before the call; the job's time before its first step is this captioning.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from qwen_image_server.engine.previews import PATCH, VAE_SCALE
from qwen_image_server.engine.types import LayeredSpec


def captioned_prompts(pipeline: Any, specs: Sequence[LayeredSpec]) -> list[str]:
    """Each spec's prompt, or for one without a prompt the caption the model writes of its picture."""
    prompts = []
    for spec in specs:
        if spec.prompt.strip() or spec.source is None:
            prompts.append(spec.prompt)
            continue
        picture = pipeline.image_processor.resize(spec.source, spec.height, spec.layer_width)
        prompts.append(pipeline.get_image_caption(picture, use_en_prompt=spec.caption_language != "zh",
                                                  device=pipeline._execution_device))
    return prompts


def layers_side_by_side(packed: torch.Tensor, layers: int, width: int, height: int) -> torch.Tensor:
    """A layered call's packed latents, (B, (layers + 1) * rows * cols, C), as the packed latents
    of one picture holding its `layers` layers left to right ((B, rows * layers * cols, C), for a
    preview of `width` x `height`, the layers' width times `layers`). The first frame is the
    pipeline's own (it drops it before decoding too)."""
    batch, _, channels = packed.shape
    rows, cols = height // (VAE_SCALE * PATCH), width // layers // (VAE_SCALE * PATCH)
    frames = packed.view(batch, layers + 1, rows, cols, channels)[:, 1:]
    return frames.permute(0, 2, 1, 3, 4).reshape(batch, rows * layers * cols, channels)
