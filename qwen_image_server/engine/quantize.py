"""`QWEN_IMAGE_QUANTIZE`: fp8 / int8 weights for the transformer (and optionally the text encoder).

Quantization runs on the loaded bf16 weights with torchao's `quantize_` (the same kernels and
configs diffusers' `TorchAoConfig` wraps), one `nn.Linear` at a time: each layer is moved to the GPU
and quantized there, so the full bf16 transformer never sits on the GPU. Doing it after loading,
rather than through `from_pretrained(quantization_config=...)`, is what lets a LoRA be fused into
the bf16 weights first, and lets the benchmark quantize its in-memory random weights the same way.
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

# fp8 matmuls need Ada (8.9) or Hopper (9.0) tensor cores.
FP8_MIN_CAPABILITY = (8, 9)


def fp8_problem(device: DeviceInfo) -> str | None:
    """Why fp8 cannot run on this device, or None."""
    if device.type == "mps":
        return "torchao's fp8 kernels do not run on Apple GPUs; use QWEN_IMAGE_QUANTIZE=none"
    if device.type == "cuda":
        capability = torch.cuda.get_device_capability(0)
        if capability < FP8_MIN_CAPABILITY:
            return (f"fp8 needs a GPU of compute capability 8.9 or newer (Ada, Hopper); "
                    f"{device.gpu} is {capability[0]}.{capability[1]}: use QWEN_IMAGE_QUANTIZE=int8")
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
            return Float8DynamicActivationFloat8WeightConfig(granularity=PerRow())
        return Float8WeightOnlyConfig()
    if mode == "int8":
        return Int8WeightOnlyConfig()
    raise ValueError(f"no quantization config for {mode!r}")


def quantize_module(module: torch.nn.Module, mode: QuantizeName, device: DeviceInfo,
                    skip: Sequence[str] = DEFAULT_SKIP, *, to_device: bool = True) -> int:
    """Quantize every nn.Linear of `module` whose name contains none of `skip`, in place.

    With `to_device`, each layer moves to the device right before it is quantized, so only one
    bf16 layer is ever on the GPU. Returns how many layers were quantized.
    """
    from torchao.quantization import quantize_

    names: list[str] = []

    def wanted(layer: torch.nn.Module, fqn: str) -> bool:
        if isinstance(layer, torch.nn.Linear) and not any(part in fqn for part in skip):
            names.append(fqn)
            return True
        return False

    target = device.torch_device if to_device and device.type != "cpu" else None
    quantize_(module, ao_config(mode, device), filter_fn=wanted, device=target)
    return len(names)


def tensor_bytes(tensor: torch.Tensor) -> int:
    """Storage bytes of a tensor, looking inside torchao's tensor subclasses (int8 data + scales)."""
    flatten = getattr(tensor, "__tensor_flatten__", None)
    if flatten is not None and type(tensor) not in (torch.Tensor, torch.nn.Parameter):
        inner_names, _ = flatten()
        return sum(tensor_bytes(getattr(tensor, name)) for name in inner_names
                   if isinstance(getattr(tensor, name), torch.Tensor))
    return tensor.numel() * tensor.element_size()
