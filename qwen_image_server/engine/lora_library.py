"""The LoRAs requests may name: files in QWEN_IMAGE_LORA_DIR (named by their stem) and hub files
in QWEN_IMAGE_LORAS, what each is, and the checks a request's LoRAs pass before it is queued.

What a LoRA is comes from its file's header, without loading it into a pipeline: its layers and
their shapes, its rank, and the base model it says it was trained for. The engine marks a LoRA
unusable when its first load fails, and reports which are resident and which is loading
(`engine/adapters.py`), so that GET /v1/loras and job statuses show them; an engine process sends
that state to its front as a `LoraState` (`engine/process.py`).
"""

from __future__ import annotations

import json
import re
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

from qwen_image_server import errors
from qwen_image_server.config.lora_refs import (
    is_valid_name,
    lightning_steps_of,
    parse_hub_loras,
)
from qwen_image_server.engine.types import LoraSet, Task

# The base model family of each task's pipelines (Qwen-Image-Edit-2509/2511 LoRAs are Edit LoRAs).
FAMILY: dict[Task, str] = {"generate": "Qwen-Image", "edit": "Qwen-Image-Edit", "layered": "Qwen-Image-Layered"}

# Header metadata that names the model a LoRA was trained for, in the order they are trusted:
# our own and some trainers' `base_model`, the Stability model spec, kohya's sd-scripts, PEFT's
# adapter config (diffusers stores it as JSON under `lora_adapter_metadata`).
_BASE_KEYS = ("base_model", "modelspec.architecture", "ss_base_model_version", "base_model_name_or_path")

# diffusers/PEFT key forms: "<prefix>.<module>.lora_A.weight" (A: rank x in, B: out x rank).
_PEFT_KEY = re.compile(
    r"^(?:transformer\.|base_model\.model\.|diffusion_model\.)?(.+)\.lora_([AB])(?:\.default)?\.weight$")


@dataclass(frozen=True, slots=True)
class LoraEntry:
    """One LoRA a request may name."""

    name: str
    source: Literal["folder", "hub"]
    location: str  # the file, or the hub repo id
    weight_name: str | None = None  # the file inside the hub repo

    @property
    def lightning_steps(self) -> int | None:
        return lightning_steps_of(self.weight_name or self.location)

    def file(self, download: bool) -> Path | None:
        """The file on disk; a hub file is downloaded first when `download` (None if not cached)."""
        if self.source == "folder":
            return Path(self.location)
        from huggingface_hub import hf_hub_download, list_repo_files

        weight_name = self.weight_name
        if weight_name is None and not download:
            return None  # which file it is takes a listing from the hub: done on first use
        try:
            if weight_name is None:
                files = [f for f in list_repo_files(self.location) if f.endswith(".safetensors")]
                if len(files) != 1:
                    raise ValueError(f"{self.location} holds {len(files)} .safetensors files; name one "
                                     "as 'owner/repo:file.safetensors'")
                weight_name = files[0]
            return Path(hf_hub_download(self.location, weight_name, local_files_only=not download))
        except Exception:  # not cached yet (listing) or not reachable
            if download:
                raise
            return None


@dataclass(frozen=True, slots=True)
class LoraFacts:
    """What a LoRA file is, read from its header."""

    modules: dict[str, tuple[int, int]]  # transformer layer -> (in_features, out_features) it expects
    rank: int | None
    base: str | None  # the model it says it is for ("Qwen-Image", "Qwen-Image-Edit", another), if it says
    problem: str | None = None  # why it is not a LoRA at all


def _family_of(value: str) -> str:
    text = value.lower().replace("_", "-").replace(" ", "-")
    if "qwen" in text and "edit" in text:
        return FAMILY["edit"]
    if "qwen" in text and "layered" in text:
        return FAMILY["layered"]
    if "qwen" in text and "image" in text:
        return FAMILY["generate"]
    return value


def _stated_base(metadata: dict[str, str], file_name: str) -> str | None:
    values: dict[str, Any] = dict(metadata)
    values.update({key.removeprefix("transformer."): value
                   for key, value in adapter_config(metadata).items()})
    for key in _BASE_KEYS:
        value = values.get(key)
        if isinstance(value, str) and value.strip():
            return _family_of(value.strip())
    # Files on the hub say it in their name (Qwen-Image-Edit-Lightning-8steps-V1.0.safetensors).
    if re.search(r"qwen[-_]?image[-_]?edit", file_name, re.IGNORECASE):
        return FAMILY["edit"]
    return None


