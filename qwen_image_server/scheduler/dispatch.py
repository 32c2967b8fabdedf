"""What the engine slots ask of the queue: the next batch for an idle slot (waiting a moment to
fill it when `batch_wait_s` allows), running it there, and where its jobs go when the engine
fails under it."""

from __future__ import annotations

import itertools
import logging
import math
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from qwen_image_server import errors
from qwen_image_server.engine.contract import Engine
from qwen_image_server.engine.types import DeviceFailure
from qwen_image_server.job_state import JobEvent, JobState
from qwen_image_server.scheduler.execute import BatchRunner
from qwen_image_server.scheduler.jobs import Job, JobBook
from qwen_image_server.scheduler.queue import BatchQueue
from qwen_image_server.scheduler.slots import EngineSlot, RestartPolicy, SlotState

log = logging.getLogger(__name__)


@dataclass
class RunState:
    """One scheduler's state that every part reads and changes under its lock."""

    draining: bool = False  # new jobs are refused; queued and running ones carry on
    stopping: bool = False  # stop() was called: nothing new starts, running batches end at a step
    dead: BaseException | None = None  # no engine can serve any more
    running: list[Job] = field(default_factory=list)  # the jobs of every slot's running batch

    @property
    def ended(self) -> bool:
        return self.stopping or self.dead is not None


class Dispatcher:
    """Feeds the slots from the queue and runs their batches; the scheduler lends it its lock."""

    def __init__(self, lock: threading.Condition, queue: BatchQueue, book: JobBook, runner: BatchRunner,
                 state: RunState, clock: Callable[[], float], restart: RestartPolicy | None, *,
                 die: Callable[[BaseException, errors.ServerError, Sequence[Job]], None],
                 announce: Callable[[], None]) -> None:
        self._lock = lock
        self._queue = queue
        self._book = book
        self._runner = runner
        self._state = state
        self._clock = clock
        self._restart = restart  # None: a failed device ends the scheduler (`die`)
        self._die = die
        self._announce = announce  # tell waiting jobs that the queue moved
        self._batch_ids = itertools.count(1)

    def take_batch(self, slot: EngineSlot) -> list[Job] | None:
        """The slot's next batch, started on it (None when the slot should stop). A batch that
        is not full may wait up to `batch_wait_s` for compatible jobs, unless draining."""
        gather_head: Job | None = None
        gather_until = 0.0
        state, queue, wait = self._state, self._queue, self._queue.config.batch_wait_s
        with self._lock:
            while True:
                if state.ended or slot.lost:
                    return None
                batch = queue.next_batch()
                if not batch:
                    self._lock.wait()
                    continue
                if not queue.full(batch) and wait > 0 and not state.draining:
                    if gather_head is not batch[0]:
                        gather_head, gather_until = batch[0], self._clock() + wait
                    remaining = gather_until - self._clock()
                    if remaining > 0:
                        self._lock.wait(remaining)
                        continue
                queue.start(batch, slot.index, next(self._batch_ids), self._clock())
                slot.running = list(batch)
                slot.state = SlotState.BUSY
                state.running.extend(batch)
                self._lock.notify_all()
                break
        self._announce()
        return batch

    def execute(self, slot: EngineSlot, engine: Engine, batch: list[Job]) -> bool:
        """Run one batch on the slot's engine; False when the engine failed (the batch is retried
        elsewhere or failed, see `_engine_failed`)."""
        log.info(
            "batch %s started on engine %d: size %d, requests %s, %dx%d, %d steps, queue wait %s",
            batch[0].batch_id, slot.index, len(batch), [j.request_id for j in batch], batch[0].spec.width,
            batch[0].spec.height, batch[0].spec.num_inference_steps,
            [round((j.started_at or 0.0) - j.submitted_at, 3) for j in batch],
        )
        for job in batch:
            self._book.emit(job, JobEvent.STARTED)
        try:
            self._runner.run(engine, batch)
        except DeviceFailure as exc:
            if self._restart is None:
                self._die(exc, errors.EngineDead("The device failed; the worker is restarting."), batch)
            else:
                self._engine_failed(slot, batch, exc)
            return False
        finally:
            with self._lock:
                self._release(slot)
                slot.batches += 1
                if slot.state is SlotState.BUSY:
                    slot.state = SlotState.IDLE
                self._lock.notify_all()
        return True

    def _release(self, slot: EngineSlot) -> None:
        """The slot's batch no longer runs (with the lock held)."""
        for job in slot.running:
            self._state.running.remove(job)
        slot.running = []

    def _engine_failed(self, slot: EngineSlot, batch: list[Job], exc: BaseException) -> None:
        """The slot's engine died running `batch`: its unfinished jobs go back to the head of the
        queue, each to run alone, except the ones that already had an engine fail under them."""
        log.error("engine %d failed running batch %s (requests %s): %s", slot.index, batch[0].batch_id,
                  [j.request_id for j in batch], exc)
        again: list[Job] = []
        doomed: list[Job] = []
        state = self._state
        with self._lock:
            self._release(slot)
            for job in batch:
                if job.done:
                    continue
                if job.cancel_requested or state.stopping:
                    doomed.append(job)
                    continue
                job.crashes += 1
                if job.crashes > 1:
                    doomed.append(job)
                    continue
                job.state, job.started_at, job.batch_id, job.step = JobState.QUEUED, None, None, 0
                job.deadline = math.inf  # it was on time; its retry must not be reaped
                again.append(job)
            self._queue.push_front(again)
            self._lock.notify_all()
        for job in doomed:
            if job.cancel_requested or state.stopping:
                self._book.finish_error(job, self._runner.cancel_error())
            else:
                self._book.finish_error(job, errors.InferenceFailed(
                    "The engine failed twice while generating this image; the server is still serving."))
        for job in again:
            self._book.emit(job, JobEvent.QUEUED)
        self._announce()
