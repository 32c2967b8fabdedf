"""Every knob of the server in one pydantic-settings object: env vars, .env and CLI flags.

The seed's `WORKERS`, `THREADS`, `PORT` and `HOST` keep their bare names; everything else is
`QWEN_IMAGE_<NAME>` in the environment and `--<name>` on the command line.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any, Literal, get_args

from pydantic import (
    AliasChoices,
    AnyUrl,
    Field,
    HttpUrl,
    RedisDsn,
    SecretBytes,
    SecretStr,
    UrlConstraints,
    ValidationError,
    ValidatorFunctionWrapHandler,
    field_validator,
    model_validator,
)
from pydantic_settings import (
    BaseSettings,
    CliImplicitFlag,
    NoDecode,
    SettingsConfigDict,
)

from qwen_image_server.config.api_keys import ApiKey, KeyLimits, build_keys, read_key_file
from qwen_image_server.config.lora_refs import parse_hub_loras
from qwen_image_server.config.model_list import ModelRef, parse_controlnets, parse_model_list
from qwen_image_server.config.origins import canonical_origin, check_host_pattern
from qwen_image_server.config.presets import DEFAULT_ASPECT_RATIO, AspectRatio
from qwen_image_server.config.webhooks import check_allowed_host, check_webhook_secret, without_credentials

DeviceName = Literal["auto", "cuda", "cpu", "mps"]
DtypeName = Literal["auto", "bfloat16", "float16", "float32"]
ModelSource = Literal["huggingface", "modelscope"]
OffloadName = Literal["auto", "none", "model", "sequential"]
QuantizeName = Literal["none", "fp8", "int8"]
CacheName = Literal["none", "cache-dit"]
# Where finished images are kept for every server: a bucket or a shared folder.
ResultsUrl = Annotated[AnyUrl, UrlConstraints(allowed_schemes=["s3", "file"])]
# A Redis server shared by every server and replica: redis://[user:password@]host:port/db (rediss: TLS).
StoreUrl = Annotated[RedisDsn, UrlConstraints(allowed_schemes=["redis", "rediss"])]


def _bare(name: str) -> AliasChoices:
    """Accept the seed's bare env var name (PORT) besides the field name (port)."""
    return AliasChoices(name.lower(), name)


def _default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "qwen-image-server"


class ServingSettings(BaseSettings):
    """Address, port, engines and threads."""

    # -- serving (the seed's names) ---------------------------------------------------------
    host: str = Field("0.0.0.0", validation_alias=_bare("HOST"), description="Address to bind.")
    port: int = Field(5000, ge=1, le=65535, validation_alias=_bare("PORT"), description="Port to bind.")
    workers: Annotated[int, Field(ge=1)] | Literal["auto"] = Field(
        1, validation_alias=_bare("WORKERS"),
        description="Engine processes behind the one front process, each with its own copy of the model "
        "on its own GPU; auto: one per visible GPU (one without a GPU).",
    )
    gpus_per_engine: int = Field(
        1, ge=1, le=64, description="GPUs one engine splits each image over (ranks of one engine, see "
        "QWEN_IMAGE_PARALLEL); WORKERS x this many GPUs are used.",
    )
    parallel: Literal["auto", "cfg", "ulysses", "ring", "cfg+ulysses"] = Field(
        "auto", description="How an engine of several GPUs splits an image: cfg (the two guidance passes at once, "
        "2 GPUs), ulysses or ring (the sequence, diffusers' context parallelism), cfg+ulysses; auto: cfg for 2 "
        "GPUs, ulysses beyond.",
    )
    threads: int = Field(
        4, ge=1, validation_alias=_bare("THREADS"),
        description="Threads of the front for CPU work: overlay, PNG encoding, file writes.",
    )
    log_level: Literal["debug", "info", "warning", "error"] = Field("info", description="How much the server logs.")

    @field_validator("workers", mode="wrap")
    @classmethod
    def _engine_count(cls, value: object, handler: ValidatorFunctionWrapHandler) -> object:
        try:
            return handler(value)
        except ValidationError:  # one message for the union's two failures
            raise ValueError("must be a number of engines (1 or more) or 'auto'") from None


