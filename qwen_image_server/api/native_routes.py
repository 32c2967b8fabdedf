"""The seed's API, unchanged for its users: /health, /info, /generate; plus /ready and /edit."""

from __future__ import annotations

import logging

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse

from qwen_image_server.api.bodies import NATIVE_EDIT_BODY, read_native_edit
from qwen_image_server.api.context import Ctx, ServerContext, client_gone
from qwen_image_server.api.error_mapping import ERROR_RESPONSES
from qwen_image_server.protocol.common import ErrorResponse
from qwen_image_server.protocol.native import (
    EditParameters,
    GenerateFileResponse,
    GenerateRequest,
    HealthResponse,
    InfoResponse,
    ReadyResponse,
)
from qwen_image_server.serving.generation import Prepared
from qwen_image_server.serving.info import server_info

log = logging.getLogger(__name__)
router = APIRouter()
# What /generate and /edit answer with: the image, or JSON naming the saved file.
IMAGE_OR_FILE = {"content": {"image/png": {}, "application/json": {"schema": GenerateFileResponse.model_json_schema()}},
                 "description": "PNG bytes, or JSON when save_to_file is true."}


@router.get("/health", response_model=HealthResponse, tags=["server"])
async def health(ctx: Ctx, response: Response) -> HealthResponse:
    """Liveness: healthy unless no engine can serve any more (then 503 while the process exits).
    An engine restarting (after a hung batch or a crash) leaves it healthy, with the reason: the
    server recovers by itself, and a restart of the whole process would not be quicker."""
    dead = ctx.scheduler.dead
    if dead:
        response.status_code = 503
    return HealthResponse(
        status="unhealthy" if dead else "healthy",
        model_loaded=ctx.scheduler.loaded and not dead,
        device=ctx.device.type,
        gpu=ctx.device.gpu,
        cuda_version=ctx.device.cuda_version,
        reason=ctx.scheduler.trouble,
    )


@router.get("/ready", response_model=ReadyResponse, responses={503: {"model": ReadyResponse}},
            tags=["server"])
async def ready(ctx: Ctx) -> JSONResponse:
    """Readiness: 200 only when the model is loaded and the server takes new work; else 503 with
    the reason (an engine restarting after a hung batch, for one)."""
    s = ctx.scheduler
    reason = (s.trouble if s.dead else "shutting down" if s.draining
              else (s.trouble or "model loading") if not s.serving else None)
    body = ReadyResponse(ready=reason is None, reason=reason)
    return JSONResponse(body.model_dump(), status_code=200 if reason is None else 503)


@router.get("/info", response_model=InfoResponse, tags=["server"])
async def info(ctx: Ctx) -> InfoResponse:
    """Model, device and live scheduler facts."""
    return server_info(ctx.generation, ctx.replica)


@router.post(
    "/generate",
    tags=["generate"],
    responses={200: IMAGE_OR_FILE, **ERROR_RESPONSES},
)
async def generate(body: GenerateRequest, request: Request, ctx: Ctx) -> Response:
    """Generate one image: PNG bytes, or (save_to_file) JSON naming the saved file."""
    prepared = await ctx.generation.prepare(body, "generate")
    spec = prepared.specs[0]
    log.info("request %d received: %dx%d, %d steps, cfg %g, seed %d, save_to_file=%s",
             prepared.request_id, spec.width, spec.height, spec.num_inference_steps,
             spec.true_cfg_scale, spec.seed, body.save_to_file)
    return await _answer(ctx, request, prepared)


@router.post(
    "/edit",
    tags=["edit"],
    openapi_extra=NATIVE_EDIT_BODY,
    responses={200: IMAGE_OR_FILE, 404: {"model": ErrorResponse}, 413: {"model": ErrorResponse}, **ERROR_RESPONSES},
)
async def edit(request: Request, ctx: Ctx) -> Response:
    """Edit one to three images (multipart files `image`, or base64 `images` in JSON), optionally
    inside a mask: PNG bytes, or (save_to_file) JSON naming the saved file."""
    body, images, mask = await read_native_edit(request)
    prepared = await ctx.generation.prepare(body, "edit", model=body.model, images=images, mask=mask)
    spec = prepared.specs[0]
    log.info("request %d (edit) received: %d image(s)%s, %dx%d, %d steps, cfg %g, seed %d, model %s",
             prepared.request_id, len(images), " and a mask" if mask else "", spec.width, spec.height,
             spec.num_inference_steps, spec.true_cfg_scale, spec.seed, spec.model or "(first)")
    return await _answer(ctx, request, prepared)


async def _answer(ctx: ServerContext, request: Request,
                  prepared: Prepared[GenerateRequest] | Prepared[EditParameters]) -> Response:
    """Queue the request's one image, wait for it (cancelling it if the client leaves) and answer
    as /generate does."""
    generation = ctx.generation
    request_id, body = prepared.request_id, prepared.body
    [job] = await generation.submit(prepared)
    result = await generation.wait(job, client_gone(request))
    rendered = await generation.render(job, result, overlay=body.add_overlay, save_to_file=body.save_to_file)
    headers = {
        "X-Request-ID": str(request_id),
        "X-Inference-Time": f"{rendered.inference_time}",
        "X-Queue-Time": f"{result.queue_wait:.3f}",
        "X-Batch-Size": str(result.batch_size),
        "X-Engine": str(result.engine),
    }
    if rendered.file_path is None:
        return Response(rendered.data, media_type=rendered.media_type, headers=headers)
    return JSONResponse(GenerateFileResponse(
        request_id=request_id,
        inference_time=rendered.inference_time,
        file_path=rendered.file_path,
        width=rendered.width,
        height=rendered.height,
    ).model_dump(), headers=headers)
