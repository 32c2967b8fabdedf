"""How a batch of a generation model's specs becomes one pipeline call: text-to-image, or, over
the very same modules, image-to-image, inpainting, or ControlNet (the runner makes the call).

- QwenImageImg2ImgPipeline: `image` per prompt (all at the output size), one `strength`.
- QwenImageInpaintPipeline: `image` and `mask_image` (white = change) per prompt, one `strength`.
  The latents outside the mask stay the picture's; the server pastes the picture back outside
  the mask when rendering (the VAE decoder spreads a change a few pixels past it).
- QwenImageControlNetPipeline: the model's ControlNet (its own small network beside the shared
  transformer), a control image per prompt, one conditioning scale and guidance window.

The batch key (GenerationSpec.batch_key) keeps kinds, strengths and ControlNet settings apart,
so every spec of a batch fits one call.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from PIL import Image

from qwen_image_server.engine.edit import over_same_modules
from qwen_image_server.engine.types import GenerationSpec, LayeredSpec

_PIPELINES = {
    "img2img": "QwenImageImg2ImgPipeline",
    "inpaint": "QwenImageInpaintPipeline",
    "control": "QwenImageControlNetPipeline",
}


class GenerationCalls:
    """The pipelines one generation model is called through, and their arguments per batch."""

    def __init__(self, pipeline: Any, controlnet: Any = None) -> None:
        self.pipeline = pipeline
        self.controlnet = controlnet
        self._made: dict[str, Any] = {}

    def over(self, kind: str) -> Any:
        """The pipeline for `kind` over the model's own modules, made on first use."""
        made = self._made.get(kind)
        if made is None:
            import diffusers

            if kind == "control" and self.controlnet is None:
                raise ValueError("this model is served without a ControlNet")
            extra = {"controlnet": self.controlnet} if kind == "control" else {}
            made = over_same_modules(getattr(diffusers, _PIPELINES[kind]), self.pipeline, **extra)
            made.set_progress_bar_config(disable=True)
            self._made[kind] = made
        return made

    def call(self, specs: Sequence[GenerationSpec], use_cfg: bool) -> tuple[Any, dict[str, Any]]:
        """The pipeline to call and the arguments that say what to make (steps, CFG, generators
        and callbacks are the runner's)."""
        first = specs[0]
        inputs: dict[str, Any] = dict(
            prompt=[s.prompt for s in specs],
            negative_prompt=[s.negative_prompt for s in specs] if use_cfg else None,
            width=first.width,
            height=first.height,
        )
        kind = first.kind
        if kind == "text":
            return self.pipeline, inputs
        if kind == "img2img":
            inputs.update(image=[s.image for s in specs], strength=first.strength)
        elif kind == "inpaint":
            inputs.update(image=[s.image for s in specs], mask_image=[s.mask for s in specs],
                          strength=first.strength)
        else:
            images: Any = [s.control_image for s in specs]
            scale: Any = first.control_scale
            nets = getattr(self.controlnet, "nets", None)
            if nets is not None:  # several ControlNets: each gets the control image, at the one scale
                images, scale = [images] * len(nets), [scale] * len(nets)
            inputs.update(control_image=images, controlnet_conditioning_scale=scale,
                          control_guidance_start=first.control_start, control_guidance_end=first.control_end)
        return self.over(kind), inputs


def layered_inputs(specs: Sequence[LayeredSpec], use_cfg: bool) -> dict[str, Any]:
    """QwenImageLayeredPipeline's arguments: a picture per prompt (all the same size: the batch
    key says so), the layer count and resolution bucket."""
    first = specs[0]
    return dict(
        image=[s.source for s in specs],
        prompt=[s.prompt for s in specs],
        negative_prompt=[s.negative_prompt for s in specs] if use_cfg else None,
        layers=first.layers,
        resolution=first.resolution,
    )


def side_by_side(layers: Sequence[Image.Image]) -> Image.Image:
    """The layers of one picture as one RGBA image, left to right (what the engine hands back)."""
    width, height = layers[0].size
    strip = Image.new("RGBA", (width * len(layers), height))
    for index, layer in enumerate(layers):
        strip.paste(layer.convert("RGBA"), (index * width, 0))
    return strip