class ModelSettings(BaseSettings):
    """Which models, LoRAs and ControlNets are served, and how fast (memory plans, compile, caches)."""

    # -- model ------------------------------------------------------------------------------
    model: str = Field(
        "tiny",
        description="Comma-separated models, each a hub id (Qwen/Qwen-Image, Qwen/Qwen-Image-Edit-2509), a "
        "local folder, or 'name=source' to give it a public name; 'tiny' is the embedded generation and "
        "edit test models. Requests without a model get the first that can do their task.",
    )
    controlnets: str = Field(
        "",
        description="ControlNets served with the generation models: comma-separated, each a hub id or folder "
        "of a QwenImageControlNetModel (InstantX/Qwen-Image-ControlNet-Union, ...) for the first model, or "
        "'model=source' for a model by its public name. A model takes one that follows control images and "
        "one that inpaints (InstantX/Qwen-Image-ControlNet-Inpainting; told apart by their configs). Empty: "
        "the embedded test ControlNets with the embedded 'tiny' model; 'none': no ControlNet.",
    )
    model_source: ModelSource = Field(
        "huggingface", description="Where a hub id is fetched from: huggingface or modelscope."
    )
    revision: str | None = Field(None, description="Hub revision (branch, tag or commit) of the model.")
    device: DeviceName = Field("auto", description="auto picks CUDA when present, else CPU.")
    dtype: DtypeName = Field("auto", description="auto is bfloat16 on CUDA and float32 on CPU.")
    cache_dir: Path = Field(
        default_factory=_default_cache_dir, description="Where the embedded tiny model is built and cached."
    )

    # -- memory and speed (see docs/gpus.md) -------------------------------------------------
    offload: OffloadName = Field(
        "auto",
        description="auto, none, model or sequential: how weights share GPU memory with the CPU.",
    )
    offload_headroom_gb: float = Field(
        6.0, ge=0, description="GPU memory left free for activations and the VAE decode when auto plans.",
    )
    quantize: QuantizeName = Field("none", description="Weight quantization of the transformer: none, fp8 or int8.")
    quantize_text_encoder: CliImplicitFlag[bool] = Field(False, description="Quantize the text encoder as well.")
    quantize_skip: Annotated[list[str], NoDecode] = Field(
        default_factory=lambda: ["img_mlp"],
        description="Comma-separated transformer layer names kept unquantized (empty: quantize all).",
    )
    compile: CliImplicitFlag[bool] = Field(
        False, description="torch.compile the transformer blocks (regional), warmed up at start.")
    cache: CacheName = Field("none", description="Step caching: none or cache-dit (DBCache).")
    cache_options: dict[str, float | int | bool | str] = Field(
        default_factory=dict,
        description='cache-dit DBCacheConfig knobs as JSON, e.g. {"Fn_compute_blocks": 8, '
        '"residual_diff_threshold": 0.12}.',
    )
    lora: str | None = Field(
        None, description="A LoRA fused at startup: '<path or hub id>[,scale]' (hub files as "
        "'repo/id:file.safetensors').",
    )
    lora_dir: Path | None = Field(
        None, description="A folder of LoRA files (*.safetensors) requests may name in `loras`; a LoRA's name "
        "is its file's stem.",
    )
    loras: str = Field(
        "", description="Hub LoRAs requests may name: comma-separated 'name=owner/repo:file.safetensors' "
        "(or 'name=owner/repo' for a repo with one file).",
    )
    max_loras_per_request: int = Field(3, ge=1, le=16, description="Most LoRAs one request may name.")
    max_resident_loras: int = Field(
        8, ge=1, description="LoRAs kept loaded per model; the least recently used is unloaded first.",
    )
    lora_max_rank: int = Field(
        128, ge=1, description="With QWEN_IMAGE_COMPILE: the highest LoRA rank a request may use (adapters are "
        "hot-swapped into slots of this rank, so switching them compiles nothing).",
    )
    attention: str = Field(
        "native", description="diffusers attention backend: native (SDPA), flash, _flash_3, sage, ...")
    prompt_cache_mb: float = Field(
        256.0, ge=0, description="MiB of prompt embeddings kept per model (least recently used dropped first; "
        "the default negative prompt always kept), so a repeated prompt skips the text encoder. 0: off.",
    )
    warmup: CliImplicitFlag[bool] = Field(False, description="Run one small generation before /ready turns 200.")
    warmup_aspect_ratios: Annotated[list[AspectRatio], NoDecode] = Field(
        default_factory=lambda: [DEFAULT_ASPECT_RATIO],
        description="Comma-separated presets warmed up (compile traces each shape once).",
    )
    default_steps: int | None = Field(
        None, ge=1, le=100, description="num_inference_steps when a request leaves it out (default 20, or the LoRA's).",
    )
    default_cfg_scale: float | None = Field(
        None, ge=0, le=50, description="true_cfg_scale when a request leaves it out (default 4.0, or the LoRA's).",
    )

    @field_validator("model")
    @classmethod
    def _model_list(cls, value: str) -> str:
        parse_model_list(value)  # ValueError -> one line naming QWEN_IMAGE_MODEL
        return value.strip()

    @field_validator("loras")
    @classmethod
    def _lora_list(cls, value: str) -> str:
        parse_hub_loras(value)  # ValueError -> one line naming QWEN_IMAGE_LORAS
        return value.strip()

    @property
    def models(self) -> list[ModelRef]:
        """The models to serve, in order (the first answers requests that name none)."""
        return parse_model_list(self.model)

    @property
    def controlnet_sources(self) -> dict[str, tuple[str, ...]]:
        """Model public name -> the ControlNets served with it."""
        return parse_controlnets(self.controlnets, self.models)

    @model_validator(mode="after")
    def _controlnet_list(self) -> ModelSettings:
        parse_controlnets(self.controlnets, self.models)  # ValueError -> one line naming QWEN_IMAGE_CONTROLNETS
        return self


