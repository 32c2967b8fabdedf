"""What the engine is asked to make, normalised and independent of any wire format."""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, ClassVar, Literal

if TYPE_CHECKING:
    from PIL import Image

Task = Literal["generate", "edit"]
PreviewMode = Literal["latent", "full"]


@dataclass(frozen=True, slots=True)
class PreviewPlan:
    """Which steps of one image get a preview, and what kind (see engine/previews.py).

    `every`: each `every`-th step; `count`: that many previews spread evenly over the steps, the
    last one before the end (OpenAI's partial_images). A preview at the final step would only
    repeat the finished image, so `count` never asks for it.
    """

    mode: PreviewMode
    every: int = 0
    count: int = 0

    def due(self, step: int, total: int) -> bool:
        """Whether step `step` (1-based) of `total` gets a preview."""
        if self.every:
            return step % self.every == 0
        return step in {total * i // (self.count + 1) for i in range(1, self.count + 1)} - {0, total}


@dataclass(frozen=True, slots=True)
class Preview:
    """One preview as it leaves the engine: a small RGB picture on the CPU (never a device
    tensor), so it crosses threads and processes cheaply; encoding it is the API's job."""

    step: int  # of the image's own steps, 1-based
    total: int
    mode: PreviewMode
    image: Image.Image
    seconds: float  # engine time spent making it (charged to its own job only)


@dataclass(frozen=True, slots=True)
class StepEvent:
    """After every denoising step of a batch: progress, and the previews some images asked for
    at this step (batch index -> preview; empty on most steps)."""

    step: int
    total: int
    previews: dict[int, Preview] = field(default_factory=dict)


# on_step(event): called by the engine after every denoising step; may raise BatchAborted.
StepCallback = Callable[[StepEvent], None]

# A request's LoRAs: (library name, scale) pairs, sorted by name, so equal sets batch together.
LoraSet = tuple[tuple[str, float], ...]


def normalise_loras(loras: Iterable[tuple[str, float]]) -> LoraSet:
    """The canonical form of a LoRA choice: sorted by name, scales as floats, zero scales dropped
    (a LoRA at scale 0 changes nothing, and leaving it out keeps the no-LoRA batch key)."""
    return tuple(sorted((name, float(scale)) for name, scale in loras if scale != 0))


@dataclass(frozen=True, slots=True)
class GenerationSpec:
    """One image to generate: everything the pipeline call needs, already resolved."""

    prompt: str  # as the model sees it, language suffix included
    negative_prompt: str
    width: int
    height: int
    num_inference_steps: int
    true_cfg_scale: float
    seed: int
    model: str = ""  # the public name of the model to run; "" is the server's first model
    loras: LoraSet = ()  # adapters active for this image (see normalise_loras)
    # Previews while it forms; not in the batch key (a previewing job batches with any other)
    # and without effect on the final image.
    preview: PreviewPlan | None = None

    task: ClassVar[Task] = "generate"

    @property
    def batch_key(self) -> tuple[object, ...]:
        """Jobs with equal keys can share one pipeline call (prompts and seeds may differ)."""
        return (self.task, self.model, self.width, self.height, self.num_inference_steps,
                self.true_cfg_scale, self.loras)

    @property
    def pixels(self) -> int:
        return self.width * self.height


@dataclass(frozen=True, slots=True)
class EditSpec(GenerationSpec):
    """One edited image: a GenerationSpec plus the input images (decoded, RGB, already resized
    to what the pipeline encodes) and, for a masked edit, the area to change."""

    images: tuple[Image.Image, ...] = field(default=(), compare=False)
    # Mode "L", the size of images[0]: 255 where the image may change (diffusers' convention).
    mask: Image.Image | None = field(default=None, compare=False)
    strength: float = 1.0  # masked edits: how far from the original the masked area may go
    # Digest of the inputs' pixels: multi-image pipelines batch only one prompt and its images.
    inputs_digest: str = ""
    # Whether the model runs one prompt per call (QwenImageEditPlusPipeline): then only jobs with
    # the same prompt and the same inputs can share a call.
    one_prompt_per_call: bool = False

    task: ClassVar[Task] = "edit"

    @property
    def batch_key(self) -> tuple[object, ...]:
        key = (*GenerationSpec.batch_key.fget(self),  # type: ignore[attr-defined]
               tuple(image.size for image in self.images), self.mask is not None, self.strength)
        if self.one_prompt_per_call:
            return (*key, self.prompt, self.negative_prompt, self.inputs_digest)
        return key


def digest_images(images: tuple[Image.Image, ...], mask: Image.Image | None) -> str:
    """A short digest of the inputs' pixels (equal uploads give equal digests)."""
    h = hashlib.blake2b(digest_size=16)
    for image in (*images, *([mask] if mask is not None else [])):
        h.update(f"{image.mode}{image.size}".encode())
        h.update(image.tobytes())
    return h.hexdigest()


class BatchAborted(Exception):
    """Raised from the step callback to stop a batch at once (every job in it was cancelled)."""


class DeviceOutOfMemory(Exception):
    """The accelerator ran out of memory; the engine has freed its caches."""


class DeviceFailure(Exception):
    """The accelerator hit an unrecoverable error; the process must restart to use it again."""


class EngineLost(DeviceFailure):
    """The engine's process ended (killed, crashed, out of host memory) before answering."""
