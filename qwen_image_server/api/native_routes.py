"""The seed's API, unchanged for its users: /health, /info, /generate; plus /ready and /edit."""

from __future__ import annotations

import logging
from typing import Annotated

import anyio
from fastapi import APIRouter, Depends, Request, Response
from fastapi.responses import JSONResponse

from qwen_image_server.api.bodies import NATIVE_EDIT_BODY, generation_body, read_generation, read_native_edit
from qwen_image_server.api.context import Ctx, ServerContext, Who, client_gone
from qwen_image_server.api.error_mapping import ERROR_RESPONSES, SAVE_ERROR_RESPONSES
from qwen_image_server.api.file_routes import file_url
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
from qwen_image_server.serving.render import b64

log = logging.getLogger(__name__)
router = APIRouter()
# What /generate and /edit answer with: the image, or JSON naming the saved file. Its nested
# models (ErrorDetail) refer to the document's own schemas, which the error responses put there.
_FILE_SCHEMA = {key: value for key, value in GenerateFileResponse.model_json_schema(
    ref_template="#/components/schemas/{model}").items() if key != "$defs"}
IMAGE_OR_FILE = {"content": {"image/png": {}, "application/json": {"schema": _FILE_SCHEMA}},
                 "description": "PNG bytes, or JSON when save_to_file is true (with the image itself in "
                                "b64_json when saving it failed)."}
# /ready's reasons for 503, in the order they are checked.
ENGINE_FAILED = "engine failed"
SHUTTING_DOWN = "shutting down"
MODEL_LOADING = "model loading"
LOW_DISK = "low disk space"  # the output folder's disk is below QWEN_IMAGE_MIN_FREE_DISK_MB


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
    """Readiness: 200 only when the model is loaded, the server takes new work, and the output
    folder's disk has its reserve of free space; else 503 with the reason (an engine restarting
    after a hung batch, for one)."""
    s = ctx.scheduler
    reason = ((s.trouble or ENGINE_FAILED) if s.dead else SHUTTING_DOWN if s.draining
              else (s.trouble or MODEL_LOADING) if not s.serving else None)
    # On a worker thread, not the CPU pool: a probe must not wait behind image encoding.
    if reason is None and await anyio.to_thread.run_sync(ctx.generation.output.low_on_space):
        reason = LOW_DISK
    body = ReadyResponse(ready=reason is None, reason=reason)
    return JSONResponse(body.model_dump(), status_code=200 if reason is None else 503)


@router.get("/info", response_model=InfoResponse, tags=["server"])
async def info(ctx: Ctx) -> InfoResponse:
    """Model, device and live scheduler facts."""
    return server_info(ctx.generation, ctx.replica)


async def generate_body(request: Request) -> GenerateRequest:
    """Dependency: /generate's body, JSON or a multipart form (pictures as file parts)."""
    return await read_generation(request, GenerateRequest)


@router.post(
    "/generate",
    tags=["generate"],
    openapi_extra=generation_body(GenerateRequest),
    responses={200: IMAGE_OR_FILE, **ERROR_RESPONSES, **SAVE_ERROR_RESPONSES},
)
async def generate(body: Annotated[GenerateRequest, Depends(generate_body)], request: Request, ctx: Ctx,
                   caller: Who) -> Response:
    """Generate one image: PNG bytes, or (save_to_file) JSON naming the saved file. The body is
    JSON, or the same fields as multipart/form-data with `image`, `mask` and `control_image` as
    file parts."""
    prepared = await ctx.generation.prepare(body, "generate", caller=caller)
    spec = prepared.specs[0]
    log.info("request %d received: %dx%d, %d steps, cfg %g, seed %d, save_to_file=%s",
             prepared.request_id, spec.width, spec.height, spec.num_inference_steps,
             spec.true_cfg_scale, spec.seed, body.save_to_file)
    return await _answer(ctx, request, prepared)


@router.post(
    "/edit",
    tags=["edit"],
    openapi_extra=NATIVE_EDIT_BODY,
    responses={200: IMAGE_OR_FILE, 404: {"model": ErrorResponse}, 413: {"model": ErrorResponse}, **ERROR_RESPONSES,
               **SAVE_ERROR_RESPONSES},
)
async def edit(request: Request, ctx: Ctx, caller: Who) -> Response:
    """Edit one to three images (multipart files `image`, or base64 `images` in JSON), optionally
    inside a mask: PNG bytes, or (save_to_file) JSON naming the saved file."""
    body, images, mask = await read_native_edit(request)
    prepared = await ctx.generation.prepare(body, "edit", model=body.model, images=images, mask=mask,
                                            caller=caller)
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
    rendered = await generation.renderer.render(job, result, overlay=body.add_overlay, save_to_file=body.save_to_file)
    headers = {
        "X-Request-ID": str(request_id),
        "X-Inference-Time": f"{rendered.inference_time}",
        "X-Queue-Time": f"{result.queue_wait:.3f}",
        "X-Batch-Size": str(result.batch_size),
        "X-Engine": str(result.engine),
    }
    if not body.save_to_file:
        return Response(rendered.data, media_type=rendered.media_type, headers=headers)
    answer = GenerateFileResponse(
        request_id=request_id,
        inference_time=rendered.inference_time,
        file_path=rendered.file_path,
        file_url=file_url(ctx, request, rendered.file_path, prepared.caller.id, job.id),
        width=rendered.width,
        height=rendered.height,
    )
    if rendered.save_error is None:
        # The seed's JSON, key for key: the fields for a failed save are left out.
        return JSONResponse(answer.model_dump(exclude={"save_error", "b64_json"}), headers=headers)
    # Saving failed. The client asked for JSON, so it gets JSON (not PNG bytes its JSON parser
    # would choke on), with file_path null, the reason, and the image itself inline, as the
    # OpenAI API's b64_json: the image the GPU made is never lost, and needs no second request.
    answer.save_error = rendered.save_error
    answer.b64_json = b64(rendered.data)
    return JSONResponse(answer.model_dump(), headers=headers)
