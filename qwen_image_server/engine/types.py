"""What the engine is asked to make, normalised and independent of any wire format."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

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

    @property
    def batch_key(self) -> tuple[int, int, int, float]:
        """Jobs with equal keys can share one pipeline call (prompts and seeds may differ)."""
        return (self.width, self.height, self.num_inference_steps, self.true_cfg_scale)

    @property
    def pixels(self) -> int:
        return self.width * self.height


class BatchAborted(Exception):
    """Raised from the step callback to stop a batch at once (every job in it was cancelled)."""


class DeviceOutOfMemory(Exception):
    """The accelerator ran out of memory; the engine has freed its caches."""


class DeviceFailure(Exception):
    """The accelerator hit an unrecoverable error; the process must restart to use it again."""
