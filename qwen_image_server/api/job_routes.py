"""Async jobs with live progress: POST /v1/jobs, GET status / image / SSE events, DELETE.

The routes parse and answer; what a job is and does (it outlives its request, its image is
stored, its events reach every subscriber) lives in `serving/job_registry.py`.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Annotated

from fastapi import APIRouter, Depends, Request, Response
from fastapi.responses import JSONResponse
from fastapi.sse import EventSourceResponse, ServerSentEvent
from pydantic import HttpUrl
from starlette.applications import Starlette
from starlette.datastructures import URL

from qwen_image_server.api.bodies import (
    EDIT_JOB_BODY,
    LAYERED_JOB_BODY,
    generation_body,
    read_edit_job,
    read_generation,
    read_layered_job,
)
from qwen_image_server.api.context import Ctx, ServerContext, Who
from qwen_image_server.api.error_mapping import SAVE_ERROR_RESPONSES
from qwen_image_server.api.file_routes import file_url_at
from qwen_image_server.protocol.common import ErrorResponse
from qwen_image_server.protocol.native import (
    JobRequest,
    JobStatus,
)
from qwen_image_server.serving.job_registry import JobRecord

log = logging.getLogger(__name__)
router = APIRouter(prefix="/v1/jobs", tags=["jobs"])


async def job_record(job_id: str, ctx: Ctx, caller: Who) -> JobRecord:
    """Dependency: the caller's job named in the path (404 before any response starts, SSE
    included; another API key's job is 404 too)."""
    return await ctx.jobs.get(job_id, caller.id)


Record = Annotated[JobRecord, Depends(job_record)]


def followed_record(record: Record, ctx: Ctx) -> JobRecord:
    """Dependency: the job, if it may take one more events client (429 before the stream starts)."""
    record.check_subscribers(ctx.jobs.max_subscribers)
    return record


def status_of(ctx: ServerContext, record: JobRecord, request: Request) -> JobStatus:
    return status_at(ctx, record, request.app, request.base_url)


def status_at(ctx: ServerContext, record: JobRecord, app: Starlette, base_url: str | URL) -> JobStatus:
    """The job's status with its links for a request to `base_url`."""
    status = ctx.jobs.status(record, image_url(record, app, base_url))
    status.file_url = file_url_at(ctx, app, base_url, status.file_path, record.owner, record.job.id)
    return status


def image_url(record: JobRecord, app: Starlette, base_url: str | URL) -> str:
    return str(app.url_path_for("job_image", job_id=record.job.id).make_absolute_url(base_url))


def announce_end(app: Starlette) -> Callable[[JobRecord], Awaitable[None]]:
    """What the job registry calls when a job ends: its webhook, with the status GET
    /v1/jobs/{id} answers (links for the request that created the job)."""

    async def ended(record: JobRecord) -> None:
        if record.webhook_url is None or record.base_url is None:
            return
        ctx: ServerContext = app.state.ctx
        await ctx.webhooks.job_ended(record.webhook_url, status_at(ctx, record, app, record.base_url))

    return ended


async def job_body(request: Request) -> JobRequest:
    """Dependency: /v1/jobs' body, JSON or a multipart form (pictures as file parts)."""
    return await read_generation(request, JobRequest)


@router.post("", status_code=202, response_model=JobStatus, openapi_extra=generation_body(JobRequest),
             responses={**{s: {"model": ErrorResponse} for s in (400, 429, 503)}, **SAVE_ERROR_RESPONSES})
async def create_job(body: Annotated[JobRequest, Depends(job_body)], request: Request, ctx: Ctx,
                     caller: Who) -> JSONResponse:
    """Queue a generation (/generate's body, plus `preview` and `webhook_url`; JSON, or a
    multipart form with `image`, `mask` and `control_image` as file parts) and return at once
    with its id."""
    webhook = await ctx.webhooks.url_for(_text(body.webhook_url))
    prepared = await ctx.generation.prepare(body, "generate", preview=body.preview_plan(), caller=caller)
    return _accepted(ctx, request, await ctx.jobs.start(prepared, str(request.base_url), webhook))


@router.post("/edit", status_code=202, response_model=JobStatus, openapi_extra=EDIT_JOB_BODY,
             responses={**{s: {"model": ErrorResponse} for s in (400, 404, 413, 429, 503)}, **SAVE_ERROR_RESPONSES})
