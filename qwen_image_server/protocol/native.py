"""Wire models of the native API (the seed's /health, /info, /generate; /edit, jobs, LoRAs): what
clients send and get back. Validation lives here and in `common.py`, nowhere else."""

from __future__ import annotations

from typing import Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, HttpUrl, field_validator

from qwen_image_server.config.presets import ASPECT_RATIOS, DEFAULT_ASPECT_RATIO, AspectRatio
from qwen_image_server.config.webhooks import without_credentials
from qwen_image_server.engine.types import PreviewMode, PreviewPlan
from qwen_image_server.job_state import FINAL_STATES, JobState
from qwen_image_server.protocol.common import (
    LAYERED_PROMPT_DESCRIPTION,
    MASK_DESCRIPTION,
    MAX_PROMPT_CHARS,
    ControlFields,
    EditFields,
    ErrorDetail,
    NativeImageFields,
    PromptFields,
    StartImageFields,
    UploadFields,
    blank_is_empty,
    json_list,
)


class GenerateRequest(ControlFields, StartImageFields, NativeImageFields, PromptFields):
    """Body of POST /generate: the seed's parameters and defaults, exactly; plus, optionally, a
    picture to start from (image-to-image, inpainting) or a ControlNet's control image."""

    # strict: "20" is not a number of steps and 1 is not a boolean; ints are still fine as floats.
    model_config = ConfigDict(strict=True, extra="ignore")

    aspect_ratio: AspectRatio = Field(DEFAULT_ASPECT_RATIO, description="Size preset, see /info.")

    def output_size(self, first_input: tuple[int, int] | None = None) -> tuple[int, int]:
        """The aspect ratio preset's size."""
        return ASPECT_RATIOS[self.aspect_ratio]


# Steps between previews when a job asks for one without `preview_every`: latent previews cost
# next to nothing, so every step; a full preview is a VAE decode, about a step's worth at 1024².
DEFAULT_PREVIEW_EVERY: dict[PreviewMode, int] = {"latent": 1, "full": 5}


class PreviewOptions(BaseModel):
    """Live previews of a job, sent as `preview` events on its event stream."""

    preview: Literal["none", "latent", "full"] = Field("none", description=(
        "Jobs: previews of the image while it forms, sent as `preview` events: 'latent' (a cheap "
        "projection of the latents, 1/4 of the image's size) or 'full' (a VAE decode, full size)."))
    preview_every: int | None = Field(None, ge=1, le=100, description=(
        "Steps between previews; default every step for 'latent', every 5th for 'full'."))

    def preview_plan(self) -> PreviewPlan | None:
        if self.preview == "none":
            return None
        return PreviewPlan(self.preview, every=self.preview_every or DEFAULT_PREVIEW_EVERY[self.preview])


class WebhookOptions(BaseModel):
    """Where a job's end is announced (jobs only: a synchronous request answers with its image)."""

    webhook_url: HttpUrl | None = Field(None, description=(
        "Jobs: a URL that gets a POST when the job succeeds, fails or is cancelled (Standard Webhooks: "
        "signed, retried until accepted with a 2xx). Public hosts only, unless the server's "
        "QWEN_IMAGE_WEBHOOK_ALLOWED_HOSTS lists it; default: the server's QWEN_IMAGE_WEBHOOK_URL."))

    _no_credentials = field_validator("webhook_url")(without_credentials)


class JobRequest(GenerateRequest, PreviewOptions, WebhookOptions):
    """Body of POST /v1/jobs: /generate's, plus live previews and a webhook."""


class JobPreview(BaseModel):
    """A `preview` event of a job's stream: the image as it stood after `step`."""

    id: str = Field(description="The job's id.")
    step: int
    total: int
    mode: PreviewMode
    width: int = Field(description="Of the preview (latent previews are smaller than the image).")
    height: int
    media_type: str = Field(description="image/webp (or image/jpeg where Pillow lacks WebP).")
    b64_json: str = Field(description="The encoded preview, base64.")


