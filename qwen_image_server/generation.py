"""One request's path, the same for every API and the CLI: defaults, checks, submit, wait, render.

`/generate`, the OpenAI routes, the jobs API and `qwen-image generate` all turn their request into
`GenerationSpec`s and go through `Generation`: the server's defaults fill what the client left out,
prompts longer than the model reads are refused, the specs are queued together (or not at all),
their results awaited (cancelling them when the client leaves) and rendered on the CPU pool.
Nothing here knows about HTTP: a caller that can notice its client leaving passes `gone`.
"""

from __future__ import annotations

import asyncio
import functools
import itertools
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import aclosing
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, TypeVar

from pydantic import BaseModel

from qwen_image_server import errors
from qwen_image_server.defaults import GenerationDefaults
from qwen_image_server.engine.device import DeviceInfo
from qwen_image_server.engine.loader import LoadedModel
from qwen_image_server.engine.types import GenerationSpec
from qwen_image_server.postprocess import (
    MEDIA_TYPES,
    OutputFormat,
    OverlayInfo,
    output_filename,
    render,
    save_atomically,
)
from qwen_image_server.prompt_tokens import check_prompt_tokens, might_exceed, token_counter
from qwen_image_server.scheduler import Job, JobResult, Scheduler
from qwen_image_server.settings import Settings

log = logging.getLogger(__name__)
T = TypeVar("T")

# Returns an awaitable that completes when the client has gone away (called once per wait).
ClientGone = Callable[[], Awaitable[None]]


B = TypeVar("B", bound=BaseModel)  # a request body with num_inference_steps and true_cfg_scale


@dataclass(frozen=True, slots=True)
class Rendered:
    """A finished image as the client gets it."""

    data: bytes
    media_type: str
    width: int
    height: int
    inference_time: float  # seconds, rounded for the wire
    file_path: str | None  # set when the request asked for save_to_file


class Generation:
    """Shared by every route of one app (and by the CLI): owns no state but the request counter."""

    def __init__(self, settings: Settings, device: DeviceInfo, scheduler: Scheduler,
                 executor: ThreadPoolExecutor) -> None:
        self.settings = settings
        self.device = device
        self.scheduler = scheduler
        self.executor = executor
        self.defaults = GenerationDefaults.from_settings(settings)
        self._request_ids = itertools.count(1)

    @property
    def model(self) -> LoadedModel | None:
        """The loaded model (None while it loads, or with an engine that has none)."""
        return getattr(self.scheduler.engine, "model", None)

    def next_request_id(self) -> int:
        """The seed's per-process request counter (1, 2, 3, ...)."""
        return next(self._request_ids)

    def with_defaults(self, body: B) -> B:
        """The body with the server's defaults for steps and CFG where the client left them out
        (they differ from the API's 20 / 4.0 only with a Lightning LoRA or explicit settings)."""
        update = {name: value for name, value in (
            ("num_inference_steps", self.defaults.num_inference_steps),
            ("true_cfg_scale", self.defaults.true_cfg_scale),
        ) if name not in body.model_fields_set}
        return body.model_copy(update=update) if update else body

    # -- checks and submitting --------------------------------------------------------------

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

    async def count_tokens(self, text: str) -> int:
        """Tokens of `text` by the model's tokenizer (0 while it loads), counted on the CPU pool."""
        model = self.model
        if model is None:
            return 0
        return await self.in_pool(token_counter(model.pipeline.tokenizer).count, text)

    async def in_pool(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Run CPU work (tokenizing, overlay, encoding, file writes) on the THREADS pool."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self.executor, functools.partial(fn, *args, **kwargs))

    # -- waiting ----------------------------------------------------------------------------

    def cancel(self, job: Job) -> bool:
        """Cancel a job: a queued one never runs, a running one stops at its next step."""
        return self.scheduler.cancel(job)

    async def wait(self, job: Job, gone: ClientGone | None = None) -> JobResult:
        """Await the job's result; if the client leaves first, cancel the job."""
        result = asyncio.wrap_future(job.future)
        if gone is None:
            return await result
        left = asyncio.ensure_future(gone())
        try:
            await asyncio.wait({result, left}, return_when=asyncio.FIRST_COMPLETED)
        except asyncio.CancelledError:
            # The request itself was cancelled: Ray Serve's way of saying its client went away.
            self._abandon(job, result)
            raise
        finally:
            left.cancel()
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

    async def finished(self, jobs: Sequence[Job], gone: ClientGone | None = None,
                       ping_s: float | None = None) -> AsyncIterator[tuple[int, JobResult] | None]:
        """Yield (index, result) as the jobs finish, and None after every `ping_s` without one.

        The first failure is raised; it, the client leaving, or the caller stopping early
        cancels every job not finished yet.
        """
        index = {asyncio.ensure_future(self.wait(job, gone)): i for i, job in enumerate(jobs)}
        for task in index:
            task.add_done_callback(_mark_read)
        pending = set(index)
        try:
            while pending:
                done, pending = await asyncio.wait(pending, timeout=ping_s,
                                                   return_when=asyncio.FIRST_COMPLETED)
                if not done:
                    yield None
                for task in sorted(done, key=index.__getitem__):
                    yield index[task], task.result()
        finally:
            # Cancelling the job (not the task) lets each wait end normally, at once if queued.
            # Last first: then no job being cancelled can reach the queue's head and start meanwhile.
            for task in sorted(pending, key=index.__getitem__, reverse=True):
                self.scheduler.cancel(jobs[index[task]])

    async def wait_all(self, jobs: Sequence[Job], gone: ClientGone | None = None) -> list[JobResult]:
        """Every job's result, in order; the first failure cancels the others and is raised."""
        results: dict[int, JobResult] = {}
        async with aclosing(self.finished(jobs, gone)) as outcomes:
            async for item in outcomes:
                assert item is not None  # no pings without ping_s
                results[item[0]] = item[1]
        return [results[i] for i in range(len(jobs))]

    # -- rendering --------------------------------------------------------------------------

    async def render(self, job: Job, result: JobResult, *, overlay: bool = False,
                     save_to_file: bool = False, output_format: OutputFormat = "png",
                     compression: int | None = None) -> Rendered:
        """Overlay (if asked), encode and (for save_to_file) save atomically, on the CPU pool."""
        image = result.image
        info = OverlayInfo(
            device=self.device.label,
            inference_time=result.inference_time,
            steps=job.spec.num_inference_steps,
            seed=job.spec.seed,
            width=image.width,
            height=image.height,
            request_id=job.request_id,
        ) if overlay else None
        data = await self.in_pool(render, image, info, output_format, compression)
        file_path = None
        if save_to_file:
            name = output_filename(job.request_id, datetime.now())
            path = await self.in_pool(save_atomically, data, self.settings.output_dir, name)
            file_path = display_path(path)
        return Rendered(data, MEDIA_TYPES[output_format], image.width, image.height,
                        round(result.inference_time, 3), file_path)


def _mark_read(task: asyncio.Future[JobResult]) -> None:
    # Once one job failed nobody reads the others' outcomes; don't let asyncio warn about them.
    if not task.cancelled():
        task.exception()


def display_path(path: Path) -> str:
    """The path as the seed shows it: relative to the server's cwd when under it, with '/'."""
    try:
        return path.resolve().relative_to(Path.cwd().resolve()).as_posix()
    except ValueError:
        return path.as_posix()
