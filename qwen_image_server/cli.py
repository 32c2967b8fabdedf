"""`qwen-image serve`, `qwen-image generate`, `qwen-image edit` and `qwen-image layers`: every
setting is also a flag (--max-queue ...)."""

from __future__ import annotations

import asyncio
import base64
import errno
import json
import logging
import os
import socket
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, ClassVar, Literal, TypeVar

from pydantic import AliasChoices, Field, ValidationError, field_validator
from pydantic_settings import (
    BaseSettings,
    CliApp,
    CliImplicitFlag,
    CliPositionalArg,
    CliSubCommand,
    NoDecode,
)

from qwen_image_server.config.checks import (
    check_local_lora,
    check_local_models,
    check_output_dir,
    engine_gpus,
)
from qwen_image_server.config.logs import configure_logging
from qwen_image_server.config.lora_refs import is_valid_name, looks_like_path
from qwen_image_server.config.presets import DEFAULT_ASPECT_RATIO, AspectRatio, Language
from qwen_image_server.config.settings import SECRET_SETTINGS, Settings
from qwen_image_server.errors import ConfigurationError, ModelLoadError
from qwen_image_server.protocol.common import (
    MASK_DESCRIPTION,
    ControlFields,
    EditFields,
    NativeImageFields,
    PromptFields,
    StartImageFields,
)
from qwen_image_server.protocol.native import EditParameters, GenerateRequest, LayeredJobParameters
from qwen_image_server.serving.object_store import open_object_store
from qwen_image_server.serving.store_choice import check_store
from qwen_image_server.serving.uploads import Upload, field_names

if TYPE_CHECKING:
    import httpx

    from qwen_image_server.engine.models import ModelSet
    from qwen_image_server.scheduler import Job, JobResult
    from qwen_image_server.serving.generation import Generation, Prepared

log = logging.getLogger("qwen_image_server.cli")


def port_problem(host: str, port: int) -> str | None:
    """A one-line explanation if host:port cannot be bound, else None."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        if os.name != "nt":  # as the server will: TIME_WAIT leftovers must not count as "in use"
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            if exc.errno in (errno.EADDRINUSE, getattr(errno, "WSAEADDRINUSE", -1)):
                return (f"error: port {port} is already in use on {host}; choose another with PORT=... "
                        f"(e.g. PORT={port + 1})")
            return f"error: cannot listen on {host}:{port}: {exc.strerror or exc}"
    return None


class ServeCommand(Settings):
    """Start the HTTP server (Gunicorn with uvicorn workers; plain uvicorn on Windows; Ray Serve with --ray)."""

    ray: CliImplicitFlag[bool] = Field(
        False, description="Serve on Ray Serve instead: one replica per GPU, on this machine or a Ray "
        "cluster (see the ray_* settings; needs pip install .[ray]).")

    def cli_cmd(self) -> None:
        # Only what was set (flags, variables, .env) counts as set: Ray replicas get those and
        # work out the rest themselves.
        settings = Settings.model_validate(self.model_dump(exclude_unset=True))
        if self.ray:
            raise SystemExit(serve_on_ray(settings))
        problem = port_problem(self.host, self.port)
        if problem:
            print(problem, file=sys.stderr)
            raise SystemExit(1)
        try:
            check_output_dir(settings)
            check_local_models(settings)
            check_local_lora(settings)
            engine_gpus(settings)
            if settings.results_url is not None:  # boto3 and its credentials, or the shared folder
                open_object_store(settings.results_url)
            check_store(settings)  # a shared store: its client installed, its server reachable
        except ConfigurationError as exc:
            print(f"error: {exc}", file=sys.stderr)
            raise SystemExit(2) from None
        if os.name == "nt":
            from qwen_image_server.launch.http import run_uvicorn

            raise SystemExit(run_uvicorn(settings))
        from qwen_image_server.launch.http import run_gunicorn

        raise SystemExit(run_gunicorn(settings))


def serve_on_ray(settings: Settings) -> int:
    """`serve --ray`: Ray's proxies bind host:port (on every node), so no local port check here."""
    try:
        from qwen_image_server.launch.ray_app import run_ray
    except ImportError as exc:
        print(f"error: --ray needs Ray Serve ({exc}); install it with: pip install 'qwen-image-server[ray]'",
              file=sys.stderr)
        return 1
    return run_ray(settings)


