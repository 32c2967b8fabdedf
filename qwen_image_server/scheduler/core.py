"""The scheduler: a bounded queue in front of the engines, one thread per engine slot.

Request handlers call `submit()` and await the job's future; they never touch the model. Each
engine slot's thread loads its engine (in this process, or a proxy to an engine process), then
takes the next batch whenever it is idle and runs it. One queue feeds every slot, so the rules
below hold across engines:

* **Batching.** The oldest waiting job (the head) always runs in the next batch. Jobs behind it
  with the same shape (`GenerationSpec.batch_key`) are pulled forward into that batch, up to
  `max_batch_size` jobs and `max_batch_pixels` pixels. If the batch is not full, the worker may
  wait up to `batch_wait_s` for more compatible jobs.
* **Fair order across API keys.** Waiting jobs are ordered by round, not only by arrival: each
  owner's (API key's) k-th waiting job comes after every owner's (k-1)-th, and an owner that
  arrives to find others waiting joins the round being served (`queue.BatchQueue.push`). One key
  with 30 jobs waiting delays another key's first job by one batch, not 30. Without keys every
  job has the same owner and the order is arrival order.
* **Fairness bound.** Because the head always runs next, a job with `p` jobs ahead of it starts in
  one of the next `p + 1` batches: never later, counted in batches, than that order.
* **Cancellation.** A queued job leaves the queue at once and never runs. A running batch stops
  at the next step boundary when every job in it is cancelled (raising from the step callback,
  so the VAE decode is skipped too).
* **Deadlines.** A job still queued after `queue_timeout_s` fails with `QueueTimeout` (504).
* **Watchdog.** Given a `WatchdogConfig`, each batch gets a deadline when it starts, from its
  steps and size and the slowest step seen on its slot, or the operator's fixed one
  (`watchdog.py`). Past it the engine counts as hung. With restartable slots an engine process
  is killed, and its batch fails as under any engine that died (below): a job whose engine fails
  a second time fails with `EngineTimeout` (500, code `engine_timeout`) when that second failure
  was a hang. An engine in this process cannot be killed (nor one without a restart policy): its
  batch fails with `EngineDead` (503, code `engine_timeout`) and the scheduler is dead
  (`on_fatal`: a fresh process is the cure). While a slot restarts its engine, `trouble` says why.
* **Failure isolation.** An exception fails only its batch. Out of memory: free, retry the jobs
  one by one, then `OutOfMemory`. A device failure marks the engine dead and calls `on_fatal`,
  unless the slots are restartable (`RestartPolicy`, engine processes): then the slot's batch goes
  back to the head of the queue, each job to run alone on the next idle engine; a job whose
  engine fails a second time fails with `InferenceFailed` (500). The slot restarts its engine
  with backoff; the scheduler is dead only when no slot can be restarted.

Who does what: `queue.py` is the batching policy (which jobs run next, who may join, who waited
too long), `watchdog.py` the batch deadlines, `dispatch.py` gives idle slots their batches and
handles an engine that fails under one or hangs, `execute.py` runs one batch and ends its jobs,
`slots.py` loads, feeds and restarts the engines, `jobs.py` keeps the books (how jobs end, who
hears it), `deadlines.py` the thread that watches the deadlines (queued jobs' and running
batches'). This module holds the one lock they all work under and the public face: check_room, submit, cancel,
listen, stats, drain and stop.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

from qwen_image_server import errors
from qwen_image_server.engine.contract import Engine
from qwen_image_server.engine.types import GenerationSpec
from qwen_image_server.job_state import JobEvent, JobState
from qwen_image_server.scheduler.deadlines import DeadlineReaper
from qwen_image_server.scheduler.dispatch import Dispatcher, RunState
from qwen_image_server.scheduler.execute import BatchRunner
from qwen_image_server.scheduler.jobs import (
    Job,
    JobBook,
    JobListener,
    SchedulerObserver,
)
from qwen_image_server.scheduler.queue import BatchQueue, SchedulerConfig
from qwen_image_server.scheduler.slots import (
    EngineSlot,
    RestartPolicy,
    SlotStats,
    SlotSupervisor,
)
from qwen_image_server.scheduler.watchdog import BatchHung, WatchdogConfig

log = logging.getLogger(__name__)


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
        watchdog: WatchdogConfig | None = None,
    ) -> None:
        factories = [engine_factory] if callable(engine_factory) else list(engine_factory)
        if not factories:
            raise ValueError("a scheduler needs at least one engine")
        self._id_prefix = id_prefix  # starts every job id: the replica's name when scaled out
        self.config = config
        self._on_fatal = on_fatal
        self._clock = clock
        self._restart = restart
        self._cond = threading.Condition()  # one lock for the queue, the slots and the books
        self._state = RunState()
        self._queue = BatchQueue(config)
        self._book = JobBook(self._cond, clock, observer)
        runner = BatchRunner(self._book, stopping=lambda: self._state.stopping, retry_after=self.retry_after,
                             clock=clock)
        dispatcher = Dispatcher(self._cond, self._queue, self._book, runner, self._state, clock, restart,
                                die=self._die, announce=self._announce_positions, watchdog=watchdog)
        self._dispatcher = dispatcher
        self._slots = [EngineSlot(i, factory) for i, factory in enumerate(factories)]
        self._supervisor = SlotSupervisor(
            self._slots, self._cond, restart, clock, ended=lambda: self._state.ended,
            take_batch=dispatcher.take_batch, execute=dispatcher.execute,
            die=self._die,
            restarted=lambda slot: self._book.observe(lambda o: o.engine_restarted(slot.index)))
        for slot in self._slots:
            name = "qwen-image-engine" if len(self._slots) == 1 else f"qwen-image-engine-{slot.index}"
            slot.thread = threading.Thread(target=self._supervisor.serve, args=(slot,), name=name, daemon=True)
        self._reaper = DeadlineReaper(self._cond, self._queue, dispatcher, self._slots, self._state, self._book,
                                      clock, config.queue_timeout_s, announce=self._announce_positions)

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
        return self._state.dead is not None

    @property
    def draining(self) -> bool:
        return self._state.draining

    @property
    def serving(self) -> bool:
        """At least one engine is loaded and running or ready to run batches."""
        return any(slot.state.serving for slot in self._slots)

    @property
    def ready(self) -> bool:
        """An engine serves, nothing is dead, and new work is taken."""
        return self.serving and not self.dead and not self._state.draining

    @property
    def trouble(self) -> str | None:
        """What is wrong with the engines, in a few words: none can serve any more, or one is
        restarting (after a hung batch, or a crash). None while nothing is (a first load is not)."""
        with self._cond:
            if self._state.dead is not None:
                return ("engine failed: a batch hung past its deadline" if isinstance(self._state.dead, BatchHung)
                        else "engine failed")
            cause = next((slot.restart_cause for slot in self._slots if slot.restart_cause), None)
            return None if cause is None else f"engine restarting after {cause}"

    def begin_drain(self) -> None:
        """Refuse new jobs from now on; queued and running ones carry on."""
        with self._cond:
            self._state.draining = True
            self._cond.notify_all()

    def wait_until(self, predicate: Callable[[], bool], timeout: float | None = None) -> bool:
        """Block until `predicate()` holds (checked again at every change of the scheduler's
        state: a job queued, started or ended, an engine loaded or lost) or `timeout` passes."""
        with self._cond:
            return self._cond.wait_for(predicate, timeout)

    def wait_idle(self, timeout: float | None = None) -> bool:
        """Block until nothing is queued or running (or timeout). True when idle."""
        return self.wait_until(lambda: not self._queue and not self._state.running, timeout)

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
            self._state.stopping = True
            leftovers = self._queue.clear()
            for job in self._state.running:
                job.cancel_requested = True  # stop the batch at its next step
            self._cond.notify_all()
        for job in leftovers:
            self._book.finish_error(job, errors.ShuttingDown("The server shut down before this job could run."))

    def join(self, timeout: float) -> None:
        """Wait for the slot and reaper threads to end (after stop() or a fatal error); each slot
        closes its engine (an engine process exits) as its thread ends."""
        for thread in (*(slot.thread for slot in self._slots), self._reaper):
            if thread is not None and thread.is_alive():
                thread.join(timeout)

    # -- submitting and cancelling ----------------------------------------------------------

    def submit(self, spec: GenerationSpec, request_id: int, owner: str | None = None) -> Job:
        """Queue a job or raise QueueFull / ShuttingDown / EngineDead. Never blocks."""
        return self.submit_many([spec], request_id, owner)[0]

    def submit_many(self, specs: Sequence[GenerationSpec], request_id: int, owner: str | None = None,
                    ids: Sequence[str] | None = None, readmit: bool = False) -> list[Job]:
        """Queue all of `specs` at once, or none (QueueFull unless all fit). Never blocks.

        Being queued in one step, jobs of one request that share a shape (OpenAI's n images)
        always run as one batch, even when the engine was idle. `ids` gives the jobs ids made
        beforehand (`new_job_id`); `readmit` queues jobs accepted before a restart whatever the
        queue's room (they were admitted once already).
        """
        with refusals_observed(self._book):
            jobs = self._enqueue(specs, request_id, owner, ids, readmit)
        for job in jobs:
            self._book.emit(job, JobEvent.QUEUED)
        return jobs

    def check_room(self, count: int) -> None:
        """Raise now what `submit_many` of `count` jobs would raise if it were called now
        (QueueFull with its Retry-After, ShuttingDown, EngineDead, InvalidRequest for more than the
        whole queue), counted as a rejection the same way. Reserves nothing: a request checks this
        before its costly preparation (decoding uploads, tokenizing), and `submit_many` still
        decides when it queues."""
        with refusals_observed(self._book), self._cond:
            self._admit_locked(count)

    def _admit_locked(self, count: int, room: bool = True) -> None:
        """Raise unless `count` more jobs may be queued now (the lock held); `room`: whether the
        queue's bound applies."""
        if self._state.dead is not None:
            raise errors.EngineDead("The model engine failed and the worker is restarting.")
        try:
            if self._state.draining or self._state.stopping:
                raise errors.ShuttingDown("The server is shutting down and takes no new jobs.")
            if room:
                self._queue.admit(count, self._retry_after_locked)
        except errors.ServerError:
            self._book.counts["rejected"] += 1
            raise

    def new_job_id(self) -> str:
        """A fresh job id (starting with this replica's prefix when scaled out)."""
        return f"{self._id_prefix}{uuid.uuid4().hex}"

    def _enqueue(self, specs: Sequence[GenerationSpec], request_id: int, owner: str | None,
                 ids: Sequence[str] | None, readmit: bool) -> list[Job]:
        now = self._clock()
        with self._cond:
            self._admit_locked(len(specs), room=not readmit)
            jobs = [
                Job(
                    spec=spec,
                    request_id=request_id,
                    submitted_at=now,
                    deadline=now + self.config.queue_timeout_s,
                    total_steps=spec.num_inference_steps,
                    id=job_id,
                    owner=owner,
                )
                for spec, job_id in zip(specs, ids or [self.new_job_id() for _ in specs], strict=True)
            ]
            for job in jobs:
                # A running future cannot be cancelled by whoever awaits it, so only the
                # scheduler ever completes it.
                job.future.set_running_or_notify_cancel()
            self._queue.push(jobs)
            self._cond.notify_all()
        return jobs

    def cancel(self, job: Job) -> bool:
        """Cancel a job: a queued one never runs, a running one stops with its batch. True if it took."""
        with self._cond:
            if job.state is JobState.QUEUED and self._queue.remove(job):
                self._cond.notify_all()
            elif job.state is JobState.RUNNING:
                job.cancel_requested = True
                return True
            else:
                return False
        self._book.finish_error(job, errors.JobCancelled("The job was cancelled."))
        self._announce_positions()
        return True

    def queue_position(self, job: Job) -> int | None:
        """0 for the next job to start; None when the job is no longer waiting."""
        with self._cond:
            return self._queue.position(job)

    def add_listener(self, job: Job, listener: JobListener) -> None:
        """Call listener(job, event) on queued/started/step/succeeded/failed/cancelled (any thread)."""
        self._book.add_listener(job, listener)

    def remove_listener(self, job: Job, listener: JobListener) -> None:
        self._book.remove_listener(job, listener)

    # -- numbers ----------------------------------------------------------------------------

    def stats(self) -> SchedulerStats:
        with self._cond:
            c = self._book.counts
            return SchedulerStats(
                queue_length=len(self._queue),
                running_batch_size=len(self._state.running),
                processed=c["processed"],
                failed=c["failed"],
                cancelled=c["cancelled"],
                rejected=c["rejected"],
                timed_out=c["timed_out"],
                batches=c["batches"],
                mean_inference_time=self._book.mean_inference_time_locked(),
                mean_job_time=self._book.mean_job_time_locked(),
                engines=tuple(slot.stats_locked() for slot in self._slots),
            )

    def retry_after(self) -> int:
        """Seconds until a slot is likely free, from recent job times and the work ahead."""
        with self._cond:
            return self._retry_after_locked()

    def _retry_after_locked(self) -> int:
        return self._queue.retry_after(self._book.mean_job_time_locked(), len(self._state.running))

    def _die(self, exc: BaseException, error: errors.ServerError, batch: Sequence[Job] = ()) -> None:
        log.critical("engine is dead: %s", exc, exc_info=not isinstance(exc, errors.ModelLoadError))
        with self._cond:
            self._state.dead = exc
            victims = list(batch) + self._queue.clear()
            self._cond.notify_all()
        for job in victims:
            self._book.finish_error(job, error)
        with self._cond:
            self._cond.notify_all()
        if self._on_fatal is not None:
            self._on_fatal(exc)

    def _announce_positions(self) -> None:
        """Tell every waiting job's listeners that the queue moved ("queued" with a new position)."""
        with self._cond:
            waiting = self._queue.with_listeners()
        self._book.announce(waiting)


@contextmanager
def refusals_observed(book: JobBook) -> Iterator[None]:
    """Tell the observer (metrics) about a QueueFull or ShuttingDown raised inside."""
    try:
        yield
    except (errors.QueueFull, errors.ShuttingDown) as exc:
        refusal = exc  # `exc` itself is unbound when the except block ends
        book.observe(lambda o: o.rejected(refusal))
        raise
