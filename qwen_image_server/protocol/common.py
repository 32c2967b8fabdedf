"""What the wire models of every API share: seeds, sizes, output formats, LoRA choices, the error
body, the validators they all use, and the field bases every request is made of.

A field is declared once, in a base: `PromptFields` (what to make: prompt, negative prompt, steps,
CFG, language, LoRAs), `NativeImageFields` (the seed API's seed 42, overlay and file save),
`EditFields` (the edit model, size and mask strength), `UploadFields` (image files and a mask) and
`OpenAIImageFields` (OpenAI's output options). The native and OpenAI bodies are made of them and
import from here, never from each other; a knob added to a base reaches every API at once.
"""

from __future__ import annotations

import json
import re
import secrets
from typing import TYPE_CHECKING, Any, Literal

from fastapi import UploadFile
from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator
from pydantic_core import PydanticCustomError

from qwen_image_server.config.lora_refs import is_valid_name
from qwen_image_server.config.presets import DEFAULT_NEGATIVE_PROMPT, Language, with_suffix
from qwen_image_server.engine.types import PreviewPlan

if TYPE_CHECKING:
    from qwen_image_server import errors

OutputFormat = Literal["png", "jpeg", "webp"]

MAX_SEED = 2**32 - 1
MIN_LORA_SCALE, MAX_LORA_SCALE = -4.0, 4.0


def not_blank(value: str) -> str:
    """Validator: a prompt of only whitespace is as empty as no prompt."""
    if not value.strip():
        raise ValueError("prompt must contain some text")
    return value


def blank_is_empty(value: str) -> str:
    """Validator of a prompt that may be left out (a layered model's): only whitespace is none."""
    return value if value.strip() else ""


LAYERED_PROMPT_DESCRIPTION = (
    "What the picture shows. With a layered model it may be left out: the model then captions the "
    "picture itself with its text encoder first (a job's `captioning` phase).")


class LoraChoice(BaseModel):
    """One LoRA a request applies: a name from GET /v1/loras and its strength."""

    model_config = ConfigDict(strict=True, extra="forbid")

    name: str = Field(min_length=1, max_length=128, description="A LoRA's name, as GET /v1/loras lists it.")
    scale: float = Field(1.0, ge=MIN_LORA_SCALE, le=MAX_LORA_SCALE,
                         description="How strongly it applies (1.0: as trained; 0: not at all).")

    @field_validator("name")
    @classmethod
    def _a_name_not_a_path(cls, value: str) -> str:
        if not is_valid_name(value):
            raise ValueError("a LoRA is named as GET /v1/loras lists it (letters, digits, '.', '_', '-'), "
                             "never by a path")
        return value


def json_list(value: object) -> object:
    """Validator: a form field carries a list as JSON text (`loras='[{"name": "x"}]'`)."""
    if isinstance(value, str):
        try:
            return json.loads(value) if value.strip() else []
        except ValueError:
            raise ValueError('must be a JSON list, like [{"name": "watercolor", "scale": 0.8}]') from None
    return value


LORAS: list[LoraChoice] = Field(default_factory=list, description=(
    "LoRAs to apply, e.g. [{\"name\": \"watercolor\", \"scale\": 0.8}] (see GET /v1/loras; at most "
    "QWEN_IMAGE_MAX_LORAS_PER_REQUEST). A Lightning LoRA also sets its own sampler, and the default "
    "steps and CFG."))


AUTO_SIZE = (1328, 1328)  # Qwen-Image's native square, the model card's 1:1
MIN_SIDE, MAX_SIDE, SIDE_MULTIPLE = 256, 2048, 16  # 16: 8x VAE downsampling, 2x2 patches
_SIZE = re.compile(r"(\d{1,5})x(\d{1,5})", re.ASCII)


