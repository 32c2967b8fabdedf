"""Loads a Qwen-Image pipeline from a hub id, a local folder, ModelScope or the embedded tiny models.

Every source ends in a folder on disk and the same `<class>.from_pretrained(folder)` call, the
class read from the folder's own model_index.json (generation: QwenImagePipeline; editing:
QwenImageEditPipeline, QwenImageEditPlusPipeline); the tiny models are only folders built once.
A failure becomes `ModelLoadError` with one paragraph saying what was tried and what to do, which
the caller prints instead of a traceback.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import diffusers
import torch
import transformers
from diffusers import QwenImagePipeline

from qwen_image_server.config.model_list import (
    LOCAL_FOLDER_ADVICE,
    TINY_CONTROLNET_NAME,
    TINY_EDIT_MODEL_NAME,
    TINY_INPAINT_CONTROLNET_NAME,
    TINY_LAYERED_MODEL_NAME,
    TINY_MODEL_NAME,
    ModelRef,
    local_folder_problem,
    looks_local,
)
from qwen_image_server.config.settings import Settings
from qwen_image_server.engine.contract import settings_batch_limits
from qwen_image_server.engine.device import DeviceInfo, resolve_device, resolve_dtype
from qwen_image_server.engine.loaded import LoadedModel
from qwen_image_server.engine.memory import OffloadPlan
from qwen_image_server.engine.options import check_options, prepare_pipeline
from qwen_image_server.engine.processor import load_processor
from qwen_image_server.engine.quantize import tensor_bytes
from qwen_image_server.engine.tiny import (
    ensure_tiny_controlnet,
    ensure_tiny_edit_model,
    ensure_tiny_inpaint_controlnet,
    ensure_tiny_layered_model,
    ensure_tiny_model,
)
from qwen_image_server.engine.types import Task
from qwen_image_server.errors import ModelLoadError, OptionUnavailable

log = logging.getLogger(__name__)

# Per-file progress bars would flood the server log (and Gunicorn's); we log one line instead.
diffusers.utils.logging.disable_progress_bar()
transformers.utils.logging.disable_progress_bar()

# model_index.json `_class_name`s this server drives, and the task each does.
PIPELINE_TASKS: dict[str, Task] = {
    "QwenImagePipeline": "generate",
    "QwenImageEditPipeline": "edit",  # Qwen-Image-Edit: one input image
    "QwenImageEditPlusPipeline": "edit",  # Qwen-Image-Edit-2509 / -2511: one to three
    "QwenImageLayeredPipeline": "layered",  # Qwen-Image-Layered: one picture -> RGBA layers
}


def count_parameters(pipeline: QwenImagePipeline) -> tuple[int, float]:
    """Parameters and their size in MiB over every torch module of the pipeline."""
    total, size = 0, 0
    for component in pipeline.components.values():
        if isinstance(component, torch.nn.Module):
            for p in component.parameters():
                total += p.numel()
                size += tensor_bytes(p)
    return total, round(size / 2**20, 2)


def pipeline_class_name(folder: Path) -> str:
    """The pipeline class a folder's model_index.json names, if this server can drive it."""
    class_name = json.loads((folder / "model_index.json").read_text()).get("_class_name")
    if class_name not in PIPELINE_TASKS:
        raise ModelLoadError(f"{folder} holds a {class_name}, not one of the Qwen-Image pipelines this "
                             f"server runs ({', '.join(PIPELINE_TASKS)})")
    return str(class_name)


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
        return LOCAL_FOLDER_ADVICE
    return f"Delete {settings.cache_dir} so the embedded model is rebuilt, and check free disk space."


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__


def _source_of(settings: Settings, ref: ModelRef) -> str:
    """'embedded', 'local', 'modelscope' or 'huggingface'."""
    if ref.source in (TINY_MODEL_NAME, TINY_EDIT_MODEL_NAME, TINY_LAYERED_MODEL_NAME):
        return "embedded"
    if looks_local(ref.source):
        return "local"
    return settings.model_source


