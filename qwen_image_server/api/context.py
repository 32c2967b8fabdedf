"""Per-app state shared by the routers: settings, scheduler, CPU pool, lifecycle."""

from __future__ import annotations

import asyncio
import functools
import itertools
import logging
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, TypeVar

from fastapi import Request

from qwen_image_server import errors
from qwen_image_server.engine.device import DeviceInfo
from qwen_image_server.engine.loader import LoadedModel
from qwen_image_server.engine.types import GenerationSpec
from qwen_image_server.results import ResultStore
from qwen_image_server.scheduler import Job, JobResult, Scheduler
from qwen_image_server.settings import Settings

log = logging.getLogger(__name__)
T = TypeVar("T")

# Exit codes the serving layer hands to its process manager.
EXIT_LOAD_FAILED = 3  # Gunicorn's "worker failed to boot": it stops instead of respawning forever
EXIT_ENGINE_DEAD = 1  # any other exit: Gunicorn (or the orchestrator) starts a fresh worker


@dataclass
class Lifecycle:
    """What the server process should do next; read by the serving layer on every tick."""

    drain_requested: bool = False
    exit_requested: bool = False
    exit_code: int = 0

    def fail(self, exit_code: int) -> None:
        """Ask the server to exit with `exit_code` as soon as in-flight responses are sent."""
        self.exit_code = exit_code
        self.exit_requested = True


@dataclass
class ServerContext:
    settings: Settings
    device: DeviceInfo
    scheduler: Scheduler
    executor: ThreadPoolExecutor
    lifecycle: Lifecycle
    results: ResultStore
    _request_ids: itertools.count = field(default_factory=lambda: itertools.count(1))

    def next_request_id(self) -> int:
        """The seed's per-process request counter (1, 2, 3, ...)."""
        return next(self._request_ids)

    @property
    def model(self) -> LoadedModel | None:
        return getattr(self.scheduler.engine, "model", None)

    def submit(self, spec: GenerationSpec, request_id: int) -> Job:
        if self.scheduler.dead:
            raise errors.EngineDead("The model engine is unavailable; the worker is restarting.")
        return self.scheduler.submit(spec, request_id)

    async def in_pool(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Run CPU work (overlay, PNG encoding, file writes) on the THREADS pool."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self.executor, functools.partial(fn, *args, **kwargs))

    async def wait(self, job: Job, request: Request | None = None) -> JobResult:
        """Await the job's result; if the client disconnects first, cancel the job."""
        result = asyncio.wrap_future(job.future)
        if request is None:
            return await result
        gone = asyncio.ensure_future(_disconnected(request))
        try:
            await asyncio.wait({result, gone}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            gone.cancel()
        if not result.done():
            # Nobody will read the cancellation error; retrieve it so asyncio does not warn.
            result.add_done_callback(lambda f: f.cancelled() or f.exception())
            self.scheduler.cancel(job)
            log.info("request %s: client disconnected; job cancelled", job.request_id)
            raise errors.JobCancelled("The client disconnected.")
        return result.result()


async def _disconnected(request: Request) -> None:
    """Return when the client closes the connection (the body has already been read)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


def get_context(request: Request) -> ServerContext:
    """FastAPI dependency: the context of the app serving this request."""
    return request.app.state.ctx
