"""The OpenAI-compatible API: images (JSON, url or Server-Sent Events) and models.

`openai.OpenAI(base_url="http://host:5000/v1")` works unchanged: `client.images.generate(...)`,
with Qwen-Image's own knobs in `extra_body`, and `client.models.list()`.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import secrets
import time
from collections.abc import AsyncIterator
from contextlib import aclosing

from fastapi import APIRouter, Request, Response
from fastapi.sse import KEEPALIVE_COMMENT, EventSourceResponse, format_sse_event

from qwen_image_server import errors
from qwen_image_server.api.context import Ctx, ServerContext, client_gone
from qwen_image_server.api.errors import ERROR_RESPONSES
from qwen_image_server.generation import Rendered
from qwen_image_server.openai_protocol import (
    ImageData,
    ImageGenCompletedEvent,
    ImageGenerationRequest,
    ImagesResponse,
    ImageUsage,
    ModelCard,
    ModelList,
)
from qwen_image_server.postprocess import MEDIA_TYPES
from qwen_image_server.scheduler import Job, JobResult
from qwen_image_server.schemas import MAX_SEED, ErrorDetail, ErrorResponse

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
    base_seed = body.seed if body.seed is not None else secrets.randbelow(MAX_SEED + 1)
    specs = body.to_specs(base_seed)
    width, height = specs[0].width, specs[0].height
    log.info("request %d (openai) received: n=%d, %dx%d, %d steps, cfg %g, seeds from %d, %s%s",
             request_id, body.n, width, height, body.num_inference_steps, body.true_cfg_scale,
             base_seed, body.output_format, ", stream" if body.stream else "")
    jobs = await generation.submit(specs, request_id)  # together, so they run as one batch
    if body.stream:
        # Submitted first, so a full queue or a draining server is a real HTTP error (429/503).
        return EventSourceResponse(_events(ctx, body, jobs, request))

    results = await generation.wait_all(jobs, client_gone(request))
    rendered = await asyncio.gather(*(_render(ctx, body, job, result) for job, result in zip(jobs, results)))
    revised = body.model_prompt
    if body.response_format == "url":
        data = [ImageData(url=_store(ctx, request, item), revised_prompt=revised) for item in rendered]
    else:
        data = [ImageData(b64_json=base64.b64encode(item.data).decode("ascii"), revised_prompt=revised)
                for item in rendered]
    text_tokens = await generation.count_tokens(body.model_prompt)
    return ImagesResponse(
        created=int(time.time()),
        model=ctx.settings.model,
        data=data,
        size=f"{width}x{height}",
        output_format=body.output_format,
        quality=body.quality,
        usage=ImageUsage.of(text_tokens, width, height, images=len(results)),
    )


async def _render(ctx: ServerContext, body: ImageGenerationRequest, job: Job, result: JobResult) -> Rendered:
    return await ctx.generation.render(job, result, output_format=body.output_format,
                                       compression=body.output_compression)


def _store(ctx: ServerContext, request: Request, rendered: Rendered) -> str:
    """Keep the image for QWEN_IMAGE_RESULT_TTL_S and return its absolute URL."""
    item = ctx.results.put(rendered.data, rendered.media_type)
    return str(request.url_for("openai_image", image_id=item.id))


async def _events(
    ctx: ServerContext, body: ImageGenerationRequest, jobs: list[Job], request: Request
) -> AsyncIterator[bytes]:
    """The SSE body: one image_generation.completed event per image, as each finishes.

    Streams always carry base64 (as OpenAI's do). A failure after the 200 has gone out becomes
    an `error` event with the usual error body, which the openai client raises as APIError.
    """
    generation = ctx.generation
    text_tokens: int | None = None  # counted once the first image exists (the model is loaded)
    width, height = jobs[0].spec.width, jobs[0].spec.height
    try:
        async with aclosing(generation.finished(jobs, client_gone(request),
                                                ping_s=PING_INTERVAL_S)) as outcomes:
            async for item in outcomes:
                if item is None:
                    yield KEEPALIVE_COMMENT
                    continue
                index, result = item
                rendered = await _render(ctx, body, jobs[index], result)
                if text_tokens is None:
                    text_tokens = await generation.count_tokens(body.model_prompt)
                event = ImageGenCompletedEvent(
                    b64_json=base64.b64encode(rendered.data).decode("ascii"),
                    created_at=int(time.time()),
                    size=f"{width}x{height}",
                    quality=body.quality or "auto",
                    output_format=body.output_format,
                    usage=ImageUsage.of(text_tokens, width, height, images=1),
                )
                yield format_sse_event(data_str=event.model_dump_json(), event=event.type)
    except errors.ServerError as exc:
        yield _error_event(ErrorDetail(message=exc.message, type=exc.type, param=exc.param, code=exc.code))
    except Exception:  # noqa: BLE001 - the status is sent; the client still needs to hear it failed
        log.exception("request %d (openai): streaming failed", jobs[0].request_id)
        yield _error_event(ErrorDetail(message="Internal server error; the server logged the details.",
                                       type="server_error"))


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
    """The one model this server serves."""
    return ModelList(data=[_card(ctx)])


@router.get("/models/{model_id:path}", response_model=ModelCard, responses={404: {"model": ErrorResponse}})
async def get_model(model_id: str, ctx: Ctx) -> ModelCard:
    if model_id != ctx.settings.model:
        raise errors.NotFound(f"The model '{model_id}' does not exist; this server serves "
                              f"'{ctx.settings.model}'.", param="model", code="model_not_found")
    return _card(ctx)


def _card(ctx: ServerContext) -> ModelCard:
    return ModelCard(id=ctx.settings.model, created=_STARTED)
