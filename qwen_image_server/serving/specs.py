"""Request bodies become specs here, and only here: one `GenerationSpec` (or `EditSpec`) per
image, whatever API the request came through."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, TypedDict

from PIL import Image

from qwen_image_server.engine.types import EditSpec, GenerationSpec, LayeredSpec, LoraSet, PreviewPlan
from qwen_image_server.protocol.common import ControlFields, EditFields, PromptFields, StartImageFields
from qwen_image_server.serving.model_registry import ModelChoice
from qwen_image_server.serving.uploads import EditInputs, GenerationPictures

# Image-to-image moves 60% of the way from the picture by default (diffusers' default); an
# inpainting repaints its masked area.
DEFAULT_STRENGTH = 0.6
DEFAULT_MASKED_STRENGTH = 1.0


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
                inputs: EditInputs | None = None, preview: PreviewPlan | None = None,
                pictures: GenerationPictures | None = None) -> list[GenerationSpec]:
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
        guided = _guided(body, pictures) if pictures is not None else {}
        return [GenerationSpec(seed=seed, **shared, **guided) for seed in seeds]
    # Strength moves a masked area only; without a mask the whole image is the edit's.
    strength = body.strength if isinstance(body, EditFields) and inputs.mask is not None else 1.0
    return [EditSpec(seed=seed, images=inputs.images, mask=inputs.mask, strength=strength,
                     inputs_digest=inputs.digest, one_prompt_per_call=model.one_prompt_per_call, **shared)
            for seed in seeds]


def _guided(body: PromptFields, pictures: GenerationPictures) -> dict[str, Any]:
    """A generation's picture to start from, or its control images (and a ControlNet
    inpainting's mask), as spec fields."""
    if pictures.image is not None:
        assert isinstance(body, StartImageFields)
        strength = body.strength
        if strength is None:
            strength = DEFAULT_MASKED_STRENGTH if pictures.mask is not None else DEFAULT_STRENGTH
        return dict(image=pictures.image, mask=pictures.mask, strength=strength)
    assert isinstance(body, ControlFields) and pictures.control_images
    scales = body.control_scales
    if pictures.mask is None and not any(scales):
        # A ControlNet at scale 0 adds exact zeros, but its pipeline draws the control image's VAE
        # sample from the image's own generator first, which would change the starting noise: a
        # scale of 0 is run as no ControlNet at all (the same image, and no ControlNet cost). The
        # inpainting ControlNet is what inpaints, so it runs at any scale (at 0 its image is the
        # text-to-image one with the picture pasted back outside the mask).
        return {}
    return dict(control_images=pictures.control_images, mask=pictures.mask, control_scales=scales,
                control_start=body.control_guidance_start, control_end=body.control_guidance_end)


def layered_size(size: tuple[int, int], resolution: int) -> tuple[int, int]:
    """The size of each layer QwenImageLayeredPipeline makes of a picture of `size`: about
    resolution x resolution pixels at its aspect ratio, sides multiples of 32 (diffusers'
    calculate_dimensions, which the front does not import)."""
    ratio = size[0] / size[1]
    width = math.sqrt(resolution * resolution * ratio)
    return round(width / 32) * 32, round(width / ratio / 32) * 32


def build_layered_specs(body: PromptFields, *, model: ModelChoice, loras: LoraSet, seeds: Sequence[int],
                        picture: Image.Image, layers: int, resolution: int,
                        preview: PreviewPlan | None = None) -> list[GenerationSpec]:
    """One LayeredSpec per seed: `picture` (RGBA) split into `layers` layers. Without a prompt
    the spec's prompt is empty (no language suffix): the engine has the model caption the picture,
    in the body's language."""
    width, height = layered_size(picture.size, resolution)
    prompt = body.model_prompt if body.prompt.strip() else ""
    return [LayeredSpec(prompt=prompt, negative_prompt=body.negative_prompt, width=width * layers,
                        height=height, num_inference_steps=body.num_inference_steps,
                        true_cfg_scale=body.true_cfg_scale, seed=seed, model=model.name, loras=loras,
                        preview=preview, source=picture, layers=layers, resolution=resolution,
                        caption_language=body.language)
            for seed in seeds]
