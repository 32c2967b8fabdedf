"""The Qwen2.5-VL processor the edit pipelines use to show input images to the text encoder.

transformers' `Qwen2VLProcessor` insists on a video processor, and every video processor needs
torchvision, which CPU installs of this server do not have (and GPU ones need not). The edit
pipelines never pass videos, so where the stock class cannot load an image-only subclass is used:
same tokenizer, same image processor, same output.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any

# Qwen/Qwen2.5-VL-7B-Instruct's preprocessor_config.json, which Qwen-Image-Edit's processor/ folder
# carries too. transformers' own default max_pixels (1,003,520) would shrink the ~1024² condition
# image of Qwen-Image-Edit, so it is set explicitly.
QWEN25VL_IMAGE_PROCESSOR: dict[str, Any] = dict(
    min_pixels=56 * 56,
    max_pixels=28 * 28 * 16384,
    patch_size=14,
    temporal_patch_size=2,
    merge_size=2,
    image_mean=[0.48145466, 0.4578275, 0.40821073],
    image_std=[0.26862954, 0.26130258, 0.27577711],
    resample=3,  # bicubic
    rescale_factor=1 / 255,
    do_convert_rgb=True,
)
_VIDEO_PROCESSOR = {key: QWEN25VL_IMAGE_PROCESSOR[key] for key in (
    "min_pixels", "max_pixels", "patch_size", "temporal_patch_size", "merge_size", "image_mean", "image_std")}


def has_torchvision() -> bool:
    from transformers.utils import is_torchvision_available

    return bool(is_torchvision_available())


@functools.cache
def image_only_processor_class() -> Any:
    from transformers import Qwen2VLProcessor
    from transformers.processing_utils import ProcessorMixin

    class ImageOnlyQwen2VLProcessor(Qwen2VLProcessor):
        """Qwen2VLProcessor without the video processor.

        ProcessorMixin derives its sub-processors from __init__'s signature, so leaving
        `video_processor` out makes construction, saving and loading skip it.
        """

        def __init__(self, image_processor: Any = None, tokenizer: Any = None,
                     chat_template: str | None = None, **kwargs: Any) -> None:
            self.image_token = getattr(tokenizer, "image_token", None) or "<|image_pad|>"
            self.video_token = getattr(tokenizer, "video_token", None) or "<|video_pad|>"
            self.image_token_id = (getattr(tokenizer, "image_token_id", None)
                                   or tokenizer.convert_tokens_to_ids(self.image_token))
            self.video_token_id = (getattr(tokenizer, "video_token_id", None)
                                   or tokenizer.convert_tokens_to_ids(self.video_token))
            ProcessorMixin.__init__(self, image_processor, tokenizer, chat_template=chat_template)

    return ImageOnlyQwen2VLProcessor


def build_processor(tokenizer: Any) -> Any:
    """A processor with Qwen2.5-VL's values around `tokenizer` (for the embedded tiny edit model)."""
    if has_torchvision():
        from transformers import (
            Qwen2VLImageProcessor,
            Qwen2VLProcessor,
            Qwen2VLVideoProcessor,
        )

        return Qwen2VLProcessor(image_processor=Qwen2VLImageProcessor(**QWEN25VL_IMAGE_PROCESSOR),
                                tokenizer=tokenizer,
                                video_processor=Qwen2VLVideoProcessor(**_VIDEO_PROCESSOR))
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import (
        Qwen2VLImageProcessorPil,
    )

    return image_only_processor_class()(image_processor=Qwen2VLImageProcessorPil(**QWEN25VL_IMAGE_PROCESSOR),
                                        tokenizer=tokenizer)


def load_processor(folder: Path, tokenizer: Any = None) -> Any:
    """Load a pipeline's processor/ folder: the stock class where torchvision exists, else
    image-only. `tokenizer`: one already loaded from the same files (reading the Qwen vocabulary
    again takes seconds)."""
    if has_torchvision():
        from transformers import Qwen2VLProcessor

        return Qwen2VLProcessor.from_pretrained(folder)
    if tokenizer is None:
        return image_only_processor_class().from_pretrained(folder)
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import (
        Qwen2VLImageProcessorPil,
    )

    return image_only_processor_class()(image_processor=Qwen2VLImageProcessorPil.from_pretrained(folder),
                                        tokenizer=tokenizer)


def make_stock_loadable(pipeline_folder: Path) -> None:
    """After saving with the image-only class: make the folder read as a stock Qwen2VLProcessor one
    (class names in model_index.json and processor_config.json, and a video processor config), so
    `from_pretrained` with torchvision installed loads it like Qwen-Image-Edit's own folder."""
    index_path = pipeline_folder / "model_index.json"
    index = json.loads(index_path.read_text())
    index["processor"] = ["transformers", "Qwen2VLProcessor"]
    index_path.write_text(json.dumps(index, indent=2, sort_keys=True))
    folder = pipeline_folder / "processor"
    for name in ("processor_config.json", "preprocessor_config.json"):
        path = folder / name
        if path.is_file():
            config = json.loads(path.read_text())
            if "processor_class" in config:
                config["processor_class"] = "Qwen2VLProcessor"
                path.write_text(json.dumps(config, indent=2, sort_keys=True))
    video = folder / "video_preprocessor_config.json"
    if not video.exists():
        video.write_text(json.dumps({**_VIDEO_PROCESSOR, "video_processor_type": "Qwen2VLVideoProcessor",
                                     "processor_class": "Qwen2VLProcessor"}, indent=2, sort_keys=True))
