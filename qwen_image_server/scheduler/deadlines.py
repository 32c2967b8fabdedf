"""The deadline thread: fails queued jobs that waited longer than `queue_timeout_s` (504) and
hands running batches past their deadline to the watchdog (`Dispatcher.engine_hung`).

It sleeps until the nearest deadline (a queued job's or a running batch's) under the scheduler's
one lock, so it costs nothing while nothing is due, and it is woken whenever the queue or the
slots change (the lock's condition is notified)."""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence

from qwen_image_server import errors
from qwen_image_server.scheduler.dispatch import Dispatcher, RunState
from qwen_image_server.scheduler.jobs import JobBook
from qwen_image_server.scheduler.queue import BatchQueue
from qwen_image_server.scheduler.slots import EngineSlot


class DeadlineReaper(threading.Thread):
    """Watches the deadlines of the queue and the slots until the scheduler stops or dies."""

    def __init__(self, lock: threading.Condition, queue: BatchQueue, dispatcher: Dispatcher,
                 slots: Sequence[EngineSlot], state: RunState, book: JobBook, clock: Callable[[], float],
                 queue_timeout_s: float, *, announce: Callable[[], None]) -> None:
        super().__init__(name="qwen-image-deadlines", daemon=True)
        self._cond = lock
        self._queue = queue
        self._dispatcher = dispatcher
        self._slots = slots
        self._state = state
        self._book = book
        self._clock = clock
        self._queue_timeout_s = queue_timeout_s
        self._announce = announce

    def run(self) -> None:
        with self._cond:
            while not self._state.stopping and self._state.dead is None:
                now = self._clock()
                expired = self._queue.expired(now)
                hung = self._dispatcher.overdue_locked(self._slots, now)
                if expired or hung:
                    self._book.counts["timed_out"] += len(expired)
                    self._cond.notify_all()
                    # Jobs end and engines are killed outside the lock: listeners and the
                    # watchdog take it themselves.
                    self._cond.release()
                    try:
                        for job in expired:
                            self._book.finish_error(job, errors.QueueTimeout(
                                f"The job waited more than {self._queue_timeout_s:g} s in the queue."))
                        if expired:
                            self._announce()
                        for slot in hung:
                            self._dispatcher.engine_hung(slot)
                    finally:
                        self._cond.acquire()
                    continue
                deadlines = [d for d in (self._queue.nearest_deadline(),
                                         self._dispatcher.next_deadline_locked(self._slots)) if d is not None]
                self._cond.wait(max(0.0, min(deadlines) - self._clock()) if deadlines else None)
