"""Limits per API key: images queued or running at once, and image requests per minute.

Checked when a request is admitted, before its uploads are decoded or its prompt is tokenized,
and again (for the jobs in flight) at the moment its jobs are queued; either answers 429
`rate_limit_exceeded` with Retry-After, in the common error shape. A server without keys has one
anonymous caller and no limits here (the queue's own bound still applies).
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable, Sequence

from limits import RateLimitItemPerMinute
from limits.storage import MemoryStorage
from limits.strategies import MovingWindowRateLimiter

from qwen_image_server import errors
from qwen_image_server.config.api_keys import Caller
from qwen_image_server.scheduler import Job


class KeyQuotas:
    """The jobs each key has in flight, and its requests in the last minute."""

    def __init__(self) -> None:
        self._lock = threading.Lock()  # job futures end on engine threads
        self._in_flight: dict[str, int] = {}
        self._limiter = MovingWindowRateLimiter(MemoryStorage())

    def in_flight(self, caller: Caller) -> int:
        with self._lock:
            return self._in_flight.get(caller.id, 0) if caller.id else 0

    def admit(self, caller: Caller, count: int, retry_after: Callable[[], int]) -> None:
        """Count one image request of `caller` for `count` images; raise RateLimited when the key
        is over either limit (`retry_after`: the queue's estimate of when a job ends)."""
        if caller.id is None:
            return
        self.check_jobs(caller, count, retry_after)
        per_minute = caller.limits.requests_per_minute
        if per_minute is not None:
            item = RateLimitItemPerMinute(per_minute)
            if not self._limiter.hit(item, caller.id):
                stats = self._limiter.get_window_stats(item, caller.id)
                wait = max(1, math.ceil(stats.reset_time - time.time()))
                raise errors.RateLimited(
                    f"This API key may make {per_minute} image requests per minute; retry in {wait} s.",
                    code="too_many_requests", retry_after=wait)

    def check_jobs(self, caller: Caller, count: int, retry_after: Callable[[], int]) -> None:
        """Raise RateLimited when `count` more images would take the key over its jobs in flight."""
        limit = caller.limits.max_jobs
        if caller.id is None or limit is None:
            return
        if count > limit:
            raise errors.InvalidRequest(
                f"This request asks for {count} images; this API key may have at most {limit} queued "
                "or running at once.", param="n", code="over_key_limit")
        now = self.in_flight(caller)
        if now + count > limit:
            wait = retry_after()
            raise errors.RateLimited(
                f"This API key has {now} images queued or running, its most at once is {limit}; "
                f"retry in {wait} s.", code="too_many_jobs", retry_after=wait)

    def track(self, caller: Caller, jobs: Sequence[Job]) -> None:
        """Count `jobs` as the key's until each ends."""
        owner = caller.id
        if owner is None:
            return
        with self._lock:
            self._in_flight[owner] = self._in_flight.get(owner, 0) + len(jobs)

        def ended(_: object) -> None:
            with self._lock:
                left = self._in_flight.get(owner, 0) - 1
                if left > 0:
                    self._in_flight[owner] = left
                else:
                    self._in_flight.pop(owner, None)

        for job in jobs:
            job.future.add_done_callback(ended)
