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
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from qwen_image_server.config.settings import QuantizeName
from qwen_image_server.engine.device import DeviceInfo

log = logging.getLogger(__name__)

# Layers kept in bf16 by default (QWEN_IMAGE_QUANTIZE_SKIP). The image-stream MLPs see latents
# whose range shifts across timesteps and have no normalization to absorb rounding; over 60
# residual blocks their error compounds
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

# The row counts each fp8 layer shape is tried with on the GPU before it is quantized: 1 (the
# timestep modulation), prompt lengths (the text stream and the text encoder: a few to a few
# hundred tokens) and image tokens. cuBLASLt has no row-wise fp8 kernel for some of these: with
# a large inner dimension and at most 256 rows it answers CUBLAS_STATUS_NOT_SUPPORTED
# (pytorch/ao#4582; seen for Qwen-Image on an H200 with CUDA 13.0, and with CUDA 12.9), which
# fails every request at the text stream's MLP.
FP8_PROBE_ROWS: tuple[int, ...] = (1, 2, 7, 16, 77, 127, 128, 255, 256, 257, 512, 1024, 4096)


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


def ao_config(mode: QuantizeName) -> Any:
    """The weight-only torchao config for `mode`: int8 anywhere, fp8 off CUDA.

    fp8 on CUDA quantizes activations too, so matmuls run on fp8 tensor cores (faster, and half
    the weight memory); which fp8 kind each layer gets is the Fp8Chooser's. Off CUDA only
    weight-only variants have kernels; they save memory and are exercised by the tests, not
    made for speed.
    """
    from torchao.quantization import Float8WeightOnlyConfig, Int8WeightOnlyConfig

    if mode == "fp8":
        return Float8WeightOnlyConfig()
    if mode == "int8":
        return Int8WeightOnlyConfig()
    raise ValueError(f"no quantization config for {mode!r}")


@dataclass(frozen=True)
class Fp8Kind:
    """One way to run a layer's matmul in fp8 on a GPU."""

    name: str
    config: Any  # a torchao quantization config


def fp8_kinds() -> list[Fp8Kind]:
    """The fp8 kinds for a GPU, best first: per-row scales with fast accumulation; per-row
    without it (a different cuBLASLt kernel family, which covers some shapes the first lacks);
    one scale per tensor (coarser, but cuBLASLt has kernels for every shape)."""
    from torchao.quantization import (
        Float8DynamicActivationFloat8WeightConfig,
        Float8MMConfig,
        PerRow,
        PerTensor,
    )

    return [
        Fp8Kind("row-wise", Float8DynamicActivationFloat8WeightConfig(granularity=PerRow())),
        Fp8Kind("row-wise, exact accumulation", Float8DynamicActivationFloat8WeightConfig(
            granularity=PerRow(), mm_config=Float8MMConfig(use_fast_accum=False))),
        Fp8Kind("per-tensor", Float8DynamicActivationFloat8WeightConfig(granularity=PerTensor())),
    ]


LayerShape = tuple[int, int, bool]  # in_features, out_features, has a bias
Fp8Probe = Callable[[Fp8Kind, LayerShape, DeviceInfo], str | None]


def probe_fp8(kind: Fp8Kind, shape: LayerShape, device: DeviceInfo) -> str | None:
    """Why a layer of `shape` quantized as `kind` fails on `device` at any of FP8_PROBE_ROWS,
    or None when every row count runs. A scratch layer with random weights, so the real weights
    are quantized once, with the kind that works."""
    from torchao.quantization import quantize_

    in_features, out_features, bias = shape
    where = device.torch_device
    try:
        layer = torch.nn.Linear(in_features, out_features, bias=bias, dtype=torch.bfloat16, device=where)
        quantize_(layer, kind.config)
        with torch.inference_mode():
            for rows in FP8_PROBE_ROWS:
                layer(torch.randn(rows, in_features, dtype=torch.bfloat16, device=where))
        if device.type == "cuda":
            torch.cuda.synchronize()
    except torch.OutOfMemoryError:
        raise  # says nothing about the kind: the real layers would not fit either
    except (RuntimeError, AssertionError, NotImplementedError) as exc:
        return (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    return None


@dataclass
class Fp8Chooser:
    """For each fp8 layer shape, the first of `kinds` whose matmuls run on this device at every
    FP8_PROBE_ROWS, tried once per shape; None (the layer stays in bf16) when none does. Shared
    by the transformer and the text encoder, so a shape is tried once per process."""

    device: DeviceInfo
    kinds: list[Fp8Kind] = field(default_factory=lambda: fp8_kinds())
    probe: Fp8Probe | None = None  # probe_fp8
    choices: dict[LayerShape, Fp8Kind | None] = field(default_factory=dict)

    def kind_for(self, layer: torch.nn.Linear) -> Fp8Kind | None:
        shape = (layer.in_features, layer.out_features, layer.bias is not None)
        if shape not in self.choices:
            failures = []
            choice = None
            probe = self.probe or probe_fp8
            for kind in self.kinds:
                error = probe(kind, shape, self.device)
                if error is None:
                    choice = kind
                    break
                failures.append(f"{kind.name}: {error}")
            if failures:
                log.warning("fp8 for %dx%d layers: %s; using %s", shape[0], shape[1], "; ".join(failures),
                            choice.name if choice else "bf16 (no fp8 kind runs)")
            self.choices[shape] = choice
        return self.choices[shape]

    def fallbacks(self) -> dict[str, str]:
        """'in x out' -> the kind used, for shapes that could not take the first kind."""
        best = self.kinds[0] if self.kinds else None
        return {f"{i}x{o}": (kind.name if kind else "bf16") for (i, o, _), kind in self.choices.items()
                if kind is not best}


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
                    skip: Sequence[str] = DEFAULT_SKIP, *, stay_on_device: bool = True,
                    chooser: Fp8Chooser | None = None) -> int:
    """Quantize every `quantizable` nn.Linear of `module` in place, one layer at a time.

    On a GPU each layer moves there just before it is quantized (quantizing is fast there), and
    without `stay_on_device` (an offload plan) goes back to the CPU right after, so at most one
    layer is on the GPU at any time. fp8 on CUDA takes, per layer shape, the kind `chooser`
    found to run there (one is made if not given); a shape no kind runs stays in bf16. Returns
    how many layers were quantized.
    """
    from torchao.quantization import quantize_

    gpu_fp8 = mode == "fp8" and device.type == "cuda"
    if gpu_fp8 and chooser is None:
        chooser = Fp8Chooser(device)
    config = None if gpu_fp8 else ao_config(mode)
    gpu = device.torch_device if device.type != "cpu" else None
    count = 0
    for name, layer in list(module.named_modules()):
        if not quantizable(name, layer, mode, skip):
            continue
        if gpu_fp8:
            assert chooser is not None
            kind = chooser.kind_for(layer)
            if kind is None:
                continue
            config = kind.config
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