class OutputSettings(BaseSettings):
    """Where images and jobs are kept: the output folder and the job store."""

    # -- output -----------------------------------------------------------------------------
    output_dir: Path = Field(Path("tmp"), description="Folder for save_to_file images, relative to the cwd.")
    data_dir: Path = Field(
        Path("data"), description="Folder for the server's state: the job store, webhook deliveries, stored results.")
    store: Literal["sqlite", "memory"] | StoreUrl = Field(
        "sqlite", description="Where async jobs are kept: sqlite (a file in data_dir: jobs and their images "
        "survive a restart, unfinished ones run again), memory (lost with the process), or redis://host:port/db "
        "(a Redis every server and replica shares, needs the [redis] extra: any of them answers, streams and "
        "cancels any job, a live one takes over the unfinished jobs of one that died, webhook deliveries are "
        "shared; images go to results_url if set, else into Redis itself).",
    )
    store_lease_s: float = Field(
        10.0, ge=1, description="With a Redis store: how long a server's hold on its jobs lasts unless renewed "
        "(renewed every third of it). A server silent for longer counts as dead and another runs its unfinished "
        "jobs: longer survives longer pauses, shorter takes over sooner.",
    )
    min_free_disk_mb: int = Field(
        1024, ge=0, description="Free space (MiB) kept on the output folder's disk: below it /ready answers "
        "503 and save_to_file requests 507 before any work (0: no floor).",
    )
    output_retention_s: float | None = Field(
        None, gt=0, description="Saved images older than this are deleted (unset: kept forever).",
    )
    output_max_bytes: int | None = Field(
        None, ge=1, description="Most bytes of saved images kept; the oldest are deleted beyond it (unset: no limit).",
    )
    output_sweep_interval_s: float = Field(
        60.0, gt=0, description="How often the output folder is swept: images past the retention limits, "
        "and temp files a crashed save left.",
    )


class SchedulerSettings(BaseSettings):
    """The queue, batching, deadlines and engine restarts."""

    # -- scheduler --------------------------------------------------------------------------
    max_queue: int = Field(32, ge=1, description="Jobs allowed to wait; beyond it requests get 429.")
    max_batch_size: int | None = Field(
        None, ge=1, description="Most jobs run in one pipeline call (default per device: see docs/scheduling.md)."
    )
    max_batch_pixels: int | None = Field(
        None, ge=1, description="Pixel budget of one batch, width*height summed (default per device)."
    )
    batch_wait_ms: float | None = Field(
        None, ge=0, description="How long a batch may wait for compatible jobs (default per device)."
    )
    queue_timeout_s: float = Field(
        600.0, gt=0, description="A job that waited longer than this gets 504 instead of a late image."
    )
    drain_timeout_s: float = Field(
        120.0, ge=0, description="On SIGTERM, how long queued and running jobs get to finish."
    )
    engine_restart_backoff_s: float = Field(
        1.0, ge=0, description="Wait before restarting an engine process that died; doubled for each "
        "failure in a row (up to a minute).",
    )
    engine_restart_attempts: int = Field(
        5, ge=1, description="Failed loads in a row after which an engine process is given up.",
    )
    batch_timeout_s: float | None = Field(
        None, ge=0, description="Seconds a batch may run before its engine counts as hung: an engine "
        "process is killed and restarted and the batch retried once (a job that hangs twice gets 500 "
        "engine_timeout); an engine in the server's process (Ray) fails its batch and the process exits. "
        "Unset: from the batch's steps and size and the slowest step timed (at least 60 s, 300 s with "
        "COMPILE, 10 min for the first batch, +10 min for a LoRA's first use). 0: no watchdog.",
    )


