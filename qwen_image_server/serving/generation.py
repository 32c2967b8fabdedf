"""One request's path, the same for every API and the CLI: defaults, checks, submit, wait, render.

`/generate`, `/edit`, the OpenAI routes, the jobs API and `qwen-image generate|edit` all parse
their request, then `prepare` it (the server's defaults fill what the client left out, the model
is picked by name or task, LoRAs and uploads are checked on the CPU pool, one spec per image),
`submit` it (prompts longer than the model reads are refused; the specs are queued together, or
not at all), `wait` for its results (cancelling them when the client leaves) and `render` them on
the CPU pool. Nothing here knows about HTTP: a caller that can notice its client leaving passes
`gone`.
"""

from __future__ import annotations

import asyncio
import errno
import functools
import itertools
import logging
import time
from collections.abc import AsyncGenerator, Awaitable, Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import aclosing
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Generic, TypeVar

import anyio
from PIL import Image

from qwen_image_server import errors
from qwen_image_server.config.api_keys import ANONYMOUS, Caller
from qwen_image_server.config.settings import Settings
from qwen_image_server.engine.device import DeviceInfo
from qwen_image_server.engine.loaded import LoadedModel
from qwen_image_server.engine.lora_library import LoraLibrary
from qwen_image_server.engine.types import (
    GenerationSpec,
    LayeredSpec,
    LoraSet,
    Preview,
    PreviewPlan,
    Task,
    normalise_loras,
)
from qwen_image_server.protocol.common import (
    MAX_CONTROL_IMAGES,
    ControlFields,
    ErrorDetail,
    LoraChoice,
    NativeImageFields,
    OutputFormat,
    PromptFields,
    StartImageFields,
    random_seed,
    seeds,
)
from qwen_image_server.scheduler import Job, JobResult, Scheduler
from qwen_image_server.serving.defaults import GenerationDefaults
from qwen_image_server.serving.layers import encode_layered, layers_zip
from qwen_image_server.serving.model_registry import ModelChoice, ModelRegistry
from qwen_image_server.serving.object_store import ObjectStore, file_key
from qwen_image_server.serving.output_folder import OutputFolder
from qwen_image_server.serving.preview_mailbox import LatestPreviews, PreviewWatch
from qwen_image_server.serving.prompt_tokens import (
    check_prompt_tokens,
    might_exceed,
    token_counter,
)
from qwen_image_server.serving.quotas import KeyQuotas
from qwen_image_server.serving.render import (
    MEDIA_TYPES,
    PREVIEW_FORMAT,
    PREVIEW_QUALITY,
    OverlayInfo,
    encode_png,
    output_filename,
    preview_size,
    render,
    render_preview,
    save_atomically,
)
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


