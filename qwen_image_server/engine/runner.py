"""Runs one batch of GenerationSpecs (or EditSpecs) through the diffusers pipeline, owned by one thread."""

from __future__ import annotations

import gc
import logging
import time
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from functools import cached_property, partial
from typing import Any

import torch
from PIL import Image

from qwen_image_server.config.presets import ASPECT_RATIOS
from qwen_image_server.engine.adapters import ResidentAdapters
from qwen_image_server.engine.compilation import WARMUP_PROMPT, warmup_prompt_batches
from qwen_image_server.engine.edit import EditCalls
from qwen_image_server.engine.guided import GenerationCalls, layered_inputs, side_by_side
from qwen_image_server.engine.layered import captioned_prompts, layers_side_by_side
from qwen_image_server.engine.loaded import LoadedModel
from qwen_image_server.engine.options import AppliedOptions, takes_padding_mask
from qwen_image_server.engine.parallel import CfgSplit
from qwen_image_server.engine.previews import Previewer, StepRecorder
from qwen_image_server.engine.prompt_cache import PromptCache, batch_embeddings
from qwen_image_server.engine.step_cache import set_cfg_mode
from qwen_image_server.engine.types import (
    BatchAborted,
    DeviceFailure,
    DeviceOutOfMemory,
    GenerationSpec,
    LayeredSpec,
    Preview,
    PreviewMode,
    StepCallback,
    StepEvent,
)
from qwen_image_server.errors import LoraUnusable

log = logging.getLogger(__name__)

# Errors after which the CUDA context is unusable: only a new process recovers.
_FATAL_MARKERS = ("CUDA error", "CUBLAS_STATUS", "CUDNN_STATUS", "cuDNN error", "NCCL error",
                  "device-side assert", "illegal memory access")
# cuBLAS errors that leave the context usable, checked first. ALLOC_FAILED is cuBLAS failing to get
# workspace memory: an out-of-memory like any other. NOT_SUPPORTED is a matmul cuBLAS has no
# kernel for, e.g. row-wise fp8 at some small shapes on some CUDA versions: that batch fails.
_OUT_OF_MEMORY_MARKERS = ("CUBLAS_STATUS_ALLOC_FAILED",)
_BATCH_ONLY_MARKERS = ("CUBLAS_STATUS_NOT_SUPPORTED",)


def is_out_of_memory(exc: BaseException) -> bool:
    """True when `exc` is the device running out of memory (freeing and retrying may help)."""
    return isinstance(exc, torch.OutOfMemoryError) or (
        isinstance(exc, RuntimeError) and any(m in str(exc) for m in _OUT_OF_MEMORY_MARKERS))


def is_device_failure(exc: BaseException) -> bool:
    """True when `exc` says the accelerator itself failed (not just this batch)."""
    if is_out_of_memory(exc) or any(m in str(exc) for m in _BATCH_ONLY_MARKERS):
        return False
    accelerator_error = getattr(torch, "AcceleratorError", None)
    if accelerator_error is not None and isinstance(exc, accelerator_error):
        return True
    return isinstance(exc, RuntimeError) and any(m in str(exc) for m in _FATAL_MARKERS)


def inference_context(options: AppliedOptions) -> AbstractContextManager[Any]:
    """The autograd mode pipeline calls run in: inference mode (the fastest) unless the weights
    are quantized and offloaded layer by layer. accelerate's sequential offload converts every
    weight it moves in with Tensor.to(dtype), which torchao's tensors do not implement in
    inference mode; plain no_grad works."""
    if options.offload == "sequential" and options.quantize != "none":
        return torch.no_grad()
    return torch.inference_mode()


