"""Request bodies become specs here, and only here: one `GenerationSpec` (or `EditSpec`) per
image, whatever API the request came through."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TypedDict

from qwen_image_server.engine.types import EditSpec, GenerationSpec, LoraSet, PreviewPlan
from qwen_image_server.protocol.common import EditFields, PromptFields
from qwen_image_server.serving.model_registry import ModelChoice
from qwen_image_server.serving.uploads import EditInputs


class _Shared(TypedDict):
    """What every image of one request has in common."""

    prompt: str
    negative_prompt: str
    width: int
    height: int
    num_inference_steps: int
    true_cfg_scale: float
    model: str
    loras: LoraSet
    preview: PreviewPlan | None


def build_specs(body: PromptFields, *, model: ModelChoice, loras: LoraSet, seeds: Sequence[int],
                inputs: EditInputs | None = None, preview: PreviewPlan | None = None) -> list[GenerationSpec]:
    """One spec per seed: the body's parameters on `model` with `loras` (and, for an edit, the
    decoded `inputs`), at the size the body asks for, with `preview`'s previews.

    The specs of one request differ only in their seeds, so they share a batch key and run as one
    batch when they fit.
    """
    width, height = body.output_size(inputs.first_size if inputs is not None else None)
    shared = _Shared(prompt=body.model_prompt, negative_prompt=body.negative_prompt, width=width, height=height,
                     num_inference_steps=body.num_inference_steps, true_cfg_scale=body.true_cfg_scale,
                     model=model.name, loras=loras, preview=preview)
    if inputs is None:
        return [GenerationSpec(seed=seed, **shared) for seed in seeds]
    # Strength moves a masked area only; without a mask the whole image is the edit's.
    strength = body.strength if isinstance(body, EditFields) and inputs.mask is not None else 1.0
    return [EditSpec(seed=seed, images=inputs.images, mask=inputs.mask, strength=strength,
                     inputs_digest=inputs.digest, one_prompt_per_call=model.one_prompt_per_call, **shared)
            for seed in seeds]
