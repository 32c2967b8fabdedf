"""The seed's API, unchanged for its users: /health, /info, /generate; plus /ready and /edit."""

from __future__ import annotations

import dataclasses
import logging

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse

from qwen_image_server import __version__
from qwen_image_server.api.bodies import NATIVE_EDIT_BODY, read_native_edit
from qwen_image_server.api.context import Ctx, ServerContext, client_gone
from qwen_image_server.api.error_mapping import ERROR_RESPONSES
from qwen_image_server.api.openai_routes import model_cards
from qwen_image_server.config.presets import ASPECT_RATIOS
from qwen_image_server.engine.device import gpu_memory_mb
from qwen_image_server.engine.types import GenerationSpec
from qwen_image_server.protocol.common import ErrorResponse
from qwen_image_server.protocol.native import (
    EngineInfo,
    EngineOptions,
    GenerateFileResponse,
    GenerateRequest,
    GenerationDefaultsInfo,
    GpuMemory,
    HealthResponse,
    InfoResponse,
    ModelInfo,
    ReadyResponse,
    SchedulerInfo,
)
from qwen_image_server.scheduler import SlotState
from qwen_image_server.serving.metrics import engine_memory

log = logging.getLogger(__name__)
router = APIRouter()


@router.get("/health", response_model=HealthResponse, tags=["server"])
async def health(ctx: Ctx, response: Response) -> HealthResponse:
    """Liveness: healthy unless no engine can serve any more (then 503 while the process exits)."""
    dead = ctx.scheduler.dead
    if dead:
        response.status_code = 503
    return HealthResponse(
        status="unhealthy" if dead else "healthy",
        model_loaded=ctx.scheduler.loaded and not dead,
        device=ctx.device.type,
        gpu=ctx.device.gpu,
        cuda_version=ctx.device.cuda_version,
    )


@router.get("/ready", response_model=ReadyResponse, responses={503: {"model": ReadyResponse}},
            tags=["server"])
async def ready(ctx: Ctx) -> JSONResponse:
    """Readiness: 200 only when the model is loaded and the server takes new work."""
    s = ctx.scheduler
    reason = ("engine failed" if s.dead else "shutting down" if s.draining
              else "model loading" if not s.serving else None)
    body = ReadyResponse(ready=reason is None, reason=reason)
    return JSONResponse(body.model_dump(), status_code=200 if reason is None else 503)


@router.get("/info", response_model=InfoResponse, tags=["server"])
async def info(ctx: Ctx) -> InfoResponse:
    """Model, device and live scheduler facts."""
    model = ctx.model
    loaded = {m.name: m for m in ctx.generation.models}
    stats = ctx.scheduler.stats()
    cfg = ctx.scheduler.config
    reports = engine_memory(ctx.scheduler)
    if reports is not None:  # engine processes: the first engine's, as of its last batch
        memory = reports[0] if reports else None
    else:
        memory = gpu_memory_mb(ctx.device) if model is not None else None
    return InfoResponse(
        model_name=ctx.settings.models[0].name,
        model_source=model.source if model else "loading",
        model_loaded=model is not None,
        device=ctx.device.type,
        gpu=ctx.device.gpu,
        cuda_version=ctx.device.cuda_version,
        dtype=str(model.dtype).removeprefix("torch.") if model else None,
        model_load_time=round(model.load_time, 2) if model else None,
        total_parameters=model.total_parameters if model else None,
        model_size_mb=model.size_mb if model else None,
        gpu_memory_mb=memory["allocated"] if memory else None,
        gpu_memory=GpuMemory(**memory) if memory else None,
        supported_aspect_ratios=list(ASPECT_RATIOS),
        aspect_ratios=ASPECT_RATIOS,
        total_requests_processed=stats.processed,
        workers=ctx.scheduler.engine_count,
        threads=ctx.settings.threads,
        replica=ctx.replica,
        scheduler=SchedulerInfo(
            queue_length=stats.queue_length,
            running_batch_size=stats.running_batch_size,
            processed=stats.processed,
            failed=stats.failed,
            cancelled=stats.cancelled,
            rejected=stats.rejected,
            timed_out=stats.timed_out,
            batches=stats.batches,
            mean_inference_time=(round(stats.mean_inference_time, 3)
                                 if stats.mean_inference_time is not None else None),
            max_queue=cfg.max_queue,
            max_batch_size=cfg.max_batch_size,
            max_batch_pixels=cfg.max_batch_pixels,
            batch_wait_ms=cfg.batch_wait_s * 1000.0,
            queue_timeout_s=cfg.queue_timeout_s,
        ),
        engines=[EngineInfo(index=e.index, state=e.state.value, busy=e.state is SlotState.BUSY, gpu=e.gpu, pid=e.pid,
                            batches=e.batches, restarts=e.restarts,
                            gpu_memory=GpuMemory(**e.memory) if e.memory else None)
                 for e in stats.engines],
        options=EngineOptions(**dataclasses.asdict(model.options)) if model else None,
        defaults=GenerationDefaultsInfo(**dataclasses.asdict(ctx.generation.defaults)),
        models=[ModelInfo(name=card.id, tasks=card.tasks, pipeline=card.pipeline,
                          max_input_images=card.max_input_images,
                          shared=list(loaded[card.id].shared) if card.id in loaded else [])
                for card in model_cards(ctx)],
        version=__version__,
    )


