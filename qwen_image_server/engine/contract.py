"""What the scheduler and the front need of an engine, written down in one place.

An engine is anything that runs a batch of specs and can free device memory (`Engine`): the
in-process `ModelSet`, the front's `EngineProcess` proxy, a test's fake. Engines in another process
can also be watched, closed and killed (`Supervised`). Everything else the front reads of an engine (its
models, LoRA library, GPU, process, memory) is one `EngineFacts` value, read through `facts_of`,
so that an engine without facts (a fake) is simply an engine with empty ones.

The batch limits live here too: the loader needs them (a compile warm-up covers every batch shape
the scheduler will form) and so does the scheduler, and neither should import the other.

Nothing here imports torch or the model libraries: the front imports it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol, runtime_checkable

if TYPE_CHECKING:
    from PIL import Image

    from qwen_image_server.config.settings import Settings
    from qwen_image_server.engine.loaded import LoadedModel
    from qwen_image_server.engine.lora_library import LoraLibrary
    from qwen_image_server.engine.prompt_cache import PromptCacheStats
    from qwen_image_server.engine.types import GenerationSpec, StepCallback


class Engine(Protocol):
    """What the scheduler needs from the model side."""

    def run_batch(self, specs: Sequence[GenerationSpec], on_step: StepCallback) -> list[Image.Image]:
        """Generate one image per spec in one pipeline call; call on_step(StepEvent) per step."""
        ...

    def free_memory(self) -> None:
        """Release cached device memory after an out-of-memory error."""
        ...


@runtime_checkable
class Supervised(Protocol):
    """What an engine in another process adds: a way to hear at once that it ended, and to end
    it, gently or (a hung one) at once."""

    def on_exit(self, callback: Callable[[], None]) -> None:
        """Call `callback` (from any thread) when the engine's process ends."""
        ...

    def close(self) -> None:
        """Stop the engine (its process) and release it."""
        ...

    def kill(self) -> None:
        """Kill the engine's process now, from any thread, even mid-batch: the batch then fails
        as for any engine that died (`EngineLost`)."""
        ...


@dataclass(frozen=True, slots=True)
class RankFacts:
    """One rank of an engine of several GPUs."""

    rank: int
    gpu: int | None  # among the visible ones (None: the CPU)
    pid: int | None


@dataclass(frozen=True, slots=True)
class EngineFacts:
    """What the front reads of a loaded engine, as of now (memory and LoRA loads change)."""

    models: tuple[LoadedModel, ...] = ()  # every model it serves, the first first
    loras: LoraLibrary | None = None  # the LoRA library requests may name (None: none configured)
    gpu: int | None = None  # the GPU it runs on, among the visible ones (None: the CPU, or this process's)
    pid: int | None = None  # its process, when it has its own (None: inside this process)
    memory: dict[str, float] | None = None  # GPU memory (MiB) an engine process reported after its last batch
    loading_loras: Mapping[str, str] = field(default_factory=dict)  # model name -> LoRA being loaded now
    prompt_cache: PromptCacheStats | None = None  # its prompt caches' counts (None: it has none)
    ranks: tuple[RankFacts, ...] = ()  # its ranks, when it splits images over several GPUs
    parallel: str | None = None  # how it splits them (QWEN_IMAGE_PARALLEL, resolved)

    @property
    def model(self) -> LoadedModel | None:
        """The first model (/info's seed fields, the prompt-length check's tokenizer)."""
        return self.models[0] if self.models else None

    @property
    def in_process(self) -> bool:
        """The engine runs in this process (its GPU memory is read here, not reported)."""
        return self.pid is None


NO_FACTS = EngineFacts()


def facts_of(engine: object) -> EngineFacts:
    """The facts an engine offers as its `facts` property; an engine without them (a test's fake,
    one still loading: None) has none. The one place the front reads an engine's optional parts."""
    facts = getattr(engine, "facts", None)
    return facts if isinstance(facts, EngineFacts) else NO_FACTS


@dataclass(frozen=True, slots=True)
class BatchLimits:
    """How large the scheduler's batches may grow, and how long it may wait to fill one."""

    max_batch_size: int
    max_batch_pixels: int
    batch_wait_s: float


def batch_limits(device_type: str, *, max_batch_size: int | None = None, max_batch_pixels: int | None = None,
                 batch_wait_ms: float | None = None) -> BatchLimits:
    """The limits on a device, with the per-device defaults filled in (docs/scheduling.md has the
    measurements)."""
    if device_type == "cuda":
        # GPUs gain from batching only while the transformer is not yet compute-bound. On an
        # H200 at 1024x1024 batches of 2 and 4 made 1.00x and 1.04x the images per minute of
        # single calls, while every job of a batch waits for the last one. One megapixel lets
        # small images batch (4 at 512x512) and runs 1024x1024 and larger alone.
        size, pixels, wait = 4, 1024 * 1024, 10.0
    else:
        # On 2 CPU cores a batch of 4 at 512x512 ran 0.95-1.2x as fast as 4 single calls, and
        # 1024x1024 batches were slower than serial: no throughput to win, while every job of
        # a batch waits for the last one. So CPUs run one job per call unless told otherwise.
        size, pixels, wait = 1, 4 * 512 * 512, 0.0
    return BatchLimits(
        max_batch_size=max_batch_size or size,
        max_batch_pixels=max_batch_pixels or pixels,
        batch_wait_s=(wait if batch_wait_ms is None else batch_wait_ms) / 1000.0,
    )


def settings_batch_limits(settings: Settings, device_type: str) -> BatchLimits:
    """The limits these settings ask for on a device (unset ones: the device's defaults)."""
    return batch_limits(device_type, max_batch_size=settings.max_batch_size,
                        max_batch_pixels=settings.max_batch_pixels, batch_wait_ms=settings.batch_wait_ms)
