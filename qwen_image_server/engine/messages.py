"""What crosses the pipe between the front and an engine process, one small type per message.

    front -> engine   Run(number, specs)  Abort()  Free(number)  Stop()
    engine -> front   Ready(models, memory, loras)  LoadFailed(failure)
                      Step(number, event)  LorasChanged(state)  Done(number, images, memory)
                      Aborted(number)  Failed(number, failure)  Freed(number)

Every command the front waits on carries a number, and every answer the number of the command
it answers, so the front can never take one command's answer (a batch's images) for another's.
A message the front cannot read, or one it does not expect, means the two sides no longer agree
(another version of the code, say): the front kills the engine (`EngineProcess`).

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
from qwen_image_server.config.checks import ParallelMode
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
    from qwen_image_server.engine.prompt_cache import PromptCacheStats


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


@dataclass(frozen=True, slots=True)
class RankPlan:
    """What one rank of an engine of several GPUs needs to join the others (engine/parallel.py)."""

    rank: int
    world: int
    mode: ParallelMode
    address: str  # tcp://host:port of the rendezvous (the front picks a free port per engine start)


# -- front -> engine --------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class Run:
    number: int
    specs: list[GenerationSpec]


@dataclass(frozen=True, slots=True)
class Abort:
    """Stop the running batch at its next step (read at once, even mid-batch)."""


@dataclass(frozen=True, slots=True)
class Free:
    """Release cached device memory (after an out-of-memory error)."""

    number: int


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
    number: int
    event: StepEvent


@dataclass(frozen=True, slots=True)
class LorasChanged:
    """The engine's LoRA library changed (a load started or ended, one became unusable, ...)."""

    state: LoraState


@dataclass(frozen=True, slots=True)
class Done:
    number: int
    images: list[Image.Image]
    memory: dict[str, float] | None
    prompt_cache: PromptCacheStats | None = None  # the engine's counts after this batch


@dataclass(frozen=True, slots=True)
class Aborted:
    """The batch stopped at a step, as asked."""

    number: int


@dataclass(frozen=True, slots=True)
class Failed:
    number: int
    failure: Failure


@dataclass(frozen=True, slots=True)
class Freed:
    number: int


FromEngine = Ready | LoadFailed | Step | LorasChanged | Done | Aborted | Failed | Freed


def describe(message: Any) -> str:
    """A message's name (and number), for the error about one that came at the wrong time."""
    number = getattr(message, "number", None)
    return type(message).__name__ + ("" if number is None else f" #{number}")
