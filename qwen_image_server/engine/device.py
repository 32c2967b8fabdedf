"""Facts about the device the pipeline runs on: type, GPU name, CUDA version, memory in use."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from qwen_image_server.config.settings import DeviceName, DtypeName

_DTYPES: dict[str, torch.dtype] = {
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "float32": torch.float32,
}


@dataclass(frozen=True, slots=True)
class DeviceInfo:
    type: str  # "cuda", "cpu" or "mps"
    gpu: str | None  # e.g. "NVIDIA H100 80GB HBM3"; None without a GPU
    cuda_version: str | None  # the CUDA runtime torch was built with; None without CUDA

    @property
    def label(self) -> str:
        """Short human label for logs and the overlay: GPU name, or 'CPU'."""
        if self.type == "cuda" and self.gpu:
            return f"{self.gpu} (CUDA {self.cuda_version})"
        return self.gpu or self.type.upper()

    @property
    def torch_device(self) -> torch.device:
        return torch.device(self.type)


def resolve_device(name: DeviceName) -> DeviceInfo:
    """Turn the `device` setting into a concrete device; 'auto' prefers CUDA, then CPU."""
    kind = name
    if kind == "auto":
        kind = "cuda" if torch.cuda.is_available() else "cpu"
    if kind == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError("QWEN_IMAGE_DEVICE=cuda, but torch sees no CUDA device")
        return DeviceInfo("cuda", torch.cuda.get_device_name(0), torch.version.cuda)
    if kind == "mps":
        return DeviceInfo("mps", "Apple GPU (MPS)", None)
    return DeviceInfo("cpu", None, None)


def resolve_dtype(name: DtypeName, device: DeviceInfo) -> torch.dtype:
    """'auto' is bfloat16 on CUDA (what Qwen-Image ships in) and float32 elsewhere."""
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return _DTYPES[name]


def gpu_memory_mb(device: DeviceInfo) -> dict[str, float] | None:
    """Device memory held by this process (allocated by tensors, reserved by the allocator)."""
    if device.type != "cuda":
        return None
    return {
        "allocated": round(torch.cuda.memory_allocated() / 2**20, 1),
        "reserved": round(torch.cuda.memory_reserved() / 2**20, 1),
        "total": round(torch.cuda.get_device_properties(0).total_memory / 2**20, 1),
    }
