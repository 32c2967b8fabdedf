"""What the engine is asked to make, normalised and independent of any wire format."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, ClassVar, Literal

if TYPE_CHECKING:
    from PIL import Image

Task = Literal["generate", "edit"]

# on_step(step, total): called by the engine after every denoising step; may raise BatchAborted.
StepCallback = Callable[[int, int], None]


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

    task: ClassVar[Task] = "generate"

    @property
    def batch_key(self) -> tuple[object, ...]:
        """Jobs with equal keys can share one pipeline call (prompts and seeds may differ)."""
        return (self.task, self.model, self.width, self.height, self.num_inference_steps,
                self.true_cfg_scale)

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
