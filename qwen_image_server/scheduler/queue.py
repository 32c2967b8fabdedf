"""The waiting jobs and the batching policy over them: which jobs form the next batch, who may
still join the queue, which jobs waited too long. No threads and no lock: the scheduler calls it
with its lock held, and tests call it directly (`tests/test_batch_queue.py`).

The rules (the scheduler's, see `core.py`):

* Waiting jobs are kept in fair order across owners (API keys): by round, each owner's k-th
  waiting job after every owner's (k-1)-th, then by arrival (see `push`). With one owner (a
  server without keys) that is arrival order.
* The first waiting job (the head) always runs in the next batch. Jobs behind it with the same
  `batch_key` join it, up to `max_batch_size` jobs and `max_batch_pixels` pixels; a job whose
  engine failed under it (`crashes`) runs alone and joins no batch.
* So a job with `p` jobs ahead of it starts in one of the next `p + 1` batches; `overtaken`
  counts, per job, the later jobs that started before it.
* The queue holds at most `max_queue` jobs; a request for more images than that can never fit.
"""

from __future__ import annotations

import itertools
import math
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

from qwen_image_server import errors
from qwen_image_server.engine.contract import settings_batch_limits
from qwen_image_server.engine.types import GenerationSpec
from qwen_image_server.job_state import JobState
from qwen_image_server.scheduler.jobs import Job

if TYPE_CHECKING:
    from qwen_image_server.config.settings import Settings


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


class BatchQueue:
    """The waiting jobs, oldest first, and the rules that batch them."""

    def __init__(self, config: SchedulerConfig) -> None:
        self.config = config
        self._jobs: deque[Job] = deque()
        # Start-time fair queueing: a job's tag is its owner's previous tag plus one, or the
        # round being served plus one if that is later (an owner that had nothing waiting joins
        # the current round instead of going ahead of it, or behind everyone).
        self._served = 0.0  # the tag of the last batch's head
        self._last_tag: dict[str | None, float] = {}

    def __len__(self) -> int:
        return len(self._jobs)

    def __iter__(self) -> Iterator[Job]:
        return iter(self._jobs)

    def __contains__(self, job: object) -> bool:
        return job in self._jobs

    # -- joining and leaving ----------------------------------------------------------------

    def admit(self, count: int, retry_after: Callable[[], int]) -> None:
        """Raise unless `count` more jobs fit now: InvalidRequest when they never could (more
        than the whole queue), QueueFull (with `retry_after()` seconds) while it is too full."""
        limit = self.config.max_queue
        if count > limit:
            # Waiting cannot help: even an empty queue holds fewer images than this asks for.
            raise errors.InvalidRequest(
                f"This request asks for {count} images; this server queues at most "
                f"{limit} at a time (QWEN_IMAGE_MAX_QUEUE).", param="n")
        if len(self._jobs) + count > limit:
            retry = retry_after()
            raise errors.QueueFull(
                f"The queue is full ({len(self._jobs)} of {limit} places taken); retry in {retry} s.",
                retry_after=retry,
            )

    def push(self, jobs: Iterable[Job]) -> None:
        """Queue `jobs`, in order, each at its owner's next round: behind every waiting job of
        that round or an earlier one, ahead of the later rounds."""
        for job in jobs:
            job.fair_tag = max(self._served, self._last_tag.get(job.owner, 0.0)) + 1
            self._last_tag[job.owner] = job.fair_tag
            place = len(self._jobs)
            while place > 0 and self._jobs[place - 1].fair_tag > job.fair_tag:
                place -= 1
            self._jobs.insert(place, job)

    def push_front(self, jobs: Iterable[Job]) -> None:
        """Put `jobs` back at the head, in order (jobs whose engine failed under them)."""
        self._jobs.extendleft(reversed(list(jobs)))

    def remove(self, job: Job) -> bool:
        """Take `job` out; False when it is not waiting."""
        try:
            self._jobs.remove(job)
        except ValueError:
            return False
        return True

    def clear(self) -> list[Job]:
        """Take every waiting job out, oldest first."""
        jobs = list(self._jobs)
        self._jobs.clear()
        return jobs

    def position(self, job: Job) -> int | None:
        """0 for the head; None when the job is not waiting."""
        try:
            return self._jobs.index(job)
        except ValueError:
            return None

    def with_listeners(self) -> list[Job]:
        """The waiting jobs somebody listens to (they hear when the queue moves)."""
        return [job for job in self._jobs if job.listeners]

    # -- batching ---------------------------------------------------------------------------

    def limit(self, head: Job) -> int:
        """How many jobs may run in one batch with `head`: one after an engine failed under it."""
        if head.crashes:
            return 1
        return _batch_limit(head.spec, self.config.max_batch_size, self.config.max_batch_pixels)

    def next_batch(self) -> list[Job]:
        """The head and the compatible jobs behind it, up to the limit (empty when no job waits).
        The jobs stay queued until `start`."""
        if not self._jobs:
            return []
        head = self._jobs[0]
        limit = self.limit(head)
        batch = [head]
        for job in itertools.islice(self._jobs, 1, None):
            if len(batch) == limit:
                break
            if job.spec.batch_key == head.spec.batch_key and not job.crashes:
                batch.append(job)
        return batch

    def full(self, batch: list[Job]) -> bool:
        """No more jobs could join `batch` (so it need not wait for any)."""
        return len(batch) >= self.limit(batch[0])

    def start(self, batch: list[Job], engine: int, batch_id: int, now: float) -> None:
        """Take `batch` out of the queue to run on `engine`: every job it overtook counts it."""
        chosen = {id(job) for job in batch}
        positions = sorted(pos for pos, job in enumerate(self._jobs) if id(job) in chosen)
        for pos, job in enumerate(itertools.islice(self._jobs, 0, positions[-1])):
            if id(job) not in chosen:
                job.overtaken += sum(1 for c in positions if c > pos)
        self._served = max(self._served, batch[0].fair_tag)
        self._last_tag = {owner: tag for owner, tag in self._last_tag.items() if tag > self._served}
        for job in batch:
            self._jobs.remove(job)
            job.state = JobState.RUNNING
            job.started_at = now
            job.batch_id = batch_id
            job.engine = engine

    # -- deadlines and estimates ------------------------------------------------------------

    def expired(self, now: float) -> list[Job]:
        """Take out and return the jobs whose deadline has passed."""
        late = [job for job in self._jobs if job.deadline <= now]
        for job in late:
            self._jobs.remove(job)
        return late

    def nearest_deadline(self) -> float | None:
        return min((job.deadline for job in self._jobs if math.isfinite(job.deadline)), default=None)

    def retry_after(self, per_job: float | None, running: int) -> int:
        """Seconds until a slot is likely free, from the device time per job (1 s when nothing
        ran yet) and the work ahead: the running batch plus one batch worth."""
        ahead = min(len(self._jobs) + running, running + self.config.max_batch_size) or 1
        return max(1, math.ceil((per_job or 1.0) * ahead))


def _batch_limit(spec: GenerationSpec, max_batch_size: int, max_batch_pixels: int) -> int:
    return max(1, min(max_batch_size, max_batch_pixels // spec.pixels))
