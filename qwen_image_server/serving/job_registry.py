"""The jobs API's records: each accepted async job, its result id or error, its SSE subscribers.

Lives on the event loop (only `publish` is reached from other threads, via call_soon_threadsafe).
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from qwen_image_server import errors
from qwen_image_server.engine.types import Preview
from qwen_image_server.job_state import JobEvent, JobState
from qwen_image_server.protocol.common import ErrorDetail
from qwen_image_server.protocol.native import (
    EditParameters,
    GenerateRequest,
    JobPreview,
)
from qwen_image_server.scheduler import Job


@dataclass(eq=False)
class Subscriber:
    """One SSE client of a job: its events in order, with at most one preview notice waiting
    (when it is read, the record's newest preview is sent; older unread ones are skipped)."""

    queue: asyncio.Queue[tuple[JobEvent, int]] = field(default_factory=asyncio.Queue)
    preview_waiting: bool = False


@dataclass(eq=False)
class JobRecord:
    """The API's view of one job: the scheduler job plus what the client will fetch."""

    job: Job
    body: GenerateRequest | EditParameters  # what it was asked with (add_overlay, save_to_file)
    created_at: float  # unix time
    image_id: str | None = None
    file_path: str | None = None
    inference_time: float | None = None
    error: ErrorDetail | None = None
    finished_monotonic: float | None = None
    subscribers: set[Subscriber] = field(default_factory=set)
    preview: Preview | None = None  # the newest, once the engine made one
    # The newest preview's encoding, shared by every subscriber and made once.
    _encoding: tuple[Preview, asyncio.Future[JobPreview]] | None = None

    @property
    def status(self) -> JobState:
        # Final only once the PNG is stored (or the error recorded), so GET .../image never races
        # the event: the scheduler's job is done a moment before the API's record is.
        if self.image_id is not None:
            return JobState.SUCCEEDED
        if self.error is not None:
            return JobState.CANCELLED if self.error.type == errors.JobCancelled.type else JobState.FAILED
        return JobState.QUEUED if self.job.state is JobState.QUEUED else JobState.RUNNING

    def fail(self, exc: errors.ServerError) -> None:
        self.error = ErrorDetail(message=exc.message, type=exc.type, param=exc.param, code=exc.code)

    def publish(self, event: JobEvent, step: int) -> None:
        """Wake every SSE subscriber (called on the event loop)."""
        for subscriber in self.subscribers:
            if event is JobEvent.PREVIEW:
                if subscriber.preview_waiting:
                    continue  # it will read the newest preview anyway
                subscriber.preview_waiting = True
            subscriber.queue.put_nowait((event, step))

    def new_preview(self, preview: Preview) -> None:
        """Keep the engine's newest preview and tell the subscribers (on the event loop)."""
        self.preview = preview
        self.publish(JobEvent.PREVIEW, preview.step)

    async def encoded_preview(self, encode: Callable[[Preview], Awaitable[JobPreview]]) -> JobPreview | None:
        """The newest preview as sent, encoded once however many subscribers ask."""
        preview = self.preview
        if preview is None:
            return None
        if self._encoding is None or self._encoding[0] is not preview:
            self._encoding = (preview, asyncio.ensure_future(encode(preview)))
        # Shielded: a subscriber leaving must not cancel the encoding the others wait for.
        return await asyncio.shield(self._encoding[1])


class JobRegistry:
    """Jobs by id, with TTL and a bound on finished ones (unfinished ones are bounded by the queue)."""

    def __init__(self, ttl_s: float, max_finished: int) -> None:
        self.ttl_s = ttl_s
        self.max_finished = max_finished
        self._records: OrderedDict[str, JobRecord] = OrderedDict()
        self._tasks: set[asyncio.Task[None]] = set()

    def add(self, record: JobRecord) -> None:
        self._prune()
        self._records[record.job.id] = record

    def get(self, job_id: str) -> JobRecord:
        self._prune()
        record = self._records.get(job_id)
        if record is None:
            raise errors.NotFound(f"No job {job_id!r} (unknown, or finished more than "
                                  f"{self.ttl_s:g} s ago).", param="id")
        return record

    def track(self, task: asyncio.Task[None]) -> None:
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _prune(self) -> None:
        now = time.monotonic()
        finished = [r for r in self._records.values() if r.finished_monotonic is not None]
        excess = len(finished) - self.max_finished
        for record in finished:
            if excess > 0 or now - record.finished_monotonic >= self.ttl_s:
                del self._records[record.job.id]
                excess -= 1
