#!/usr/bin/env python3
"""What the real Qwen-Image weighs on the GPU under each quantization, and the plan `auto` picks.

Runs anywhere in seconds: the real architecture (bench/gpu.py's configs) is built on the meta
device, so no memory is used, and the sizes come from the server's own estimate
(`engine.memory.component_bytes`, checked against real quantized tensors in the tests). For each
card, `auto` is asked with the card's memory less a CUDA context as free memory.

    .venv/bin/python bench/memory_plans.py                  # headroom 6 GiB (the default) and 2 GiB
    .venv/bin/python bench/memory_plans.py --headroom-gb 4
    .venv/bin/python bench/memory_plans.py --pair           # generation + edit model in one server

`--pair` sizes Qwen-Image and Qwen-Image-Edit(-2509/-2511) served together: two 20B transformers
(the edit transformer has the same architecture) and one shared text encoder and VAE, counted as
the server counts them (`engine.models.shared_component_bytes`).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import gpu  # bench/gpu.py: the published configs

from qwen_image_server.engine.device import DeviceInfo
from qwen_image_server.engine.memory import GiB, component_bytes, plan_offload

CUDA_CONTEXT_GIB = 0.6  # what a CUDA context and the allocator's first blocks take before any weight

# (label, quantize, quantize the text encoder, layers kept in bf16)
SETUPS: tuple[tuple[str, str, bool, tuple[str, ...]], ...] = (
    ("bf16", "none", False, ()),
    ("int8 (img_mlp in bf16)", "int8", False, ("img_mlp",)),
    ("fp8 (img_mlp in bf16)", "fp8", False, ("img_mlp",)),
    ("fp8 (img_mlp in bf16) + text encoder fp8", "fp8", True, ("img_mlp",)),
    ("fp8, every layer", "fp8", False, ()),
    ("fp8, every layer + text encoder fp8", "fp8", True, ()),
)


class MetaPipeline:
    """Just enough of a pipeline for `component_bytes`: the three weighted components."""

    def __init__(self) -> None:
        from accelerate import init_empty_weights
        from diffusers import AutoencoderKLQwenImage, QwenImageTransformer2DModel
        from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

        with init_empty_weights():
            transformer = QwenImageTransformer2DModel(**gpu.QWEN_IMAGE_TRANSFORMER)
            vae = AutoencoderKLQwenImage(**gpu.QWEN_IMAGE_VAE)
            config = Qwen2_5_VLConfig(text_config=gpu.QWEN25_VL_7B_TEXT, vision_config=gpu.QWEN25_VL_7B_VISION,
                                      vocab_size=gpu.QWEN25_VL_7B_TEXT["vocab_size"],
                                      tie_word_embeddings=False, **gpu.QWEN25_VL_TOKENS)
            text_encoder = Qwen2_5_VLForConditionalGeneration(config)
        self.components: dict[str, Any] = {}
        for name, module in (("transformer", transformer), ("text_encoder", text_encoder), ("vae", vae)):
            for param in module.parameters():  # bf16 as shipped, without diffusers' cast warnings
                param.data = param.data.to(torch.bfloat16)
            self.components[name] = module


def table(headrooms_gb: Sequence[float]) -> str:
    pipeline = MetaPipeline()
    cuda = DeviceInfo("cuda", "card", None)
    cards = sorted(gpu.CARD_GIB)
    head = ["setup", "transformer GiB", "text encoder GiB", "VAE GiB", "total GiB"]
    head += [f"{card} GB, headroom {h:g}" for h in headrooms_gb for card in cards]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for label, quantize, text_encoder, skip in SETUPS:
        sizes = component_bytes(pipeline, quantize, text_encoder, skip)  # type: ignore[arg-type]
        cells = [label] + [f"{sizes[name] / GiB:.2f}" for name in ("transformer", "text_encoder", "vae")]
        cells.append(f"{sum(sizes.values()) / GiB:.2f}")
        for headroom in headrooms_gb:
            for card in cards:
                free = int((gpu.CARD_GIB[card] - CUDA_CONTEXT_GIB) * GiB)
                cells.append(plan_offload("auto", cuda, sizes, free, int(headroom * GiB)).plan)
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def pair_table(headrooms_gb: Sequence[float]) -> str:
    """Generation + edit model on one card: two transformers, one text encoder, one VAE."""
    from qwen_image_server.config.settings import Settings
    from qwen_image_server.engine.models import shared_component_bytes

    generate, edit = MetaPipeline(), MetaPipeline()
    for name in ("text_encoder", "vae"):  # the same weights: loaded once
        edit.components[name] = generate.components[name]
    cuda = DeviceInfo("cuda", "card", None)
    cards = sorted(gpu.CARD_GIB)
    head = ["setup", "2 transformers GiB", "text encoder GiB", "VAE GiB", "total GiB"]
    head += [f"{card} GB, headroom {h:g}" for h in headrooms_gb for card in cards]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for label, quantize, text_encoder, skip in SETUPS:
        settings = Settings(_env_file=None, quantize=quantize, quantize_text_encoder=text_encoder,
                            quantize_skip=list(skip))
        sizes = shared_component_bytes(settings, [generate, edit])  # type: ignore[list-item]
        cells = [label, f"{(sizes['transformer'] + sizes['transformer#2']) / GiB:.2f}",
                 f"{sizes['text_encoder'] / GiB:.2f}", f"{sizes['vae'] / GiB:.2f}",
                 f"{sum(sizes.values()) / GiB:.2f}"]
        for headroom in headrooms_gb:
            for card in cards:
                free = int((gpu.CARD_GIB[card] - CUDA_CONTEXT_GIB) * GiB)
                cells.append(plan_offload("auto", cuda, sizes, free, int(headroom * GiB)).plan)
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--headroom-gb", type=float, action="append",
                        help="QWEN_IMAGE_OFFLOAD_HEADROOM_GB values to plan with (repeatable; default 6 and 2)")
    parser.add_argument("--pair", action="store_true",
                        help="size a generation model and an edit model served together")
    args = parser.parse_args(argv)
    print((pair_table if args.pair else table)(args.headroom_gb or [6.0, 2.0]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
