"""The scheduler: a bounded queue in front of the engines, one thread per engine slot.

Request handlers call `submit()` and await the job's future; they never touch the model. Each
engine slot's thread loads its engine (in this process, or a proxy to an engine process), then
takes the next batch whenever it is idle and runs it. One queue feeds every slot, so the rules
below hold across engines:

* **Batching.** The oldest waiting job (the head) always runs in the next batch. Jobs behind it
  with the same shape (`GenerationSpec.batch_key`) are pulled forward into that batch, up to
  `max_batch_size` jobs and `max_batch_pixels` pixels. If the batch is not full, the worker may
  wait up to `batch_wait_s` for more compatible jobs.
* **Fairness bound.** Because the head always runs next, a job with `p` jobs ahead of it starts in
  one of the next `p + 1` batches: never later, counted in batches, than strict FIFO.
* **Cancellation.** A queued job leaves the queue at once and never runs. A running batch stops
  at the next step boundary when every job in it is cancelled (raising from the step callback,
  so the VAE decode is skipped too).
* **Deadlines.** A job still queued after `queue_timeout_s` fails with `QueueTimeout` (504).
* **Failure isolation.** An exception fails only its batch. Out of memory: free, retry the jobs
  one by one, then `OutOfMemory`. A device failure marks the engine dead and calls `on_fatal`,
  unless the slots are restartable (`RestartPolicy`, engine processes): then the slot's batch goes
  back to the head of the queue, each job to run alone on the next idle engine; a job whose
  engine fails a second time fails with `InferenceFailed` (500). The slot restarts its engine
  with backoff; the scheduler is dead only when no slot can be restarted.
"""

from __future__ import annotations

import itertools
import logging
import math
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from enum import Enum
from typing import TYPE_CHECKING, Protocol

from PIL import Image

from qwen_image_server import errors
from qwen_image_server.engine.contract import Engine, Supervised, settings_batch_limits
from qwen_image_server.engine.types import (
    BatchAborted,
    DeviceFailure,
    DeviceOutOfMemory,
    GenerationSpec,
    Preview,
    StepEvent,
)
from qwen_image_server.job_state import JobEvent, JobState

if TYPE_CHECKING:
    from qwen_image_server.config.settings import Settings

log = logging.getLogger(__name__)

@dataclass(frozen=True, slots=True)
class RestartPolicy:
    """How slots whose engine failed come back: after `backoff_s`, doubled for each failure in a
    row (up to `max_backoff_s`); a slot whose engine failed to load `attempts` times in a row is
    given up."""

    backoff_s: float = 1.0
    max_backoff_s: float = 60.0
    attempts: int = 5

    def delay(self, streak: int) -> float:
        return min(self.max_backoff_s, self.backoff_s * 2 ** max(0, streak - 1))


class SlotState(str, Enum):
    LOADING = "loading"
    IDLE = "idle"
    BUSY = "busy"
    RESTARTING = "restarting"
    FAILED = "failed"  # given up: its engine could not be restarted
    STOPPED = "stopped"


@dataclass(eq=False)
class EngineSlot:
    """One engine and the thread that feeds it. Mutated only under the scheduler's lock."""

    index: int
    factory: Callable[[], Engine]
    engine: Engine | None = None
    state: SlotState = SlotState.LOADING
    running: list[Job] = field(default_factory=list)
    batches: int = 0
    restarts: int = 0
    lost: bool = False  # its engine process ended while the slot was idle
    thread: threading.Thread | None = None


@dataclass(frozen=True, slots=True)
class SlotStats:
    index: int
    state: str
    gpu: int | None  # the GPU its engine runs on (None on the CPU or in this process)
    pid: int | None  # the engine's process, when it has its own
    running_batch_size: int
    batches: int
    restarts: int
    memory: dict[str, float] | None = None  # GPU memory an engine process reported last


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


