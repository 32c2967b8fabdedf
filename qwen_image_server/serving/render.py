"""After the pipeline: the info overlay, encoding (PNG, JPEG, WebP) and atomic file saves.

The only place that turns an image into bytes; every API and the CLI render through `render`.
All of it is CPU work that runs off the engine thread (the THREADS pool).
"""

from __future__ import annotations

import base64
import errno
import io
import os
import re
import secrets
import textwrap
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont, features

from qwen_image_server.protocol.common import OutputFormat


@dataclass(frozen=True, slots=True)
class OverlayInfo:
    device: str  # GPU name with CUDA version, or "CPU"
    inference_time: float
    steps: int
    seed: int
    width: int
    height: int
    request_id: int

    def lines(self) -> str:
        return (
            f"Qwen-Image | {self.device} | {self.inference_time:.2f}s | {self.steps} steps | "
            f"seed {self.seed} | {self.width}x{self.height} | req {self.request_id}"
        )


def add_overlay(image: Image.Image, info: OverlayInfo) -> Image.Image:
    """A copy of `image` with a legible info strip along the bottom edge."""
    out = image.convert("RGB")
    size = max(12, out.width // 48)
    # Pillow's bundled FreeType font (Aileron): present wherever Pillow is, unlike OS fonts.
    font = ImageFont.load_default(size=size)
    chars_per_line = max(20, int(out.width / (size * 0.55)))
    text = "\n".join(textwrap.wrap(info.lines(), width=chars_per_line))
    draw = ImageDraw.Draw(out, "RGBA")
    left, top, right, bottom = draw.multiline_textbbox((0, 0), text, font=font, spacing=size // 4)
    pad = size // 2
    strip_top = out.height - (bottom - top) - 2 * pad
    draw.rectangle((0, strip_top, out.width, out.height), fill=(0, 0, 0, 170))
    draw.multiline_text((pad, strip_top + pad - top), text, font=font, fill=(255, 255, 255, 255),
                        spacing=size // 4)
    return out


# zlib level 1, not Pillow's default 6: measured on this model's images, level 6 took 174 ms at
# 512x512 and 1.0 s at 1328x1328 (a tenth of a CPU request's time), level 1 took 34 ms and
# 0.24 s, for files about 17% larger.
PNG_COMPRESS_LEVEL = 1


def encode_png(image: Image.Image) -> bytes:
    """PNG bytes; the same pixels always give the same bytes (no timestamps or metadata)."""
    buf = io.BytesIO()
    image.save(buf, format="PNG", compress_level=PNG_COMPRESS_LEVEL)
    return buf.getvalue()


MEDIA_TYPES: dict[str, str] = {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp"}


def b64(data: bytes) -> str:
    """Encoded bytes as the JSON APIs carry them (b64_json)."""
    return base64.b64encode(data).decode("ascii")


def encode_image(image: Image.Image, output_format: OutputFormat = "png",
                 compression: int | None = None) -> bytes:
    """PNG, or JPEG / WebP at quality `compression` (default 100, as OpenAI's)."""
    if output_format == "png":
        return encode_png(image)
    buf = io.BytesIO()
    quality = 100 if compression is None else compression
    image.convert("RGB").save(buf, format=output_format.upper(), quality=quality)
    return buf.getvalue()


def render(image: Image.Image, overlay: OverlayInfo | None = None, output_format: OutputFormat = "png",
           compression: int | None = None, size: tuple[int, int] | None = None,
           keep: tuple[Image.Image, Image.Image] | None = None) -> bytes:
    """A finished image as the client gets it: at `size` (masked edits come out at the pipeline's
    own ~1 megapixel), for a masked edit the original kept outside the mask, the info strip (if
    any) drawn, then encoded.

    `keep`: (original, mask with 255 where it may change). The edit pipeline leaves the latents
    outside the mask alone, but the VAE decoder spreads changes a little past it; pasting the
    original back makes "only the masked area changes" exact.
    """
    if size is not None and image.size != size:
        image = image.resize(size, Image.Resampling.LANCZOS)
    if keep is not None:
        original, mask = (part.resize(image.size, Image.Resampling.LANCZOS) for part in keep)
        image = Image.composite(image, original.convert(image.mode), mask)
    if overlay is not None:
        image = add_overlay(image, overlay)
    return encode_image(image, output_format, compression)


# Previews: WebP (JPEG where Pillow was built without it) at a quality that keeps them small;
# they are replaced within a step or two.
PREVIEW_FORMAT: OutputFormat = "webp" if features.check("webp") else "jpeg"
PREVIEW_QUALITY = 75


def preview_size(image: Image.Image, size: tuple[int, int]) -> tuple[int, int]:
    """The size a preview is sent at: a latent preview (one pixel per 8x8 patch) doubled, a full
    one at `size`, the image's; never larger than `size`."""
    width, height = size
    if image.width * 2 >= width:
        return size
    return image.width * 2, image.height * 2


def render_preview(image: Image.Image, size: tuple[int, int], output_format: OutputFormat = PREVIEW_FORMAT,
                   compression: int | None = PREVIEW_QUALITY,
                   keep: tuple[Image.Image, Image.Image] | None = None) -> bytes:
    """A preview as the client gets it: smoothed up to `size`, for a masked edit with the original
    kept outside the mask (as `render` does), then encoded."""
    if image.size != size:
        image = image.resize(size, Image.Resampling.BILINEAR)
    return render(image, None, output_format, compression, size, keep)


# The name `output_filename` gives, plus the "-<pid>-<hex>" `save_atomically` adds on a clash:
# what /files serves and what the output folder's sweep may delete (never anything else).
SAVED_NAME = re.compile(r"Qwen-Image-\d{8}_\d{6}-req\d+(?:-[0-9A-Za-z]+)*\.png")
# A temp file of `save_atomically` for one of those names (8 hex digits: older versions' names).
TEMP_NAME = re.compile(r"\.Qwen-Image-.*\.[0-9a-f]{8,}\.tmp", re.DOTALL)

# Names tried for one image before giving up: its own, then with a random suffix (a clash with
# another process that picked the same name in the same second, then a clash of the suffix).
_NAME_ATTEMPTS = 8
# errno of os.link on a filesystem without hard links (FAT, exFAT, some FUSE and SMB mounts).
_NO_HARD_LINKS = frozenset({errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.ENOSYS, errno.EXDEV})
# Created only if absent, never through a symlink, not inherited by engine processes.
_CREATE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)


def output_filename(request_id: int, when: datetime) -> str:
    """The seed's name: Qwen-Image-YYYYmmdd_HHMMSS-reqN.png."""
    return f"Qwen-Image-{when:%Y%m%d_%H%M%S}-req{request_id}.png"


def save_atomically(data: bytes, folder: Path, name: str, *, overwrite: bool = False) -> Path:
    """Write `data` as folder/name without ever exposing a partial file, and return its path.

    The data goes to a temp file with a random name only this call can have created (O_EXCL, so
    a file or symlink planted under that name is never written through), is fsynced, then
    published under its name, and the folder is fsynced so the name survives a power loss. On any
    error the temp file is removed and nothing is published.

    Unless `overwrite`, never replace another file: several processes count requests
    independently, so two may pick the same name in the same second; the later one then gets a
    suffix (another one if that clashes too).
    """
    folder.mkdir(parents=True, exist_ok=True)
    # 128 random bits: a name nobody can guess to plant something there first. The name is cut
    # short so that a long one (the CLI saves under any name) stays within the OS's limit.
    tmp = folder / f".{name[:100]}.{secrets.token_hex(16)}.tmp"
    fd = os.open(tmp, _CREATE_FLAGS, 0o644)
    try:
        try:
            _write_all(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        if overwrite:
            target = folder / name
            os.replace(tmp, target)
        else:
            target = _publish(tmp, folder, name)
        _fsync_folder(folder)
    finally:
        tmp.unlink(missing_ok=True)  # gone already once renamed
    return target


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def _publish(tmp: Path, folder: Path, name: str) -> Path:
    """Give `tmp` the first free name of `name`, then `name` with suffixes; raise FileExistsError
    when every attempt clashed."""
    stem, suffix = os.path.splitext(name)
    for attempt in range(_NAME_ATTEMPTS):
        target = folder / (name if attempt == 0 else f"{stem}-{os.getpid()}-{secrets.token_hex(4)}{suffix}")
        if _place(tmp, target):
            return target
    raise FileExistsError(errno.EEXIST, f"{_NAME_ATTEMPTS} names for the image were all taken", str(folder / name))


def _place(tmp: Path, target: Path) -> bool:
    """Make the file `tmp` appear as `target` at once, unless `target` exists (False then)."""
    try:
        os.link(tmp, target)  # fails rather than replace what is there
        return True
    except FileExistsError:
        return False
    except OSError as exc:
        if exc.errno not in _NO_HARD_LINKS:
            raise
    # No hard links here. Claim the name with an empty file only this call can create, then
    # rename the full file over its own claim: rename is atomic, and replaces nobody else's file.
    try:
        os.close(os.open(target, _CREATE_FLAGS, 0o644))
    except FileExistsError:
        return False
    try:
        os.replace(tmp, target)
    except BaseException:
        target.unlink(missing_ok=True)
        raise
    return True


def _fsync_folder(folder: Path) -> None:
    """Make the folder's new entry durable (a file fsynced is not enough: its name is in the folder)."""
    try:
        fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:  # a platform where folders cannot be opened: nothing more it can do
        return
    try:
        os.fsync(fd)
    except OSError as exc:
        if exc.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP):  # not supported there
            raise
    finally:
        os.close(fd)
