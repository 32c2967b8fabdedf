"""How a batch of EditSpecs becomes one call of an edit pipeline (the runner makes the call).

- QwenImageEditPipeline (Qwen-Image-Edit): one input image per prompt; a batch is a list of
  prompts with one image each (all the same size: the pipeline sizes everything by the first).
- QwenImageEditPlusPipeline (Edit-2509 / -2511): one to three images, but diffusers runs one
  prompt per call, so a batch is one prompt, its images, and `num_images_per_prompt` seeds
  (`EditSpec.one_prompt_per_call` keeps other prompts out of its batch key).
- A mask: QwenImageEditInpaintPipeline over the same components (`over_same_modules`: no copy,
  no cast), which reads the mask as white = change, and `strength` as how far to move from the original.
  It always makes ~1 megapixel at the image's aspect ratio; the server resizes the result to
  the requested size when rendering.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from typing import Any

from qwen_image_server.engine.types import EditSpec


def over_same_modules(pipeline_class: type, pipeline: Any, **overrides: Any) -> Any:
    """A `pipeline_class` over `pipeline`'s components as they are: the same objects, on the same
    devices, in the same dtypes (`overrides` replace or add components).

    diffusers' `from_pipe` shares the components too, but then casts the new pipeline to float32
    unless it is given a dtype, and the cast is in place: a bfloat16 model's weights would double
    in memory and every pipeline sharing them would step in float32 from then on (about 8x
    slower on an H200). Quantized or offloaded modules must not be cast at all, so nothing here
    calls `.to()`.
    """
    wanted = set(inspect.signature(pipeline_class).parameters)
    components = {name: part for name, part in pipeline.components.items() if name in wanted}
    return pipeline_class(**{**components, **overrides})


class EditCalls:
    """The pipelines one edit model is called through, and their arguments per batch."""

    def __init__(self, pipeline: Any) -> None:
        self.pipeline = pipeline
        self.one_prompt_per_call = type(pipeline).__name__ == "QwenImageEditPlusPipeline"
        self._inpaint: Any = None

    @property
    def inpaint(self) -> Any:
        """The masked-edit pipeline over the same weights, made on first use."""
        if self._inpaint is None:
            from diffusers import QwenImageEditInpaintPipeline

            self._inpaint = over_same_modules(QwenImageEditInpaintPipeline, self.pipeline)
            self._inpaint.set_progress_bar_config(disable=True)
        return self._inpaint

    def call(self, specs: Sequence[EditSpec], use_cfg: bool) -> tuple[Any, dict[str, Any]]:
        """The pipeline to call and the arguments that say what to edit (steps, CFG, generators
        and callbacks are the runner's)."""
        first = specs[0]
        negative = [s.negative_prompt for s in specs] if use_cfg else None
        if first.mask is not None:
            return self.inpaint, dict(
                prompt=[s.prompt for s in specs],
                negative_prompt=negative,
                image=[s.images[0] for s in specs],
                mask_image=[s.mask for s in specs],
                strength=first.strength,
            )
        if self.one_prompt_per_call:
            # Same prompt and inputs throughout (the batch key says so): n seeds of one request.
            return self.pipeline, dict(
                prompt=first.prompt,
                negative_prompt=first.negative_prompt if use_cfg else None,
                image=list(first.images),
                num_images_per_prompt=len(specs),
                width=first.width,
                height=first.height,
            )
        return self.pipeline, dict(
            prompt=[s.prompt for s in specs],
            negative_prompt=negative,
            image=[s.images[0] for s in specs],
            width=first.width,
            height=first.height,
        )
