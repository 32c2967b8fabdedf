"""Per-app state shared by the routers: settings, scheduler, CPU pool, lifecycle."""

from __future__ import annotations

import asyncio
import functools
import itertools
import logging
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Annotated, Any, TypeVar

from fastapi import Depends, Request
from pydantic import BaseModel

from qwen_image_server import errors
from qwen_image_server.api.job_registry import JobRegistry
from qwen_image_server.defaults import GenerationDefaults
from qwen_image_server.engine.device import DeviceInfo
from qwen_image_server.engine.loader import LoadedModel
from qwen_image_server.engine.types import GenerationSpec
from qwen_image_server.postprocess import (
    OverlayInfo,
    add_overlay,
    encode_png,
    output_filename,
    save_atomically,
)
from qwen_image_server.prompt_tokens import check_prompt_tokens, might_exceed, token_counter
from qwen_image_server.results import ResultStore
from qwen_image_server.schemas import GenerateRequest
from qwen_image_server.scheduler import Job, JobResult, Scheduler
from qwen_image_server.settings import Settings

log = logging.getLogger(__name__)
T = TypeVar("T")
B = TypeVar("B", bound=BaseModel)

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
    jobs: JobRegistry
    replica: str | None = None  # this app's name among the replicas of a scaled-out deployment
    _request_ids: itertools.count = field(default_factory=lambda: itertools.count(1))
    defaults: GenerationDefaults = field(init=False)

    def __post_init__(self) -> None:
        self.defaults = GenerationDefaults.from_settings(self.settings)

    def with_defaults(self, body: B) -> B:
        """The body with the server's defaults for steps and CFG where the client left them out
        (they differ from the API's 20 / 4.0 only with a Lightning LoRA or explicit settings)."""
        update = {name: value for name, value in (
            ("num_inference_steps", self.defaults.num_inference_steps),
            ("true_cfg_scale", self.defaults.true_cfg_scale),
        ) if name not in body.model_fields_set}
        return body.model_copy(update=update) if update else body

    def next_request_id(self) -> int:
        """The seed's per-process request counter (1, 2, 3, ...)."""
        return next(self._request_ids)

    @property
    def model(self) -> LoadedModel | None:
        return getattr(self.scheduler.engine, "model", None)

    async def submit(self, specs: Sequence[GenerationSpec], request_id: int) -> list[Job]:
        """Check the prompts' length, then queue every spec of one request together (or none)."""
        for spec in {(s.prompt, s.negative_prompt): s for s in specs}.values():
            await self.check_prompt_length(spec)
        return self.scheduler.submit_many(specs, request_id)

    async def check_prompt_length(self, spec: GenerationSpec) -> None:
        """400 `invalid_request_error` (param prompt / negative_prompt) when either is longer than
        the model reads (`tokenizer_max_length` tokens). While the model loads there is no
        tokenizer yet: nothing is checked."""
        model = self.model
        if model is None:
            return
        limit = model.max_prompt_tokens
        if might_exceed(spec.prompt, limit) or might_exceed(spec.negative_prompt, limit):
            counter = token_counter(model.pipeline.tokenizer)
            await self.in_pool(check_prompt_tokens, counter, limit, spec)

    def count_tokens(self, text: str) -> int | None:
        """Tokens of `text` by the model's tokenizer (None while it loads). CPU work: use in_pool."""
        model = self.model
        return None if model is None else token_counter(model.pipeline.tokenizer).count(text)

    async def in_pool(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Run CPU work (overlay, PNG encoding, file writes) on the THREADS pool."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self.executor, functools.partial(fn, *args, **kwargs))

    async def render(self, body: GenerateRequest, result: JobResult, request_id: int) -> Rendered:
        """Overlay, PNG-encode and (for save_to_file) save atomically, on the THREADS pool."""
        png = await self.in_pool(render, self.device, body, result, request_id)
        file_path = None
        if body.save_to_file:
            name = output_filename(request_id, datetime.now())
            path = await self.in_pool(save_atomically, png, self.settings.output_dir, name)
            file_path = display_path(path)
        return Rendered(png, result.image.width, result.image.height,
                        round(result.inference_time, 3), file_path)

    async def wait(self, job: Job, request: Request | None = None) -> JobResult:
        """Await the job's result; if the client disconnects first, cancel the job."""
        result = asyncio.wrap_future(job.future)
        if request is None:
            return await result
        gone = asyncio.ensure_future(_disconnected(request))
        try:
            await asyncio.wait({result, gone}, return_when=asyncio.FIRST_COMPLETED)
        except asyncio.CancelledError:
            # The request itself was cancelled: Ray Serve's way of saying its client went away.
            self._abandon(job, result)
            raise
        finally:
            gone.cancel()
        if not result.done():
            self._abandon(job, result)
            log.info("request %s: client disconnected; job cancelled", job.request_id)
            raise errors.JobCancelled("The client disconnected.")
        return result.result()

    def _abandon(self, job: Job, result: asyncio.Future[JobResult]) -> None:
        """Cancel a job nobody waits for any more."""
        # Nobody will read the cancellation error; retrieve it so asyncio does not warn.
        result.add_done_callback(lambda f: f.cancelled() or f.exception())
        self.scheduler.cancel(job)


@dataclass(frozen=True, slots=True)
class Rendered:
    """A finished image as the client gets it."""

    png: bytes
    width: int
    height: int
    inference_time: float  # seconds, rounded for the wire
    file_path: str | None  # set when the request asked for save_to_file


def render(device: DeviceInfo, body: GenerateRequest, result: JobResult, request_id: int) -> bytes:
    """Overlay (if asked) and PNG-encode one result."""
    image = result.image
    if body.add_overlay:
        image = add_overlay(image, OverlayInfo(
            device=device.label,
            inference_time=result.inference_time,
            steps=body.num_inference_steps,
            seed=body.seed,
            width=image.width,
            height=image.height,
            request_id=request_id,
        ))
    return encode_png(image)


def display_path(path: Path) -> str:
    """The path as the seed shows it: relative to the server's cwd when under it, with '/'."""
    try:
        return path.resolve().relative_to(Path.cwd().resolve()).as_posix()
    except ValueError:
        return path.as_posix()


async def _disconnected(request: Request) -> None:
    """Return when the client closes the connection (the body has already been read)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


def get_context(request: Request) -> ServerContext:
    """FastAPI dependency: the context of the app serving this request."""
    return request.app.state.ctx


# The type routes declare to receive the context: `ctx: Ctx`.
Ctx = Annotated[ServerContext, Depends(get_context)]