def model_folder(settings: Settings, ref: ModelRef, source: str) -> Path:
    """The pipeline's folder on disk, downloaded first for a hub id (model_index.json says which
    pipeline class it is, so it is read before anything loads)."""
    if source == "embedded":
        if ref.source == TINY_EDIT_MODEL_NAME:
            return ensure_tiny_edit_model(settings.cache_dir)
        if ref.source == TINY_LAYERED_MODEL_NAME:
            return ensure_tiny_layered_model(settings.cache_dir)
        return ensure_tiny_model(settings.cache_dir)
    if source == "local":
        folder = Path(ref.source).expanduser()
        problem = local_folder_problem(folder)
        if problem is not None:
            raise ModelLoadError(problem)
        return folder
    if source == "modelscope":
        try:
            from modelscope import snapshot_download  # optional extra
        except ImportError as exc:
            raise ModelLoadError("the modelscope package is not installed") from exc
        return Path(snapshot_download(ref.source, revision=settings.revision))
    return Path(diffusers.DiffusionPipeline.download(ref.source, revision=settings.revision))


def start_loading(settings: Settings) -> tuple[DeviceInfo, torch.dtype]:
    """The device and dtype to load onto, after checking the options (before any download: a
    wrong option fails in a second); ModelLoadError otherwise."""
    try:
        device = resolve_device(settings.device)
    except RuntimeError as exc:
        raise ModelLoadError(
            f"Could not load the model {settings.model!r}: {exc}. Set QWEN_IMAGE_DEVICE=auto (or cpu), "
            "or install a CUDA build of torch on a machine with an NVIDIA GPU."
        ) from exc
    try:
        check_options(settings, device)
    except OptionUnavailable as exc:
        raise ModelLoadError(f"Could not start with these options: {str(exc).rstrip('. ')}.") from exc
    return device, resolve_dtype(settings.dtype, device)


@dataclass(slots=True)
class LoadingModel:
    """A pipeline read from disk onto the CPU, its options not applied yet."""

    ref: ModelRef
    source: str
    folder: Path
    pipeline: QwenImagePipeline
    shared: tuple[str, ...]
    started: float


def read_model(settings: Settings, ref: ModelRef, device: DeviceInfo, dtype: torch.dtype,
               reuse: Callable[[Path], dict[str, Any]] | None = None) -> LoadingModel:
    """Read one pipeline from its folder; `reuse(folder)` names modules already loaded (same
    weights) to use instead of reading them again. ModelLoadError with the one-paragraph advice."""
    start = time.perf_counter()
    source = _source_of(settings, ref)
    where = f"from_pretrained({ref.source!r}, dtype={dtype}) from {source} onto {device.type}"
    components: dict[str, Any] = {}
    try:
        folder = model_folder(settings, ref, source)
        class_name = pipeline_class_name(folder)
        if reuse is not None:
            components.update(reuse(folder))
        where = f"{class_name}.{where}"
        if (folder / "processor").is_dir():
            # Read here so that no torchvision is needed (see engine/processor.py).
            components["processor"] = load_processor(folder / "processor", components.get("tokenizer"))
        pipeline = getattr(diffusers, class_name).from_pretrained(folder, dtype=dtype, **components)
    except Exception as exc:  # every failure becomes the one-paragraph message
        raise _load_error(settings, ref, where, source, exc) from exc
    return LoadingModel(ref, source, folder, pipeline,
                        tuple(name for name in components if name not in ("processor", "tokenizer")), start)


def finish_model(settings: Settings, loading: LoadingModel, device: DeviceInfo, dtype: torch.dtype,
                 plan: OffloadPlan | None = None) -> LoadedModel:
    """Apply the options (and the memory plan, when one was made for several models)."""
    ref, pipeline = loading.ref, loading.pipeline
    try:
        options = prepare_pipeline(pipeline, settings, device, plan)
    except OptionUnavailable as exc:
        raise ModelLoadError(f"Could not start with these options: {str(exc).rstrip('. ')}.") from exc
    except Exception as exc:
        raise _load_error(settings, ref, f"preparing {type(pipeline).__name__} on {device.type}",
                          loading.source, exc) from exc
    total, size_mb = count_parameters(pipeline)
    batches = settings_batch_limits(settings, device.type)
    load_time = time.perf_counter() - loading.started
    log.info("loaded %s (%s, %s) on %s in %.2fs: %s parameters, %.1f MB, %s; shared: %s; options: %s",
             ref.name, type(pipeline).__name__, loading.source, device.label, load_time, f"{total:,}",
             size_mb, dtype, ", ".join(loading.shared) or "nothing", options.summary())
    return LoadedModel(
        pipeline=pipeline,
        name=ref.name,
        source=loading.source,
        device=device,
        dtype=dtype,
        load_time=load_time,
        total_parameters=total,
        size_mb=size_mb,
        options=options,
        max_batch_size=batches.max_batch_size,
        max_batch_pixels=batches.max_batch_pixels,
        task=PIPELINE_TASKS[type(pipeline).__name__],
        shared=loading.shared,
    )