_PROMPT = PromptFields.model_fields
_NATIVE = NativeImageFields.model_fields
_START = StartImageFields.model_fields
_CONTROL = ControlFields.model_fields
B = TypeVar("B", bound=PromptFields)


class OneImageCommand(Settings):
    """What `generate` and `edit` share: the request's knobs (steps and CFG left out: the server's
    defaults), a server to run on instead of here, and `--lora` naming a LoRA for this image."""

    negative_prompt: str = Field(_PROMPT["negative_prompt"].default, description="Concepts to avoid.")
    num_inference_steps: int | None = Field(
        None, description="Denoising steps (default: the server's, 20 unless a Lightning LoRA says otherwise).")
    true_cfg_scale: float | None = Field(
        None, description="CFG scale (default: the server's, 4.0 unless a Lightning LoRA says otherwise).")
    seed: int = Field(_NATIVE["seed"].default, description="Random seed for reproducibility.")
    language: Language = Field(_PROMPT["language"].default, description="Adds the model card's quality suffix.")
    add_overlay: CliImplicitFlag[bool] = Field(False, description="Draw the info strip (off by default here).")
    url: str | None = Field(
        None, description="A running server (http://host:port) to run on instead of loading the model(s) here.")
    lora: Annotated[list[str], NoDecode] = Field(  # type: ignore[assignment]
        default_factory=list,
        description="A LoRA for this image, 'name[:scale]' from QWEN_IMAGE_LORA_DIR / QWEN_IMAGE_LORAS "
        "(repeat it for several); a path or hub id ('path[,scale]') is fused at load as QWEN_IMAGE_LORA.",
    )

    doing: ClassVar[str] = "making"

    def body(self, body_type: type[B], **fields: Any) -> B:
        """This command's request, validated like a request body of `body_type`: the shared
        knobs, `fields` (those given), its LoRAs; steps and CFG left out stay unset, so whoever
        runs the model fills in its defaults."""
        shared = ("negative_prompt", "num_inference_steps", "true_cfg_scale", "seed", "language", "add_overlay")
        values = {name: getattr(self, name) for name in shared} | fields
        if self.lora_choices():
            values["loras"] = self.lora_choices()
        return body_type.model_validate({k: v for k, v in values.items() if v is not None}, strict=False)

    @field_validator("lora", mode="before")
    @classmethod
    def _one_or_many(cls, value: object) -> object:
        if value is None:
            return []
        return [value] if isinstance(value, str) else value

    def lora_choices(self) -> list[dict[str, Any]]:
        """The library LoRAs named: [{"name", "scale"}], as a request's `loras`."""
        choices = []
        for item in self.lora:
            name, _, scale = item.partition(":")
            if is_valid_name(name) and not looks_like_path(item):
                try:
                    choices.append({"name": name, "scale": float(scale) if scale else 1.0})
                except ValueError:
                    choices.append({"name": name, "scale": scale})  # the request's check names it
        return choices

    def fused_lora(self) -> str | None:
        """The one --lora that is a file or hub id to fuse at load (QWEN_IMAGE_LORA's form)."""
        fused = [item for item in self.lora
                 if not (is_valid_name(item.partition(":")[0]) and not looks_like_path(item))]
        if len(fused) > 1:
            raise ModelLoadError(f"only one LoRA can be fused at load; got {', '.join(fused)}")
        return fused[0] if fused else None

    def save_remote(self, client: httpx.Client, job_id: str, final: dict[str, Any]) -> str:
        """Fetch a finished job's image from the server and write it to --out; what was saved."""
        from qwen_image_server.serving.render import save_atomically

        image = client.get(f"/v1/jobs/{job_id}/image")
        out: Path = getattr(self, "out")  # noqa: B009 - each command declares its own --out
        out = out.expanduser()
        save_atomically(image.content, out.parent, out.name, overwrite=True)
        return f"saved {out} ({final['width']}x{final['height']}"

    async def save_local(self, generation: Generation, job: Job, result: JobResult,
                         prepared: Prepared[Any]) -> str:
        """Render an image made here and write it to --out; what was saved."""
        from qwen_image_server.serving.render import save_atomically

        rendered = await generation.renderer.render(job, result, overlay=prepared.body.add_overlay)
        out: Path = getattr(self, "out")  # noqa: B009 - each command declares its own --out
        out = out.expanduser()
        save_atomically(rendered.data, out.parent, out.name, overwrite=True)
        return f"saved {out} ({rendered.width}x{rendered.height}, {rendered.inference_time:.2f}s"

    def engine_settings(self) -> Settings:
        """The server settings of this command, with the fused LoRA (if any) as QWEN_IMAGE_LORA."""
        values = {name: getattr(self, name) for name in Settings.model_fields}
        values["lora"] = self.fused_lora()
        return Settings.model_validate(values)


