"""Values a request gets for the fields it leaves out, where the server's setup decides them.

The seed's defaults are 20 steps at true_cfg_scale 4.0. A step-distilled (Lightning) LoRA is made
for its own step count without CFG, so its defaults follow the LoRA's card; explicit
QWEN_IMAGE_DEFAULT_STEPS / QWEN_IMAGE_DEFAULT_CFG_SCALE settings win over both.
"""

from __future__ import annotations

from dataclasses import dataclass

from qwen_image_server.config.lora_refs import parse_lora
from qwen_image_server.config.settings import Settings

SEED_STEPS = 20
SEED_CFG_SCALE = 4.0


@dataclass(frozen=True, slots=True)
class GenerationDefaults:
    num_inference_steps: int
    true_cfg_scale: float
    reason: str  # shown in /info and the startup log

    @classmethod
    def from_settings(cls, settings: Settings) -> GenerationDefaults:
        steps, cfg, reason = SEED_STEPS, SEED_CFG_SCALE, "the API's defaults"
        if settings.lora:
            try:
                spec = parse_lora(settings.lora)
            except ValueError:
                spec = None  # the loader reports the bad value at startup
            if spec is not None and spec.lightning_steps is not None:
                steps, cfg = spec.lightning_steps, 1.0
                reason = f"the {spec.lightning_steps}-step Lightning LoRA's card"
        if settings.default_steps is not None or settings.default_cfg_scale is not None:
            reason = "QWEN_IMAGE_DEFAULT_STEPS / QWEN_IMAGE_DEFAULT_CFG_SCALE"
        return cls(
            num_inference_steps=settings.default_steps if settings.default_steps is not None else steps,
            true_cfg_scale=settings.default_cfg_scale if settings.default_cfg_scale is not None else cfg,
            reason=reason,
        )
