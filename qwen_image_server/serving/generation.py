"""One request's path, the same for every API and the CLI: defaults, checks, submit, wait, render.

`/generate`, `/edit`, the OpenAI routes, the jobs API and `qwen-image generate|edit` all turn their
request into `GenerationSpec`s (or `EditSpec`s) and go through `Generation`: the model is picked by
name or task, uploads are decoded and checked on the CPU pool, the server's defaults fill what the
client left out,
prompts longer than the model reads are refused, the specs are queued together (or not at all),
their results awaited (cancelling them when the client leaves) and rendered on the CPU pool.
Nothing here knows about HTTP: a caller that can notice its client leaving passes `gone`.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import itertools
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import aclosing
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Protocol, TypeVar

from PIL import Image
from pydantic import BaseModel

from qwen_image_server import errors
from qwen_image_server.config.model_list import EMBEDDED
from qwen_image_server.config.settings import Settings
from qwen_image_server.engine.contract import facts_of
from qwen_image_server.engine.device import DeviceInfo
from qwen_image_server.engine.loaded import LoadedModel
from qwen_image_server.engine.lora_library import LoraLibrary
from qwen_image_server.engine.types import (
    EditSpec,
    GenerationSpec,
    LoraSet,
    Preview,
    PreviewPlan,
    Task,
    normalise_loras,
)
from qwen_image_server.job_state import JobEvent
from qwen_image_server.protocol.common import (
    MAX_SIDE,
    MIN_SIDE,
    SIDE_MULTIPLE,
    LoraChoice,
    OutputFormat,
    parse_edit_size,
)
from qwen_image_server.protocol.native import EditRequest, GenerateRequest
from qwen_image_server.scheduler import Job, JobResult, Scheduler
from qwen_image_server.serving.defaults import GenerationDefaults
from qwen_image_server.serving.prompt_tokens import (
    check_prompt_tokens,
    might_exceed,
    token_counter,
)
from qwen_image_server.serving.render import (
    MEDIA_TYPES,
    PREVIEW_FORMAT,
    PREVIEW_QUALITY,
    OverlayInfo,
    output_filename,
    preview_size,
    render,
    render_preview,
    save_atomically,
)
from qwen_image_server.serving.uploads import (
    EditInputs,
    Upload,
    default_output_size,
    read_edit_inputs,
)

log = logging.getLogger(__name__)
T = TypeVar("T")

# Returns an awaitable that completes when the client has gone away (called once per wait).
ClientGone = Callable[[], Awaitable[None]]


B = TypeVar("B", bound=BaseModel)  # a request body with num_inference_steps and true_cfg_scale


# OpenAI's own model names: code written for OpenAI sends them; they mean "the server's model for
# this task" rather than a 404.
_OPENAI_MODEL_PREFIXES = ("gpt-image", "dall-e")
# Tasks of the embedded models, known before they load.
_EMBEDDED_TASKS: dict[str, Task] = dict(zip(EMBEDDED, ("generate", "edit"), strict=True))


class EditParams(Protocol):
    """What an edit request says besides its images (/edit's and OpenAI's bodies both do)."""

    negative_prompt: str
    num_inference_steps: int
    true_cfg_scale: float
    strength: float
    size: str | None

    @property
    def model_prompt(self) -> str: ...


@dataclass(frozen=True, slots=True)
class ModelChoice:
    """The model a request runs on."""

    name: str  # "" while the models load and the request named none: the first for its task
    max_images: int  # input images it takes (edits)
    one_prompt_per_call: bool  # QwenImageEditPlusPipeline: batches only one prompt's seeds


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
        self._loras = LoraLibrary.from_settings(settings)  # until the engine's own is loaded

    @property
    def loras(self) -> LoraLibrary:
        """The LoRA library: the engine's once loaded (it knows what is resident and unusable)."""
        return facts_of(self.scheduler.engine).loras or self._loras

    @property
    def model(self) -> LoadedModel | None:
        """The loaded model (None while it loads, or with an engine that has none)."""
        return facts_of(self.scheduler.engine).model

    @property
    def models(self) -> list[LoadedModel]:
        """Every loaded model, the first first (empty while they load)."""
        return list(facts_of(self.scheduler.engine).models)

    def model_tasks(self) -> dict[str, Task | None]:
        """Public name -> task of every configured model (None: not known until it loads)."""
        loaded = {model.name: model.task for model in self.models}
        if loaded:
            return dict(loaded)
        return {ref.name: _EMBEDDED_TASKS.get(ref.source) for ref in self.settings.models}

    def pick_model(self, requested: str | None, task: Task) -> ModelChoice:
        """The model named (404 `model_not_found` for a name this server does not serve; 400 when
        it cannot do `task`), or the first that can; 400 naming `model` when none can."""
        tasks = self.model_tasks()
        if requested is not None and requested.startswith(_OPENAI_MODEL_PREFIXES):
            requested = None
        if requested is not None and requested not in tasks:
            raise errors.NotFound(
                f"The model '{requested}' does not exist; this server serves {_listing(tasks)}.",
                param="model", code="model_not_found")
        able = [name for name, can in tasks.items() if can == task]
        if requested is None:
            if not able and None in tasks.values():
                return ModelChoice("", 3, True)  # still loading: the engine picks
            if not able:
                raise errors.InvalidRequest(
                    f"This server has no {_TASK_MODELS[task]}; it serves {_listing(tasks)}. Start it "
                    f"with one in QWEN_IMAGE_MODEL (e.g. {_EXAMPLES[task]}).",
                    param="model", code="model_cannot_do_task")
            requested = able[0]
        elif tasks[requested] not in (task, None):
            others = f"use one of: {', '.join(able)}" if able else f"this server has no {_TASK_MODELS[task]}"
            raise errors.InvalidRequest(
                f"The model '{requested}' {_DOES[tasks[requested]]}, it cannot {task}; {others}.",
                param="model", code="model_cannot_do_task")
        loaded = {model.name: model for model in self.models}.get(requested)
        if loaded is None:
            return ModelChoice(requested, 3, True)
        return ModelChoice(requested, loaded.max_images,
                           loaded.pipeline_class == "QwenImageEditPlusPipeline")

    def edit_specs(self, body: EditParams, inputs: EditInputs, model: ModelChoice,
                   seeds: Sequence[int], loras: LoraSet = (),
                   preview: PreviewPlan | None = None) -> list[EditSpec]:
        """One EditSpec per seed: the body's parameters on the decoded inputs, at the asked size
        or the first image's (snapped to what the models take), with `preview`'s previews."""
        width, height = parse_edit_size(body.size) or default_output_size(
            inputs.first_size, MIN_SIDE, MAX_SIDE, SIDE_MULTIPLE)
        return [
            EditSpec(
                prompt=body.model_prompt,
                negative_prompt=body.negative_prompt,
                width=width,
                height=height,
                num_inference_steps=body.num_inference_steps,
                true_cfg_scale=body.true_cfg_scale,
                seed=seed,
                model=model.name,
                images=inputs.images,
                mask=inputs.mask,
                strength=body.strength if inputs.mask is not None else 1.0,
                inputs_digest=inputs.digest,
                one_prompt_per_call=model.one_prompt_per_call,
                loras=loras,
                preview=preview,
            )
            for seed in seeds
        ]

    async def native_edit(self, body: EditRequest, images: Sequence[Upload],
                          mask: Upload | None) -> tuple[EditRequest, EditSpec]:
        """The one spec of a native edit (/edit, /v1/jobs/edit): defaults filled in, the model
        picked, the uploads read; returns the completed body too."""
        body = self.with_defaults(body)
        model = self.pick_model(body.model, "edit")
        loras = await self.check_loras(body.loras, model)
        inputs = await self.read_edit_inputs(images, mask, model)
        [spec] = self.edit_specs(body, inputs, model, [body.seed], loras)
        return body, spec

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

    def next_request_id(self) -> int:
        """The seed's per-process request counter (1, 2, 3, ...)."""
        return next(self._request_ids)

    def with_defaults(self, body: B) -> B:
        """The body with the server's defaults for steps and CFG where the client left them out
        (they differ from the API's 20 / 4.0 only with a Lightning LoRA or explicit settings). A
        Lightning LoRA named in the request sets them for this request: its step count, no CFG."""
        steps, cfg = self.defaults.num_inference_steps, self.defaults.true_cfg_scale
        named = normalise_loras((choice.name, choice.scale) for choice in getattr(body, "loras", ()))
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

    async def generate_spec(self, body: GenerateRequest) -> GenerationSpec:
        """The spec of a native generation (/generate, /v1/jobs, `qwen-image generate`): the
        body (defaults already filled in) on the first generation model, its LoRAs checked."""
        model = self.pick_model(None, "generate")
        return dataclasses.replace(body.to_spec(), model=model.name,
                                   loras=await self.check_loras(body.loras, model))

    def loading_lora(self, job: Job) -> str | None:
        """The LoRA the engine is loading for this running job right now, if any."""
        engine = self.scheduler.engine if job.engine is None else self.scheduler.engine_at(job.engine)
        loading = facts_of(engine).loading_loras
        if not loading or not job.spec.loras:
            return None
        names = {name for name, _ in job.spec.loras}
        return next((name for name in loading.values() if name in names), None)

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
                       ping_s: float | None = None, wake: Callable[[], Awaitable[Any]] | None = None,
                       ) -> AsyncIterator[tuple[int, JobResult] | None]:
        """Yield (index, result) as the jobs finish, and None after every `ping_s` without one
        and whenever `wake()` completes (it is then called again: e.g. a preview is waiting).

        The first failure is raised; it, the client leaving, or the caller stopping early
        cancels every job not finished yet.
        """
        index = {asyncio.ensure_future(self.wait(job, gone)): i for i, job in enumerate(jobs)}
        for task in index:
            task.add_done_callback(_mark_read)
        pending = set(index)
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

    # -- rendering --------------------------------------------------------------------------

    async def render(self, job: Job, result: JobResult, *, overlay: bool = False,
                     save_to_file: bool = False, output_format: OutputFormat = "png",
                     compression: int | None = None) -> Rendered:
        """Overlay (if asked), encode and (for save_to_file) save atomically, on the CPU pool."""
        info = OverlayInfo(
            device=self.device.label,
            inference_time=result.inference_time,
            steps=job.spec.num_inference_steps,
            seed=job.spec.seed,
            width=job.spec.width,
            height=job.spec.height,
            request_id=job.request_id,
        ) if overlay else None
        size = (job.spec.width, job.spec.height)
        data = await self.in_pool(render, result.image, info, output_format, compression, size, _kept(job))
        file_path = None
        if save_to_file:
            name = output_filename(job.request_id, datetime.now())
            path = await self.in_pool(save_atomically, data, self.settings.output_dir, name)
            file_path = display_path(path)
        return Rendered(data, MEDIA_TYPES[output_format], size[0], size[1],
                        round(result.inference_time, 3), file_path)

    async def render_preview(self, job: Job, preview: Preview, *, output_format: OutputFormat = PREVIEW_FORMAT,
                             compression: int | None = PREVIEW_QUALITY, full_size: bool = False) -> Rendered:
        """Encode a preview on the CPU pool: at the image's size when `full_size`, else small
        (see `render.preview_size`); `inference_time` is the engine's time making it."""
        size = (job.spec.width, job.spec.height)
        if not full_size:
            size = preview_size(preview.image, size)
        data = await self.in_pool(render_preview, preview.image, size, output_format, compression, _kept(job))
        return Rendered(data, MEDIA_TYPES[output_format], size[0], size[1], round(preview.seconds, 3), None)

    def preview_feed(self, jobs: Sequence[Job]) -> PreviewFeed:
        """The previews of `jobs` as they come (close it when done)."""
        return PreviewFeed(self.scheduler, jobs, asyncio.get_running_loop())


