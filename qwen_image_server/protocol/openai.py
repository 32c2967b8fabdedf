"""Wire models of the OpenAI-compatible API (/v1/images/generations, /v1/models).

Field names and shapes follow OpenAI's Images API (and the `openai` package's types), so the
official clients work unchanged. Qwen-Image's own knobs (steps, CFG, seed, ...) come in as extra
body fields, declared once in `common.py` for both APIs, so both validate them the same way.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from qwen_image_server.config.presets import ASPECT_RATIOS, AspectRatio
from qwen_image_server.protocol.common import (
    LAYERED_PROMPT_DESCRIPTION,
    MAX_PROMPT_CHARS,
    SIDE_MULTIPLE,
    ControlFields,
    EditFields,
    LoraChoice,
    OpenAIImageFields,
    OutputFormat,
    PromptFields,
    StartImageFields,
    UploadFields,
    blank_is_empty,
    json_list,
    null_means_default,
    parse_size,
)


class ImageGenerationRequest(ControlFields, StartImageFields, OpenAIImageFields, PromptFields):
    """Body of POST /v1/images/generations: OpenAI's fields plus Qwen-Image's extras (`extra_body`),
    which are /generate's and validated the same way."""

    # Strict like /generate ("2" is not a number); unknown fields are ignored, as OpenAI clients
    # send parameters (svg, safety_identifier, ...) that mean nothing for this model.
    model_config = ConfigDict(strict=True, extra="ignore")

    model: str | None = Field(None, description="Accepted for compatibility; the served model answers.")
    size: str = Field("auto", description="'WxH' (multiples of 16, 256-2048 per side) or 'auto' (1328x1328).")
    # Accepted and ignored: they steer OpenAI's own models and have no Qwen-Image equivalent.
    style: str | None = None
    moderation: str | None = None
    aspect_ratio: AspectRatio | None = Field(None, description="A size preset (see /info); overrides size.")

    _null_means_default = model_validator(mode="before")(null_means_default)

    @field_validator("size")
    @classmethod
    def _valid_size(cls, value: str) -> str:
        parse_size(value)
        return value

    def output_size(self, first_input: tuple[int, int] | None = None) -> tuple[int, int]:
        """(width, height) to generate: the aspect_ratio preset if given, else size."""
        if self.aspect_ratio is not None:
            return ASPECT_RATIOS[self.aspect_ratio]
        return parse_size(self.size)


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
    # Opaque, except the RGBA layers of a layered model.
    background: Literal["opaque", "transparent"] = "opaque"
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
    tasks: list[str] = Field(default_factory=list, description=(
        "What it does: generate (with image-to-image, inpaint, and controlnet when served with a "
        "ControlNet) or edit (empty while it loads)."))
    max_input_images: int = Field(0, description="Input images one edit takes (0: not an edit model).")
    pipeline: str | None = Field(None, description="The diffusers pipeline class (null while it loads).")
    pipelines: list[str] = Field(default_factory=list, description=(
        "Every diffusers pipeline class it is called through, one per task (they share its weights)."))
    controlnets: list[str] = Field(default_factory=list, description="The ControlNets served with it.")
    checkpoint: str | None = Field(None, description=(
        "Which Qwen-Image checkpoint it is (Qwen-Image, Qwen-Image-2512, Qwen-Image-Edit-2509, ...), "
        "as its hub id or folder names it; null when the name does not say."))


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


# -- /v1/images/edits -----------------------------------------------------------------------

class ImageEditForm(UploadFields, OpenAIImageFields, EditFields, PromptFields):
    """multipart/form-data body of POST /v1/images/edits: OpenAI's fields plus Qwen-Image's extras
    (form fields, as `extra_body` sends them)."""

    model_config = ConfigDict(extra="ignore")

    # Optional here: a layered model captions a picture sent without one (the route requires a
    # prompt of every other model, as OpenAI's does).
    prompt: str = Field("", max_length=MAX_PROMPT_CHARS, description=LAYERED_PROMPT_DESCRIPTION)
    input_fidelity: str | None = None  # accepted and ignored, as quality and background are
    layers: int = Field(4, ge=2, le=10, description=(
        "With a layered model (Qwen-Image-Layered) as `model`: how many RGBA layers to split the "
        "image into; data[] then holds one PNG per layer, in order, per image."))
    resolution: Literal[640, 1024] = Field(640, description=(
        "With a layered model: its resolution bucket (the layers are about resolution x resolution "
        "pixels at the image's aspect ratio)."))
    loras: list[LoraChoice] = Field(default_factory=list, description=(
        'LoRAs to apply, as JSON text ([{"name": "watercolor", "scale": 0.8}]); the openai client\'s '
        "extra_body={'loras': [...]} sends the loras[][name] / loras[][scale] fields instead."))
    # How the openai client flattens extra_body={"loras": [{"name": ..., "scale": ...}]} into a form.
    lora_names: list[str] = Field(default_factory=list, alias="loras[][name]", exclude=True)
    lora_scales: list[float] = Field(default_factory=list, alias="loras[][scale]", exclude=True)

    _loras_as_json = field_validator("loras", mode="before")(json_list)
    _not_blank = field_validator("prompt")(blank_is_empty)

    @field_validator("resolution", mode="before")
    @classmethod
    def _form_number(cls, value: object) -> object:
        """A form sends every field as text; a Literal of ints would refuse "640"."""
        return int(value) if isinstance(value, str) and value.strip().isdigit() else value

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


class ImageEditCompletedEvent(ImageStreamEvent):
    """One finished image in an edit stream (`openai.types.ImageEditCompletedEvent`)."""

    type: Literal["image_edit.completed"] = "image_edit.completed"
    usage: ImageUsage


class ImageEditPartialImageEvent(ImageStreamEvent):
    """One partial image in an edit stream (`openai.types.ImageEditPartialImageEvent`)."""

    type: Literal["image_edit.partial_image"] = "image_edit.partial_image"
    partial_image_index: int = Field(description="0-based, per image.")