class AccessSettings(BaseSettings):
    """Results, limits per key, API keys, origins, hosts and request sizes."""

    # -- results, limits and access ---------------------------------------------------------
    result_ttl_s: float = Field(
        3600.0, gt=0, description="How long finished jobs and url-served images are kept."
    )
    max_stored_results: int = Field(
        256, ge=1, description="Most finished images kept in memory (oldest dropped first)."
    )
    api_keys: Annotated[list[SecretStr], NoDecode] = Field(
        default_factory=list,
        validation_alias=AliasChoices("api_keys", "api_key"),
        description="Comma-separated keys; when set, every route but /health, /ready, /metrics needs one.",
    )
    api_keys_file: Path | None = Field(
        None, description="A TOML file of API keys ([[keys]] with key, and optionally name, max_jobs, "
        "requests_per_minute): keys out of the environment and `ps`, with limits per key.",
    )
    key_max_jobs: int | None = Field(
        None, ge=1, description="Images one API key may have queued or running at once (429 beyond); "
        "default half of QWEN_IMAGE_MAX_QUEUE, so one key never fills the queue. Only with keys.",
    )
    key_requests_per_minute: int | None = Field(
        None, ge=1, description="Image requests one API key may make per minute (429 beyond); default no "
        "limit. Only with keys.",
    )
    max_subscribers_per_job: int = Field(
        16, ge=1, description="Clients that may follow one job's events at once (429 beyond).",
    )
    results_max_bytes: int = Field(
        1024 ** 3, ge=1024 * 1024,
        description="Bytes of finished images (job and url results) kept in memory; past it the key holding "
        "the most loses its oldest first.",
    )
    results_url: ResultsUrl | None = Field(
        None, description="Where finished images (url responses, job images) are kept so that any server can "
        "serve them: s3://bucket/prefix (any S3-compatible storage, needs the [s3] extra; its endpoint and "
        "credentials come from boto3's own configuration: AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, ...; url "
        "responses and save_to_file links become presigned URLs) or file:///shared/folder. Unset: this "
        "server's memory and data_dir.",
    )
    files_secret: SecretStr | None = Field(
        None, description="Key that signs /files links; unset: a random one kept in the output folder "
        "(.files-secret), so links survive restarts.",
    )
    file_link_ttl_s: float = Field(
        86400.0, gt=0, description="How long a /files link in a save_to_file answer stays valid.",
    )
    metrics_key: SecretStr | None = Field(
        None, description="When set, GET /metrics needs 'Authorization: Bearer <metrics_key>' (a key of its "
        "own, for the scraper); unset: /metrics is open.",
    )
    allowed_origins: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="Comma-separated web origins (https://app.example.com) whose pages may send POST, PUT, "
        "PATCH and DELETE requests besides the server's own; '*': any. Requests without an Origin "
        "(curl, SDKs) are never refused.",
    )
    allowed_hosts: Annotated[list[str], NoDecode] = Field(
        default_factory=lambda: ["*"],
        description="Comma-separated host names clients may reach the server by (the Host header; "
        "'*.example.com' for subdomains); others get 400. '*': any.",
    )
    max_body_bytes: int = Field(1024 * 1024, ge=1024, description="Largest request body accepted (413 beyond).")
    max_upload_bytes: int = Field(
        50 * 1024 * 1024, ge=1024,
        description="Largest body of an edit request (/edit, /v1/images/edits, edit jobs), images included.",
    )
    max_input_pixels: int = Field(
        40_000_000, ge=64 * 64,
        description="Largest uploaded image, width*height, read from its header before decoding.",
    )
    max_input_images: int = Field(3, ge=1, description="Most input images of one multi-image edit.")
    request_read_timeout_s: float = Field(
        30.0, gt=0,
        description="A client must send its request line and headers within this many seconds of connecting "
        "(or of its next request's first byte), and its body within this many seconds after the headers; "
        "else the connection is closed (a late body gets 408). Responses, streams included, are not limited.",
    )
    max_connections: int | None = Field(
        None, ge=1,
        description="Most connections the front holds at once: at the limit requests get 503, and connections "
        "beyond it are closed at once. Default: three quarters of the open-file limit (raised to its hard limit "
        "at start), at most 10000, so that engines and files keep descriptors.",
    )

    @field_validator("api_keys", mode="before")
    @classmethod
    def _split_keys(cls, value: object) -> object:
        if isinstance(value, str):
            return [key.strip() for key in value.split(",") if key.strip()]
        if isinstance(value, list):  # repeated --api-key flags, each possibly comma-separated
            return [part for item in value for part in (
                [item] if isinstance(item, SecretStr) else [k.strip() for k in str(item).split(",") if k.strip()])]
        return value

    @field_validator("metrics_key", mode="before")
    @classmethod
    def _no_empty_key(cls, value: object) -> object:
        if isinstance(value, str):  # as a header carries it: no surrounding spaces; an empty variable: unset
            return value.strip() or None
        return value

    @field_validator("allowed_origins")
    @classmethod
    def _origins(cls, value: list[str]) -> list[str]:
        origins = []
        for entry in value:
            origin = "*" if entry.strip() == "*" else canonical_origin(entry)
            if origin is None:
                raise ValueError(f"{entry!r} is not an origin: write 'https://host' or 'http://host:port', or '*'")
            origins.append(origin)
        return origins

    @field_validator("allowed_hosts")
    @classmethod
    def _hosts(cls, value: list[str]) -> list[str]:
        return [check_host_pattern(entry) for entry in value]

    @field_validator("results_url")
    @classmethod
    def _results_location(cls, value: AnyUrl | None) -> AnyUrl | None:
        if value is None:
            return None
        if value.username or value.password:
            raise ValueError("credentials never go in the URL: boto3 reads them (AWS_ACCESS_KEY_ID, ...)")
        if value.scheme == "s3" and not value.host:
            raise ValueError("an s3:// URL names its bucket: s3://bucket/prefix")
        if value.scheme == "file" and value.host not in (None, "", "localhost"):
            raise ValueError("a file:// URL names a folder of this machine: file:///shared/folder")
        return value


