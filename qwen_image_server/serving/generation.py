"""One request's path, the same for every API and the CLI: defaults, checks, submit, wait, render.

`/generate`, `/edit`, the OpenAI routes, the jobs API and `qwen-image generate|edit` all parse
their request, then `prepare` it (the server's defaults fill what the client left out, the model
is picked by name or task, LoRAs and uploads are checked on the CPU pool, one spec per image),
`submit` it (prompts longer than the model reads are refused; the specs are queued together, or
not at all), `wait` for its results (cancelling them when the client leaves) and render them on
the CPU pool (`renderer`, serving/rendering.py). Nothing here knows about HTTP: a caller that
can notice its client leaving passes `gone`.
"""

from __future__ import annotations

import asyncio
import functools
import itertools
import logging
from collections.abc import AsyncGenerator, Awaitable, Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import aclosing
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from qwen_image_server import errors
from qwen_image_server.config.api_keys import ANONYMOUS, Caller
from qwen_image_server.config.settings import Settings
from qwen_image_server.engine.device import DeviceInfo
from qwen_image_server.engine.loaded import LoadedModel
from qwen_image_server.engine.lora_library import LoraLibrary
from qwen_image_server.engine.types import (
    GenerationSpec,
    LoraSet,
    PreviewPlan,
    Task,
    normalise_loras,
)
from qwen_image_server.protocol.common import (
    LoraChoice,
    NativeImageFields,
    PromptFields,
    random_seed,
    seeds,
)
from qwen_image_server.scheduler import Job, JobResult, Scheduler
from qwen_image_server.serving.defaults import GenerationDefaults
from qwen_image_server.serving.model_registry import ModelChoice, ModelRegistry
from qwen_image_server.serving.object_store import ObjectStore
from qwen_image_server.serving.output_folder import OutputFolder
from qwen_image_server.serving.picture_checks import pictures_sent
from qwen_image_server.serving.preview_mailbox import LatestPreviews, PreviewWatch
from qwen_image_server.serving.prompt_tokens import (
    check_prompt_tokens,
    might_exceed,
    token_counter,
)
from qwen_image_server.serving.quotas import KeyQuotas
from qwen_image_server.serving.rendering import Renderer
from qwen_image_server.serving.specs import build_layered_specs, build_specs
from qwen_image_server.serving.uploads import (
    EditInputs,
    GenerationPictures,
    Upload,
    field_names,
    read_edit_inputs,
    read_generation_pictures,
    read_layered_input,
)

log = logging.getLogger(__name__)
T = TypeVar("T")

# Returns an awaitable that completes when the client has gone away (called once per wait).
ClientGone = Callable[[], Awaitable[None]]


B = TypeVar("B", bound=PromptFields)  # a request body: what to make, and its size rule


@dataclass(frozen=True, slots=True)
class Prepared(Generic[B]):
    """A request ready to queue: its id, its body with the server's defaults, its model, its specs."""

    request_id: int
    body: B
    model: ModelChoice
    specs: list[GenerationSpec]
    inputs: EditInputs | None = None  # an edit's decoded images
    caller: Caller = ANONYMOUS  # whose jobs these are, and whose limits apply
    uploads: tuple[Upload, ...] = ()  # an edit's images as sent (what a job store keeps to run it again)
    mask_upload: Upload | None = None