@dataclass(eq=False)
class Job:
    """One accepted request, from queue to result. Mutated only by the scheduler (under its lock)."""

    spec: GenerationSpec
    request_id: int
    submitted_at: float
    deadline: float
    id: str = field(default_factory=lambda: uuid.uuid4().hex)
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


@dataclass(frozen=True, slots=True)
class SchedulerConfig:
    max_queue: int = 32
    max_batch_size: int = 4
    max_batch_pixels: int = 4 * 512 * 512
    batch_wait_s: float = 0.0
    queue_timeout_s: float = 600.0

    @classmethod
    def from_settings(cls, settings: Settings, device_type: str) -> SchedulerConfig:
        """The settings' queue and batch limits on a device (unset ones: the device's defaults)."""
        limits = settings_batch_limits(settings, device_type)
        return cls(
            max_queue=settings.max_queue,
            max_batch_size=limits.max_batch_size,
            max_batch_pixels=limits.max_batch_pixels,
            batch_wait_s=limits.batch_wait_s,
            queue_timeout_s=settings.queue_timeout_s,
        )


@dataclass(frozen=True, slots=True)
class SchedulerStats:
    queue_length: int
    running_batch_size: int
    processed: int
    failed: int
    cancelled: int
    rejected: int
    timed_out: int
    batches: int
    mean_inference_time: float | None  # seconds per pipeline call, over all batches
    mean_job_time: float | None  # seconds of device time per image, recent batches
    engines: tuple[SlotStats, ...] = ()


