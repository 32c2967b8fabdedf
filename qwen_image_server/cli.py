"""`qwen-image serve`, `qwen-image generate` and `qwen-image edit`: every setting is also a flag
(--max-queue ...)."""

from __future__ import annotations

import asyncio
import errno
import json
import logging
import os
import socket
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, ClassVar

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
from qwen_image_server.config.settings import Settings
from qwen_image_server.errors import ConfigurationError, ModelLoadError
from qwen_image_server.protocol.native import EditParameters, GenerateRequest
from qwen_image_server.serving.uploads import Upload, field_names

if TYPE_CHECKING:
    from qwen_image_server.engine.models import ModelSet
    from qwen_image_server.engine.types import GenerationSpec
    from qwen_image_server.serving.generation import Generation

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
                return f"error: port {port} is already in use on {host}; choose another with PORT=... (e.g. PORT={port + 1})"
            return f"error: cannot listen on {host}:{port}: {exc.strerror or exc}"
    return None


class ServeCommand(Settings):
    """Start the HTTP server (Gunicorn with uvicorn workers; plain uvicorn on Windows; Ray Serve with --ray)."""

    ray: CliImplicitFlag[bool] = Field(
        False, description="Serve on Ray Serve instead: one replica per GPU, on this machine or a Ray "
        "cluster (see the ray_* settings; needs pip install .[ray]).")

    def cli_cmd(self) -> None:
        if self.ray:
            raise SystemExit(serve_on_ray(Settings.model_validate(self.model_dump())))
        problem = port_problem(self.host, self.port)
        if problem:
            print(problem, file=sys.stderr)
            raise SystemExit(1)
        settings = Settings.model_validate(self.model_dump())
        try:
            check_output_dir(settings)
            check_local_models(settings)
            check_local_lora(settings)
            engine_gpus(settings)
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


_defaults = GenerateRequest.model_fields
_edit_defaults = EditParameters.model_fields


class OneImageCommand(Settings):
    """What `generate` and `edit` share: `--lora` names a LoRA of the library for this image."""

    lora: Annotated[list[str], NoDecode] = Field(  # type: ignore[assignment]
        default_factory=list,
        description="A LoRA for this image, 'name[:scale]' from QWEN_IMAGE_LORA_DIR / QWEN_IMAGE_LORAS "
        "(repeat it for several); a path or hub id ('path[,scale]') is fused at load as QWEN_IMAGE_LORA.",
    )

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
    negative_prompt: str = _defaults["negative_prompt"].default
    num_inference_steps: int | None = Field(
        None, description="Denoising steps (default: the server's, 20 unless a Lightning LoRA says otherwise).")
    true_cfg_scale: float | None = Field(
        None, description="CFG scale (default: the server's, 4.0 unless a Lightning LoRA says otherwise).")
    seed: int = _defaults["seed"].default
    language: Language = _defaults["language"].default
    add_overlay: CliImplicitFlag[bool] = Field(False, description="Draw the info strip (off by default here).")
    url: str | None = Field(
        None, description="A running server (http://host:port) to generate on instead of loading the model here.")

    def cli_cmd(self) -> None:
        raise SystemExit(generate_remote(self) if self.url else generate_one(self))

    doing: ClassVar[str] = "generating"

    def request(self) -> GenerateRequest:
        """This command's generation parameters, validated like a request body; steps and CFG
        left out stay unset, so whoever runs the model fills in its defaults."""
        values = {name: getattr(self, name) for name in GenerateRequest.model_fields
                  if name != "loras" and getattr(self, name, None) is not None}
        if self.lora_choices():
            values["loras"] = self.lora_choices()
        return GenerateRequest.model_validate(values, strict=False)

    async def spec(self, generation: Generation, body: GenerateRequest) -> GenerationSpec:
        return await generation.generate_spec(body)