class GenerateCommand(OneImageCommand):
    """Generate one image without a server and write it to --out."""

    prompt: CliPositionalArg[str]
    out: Path = Field(Path("qwen-image.png"), description="Where to write the PNG.")
    aspect_ratio: AspectRatio = DEFAULT_ASPECT_RATIO
    image: Path | None = Field(None, description="Image-to-image: a picture to start from (a file).")
    mask: Path | None = Field(None, description="Inpainting: a PNG the size of --image whose transparent "
                              "pixels are the area to change (with --control-image instead of --image: "
                              "ControlNet inpainting of that picture).")
    strength: float | None = Field(None, description=_START["strength"].description)
    control_image: Path | None = Field(None, description="ControlNet: a control image file (edges, depth, "
                                       "pose, ...) of the output's size.")
    controlnet_conditioning_scale: float | None = Field(
        None, description=_CONTROL["controlnet_conditioning_scale"].description)
    control_guidance_start: float | None = Field(None, description=_CONTROL["control_guidance_start"].description)
    control_guidance_end: float | None = Field(None, description=_CONTROL["control_guidance_end"].description)

    doing: ClassVar[str] = "generating"

    def cli_cmd(self) -> None:
        missing = [path for path in (self.image, self.mask, self.control_image) if path and not path.is_file()]
        if missing:
            print(f"error: no such file: {missing[0]}", file=sys.stderr)
            raise SystemExit(1)
        raise SystemExit(generate_remote(self) if self.url else generate_one(self))

    def request(self) -> GenerateRequest:
        files = {name: base64.b64encode(path.expanduser().read_bytes()).decode()
                 for name, path in (("image", self.image), ("mask", self.mask),
                                    ("control_image", self.control_image)) if path is not None}
        knobs = {name: getattr(self, name) for name in ("strength", "controlnet_conditioning_scale",
                                                        "control_guidance_start", "control_guidance_end")}
        return self.body(GenerateRequest, prompt=self.prompt, aspect_ratio=self.aspect_ratio, **files, **knobs)

    async def prepare(self, generation: Generation) -> Prepared[GenerateRequest]:
        return await generation.prepare(self.request(), "generate")