class Scheduler:
    """Bounded queue + one thread per engine slot; each thread loads and owns its engine."""

    def __init__(
        self,
        engine_factory: Callable[[], Engine] | Sequence[Callable[[], Engine]],
        config: SchedulerConfig,
        *,
        on_fatal: Callable[[BaseException], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
        observer: SchedulerObserver | None = None,
        id_prefix: str = "",
        restart: RestartPolicy | None = None,
    ) -> None:
        factories = [engine_factory] if callable(engine_factory) else list(engine_factory)
        if not factories:
            raise ValueError("a scheduler needs at least one engine")
        self._id_prefix = id_prefix  # starts every job id: the replica's name when scaled out
        self.config = config
        self._on_fatal = on_fatal
        self._observer = observer
        self._clock = clock
        self._restart = restart
        self._cond = threading.Condition()
        self._queue: deque[Job] = deque()
        self._running: list[Job] = []  # the jobs of every slot's running batch
        self._slots = [EngineSlot(i, factory) for i, factory in enumerate(factories)]
        self._draining = False
        self._stopping = False
        self._dead: BaseException | None = None
        self._batch_ids = itertools.count(1)
        self._recent_job_times: deque[float] = deque(maxlen=32)
        self._counts = dict(processed=0, failed=0, cancelled=0, rejected=0, timed_out=0, batches=0)
        self._inference_total = 0.0
        for slot in self._slots:
            name = "qwen-image-engine" if len(self._slots) == 1 else f"qwen-image-engine-{slot.index}"
            slot.thread = threading.Thread(target=self._serve_slot, args=(slot,), name=name, daemon=True)
        self._reaper = threading.Thread(target=self._reap, name="qwen-image-deadlines", daemon=True)

    # -- lifecycle --------------------------------------------------------------------------

    def start(self) -> None:
        """Start the slots (each loads its engine first) and the deadline reaper."""
        for slot in self._slots:
            assert slot.thread is not None
            slot.thread.start()
        self._reaper.start()

    @property
    def loaded(self) -> bool:
        """At least one engine is loaded."""
        return self.engine is not None

    @property
    def engine(self) -> Engine | None:
        """The first loaded engine (what the API reads the models' facts from)."""
        return next((slot.engine for slot in self._slots if slot.engine is not None), None)

    def engine_at(self, slot: int) -> Engine | None:
        """The engine of slot `slot` (None while it loads or restarts)."""
        return self._slots[slot].engine if 0 <= slot < len(self._slots) else None

    @property
    def engines(self) -> list[Engine]:
        """Every loaded engine, by slot."""
        return [slot.engine for slot in self._slots if slot.engine is not None]

    @property
    def engine_count(self) -> int:
        return len(self._slots)

    @property
    def dead(self) -> bool:
        return self._dead is not None

    @property
    def draining(self) -> bool:
        return self._draining

    @property
    def serving(self) -> bool:
        """At least one engine is loaded and running or ready to run batches."""
        return any(slot.state in (SlotState.IDLE, SlotState.BUSY) for slot in self._slots)

    @property
    def ready(self) -> bool:
        """An engine serves, nothing is dead, and new work is taken."""
        return self.serving and not self.dead and not self._draining

    def begin_drain(self) -> None:
        """Refuse new jobs from now on; queued and running ones carry on."""
        with self._cond:
            self._draining = True
            self._cond.notify_all()

    def wait_idle(self, timeout: float | None = None) -> bool:
        """Block until nothing is queued or running (or timeout). True when idle."""
        with self._cond:
            return self._cond.wait_for(lambda: not self._queue and not self._running, timeout)

    def shutdown(self, timeout: float) -> bool:
        """Drain for up to `timeout` seconds, then fail what is left and stop the threads."""
        self.begin_drain()
        drained = self.wait_idle(timeout)
        self.stop()
        self.join(max(timeout, 5.0))
        return drained

    def stop(self) -> None:
        """Stop now without blocking: fail queued jobs, stop the running batches at their next step."""
        with self._cond:
            self._stopping = True
            leftovers = list(self._queue)
            self._queue.clear()
            for job in self._running:
                job.cancel_requested = True  # stop the batch at its next step
            self._cond.notify_all()
        for job in leftovers:
            self._finish_error(job, errors.ShuttingDown("The server shut down before this job could run."))

    def join(self, timeout: float) -> None:
        """Wait for the slot and reaper threads to end (after stop() or a fatal error); each slot
        closes its engine (an engine process exits) as its thread ends."""
        for thread in (*(slot.thread for slot in self._slots), self._reaper):
            if thread is not None and thread.is_alive():
                thread.join(timeout)

    # -- submitting and cancelling ----------------------------------------------------------

    def submit(self, spec: GenerationSpec, request_id: int) -> Job:
        """Queue a job or raise QueueFull / ShuttingDown / EngineDead. Never blocks."""
        return self.submit_many([spec], request_id)[0]

    def submit_many(self, specs: Sequence[GenerationSpec], request_id: int) -> list[Job]:
        """Queue all of `specs` at once, or none (QueueFull unless all fit). Never blocks.

        Being queued in one step, jobs of one request that share a shape (OpenAI's n images)
        always run as one batch, even when the engine was idle.
        """
        try:
            jobs = self._enqueue(specs, request_id)
        except (errors.QueueFull, errors.ShuttingDown) as exc:
            refusal = exc  # `exc` itself is unbound when the except block ends
            self._observe(lambda o: o.rejected(refusal))
            raise
        for job in jobs:
            self._emit(job, JobEvent.QUEUED)
        return jobs

    def _enqueue(self, specs: Sequence[GenerationSpec], request_id: int) -> list[Job]:
        now = self._clock()
        with self._cond:
            if self._dead is not None:
                raise errors.EngineDead("The model engine failed and the worker is restarting.")
            if self._draining or self._stopping:
                self._counts["rejected"] += 1
                raise errors.ShuttingDown("The server is shutting down and takes no new jobs.")
            if len(specs) > self.config.max_queue:
                # Waiting cannot help: even an empty queue holds fewer images than this asks for.
                self._counts["rejected"] += 1
                raise errors.InvalidRequest(
                    f"This request asks for {len(specs)} images; this server queues at most "
                    f"{self.config.max_queue} at a time (QWEN_IMAGE_MAX_QUEUE).", param="n")
            if len(self._queue) + len(specs) > self.config.max_queue:
                self._counts["rejected"] += 1
                retry = self._retry_after_locked()
                raise errors.QueueFull(
                    f"The queue is full ({len(self._queue)} of {self.config.max_queue} places taken); "
                    f"retry in {retry} s.",
                    retry_after=retry,
                )
            jobs = [
                Job(
                    spec=spec,
                    request_id=request_id,
                    submitted_at=now,
                    deadline=now + self.config.queue_timeout_s,
                    total_steps=spec.num_inference_steps,
                    id=f"{self._id_prefix}{uuid.uuid4().hex}",
                )
                for spec in specs
            ]
            for job in jobs:
                # A running future cannot be cancelled by whoever awaits it, so only the
                # scheduler ever completes it.
                job.future.set_running_or_notify_cancel()
                self._queue.append(job)
            self._cond.notify_all()
        return jobs

    def cancel(self, job: Job) -> bool:
        """Cancel a job: a queued one never runs, a running one stops with its batch. True if it took."""
        with self._cond:
            if job.state is JobState.QUEUED and job in self._queue:
                self._queue.remove(job)
                self._cond.notify_all()
            elif job.state is JobState.RUNNING:
                job.cancel_requested = True
                return True
            else:
                return False
        self._finish_error(job, errors.JobCancelled("The job was cancelled."))
        self._announce_positions()
        return True

    def queue_position(self, job: Job) -> int | None:
        """0 for the next job to start; None when the job is no longer waiting."""
        with self._cond:
            try:
                return self._queue.index(job)
            except ValueError:
                return None

    def add_listener(self, job: Job, listener: JobListener) -> None:
        """Call listener(job, event) on queued/started/step/succeeded/failed/cancelled (any thread)."""
        with self._cond:
            job.listeners.append(listener)

    def remove_listener(self, job: Job, listener: JobListener) -> None:
        with self._cond:
            if listener in job.listeners:
                job.listeners.remove(listener)

    # -- numbers ----------------------------------------------------------------------------

    def stats(self) -> SchedulerStats:
        with self._cond:
            c = self._counts
            return SchedulerStats(
                queue_length=len(self._queue),
                running_batch_size=len(self._running),
                processed=c["processed"],
                failed=c["failed"],
                cancelled=c["cancelled"],
                rejected=c["rejected"],
                timed_out=c["timed_out"],
                batches=c["batches"],
                mean_inference_time=(self._inference_total / c["batches"]) if c["batches"] else None,
                mean_job_time=self._mean_job_time_locked(),
                engines=tuple(self._slot_stats_locked(slot) for slot in self._slots),
            )

    def _slot_stats_locked(self, slot: EngineSlot) -> SlotStats:
        return SlotStats(index=slot.index, state=slot.state.value,
                         gpu=getattr(slot.engine, "gpu", None), pid=getattr(slot.engine, "pid", None),
                         running_batch_size=len(slot.running), batches=slot.batches,
                         restarts=slot.restarts, memory=getattr(slot.engine, "memory", None))

    def retry_after(self) -> int:
        """Seconds until a slot is likely free, from recent job times and the work ahead."""
        with self._cond:
            return self._retry_after_locked()

    def _mean_job_time_locked(self) -> float | None:
        if not self._recent_job_times:
            return None
        return sum(self._recent_job_times) / len(self._recent_job_times)

    def _retry_after_locked(self) -> int:
        per_job = self._mean_job_time_locked() or 1.0
        ahead = len(self._queue) + len(self._running)
        # A slot frees when the next batch starts: about the running batch plus one batch worth.
        ahead = min(ahead, len(self._running) + self.config.max_batch_size) or 1
        return max(1, math.ceil(per_job * ahead))

    # -- engine slots ---------------------------------------------------------------------

    def _serve_slot(self, slot: EngineSlot) -> None:
        """Load the slot's engine and run batches on it; with a restart policy, start a new
        engine whenever it fails, until the scheduler stops or the slot is given up."""
        streak = 0  # failures in a row: loads that failed, engines lost before finishing a batch
        try:
            while True:
                try:
                    engine = slot.factory()
                except BaseException as exc:  # noqa: BLE001 - any load failure ends this engine
                    if self._restart is None or slot.restarts == 0:
                        # A model that cannot load at all needs a person, not a restart loop.
                        self._die(exc, errors.EngineDead("The model failed to load."))
                        return
                    streak += 1
                    log.error("engine %d failed to load again (%d in a row): %s", slot.index, streak, exc)
                    if streak >= self._restart.attempts:
                        self._give_up(slot, exc)
                        return
                    if not self._pause(self._restart.delay(streak)):
                        return
                    continue
                with self._cond:
                    stopping = self._stopping
                    if not stopping:
                        slot.engine, slot.lost, slot.state = engine, False, SlotState.IDLE
                        self._cond.notify_all()
                if stopping:
                    self._close(engine)
                    return
                if isinstance(engine, Supervised):
                    engine.on_exit(lambda: self._engine_exited(slot, engine))
                lost = self._run_slot(slot, engine)
                if not lost:
                    return
                streak = 1 if lost == "after-work" else streak + 1
                assert self._restart is not None
                with self._cond:
                    slot.engine, slot.state = None, SlotState.RESTARTING
                    slot.restarts += 1
                    self._cond.notify_all()
                self._close(engine)
                self._observe(lambda o: o.engine_restarted(slot.index))
                delay = self._restart.delay(streak)
                log.warning("restarting engine %d (restart %d) in %.1fs", slot.index, slot.restarts, delay)
                if not self._pause(delay):
                    return
        finally:
            with self._cond:
                if slot.state is not SlotState.FAILED:
                    slot.state = SlotState.STOPPED
                engine_left, slot.engine = slot.engine, None
                self._cond.notify_all()
            if engine_left is not None:
                self._close(engine_left)

    def _run_slot(self, slot: EngineSlot, engine: Engine) -> str | None:
        """Run batches until the scheduler stops (None) or the engine is lost: 'after-work' when
        it had finished a batch first, 'at-once' when it failed before any."""
        finished_one = False
        while True:
            batch = self._take_batch(slot)
            if batch is None:
                if slot.lost and self._restart is not None and not self._stopping:
                    log.error("engine %d ended while idle", slot.index)
                    return "after-work" if finished_one else "at-once"
                return None
            self._announce_positions()
            if not self._execute(slot, engine, batch):
                if self._dead is not None or self._stopping:
                    return None
                return "after-work" if finished_one else "at-once"
            finished_one = True

    def _engine_exited(self, slot: EngineSlot, engine: Engine) -> None:
        """An engine process ended: an idle slot hears it at once (a busy one from run_batch)."""
        with self._cond:
            if slot.engine is engine:
                slot.lost = True
                self._cond.notify_all()

    def _pause(self, seconds: float) -> bool:
        """Wait `seconds` unless the scheduler stops meanwhile (then False)."""
        deadline = self._clock() + seconds
        with self._cond:
            while not self._stopping and self._dead is None:
                remaining = deadline - self._clock()
                if remaining <= 0:
                    return True
                self._cond.wait(remaining)
        return False

    def _give_up(self, slot: EngineSlot, exc: BaseException) -> None:
        with self._cond:
            slot.state = SlotState.FAILED
            others = any(s.state is not SlotState.FAILED for s in self._slots)
            self._cond.notify_all()
        log.critical("engine %d could not be restarted; giving it up: %s", slot.index, exc)
        if not others:
            self._die(exc, errors.EngineDead("No engine could be restarted."))

    @staticmethod
    def _close(engine: Engine) -> None:
        if isinstance(engine, Supervised):
            try:
                engine.close()
            except Exception:  # noqa: BLE001 - a failed close must not stop the others
                log.exception("closing an engine failed")

    def _batch_limit(self, spec: GenerationSpec) -> int:
        by_pixels = self.config.max_batch_pixels // spec.pixels
        return max(1, min(self.config.max_batch_size, by_pixels))

    def _take_batch(self, slot: EngineSlot) -> list[Job] | None:
        gather_head: Job | None = None
        gather_until = 0.0
        with self._cond:
            while True:
                if self._stopping or self._dead is not None or slot.lost:
                    return None
                if not self._queue:
                    self._cond.wait()
                    continue
                head = self._queue[0]
                # A job whose engine failed runs alone: only a job that fails its engine itself
                # then fails a second time.
                limit = 1 if head.crashes else self._batch_limit(head.spec)
                batch = [head]
                for job in itertools.islice(self._queue, 1, None):
                    if len(batch) == limit:
                        break
                    if job.spec.batch_key == head.spec.batch_key and not job.crashes:
                        batch.append(job)
                wait = self.config.batch_wait_s
                if len(batch) < limit and wait > 0 and not self._draining:
                    if gather_head is not head:
                        gather_head, gather_until = head, self._clock() + wait
                    remaining = gather_until - self._clock()
                    if remaining > 0:
                        self._cond.wait(remaining)
                        continue
                self._start_locked(slot, batch)
                return batch

    def _start_locked(self, slot: EngineSlot, batch: list[Job]) -> None:
        position = {id(job): pos for pos, job in enumerate(self._queue)}
        chosen = sorted(position[id(job)] for job in batch)
        for pos, job in enumerate(itertools.islice(self._queue, 0, chosen[-1])):
            if id(job) not in {id(b) for b in batch}:
                job.overtaken += sum(1 for c in chosen if c > pos)
        for job in batch:
            self._queue.remove(job)
        now = self._clock()
        batch_id = next(self._batch_ids)
        for job in batch:
            job.state = JobState.RUNNING
            job.started_at = now
            job.batch_id = batch_id
            job.engine = slot.index
        slot.running = list(batch)
        slot.state = SlotState.BUSY
        self._running.extend(batch)
        self._cond.notify_all()

    def _execute(self, slot: EngineSlot, engine: Engine, batch: list[Job]) -> bool:
        """Run one batch on the slot's engine; False when the engine failed (the batch is retried
        elsewhere or failed, see `_engine_failed`)."""
        batch_id = batch[0].batch_id
        log.info(
            "batch %s started on engine %d: size %d, requests %s, %dx%d, %d steps, queue wait %s",
            batch_id, slot.index, len(batch), [j.request_id for j in batch], batch[0].spec.width,
            batch[0].spec.height, batch[0].spec.num_inference_steps,
            [round(j.started_at - j.submitted_at, 3) for j in batch],
        )
        for job in batch:
            self._emit(job, JobEvent.STARTED)
        try:
            self._run(engine, batch)
        except DeviceFailure as exc:
            if self._restart is None:
                self._die(exc, errors.EngineDead("The device failed; the worker is restarting."), batch)
            else:
                self._engine_failed(slot, batch, exc)
            return False
        finally:
            with self._cond:
                for job in slot.running:
                    self._running.remove(job)
                slot.running = []
                slot.batches += 1
                if slot.state is SlotState.BUSY:
                    slot.state = SlotState.IDLE
                self._cond.notify_all()
        return True

    def _engine_failed(self, slot: EngineSlot, batch: list[Job], exc: BaseException) -> None:
        """The slot's engine died running `batch`: its unfinished jobs go back to the head of the
        queue, each to run alone, except the ones that already had an engine fail under them."""
        log.error("engine %d failed running batch %s (requests %s): %s", slot.index, batch[0].batch_id,
                  [j.request_id for j in batch], exc)
        again: list[Job] = []
        doomed: list[Job] = []
        with self._cond:
            for job in slot.running:
                self._running.remove(job)
            slot.running = []
            for job in batch:
                if job.done:
                    continue
                if job.cancel_requested or self._stopping:
                    doomed.append(job)
                    continue
                job.crashes += 1
                if job.crashes > 1:
                    doomed.append(job)
                    continue
                job.state, job.started_at, job.batch_id, job.step = JobState.QUEUED, None, None, 0
                job.deadline = math.inf  # it was on time; its retry must not be reaped
                again.append(job)
            self._queue.extendleft(reversed(again))
            self._cond.notify_all()
        for job in doomed:
            if job.cancel_requested or self._stopping:
                self._finish_error(job, self._cancel_error())
            else:
                self._finish_error(job, errors.InferenceFailed(
                    "The engine failed twice while generating this image; the server is still serving."))
        for job in again:
            self._emit(job, JobEvent.QUEUED)
        self._announce_positions()

    def _run(self, engine: Engine, batch: list[Job]) -> None:
        # Memory is freed and jobs retried only after leaving each `except` block: while it runs,
        # the exception's traceback holds the failed call's frames and their device tensors, so
        # freeing there would free nothing.
        if not self._ran_out_of_memory(engine, batch):
            return
        engine.free_memory()
        if len(batch) == 1:
            self._fail_oom(batch[0])
            return
        log.warning("batch %s ran out of memory; retrying its %d jobs one by one",
                    batch[0].batch_id, len(batch))
        for job in batch:
            if job.cancel_requested:
                self._finish_error(job, errors.JobCancelled("The job was cancelled."))
                continue
            if self._ran_out_of_memory(engine, [job]):
                engine.free_memory()
                self._fail_oom(job)

    def _ran_out_of_memory(self, engine: Engine, batch: list[Job]) -> bool:
        """Run `batch` once; True when the device ran out of memory (its jobs are not finished)."""
        try:
            self._run_once(engine, batch)
        except DeviceOutOfMemory:
            return True
        return False

    def _run_once(self, engine: Engine, batch: list[Job]) -> None:
        """One pipeline call for `batch`; completes every job in it unless the device fails."""

        def on_step(event: StepEvent) -> None:
            for index, job in enumerate(batch):
                job.step, job.total_steps = event.step, event.total
                self._emit(job, JobEvent.STEP)
                preview = event.previews.get(index)
                if preview is not None:
                    job.preview = preview
                    job.preview_time += preview.seconds
                    self._emit(job, JobEvent.PREVIEW)
            if self._stopping or all(job.cancel_requested for job in batch):
                raise BatchAborted

        start = self._clock()
        try:
            images = engine.run_batch([job.spec for job in batch], on_step)
        except BatchAborted:
            log.info("batch %s aborted at a step boundary: every job was cancelled", batch[0].batch_id)
            for job in batch:
                self._finish_error(job, self._cancel_error())
            return
        except (DeviceOutOfMemory, DeviceFailure):
            raise
        except errors.ServerError as exc:  # the engine refused the batch's request (e.g. a broken LoRA)
            for job in batch:
                self._finish_error(job, exc)
            return
        except Exception:  # noqa: BLE001 - isolate the failure to this batch
            log.exception("batch %s failed (requests %s)", batch[0].batch_id, [j.request_id for j in batch])
            for job in batch:
                self._finish_error(job, errors.InferenceFailed(
                    "Image generation failed; the server logged the details and is still serving."))
            return
        elapsed = self._clock() - start
        with self._cond:
            self._counts["batches"] += 1
            self._inference_total += elapsed
            self._recent_job_times.append(elapsed / len(batch))
        self._observe(lambda o: o.batch_finished(batch, elapsed))
        for job, image in zip(batch, images, strict=True):
            if job.cancel_requested:
                self._finish_error(job, self._cancel_error())
                continue
            result = JobResult(
                image=image,
                inference_time=elapsed,
                queue_wait=(job.started_at or start) - job.submitted_at,
                batch_id=job.batch_id or 0,
                batch_size=len(batch),
                preview_time=job.preview_time,
                engine=job.engine or 0,
            )
            self._finish_ok(job, result)

    def _cancel_error(self) -> errors.ServerError:
        if self._stopping:
            return errors.ShuttingDown("The server shut down before this job finished.")
        return errors.JobCancelled("The job was cancelled.")

    def _fail_oom(self, job: Job) -> None:
        self._finish_error(job, errors.OutOfMemory(
            f"Out of device memory for one {job.spec.width}x{job.spec.height} image; "
            "try a smaller aspect ratio.", retry_after=self.retry_after()))

    def _die(self, exc: BaseException, error: errors.ServerError, batch: Sequence[Job] = ()) -> None:
        log.critical("engine is dead: %s", exc, exc_info=not isinstance(exc, errors.ModelLoadError))
        with self._cond:
            self._dead = exc
            victims = list(batch) + list(self._queue)
            self._queue.clear()
            self._cond.notify_all()
        for job in victims:
            self._finish_error(job, error)
        with self._cond:
            self._cond.notify_all()
        if self._on_fatal is not None:
            self._on_fatal(exc)

    # -- deadlines --------------------------------------------------------------------------

    def _reap(self) -> None:
        with self._cond:
            while not self._stopping and self._dead is None:
                now = self._clock()
                expired = [job for job in self._queue if job.deadline <= now]
                for job in expired:
                    self._queue.remove(job)
                if expired:
                    self._counts["timed_out"] += len(expired)
                    self._cond.notify_all()
                    self._cond.release()
                    try:
                        for job in expired:
                            self._finish_error(job, errors.QueueTimeout(
                                f"The job waited more than {self.config.queue_timeout_s:g} s in the queue."))
                        self._announce_positions()
                    finally:
                        self._cond.acquire()
                    continue
                nearest = min((job.deadline for job in self._queue if math.isfinite(job.deadline)), default=None)
                self._cond.wait(None if nearest is None else max(0.0, nearest - now))

    # -- completion -------------------------------------------------------------------------

    def _finish_ok(self, job: Job, result: JobResult) -> None:
        with self._cond:
            job.state = JobState.SUCCEEDED
            job.finished_at = self._clock()
            self._counts["processed"] += 1
        log.info("request %s succeeded in batch %s (size %d): queue wait %.3fs, inference %.3fs",
                 job.request_id, result.batch_id, result.batch_size, result.queue_wait, result.inference_time)
        job.future.set_result(result)
        self._emit(job, JobEvent.SUCCEEDED)

    def _finish_error(self, job: Job, error: errors.ServerError) -> None:
        cancelled = isinstance(error, errors.JobCancelled)
        with self._cond:
            if job.done:
                return
            job.state = JobState.CANCELLED if cancelled else JobState.FAILED
            job.finished_at = self._clock()
            self._counts["cancelled" if cancelled else "failed"] += 1
        log.info("request %s %s: %s", job.request_id, job.state.value, error.message)
        job.future.set_exception(error)
        self._emit(job, JobEvent.entering(job.state))

    def _announce_positions(self) -> None:
        """Tell every waiting job's listeners that the queue moved ("queued" with a new position)."""
        with self._cond:
            waiting = [job for job in self._queue if job.listeners]
        for job in waiting:
            self._emit(job, JobEvent.QUEUED)

    def _emit(self, job: Job, event: JobEvent) -> None:
        for listener in list(job.listeners):
            try:
                listener(job, event)
            except Exception:  # noqa: BLE001 - a broken listener must not break the engine
                log.exception("job listener failed on %s", event)
        self._observe(lambda o: o.job_event(job, event))

    def _observe(self, call: Callable[[SchedulerObserver], None]) -> None:
        if self._observer is None:
            return
        try:
            call(self._observer)
        except Exception:  # noqa: BLE001 - numbers must never break the engine
            log.exception("scheduler observer failed")
