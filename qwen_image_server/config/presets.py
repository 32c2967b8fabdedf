"""Aspect-ratio presets and Qwen-Image's recommended per-language prompt suffixes."""

from __future__ import annotations

from typing import Literal

# Qwen-Image works on 16-pixel multiples (8x VAE, 2x2 patches). The seed lists 4:3 as 1472x1140;
# 1140 is not a multiple of 16, so we use the model card's official 1472x1104 (and 1104x1472).
ASPECT_RATIOS: dict[str, tuple[int, int]] = {
    "s1:1": (512, 512),
    "m1:1": (512, 512),
    "1:1": (1328, 1328),
    "16:9": (1664, 928),
    "9:16": (928, 1664),
    "4:3": (1472, 1104),
    "3:4": (1104, 1472),
    "3:2": (1584, 1056),
    "2:3": (1056, 1584),
}

AspectRatio = Literal["s1:1", "m1:1", "1:1", "16:9", "9:16", "4:3", "3:4", "3:2", "2:3"]
Language = Literal["en", "zh"]

# From the Qwen-Image model card ("positive_magic").
PROMPT_SUFFIX: dict[str, str] = {
    "en": ", Ultra HD, 4K, cinematic composition.",
    "zh": ", 超清，4K，电影级构图.",
}

DEFAULT_ASPECT_RATIO: AspectRatio = "s1:1"
# The negative prompt of a request that names none (the prompt cache keeps its embeddings resident).
DEFAULT_NEGATIVE_PROMPT = " "


def with_suffix(prompt: str, language: Language) -> str:
    """The prompt as the model sees it: the user's text plus the language's quality suffix."""
    return prompt + PROMPT_SUFFIX[language]