def parse_size(value: str) -> tuple[int, int]:
    """'auto' or 'WxH' -> (width, height); PydanticCustomError (-> 400, param 'size') otherwise."""
    if value == "auto":
        return AUTO_SIZE
    match = _SIZE.fullmatch(value.lower())
    if match is None:
        raise PydanticCustomError("invalid_size", "size must be 'auto' or 'WIDTHxHEIGHT', like '1024x1024'")
    w, h = int(match[1]), int(match[2])
    if not all(MIN_SIDE <= side <= MAX_SIDE and side % SIDE_MULTIPLE == 0 for side in (w, h)):
        raise PydanticCustomError(
            "invalid_size",
            "width and height must each be a multiple of {multiple} between {low} and {high}, got {size}",
            {"multiple": SIDE_MULTIPLE, "low": MIN_SIDE, "high": MAX_SIDE, "size": value},
        )
    return w, h


def parse_edit_size(value: str | None) -> tuple[int, int] | None:
    """An edit's size: None for 'auto' or none (the first image's size), else as `parse_size`."""
    if value is None or value == "auto":
        return None
    return parse_size(value)


def default_output_size(size: tuple[int, int], low: int = MIN_SIDE, high: int = MAX_SIDE,
                        multiple: int = SIDE_MULTIPLE) -> tuple[int, int]:
    """The first image's size, scaled (aspect kept) into [low, high] per side where it can be,
    each side snapped to a multiple of `multiple`: what an edit makes when no size is asked."""
    width, height = size
    scale = min(1.0, high / max(width, height))
    scale = max(scale, min(low / min(width, height), high / max(width, height)))
    snapped = [min(high, max(low, round(side * scale / multiple) * multiple)) for side in (width, height)]
    return snapped[0], snapped[1]


def seeds(base: int, count: int) -> list[int]:
    """The seeds of `count` images: base, base + 1, ... (wrapping within the seed range)."""
    return [(base + i) % (MAX_SEED + 1) for i in range(count)]


def random_seed() -> int:
    """A seed for a request that gave none (OpenAI clients expect new images each time)."""
    return secrets.randbelow(MAX_SEED + 1)


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None

    @classmethod
    def of(cls, exc: errors.ServerError) -> ErrorDetail:
        """The wire form of one of the server's error values."""
        return cls(message=exc.message, type=exc.type, param=exc.param, code=exc.code)


class ErrorResponse(BaseModel):
    error: ErrorDetail




# -- the field bases requests are made of -----------------------------------------------------

SEED_DESCRIPTION = "Random seed for reproducibility."

# The longest prompt or negative prompt, in characters, refused at validation (400 naming the
# field) before anything tokenizes it. The model reads at most 1024 tokens; the token check after
# admission refuses longer prompts with their count. Natural text runs at about 4-5 characters a
# token in English and under 2 in Chinese, so a prompt the model can read fits many times over;
# only runs of one repeated character (the vocabulary's longest token is 128 spaces) could pack
# 1024 tokens into more. 32,000 is OpenAI's own limit for gpt-image prompts, so an OpenAI
# client meets the same bound here as there, and one bound serves both APIs (the field is
# declared once). Counting the tokens of 32,000 characters takes about 30 ms of CPU; of a 50 MB
# body's prompt, about a minute.
MAX_PROMPT_CHARS = 32_000


class PromptFields(BaseModel):
    """What every request that makes an image says about it."""

    prompt: str = Field(min_length=1, max_length=MAX_PROMPT_CHARS, description="Image description.")
    negative_prompt: str = Field(DEFAULT_NEGATIVE_PROMPT, max_length=MAX_PROMPT_CHARS, description="Concepts to avoid.")
    num_inference_steps: int = Field(20, ge=1, le=100, description="Denoising steps.")
    true_cfg_scale: float = Field(4.0, ge=0.0, le=50.0, description="Classifier-free guidance scale.")
    language: Language = Field("en", description="Adds the model card's quality suffix for en or zh.")
    loras: list[LoraChoice] = LORAS
    # No seed means a random one (OpenAI clients expect new images); the seed API's is 42.
    seed: int | None = Field(None, ge=0, le=MAX_SEED, description=SEED_DESCRIPTION)

    _not_blank = field_validator("prompt")(not_blank)

    @property
    def model_prompt(self) -> str:
        """The prompt as the model sees it (language suffix included): OpenAI's revised_prompt."""
        return with_suffix(self.prompt, self.language)

    def output_size(self, first_input: tuple[int, int] | None = None) -> tuple[int, int]:
        """(width, height) of the images: each kind of request has its rule (a preset, a size, an
        edit's first input image)."""
        raise NotImplementedError