class EditCommand(OneImageCommand):
    """Edit one to three images (the last argument is the prompt) and write the result to --out."""

    inputs: CliPositionalArg[list[str]] = Field(description="The image file(s), then the prompt.")
    out: Path = Field(Path("qwen-image-edit.png"), description="Where to write the PNG.")
    mask: Path | None = Field(None, description=MASK_DESCRIPTION)
    edit_model: str | None = Field(None, description="The edit model to use (default: the first one).")
    size: str | None = Field(None, description=EditFields.model_fields["size"].description)
    strength: float = Field(1.0, description=EditFields.model_fields["strength"].description)

    doing: ClassVar[str] = "editing"

    def cli_cmd(self) -> None:
        if len(self.inputs) < 2:
            print("error: give the image file(s), then the prompt: qwen-image edit photo.png \"make it night\"",
                  file=sys.stderr)
            raise SystemExit(2)
        missing = [path for path in [*self.images, *([self.mask] if self.mask else [])] if not path.is_file()]
        if missing:
            print(f"error: no such file: {missing[0]}", file=sys.stderr)
            raise SystemExit(1)
        raise SystemExit(self.edit_remote() if self.url else generate_one(self))

    @property
    def images(self) -> list[Path]:
        return [Path(name).expanduser() for name in self.inputs[:-1]]

    def request(self) -> EditParameters:
        """The edit's parameters, validated like /edit's form fields."""
        return self.body(EditParameters, prompt=self.inputs[-1], model=self.edit_model, size=self.size,
                         strength=self.strength)

    def uploads(self) -> tuple[list[Upload], Upload | None]:
        names = field_names(len(self.images), "image")
        images = [Upload(name, path.read_bytes()) for name, path in zip(names, self.images, strict=True)]
        return images, Upload("mask", self.mask.read_bytes()) if self.mask is not None else None

    async def prepare(self, generation: Generation) -> Prepared[EditParameters]:
        body = self.request()
        images, mask = self.uploads()
        return await generation.prepare(body, "edit", model=body.model, images=images, mask=mask)

    def edit_remote(self) -> int:
        """Edit on a running server through the jobs API, with a progress bar from its events."""
        body = self.request().model_dump(exclude_unset=True, exclude_none=True)
        images, mask = self.uploads()
        files = [("image", (path.name, upload.data)) for path, upload in zip(self.images, images, strict=True)]
        if mask is not None and self.mask is not None:
            files.append(("mask", (self.mask.name, mask.data)))
        data = {name: json.dumps(value) if name == "loras" else str(value).lower() if isinstance(value, bool)
                else str(value) for name, value in body.items()}
        return run_remote_job(self, "/v1/jobs/edit", {"data": data, "files": files})


_LAYERED = LayeredJobParameters.model_fields


