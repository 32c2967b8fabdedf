"""`QWEN_IMAGE_OFFLOAD`: where the weights live, and the `auto` plan that picks it.

- none: every component on the GPU (fastest; real Qwen-Image needs ~58 GB in bf16, ~37 GB fp8).
- model: diffusers' model CPU offload; one component (text encoder, transformer, VAE) on the GPU
  at a time. Costs a host-to-device copy of each component per request.
- sequential: diffusers' sequential CPU offload; one layer at a time. Fits almost anywhere, and
  is several times slower.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from qwen_image_server.config.settings import OffloadName, QuantizeName
from qwen_image_server.engine.device import DeviceInfo
from qwen_image_server.engine.quantize import (
    DEFAULT_SKIP,
    TEXT_ENCODER_SKIP,
    quantizable,
    tensor_bytes,
)

GiB = 2**30


@dataclass(frozen=True, slots=True)
class OffloadPlan:
    plan: OffloadName  # never "auto"
    reason: str  # one sentence for the startup log and /info


def component_bytes(pipeline: Any, quantize: QuantizeName, quantize_text_encoder: bool,
                    skip: Sequence[str] = DEFAULT_SKIP) -> dict[str, int]:
    """Bytes each torch component will take on the device once the quantization is applied.

    `skip` applies to the transformer; the text encoder always keeps its vision tower as is.
    """
    skips: dict[str, Sequence[str]] = {"transformer": skip}
    if quantize_text_encoder:
        skips["text_encoder"] = TEXT_ENCODER_SKIP
    sizes: dict[str, int] = {}
    for name, component in pipeline.components.items():
        if not isinstance(component, torch.nn.Module):
            continue
        total = 0
        for module_name, module in component.named_modules():
            quantized = (quantize != "none" and name in skips
                         and quantizable(module_name, module, quantize, skips[name]))
            for param in module.parameters(recurse=False):
                size = tensor_bytes(param)
                if quantized and param.dim() == 2 and param.element_size() > 1:
                    # one byte per weight, plus per output row a scale: float32 for fp8, the
                    # weight's dtype and a one-byte zero point for int8
                    per_row = 4 if quantize == "fp8" else param.element_size() + 1
                    size = param.numel() + param.shape[0] * per_row
                total += size
        for buffer in component.buffers():
            total += tensor_bytes(buffer)
        sizes[name] = total
    return sizes


def plan_offload(requested: OffloadName, device: DeviceInfo, sizes: dict[str, int],
                 free_bytes: int | None, headroom_bytes: int) -> OffloadPlan:
    """Turn the requested mode into a concrete plan; `auto` compares sizes with free memory."""
    if requested != "auto":
        return OffloadPlan(requested, f"QWEN_IMAGE_OFFLOAD={requested}")
    if device.type != "cuda" or free_bytes is None:
        return OffloadPlan("none", f"weights stay in {device.type.upper()} memory (no GPU to offload from)")
    total = sum(sizes.values())
    largest_name, largest = max(sizes.items(), key=lambda item: item[1])
    facts = (f"weights {total / GiB:.1f} GiB, largest component {largest_name} {largest / GiB:.1f} GiB, "
             f"GPU free {free_bytes / GiB:.1f} GiB, headroom {headroom_bytes / GiB:.1f} GiB")
    if total + headroom_bytes <= free_bytes:
        return OffloadPlan("none", f"everything fits on the GPU ({facts})")
    if largest + headroom_bytes <= free_bytes:
        return OffloadPlan("model", f"all weights do not fit but each component does ({facts})")
    return OffloadPlan("sequential", f"even the {largest_name} alone does not fit ({facts}); "
                       "QWEN_IMAGE_QUANTIZE=fp8 or int8 may make model offload possible")


def free_gpu_bytes(device: DeviceInfo) -> int | None:
    if device.type != "cuda":
        return None
    free, _total = torch.cuda.mem_get_info()
    return int(free)


def place(pipeline: Any, plan: OffloadName, device: DeviceInfo) -> None:
    """Put the weights where the plan says."""
    if plan == "model":
        pipeline.enable_model_cpu_offload(device=device.torch_device)
    elif plan == "sequential":
        pipeline.enable_sequential_cpu_offload(device=device.torch_device)
    else:
        pipeline.to(device.torch_device)