class NativeImageFields(BaseModel):
    """The seed API's own image options: a fixed default seed, the info strip, a saved file."""

    seed: int = Field(42, ge=0, le=MAX_SEED, description=SEED_DESCRIPTION)
    save_to_file: bool = Field(False, description="Save under the output folder and answer JSON.")
    add_overlay: bool = Field(True, description="Draw the info strip onto the image.")


class EditFields(BaseModel):
    """What an edit says besides its images and prompt."""

    model: str | None = Field(None, description=(
        "The model to edit with (see /v1/models); default: the first edit model."))
    size: str | None = Field(None, description=(
        "'WxH' (multiples of 16, 256-2048 per side) or 'auto'; default: the first image's size, "
        "snapped to multiples of 16 within those bounds."))
    strength: float = Field(1.0, gt=0.0, le=1.0, description=(
        "Masked edits: how far the masked area may move from the original (1.0 repaints it; "
        "lower keeps more of it). Ignored without a mask."))

    @field_validator("size")
    @classmethod
    def _valid_size(cls, value: str | None) -> str | None:
        parse_edit_size(value)
        return value

    def output_size(self, first_input: tuple[int, int] | None = None) -> tuple[int, int]:
        """The size asked for, or the first input image's (snapped to what the models take)."""
        asked = parse_edit_size(self.size)
        if asked is not None:
            return asked
        assert first_input is not None, "an edit without a size takes the first image's"
        return default_output_size(first_input)


MASK_DESCRIPTION = "PNG the size of the first image; its transparent pixels are the area to change."


class StartImageFields(BaseModel):
    """Image-to-image and inpainting on a generation model: a picture to start from, and a mask."""

    image: str | None = Field(None, description=(
        "Image-to-image: a picture to start from, base64 (PNG, JPEG, WebP, ...); it is cropped to the "
        "output's aspect ratio (centred) and scaled to its size."))
    mask: str | None = Field(None, description=(
        "Inpainting: base64 PNG the size of `image`; its transparent pixels are the area to change "
        "(the rest of `image` is kept exactly)."))
    strength: float | None = Field(None, gt=0.0, le=1.0, description=(
        "With `image`: how far the result may move from it (near 0: almost unchanged; 1: the "
        "picture is ignored, or with a mask the masked area is repainted). Default 0.6, or 1.0 "
        "with a mask."))


MAX_CONTROLNET_SCALE = 5.0
MAX_CONTROL_IMAGES = 4  # conditions of one request (a union ControlNet's edges, depth, pose, ...)


