"""What the engine slots ask of the queue: the next batch for an idle slot (waiting a moment to
fill it when `batch_wait_s` allows), running it there under a deadline, and where its jobs go
when the engine fails under it or hangs past the deadline."""

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
from qwen_image_server.scheduler.slots import EngineSlot, RestartPolicy, SlotState, kill, killable
from qwen_image_server.scheduler.watchdog import BatchHung, WatchdogConfig

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
                 announce: Callable[[], None], watchdog: WatchdogConfig | None = None) -> None:
        self._lock = lock
        self._queue = queue
        self._book = book
        self._runner = runner
        self._state = state
        self._clock = clock
        self._restart = restart  # None: a failed device ends the scheduler (`die`)
        self._die = die
        self._announce = announce  # tell waiting jobs that the queue moved
        self._watchdog = watchdog  # None: batches run without a deadline
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
                now = self._clock()
                queue.start(batch, slot.index, next(self._batch_ids), now)
                slot.running = list(batch)
                slot.state = SlotState.BUSY
                if self._watchdog is not None:
                    names = {name for job in batch for name, _ in job.spec.loras}
                    slot.watch = self._watchdog.watch([job.spec for job in batch], now, slot.rate, warm=slot.warm,
                                                      new_loras=not names <= slot.loras_run)
                state.running.extend(batch)
                self._lock.notify_all()
                break
        self._announce()
        return batch

    def execute(self, slot: EngineSlot, engine: Engine, batch: list[Job]) -> bool:
        """Run one batch on the slot's engine; False when the engine failed (the batch is retried
        elsewhere or failed, see `_engine_failed`)."""
        watch = slot.watch
        log.info(
            "batch %s started on engine %d: size %d, requests %s, %dx%d, %d steps, queue wait %s, deadline %s",
            batch[0].batch_id, slot.index, len(batch), [j.request_id for j in batch], batch[0].spec.width,
            batch[0].spec.height, batch[0].spec.num_inference_steps,
            [round((j.started_at or 0.0) - j.submitted_at, 3) for j in batch],
            "none" if watch is None else f"{watch.allowance_s:.1f}s",
        )
        for job in batch:
            self._book.emit(job, JobEvent.STARTED)
        try:
            self._runner.run(engine, batch, paced=lambda rate: self._paced(slot, rate))
        except DeviceFailure as exc:
            if self._restart is None:
                self._die(exc, errors.EngineDead("The device failed; the worker is restarting."), batch)
            else:
                self._engine_failed(slot, batch, exc)
            return False
        finally:
            with self._lock:
                if any(job.state is JobState.SUCCEEDED for job in batch):
                    slot.loras_run.update(name for job in batch for name, _ in job.spec.loras)
                slot.warm = slot.rate is not None
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
        slot.watch = None

    def _paced(self, slot: EngineSlot, rate: float) -> None:
        """A step of the slot's batch ran at `rate` (seconds per step per megapixel): the slot's
        slowest so far moves the running batch's deadline."""
        with self._lock:
            if slot.rate is not None and rate <= slot.rate:
                return
            slot.rate = rate
            watch = slot.watch
            if watch is not None and not watch.hung:
                before = watch.deadline
                watch.pace(rate)
                if watch.deadline < before:  # the deadline thread waits for the old one
                    self._lock.notify_all()

    # -- the watchdog ------------------------------------------------------------------------

    def overdue_locked(self, slots: Sequence[EngineSlot], now: float) -> list[EngineSlot]:
        """The slots whose batch ran past its deadline, each marked hung (so returned once)."""
        overdue = [slot for slot in slots
                   if slot.watch is not None and not slot.watch.hung and slot.watch.deadline <= now]
        for slot in overdue:
            assert slot.watch is not None
            slot.watch.hung = slot.hung = True
            if self._restartable(slot):
                # Its engine is killed: from now on the slot runs nothing more on it, should the
                # batch end after all before the kill.
                slot.lost = True
        return overdue

    def _restartable(self, slot: EngineSlot) -> bool:
        return self._restart is not None and slot.engine is not None and killable(slot.engine)

    @staticmethod
    def next_deadline_locked(slots: Sequence[EngineSlot]) -> float | None:
        """The nearest deadline of a running batch not yet found hung."""
        return min((slot.watch.deadline for slot in slots if slot.watch is not None and not slot.watch.hung),
                   default=None)

    def engine_hung(self, slot: EngineSlot) -> None:
        """The slot's batch ran past its deadline (`overdue_locked` marked it). An engine process
        is killed: its batch then fails as under any engine that died (`_engine_failed`: retried
        once, alone, on a fresh engine) and the slot restarts it. An engine in this process cannot
        be stopped: its batch fails, and the scheduler is dead (`on_fatal` hands the process to its
        manager for a fresh one)."""
        with self._lock:
            engine, batch, watch = slot.engine, list(slot.running), slot.watch
            ended = watch is None or not watch.hung  # the batch ended after all, just now
            restartable = self._restartable(slot)
            if not restartable:
                if ended:
                    slot.hung = False  # nothing is lost: the engine goes on
                    return
                for job in batch:
                    job.cancel_requested = True  # should the call ever return, it stops at a step
                self._release(slot)
                slot.state = SlotState.FAILED
                self._lock.notify_all()
        if ended or watch is None:
            # An engine process is killed all the same: the slot has let go of it.
            log.warning("engine %d finished its batch just as its deadline passed; restarting it", slot.index)
        else:
            log.error("batch %s (requests %s) ran past its %.1f s deadline on engine %d; the engine is hung",
                      batch[0].batch_id, [j.request_id for j in batch], watch.allowance_s, slot.index)
            self._book.observe(lambda o: o.engine_hung(slot.index))
        if restartable:
            assert engine is not None
            kill(engine)
            return
        assert watch is not None
        allowance = watch.allowance_s
        self._die(BatchHung(f"batch {batch[0].batch_id} ran past its {allowance:.1f} s deadline on engine "
                            f"{slot.index}, which cannot be stopped in this process"),
                  errors.EngineDead(f"The engine did not finish this image within {allowance:.1f} s and cannot "
                                    "be stopped in this process; the server is restarting.",
                                    code=errors.ENGINE_TIMEOUT),
                  batch)

    def _engine_failed(self, slot: EngineSlot, batch: list[Job], exc: BaseException) -> None:
        """The slot's engine died running `batch`: its unfinished jobs go back to the head of the
        queue, each to run alone, except the ones that already had an engine fail under them."""
        batch_id, requests = batch[0].batch_id, [j.request_id for j in batch]
        again: list[Job] = []
        doomed: list[Job] = []
        state = self._state
        with self._lock:
            hung, watch = slot.hung, slot.watch
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
        if hung and watch is not None:
            log.error("engine %d was killed, hung on batch %s (requests %s)", slot.index, batch_id, requests)
            failure: errors.ServerError = errors.EngineTimeout(
                f"The engine failed twice while generating this image, the last time hanging past its "
                f"{watch.allowance_s:.1f} s deadline; the server restarted it and is still serving.")
        else:
            log.error("engine %d failed running batch %s (requests %s): %s", slot.index, batch_id, requests, exc)
            failure = errors.InferenceFailed(
                "The engine failed twice while generating this image; the server is still serving.")
        for job in doomed:
            if job.cancel_requested or state.stopping:
                self._book.finish_error(job, self._runner.cancel_error())
            else:
                self._book.finish_error(job, failure)
        for job in again:
            self._book.emit(job, JobEvent.QUEUED)
        self._announce()
