"""Wire models of the OpenAI-compatible API (/v1/images/generations, /v1/models).

Field names and shapes follow OpenAI's Images API (and the `openai` package's types), so the
official clients work unchanged. Qwen-Image's own knobs (steps, CFG, seed, ...) come in as extra
body fields and reuse `GenerateRequest`'s definitions, so both APIs validate them the same way.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

from fastapi import UploadFile
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from qwen_image_server.config.presets import (
    ASPECT_RATIOS,
    AspectRatio,
    Language,
    with_suffix,
)
from qwen_image_server.engine.types import GenerationSpec, PreviewPlan
from qwen_image_server.protocol.common import (
    LORAS,
    MAX_SEED,
    SIDE_MULTIPLE,
    LoraChoice,
    OutputFormat,
    json_list,
    not_blank,
    parse_edit_size,
    parse_size,
)
from qwen_image_server.protocol.native import GenerateRequest

MAX_IMAGES = 10  # OpenAI's bound on n
_NATIVE = GenerateRequest.model_fields
MAX_PARTIAL_IMAGES = 3  # OpenAI's bound
PARTIAL_IMAGES = Field(None, ge=0, le=MAX_PARTIAL_IMAGES, description=(
    "With stream: true, partial images (full VAE decodes of the image so far) sent before each "
    "image's completed event, spread over the steps; fewer when there are too few steps. "
    "Without stream it is accepted and ignored, as OpenAI does."))


def preview_plan(stream: bool, partial_images: int | None) -> PreviewPlan | None:
    """What `partial_images` asks of the engine: full decodes at that many steps, streams only."""
    if not stream or not partial_images:
        return None
    return PreviewPlan("full", count=partial_images)


class ImageGenerationRequest(BaseModel):
    """Body of POST /v1/images/generations: OpenAI's fields plus Qwen-Image's extras."""

    # Strict like /generate ("2" is not a number); unknown fields are ignored, as OpenAI clients
    # send parameters (svg, safety_identifier, ...) that mean nothing for this model.
    model_config = ConfigDict(strict=True, extra="ignore")

    # -- OpenAI's parameters ----------------------------------------------------------------
    prompt: str = _NATIVE["prompt"]
    model: str | None = Field(None, description="Accepted for compatibility; the served model answers.")
    n: int = Field(1, ge=1, le=MAX_IMAGES, description="Images to generate, seeds seed, seed+1, ...")
    size: str = Field("auto", description="'WxH' (multiples of 16, 256-2048 per side) or 'auto' (1328x1328).")
    response_format: Literal["b64_json", "url"] = "b64_json"
    output_format: OutputFormat = "png"
    output_compression: int | None = Field(None, ge=0, le=100, description="jpeg/webp quality; default 100.")
    stream: bool = Field(False, description="Answer with Server-Sent Events, one per finished image.")
    partial_images: int | None = PARTIAL_IMAGES
    # Accepted and ignored: they steer OpenAI's own models and have no Qwen-Image equivalent.
    quality: str | None = None
    style: str | None = None
    user: str | None = None
    background: str | None = None
    moderation: str | None = None

    # -- Qwen-Image's extras (extra_body), validated exactly as /generate does ---------------
    negative_prompt: str = _NATIVE["negative_prompt"]
    num_inference_steps: int = _NATIVE["num_inference_steps"]
    true_cfg_scale: float = _NATIVE["true_cfg_scale"]
    # Unlike /generate (seed 42), no seed means a random one: OpenAI clients expect new images.
    seed: int | None = Field(None, ge=0, le=MAX_SEED, description=_NATIVE["seed"].description)
    language: Language = _NATIVE["language"]
    aspect_ratio: AspectRatio | None = Field(None, description="A size preset (see /info); overrides size.")
    loras: list[LoraChoice] = LORAS

    @model_validator(mode="before")
    @classmethod
    def _null_means_default(cls, data: Any) -> Any:
        # OpenAI's API treats an explicit null like an omitted parameter; so do we.
        if isinstance(data, dict):
            return {key: value for key, value in data.items() if value is not None}
        return data

    _not_blank = field_validator("prompt")(not_blank)

    @field_validator("size")
    @classmethod
    def _valid_size(cls, value: str) -> str:
        parse_size(value)
        return value

    @property
    def dimensions(self) -> tuple[int, int]:
        """(width, height) to generate: the aspect_ratio preset if given, else size."""
        if self.aspect_ratio is not None:
            return ASPECT_RATIOS[self.aspect_ratio]
        return parse_size(self.size)

    @property
    def model_prompt(self) -> str:
        """The prompt as the model sees it (language suffix included): OpenAI's revised_prompt."""
        return with_suffix(self.prompt, self.language)

    def to_specs(self, base_seed: int) -> list[GenerationSpec]:
        """One spec per image; image i gets seed base_seed + i (wrapping within the seed range).

        The specs differ only in seed, so they share a batch key and the scheduler batches them.
        """
        width, height = self.dimensions
        return [
            GenerationSpec(
                prompt=self.model_prompt,
                negative_prompt=self.negative_prompt,
                width=width,
                height=height,
                num_inference_steps=self.num_inference_steps,
                true_cfg_scale=self.true_cfg_scale,
                seed=(base_seed + i) % (MAX_SEED + 1),
                preview=preview_plan(self.stream, self.partial_images),
            )
            for i in range(self.n)
        ]