class LayersCommand(OneImageCommand):
    """Split a picture into RGBA layers with a layered model (QWEN_IMAGE_MODEL=tiny's tiny-layered),
    here or on a running server (--url), writing layer-0.png (the bottom) upwards and stacked.png
    (the layers composited) into --out."""

    image: CliPositionalArg[Path] = Field(description="The picture to split (PNG keeps its transparency).")
    prompt: str = Field("", description=_LAYERED["prompt"].description)
    layers: int = Field(4, description=_LAYERED["layers"].description)
    resolution: Literal[640, 1024] = Field(640, description=_LAYERED["resolution"].description)
    layered_model: str | None = Field(None, description="The layered model to use (default: the first one).")
    out: Path = Field(Path("layers"), description="The folder to write the layers into.")

    doing: ClassVar[str] = "splitting"

    def cli_cmd(self) -> None:
        if not self.image.expanduser().is_file():
            print(f"error: no such file: {self.image}", file=sys.stderr)
            raise SystemExit(1)
        if not self.url:
            raise SystemExit(generate_one(self))
        data = {name: json.dumps(value) if name == "loras" else str(value).lower() if isinstance(value, bool)
                else str(value) for name, value in self.request().model_dump(exclude_unset=True,
                                                                              exclude_none=True).items()}
        files = [("image", (self.image.name, self.image.expanduser().read_bytes()))]
        raise SystemExit(run_remote_job(self, "/v1/jobs/layers", {"data": data, "files": files}))

    def request(self) -> LayeredJobParameters:
        """The split's parameters, validated like /v1/jobs/layers' form fields."""
        return self.body(LayeredJobParameters, prompt=self.prompt, layers=self.layers, resolution=self.resolution,
                         model=self.layered_model)

    async def prepare(self, generation: Generation) -> Prepared[LayeredJobParameters]:
        body = self.request()
        image = Upload("image", self.image.expanduser().read_bytes())
        return await generation.prepare(body, "layered", model=body.model, images=[image], layers=body.layers,
                                        resolution=body.resolution)

    async def save_local(self, generation: Generation, job: Job, result: JobResult,
                         prepared: Prepared[Any]) -> str:
        """Write the layers and the stacked picture into --out: the bytes a server's ZIP and
        image would have (the same renderer makes both)."""
        from qwen_image_server.serving.layers import encode_layered, layer_name
        from qwen_image_server.serving.render import save_atomically

        picture, layers = await generation.in_pool(encode_layered, result.image, self.layers)
        folder = self.out.expanduser()
        for index, data in enumerate(layers):
            save_atomically(data, folder, layer_name(index), overwrite=True)
        save_atomically(picture, folder, "stacked.png", overwrite=True)
        width, height = result.image.width // self.layers, result.image.height
        return f"saved {len(layers)} layers and stacked.png in {folder} ({width}x{height}, " \
               f"{result.inference_time:.2f}s"

    def save_remote(self, client: httpx.Client, job_id: str, final: dict[str, Any]) -> str:
        """Write the job's layers (from its ZIP) and its stacked image into --out."""
        import io
        import zipfile

        from qwen_image_server.serving.render import save_atomically

        folder = self.out.expanduser()
        archive = client.get(f"/v1/jobs/{job_id}/layers.zip")
        archive.raise_for_status()
        with zipfile.ZipFile(io.BytesIO(archive.content)) as layers:
            names = layers.namelist()
            for name in names:
                save_atomically(layers.read(name), folder, Path(name).name, overwrite=True)
        save_atomically(client.get(f"/v1/jobs/{job_id}/image").content, folder, "stacked.png", overwrite=True)
        return f"saved {len(names)} layers and stacked.png in {folder} ({final['width']}x{final['height']}"


def generate_remote(cmd: GenerateCommand) -> int:
    """Generate on a running server through the jobs API, with a progress bar from its events."""
    body = cmd.request().model_dump(exclude_unset=True)
    return run_remote_job(cmd, "/v1/jobs", {"json": body})


def run_remote_job(cmd: OneImageCommand, path: str, request: dict[str, Any]) -> int:
    """POST a job to `path` on cmd.url, follow its events with a progress bar, save its result."""
    import httpx
    from httpx_sse import connect_sse
    from tqdm import tqdm

    assert cmd.url is not None
    headers = {"Authorization": f"Bearer {cmd.api_keys[0].get_secret_value()}"} if cmd.api_keys else {}
    with httpx.Client(base_url=cmd.url.rstrip("/"), headers=headers, timeout=None) as client:
        try:
            created = client.post(path, **request)
        except httpx.HTTPError as exc:
            print(f"error: cannot reach {cmd.url}: {exc}", file=sys.stderr)
            return 1
        if created.status_code != 202:
            print(f"error: {created.status_code}: {created.json()['error']['message']}", file=sys.stderr)
            return 1
        job = created.json()
        final = job
        with tqdm(total=job["progress"]["total"], unit="step", desc="queued") as bar, \
                connect_sse(client, "GET", f"/v1/jobs/{job['id']}/events") as events:
            for event in events.iter_sse():
                final = json.loads(event.data)
                if event.event == "queued":
                    bar.set_description(f"queued (position {final['queue_position']})")
                elif final.get("progress", {}).get("phase") == "captioning":
                    bar.set_description("captioning")
                else:
                    bar.set_description(cmd.doing)
                    bar.update(final["progress"]["step"] - bar.n)
        if final["status"] != "succeeded":
            print(f"error: job {final['status']}: {final['error']['message']}", file=sys.stderr)
            return 1
        saved = cmd.save_remote(client, job["id"], final)
    print(f"{saved}, {final['inference_time']:.2f}s on {cmd.url})")
    return 0


