"""The OpenAI-compatible API: images (JSON, url or Server-Sent Events) and models.

`openai.OpenAI(base_url="http://host:5000/v1")` works unchanged: `client.images.generate(...)`,
with Qwen-Image's own knobs in `extra_body`, and `client.models.list()`.
"""

from __future__ import annotations

import asyncio
import base64
import io
import logging
import secrets
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import aclosing

from fastapi import APIRouter, Request, Response
from fastapi.sse import KEEPALIVE_COMMENT, EventSourceResponse, format_sse_event
from PIL import Image

from qwen_image_server import errors
from qwen_image_server.api.context import Ctx, ServerContext
from qwen_image_server.api.errors import ERROR_RESPONSES
from qwen_image_server.openai_protocol import (
    MEDIA_TYPES,
    ImageData,
    ImageGenCompletedEvent,
    ImageGenerationRequest,
    ImagesResponse,
    ImageUsage,
    ModelCard,
    ModelList,
    OutputFormat,
)
from qwen_image_server.postprocess import encode_png
from qwen_image_server.scheduler import Job, JobResult
from qwen_image_server.schemas import MAX_SEED, ErrorDetail, ErrorResponse

log = logging.getLogger(__name__)
router = APIRouter(prefix="/v1", tags=["openai"])

# Idle streams get an SSE comment this often, so proxies do not close them during a long image.
PING_INTERVAL_S = 15.0
# /v1/models' "created": when this server process started serving the model.
_STARTED = int(time.time())


# -- encoding (THREADS pool) ----------------------------------------------------------------

def encode_image(image: Image.Image, output_format: OutputFormat, compression: int | None) -> bytes:
    """PNG, or JPEG / WebP at quality `compression` (OpenAI's default: 100)."""
    if output_format == "png":
        return encode_png(image)
    buf = io.BytesIO()
    quality = 100 if compression is None else compression
    image.convert("RGB").save(buf, format=output_format.upper(), quality=quality)
    return buf.getvalue()


def encode_b64(image: Image.Image, output_format: OutputFormat, compression: int | None) -> str:
    return base64.b64encode(encode_image(image, output_format, compression)).decode("ascii")


async def prompt_tokens(ctx: ServerContext, body: ImageGenerationRequest) -> int:
    """Tokens of the prompt as the model reads it, for the usage block (0 without a tokenizer)."""
    return await ctx.in_pool(ctx.count_tokens, body.model_prompt) or 0


# -- submitting and awaiting ----------------------------------------------------------------

def _mark_read(task: asyncio.Future[JobResult]) -> None:
    # Once one job failed nobody reads the others' outcomes; don't let asyncio warn about them.
    if not task.cancelled():
        task.exception()


async def finished(
    ctx: ServerContext, jobs: Sequence[Job], request: Request, ping_s: float | None = None
) -> AsyncIterator[tuple[int, JobResult] | None]:
    """Yield (index, result) as the jobs finish, and None after every `ping_s` without one.

    The first failure is raised; it, a client disconnect, or the caller stopping early
    cancels every job not finished yet.
    """
    index = {asyncio.ensure_future(ctx.wait(job, request)): i for i, job in enumerate(jobs)}
    for task in index:
        task.add_done_callback(_mark_read)
    pending = set(index)
    try:
        while pending:
            done, pending = await asyncio.wait(pending, timeout=ping_s, return_when=asyncio.FIRST_COMPLETED)
            if not done:
                yield None
            for task in sorted(done, key=index.__getitem__):
                yield index[task], task.result()
    finally:
        # Cancelling the job (not the task) lets each ctx.wait end normally, at once if queued.
        # Last first: then no job being cancelled can reach the queue's head and start meanwhile.
        for task in sorted(pending, key=index.__getitem__, reverse=True):
            ctx.scheduler.cancel(jobs[index[task]])


async def wait_all(ctx: ServerContext, jobs: Sequence[Job], request: Request) -> list[JobResult]:
    """Every job's result, in order; the first failure cancels the others and is raised."""
    results: dict[int, JobResult] = {}
    async with aclosing(finished(ctx, jobs, request)) as outcomes:
        async for item in outcomes:
            assert item is not None  # no pings without ping_s
            results[item[0]] = item[1]
    return [results[i] for i in range(len(jobs))]


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
    request_id = ctx.next_request_id()
    body = ctx.with_defaults(body)
    base_seed = body.seed if body.seed is not None else secrets.randbelow(MAX_SEED + 1)
    specs = body.to_specs(base_seed)
    width, height = specs[0].width, specs[0].height
    log.info("request %d (openai) received: n=%d, %dx%d, %d steps, cfg %g, seeds from %d, %s%s",
             request_id, body.n, width, height, body.num_inference_steps, body.true_cfg_scale,
             base_seed, body.output_format, ", stream" if body.stream else "")
    jobs = await ctx.submit(specs, request_id)  # together, so they run as one batch
    if body.stream:
        # Submitted first, so a full queue or a draining server is a real HTTP error (429/503).
        return EventSourceResponse(_events(ctx, body, jobs, request))

    results = await wait_all(ctx, jobs, request)
    encoded = await asyncio.gather(*(
        ctx.in_pool(encode_image, r.image, body.output_format, body.output_compression) for r in results))
    revised = body.model_prompt
    if body.response_format == "url":
        data = [ImageData(url=_store(ctx, request, blob, body.output_format), revised_prompt=revised)
                for blob in encoded]
    else:
        data = [ImageData(b64_json=base64.b64encode(blob).decode("ascii"), revised_prompt=revised)
                for blob in encoded]
    text_tokens = await prompt_tokens(ctx, body)
    return ImagesResponse(
        created=int(time.time()),
        model=ctx.settings.model,
        data=data,
        size=f"{width}x{height}",
        output_format=body.output_format,
        quality=body.quality,
        usage=ImageUsage.of(text_tokens, width, height, images=len(results)),
    )


def _store(ctx: ServerContext, request: Request, blob: bytes, output_format: OutputFormat) -> str:
    """Keep the image for QWEN_IMAGE_RESULT_TTL_S and return its absolute URL."""
    item = ctx.results.put(blob, MEDIA_TYPES[output_format])
    return str(request.url_for("openai_image", image_id=item.id))


async def _events(
    ctx: ServerContext, body: ImageGenerationRequest, jobs: list[Job], request: Request
) -> AsyncIterator[bytes]:
    """The SSE body: one image_generation.completed event per image, as each finishes.

    Streams always carry base64 (as OpenAI's do). A failure after the 200 has gone out becomes
    an `error` event with the usual error body, which the openai client raises as APIError.
    """
    text_tokens: int | None = None  # counted once the first image exists (the model is loaded)
    width, height = jobs[0].spec.width, jobs[0].spec.height
    try:
        async with aclosing(finished(ctx, jobs, request, ping_s=PING_INTERVAL_S)) as outcomes:
            async for item in outcomes:
                if item is None:
                    yield KEEPALIVE_COMMENT
                    continue
                image = item[1].image
                b64 = await ctx.in_pool(encode_b64, image, body.output_format, body.output_compression)
                if text_tokens is None:
                    text_tokens = await prompt_tokens(ctx, body)
                event = ImageGenCompletedEvent(
                    b64_json=b64,
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
