"""Uploaded images for editing: decoded, checked and normalised on the CPU pool.

Nothing here runs on the event loop or the engine thread (`Generation.read_edit_inputs` calls it
through the pool), and nothing that fails here reaches the GPU: every refusal is a 400 naming the
form field (`image`, `image[1]`, `mask`, ...).

- The size is read from the header first: a small file claiming 30000x30000 is refused before a
  pixel is decoded (QWEN_IMAGE_MAX_INPUT_PIXELS).
- EXIF orientation is applied, so a phone photo is edited the way it is seen.
- Every colour mode becomes RGB: CMYK, palette, greyscale, 16-bit (scaled, not clipped, in
  Pillow's own code: a few bytes a pixel, never a float64 copy), and transparency (flattened onto
  white: the model sees no alpha).
- Images larger than the edit models' working size (about one megapixel, where the pipelines
  resize everything to anyway) are scaled down here, not on the engine thread.
- A mask follows OpenAI's meaning: a PNG the size of the first image whose transparent pixels
  are the area to change. It becomes diffusers' mask (white = change).
"""

from __future__ import annotations

import base64
import binascii
import io
import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

from PIL import Image, ImageOps, UnidentifiedImageError

from qwen_image_server import errors
from qwen_image_server.engine.types import digest_images

# What the edit pipelines encode images at (diffusers' VAE_IMAGE_SIZE, and Qwen-Image-Edit's
# calculate_dimensions target): anything larger is only scaled down inside the pipeline.
WORKING_PIXELS = 1024 * 1024
ACCEPTED_FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP", "TIFF")
# Greyscale deeper than 8 bits: 16-bit PNG and TIFF, 32-bit integer and float TIFF.
_DEEP_GREY = ("I;16", "I;16B", "I;16L", "I;16N", "I", "F")


@dataclass(frozen=True, slots=True)
class Upload:
    """One uploaded image as received: the field it came in, and its bytes (or, from a JSON body,
    its base64 text, decoded on the pool too)."""

    field: str
    data: bytes | str

    def content(self) -> bytes:
        if isinstance(self.data, bytes):
            return self.data
        text = self.data.strip()
        if text.startswith("data:") and "," in text:  # a data URL: the part after the comma
            text = text.split(",", 1)[1]
        try:
            return base64.b64decode(text, validate=True)
        except (binascii.Error, ValueError) as exc:
            raise errors.InvalidRequest(f"'{self.field}' is not valid base64.", param=self.field,
                                        code="invalid_base64") from exc


def field_names(count: int, name: str) -> list[str]:
    """How errors name the images: 'image' when there is one, 'image[0]', 'image[1]', ... else."""
    return [name] if count == 1 else [f"{name}[{i}]" for i in range(count)]


@dataclass(frozen=True, slots=True)
class EditInputs:
    """The decoded inputs of one edit request."""

    images: tuple[Image.Image, ...]  # RGB, at most WORKING_PIXELS each
    mask: Image.Image | None  # "L", the size of images[0], 255 = change
    first_size: tuple[int, int]  # the first image's size as uploaded (after EXIF orientation)
    digest: str  # of the pixels: equal uploads, equal digests


def read_edit_inputs(images: Sequence[Upload], mask: Upload | None, max_pixels: int) -> EditInputs:
    """Decode and check every upload; errors.InvalidRequest naming the field otherwise."""
    decoded = [_open(upload, max_pixels) for upload in images]
    first_size = decoded[0].size
    rgb = tuple(_working_size(_to_rgb(image)) for image in decoded)
    change = None
    if mask is not None:
        change = _mask(_open(mask, max_pixels), mask.field, first_size, rgb[0].size)
    return EditInputs(rgb, change, first_size, digest_images(rgb, change))


@dataclass(frozen=True, slots=True)
class GenerationPictures:
    """The decoded pictures of a generation request: a picture to start from (and a mask), or
    control images (one, or one per ControlNet; with a mask, the picture a ControlNet inpaints);
    each at the output's size."""

    image: Image.Image | None = None  # RGB
    mask: Image.Image | None = None  # "L", 255 = change
    control_images: tuple[Image.Image, ...] = ()  # RGB


def read_generation_pictures(image: Upload | None, mask: Upload | None, controls: Sequence[Upload],
                             size: tuple[int, int], max_pixels: int) -> GenerationPictures:
    """Decode and check a generation's pictures: `image` is cropped (centred) to the output's
    aspect ratio and scaled to `size`, its mask (the size of `image`) with it; a control image
    must be `size` already (a ControlNet's map is drawn for one picture: cropping it would move
    its edges), and so must a mask sent with one (ControlNet inpainting). errors.InvalidRequest
    naming the field otherwise."""
    start = change = None
    if image is not None:
        picture = _to_rgb(_open(image, max_pixels))
        if mask is not None:
            change = ImageOps.fit(_mask(_open(mask, max_pixels), mask.field, picture.size, picture.size),
                                  size, Image.Resampling.BILINEAR)
        start = ImageOps.fit(picture, size, Image.Resampling.LANCZOS)
    steer = []
    for control in controls:
        picture = _open(control, max_pixels)
        if picture.size != size:
            raise errors.InvalidRequest(
                f"'{control.field}' is {picture.size[0]}x{picture.size[1]}; a control image must be the "
                f"output's size, {size[0]}x{size[1]}.", param=control.field, code="control_image_size_mismatch")
        steer.append(_to_rgb(picture))
    if image is None and mask is not None and controls:
        change = _mask(_open(mask, max_pixels), mask.field, size, size, of=f"'{controls[0].field}'")
    return GenerationPictures(start, change, tuple(steer))


