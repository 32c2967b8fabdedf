"""A layered job's two results from the engine's side-by-side strip: the layers stacked into one
picture (alpha-composited, layer 0 at the bottom) and a ZIP of the layers, one RGBA PNG each."""

from __future__ import annotations

import io
import zipfile

from PIL import Image

from qwen_image_server.serving.render import encode_png

ZIP_MEDIA_TYPE = "application/zip"
# A fixed timestamp for every member: the same layers always give the same ZIP bytes.
_ZIP_TIME = (1980, 1, 1, 0, 0, 0)


def split_strip(strip: Image.Image, layers: int) -> list[Image.Image]:
    """The engine's strip (the layers left to right) as its `layers` RGBA layers, in order."""
    width = strip.width // layers
    return [strip.crop((i * width, 0, (i + 1) * width, strip.height)).convert("RGBA") for i in range(layers)]


def stacked(layers: list[Image.Image]) -> Image.Image:
    """The layers composited over each other, the first at the bottom (RGBA)."""
    picture = Image.new("RGBA", layers[0].size, (0, 0, 0, 0))
    for layer in layers:
        picture = Image.alpha_composite(picture, layer)
    return picture


def layer_name(index: int) -> str:
    return f"layer-{index}.png"


def layers_zip(pngs: list[bytes]) -> bytes:
    """The layers' PNGs as a ZIP: layer-0.png (the bottom) upwards, stored (PNG is compressed)."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as archive:
        for index, data in enumerate(pngs):
            archive.writestr(zipfile.ZipInfo(layer_name(index), date_time=_ZIP_TIME), data)
    return buf.getvalue()


def encode_layered(strip: Image.Image, layers: int) -> tuple[bytes, list[bytes]]:
    """(the stacked picture's PNG, each layer's PNG) of one layered result."""
    images = split_strip(strip, layers)
    return encode_png(stacked(images)), [encode_png(image) for image in images]
