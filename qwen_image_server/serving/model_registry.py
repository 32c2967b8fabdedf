"""Which models and LoRAs this server serves, and which one a request gets.

The one owner of that question (vLLM's `OpenAIServingModels` plays the same part): the model
list of the settings until the engines have loaded, then what the engines report; the model a
request runs on, by name or by task; the cards of GET /v1/models and /info; the LoRA library
requests name their LoRAs from; the LoRA an engine is loading for a running job.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass

from qwen_image_server import errors
from qwen_image_server.config.model_list import EMBEDDED
from qwen_image_server.config.settings import Settings
from qwen_image_server.engine.contract import EngineFacts, facts_of
from qwen_image_server.engine.loaded import LoadedModel
from qwen_image_server.engine.lora_library import LoraLibrary
from qwen_image_server.engine.types import Task
from qwen_image_server.protocol.openai import ModelCard
from qwen_image_server.scheduler import Job, Scheduler

# OpenAI's own model names: code written for OpenAI sends them; they mean "the server's model for
# this task" rather than a 404.
_OPENAI_MODEL_PREFIXES = ("gpt-image", "dall-e")
# Tasks of the embedded models, known before they load.
_EMBEDDED_TASKS: dict[str, Task] = dict(zip(EMBEDDED, ("generate", "edit", "layered"), strict=True))
_TASK_MODELS = {"generate": "generation model", "edit": "edit model", "layered": "layered model"}
_DOES = {"generate": "generates images", "edit": "edits images", "layered": "splits images into layers",
         None: "is loading"}
_EXAMPLE = "QWEN_IMAGE_MODEL=Qwen/Qwen-Image,Qwen/Qwen-Image-Edit-2509"


@dataclass(frozen=True, slots=True)
class ModelChoice:
    """The model a request runs on."""

    name: str  # "" while the models load and the request named none: the first for its task
    max_images: int  # input images it takes (edits)
    one_prompt_per_call: bool  # QwenImageEditPlusPipeline: batches only one prompt's seeds
    controlnet: bool = True  # served with a ControlNet (True while unknown: the engine decides)
    inpaint_controlnet: bool = True  # served with an inpainting ControlNet (True while unknown)


# The first model for the request's task, whichever it is: what a request gets while the models
# load (the engine picks), and what a body's own spec is made on.
ANY_MODEL = ModelChoice("", 3, True)


class ModelRegistry:
    """The served models and LoRAs, read from the scheduler's engines (the settings' list while
    they load)."""

    def __init__(self, settings: Settings, scheduler: Scheduler) -> None:
        self.settings = settings
        self.scheduler = scheduler
        self._loras = LoraLibrary.from_settings(settings)  # until the engine's own is loaded
        self.started = int(time.time())  # /v1/models' "created": when this process began serving

    @property
    def _facts(self) -> EngineFacts:
        return facts_of(self.scheduler.engine)

    @property
    def loras(self) -> LoraLibrary:
        """The LoRA library: the engine's once loaded (it knows what is resident and unusable)."""
        return self._facts.loras or self._loras

    @property
    def model(self) -> LoadedModel | None:
        """The first loaded model (None while it loads, or with an engine that has none)."""
        return self._facts.model

    @property
    def models(self) -> list[LoadedModel]:
        """Every loaded model, the first first (empty while they load)."""
        return list(self._facts.models)

    def tasks(self) -> dict[str, Task | None]:
        """Public name -> task of every configured model (None: not known until it loads)."""
        loaded: dict[str, Task | None] = {model.name: model.task for model in self.models}
        if loaded:
            return loaded
        return {ref.name: _EMBEDDED_TASKS.get(ref.source) for ref in self.settings.models}

    def pick(self, requested: str | None, task: Task) -> ModelChoice:
        """The model named (404 `model_not_found` for a name this server does not serve; 400 when
        it cannot do `task`), or the first that can; 400 naming `model` when none can."""
        tasks = self.tasks()
        if requested is not None and requested.startswith(_OPENAI_MODEL_PREFIXES):
            requested = None
        if requested is not None and requested not in tasks:
            raise errors.NotFound(
                f"The model '{requested}' does not exist; this server serves {_listing(tasks)}.",
                param="model", code="model_not_found")
        able = [name for name, can in tasks.items() if can == task]
        if requested is None:
            if not able and None in tasks.values():
                return ANY_MODEL  # still loading: the engine picks
            if not able:
                raise errors.InvalidRequest(
                    f"This server has no {_TASK_MODELS[task]}; it serves {_listing(tasks)}. Start it "
                    f"with one in QWEN_IMAGE_MODEL (e.g. {_EXAMPLE}).",
                    param="model", code="model_cannot_do_task")
            requested = able[0]
        elif tasks[requested] not in (task, None):
            others = f"use one of: {', '.join(able)}" if able else f"this server has no {_TASK_MODELS[task]}"
            raise errors.InvalidRequest(
                f"The model '{requested}' {_DOES[tasks[requested]]}, it cannot {task}; {others}.",
                param="model", code="model_cannot_do_task")
        loaded = {model.name: model for model in self.models}.get(requested)
        if loaded is None:  # loading: the settings say whether it will have a ControlNet
            declared = requested in self.settings.controlnet_sources
            return ModelChoice(requested, 3, True, declared, declared)
        return ModelChoice(requested, loaded.max_images, loaded.pipeline_class == "QwenImageEditPlusPipeline",
                           bool(loaded.controlnets), bool(loaded.inpaint_controlnets))

    def task_of(self, name: str | None) -> Task | None:
        """The task of the model `name` names (None: no such model, none named, or still loading)."""
        return self.tasks().get(name) if name is not None else None

    def cards(self) -> list[ModelCard]:
        """Every model served, with what each can do (GET /v1/models, /info's models)."""
        loaded = {model.name: model for model in self.models}
        sources = {ref.name: ref.source for ref in self.settings.models}
        cards = []
        for name, task in self.tasks().items():
            model = loaded.get(name)
            cards.append(ModelCard(id=name, created=self.started,
                                   tasks=model.tasks if model else [task] if task else [],
                                   max_input_images=model.max_images if model else 0,
                                   pipeline=model.pipeline_class if model else None,
                                   pipelines=model.pipelines if model else [],
                                   controlnets=[*model.controlnets, *model.inpaint_controlnets] if model else [],
                                   checkpoint=checkpoint_name(sources.get(name, name))))
        return cards

    def card(self, name: str) -> ModelCard:
        """One model's card (404 `model_not_found` naming the models served)."""
        cards = {card.id: card for card in self.cards()}
        if name not in cards:
            raise errors.NotFound(f"The model '{name}' does not exist; this server serves "
                                  f"{', '.join(repr(name) for name in cards)}.", param="model",
                                  code="model_not_found")
        return cards[name]

    def loading_lora(self, job: Job) -> str | None:
        """The LoRA the engine is loading for this running job right now, if any."""
        engine = self.scheduler.engine if job.engine is None else self.scheduler.engine_at(job.engine)
        loading = facts_of(engine).loading_loras
        if not loading or not job.spec.loras:
            return None
        names = {name for name, _ in job.spec.loras}
        return next((name for name in loading.values() if name in names), None)


_CHECKPOINT = re.compile(r"Qwen-Image(?:-[A-Za-z0-9.]+)*", re.IGNORECASE)


def checkpoint_name(source: str) -> str | None:
    """Which Qwen-Image checkpoint a model source is, as its hub name says it (Qwen-Image,
    Qwen-Image-2512, Qwen-Image-Edit-2509, ...): the last part of a hub id or folder path that
    names one; "tiny"/"tiny-edit" for the embedded test models; None when the name does not say."""
    if source in EMBEDDED:
        return source
    last = source.replace("\\", "/").rstrip("/").rsplit("/", 1)[-1]
    match = _CHECKPOINT.search(last)
    return match.group(0) if match else None


def _listing(tasks: dict[str, Task | None]) -> str:
    return ", ".join(f"'{name}' ({task or 'loading'})" for name, task in tasks.items())
