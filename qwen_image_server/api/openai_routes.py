"""The OpenAI-compatible API: images (JSON, url or Server-Sent Events) and models.

`openai.OpenAI(base_url="http://host:5000/v1")` works unchanged: `client.images.generate(...)`,
`client.images.edit(image=[...], mask=...)`, with Qwen-Image's own knobs in `extra_body`, and
`client.models.list()`.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from contextlib import aclosing
from dataclasses import dataclass
from typing import Annotated, Any

from fastapi import APIRouter, Form, Request, Response
from fastapi.sse import KEEPALIVE_COMMENT, EventSourceResponse, format_sse_event

from qwen_image_server import errors
from qwen_image_server.api.bodies import read_uploads
from qwen_image_server.api.context import Ctx, ServerContext, Who, client_gone
from qwen_image_server.api.error_mapping import ERROR_RESPONSES
from qwen_image_server.engine.types import LayeredSpec, Preview
from qwen_image_server.protocol.common import ErrorDetail, ErrorResponse
from qwen_image_server.protocol.openai import (
    ImageData,
    ImageEditCompletedEvent,
    ImageEditForm,
    ImageEditPartialImageEvent,
    ImageGenCompletedEvent,
    ImageGenerationRequest,
    ImageGenPartialImageEvent,
    ImagesResponse,
    ImageUsage,
    ModelCard,
    ModelList,
)
from qwen_image_server.scheduler import Job, JobResult
from qwen_image_server.serving.render import MEDIA_TYPES, b64
from qwen_image_server.serving.rendering import Rendered
from qwen_image_server.serving.uploads import Upload
from qwen_image_server.serving.url_images import JOB_IMAGE_PREFIX

log = logging.getLogger(__name__)
router = APIRouter(prefix="/v1", tags=["openai"])

# Idle streams get an SSE comment this often, so proxies do not close them during a long image.
PING_INTERVAL_S = 15.0


# -- routes ---------------------------------------------------------------------------------

@router.post(
    "/images/generations",
    response_model=ImagesResponse,
    response_model_exclude_none=True,
    responses={200: {"content": {"text/event-stream": {}},
                     "description": "JSON; with stream: true, an image_generation.completed event per image."},
               **ERROR_RESPONSES},
)
async def create_images(
    body: ImageGenerationRequest, request: Request, ctx: Ctx, caller: Who
) -> Response | ImagesResponse:
    """Generate `n` images (OpenAI's Images API), as base64, URLs or a stream of events."""
    prepared = await ctx.generation.prepare(body, "generate", model=body.model, n=body.n,
                                            preview=body.preview_plan(), caller=caller)
    body, spec = prepared.body, prepared.specs[0]
    log.info("request %d (openai) received: n=%d, %dx%d, %d steps, cfg %g, seeds from %d, %s%s",
             prepared.request_id, body.n, spec.width, spec.height, body.num_inference_steps,
             body.true_cfg_scale, spec.seed, body.output_format, ", stream" if body.stream else "")
    answer = _Answer(ctx, request, body, prepared.model.name or ctx.settings.models[0].name, (),
                     ImageGenCompletedEvent, ImageGenPartialImageEvent)
    return await answer.send(await ctx.generation.submit(prepared))  # together: one batch


@router.post(
    "/images/edits",
    response_model=ImagesResponse,
    response_model_exclude_none=True,
    responses={200: {"content": {"text/event-stream": {}},
                     "description": "JSON; with stream: true, an image_edit.completed event per image."},
               404: {"model": ErrorResponse}, 413: {"model": ErrorResponse}, **ERROR_RESPONSES},
)
async def edit_images(
    body: Annotated[ImageEditForm, Form(media_type="multipart/form-data")], request: Request, ctx: Ctx,
    caller: Who,
) -> Response | ImagesResponse:
    """Edit images (OpenAI's Images API, multipart): `image` (or `image[]`, up to 3), an optional
    `mask` whose transparent pixels are the area to change, `n` results. With a layered model as
    `model`: one image split into `layers` RGBA layers, one PNG each in data[]."""
    images, mask = await read_uploads(body)
    if ctx.generation.models.task_of(body.model) == "layered":
        return await _layers(body, images, mask, request, ctx, caller)
    if not body.prompt:  # only a layered model captions a picture itself
        raise errors.InvalidRequest("prompt must contain some text (only a layered model can do without one).",
                                    param="prompt", code="missing_prompt")
    prepared = await ctx.generation.prepare(body, "edit", model=body.model, images=images, mask=mask, n=body.n,
                                            preview=body.preview_plan(), caller=caller)
    body, spec, inputs = prepared.body, prepared.specs[0], prepared.inputs
    assert inputs is not None
    log.info("request %d (openai edit) received: %d image(s)%s, n=%d, %dx%d, %d steps, cfg %g, seeds "
             "from %d, model %s%s", prepared.request_id, len(images), " and a mask" if mask else "", body.n,
             spec.width, spec.height, body.num_inference_steps, body.true_cfg_scale, spec.seed,
             prepared.model.name or "(first)", ", stream" if body.stream else "")
    answer = _Answer(ctx, request, body, prepared.model.name or ctx.settings.models[0].name,
                     tuple(image.size for image in inputs.images), ImageEditCompletedEvent,
                     ImageEditPartialImageEvent)
    return await answer.send(await ctx.generation.submit(prepared))


async def _layers(body: ImageEditForm, images: list[Upload], mask: Upload | None, request: Request, ctx: Ctx,
                  caller: Who) -> ImagesResponse:
    """A layered model's answer on the edits route: data[] holds each image's layers in order
    (RGBA PNGs, `layers` per image), so the official client reads it unchanged."""
    if body.stream:
        raise errors.InvalidRequest("A layered model answers with all its layers at once; stream is not "
                                    "available for it.", param="stream", code="stream_not_supported")
    prepared = await ctx.generation.prepare(body, "layered", model=body.model, images=images, mask=mask, n=body.n,
                                            caller=caller, layers=body.layers, resolution=body.resolution)
    log.info("request %d (openai layers) received: %d layers, n=%d, %d steps, seeds from %d, model %s",
             prepared.request_id, body.layers, body.n, body.num_inference_steps, prepared.specs[0].seed,
             prepared.model.name)
    generation = ctx.generation
    jobs = await generation.submit(prepared)
    results = await generation.wait_all(jobs, client_gone(request))
    layers = [layer for job, result in zip(jobs, results, strict=True)
              for layer in await generation.renderer.render_layers(job, result)]
    if body.response_format == "url":
        urls = await asyncio.gather(*(_store(ctx, request, layer, jobs[0].owner) for layer in layers))
        data = [ImageData(url=url, revised_prompt=body.model_prompt if body.prompt else None) for url in urls]
    else:
        data = [ImageData(b64_json=b64(layer.data), revised_prompt=body.model_prompt if body.prompt else None)
                for layer in layers]
    width, height = layers[0].width, layers[0].height
    source = prepared.specs[0].source if isinstance(prepared.specs[0], LayeredSpec) else None
    text_tokens = await generation.count_tokens(body.model_prompt)
    return ImagesResponse(created=int(time.time()), model=prepared.model.name, data=data, size=f"{width}x{height}",
                          output_format="png", background="transparent", quality=body.quality,
                          usage=ImageUsage.of(text_tokens, width, height, images=len(layers),
                                              inputs=[source.size] if source is not None else []))


ImagesBody = ImageGenerationRequest | ImageEditForm
CompletedEvent = type[ImageGenCompletedEvent] | type[ImageEditCompletedEvent]
PartialEvent = type[ImageGenPartialImageEvent] | type[ImageEditPartialImageEvent]


@dataclass
class _Answer:
    """How an images request is answered once its jobs are queued: JSON or a stream of events."""

    ctx: ServerContext
    request: Request
    body: ImagesBody
    model: str
    inputs: tuple[tuple[int, int], ...]  # the input images' sizes (edits)
    event: CompletedEvent
    partial_event: PartialEvent

    async def send(self, jobs: list[Job]) -> Response | ImagesResponse:
        if self.body.stream:
            # Submitted first, so a full queue or a draining server is a real HTTP error (429/503).
            return EventSourceResponse(self._events(jobs))
        generation = self.ctx.generation
        results = await generation.wait_all(jobs, client_gone(self.request))
        rendered = await asyncio.gather(*(self._render(job, result) for job, result in zip(jobs, results, strict=True)))
        revised = self.body.model_prompt
        if self.body.response_format == "url":
            owner = jobs[0].owner
            urls = await asyncio.gather(*(_store(self.ctx, self.request, item, owner) for item in rendered))
            data = [ImageData(url=url, revised_prompt=revised) for url in urls]
        else:
            data = [ImageData(b64_json=b64(item.data), revised_prompt=revised)
                    for item in rendered]
        width, height = jobs[0].spec.width, jobs[0].spec.height
        return ImagesResponse(
            created=int(time.time()),
            model=self.model,
            data=data,
            size=f"{width}x{height}",
            output_format=self.body.output_format,
            quality=self.body.quality,
            usage=await self._usage(width, height, len(results)),
        )

    async def _usage(self, width: int, height: int, images: int) -> ImageUsage:
        text_tokens = await self.ctx.generation.count_tokens(self.body.model_prompt)
        return ImageUsage.of(text_tokens, width, height, images=images, inputs=self.inputs)

    async def _render(self, job: Job, result: JobResult) -> Rendered:
        return await self.ctx.generation.renderer.render(job, result, output_format=self.body.output_format,
                                                compression=self.body.output_compression)

    async def _events(self, jobs: list[Job]) -> AsyncIterator[bytes]:
        """The SSE body: each image's partial images (if `partial_images` asked for them), then
        its completed event, as each finishes.

        Streams always carry base64 (as OpenAI's do). A failure after the 200 has gone out
        becomes an `error` event with the usual error body, which the openai client raises as
        APIError.
        """
        generation = self.ctx.generation
        usage: ImageUsage | None = None  # counted once the first image exists (the model is loaded)
        width, height = jobs[0].spec.width, jobs[0].spec.height
        feed = generation.watch_previews(jobs)
        previews = feed.mailbox
        partials = [0] * len(jobs)  # partial images sent, per image
        completed: set[int] = set()  # images whose completed event went out
        try:
            async with aclosing(generation.finished(jobs, client_gone(self.request), ping_s=PING_INTERVAL_S,
                                                    wake=previews.ready.wait)) as outcomes:
                async for item in outcomes:
                    waiting = previews.take()
                    for index, preview in waiting:
                        if index in completed:
                            continue  # too late: its final image went out already
                        yield await self._partial(jobs[index], preview, partials[index])
                        partials[index] += 1
                    if item is None:
                        if not waiting:
                            yield KEEPALIVE_COMMENT
                        continue
                    index, result = item
                    completed.add(index)
                    rendered = await self._render(jobs[index], result)
                    if usage is None:
                        usage = await self._usage(width, height, images=1)
                    event = self.event(**self._image_fields(rendered.data, width, height), usage=usage)
                    yield format_sse_event(data_str=event.model_dump_json(), event=event.type)
        except errors.ServerError as exc:
            yield _error_event(ErrorDetail.of(exc))
        except Exception:  # the status is sent; the client still needs to hear it failed
            log.exception("request %d (openai): streaming failed", jobs[0].request_id)
            yield _error_event(ErrorDetail(message="Internal server error; the server logged the details.",
                                           type="server_error"))
        finally:
            feed.close()

    async def _partial(self, job: Job, preview: Preview, number: int) -> bytes:
        """A partial-image event: the preview at the image's size, in the asked format."""
        rendered = await self.ctx.generation.renderer.render_preview(
            job, preview, output_format=self.body.output_format, compression=self.body.output_compression,
            full_size=True)
        event = self.partial_event(**self._image_fields(rendered.data, rendered.width, rendered.height),
                                   partial_image_index=number)
        return format_sse_event(data_str=event.model_dump_json(), event=event.type)

    def _image_fields(self, data: bytes, width: int, height: int) -> dict[str, Any]:
        """What OpenAI's partial and completed image events both carry."""
        return dict(b64_json=b64(data), created_at=int(time.time()),
                    size=f"{width}x{height}", quality=self.body.quality or "auto",
                    output_format=self.body.output_format)


async def _store(ctx: ServerContext, request: Request, rendered: Rendered, owner: str | None) -> str:
    """Keep the image for its owner for QWEN_IMAGE_RESULT_TTL_S and return its absolute URL: a
    presigned URL of the object in a bucket (QWEN_IMAGE_RESULTS_URL=s3://...), else this server's
    own link."""
    kept = await ctx.images.keep(rendered.data, rendered.media_type, owner)
    return kept.link or str(request.url_for("openai_image", image_id=kept.id))


def _error_event(detail: ErrorDetail) -> bytes:
    """The common error body as an SSE `error` event."""
    return format_sse_event(data_str=ErrorResponse(error=detail).model_dump_json(), event="error")


@router.get("/images/{image_id}", name="openai_image",
            responses={200: {"content": {media: {} for media in MEDIA_TYPES.values()}},
                       404: {"model": ErrorResponse}})
async def get_image(image_id: str, ctx: Ctx, caller: Who) -> Response:
    """An image returned earlier as a `url` to this API key, until QWEN_IMAGE_RESULT_TTL_S has passed
    (with QWEN_IMAGE_RESULTS_URL, whichever server made it)."""
    stored = await ctx.images.find(image_id, caller.id)
    if stored is None and image_id.startswith(JOB_IMAGE_PREFIX):  # a job's image, kept by the job store
        try:
            stored = await ctx.jobs.image(await ctx.jobs.get(image_id.removeprefix(JOB_IMAGE_PREFIX), caller.id))
        except errors.ServerError:
            stored = None
    if stored is None:
        raise errors.NotFound(f"No image with id '{image_id}': unknown, or expired "
                              f"(images are kept {ctx.settings.result_ttl_s:g} s).", param="image_id")
    return Response(stored.data, media_type=stored.media_type)


@router.get("/models", response_model=ModelList)
async def list_models(ctx: Ctx) -> ModelList:
    """Every model this server serves, with what each can do."""
    return ModelList(data=ctx.generation.models.cards())


@router.get("/models/{model_id:path}", response_model=ModelCard, responses={404: {"model": ErrorResponse}})
async def get_model(model_id: str, ctx: Ctx) -> ModelCard:
    return ctx.generation.models.card(model_id)
