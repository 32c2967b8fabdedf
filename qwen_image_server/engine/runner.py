"""Runs one batch of GenerationSpecs through the diffusers pipeline, owned by one thread."""

from __future__ import annotations

import gc
import logging
from collections.abc import Sequence
from typing import Any

import torch
from PIL import Image

from qwen_image_server.engine.loader import LoadedModel
from qwen_image_server.engine.types import (
    BatchAborted,
    DeviceFailure,
    DeviceOutOfMemory,
    GenerationSpec,
)
from qwen_image_server.scheduler import StepCallback

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
        try:
            with torch.inference_mode():
                out = self.pipeline(
                    prompt=[s.prompt for s in specs],
                    negative_prompt=[s.negative_prompt for s in specs] if use_cfg else None,
                    width=first.width,
                    height=first.height,
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
        return list(out.images)

    def free_memory(self) -> None:
        gc.collect()
        if self.model.device.type == "cuda":
            torch.cuda.empty_cache()
