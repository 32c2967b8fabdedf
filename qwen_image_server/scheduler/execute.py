"""One batch on one engine: its step events, cancelling it at a step, an out-of-memory retry one
job at a time, and how each kind of failure ends its jobs.

* Every job of the batch ends here (an image, or an error) unless the device fails: a
  `DeviceFailure` propagates, and the slot that ran the batch decides (retry elsewhere, or die).
* Out of memory: the memory is freed and the jobs retried one by one; a job that runs out of
  memory alone gets `OutOfMemory` (503 with Retry-After).
* A `ServerError` from the engine (e.g. a LoRA that cannot load) is the batch's answer; any other
  exception fails the batch with `InferenceFailed`, and the server keeps serving.
* The batch stops at the next step when every job in it was cancelled, or the scheduler stops
  (`BatchAborted`, raised from the step callback, so the VAE decode is skipped too).
* The time between step events is measured and reported (`paced`): the watchdog's batch
  deadlines come from it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from qwen_image_server import errors
from qwen_image_server.engine.contract import Engine
from qwen_image_server.engine.types import (
    BatchAborted,
    DeviceFailure,
    DeviceOutOfMemory,
    StepEvent,
)
from qwen_image_server.job_state import JobEvent
from qwen_image_server.scheduler.jobs import Job, JobBook, JobResult
from qwen_image_server.scheduler.watchdog import StepTimer

log = logging.getLogger(__name__)


class BatchRunner:
    """Runs batches and ends their jobs through the book. Holds no lock of its own."""

    def __init__(self, book: JobBook, *, stopping: Callable[[], bool], retry_after: Callable[[], int],
                 clock: Callable[[], float]) -> None:
        self._book = book
        self._stopping = stopping  # the scheduler is stopping: running batches end at a step
        self._retry_after = retry_after  # for OutOfMemory's Retry-After
        self._clock = clock

    def run(self, engine: Engine, batch: list[Job], paced: Callable[[float], None] | None = None) -> None:
        """Run `batch`, retrying it one job at a time if the device runs out of memory. `paced`
        hears how fast its steps run (seconds per step per megapixel), step by step."""
        # Memory is freed and jobs retried only after leaving each `except` block: while it runs,
        # the exception's traceback holds the failed call's frames and their device tensors, so
        # freeing there would free nothing.
        if not self._ran_out_of_memory(engine, batch, paced):
            return
        engine.free_memory()
        if len(batch) == 1:
            self._fail_oom(batch[0])
            return
        log.warning("batch %s ran out of memory; retrying its %d jobs one by one",
                    batch[0].batch_id, len(batch))
        for job in batch:
            if job.cancel_requested:
                self._book.finish_error(job, errors.JobCancelled("The job was cancelled."))
                continue
            if self._ran_out_of_memory(engine, [job], paced):
                engine.free_memory()
                self._fail_oom(job)

    def cancel_error(self) -> errors.ServerError:
        """What a job cut short gets: the server is stopping, or its client cancelled it."""
        if self._stopping():
            return errors.ShuttingDown("The server shut down before this job finished.")
        return errors.JobCancelled("The job was cancelled.")

    def _ran_out_of_memory(self, engine: Engine, batch: list[Job], paced: Callable[[float], None] | None) -> bool:
        """Run `batch` once; True when the device ran out of memory (its jobs are not finished)."""
        try:
            self._run_once(engine, batch, paced)
        except DeviceOutOfMemory:
            return True
        return False

    def _run_once(self, engine: Engine, batch: list[Job], paced: Callable[[float], None] | None) -> None:
        """One pipeline call for `batch`; completes every job in it unless the device fails."""
        book = self._book
        timer = StepTimer([job.spec for job in batch], self._clock)

        def on_step(event: StepEvent) -> None:
            rate = timer.step(event.step)
            if rate is not None and paced is not None:
                paced(rate)
            for index, job in enumerate(batch):
                job.step, job.total_steps = event.step, event.total
                book.emit(job, JobEvent.STEP)
                preview = event.previews.get(index)
                if preview is not None:
                    job.preview = preview
                    job.preview_time += preview.seconds
                    book.emit(job, JobEvent.PREVIEW)
            if self._stopping() or all(job.cancel_requested for job in batch):
                raise BatchAborted

        start = self._clock()
        try:
            images = engine.run_batch([job.spec for job in batch], on_step)
        except BatchAborted:
            log.info("batch %s aborted at a step boundary: every job was cancelled", batch[0].batch_id)
            for job in batch:
                book.finish_error(job, self.cancel_error())
            return
        except (DeviceOutOfMemory, DeviceFailure):
            raise
        except errors.ServerError as exc:  # the engine refused the batch's request (e.g. a broken LoRA)
            for job in batch:
                book.finish_error(job, exc)
            return
        except Exception:  # isolate the failure to this batch
            log.exception("batch %s failed (requests %s)", batch[0].batch_id, [j.request_id for j in batch])
            for job in batch:
                book.finish_error(job, errors.InferenceFailed(
                    "Image generation failed; the server logged the details and is still serving."))
            return
        elapsed = self._clock() - start
        book.batch_done(batch, elapsed)
        for job, image in zip(batch, images, strict=True):
            if job.cancel_requested:
                book.finish_error(job, self.cancel_error())
                continue
            book.finish_ok(job, JobResult(
                image=image,
                inference_time=elapsed,
                queue_wait=(job.started_at or start) - job.submitted_at,
                batch_id=job.batch_id or 0,
                batch_size=len(batch),
                preview_time=job.preview_time,
                engine=job.engine or 0,
            ))

    def _fail_oom(self, job: Job) -> None:
        self._book.finish_error(job, errors.OutOfMemory(
            f"Out of device memory for one {job.spec.width}x{job.spec.height} image; "
            "try a smaller aspect ratio.", retry_after=self._retry_after()))
