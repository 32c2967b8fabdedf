"""Jobs and their books: one accepted request's record, its result, who hears about it, and how
jobs end (the counters, the recent job times, the futures, the listeners and the observer)."""

from __future__ import annotations

import logging
import threading
import uuid
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Protocol

from PIL import Image

from qwen_image_server import errors
from qwen_image_server.engine.types import GenerationSpec, Preview
from qwen_image_server.job_state import JobEvent, JobState

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class JobResult:
    image: Image.Image
    inference_time: float  # seconds of the pipeline call that made the image
    queue_wait: float
    batch_id: int
    batch_size: int
    preview_time: float = 0.0  # seconds of that call spent on this job's previews
    engine: int = 0  # the slot whose engine made the image


JobListener = Callable[["Job", JobEvent], None]


class SchedulerObserver(Protocol):
    """Scheduler-wide hooks for numbers (metrics), besides the per-job listeners.

    Called on the engine, reaper and request threads, never with the scheduler's lock held;
    they must be quick. An exception is logged and otherwise ignored.
    """

    def job_event(self, job: Job, event: JobEvent) -> None:
        """Every job's events, as `add_listener` listeners get them."""

    def batch_finished(self, batch: Sequence[Job], seconds: float) -> None:
        """A pipeline call produced the images of `batch` in `seconds` (before the jobs finish)."""

    def rejected(self, error: errors.ServerError) -> None:
        """`submit` refused a job: QueueFull or ShuttingDown."""

    def engine_restarted(self, slot: int) -> None:
        """The engine of `slot` failed and a new one is being started."""

    def engine_hung(self, slot: int) -> None:
        """A batch ran past its deadline on the engine of `slot`, which is killed (or, in this
        process, given up)."""


@dataclass(eq=False)
class Job:
    """One accepted request, from queue to result. Mutated only by the scheduler (under its lock)."""

    spec: GenerationSpec
    request_id: int
    submitted_at: float
    deadline: float
    id: str = field(default_factory=lambda: uuid.uuid4().hex)
    owner: str | None = None  # the API key's id that asked for it (None: a server without keys)
    fair_tag: float = 0.0  # its place in the owners' round-robin (see queue.BatchQueue.push)
    state: JobState = JobState.QUEUED
    started_at: float | None = None
    finished_at: float | None = None
    step: int = 0
    total_steps: int = 0
    overtaken: int = 0  # how many later jobs started before this one
    batch_id: int | None = None
    cancel_requested: bool = False
    preview: Preview | None = None  # the newest preview (previewing jobs, once one was made)
    preview_time: float = 0.0  # engine seconds spent on this job's previews so far
    engine: int | None = None  # the slot running (or that ran) the job
    crashes: int = 0  # how many engines failed while running it
    future: Future[JobResult] = field(default_factory=Future)
    listeners: list[JobListener] = field(default_factory=list)

    @property
    def done(self) -> bool:
        return self.state.final


def final_state(error: errors.ServerError) -> JobState:
    """The state a job ends in when it ends with `error`: cancelled for a cancel, else failed."""
    return JobState.CANCELLED if isinstance(error, errors.JobCancelled) else JobState.FAILED


class JobBook:
    """How jobs end and who hears it: the counters, the recent job times, each job's future and
    listeners, and the observer.

    It takes the scheduler's lock only for the state it changes; listeners and the observer are
    always called outside it (they may call back into the scheduler).
    """

    def __init__(self, lock: threading.Condition, clock: Callable[[], float],
                 observer: SchedulerObserver | None) -> None:
        self._lock = lock
        self._clock = clock
        self._observer = observer
        self.counts = dict(processed=0, failed=0, cancelled=0, rejected=0, timed_out=0, batches=0)
        self._inference_total = 0.0
        self._recent_job_times: deque[float] = deque(maxlen=32)

    # -- numbers (read and counted with the lock held) --------------------------------------

    def mean_inference_time_locked(self) -> float | None:
        """Seconds per pipeline call, over all batches."""
        batches = self.counts["batches"]
        return self._inference_total / batches if batches else None

    def mean_job_time_locked(self) -> float | None:
        """Seconds of device time per image, over the recent batches."""
        if not self._recent_job_times:
            return None
        return sum(self._recent_job_times) / len(self._recent_job_times)

    def batch_done(self, batch: Sequence[Job], seconds: float) -> None:
        """A pipeline call made the images of `batch` in `seconds`."""
        with self._lock:
            self.counts["batches"] += 1
            self._inference_total += seconds
            self._recent_job_times.append(seconds / len(batch))
        self.observe(lambda o: o.batch_finished(batch, seconds))

    # -- how jobs end -----------------------------------------------------------------------

    def finish_ok(self, job: Job, result: JobResult) -> None:
        with self._lock:
            job.state = JobState.SUCCEEDED
            job.finished_at = self._clock()
            self.counts["processed"] += 1
        log.info("request %s succeeded in batch %s (size %d): queue wait %.3fs, inference %.3fs",
                 job.request_id, result.batch_id, result.batch_size, result.queue_wait, result.inference_time)
        job.future.set_result(result)
        self.emit(job, JobEvent.SUCCEEDED)

    def finish_error(self, job: Job, error: errors.ServerError) -> None:
        """End `job` with `error` (nothing happens to a job that already ended)."""
        state = final_state(error)
        with self._lock:
            if job.done:
                return
            job.state = state
            job.finished_at = self._clock()
            self.counts["cancelled" if state is JobState.CANCELLED else "failed"] += 1
        log.info("request %s %s: %s", job.request_id, state.value, error.message)
        job.future.set_exception(error)
        self.emit(job, JobEvent.entering(state))

    # -- who hears it -----------------------------------------------------------------------

    def add_listener(self, job: Job, listener: JobListener) -> None:
        with self._lock:
            job.listeners.append(listener)

    def remove_listener(self, job: Job, listener: JobListener) -> None:
        with self._lock:
            if listener in job.listeners:
                job.listeners.remove(listener)

    def emit(self, job: Job, event: JobEvent) -> None:
        for listener in list(job.listeners):
            try:
                listener(job, event)
            except Exception:  # a broken listener must not break the engine
                log.exception("job listener failed on %s", event)
        self.observe(lambda o: o.job_event(job, event))

    def announce(self, waiting: Sequence[Job]) -> None:
        """Tell the listeners of waiting jobs that the queue moved ("queued", a new position)."""
        for job in waiting:
            self.emit(job, JobEvent.QUEUED)

    def observe(self, call: Callable[[SchedulerObserver], None]) -> None:
        if self._observer is None:
            return
        try:
            call(self._observer)
        except Exception:  # numbers must never break the engine
            log.exception("scheduler observer failed")
