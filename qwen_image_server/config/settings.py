"""Every knob of the server in one pydantic-settings object: env vars, .env and CLI flags.

The seed's `WORKERS`, `THREADS`, `PORT` and `HOST` keep their bare names; everything else is
`QWEN_IMAGE_<NAME>` in the environment and `--<name>` on the command line.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    AliasChoices,
    Field,
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

from qwen_image_server.config.lora_refs import parse_hub_loras
from qwen_image_server.config.model_list import ModelRef, parse_model_list
from qwen_image_server.config.presets import DEFAULT_ASPECT_RATIO, AspectRatio

DeviceName = Literal["auto", "cuda", "cpu", "mps"]
DtypeName = Literal["auto", "bfloat16", "float16", "float32"]
ModelSource = Literal["huggingface", "modelscope"]
OffloadName = Literal["auto", "none", "model", "sequential"]
QuantizeName = Literal["none", "fp8", "int8"]
CacheName = Literal["none", "cache-dit"]


def _bare(name: str) -> AliasChoices:
    """Accept the seed's bare env var name (PORT) besides the field name (port)."""
    return AliasChoices(name.lower(), name)


def _default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "qwen-image-server"


class Settings(BaseSettings):
    """Server, model and scheduler settings; built once per process and passed down."""

    model_config = SettingsConfigDict(
        env_prefix="QWEN_IMAGE_",
        env_file=".env",
        extra="ignore",
        cli_kebab_case=True,
        cli_implicit_flags=True,
        populate_by_name=True,
    )

    # -- serving (the seed's names) ---------------------------------------------------------
    host: str = Field("0.0.0.0", validation_alias=_bare("HOST"), description="Address to bind.")
    port: int = Field(5000, ge=1, le=65535, validation_alias=_bare("PORT"), description="Port to bind.")
    workers: Annotated[int, Field(ge=1)] | Literal["auto"] = Field(
        1, validation_alias=_bare("WORKERS"),
        description="Engine processes behind the one front process, each with its own copy of the model "
        "on its own GPU; auto: one per visible GPU (one without a GPU).",
    )
    threads: int = Field(
        4, ge=1, validation_alias=_bare("THREADS"),
        description="Threads of the front for CPU work: overlay, PNG encoding, file writes.",
    )
    log_level: Literal["debug", "info", "warning", "error"] = "info"

    # -- model ------------------------------------------------------------------------------
    model: str = Field(
        "tiny",
        description="Comma-separated models, each a hub id (Qwen/Qwen-Image, Qwen/Qwen-Image-Edit-2509), a "
        "local folder, or 'name=source' to give it a public name; 'tiny' is the embedded generation and "
        "edit test models. Requests without a model get the first that can do their task.",
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

    # -- memory and speed (see README "Memory plans and speed options") --------------------
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

    # -- output -----------------------------------------------------------------------------
    output_dir: Path = Field(Path("tmp"), description="Folder for save_to_file images, relative to the cwd.")

    # -- scheduler --------------------------------------------------------------------------
    max_queue: int = Field(32, ge=1, description="Jobs allowed to wait; beyond it requests get 429.")
    max_batch_size: int | None = Field(
        None, ge=1, description="Most jobs run in one pipeline call (default per device: see README)."
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

    # -- results, limits and access ---------------------------------------------------------
    result_ttl_s: float = Field(
        3600.0, gt=0, description="How long finished jobs and url-served images are kept."
    )
    max_stored_results: int = Field(
        256, ge=1, description="Most finished images kept in memory (oldest dropped first)."
    )
    api_keys: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        validation_alias=AliasChoices("api_keys", "api_key"),
        description="Comma-separated keys; when set, every route but /health, /ready, /metrics needs one.",
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

    # -- Ray Serve: `serve --ray`, serve_config.yaml (pip install .[ray]; README "Scale-out") --
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

    @field_validator("api_keys", mode="before")
    @classmethod
    def _split_keys(cls, value: object) -> object:
        if isinstance(value, str):
            return [key.strip() for key in value.split(",") if key.strip()]
        if isinstance(value, list):  # repeated --api-key flags, each possibly comma-separated
            return [k.strip() for item in value for k in str(item).split(",") if k.strip()]
        return value

    @field_validator("warmup_aspect_ratios", "quantize_skip", mode="before")
    @classmethod
    def _split_ratios(cls, value: object) -> object:
        if isinstance(value, str):
            return [part.strip() for part in value.split(",") if part.strip()]
        return value

    @field_validator("workers", mode="wrap")
    @classmethod
    def _engine_count(cls, value: object, handler: ValidatorFunctionWrapHandler) -> object:
        try:
            return handler(value)
        except ValidationError:  # one message for the union's two failures
            raise ValueError("must be a number of engines (1 or more) or 'auto'") from None

    @field_validator("ray_max_queued_requests")
    @classmethod
    def _queue_limit(cls, value: int | None) -> int | None:
        if value == 0:
            raise ValueError("must be -1 (no limit) or at least 1")
        return value

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

    @model_validator(mode="after")
    def _one_replica_count(self) -> Settings:
        if self.ray_replicas is not None and self.ray_autoscaling is not None:
            raise ValueError("set ray_replicas (a fixed count) or ray_autoscaling, not both")
        return self

    @model_validator(mode="after")
    def _normalise_paths(self) -> Settings:
        self.cache_dir = self.cache_dir.expanduser()
        self.output_dir = self.output_dir.expanduser()
        if self.lora_dir is not None:
            self.lora_dir = self.lora_dir.expanduser()
        return self