class GenerateFileResponse(BaseModel):
    """What a save_to_file request gets: the saved file's path; or, when saving failed, why,
    and the image itself (so the GPU's work is never lost)."""

    status: Literal["success"] = "success"
    request_id: int
    inference_time: float = Field(description="Seconds the pipeline call took.")
    file_path: str | None = Field(description="Where the PNG was saved, relative to the server's cwd; null "
                                  "when saving failed (see save_error).")
    file_url: str | None = Field(None, description="A link that downloads the saved PNG (GET /files/...), "
                                 "signed for the API key that saved it and valid for QWEN_IMAGE_FILE_LINK_TTL_S.")
    width: int
    height: int
    save_error: ErrorDetail | None = Field(None, description="Only when saving failed: why (code: the OS "
                                           "error, e.g. ENOSPC).")
    b64_json: str | None = Field(None, description="Only when saving failed: the PNG, base64.")


class HealthResponse(BaseModel):
    status: Literal["healthy", "unhealthy"]
    model_loaded: bool
    device: str
    gpu: str | None = Field(description="GPU name; null on CPU.")
    cuda_version: str | None = Field(description="CUDA runtime version; null without CUDA.")
    reason: str | None = Field(
        None, description="What is wrong, if anything: an engine restarting (after a hung batch or a crash; "
        "the server stays healthy meanwhile), or why no engine can serve any more.")


class ReadyResponse(BaseModel):
    ready: bool
    reason: str | None = None


class GpuMemory(BaseModel):
    allocated: float
    reserved: float
    total: float


class SchedulerInfo(BaseModel):
    queue_length: int
    running_batch_size: int
    processed: int
    failed: int
    cancelled: int
    rejected: int
    timed_out: int
    batches: int
    mean_inference_time: float | None = Field(description="Mean seconds per pipeline call.")
    max_queue: int
    max_batch_size: int
    max_batch_pixels: int
    batch_wait_ms: float
    queue_timeout_s: float


class RankInfo(BaseModel):
    """One rank of an engine that splits each image over several GPUs."""

    rank: int
    gpu: int | None = Field(description="Its GPU, among the visible ones; null on the CPU.")
    pid: int | None = Field(description="Its process.")


class EngineInfo(BaseModel):
    """One engine: a model copy in its own process (or in the server's, for one in-process engine)."""

    index: int
    state: str = Field(description="loading, idle, busy, restarting, failed (given up) or stopped.")
    busy: bool
    gpu: int | None = Field(description="The GPU it runs on, among the visible ones; null without one.")
    pid: int | None = Field(description="Its process; null for an engine inside the server process.")
    batches: int = Field(description="Pipeline calls run.")
    restarts: int = Field(description="Times it was started again after its process died.")
    gpu_memory: GpuMemory | None = Field(None, description="As of its last batch (CUDA only).")
    parallel: str | None = Field(None, description="How it splits each image over its GPUs (cfg, ulysses, ring, "
                                 "cfg+ulysses); null for an engine of one GPU.")
    ranks: list[RankInfo] = Field(default_factory=list, description="Its ranks, one per GPU (empty: one GPU).")


class EngineOptions(BaseModel):
    """Memory plan and speed options in effect (see docs/gpus.md)."""

    offload: str = Field(description="Plan in use: none, model or sequential.")
    offload_reason: str = Field(description="Why: the setting, or what auto compared.")
    quantize: str
    quantize_text_encoder: bool
    quantize_skip: list[str] = Field(description="Transformer layers left unquantized.")
    compile: bool
    cache: str
    cache_options: dict[str, float | int | bool | str]
    lora: str | None
    lora_scale: float | None
    attention: str
    warmup: bool
    fp8_fallbacks: dict[str, str] = Field(
        default_factory=dict,
        description="fp8 on a GPU: layer shapes ('in x out') running per-tensor or exact-accumulation fp8, or "
                    "bf16, because this GPU's cuBLASLt has no row-wise fp8 kernel for them.")


class GenerationDefaultsInfo(BaseModel):
    """What a request gets for the fields it leaves out."""

    num_inference_steps: int
    true_cfg_scale: float
    reason: str


class JobStatesInfo(BaseModel):
    """The states a job's `status` takes; after a final one nothing changes any more."""

    states: list[JobState] = Field(default_factory=lambda: list(JobState))
    final: list[JobState] = Field(default_factory=lambda: [s for s in JobState if s in FINAL_STATES])


class ModelInfo(BaseModel):
    """One served model and what it can do."""

    name: str = Field(description="Its public name: requests' `model`.")
    tasks: list[str] = Field(description="generate or edit (empty while it loads).")
    pipeline: str | None = Field(description="The diffusers pipeline class (null while it loads).")
    max_input_images: int = Field(description="Input images one edit takes (0: not an edit model).")
    shared: list[str] = Field(description="Components it shares with an earlier model (same weights, loaded once).")


