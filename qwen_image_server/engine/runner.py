"""Runs one batch of GenerationSpecs (or EditSpecs) through the diffusers pipeline, owned by one thread."""

from __future__ import annotations

import gc
import logging
import time
from collections.abc import Sequence
from typing import Any

import torch
from PIL import Image

from qwen_image_server.engine.edit import EditCalls
from qwen_image_server.engine.loader import LoadedModel
from qwen_image_server.engine.types import (
    BatchAborted,
    DeviceFailure,
    DeviceOutOfMemory,
    GenerationSpec,
    StepCallback,
)
from qwen_image_server.presets import ASPECT_RATIOS

log = logging.getLogger(__name__)

# Errors after which the CUDA context is unusable: only a new process recovers.
_FATAL_MARKERS = ("CUDA error", "CUBLAS_STATUS", "CUDNN_STATUS", "cuDNN error", "NCCL error",
                  "device-side assert", "illegal memory access")


def is_device_failure(exc: BaseException) -> bool:
    """True when `exc` says the accelerator itself failed (not just this batch)."""
    accelerator_error = getattr(torch, "AcceleratorError", None)
    if accelerator_error is not None and isinstance(exc, accelerator_error):
        return True
    return isinstance(exc, RuntimeError) and any(m in str(exc) for m in _FATAL_MARKERS)


class PipelineEngine:
    """The real engine: one QwenImagePipeline call per batch, one CPU generator per image."""

    def __init__(self, model: LoadedModel) -> None:
        self.model = model
        self.pipeline = model.pipeline
        # The server reports progress itself; diffusers' tqdm bar would only clutter the log.
        self.pipeline.set_progress_bar_config(disable=True)
        self.edits = EditCalls(self.pipeline) if model.task == "edit" else None

    def _inputs(self, specs: Sequence[GenerationSpec], use_cfg: bool) -> tuple[Any, dict[str, Any]]:
        """The pipeline to call and what to make: prompts, size, and for edits the inputs."""
        if self.edits is not None:
            return self.edits.call(specs, use_cfg)  # type: ignore[arg-type]  # edit models get EditSpecs
        first = specs[0]
        return self.pipeline, dict(
            prompt=[s.prompt for s in specs],
            negative_prompt=[s.negative_prompt for s in specs] if use_cfg else None,
            width=first.width,
            height=first.height,
        )

    def run_batch(self, specs: Sequence[GenerationSpec], on_step: StepCallback) -> list[Image.Image]:
        """Generate one image per spec; all specs share a batch_key."""
        first = specs[0]
        assert all(s.batch_key == first.batch_key for s in specs), "batch mixes shapes"

        def step_end(pipe: Any, step: int, timestep: Any, tensors: dict[str, Any]) -> dict[str, Any]:
            on_step(step + 1, pipe.num_timesteps)  # may raise BatchAborted: stops before the decode
            return {}

        # CPU generators give the same noise on any device, and one per image keeps every
        # image of a batch identical to the image the same request gets alone.
        generators = [torch.Generator("cpu").manual_seed(s.seed) for s in specs]
        use_cfg = first.true_cfg_scale > 1.0
        pipeline, inputs = self._inputs(specs, use_cfg)
        scheduler = pipeline.scheduler
        if first.num_inference_steps == 1 and scheduler.config.get("shift_terminal"):
            # With one sigma, diffusers' stretch to shift_terminal divides 0 by 0 and the image
            # is NaN (black); one step has no schedule to stretch, so it runs without it.
            pipeline.scheduler = type(scheduler).from_config(scheduler.config, shift_terminal=None)
        try:
            with torch.inference_mode():
                out = pipeline(
                    **inputs,
                    num_inference_steps=first.num_inference_steps,
                    true_cfg_scale=first.true_cfg_scale,
                    generator=generators,
                    callback_on_step_end=step_end,
                    # diffusers defaults to 512 tokens; the API admits (and checks) up to 1024.
                    max_sequence_length=self.model.max_prompt_tokens,
                    output_type="pil",
                )
        except BatchAborted:
            raise
        except torch.OutOfMemoryError as exc:
            raise DeviceOutOfMemory(str(exc)) from exc
        except Exception as exc:
            if is_device_failure(exc):
                raise DeviceFailure(str(exc)) from exc
            raise
        finally:
            pipeline.scheduler = scheduler
        return list(out.images)

    def warm_up(self, aspect_ratios: Sequence[str], steps: int = 2) -> float:
        """Run one short generation per preset before the server reports ready; returns seconds.

        With QWEN_IMAGE_COMPILE this is where each shape is traced and compiled (minutes on a real
        GPU), so no user request pays for it; otherwise it loads CUDA kernels and cuDNN plans.
        """
        start = time.perf_counter()
        for name in dict.fromkeys(aspect_ratios):
            width, height = ASPECT_RATIOS[name]
            spec = GenerationSpec(prompt="warm-up", negative_prompt=" ", width=width, height=height,
                                  num_inference_steps=steps, true_cfg_scale=4.0, seed=0)
            self.run_batch([spec], lambda step, total: None)
            log.info("warm-up %s (%dx%d, %d steps) done after %.1fs",
                     name, width, height, steps, time.perf_counter() - start)
        return time.perf_counter() - start

    def free_memory(self) -> None:
        gc.collect()
        if self.model.device.type == "cuda":
            torch.cuda.empty_cache()
