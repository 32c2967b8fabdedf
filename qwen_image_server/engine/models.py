"""Several models in one engine: loading them with their shared components read once, and
running each batch on the model its specs name.

Components are shared when they are the same weights (equal fingerprints of their folders, see
`component_fingerprint`): Qwen-Image and Qwen-Image-Edit(-2509/-2511) carry the same Qwen2.5-VL
text encoder and the same VAE, so a generation model and an edit model in one server hold one
text encoder and one VAE. The memory plan is made once for all models, counting each module once.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import time
from collections.abc import Sequence
from pathlib import Path

from PIL import Image

from qwen_image_server.config.presets import ASPECT_RATIOS, DEFAULT_NEGATIVE_PROMPT
from qwen_image_server.config.settings import Settings
from qwen_image_server.engine.adapters import ResidentAdapters
from qwen_image_server.engine.contract import EngineFacts
from qwen_image_server.engine.device import DeviceInfo
from qwen_image_server.engine.loaded import LoadedModel
from qwen_image_server.engine.loader import (
    LoadingModel,
    finish_model,
    read_model,
    start_loading,
    with_controlnets,
)
from qwen_image_server.engine.lora_library import LoraLibrary
from qwen_image_server.engine.memory import (
    GiB,
    OffloadPlan,
    component_bytes,
    free_gpu_bytes,
    plan_offload,
)
from qwen_image_server.engine.prompt_cache import PromptCache, PromptCacheStats
from qwen_image_server.engine.runner import PipelineEngine
from qwen_image_server.engine.types import EditSpec, GenerationSpec, StepCallback

log = logging.getLogger(__name__)

# Components worth sharing: the big ones that two Qwen-Image models can have in common, and the
# tokenizer (no weights, but reading the Qwen vocabulary takes seconds).
SHAREABLE = ("text_encoder", "vae", "tokenizer")
_BLOB_NAME = re.compile(r"[0-9a-f]{64}")
_SAVE_NOTES = {"transformers_version", "dtype", "torch_dtype", "is_local", "local_files_only"}


class ModelSet:
    """The engine the scheduler drives: one PipelineEngine per model, by public name."""

    def __init__(self, engines: Sequence[PipelineEngine], loras: LoraLibrary | None = None) -> None:
        self.engines = {engine.model.name: engine for engine in engines}
        self.first = engines[0]
        self.loras = loras  # the LoRA library requests may name (None: none configured)

    @property
    def facts(self) -> EngineFacts:
        """What the front reads of this engine (it runs in the front's process: no GPU or pid)."""
        return EngineFacts(models=tuple(self.models), loras=self.loras,
                           loading_loras=self.loras.loading() if self.loras is not None else {},
                           prompt_cache=self.prompt_cache_stats())

    def prompt_cache_stats(self) -> PromptCacheStats:
        """The prompt caches of every model, summed."""
        total = PromptCacheStats()
        for engine in self.engines.values():
            total += engine.prompts.stats()
        return total

    @property
    def model(self) -> LoadedModel:
        """The first model (/info's seed fields, the prompt-length check's tokenizer)."""
        return self.first.model

    @property
    def models(self) -> list[LoadedModel]:
        return [engine.model for engine in self.engines.values()]

    def run_batch(self, specs: Sequence[GenerationSpec], on_step: StepCallback) -> list[Image.Image]:
        """Run the batch on the model its specs name (a spec queued while the models loaded
        names none: the first model for its task)."""
        first = specs[0]
        engine = self.engines.get(first.model) or next(
            (e for e in self.engines.values() if e.model.task == first.task), None)
        if engine is None or engine.model.task != first.task:
            raise ValueError(f"no {first.task} model named {first.model!r} is loaded")
        return engine.run_batch(specs, on_step)

    def free_memory(self) -> None:
        self.first.free_memory()

    def warm_up(self, aspect_ratios: Sequence[str], steps: int = 2) -> float:
        """Warm every model up (see PipelineEngine.warm_up); edit models edit a grey picture."""
        start = time.perf_counter()
        for engine in self.engines.values():
            if engine.model.task == "generate":
                engine.warm_up(aspect_ratios, steps)
                continue
            if engine.model.task == "layered":  # its sizes come from its resolution bucket, not the presets
                continue
            for name in dict.fromkeys(aspect_ratios):
                width, height = ASPECT_RATIOS[name]
                picture = Image.new("RGB", (width, height), (128, 128, 128))
                spec = EditSpec(prompt="warm-up", negative_prompt=" ", width=width, height=height,
                                num_inference_steps=steps, true_cfg_scale=4.0, seed=0,
                                model=engine.model.name, images=(picture,),
                                one_prompt_per_call=engine.edits is not None and engine.edits.one_prompt_per_call)
                engine.run_batch([spec], lambda event: None)
            log.info("warm-up of %s done after %.1fs", engine.model.name, time.perf_counter() - start)
        return time.perf_counter() - start


def component_fingerprint(folder: Path) -> str:
    """A digest of a component's weights and configuration: equal digests, same weights.

    Weight files in a Hugging Face cache are links to blobs named by their SHA-256, used as is;
    other weight files are hashed (only done when a server has several models). Configuration
    files (`*config.json`) count without what only records where and how they were saved
    (`_name_or_path`, library versions, the dtype they were saved in).
    """
    digest = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        digest.update(path.relative_to(folder).as_posix().encode())
        if path.name.endswith("config.json"):  # small; the vocabulary files are hashed as bytes
            digest.update(json.dumps(_without_save_notes(json.loads(path.read_text())),
                                     sort_keys=True).encode())
            continue
        blob = path.resolve().name
        if _BLOB_NAME.fullmatch(blob):
            digest.update(blob.encode())
            continue
        with path.open("rb") as f:
            while chunk := f.read(1 << 24):
                digest.update(chunk)
    return digest.hexdigest()


def _without_save_notes(config: object) -> object:
    if isinstance(config, dict):
        return {k: _without_save_notes(v) for k, v in config.items()
                if not k.startswith("_") and k not in _SAVE_NOTES}
    return config


def load_models(settings: Settings) -> list[LoadedModel]:
    """Load every configured model; components with the same weights are read once."""
    device, dtype = start_loading(settings)
    refs = settings.models
    known: dict[str, object] = {}  # fingerprint -> the component read first
    fingerprints: dict[str, str] = {}

    def reuse(folder: Path) -> dict[str, object]:
        fingerprints.clear()
        found = {}
        for name in SHAREABLE:
            if (folder / name).is_dir():
                fingerprints[name] = component_fingerprint(folder / name)
                if fingerprints[name] in known:
                    found[name] = known[fingerprints[name]]
        return found

    loaded: list[LoadingModel] = []
    for ref in refs:
        loading = read_model(settings, ref, device, dtype, reuse if len(refs) > 1 else None)
        for name, fingerprint in fingerprints.items():
            known.setdefault(fingerprint, getattr(loading.pipeline, name))
        loaded.append(loading)
    plan = plan_for(settings, device, [m.pipeline for m in loaded]) if len(loaded) > 1 else None
    models = []
    for loading in loaded:
        # A text encoder shared with an earlier model was quantized with it already.
        options = (settings.model_copy(update={"quantize_text_encoder": False})
                   if "text_encoder" in loading.shared else settings)
        models.append(with_controlnets(settings, finish_model(options, loading, device, dtype, plan)))
    log.info("serving %s", ", ".join(f"{m.name} ({m.task}: {m.pipeline_class}, shares "
                                      f"{', '.join(m.shared) or 'nothing'})" for m in models))
    return models


def shared_component_bytes(settings: Settings, pipelines: Sequence[object]) -> dict[str, int]:
    """Bytes on the device of every distinct module of `pipelines` (a shared one counts once),
    named 'component' for the first pipeline and 'component#i' for later ones."""
    sizes: dict[str, int] = {}
    seen: set[int] = set()
    for i, pipeline in enumerate(pipelines):
        per = component_bytes(pipeline, settings.quantize, settings.quantize_text_encoder,
                              settings.quantize_skip)
        for name, size in per.items():
            module = pipeline.components[name]  # type: ignore[attr-defined]
            if id(module) in seen:
                continue
            seen.add(id(module))
            sizes[name if i == 0 else f"{name}#{i + 1}"] = size
    return sizes


def plan_for(settings: Settings, device: DeviceInfo, pipelines: Sequence[object]) -> OffloadPlan:
    """One memory plan for all models together."""
    sizes = shared_component_bytes(settings, pipelines)
    return plan_offload(settings.offload, device, sizes, free_gpu_bytes(device),
                        int(settings.offload_headroom_gb * GiB))


def load_engine(settings: Settings) -> ModelSet:
    """Load every configured model and warm them up when the options ask for it (call it on the
    thread that will own the engine; a server reports ready only after this returns)."""
    library = LoraLibrary.from_settings(settings)
    models = load_models(settings)
    slots = settings.max_loras_per_request if settings.compile else None

    def adapters(model: LoadedModel) -> ResidentAdapters | None:
        if not library.configured:
            return None
        return ResidentAdapters(model.pipeline, library, model.name, model.task,
                                settings.max_resident_loras, slots)

    def prompts() -> PromptCache:
        return PromptCache(int(settings.prompt_cache_mb * 2**20), pinned=[DEFAULT_NEGATIVE_PROMPT])

    engine = ModelSet([PipelineEngine(model, adapters(model), prompts()) for model in models],
                      library if library.configured else None)
    for each in engine.engines.values():
        each.previewer  # noqa: B018 - fit the latent preview projection now, not in a request
    if engine.model.options.warmup:
        engine.warm_up(settings.warmup_aspect_ratios)
    return engine