def with_controlnets(settings: Settings, model: LoadedModel) -> LoadedModel:
    """`model` with the ControlNets QWEN_IMAGE_CONTROLNETS declares for it, loaded onto the device
    its pipeline runs on. A ControlNet is its own small network next to the model's transformer,
    which it shares (the ControlNet pipeline is made over the model's modules). A ControlNet whose
    config takes extra condition channels (InstantX's Qwen-Image-ControlNet-Inpainting: the
    mask's) is the model's inpainting ControlNet (QwenImageControlNetInpaintPipeline); the other
    follows control images (QwenImageControlNetPipeline). A model has at most one of each:
    diffusers calls one ControlNet per pipeline call (several control images go through one
    union ControlNet)."""
    sources = settings.controlnet_sources.get(model.name, ())
    if not sources:
        return model
    if model.task != "generate":
        raise ModelLoadError(f"QWEN_IMAGE_CONTROLNETS gives the model {model.name!r} a ControlNet, but it is a "
                             f"{model.pipeline_class}: ControlNets steer generation models (Qwen-Image, -2512).")
    from diffusers import QwenImageControlNetModel

    nets: list[tuple[str, Any]] = []
    inpainting: list[tuple[str, Any]] = []
    for source in sources:
        where = f"QwenImageControlNetModel.from_pretrained({source!r}, dtype={model.dtype})"
        try:
            if source == TINY_CONTROLNET_NAME:
                location: str | Path = ensure_tiny_controlnet(settings.cache_dir)
            elif source == TINY_INPAINT_CONTROLNET_NAME:
                location = ensure_tiny_inpaint_controlnet(settings.cache_dir)
            elif looks_local(source):
                location = Path(source).expanduser()
            elif settings.model_source == "modelscope":
                from modelscope import snapshot_download  # optional extra

                location = Path(snapshot_download(source))
            else:
                location = source
            net = QwenImageControlNetModel.from_pretrained(location, torch_dtype=model.dtype)
        except Exception as exc:
            raise ModelLoadError(
                f"Could not load the ControlNet {source!r} for the model {model.name!r}: tried {where}, and it "
                f"failed with: {_first_line(exc).rstrip('. ')}. Check QWEN_IMAGE_CONTROLNETS (a hub id or "
                "folder of a QwenImageControlNetModel, e.g. InstantX/Qwen-Image-ControlNet-Union), or set it "
                "to 'none'.") from exc
        net = net.eval().requires_grad_(False).to(model.pipeline._execution_device)
        (inpainting if net.config.extra_condition_channels else nets).append((source, net))
    for found, what in ((nets, "ControlNets that follow control images"), (inpainting, "inpainting ControlNets")):
        if len(found) > 1:
            raise ModelLoadError(
                f"QWEN_IMAGE_CONTROLNETS gives the model {model.name!r} {len(found)} {what} "
                f"({', '.join(source for source, _ in found)}); diffusers runs one per call, so declare one "
                "(a union ControlNet, such as InstantX/Qwen-Image-ControlNet-Union, takes several control "
                "images at once).")
    module = nets[0][1] if nets else None
    log.info("ControlNets served with %s: %s", model.name,
             ", ".join([*(source for source, _ in nets), *(f"{source} (inpainting)" for source, _ in inpainting)]))
    return replace(model, controlnets=tuple(source for source, _ in nets), controlnet=module,
                   inpaint_controlnets=tuple(source for source, _ in inpainting),
                   inpaint_controlnet=inpainting[0][1] if inpainting else None)


def _load_error(settings: Settings, ref: ModelRef, where: str, source: str, exc: BaseException) -> ModelLoadError:
    cause = str(exc) if isinstance(exc, ModelLoadError) else _first_line(exc)
    return ModelLoadError(
        f"Could not load the model {ref.source!r}: tried {where}, and it failed with: "
        f"{cause.rstrip('. ')}. {_advice(settings, source)}"
    )


def load_model(settings: Settings, ref: ModelRef | None = None) -> LoadedModel:
    """Load one pipeline (by default the first configured) onto the configured device, or raise
    ModelLoadError. `engine/models.py` loads several, sharing what they share."""
    device, dtype = start_loading(settings)
    ref = ref or settings.models[0]
    return finish_model(settings, read_model(settings, ref, device, dtype), device, dtype)