class ControlFields(BaseModel):
    """ControlNet: a control image (edges, depth, pose, ...) that steers a generation, or several
    at once; or, with `mask`, the picture an inpainting ControlNet repaints."""

    control_image: str | list[str] | None = Field(None, description=(
        "A control image (e.g. a canny edge map, depth map or pose), base64, exactly the output's "
        "size; needs a model served with a ControlNet (see /v1/models' tasks). A list (at most 4) "
        "steers with several at once, e.g. edges and depth through a union ControlNet. With `mask` "
        "(and no `image`): the picture the inpainting ControlNet repaints."))
    controlnet_conditioning_scale: float | list[float] = Field(1.0, description=(
        "How strongly the control image steers, 0-5 (0: not at all; the ControlNet is then not "
        "run); a list gives one per control image."))
    control_guidance_start: float = Field(0.0, ge=0.0, le=1.0, description=(
        "Fraction of the steps after which the ControlNet starts to steer."))
    control_guidance_end: float = Field(1.0, ge=0.0, le=1.0, description=(
        "Fraction of the steps after which it stops; above control_guidance_start."))

    # The forms are checked before pydantic tries each side of the union, so that a wrong value
    # is one error naming the field (a union's own errors name each of its sides).
    @field_validator("control_image", mode="before")
    @classmethod
    def _images(cls, value: object) -> object:
        if value is None or isinstance(value, str):
            return value
        if isinstance(value, list) and value and all(isinstance(item, str) for item in value):
            return value
        raise ValueError("must be a base64 image, or a non-empty list of them")

    @field_validator("controlnet_conditioning_scale", mode="before")
    @classmethod
    def _scales(cls, value: object, info: ValidationInfo) -> object:
        problem = (f"must be a number from 0 to {MAX_CONTROLNET_SCALE:g}, or a non-empty list of them (one "
                   "per control image)")
        scales = value if isinstance(value, list) else [value]
        if info.context and info.context.get("form"):  # a multipart form's fields are text
            try:
                scales = [float(item) if isinstance(item, str) else item for item in scales]
            except ValueError:
                raise ValueError(problem) from None
        if not scales or not all(isinstance(item, int | float) and not isinstance(item, bool)
                                 and 0.0 <= item <= MAX_CONTROLNET_SCALE for item in scales):
            raise ValueError(problem)
        return scales if isinstance(value, list) else scales[0]

    @field_validator("control_guidance_end")
    @classmethod
    def _after_start(cls, value: float, info: ValidationInfo) -> float:
        start = info.data.get("control_guidance_start")
        if start is not None and value <= start:
            raise ValueError(f"control_guidance_end ({value:g}) must be above control_guidance_start ({start:g})")
        return value

    @property
    def control_images(self) -> list[str]:
        """The control images sent, as a list (empty: none)."""
        value = self.control_image
        return [] if value is None else [value] if isinstance(value, str) else list(value)

    @property
    def control_scales(self) -> tuple[float, ...]:
        """The scale, or one per control image, as a tuple."""
        value = self.controlnet_conditioning_scale
        return tuple(float(item) for item in value) if isinstance(value, list) else (float(value),)

    @property
    def control_settings_given(self) -> list[str]:
        """The ControlNet knobs the client set (they need a control image)."""
        return [name for name in ("controlnet_conditioning_scale", "control_guidance_start",
                                  "control_guidance_end") if name in self.model_fields_set]


class UploadFields(BaseModel):
    """An edit's images as multipart files: `image` (repeated) or `image[]`, and a mask."""

    image: list[UploadFile] = Field(default_factory=list, description="The image(s) to edit.")
    image_list: list[UploadFile] = Field(default_factory=list, alias="image[]",
                                         description="The images to edit, the array form (up to 3).")
    mask: UploadFile | None = Field(None, description=MASK_DESCRIPTION)

    @property
    def images(self) -> list[UploadFile]:
        return [*self.image, *self.image_list]


MAX_IMAGES = 10  # OpenAI's bound on n
MAX_PARTIAL_IMAGES = 3  # OpenAI's bound


class OpenAIImageFields(BaseModel):
    """OpenAI's output options, generations and edits alike. Those that steer OpenAI's own models
    (quality, background, user) are accepted and echoed or ignored."""

    n: int = Field(1, ge=1, le=MAX_IMAGES, description="Images to make, seeds seed, seed+1, ...")
    response_format: Literal["b64_json", "url"] = "b64_json"
    output_format: OutputFormat = "png"
    output_compression: int | None = Field(None, ge=0, le=100, description="jpeg/webp quality; default 100.")
    stream: bool = Field(False, description="Answer with Server-Sent Events, one per finished image.")
    partial_images: int | None = Field(None, ge=0, le=MAX_PARTIAL_IMAGES, description=(
        "With stream: true, partial images (full VAE decodes of the image so far) sent before each "
        "image's completed event, spread over the steps; fewer when there are too few steps. "
        "Without stream it is accepted and ignored, as OpenAI does."))
    quality: str | None = None
    background: str | None = None
    user: str | None = None

    def preview_plan(self) -> PreviewPlan | None:
        """What `partial_images` asks of the engine: full decodes at that many steps, streams only."""
        if not self.stream or not self.partial_images:
            return None
        return PreviewPlan("full", count=self.partial_images)


def null_means_default(data: Any) -> Any:
    """Validator (mode "before"): OpenAI's API treats an explicit null like an omitted parameter."""
    if isinstance(data, dict):
        return {key: value for key, value in data.items() if value is not None}
    return data