class EditCommand(OneImageCommand):
    """Edit one to three images (the last argument is the prompt) and write the result to --out."""

    inputs: CliPositionalArg[list[str]] = Field(description="The image file(s), then the prompt.")
    out: Path = Field(Path("qwen-image-edit.png"), description="Where to write the PNG.")
    mask: Path | None = Field(None, description="PNG the size of the first image; its transparent pixels "
                              "are the area to change.")
    edit_model: str | None = Field(None, description="The edit model to use (default: the first one).")
    size: str | None = _edit_defaults["size"]
    strength: float = _edit_defaults["strength"].default
    negative_prompt: str = _defaults["negative_prompt"].default
    num_inference_steps: int | None = Field(
        None, description="Denoising steps (default: the server's, 20 unless a Lightning LoRA says otherwise).")
    true_cfg_scale: float | None = Field(
        None, description="CFG scale (default: the server's, 4.0 unless a Lightning LoRA says otherwise).")
    seed: int = _defaults["seed"].default
    language: Language = _defaults["language"].default
    add_overlay: CliImplicitFlag[bool] = Field(False, description="Draw the info strip (off by default here).")
    url: str | None = Field(
        None, description="A running server (http://host:port) to edit on instead of loading the models here.")

    doing: ClassVar[str] = "editing"

    def cli_cmd(self) -> None:
        if len(self.inputs) < 2:
            print("error: give the image file(s), then the prompt: qwen-image edit photo.png \"make it night\"",
                  file=sys.stderr)
            raise SystemExit(2)
        missing = [name for name in self.images if not name.is_file()]
        if missing or (self.mask is not None and not self.mask.is_file()):
            print(f"error: no such file: {(missing or [self.mask])[0]}", file=sys.stderr)
            raise SystemExit(1)
        raise SystemExit(self.edit_remote() if self.url else generate_one(self))

    @property
    def images(self) -> list[Path]:
        return [Path(name).expanduser() for name in self.inputs[:-1]]

    def request(self) -> EditParameters:
        """The edit's parameters, validated like /edit's form fields."""
        values = {"prompt": self.inputs[-1], "model": self.edit_model}
        values |= {name: getattr(self, name) for name in EditParameters.model_fields
                   if name not in ("prompt", "model", "loras") and getattr(self, name, None) is not None}
        if self.lora_choices():
            values["loras"] = self.lora_choices()
        return EditParameters.model_validate({k: v for k, v in values.items() if v is not None})

    def uploads(self) -> tuple[list[Upload], Upload | None]:
        names = field_names(len(self.images), "image")
        images = [Upload(name, path.read_bytes()) for name, path in zip(names, self.images, strict=True)]
        return images, Upload("mask", self.mask.read_bytes()) if self.mask is not None else None

    async def spec(self, generation: Generation, body: EditParameters) -> GenerationSpec:
        model = generation.pick_model(body.model, "edit")
        images, mask = self.uploads()
        loras = await generation.check_loras(body.loras, model)
        inputs = await generation.read_edit_inputs(images, mask, model)
        [spec] = generation.edit_specs(body, inputs, model, [body.seed], loras)
        return spec

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


def generate_remote(cmd: GenerateCommand) -> int:
    """Generate on a running server through the jobs API, with a progress bar from its events."""
    body = cmd.request().model_dump(exclude_unset=True)
    return run_remote_job(cmd, "/v1/jobs", {"json": body})


def run_remote_job(cmd: GenerateCommand | EditCommand, path: str, request: dict[str, Any]) -> int:
    """POST a job to `path` on cmd.url, follow its events with a progress bar, save its image."""
    import httpx
    from httpx_sse import connect_sse
    from tqdm import tqdm

    assert cmd.url is not None
    headers = {"Authorization": f"Bearer {cmd.api_keys[0]}"} if cmd.api_keys else {}
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
                else:
                    bar.set_description(cmd.doing)
                    bar.update(final["progress"]["step"] - bar.n)
        if final["status"] != "succeeded":
            print(f"error: job {final['status']}: {final['error']['message']}", file=sys.stderr)
            return 1
        image = client.get(f"/v1/jobs/{job['id']}/image")
    from qwen_image_server.serving.render import save_atomically

    out = cmd.out.expanduser()
    save_atomically(image.content, out.parent, out.name, overwrite=True)
    print(f"saved {out} ({final['width']}x{final['height']}, {final['inference_time']:.2f}s on {cmd.url})")
    return 0


def generate_one(cmd: GenerateCommand | EditCommand) -> int:
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


async def _generate_locally(cmd: GenerateCommand | EditCommand, settings: Settings, engine: ModelSet) -> int:
    from concurrent.futures import ThreadPoolExecutor

    from tqdm import tqdm

    from qwen_image_server.errors import ServerError
    from qwen_image_server.job_state import JobEvent
    from qwen_image_server.scheduler import Job, Scheduler, SchedulerConfig
    from qwen_image_server.serving.generation import Generation
    from qwen_image_server.serving.render import save_atomically

    scheduler = Scheduler(lambda: engine, SchedulerConfig(max_queue=1, max_batch_size=1))
    device = engine.model.device
    with ThreadPoolExecutor(cmd.threads, thread_name_prefix="qwen-image-cpu") as executor:
        generation = Generation(settings, device, scheduler, executor)
        body = generation.with_defaults(cmd.request())
        scheduler.start()
        try:
            spec = await cmd.spec(generation, body)
            with tqdm(total=body.num_inference_steps, unit="step", desc=cmd.doing) as bar:

                def on_event(job: Job, event: JobEvent) -> None:
                    if event is JobEvent.STEP:
                        bar.update(job.step - bar.n)

                [job] = await generation.submit([spec], generation.next_request_id())
                scheduler.add_listener(job, on_event)
                result = await generation.wait(job)
            rendered = await generation.render(job, result, overlay=body.add_overlay)
        except ServerError as exc:
            print(f"error: {exc.message}", file=sys.stderr)
            return 1
        finally:
            scheduler.shutdown(timeout=5)
    out = cmd.out.expanduser()
    save_atomically(rendered.data, out.parent, out.name, overwrite=True)
    print(f"saved {out} ({rendered.width}x{rendered.height}, {rendered.inference_time:.2f}s on {device.label})")
    return 0


class QwenImageCli(BaseSettings, cli_prog_name="qwen-image", cli_kebab_case=True):
    """Qwen-Image server and command-line generator."""

    serve: CliSubCommand[ServeCommand]
    generate: CliSubCommand[GenerateCommand]
    edit: CliSubCommand[EditCommand]

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
            print(f"qwen-image: invalid setting {_setting_names(str(error['loc'][-1]))}: {error['msg']} "
                  f"(got {error.get('input')!r}).", file=sys.stderr)
        return 2
    return 0
