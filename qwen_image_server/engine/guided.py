"""How a batch of a generation model's specs becomes one pipeline call: text-to-image, or, over
the very same modules, image-to-image, inpainting, or ControlNet (the runner makes the call).

- QwenImageImg2ImgPipeline: `image` per prompt (all at the output size), one `strength`.
- QwenImageInpaintPipeline: `image` and `mask_image` (white = change) per prompt, one `strength`.
  The latents outside the mask stay the picture's; the server pastes the picture back outside
  the mask when rendering (the VAE decoder spreads a change a few pixels past it).
- QwenImageControlNetPipeline: the model's ControlNet (its own small network beside the shared
  transformer), a control image per prompt, one conditioning scale and guidance window. Several
  control images (a union ControlNet's conditions: edges and depth, ...) run through the same
  ControlNet wrapped in a QwenImageMultiControlNetModel, one scale each; diffusers 0.42 runs one
  ControlNet per call (its multi-ControlNet model refuses several).
- QwenImageControlNetInpaintPipeline: the model's inpainting ControlNet; the picture
  (`control_image`) and mask (`control_mask`, white = change) per prompt. It starts from pure
  noise: the ControlNet alone says what to keep, so the server pastes the picture back outside
  the mask as it does for inpainting.

The batch key (GenerationSpec.batch_key) keeps kinds, strengths and ControlNet settings apart,
so every spec of a batch fits one call.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial
from typing import Any

from PIL import Image

from qwen_image_server.engine.edit import over_same_modules
from qwen_image_server.engine.types import GenerationSpec, LayeredSpec

_PIPELINES = {
    "img2img": "QwenImageImg2ImgPipeline",
    "inpaint": "QwenImageInpaintPipeline",
    "control": "QwenImageControlNetPipeline",
    "control_multi": "QwenImageControlNetPipeline",
    "control_inpaint": "QwenImageControlNetInpaintPipeline",
}


class GenerationCalls:
    """The pipelines one generation model is called through, and their arguments per batch."""

    def __init__(self, pipeline: Any, controlnet: Any = None, inpaint_controlnet: Any = None) -> None:
        self.pipeline = pipeline
        self.controlnet = controlnet
        self.inpaint_controlnet = inpaint_controlnet
        self._made: dict[str, Any] = {}

    def over(self, kind: str) -> Any:
        """The pipeline for `kind` over the model's own modules, made on first use."""
        made = self._made.get(kind)
        if made is None:
            import diffusers

            net = {"control": self.controlnet, "control_multi": self.controlnet,
                   "control_inpaint": self.inpaint_controlnet}.get(kind)
            if kind in ("control", "control_multi", "control_inpaint") and net is None:
                raise ValueError(f"this model is served without a{'n inpainting' if kind == 'control_inpaint' else ''} "
                                 "ControlNet")
            if kind == "control_multi":  # the same ControlNet, called once per control image
                net = diffusers.QwenImageMultiControlNetModel([net])
            extra = {"controlnet": net} if net is not None else {}
            made = over_same_modules(getattr(diffusers, _PIPELINES[kind]), self.pipeline, **extra)
            made.set_progress_bar_config(disable=True)
            if kind == "control_inpaint":
                made.prepare_image_with_mask = partial(masked_condition, made)
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
        kind: str = first.kind
        if kind == "text":
            return self.pipeline, inputs
        if kind == "img2img":
            inputs.update(image=[s.image for s in specs], strength=first.strength)
        elif kind == "inpaint":
            inputs.update(image=[s.image for s in specs], mask_image=[s.mask for s in specs],
                          strength=first.strength)
        elif kind == "control_inpaint":
            inputs.update(control_image=[s.control_images[0] for s in specs], control_mask=[s.mask for s in specs],
                          controlnet_conditioning_scale=first.control_scales[0],
                          control_guidance_start=first.control_start, control_guidance_end=first.control_end)
        else:
            count = len(first.control_images)
            images: Any = [s.control_images[0] for s in specs]
            scale: Any = first.control_scales[0]
            if count > 1:
                # Several control images (e.g. edges and depth) through the one ControlNet (a
                # union ControlNet takes each as a condition): a list of the batch's images per
                # condition, and a scale each (one scale is every condition's).
                kind = "control_multi"
                images = [[s.control_images[i] for s in specs] for i in range(count)]
                scales = first.control_scales
                scale = list(scales) if len(scales) == count else [scales[0]] * count
            inputs.update(control_image=images, controlnet_conditioning_scale=scale,
                          control_guidance_start=first.control_start, control_guidance_end=first.control_end)
        return self.over(kind), inputs


def masked_condition(pipe: Any, image: Any, mask: Any, width: int, height: int, batch_size: int,
                     num_images_per_prompt: int, device: Any, dtype: Any, **_: Any) -> Any:
    """QwenImageControlNetInpaintPipeline's condition (the masked picture's latents and the mask,
    packed), with the latents at the VAE's mean where diffusers draws a sample from torch's
    global generator: that draw would make the same seed give another image on every call, and
    depend on whatever else used the global generator. The mean is what Qwen-Image's
    image-to-image and inpainting pipelines encode their pictures with too. One picture and
    mask per prompt (the runner never asks for several images per prompt)."""
    import torch

    pictures = pipe.image_processor.preprocess(image, height=height, width=width)
    masks = pipe.mask_processor.preprocess(mask, height=height, width=width)
    pictures = pictures.to(device=device, dtype=dtype).unsqueeze(2)  # (batch, 3, 1, height, width)
    masks = masks.to(device=device, dtype=dtype).unsqueeze(2)  # (batch, 1, 1, height, width), 1 = change
    masked = pictures.masked_fill((masks > 0.5).expand_as(pictures), -1.0)
    config = pipe.vae.config
    mean = torch.tensor(config.latents_mean).view(1, config.z_dim, 1, 1, 1).to(device)
    inverse_std = 1.0 / torch.tensor(config.latents_std).view(1, config.z_dim, 1, 1, 1).to(device)
    latents = pipe.vae.encode(masked.to(pipe.vae.dtype)).latent_dist.mode()
    latents = ((latents - mean) * inverse_std).to(dtype)
    keep = 1 - torch.nn.functional.interpolate(masks, size=latents.shape[-3:])
    condition = torch.cat([latents, keep], dim=1).permute(0, 2, 1, 3, 4)  # (batch, 1, 17, h/8, w/8)
    return pipe._pack_latents(condition, batch_size=condition.shape[0], num_channels_latents=condition.shape[2],
                              height=condition.shape[3], width=condition.shape[4])


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
