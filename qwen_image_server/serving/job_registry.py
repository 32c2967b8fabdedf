"""Async jobs: each accepted job, from queued to its stored image or its error, and the events its
subscribers hear. HTTP-free: the jobs routes parse, call this, and format what it answers.

A job outlives the request that created it: a background task awaits the scheduler's result,
renders the image and keeps it in the result store. Every change (queue position, start, each
denoising step, each preview the job asked for, the end) is pushed to the job's subscribers; a
late subscriber gets the current state first, then the newest preview. Previews are encoded on
the CPU pool, once, when a subscriber reads them; one that falls behind skips to the newest, so
a slow client never holds up the engine or piles up images. Finished jobs are forgotten after
`ttl_s`, and at most `max_finished` of them are kept (past it, the owner with the most loses its
oldest), each without its pixels once its image is stored, so memory stays bounded under load.

A job belongs to the API key that created it: any other key is told it does not exist.

With a job store (`serving/job_store.py`, SQLite by default) every job is written there before
its client hears "accepted", and its end (status, image, a layered job's ZIP) when it ends: memory is then a cache.
A job no longer in memory is read back from the store; after a restart, `JobRecovery`
(`serving/job_recovery.py`) queues again the jobs that had not ended.

With a store shared by several servers (Redis) a `JobExchange` (`serving/job_exchange.py`) links
them: this server relays the events of the jobs it runs, follows (and cancels) those another one
runs for its own clients, and adopts the jobs of a server whose lease lapsed.

Lives on the event loop; the scheduler's threads reach it only through `call_soon_threadsafe`.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections import Counter, OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

from qwen_image_server import errors
from qwen_image_server.engine.types import GenerationSpec, LayeredSpec, Preview
from qwen_image_server.job_state import JobEvent, JobState
from qwen_image_server.protocol.common import ErrorDetail, NativeImageFields
from qwen_image_server.protocol.native import (
    JobPhase,
    JobPreview,
    JobProgress,
    JobStatus,
)
from qwen_image_server.scheduler import Job, JobResult
from qwen_image_server.scheduler.jobs import final_state
from qwen_image_server.serving.generation import Generation, Prepared
from qwen_image_server.serving.job_exchange import JobExchange
from qwen_image_server.serving.job_recovery import JobRecovery
from qwen_image_server.serving.job_store import AsyncJobStore, StoredJob, StoredTask
from qwen_image_server.serving.layers import ZIP_MEDIA_TYPE
from qwen_image_server.serving.preview_mailbox import LatestPreviews
from qwen_image_server.serving.render import b64
from qwen_image_server.serving.results import ResultStore, StoredImage

log = logging.getLogger(__name__)
CANCEL_WAIT_S = 5.0  # how long a cancel sent to another server waits for the job's end


@dataclass(eq=False)
class Subscriber:
    """One client of a job's events: in order, with at most one preview notice waiting (when it
    is read, the job's newest preview is sent; older unread ones are skipped)."""

    queue: asyncio.Queue[tuple[JobEvent, int]] = field(default_factory=asyncio.Queue)
    preview_waiting: bool = False