async def create_edit_job(request: Request, ctx: Ctx, caller: Who) -> JSONResponse:
    """Queue an edit (same body as /edit: image files or base64 images, plus `preview` and
    `webhook_url`) and return at once with its id; its progress and preview events are a
    generation's."""
    body, images, mask = await read_edit_job(request)
    webhook = await ctx.webhooks.url_for(_text(body.webhook_url))
    prepared = await ctx.generation.prepare(body, "edit", model=body.model, images=images, mask=mask,
                                            preview=body.preview_plan(), caller=caller)
    return _accepted(ctx, request, await ctx.jobs.start(prepared, str(request.base_url), webhook))


@router.post("/layers", status_code=202, response_model=JobStatus, openapi_extra=LAYERED_JOB_BODY,
             responses={s: {"model": ErrorResponse} for s in (400, 404, 413, 429, 503)})
async def create_layered_job(request: Request, ctx: Ctx, caller: Who) -> JSONResponse:
    """Queue a layered split (multipart: the picture as `image`, `layers`, `resolution`, an
    optional prompt, `preview=latent`, `webhook_url`) and return at once with its id. Its image
    is the layers stacked (alpha-composited); `GET /v1/jobs/{id}/layers.zip` has each layer."""
    body, images = await read_layered_job(request)
    webhook = await ctx.webhooks.url_for(_text(body.webhook_url))
    prepared = await ctx.generation.prepare(body, "layered", model=body.model, images=images,
                                            preview=body.preview_plan(), caller=caller, layers=body.layers,
                                            resolution=body.resolution)
    return _accepted(ctx, request, await ctx.jobs.start(prepared, str(request.base_url), webhook))


def _text(url: HttpUrl | None) -> str | None:
    return str(url) if url is not None else None


def _accepted(ctx: ServerContext, request: Request, record: JobRecord) -> JSONResponse:
    """202 with the new job's status, and where to find it."""
    status = status_of(ctx, record, request)
    return JSONResponse(status.model_dump(mode="json"), status_code=202,
                        headers={"Location": str(request.url_for("get_job", job_id=record.job.id))})


@router.get("/{job_id}", response_model=JobStatus, name="get_job",
            responses={404: {"model": ErrorResponse}})
async def get_job(record: Record, request: Request, ctx: Ctx) -> JobStatus:
    """Status, queue position, progress, timings and error of a job."""
    return status_of(ctx, record, request)


@router.get("/{job_id}/image", name="job_image",
            responses={200: {"content": {"image/png": {}}}, 404: {"model": ErrorResponse},
                       409: {"model": ErrorResponse}})
async def job_image(record: Record, ctx: Ctx) -> Response:
    """The PNG of a succeeded job (409 while it is not done, or if it failed)."""
    stored = await ctx.jobs.image(record)
    return Response(stored.data, media_type=stored.media_type,
                    headers={"X-Request-ID": str(record.job.request_id)})


@router.get("/{job_id}/layers.zip", name="job_layers",
            responses={200: {"content": {"application/zip": {}}}, 404: {"model": ErrorResponse},
                       409: {"model": ErrorResponse}})
async def job_layers(record: Record, ctx: Ctx) -> Response:
    """A succeeded layered job's layers: a ZIP of RGBA PNGs, layer-0.png (the bottom) upwards
    (409 while it is not done; 404 for a job of another task, or once no longer kept)."""
    stored = await ctx.jobs.layers(record)
    return Response(stored.data, media_type=stored.media_type,
                    headers={"X-Request-ID": str(record.job.request_id),
                             "Content-Disposition": f'attachment; filename="{record.job.id}-layers.zip"'})


@router.delete("/{job_id}", response_model=JobStatus, responses={404: {"model": ErrorResponse}})
async def cancel_job(record: Record, request: Request, ctx: Ctx) -> JobStatus:
    """Cancel: a queued job never runs; a running one stops at its next denoising step."""
    await ctx.jobs.cancel(record)
    return status_of(ctx, record, request)


@router.get("/{job_id}/events", response_class=EventSourceResponse,
            responses={404: {"model": ErrorResponse}, 429: {"model": ErrorResponse}})
async def job_events(record: Annotated[JobRecord, Depends(followed_record)], request: Request,
                     ctx: Ctx) -> AsyncIterator[ServerSentEvent]:
    """Server-Sent Events: queued (position), started, step (each denoising step), preview (for
    jobs that asked: the image so far), then succeeded / failed / cancelled. The first event is
    the current state, followed by the newest preview if there is one."""
    async for event, data in ctx.jobs.events(record, image_url(record, request.app, request.base_url)):
        yield ServerSentEvent(event=event.value, data=data.model_dump(mode="json"))