@router.post(
    "/generate",
    tags=["generate"],
    responses={200: {"content": {"image/png": {}, "application/json": {"schema": GenerateFileResponse.model_json_schema()}},
                     "description": "PNG bytes, or JSON when save_to_file is true."}, **ERROR_RESPONSES},
)
async def generate(body: GenerateRequest, request: Request, ctx: Ctx) -> Response:
    """Generate one image: PNG bytes, or (save_to_file) JSON naming the saved file."""
    generation = ctx.generation
    request_id = generation.next_request_id()
    body = generation.with_defaults(body)
    spec = await generation.generate_spec(body)
    log.info("request %d received: %dx%d, %d steps, cfg %g, seed %d, save_to_file=%s",
             request_id, spec.width, spec.height, spec.num_inference_steps,
             spec.true_cfg_scale, spec.seed, body.save_to_file)
    return await _answer(ctx, request, spec, request_id, body.add_overlay, body.save_to_file)


@router.post(
    "/edit",
    tags=["edit"],
    openapi_extra=NATIVE_EDIT_BODY,
    responses={200: {"content": {"image/png": {}, "application/json": {"schema": GenerateFileResponse.model_json_schema()}},
                     "description": "PNG bytes, or JSON when save_to_file is true."},
               404: {"model": ErrorResponse}, 413: {"model": ErrorResponse}, **ERROR_RESPONSES},
)
async def edit(request: Request, ctx: Ctx) -> Response:
    """Edit one to three images (multipart files `image`, or base64 `images` in JSON), optionally
    inside a mask: PNG bytes, or (save_to_file) JSON naming the saved file."""
    body, images, mask = await read_native_edit(request)
    generation = ctx.generation
    request_id = generation.next_request_id()
    body, spec = await generation.native_edit(body, images, mask)
    log.info("request %d (edit) received: %d image(s)%s, %dx%d, %d steps, cfg %g, seed %d, model %s",
             request_id, len(images), " and a mask" if mask else "", spec.width, spec.height,
             spec.num_inference_steps, spec.true_cfg_scale, spec.seed, spec.model or "(first)")
    return await _answer(ctx, request, spec, request_id, body.add_overlay, body.save_to_file)


async def _answer(ctx: ServerContext, request: Request, spec: GenerationSpec, request_id: int,
                  overlay: bool, save_to_file: bool) -> Response:
    """Queue one spec, wait for it (cancelling it if the client leaves) and answer as /generate does."""
    generation = ctx.generation
    [job] = await generation.submit([spec], request_id)
    result = await generation.wait(job, client_gone(request))
    rendered = await generation.render(job, result, overlay=overlay, save_to_file=save_to_file)
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