def adapter_config(metadata: dict[str, str]) -> dict[str, Any]:
    """The PEFT config diffusers stores under `lora_adapter_metadata` (keys as saved)."""
    try:
        config = json.loads(metadata.get("lora_adapter_metadata") or "{}")
    except (ValueError, TypeError):
        return {}
    return config if isinstance(config, dict) else {}


def inspect_lora(path: Path) -> LoraFacts:
    """Read a LoRA file's layers, shapes, rank and stated base model; only kohya-style files
    (whose keys diffusers converts) are read whole."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            shapes = {key: tuple(f.get_slice(key).get_shape()) for key in f.keys()}  # noqa: SIM118 - a safetensors file, not a dict
    except Exception as exc:  # noqa: BLE001 - any unreadable file is "not a LoRA"
        return LoraFacts({}, None, None, problem=f"it is not a readable safetensors file ({first_line(exc)})")
    base = _stated_base(metadata, path.name)
    if shapes and not all(_PEFT_KEY.match(key) or key.endswith(".alpha") for key in shapes):
        shapes = _converted_shapes(path)
    pairs: dict[str, dict[str, tuple[int, ...]]] = {}
    for key, shape in shapes.items():
        match = _PEFT_KEY.match(key)
        if match:
            pairs.setdefault(match[1], {})[match[2]] = shape
    if not pairs:
        return LoraFacts({}, None, base, problem="it holds no LoRA weights (no lora_A / lora_B tensors)")
    modules: dict[str, tuple[int, int]] = {}
    ranks = set()
    for module, ab in pairs.items():
        a, b = ab.get("A"), ab.get("B")
        if a is None or b is None or len(a) != 2 or len(b) != 2 or a[0] != b[1]:
            return LoraFacts({}, None, base, problem=f"its layer '{module}' has no matching lora_A/lora_B pair")
        modules[module] = (a[1], b[0])
        ranks.add(a[0])
    return LoraFacts(modules, max(ranks), base)


def _converted_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """Keys and shapes of a non-diffusers (kohya, ComfyUI) LoRA, as diffusers converts them."""
    from diffusers import QwenImagePipeline

    try:
        state = QwenImagePipeline.lora_state_dict(str(path))
    except Exception:  # noqa: BLE001 - unconvertible: it has no LoRA weights diffusers can use
        return {}
    return {key: tuple(value.shape) for key, value in state.items()}


def hub_refusals() -> tuple[type[BaseException], ...]:
    """What a hub fetch raises when the hub answered that the LoRA's repo, revision or file is
    not there (or its name is malformed): the LoRA's own fault, unlike a network failure."""
    from huggingface_hub.errors import (
        RemoteEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    return (ValueError, RepositoryNotFoundError, RevisionNotFoundError, RemoteEntryNotFoundError)


def first_line(exc: BaseException) -> str:
    """An exception's first line (errors from libraries can run to pages)."""
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def transformer_linears(transformer: Any) -> dict[str, tuple[int, int]]:
    """Every linear layer of a transformer a LoRA may target -> (in_features, out_features)."""
    import torch

    out = {}
    for name, module in transformer.named_modules():
        if isinstance(module, torch.nn.Linear) and ".lora_" not in name:
            out[name.removesuffix(".base_layer")] = (module.in_features, module.out_features)
    return out


FileKey = tuple[str, float, int]  # a file's path, mtime and size: a mark holds while these do


@dataclass(frozen=True, slots=True)
class ModelFacts:
    """What the library knows of one loaded model: its task, its layers, the LoRAs resident on it."""

    task: Task
    linears: dict[str, tuple[int, int]]
    resident: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class LoraState:
    """An engine's LoRA state, picklable: what an engine process sends its front (with "ready",
    after each batch, and when a load starts or ends), so the front checks and lists LoRAs as an
    in-process engine's library does."""

    models: dict[str, ModelFacts] = field(default_factory=dict)
    unusable: dict[str, tuple[FileKey | None, str]] = field(default_factory=dict)  # name -> (file, why)
    loading: dict[str, str] = field(default_factory=dict)  # model -> the LoRA being loaded onto it now


@dataclass
class LoraLibrary:
    """The LoRAs requests may name, what each is, and which are unusable or resident.

    An engine's library records its own state (`add_model`, `set_resident`, `mark_unusable`,
    `set_loading`); a front's library imports the states of its engine processes
    (`import_state`). Every question is answered from all of them together: a LoRA is resident on
    the models of every engine that holds it, and unusable once any engine found it so."""

    folder: Path | None
    hub: dict[str, tuple[str, str | None]]
    max_per_request: int = 3
    max_rank: int | None = None  # compiled models: the slots' rank
    on_change: Callable[[], None] | None = None  # an engine process: tell the front (see process.py)
    _facts: dict[FileKey, LoraFacts] = field(default_factory=dict)
    _own: LoraState = field(default_factory=LoraState)
    _engines: dict[int, LoraState] = field(default_factory=dict)  # imported, by engine index
    _lock: threading.Lock = field(default_factory=threading.Lock)

    @classmethod
    def from_settings(cls, settings: Any) -> LoraLibrary:
        return cls(settings.lora_dir, parse_hub_loras(settings.loras), settings.max_loras_per_request,
                   settings.lora_max_rank if settings.compile else None)

    @property
    def configured(self) -> bool:
        return self.folder is not None or bool(self.hub)

    def entries(self) -> dict[str, LoraEntry]:
        """Every LoRA by name, the folder read now (files added while serving are seen)."""
        found: dict[str, LoraEntry] = {}
        if self.folder is not None and self.folder.is_dir():
            for path in sorted(self.folder.glob("*.safetensors")):
                if path.is_file() and is_valid_name(path.stem):
                    found[path.stem] = LoraEntry(path.stem, "folder", str(path))
        for name, (repo, weight_name) in self.hub.items():
            found[name] = LoraEntry(name, "hub", repo, weight_name)  # a named hub LoRA wins
        return found

    def get(self, name: str) -> LoraEntry | None:
        return self.entries().get(name)

    # -- what a file is ---------------------------------------------------------------------

    @staticmethod
    def _key(path: Path) -> FileKey | None:
        try:
            stat = path.stat()
        except OSError:
            return None
        return (str(path), stat.st_mtime, stat.st_size)

    def facts(self, entry: LoraEntry, download: bool = False) -> LoraFacts | None:
        """The file's facts (cached until the file changes); None for a hub file not fetched yet."""
        path = entry.file(download)
        key = self._key(path) if path is not None else None
        if key is None:
            return None
        with self._lock:
            cached = self._facts.get(key)
        if cached is None:
            cached = inspect_lora(path)  # type: ignore[arg-type]
            with self._lock:
                self._facts[key] = cached
        return cached

    # -- the state: this library's own and the imported ones ----------------------------------

    def _states(self) -> list[LoraState]:
        with self._lock:
            return [self._own, *self._engines.values()]

    def _update(self, change: Callable[[LoraState], LoraState]) -> None:
        with self._lock:
            before, self._own = self._own, change(self._own)
        if self._own is not before and self.on_change is not None:
            self.on_change()

    def export_state(self) -> LoraState:
        with self._lock:
            return self._own

    def import_state(self, engine: int, state: LoraState) -> None:
        """Take engine `engine`'s latest state (replacing what it sent before)."""
        with self._lock:
            self._engines[engine] = state

    def forget_engine(self, engine: int) -> None:
        """An engine process ended: nothing is resident or loading there any more; what it found
        unusable stays so (its file is as broken for the next engine)."""
        with self._lock:
            state = self._engines.get(engine)
            if state is not None:
                models = {name: replace(facts, resident=()) for name, facts in state.models.items()}
                self._engines[engine] = LoraState(models, state.unusable, {})

    def unusable(self, name: str) -> str | None:
        """Why the LoRA failed to load, while its file is unchanged since (a replaced file is
        tried again)."""
        marks = [state.unusable[name] for state in self._states() if name in state.unusable]
        if not marks:
            return None
        entry = self.get(name)
        current = (self._key(Path(entry.location))
                   if entry is not None and entry.source == "folder" else None)
        return next((reason for key, reason in marks if key is None or key == current), None)

    def mark_unusable(self, name: str, reason: str) -> None:
        entry = self.get(name)
        key = self._key(Path(entry.location)) if entry is not None and entry.source == "folder" else None
        self._update(lambda own: replace(own, unusable={**own.unusable, name: (key, reason)}))

    # -- models -----------------------------------------------------------------------------

    def add_model(self, name: str, task: Task, transformer: Any) -> None:
        """Remember a loaded model's layers, to check LoRAs against them before queueing."""
        facts = ModelFacts(task, transformer_linears(transformer))
        self._update(lambda own: replace(own, models={**own.models, name: facts}))

    def set_resident(self, model: str, names: Sequence[str]) -> None:
        def change(own: LoraState) -> LoraState:
            facts = own.models.get(model)
            if facts is None or facts.resident == tuple(names):
                return own
            return replace(own, models={**own.models, model: replace(facts, resident=tuple(names))})

        self._update(change)

    def set_loading(self, model: str, name: str | None) -> None:
        """The LoRA being loaded onto `model` now (None: the load ended)."""
        def change(own: LoraState) -> LoraState:
            loading = {m: n for m, n in own.loading.items() if m != model}
            if own.loading.get(model) == name:
                return own
            return replace(own, loading=loading if name is None else {**loading, model: name})

        self._update(change)

    def resident(self, name: str) -> list[str]:
        """The models this LoRA is loaded on now (on any engine)."""
        return list(dict.fromkeys(model for state in self._states()
                                  for model, facts in state.models.items() if name in facts.resident))

    def resident_engines(self, name: str) -> list[int]:
        """The engine processes holding this LoRA now (their numbers in /info)."""
        with self._lock:
            engines = dict(self._engines)
        return [index for index, state in sorted(engines.items())
                if any(name in facts.resident for facts in state.models.values())]

    def loading(self, engine: int | None = None) -> dict[str, str]:
        """Model -> the LoRA being loaded onto it now: this library's own engine, or engine `engine`."""
        with self._lock:
            state = self._own if engine is None else self._engines.get(engine, LoraState())
        return dict(state.loading)

    def _model(self, model: str) -> ModelFacts | None:
        return next((state.models[model] for state in self._states() if model in state.models), None)

    def model_family(self, model: str) -> str | None:
        facts = self._model(model)
        return FAMILY[facts.task] if facts is not None else None

    # -- checks -----------------------------------------------------------------------------

    def problem(self, name: str, model: str, download: bool = False) -> str | None:
        """Why the LoRA cannot run on the model (a sentence naming both), or None. Before the
        model is loaded, or for a hub file not fetched yet, only what is known is checked. A hub
        file that cannot be fetched (`download`) for want of the hub or the network raises
        LoraUnavailable instead: that says nothing about the LoRA."""
        entry = self.get(name)
        if entry is None:
            return f"There is no LoRA named '{name}'."
        reason = self.unusable(name)
        if reason is not None:
            return f"The LoRA '{name}' is unusable: {reason}."
        try:
            facts = self.facts(entry, download)
        except hub_refusals() as exc:  # the hub answered: no such repo, revision or file
            return f"The LoRA '{name}' could not be fetched from {entry.location}: {first_line(exc)}."
        except Exception as exc:  # the hub or the network is down: not for good
            raise errors.LoraUnavailable(f"The LoRA '{name}' could not be fetched from {entry.location} "
                                         f"right now: {first_line(exc)}.") from exc
        if facts is None:
            return None
        if facts.problem is not None:
            return f"The LoRA '{name}' is unusable: {facts.problem}."
        target = self._model(model)
        if target is None:
            return None
        family = FAMILY[target.task]
        if facts.base is not None and facts.base != family:
            return (f"The LoRA '{name}' is for {facts.base}; the model '{model}' is {family}. "
                    f"Use it with a {facts.base} model.")
        for module, (fan_in, fan_out) in facts.modules.items():
            have = target.linears.get(module)
            if have is None:
                return (f"The LoRA '{name}' is for another model: {family}'s transformer has no layer "
                        f"'{module}'.")
            if have != (fan_in, fan_out):
                return (f"The LoRA '{name}' is for another model: its layer '{module}' maps {fan_in} to "
                        f"{fan_out} features, the model '{model}' {have[0]} to {have[1]}.")
        if self.max_rank is not None:
            outside = next((m for m in facts.modules if not m.startswith("transformer_blocks.")), None)
            if outside is not None:
                return (f"The LoRA '{name}' also changes '{outside}', outside the transformer blocks; a "
                        "compiled server hot-swaps LoRAs into the blocks only.")
        if self.max_rank is not None and facts.rank is not None and facts.rank > self.max_rank:
            return (f"The LoRA '{name}' has rank {facts.rank}; this compiled server takes LoRAs up to rank "
                    f"{self.max_rank} (QWEN_IMAGE_LORA_MAX_RANK).")
        return None

    def lightning_steps(self, loras: LoraSet) -> int | None:
        """The step count of a Lightning (step-distilled) LoRA among `loras`, if any."""
        entries = self.entries()
        steps = [entries[name].lightning_steps for name, _ in loras if name in entries]
        return next((s for s in steps if s is not None), None)