class PreviewFeed:
    """The newest unread preview of each of some jobs: the engine thread drops them in, the event
    loop takes them. A reader that falls behind gets the newest, never a backlog."""

    def __init__(self, scheduler: Scheduler, jobs: Sequence[Job], loop: asyncio.AbstractEventLoop) -> None:
        self._scheduler = scheduler
        self._loop = loop
        self._latest: dict[int, Preview] = {}
        self.ready = asyncio.Event()
        self._listeners = [(job, functools.partial(self._heard, index)) for index, job in enumerate(jobs)]
        for job, listener in self._listeners:
            scheduler.add_listener(job, listener)

    def _heard(self, index: int, job: Job, event: JobEvent) -> None:  # engine thread
        if event is JobEvent.PREVIEW and job.preview is not None:
            self._loop.call_soon_threadsafe(self._put, index, job.preview)

    def _put(self, index: int, preview: Preview) -> None:
        self._latest[index] = preview
        self.ready.set()

    def take(self) -> list[tuple[int, Preview]]:
        """The unread previews, by job index; none are unread afterwards."""
        taken = sorted(self._latest.items(), key=lambda item: item[0])
        self._latest.clear()
        self.ready.clear()
        return taken

    def close(self) -> None:
        for job, listener in self._listeners:
            self._scheduler.remove_listener(job, listener)