class Generation:
    """Shared by every route of one app (and by the CLI): owns no state but the request counter."""

    def __init__(self, settings: Settings, device: DeviceInfo, scheduler: Scheduler,
                 executor: ThreadPoolExecutor, objects: ObjectStore | None = None) -> None:
        self.settings = settings
        self.device = device
        self.scheduler = scheduler
        self.executor = executor
        self.objects = objects  # the shared storage of finished images (QWEN_IMAGE_RESULTS_URL)
        self.defaults = GenerationDefaults.from_settings(settings)
        self.models = ModelRegistry(settings, scheduler)
        self.quotas = KeyQuotas()
        self.output = OutputFolder.from_settings(settings)
        self.renderer = Renderer(settings, device, objects, self.in_pool)
        self._request_ids = itertools.count(1)

    @property
    def loras(self) -> LoraLibrary:
        """The LoRA library requests name their LoRAs from (see ModelRegistry.loras)."""
        return self.models.loras

    @property
    def model(self) -> LoadedModel | None:
        """The first loaded model (None while it loads, or with an engine that has none)."""
        return self.models.model

    async def prepare(self, body: B, task: Task, *, model: str | None = None, images: Sequence[Upload] = (),
                      mask: Upload | None = None, n: int = 1, preview: PreviewPlan | None = None,
                      caller: Caller = ANONYMOUS, readmit: bool = False, layers: int = 4,
                      resolution: int = 640) -> Prepared[B]:
        """Every route's and the CLI's one way from a parsed body to specs: a request id, the
        server's defaults, the model (`model` named, or the first for `task`), the LoRAs checked,
        an edit's uploads decoded and checked, one spec per image (`n`, seeds from the body's
        seed or a random one) with `preview`'s previews. Raises the request's 4xx error. `admit`
        comes first (the queue's room, `caller`'s limits, the disk for a save), so a refused
        request costs none of that work; `readmit`: a job accepted before a restart, admitted
        then."""
        request_id = self.next_request_id()
        if not readmit:
            await self.admit(body, n, caller)
        body = self.with_defaults(body)
        choice = self.models.pick(model, task)
        loras = await self.check_loras(body.loras, choice)
        base = body.seed if body.seed is not None else random_seed()
        if task == "layered":  # one picture in, `layers` RGBA layers out
            if mask is not None:
                raise errors.InvalidRequest("A layered model splits a whole image: it takes no mask.",
                                            param="mask", code="mask_not_supported")
            if preview is not None and preview.mode != "latent":
                raise errors.InvalidRequest("A layered job's previews are latent previews (preview=latent): the "
                                            "layers side by side.", param="preview", code="preview_not_supported")
            picture = await self.in_pool(read_layered_input, images, self.settings.max_input_pixels)
            layered = build_layered_specs(body, model=choice, loras=loras, seeds=seeds(base, n), picture=picture,
                                          layers=layers, resolution=resolution, preview=preview)
            return Prepared(request_id, body, choice, layered, None, caller, tuple(images), mask)
        inputs = await self.read_edit_inputs(images, mask, choice) if task == "edit" else None
        pictures = await self.read_generation_pictures(body, choice) if task == "generate" else None
        specs = build_specs(body, model=choice, loras=loras, seeds=seeds(base, n), inputs=inputs, preview=preview,
                            pictures=pictures)
        return Prepared(request_id, body, choice, specs, inputs, caller, tuple(images), mask)

    async def admit(self, body: PromptFields, n: int, caller: Caller) -> None:
        """Admission, the first thing `prepare` does: refuse a request of `n` images that could
        not be queued now (QueueFull with Retry-After, ShuttingDown, EngineDead), that is over
        `caller`'s limits (RateLimited), or that asks to save while the output disk is low
        (InsufficientStorage), before its uploads are decoded, its LoRAs checked or its prompt
        tokenized. That work runs on the shared CPU pool, and a request refused anyway must not
        take it from accepted ones. Every rule that can refuse a request from its size alone
        belongs here. `submit` still decides: the queue may fill up between the two."""
        self.scheduler.check_room(n)
        self.quotas.admit(caller, n, self.scheduler.retry_after)  # after the queue: a 429 there costs no quota
        if isinstance(body, NativeImageFields) and body.save_to_file:
            await self.in_pool(self.output.check_space)

    async def read_edit_inputs(self, images: Sequence[Upload], mask: Upload | None,
                               model: ModelChoice) -> EditInputs:
        """Decode and check the uploads on the CPU pool (400 naming the field otherwise)."""
        if not images:
            raise errors.InvalidRequest("An edit needs at least one image ('image').", param="image",
                                        code="missing_image")
        limit = min(model.max_images, self.settings.max_input_images)
        if len(images) > limit:
            who = f"the model '{model.name}'" if model.name else "this server's edit model"
            raise errors.InvalidRequest(
                f"{len(images)} images were sent; {who} takes at most {limit}.",
                param="image", code="too_many_images")
        if mask is not None and len(images) > 1:
            raise errors.InvalidRequest(
                "A mask edits one image: send a single image with it.", param="mask",
                code="mask_with_several_images")
        return await self.in_pool(read_edit_inputs, images, mask, self.settings.max_input_pixels)

    async def read_generation_pictures(self, body: PromptFields, model: ModelChoice) -> GenerationPictures | None:
        """A generation's picture to start from (and mask) or control images (and, for ControlNet
        inpainting, a mask), checked against each other and the model (`pictures_sent`), then
        decoded on the CPU pool (400 naming the field otherwise); None for a plain text-to-image
        request."""
        image, mask, controls = pictures_sent(body, model)
        if image is None and not controls:
            return None
        fields = field_names(len(controls), "control_image")
        return await self.in_pool(
            read_generation_pictures,
            Upload("image", image) if image is not None else None,
            Upload("mask", mask) if mask is not None else None,
            [Upload(name, data) for name, data in zip(fields, controls, strict=True)],
            body.output_size(None), self.settings.max_input_pixels)

    def next_request_id(self) -> int:
        """The seed's request counter (1, 2, 3, ...; with a job store, it goes on after a restart)."""
        return next(self._request_ids)

    def continue_request_ids(self, last: int) -> None:
        """Count on from `last` (the highest request id a job store kept)."""
        self._request_ids = itertools.count(last + 1)

    def with_defaults(self, body: B) -> B:
        """The body with the server's defaults for steps and CFG where the client left them out
        (they differ from the API's 20 / 4.0 only with a Lightning LoRA or explicit settings). A
        Lightning LoRA named in the request sets them for this request: its step count, no CFG."""
        steps, cfg = self.defaults.num_inference_steps, self.defaults.true_cfg_scale
        named = normalise_loras((choice.name, choice.scale) for choice in body.loras)
        lightning = self.loras.lightning_steps(named) if named else None
        if lightning is not None:
            steps, cfg = lightning, 1.0
        update = {name: value for name, value in (
            ("num_inference_steps", steps),
            ("true_cfg_scale", cfg),
        ) if name not in body.model_fields_set}
        return body.model_copy(update=update) if update else body

    async def check_loras(self, choices: Sequence[LoraChoice], model: ModelChoice) -> LoraSet:
        """A request's LoRAs, checked against the library and the model before anything is queued
        (400 naming `loras` or `loras[i].name`), in their canonical form for the spec."""
        if not choices:
            return ()
        limit = self.settings.max_loras_per_request
        if len(choices) > limit:
            raise errors.InvalidRequest(
                f"{len(choices)} LoRAs were named; this server applies at most {limit} per request "
                "(QWEN_IMAGE_MAX_LORAS_PER_REQUEST).", param="loras", code="too_many_loras")
        library = self.loras
        known = library.entries()
        seen: set[str] = set()
        for index, choice in enumerate(choices):
            param = f"loras[{index}].name"
            if choice.name in seen:
                raise errors.InvalidRequest(f"The LoRA '{choice.name}' is named twice; give it once, with "
                                            "the scale you want.", param=param, code="duplicate_lora")
            seen.add(choice.name)
            if choice.name not in known:
                raise errors.InvalidRequest(
                    f"There is no LoRA named '{choice.name}'; {_lora_listing(known)}.", param=param,
                    code="lora_not_found")
            problem = await self.in_pool(library.problem, choice.name, model.name)
            if problem is not None:
                raise errors.LoraUnusable(problem, param=param)
        return normalise_loras((choice.name, choice.scale) for choice in choices)

    # -- checks and submitting --------------------------------------------------------------

    async def submit(self, prepared: Prepared[Any], ids: Sequence[str] | None = None,
                     readmit: bool = False) -> list[Job]:
        """Check the prompts' length, then queue every spec of one request together (or none),
        as its caller's jobs (within the caller's limit of jobs in flight). `ids`: the jobs' ids,
        made beforehand; `readmit`: jobs accepted before a restart (no limit applies again)."""
        specs, caller = prepared.specs, prepared.caller
        for spec in {(s.prompt, s.negative_prompt): s for s in specs}.values():
            await self.check_prompt_length(spec)
        # No await between the check and the queueing: the count cannot change in between.
        if not readmit:
            self.quotas.check_jobs(caller, len(specs), self.scheduler.retry_after)
        jobs = self.scheduler.submit_many(specs, prepared.request_id, owner=caller.id, ids=ids, readmit=readmit)
        self.quotas.track(caller, jobs)
        return jobs

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
        left: asyncio.Future[None] = asyncio.ensure_future(gone())
        try:
            waiting: list[asyncio.Future[Any]] = [result, left]
            await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
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
                       ping_s: float | None = None, wake: Callable[[], Awaitable[Any]] | None = None,
                       ) -> AsyncGenerator[tuple[int, JobResult] | None, None]:
        """Yield (index, result) as the jobs finish, and None after every `ping_s` without one
        and whenever `wake()` completes (it is then called again: e.g. a preview is waiting).

        The first failure is raised; it, the client leaving, or the caller stopping early
        cancels every job not finished yet.
        """
        index: dict[asyncio.Future[Any], int] = {
            asyncio.ensure_future(self.wait(job, gone)): i for i, job in enumerate(jobs)}
        for task in index:
            task.add_done_callback(_mark_read)
        pending: set[asyncio.Future[Any]] = set(index)
        waker: asyncio.Future[Any] | None = None
        try:
            while pending:
                if wake is not None and waker is None:
                    waker = asyncio.ensure_future(wake())
                done, _ = await asyncio.wait(pending | ({waker} if waker else set()), timeout=ping_s,
                                             return_when=asyncio.FIRST_COMPLETED)
                if waker is not None and waker in done:
                    waker = None
                done &= pending
                pending -= done
                if not done:
                    yield None
                for task in sorted(done, key=index.__getitem__):
                    yield index[task], task.result()
        finally:
            if waker is not None:
                waker.cancel()
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

    def watch_previews(self, jobs: Sequence[Job]) -> PreviewWatch:
        """The previews of `jobs` as they come, newest only (close it when done)."""
        return PreviewWatch(self.scheduler, jobs, LatestPreviews(asyncio.get_running_loop()))


def _lora_listing(known: Mapping[str, object]) -> str:
    if not known:
        return "this server has none (QWEN_IMAGE_LORA_DIR, QWEN_IMAGE_LORAS)"
    names = sorted(known)
    more = f" and {len(names) - 8} more (GET /v1/loras)" if len(names) > 8 else ""
    return f"available: {', '.join(names[:8])}{more}"


def _mark_read(task: asyncio.Future[JobResult]) -> None:
    # Once one job failed nobody reads the others' outcomes; don't let asyncio warn about them.
    if not task.cancelled():
        task.exception()