@dataclass(frozen=True, slots=True)
class Rendered:
    """A finished image as the client gets it."""

    data: bytes
    media_type: str
    width: int
    height: int
    inference_time: float  # seconds, rounded for the wire
    file_path: str | None  # set when the request asked for save_to_file and the file was saved
    save_error: ErrorDetail | None = None  # why a save_to_file request's file could not be saved


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
        inpainting, a mask), checked against each other and the model, then decoded on the CPU
        pool (400 naming the field otherwise); None for a plain text-to-image request."""
        start = body if isinstance(body, StartImageFields) else None
        control = body if isinstance(body, ControlFields) else None
        image = start.image if start is not None else None
        mask = start.mask if start is not None else None
        controls: list[str] = control.control_images if control is not None else []
        if start is not None and image is None:
            if mask is not None and not controls:
                raise errors.InvalidRequest(
                    "A mask says which part of a picture to change: send the picture too, as 'image' "
                    "(inpainting) or as 'control_image' (ControlNet inpainting).",
                    param="mask", code="mask_without_image")
            if start.strength is not None:
                raise errors.InvalidRequest("'strength' says how far to move from 'image'; send the image too.",
                                            param="strength", code="strength_without_image")
        if control is not None and not controls and control.control_settings_given:
            raise errors.InvalidRequest(
                f"{', '.join(control.control_settings_given)} steer a ControlNet, which needs a control image "
                "('control_image').", param="control_image", code="missing_control_image")
        if control is not None and controls:
            if image is not None:
                raise errors.InvalidRequest(
                    "A request either starts from a picture ('image') or is steered by a control image "
                    "('control_image'), not both (with 'mask', 'control_image' is the picture a ControlNet "
                    "inpaints).", param="control_image", code="control_with_image")
            if mask is not None:
                _check_controlnet_inpainting(control, model)
            else:
                _check_control_images(control, model)
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

    # -- rendering --------------------------------------------------------------------------

    async def render(self, job: Job, result: JobResult, *, overlay: bool = False,
                     save_to_file: bool = False, output_format: OutputFormat = "png",
                     compression: int | None = None) -> Rendered:
        """Overlay (if asked), encode and (for save_to_file) save atomically, on the CPU pool;
        with a bucket (QWEN_IMAGE_RESULTS_URL=s3://...) the saved file is uploaded too, for its link.

        A save that fails (disk full, folder unwritable, the upload refused, ...) loses nothing
        but the file: the image made with GPU time is still delivered, with `save_error` saying
        why there is no file, and the failure is logged."""
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
        file_path = save_error = None
        if save_to_file:
            name = output_filename(job.request_id, datetime.now())
            try:
                path = await self.in_pool(save_atomically, data, self.settings.output_dir, name)
            except OSError as exc:
                save_error = _save_failed(job, exc)
            else:
                save_error = await self._upload_saved(job, path.name, data)
                file_path = display_path(path) if save_error is None else None
        return Rendered(data, MEDIA_TYPES[output_format], size[0], size[1],
                        round(result.inference_time, 3), file_path, save_error)

    async def _upload_saved(self, job: Job, name: str, data: bytes) -> ErrorDetail | None:
        """Copy a saved file to the bucket, where its link (`file_url`) points; why not, if it failed."""
        objects = self.objects
        if objects is None or not objects.links:
            return None  # a folder's or this server's files are served by /files links
        try:
            await anyio.to_thread.run_sync(functools.partial(
                objects.put, file_key(job.id, name), data, "image/png", owner=job.owner,
                expires_at=time.time() + self.settings.file_link_ttl_s))
        except objects.failures as exc:  # any storage failure: the client still gets its image
            log.error("request %d: uploading its saved image to %s failed (%s: %s); it is delivered without "
                      "a file", job.request_id, objects.location, type(exc).__name__, exc)
            return ErrorDetail.of(errors.SaveFailed(
                "The image was made and saved on the server, but copying it to the shared storage failed, so "
                "there is no link to it; the image itself is delivered all the same (in b64_json, or at a "
                "job's image_url).", code="upload_failed"))
        return None

    async def render_layers(self, job: Job, result: JobResult) -> list[Rendered]:
        """A layered job's layers, one RGBA PNG each, in order (the engine gives them side by side)."""
        spec = job.spec
        assert isinstance(spec, LayeredSpec)
        strip = result.image
        width = strip.width // spec.layers

        def encode() -> list[bytes]:
            return [encode_png(strip.crop((i * width, 0, (i + 1) * width, strip.height)))
                    for i in range(spec.layers)]

        return [Rendered(data, MEDIA_TYPES["png"], width, strip.height, round(result.inference_time, 3), None)
                for data in await self.in_pool(encode)]

    async def render_stacked(self, job: Job, result: JobResult) -> tuple[Rendered, bytes]:
        """A layered job's results: its layers stacked into one PNG (layer 0 at the bottom), and
        the ZIP of its layers (RGBA PNGs equal to `render_layers`')."""
        spec = job.spec
        assert isinstance(spec, LayeredSpec)
        picture, layers = await self.in_pool(encode_layered, result.image, spec.layers)
        archive = await self.in_pool(layers_zip, layers)
        return Rendered(picture, MEDIA_TYPES["png"], spec.layer_width, spec.height,
                        round(result.inference_time, 3), None), archive

    async def render_preview(self, job: Job, preview: Preview, *, output_format: OutputFormat = PREVIEW_FORMAT,
                             compression: int | None = PREVIEW_QUALITY, full_size: bool = False) -> Rendered:
        """Encode a preview on the CPU pool: at the image's size when `full_size`, else small
        (see `render.preview_size`); `inference_time` is the engine's time making it."""
        size = (job.spec.width, job.spec.height)
        if not full_size:
            size = preview_size(preview.image, size)
        data = await self.in_pool(render_preview, preview.image, size, output_format, compression, _kept(job))
        return Rendered(data, MEDIA_TYPES[output_format], size[0], size[1], round(preview.seconds, 3), None)

    def watch_previews(self, jobs: Sequence[Job]) -> PreviewWatch:
        """The previews of `jobs` as they come, newest only (close it when done)."""
        return PreviewWatch(self.scheduler, jobs, LatestPreviews(asyncio.get_running_loop()))


def _check_controlnet_inpainting(control: ControlFields, model: ModelChoice) -> None:
    """A control image with a mask asks the model's inpainting ControlNet to repaint that
    picture: one picture, one scale (it runs alone)."""
    if not model.inpaint_controlnet:
        raise errors.InvalidRequest(
            f"A mask with a control image asks for ControlNet inpainting, and the model '{model.name}' is "
            "served without an inpainting ControlNet; declare one (e.g. InstantX/Qwen-Image-ControlNet-"
            "Inpainting) with QWEN_IMAGE_CONTROLNETS, or send the picture as 'image' to inpaint without one.",
            param="mask", code="no_inpaint_controlnet")
    if len(control.control_images) > 1:
        raise errors.InvalidRequest(
            f"ControlNet inpainting repaints one picture; {len(control.control_images)} control images were sent.",
            param="control_image", code="too_many_control_images")
    if len(control.control_scales) > 1:
        raise errors.InvalidRequest(
            "ControlNet inpainting runs one ControlNet: give 'controlnet_conditioning_scale' one value.",
            param="controlnet_conditioning_scale", code="too_many_controlnet_scales")


def _check_control_images(control: ControlFields, model: ModelChoice) -> None:
    """Control images steer the model's ControlNet: one, or several (a union ControlNet's
    conditions) with one scale for them all or one each."""
    if not model.controlnet:
        raise errors.InvalidRequest(
            f"The model '{model.name}' is served without a ControlNet that follows control images, so it "
            "takes none; declare one with QWEN_IMAGE_CONTROLNETS (see /v1/models' tasks).",
            param="control_image", code="no_controlnet")
    images, scales = len(control.control_images), len(control.control_scales)
    if images > MAX_CONTROL_IMAGES:
        raise errors.InvalidRequest(
            f"{images} control images were sent; a request takes at most {MAX_CONTROL_IMAGES} (each costs a "
            "ControlNet pass per step).", param="control_image", code="too_many_control_images")
    if scales not in (1, images):
        raise errors.InvalidRequest(
            f"{scales} values of 'controlnet_conditioning_scale' were sent with {images} control image"
            f"{'s' if images > 1 else ''}: send one for them all, or one per control image.",
            param="controlnet_conditioning_scale", code="controlnet_scale_count_mismatch")


def _lora_listing(known: Mapping[str, object]) -> str:
    if not known:
        return "this server has none (QWEN_IMAGE_LORA_DIR, QWEN_IMAGE_LORAS)"
    names = sorted(known)
    more = f" and {len(names) - 8} more (GET /v1/loras)" if len(names) > 8 else ""
    return f"available: {', '.join(names[:8])}{more}"


def _save_failed(job: Job, exc: OSError) -> ErrorDetail:
    """Log a failed save once, with its cause, and say it to the client without server paths."""
    log.error("request %d: saving its image failed (%s); it is delivered without a file", job.request_id, exc)
    reason = exc.strerror or type(exc).__name__
    return ErrorDetail.of(errors.SaveFailed(
        f"The image was made, but saving it on the server failed ({reason}), so there is no file; the "
        "image itself is delivered all the same (in b64_json, or at a job's image_url).",
        code=errno.errorcode.get(exc.errno or 0)))


def _kept(job: Job) -> tuple[Image.Image, Image.Image] | None:
    """A masked edit's or inpainting's (original, mask): outside the mask the original is kept
    (see `render`)."""
    return job.spec.kept()


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