def generate_one(cmd: GenerateCommand | EditCommand | LayersCommand) -> int:
    """Load the model(s), make one image through the server's own request path, save it
    atomically; return the exit code."""
    from qwen_image_server.engine.models import load_engine

    configure_logging(cmd.log_level)
    try:
        settings = cmd.engine_settings()
        engine = load_engine(settings)
    except ModelLoadError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return asyncio.run(_generate_locally(cmd, settings, engine))


async def _generate_locally(cmd: GenerateCommand | EditCommand | LayersCommand, settings: Settings,
                            engine: ModelSet) -> int:
    from concurrent.futures import ThreadPoolExecutor

    from tqdm import tqdm

    from qwen_image_server.errors import ServerError
    from qwen_image_server.job_state import JobEvent
    from qwen_image_server.scheduler import Scheduler, SchedulerConfig
    from qwen_image_server.serving.generation import Generation

    scheduler = Scheduler(lambda: engine, SchedulerConfig(max_queue=1, max_batch_size=1))
    device = engine.model.device
    with ThreadPoolExecutor(cmd.threads, thread_name_prefix="qwen-image-cpu") as executor:
        generation = Generation(settings, device, scheduler, executor)
        scheduler.start()
        try:
            prepared = await cmd.prepare(generation)
            with tqdm(total=prepared.specs[0].num_inference_steps, unit="step", desc=cmd.doing) as bar:

                def on_event(job: Job, event: JobEvent) -> None:
                    if event is JobEvent.STEP:
                        bar.update(job.step - bar.n)

                [job] = await generation.submit(prepared)
                scheduler.add_listener(job, on_event)
                result = await generation.wait(job)
            saved = await cmd.save_local(generation, job, result, prepared)
        except ServerError as exc:
            print(f"error: {exc.message}", file=sys.stderr)
            return 1
        finally:
            scheduler.shutdown(timeout=5)
    print(f"{saved} on {device.label})")
    return 0


class QwenImageCli(BaseSettings, cli_prog_name="qwen-image", cli_kebab_case=True):
    """Qwen-Image server and command-line generator."""

    serve: CliSubCommand[ServeCommand]
    generate: CliSubCommand[GenerateCommand]
    edit: CliSubCommand[EditCommand]
    layers: CliSubCommand[LayersCommand]

    def cli_cmd(self) -> None:
        CliApp.run_subcommand(self)


def _setting_names(field: str) -> str:
    """'max_queue' -> 'QWEN_IMAGE_MAX_QUEUE / --max-queue' (bare names for WORKERS, PORT, ...)."""
    info = Settings.model_fields.get(field)
    bare = info is not None and isinstance(info.validation_alias, AliasChoices)
    env = field.upper() if bare else f"{Settings.model_config['env_prefix']}{field.upper()}"
    return f"{env} / --{field.replace('_', '-')}"


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `qwen-image` console script (commands exit via SystemExit)."""
    try:
        CliApp.run(QwenImageCli, cli_args=sys.argv[1:] if argv is None else argv)
    except ValidationError as exc:
        # A bad setting is the operator's typo: one line each, naming the variable, no traceback.
        for error in exc.errors():
            if len(error["loc"]) < 2:  # a check across settings (e.g. two that exclude each other)
                print(f"qwen-image: invalid settings: {error['msg']}.", file=sys.stderr)
                continue
            field = str(error["loc"][-1])
            got = "" if field in SECRET_SETTINGS else f" (got {error.get('input')!r})"  # a secret is not echoed
            print(f"qwen-image: invalid setting {_setting_names(field)}: {error['msg']}{got}.", file=sys.stderr)
        return 2
    return 0