@dataclass(eq=False)
class JobRecord:
    """One job as its clients see it: the scheduler's job, plus its stored image or its error."""

    job: Job
    # What rendering reads of the request; the request's body itself is not kept (its uploads,
    # its base64 images), so a record that lives for the TTL holds no more than it needs.
    add_overlay: bool
    save_to_file: bool
    created_at: float  # unix time
    previews: LatestPreviews
    owner: str | None = None  # the API key's id that created it
    image_id: str | None = None  # in the result store, once rendered
    file_path: str | None = None
    save_error: ErrorDetail | None = None  # a save_to_file job whose image could not be saved
    inference_time: float | None = None
    render_error: ErrorDetail | None = None  # the image was made but could not be rendered
    finished_monotonic: float | None = None
    final: JobStatus | None = None  # a finished job read back from the job store: its status then
    relayed: JobStatus | None = None  # a job another server runs: its status as that server last told
    final_media_type: str | None = None  # and its image's
    base_url: str | None = None  # of the request that created it: its links in a webhook
    webhook_url: str | None = None  # where its end is POSTed
    subscribers: set[Subscriber] = field(default_factory=set)
    told_start: float | None = None  # the start (the job's started_at) the store and the relay were told of
    # The newest preview's encoding, shared by every subscriber and made once.
    _encoding: tuple[Preview, asyncio.Future[JobPreview]] | None = None

    @classmethod
    def create(cls, job: Job, body: NativeImageFields, loop: asyncio.AbstractEventLoop) -> JobRecord:
        """A record for a job just queued (`body`: what it was asked with); its previews wake its
        subscribers as they come."""
        previews = LatestPreviews(loop)
        record = cls(job=job, add_overlay=body.add_overlay, save_to_file=body.save_to_file,
                     created_at=time.time(), previews=previews, owner=job.owner)
        previews.on_new = lambda _, preview: record.publish(JobEvent.PREVIEW, preview.step)
        return record

    @classmethod
    def restored(cls, stored: StoredJob, loop: asyncio.AbstractEventLoop) -> JobRecord:
        """A finished job read back from the job store: its final status is all there is."""
        assert stored.status is not None
        final = JobStatus.model_validate_json(stored.status)
        # The scheduler's side of a job long gone: only what the routes read of it is real.
        spec = GenerationSpec("", "", final.width, final.height, final.progress.total, 0.0, final.seed)
        job = Job(spec=spec, request_id=final.request_id, submitted_at=0.0, deadline=0.0, id=stored.id,
                  owner=stored.owner, state=final.status, step=final.progress.step,
                  total_steps=final.progress.total)
        ended = time.time() - (final.finished_at or final.created_at)
        return cls(job=job, add_overlay=False, save_to_file=False, created_at=final.created_at,
                   previews=LatestPreviews(loop), owner=stored.owner, final=final,
                   image_id=stored.id if final.status is JobState.SUCCEEDED else None,
                   final_media_type=stored.media_type,
                   finished_monotonic=time.monotonic() - max(0.0, ended))

    @classmethod
    def elsewhere(cls, stored: StoredJob, status: JobStatus, loop: asyncio.AbstractEventLoop) -> JobRecord:
        """A job another server sharing the store runs, as it last told (`status`)."""
        spec = GenerationSpec("", "", status.width, status.height, status.progress.total, 0.0, status.seed)
        job = Job(spec=spec, request_id=stored.request_id, submitted_at=0.0, deadline=0.0, id=stored.id,
                  owner=stored.owner, state=status.status, step=status.progress.step,
                  total_steps=status.progress.total)
        return cls(job=job, add_overlay=False, save_to_file=False, created_at=stored.created_at,
                   previews=LatestPreviews(loop), owner=stored.owner, relayed=status)

    @property
    def status(self) -> JobState:
        """The scheduler's state of the job, except that a job whose image is made is still
        running until the image is stored, so GET .../image never races the final event."""
        if self.final is not None:
            return self.final.status
        if self.relayed is not None:
            return self.relayed.status
        if self.render_error is not None:
            return JobState.FAILED
        if self.image_id is not None:
            return JobState.SUCCEEDED
        failure = self._failure()
        if failure is not None:
            return final_state(failure)
        return JobState.QUEUED if self.job.state is JobState.QUEUED else JobState.RUNNING

    @property
    def error(self) -> ErrorDetail | None:
        if self.final is not None:
            return self.final.error
        if self.relayed is not None:
            return self.relayed.error
        if self.render_error is not None:
            return self.render_error
        failure = self._failure()
        return ErrorDetail.of(failure) if failure is not None else None

    def settle(self) -> None:
        """Once the image is stored (or the job failed): keep what its status shows, drop the
        pixels (the result, an edit's inputs and mask, the previews) that only running needed."""
        job = self.job
        spec = job.spec.without_pixels()
        ended: Future[JobResult] = Future()
        failure = self._failure()
        if failure is not None:
            ended.set_exception(failure)
        self.job = dataclasses.replace(job, spec=spec, future=ended, preview=None, listeners=[])
        self.previews.clear()
        self._encoding = None

    def _failure(self) -> errors.ServerError | None:
        future = self.job.future
        if not future.done():
            return None
        failure = future.exception()
        return failure if isinstance(failure, errors.ServerError) else None

    @property
    def preview(self) -> Preview | None:
        """The newest preview, once the engine made one."""
        return self.previews.newest()

    def snapshot(self, image_url: str, queue_position: int | None, loading_lora: str | None) -> JobStatus:
        """Its status as its clients see it now (`image_url`: where its image will be; the
        scheduler's `queue_position` and the LoRA its engine `loading_lora` for it, if any)."""
        if self.final is not None:
            return self.final.model_copy(update={"image_url": image_url if self.image_id else None})
        if self.relayed is not None:
            done = self.relayed.status is JobState.SUCCEEDED
            return self.relayed.model_copy(update={"image_url": image_url if done else None})
        job = self.job
        started = job.started_at
        status = self.status
        return JobStatus(
            id=job.id,
            status=status,
            queue_position=queue_position,
            progress=JobProgress(step=job.step, total=job.total_steps, phase=phase_of(job.spec, status, job.step)),
            request_id=job.request_id,
            created_at=self.created_at,
            started_at=self.created_at + (started - job.submitted_at) if started else None,
            finished_at=(self.created_at + (job.finished_at - job.submitted_at)
                         if job.finished_at and status.final else None),
            queue_time=round(started - job.submitted_at, 3) if started else None,
            inference_time=self.inference_time,
            preview_time=round(job.preview_time, 3) if job.spec.preview is not None else None,
            width=job.spec.layer_width if isinstance(job.spec, LayeredSpec) else job.spec.width,
            height=job.spec.height,
            seed=job.spec.seed,
            engine=job.engine,
            image_url=image_url if self.image_id else None,
            file_path=self.file_path,
            save_error=self.save_error,
            error=self.error,
            loading_lora=loading_lora,
        )

    def check_subscribers(self, most: int) -> None:
        """429 when the job already has as many subscribers as one job may (each costs a status
        and a send at every step)."""
        if len(self.subscribers) >= most:
            raise errors.RateLimited(
                f"Job {self.job.id} already has {len(self.subscribers)} clients following its events, "
                f"the most one job may have; follow it from one, or poll its status.",
                code="too_many_subscribers", retry_after=5)

    def publish(self, event: JobEvent, step: int) -> None:
        """Wake every subscriber (on the event loop)."""
        for subscriber in self.subscribers:
            if event is JobEvent.PREVIEW:
                if subscriber.preview_waiting:
                    continue  # it will read the newest preview anyway
                subscriber.preview_waiting = True
            subscriber.queue.put_nowait((event, step))

    async def encoded_preview(self, encode: Callable[[Preview], Awaitable[JobPreview]]) -> JobPreview | None:
        """The newest preview as sent, encoded once however many subscribers ask."""
        preview = self.preview
        if preview is None:
            return None
        if self._encoding is None or self._encoding[0] is not preview:
            self._encoding = (preview, asyncio.ensure_future(encode(preview)))
        # Shielded: a subscriber leaving must not cancel the encoding the others wait for.
        return await asyncio.shield(self._encoding[1])

    async def events(self, status: Callable[[], JobStatus], encode: Callable[[Preview], Awaitable[JobPreview]],
                     ) -> AsyncIterator[tuple[JobEvent, JobStatus | JobPreview]]:
        """What one subscriber hears, in order: the current state (and the newest preview), then
        queued (when its place moves), started, step, preview, and the end. `status()` is the
        job's status as the client sees it now; `encode` makes a preview's wire form."""
        subscriber = Subscriber()
        self.subscribers.add(subscriber)
        try:
            current = self.status
            first = status()
            yield JobEvent.entering(current), first
            if current.final:
                return
            if self.preview is not None and not subscriber.preview_waiting:
                subscriber.preview_waiting = True  # a newer one arriving now is sent in its place
                subscriber.queue.put_nowait((JobEvent.PREVIEW, self.preview.step))
            position = self.job.step if current is JobState.RUNNING else first.queue_position
            # The step of the last step event sent. The newest preview may be ahead of it when this
            # subscriber lags; it is then sent right after the step event it shows, never before.
            sent_step = self.job.step if current is JobState.RUNNING else 0
            deferred = False
            while True:
                event, step = await subscriber.queue.get()
                if event is JobEvent.PREVIEW:
                    if self.preview is not None and self.preview.step > sent_step:
                        deferred = True  # preview_waiting stays set: no second notice piles up
                        continue
                    subscriber.preview_waiting = False
                    preview = await self.encoded_preview(encode)
                    if preview is not None:
                        yield event, preview
                    continue
                now = status()
                if event is JobEvent.STEP:
                    now.progress.step = step  # the step this notice was for, not the latest
                    now.progress.phase = phase_of(self.job.spec, now.status, step)
                    sent_step = step
                elif event is JobEvent.STARTED and now.status is JobState.RUNNING:
                    now.progress.phase = phase_of(self.job.spec, now.status, step)  # as it started
                elif event is JobEvent.QUEUED:
                    if now.queue_position is None or now.queue_position == position:
                        continue  # the queue moved but this job's place did not
                    position = now.queue_position
                yield event, now
                if event.final:
                    return
                if deferred and self.preview is not None and self.preview.step <= sent_step:
                    deferred = subscriber.preview_waiting = False
                    preview = await self.encoded_preview(encode)
                    if preview is not None:
                        yield JobEvent.PREVIEW, preview
        finally:
            self.subscribers.discard(subscriber)