class InfoResponse(BaseModel):
    model_name: str = Field(description="The first model (the one requests without a model get).")
    model_source: str
    model_loaded: bool
    device: str
    gpu: str | None
    cuda_version: str | None
    dtype: str | None
    model_load_time: float | None = Field(description="Seconds it took to load the model.")
    total_parameters: int | None
    model_size_mb: float | None
    gpu_memory_mb: float | None = Field(description="Device memory allocated by this process, MiB.")
    gpu_memory: GpuMemory | None
    supported_aspect_ratios: list[str]
    aspect_ratios: dict[str, tuple[int, int]] = Field(description="Preset name -> (width, height).")
    total_requests_processed: int
    concurrent_support: Literal["enabled"] = "enabled"
    workers: int
    threads: int
    replica: str | None = Field(
        None, description="The replica that answered, when scaled out on Ray Serve; null otherwise.")
    scheduler: SchedulerInfo
    engines: list[EngineInfo] = Field(
        default_factory=list, description="Every engine behind this server's one queue (WORKERS of them).")
    options: EngineOptions | None = Field(None, description="Null while the model loads.")
    defaults: GenerationDefaultsInfo
    job_states: JobStatesInfo = Field(default_factory=JobStatesInfo)
    models: list[ModelInfo] = Field(default_factory=list, description="Every model served, the first first.")
    version: str


class LoraInfo(BaseModel):
    """One LoRA requests may name (GET /v1/loras)."""

    name: str = Field(description="What a request's `loras[].name` says.")
    source: Literal["folder", "hub"] = Field(description="QWEN_IMAGE_LORA_DIR or QWEN_IMAGE_LORAS.")
    location: str = Field(description="The file name in the folder, or the hub repo (and file).")
    rank: int | None = Field(description="Its rank (null for a hub LoRA not downloaded yet).")
    base_model: str | None = Field(description="The model it says it was trained for (Qwen-Image, "
                                   "Qwen-Image-Edit, ...); null when the file does not say.")
    fits: list[str] = Field(description="The loaded models it can run on.")
    lightning_steps: int | None = Field(description="A Lightning (step-distilled) LoRA's step count.")
    resident: list[str] = Field(description="The models it is loaded on now (no load wait).")
    resident_engines: list[int] = Field(default_factory=list, description="The engine processes it is "
                                        "loaded on now (numbered as in /info's engines; empty with an "
                                        "in-process engine).")
    usable: bool
    problem: str | None = Field(None, description="Why it is not usable, or why it fits no model.")


class LoraList(BaseModel):
    object: Literal["list"] = "list"
    data: list[LoraInfo]
    max_per_request: int
    max_resident: int


JobPhase = Literal["captioning", "denoising"]


class JobProgress(BaseModel):
    step: int
    total: int
    phase: JobPhase | None = Field(None, description=(
        "While the job runs: 'captioning' while a layered model writes the caption of a picture sent "
        "without a prompt (before step 1), else 'denoising'; null while queued and once ended."))


class JobStatus(BaseModel):
    """State of an async job (POST /v1/jobs, GET /v1/jobs/{id}, and every SSE event)."""

    id: str
    status: JobState
    queue_position: int | None = Field(description="0 = next to start; null once started.")
    progress: JobProgress
    request_id: int
    created_at: float = Field(description="Unix time the job was accepted.")
    started_at: float | None = None
    finished_at: float | None = None
    queue_time: float | None = Field(None, description="Seconds between acceptance and start.")
    inference_time: float | None = Field(None, description="Seconds of the pipeline call.")
    preview_time: float | None = Field(None, description=(
        "Seconds of that call spent making this job's previews (null for jobs without previews)."))
    width: int
    height: int
    seed: int
    engine: int | None = Field(None, description="The engine that runs or ran the job (see /info's engines).")
    image_url: str | None = Field(None, description="Where the PNG is, once succeeded.")
    file_path: str | None = Field(None, description="Where it was saved, for save_to_file jobs.")
    file_url: str | None = Field(None, description="A signed link that downloads the saved PNG (GET /files/...).")
    save_error: ErrorDetail | None = Field(None, description=(
        "A save_to_file job whose image could not be saved: why (code: the OS error, e.g. ENOSPC). The "
        "job still succeeds, and its image is at image_url."))
    error: ErrorDetail | None = None
    loading_lora: str | None = Field(None, description="The LoRA being loaded for this job right now "
                                     "(a first use; it then stays resident).")


