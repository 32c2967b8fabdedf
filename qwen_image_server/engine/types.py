"""What the engine is asked to make, normalised and independent of any wire format."""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, ClassVar, Literal

if TYPE_CHECKING:
    from PIL import Image

Task = Literal["generate", "edit", "layered"]
# What a generation model's call does with its inputs (see GenerationSpec.kind).
GenerationKind = Literal["text", "img2img", "inpaint", "control", "control_inpaint"]
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
    # Image-to-image: the picture to start from (RGB, already at width x height). With `mask`
    # ("L", same size, 255 where it may change) it is inpainting. Edits keep their inputs in
    # EditSpec.images and use `mask` the same way.
    image: Image.Image | None = field(default=None, compare=False)
    mask: Image.Image | None = field(default=None, compare=False)
    strength: float = 1.0  # how far from `image` (or an edit's masked area) the result may move
    # ControlNet: the control images (RGB, at width x height): one, or several conditions for the
    # one ControlNet (a union ControlNet's edges and depth, ...); with `mask`, the picture the
    # inpainting ControlNet repaints. One scale for them all, or one per control image.
    control_images: tuple[Image.Image, ...] = field(default=(), compare=False)
    control_scales: tuple[float, ...] = (1.0,)
    control_start: float = 0.0  # fraction of the steps where the ControlNet starts / stops
    control_end: float = 1.0

    task: ClassVar[Task] = "generate"

    @property
    def kind(self) -> GenerationKind:
        """Which pipeline of a generation model makes it: plain, image-to-image, inpaint, ControlNet,
        ControlNet inpainting (a control image and a mask)."""
        if self.control_images:
            return "control_inpaint" if self.mask is not None else "control"
        if self.mask is not None:
            return "inpaint"
        if self.image is not None:
            return "img2img"
        return "text"

    @property
    def batch_key(self) -> tuple[object, ...]:
        """Jobs with equal keys can share one pipeline call (prompts, seeds and input pictures of
        the same size may differ; the pipeline and its scalar knobs may not)."""
        kind = self.kind
        extra: tuple[object, ...] = ()
        if kind in ("img2img", "inpaint"):
            extra = (self.strength,)
        elif kind in ("control", "control_inpaint"):
            extra = (len(self.control_images), self.control_scales, self.control_start, self.control_end)
        return (self.task, self.model, self.width, self.height, self.num_inference_steps,
                self.true_cfg_scale, self.loras, kind, *extra)

    def kept(self) -> tuple[Image.Image, Image.Image] | None:
        """An inpainting's (original, mask): outside the mask the original is kept when rendering.
        A ControlNet inpainting's original is its control image."""
        original = self.image if self.image is not None else next(iter(self.control_images), None)
        if self.mask is None or original is None:
            return None
        return original, self.mask

    def without_pixels(self) -> GenerationSpec:
        """This spec without its input pictures (what a finished job's record keeps)."""
        return dataclasses.replace(self, image=None, mask=None, control_images=())

    @property
    def pixels(self) -> int:
        return self.width * self.height


@dataclass(frozen=True, slots=True)
class EditSpec(GenerationSpec):
    """One edited image: a GenerationSpec plus the input images (decoded, RGB, already resized
    to what the pipeline encodes) and, for a masked edit, the area to change."""

    images: tuple[Image.Image, ...] = field(default=(), compare=False)
    # `mask` (inherited): mode "L", the size of images[0], 255 where the image may change;
    # `strength`: how far from the original the masked area may go.
    # Digest of the inputs' pixels: multi-image pipelines batch only one prompt and its images.
    inputs_digest: str = ""
    # Whether the model runs one prompt per call (QwenImageEditPlusPipeline): then only jobs with
    # the same prompt and the same inputs can share a call.
    one_prompt_per_call: bool = False

    task: ClassVar[Task] = "edit"

    @property
    def kind(self) -> GenerationKind:
        return "text"  # an edit's inputs are its images; its key says the rest

    @property
    def batch_key(self) -> tuple[object, ...]:
        key = (*GenerationSpec.batch_key.fget(self),  # type: ignore[attr-defined]
               tuple(image.size for image in self.images), self.mask is not None, self.strength)
        if self.one_prompt_per_call:
            return (*key, self.prompt, self.negative_prompt, self.inputs_digest)
        return key

    def kept(self) -> tuple[Image.Image, Image.Image] | None:
        return (self.images[0], self.mask) if self.mask is not None and self.images else None

    def without_pixels(self) -> GenerationSpec:
        return dataclasses.replace(self, images=(), mask=None)


@dataclass(frozen=True, slots=True)
class LayeredSpec(GenerationSpec):
    """One picture split into `layers` RGBA layers (QwenImageLayeredPipeline). The engine gives
    back one RGBA image holding the layers side by side, left to right: `width` is the layers'
    width times `layers`, `height` theirs (the pipeline's own size for the picture's aspect ratio
    in its `resolution` bucket)."""

    source: Image.Image | None = field(default=None, compare=False)  # RGBA
    layers: int = 4
    resolution: int = 640  # the pipeline's bucket: 640 or 1024
    # With an empty `prompt` the engine has the model caption the picture first, in this language
    # ("en" or "zh": the pipeline's two captioning instructions).
    caption_language: str = "en"

    task: ClassVar[Task] = "layered"

    @property
    def layer_width(self) -> int:
        return self.width // self.layers

    @property
    def batch_key(self) -> tuple[object, ...]:
        return (*GenerationSpec.batch_key.fget(self),  # type: ignore[attr-defined]
                self.layers, self.resolution)

    def without_pixels(self) -> GenerationSpec:
        return dataclasses.replace(self, source=None)


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