class JobRegistry:
    """Jobs by id, with TTL and a bound on finished ones (unfinished ones are bounded by the queue)."""

    def __init__(self, generation: Generation, results: ResultStore, ttl_s: float, max_finished: int,
                 max_subscribers: int = 16, store: AsyncJobStore | None = None,
                 on_end: Callable[[JobRecord], Awaitable[None]] | None = None,
                 exchange: JobExchange | None = None) -> None:
        self.generation = generation
        self.exchange = exchange  # with a store shared by several servers
        self.on_end = on_end  # told of every job's end, once its final event is out (webhooks)
        self.results = results
        self.store = store
        self.ttl_s = ttl_s
        self.max_finished = max_finished
        self.max_subscribers = max_subscribers
        self._records: OrderedDict[str, JobRecord] = OrderedDict()
        self._tasks: set[asyncio.Task[None]] = set()
        # Jobs the store kept that no server runs: after a restart, and those of lapsed servers.
        self.recovery = JobRecovery(self)

    async def start(self, prepared: Prepared[Any], base_url: str | None = None,
                    webhook_url: str | None = None) -> JobRecord:
        """Queue the request's job and follow it to its end (a stored image, or an error);
        `base_url`: the creating request's (the job's links in its webhook), `webhook_url`: where
        its end is POSTed. With a job store, the job is written there first: once this returns,
        a restart cannot lose it."""
        body = prepared.body
        assert isinstance(body, NativeImageFields), "a job's body says whether to overlay and save"
        job_id = self.generation.scheduler.new_job_id()
        if self.store is None:
            [job] = await self.generation.submit(prepared, ids=[job_id])
            return self.follow(job, body, time.time(), prepared.request_id, base_url, webhook_url)
        created_at = time.time()
        # Only what the client sent: a recovered job is validated again, and defaults written out would read as
        # choices (a ControlNet scale without a control image).
        task: StoredTask = "edit" if prepared.inputs else "generate"
        if isinstance(prepared.specs[0], LayeredSpec):
            task = "layered"
        stored = StoredJob(id=job_id, owner=prepared.caller.id, task=task,
                           body=body.model_dump_json(exclude_unset=True), request_id=prepared.request_id,
                           created_at=created_at, state=JobState.QUEUED, runs=0, base_url=base_url,
                           webhook_url=webhook_url)
        await self.store.call(self.store.store.add, stored, prepared.uploads, prepared.mask_upload)
        try:
            [job] = await self.generation.submit(prepared, ids=[job_id])
        except BaseException:
            await self.store.call(self.store.store.remove, job_id)
            raise
        return self.follow(job, body, created_at, prepared.request_id, base_url, webhook_url)

    def follow(self, job: Job, body: NativeImageFields, created_at: float, request_id: int,
                base_url: str | None, webhook_url: str | None) -> JobRecord:
        """Keep the record of a job just queued, and follow it to its end."""
        loop = asyncio.get_running_loop()
        record = JobRecord.create(job, body, loop)
        record.created_at = created_at
        record.base_url, record.webhook_url = base_url, webhook_url
        _prune(self._records, self.ttl_s, self.max_finished)
        self._records[job.id] = record
        exchange = self.exchange
        if exchange is not None:
            self._relay(record, JobEvent.QUEUED, 0)

        def on_event(job: Job, event: JobEvent) -> None:  # engine / reaper thread
            if event is JobEvent.PREVIEW:
                if job.preview is not None:
                    record.previews.offer(0, job.preview)
                    if exchange is not None:
                        loop.call_soon_threadsafe(self._relay, record, event, job.step)
            elif not event.final:  # the end is announced by _complete, once the image is stored
                loop.call_soon_threadsafe(record.publish, event, job.step)
                if event is JobEvent.STARTED:
                    loop.call_soon_threadsafe(self._tell_start, record)
                elif exchange is not None:
                    loop.call_soon_threadsafe(self._relay, record, event, job.step)

        self.generation.scheduler.add_listener(job, on_event)
        # The scheduler may have started the job before its listener was added: told now, once.
        self._tell_start(record)
        task = asyncio.create_task(self._complete(record))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        log.info("request %d: job %s queued", request_id, job.id)
        return record

    def _tell_start(self, record: JobRecord) -> None:
        """Tell the store (a start counts as a run) and the relay that the job started, once per
        start (on the event loop; a job put back in the queue and started again is told again)."""
        started = record.job.started_at
        if started is None or started == record.told_start or record.job.future.done():
            return
        record.told_start = started
        if self.store is not None:
            self.store.call(self.store.store.started, record.job.id)
        if self.exchange is not None:
            self._relay(record, JobEvent.STARTED, record.job.step)

    def _relay(self, record: JobRecord, event: JobEvent, step: int) -> None:
        """Tell the job's followers on other servers (on the event loop)."""
        assert self.exchange is not None
        if event is JobEvent.PREVIEW:
            self.exchange.publish_preview(record.job.id, lambda: record.encoded_preview(self._encoder(record)))
            return
        status = self.status(record, "")
        if event is JobEvent.STEP:
            status.progress.step = step
        self.exchange.publish(record.job.id, event, status)

    def status(self, record: JobRecord, image_url: str) -> JobStatus:
        """The job's status as its clients see it now (`image_url`: where its image will be)."""
        job = record.job
        running = record.final is None and record.relayed is None and record.status is JobState.RUNNING
        return record.snapshot(image_url, self.generation.scheduler.queue_position(job),
                               self.generation.models.loading_lora(job) if running else None)

    async def events(self, record: JobRecord, image_url: str) -> AsyncIterator[tuple[JobEvent, JobStatus | JobPreview]]:
        """What one subscriber of the job hears (see JobRecord.events), previews as sent; for a
        job another server runs, what that server relays."""
        if record.relayed is not None and self.exchange is not None:
            position: int | None = None
            async for event, data in self.exchange.follow(record.job.id, lambda: self._now_elsewhere(record)):
                if isinstance(data, JobStatus):
                    if event is JobEvent.QUEUED and position is not None and data.queue_position == position:
                        continue  # the queue moved but this job's place did not
                    position = data.queue_position if data.status is JobState.QUEUED else None
                    record.relayed = data
                    data = self.status(record, image_url)
                yield event, data
            return
        async for item in record.events(lambda: self.status(record, image_url), self._encoder(record)):
            yield item

    def _encoder(self, record: JobRecord) -> Callable[[Preview], Awaitable[JobPreview]]:
        async def encode(preview: Preview) -> JobPreview:
            rendered = await self.generation.renderer.render_preview(record.job, preview)
            return JobPreview(id=record.job.id, step=preview.step, total=preview.total, mode=preview.mode,
                              width=rendered.width, height=rendered.height, media_type=rendered.media_type,
                              b64_json=b64(rendered.data))

        return encode

    async def _now_elsewhere(self, record: JobRecord) -> JobStatus:
        """A job another server runs, as the store and its runner say now: its final status once
        it ended, else the one its runner published last."""
        assert self.store is not None and self.exchange is not None and record.relayed is not None
        stored = await self.store.call(self.store.store.get, record.job.id)
        if stored is not None and stored.status is not None:
            return JobStatus.model_validate_json(stored.status)
        return await self.exchange.latest(record.job.id) or record.relayed

    async def image(self, record: JobRecord) -> StoredImage:
        """The image of a succeeded job (409 while it is not done, or if it failed; 404 once it
        is no longer kept)."""
        stored = await self._result(record, layers=False)
        if stored is None:
            raise errors.NotFound(f"The image of job {record.job.id} is no longer kept.", param="id",
                                  code="job_expired")
        return stored

    async def layers(self, record: JobRecord) -> StoredImage:
        """The ZIP of a succeeded layered job's layers (409 while it is not done, or if it
        failed; 404 for a job of another task, or once no longer kept)."""
        stored = await self._result(record, layers=True)
        if stored is None:
            raise errors.NotFound(f"Job {record.job.id} has no layers: it is not a layered job, or its layers "
                                  "are no longer kept.", param="id", code="job_layers_not_found")
        return stored

    async def _result(self, record: JobRecord, *, layers: bool) -> StoredImage | None:
        """A succeeded job's image, or its layers' ZIP: from memory, else from the job store
        (409 while the job has not succeeded); None when neither keeps it."""
        job_id = record.job.id
        if record.image_id is None:
            what = "layers" if layers else "image"
            raise errors.JobNotReady(f"Job {job_id} is {record.status}; it has no {what}.", param="id")
        result_id = layers_id(job_id) if layers else record.image_id
        stored = self.results.get(result_id, record.owner)
        if stored is None and self.store is not None:
            data = await self.store.call(self.store.store.layers if layers else self.store.store.image, job_id)
            if data is not None:
                media_type = ZIP_MEDIA_TYPE if layers else record.final_media_type or "image/png"
                stored = StoredImage(result_id, data, media_type, created=record.created_at,
                                     expires_at=float("inf"), owner=record.owner)
        return stored

    async def get(self, job_id: str, owner: str | None = None) -> JobRecord:
        """The job `owner` (an API key's id) created: from memory, else from the job store.
        NotFound for an unknown id and another key's job alike (code `job_not_found`), and for
        a job past its TTL (code `job_expired`)."""
        _prune(self._records, self.ttl_s, self.max_finished)
        record = self._records.get(job_id)
        if record is None and self.store is not None:
            stored = await self.store.call(self.store.store.get, job_id)
            if stored is not None and stored.owner == owner:
                if stored.expired or (stored.expires_at is not None and stored.expires_at <= time.time()):
                    raise errors.NotFound(f"Job {job_id} finished more than {self.ttl_s:g} s ago; it is no "
                                          "longer kept.", param="id", code="job_expired")
                if stored.status is not None:
                    record = JobRecord.restored(stored, asyncio.get_running_loop())
                    self._records[job_id] = record
                elif self.exchange is not None:  # another server runs it (not kept: it changes)
                    latest = await self.exchange.latest(job_id)
                    record = JobRecord.elsewhere(stored, latest or _queued_status(stored), asyncio.get_running_loop())
        if record is None or record.owner != owner:
            raise errors.NotFound(f"No job {job_id!r} (unknown, or finished more than "
                                  f"{self.ttl_s:g} s ago).", param="id", code="job_not_found")
        return record

    async def cancel(self, record: JobRecord) -> bool:
        """Cancel: a queued job never runs (and is cancelled at once); a running one stops at its
        next denoising step. A job another server runs is cancelled there (its end awaited a
        moment, so that the answer shows it)."""
        if record.relayed is not None and self.exchange is not None:
            final = await self.exchange.cancel(record.job.id, CANCEL_WAIT_S)
            if final is not None:
                record.relayed = final
            log.info("job %s: cancel sent to the server running it", record.job.id)
            return True
        return self._cancel(record)

    def cancel_here(self, job_id: str) -> bool:
        """Cancel the job if this server runs it (a cancel another server relayed)."""
        record = self._records.get(job_id)
        if record is None or record.relayed is not None or record.finished_monotonic is not None:
            return False
        return self._cancel(record)

    def _cancel(self, record: JobRecord) -> bool:
        job = record.job
        if not self.generation.cancel(job):
            return False
        log.info("request %d: job %s cancelled by the client", job.request_id, job.id)
        return True

    async def _complete(self, record: JobRecord) -> None:
        """Await the scheduler's result, render and store it, then announce the end."""
        job = record.job
        generation = self.generation
        try:
            result = await generation.wait(job)
            if isinstance(job.spec, LayeredSpec):
                rendered, archive = await generation.renderer.render_stacked(job, result)
                self.results.put(archive, ZIP_MEDIA_TYPE, id=layers_id(job.id), owner=record.owner)
            else:
                rendered = await generation.renderer.render(job, result, overlay=record.add_overlay,
                                                   save_to_file=record.save_to_file)
            record.file_path = rendered.file_path
            record.save_error = rendered.save_error  # the job still succeeds: its image is stored
            record.inference_time = rendered.inference_time
            record.image_id = self.results.put(rendered.data, rendered.media_type, id=f"job-{job.id}",
                                               owner=record.owner).id
        except errors.ServerError:
            pass  # the job's own error: its status says it
        except Exception:  # rendering failed; the job must still end
            log.exception("job %s: rendering failed", job.id)
            record.render_error = ErrorDetail(message="Rendering the image failed; the server logged the details.",
                                              type=errors.InferenceFailed.type)
        record.finished_monotonic = time.monotonic()
        if self.store is not None and not _interrupted(record):
            stored_image = self.results.get(record.image_id, record.owner) if record.image_id else None
            stored_layers = self.results.get(layers_id(job.id), record.owner) if record.image_id else None
            try:
                await self.store.call(
                    self.store.store.finished, job.id, record.status,
                    self.status(record, "").model_dump_json(), time.time() + self.ttl_s,
                    stored_image.data if stored_image else None, stored_image.media_type if stored_image else None,
                    stored_layers.data if stored_layers else None)
            except Exception:  # the client still hears the end; only a restart would not know it
                log.exception("job %s: writing its end to the job store failed", job.id)
        record.settle()
        record.publish(JobEvent.entering(record.status), job.step)
        if self.exchange is not None and not _interrupted(record):
            self._relay(record, JobEvent.entering(record.status), job.step)
        if self.on_end is not None:
            await self.on_end(record)

    def unfinished_count(self) -> int:
        """Jobs followed here that have not ended (queued, running, or rendering)."""
        return len(self._tasks)

    async def settled(self) -> None:
        """Wait until every job followed here has ended and its end was stored (at shutdown)."""
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)



