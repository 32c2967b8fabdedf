"""Memory plans and speed options: checked before the model loads, applied in the one order that works.

Order: fuse the LoRA (needs plain bf16 weights) -> plan the offload (needs the sizes the weights
will have) -> check the plan -> quantize (layer by layer through the GPU) -> attention backend ->
step cache (wraps the transformer before any offload hook does) -> place or offload -> regional
compile (compiles what the cache calls).
Every problem an option can have (missing package, wrong hardware, a bad value, a plan it cannot
work with) is found by `check_options` and `check_plan` at startup, so no request ever fails
because of an option.
"""

from __future__ import annotations

import importlib.util
import inspect
import logging
import re
from dataclasses import dataclass, field
from typing import Any

from qwen_image_server.config.lora_refs import LoraSpec, parse_lora
from qwen_image_server.config.settings import OffloadName, Settings
from qwen_image_server.engine.adapters import prepare_hotswap_slots
from qwen_image_server.engine.compilation import compile_blocks
from qwen_image_server.engine.device import DeviceInfo, resolve_dtype
from qwen_image_server.engine.lora import fuse_lora
from qwen_image_server.engine.memory import (
    GiB,
    OffloadPlan,
    component_bytes,
    free_gpu_bytes,
    place,
    plan_offload,
)
from qwen_image_server.engine.quantize import (
    TEXT_ENCODER_SKIP,
    Fp8Chooser,
    fp8_problem,
    quantize_module,
)
from qwen_image_server.engine.step_cache import cache_config, enable_step_cache
from qwen_image_server.errors import OptionUnavailable

log = logging.getLogger(__name__)

@dataclass(frozen=True, slots=True)
class AppliedOptions:
    """What was really applied: shown by /info and the startup log."""

    offload: str  # the plan used: none, model or sequential
    offload_reason: str
    quantize: str
    quantize_text_encoder: bool
    quantize_skip: list[str]
    compile: bool
    cache: str
    cache_options: dict[str, Any] = field(default_factory=dict)
    lora: str | None = None
    lora_scale: float | None = None
    attention: str = "native"
    warmup: bool = False
    # fp8 on a GPU: layer shapes ('in x out') that run another fp8 kind than row-wise, or bf16,
    # because this GPU's cuBLASLt has no row-wise kernel for them.
    fp8_fallbacks: dict[str, str] = field(default_factory=dict)

    def summary(self) -> str:
        fallbacks = "; ".join(f"{shape}: {kind}" for shape, kind in self.fp8_fallbacks.items())
        parts = [f"offload={self.offload} ({self.offload_reason})", f"quantize={self.quantize}"
                 + ("+text_encoder" if self.quantize_text_encoder else "")
                 + (f" (kept: {','.join(self.quantize_skip)})" if self.quantize_skip else "")
                 + (f" (fp8 fallbacks: {fallbacks})" if fallbacks else ""),
                 f"compile={int(self.compile)}", f"cache={self.cache}", f"attention={self.attention}",
                 f"warmup={int(self.warmup)}"]
        if self.lora:
            parts.append(f"lora={self.lora}@{self.lora_scale:g}")
        return ", ".join(parts)


def _missing(module: str) -> bool:
    return importlib.util.find_spec(module) is None