class PipelineEngine:
    """The real engine: one QwenImagePipeline call per batch, one CPU generator per image."""

    def __init__(self, model: LoadedModel, adapters: ResidentAdapters | None = None,
                 prompts: PromptCache | None = None) -> None:
        self.model = model
        self.pipeline = model.pipeline
        self.adapters = adapters  # per-request LoRAs (None: this server has no LoRA library)
        # The server reports progress itself; diffusers' tqdm bar would only clutter the log.
        self.pipeline.set_progress_bar_config(disable=True)
        # With a backend that cannot apply the padding mask of prompts of different lengths
        # (flash, FA3, sage, ...), one pipeline call takes only prompts of one length, which
        # need no mask. Otherwise such a batch would fail, or attend to the padding.
        self.equal_lengths_only = not takes_padding_mask(model.options.attention)
        self.edits = EditCalls(self.pipeline) if model.task == "edit" else None
        self.generations = (GenerationCalls(self.pipeline, model.controlnet, model.inpaint_controlnet)
                            if model.task == "generate" else None)
        # Prompt embeddings computed once (generation models; an edit's prompt is encoded with
        # its images, so edits run as before). Without one, no prompt is kept between batches.
        self.prompts = prompts if prompts is not None else PromptCache(0)
        # On a rank of a CFG-parallel engine: the glue that runs one of the two guidance passes.
        self.split: CfgSplit | None = None

    @cached_property
    def previewer(self) -> Previewer:
        """Latent and full previews for this model's VAE (the projection is fitted on first use;
        `load_engine` asks for it at load time, so no request waits for the fit)."""
        start = time.perf_counter()
        previewer = Previewer.for_pipeline(self.pipeline, self.pipeline._execution_device)
        log.info("latent preview projection of %s fitted in %.2fs (correlation with its VAE's decode %.2f)",
                 self.model.name, time.perf_counter() - start, previewer.projection.correlation)
        return previewer

    def _inputs(self, specs: Sequence[GenerationSpec], use_cfg: bool) -> tuple[Any, dict[str, Any]]:
        """The pipeline to call and what to make: prompts, size, and for edits the inputs."""
        if self.edits is not None:
            return self.edits.call(specs, use_cfg)  # type: ignore[arg-type]  # edit models get EditSpecs
        if self.model.task == "layered":
            return self.pipeline, layered_inputs(specs, use_cfg)  # type: ignore[arg-type]  # LayeredSpecs
        assert self.generations is not None
        return self.generations.call(specs, use_cfg)

    def _embeddings(self, specs: Sequence[GenerationSpec], use_cfg: bool) -> dict[str, Any]:
        """The batch's prompt embeddings (and negative ones with CFG), from the prompt cache;
        call in the inference context."""
        self.prompts.invalidate_unless(self._encoder_state())
        embeds, mask = batch_embeddings(self.prompts.embeddings([s.prompt for s in specs], self._encode))
        inputs: dict[str, Any] = dict(prompt_embeds=embeds, prompt_embeds_mask=mask)
        if use_cfg:
            embeds, mask = batch_embeddings(self.prompts.embeddings([s.negative_prompt for s in specs], self._encode))
            inputs.update(negative_prompt_embeds=embeds, negative_prompt_embeds_mask=mask)
        return inputs

    def _encode(self, prompt: str) -> torch.Tensor:
        """One prompt through the text encoder, alone: `[tokens, hidden]`."""
        embeds, _ = self.pipeline._get_qwen_prompt_embeds([prompt], device=self.pipeline._execution_device)
        return embeds[0]

    def _encoder_state(self) -> object:
        """What the text encoder's output depends on besides its prompt: the adapters active
        on it, when LoRAs reach it (diffusers' Qwen-Image LoRAs touch only the transformer)."""
        encoder = self.pipeline.text_encoder
        if getattr(encoder, "peft_config", None) is None:
            return None
        return (id(encoder), self.adapters.active if self.adapters is not None else ())

    def run_batch(self, specs: Sequence[GenerationSpec], on_step: StepCallback) -> list[Image.Image]:
        """Generate one image per spec; all specs share a batch_key.

        Normally one pipeline call. When the attention backend needs prompts of equal length,
        one call per length, in order, with the progress of all of them counted as one run.
        """
        first = specs[0]
        assert all(s.batch_key == first.batch_key for s in specs), "batch mixes shapes"
        if self.adapters is not None:
            self.adapters.activate(first.loras)
        elif first.loras:
            raise LoraUnusable("This server has no LoRA library (QWEN_IMAGE_LORA_DIR, QWEN_IMAGE_LORAS).")
        one_group = [list(range(len(specs)))]
        groups = self._equal_length_groups(specs) if self.equal_lengths_only and len(specs) > 1 else one_group
        if len(groups) == 1:
            return self._call(specs, on_step)
        images: list[Image.Image | None] = [None] * len(specs)
        for done, group in enumerate(groups):
            def progress(event: StepEvent, done: int = done, group: list[int] = group) -> None:
                on_step(StepEvent(done * event.total + event.step, event.total * len(groups),
                                  {group[row]: preview for row, preview in event.previews.items()}))

            for index, image in zip(group, self._call([specs[i] for i in group], progress), strict=True):
                images[index] = image
        return [image for image in images if image is not None]

    def _equal_length_groups(self, specs: Sequence[GenerationSpec]) -> list[list[int]]:
        """Indices of `specs` grouped by the token lengths the pipeline will see (prompt, and
        negative prompt when CFG is on), the head's group first."""
        tokenizer, template = self.pipeline.tokenizer, self.pipeline.prompt_template_encode
        use_cfg = specs[0].true_cfg_scale > 1.0
        groups: dict[tuple[int, int], list[int]] = {}
        for index, spec in enumerate(specs):
            key = (len(tokenizer(template.format(spec.prompt)).input_ids),
                   len(tokenizer(template.format(spec.negative_prompt)).input_ids) if use_cfg else 0)
            groups.setdefault(key, []).append(index)
        return list(groups.values())

    def _call(self, specs: Sequence[GenerationSpec], on_step: StepCallback) -> list[Image.Image]:
        """One pipeline call for `specs`."""
        first = specs[0]
        # Only a batch with a previewing image records the scheduler's inputs; the others run
        # exactly as they would without previews anywhere.
        recorder = StepRecorder() if any(s.preview is not None for s in specs) else None
        arrange: Callable[[torch.Tensor], torch.Tensor] | None = None
        if isinstance(first, LayeredSpec):  # a latent preview shows the layers side by side
            arrange = partial(layers_side_by_side, layers=first.layers, width=first.width, height=first.height)

        def step_end(pipe: Any, step: int, timestep: Any, tensors: dict[str, Any]) -> dict[str, Any]:
            done, total = step + 1, pipe.num_timesteps
            previews: dict[int, Preview] = {}
            if recorder is not None:
                wanted: dict[int, PreviewMode] = {row: s.preview.mode for row, s in enumerate(specs)
                                                  if s.preview is not None and s.preview.due(done, total)}
                if wanted:
                    previews = self.previewer.make(recorder, wanted, done, total, first.width, first.height,
                                                   arrange)
            on_step(StepEvent(done, total, previews))  # may raise BatchAborted: stops before the decode
            return {}

        # CPU generators give the same noise on any device, and one per image keeps every
        # image of a batch identical to the image the same request gets alone.
        generators = [torch.Generator("cpu").manual_seed(s.seed) for s in specs]
        use_cfg = first.true_cfg_scale > 1.0
        pipeline, inputs = self._inputs(specs, use_cfg)
        scheduler = pipeline.scheduler
        if self.adapters is not None:  # a Lightning LoRA samples with its own scheduler
            pipeline.scheduler = self.adapters.scheduler_for(first.loras, scheduler)
        if first.num_inference_steps == 1 and pipeline.scheduler.config.get("shift_terminal"):
            # With one sigma, diffusers' stretch to shift_terminal divides 0 by 0 and the image
            # is NaN (black); one step has no schedule to stretch, so it runs without it.
            pipeline.scheduler = type(scheduler).from_config(pipeline.scheduler.config, shift_terminal=None)
        if self.model.options.cache == "cache-dit":
            set_cfg_mode(self.pipeline, separate_cfg=use_cfg)
        finished = False
        try:
            with inference_context(self.model.options), (
                    recorder.recording(pipeline.scheduler) if recorder is not None else nullcontext()):
                if self.generations is not None:
                    # Every generation pipeline (text, image-to-image, inpaint, ControlNet) takes
                    # embeddings in place of prompts; an edit's and a layered image's prompt is
                    # encoded with its picture, so those run on their prompts.
                    del inputs["prompt"], inputs["negative_prompt"]
                    inputs.update(self._embeddings(specs, use_cfg))
                elif self.model.task == "layered":  # pictures sent without a prompt are captioned first
                    inputs["prompt"] = captioned_prompts(pipeline, specs)  # type: ignore[arg-type]
                with self.split.batch(use_cfg) if self.split is not None else nullcontext():
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
            finished = True
        except BatchAborted:
            raise
        except Exception as exc:
            if is_out_of_memory(exc):
                raise DeviceOutOfMemory(str(exc)) from exc
            if is_device_failure(exc):
                raise DeviceFailure(str(exc)) from exc
            raise
        finally:
            pipeline.scheduler = scheduler
            if not finished and self.model.options.offload == "model":
                # The pipeline offloads at the end of a call it completes; after an abort or an
                # error the component that was running stays on the GPU, and the next call would
                # load the text encoder beside it.
                try:
                    pipeline.maybe_free_model_hooks()
                except Exception:  # the error that ended the call is the one to report
                    log.exception("offloading after an interrupted call failed")
        if self.model.task == "layered":  # a list of layers per picture: side by side, one image each
            return [side_by_side(layers) for layers in out.images]
        return list(out.images)

    def warm_up(self, aspect_ratios: Sequence[str], steps: int = 2) -> float:
        """Run short generations per preset before the server reports ready; returns seconds.

        With QWEN_IMAGE_COMPILE this is where each shape is traced and compiled (minutes on a real
        GPU), so no user request pays for it: every batch size up to the batch limit, with and
        without padding masks, at two prompt lengths or more. Otherwise one call per preset
        loads CUDA kernels and cuDNN plans.
        """
        start = time.perf_counter()
        for name in dict.fromkeys(aspect_ratios):
            width, height = ASPECT_RATIOS[name]
            self.warm_up_size(width, height, steps)
            log.info("warm-up %s (%dx%d, %d steps) done after %.1fs",
                     name, width, height, steps, time.perf_counter() - start)
        return time.perf_counter() - start

    def warm_up_size(self, width: int, height: int, steps: int = 2, max_batch_size: int | None = None) -> None:
        """The warm-up calls of one image size, for batches up to the scheduler's limits (or up
        to `max_batch_size` images of this size)."""
        if self.model.options.compile:
            if max_batch_size is None:
                calls = warmup_prompt_batches(width, height, self.model.max_batch_size, self.model.max_batch_pixels)
            else:
                calls = warmup_prompt_batches(width, height, max_batch_size, max_batch_size * width * height)
        else:
            calls = [[WARMUP_PROMPT]]
        for prompts in calls:
            specs = [GenerationSpec(prompt=prompt, negative_prompt=" ", width=width, height=height,
                                    num_inference_steps=steps, true_cfg_scale=4.0, seed=0)
                     for prompt in prompts]
            self.run_batch(specs, lambda event: None)

    def free_memory(self) -> None:
        gc.collect()
        if self.model.device.type == "cuda":
            torch.cuda.empty_cache()
