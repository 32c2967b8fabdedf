"""`QWEN_IMAGE_LORA`: parse '<path or hub id>[,scale]', fuse the LoRA into the transformer at start.

A fused LoRA costs nothing per step (the adapter is merged into the weights and the PEFT layers
are removed), and it must happen before quantization and compilation, which both need plain
`nn.Linear` weights to work on.
"""

from __future__ import annotations

import logging
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

# lightx2v/Qwen-Image-Lightning files are named "...-Lightning-8steps-V1.1...safetensors".
_LIGHTNING = re.compile(r"lightning[-_]?(\d+)[-_]?steps?", re.IGNORECASE)

# The Lightning LoRAs were distilled with shift 3 and no terminal stretch (the Qwen-Image-Lightning
# repository's generate_with_diffusers.py); the rest of Qwen-Image's scheduler config is unchanged.
# Its model card runs 4 or 8 steps with true_cfg_scale 1.0 (no negative pass).
LIGHTNING_SCHEDULER_OVERRIDES: dict[str, Any] = {
    "base_shift": math.log(3),
    "max_shift": math.log(3),
    "shift_terminal": None,
}


@dataclass(frozen=True, slots=True)
class LoraSpec:
    """Where the LoRA is and how strongly it is fused."""

    source: str  # a local file or folder, or a hub repo id
    weight_name: str | None  # the file inside a hub repo or folder, when it holds several
    scale: float
    lightning_steps: int | None  # set for a Lightning (step-distilled) LoRA

    @property
    def label(self) -> str:
        return f"{self.source}:{self.weight_name}" if self.weight_name else self.source


def parse_lora(text: str) -> LoraSpec:
    """'<path or hub id>[:file.safetensors][,scale]' -> LoraSpec; ValueError names the problem."""
    source, _, scale_text = text.strip().partition(",")
    source = source.strip()
    try:
        scale = float(scale_text) if scale_text.strip() else 1.0
    except ValueError:
        raise ValueError(f"the LoRA scale {scale_text.strip()!r} is not a number") from None
    if not source:
        raise ValueError("no LoRA path or hub id before the comma")
    weight_name = None
    local = Path(source).expanduser()
    if not local.exists() and ":" in source and not re.match(r"^[A-Za-z]:[\\/]", source):
        source, weight_name = source.split(":", 1)  # hub form: repo/id:file.safetensors
    return LoraSpec(source, weight_name, scale, lightning_steps_of(weight_name or source))


def lightning_steps_of(file_name: str) -> int | None:
    """The step count a Lightning LoRA was distilled for, read from its file name."""
    match = _LIGHTNING.search(file_name)
    return int(match.group(1)) if match else None


def looks_like_path(text: str) -> bool:
    """A local path rather than a hub id (hub ids are 'owner/name', never absolute or dotted)."""
    return text.startswith((".", "/", "~", "\\")) or text.endswith(".safetensors") or bool(
        re.match(r"^[A-Za-z]:[\\/]", text))


def missing_path(source: str) -> Path | None:
    """The local path `source` names when it looks like a path that is not there (else None: a
    file or folder that exists, or a hub id)."""
    local = Path(source).expanduser()
    return local if looks_like_path(source) and not local.exists() else None


def fuse_lora(pipeline: Any, spec: LoraSpec) -> None:
    """Load, fuse and unload the adapter, leaving plain (merged) weights in the transformer."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    kwargs: dict[str, Any] = {"adapter_name": "server"}
    if spec.weight_name:
        kwargs["weight_name"] = spec.weight_name
    source = spec.source
    local = Path(source).expanduser()
    if local.is_file():  # diffusers takes a folder plus a weight_name
        source, kwargs["weight_name"] = str(local.parent), local.name
    elif (missing := missing_path(source)) is not None:
        raise FileNotFoundError(f"no such file or folder: {missing}")
    pipeline.load_lora_weights(source, **kwargs)
    pipeline.fuse_lora(components=["transformer"], lora_scale=spec.scale)
    pipeline.unload_lora_weights()
    if spec.lightning_steps is not None:
        pipeline.scheduler = FlowMatchEulerDiscreteScheduler.from_config(
            pipeline.scheduler.config, **LIGHTNING_SCHEDULER_OVERRIDES)
        log.info("LoRA %s is a %d-step Lightning LoRA: using its sampler (shift 3)",
                 spec.label, spec.lightning_steps)
    log.info("fused LoRA %s at scale %g", spec.label, spec.scale)