def layers_id(job_id: str) -> str:
    """Where a layered job's ZIP is in the result store (beside its image, `job-<id>`)."""
    return f"job-{job_id}-layers"


def phase_of(spec: GenerationSpec, state: JobState, step: int) -> JobPhase | None:
    """What a job does now: a layered job without a prompt is captioned before its first step."""
    if state is not JobState.RUNNING:
        return None
    if step == 0 and isinstance(spec, LayeredSpec) and not spec.prompt:
        return "captioning"
    return "denoising"


def _interrupted(record: JobRecord) -> bool:
    """The job ended only because the server shut down before it could run or finish: the job
    store keeps it unfinished, so the next start runs it."""
    future = record.job.future
    return future.done() and isinstance(future.exception(), errors.ShuttingDown)


def _queued_status(stored: StoredJob) -> JobStatus:
    """The status of a job another server accepted, before it told anything more."""
    return JobStatus(id=stored.id, status=JobState.QUEUED, queue_position=None, progress=JobProgress(step=0, total=0),
                     request_id=stored.request_id, created_at=stored.created_at, width=0, height=0, seed=0)


def _prune(records: OrderedDict[str, JobRecord], ttl_s: float, max_finished: int) -> None:
    """Forget finished jobs past `ttl_s`, then past `max_finished`: the owner with the most
    finished jobs loses its oldest first (a flood of one key's jobs evicts its own)."""
    now = time.monotonic()
    finished = [r for r in records.values() if r.finished_monotonic is not None]
    for record in finished:
        if now - record.finished_monotonic >= ttl_s:  # type: ignore[operator]
            del records[record.job.id]
    finished = [r for r in finished if r.job.id in records]
    excess = len(finished) - max_finished
    if excess <= 0:
        return
    held = Counter(record.owner for record in finished)
    for _ in range(excess):
        heaviest = max(held, key=held.__getitem__)
        oldest = next(r for r in finished if r.owner == heaviest and r.job.id in records)
        del records[oldest.job.id]
        held[heaviest] -= 1