class WebhookSettings(BaseSettings):
    """Webhooks: where a job's end is POSTed, and how."""

    # -- webhooks (docs/webhooks.md) ---------------------------------------------------------
    webhook_url: HttpUrl | None = Field(
        None, description="Where a job's end (succeeded, failed, cancelled) is POSTed when its request names "
        "no webhook_url; unset: only jobs that name one.",
    )
    webhook_secret: SecretStr | None = Field(
        None, description="Key that signs webhooks (Standard Webhooks: 'whsec_' and 24 to 64 random bytes in "
        "base64); unset: a random one kept in the data folder (webhook-secret).",
    )
    webhook_allowed_hosts: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="Comma-separated host names, IP addresses or networks (10.0.0.0/8) webhooks may call "
        "besides public addresses: loopback, private, link-local and other non-public addresses are refused "
        "unless listed.",
    )
    webhook_timeout_s: float = Field(10.0, gt=0, description="How long one delivery try may take.")
    webhook_backoff_s: float = Field(
        1.0, gt=0, description="Wait before the first retry of a failed delivery; doubled for each failure "
        "(up to 10 minutes, with jitter).",
    )
    webhook_retry_s: float = Field(
        86400.0, gt=0, description="How long a delivery is retried before it is given up.",
    )

    @field_validator("webhook_allowed_hosts")
    @classmethod
    def _webhook_hosts(cls, value: list[str]) -> list[str]:
        return [check_allowed_host(entry) for entry in value]

    _webhook_url = field_validator("webhook_url")(without_credentials)

    @field_validator("webhook_secret", mode="before")
    @classmethod
    def _no_empty_secret(cls, value: object) -> object:
        if isinstance(value, str):  # an empty variable: unset
            return value.strip() or None
        return value

    @field_validator("webhook_secret")
    @classmethod
    def _webhook_secret(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None:
            check_webhook_secret(value.get_secret_value())
        return value


class RaySettings(BaseSettings):
    """Ray Serve (`serve --ray`, serve_config.yaml)."""

    # -- Ray Serve: `serve --ray`, serve_config.yaml (pip install .[ray]; docs/ray.md) -------
    ray_address: str | None = Field(
        None, description="Ray cluster to join ('auto', 'ray://head:10001'); unset: RAY_ADDRESS, a cluster "
        "started on this machine, or a new local one.",
    )
    ray_replicas: int | None = Field(
        None, ge=1, description="Replicas, each with its own model; default: one per GPU of the cluster (1 without).",
    )
    ray_autoscaling: dict[str, Any] | None = Field(
        None, description='Ray Serve autoscaling_config as JSON instead of a fixed count, e.g. '
        '{"min_replicas": 1, "max_replicas": 8}.',
    )
    ray_num_gpus: float | None = Field(
        None, ge=0,
        description="GPUs per replica; default 1 when the cluster has GPUs (and device is not cpu), else 0.",
    )
    ray_max_ongoing_requests: int | None = Field(
        None, ge=1, description="Requests one replica takes at once (default: max_queue plus one batch).",
    )
    ray_max_queued_requests: int | None = Field(
        None, ge=-1, description="Requests each Ray proxy holds while every replica is full, then 429 "
        "(default: max_queue; -1: no limit).",
    )
    ray_retry_after_s: float = Field(
        5.0, ge=0, description="Retry-After of the Ray proxy's 429 when ray_max_queued_requests is reached.",
    )

    @field_validator("ray_max_queued_requests")
    @classmethod
    def _queue_limit(cls, value: int | None) -> int | None:
        if value == 0:
            raise ValueError("must be -1 (no limit) or at least 1")
        return value

    @model_validator(mode="after")
    def _one_replica_count(self) -> RaySettings:
        if self.ray_replicas is not None and self.ray_autoscaling is not None:
            raise ValueError("set ray_replicas (a fixed count) or ray_autoscaling, not both")
        return self


class Settings(RaySettings, WebhookSettings, AccessSettings, SchedulerSettings, OutputSettings, ModelSettings,
               ServingSettings):
    """Server, model and scheduler settings; built once per process and passed down.

    One object, its fields grouped by topic in the classes above (fields are listed bases last
    first, so in the order serving, model, output, scheduler, access, webhooks, Ray)."""

    model_config = SettingsConfigDict(
        env_prefix="QWEN_IMAGE_",
        env_file=".env",
        extra="ignore",
        cli_kebab_case=True,
        cli_implicit_flags=True,
        populate_by_name=True,
    )

    @property
    def accepted_keys(self) -> list[ApiKey]:
        """Every API key the server accepts, with its owner id and limits (empty: no keys)."""
        file = read_key_file(self.api_keys_file) if self.api_keys_file is not None else None
        default_jobs = self.key_max_jobs if self.key_max_jobs is not None else max(1, self.max_queue // 2)
        return build_keys(self.api_keys, file, KeyLimits(default_jobs, self.key_requests_per_minute))

    @model_validator(mode="after")
    def _readable_keys_file(self) -> Settings:
        if self.api_keys_file is not None:
            _ = self.accepted_keys  # ValueError (one line naming the file) at start, not at the first request
        return self

    @field_validator("warmup_aspect_ratios", "quantize_skip", "allowed_origins", "allowed_hosts",
                     "webhook_allowed_hosts", mode="before")
    @classmethod
    def _split_lists(cls, value: object) -> object:
        if isinstance(value, str):
            return [part.strip() for part in value.split(",") if part.strip()]
        return value

    # A validator of the values, not an assignment after validation: an assignment would count
    # the field as set, and a default then looks like a choice (a Ray replica's cache_dir would
    # be pinned to the home of the machine that built the application).
    @field_validator("cache_dir", "output_dir", "data_dir", "lora_dir", "api_keys_file")
    @classmethod
    def _expand_user(cls, value: Path | None) -> Path | None:
        return value.expanduser() if value is not None else None


def _holds_secret(annotation: object) -> bool:
    return annotation in (SecretStr, SecretBytes) or any(_holds_secret(arg) for arg in get_args(annotation))


# Settings that are credentials: never copied into what Ray stores and shows (a deployment's
# arguments), each process reads them from its own environment. Every SecretStr setting is one.
SECRET_SETTINGS = frozenset(
    {"api_keys"} | {name for name, field in Settings.model_fields.items() if _holds_secret(field.annotation)})


def setting_names(field: str) -> frozenset[str]:
    """Every name a setting may be given by as an argument (its field name and aliases)."""
    alias = Settings.model_fields[field].validation_alias
    choices = alias.choices if isinstance(alias, AliasChoices) else [alias] if isinstance(alias, str) else []
    return frozenset({field, *(choice for choice in choices if isinstance(choice, str))})