class ImageData(BaseModel):
    b64_json: str | None = None
    url: str | None = None
    revised_prompt: str | None = Field(None, description="The prompt as the model saw it.")


class InputTokensDetails(BaseModel):
    text_tokens: int
    image_tokens: int = 0  # edits: the input images' 16x16 patches


class ImageUsage(BaseModel):
    """OpenAI's usage block. Output tokens are the transformer's image tokens (16x16-pixel patches)."""

    input_tokens: int
    input_tokens_details: InputTokensDetails
    output_tokens: int
    total_tokens: int

    @classmethod
    def of(cls, text_tokens: int, width: int, height: int, images: int,
           inputs: Sequence[tuple[int, int]] = ()) -> ImageUsage:
        """`inputs`: the sizes of an edit's input images, counted as image tokens like the output."""
        output = images * (width // SIDE_MULTIPLE) * (height // SIDE_MULTIPLE)
        image_tokens = sum((w // SIDE_MULTIPLE) * (h // SIDE_MULTIPLE) for w, h in inputs)
        return cls(
            input_tokens=text_tokens + image_tokens,
            input_tokens_details=InputTokensDetails(text_tokens=text_tokens, image_tokens=image_tokens),
            output_tokens=output,
            total_tokens=text_tokens + image_tokens + output,
        )


class ImagesResponse(BaseModel):
    created: int = Field(description="Unix time the images were made.")
    model: str = Field(description="The model that made them (whatever the request named).")
    data: list[ImageData]
    size: str = Field(description="'WxH' of every image.")
    output_format: OutputFormat
    background: Literal["opaque"] = "opaque"  # the model makes no transparency
    quality: str | None = None
    usage: ImageUsage | None = None


class ImageStreamEvent(BaseModel):
    """What every image event of a stream carries, generation or edit, partial or completed."""

    b64_json: str
    created_at: int
    size: str
    quality: str
    background: Literal["opaque"] = "opaque"
    output_format: OutputFormat


class ImageGenCompletedEvent(ImageStreamEvent):
    """One finished image in a stream (`openai.types.ImageGenCompletedEvent`)."""

    type: Literal["image_generation.completed"] = "image_generation.completed"
    usage: ImageUsage


class ImageGenPartialImageEvent(ImageStreamEvent):
    """One partial image in a stream (`openai.types.ImageGenPartialImageEvent`)."""

    type: Literal["image_generation.partial_image"] = "image_generation.partial_image"
    partial_image_index: int = Field(description="0-based, per image.")


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "qwen-image-server"
    tasks: list[str] = Field(default_factory=list, description="What it does: generate, edit (empty while it loads).")
    max_input_images: int = Field(0, description="Input images one edit takes (0: not an edit model).")
    pipeline: str | None = Field(None, description="The diffusers pipeline class (null while it loads).")


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


# -- /v1/images/edits -----------------------------------------------------------------------

class ImageEditForm(BaseModel):
    """multipart/form-data body of POST /v1/images/edits: OpenAI's fields plus Qwen-Image's extras
    (form fields, as `extra_body` sends them)."""

    model_config = ConfigDict(extra="ignore")

    # -- OpenAI's parameters ----------------------------------------------------------------
    image: list[UploadFile] = Field(default_factory=list, description="The image(s) to edit.")
    image_list: list[UploadFile] = Field(default_factory=list, alias="image[]",
                                         description="The images to edit, the array form (up to 3).")
    mask: UploadFile | None = Field(None, description="PNG the size of the first image; transparent pixels "
                                    "are the area to change.")
    prompt: str = _NATIVE["prompt"]
    model: str | None = Field(None, description="The model to edit with; default: the first edit model.")
    n: int = Field(1, ge=1, le=MAX_IMAGES, description="Images to make, seeds seed, seed+1, ...")
    size: str | None = Field(None, description="'WxH' (multiples of 16, 256-2048 per side) or 'auto' "
                             "(the first image's size, snapped to multiples of 16).")
    response_format: Literal["b64_json", "url"] = "b64_json"
    output_format: OutputFormat = "png"
    output_compression: int | None = Field(None, ge=0, le=100, description="jpeg/webp quality; default 100.")
    stream: bool = Field(False, description="Answer with Server-Sent Events, one per finished image.")
    partial_images: int | None = PARTIAL_IMAGES
    quality: str | None = None
    background: str | None = None
    input_fidelity: str | None = None
    user: str | None = None

    # -- Qwen-Image's extras ----------------------------------------------------------------
    negative_prompt: str = _NATIVE["negative_prompt"]
    num_inference_steps: int = _NATIVE["num_inference_steps"]
    true_cfg_scale: float = _NATIVE["true_cfg_scale"]
    seed: int | None = Field(None, ge=0, le=MAX_SEED, description=_NATIVE["seed"].description)
    language: Language = _NATIVE["language"]
    strength: float = Field(1.0, gt=0.0, le=1.0, description="Masked edits: 1.0 repaints the masked area, "
                            "lower keeps more of it.")
    loras: list[LoraChoice] = Field(default_factory=list, description=(
        'LoRAs to apply, as JSON text ([{"name": "watercolor", "scale": 0.8}]); the openai client\'s '
        "extra_body={'loras': [...]} sends the loras[][name] / loras[][scale] fields instead."))
    # How the openai client flattens extra_body={"loras": [{"name": ..., "scale": ...}]} into a form.
    lora_names: list[str] = Field(default_factory=list, alias="loras[][name]", exclude=True)
    lora_scales: list[float] = Field(default_factory=list, alias="loras[][scale]", exclude=True)

    _not_blank = field_validator("prompt")(not_blank)
    _loras_as_json = field_validator("loras", mode="before")(json_list)

    @model_validator(mode="after")
    def _flattened_loras(self) -> ImageEditForm:
        if not self.lora_names:
            return self
        if self.loras:
            raise ValueError("send loras either as JSON text or as loras[][name] fields, not both")
        if self.lora_scales and len(self.lora_scales) != len(self.lora_names):
            raise ValueError("give every LoRA in loras[][name] a loras[][scale], or none of them")
        scales = self.lora_scales or [1.0] * len(self.lora_names)
        self.loras = [LoraChoice.model_validate({"name": name, "scale": scale}, strict=False)
                      for name, scale in zip(self.lora_names, scales, strict=True)]
        return self

    @field_validator("size")
    @classmethod
    def _valid_size(cls, value: str | None) -> str | None:
        parse_edit_size(value)
        return value

    @property
    def model_prompt(self) -> str:
        return with_suffix(self.prompt, self.language)

    @property
    def images(self) -> list[UploadFile]:
        return [*self.image, *self.image_list]


class ImageEditCompletedEvent(ImageStreamEvent):
    """One finished image in an edit stream (`openai.types.ImageEditCompletedEvent`)."""

    type: Literal["image_edit.completed"] = "image_edit.completed"
    usage: ImageUsage


class ImageEditPartialImageEvent(ImageStreamEvent):
    """One partial image in an edit stream (`openai.types.ImageEditPartialImageEvent`)."""

    type: Literal["image_edit.partial_image"] = "image_edit.partial_image"
    partial_image_index: int = Field(description="0-based, per image.")