def check_options(settings: Settings, device: DeviceInfo) -> LoraSpec | None:
    """Raise OptionUnavailable (one sentence: what to install or change) for any option that
    cannot work here; return the parsed LoRA, if any."""
    if settings.quantize != "none" or settings.quantize_text_encoder:
        if settings.quantize == "none":
            raise OptionUnavailable("QWEN_IMAGE_QUANTIZE_TEXT_ENCODER=1 needs QWEN_IMAGE_QUANTIZE=fp8 or int8")
        if _missing("torchao"):
            raise OptionUnavailable(f"QWEN_IMAGE_QUANTIZE={settings.quantize} needs torchao: "
                                    "pip install 'qwen-image-server[gpu]'")
        if device.type == "mps":
            raise OptionUnavailable("torchao quantization does not run on Apple GPUs; use QWEN_IMAGE_QUANTIZE=none")
        dtype = resolve_dtype(settings.dtype, device)
        if settings.quantize == "fp8" and (problem := fp8_problem(device, dtype)):
            raise OptionUnavailable(problem)
    if settings.offload != "auto":
        check_plan(settings, device, settings.offload, f"QWEN_IMAGE_OFFLOAD={settings.offload}")
    if settings.cache == "cache-dit":
        if _missing("cache_dit"):
            raise OptionUnavailable("QWEN_IMAGE_CACHE=cache-dit needs the cache-dit package: "
                                    "pip install 'qwen-image-server[cache]'")
        cache_config(settings.cache_options)
    elif settings.cache_options:
        raise OptionUnavailable("QWEN_IMAGE_CACHE_OPTIONS is set but QWEN_IMAGE_CACHE is none")
    if settings.attention != "native":
        _check_attention(settings.attention, device)
    lora = None
    if settings.lora:
        if _missing("peft"):
            raise OptionUnavailable("QWEN_IMAGE_LORA needs peft: pip install peft")
        try:
            lora = parse_lora(settings.lora)
        except ValueError as exc:
            raise OptionUnavailable(f"QWEN_IMAGE_LORA={settings.lora!r}: {exc}") from exc
    return lora


def check_plan(settings: Settings, device: DeviceInfo, plan: OffloadName, why: str) -> None:
    """Refuse options that cannot work with this offload plan, the requested one before loading
    and the one `auto` resolved to once the sizes are known (`why` says which)."""
    if plan in ("model", "sequential") and device.type == "cpu":
        raise OptionUnavailable(f"QWEN_IMAGE_OFFLOAD={plan} moves weights between CPU and "
                                "a GPU, and this server runs on the CPU; use auto or none")
    if plan == "sequential" and settings.compile:
        # accelerate's per-layer hooks are compiler-disabled functions inside every block, which
        # a whole-block graph cannot hold: the warm-up would fail.
        raise OptionUnavailable(
            f"QWEN_IMAGE_COMPILE=1 cannot compile blocks whose layers sequential offload moves one "
            f"at a time, and the plan is sequential ({why}); drop QWEN_IMAGE_COMPILE, or make "
            "model offload fit (QWEN_IMAGE_QUANTIZE=fp8, QWEN_IMAGE_QUANTIZE_TEXT_ENCODER=1, "
            "a smaller QWEN_IMAGE_OFFLOAD_HEADROOM_GB)")


def takes_padding_mask(name: str) -> bool:
    """Whether a diffusers attention backend applies an arbitrary key mask.

    A batch of prompts of different lengths makes the pipeline pad them and pass a mask whose
    padding sits between the text and the image tokens. Every backend function has an `attn_mask`
    parameter, but many raise on any mask (flash, FA3, sage, ...), and the varlen ones keep each
    sequence's first N keys, which here would attend to the padding and drop image tokens. Both
    are read from the backend's source.
    """
    from diffusers.models.attention_dispatch import (
        AttentionBackendName,
        _AttentionBackendRegistry,
    )

    function = _AttentionBackendRegistry._backends.get(AttentionBackendName(name))
    if function is None:
        return False
    source = inspect.getsource(function)
    refuses = re.search(r"if attn_mask is not None:\s*\n\s*raise", source) is not None
    prefix_only = "_normalize_attn_mask" in source or "varlen" in function.__name__
    return not (refuses or prefix_only)


