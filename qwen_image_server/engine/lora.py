"""`QWEN_IMAGE_LORA`: fuse the LoRA into the transformer at start (`config/lora_refs.py` parses it).

A fused LoRA costs nothing per step (the adapter is merged into the weights and the PEFT layers
are removed), and it must happen before quantization and compilation, which both need plain
`nn.Linear` weights to work on.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

from qwen_image_server.config.lora_refs import LoraSpec, missing_path

log = logging.getLogger(__name__)

# The Lightning LoRAs were distilled with shift 3 and no terminal stretch (the Qwen-Image-Lightning
# repository's generate_with_diffusers.py); the rest of Qwen-Image's scheduler config is unchanged.
# Its model card runs 4 or 8 steps with true_cfg_scale 1.0 (no negative pass).
LIGHTNING_SCHEDULER_OVERRIDES: dict[str, Any] = {
    "base_shift": math.log(3),
    "max_shift": math.log(3),
    "shift_terminal": None,
}


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
