"""Loads a QwenImagePipeline from a hub id, a local folder, ModelScope or the embedded tiny model.

Every source ends in the same `QwenImagePipeline.from_pretrained(...)` call; the tiny model is
only a folder built once on disk. A failure becomes `ModelLoadError` with one paragraph saying
what was tried and what to do, which the caller prints instead of a traceback.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import diffusers
import torch
import transformers
from diffusers import QwenImagePipeline

from qwen_image_server.engine.device import DeviceInfo, resolve_device, resolve_dtype
from qwen_image_server.engine.options import AppliedOptions, batch_config, check_options, prepare_pipeline
from qwen_image_server.engine.quantize import tensor_bytes
from qwen_image_server.engine.tiny import TINY_MODEL_NAME, ensure_tiny_model
from qwen_image_server.errors import ModelLoadError, OptionUnavailable
from qwen_image_server.settings import Settings

log = logging.getLogger(__name__)

# Per-file progress bars would flood the server log (and Gunicorn's); we log one line instead.
diffusers.utils.logging.disable_progress_bar()
transformers.utils.logging.disable_progress_bar()

# model_index.json `_class_name`s this server can drive with QwenImagePipeline.
_COMPATIBLE_CLASSES = {"QwenImagePipeline"}


@dataclass(frozen=True, slots=True)
class LoadedModel:
    pipeline: QwenImagePipeline
    name: str  # what /info calls it: the hub id, the folder, or "tiny"
    source: str  # "huggingface", "modelscope", "local" or "embedded"
    device: DeviceInfo
    dtype: torch.dtype
    load_time: float  # seconds
    total_parameters: int
    size_mb: float  # bytes of all weights / 2**20 (as stored: quantized layers count their bytes)
    options: AppliedOptions
    # The scheduler's batch limits on this device: what a compile warm-up must cover.
    max_batch_size: int = 1
    max_batch_pixels: int = 512 * 512

    @property
    def max_prompt_tokens(self) -> int:
        return int(self.pipeline.tokenizer_max_length)


def count_parameters(pipeline: QwenImagePipeline) -> tuple[int, float]:
    """Parameters and their size in MiB over every torch module of the pipeline."""
    total, size = 0, 0
    for component in pipeline.components.values():
        if isinstance(component, torch.nn.Module):
            for p in component.parameters():
                total += p.numel()
                size += tensor_bytes(p)
    return total, round(size / 2**20, 2)


def _looks_local(model: str) -> bool:
    return model.startswith((".", "/", "~")) or Path(model).expanduser().exists() or "\\" in model


def _check_local_folder(folder: Path) -> None:
    index = folder / "model_index.json"
    if not folder.is_dir():
        raise ModelLoadError(f"the folder {folder} does not exist")
    if not index.is_file():
        raise ModelLoadError(f"{folder} has no model_index.json, so it is not a diffusers pipeline folder")
    class_name = json.loads(index.read_text()).get("_class_name")
    if class_name not in _COMPATIBLE_CLASSES:
        raise ModelLoadError(f"{folder} holds a {class_name}, not a Qwen-Image text-to-image pipeline")


def _advice(settings: Settings, source: str) -> str:
    if source == "huggingface":
        return (
            "Check the network and the id, log in with `hf auth login` if the repo is gated, or "
            "download it first (`hf download Qwen/Qwen-Image --local-dir ./Qwen-Image`) and set "
            "QWEN_IMAGE_MODEL=./Qwen-Image; QWEN_IMAGE_MODEL_SOURCE=modelscope fetches from "
            "ModelScope instead, and QWEN_IMAGE_MODEL=tiny serves the embedded test model."
        )
    if source == "modelscope":
        return (
            "Check the network and the id, install the extra with `pip install "
            "qwen-image-server[modelscope]`, or download the model and point QWEN_IMAGE_MODEL at "
            "its folder; QWEN_IMAGE_MODEL=tiny serves the embedded test model."
        )
    if source == "local":
        return (
            "Point QWEN_IMAGE_MODEL at a folder made by `save_pretrained` or downloaded from "
            "Qwen/Qwen-Image (it holds model_index.json, transformer/, vae/, text_encoder/, "
            "tokenizer/, scheduler/), or use QWEN_IMAGE_MODEL=tiny for the embedded test model."
        )
    return f"Delete {settings.cache_dir} so the embedded model is rebuilt, and check free disk space."


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__


def _source_of(settings: Settings) -> str:
    """'embedded', 'local', 'modelscope' or 'huggingface'."""
    if settings.model == TINY_MODEL_NAME:
        return "embedded"
    if _looks_local(settings.model):
        return "local"
    return settings.model_source


def _location(settings: Settings, source: str) -> str:
    """What to hand to from_pretrained: a folder on disk, or a Hugging Face hub id."""
    if source == "embedded":
        return str(ensure_tiny_model(settings.cache_dir))
    if source == "local":
        folder = Path(settings.model).expanduser()
        _check_local_folder(folder)
        return str(folder)
    if source == "modelscope":
        try:
            from modelscope import snapshot_download  # optional extra
        except ImportError as exc:
            raise ModelLoadError("the modelscope package is not installed") from exc
        return snapshot_download(settings.model, revision=settings.revision)
    return settings.model


def load_model(settings: Settings) -> LoadedModel:
    """Load the configured pipeline onto the configured device, or raise ModelLoadError."""
    start = time.perf_counter()
    try:
        device = resolve_device(settings.device)
    except RuntimeError as exc:
        raise ModelLoadError(
            f"Could not load the model {settings.model!r}: {exc}. Set QWEN_IMAGE_DEVICE=auto (or cpu), "
            "or install a CUDA build of torch on a machine with an NVIDIA GPU."
        ) from exc
    dtype = resolve_dtype(settings.dtype, device)
    try:
        check_options(settings, device)  # before any download: a wrong option fails in a second
    except OptionUnavailable as exc:
        raise ModelLoadError(f"Could not start with these options: {str(exc).rstrip('. ')}.") from exc
    source = _source_of(settings)
    where = f"QwenImagePipeline.from_pretrained({settings.model!r}, dtype={dtype}) from {source} onto {device.type}"
    try:
        location = _location(settings, source)
        revision = settings.revision if source == "huggingface" else None
        pipeline = QwenImagePipeline.from_pretrained(location, dtype=dtype, revision=revision)
        if not isinstance(pipeline, QwenImagePipeline):
            raise ModelLoadError(f"{settings.model} loaded as {type(pipeline).__name__}")
        options = prepare_pipeline(pipeline, settings, device)
    except OptionUnavailable as exc:
        raise ModelLoadError(f"Could not start with these options: {str(exc).rstrip('. ')}.") from exc
    except Exception as exc:  # noqa: BLE001 - every failure becomes the one-paragraph message
        cause = str(exc) if isinstance(exc, ModelLoadError) else _first_line(exc)
        raise ModelLoadError(
            f"Could not load the model {settings.model!r}: tried {where}, and it failed with: "
            f"{cause.rstrip('. ')}. {_advice(settings, source)}"
        ) from exc
    total, size_mb = count_parameters(pipeline)
    batches = batch_config(settings, device)
    load_time = time.perf_counter() - start
    log.info("loaded %s (%s) on %s in %.2fs: %s parameters, %.1f MB, %s; options: %s",
             settings.model, source, device.label, load_time, f"{total:,}", size_mb, dtype,
             options.summary())
    return LoadedModel(
        pipeline=pipeline,
        name=settings.model,
        source=source,
        device=device,
        dtype=dtype,
        load_time=load_time,
        total_parameters=total,
        size_mb=size_mb,
        options=options,
        max_batch_size=batches.max_batch_size,
        max_batch_pixels=batches.max_batch_pixels,
    )
