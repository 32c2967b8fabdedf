"""How long a batch may run before its engine counts as hung: each batch's deadline, derived from
its steps and size and the engine's measured speed, or fixed by the operator. No threads and no
lock: the scheduler keeps one `BatchWatch` per running batch, with its lock held, and its deadline
thread acts when one passes (see `core.py`).

A derived deadline, from the start of the batch:

* `floor_s + factor * steps * megapixels * rate`, where `rate` is the slowest seconds per step
  per megapixel seen on that slot (between two step events, so a LoRA load, the prompt encoding
  and the first step's compile are not in it; a full preview's decode is). The slot keeps it
  across restarts of its engine: the same model on the same device. The floor covers what steps
  do not measure: LoRA activation, the prompts, the VAE decode, a fresh engine's first call.
  With QWEN_IMAGE_COMPILE it is `COMPILE_FLOOR_S`: a batch of a shape not compiled yet compiles
  first (about a minute on an H200).
* Until the slot has finished a batch with a rate known, at least `warmup_s`: the server's first
  batch may compile, autotune, build kernels or run its first step slowly on a CPU. The batch's
  own steps make the rate known, so a batch slower than that still gets its derived deadline. A
  restarted engine is not given it again (the rate is known, and what a fresh process repeats is
  within the floor): a batch retried after a hang is caught again as soon.
* A batch naming a LoRA its engine has not run yet gets `lora_s` more: the load counts (a
  stalled hub download is a hang like any other), and a first use may download the file.

An operator's `timeout_s` replaces all of this: every batch, the first one included, gets exactly
that many seconds.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from qwen_image_server.engine.types import DeviceFailure, GenerationSpec

if TYPE_CHECKING:
    from qwen_image_server.config.settings import Settings

FLOOR_S = 60.0
COMPILE_FLOOR_S = 300.0  # a minute's regional compile on an H200, with room for slower devices


class BatchHung(DeviceFailure):
    """A batch ran past its deadline on an engine that cannot be killed (one in this process):
    the device may be wedged, and only a fresh process can be trusted with it."""


@dataclass(frozen=True, slots=True)
class WatchdogConfig:
    """Batch deadlines (see the module's docstring). `timeout_s` None: derived."""

    timeout_s: float | None = None
    floor_s: float = FLOOR_S
    # A step may run this many times slower than the slowest one timed on the slot: the rate is
    # per pixel of the output only, while true CFG doubles a step, an edit's input images lengthen
    # it, and a device shared with other work slows it.
    factor: float = 5.0
    warmup_s: float = 600.0
    lora_s: float = 600.0  # a first hub download of a LoRA of a few hundred MB on a slow link

    @classmethod
    def from_settings(cls, settings: Settings) -> WatchdogConfig | None:
        """The settings' watchdog; None (no watchdog) for QWEN_IMAGE_BATCH_TIMEOUT_S=0."""
        if settings.batch_timeout_s == 0:
            return None
        return cls(timeout_s=settings.batch_timeout_s,
                   floor_s=COMPILE_FLOOR_S if settings.compile else FLOOR_S)

    def watch(self, specs: Sequence[GenerationSpec], started: float, rate: float | None, *,
              warm: bool, new_loras: bool) -> BatchWatch:
        """The deadline of a batch of `specs` starting now, on a slot whose rate is `rate`;
        `warm`: the slot has finished a batch with its rate known (else it warms up)."""
        watch = BatchWatch(self, started, specs[0].num_inference_steps, sum(spec.pixels for spec in specs) / 1e6,
                           warm=warm, extra_s=self.lora_s if new_loras else 0.0)
        watch.pace(rate)
        return watch


@dataclass(slots=True)
class BatchWatch:
    """One running batch's deadline; it moves as its slot's measured rate changes."""

    config: WatchdogConfig
    started: float
    steps: int
    megapixels: float
    warm: bool  # its slot has finished a batch with its rate known
    extra_s: float  # for LoRAs its engine loads first
    deadline: float = 0.0
    hung: bool = False  # its deadline passed: the engine is being killed or given up

    @property
    def allowance_s(self) -> float:
        return self.deadline - self.started

    def pace(self, rate: float | None) -> None:
        """Derive the deadline from the slot's rate (seconds per step per megapixel; None: none
        measured yet)."""
        c = self.config
        if c.timeout_s is not None:
            allowance = c.timeout_s
        else:
            derived = 0.0 if rate is None else c.floor_s + c.factor * self.steps * self.megapixels * rate
            allowance = (derived if self.warm and rate is not None else max(c.warmup_s, derived)) + self.extra_s
        self.deadline = self.started + allowance


class StepTimer:
    """The slowest step of one pipeline call, in seconds per step per megapixel of its batch
    (the time between two step events: the first step, which also loads LoRAs, encodes the
    prompts and may compile, has no previous event and is not measured)."""

    def __init__(self, specs: Sequence[GenerationSpec], clock: Callable[[], float]) -> None:
        self._megapixels = max(sum(spec.pixels for spec in specs) / 1e6, 1e-6)
        self._clock = clock
        self._last: tuple[int, float] | None = None  # (step, when)

    def step(self, step: int) -> float | None:
        """A step event for `step`: the rate of the steps since the previous event, if any."""
        now = self._clock()
        last, self._last = self._last, (step, now)
        if last is None or step <= last[0]:
            return None
        return (now - last[1]) / (step - last[0]) / self._megapixels
