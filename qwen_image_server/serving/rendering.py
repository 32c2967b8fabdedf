"""A finished job's image as its client gets it: overlay, encoding and (for save_to_file) the
saved file with its upload, a layered job's layers and their ZIP, and previews, all on the CPU
pool. A save that fails never loses the image: it is delivered with `save_error`."""

from __future__ import annotations

import errno
import functools
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, TypeVar

import anyio
from PIL import Image

from qwen_image_server import errors
from qwen_image_server.config.settings import Settings
from qwen_image_server.engine.device import DeviceInfo
from qwen_image_server.engine.types import LayeredSpec, Preview
from qwen_image_server.protocol.common import ErrorDetail, OutputFormat
from qwen_image_server.scheduler import Job, JobResult
from qwen_image_server.serving.layers import encode_layered, layers_zip
from qwen_image_server.serving.object_store import ObjectStore, file_key
from qwen_image_server.serving.render import (
    MEDIA_TYPES,
    PREVIEW_FORMAT,
    PREVIEW_QUALITY,
    OverlayInfo,
    encode_png,
    output_filename,
    preview_size,
    render,
    render_preview,
    save_atomically,
)

log = logging.getLogger(__name__)
T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class Rendered:
    """A finished image as the client gets it."""

    data: bytes
    media_type: str
    width: int
    height: int
    inference_time: float  # seconds, rounded for the wire
    file_path: str | None  # set when the request asked for save_to_file and the file was saved
    save_error: ErrorDetail | None = None  # why a save_to_file request's file could not be saved


class Renderer:
    """Renders finished jobs and previews for every route of one app (and the CLI)."""

    def __init__(self, settings: Settings, device: DeviceInfo, objects: ObjectStore | None,
                 in_pool: Callable[..., Awaitable[Any]]) -> None:
        self.settings = settings
        self.device = device
        self.objects = objects  # the shared storage of finished images (QWEN_IMAGE_RESULTS_URL)
        self.in_pool = in_pool  # the THREADS pool, where CPU work runs

    async def render(self, job: Job, result: JobResult, *, overlay: bool = False,
                     save_to_file: bool = False, output_format: OutputFormat = "png",
                     compression: int | None = None) -> Rendered:
        """Overlay (if asked), encode and (for save_to_file) save atomically, on the CPU pool;
        with a bucket (QWEN_IMAGE_RESULTS_URL=s3://...) the saved file is uploaded too, for its link.

        A save that fails (disk full, folder unwritable, the upload refused, ...) loses nothing
        but the file: the image made with GPU time is still delivered, with `save_error` saying
        why there is no file, and the failure is logged."""
        info = OverlayInfo(
            device=self.device.label,
            inference_time=result.inference_time,
            steps=job.spec.num_inference_steps,
            seed=job.spec.seed,
            width=job.spec.width,
            height=job.spec.height,
            request_id=job.request_id,
        ) if overlay else None
        size = (job.spec.width, job.spec.height)
        data = await self.in_pool(render, result.image, info, output_format, compression, size, _kept(job))
        file_path = save_error = None
        if save_to_file:
            name = output_filename(job.request_id, datetime.now())
            try:
                path = await self.in_pool(save_atomically, data, self.settings.output_dir, name)
            except OSError as exc:
                save_error = _save_failed(job, exc)
            else:
                save_error = await self._upload_saved(job, path.name, data)
                file_path = display_path(path) if save_error is None else None
        return Rendered(data, MEDIA_TYPES[output_format], size[0], size[1],
                        round(result.inference_time, 3), file_path, save_error)

    async def _upload_saved(self, job: Job, name: str, data: bytes) -> ErrorDetail | None:
        """Copy a saved file to the bucket, where its link (`file_url`) points; why not, if it failed."""
        objects = self.objects
        if objects is None or not objects.links:
            return None  # a folder's or this server's files are served by /files links
        try:
            await anyio.to_thread.run_sync(functools.partial(
                objects.put, file_key(job.id, name), data, "image/png", owner=job.owner,
                expires_at=time.time() + self.settings.file_link_ttl_s))
        except objects.failures as exc:  # any storage failure: the client still gets its image
            log.error("request %d: uploading its saved image to %s failed (%s: %s); it is delivered without "
                      "a file", job.request_id, objects.location, type(exc).__name__, exc)
            return ErrorDetail.of(errors.SaveFailed(
                "The image was made and saved on the server, but copying it to the shared storage failed, so "
                "there is no link to it; the image itself is delivered all the same (in b64_json, or at a "
                "job's image_url).", code="upload_failed"))
        return None

    async def render_layers(self, job: Job, result: JobResult) -> list[Rendered]:
        """A layered job's layers, one RGBA PNG each, in order (the engine gives them side by side)."""
        spec = job.spec
        assert isinstance(spec, LayeredSpec)
        strip = result.image
        width = strip.width // spec.layers

        def encode() -> list[bytes]:
            return [encode_png(strip.crop((i * width, 0, (i + 1) * width, strip.height)))
                    for i in range(spec.layers)]

        return [Rendered(data, MEDIA_TYPES["png"], width, strip.height, round(result.inference_time, 3), None)
                for data in await self.in_pool(encode)]

    async def render_stacked(self, job: Job, result: JobResult) -> tuple[Rendered, bytes]:
        """A layered job's results: its layers stacked into one PNG (layer 0 at the bottom), and
        the ZIP of its layers (RGBA PNGs equal to `render_layers`')."""
        spec = job.spec
        assert isinstance(spec, LayeredSpec)
        picture, layers = await self.in_pool(encode_layered, result.image, spec.layers)
        archive = await self.in_pool(layers_zip, layers)
        return Rendered(picture, MEDIA_TYPES["png"], spec.layer_width, spec.height,
                        round(result.inference_time, 3), None), archive

    async def render_preview(self, job: Job, preview: Preview, *, output_format: OutputFormat = PREVIEW_FORMAT,
                             compression: int | None = PREVIEW_QUALITY, full_size: bool = False) -> Rendered:
        """Encode a preview on the CPU pool: at the image's size when `full_size`, else small
        (see `render.preview_size`); `inference_time` is the engine's time making it."""
        size = (job.spec.width, job.spec.height)
        if not full_size:
            size = preview_size(preview.image, size)
        data = await self.in_pool(render_preview, preview.image, size, output_format, compression, _kept(job))
        return Rendered(data, MEDIA_TYPES[output_format], size[0], size[1], round(preview.seconds, 3), None)


def _save_failed(job: Job, exc: OSError) -> ErrorDetail:
    """Log a failed save once, with its cause, and say it to the client without server paths."""
    log.error("request %d: saving its image failed (%s); it is delivered without a file", job.request_id, exc)
    reason = exc.strerror or type(exc).__name__
    return ErrorDetail.of(errors.SaveFailed(
        f"The image was made, but saving it on the server failed ({reason}), so there is no file; the "
        "image itself is delivered all the same (in b64_json, or at a job's image_url).",
        code=errno.errorcode.get(exc.errno or 0)))


def _kept(job: Job) -> tuple[Image.Image, Image.Image] | None:
    """A masked edit's or inpainting's (original, mask): outside the mask the original is kept
    (see `render`)."""
    return job.spec.kept()


def display_path(path: Path) -> str:
    """The path as the seed shows it: relative to the server's cwd when under it, with '/'."""
    try:
        return path.resolve().relative_to(Path.cwd().resolve()).as_posix()
    except ValueError:
        return path.as_posix()