# -- editing (/edit, /v1/jobs/edit) ---------------------------------------------------------

class EditParameters(PreviewOptions, EditFields, NativeImageFields, PromptFields):
    """/edit's parameters besides the images: /generate's (no aspect_ratio: the size follows the
    first image), plus model, size and strength; and for /v1/jobs/edit, previews (/edit, which
    answers with the finished image, ignores them)."""

    _loras_as_json = field_validator("loras", mode="before")(json_list)

    def parameters(self) -> EditParameters:
        """These parameters alone, as the client set them, without a subclass's images (a form's
        files, a JSON body's base64): what a request keeps once its images are read."""
        return _only(EditParameters, self)


class EditJobParameters(EditParameters, WebhookOptions):
    """/v1/jobs/edit's parameters besides the images: /edit's, plus a webhook."""

    def parameters(self) -> EditJobParameters:
        return _only(EditJobParameters, self)


P = TypeVar("P", bound=BaseModel)


def _only(model: type[P], body: BaseModel) -> P:
    """`body`'s fields that `model` has, as the client set them."""
    return model.model_validate(body.model_dump(include=set(model.model_fields), exclude_unset=True))


class EditRequest(EditParameters):
    """JSON body of POST /edit: the images as base64 (no URLs: the server fetches nothing)."""

    model_config = ConfigDict(strict=True, extra="ignore")

    images: list[str] = Field(min_length=1, description="Input images as base64 (PNG, JPEG, WebP, ...); "
                              "1 for Qwen-Image-Edit, up to 3 for Edit-2509/2511.")
    mask: str | None = Field(None, description="Base64 " + MASK_DESCRIPTION)


class EditForm(UploadFields, EditParameters):
    """multipart/form-data body of POST /edit: the images as files (`image`, repeated, or `image[]`)."""

    model_config = ConfigDict(extra="ignore")


class EditJobRequest(EditRequest, EditJobParameters):
    """JSON body of POST /v1/jobs/edit: /edit's, plus a webhook."""


class EditJobForm(EditForm, EditJobParameters):
    """multipart/form-data body of POST /v1/jobs/edit: /edit's, plus a webhook."""


# -- layered (/v1/jobs/layers) -------------------------------------------------------------

class LayeredJobParameters(PreviewOptions, NativeImageFields, PromptFields, WebhookOptions):
    """/v1/jobs/layers' parameters besides the picture: a layered model splits it into `layers`
    RGBA layers (the prompt may be left out), with latent previews and a webhook."""

    prompt: str = Field("", max_length=MAX_PROMPT_CHARS, description=LAYERED_PROMPT_DESCRIPTION)
    model: str | None = Field(None, description="The layered model (see /v1/models); default: the first one.")
    layers: int = Field(4, ge=2, le=10, description="How many RGBA layers to split the picture into.")
    resolution: Literal[640, 1024] = Field(640, description=(
        "The model's resolution bucket: each layer is about resolution x resolution pixels at the "
        "picture's aspect ratio."))
    add_overlay: bool = Field(False, description="Ignored: layers get no info strip.")
    save_to_file: Literal[False] = Field(False, description=(
        "Not available: a layered job's results are its stacked PNG and its layers' ZIP."))

    _not_blank = field_validator("prompt")(blank_is_empty)
    _loras_as_json = field_validator("loras", mode="before")(json_list)

    @field_validator("resolution", mode="before")
    @classmethod
    def _form_number(cls, value: object) -> object:
        """A form sends the bucket as text; a literal of numbers takes only numbers."""
        return int(value) if isinstance(value, str) and value.strip().isdigit() else value

    def parameters(self) -> LayeredJobParameters:
        """These parameters alone, as the client set them (without the form's files)."""
        return _only(LayeredJobParameters, self)


class LayeredJobForm(UploadFields, LayeredJobParameters):
    """multipart/form-data body of POST /v1/jobs/layers: the picture as the file `image`."""

    model_config = ConfigDict(extra="ignore")
