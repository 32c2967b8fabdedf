"""Memory plans and speed options: checked before the model loads, applied in the one order that works.

Order: fuse the LoRA (needs plain bf16 weights) -> plan the offload (needs the sizes the weights
will have) -> quantize (layer by layer onto the GPU) -> place or offload -> attention backend ->
step cache (wraps the transformer blocks) -> regional compile (compiles what the cache calls).
Every problem an option can have (missing package, wrong hardware, a bad value) is found by
`check_options` at startup, so no request ever fails because of an option.
"""

from __future__ import annotations

import importlib.util
import logging
from dataclasses import dataclass, field
from typing import Any


from qwen_image_server.engine.device import DeviceInfo
from qwen_image_server.engine.lora import LoraSpec, fuse_lora, parse_lora
from qwen_image_server.engine.memory import (
    GiB,
    OffloadPlan,
    component_bytes,
    free_gpu_bytes,
    place,
    plan_offload,
)
from qwen_image_server.engine.quantize import fp8_problem, quantize_module
from qwen_image_server.errors import OptionUnavailable
from qwen_image_server.settings import Settings

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

    def summary(self) -> str:
        parts = [f"offload={self.offload} ({self.offload_reason})", f"quantize={self.quantize}"
                 + ("+text_encoder" if self.quantize_text_encoder else "")
                 + (f" (kept: {','.join(self.quantize_skip)})" if self.quantize_skip else ""),
                 f"compile={int(self.compile)}", f"cache={self.cache}", f"attention={self.attention}",
                 f"warmup={int(self.warmup)}"]
        if self.lora:
            parts.append(f"lora={self.lora}@{self.lora_scale:g}")
        return ", ".join(parts)


def _missing(module: str) -> bool:
    return importlib.util.find_spec(module) is None


def _cache_config(options: dict[str, Any]) -> Any:
    from cache_dit import DBCacheConfig

    try:
        return DBCacheConfig(**options)
    except TypeError as exc:
        raise OptionUnavailable(f"QWEN_IMAGE_CACHE_OPTIONS has a knob DBCacheConfig does not take: {exc}") from exc


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
        if settings.quantize == "fp8" and (problem := fp8_problem(device)):
            raise OptionUnavailable(problem)
    if settings.offload in ("model", "sequential") and device.type == "cpu":
        raise OptionUnavailable(f"QWEN_IMAGE_OFFLOAD={settings.offload} moves weights between CPU and "
                                "a GPU, and this server runs on the CPU; use auto or none")
    if settings.offload == "sequential" and settings.quantize != "none":
        raise OptionUnavailable("sequential offload cannot move torchao-quantized layers; with "
                                "QWEN_IMAGE_QUANTIZE use QWEN_IMAGE_OFFLOAD=model (or auto)")
    if settings.offload == "sequential" and settings.compile:
        raise OptionUnavailable("QWEN_IMAGE_COMPILE=1 with sequential offload recompiles on every "
                                "layer move; use QWEN_IMAGE_OFFLOAD=model or none")
    if settings.cache == "cache-dit":
        if _missing("cache_dit"):
            raise OptionUnavailable("QWEN_IMAGE_CACHE=cache-dit needs the cache-dit package: "
                                    "pip install 'qwen-image-server[cache]'")
        _cache_config(settings.cache_options)
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
        except Exception as exc:  # noqa: BLE001 - a bad LoRA is a startup problem, said in one line
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise OptionUnavailable(f"the LoRA {lora.label} could not be loaded and fused: {first}") from exc

    if plan is None:
        sizes = component_bytes(pipeline, settings.quantize, settings.quantize_text_encoder,
                                settings.quantize_skip)
        plan = plan_offload(settings.offload, device, sizes, free_gpu_bytes(device),
                            int(settings.offload_headroom_gb * GiB))
    log.info("memory plan: offload=%s because %s", plan.plan, plan.reason)

    if settings.quantize != "none":
        count = quantize_module(pipeline.transformer, settings.quantize, device, settings.quantize_skip)
        log.info("quantized %d transformer layers to %s (left unquantized: %s)",
                 count, settings.quantize, ", ".join(settings.quantize_skip) or "none")
        if settings.quantize_text_encoder:
            count = quantize_module(pipeline.text_encoder, settings.quantize, device, ())
            log.info("quantized %d text encoder layers to %s", count, settings.quantize)
    place(pipeline, plan.plan, device)

    # Always set, "native" included: diffusers also keeps the choice in a process-wide registry,
    # and a second pipeline in the same process (the benchmark) must not inherit the first's.
    pipeline.transformer.set_attention_backend(settings.attention)
    if settings.cache == "cache-dit":
        import cache_dit

        config = _cache_config(settings.cache_options)
        blocks = len(pipeline.transformer.transformer_blocks)
        # cache-dit asserts this only inside the first forward; a request must never be the one
        # to find out.
        if config.Fn_compute_blocks + config.Bn_compute_blocks > blocks:
            raise OptionUnavailable(
                f"QWEN_IMAGE_CACHE_OPTIONS: Fn_compute_blocks ({config.Fn_compute_blocks}) + "
                f"Bn_compute_blocks ({config.Bn_compute_blocks}) must not exceed the transformer's "
                f"{blocks} blocks")
        cache_dit.enable_cache(pipeline, cache_config=config)
    if settings.compile:
        if settings.cache == "cache-dit":
            import cache_dit

            cache_dit.set_compile_configs()  # cache-dit's dynamo settings for its wrapped blocks
        # Regional: one compiled graph reused by all 60 identical blocks; compiles in a minute
        # rather than the many a whole-model compile takes, for nearly the same speed.
        pipeline.transformer.compile_repeated_blocks(fullgraph=settings.cache == "none")

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
    )


