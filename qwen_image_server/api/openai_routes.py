"""The OpenAI-compatible API: images (JSON, url or Server-Sent Events) and models.

`openai.OpenAI(base_url="http://host:5000/v1")` works unchanged: `client.images.generate(...)`,
`client.images.edit(image=[...], mask=...)`, with Qwen-Image's own knobs in `extra_body`, and
`client.models.list()`.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import logging
import secrets
import time
from collections.abc import AsyncIterator
from contextlib import aclosing
from dataclasses import dataclass
from typing import Annotated, Any

from fastapi import APIRouter, Form, Request, Response
from fastapi.sse import KEEPALIVE_COMMENT, EventSourceResponse, format_sse_event

from qwen_image_server import errors
from qwen_image_server.api.bodies import read_files
from qwen_image_server.api.context import Ctx, ServerContext, client_gone
from qwen_image_server.api.error_mapping import ERROR_RESPONSES
from qwen_image_server.engine.types import Preview
from qwen_image_server.protocol.common import MAX_SEED, ErrorDetail, ErrorResponse
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
    preview_plan,
)
from qwen_image_server.scheduler import Job, JobResult
from qwen_image_server.serving.generation import Rendered
from qwen_image_server.serving.render import MEDIA_TYPES
from qwen_image_server.serving.uploads import Upload

log = logging.getLogger(__name__)
router = APIRouter(prefix="/v1", tags=["openai"])

# Idle streams get an SSE comment this often, so proxies do not close them during a long image.
PING_INTERVAL_S = 15.0
# /v1/models' "created": when this server process started serving the model.
_STARTED = int(time.time())


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
    body: ImageGenerationRequest, request: Request, ctx: Ctx
) -> Response | ImagesResponse:
    """Generate `n` images (OpenAI's Images API), as base64, URLs or a stream of events."""
    generation = ctx.generation
    request_id = generation.next_request_id()
    body = generation.with_defaults(body)
    model = generation.pick_model(body.model, "generate")
    base_seed = body.seed if body.seed is not None else secrets.randbelow(MAX_SEED + 1)
    loras = await generation.check_loras(body.loras, model)
    specs = [dataclasses.replace(spec, model=model.name, loras=loras) for spec in body.to_specs(base_seed)]
    width, height = specs[0].width, specs[0].height
    log.info("request %d (openai) received: n=%d, %dx%d, %d steps, cfg %g, seeds from %d, %s%s",
             request_id, body.n, width, height, body.num_inference_steps, body.true_cfg_scale,
             base_seed, body.output_format, ", stream" if body.stream else "")
    answer = _Answer(ctx, request, body, model.name or ctx.settings.models[0].name, (),
                     ImageGenCompletedEvent, ImageGenPartialImageEvent)
    return await answer.send(await generation.submit(specs, request_id))  # together: one batch


@router.post(
    "/images/edits",
    response_model=ImagesResponse,
    response_model_exclude_none=True,
    responses={200: {"content": {"text/event-stream": {}},
                     "description": "JSON; with stream: true, an image_edit.completed event per image."},
               404: {"model": ErrorResponse}, 413: {"model": ErrorResponse}, **ERROR_RESPONSES},
)
async def edit_images(
    body: Annotated[ImageEditForm, Form(media_type="multipart/form-data")], request: Request, ctx: Ctx
) -> Response | ImagesResponse:
    """Edit images (OpenAI's Images API, multipart): `image` (or `image[]`, up to 3), an optional
    `mask` whose transparent pixels are the area to change, `n` results."""
    generation = ctx.generation
    request_id = generation.next_request_id()
    body = generation.with_defaults(body)
    model = generation.pick_model(body.model, "edit")
    loras = await generation.check_loras(body.loras, model)
    images = await read_files(body.images, "image")
    mask = Upload("mask", await body.mask.read()) if body.mask is not None else None
    inputs = await generation.read_edit_inputs(images, mask, model)
    base_seed = body.seed if body.seed is not None else secrets.randbelow(MAX_SEED + 1)
    seeds = [(base_seed + i) % (MAX_SEED + 1) for i in range(body.n)]
    specs = generation.edit_specs(body, inputs, model, seeds, loras,
                                  preview_plan(body.stream, body.partial_images))
    log.info("request %d (openai edit) received: %d image(s)%s, n=%d, %dx%d, %d steps, cfg %g, seeds "
             "from %d, model %s%s", request_id, len(images), " and a mask" if mask else "", body.n,
             specs[0].width, specs[0].height, body.num_inference_steps, body.true_cfg_scale, base_seed,
             model.name or "(first)", ", stream" if body.stream else "")
    answer = _Answer(ctx, request, body, model.name or ctx.settings.models[0].name,
                     tuple(image.size for image in inputs.images), ImageEditCompletedEvent,
                     ImageEditPartialImageEvent)
    return await answer.send(await generation.submit(specs, request_id))


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
        rendered = await asyncio.gather(*(self._render(job, result) for job, result in zip(jobs, results)))
        revised = self.body.model_prompt
        if self.body.response_format == "url":
            data = [ImageData(url=_store(self.ctx, self.request, item), revised_prompt=revised)
                    for item in rendered]
        else:
            data = [ImageData(b64_json=base64.b64encode(item.data).decode("ascii"), revised_prompt=revised)
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
        return await self.ctx.generation.render(job, result, output_format=self.body.output_format,
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
        feed = generation.preview_feed(jobs)
        partials = [0] * len(jobs)  # partial images sent, per image
        completed: set[int] = set()  # images whose completed event went out
        try:
            async with aclosing(generation.finished(jobs, client_gone(self.request), ping_s=PING_INTERVAL_S,
                                                    wake=feed.ready.wait)) as outcomes:
                async for item in outcomes:
                    waiting = feed.take()
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
            yield _error_event(ErrorDetail(message=exc.message, type=exc.type, param=exc.param, code=exc.code))
        except Exception:  # noqa: BLE001 - the status is sent; the client still needs to hear it failed
            log.exception("request %d (openai): streaming failed", jobs[0].request_id)
            yield _error_event(ErrorDetail(message="Internal server error; the server logged the details.",
                                           type="server_error"))
        finally:
            feed.close()

    async def _partial(self, job: Job, preview: Preview, number: int) -> bytes:
        """A partial-image event: the preview at the image's size, in the asked format."""
        rendered = await self.ctx.generation.render_preview(
            job, preview, output_format=self.body.output_format, compression=self.body.output_compression,
            full_size=True)
        event = self.partial_event(**self._image_fields(rendered.data, rendered.width, rendered.height),
                                   partial_image_index=number)
        return format_sse_event(data_str=event.model_dump_json(), event=event.type)

    def _image_fields(self, data: bytes, width: int, height: int) -> dict[str, Any]:
        """What OpenAI's partial and completed image events both carry."""
        return dict(b64_json=base64.b64encode(data).decode("ascii"), created_at=int(time.time()),
                    size=f"{width}x{height}", quality=self.body.quality or "auto",
                    output_format=self.body.output_format)


def _store(ctx: ServerContext, request: Request, rendered: Rendered) -> str:
    """Keep the image for QWEN_IMAGE_RESULT_TTL_S and return its absolute URL."""
    item = ctx.results.put(rendered.data, rendered.media_type)
    return str(request.url_for("openai_image", image_id=item.id))


def _error_event(detail: ErrorDetail) -> bytes:
    """The common error body as an SSE `error` event."""
    return format_sse_event(data_str=ErrorResponse(error=detail).model_dump_json(), event="error")


@router.get("/images/{image_id}", name="openai_image",
            responses={200: {"content": {media: {} for media in MEDIA_TYPES.values()}},
                       404: {"model": ErrorResponse}})
async def get_image(image_id: str, ctx: Ctx) -> Response:
    """An image returned earlier as a `url`, until QWEN_IMAGE_RESULT_TTL_S has passed."""
    stored = ctx.results.get(image_id)
    if stored is None:
        raise errors.NotFound(f"No image with id '{image_id}': unknown, or expired "
                              f"(images are kept {ctx.settings.result_ttl_s:g} s).", param="image_id")
    return Response(stored.data, media_type=stored.media_type)


@router.get("/models", response_model=ModelList)
async def list_models(ctx: Ctx) -> ModelList:
    """Every model this server serves, with what each can do."""
    return ModelList(data=model_cards(ctx))


@router.get("/models/{model_id:path}", response_model=ModelCard, responses={404: {"model": ErrorResponse}})
async def get_model(model_id: str, ctx: Ctx) -> ModelCard:
    cards = {card.id: card for card in model_cards(ctx)}
    if model_id not in cards:
        raise errors.NotFound(f"The model '{model_id}' does not exist; this server serves "
                              f"{', '.join(repr(name) for name in cards)}.", param="model",
                              code="model_not_found")
    return cards[model_id]


def model_cards(ctx: ServerContext) -> list[ModelCard]:
    loaded = {model.name: model for model in ctx.generation.models}
    cards = []
    for name, task in ctx.generation.model_tasks().items():
        model = loaded.get(name)
        cards.append(ModelCard(id=name, created=_STARTED, tasks=[task] if task else [],
                               max_input_images=model.max_images if model else 0,
                               pipeline=model.pipeline_class if model else None))
    return cards
