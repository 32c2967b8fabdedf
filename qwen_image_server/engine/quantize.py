"""`QWEN_IMAGE_QUANTIZE`: fp8 / int8 weights for the transformer (and optionally the text encoder).

Quantization runs on the loaded bf16 weights with torchao's `quantize_` (the same kernels and
configs diffusers' `TorchAoConfig` wraps), one `nn.Linear` at a time: each layer is moved to the GPU,
quantized there and, when the memory plan offloads, sent back to the CPU, so neither the bf16
component nor (under offload) the quantized one ever sits on the GPU whole. Doing it after
loading, rather than through `from_pretrained(quantization_config=...)`, is what lets a LoRA be
fused into the bf16 weights first, and lets the benchmark quantize its in-memory random weights
the same way.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import torch

from qwen_image_server.engine.device import DeviceInfo
from qwen_image_server.settings import QuantizeName

log = logging.getLogger(__name__)

# Layers kept in bf16 by default (QWEN_IMAGE_QUANTIZE_SKIP). The image-stream MLPs see latents whose range shifts across timesteps
# and have no normalization to absorb rounding; over 60 residual blocks their error compounds
# (vLLM-Omni's fp8 guide keeps `img_mlp` in bf16 for Qwen-Image for this reason).
DEFAULT_SKIP: tuple[str, ...] = ("img_mlp",)

# The text encoder's vision tower is never called for text-to-image, so quantizing it is wasted
# startup time; its MLPs (1280 x 3420) could not take fp8 anyway (see `quantizable`).
TEXT_ENCODER_SKIP: tuple[str, ...] = ("visual.",)

# fp8 matmuls need Ada (8.9) or Hopper (9.0) tensor cores.
FP8_MIN_CAPABILITY = (8, 9)

# torch._scaled_mm takes fp8 operands only when both sides of the weight are multiples of 16;
# torchao silently leaves any other layer in its original dtype.
FP8_MULTIPLE = 16


def fp8_problem(device: DeviceInfo, dtype: torch.dtype) -> str | None:
    """Why fp8 cannot run on this device with weights of `dtype`, or None."""
    if device.type == "mps":
        return "torchao's fp8 kernels do not run on Apple GPUs; use QWEN_IMAGE_QUANTIZE=none"
    if device.type == "cuda":
        capability = torch.cuda.get_device_capability(0)
        if capability < FP8_MIN_CAPABILITY:
            return (f"fp8 needs a GPU of compute capability 8.9 or newer (Ada, Hopper); "
                    f"{device.gpu} is {capability[0]}.{capability[1]}: use QWEN_IMAGE_QUANTIZE=int8")
        if dtype != torch.bfloat16:
            # torchao asserts this only when it reaches the first layer, after the download.
            name = str(dtype).removeprefix("torch.")
            return (f"fp8 on a GPU scales weights per row, which torchao does only from bfloat16, and "
                    f"QWEN_IMAGE_DTYPE is {name}: use QWEN_IMAGE_DTYPE=bfloat16 (or auto), or "
                    "QWEN_IMAGE_QUANTIZE=int8")
    return None


def ao_config(mode: QuantizeName, device: DeviceInfo) -> Any:
    """The torchao config for `mode` on `device`.

    On CUDA, fp8 quantizes activations too (per-row scales), so matmuls run on fp8 tensor cores:
    faster and half the weight memory. On CPU only weight-only variants have kernels; they save
    memory and are exercised by the tests, not made for speed.
    """
    from torchao.quantization import (
        Float8DynamicActivationFloat8WeightConfig,
        Float8WeightOnlyConfig,
        Int8WeightOnlyConfig,
        PerRow,
    )

    if mode == "fp8":
        if device.type == "cuda":
            if (device.cuda_version or "").startswith("12.9"):
                from torchao.quantization import Float8MMConfig

                # cuBLASLt in CUDA 12.9 fails row-wise fp8 matmuls of some shapes with
                # CUBLAS_STATUS_NOT_SUPPORTED (pytorch/ao#4582, fixed in 13.0); without fast
                # accumulation it takes a path that works.
                return Float8DynamicActivationFloat8WeightConfig(
                    granularity=PerRow(), mm_config=Float8MMConfig(use_fast_accum=False))
            return Float8DynamicActivationFloat8WeightConfig(granularity=PerRow())
        return Float8WeightOnlyConfig()
    if mode == "int8":
        return Int8WeightOnlyConfig()
    raise ValueError(f"no quantization config for {mode!r}")


def quantizable(name: str, layer: torch.nn.Module, mode: QuantizeName, skip: Sequence[str]) -> bool:
    """Whether `mode` turns this layer's weight into 8 bits: the one rule the quantizer and the
    memory estimate share."""
    if not isinstance(layer, torch.nn.Linear) or any(part in name for part in skip):
        return False
    if mode == "fp8":
        out_features, in_features = layer.weight.shape
        return out_features % FP8_MULTIPLE == 0 and in_features % FP8_MULTIPLE == 0
    return True


def quantize_module(module: torch.nn.Module, mode: QuantizeName, device: DeviceInfo,
                    skip: Sequence[str] = DEFAULT_SKIP, *, stay_on_device: bool = True) -> int:
    """Quantize every `quantizable` nn.Linear of `module` in place, one layer at a time.

    On a GPU each layer moves there just before it is quantized (quantizing is fast there), and
    without `stay_on_device` (an offload plan) goes back to the CPU right after, so at most one
    layer is on the GPU at any time. Returns how many layers were quantized.
    """
    from torchao.quantization import quantize_

    config = ao_config(mode, device)
    gpu = device.torch_device if device.type != "cpu" else None
    count = 0
    for name, layer in list(module.named_modules()):
        if not quantizable(name, layer, mode, skip):
            continue
        home = layer.weight.device
        if gpu is not None:
            layer.to(gpu)
        # quantize_ with device= would move the whole module it is given; given the layer
        # alone, it touches nothing else.
        quantize_(layer, config, filter_fn=lambda candidate, fqn, this=layer: candidate is this)
        if gpu is not None and not stay_on_device:
            layer.to(home)
        count += 1
    return count


def tensor_bytes(tensor: torch.Tensor) -> int:
    """Storage bytes of a tensor, looking inside torchao's tensor subclasses (int8 data + scales)."""
    flatten = getattr(tensor, "__tensor_flatten__", None)
    if flatten is not None and type(tensor) not in (torch.Tensor, torch.nn.Parameter):
        inner_names, _ = flatten()
        return sum(tensor_bytes(getattr(tensor, name)) for name in inner_names
                   if isinstance(getattr(tensor, name), torch.Tensor))
    return tensor.numel() * tensor.element_size()
