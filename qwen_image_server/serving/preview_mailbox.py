"""Live previews from the engine thread to the event loop: the newest one of each job, never a
backlog.

The engine makes a preview between two steps and must not wait for anyone; a client reading
previews may be slow. So each job has a mailbox slot that holds only its newest preview: the
engine's thread drops previews in (`offer`, from any thread), the event loop reads them (`take`
the unread ones, or the `newest`). A reader that falls behind skips to the newest.

`LatestPreviews` is that mailbox, for one job or several (an OpenAI request's `n` images);
`watch` feeds one from the scheduler's listeners. OpenAI streams and the jobs API both read
their previews through it.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable, Sequence

from qwen_image_server.engine.types import Preview
from qwen_image_server.job_state import JobEvent
from qwen_image_server.scheduler import Job, Scheduler


class LatestPreviews:
    """The newest preview of each of some jobs (by index), and which are unread."""

    def __init__(self, loop: asyncio.AbstractEventLoop,
                 on_new: Callable[[int, Preview], None] | None = None) -> None:
        self._loop = loop
        self.on_new = on_new  # called on the event loop with each new preview
        self._latest: dict[int, Preview] = {}
        self._unread: set[int] = set()
        self.ready = asyncio.Event()  # set while a preview is unread

    def offer(self, index: int, preview: Preview) -> None:
        """Any thread: `preview` is now the newest of job `index`."""
        self._loop.call_soon_threadsafe(self._put, index, preview)

    def _put(self, index: int, preview: Preview) -> None:
        self._latest[index] = preview
        self._unread.add(index)
        self.ready.set()
        if self.on_new is not None:
            self.on_new(index, preview)

    def newest(self, index: int = 0) -> Preview | None:
        """The newest preview of job `index`, read or not (None before the first)."""
        return self._latest.get(index)

    def clear(self) -> None:
        """Forget every preview (their jobs ended: nobody will read them)."""
        self._latest.clear()
        self._unread.clear()
        self.ready.clear()

    def take(self) -> list[tuple[int, Preview]]:
        """The unread previews, by job index; none are unread afterwards."""
        taken = [(index, self._latest[index]) for index in sorted(self._unread)]
        self._unread.clear()
        self.ready.clear()
        return taken


class PreviewWatch:
    """A mailbox fed by the scheduler with the previews of `jobs` until `close`."""

    def __init__(self, scheduler: Scheduler, jobs: Sequence[Job], mailbox: LatestPreviews) -> None:
        self._scheduler = scheduler
        self.mailbox = mailbox
        self._listeners = [(job, functools.partial(self._heard, index)) for index, job in enumerate(jobs)]
        for job, listener in self._listeners:
            scheduler.add_listener(job, listener)

    def _heard(self, index: int, job: Job, event: JobEvent) -> None:  # engine thread
        if event is JobEvent.PREVIEW and job.preview is not None:
            self.mailbox.offer(index, job.preview)

    def close(self) -> None:
        for job, listener in self._listeners:
            self._scheduler.remove_listener(job, listener)
