"""What crosses the pipe between the front and an engine process, one small type per message.

    front -> engine   Run(specs)  Abort()  Free()  Stop()
    engine -> front   Ready(models, memory, loras)  LoadFailed(failure)
                      Step(event)  LorasChanged(state)  Done(images, memory)  Aborted()
                      Failed(failure)  Freed()

Messages are pickled as they are: specs and step events are frozen dataclasses, images PIL images
(their raw pixels), a LoRA library's state a `LoraState`. An error crosses as a `Failure`: its
kind and message, rebuilt in the front as the error it was, so the scheduler's rules (out of
memory, a failed device, a failed load, a client's error) apply unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import TYPE_CHECKING, Any

from qwen_image_server import errors
from qwen_image_server.engine.types import (
    DeviceFailure,
    DeviceOutOfMemory,
    GenerationSpec,
    StepEvent,
)

if TYPE_CHECKING:
    from PIL import Image

    from qwen_image_server.engine.loaded import LoadedModel
    from qwen_image_server.engine.lora_library import LoraState


class FailureKind(Enum):
    SERVER = "server"  # an answer for the client (e.g. a LoRA that cannot load): crosses as it is
    OUT_OF_MEMORY = "oom"
    DEVICE = "device"
    LOAD = "load"
    OTHER = "other"


@dataclass(frozen=True, slots=True)
class Failure:
    """An exception raised in the engine process, as it crosses the pipe."""

    kind: FailureKind
    message: str
    error: errors.ServerError | None = None  # the client's error itself (kind SERVER)

    @classmethod
    def of(cls, exc: BaseException) -> Failure:
        if isinstance(exc, errors.ServerError):
            return cls(FailureKind.SERVER, exc.message, exc)
        if isinstance(exc, DeviceOutOfMemory):
            return cls(FailureKind.OUT_OF_MEMORY, str(exc))
        if isinstance(exc, DeviceFailure):
            return cls(FailureKind.DEVICE, str(exc))
        if isinstance(exc, errors.ModelLoadError):
            return cls(FailureKind.LOAD, str(exc))
        return cls(FailureKind.OTHER, f"{type(exc).__name__}: {exc}")

    def rebuild(self) -> BaseException:
        """The exception in the front: the engine error it was (a RuntimeError for any other)."""
        if self.error is not None:
            return self.error
        kinds: dict[FailureKind, type[BaseException]] = {
            FailureKind.OUT_OF_MEMORY: DeviceOutOfMemory,
            FailureKind.DEVICE: DeviceFailure,
            FailureKind.LOAD: errors.ModelLoadError,
        }
        return kinds.get(self.kind, RuntimeError)(self.message)


# -- front -> engine --------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class Run:
    specs: list[GenerationSpec]


@dataclass(frozen=True, slots=True)
class Abort:
    """Stop the running batch at its next step (read at once, even mid-batch)."""


@dataclass(frozen=True, slots=True)
class Free:
    """Release cached device memory (after an out-of-memory error)."""


@dataclass(frozen=True, slots=True)
class Stop:
    """Exit."""


ToEngine = Run | Abort | Free | Stop


# -- engine -> front --------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class Ready:
    models: list[LoadedModel]  # with their pipelines replaced by what the front needs of them
    memory: dict[str, float] | None
    loras: LoraState | None


@dataclass(frozen=True, slots=True)
class LoadFailed:
    failure: Failure


@dataclass(frozen=True, slots=True)
class Step:
    event: StepEvent


@dataclass(frozen=True, slots=True)
class LorasChanged:
    """The engine's LoRA library changed (a load started or ended, one became unusable, ...)."""

    state: LoraState


@dataclass(frozen=True, slots=True)
class Done:
    images: list[Image.Image]
    memory: dict[str, float] | None


@dataclass(frozen=True, slots=True)
class Aborted:
    """The batch stopped at a step, as asked."""


@dataclass(frozen=True, slots=True)
class Failed:
    failure: Failure


@dataclass(frozen=True, slots=True)
class Freed:
    pass


FromEngine = Ready | LoadFailed | Step | LorasChanged | Done | Aborted | Failed | Freed


def describe(message: Any) -> str:
    """A message's name, for the error about one that came at the wrong time."""
    return type(message).__name__
