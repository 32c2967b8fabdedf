"""What the wire models of every API share: seeds, sizes, output formats, LoRA choices, the error
body, and the validators they all use. The native and OpenAI models import from here, never from
each other."""

from __future__ import annotations

import json
import re
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator
from pydantic_core import PydanticCustomError

from qwen_image_server.config.lora_refs import is_valid_name

OutputFormat = Literal["png", "jpeg", "webp"]

MAX_SEED = 2**32 - 1
MIN_LORA_SCALE, MAX_LORA_SCALE = -4.0, 4.0


def not_blank(value: str) -> str:
    """Validator: a prompt of only whitespace is as empty as no prompt."""
    if not value.strip():
        raise ValueError("prompt must contain some text")
    return value


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


LORAS = Field(default_factory=list, description=(
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


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorDetail


