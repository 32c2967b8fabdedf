"""A loaded model as the server sees it: its pipeline and the facts /info reports.

Kept apart from the loader, which imports diffusers and transformers: the front of a server whose
engines are processes holds these (without their pipelines, see `engine/process.py`) and never
needs those libraries, nor the seconds of start-up they cost.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from qwen_image_server.engine.types import Task

if TYPE_CHECKING:
    import torch

    from qwen_image_server.engine.device import DeviceInfo
    from qwen_image_server.engine.options import AppliedOptions


@dataclass(frozen=True, slots=True)
class LoadedModel:
    pipeline: Any  # a diffusers QwenImagePipeline or an edit pipeline (see `task`)
    name: str  # the public name (/info, /v1/models, requests' `model`): by default the source
    source: str  # "huggingface", "modelscope", "local" or "embedded"
    device: DeviceInfo
    dtype: torch.dtype
    load_time: float  # seconds
    total_parameters: int
    size_mb: float  # bytes of all weights / 2**20 (as stored: quantized layers count their bytes)
    options: AppliedOptions
    # The scheduler's batch limits on this device: what a compile warm-up must cover.
    max_batch_size: int = 1
    max_batch_pixels: int = 512 * 512
    task: Task = "generate"
    # Components loaded once and shared with an earlier model (same weights), by component name.
    shared: tuple[str, ...] = ()
    # The ControlNets served with a generation model (their sources), and the module that runs
    # them (a QwenImageControlNetModel, or a QwenImageMultiControlNetModel for several; None in
    # the front of a server whose engines are processes).
    controlnets: tuple[str, ...] = ()
    controlnet: Any = None
    # Its inpainting ControlNet (one whose config takes the mask's extra channels), if any: its
    # source, and the QwenImageControlNetModel (None in such a front).
    inpaint_controlnets: tuple[str, ...] = ()
    inpaint_controlnet: Any = None

    @property
    def max_prompt_tokens(self) -> int:
        return int(self.pipeline.tokenizer_max_length)

    @property
    def pipeline_class(self) -> str:
        # An engine process's model, seen from the front, carries only facts about its pipeline.
        return getattr(self.pipeline, "class_name", None) or type(self.pipeline).__name__

    @property
    def tasks(self) -> list[str]:
        """What it does, for /v1/models: an edit model edits; a generation model also starts
        from a picture (image-to-image), inpaints, and with a ControlNet follows a control image."""
        if self.task != "generate":
            return [self.task]
        return ["generate", "image-to-image", "inpaint", *(["controlnet"] if self.controlnets else []),
                *(["controlnet-inpaint"] if self.inpaint_controlnets else [])]

    @property
    def pipelines(self) -> list[str]:
        """Every diffusers pipeline class it is called through (they share its modules)."""
        if self.task == "layered":
            extra = []
        elif self.task != "generate":
            extra = ["QwenImageEditInpaintPipeline"]
        else:
            extra = ["QwenImageImg2ImgPipeline", "QwenImageInpaintPipeline",
                     *(["QwenImageControlNetPipeline"] if self.controlnets else []),
                     *(["QwenImageControlNetInpaintPipeline"] if self.inpaint_controlnets else [])]
        return [self.pipeline_class, *extra]

    @property
    def max_images(self) -> int:
        """Input images one edit takes (0 for a generation model)."""
        if self.task != "edit":
            return 0
        return 1 if self.pipeline_class == "QwenImageEditPipeline" else 3
