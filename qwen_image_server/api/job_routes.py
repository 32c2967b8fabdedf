"""Async jobs with live progress: POST /v1/jobs, GET status / image / SSE events, DELETE.

A job outlives the request that created it: a background task awaits the scheduler's result,
renders the PNG and keeps it in the result store. Every change (queue position, start, each
denoising step, each preview the job asked for, the end) is pushed to the job's SSE
subscribers; a late subscriber gets the current state first, then the newest preview. Previews
are encoded on the CPU pool, once, when a subscriber reads them; one that falls behind skips to
the newest, so a slow client never holds up the engine or piles up images. Finished jobs are forgotten after QWEN_IMAGE_RESULT_TTL_S, and at most
QWEN_IMAGE_MAX_STORED_RESULTS of them are kept, so memory stays bounded under load.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import logging
import time
from collections.abc import AsyncIterator
from typing import Annotated

from fastapi import APIRouter, Depends, Request, Response
from fastapi.responses import JSONResponse
from fastapi.sse import EventSourceResponse, ServerSentEvent

from qwen_image_server import errors
from qwen_image_server.api.bodies import NATIVE_EDIT_BODY, read_native_edit
from qwen_image_server.api.context import Ctx, ServerContext
from qwen_image_server.engine.types import GenerationSpec, Preview
from qwen_image_server.job_state import JobEvent, JobState
from qwen_image_server.protocol.common import ErrorDetail, ErrorResponse
from qwen_image_server.protocol.native import (
    EditParameters,
    JobPreview,
    JobProgress,
    JobRequest,
    JobStatus,
)
from qwen_image_server.scheduler import Job
from qwen_image_server.serving.job_registry import JobRecord, Subscriber

log = logging.getLogger(__name__)
router = APIRouter(prefix="/v1/jobs", tags=["jobs"])


def job_record(job_id: str, ctx: Ctx) -> JobRecord:
    """Dependency: the job named in the path (404 before any response starts, SSE included)."""
    return ctx.jobs.get(job_id)


Record = Annotated[JobRecord, Depends(job_record)]


def status_of(ctx: ServerContext, record: JobRecord, request: Request) -> JobStatus:
    job = record.job
    started = job.started_at
    return JobStatus(
        id=job.id,
        status=record.status,
        queue_position=ctx.scheduler.queue_position(job),
        progress=JobProgress(step=job.step, total=job.total_steps),
        request_id=job.request_id,
        created_at=record.created_at,
        started_at=record.created_at + (started - job.submitted_at) if started else None,
        finished_at=(record.created_at + (job.finished_at - job.submitted_at)
                     if job.finished_at and record.status.final else None),
        queue_time=round(started - job.submitted_at, 3) if started else None,
        inference_time=record.inference_time,
        preview_time=round(job.preview_time, 3) if job.spec.preview is not None else None,
        width=job.spec.width,
        height=job.spec.height,
        seed=job.spec.seed,
        engine=job.engine,
        image_url=str(request.url_for("job_image", job_id=job.id)) if record.image_id else None,
        file_path=record.file_path,
        error=record.error,
        loading_lora=ctx.generation.loading_lora(job) if record.status is JobState.RUNNING else None,
    )


async def _complete(ctx: ServerContext, record: JobRecord) -> None:
    """Await the scheduler's result, render and store it, then announce the end."""
    job = record.job
    try:
        result = await ctx.generation.wait(job)
        rendered = await ctx.generation.render(job, result, overlay=record.body.add_overlay,
                                               save_to_file=record.body.save_to_file)
        record.file_path = rendered.file_path
        record.inference_time = rendered.inference_time
        record.image_id = ctx.results.put(rendered.data, rendered.media_type, id=f"job-{job.id}").id
    except errors.ServerError as exc:
        record.fail(exc)
    except Exception:  # noqa: BLE001 - rendering failed; the job must still end
        log.exception("job %s: rendering failed", job.id)
        record.error = ErrorDetail(message="Rendering the image failed; the server logged the details.",
                                   type=errors.InferenceFailed.type)
    record.finished_monotonic = time.monotonic()
    record.publish(JobEvent.entering(record.status), job.step)


@router.post("", status_code=202, response_model=JobStatus,
             responses={s: {"model": ErrorResponse} for s in (400, 429, 503)})
async def create_job(body: JobRequest, request: Request, ctx: Ctx) -> JSONResponse:
    """Queue a generation (/generate's body, plus `preview`) and return at once with its id."""
    generation = ctx.generation
    request_id = generation.next_request_id()
    body = generation.with_defaults(body)
    spec = await generation.generate_spec(body)
    return await _queue(ctx, request, body, spec, request_id)


@router.post("/edit", status_code=202, response_model=JobStatus, openapi_extra=NATIVE_EDIT_BODY,
             responses={s: {"model": ErrorResponse} for s in (400, 404, 413, 429, 503)})
async def create_edit_job(request: Request, ctx: Ctx) -> JSONResponse:
    """Queue an edit (same body as /edit: image files or base64 images, plus `preview`) and
    return at once with its id; its progress and preview events are a generation's."""
    body, images, mask = await read_native_edit(request)
    generation = ctx.generation
    request_id = generation.next_request_id()
    body, spec = await generation.native_edit(body, images, mask)
    spec = dataclasses.replace(spec, preview=body.preview_plan())
    return await _queue(ctx, request, body, spec, request_id)