_TASK_MODELS = {"generate": "generation model", "edit": "edit model"}
_DOES = {"generate": "generates images", "edit": "edits images", None: "is loading"}
_EXAMPLES = {"generate": "QWEN_IMAGE_MODEL=Qwen/Qwen-Image,Qwen/Qwen-Image-Edit-2509",
             "edit": "QWEN_IMAGE_MODEL=Qwen/Qwen-Image,Qwen/Qwen-Image-Edit-2509"}


def _listing(tasks: dict[str, Task | None]) -> str:
    return ", ".join(f"'{name}' ({task or 'loading'})" for name, task in tasks.items())


def _lora_listing(known: dict[str, object]) -> str:
    if not known:
        return "this server has none (QWEN_IMAGE_LORA_DIR, QWEN_IMAGE_LORAS)"
    names = sorted(known)
    more = f" and {len(names) - 8} more (GET /v1/loras)" if len(names) > 8 else ""
    return f"available: {', '.join(names[:8])}{more}"


def _kept(job: Job) -> tuple[Image.Image, Image.Image] | None:
    """A masked edit's (original, mask): outside the mask the original is kept (see `render`)."""
    spec = job.spec
    return (spec.images[0], spec.mask) if isinstance(spec, EditSpec) and spec.mask is not None else None


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