def read_layered_input(images: Sequence[Upload], max_pixels: int) -> Image.Image:
    """The one picture a layered model splits, as RGBA (its transparency is kept: the layered
    VAE reads four channels), scaled down to WORKING_PIXELS when larger."""
    if len(images) != 1:
        raise errors.InvalidRequest(f"A layered model splits one image; {len(images)} were sent.",
                                    param="image", code="too_many_images")
    return _working_size(_open(images[0], max_pixels).convert("RGBA"))


def _open(upload: Upload, max_pixels: int) -> Image.Image:
    """The decoded image, upright; refused when not an image, not an accepted format, larger
    than max_pixels (from the header, before decoding) or truncated."""
    field = upload.field
    data = upload.content()
    if not data:
        raise errors.InvalidRequest(f"'{field}' is an empty file.", param=field, code="invalid_image")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise _too_large(field, None, max_pixels) from exc
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
        raise errors.InvalidRequest(
            f"'{field}' is not an image this server can read (send PNG, JPEG or WebP).",
            param=field, code="invalid_image") from exc
    if image.format not in ACCEPTED_FORMATS:
        raise errors.InvalidRequest(
            f"'{field}' is a {image.format} image; this server accepts {', '.join(ACCEPTED_FORMATS)}.",
            param=field, code="unsupported_image_format")
    width, height = image.size
    if width * height > max_pixels:
        raise _too_large(field, image.size, max_pixels)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image.load()
            ImageOps.exif_transpose(image, in_place=True)  # not a copy: one image of this size at a time
            return image
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise _too_large(field, image.size, max_pixels) from exc
    except (OSError, ValueError, SyntaxError, EOFError) as exc:
        raise errors.InvalidRequest(
            f"'{field}' is truncated or corrupt: {str(exc) or type(exc).__name__}.",
            param=field, code="corrupt_image") from exc


def _too_large(field: str, size: tuple[int, int] | None, max_pixels: int) -> errors.InvalidRequest:
    claimed = f" claims {size[0]}x{size[1]} pixels;" if size else " claims more pixels than"
    return errors.InvalidRequest(
        f"'{field}'{claimed} this server decodes at most {max_pixels:,} pixels per image.",
        param=field, code="image_too_large")


def _to_rgb(image: Image.Image) -> Image.Image:
    """Any mode to RGB; transparency flattened onto white, 16-bit scaled down to 8."""
    if image.mode in _DEEP_GREY:
        image = _to_eight_bit(image)
    if image.mode == "P" or image.mode == "1":
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA", "La", "RGBa"):
        image = image.convert("RGBA")
        background = Image.new("RGBA", image.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, image).convert("RGB")
    return image.convert("RGB")


def _to_eight_bit(image: Image.Image) -> Image.Image:
    """Deep greyscale as "L": 16-bit (and 32-bit integer) scaled from 0-65535, float from 0 to its
    brightest pixel (at least 1.0), rounded, then clipped to 0-255. Pillow's point() applies the
    linear map in C: a 40-megapixel 16-bit image needs about 120 MB more (the scaled copy and the
    8-bit one), where float64 arrays took about 1 GB."""
    if image.mode == "F":
        brightest = image.getextrema()[1]
        assert isinstance(brightest, float), "a float image's extrema are floats"
        scale = 255.0 / max(brightest, 1.0)
    else:
        if image.mode != "I;16":
            image = image.convert("I")  # point() takes "I;16" and "I", not the byte-order variants
        scale = 255.0 / 65535.0
    return image.point(lambda value: value * scale + 0.5).convert("L")


def _working_size(image: Image.Image) -> Image.Image:
    """Scaled down (aspect kept) to WORKING_PIXELS when larger."""
    width, height = image.size
    if width * height <= WORKING_PIXELS:
        return image
    scale = math.sqrt(WORKING_PIXELS / (width * height))
    return image.resize((max(1, round(width * scale)), max(1, round(height * scale))),
                        Image.Resampling.LANCZOS)


def _mask(image: Image.Image, field: str, first_size: tuple[int, int],
          working_size: tuple[int, int], of: str = "the first image") -> Image.Image:
    """OpenAI's mask (transparent = change) as diffusers' (white = change), at the working size."""
    if image.size != first_size:
        raise errors.InvalidRequest(
            f"'{field}' is {image.size[0]}x{image.size[1]}; it must be the size of {of}, "
            f"{first_size[0]}x{first_size[1]}.", param=field, code="mask_size_mismatch")
    has_alpha = image.mode in ("RGBA", "LA", "PA", "La", "RGBa") or (
        image.mode == "P" and "transparency" in image.info)
    if not has_alpha:
        raise errors.InvalidRequest(
            f"'{field}' has no alpha channel: the mask's transparent pixels mark the area to change, "
            "so send a PNG with transparency.", param=field, code="mask_without_alpha")
    alpha = image.convert("RGBA").getchannel("A")
    change = alpha.point(lambda value: 255 - value)
    if change.size != working_size:
        change = change.resize(working_size, Image.Resampling.BILINEAR)
    return change


def default_output_size(size: tuple[int, int], low: int, high: int, multiple: int) -> tuple[int, int]:
    """The first image's size, scaled (aspect kept) into [low, high] per side where it can be,
    each side snapped to a multiple of `multiple`: what an edit makes when no size is asked."""
    width, height = size
    scale = min(1.0, high / max(width, height))
    scale = max(scale, min(low / min(width, height), high / max(width, height)))
    return tuple(  # type: ignore[return-value]
        min(high, max(low, round(side * scale / multiple) * multiple)) for side in (width, height))
