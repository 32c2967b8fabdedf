"""What servers sharing one job store (Redis) do for each other, beyond storing jobs: the pieces
a single server with its own store never needs, behind one small interface the job registry
talks to.

- A lease: each server holds one and renews it; while it holds it, no other server runs its jobs.
  When it lapses (the server died, or stopped), a live server adopts its unfinished jobs
  (`JobStore.unfinished` answers those) and runs them.
- A relay: the server running a job publishes its events (queued, started, each step, previews,
  the end) with the status at that moment; any other server follows them for its own clients.
- Remote cancellation: a cancel sent to any server reaches the one running the job (and is kept
  with the job, so a server adopting it later does not run it).

`serving/redis_store.py` implements it on Redis; without a shared store there is none.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Protocol

from qwen_image_server.job_state import JobEvent
from qwen_image_server.protocol.native import JobPreview, JobStatus

Relayed = tuple[JobEvent, JobStatus | JobPreview]


class JobExchange(Protocol):
    runner: str  # this server's name among those sharing the store (its lease's)

    async def start(self, adopt: Callable[[], Awaitable[int]], cancel_here: Callable[[str], bool]) -> None:
        """Take the lease and keep renewing it; every renewal, `adopt()` runs the jobs of servers
        whose lease lapsed; a cancel for a job runs `cancel_here(job_id)` (False: not run here)."""
        ...

    async def stop(self) -> None:
        """Give the lease up: what this server leaves unfinished is adopted at once by another."""
        ...

    def publish(self, job_id: str, event: JobEvent, status: JobStatus) -> None:
        """Tell the job's followers elsewhere (in order; never blocks, never raises)."""
        ...

    def publish_preview(self, job_id: str, encode: Callable[[], Awaitable[JobPreview | None]]) -> None:
        """Send the job's newest preview to its followers elsewhere; `encode` is called only when
        there are some."""
        ...

    async def latest(self, job_id: str) -> JobStatus | None:
        """The status its runner published last (None: none yet)."""
        ...

    def follow(self, job_id: str, current: Callable[[], Awaitable[JobStatus]]) -> AsyncIterator[Relayed]:
        """A job run elsewhere, as a subscriber here hears it: its current status (`current()`,
        read once the relay is listening, so no event falls in between), then every event to
        its end."""
        ...

    async def cancel(self, job_id: str, wait_s: float) -> JobStatus | None:
        """Ask the job's runner, wherever it is, to cancel it; its final status if it ends
        within `wait_s`."""
        ...