def _check_attention(name: str, device: DeviceInfo) -> None:
    from diffusers.models.attention_dispatch import (
        AttentionBackendName,
        _check_attention_backend_requirements,
    )

    try:
        backend = AttentionBackendName(name)
    except ValueError:
        names = ", ".join(b.value for b in AttentionBackendName)
        raise OptionUnavailable(f"QWEN_IMAGE_ATTENTION={name!r} is not a diffusers attention backend; "
                                f"one of: {names}") from None
    if device.type != "cuda" and not backend.value.startswith("_native") and backend.value != "native":
        raise OptionUnavailable(f"QWEN_IMAGE_ATTENTION={name} runs on NVIDIA GPUs only; use native on "
                                f"{device.type.upper()}")
    try:
        _check_attention_backend_requirements(backend)
    except (RuntimeError, ImportError) as exc:
        raise OptionUnavailable(f"QWEN_IMAGE_ATTENTION={name}: {exc} (pip install "
                                "'qwen-image-server[gpu]' brings the kernels package)") from exc


def prepare_pipeline(pipeline: Any, settings: Settings, device: DeviceInfo,
                     plan: OffloadPlan | None = None) -> AppliedOptions:
    """Apply every option to a loaded pipeline (weights in their dtype, on the CPU or the GPU).

    `plan`: the memory plan made for several pipelines at once (engine/models.py), which counts
    their shared components once; without it the plan is made for this pipeline alone."""
    lora = check_options(settings, device)
    if lora is not None:
        try:
            fuse_lora(pipeline, lora)
        except Exception as exc:  # a bad LoRA is a startup problem, said in one line
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise OptionUnavailable(f"the LoRA {lora.label} could not be loaded and fused: {first}") from exc

    if plan is None:
        sizes = component_bytes(pipeline, settings.quantize, settings.quantize_text_encoder,
                                settings.quantize_skip)
        plan = plan_offload(settings.offload, device, sizes, free_gpu_bytes(device),
                            int(settings.offload_headroom_gb * GiB))
    log.info("memory plan: offload=%s because %s", plan.plan, plan.reason)
    check_plan(settings, device, plan.plan, plan.reason)

    chooser: Fp8Chooser | None = None
    if settings.quantize != "none":
        # Under an offload plan every layer goes back to the CPU once quantized: the plan was
        # made because the components do not all fit on the GPU at once.
        stay = plan.plan == "none"
        # One chooser for both components: each fp8 layer shape is tried on the GPU once.
        if settings.quantize == "fp8" and device.type == "cuda":
            chooser = Fp8Chooser(device)
        count = quantize_module(pipeline.transformer, settings.quantize, device, settings.quantize_skip,
                                stay_on_device=stay, chooser=chooser)
        log.info("quantized %d transformer layers to %s (left unquantized: %s)",
                 count, settings.quantize, ", ".join(settings.quantize_skip) or "none")
        if settings.quantize_text_encoder:
            count = quantize_module(pipeline.text_encoder, settings.quantize, device, TEXT_ENCODER_SKIP,
                                    stay_on_device=stay, chooser=chooser)
            log.info("quantized %d text encoder layers to %s", count, settings.quantize)

    # Always set, "native" included: diffusers also keeps the choice in a process-wide registry,
    # and a second pipeline in the same process (the benchmark) must not inherit the first's.
    pipeline.transformer.set_attention_backend(settings.attention)
    if settings.cache == "cache-dit":
        enable_step_cache(pipeline, settings.cache_options)
    place(pipeline, plan.plan, device)
    if settings.compile and (settings.lora_dir is not None or settings.loras):
        # Per-request LoRAs are hot-swapped into adapter slots that must exist before compiling.
        prepare_hotswap_slots(pipeline, settings.max_loras_per_request, settings.lora_max_rank)
    if settings.compile:
        compile_blocks(pipeline, cached=settings.cache == "cache-dit")

    return AppliedOptions(
        offload=plan.plan,
        offload_reason=plan.reason,
        quantize=settings.quantize,
        quantize_text_encoder=settings.quantize_text_encoder,
        quantize_skip=list(settings.quantize_skip) if settings.quantize != "none" else [],
        compile=settings.compile,
        cache=settings.cache,
        cache_options=dict(settings.cache_options),
        lora=lora.label if lora else None,
        lora_scale=lora.scale if lora else None,
        attention=settings.attention,
        warmup=settings.warmup or settings.compile,
        fp8_fallbacks=chooser.fallbacks() if chooser else {},
    )
