"""LoRAs chosen per request, on the engine's side: the adapters resident on each model.

`ResidentAdapters` (one per pipeline) keeps up to QWEN_IMAGE_MAX_RESIDENT_LORAS PEFT adapters
loaded, evicting the least recently used, and `activate(loras)` sets the adapters and scales of
one batch. Two ways to do that:

* eager: one PEFT adapter per LoRA, `set_adapters` per batch, `disable_lora` for a batch without
  LoRAs (PEFT then runs the plain layers: the image is byte-identical to a server without LoRAs);
* compiled (QWEN_IMAGE_COMPILE): a compiled graph is specialised on the adapters it saw, so the
  transformer gets QWEN_IMAGE_MAX_LORAS_PER_REQUEST fixed "slots" before it is compiled (zero
  adapters padded to QWEN_IMAGE_LORA_MAX_RANK, scalings as tensors: what diffusers'
  `enable_lora_hotswap` prepares), and a batch's LoRAs are hot-swapped into them (weights copied
  in place, the scale folded into lora_B). Switching copies tensors and compiles nothing.
"""

from __future__ import annotations

import itertools
import logging
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from qwen_image_server import errors
from qwen_image_server.engine.lora import LIGHTNING_SCHEDULER_OVERRIDES
from qwen_image_server.engine.lora_library import (
    LoraLibrary,
    adapter_config,
    first_line,
    transformer_linears,
)
from qwen_image_server.engine.types import LoraSet, Task

log = logging.getLogger(__name__)


class ResidentAdapters:
    """The PEFT adapters loaded on one pipeline; `activate` once per batch, on the engine thread."""

    def __init__(self, pipeline: Any, library: LoraLibrary, model: str, task: Task,
                 max_resident: int, slots: int | None = None) -> None:
        self.pipeline = pipeline
        self.library = library
        self.model = model
        self.max_resident = max_resident
        self.slots = slots  # compiled: this many hot-swap slots (see prepare_hotswap_slots)
        self._resident: OrderedDict[str, Any] = OrderedDict()  # name -> adapter name, or state dict
        self._active: LoraSet = ()
        self._ids = itertools.count()
        library.add_model(model, task, pipeline.transformer)

    @property
    def resident(self) -> list[str]:
        return list(self._resident)

    @property
    def loading(self) -> str | None:
        """The LoRA being loaded now (shown in job status)."""
        return self.library.loading().get(self.model)

    @property
    def active(self) -> LoraSet:
        """The LoRAs (and scales) active now."""
        return self._active

    def scheduler_for(self, loras: LoraSet, scheduler: Any) -> Any:
        """The sampler of a batch: a Lightning LoRA's own (shift 3), else `scheduler` itself."""
        if self.library.lightning_steps(loras) is None:
            return scheduler
        return type(scheduler).from_config(scheduler.config, **LIGHTNING_SCHEDULER_OVERRIDES)

    def activate(self, loras: LoraSet) -> None:
        """Make exactly `loras` active at their scales (loading what is not resident). A LoRA that
        fails to load is marked unusable and the adapters are left as they were: LoraUnusable."""
        if loras == self._active:
            for name, _ in loras:
                self._resident.move_to_end(name)
            return
        names = [name for name, _ in loras]
        try:
            for name in names:
                self._ensure_resident(name, keep=names)
            if self.slots is not None:
                self._swap_into_slots(loras)
            elif loras:
                self.pipeline.enable_lora()
                self.pipeline.set_adapters([self._resident[n] for n in names], [s for _, s in loras])
            elif self._resident:
                self.pipeline.disable_lora()
            self._active = loras
        finally:  # a failed load may have evicted or loaded others first
            self.library.set_resident(self.model, self.resident)

    # -- loading and evicting ---------------------------------------------------------------

    def _ensure_resident(self, name: str, keep: Sequence[str]) -> None:
        if name in self._resident:
            self._resident.move_to_end(name)
            return
        problem = self.library.problem(name, self.model, download=True)
        if problem is not None:
            raise errors.LoraUnusable(problem, param="loras")
        while len(self._resident) >= self.max_resident:
            victim = next((n for n in self._resident if n not in keep), None)
            if victim is None:
                break  # every resident one is in this batch: hold one more for now
            self._evict(victim)
        entry = self.library.get(name)
        assert entry is not None  # problem() said it exists
        self.library.set_loading(self.model, name)
        try:
            path = entry.file(download=True)
            assert path is not None
            self._resident[name] = self._load(name, path)
        except errors.ServerError:
            raise
        except Exception as exc:  # a broken file must not break the server
            reason = f"loading it failed ({first_line(exc)})"
            log.warning("LoRA %s on %s: %s; marked unusable", name, self.model, reason)
            self.library.mark_unusable(name, reason)
            raise errors.LoraUnusable(f"The LoRA '{name}' is unusable: {reason}.", param="loras") from exc
        finally:
            self.library.set_loading(self.model, None)
        log.info("LoRA %s loaded on %s (resident: %s)", name, self.model, ", ".join(self._resident))

    def _load(self, name: str, path: Path) -> Any:
        if self.slots is not None:
            return _slot_state_dict(self.pipeline, path)
        adapter = f"lora{next(self._ids)}"  # PEFT adapter names must not hold dots
        try:
            self.pipeline.load_lora_weights(str(path.parent), weight_name=path.name, adapter_name=adapter)
        except BaseException:
            self._delete(adapter)
            self._restore()
            raise
        return adapter

    def _restore(self) -> None:
        """Put the active adapters back as they were before a failed load."""
        if self.slots is not None:
            return
        names = [self._resident[n] for n, _ in self._active if n in self._resident]
        if names:
            self.pipeline.set_adapters(names, [s for n, s in self._active if n in self._resident])
        elif self._resident:
            self.pipeline.disable_lora()

    def _delete(self, adapter: str) -> None:
        """Remove a (possibly half-loaded) adapter from every layer it reached."""
        transformer = self.pipeline.transformer
        if adapter in getattr(transformer, "peft_config", {}):
            self.pipeline.delete_adapters(adapter)
            return
        from peft.tuners.tuners_utils import BaseTunerLayer

        for module in transformer.modules():  # injected but never registered in peft_config
            if isinstance(module, BaseTunerLayer) and adapter in module.scaling:
                module.delete_adapter(adapter)

    def _evict(self, name: str) -> None:
        held = self._resident.pop(name)
        if self.slots is None:
            self.pipeline.delete_adapters(held)
        self._active = tuple(pair for pair in self._active if pair[0] != name)
        log.info("LoRA %s unloaded from %s (least recently used)", name, self.model)

    # -- compiled: hot-swap slots -----------------------------------------------------------

    def _swap_into_slots(self, loras: LoraSet) -> None:
        assert self.slots is not None
        try:
            for index in range(self.slots):
                if index < len(loras):
                    name, scale = loras[index]
                    state = _scaled(self._resident[name], scale)
                else:
                    state = _zero_state_dict(self.pipeline.transformer)
                self.pipeline.load_lora_weights(state, adapter_name=f"slot{index}", hotswap=True)
        except Exception as exc:  # the slots must not keep half a set
            for index in range(self.slots):
                self.pipeline.load_lora_weights(_zero_state_dict(self.pipeline.transformer),
                                                adapter_name=f"slot{index}", hotswap=True)
            self._active = ()
            names = ", ".join(name for name, _ in loras)
            reason = f"hot-swapping it failed ({first_line(exc)})"
            for name, _ in loras:
                self._resident.pop(name, None)
            if len(loras) == 1:
                self.library.mark_unusable(loras[0][0], reason)
            raise errors.LoraUnusable(f"The LoRA set {names} could not be applied: {reason}.") from exc