async def _queue(ctx: ServerContext, request: Request, body: JobRequest | EditParameters,
                 spec: GenerationSpec, request_id: int) -> JSONResponse:
    """Submit the job, track it to its end, and answer 202 with its status."""
    [job] = await ctx.generation.submit([spec], request_id)
    loop = asyncio.get_running_loop()
    record = JobRecord(job=job, body=body, created_at=time.time())
    ctx.jobs.add(record)

    def on_event(job: Job, event: JobEvent) -> None:  # engine / reaper thread
        if event is JobEvent.PREVIEW:
            if job.preview is not None:
                loop.call_soon_threadsafe(record.new_preview, job.preview)
        elif not event.final:  # the end is announced by _complete, once the PNG exists
            loop.call_soon_threadsafe(record.publish, event, job.step)

    ctx.scheduler.add_listener(job, on_event)
    ctx.jobs.track(asyncio.create_task(_complete(ctx, record)))
    log.info("request %d: job %s queued", request_id, job.id)
    status = status_of(ctx, record, request)
    return JSONResponse(status.model_dump(mode="json"), status_code=202,
                        headers={"Location": str(request.url_for("get_job", job_id=job.id))})


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
    job_id = record.job.id
    if record.image_id is None:
        raise errors.JobNotReady(f"Job {job_id} is {record.status}; it has no image.", param="id")
    stored = ctx.results.get(record.image_id)
    if stored is None:
        raise errors.NotFound(f"The image of job {job_id} is no longer kept.", param="id")
    return Response(stored.data, media_type=stored.media_type,
                    headers={"X-Request-ID": str(record.job.request_id)})


@router.delete("/{job_id}", response_model=JobStatus, responses={404: {"model": ErrorResponse}})
async def cancel_job(record: Record, request: Request, ctx: Ctx) -> JobStatus:
    """Cancel: a queued job never runs; a running one stops at its next denoising step."""
    job = record.job
    if ctx.generation.cancel(job):
        log.info("request %d: job %s cancelled by the client", job.request_id, job.id)
        if job.future.done() and isinstance(exc := job.future.exception(), errors.ServerError):
            # A queued job ends at once: answer "cancelled" now, not after _complete's turn.
            record.fail(exc)
    return status_of(ctx, record, request)


@router.get("/{job_id}/events", response_class=EventSourceResponse,
            responses={404: {"model": ErrorResponse}})
async def job_events(record: Record, request: Request, ctx: Ctx) -> AsyncIterator[ServerSentEvent]:
    """Server-Sent Events: queued (position), started, step (each denoising step), preview (for
    jobs that asked: the image so far), then succeeded / failed / cancelled. The first event is
    the current state, followed by the newest preview if there is one."""
    subscriber = Subscriber()
    record.subscribers.add(subscriber)

    async def encode(preview: Preview) -> JobPreview:
        rendered = await ctx.generation.render_preview(record.job, preview)
        return JobPreview(id=record.job.id, step=preview.step, total=preview.total, mode=preview.mode,
                          width=rendered.width, height=rendered.height, media_type=rendered.media_type,
                          b64_json=base64.b64encode(rendered.data).decode("ascii"))

    try:
        current = record.status
        yield ServerSentEvent(event=JobEvent.entering(current).value,
                              data=status_of(ctx, record, request).model_dump(mode="json"))
        if current.final:
            return
        if record.preview is not None and not subscriber.preview_waiting:
            subscriber.preview_waiting = True  # a newer one arriving now is sent in its place
            subscriber.queue.put_nowait((JobEvent.PREVIEW, record.preview.step))
        position = (record.job.step if current is JobState.RUNNING
                    else ctx.scheduler.queue_position(record.job))
        # The step of the last step event sent. The newest preview may be ahead of it when this
        # subscriber lags; it is then sent right after the step event it shows, never before.
        sent_step = record.job.step if current is JobState.RUNNING else 0
        deferred = False
        while True:
            event, step = await subscriber.queue.get()
            if event is JobEvent.PREVIEW:
                if record.preview is not None and record.preview.step > sent_step:
                    deferred = True  # preview_waiting stays set: no second notice piles up
                    continue
                subscriber.preview_waiting = False
                preview = await record.encoded_preview(encode)
                if preview is not None:
                    yield ServerSentEvent(event=event.value, data=preview.model_dump(mode="json"))
                continue
            status = status_of(ctx, record, request)
            if event is JobEvent.STEP:
                status.progress.step = step  # the step this notice was for, not the latest
                sent_step = step
            elif event is JobEvent.QUEUED:
                if status.queue_position is None or status.queue_position == position:
                    continue  # the queue moved but this job's place did not
                position = status.queue_position
            yield ServerSentEvent(event=event.value, data=status.model_dump(mode="json"))
            if event.final:
                return
            if deferred and record.preview is not None and record.preview.step <= sent_step:
                deferred = subscriber.preview_waiting = False
                preview = await record.encoded_preview(encode)
                if preview is not None:
                    yield ServerSentEvent(event=JobEvent.PREVIEW.value, data=preview.model_dump(mode="json"))
    finally:
        record.subscribers.discard(subscriber)