def _slot_state_dict(pipeline: Any, path: Path) -> dict[str, Any]:
    """A LoRA's weights for hot-swapping, on the transformer's device, with its alpha/rank scaling
    folded into lora_B (a slot's own scaling stays 1)."""
    from safetensors import safe_open

    state = pipeline.lora_state_dict(str(path.parent), weight_name=path.name)
    with safe_open(str(path), framework="pt") as f:
        config = {key.removeprefix("transformer."): value
                  for key, value in adapter_config(f.metadata() or {}).items()}
    alpha, rank = config.get("lora_alpha"), config.get("r")
    factor = float(alpha) / float(rank) if alpha and rank else 1.0
    device = pipeline.transformer.device
    dtype = pipeline.transformer.dtype
    out = {}
    for key, value in state.items():
        value = value.to(device=device, dtype=dtype)
        out[key] = value * factor if ".lora_B." in key and factor != 1.0 else value
    return out


def _scaled(state: dict[str, Any], scale: float) -> dict[str, Any]:
    return {key: value * scale if ".lora_B." in key else value for key, value in state.items()}


def _zero_state_dict(transformer: Any) -> dict[str, Any]:
    """A rank-1 LoRA of zeros on every linear layer of the transformer blocks: a slot's placeholder."""
    import torch

    cached = getattr(transformer, "_qwen_zero_lora", None)
    if cached is not None:
        return cached
    out = {}
    for name, (fan_in, fan_out) in transformer_linears(transformer).items():
        if name.startswith("transformer_blocks."):
            out[f"transformer.{name}.lora_A.weight"] = torch.zeros(1, fan_in, device=transformer.device,
                                                                   dtype=transformer.dtype)
            out[f"transformer.{name}.lora_B.weight"] = torch.zeros(fan_out, 1, device=transformer.device,
                                                                   dtype=transformer.dtype)
    transformer._qwen_zero_lora = out
    return out


def prepare_hotswap_slots(pipeline: Any, slots: int, max_rank: int) -> None:
    """Before torch.compile: `slots` zero adapters on every block layer, padded to `max_rank`, their
    scalings turned into tensors, all active. What diffusers' `enable_lora_hotswap(target_rank)`
    prepares for one adapter, done for several (it pads only the first one loaded)."""
    from peft.utils.hotswap import prepare_model_for_compiled_hotswap

    zero = _zero_state_dict(pipeline.transformer)
    names = [f"slot{index}" for index in range(slots)]
    for name in names:
        pipeline.load_lora_weights(zero, adapter_name=name)
    pipeline.set_adapters(names, [1.0] * slots)
    prepare_model_for_compiled_hotswap(pipeline.transformer, target_rank=max_rank)
    log.info("LoRA hot-swap: %d slot(s) of rank %d on the transformer blocks", slots, max_rank)
